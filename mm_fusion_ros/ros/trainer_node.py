"""Trainer node: online fine-tuning, the predicted trajectory for RViz, checkpoints.

A thin shell over training.online.OnlineTrainer and the runtime cores. Gradient steps run in a
worker thread at idle priority, or in a learner process it watches (learner: process); each
sample the synchronizer hands over is predicted at once and its poses go out on /mm_fusion/odom
(pose covariance in odom, twist in base_link_pred), the segment's paths on /mm_fusion/path and
/mm_fusion/gt_path, odom -> base_link_pred on /tf (with tf2_msgs), the status on /diagnostics
(ros/pose_output.py). With the inertial filter (filter.*, filter/online.py) the poses are its,
and with filter.publish_rate imu a paced worker thread (not an rclpy timer: cheaper at 100 Hz)
publishes odom and TF at every IMU sample.
Services: ~/save_checkpoint (Trigger; message = written path), ~/set_training (SetBool).
Parameters: PARAMETERS (model.* for a fresh model only); train.learning_rate and
training_enabled change at run time (a request is applied whole or refused whole).
"""
import logging

from diagnostic_msgs.msg import DiagnosticArray
from rcl_interfaces.msg import SetParametersResult
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.clock import Clock, ClockType
from rclpy.impl.implementation_singleton import rclpy_implementation as _rclpy
from rclpy.node import Node
from std_srvs.srv import SetBool, Trigger

from mm_fusion_ros.bag import topics
from mm_fusion_ros.config import SampleConfig
from mm_fusion_ros.filter.online import OnlineFilterConfig
from mm_fusion_ros.model.config import ModelConfig
from mm_fusion_ros.ros import conversions
from mm_fusion_ros.ros.params import as_doubles, declare_config
from mm_fusion_ros.ros.pose_output import PoseOutput, TFMessage
from mm_fusion_ros.runtime import diagnostics
from mm_fusion_ros.runtime.params import TrainerParameters
from mm_fusion_ros.runtime.paths import PublishConfig
from mm_fusion_ros.runtime.process import lower_thread_priority
from mm_fusion_ros.runtime.workers import FaultLog, Pacer, Worker
from mm_fusion_ros.sync.config import BufferConfig
from mm_fusion_ros.training.config import TrainConfig
from mm_fusion_ros.training.learner import build_trainer
from mm_fusion_ros.training.online import ONLINE_TRAIN_DEFAULTS, OnlineConfig
from mm_fusion_ros.trajectory.chain import TrajectoryConfig

log = logging.getLogger(__name__)


class TrainerNode(Node):
    """Owns the OnlineTrainer; the synchronizer hands it samples (on_sample), the prediction
    backlog (on_backlog) and the recorded ground truth (on_ground_truth)."""

    # (config, parameter prefix[, defaults other than the dataclass's]) in declaration order;
    # online and train parameters are writable (runtime/params.py: which change at run time).
    PARAMETERS = {'online': (OnlineConfig, ''),
                  'train': (TrainConfig, 'train.', ONLINE_TRAIN_DEFAULTS),
                  'publish': (PublishConfig, ''), 'model': (ModelConfig, 'model.'),
                  'sample': (SampleConfig, 'sample.'), 'buffer': (BufferConfig, 'buffer.'),
                  'trajectory': (TrajectoryConfig, 'trajectory.'),
                  'filter': (OnlineFilterConfig, 'filter.')}

    def __init__(self, name=topics.TRAINER_NODE):
        super().__init__(name)
        cfg = {key: declare_config(self, cls, prefix, read_only=key not in ('online', 'train'),
                                   overrides=dict(*defaults))
               for key, (cls, prefix, *defaults) in self.PARAMETERS.items()}
        self.supervision = cfg['train'].supervision   # the synchronizer reads it
        self.online_cfg = cfg['online']
        self.intake = None   # with intake: process, its link (use_intake)
        self.pub_cfg = cfg['publish']
        self.trainer = build_trainer(cfg['online'], cfg['train'], cfg['model'], cfg['sample'],
                                     cfg['buffer'], cfg['trajectory'], cfg['filter'])
        self.filter = self.trainer.filter if cfg['filter'].publish_rate == 'imu' else None
        # Before anything is subscribed or served: the first samples find the model warm.
        warm_s = self.trainer.warm_up()
        self.sample_cfg, self.buffer = self.trainer.sample_cfg, self.trainer.buffer
        self.on_backlog = self.trainer.set_backlog
        self.on_ground_truth = self.trainer.trajectory.add_ground_truth
        self.params = TrainerParameters(self.trainer)
        self.add_pre_set_parameters_callback(as_doubles('train.learning_rate'))
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self.faults = FaultLog()
        self.worker = Worker('trainer', self._train_step, self.faults,
                             setup=lower_thread_priority)
        self.imu_pace = Pacer(cfg['filter'].poll_period_s)
        self.imu_worker = Worker('imu_odometry', self._imu_step, self.faults) \
            if self.filter is not None else None
        self.out = PoseOutput(self, self.pub_cfg)
        self.diag_pub = self.create_publisher(DiagnosticArray, '/diagnostics', 10)
        services = MutuallyExclusiveCallbackGroup()
        self.create_service(Trigger, '~/save_checkpoint', self._on_save, callback_group=services)
        self.create_service(SetBool, '~/set_training', self._on_set_training,
                            callback_group=services)
        steady = Clock(clock_type=ClockType.STEADY_TIME)   # runs on when a bag's /clock stops
        self.create_timer(self.pub_cfg.path_publish_period_s, self.out.on_timer, clock=steady)
        self.create_timer(1.0, self._on_diagnostics, callback_group=services, clock=steady)
        self.get_logger().info(f'online fine-tuning from {self.trainer.source or "a fresh model"}'
                               f', {self.supervision} supervision; training '
                               f'{"on" if self.trainer.training_enabled else "off"}'
                               f'{"" if TFMessage else "; no tf2_msgs: no /tf"}; model warmed '
                               f'up in {warm_s:.2f} s')

    def use_intake(self, link) -> None:
        """Take samples, ground truth and the IMU from the intake process (runtime/
        intake_link.py) instead of a synchronizer node in this process."""
        self.intake = link
        self.trainer.use_imu(link.imu.imu_between, link.rot_base_imu,
                             imu_after=link.imu.imu_after, base_imu=link.base_imu)
        self.intake_worker = Worker('intake_link', link.step, self.faults)

    def workers(self) -> list:
        return [w for w in (self.imu_worker, self.worker) if w is not None]

    def start(self) -> None:
        if self.intake is not None:
            self.intake.start()
            self.intake_worker.start()
        for worker in self.workers():
            worker.start()

    # --- samples in, poses out ------------------------------------------------------------
    def on_sample(self, sample) -> None:
        records = self.trainer.on_sample(sample).poses
        # While the filter's IMU-rate poses flow, they are odom; a scan pose placed ahead of
        # them (a forecast, with the IMU stamped late) would hold them back (OdomOrder).
        odom = self.filter is None or not self.filter.imu_poses_flowing
        self._publish(records, path=True, odom=odom)

    def _imu_step(self):
        self.imu_pace.wait()
        self._publish(self.filter.poll(), path=False)

    def _publish(self, records, path, odom=True):
        for record in records:
            if not self.context.ok():   # shutting down: the sample counts, nothing to publish
                return
            try:
                self.out.publish(record, path, odom)
            except _rclpy.RCLError as e:
                if self.context.ok():
                    raise
                log.debug('pose at %d not published during shutdown: %s', record.stamp_ns, e)

    # --- training, services, parameters, diagnostics ---------------------------------------
    def _train_step(self):
        self.trainer.wait_for_work(0.2)
        self.trainer.train_pending(max_steps=1)

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
        try:
            self.trainer.set_training(request.data)
        except RuntimeError as e:     # the learner process did not confirm it (LearnerError)
            response.success = False
            response.message = f'training change not confirmed by the learner: {e}'
            self.get_logger().error(response.message)
            return response
        response.success = True
        response.message = f'training {"enabled" if request.data else "disabled"} at step ' \
                           f'{self.trainer.core.step_count}'
        self.get_logger().info(response.message)
        return response

    def _on_set_parameters(self, params):
        ok, reason = self.params.update({p.name: p.value for p in params})
        return SetParametersResult(successful=ok, reason=reason)

    def _on_diagnostics(self):
        metrics = self.trainer.metrics()
        if self.intake is not None:
            metrics['intake_failed_samples'] = self.intake.failed_samples
        status = diagnostics.trainer_status(self.get_name(), metrics,
                                            self.trainer.trajectory.stats(),
                                            self.faults.snapshot())
        self.diag_pub.publish(conversions.status_to_msg(status, self.get_clock().now().to_msg()))

    # --- shutdown ------------------------------------------------------------------------
    def problems(self) -> list:
        out = [f'worker {w.name} ended' for w in self.workers() if w.failed]
        if self.intake is not None:
            out += self.intake.problems() + (
                ['worker intake_link ended'] if self.intake_worker.failed else [])
        return out + self.trainer.problems()

    def shutdown(self) -> dict:
        """Stop the intake process after its last samples were handled (intake: process),
        stop training, then write the final checkpoint, buffer and trajectories."""
        if self.intake is not None:
            self.intake_worker.stop(timeout=30.0)
            if not self.intake.stop():   # handles the child's last samples in this thread
                log.error('the intake process did not end cleanly (exit code %s)',
                          self.intake.process and self.intake.process.exitcode)
        for worker in self.workers():
            if not worker.stop(timeout=30.0):
                log.error('the %s thread did not stop within 30 s', worker.name)
        written = self.trainer.shutdown()
        m = self.trainer.metrics()
        log.info('%d samples, %d gradient steps (step %d); %d steps bridged, %d segment(s); '
                 'wrote %s', m['online_samples'], m['online_steps'], self.trainer.core.step_count,
                 m['trajectory_bridged'], m['trajectory_segments'], written)
        return written
