"""Message conversion at the ROS edge: the decoders of mm_fusion_ros.messages (re-exported
here, so nodes find everything in one place) and the builders of rclpy messages, which import
the message classes lazily.
"""
import importlib

import numpy as np

from mm_fusion_ros.geometry import rot_to_quat
from mm_fusion_ros.messages import (  # noqa: F401  (re-exported decoders)
    camera_info_to_arrays,
    cdr_typestore,
    cloud_dtype,
    cloud_to_array,
    cloud_to_structured,
    compressed_image_to_array,
    decode_cdr,
    FLOAT32,
    image_to_array,
    imu_batch_to_arrays,
    imu_to_arrays,
    ns_to_stamp,
    odometry_to_pose,
    pose_to_matrix,
    stamp_to_ns,
    transform_to_matrix,
)


def warm_up_decoders(classes_and_types) -> None:
    """Decode a default message of each (rclpy message class, type name) once. rosbags builds
    a type's deserializer at its first message, 4-13 ms each (Odometry 12.6, CameraInfo 7.8,
    PointCloud2 7.5, Image 4.0 ms: docs/online_runtime.md, "Session 38"), and a node's first
    sample waited for all of them while a fast replay queued behind it."""
    from rclpy.serialization import serialize_message
    for msg_class, msgtype in classes_and_types:
        decode_cdr(serialize_message(msg_class()), msgtype)


# ------------------------------------------------------------------ IMU and poses


def pose_to_odometry_fields(pose, log_var=None):
    """4x4 pose (+ 6-vector log-variance of x y z rx ry rz) -> (position (3,) tuple,
    quaternion (x, y, z, w) tuple, 36-float row-major covariance list) for nav_msgs/Odometry.

    The covariance is diag(exp(log_var)) in ROS's (x, y, z, rot x, rot y, rot z) order, zeros
    when log_var is None.
    """
    cov = np.zeros((6, 6))
    if log_var is not None:
        log_var = np.asarray(log_var, dtype=np.float64).reshape(-1)
        if log_var.shape != (6,):
            raise ValueError(f'log_var must have 6 values, got {log_var.shape}')
        cov[np.diag_indices(6)] = np.exp(log_var)
    position, quat = _pose_fields(np.asarray(pose, dtype=np.float64))
    return position, quat, [float(v) for v in cov.ravel()]


def _pose_fields(pose):
    """4x4 pose (float64 array) -> (position, quaternion (x, y, z, w)) as tuples of floats."""
    if pose.shape != (4, 4):
        raise ValueError(f'pose must be 4x4, got {pose.shape}')
    return tuple(pose[:3, 3].tolist()), tuple(rot_to_quat(pose[:3, :3]).tolist())


def _covariance36(cov):
    """6x6 covariance -> a float64 array of 36 (row-major, a copy): what a float64[36] message
    field holds, assigned without the per-element checks of a list."""
    return np.array(cov, dtype=np.float64).reshape(36)


def fill_header(header, stamp_ns, frame_id) -> None:
    """std_msgs/Header <- stamp [ns], frame."""
    header.stamp.sec, header.stamp.nanosec = ns_to_stamp(stamp_ns)
    header.frame_id = frame_id


# ------------------------------------------------------- trajectory poses and status

def fill_pose(pose_msg, pose) -> None:
    """geometry_msgs/Pose <- 4x4 pose."""
    position, quat = _pose_fields(np.asarray(pose, dtype=np.float64))
    pose_msg.position.x, pose_msg.position.y, pose_msg.position.z = position
    o = pose_msg.orientation
    o.x, o.y, o.z, o.w = quat


def fill_transform(transform_msg, pose) -> None:
    """geometry_msgs/Transform <- 4x4 pose."""
    position, quat = _pose_fields(np.asarray(pose, dtype=np.float64))
    t = transform_msg.translation
    t.x, t.y, t.z = position
    r = transform_msg.rotation
    r.x, r.y, r.z, r.w = quat


def fill_odometry(msg, record, frame_id: str, child_frame_id: str) -> None:
    """nav_msgs/Odometry <- a trajectory PoseRecord: pose and its covariance in frame_id, twist
    and its covariance in child_frame_id (trajectory/covariance.py)."""
    fill_header(msg.header, record.stamp_ns, frame_id)
    msg.child_frame_id = child_frame_id
    fill_pose(msg.pose.pose, record.pose)
    msg.pose.covariance = _covariance36(record.cov)
    lin, ang = msg.twist.twist.linear, msg.twist.twist.angular
    lin.x, lin.y, lin.z, ang.x, ang.y, ang.z = np.asarray(record.twist, dtype=float).tolist()
    msg.twist.covariance = _covariance36(record.twist_cov)


def status_to_msg(status, stamp):
    """runtime.diagnostics.Status -> diagnostic_msgs/DiagnosticArray."""
    from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
    level = (DiagnosticStatus.OK, DiagnosticStatus.WARN, DiagnosticStatus.ERROR)[status.level]
    msg = DiagnosticArray(status=[DiagnosticStatus(
        level=level, name=status.name, message=status.message, hardware_id='mm_fusion_ros',
        values=[KeyValue(key=k, value=v) for k, v in status.values.items()])])
    msg.header.stamp = stamp
    return msg


def import_message_class(msgtype: str):
    """'sensor_msgs/msg/Image' -> the rosidl Python class; ImportError names the package."""
    parts = msgtype.split('/')
    if len(parts) != 3:
        raise ImportError(f'message type {msgtype!r} is not of the form pkg/msg/Name')
    package, sub, name = parts
    try:
        return getattr(importlib.import_module(f'{package}.{sub}'), name)
    except ImportError as e:
        raise ImportError(f'{msgtype}: package {package!r} is not installed ({e})') from e
    except AttributeError as e:
        raise ImportError(f'{msgtype}: {package}.{sub} has no {name}') from e
