"""ros/pose_output.py with recording publishers (no ROS graph): one Odometry message is filled
again for every pose, so what went out must be what each record said, and the path poses must
keep their own stamps."""
from types import SimpleNamespace as NS

from nav_msgs.msg import Odometry
import numpy as np
from rclpy.serialization import deserialize_message, serialize_message

from mm_fusion_ros.geometry import make_pose, rot_to_quat, rpy_to_rot
from mm_fusion_ros.ros import conversions, pose_output
from mm_fusion_ros.ros.pose_output import PoseOutput
from mm_fusion_ros.runtime.paths import PublishConfig
from mm_fusion_ros.trajectory.chain import PoseRecord


class Recorder:
    """A publisher that keeps what publish() serialised, as rclpy's does."""

    def __init__(self, msg_type):
        self.msg_type, self.sent = msg_type, []

    def publish(self, msg):
        self.sent.append(deserialize_message(serialize_message(msg), self.msg_type))


def record(k, segment=0):
    cov = np.arange(36.0).reshape(6, 6) + k
    return PoseRecord(stamp_ns=1_000_000_000 + 10_000_000 * k, segment=segment, index=k,
                      pose=make_pose(rpy_to_rot(0.1 * k, 0.0, 0.2), [k, 2.0 * k, 0.0]),
                      cov=cov, twist=np.arange(6.0) + k, twist_cov=cov.T, dt=0.1, bridged='')


def test_every_pose_goes_out_as_its_record_says_and_paths_keep_their_stamps():
    pubs = {}
    node = NS(create_publisher=lambda cls, topic, qos: pubs.setdefault(topic, Recorder(cls)))
    out = PoseOutput(node, PublishConfig(path_publish_period_s=1e-9))
    recs = [record(k) for k in range(3)]
    out.publish(recs[0], path=True)
    out.publish(recs[1], path=False)
    out.publish(recs[2], path=True)
    sent = pubs['/mm_fusion/odom'].sent
    assert len(sent) == 3
    for msg, rec in zip(sent, recs):
        fresh = Odometry()
        conversions.fill_odometry(fresh, rec, msg.header.frame_id, msg.child_frame_id)
        assert msg == fresh
        np.testing.assert_array_equal(np.reshape(msg.pose.covariance, (6, 6)), rec.cov)
        np.testing.assert_allclose(conversions.odometry_to_pose(msg), rec.pose, atol=1e-12)
    path = pubs['/mm_fusion/path'].sent[-1]
    assert [(p.header.stamp.sec, p.header.stamp.nanosec) for p in path.poses] == \
        [conversions.ns_to_stamp(r.stamp_ns) for r in (recs[0], recs[2])]
    # The message holds copies: changing a record afterwards changes nothing sent.
    recs[2].cov[:] = -1.0
    assert out.odom.pose.covariance[0] == 2.0


def test_the_ground_truth_path_follows_the_newest_segment_without_ground_truth():
    """A new segment (a looped bag) whose poses have no ground truth yet: /mm_fusion/gt_path
    goes empty with it instead of publishing the old segment's poses beside the new path."""
    pubs = {}
    node = NS(create_publisher=lambda cls, topic, qos: pubs.setdefault(topic, Recorder(cls)))
    out = PoseOutput(node, PublishConfig(path_publish_period_s=1e-9))
    for k in range(3):
        rec = record(k)
        rec.gt_pose = rec.pose
        out.publish(rec, path=True)
    assert len(pubs['/mm_fusion/gt_path'].sent[-1].poses) == 3
    sent = len(pubs['/mm_fusion/gt_path'].sent)
    for k in range(3, 5):
        out.publish(record(k, segment=1), path=True)
    assert len(pubs['/mm_fusion/path'].sent[-1].poses) == 2
    assert len(pubs['/mm_fusion/gt_path'].sent) == sent     # nothing old sent again


def test_the_ground_truth_transform_goes_out_with_scans_while_the_filter_is_odom(monkeypatch):
    """With the filter's IMU-rate poses as odom, scan records come with odom=False; the
    ground truth's odom -> base_link transform went out only with odom, so never. tf2_msgs has
    no wheel here: a stand-in message class takes its place (the logic is PoseOutput's)."""
    class TFMessage:
        def __init__(self, transforms):
            self.transforms = transforms

    monkeypatch.setattr(pose_output, 'TFMessage', TFMessage)
    pubs = {}

    class Keep:
        def __init__(self):
            self.sent = []

        def publish(self, msg):
            self.sent.append(msg)

    node = NS(create_publisher=lambda cls, topic, qos: pubs.setdefault(
        topic, Keep() if topic == '/tf' else Recorder(cls)))
    out = PoseOutput(node, PublishConfig(path_publish_period_s=1e-9))
    scan = record(1)
    scan.gt_pose = make_pose(np.eye(3), [5.0, 0.0, 0.0])
    out.publish(scan, path=True, odom=False)           # a scan's pose, the filter being odom
    assert '/mm_fusion/odom' not in pubs or not pubs['/mm_fusion/odom'].sent
    tf, = pubs['/tf'].sent
    t, = tf.transforms
    assert (t.header.frame_id, t.child_frame_id) == ('odom', 'base_link')
    assert (t.header.stamp.sec, t.header.stamp.nanosec) == conversions.ns_to_stamp(scan.stamp_ns)
    assert t.transform.translation.x == 5.0
    out.publish(record(2), path=True, odom=False)       # no ground truth: nothing on /tf
    assert len(pubs['/tf'].sent) == 1


def test_rot_to_quat_of_one_rotation_equals_the_batched_form():
    rng = np.random.default_rng(0)
    rots = rpy_to_rot(*rng.uniform(-np.pi, np.pi, (3, 500)))
    rots = np.concatenate([rots, [np.eye(3), np.diag([1.0, -1, -1]), np.diag([-1.0, 1, -1]),
                                  np.diag([-1.0, -1, 1])]])
    one = np.array([rot_to_quat(r) for r in rots])
    np.testing.assert_allclose(one, rot_to_quat(rots), rtol=0, atol=1e-15)
    assert np.all(one[:, 3] >= 0)
