"""Faults that an online node left running meets (issue 14), each with real processes on a
private localhost DDS domain: online_finetune, bag_player and this test's rclpy probe.

- a looped bag: the second pass is a new trajectory segment and training goes on;
- a bag with every fifth scan removed: the holes are bridged (counted) and the trajectory's
  error against the recorded ground truth stays within 2x of the full bag's;
- kill -9 mid-replay, then a restart: buffer and model resume, no file is half-written;
- messages that are wrong are counted and skipped with the topic named; an autosave folder that
  cannot be written gives an ERROR in /diagnostics while training goes on.
"""
import shutil
import signal
import subprocess
import sys

from conftest import REPO
import numpy as np
from online_harness import (
    DEADLINE_S,
    FRAMES,
    fresh_env,
    ONLINE_SEQ,
    online_session,
    OnlineNode,
    Probe,
    ros_domain,
    SENSOR_TOPICS,
)
from rclpy.qos import QoSProfile, ReliabilityPolicy
import torch

from mm_fusion_ros.bag import topics
from mm_fusion_ros.bag.reader import read_numpy
from mm_fusion_ros.bag.writer import convert_sequence, ConvertOptions
from mm_fusion_ros.cli import evaluate_odometry
from mm_fusion_ros.eval.trajectory_io import read_kitti_poses, read_steps
from mm_fusion_ros.geometry import rot_to_quat
from mm_fusion_ros.kitti.odometry import KittiSequence
from mm_fusion_ros.sync.replay_buffer import ReplayBuffer
from mm_fusion_ros.training.checkpoint import load_checkpoint

IDENTITY = 'base_link velodyne 0 0 0 0 0 0 1'


def start_player(env, bag, rate, *extra):
    """bag_player in the background (it waits for matched subscribers by default)."""
    return subprocess.Popen([sys.executable, '-m', 'mm_fusion_ros.ros.bag_player', str(bag),
                             '--rate', str(rate), '--topics', *SENSOR_TOPICS, *extra], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=REPO)


def finish(player) -> str:
    out, _ = player.communicate(timeout=DEADLINE_S)
    assert player.returncode == 0, out
    return out


def segments(traj_dir) -> list:
    lines = (traj_dir / 'segments.csv').read_text().splitlines()
    keys = lines[0].split(',')
    return [dict(zip(keys, line.split(','))) for line in lines[1:]]


def position_rmse(traj_dir, seg) -> float:
    """RMS position error [m] of a written segment against its ground-truth file."""
    pred = read_kitti_poses(traj_dir / seg['pred'])
    gt = read_kitti_poses(traj_dir / seg['gt'])
    return float(np.sqrt(np.mean(np.sum((pred[:, :3, 3] - gt[:, :3, 3]) ** 2, axis=1))))


def unbridged_rmse(traj_dir, seg, bridged) -> float:
    """The same segment chained from its predicted steps only, as before bridging: each hole's
    motion lost. RMS position error against the ground truth at the predicted poses."""
    pred = read_kitti_poses(traj_dir / seg['pred'])
    gt = read_kitti_poses(traj_dir / seg['gt'])
    steps = np.linalg.inv(pred[:-1]) @ pred[1:]
    chain, kept = [np.eye(4)], [0]
    for k in np.flatnonzero(~bridged[1:]) + 1:
        chain.append(chain[-1] @ steps[k - 1])
        kept.append(k)
    diff = np.stack(chain)[:, :3, 3] - gt[kept][:, :3, 3]
    return float(np.sqrt(np.mean(np.sum(diff ** 2, axis=1))))


def test_a_looped_bag_goes_on_in_a_new_segment_and_keeps_training(online_world, tmp_path):
    # With use_sim_time the bag's /clock jumps back too: counted, the scans start the run.
    params = {'initial_checkpoint': online_world['checkpoint'], 'trajectory_dir': tmp_path / 't',
              'checkpoint_dir': tmp_path / 'ckpt', 'updates_per_sample': 2.0,
              'save_on_shutdown': 'false', 'use_sim_time': 'true'}
    with online_session(tmp_path, 'loop.log', **params) as (env, node, probe):
        player = start_player(env, online_world['bag'], 2.0, '--loop', '--loops', '2', '--clock')
        probe.wait_odoms(FRAMES - 1, node)
        first = load_checkpoint(probe.save(node))
        probe.wait_odoms(2 * (FRAMES - 1), node)
        out = finish(player)
        probe.wait_until(lambda: probe.diagnostics.get('emitted') == str(2 * (FRAMES - 1)),
                         'synchronizer diagnostics of both passes', node)
        second = load_checkpoint(probe.save(node))
        diagnostics = dict(probe.diagnostics)
        assert node.interrupt() == 0, node.log()[-4000:]
    assert '2 loop(s)' in out
    scans = online_world['scans']
    assert [s for s, _ in probe.odoms] == scans[1:] + scans[1:], 'poses of both passes'
    assert diagnostics['rewinds'] == '1' and diagnostics['run'] == '1'
    assert diagnostics['clock_jumps_back'] == '1'
    assert not [k for k in diagnostics if k.startswith('dropped_')], diagnostics
    # training went on over the second pass, with the same model and optimiser
    assert second['metrics']['online_samples'] == 2 * (FRAMES - 1)
    assert second['step'] > first['step']
    segs = segments(tmp_path / 't')
    assert [(s['reason'], s['poses'], s['bridged']) for s in segs] == \
        [('start', str(FRAMES), '0'), ('rewind', str(FRAMES), '0')]
    assert (segs[1]['pred'], segs[1]['gt']) == ('pred_base_link.seg1.txt', 'gt_base_link.seg1.txt')
    for seg in segs:
        np.testing.assert_allclose(read_kitti_poses(tmp_path / 't' / seg['gt'])[[0, -1]],
                                   read_kitti_poses(tmp_path / 't' / segs[0]['gt'])[[0, -1]],
                                   atol=1e-6)


def gapped_bag(data, out):
    """The online sequence with every fifth scan (4, 9, ...) deleted, converted with skip_bad:
    those frames (scan, image, ground truth) are missing; the IMU is whole."""
    copy = out / 'data'
    for sub in (f'sequences/{ONLINE_SEQ}', f'pointclouds/sequences/{ONLINE_SEQ}'):
        shutil.copytree(data / sub, copy / sub)
    (copy / 'poses').mkdir()
    shutil.copy(data / 'poses' / f'{ONLINE_SEQ}.txt', copy / 'poses')
    for k in range(4, FRAMES, 5):
        (copy / 'pointclouds' / 'sequences' / ONLINE_SEQ / 'velodyne' / f'{k:06d}.bin').unlink()
    summary = convert_sequence(ConvertOptions(data_path=copy, sequence=ONLINE_SEQ,
                                              output=out / 'bag', skip_bad=True))
    assert [k for k, _ in summary.skipped] == list(range(4, FRAMES, 5))
    return out / 'bag'


def test_every_fifth_scan_missing_is_bridged_within_twice_the_full_error(online_world,
                                                                          tmp_path):
    bag = gapped_bag(online_world['data'], tmp_path)
    t_velo_imu = KittiSequence(online_world['data'], ONLINE_SEQ).T_base_imu
    imu_line = ' '.join(['velodyne imu_link', *map(repr, t_velo_imu[:3, 3].tolist()),
                         *map(repr, rot_to_quat(t_velo_imu[:3, :3]).tolist())])
    # a 0.2 s hole restarts the synchronizer's chain (no sample across it): the trajectory
    # bridges it with the gyro and the recent velocity
    params = {'initial_checkpoint': online_world['checkpoint'], 'training_enabled': 'false',
              'trajectory_dir': tmp_path / 't', 'save_on_shutdown': 'false',
              'sync.max_scan_gap_s': 0.15, 'frames.static_transforms': [IDENTITY, imu_line]}
    gapped_scans = [m.stamp_ns for m in read_numpy(bag, [topics.CLOUD_TOPIC])]
    with online_session(tmp_path, 'gaps.log', **params) as (env, node, probe):
        finish(start_player(env, online_world['bag'], 1.0))       # segment 0: the full bag
        probe.wait_odoms(FRAMES - 1, node)
        finish(start_player(env, bag, 1.0))                        # segment 1: with holes
        probe.wait_odoms(FRAMES - 1 + len(gapped_scans) - 1, node)
        probe.wait_until(lambda: probe.statuses.get('trainer', (0, '', {}))[2].get(
            'trajectory_bridged') == '9', 'the bridged steps in the diagnostics', node)
        trainer_status = probe.statuses['trainer']
        assert node.interrupt() == 0, node.log()[-4000:]
    # one published pose per scan after the first: the bridged poses come at the scans after
    # the holes
    assert [s for s, _ in probe.odoms] == online_world['scans'][1:] + gapped_scans[1:]
    full, holed = segments(tmp_path / 't')
    assert (holed['reason'], holed['poses'], holed['bridged']) == ('rewind', '40', '9')
    steps = read_steps(tmp_path / 't' / 'pred_base_link.seg1.steps.csv')
    assert steps['bridged'].sum() == 9 and steps['ground_truth'].all()
    assert trainer_status[2]['trajectory_bridged_imu'] == '9', trainer_status  # gyro rotation
    errors = {'full': position_rmse(tmp_path / 't', full),
              'holed': position_rmse(tmp_path / 't', holed),
              'holed, not bridged': unbridged_rmse(tmp_path / 't', holed, steps['bridged'])}
    assert errors['holed'] <= 2 * errors['full'], errors
    assert errors['holed'] < errors['holed, not bridged'], errors
    report = tmp_path / 'eval.json'
    assert evaluate_odometry.main(['--gt', str(tmp_path / 't' / holed['gt']), '--pred',
                                   str(tmp_path / 't' / holed['pred']), '--json',
                                   str(report)]) == 0
    assert '"bridged_steps": 9' in report.read_text()


def test_kill_9_then_restart_resumes_buffer_and_model(online_world, tmp_path):
    ckpt, buffer_path = tmp_path / 'ckpt', tmp_path / 'buffer' / 'buffer.npz'
    params = {'initial_checkpoint': online_world['checkpoint'], 'checkpoint_dir': ckpt,
              'buffer_path': buffer_path, 'autosave_interval_s': 0.5,
              'updates_per_sample': 2.0, 'save_on_shutdown': 'false'}
    env = fresh_env()
    node = OnlineNode(env, tmp_path / 'killed.log', **params)
    try:
        with ros_domain(env):
            probe = Probe(env)
            try:
                probe.wait_ready(node)
                player = start_player(env, online_world['bag'], 1.0)
                probe.wait_odoms(25, node)
                probe.wait_until(lambda: (ckpt / 'autosave.pth').is_file() and
                                 buffer_path.is_file(), 'an autosave', node)
                node.proc.send_signal(signal.SIGKILL)
                assert node.proc.wait(timeout=30) == -signal.SIGKILL
                player.kill()
                player.wait()
            finally:
                probe.close()
    finally:
        node.kill()
    # what the killed node left is whole: the last complete autosave of each file
    autosave = load_checkpoint(ckpt / 'autosave.pth')
    saved_samples = len(ReplayBuffer.load(buffer_path))
    assert autosave['metrics']['online_samples'] >= 1 and saved_samples >= 4
    with online_session(tmp_path, 'restart.log', resume='true', **params) as (env, node, probe):
        resumed = load_checkpoint(probe.save(node))
        leftovers = [p.name for p in tmp_path.rglob('*.tmp')]
        subprocess.run([sys.executable, '-m', 'mm_fusion_ros.ros.bag_player',
                        str(online_world['bag']), '--rate', '2', '--duration', '0.55',
                        '--topics', *SENSOR_TOPICS], env=env, check=True, cwd=REPO,
                       capture_output=True, timeout=DEADLINE_S)
        probe.wait_odoms(5, node)
        probe.wait_until(lambda: load_checkpoint(probe.save(node))['step'] > resumed['step'],
                         'a gradient step after the restart', node)
        assert node.interrupt() == 0, node.log()[-4000:]
        log = node.log()
    assert f'resuming from {ckpt / "autosave.pth"}' in log, log[-4000:]
    m = resumed['metrics']
    assert m['resumed_buffer_samples'] == m['buffer_size'] == saved_samples
    assert resumed['step'] == autosave['step'] and m['optimizer_resumed']
    for k in autosave['model']:
        assert torch.equal(resumed['model'][k], autosave['model'][k]), k
    assert leftovers == [], 'the restart clears temporaries a killed writer left'


def wrong_messages():
    """(topic, message) pairs the synchronizer must refuse: an unknown image encoding, a
    truncated cloud, and a cloud and an IMU sample in frames it knows no transform for."""
    from ros_messages import array_to_cloud
    from sensor_msgs.msg import Image, Imu
    image = Image(height=4, width=4, encoding='yuv_weird', step=8, data=bytes(32))
    truncated = array_to_cloud(np.zeros((100, 4), np.float32), 10**9, 'velodyne')
    truncated.data = bytes(truncated.data)[:800]
    imu = Imu()
    imu.header.frame_id = 'gps_antenna'
    imu.orientation.w = 1.0
    return [(topics.IMAGE_TOPIC, image), (topics.CLOUD_TOPIC, truncated),
            (topics.CLOUD_TOPIC, array_to_cloud(np.zeros((10, 4), np.float32), 10**9,
                                                'lidar_top')),
            (topics.IMU_TOPIC, imu)]


def test_wrong_messages_are_counted_and_an_unwritable_autosave_is_an_error(online_world,
                                                                          tmp_path):
    blocker = tmp_path / 'a_file'
    blocker.write_text('')
    params = {'initial_checkpoint': online_world['checkpoint'], 'autosave_interval_s': 0.5,
              'checkpoint_dir': blocker / 'ckpt', 'save_on_shutdown': 'false',
              'updates_per_sample': 2.0}
    with online_session(tmp_path, 'faults.log', **params) as (env, node, probe):
        qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
        messages = wrong_messages()
        pubs = {t: probe.node.create_publisher(type(m), t, qos) for t, m in messages}
        probe.wait_until(lambda: all(p.get_subscription_count() for p in pubs.values()),
                         'the synchronizer matching the test publishers', node)
        for topic, msg in messages:
            pubs[topic].publish(msg)
        probe.wait_until(lambda: probe.diagnostics.get('dropped_bad_message') == '2' and
                         probe.diagnostics.get('dropped_wrong_frame') == '2',
                         'the wrong messages counted', node)
        probe.wait_until(lambda: probe.statuses.get('trainer', (0,))[0] == 2,
                         'an ERROR status of the trainer', node)
        error = probe.statuses['trainer']
        finish(start_player(env, online_world['bag'], 2.0, '--duration', '2.0'))
        probe.wait_until(lambda: int(probe.statuses['trainer'][2].get('online_steps', 0)) >= 5,
                         'training going on', node)
        later = probe.statuses['trainer']
        assert node.interrupt() == 0, node.log()[-4000:]
        log = node.log()
    assert 'autosave into' in error[1] and 'a_file' in error[1], error
    assert int(later[2]['autosave_failures']) >= 2 and later[0] == 2, later
    assert int(later[2]['errors_trainer']) >= 2
    assert "/kitti/camera/image_raw: message skipped (bad_message): image encoding 'yuv_weird'" \
        in log
    assert '/kitti/velodyne/points: message skipped (bad_message): PointCloud2 data has 800' \
        in log
    assert "/kitti/velodyne/points: message skipped (wrong_frame): cloud in frame 'lidar_top'" \
        in log
    assert "/kitti/imu/data: message skipped (wrong_frame): IMU sample in frame 'gps_antenna'" \
        in log
    assert log.count('Traceback') >= 1   # the autosave error, logged with its traceback
