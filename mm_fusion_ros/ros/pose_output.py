"""What the trainer node publishes of the trajectory: /mm_fusion/odom, /tf (with tf2_msgs) and
the paths /mm_fusion/path and /mm_fusion/gt_path (bounded and throttled, runtime/paths.py).

Scan poses (trajectory PoseRecords) go to the paths and, when newer than what was published,
to odom and TF (not while the filter's IMU-rate poses are odom); the inertial filter's IMU-rate
poses go to odom and TF only (runtime.paths.OdomOrder keeps those going forward in time).
Called from the synchronizer's dispatch thread and the node's timers: one lock. One Odometry
message is filled and published for every pose (rclpy serialises it within publish()); the path
poses get headers of their own.
"""
import threading

from geometry_msgs.msg import PoseStamped, TransformStamped
from nav_msgs.msg import Odometry, Path

from mm_fusion_ros.bag import topics
from mm_fusion_ros.ros import conversions
from mm_fusion_ros.ros.qos import PATH_QOS
from mm_fusion_ros.runtime.paths import OdomOrder, PathThrottle, PoseTrail, PublishConfig

try:  # No wheel exists for tf2_msgs: TF is published only where ROS 2 provides it.
    from tf2_msgs.msg import TFMessage
except ImportError:
    TFMessage = None


class PoseOutput:
    def __init__(self, node, cfg: PublishConfig):
        self.cfg = cfg
        self.odom_pub = node.create_publisher(Odometry, topics.ODOM_OUT_TOPIC, 50)
        self.path_pubs = [node.create_publisher(Path, t, PATH_QOS)
                          for t in (topics.PATH_TOPIC, topics.GT_PATH_TOPIC)]
        self.trails = [PoseTrail(cfg.path_max_poses) for _ in self.path_pubs]
        self.throttle = PathThrottle(cfg.path_publish_period_s)
        self.order = OdomOrder()
        self.lock = threading.Lock()
        self.odom = Odometry()     # filled again for every pose, under the lock
        self.tf_pub = node.create_publisher(TFMessage, '/tf', 50) if TFMessage else None

    def publish(self, record, path=True, odom=True) -> None:
        """A pose: odom and TF (with `odom`) when it is the newest of its segment; the paths
        when `path`."""
        with self.lock:
            if odom and self.order.admit(record.segment, record.stamp_ns):
                msg = self.odom
                conversions.fill_odometry(msg, record, topics.ODOM_FRAME, topics.PRED_FRAME)
                self._publish_odom(msg, record)
            elif not odom and self._gt_tf(record):
                # The filter's IMU-rate poses are odom (they carry no ground truth): the
                # ground truth's transform still goes out with each scan's pose.
                header = TransformStamped().header
                conversions.fill_header(header, record.stamp_ns, topics.ODOM_FRAME)
                self.tf_pub.publish(TFMessage(transforms=[
                    _transform(header, topics.BASE_FRAME, record.gt_pose)]))
            if not path:
                return
            for trail, pose in zip(self.trails, (record.pose, record.gt_pose)):
                # Both paths follow the newest segment: a new one without ground truth (yet)
                # must not leave the old segment's on /mm_fusion/gt_path.
                trail.start(record.segment)
                if pose is not None:
                    stamped = PoseStamped()
                    conversions.fill_header(stamped.header, record.stamp_ns, topics.ODOM_FRAME)
                    conversions.fill_pose(stamped.pose, pose)
                    trail.add(record.segment, stamped)
            if self.throttle.added():
                self._publish_paths()

    def on_timer(self) -> None:
        """Publish the paths if poses came since the last publication."""
        with self.lock:
            if self.throttle.pending:
                self._publish_paths()

    def _gt_tf(self, record) -> bool:
        return self.tf_pub is not None and self.cfg.publish_gt_tf and record.gt_pose is not None

    def _publish_odom(self, odom, record):
        self.odom_pub.publish(odom)
        if self.tf_pub is not None:
            frames = [(topics.PRED_FRAME, record.pose)]
            if self._gt_tf(record):
                frames.append((topics.BASE_FRAME, record.gt_pose))
            self.tf_pub.publish(TFMessage(transforms=[_transform(odom.header, child, pose)
                                                      for child, pose in frames]))

    def _publish_paths(self):
        self.throttle.published()
        for pub, trail in zip(self.path_pubs, self.trails):
            if trail.items:
                pub.publish(Path(header=trail.items[-1].header, poses=list(trail.items)))


def _transform(header, child, pose):
    tf = TransformStamped(header=header, child_frame_id=child)
    conversions.fill_transform(tf.transform, pose)
    return tf
