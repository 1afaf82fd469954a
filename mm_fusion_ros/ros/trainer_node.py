"""Trainer node: online fine-tuning on the replay buffer, predicted poses for RViz, checkpoints.

A thin shell over training.online.OnlineTrainer. Gradient steps run in a thread of their own
(never in a callback); each new sample is predicted at once and published as nav_msgs/Odometry on
/mm_fusion/odom (covariance from the predicted log-variance), the paths on /mm_fusion/path and
/mm_fusion/gt_path, and odom -> base_link_pred on /tf when tf2_msgs is importable.
Services: ~/save_checkpoint (Trigger; message = written path), ~/set_training (SetBool).
Parameters: OnlineConfig fields, `train.*` (TrainConfig) and `model.*` (ModelConfig, used for a
fresh model only); `train.learning_rate` and `training_enabled` can change at run time.
"""
import logging
import math
import os
import threading
import time

from geometry_msgs.msg import PoseStamped, TransformStamped
from nav_msgs.msg import Odometry, Path
import numpy as np
from rcl_interfaces.msg import SetParametersResult
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.impl.implementation_singleton import rclpy_implementation as _rclpy
from rclpy.node import Node
from rclpy.parameter import Parameter
from std_srvs.srv import SetBool, Trigger

from mm_fusion_ros.bag import topics
from mm_fusion_ros.model.config import ModelConfig
from mm_fusion_ros.ros import conversions
from mm_fusion_ros.ros.params import declare_config
from mm_fusion_ros.ros.qos import PATH_QOS
from mm_fusion_ros.training.config import TrainConfig
from mm_fusion_ros.training.online import OnlineConfig, OnlineTrainer

try:  # No wheel exists for tf2_msgs: TF is published only where ROS 2 provides it.
    from tf2_msgs.msg import TFMessage
except ImportError:
    TFMessage = None

log = logging.getLogger(__name__)

PRED_FRAME = 'base_link_pred'
# The training thread runs at idle priority (Linux schedules threads separately, and lowering
# one's own priority needs no privilege): sensor intake and the published poses go first and
# training takes the CPU time they leave. A 5x full-size replay on 2 cores (bench/online.py):
# p50 latency 28 ms with SCHED_IDLE vs 100-250 ms at nice 10, and more steps/s (3.5 vs 2).
# Where SCHED_IDLE is unavailable, nice 10.
TRAIN_THREAD_NICE = 10
RUNTIME_PARAMS = ('train.learning_rate', 'training_enabled')


class TrainerNode(Node):
    """Owns the OnlineTrainer; `on_sample` is called by the synchronizer for every sample."""

    def __init__(self, buffer=None, name='mm_fusion_trainer'):
        super().__init__(name)
        self.online_cfg = declare_config(self, OnlineConfig, read_only=False)
        train_cfg = declare_config(self, TrainConfig, prefix='train.', read_only=False)
        model_cfg = declare_config(self, ModelConfig, prefix='model.')
        # The paths grow with the run (a 4541-pose Path took 12.7 ms to publish): at most this
        # often, not once per sample, so a fast replay of a long sequence stays cheap.
        self.path_period_s = self.declare_parameter('path_publish_period_s', 0.5).value
        self._path_published = 0.0
        self._path_pending = False
        # odom -> base_link from ground truth, so RViz can place the bag's clouds in odom.
        self.publish_gt_tf = self.declare_parameter('publish_gt_tf', True).value
        self.trainer = OnlineTrainer(self.online_cfg, train_cfg, model_cfg, buffer=buffer)
        self.model_cfg = self.trainer.core.model_cfg
        self.add_pre_set_parameters_callback(_coerce_learning_rate)
        self.add_on_set_parameters_callback(self._on_set_parameters)

        self.odom_pub = self.create_publisher(Odometry, '/mm_fusion/odom', 50)
        self.path_pub = self.create_publisher(Path, '/mm_fusion/path', PATH_QOS)
        self.gt_path_pub = self.create_publisher(Path, '/mm_fusion/gt_path', PATH_QOS)
        self.tf_pub = self.create_publisher(TFMessage, '/tf', 50) if TFMessage else None
        if self.tf_pub is None:
            self.get_logger().warning('tf2_msgs not importable: odom -> base_link_pred is not '
                                      'published on /tf (Odometry and Path still are)')
        services = MutuallyExclusiveCallbackGroup()
        self.create_service(Trigger, '~/save_checkpoint', self._on_save, callback_group=services)
        self.create_service(SetBool, '~/set_training', self._on_set_training,
                            callback_group=services)
        self.path = Path()
        self.gt_path = Path()
        self.path.header.frame_id = self.gt_path.header.frame_id = topics.ODOM_FRAME
        self._var_sum = np.zeros(6)
        self._publish_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._train_loop, name='trainer', daemon=True)
        self._thread.start()
        # Poses that came after the last path publication (e.g. the end of a bag) go out here.
        self.create_timer(max(self.path_period_s, 0.05), self._on_path_timer)
        origin = self.online_cfg.initial_checkpoint or 'a fresh model'
        self.get_logger().info(f'online fine-tuning from {origin}; training '
                               f'{"on" if self.trainer.training_enabled else "off"}')

    # --- samples in, poses out ------------------------------------------------------------
    def on_sample(self, sample) -> None:
        pred = self.trainer.on_sample(sample)
        if not self.context.ok():   # shutting down: the sample still counts, nothing to publish
            return
        with self._publish_lock:
            try:
                self._publish(pred)
            except _rclpy.RCLError as e:
                if self.context.ok():
                    raise
                log.debug('pose of frame %d not published during shutdown: %s', pred.frame, e)

    def _publish(self, pred):
        stamp_ns = pred.stamp_ns
        sec, nanosec = conversions.ns_to_stamp(stamp_ns)
        # First-order covariance of the chained pose: per-step variances add up.
        self._var_sum += np.exp(pred.logvar)
        position, quat, _ = conversions.pose_to_odometry_fields(pred.pose)
        odom = Odometry()
        odom.header.stamp.sec, odom.header.stamp.nanosec = sec, nanosec
        odom.header.frame_id = topics.ODOM_FRAME
        odom.child_frame_id = PRED_FRAME
        _fill_pose(odom.pose.pose, position, quat)
        odom.pose.covariance = np.diag(self._var_sum).ravel().tolist()
        # Twist: the predicted step over the scan interval, in the child frame.
        dt = max(float(pred.dt), 1e-3)
        lin, ang = pred.mean[:3] / dt, pred.mean[3:] / dt
        odom.twist.twist.linear.x, odom.twist.twist.linear.y, odom.twist.twist.linear.z = lin
        odom.twist.twist.angular.x, odom.twist.twist.angular.y, odom.twist.twist.angular.z = ang
        odom.twist.covariance = np.diag(np.exp(pred.logvar) / dt**2).ravel().tolist()
        self.odom_pub.publish(odom)
        if self.tf_pub is not None:
            tf = TransformStamped()
            tf.header = odom.header
            tf.child_frame_id = PRED_FRAME
            _fill_transform(tf.transform, position, quat)
            transforms = [tf]
            if self.publish_gt_tf and pred.gt_pose is not None:
                gt_tf = TransformStamped()
                gt_tf.header = odom.header
                gt_tf.child_frame_id = topics.BASE_FRAME
                _fill_transform(gt_tf.transform, *conversions.pose_to_odometry_fields(
                    pred.gt_pose)[:2])
                transforms.append(gt_tf)
            self.tf_pub.publish(TFMessage(transforms=transforms))
        self._append(self.path, odom.header, position, quat)
        if pred.gt_pose is not None:
            gt_pos, gt_quat, _ = conversions.pose_to_odometry_fields(pred.gt_pose)
            self._append(self.gt_path, odom.header, gt_pos, gt_quat)
        self._path_pending = True
        if time.monotonic() - self._path_published >= self.path_period_s:
            self.publish_paths()

    def _on_path_timer(self):
        with self._publish_lock:
            if self._path_pending:
                self.publish_paths()

    @staticmethod
    def _append(path, header, position, quat):
        pose = PoseStamped()
        pose.header.stamp = header.stamp
        pose.header.frame_id = topics.ODOM_FRAME
        _fill_pose(pose.pose, position, quat)
        path.poses.append(pose)
        path.header.stamp = header.stamp

    def publish_paths(self):
        self._path_published = time.monotonic()
        self._path_pending = False
        self.path_pub.publish(self.path)
        if self.gt_path.poses:
            self.gt_path_pub.publish(self.gt_path)

    # --- training thread -----------------------------------------------------------------
    def _train_loop(self):
        _lower_priority(TRAIN_THREAD_NICE)
        while not self._stop.is_set():
            self.trainer.wait_for_work(0.2)
            try:
                self.trainer.train_pending(max_steps=1)
            except (RuntimeError, ValueError) as e:
                # A failing step must not kill the node: report it and keep serving poses.
                self.get_logger().error(f'training step failed: {e}', throttle_duration_sec=5.0)

    # --- services and parameters ---------------------------------------------------------
    def _on_save(self, request, response):
        try:
            path = self.trainer.save_checkpoint()
        except (OSError, ValueError, RuntimeError) as e:
            response.success, response.message = False, f'checkpoint not written: {e}'
            return response
        response.success, response.message = True, str(path.resolve())
        self.get_logger().info(f'checkpoint saved: {response.message}')
        return response

    def _on_set_training(self, request, response):
        self.trainer.set_training(request.data)
        response.success = True
        response.message = f'training {"enabled" if request.data else "disabled"} at step ' \
                           f'{self.trainer.core.step_count}'
        self.get_logger().info(response.message)
        return response

    def _on_set_parameters(self, params):
        for param in params:
            if param.name not in RUNTIME_PARAMS:
                return SetParametersResult(successful=False, reason=(
                    f'{param.name} is fixed at start; only {", ".join(RUNTIME_PARAMS)} '
                    f'change at run time'))
            if param.name == 'train.learning_rate':
                if not (isinstance(param.value, float) and math.isfinite(param.value)
                        and param.value > 0):
                    return SetParametersResult(successful=False,
                                               reason='train.learning_rate must be > 0')
                self.trainer.set_learning_rate(param.value)
            elif param.name == 'training_enabled':
                self.trainer.set_training(bool(param.value))
        return SetParametersResult(successful=True)

    def shutdown(self) -> dict:
        """Stop training, then write the final checkpoint, buffer and trajectories."""
        self._stop.set()
        self.trainer.wake()
        self._thread.join(timeout=30.0)
        written = self.trainer.shutdown()
        alive = self.context.ok()  # after SIGINT the context is already shut down
        if alive:
            self.publish_paths()
        metrics = self.trainer.metrics()
        lines = [f'{metrics["online_samples"]} samples, {metrics["online_steps"]} gradient steps '
                 f'(step {self.trainer.core.step_count})']
        lines += [f'wrote {kind}: {path}' for kind, path in written.items()]
        for line in lines:
            if alive:
                self.get_logger().info(line)
            else:  # the node logger would also try /rosout, whose publisher died with it
                log.info(line)
        return written


def _coerce_learning_rate(params):
    """`ros2 param set ... train.learning_rate 1e-5` sends a string (YAML reads 1e-5 without a
    dot as text) and `... 1` an integer: pass them on as the declared double, so they are
    checked and applied like 1.0e-5. Text that is no number is left for the type check."""
    out = []
    for param in params:
        if param.name == 'train.learning_rate' and param.type_ in (Parameter.Type.STRING,
                                                                   Parameter.Type.INTEGER):
            try:
                param = Parameter(param.name, Parameter.Type.DOUBLE, float(param.value))
            except ValueError:
                pass   # the declared type then rejects it, naming the parameter
        out.append(param)
    return out


def _lower_priority(nice: int) -> None:
    """Put the calling thread at idle priority (SCHED_IDLE), else raise its nice value; a
    no-op off Linux."""
    if hasattr(os, 'sched_setscheduler') and hasattr(os, 'SCHED_IDLE'):
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))   # 0: this thread
            return
        except OSError as e:
            log.debug('SCHED_IDLE refused (%s); using nice %d', e, nice)
    if not hasattr(os, 'setpriority') or not hasattr(threading, 'get_native_id'):
        return
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, max(os.getpriority(os.PRIO_PROCESS, tid), nice))
    except OSError as e:
        log.warning('could not lower the training thread priority: %s', e)


def _fill_transform(transform, position, quat):
    transform.translation.x, transform.translation.y, transform.translation.z = position
    r = transform.rotation
    r.x, r.y, r.z, r.w = quat


def _fill_pose(pose, position, quat):
    pose.position.x, pose.position.y, pose.position.z = position
    pose.orientation.x, pose.orientation.y, pose.orientation.z, pose.orientation.w = quat
