"""Read a rosbag2 folder back to numpy (rosbags AnyReader; no rclpy).

    for m in read_numpy('bags/kitti_00', topic_names=[CLOUD_TOPIC, IMU_TOPIC]):
        m.data   # cloud: (N, 4) float32; image: (H, W, 3) uint8; imu: ImuSample; ...

Messages come in record-time order (the header stamps, for bags from kitti_to_bag).
"""
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rosbags.highlevel import AnyReader, AnyReaderError
from rosbags.rosbag2 import ReaderError

from mm_fusion_ros.bag import topics
from mm_fusion_ros.messages import (
    cloud_to_array,
    compressed_image_to_array,
    image_to_array,
    imu_orientation,
    imu_to_arrays,
    odometry_to_pose,
    odometry_twist,
    stamp_to_ns,
    tf_to_dict,
)


@dataclass(frozen=True)
class BagMessage:
    topic: str
    msgtype: str
    log_time_ns: int
    msg: object               # rosbags message object


@dataclass(frozen=True)
class ImuSample:
    stamp_ns: int
    accel: np.ndarray         # (3,) m/s^2, imu_link
    gyro: np.ndarray          # (3,) rad/s, imu_link
    quat: np.ndarray = None   # (4,) x, y, z, w, or None when the message has no orientation


@dataclass(frozen=True)
class OdometrySample:
    stamp_ns: int
    pose: np.ndarray          # (4, 4) child frame in header frame
    twist: np.ndarray         # (6,) v, w in the child frame
    frame_id: str
    child_frame_id: str


@dataclass(frozen=True)
class CameraInfoSample:
    stamp_ns: int
    width: int
    height: int
    K: np.ndarray             # (3, 3)
    P: np.ndarray             # (3, 4)


@dataclass(frozen=True)
class NumpyMessage:
    topic: str
    msgtype: str
    log_time_ns: int
    stamp_ns: int             # header stamp (equals log_time_ns in kitti_to_bag bags)
    frame_id: str
    data: object


def _open(path) -> AnyReader:
    path = Path(path)
    if not (path / 'metadata.yaml').is_file():
        raise FileNotFoundError(f'{path}: not a rosbag2 folder (no metadata.yaml)')
    reader = AnyReader([path])
    try:
        reader.open()
    except (AnyReaderError, ReaderError) as e:
        raise ValueError(f'{path}: cannot open bag: {e}') from e
    return reader


def bag_topics(path) -> dict:
    """{topic: (msgtype, message count)} of a bag."""
    reader = _open(path)
    try:
        return {name: (info.msgtype, info.msgcount) for name, info in reader.topics.items()}
    finally:
        reader.close()


def static_transforms(path) -> list:
    """[(parent, child, T_parent_child 4x4)] of the bag's /tf_static messages, in order (a
    later transform of the same pair comes later)."""
    if topics.TF_STATIC_TOPIC not in bag_topics(path):
        return []
    return [(parent, child, pose) for m in read_numpy(path, [topics.TF_STATIC_TOPIC])
            for (parent, child), pose in m.data.items()]


def read_messages(path, topic_names=None):
    """Yield BagMessage (decoded rosbags objects) of the given topics (None: all)."""
    reader = _open(path)
    try:
        conns = [c for c in reader.connections
                 if topic_names is None or c.topic in set(topic_names)]
        if topic_names is not None and not conns:
            have = sorted({c.topic for c in reader.connections})
            raise ValueError(f'{path}: none of the topics {list(topic_names)} in the bag; '
                             f'it has {have}')
        for conn, log_time, raw in reader.messages(connections=conns):
            yield BagMessage(conn.topic, conn.msgtype, log_time,
                             reader.deserialize(raw, conn.msgtype))
    finally:
        reader.close()


def to_numpy(msgtype: str, msg):
    """A decoded message -> its numpy form (cloud, image, ImuSample, ...); other types as-is."""
    if msgtype == topics.CLOUD_TYPE:
        return cloud_to_array(msg)
    if msgtype == topics.IMAGE_TYPE:
        return image_to_array(msg)
    if msgtype == topics.COMPRESSED_IMAGE_TYPE:
        return compressed_image_to_array(msg)
    if msgtype == topics.IMU_TYPE:
        accel, gyro = imu_to_arrays(msg)
        return ImuSample(stamp_to_ns(msg.header.stamp), accel, gyro, imu_orientation(msg))
    if msgtype == topics.ODOMETRY_TYPE:
        return OdometrySample(stamp_to_ns(msg.header.stamp), odometry_to_pose(msg),
                              odometry_twist(msg), msg.header.frame_id, msg.child_frame_id)
    if msgtype == topics.CAMERA_INFO_TYPE:
        return CameraInfoSample(stamp_to_ns(msg.header.stamp), int(msg.width), int(msg.height),
                                np.asarray(msg.k, dtype=np.float64).reshape(3, 3),
                                np.asarray(msg.p, dtype=np.float64).reshape(3, 4))
    if msgtype == topics.TF_TYPE:
        return tf_to_dict(msg)
    return msg


def read_numpy(path, topic_names=None):
    """Yield NumpyMessage of the given topics (None: all), decoded by `to_numpy`."""
    for m in read_messages(path, topic_names):
        header = getattr(m.msg, 'header', None)
        stamp = stamp_to_ns(header.stamp) if header is not None else m.log_time_ns
        frame_id = header.frame_id if header is not None else ''
        yield NumpyMessage(m.topic, m.msgtype, m.log_time_ns, stamp, frame_id,
                           to_numpy(m.msgtype, m.msg))
