"""Synchronizer node: DESIGN §4 sensor topics -> aligned DESIGN §5 samples -> prediction/buffer.

A thin shell over mm_fusion_ros.sync and the runtime cores. Raw subscriptions: a callback decodes
the serialized message into views of its bytes (conversions.decode_cdr; rclpy's deserialization
copies a 2 MB cloud twice under the GIL), checks its frame (sync/frames.py) and hands numpy to
the Synchronizer; the IMU callback also takes every IMU message queued behind its own, for one
batch (sync/imu_intake.py). A message that does not decode ('bad_message') or comes in an
unknown frame ('wrong_frame') is counted, logged per topic and reason every 5 s, and skipped.
CameraInfo and static transforms go to the CalibrationTracker (sync/calibration.py). The
dispatch worker (runtime/dispatch.py) takes the ready samples to `sink.on_sample` (the trainer)
or, alone, to the replay buffer, saved at shutdown (`buffer_path`); the recorded ground truth
also goes to `sink.on_ground_truth`. Scans going back in time start a new run (a looped bag; a
/clock jump back under use_sim_time is counted, ros/clock.py). /diagnostics at 1 Hz.
"""
from diagnostic_msgs.msg import DiagnosticArray
from nav_msgs.msg import Odometry
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.clock import Clock, ClockType
from rclpy.node import Node
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, Imu, PointCloud2

from mm_fusion_ros.bag import topics
from mm_fusion_ros.config import SampleConfig
from mm_fusion_ros.kitti.sample import warm_up_preprocessing
from mm_fusion_ros.ros import conversions
from mm_fusion_ros.ros.clock import ClockJumpsBack
from mm_fusion_ros.ros.imu_intake import subscribe_batched
from mm_fusion_ros.ros.params import declare_config
from mm_fusion_ros.ros.qos import input_qos, TF_STATIC_QOS
from mm_fusion_ros.ros.spin import spin_nodes
from mm_fusion_ros.runtime import diagnostics
from mm_fusion_ros.runtime.dispatch import SampleDispatcher
from mm_fusion_ros.runtime.workers import FaultLog, LogThrottle, Worker
from mm_fusion_ros.sync.calibration import CalibrationTracker
from mm_fusion_ros.sync.config import BufferConfig, InputConfig, SyncConfig
from mm_fusion_ros.sync.frames import FrameConfig, FrameError, FrameGuard
from mm_fusion_ros.sync.imu_intake import ImuIntake
from mm_fusion_ros.sync.replay_buffer import open_buffer
from mm_fusion_ros.sync.synchronizer import Synchronizer

try:  # No wheel exists for tf2_msgs: static transforms then come from frames.static_transforms.
    from tf2_msgs.msg import TFMessage
except ImportError:
    TFMessage = None


class SynchronizerNode(Node):
    """Subscribes to camera, LiDAR, IMU, ground truth and calibration; emits samples in
    stamp order. With a sink (the trainer) its `supervision` resolves sync.ground_truth."""

    # (config, parameter prefix); sample and buffer only when the node runs alone (in
    # online_finetune the trainer's sample shape and buffer are used).
    PARAMETERS = {'inputs': (InputConfig, ''), 'frames': (FrameConfig, 'frames.'),
                  'sync': (SyncConfig, 'sync.'), 'sample': (SampleConfig, 'sample.'),
                  'buffer': (BufferConfig, 'buffer.')}

    def __init__(self, sample_cfg: SampleConfig = None, buffer=None, sink=None,
                 name=topics.SYNCHRONIZER_NODE):
        super().__init__(name)
        self.inputs = declare_config(self, *self.PARAMETERS['inputs'])
        self.frames = FrameGuard(declare_config(self, *self.PARAMETERS['frames']))
        sync_cfg = declare_config(self, *self.PARAMETERS['sync'])
        self.sample_cfg = sample_cfg or declare_config(self, *self.PARAMETERS['sample'])
        self.standalone = sink is None
        # With a sink the buffer is the trainer's (None in the intake process, where the
        # prediction process holds it); alone the node keeps its own.
        self.buffer = open_buffer(
            self.inputs.buffer_path, declare_config(self, *self.PARAMETERS['buffer']),
            self.sample_cfg) if self.standalone else buffer
        self.calib = CalibrationTracker(self.frames.cfg, self.frames.transforms)
        self.sync = Synchronizer(self.sample_cfg,
                                 sync_cfg.for_supervision(getattr(sink, 'supervision', None)),
                                 calibration=self.calib.current)
        forward = getattr(sink, 'forward_imu', None)   # the intake process's link
        self.imu_intake = ImuIntake(self.sync, self.frames, forward=forward and (
            lambda stamps, accel, gyro: forward(stamps, accel, gyro, self.frames.base_imu(),
                                                self.sync.run)))
        self.faults, self.log_throttle = FaultLog(), LogThrottle(5.0)
        self.dispatcher = SampleDispatcher(
            self.sync, self.buffer.add if self.standalone else sink.on_sample,
            on_backlog=None if self.standalone else sink.on_backlog,
            idle_flush_s=self.inputs.idle_flush_s, faults=self.faults)
        self.on_ground_truth = None if self.standalone else sink.on_ground_truth
        self.worker = Worker('dispatch', self.dispatcher.dispatch_step, self.faults)
        self._rates = dict.fromkeys(('image', 'cloud', 'imu'), 0)
        conversions.cdr_typestore()   # built now rather than in the first callback
        warm_up_preprocessing(self.sample_cfg)   # likewise torch's first resize
        self._subscribe_inputs()
        self.diag_pub = self.create_publisher(DiagnosticArray, '/diagnostics', 10)
        self.create_timer(1.0, self._on_timer, callback_group=MutuallyExclusiveCallbackGroup(),
                          clock=Clock(clock_type=ClockType.STEADY_TIME))   # not the bag's
        self.clock_jumps = ClockJumpsBack(self, sync_cfg.rewind_s)
        self.bad_static_transforms = 0   # /tf_static entries that are not poses (skipped)
        held = 'buffer in the prediction process' if self.buffer is None else \
            f'buffer {len(self.buffer)} samples'
        self.get_logger().info(f'synchronizing ({self.inputs.sensor_qos} QoS, ground truth '
                               f'{self.sync.cfg.ground_truth}); {held}; calibration '
                               f'{self.calib.known()}')

    def start(self) -> None:
        self.worker.start()

    # --- callbacks: decode at the edge, check the frame, hand numpy to the core --------------
    def _subscribe_inputs(self):
        i, sync, frames = self.inputs, self.sync, self.frames
        qos, small = input_qos(i.sensor_qos)
        image_class, image_type, to_image = (
            CompressedImage, topics.COMPRESSED_IMAGE_TYPE, conversions.compressed_image_to_array) \
            if i.compressed_image else (Image, topics.IMAGE_TYPE, conversions.image_to_array)

        def on_gt(stamp, msg):
            pose = conversions.odometry_to_pose(msg)
            sync.add_ground_truth(stamp, pose)
            if self.on_ground_truth is not None:
                self.on_ground_truth(stamp, pose)

        inputs = (
            ('image', i.image_topic, image_class, image_type, qos,
             lambda stamp, m: sync.add_image(stamp, to_image(m))),
            ('cloud', i.cloud_topic, PointCloud2, topics.CLOUD_TYPE, qos,
             lambda stamp, m: sync.add_cloud(stamp, frames.cloud(
                 conversions.cloud_to_array(m), m.header.frame_id))),
            ('ground_truth', i.ground_truth_topic, Odometry, topics.ODOMETRY_TYPE, small, on_gt),
            ('camera_info', i.camera_info_topic, CameraInfo, topics.CAMERA_INFO_TYPE, small,
             lambda stamp, m: self._calibrate(self.calib.add_camera_info(
                 *conversions.camera_info_to_arrays(m)))))
        # One group each (only matters under a multi-threaded executor): the 100 Hz IMU is
        # never queued behind a 2 MB cloud, ground truth never behind a burst of IMU.
        for kind, topic, msg_class, msgtype, profile, add in inputs:
            self.create_subscription(msg_class, topic, self._callback(kind, topic, msgtype, add),
                                     profile, callback_group=MutuallyExclusiveCallbackGroup(),
                                     raw=True)
        subscribe_batched(self, Imu, i.imu_topic, small, self._on_imu,
                          callback_group=MutuallyExclusiveCallbackGroup())
        try:   # before the first callback: its decoders are built now
            conversions.warm_up_decoders((c, t) for _, _, c, t, _, _ in inputs)
        except Exception as e:  # noqa: BLE001 - only a saving: the first messages build them
            self.get_logger().warning(f'message decoders not warmed up ({type(e).__name__}: '
                                      f'{e}); the first messages of each topic pay for it')
        if TFMessage is not None:
            self.create_subscription(TFMessage, topics.TF_STATIC_TOPIC, self._on_tf_static,
                                     TF_STATIC_QOS)

    def _callback(self, kind, topic, msgtype, add):
        def callback(raw):
            try:
                msg = conversions.decode_cdr(raw, msgtype)
                add(conversions.stamp_to_ns(msg.header.stamp), msg)
            except ValueError as e:
                reason = 'wrong_frame' if isinstance(e, FrameError) else 'bad_message'
                self.sync.reject(kind, reason)
                return self._skipped(topic, reason, e)
            if kind in self._rates:
                self._rates[kind] += 1
            self.dispatcher.notify(sensor=kind in self._rates)
        return callback

    def _on_imu(self, raws):
        added, skipped = self.imu_intake.add_raw(raws)   # each skipped one counted there
        for reason, e in skipped:
            self._skipped(self.inputs.imu_topic, reason, e)
        self._rates['imu'] += added
        self.dispatcher.notify(sensor=added > 0)

    def _skipped(self, topic, reason, e):
        if self.log_throttle.ready((topic, reason)):
            self.get_logger().error(f'{topic}: message skipped ({reason}): {e}')

    def _on_tf_static(self, msg):
        for tf in msg.transforms:
            try:
                T = conversions.transform_to_matrix(tf)
            except ValueError as e:
                self.bad_static_transforms += 1
                self._skipped(topics.TF_STATIC_TOPIC, 'bad_message', e)
                continue
            self.frames.add_static(tf.header.frame_id, tf.child_frame_id, T)
        self._calibrate(self.calib.refresh())

    def _calibrate(self, calibration):
        if calibration is not None:
            self.sync.set_calibration(calibration)
            self.get_logger().info(f'calibration: {self.calib.known()}')

    def _on_timer(self):
        self.dispatcher.check_idle()   # the end of a bag: release scans waiting for a timeout
        status = diagnostics.synchronizer_status(
            self.get_name(), self.sync.stats,
            None if self.buffer is None else self.buffer.stats(), dict(self._rates),
            self.dispatcher.emitted, self.dispatcher.failed_samples, self.faults.snapshot(),
            {'clock_jumps_back': str(self.clock_jumps.count),
             'bad_static_transforms': str(self.bad_static_transforms),
             'imu_batches': str(self.imu_intake.batches), **self.calib.status()})
        self._rates = dict.fromkeys(self._rates, 0)
        self.diag_pub.publish(conversions.status_to_msg(status, self.get_clock().now().to_msg()))

    # --- shutdown ------------------------------------------------------------------------
    def problems(self) -> list:
        return [f'worker {self.worker.name} ended'] if self.worker.failed else []

    def shutdown(self) -> None:
        """Stop the dispatch worker, hand on the samples already complete, save the buffer."""
        if self.worker.stop(timeout=30.0):
            self.dispatcher.dispatch()
        else:
            self.get_logger().error('sample dispatch thread did not stop within 30 s')
        if self.standalone and self.inputs.buffer_path:
            self.buffer.save(self.inputs.buffer_path)
            self.get_logger().info(f'saved {len(self.buffer)} samples to '
                                   f'{self.inputs.buffer_path}')


def main(args=None) -> int:
    return spin_nodes(lambda: [SynchronizerNode()], args)


if __name__ == '__main__':
    raise SystemExit(main())
