"""The stages of bench/profile_online.py: the online node's calls, replayed in one thread and
timed per stage. Imported after --src put the package under test first on sys.path."""
from collections import Counter, defaultdict
from contextlib import contextmanager
import importlib
import os
from pathlib import Path
import time

from online import prepare_bag  # bench/online.py
import rclpy
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.serialization import serialize_message
import torch

from mm_fusion_ros.bag import topics
from mm_fusion_ros.bag.playback import BagSource
from mm_fusion_ros.config import SampleConfig
from mm_fusion_ros.model.config import ModelConfig
from mm_fusion_ros.ros import conversions
from mm_fusion_ros.sync.calibration import CalibrationTracker
from mm_fusion_ros.sync.config import BufferConfig, SyncConfig
from mm_fusion_ros.sync.frames import FrameConfig, FrameGuard
from mm_fusion_ros.sync.synchronizer import Synchronizer
from mm_fusion_ros.training.config import TrainConfig
from mm_fusion_ros.training.online import build_online_trainer, OnlineConfig
from mm_fusion_ros.trajectory.chain import TrajectoryConfig

try:   # the batched IMU intake (issue 16); absent in the code before it
    from mm_fusion_ros.sync.imu_intake import ImuIntake
except ImportError:
    ImuIntake = None

WARMUP_SAMPLES = 3      # the first samples pay one-off costs (allocation, first calls)
STATIC = ['base_link velodyne 0 0 0 0 0 0 1']   # config/finetune.yaml
KINDS = {topics.IMAGE_TOPIC: 'image', topics.CLOUD_TOPIC: 'cloud', topics.IMU_TOPIC: 'imu',
         topics.GT_ODOM_TOPIC: 'ground_truth', topics.CAMERA_INFO_TOPIC: 'camera_info',
         topics.TF_STATIC_TOPIC: 'tf_static'}
# Table order; stages not in it come after these.
ORDER = ('decode image', 'decode cloud', 'IMU intake (decode, frame, add)', 'ground truth intake',
         'camera_info intake', 'synchronizer: pairing, queues', 'image resize',
         'point subsampling', 'IMU resample', 'sample build: stack, calib',
         'collate, to tensors', 'model: visual encoder', 'model: LiDAR depth image',
         'model: BEV grids', 'model: point encoder CNN + correlation', 'model: IMU encoder',
         'model: fusion, heads, rest', 'replay buffer add', 'trajectory',
         'on_sample rest', 'publish odometry')


class Stages:
    """Exclusive CPU time of this thread per named stage (time.thread_time: other processes on a
    shared machine do not count); a stage's nested stages are subtracted from it."""

    def __init__(self):
        self._stack, self._patched = [], []
        self.reset()

    def reset(self):
        self.time = defaultdict(float)
        self.calls = Counter()

    def start(self, name):
        self._stack.append([name, time.thread_time(), 0.0])

    def stop(self, *_):
        name, t0, nested = self._stack.pop()
        elapsed = time.thread_time() - t0
        self.time[name] += elapsed - nested
        self.calls[name] += 1
        if self._stack:
            self._stack[-1][2] += elapsed

    @contextmanager
    def __call__(self, name):
        self.start(name)
        try:
            yield
        finally:
            self.stop()

    def wrap(self, owner, attr, name):
        """owner.attr (a module function or a bound method) timed as `name`; skipped when the
        code under test has no such attribute."""
        if isinstance(owner, str):
            owner = importlib.import_module(owner)
        original = getattr(owner, attr, None)
        if original is None:
            return

        def timed(*args, **kwargs):
            with self(name):
                return original(*args, **kwargs)
        setattr(owner, attr, timed)
        self._patched.append((owner, attr, original))

    def hook(self, module, name):
        module.register_forward_pre_hook(lambda *_: self.start(name))
        module.register_forward_hook(self.stop)

    def restore(self):
        for owner, attr, original in reversed(self._patched):
            setattr(owner, attr, original)
        self._patched = []


def read_bag(bag: Path) -> list:
    """(kind, raw CDR bytes) of every message the node subscribes to, in record order."""
    with BagSource(bag) as source:
        names = [t for t in source.topics if t in KINDS]
        start, stop = source.window(0.0, None)
        return [(KINDS[topic], raw) for topic, _, raw in source.messages(names, start, stop)]


def build(visual: str, work: Path, num_threads: int):
    """The trainer core (training off: the prediction path alone) and synchronizer, configured
    as config/finetune.yaml configures online_finetune."""
    online = OnlineConfig(training_enabled=False, save_on_shutdown=False, device='cpu',
                          num_threads=num_threads, checkpoint_dir=str(work / 'ckpt'))
    train = TrainConfig(supervision='self')
    trainer = build_online_trainer(online, train, ModelConfig(visual_encoder=visual),
                                   SampleConfig(max_points=16384), BufferConfig(capacity=1000),
                                   TrajectoryConfig(bridge='imu', max_bridge_s=2.0))
    frames = FrameGuard(FrameConfig(static_transforms=STATIC))
    calib = CalibrationTracker(frames.cfg, frames.transforms)
    sync = Synchronizer(trainer.sample_cfg,
                        SyncConfig(max_scan_gap_s=0.3, rewind_s=1.0).for_supervision('self'),
                        calibration=calib.current)
    trainer.use_imu(sync.imu_between, frames.rot_base_imu)
    return trainer, sync, frames, calib


def instrument(st: Stages, trainer, sync):
    for mod in ('mm_fusion_ros.sync.synchronizer', 'mm_fusion_ros.kitti.sample'):
        st.wrap(mod, 'resize_image', 'image resize')
        st.wrap(mod, 'subsample_scan', 'point subsampling')
    st.wrap('mm_fusion_ros.kitti.sample', 'resample_imu', 'IMU resample')
    st.wrap('mm_fusion_ros.sync.synchronizer', 'build_sample', 'sample build: stack, calib')
    st.wrap('mm_fusion_ros.training.online', 'collate_samples', 'collate, to tensors')
    st.wrap(trainer.core, 'to_device', 'collate, to tensors')
    st.wrap('mm_fusion_ros.model.encoders', 'bev_grid', 'model: BEV grids')
    st.wrap('mm_fusion_ros.model.net', 'lidar_depth_image', 'model: LiDAR depth image')
    st.wrap(trainer.buffer, 'add', 'replay buffer add')
    st.wrap(trainer.trajectory, 'add_step', 'trajectory')
    model = trainer.infer_model
    st.hook(model, 'model: fusion, heads, rest')
    st.hook(model.visual, 'model: visual encoder')
    st.hook(model.point, 'model: point encoder CNN + correlation')
    st.hook(model.imu, 'model: IMU encoder')


class Replay:
    """The synchronizer node's callbacks and the trainer node's on_sample, in one thread."""

    def __init__(self, st, trainer, sync, frames, calib, intake: str, publisher):
        self.st, self.trainer, self.sync = st, trainer, sync
        self.frames, self.calib = frames, calib
        self.intake, self.publisher = intake, publisher
        self.imu = ImuIntake(sync, frames) if intake == 'batch' else None
        self.pending_imu = []
        self.samples = self.imu_messages = 0

    def feed(self, kind, raw):
        st, sync = self.st, self.sync
        if kind == 'imu' and self.imu is not None:
            self.pending_imu.append(raw)   # taken together with what is queued behind it
            return
        self.drain_imu()
        decode = conversions.decode_cdr
        if kind == 'image':
            with st('decode image'):
                msg = decode(raw, topics.IMAGE_TYPE)
                image = conversions.image_to_array(msg)
            with st('synchronizer: pairing, queues'):
                sync.add_image(conversions.stamp_to_ns(msg.header.stamp), image)
        elif kind == 'cloud':
            with st('decode cloud'):
                msg = decode(raw, topics.CLOUD_TYPE)
                points = self.frames.cloud(conversions.cloud_to_array(msg), msg.header.frame_id)
            with st('synchronizer: pairing, queues'):
                sync.add_cloud(conversions.stamp_to_ns(msg.header.stamp), points)
        elif kind == 'imu':
            with st('IMU intake (decode, frame, add)'):
                msg = decode(raw, topics.IMU_TYPE)
                sync.add_imu(conversions.stamp_to_ns(msg.header.stamp), *self.frames.imu(
                    *conversions.imu_to_arrays(msg), msg.header.frame_id))
            self.imu_messages += 1
        elif kind == 'ground_truth':
            with st('ground truth intake'):
                msg = decode(raw, topics.ODOMETRY_TYPE)
                sync.add_ground_truth(conversions.stamp_to_ns(msg.header.stamp),
                                      conversions.odometry_to_pose(msg))
        elif kind == 'camera_info':
            with st('camera_info intake'):
                msg = decode(raw, topics.CAMERA_INFO_TYPE)
                self._calibrate(self.calib.add_camera_info(
                    *conversions.camera_info_to_arrays(msg)))
        elif kind == 'tf_static':
            for tf in decode(raw, topics.TF_TYPE).transforms:
                self.frames.add_static(tf.header.frame_id, tf.child_frame_id,
                                       conversions.pose_to_matrix(tf.transform.translation,
                                                                  tf.transform.rotation))
            self._calibrate(self.calib.refresh())
        self.dispatch()

    def drain_imu(self):
        if self.pending_imu:
            with self.st('IMU intake (decode, frame, add)'):
                self.imu.add_raw(self.pending_imu)
            self.imu_messages += len(self.pending_imu)
            self.pending_imu = []
            self.dispatch()

    def _calibrate(self, calibration):
        if calibration is not None:
            self.sync.set_calibration(calibration)

    def dispatch(self):
        for sample in self.sync.pop_ready():
            with self.st('on_sample rest'):
                prediction = self.trainer.on_sample(sample)
            with self.st('publish odometry'):
                for record in prediction.poses:
                    msg = self.publisher.msg_type()
                    conversions.fill_odometry(msg, record, topics.ODOM_FRAME, topics.PRED_FRAME)
                    self.publisher.publish(msg)
            self.samples += 1
            if self.samples == WARMUP_SAMPLES:
                self.mark()

    def mark(self):
        self.st.reset()
        self.imu_at_mark, self.samples_at_mark = self.imu_messages, self.samples
        self.wall0, self.cpu0, self.thread0 = time.perf_counter(), time.process_time(), \
            time.thread_time()


def profile_one(visual, messages, work, args, node) -> dict:
    from nav_msgs.msg import Odometry
    torch.manual_seed(0)
    trainer, sync, frames, calib = build(visual, work, args.num_threads)
    intake = args.imu_intake
    if intake == 'auto':
        intake = 'batch' if ImuIntake is not None else 'single'
    if intake == 'batch' and ImuIntake is None:
        raise SystemExit('--imu_intake batch: this code has no sync.imu_intake.ImuIntake')
    st = Stages()
    instrument(st, trainer, sync)
    publisher = node.create_publisher(Odometry, topics.ODOM_OUT_TOPIC, 50)
    replay = Replay(st, trainer, sync, frames, calib, intake, publisher)
    try:
        for kind, raw in messages:
            replay.feed(kind, raw)
        replay.drain_imu()
        sync.flush()
        replay.dispatch()
        wall = time.perf_counter() - replay.wall0
        cpu = time.process_time() - replay.cpu0
        thread = time.thread_time() - replay.thread0
    finally:
        st.restore()
        node.destroy_publisher(publisher)
    n = replay.samples - replay.samples_at_mark
    imu_n = replay.imu_messages - replay.imu_at_mark
    rows = {name: st.time[name] / n * 1e3 for name in st.time}
    rows['Python overhead (the rest)'] = thread / n * 1e3 - sum(rows.values())
    return {'visual': visual, 'imu_intake': intake, 'samples': n, 'imu_messages': imu_n,
            'total_ms': thread / n * 1e3, 'cpu_ms': cpu / n * 1e3, 'wall_ms': wall / n * 1e3,
            'rows': rows,
            'imu_us_per_msg': st.time['IMU intake (decode, frame, add)'] / max(imu_n, 1) * 1e6,
            'sync_stats': {k: v for k, v in sync.stats.items() if k in ('emitted', 'dropped',
                                                                         'masked')},
            'trainer_samples': trainer.samples_seen}


def print_table(r):
    print(f'\nvisual encoder {r["visual"]}, IMU intake {r["imu_intake"]}: {r["samples"]} samples '
          f'after {WARMUP_SAMPLES} of warm-up, {r["imu_messages"]} IMU messages')
    print(f'| {"stage":<40} | {"ms/sample":>9} | {"share":>6} |')
    print(f'|{"-" * 42}|{"-" * 11}:|{"-" * 7}:|')
    names = [n for n in ORDER if n in r['rows']] + \
        sorted(n for n in r['rows'] if n not in ORDER and n != 'Python overhead (the rest)') + \
        ['Python overhead (the rest)']
    for name in names:
        ms = r['rows'][name]
        print(f'| {name:<40} | {ms:>9.2f} | {ms / r["total_ms"] * 100:>5.1f}% |')
    print(f'| {"total (CPU of this thread)":<40} | '
          f'{r["total_ms"]:>9.2f} | 100.0% |')
    print(f'process CPU {r["cpu_ms"]:.1f} ms/sample (DDS threads included), wall '
          f'{r["wall_ms"]:.1f} ms/sample')
    print(f'IMU intake per message: {r["imu_us_per_msg"]:.0f} us; synchronizer {r["sync_stats"]}')


def executor_cost(n: int, intake: str) -> dict:
    """CPU per IMU message of the rclpy side: n messages queued in an in-process subscription,
    then taken by a SingleThreadedExecutor, one callback each ('single') or drained in batches
    by the node's intake (ros/imu_intake.py)."""
    from rclpy.executors import SingleThreadedExecutor
    from sensor_msgs.msg import Imu
    qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=n,
                     reliability=ReliabilityPolicy.RELIABLE)
    pub_node, sub_node = rclpy.create_node('profile_imu_pub'), rclpy.create_node('profile_imu')
    got = []
    if intake == 'batch':
        from mm_fusion_ros.ros.imu_intake import subscribe_batched
        subscribe_batched(sub_node, Imu, '/profile/imu', qos, got.extend)
    else:
        sub_node.create_subscription(Imu, '/profile/imu', got.append, qos, raw=True)
    pub = pub_node.create_publisher(Imu, '/profile/imu', qos)
    executor = SingleThreadedExecutor()
    executor.add_node(sub_node)
    deadline = time.monotonic() + 10.0
    while pub.get_subscription_count() == 0 and time.monotonic() < deadline:
        executor.spin_once(timeout_sec=0.05)
    msg = Imu()
    msg.header.frame_id = 'imu_link'
    raw = serialize_message(msg)
    for _ in range(n):
        pub.publish(raw)
    time.sleep(1.0)   # let DDS deliver them all: the executor then only takes
    cpu0, wall0 = time.process_time(), time.perf_counter()
    while len(got) < n and time.perf_counter() - wall0 < 30.0:
        executor.spin_once(timeout_sec=0.1)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    executor.shutdown()
    pub_node.destroy_node()
    sub_node.destroy_node()
    return {'intake': intake, 'messages': len(got), 'cpu_us_per_msg': cpu / max(len(got), 1) * 1e6,
            'wall_us_per_msg': wall / max(len(got), 1) * 1e6}


def run_profile(args, work: Path) -> dict:
    import mm_fusion_ros
    bag = prepare_bag(work, args.frames, args.image_size, args.azimuth_steps)
    messages = read_bag(bag)
    counts = Counter(k for k, _ in messages)
    print(f'package {Path(mm_fusion_ros.__file__).parent}; bag {bag}: {dict(counts)}; '
          f'{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}', flush=True)
    conversions.cdr_typestore()
    rclpy.init()
    node = rclpy.create_node('profile_online')
    results = {'runs': {}, 'executor': {}}
    try:
        for visual in args.visual:
            r = profile_one(visual, messages, work, args, node)
            print_table(r)
            results['runs'][visual] = r
        if args.rclpy_messages:
            intakes = ['single'] + (['batch'] if ImuIntake is not None else [])
            for intake in intakes:
                e = executor_cost(args.rclpy_messages, intake)
                print(f'rclpy executor, IMU {intake}: {e["messages"]} queued messages taken at '
                      f'{e["cpu_us_per_msg"]:.0f} us CPU each')
                results['executor'][intake] = e
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
    results['load_average'] = os.getloadavg()[0]
    results['frames'] = args.frames
    return results
