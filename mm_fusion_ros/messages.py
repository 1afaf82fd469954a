"""The one set of message -> numpy decoders (STYLE §7; no sensor_msgs_py, no cv_bridge).

Duck-typed: they only read message attributes, so rclpy messages, rosbags messages (the bag
reader) and SimpleNamespace fakes all work. Byte payloads are read with np.frombuffer (rclpy's
uint8[] is an array.array, rosbags' a numpy array; neither is copied before the final gather).
`decode_cdr` turns the serialized bytes of a raw rclpy subscription into a rosbags message
whose payload is a view of those bytes: for MB-sized clouds and images it skips rclpy's two
copies into Python objects, which hold the GIL (bench/online.py). ros/conversions.py re-exports
these and adds the rclpy message builders.
"""
from functools import lru_cache
from io import BytesIO

import numpy as np
from PIL import Image, UnidentifiedImageError
from rosbags.serde import SerdeError
from rosbags.typesys import get_typestore, Stores

from mm_fusion_ros.geometry import make_pose, quat_to_rot
from mm_fusion_ros.stamps import NS_PER_S

# sensor_msgs/PointField datatypes.
POINT_FIELD_DTYPES = {1: 'i1', 2: 'u1', 3: 'i2', 4: 'u2', 5: 'i4', 6: 'u4', 7: 'f4', 8: 'f8'}
FLOAT32 = 7
INTENSITY_ALIASES = ('intensity', 'reflectance', 'i')

# encoding -> (channel dtype, channels, indices of R, G, B among the channels; None = grey).
# '8UC3'/'8UC4' follow OpenCV's BGR(A) order; 16-bit values are scaled to 8 bits (x / 257).
IMAGE_ENCODINGS = {
    'rgb8': ('u1', 3, (0, 1, 2)),
    'bgr8': ('u1', 3, (2, 1, 0)),
    'rgba8': ('u1', 4, (0, 1, 2)),
    'bgra8': ('u1', 4, (2, 1, 0)),
    'mono8': ('u1', 1, None),
    '8UC1': ('u1', 1, None),
    '8UC3': ('u1', 3, (2, 1, 0)),
    '8UC4': ('u1', 4, (2, 1, 0)),
    'rgb16': ('u2', 3, (0, 1, 2)),
    'bgr16': ('u2', 3, (2, 1, 0)),
    'mono16': ('u2', 1, None),
    '16UC1': ('u2', 1, None),
}


# ------------------------------------------------------------------------ stamps

def stamp_to_ns(stamp) -> int:
    """builtin_interfaces/Time (sec, nanosec) -> integer nanoseconds."""
    return int(stamp.sec) * NS_PER_S + int(stamp.nanosec)


def ns_to_stamp(ns: int):
    """Integer nanoseconds -> (sec, nanosec) for a builtin_interfaces/Time."""
    sec, nanosec = divmod(int(ns), NS_PER_S)
    return sec, nanosec


def _byte_view(data) -> np.ndarray:
    """uint8 view of a message payload (array.array, bytes, memoryview, ndarray, list)."""
    if isinstance(data, np.ndarray):
        return data.view(np.uint8).reshape(-1)
    if isinstance(data, (list, tuple)):
        return np.asarray(data, dtype=np.uint8)
    return np.frombuffer(data, dtype=np.uint8)


# ------------------------------------------------------------------- point clouds

def cloud_dtype(msg) -> np.dtype:
    """Structured dtype of one point from the PointField list, point_step and is_bigendian."""
    order = '>' if msg.is_bigendian else '<'
    names, formats, offsets = [], [], []
    for f in msg.fields:
        if f.datatype not in POINT_FIELD_DTYPES:
            raise ValueError(f'PointCloud2 field {f.name!r}: unknown datatype {f.datatype}')
        count = int(getattr(f, 'count', 1) or 1)
        base = order + POINT_FIELD_DTYPES[f.datatype]
        names.append(f.name)
        formats.append(base if count == 1 else (base, (count,)))
        offsets.append(int(f.offset))
    try:
        return np.dtype({'names': names, 'formats': formats, 'offsets': offsets,
                         'itemsize': int(msg.point_step)})
    except ValueError as e:
        raise ValueError(f'PointCloud2 fields {names} at offsets {offsets} do not fit '
                         f'point_step {msg.point_step}: {e}') from e


def cloud_to_array(msg, names=('x', 'y', 'z', 'intensity')) -> np.ndarray:
    """PointCloud2 -> (width*height, len(names)) float32.

    A missing 'intensity' falls back to 'reflectance' or 'i', else zeros; other missing fields
    raise ValueError naming the fields present. Rows padded beyond width*point_step (row_step)
    are honoured.
    """
    points = cloud_to_structured(msg)
    block = _float32_block(points, names)
    if block is not None:
        return block
    out = np.empty((len(points), len(names)), dtype=np.float32)
    present = points.dtype.names
    for col, name in enumerate(names):
        field_name = _resolve_field(name, present)
        if field_name is None:
            if name in INTENSITY_ALIASES:
                out[:, col] = 0.0
                continue
            raise ValueError(f'PointCloud2 has no field {name!r}; fields: {list(present)}')
        if points.dtype[field_name].shape:
            raise ValueError(f'PointCloud2 field {field_name!r} has count '
                             f'{points.dtype[field_name].shape[0]}; only scalar fields convert')
        out[:, col] = points[field_name]
    return out


def _float32_block(points: np.ndarray, names):
    """The fields as one strided copy when they are native float32 side by side in that order
    (KITTI's x, y, z, intensity at offsets 0, 4, 8, 12: a quarter of the per-field copies'
    time at 128k points); else None."""
    fields = points.dtype.fields
    resolved = [_resolve_field(n, points.dtype.names) for n in names]
    if None in resolved or points.dtype.itemsize % 4:
        return None
    first = fields[resolved[0]][1]
    if first % 4 or any(fields[f][0] != np.dtype(np.float32) or fields[f][1] != first + 4 * i
                        for i, f in enumerate(resolved)):
        return None
    floats = points.view(np.uint8).reshape(len(points), -1).view(np.float32)
    return floats[:, first // 4:first // 4 + len(names)].copy()


def _resolve_field(name, present):
    if name in present:
        return name
    if name in INTENSITY_ALIASES:
        return next((a for a in INTENSITY_ALIASES if a in present), None)
    return None


def cloud_to_structured(msg) -> np.ndarray:
    """PointCloud2 -> structured array of its width * height points (a view of the payload
    unless rows are padded beyond width * point_step, i.e. row_step)."""
    dtype = cloud_dtype(msg)
    width, height = int(msg.width), int(msg.height)
    count = width * height
    raw = _byte_view(msg.data)
    row_bytes = width * dtype.itemsize
    row_step = int(getattr(msg, 'row_step', 0) or row_bytes)
    if height > 1 and row_step != row_bytes:
        if raw.size < row_step * (height - 1) + row_bytes:
            raise ValueError(f'PointCloud2 data has {raw.size} bytes, {height} rows of row_step '
                             f'{row_step} need {row_step * (height - 1) + row_bytes}')
        raw = np.concatenate([raw[r * row_step:r * row_step + row_bytes] for r in range(height)])
    if raw.size < count * dtype.itemsize:
        raise ValueError(f'PointCloud2 data has {raw.size} bytes, {width}x{height} points of '
                         f'point_step {dtype.itemsize} need {count * dtype.itemsize}')
    return np.frombuffer(raw, dtype=dtype, count=count)


# ------------------------------------------------------------------------ images

def image_to_array(msg) -> np.ndarray:
    """sensor_msgs/Image -> (H, W, 3) uint8 RGB (a new array); honours step and is_bigendian."""
    encoding = str(msg.encoding)
    if encoding not in IMAGE_ENCODINGS:
        raise ValueError(f'image encoding {encoding!r} not supported; supported: '
                         f'{", ".join(IMAGE_ENCODINGS)}')
    base, channels, rgb = IMAGE_ENCODINGS[encoding]
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    itemsize = np.dtype(base).itemsize
    row_bytes = width * channels * itemsize
    if step < row_bytes:
        raise ValueError(f'image {encoding} {width}x{height}: step {step} < {row_bytes} bytes '
                         'per row')
    raw = _byte_view(msg.data)
    if raw.size < step * (height - 1) + row_bytes:
        raise ValueError(f'image {encoding} {width}x{height}: data has {raw.size} bytes, needs '
                         f'{step * (height - 1) + row_bytes} (step {step})')
    rows = np.lib.stride_tricks.as_strided(raw, shape=(height, row_bytes),
                                           strides=(step, 1), writeable=False)
    order = '>' if getattr(msg, 'is_bigendian', False) else '<'
    pixels = rows.view(order + base if itemsize > 1 else base).reshape(height, width, channels)
    if itemsize > 1:
        pixels = np.round(pixels.astype(np.float32) / 257.0).astype(np.uint8)
    if rgb is None:
        return np.repeat(pixels, 3, axis=2)
    if channels == 3 and rgb == (0, 1, 2):
        return pixels.copy()
    if channels == 3 and rgb == (2, 1, 0):
        return pixels[:, :, ::-1].copy()
    return np.ascontiguousarray(pixels[:, :, list(rgb)])


def compressed_image_to_array(msg) -> np.ndarray:
    """sensor_msgs/CompressedImage (png, jpeg, ...) -> (H, W, 3) uint8 RGB via PIL."""
    fmt = str(getattr(msg, 'format', ''))
    try:
        with Image.open(BytesIO(_byte_view(msg.data).tobytes())) as img:
            return np.asarray(img.convert('RGB'))
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ValueError(f'compressed image (format {fmt!r}) could not be decoded: {e}') from e


# ------------------------------------------------------------------ IMU and poses

def imu_to_arrays(msg):
    """sensor_msgs/Imu -> (accel (3,), gyro (3,)) float64 [m/s^2], [rad/s]."""
    a, w = msg.linear_acceleration, msg.angular_velocity
    return (np.array([a.x, a.y, a.z], dtype=np.float64),
            np.array([w.x, w.y, w.z], dtype=np.float64))


def imu_batch_to_arrays(raws):
    """Serialized (CDR) sensor_msgs/Imu messages -> (stamps (M,) int64 ns, accel (M, 3),
    gyro (M, 3) float64, frame_ids (M,) list of str, bad [(index, ValueError)]).

    One numpy pass per layout instead of one decode_cdr per message: the messages that share
    a length, byte order and frame_id length are gathered into one (n, length) array and their
    fields read at fixed offsets. The CDR layout is the same in every ROS 2 distro (DESIGN §4):
    4-byte encapsulation, header (int32 sec, uint32 nanosec, frame_id as uint32 length + bytes
    + NUL), then 37 float64 aligned to 8 from the encapsulation's end: orientation (4),
    orientation_covariance (9), angular_velocity (3), its covariance (9), linear_acceleration
    (3), its covariance (9). A message that does not fit it goes through decode_cdr, so the
    one that does not decode is reported with decode_cdr's error. Rows of `bad` hold zeros.
    """
    m = len(raws)
    stamps = np.zeros(m, dtype=np.int64)
    accel, gyro = np.zeros((m, 3)), np.zeros((m, 3))
    frame_ids, bad = [''] * m, []
    groups = {}
    for i, raw in enumerate(raws):
        raw = bytes(raw)
        layout = _imu_layout(raw)
        if layout is None:
            try:
                msg = decode_cdr(raw, 'sensor_msgs/msg/Imu')
                stamps[i] = stamp_to_ns(msg.header.stamp)
                accel[i], gyro[i] = imu_to_arrays(msg)
                frame_ids[i] = msg.header.frame_id
            except ValueError as e:
                bad.append((i, e))
            continue
        groups.setdefault(layout, ([], []))
        groups[layout][0].append(i)
        groups[layout][1].append(raw)
    for (length, order, name_len), (index, group) in groups.items():
        rows = np.frombuffer(b''.join(group), dtype=np.uint8).reshape(len(group), length)
        sec = rows[:, 4:8].copy().view(order + 'i4')[:, 0].astype(np.int64)
        nsec = rows[:, 8:12].copy().view(order + 'u4')[:, 0].astype(np.int64)
        start = 4 + -(-(16 + name_len - 4) // 8) * 8
        values = rows[:, start:start + 37 * 8].copy().view(order + 'f8')
        stamps[index] = sec * NS_PER_S + nsec
        gyro[index] = values[:, 13:16]
        accel[index] = values[:, 25:28]
        names = rows[:, 16:16 + name_len - 1]
        if (names == names[0]).all():   # the usual case: one frame_id
            name = bytes(names[0]).decode('utf-8', errors='replace')
            for i in index:
                frame_ids[i] = name
            continue
        for i, row in zip(index, names):
            frame_ids[i] = bytes(row).decode('utf-8', errors='replace')
    return stamps, accel, gyro, frame_ids, bad


def _imu_layout(raw: bytes):
    """(length, byte order, frame_id length with its NUL) of a well-formed serialized Imu, or
    None when it is not one (then decode_cdr decides)."""
    if len(raw) < 16 + 37 * 8 or raw[0] != 0 or raw[1] not in (0, 1):
        return None
    order = '<' if raw[1] == 1 else '>'
    name_len = int.from_bytes(raw[12:16], 'little' if order == '<' else 'big')
    length = 4 + -(-(16 + name_len - 4) // 8) * 8 + 37 * 8
    if name_len < 1 or len(raw) != length or raw[15 + name_len] != 0:
        return None
    return length, order, name_len


def odometry_to_pose(msg) -> np.ndarray:
    """nav_msgs/Odometry (or anything with .pose.pose) -> 4x4 pose (parent <- child)."""
    pose = msg.pose.pose
    q = pose.orientation
    if not np.linalg.norm([q.x, q.y, q.z, q.w]) > 1e-9:
        raise ValueError(f'odometry orientation is not a quaternion: {[q.x, q.y, q.z, q.w]}')
    return pose_to_matrix(pose.position, q)


def camera_info_to_arrays(msg):
    """sensor_msgs/CameraInfo -> (K (3, 3) float64, width, height, frame_id). ValueError when
    the camera is not calibrated (K all zeros, as drivers send it then) or K is not a pinhole
    matrix (fx, fy > 0, last row 0 0 1)."""
    K = np.asarray(msg.k, dtype=np.float64).reshape(3, 3)
    width, height = int(msg.width), int(msg.height)
    if not np.isfinite(K).all() or not K.any():
        raise ValueError('camera_info: K is not set (an uncalibrated camera)')
    if not (K[0, 0] > 0 and K[1, 1] > 0 and np.allclose(K[2], [0, 0, 1])):
        raise ValueError(f'camera_info: K is not a pinhole camera matrix: {K.tolist()}')
    if width < 1 or height < 1:
        raise ValueError(f'camera_info: image size {width}x{height} is not positive')
    return K, width, height, msg.header.frame_id


def imu_orientation(msg):
    """sensor_msgs/Imu orientation (x, y, z, w), or None when the sender has none (REP 145:
    orientation_covariance[0] == -1)."""
    if msg.orientation_covariance[0] == -1:
        return None
    q = msg.orientation
    return np.array([q.x, q.y, q.z, q.w], dtype=np.float64)


def pose_to_matrix(position, orientation) -> np.ndarray:
    """geometry_msgs Point/Vector3 + Quaternion -> 4x4."""
    q = [orientation.x, orientation.y, orientation.z, orientation.w]
    return make_pose(quat_to_rot(q), [position.x, position.y, position.z])


def odometry_twist(msg) -> np.ndarray:
    """nav_msgs/Odometry twist -> (6,) v, w in child_frame_id."""
    t = msg.twist.twist
    return np.array([t.linear.x, t.linear.y, t.linear.z, t.angular.x, t.angular.y, t.angular.z])


def transform_to_matrix(tf) -> np.ndarray:
    """geometry_msgs/TransformStamped -> T_parent_child 4x4; ValueError naming both frames
    when a value is not finite or the rotation is not a quaternion (a zero quaternion would
    otherwise pass as the identity)."""
    t, q = tf.transform.translation, tf.transform.rotation
    values = [t.x, t.y, t.z, q.x, q.y, q.z, q.w]
    if not np.isfinite(values).all() or not np.linalg.norm(values[3:]) > 1e-9:
        raise ValueError(f'transform {tf.header.frame_id!r} -> {tf.child_frame_id!r}: '
                         f'translation {values[:3]}, rotation {values[3:]} is not a pose')
    return pose_to_matrix(t, q)


def tf_to_dict(msg) -> dict:
    """tf2_msgs/TFMessage -> {(parent, child): T_parent_child 4x4}."""
    return {(t.header.frame_id, t.child_frame_id): transform_to_matrix(t)
            for t in msg.transforms}


# ----------------------------------------------------------------- serialized (CDR)

@lru_cache(maxsize=1)
def cdr_typestore():
    """The typestore of decode_cdr: these layouts are the same in every ROS 2 distro since
    Humble. Built on first use, which takes a noticeable moment (docs/measured_figures.md):
    a node calls it at start so no message waits."""
    return get_typestore(Stores.ROS2_HUMBLE)


def decode_cdr(raw, msgtype: str):
    """Serialized CDR bytes (a raw subscription's message) -> rosbags message; uint8[]
    payloads are numpy views of `raw`, not copies (a memoryview: slicing bytes would copy)."""
    try:
        return cdr_typestore().deserialize_cdr(memoryview(raw), msgtype)
    except SerdeError as e:
        raise ValueError(f'{msgtype}: serialized message does not decode: {e}') from e
