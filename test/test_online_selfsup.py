"""Self-supervised online fine-tuning end to end (issue 12), for real: a bag written without
ground truth (kitti_to_bag --no_ground_truth), bag_player, online_finetune with
train.supervision:=self and this test's rclpy client in separate processes on a private localhost
DDS domain (online_harness.py). The samples' calibration comes from the bag: CameraInfo on its
topic, the static transforms as frames.static_transforms (no tf2_msgs wheel: /tf_static cannot
be read), as mm_fusion_run passes them (runner.replay_plan).
"""
import json
import subprocess
import sys

from conftest import REPO
import numpy as np
from online_harness import (
    csv_rows,
    FRAMES,
    fresh_env,
    MAX_POINTS,
    ONLINE_SEQ,
    online_session,
    play,
)
import pytest
import torch

from mm_fusion_ros.bag import topics
from mm_fusion_ros.bag.writer import convert_sequence, ConvertOptions
from mm_fusion_ros.ros.runner import replay_plan
from mm_fusion_ros.sync.replay_buffer import ReplayBuffer
from mm_fusion_ros.training.checkpoint import load_checkpoint

TERMS = ('loss_geometric', 'loss_photometric', 'loss_inertial')


@pytest.fixture(scope='module')
def bag(online_world, tmp_path_factory):
    """The online sequence of the shared world, converted without its ground truth."""
    out = tmp_path_factory.mktemp('selfsup') / 'bag'
    convert_sequence(ConvertOptions(data_path=online_world['data'], sequence=ONLINE_SEQ,
                                    output=out, ground_truth=False))
    return out


def changed_weights(a, b) -> list:
    return [k for k in a['model'] if not torch.equal(a['model'][k], b['model'][k])]


@pytest.fixture(scope='module')
def run(online_world, bag, tmp_path_factory):
    out = tmp_path_factory.mktemp('selfsup_run')
    names, bag_params = replay_plan(bag)
    params = {'initial_checkpoint': online_world['checkpoint'], 'checkpoint_dir': out / 'ckpt',
              'buffer_path': out / 'buffer.npz', 'trajectory_dir': out / 'traj',
              'log_csv': out / 'steps.csv', 'log_every': 1, 'updates_per_sample': 2.0,
              'train.supervision': 'self',
              **{k: json.dumps(v) for k, v in bag_params.items()}}
    rec = {'out': out, 'names': names}
    with online_session(out, 'node.log', **params) as (env, node, probe):
        play(env, bag, 2.0, topics_=names)
        probe.wait_odoms(FRAMES - 1, node)
        probe.wait_until(lambda: csv_rows(out / 'steps.csv') >= 5, '5 gradient steps', node)
        probe.wait_until(lambda: probe.statuses.get('trainer', (0, '', {}))[2].get(
            'loss_geometric', 'nan') != 'nan', 'trainer diagnostics with loss parts', node)
        probe.wait_until(lambda: probe.diagnostics.get('emitted') == str(FRAMES - 1),
                         'synchronizer diagnostics', node)
        rec['saved'] = load_checkpoint(probe.save(node))
        rec['odoms'] = list(probe.odoms)
        rec['sync_diag'] = dict(probe.diagnostics)
        rec['trainer_diag'] = dict(probe.statuses['trainer'][2])
        rec['exit_code'] = node.interrupt()
        rec['log'] = node.log()
    return rec


def test_the_bag_has_no_ground_truth_and_the_player_plays_what_it_has(run):
    assert topics.GT_ODOM_TOPIC not in run['names']
    assert topics.CAMERA_INFO_TOPIC in run['names']
    assert run['sync_diag']['received_ground_truth'] == '0'


def test_a_pose_for_every_scan(online_world, run):
    assert [s for s, _ in run['odoms']] == online_world['scans'][1:]
    assert all(np.isfinite(p).all() for _, p in run['odoms'])
    assert run['sync_diag']['emitted'] == str(FRAMES - 1)
    assert not [k for k in run['sync_diag'] if k.startswith('dropped_')], run['sync_diag']


def test_it_trains_without_ground_truth(online_world, run):
    initial, saved = load_checkpoint(online_world['checkpoint']), run['saved']
    m = saved['metrics']
    assert saved['config']['train']['supervision'] == 'self'
    assert m['online_steps'] >= 5 and m['online_steps_failed'] == 0
    assert saved['step'] == initial['step'] + m['online_steps'], 'every step applied'
    assert changed_weights(initial, saved), 'the weights equal the initial checkpoint'
    assert m['samples_without_target'] == m['online_samples'] == FRAMES - 1


def test_the_samples_carry_the_calibration_from_camera_info_and_static_transforms(run):
    assert {run['sync_diag'][f'calib_{k}'] for k in ('intrinsics', 't_cam_lidar',
                                                     't_imu_lidar')} == {'known'}
    buffer = ReplayBuffer.load(run['out'] / 'buffer.npz')
    samples = buffer.newest(len(buffer))
    assert len(samples) == FRAMES - 1
    assert all(s['calib_valid'].all() for s in samples)
    assert not any(s['target_valid'] for s in samples)


def test_each_self_supervised_term_is_logged(run):
    header, *rows = [r.split(',') for r in (run['out'] / 'steps.csv').read_text().splitlines()]
    assert len(rows) >= 5
    for term in TERMS:
        values = [r[header.index(term)] for r in rows]
        assert all(v != '' and float(v) >= 0 for v in values), (term, values)
    assert all(r[header.index('loss_gt')] == '' for r in rows)
    diag = run['trainer_diag']
    assert diag['supervision'] == 'self'
    assert all(np.isfinite(float(diag[t])) for t in TERMS), diag
    assert diag['loss_gt'] == 'nan'


def test_sigint_writes_a_trajectory_without_ground_truth(run):
    assert run['exit_code'] == 0, run['log'][-4000:]
    assert 'Traceback' not in run['log'], run['log'][-4000:]
    traj = run['out'] / 'traj'
    assert len((traj / 'pred_base_link.txt').read_text().splitlines()) == FRAMES
    assert not (traj / 'gt_base_link.txt').exists()


def test_runner_finetunes_self_supervised_on_a_bag_without_ground_truth(online_world, bag,
                                                                          tmp_path):
    """`mm_fusion_run finetune --set train.supervision:=self` on a bag without ground truth:
    the player plays what the bag has (before: 'topic(s) [...] not in the bag')."""
    out = tmp_path / 'run'
    done = subprocess.run(
        [sys.executable, '-m', 'mm_fusion_ros.ros.runner', 'finetune', '--bag', str(bag),
         '--out_dir', str(out), '--rate', '4', '--checkpoint', str(online_world['checkpoint']),
         '--set', 'train.supervision:=self', '--set', f'sample.max_points:={MAX_POINTS}',
         '--set', 'num_threads:=1'],
        env=fresh_env(), capture_output=True, text=True, timeout=180, cwd=REPO)
    node_log = (out / 'online_node.log').read_text() if (out / 'online_node.log').is_file() \
        else ''
    assert done.returncode == 0, done.stdout + done.stderr + node_log[-4000:]
    summary = json.loads(done.stdout[done.stdout.index('{'):])
    assert summary['poses_published'] == FRAMES - 1
    final = load_checkpoint(out / 'checkpoints' / 'final.pth')
    assert final['config']['train']['supervision'] == 'self'
    assert final['metrics']['online_samples'] == FRAMES - 1
    assert final['metrics']['online_steps'] > 0
    assert changed_weights(load_checkpoint(online_world['checkpoint']), final)
    # config/finetune.yaml's deployment guard scored the new samples against the LiDAR
    assert 0 < final['metrics']['guard_scored_samples'] <= FRAMES - 1, final['metrics']
    assert [p.rsplit('/', 1)[-1] for p in summary['trajectory']] == ['pred_base_link.txt']
