"""Online fine-tuning end to end (issue 7), for real: bag_player, online_finetune (synchronizer +
trainer) and this test's rclpy client are separate processes on a private localhost DDS domain.

One small synthetic world is built per module: an online sequence (its bag is replayed by every
test) and two other sequences on which a small model is pretrained for a few seconds, so that
online learning starts from a trained but improvable model. The drives are given as KITTI pose
files: the online one runs at 16 m/s, the pretraining ones at 6 and 8 m/s, a shift that online
learning has to close. Every wait has a deadline and a
condition (matched publishers, services, a count of poses); nothing sleeps and hopes.
"""
from contextlib import contextmanager
import json
import os
from pathlib import Path
import random
import signal
import subprocess
import sys
import threading
import time

from conftest import REPO
import numpy as np
import pytest
import rclpy
from rclpy.executors import SingleThreadedExecutor
from rclpy.qos import QoSProfile, ReliabilityPolicy
import torch

from mm_fusion_ros.bag import topics
from mm_fusion_ros.bag.reader import read_numpy
from mm_fusion_ros.bag.writer import convert_sequence, ConvertOptions
from mm_fusion_ros.config import SampleConfig
from mm_fusion_ros.geometry import base_link_to_cam0, invert_pose, make_pose, rpy_to_rot
from mm_fusion_ros.kitti.dataset import collate_samples, KITTIOdomPointDataset
from mm_fusion_ros.kitti.odometry import KittiSequence, write_poses
from mm_fusion_ros.model.config import ModelConfig
from mm_fusion_ros.model.normalization import sequence_statistics
from mm_fusion_ros.ros.runner import replay_env
from mm_fusion_ros.sync.replay_buffer import ReplayBuffer
from mm_fusion_ros.synthetic.camera import kitti_calib
from mm_fusion_ros.synthetic.writer import generate_sequence
from mm_fusion_ros.training.checkpoint import load_checkpoint, save_checkpoint
from mm_fusion_ros.training.config import TrainConfig
from mm_fusion_ros.training.core import TrainerCore

FRAMES = 50                      # online sequence: FRAMES - 1 samples
PRETRAIN_FRAMES = 30
ONLINE_SEQ = '05'
PRETRAIN_SEQS = ('00', '01')
# sequence -> (frames, speed [m/s], yaw rate [rad/s]) of a constant-curvature drive
DRIVES = {'00': (PRETRAIN_FRAMES, 6.0, 0.05), '01': (PRETRAIN_FRAMES, 8.0, -0.08),
          ONLINE_SEQ: (FRAMES, 16.0, 0.06)}
IMAGE_SIZE = (320, 96)
PRETRAIN_STEPS = 150
CAMERA_CUT_SCAN = 30             # scans 0..30 with the camera, the rest without
SENSOR_TOPICS = (topics.IMAGE_TOPIC, topics.CLOUD_TOPIC, topics.IMU_TOPIC, topics.GT_ODOM_TOPIC)
MODEL = ModelConfig(visual_encoder='dummy', bev_cells=64, bev_max_shift_cells=6,
                    bev_channels=(8, 16, 32), point_dim=64, imu_channels=32, imu_dim=32,
                    visual_dim=16, fusion_dim=64, head_hidden=64)
MAX_POINTS = 2048
# Node parameters shared by every run: one torch thread (2 cores), a small sample.
BASE_PARAMS = {'sample.max_points': MAX_POINTS, 'num_threads': 1, 'device': 'cpu',
               'min_buffer': 4, 'train.batch_size': 2}
DEADLINE_S = 90.0
TRAINER = '/mm_fusion_trainer'


# --- the synthetic world, built once ------------------------------------------------------------
@pytest.fixture(scope='module')
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp('online_world')
    data = root / 'data'
    for seq, (frames, speed, yaw_rate) in DRIVES.items():
        drive = write_drive(root / 'drives' / f'{seq}.txt', frames, speed, yaw_rate)
        generate_sequence(data, seq, frames, 0, image_size=IMAGE_SIZE, azimuth_steps=1000,
                          trajectory=drive)
    bag = root / 'bag'
    convert_sequence(ConvertOptions(data_path=data, sequence=ONLINE_SEQ, output=bag))
    gt = {m.stamp_ns: m.data.pose for m in read_numpy(bag, [topics.GT_ODOM_TOPIC])}
    scans = [m.stamp_ns for m in read_numpy(bag, [topics.CLOUD_TOPIC])]
    checkpoint = pretrain(data, root / 'pretrained.pth')
    return {'bag': bag, 'checkpoint': checkpoint, 'gt': gt, 'scans': scans}


def write_drive(path, frames, speed, yaw_rate) -> Path:
    """A KITTI pose file (cam0 poses, 10 Hz) of a drive at constant speed and yaw rate."""
    t = np.arange(frames) * 0.1
    yaw = yaw_rate * t
    xyz = np.stack([speed / yaw_rate * np.sin(yaw), speed / yaw_rate * (1 - np.cos(yaw)),
                    np.zeros(frames)], axis=1)
    poses = make_pose(rpy_to_rot(0 * t, 0 * t, yaw), xyz)
    write_poses(path, base_link_to_cam0(poses, kitti_calib(*IMAGE_SIZE).Tr))
    return path


def pretrain(data, path) -> Path:
    """A small model trained briefly on the other sequences: better than random, improvable."""
    sample_cfg = SampleConfig(image_height=MODEL.image_height, image_width=MODEL.image_width,
                              max_points=MAX_POINTS, imu_steps=MODEL.imu_steps)
    dataset = KITTIOdomPointDataset(data, list(PRETRAIN_SEQS), sample_cfg=sample_cfg)
    samples = [dataset[i] for i in range(len(dataset))]
    norm = sequence_statistics([KittiSequence(data, s) for s in PRETRAIN_SEQS])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        core = TrainerCore(MODEL, TrainConfig(learning_rate=1e-3, batch_size=4),
                           normalization=norm)
        rng = np.random.default_rng(0)
        for _ in range(PRETRAIN_STEPS):
            pick = rng.choice(len(samples), 4, replace=False)
            core.step(collate_samples([samples[i] for i in pick]))
    finally:
        torch.set_num_threads(threads)
    return save_checkpoint(path, core.state_dict(sample_cfg=sample_cfg))


# --- processes and the test client --------------------------------------------------------------
def fresh_env() -> dict:
    """A private localhost-only domain for one test (or one run), with the replay DDS profile."""
    env = replay_env()
    env.update(ROS_AUTOMATIC_DISCOVERY_RANGE='LOCALHOST', ROS_LOCALHOST_ONLY='1',
               ROS_DOMAIN_ID=str(random.SystemRandom().randint(1, 101)), PYTHONUNBUFFERED='1')
    env['PYTHONPATH'] = os.pathsep.join(filter(None, [str(REPO), env.get('PYTHONPATH')]))
    return env


class OnlineNode:
    """`python -m mm_fusion_ros.ros.online` with -p parameters; output goes to a log file."""

    def __init__(self, env, log_path, **params):
        cmd = [sys.executable, '-m', 'mm_fusion_ros.ros.online', '--ros-args']
        for key, value in {**BASE_PARAMS, **params}.items():
            cmd += ['-p', f'{key}:={value}']
        self.log_path = Path(log_path)
        self._log = open(self.log_path, 'w')
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     cwd=REPO)

    def log(self) -> str:
        return self.log_path.read_text()

    def interrupt(self, timeout=60.0) -> int:
        """SIGINT, as Ctrl-C and `ros2 launch` send it; the exit code."""
        self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self.kill()

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def play(env, bag, rate, topics_=SENSOR_TOPICS, start_offset=None, duration=None) -> str:
    cmd = [sys.executable, '-m', 'mm_fusion_ros.ros.bag_player', str(bag), '--rate', str(rate),
           '--wait_for_subscribers', '--wait_timeout', '30', '--topics', *topics_]
    if start_offset is not None:
        cmd += ['--start_offset', f'{start_offset:.6f}']
    if duration is not None:
        cmd += ['--duration', f'{duration:.6f}']
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=DEADLINE_S,
                          cwd=REPO)
    assert done.returncode == 0, done.stdout + done.stderr
    assert 'no subscriber matched' not in done.stdout, done.stdout
    return done.stdout


@contextmanager
def ros_domain(env):
    """The test process joins the same domain: rclpy reads these at init."""
    keys = ('ROS_DOMAIN_ID', 'ROS_AUTOMATIC_DISCOVERY_RANGE', 'ROS_LOCALHOST_ONLY',
            'FASTDDS_DEFAULT_PROFILES_FILE')
    with pytest.MonkeyPatch.context() as mp:
        for key in keys:
            mp.setenv(key, env[key])
        yield


class Probe:
    """The test client: records /mm_fusion/odom and /diagnostics, calls the trainer services."""

    def __init__(self, env):
        from diagnostic_msgs.msg import DiagnosticArray
        from nav_msgs.msg import Odometry, Path
        from std_srvs.srv import SetBool, Trigger

        from mm_fusion_ros.ros.conversions import odometry_to_pose, stamp_to_ns
        from mm_fusion_ros.ros.qos import PATH_QOS
        self.Trigger, self.SetBool = Trigger, SetBool
        self.context = rclpy.Context()
        rclpy.init(context=self.context, domain_id=int(env['ROS_DOMAIN_ID']))
        self.node = rclpy.create_node('online_e2e_probe', context=self.context)
        self.lock = threading.Lock()
        self.odoms = []                # (stamp ns, 4x4 pose)
        self.diagnostics = {}
        self.path_lengths = {'/mm_fusion/path': 0, '/mm_fusion/gt_path': 0}

        def on_odom(msg):
            with self.lock:
                self.odoms.append((stamp_to_ns(msg.header.stamp), odometry_to_pose(msg)))

        def on_diag(msg):
            for status in msg.status:
                if 'synchronizer' in status.name:
                    with self.lock:
                        self.diagnostics = {kv.key: kv.value for kv in status.values}

        qos = QoSProfile(depth=1000, reliability=ReliabilityPolicy.RELIABLE)
        self.odom_sub = self.node.create_subscription(Odometry, '/mm_fusion/odom', on_odom, qos)
        self.node.create_subscription(DiagnosticArray, '/diagnostics', on_diag, 10)
        for topic in self.path_lengths:
            self.node.create_subscription(
                Path, topic, lambda msg, t=topic: self.path_lengths.update({t: len(msg.poses)}),
                PATH_QOS)
        self.save_client = self.node.create_client(Trigger, f'{TRAINER}/save_checkpoint')
        self.training_client = self.node.create_client(SetBool, f'{TRAINER}/set_training')
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)
        self.thread.start()

    def close(self):
        self.executor.shutdown(timeout_sec=5.0)
        rclpy.try_shutdown(context=self.context)
        self.thread.join(timeout=10.0)

    def wait_until(self, condition, what, node, timeout=DEADLINE_S):
        deadline = time.monotonic() + timeout
        while not condition():
            if node.proc.poll() is not None:
                pytest.fail(f'online node exited ({node.proc.returncode}) while waiting for '
                            f'{what}:\n{node.log()[-4000:]}')
            if time.monotonic() > deadline:
                pytest.fail(f'no {what} within {timeout:.0f} s; node log:\n{node.log()[-4000:]}')
            time.sleep(0.02)

    def wait_ready(self, node):
        self.wait_until(lambda: self.odom_sub.get_publisher_count() > 0 and
                        self.save_client.service_is_ready() and
                        self.training_client.service_is_ready(),
                        'matched /mm_fusion/odom and trainer services', node)

    def wait_odoms(self, count, node):
        self.wait_until(lambda: self.odom_count() >= count, f'{count} poses on /mm_fusion/odom',
                        node)

    def odom_count(self) -> int:
        with self.lock:
            return len(self.odoms)

    def call(self, client, request, node):
        done = threading.Event()
        future = client.call_async(request)
        future.add_done_callback(lambda _: done.set())
        self.wait_until(done.is_set, f'answer of {client.srv_name}', node, timeout=60.0)
        return future.result()

    def save(self, node) -> Path:
        response = self.call(self.save_client, self.Trigger.Request(), node)
        assert response.success, response.message
        return Path(response.message)

    def set_training(self, enabled, node):
        response = self.call(self.training_client, self.SetBool.Request(data=enabled), node)
        assert response.success, response.message

    def set_parameter(self, name, text, node):
        """As `ros2 param set NODE NAME TEXT` does it: TEXT read as YAML ('1e-5' is a string
        there). Returns the SetParametersResult."""
        from rcl_interfaces.srv import SetParameters
        from rclpy.parameter import Parameter
        import yaml
        client = self.node.create_client(SetParameters, f'{TRAINER}/set_parameters')
        self.wait_until(client.service_is_ready, 'the parameter service', node)
        request = SetParameters.Request(
            parameters=[Parameter(name, value=yaml.safe_load(text)).to_parameter_msg()])
        return self.call(client, request, node).results[0]


@contextmanager
def online_session(tmp, log_name, **params):
    """A fresh domain, the online node with `params` and a ready probe; cleans up after."""
    env = fresh_env()
    node = OnlineNode(env, tmp / log_name, **params)
    try:
        with ros_domain(env):
            probe = Probe(env)
            try:
                probe.wait_ready(node)
                yield env, node, probe
            finally:
                probe.close()
    finally:
        node.kill()


def csv_rows(path) -> int:
    return max(len(path.read_text().splitlines()) - 1, 0) if path.is_file() else 0


# --- scenario: train, save, stop training, lose the camera, SIGINT ------------------------------
@pytest.fixture(scope='module')
def scenario(world, tmp_path_factory):
    out = tmp_path_factory.mktemp('scenario')
    scans = world['scans']
    # End part 1 between scans so that its last scan's IMU (100 Hz) is in it too.
    cut_s = (scans[CAMERA_CUT_SCAN] - scans[0]) / 1e9 + 0.05
    params = {'initial_checkpoint': world['checkpoint'], 'checkpoint_dir': out / 'ckpt',
              'buffer_path': out / 'buffer.npz', 'trajectory_dir': out / 'traj',
              'log_csv': out / 'steps.csv', 'log_every': 1, 'updates_per_sample': 2.0}
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


def test_synchronizer_node_skips_and_counts_messages_that_do_not_decode():
    """The node's raw callbacks, called directly: a bad message is counted, not fatal."""
    from rclpy.serialization import serialize_message

    from mm_fusion_ros.ros.conversions import array_to_cloud
    from mm_fusion_ros.ros.synchronizer_node import SynchronizerNode
    env = fresh_env()
    with ros_domain(env):
        rclpy.init(domain_id=int(env['ROS_DOMAIN_ID']))
        try:
            node = SynchronizerNode(sample_cfg=SampleConfig(image_height=8, image_width=8),
                                    buffer=ReplayBuffer())
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
            node.shutdown()
            node.destroy_node()
        finally:
            rclpy.shutdown()
    assert stats['received']['cloud'] == 4 and stats['received']['imu'] == 1
    assert stats['dropped'] == {'bad_message': 3, 'wrong_frame': 1}
    assert stats['pending']['scans'] == 1     # the good cloud went on to the synchronizer


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
