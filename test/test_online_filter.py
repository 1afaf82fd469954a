"""The inertial filter in the online node, for real (issue 13): bag_player, online_finetune and
this test's rclpy client in separate processes (online_harness.py). The initial checkpoint
embeds a filter, so filter.mode auto runs it; with filter.publish_rate imu, /mm_fusion/odom
comes at every IMU sample between the scans, with the filter's covariance, and an online
checkpoint carries the filter's weights. A filter told that the IMU is stamped late
(imu_time_offset_s) gets its steps from the node all the same: a scan ahead of the IMU is
placed by a forecast, its relative pose applied when the IMU reaches it."""
import numpy as np
from online_harness import FRAMES, online_session, play
import pytest
import torch

from mm_fusion_ros.bag import topics
from mm_fusion_ros.bag.reader import read_numpy
from mm_fusion_ros.filter.checkpoint import (
    embed_filter,
    filter_payload,
    load_filter,
    state_dict_equal,
)
from mm_fusion_ros.filter.config import FilterConfig
from mm_fusion_ros.filter.noise_net import NoiseNet, NoiseNetConfig
from mm_fusion_ros.training.checkpoint import load_checkpoint, save_checkpoint

ANCHORED_FROM = 10     # scans: the filter needs init_window_s (0.5 s) of IMU before its poses


def noise_net():
    """A small noise network with a fixed output (0.3 m/s pseudo-measurement sigma)."""
    torch.manual_seed(0)
    net = NoiseNet(NoiseNetConfig(window=16, channels=4, hidden=8, speed_head=False))
    with torch.no_grad():
        net.head[-1].weight.zero_()
        net.head[-1].bias.fill_(float(np.log(0.09)))
    return net


@pytest.fixture(scope='module')
def run(online_world, tmp_path_factory):
    out = tmp_path_factory.mktemp('filter_node')
    net = noise_net()
    initial = embed_filter(load_checkpoint(online_world['checkpoint']),
                           filter_payload(FilterConfig(), net))
    ckpt = save_checkpoint(out / 'with_filter.pth', initial)
    # With the intake in a process of its own: the filter reads the IMU and T_base_imu that
    # the intake process forwards (runtime/intake_link.py).
    params = {'initial_checkpoint': ckpt, 'checkpoint_dir': out / 'ckpt',
              'training_enabled': False, 'filter.publish_rate': 'imu', 'intake': 'process'}
    scans = online_world['scans']
    with online_session(out, 'node.log', **params) as (env, node, probe):
        play(env, online_world['bag'], 1.0)
        probe.wait_until(lambda: probe.odoms and probe.odoms[-1][0] >= scans[-1],
                         'odometry up to the last scan', node)
        saved = load_checkpoint(probe.save(node))
        with probe.lock:
            rec = {'odoms': list(probe.odoms), 'covs': list(probe.odom_covs)}
        rec.update(saved=saved, net=net, log=node.log(), exit_code=node.interrupt())
    rec['imu'] = [m.stamp_ns for m in read_numpy(online_world['bag'], [topics.IMU_TOPIC])]
    return rec


def test_odometry_at_imu_rate_between_scans(online_world, run):
    assert 'inertial filter on from' in run['log'], run['log'][-3000:]
    stamps = np.array([s for s, _ in run['odoms']])
    assert np.all(np.diff(stamps) > 0), 'odometry goes forward in time'
    scans = np.array(online_world['scans'])
    imu = np.array(run['imu'])
    lo, hi = scans[ANCHORED_FROM], scans[-1]
    want = imu[(imu > lo) & (imu < hi)]
    got = stamps[(stamps > lo) & (stamps < hi)]
    missing = np.setdiff1d(want, got)
    assert len(missing) == 0, f'{len(missing)} of {len(want)} IMU stamps without odometry'
    per_scan = np.histogram(got, bins=scans[ANCHORED_FROM:])[0]
    assert per_scan.min() >= 5, f'poses between consecutive scans: {per_scan}'
    assert len(scans) == FRAMES


def test_odometry_carries_the_filter_covariance(run):
    covs = np.array(run['covs'])
    assert np.all(np.isfinite(covs))
    pos = np.array([np.diag(c)[:3] for c in covs[-100:]])
    assert np.all(pos > 0), 'position variance from the filter'
    assert np.allclose(covs[-1], covs[-1].T)
    poses = np.array([p for _, p in run['odoms']])
    assert np.all(np.isfinite(poses))
    steps = np.linalg.norm(np.diff(poses[-100:, :3, 3], axis=0), axis=1)
    assert steps.max() < 0.5, 'continuous at IMU rate (16 m/s: 0.16 m per 10 ms)'


def test_online_checkpoint_embeds_the_filter(run, tmp_path):
    saved = run['saved']
    assert saved['metrics']['filter_relpose_applied'] > 0
    assert saved['metrics']['filter_imu_poses'] > 0
    assert state_dict_equal(saved['filter']['model'], run['net'].state_dict())
    path = save_checkpoint(tmp_path / 'again.pth', saved)
    cfg, model = load_filter(path)       # weights_only, as predict_odometry reads it
    assert cfg == FilterConfig() and model is not None
    assert run['exit_code'] == 0, run['log'][-3000:]


@pytest.mark.parametrize('rate', ['scan', 'imu'])
def test_an_imu_stamped_late_still_gives_the_filter_its_steps(online_world, tmp_path, rate):
    """imu_time_offset_s -0.06: a step reaches the filter before the IMU takes it to the scan.
    The node once chained the network's step then (measured on the hybrid 07 bag: 562 of 599
    steps chained); now it publishes the filter's state carried to the scan (a forecast), and
    the step's relative pose is applied when the IMU arrives. At IMU rate the odometry is the
    filter's pose at every IMU sample (on the scans' clock): a forecast scan pose, ahead of
    them, must not hold them back."""
    offset_ns = -60_000_000
    initial = embed_filter(load_checkpoint(online_world['checkpoint']),
                           filter_payload(FilterConfig(imu_time_offset_s=offset_ns * 1e-9),
                                          noise_net()))
    params = {'initial_checkpoint': save_checkpoint(tmp_path / 'late.pth', initial),
              'checkpoint_dir': tmp_path / 'ckpt', 'training_enabled': False,
              'filter.publish_rate': rate}
    scans = online_world['scans']
    with online_session(tmp_path, 'node.log', **params) as (env, node, probe):
        play(env, online_world['bag'], 1.0)
        probe.wait_until(lambda: probe.odoms and probe.odoms[-1][0] >= scans[-2],
                         'odometry up to the last scan but one', node)
        metrics = load_checkpoint(probe.save(node))['metrics']
        with probe.lock:
            stamps = np.array([s for s, _ in probe.odoms])
        log, exit_code = node.log(), node.interrupt()
    assert exit_code == 0, log[-3000:]
    steps = metrics['filter_steps'] + metrics['filter_chained_steps']
    assert steps >= FRAMES - 2
    assert metrics['filter_chained_steps'] <= ANCHORED_FROM, metrics
    assert metrics['filter_relpose_applied'] >= FRAMES - ANCHORED_FROM
    assert metrics['filter_forecast_steps'] > 0, metrics
    if rate == 'imu':
        imu = np.array([m.stamp_ns for m in read_numpy(online_world['bag'],
                                                       [topics.IMU_TOPIC])]) + offset_ns
        lo, hi = scans[ANCHORED_FROM + 1], scans[-2]
        want = imu[(imu > lo) & (imu < hi)]
        missing = np.setdiff1d(want, stamps[(stamps > lo) & (stamps < hi)])
        assert len(missing) == 0, f'{len(missing)} of {len(want)} IMU stamps without odometry'
