"""Online fine-tuning end to end (issue 7), for real: bag_player, online_finetune (synchronizer +
trainer) and this test's rclpy client are separate processes on a private localhost DDS domain
(the shared pieces are in online_harness.py; the world is built once per session).
"""
from contextlib import contextmanager
import json
from pathlib import Path
import subprocess
import sys

from conftest import REPO
import numpy as np
from online_harness import (
    csv_rows,
    FRAMES,
    fresh_env,
    MAX_POINTS,
    MODEL,
    online_session,
    play,
    ros_domain,
    SENSOR_TOPICS,
)
import pytest
import rclpy
import torch

from mm_fusion_ros.bag import topics
from mm_fusion_ros.config import SampleConfig
from mm_fusion_ros.geometry import invert_pose
from mm_fusion_ros.sync.replay_buffer import ReplayBuffer
from mm_fusion_ros.training.checkpoint import load_checkpoint

CAMERA_CUT_SCAN = 30             # scans 0..30 with the camera, the rest without


@pytest.fixture(scope='module')
def world(online_world):
    return online_world


# --- scenario: train, save, stop training, lose the camera, SIGINT ------------------------------
# In both modes: everything in the node's process (gradient steps in a thread), or the intake
# (synchronizer) and the gradient steps each in a process of their own.
@pytest.fixture(scope='module', params=['thread', 'process'])
def scenario(world, tmp_path_factory, request):
    out = tmp_path_factory.mktemp(f'scenario_{request.param}')
    scans = world['scans']
    # End part 1 between scans so that its last scan's IMU (100 Hz) is in it too.
    cut_s = (scans[CAMERA_CUT_SCAN] - scans[0]) / 1e9 + 0.05
    params = {'initial_checkpoint': world['checkpoint'], 'checkpoint_dir': out / 'ckpt',
              'buffer_path': out / 'buffer.npz', 'trajectory_dir': out / 'traj',
              'log_csv': out / 'steps.csv', 'log_every': 1, 'updates_per_sample': 2.0,
              'learner': request.param, 'intake': request.param}
    rec = {'out': out, 'cut_samples': CAMERA_CUT_SCAN}
    with online_session(out, 'node.log', **params) as (env, node, probe):
        play(env, world['bag'], 2.0, duration=cut_s)
        probe.wait_odoms(CAMERA_CUT_SCAN, node)
        rec['odoms_part1'] = probe.odom_count()
        probe.wait_until(lambda: csv_rows(out / 'steps.csv') >= 5, '5 gradient steps', node)
        rec['trained_path'] = probe.save(node)
        rec['trained'] = load_checkpoint(rec['trained_path'])
        probe.set_training(False, node)
        # Loaded at once: with the step count frozen, the next save writes the same file name.
        rec['frozen_a'] = load_checkpoint(probe.save(node))
        # The camera is gone from here on: every topic but the camera plays the rest.
        play(env, world['bag'], 2.0, topics_=SENSOR_TOPICS[1:], start_offset=cut_s)
        probe.wait_odoms(FRAMES - 1, node)
        probe.wait_until(lambda: probe.diagnostics.get('emitted') == str(FRAMES - 1),
                         'synchronizer diagnostics', node)
        rec['frozen_b'] = load_checkpoint(probe.save(node))
        rec['odoms'] = list(probe.odoms)
        rec['diagnostics'] = dict(probe.diagnostics)
        probe.wait_until(lambda: set(probe.path_lengths.values()) == {FRAMES - 1},
                         f'paths of {FRAMES - 1} poses', node)
        rec['exit_code'] = node.interrupt()
        rec['log'] = node.log()
    return rec


def test_odom_arrives_for_every_synchronized_scan(world, scenario):
    stamps = [s for s, _ in scenario['odoms']]
    assert stamps == world['scans'][1:], 'one pose per scan after the first, in stamp order'
    assert scenario['odoms_part1'] == CAMERA_CUT_SCAN
    assert all(np.isfinite(p).all() for _, p in scenario['odoms'])
    diag = scenario['diagnostics']
    assert diag['emitted'] == str(FRAMES - 1)
    assert not [k for k in diag if k.startswith('dropped_')], diag
    assert diag['received_cloud'] == str(FRAMES)
    assert diag['masked_imu'] == '0', diag
    # (the fixture also waited for /mm_fusion/path and /mm_fusion/gt_path to hold every pose)


def test_save_checkpoint_returns_a_loadable_trained_checkpoint(world, scenario):
    initial = load_checkpoint(world['checkpoint'])
    trained = scenario['trained']
    assert scenario['trained_path'].parent == scenario['out'] / 'ckpt'
    assert trained['metrics']['online_steps'] >= 5
    assert trained['step'] == initial['step'] + trained['metrics']['online_steps']
    assert trained['config']['model'] == MODEL.to_dict()
    changed = [k for k in initial['model'] if not torch.equal(initial['model'][k],
                                                              trained['model'][k])]
    assert changed, 'the saved weights equal the initial checkpoint'


def test_set_training_false_freezes_the_weights_while_samples_arrive(scenario):
    a, b = scenario['frozen_a'], scenario['frozen_b']
    assert b['metrics']['online_samples'] - a['metrics']['online_samples'] == \
        FRAMES - 1 - CAMERA_CUT_SCAN
    assert a['step'] == b['step'] and \
        a['metrics']['online_steps'] == b['metrics']['online_steps']
    assert not b['metrics']['training_enabled']
    for k in a['model']:
        assert torch.equal(a['model'][k], b['model'][k]), k


def test_losing_the_camera_keeps_poses_coming_with_the_camera_masked(scenario):
    a, b = scenario['frozen_a'], scenario['frozen_b']
    without_camera = FRAMES - 1 - CAMERA_CUT_SCAN   # incl. the sample across the cut
    assert a['metrics']['camera_masked_samples'] == 0
    assert b['metrics']['camera_masked_samples'] == without_camera
    assert b['metrics']['lidar_masked_samples'] == b['metrics']['imu_masked_samples'] == 0
    assert scenario['diagnostics']['masked_camera'] == str(without_camera)
    assert len(scenario['odoms']) - scenario['odoms_part1'] == without_camera


def test_sigint_exits_cleanly_and_writes_final_files(scenario):
    out = scenario['out']
    assert scenario['exit_code'] == 0, scenario['log'][-4000:]
    assert 'Traceback' not in scenario['log'], scenario['log'][-4000:]
    final = load_checkpoint(out / 'ckpt' / 'final.pth')
    assert final['metrics']['online_samples'] == FRAMES - 1
    assert len(ReplayBuffer.load(out / 'buffer.npz')) == FRAMES - 1
    for name in ('pred_base_link.txt', 'gt_base_link.txt'):
        assert len((out / 'traj' / name).read_text().splitlines()) == FRAMES, name
    assert not [p for p in out.rglob('*') if p.name.endswith('.tmp')]


@contextmanager
def synchronizer_node(**kwargs):
    """A SynchronizerNode in this process (8x8 samples, its own buffer) on a fresh domain; its
    callbacks are called directly. Shut down and destroyed after."""
    from mm_fusion_ros.ros.synchronizer_node import SynchronizerNode
    env = fresh_env()
    with ros_domain(env):
        rclpy.init(domain_id=int(env['ROS_DOMAIN_ID']))
        try:
            node = SynchronizerNode(sample_cfg=SampleConfig(image_height=8, image_width=8),
                                    buffer=ReplayBuffer(), **kwargs)
            try:
                yield node
            finally:
                node.shutdown()
                node.destroy_node()
        finally:
            rclpy.shutdown()


def test_synchronizer_node_skips_and_counts_messages_that_do_not_decode():
    """The node's raw callbacks, called directly: a bad message is counted, not fatal."""
    from rclpy.serialization import serialize_message
    from ros_messages import array_to_cloud

    with synchronizer_node() as node:
        points = np.random.default_rng(0).normal(size=(100, 4)).astype(np.float32)
        callbacks = {sub.topic_name: sub.callback for sub in node.subscriptions}
        on_cloud, on_imu = callbacks[topics.CLOUD_TOPIC], callbacks[topics.IMU_TOPIC]
        on_cloud(serialize_message(array_to_cloud(points[:, :2], 10**9, 'velodyne',
                                                  names=('x', 'y'))))   # no z
        on_cloud(b'\x00\x01\x00\x00 not a cloud')
        on_imu(serialize_message(array_to_cloud(points, 10**9, 'velodyne')))
        on_cloud(serialize_message(array_to_cloud(points, 10**9, 'lidar_top')))
        on_cloud(serialize_message(array_to_cloud(points, 10**9, 'velodyne')))
        stats = node.sync.stats
    assert stats['received']['cloud'] == 4 and stats['received']['imu'] == 1
    assert stats['dropped'] == {'bad_message': 3, 'wrong_frame': 1}
    assert stats['pending']['scans'] == 1     # the good cloud went on to the synchronizer


def test_synchronizer_node_builds_its_message_decoders_before_the_first_message(monkeypatch):
    """rosbags builds a type's deserializer at its first message (4-13 ms each): the node
    builds those of its inputs when it starts, so its first sample does not wait for them."""
    from rosbags.typesys import get_typestore, Stores

    from mm_fusion_ros import messages
    store = get_typestore(Stores.ROS2_HUMBLE)
    monkeypatch.setattr(messages, 'cdr_typestore', lambda: store)
    assert not store.cache
    with synchronizer_node():
        pass
    assert {topics.IMAGE_TYPE, topics.CLOUD_TYPE, topics.ODOMETRY_TYPE,
            topics.CAMERA_INFO_TYPE} <= set(store.cache)


def test_synchronizer_node_takes_calibration_and_supervision_from_its_inputs():
    """The node's camera_info callback, called directly: CameraInfo becomes the samples'
    calibration; an uncalibrated one is counted as a bad message. A sink training
    self-supervised makes sync.ground_truth auto ignore the ground truth."""
    from types import SimpleNamespace

    from rclpy.serialization import serialize_message
    from sensor_msgs.msg import CameraInfo

    K = [700.0, 0.0, 600.0, 0.0, 710.0, 180.0, 0.0, 0.0, 1.0]
    sink = SimpleNamespace(supervision='self', on_sample=lambda s: None,
                           on_backlog=lambda n: None, on_ground_truth=lambda t, p: None)
    with synchronizer_node(sink=sink) as node:
        assert node.sync.calibration.intrinsics is None
        on_info = {sub.topic_name: sub.callback
                   for sub in node.subscriptions}[topics.CAMERA_INFO_TOPIC]
        info = CameraInfo(width=1242, height=375, k=K)
        info.header.frame_id = 'camera2'
        on_info(serialize_message(info))
        calibration, mode = node.sync.calibration, node.sync.cfg.ground_truth
        on_info(serialize_message(CameraInfo(width=1242, height=375)))   # K all zeros
        stats = node.sync.stats
    np.testing.assert_array_equal(calibration.intrinsics, np.reshape(K, (3, 3)))
    assert calibration.image_size == (1242, 375)
    assert mode == 'ignore'
    assert stats['dropped'] == {'bad_message': 1}


def test_restart_resumes_from_saved_buffer_and_checkpoint(world, scenario, tmp_path):
    final_path = scenario['out'] / 'ckpt' / 'final.pth'
    final = load_checkpoint(final_path)
    params = {'initial_checkpoint': final_path, 'buffer_path': scenario['out'] / 'buffer.npz',
              'checkpoint_dir': tmp_path / 'ckpt', 'updates_per_sample': 2.0,
              'save_on_shutdown': 'false'}
    with online_session(tmp_path, 'restart.log', **params) as (env, node, probe):
        resumed = load_checkpoint(probe.save(node))
        lr = probe.set_parameter('train.learning_rate', '1e-5', node)
        fixed = probe.set_parameter('train.batch_size', '8', node)
        play(env, world['bag'], 2.0, duration=0.55)        # 6 scans: 5 new samples
        probe.wait_odoms(5, node)
        probe.wait_until(lambda: load_checkpoint(probe.save(node))['step'] > final['step'],
                         'a gradient step after the restart', node)
        after = load_checkpoint(probe.save(node))
        assert node.interrupt() == 0
        log = node.log()
    m = resumed['metrics']
    assert m['resumed_buffer_samples'] == m['buffer_size'] == FRAMES - 1
    assert m['initial_step'] == resumed['step'] == final['step']
    assert m['optimizer_resumed'] and m['online_samples'] == 0
    for k in final['model']:
        assert torch.equal(resumed['model'][k], final['model'][k]), k
    assert f'resumed {FRAMES - 1} samples from' in log, log[-4000:]
    assert f'fine-tuning from {final_path}' in log, log[-4000:]
    # the learning rate changes at run time (given as text, as `ros2 param set` sends 1e-5)
    assert lr.successful, lr.reason
    assert {g['lr'] for g in after['optimizer']['param_groups']} == {1e-5}
    assert not fixed.successful and 'fixed at start' in fixed.reason


# --- online learning, measured ------------------------------------------------------------------
LEARN_RATE = 1.0
LEARN_PARAMS = {'updates_per_sample': 2.0, 'max_step_debt': 40, 'train.learning_rate': 1e-3,
                'train.batch_size': 4, 'save_on_shutdown': 'false'}


def step_errors(odoms, gt) -> np.ndarray:
    """Translation error [m] of each published step (pose k-1 -> k) against ground truth."""
    errors = []
    for (s0, p0), (s1, p1) in zip(odoms[:-1], odoms[1:]):
        pred = (invert_pose(p0) @ p1)[:3, 3]
        true = (invert_pose(gt[s0]) @ gt[s1])[:3, 3]
        errors.append(np.linalg.norm(pred - true))
    return np.array(errors)


@pytest.fixture(scope='module')
def learning(world, tmp_path_factory):
    out = tmp_path_factory.mktemp('learning')
    errors = {}
    for enabled in (False, True):
        name = f'training_{"on" if enabled else "off"}'
        with online_session(out, f'{name}.log', initial_checkpoint=world['checkpoint'],
                            training_enabled=str(enabled).lower(),
                            **LEARN_PARAMS) as (env, node, probe):
            play(env, world['bag'], LEARN_RATE)
            probe.wait_odoms(FRAMES - 1, node)
            assert node.interrupt() == 0
            odoms = list(probe.odoms)
        assert [s for s, _ in odoms] == world['scans'][1:]
        errors[enabled] = step_errors(odoms, world['gt'])
    return errors


def test_online_training_lowers_the_error_on_a_new_sequence(learning, record_property):
    half = len(learning[True]) // 2
    off = float(learning[False][half:].mean())
    on = float(learning[True][half:].mean())
    record_property('second_half_step_error_m', {'training_on': on, 'training_off': off})
    # Measured over 7 runs (report of issue 7): on/off between 0.20 and 0.30.
    assert on < 0.6 * off, f'second-half step error: training on {on:.3f} m, off {off:.3f} m'


# --- the runner, once ---------------------------------------------------------------------------
def test_runner_finetune_end_to_end(world, tmp_path):
    env = fresh_env()
    out = tmp_path / 'run'
    done = subprocess.run(
        [sys.executable, '-m', 'mm_fusion_ros.ros.runner', 'finetune', '--bag', str(world['bag']),
         '--out_dir', str(out), '--rate', '4', '--checkpoint', str(world['checkpoint']),
         '--set', f'sample.max_points:={MAX_POINTS}', '--set', 'num_threads:=1'],
        env=env, capture_output=True, text=True, timeout=180, cwd=REPO)
    node_log = (out / 'online_node.log').read_text() if (out / 'online_node.log').is_file() \
        else ''
    assert done.returncode == 0, done.stdout + done.stderr + node_log[-4000:]
    summary = json.loads(done.stdout[done.stdout.index('{'):])
    assert summary['poses_published'] == FRAMES - 1
    assert summary['node_exit_code'] == 0
    saved = load_checkpoint(summary['saved_checkpoint'])
    assert saved['metrics']['online_samples'] == FRAMES - 1
    assert load_checkpoint(out / 'checkpoints' / 'final.pth')['metrics']['online_samples'] == \
        FRAMES - 1
    assert sorted(Path(p).name for p in summary['trajectory']) == ['gt_base_link.txt',
                                                                    'pred_base_link.txt']
    assert len((out / 'trajectory' / 'pred_base_link.txt').read_text().splitlines()) == FRAMES
