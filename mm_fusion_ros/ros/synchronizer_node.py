"""Synchronizer node: DESIGN §4 sensor topics -> aligned DESIGN §5 samples -> replay buffer.

A thin shell over mm_fusion_ros.sync: callbacks convert messages at the edge (conversions.py),
hand numpy arrays to the Synchronizer and return. The subscriptions are raw: each callback gets
the serialized message and decodes it with conversions.decode_cdr into views of those bytes.
rclpy's own deserialization copies a 2 MB cloud twice into Python objects while holding the GIL:
raw, the GIL time of message takes fell by a third in a py-spy profile of a 5x full-size replay,
and an Imu or Odometry decodes ~2.4x faster.
A message that does not decode is logged, counted ('bad_message') and skipped.

A dispatch thread of its own takes the ready samples to the ReplayBuffer or to `on_sample`
(the trainer's prediction, when both run in one process), so no subscription callback ever
waits for a prediction: a sensor stream delayed behind another would count as missing once the
scans ran `*_timeout_s` of sensor time ahead.
Publishes /diagnostics at 1 Hz (received, dropped and masked counts).

Run alone (`synchronizer` executable) it fills the buffer and saves it at shutdown
(`buffer_path`), e.g. to collect data from a robot for later training.
"""
import threading
import time

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from nav_msgs.msg import Odometry
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.node import Node
from rclpy.qos import QoSProfile
from sensor_msgs.msg import CompressedImage, Image, Imu, PointCloud2

from mm_fusion_ros.bag import topics
from mm_fusion_ros.config import SampleConfig
from mm_fusion_ros.ros import conversions
from mm_fusion_ros.ros.params import declare_config
from mm_fusion_ros.ros.qos import LIVE_SENSOR_QOS, REPLAY_SENSOR_QOS
from mm_fusion_ros.sync.config import BufferConfig, SyncConfig
from mm_fusion_ros.sync.replay_buffer import open_buffer, ReplayBuffer
from mm_fusion_ros.sync.synchronizer import Synchronizer

QOS_PROFILES = {'replay': REPLAY_SENSOR_QOS, 'live': LIVE_SENSOR_QOS}
# IMU and ground-truth messages are small and come at up to 10x the scan rate: on replay a deeper
# queue rides out a moment when the callback thread is busy. Measured on 2 loaded cores with a
# bare subscriber: depth 100 lost 99 of 391 IMU messages at 10x, depth 1000 none.
SMALL_MSG_REPLAY_DEPTH = 1000


class SynchronizerNode(Node):
    """Subscribes to camera, LiDAR, IMU and ground truth; emits samples in stamp order."""

    def __init__(self, sample_cfg: SampleConfig = None, buffer: ReplayBuffer = None,
                 on_sample=None, on_backlog=None, name='mm_fusion_synchronizer'):
        """on_sample(sample): instead of adding to `buffer` (the trainer's prediction).
        on_backlog(n): told how many samples wait for on_sample, the one in progress
        included, before each call and 0 when all are done (the trainer's set_backlog)."""
        super().__init__(name)
        p = self.declare_parameter
        self.image_topic = p('image_topic', topics.IMAGE_TOPIC).value
        self.compressed = p('compressed_image', False).value
        self.cloud_topic = p('cloud_topic', topics.CLOUD_TOPIC).value
        self.imu_topic = p('imu_topic', topics.IMU_TOPIC).value
        self.gt_topic = p('ground_truth_topic', topics.GT_ODOM_TOPIC).value
        qos_name = p('sensor_qos', 'replay').value
        self.idle_flush_s = p('idle_flush_s', 1.0).value
        self.buffer_path = p('buffer_path', '').value if buffer is None else ''
        if qos_name not in QOS_PROFILES:
            raise ValueError(f'parameter sensor_qos={qos_name!r}: choose replay or live')
        self.sync_cfg = declare_config(self, SyncConfig, prefix='sync.')
        self.sample_cfg = sample_cfg or declare_config(self, SampleConfig, prefix='sample.')
        if buffer is None:
            buffer = open_buffer(self.buffer_path, declare_config(self, BufferConfig,
                                                                  prefix='buffer.'),
                                 self.sample_cfg)
        self.buffer = buffer
        self.on_sample = on_sample
        self.on_backlog = on_backlog
        self.sync = Synchronizer(self.sample_cfg, self.sync_cfg)
        self._work = threading.Event()        # set by callbacks: samples may be ready
        self._stop = threading.Event()
        self._last_sensor_wall = None
        self._flushed = True
        self.emitted = 0
        self.dispatch_errors = 0

        conversions.cdr_typestore()   # built now rather than in the first callback
        qos = QOS_PROFILES[qos_name]
        small_qos = qos
        if qos_name == 'replay':
            small_qos = QoSProfile(history=qos.history, reliability=qos.reliability,
                                   durability=qos.durability,
                                   depth=max(qos.depth, SMALL_MSG_REPLAY_DEPTH))
        # Groups matter only under a multi-threaded executor (online.py spins this node in one
        # thread; every callback here only converts and enqueues).
        camera_group = MutuallyExclusiveCallbackGroup()
        cloud_group = MutuallyExclusiveCallbackGroup()
        # The 100 Hz IMU gets its own group, so it is never queued behind a 2 MB cloud, and
        # ground truth one more, so it is never queued behind a burst of IMU messages.
        imu_group = MutuallyExclusiveCallbackGroup()
        gt_group = MutuallyExclusiveCallbackGroup()
        image = (CompressedImage, topics.COMPRESSED_IMAGE_TYPE,
                 conversions.compressed_image_to_array) if self.compressed else \
            (Image, topics.IMAGE_TYPE, conversions.image_to_array)
        self._subscribe('image', self.image_topic, *image, self.sync.add_image, qos,
                        camera_group)
        self._subscribe('cloud', self.cloud_topic, PointCloud2, topics.CLOUD_TYPE,
                        conversions.cloud_to_array, self.sync.add_cloud, qos, cloud_group)
        self._subscribe('imu', self.imu_topic, Imu, topics.IMU_TYPE, conversions.imu_to_arrays,
                        lambda stamp, arrays: self.sync.add_imu(stamp, *arrays), small_qos,
                        imu_group)
        self._subscribe('ground_truth', self.gt_topic, Odometry, topics.ODOMETRY_TYPE,
                        conversions.odometry_to_pose, self.sync.add_ground_truth, small_qos,
                        gt_group)
        self.diag_pub = self.create_publisher(DiagnosticArray, '/diagnostics', 10)
        self._rates = {'image': 0, 'cloud': 0, 'imu': 0}
        self._rate_t0 = time.monotonic()
        self.create_timer(1.0, self._on_timer, callback_group=MutuallyExclusiveCallbackGroup())
        self._dispatcher = threading.Thread(target=self._dispatch_loop, name='sample_dispatch',
                                            daemon=True)
        self._dispatcher.start()
        self.get_logger().info(
            f'synchronizing {self.image_topic}, {self.cloud_topic}, {self.imu_topic}, '
            f'{self.gt_topic} ({qos_name} QoS); buffer {len(self.buffer)} samples')

    # --- callbacks: decode at the edge, then hand numpy to the core ------------------------
    def _subscribe(self, kind, topic, msg_class, msgtype, to_numpy, add, qos, group):
        """A raw subscription whose callback decodes, converts and calls `add(stamp_ns, data)`.
        A message that does not decode (or has the wrong fields or encoding) is logged,
        counted as a 'bad_message' drop and skipped: one bad message must not stop the node."""
        def callback(raw):
            try:
                msg = conversions.decode_cdr(raw, msgtype)
                add(conversions.stamp_to_ns(msg.header.stamp), to_numpy(msg))
            except ValueError as e:
                self.sync.reject(kind)
                self.get_logger().error(f'{topic}: message skipped: {e}',
                                        throttle_duration_sec=5.0)
                return
            self._seen(kind)

        self.create_subscription(msg_class, topic, callback, qos, callback_group=group,
                                 raw=True)

    def _seen(self, kind):
        self._work.set()
        if kind == 'ground_truth':   # not a sensor: no rate, and it does not end an idle spell
            return
        self._rates[kind] += 1
        self._last_sensor_wall = time.monotonic()
        self._flushed = False

    def _dispatch_loop(self):
        while not self._stop.is_set():
            if self._work.wait(timeout=0.1):
                self._work.clear()
                self._dispatch()

    def _dispatch(self):
        """Hand ready samples on, in stamp order (only the dispatch thread calls this while it
        runs; shutdown calls it after the thread ended)."""
        ready = self.sync.pop_ready()
        for i, sample in enumerate(ready):
            if self.on_backlog is not None:
                self.on_backlog(len(ready) - i)
            self.emitted += 1
            try:
                if self.on_sample is not None:
                    self.on_sample(sample)
                else:
                    self.buffer.add(sample)
            except (RuntimeError, ValueError) as e:
                # One bad sample must not end the dispatch thread (and every later pose).
                self.dispatch_errors += 1
                self.get_logger().error(f'sample {sample["meta"].get("frame")} not handled: '
                                        f'{e}', throttle_duration_sec=5.0)
        if ready and self.on_backlog is not None:
            self.on_backlog(0)

    def _on_timer(self):
        # End of a bag (or a stalled robot): release scans still waiting for a timeout.
        idle = self._last_sensor_wall is not None and \
            time.monotonic() - self._last_sensor_wall > self.idle_flush_s
        if idle and not self._flushed:
            self.sync.flush()
            self._work.set()
            self._flushed = True
        self._publish_diagnostics()

    def _publish_diagnostics(self):
        now = time.monotonic()
        span = max(now - self._rate_t0, 1e-6)
        stats = self.sync.stats
        buf = self.buffer.stats()
        values = {f'rate_{k}_hz': f'{v / span:.1f}' for k, v in self._rates.items()}
        values.update({f'received_{k}': str(v) for k, v in stats['received'].items()})
        values.update({f'dropped_{k}': str(v) for k, v in stats['dropped'].items()})
        values.update({f'masked_{k}': str(v) for k, v in stats['masked'].items()})
        values.update({'emitted': str(self.emitted), 'dispatch_errors': str(self.dispatch_errors),
                       'buffer_size': str(buf['size']),
                       'buffer_bytes': str(buf['bytes']), 'buffer_capacity': str(buf['capacity'])})
        self._rates = dict.fromkeys(self._rates, 0)
        self._rate_t0 = now
        dropped = sum(stats['dropped'].values())
        status = DiagnosticStatus(level=DiagnosticStatus.WARN if dropped else DiagnosticStatus.OK,
                                  name=f'{self.get_name()}: synchronizer',
                                  message=f'{self.emitted} samples, {dropped} dropped',
                                  hardware_id='mm_fusion_ros',
                                  values=[KeyValue(key=k, value=v) for k, v in values.items()])
        msg = DiagnosticArray(status=[status])
        msg.header.stamp = self.get_clock().now().to_msg()
        self.diag_pub.publish(msg)

    def shutdown(self) -> None:
        """Stop the dispatch thread, hand on the samples already complete, save the buffer."""
        self._stop.set()
        self._dispatcher.join(timeout=30.0)
        if self._dispatcher.is_alive():
            self.get_logger().error('sample dispatch thread did not stop within 30 s')
        else:
            self._dispatch()
        if self.buffer_path:
            self.buffer.save(self.buffer_path)
            self.get_logger().info(f'saved {len(self.buffer)} samples to {self.buffer_path}')
