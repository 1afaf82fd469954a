"""Message <-> numpy conversion for rosbags message objects (numpy + rosbags only).

`MessageFactory` builds typestore messages from numpy arrays for kitti_to_bag. The decoders
(`cloud_to_array`, `image_to_array`, ...) only read attributes, so they accept rosbags and
rclpy messages alike (STYLE §7: dtype from the PointField offsets, byte swap on an endianness
mismatch, an explicit image encoding table that honours `step`).

Covariances are diagonal 1-sigma figures squared, never all-zero (REP 145: zeros would claim a
perfectly known value):
- IMU orientation: OXTS RT3003 datasheet, roll/pitch 0.03 deg, heading 0.1 deg;
- IMU rates and accelerations: vibration level of KITTI's car-mounted OXTS, ~0.01 rad/s and
  ~0.1 m/s^2 (the sensor's white noise is far below that);
- ground-truth pose: KITTI's GPS/IMU ground truth is accurate to ~10 cm and ~0.1 deg;
- ground-truth twist (finite differences of 10 Hz poses): ~0.1 m/s and ~0.01 rad/s.
"""
import io

import numpy as np

from mm_fusion_ros.geometry import make_pose, quat_to_rot, rot_to_quat

NS_PER_S = 1_000_000_000

IMU_ORIENTATION_VAR = np.array([np.deg2rad(0.03), np.deg2rad(0.03), np.deg2rad(0.1)]) ** 2
IMU_GYRO_VAR = np.full(3, 0.01 ** 2)
IMU_ACCEL_VAR = np.full(3, 0.1 ** 2)
GT_POSE_VAR = np.concatenate([np.full(3, 0.1 ** 2), np.full(3, np.deg2rad(0.1) ** 2)])
GT_TWIST_VAR = np.concatenate([np.full(3, 0.1 ** 2), np.full(3, 0.01 ** 2)])

# sensor_msgs/PointField datatypes -> numpy type codes (without byte order).
POINTFIELD_DTYPES = {1: 'i1', 2: 'u1', 3: 'i2', 4: 'u2', 5: 'i4', 6: 'u4', 7: 'f4', 8: 'f8'}
POINTFIELD_CODES = {np.dtype(code).str[1:]: dt for dt, code in POINTFIELD_DTYPES.items()}

# Image encodings -> (numpy dtype, channels); `step` may pad rows beyond width * pixel size.
IMAGE_ENCODINGS = {
    'rgb8': ('u1', 3), 'bgr8': ('u1', 3), 'rgba8': ('u1', 4), 'bgra8': ('u1', 4),
    'mono8': ('u1', 1), 'mono16': ('u2', 1), '8UC1': ('u1', 1), '8UC3': ('u1', 3),
    '16UC1': ('u2', 1), '32FC1': ('f4', 1),
}

XYZI_FIELDS = (('x', 'f4'), ('y', 'f4'), ('z', 'f4'), ('intensity', 'f4'))


def split_stamp(stamp_ns: int):
    """Integer nanoseconds -> (sec, nanosec) with 0 <= nanosec < 1e9."""
    return divmod(int(stamp_ns), NS_PER_S)


def stamp_to_ns(stamp) -> int:
    """builtin_interfaces/Time (rosbags or rclpy) -> integer nanoseconds."""
    return int(stamp.sec) * NS_PER_S + int(stamp.nanosec)


def diag(values, size: int) -> np.ndarray:
    """Row-major (size x size) covariance with `values` on the diagonal, as a flat float64."""
    out = np.zeros((size, size))
    out[np.diag_indices(size)] = values
    return out.ravel()


class MessageFactory:
    """Builds rosbags message objects of one typestore (one ROS 2 distro's definitions)."""

    def __init__(self, typestore):
        self.store = typestore
        self._t = typestore.types

    def serialize(self, msg, msgtype: str):
        return self.store.serialize_cdr(msg, msgtype)

    def header(self, stamp_ns: int, frame_id: str):
        sec, nanosec = split_stamp(stamp_ns)
        return self._t['std_msgs/msg/Header'](
            stamp=self._t['builtin_interfaces/msg/Time'](sec=sec, nanosec=nanosec),
            frame_id=frame_id)

    def vector3(self, xyz):
        x, y, z = (float(v) for v in xyz)
        return self._t['geometry_msgs/msg/Vector3'](x=x, y=y, z=z)

    def quaternion(self, xyzw):
        x, y, z, w = (float(v) for v in xyzw)
        return self._t['geometry_msgs/msg/Quaternion'](x=x, y=y, z=z, w=w)

    def image(self, stamp_ns: int, frame_id: str, rgb: np.ndarray):
        """(H, W, 3) uint8 -> sensor_msgs/Image rgb8, rows unpadded."""
        rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
        if rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ValueError(f'image must be (H, W, 3) uint8, got {rgb.shape}')
        height, width = rgb.shape[:2]
        return self._t['sensor_msgs/msg/Image'](
            header=self.header(stamp_ns, frame_id), height=height, width=width, encoding='rgb8',
            is_bigendian=0, step=3 * width, data=rgb.reshape(-1))

    def compressed_image(self, stamp_ns: int, frame_id: str, png_bytes: bytes):
        return self._t['sensor_msgs/msg/CompressedImage'](
            header=self.header(stamp_ns, frame_id), format='png',
            data=np.frombuffer(png_bytes, dtype=np.uint8))

    def camera_info(self, stamp_ns: int, frame_id: str, P: np.ndarray, width: int, height: int):
        """Rectified KITTI camera: K from P's left 3x3, P as given (with the baseline term)."""
        P = np.asarray(P, dtype=np.float64).reshape(3, 4)
        roi = self._t['sensor_msgs/msg/RegionOfInterest'](
            x_offset=0, y_offset=0, height=0, width=0, do_rectify=False)
        return self._t['sensor_msgs/msg/CameraInfo'](
            header=self.header(stamp_ns, frame_id), height=int(height), width=int(width),
            distortion_model='plumb_bob', d=np.zeros(5), k=P[:, :3].ravel().copy(),
            r=np.eye(3).ravel(), p=P.ravel().copy(), binning_x=0, binning_y=0, roi=roi)

    def point_cloud(self, stamp_ns: int, frame_id: str, points: np.ndarray, extra=()):
        """(N, 4) float32 x, y, z, intensity (+ extra (name, array) columns) -> PointCloud2.

        One unorganised row (height 1), little endian, fields packed in the given order.
        """
        points = np.asarray(points)
        if points.ndim != 2 or points.shape[1] != 4:
            raise ValueError(f'points must be (N, 4), got {points.shape}')
        columns = [(name, points[:, i]) for i, (name, _) in enumerate(XYZI_FIELDS)]
        names = [name for name, _ in XYZI_FIELDS]
        formats = ['<f4'] * 4
        for name, values in extra:
            values = np.asarray(values)
            names.append(name)
            formats.append(values.dtype.newbyteorder('<').str)
            columns.append((name, values))
        packed = np.empty(len(points), dtype=np.dtype({'names': names, 'formats': formats}))
        if not extra:
            # Same memory layout: one copy of the float32 rows, bit-exact.
            packed = np.ascontiguousarray(points, dtype='<f4').view(packed.dtype).reshape(-1)
        else:
            for name, values in columns:
                packed[name] = values
        dtype = packed.dtype
        fields = [self._t['sensor_msgs/msg/PointField'](
            name=name, offset=dtype.fields[name][1],
            datatype=POINTFIELD_CODES[dtype.fields[name][0].str[1:]], count=1)
            for name in dtype.names]
        finite = bool(np.isfinite(points).all())
        return self._t['sensor_msgs/msg/PointCloud2'](
            header=self.header(stamp_ns, frame_id), height=1, width=len(packed), fields=fields,
            is_bigendian=False, point_step=dtype.itemsize, row_step=dtype.itemsize * len(packed),
            data=packed.view(np.uint8).reshape(-1), is_dense=finite)

    def imu(self, stamp_ns: int, frame_id: str, accel, gyro, quat=None):
        """sensor_msgs/Imu; quat (x, y, z, w) None means no orientation (REP 145: cov[0] = -1)."""
        if quat is None:
            orientation, orientation_cov = (0.0, 0.0, 0.0, 1.0), np.zeros(9)
            orientation_cov[0] = -1.0
        else:
            orientation, orientation_cov = quat, diag(IMU_ORIENTATION_VAR, 3)
        return self._t['sensor_msgs/msg/Imu'](
            header=self.header(stamp_ns, frame_id), orientation=self.quaternion(orientation),
            orientation_covariance=orientation_cov, angular_velocity=self.vector3(gyro),
            angular_velocity_covariance=diag(IMU_GYRO_VAR, 3),
            linear_acceleration=self.vector3(accel),
            linear_acceleration_covariance=diag(IMU_ACCEL_VAR, 3))

    def pose(self, T: np.ndarray):
        T = np.asarray(T, dtype=np.float64)
        return self._t['geometry_msgs/msg/Pose'](
            position=self._t['geometry_msgs/msg/Point'](
                x=float(T[0, 3]), y=float(T[1, 3]), z=float(T[2, 3])),
            orientation=self.quaternion(rot_to_quat(T[:3, :3])))

    def odometry(self, stamp_ns: int, frame_id: str, child_frame_id: str, T: np.ndarray,
                 twist6: np.ndarray):
        """nav_msgs/Odometry: pose T (4x4) in frame_id, twist (v, w) in child_frame_id."""
        twist6 = np.asarray(twist6, dtype=np.float64)
        twist = self._t['geometry_msgs/msg/Twist'](
            linear=self.vector3(twist6[:3]), angular=self.vector3(twist6[3:]))
        return self._t['nav_msgs/msg/Odometry'](
            header=self.header(stamp_ns, frame_id), child_frame_id=child_frame_id,
            pose=self._t['geometry_msgs/msg/PoseWithCovariance'](
                pose=self.pose(T), covariance=diag(GT_POSE_VAR, 6)),
            twist=self._t['geometry_msgs/msg/TwistWithCovariance'](
                twist=twist, covariance=diag(GT_TWIST_VAR, 6)))

    def tf_message(self, stamp_ns: int, transforms):
        """transforms: iterable of (parent, child, T_parent_child 4x4) -> tf2_msgs/TFMessage."""
        items = []
        for parent, child, T in transforms:
            T = np.asarray(T, dtype=np.float64)
            items.append(self._t['geometry_msgs/msg/TransformStamped'](
                header=self.header(stamp_ns, parent), child_frame_id=child,
                transform=self._t['geometry_msgs/msg/Transform'](
                    translation=self.vector3(T[:3, 3]),
                    rotation=self.quaternion(rot_to_quat(T[:3, :3])))))
        return self._t['tf2_msgs/msg/TFMessage'](transforms=items)


def cloud_dtype(msg) -> np.dtype:
    """Structured dtype of a PointCloud2's points, from its fields, offsets and point_step."""
    order = '>' if msg.is_bigendian else '<'
    names, offsets, formats = [], [], []
    for field in msg.fields:
        if field.datatype not in POINTFIELD_DTYPES:
            raise ValueError(f'PointField {field.name!r}: unknown datatype {field.datatype}')
        code = order + POINTFIELD_DTYPES[field.datatype]
        names.append(field.name)
        offsets.append(field.offset)
        formats.append(code if field.count == 1 else (code, (field.count,)))
    return np.dtype({'names': names, 'offsets': offsets, 'formats': formats,
                     'itemsize': msg.point_step})


def cloud_to_structured(msg) -> np.ndarray:
    """PointCloud2 -> structured array of width * height points (rows may be padded)."""
    dtype = cloud_dtype(msg)
    height, width, row_step = int(msg.height), int(msg.width), int(msg.row_step)
    if row_step < width * dtype.itemsize or len(msg.data) < row_step * height:
        raise ValueError(f'PointCloud2 {width}x{height}: row_step {row_step} and '
                         f'{len(msg.data)} data bytes are too small for point_step '
                         f'{dtype.itemsize}')
    rows = np.frombuffer(msg.data, dtype=np.uint8, count=row_step * height)
    rows = rows.reshape(height, row_step)[:, :width * dtype.itemsize]
    return np.ascontiguousarray(rows).view(dtype).reshape(-1)


def cloud_to_array(msg, names=('x', 'y', 'z', 'intensity')) -> np.ndarray:
    """PointCloud2 -> (N, len(names)) float32."""
    points = cloud_to_structured(msg)
    missing = [n for n in names if n not in points.dtype.names]
    if missing:
        raise ValueError(f'PointCloud2 has no field(s) {missing}; fields: {points.dtype.names}')
    out = np.empty((len(points), len(names)), dtype=np.float32)
    for i, name in enumerate(names):
        out[:, i] = points[name]
    return out


def image_to_array(msg) -> np.ndarray:
    """sensor_msgs/Image -> (H, W, C) array in the message's channel order ((H, W) for mono).

    Use `image_to_rgb` for an RGB uint8 image whatever the encoding.
    """
    if msg.encoding not in IMAGE_ENCODINGS:
        raise ValueError(f'Image encoding {msg.encoding!r} not supported; '
                         f'known: {sorted(IMAGE_ENCODINGS)}')
    code, channels = IMAGE_ENCODINGS[msg.encoding]
    dtype = np.dtype(('>' if msg.is_bigendian else '<') + code)
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    row_bytes = width * channels * dtype.itemsize
    if step < row_bytes or len(msg.data) < step * height:
        raise ValueError(f'Image {width}x{height} {msg.encoding}: step {step} and '
                         f'{len(msg.data)} data bytes are too small')
    raw = np.frombuffer(msg.data, dtype=np.uint8, count=step * height).reshape(height, step)
    pixels = np.ascontiguousarray(raw[:, :row_bytes]).view(dtype)
    shape = (height, width) if channels == 1 else (height, width, channels)
    return pixels.reshape(shape).astype(dtype.newbyteorder('='), copy=False)


def image_to_rgb(msg) -> np.ndarray:
    """sensor_msgs/Image (8-bit encodings) -> (H, W, 3) uint8 RGB."""
    pixels = image_to_array(msg)
    if pixels.dtype != np.uint8:
        raise ValueError(f'Image encoding {msg.encoding!r} is not 8-bit')
    if pixels.ndim == 2:
        return np.repeat(pixels[:, :, None], 3, axis=2)
    if msg.encoding.startswith('bgr'):
        pixels = pixels[:, :, 2::-1]
    return np.ascontiguousarray(pixels[:, :, :3])


def compressed_image_to_rgb(msg) -> np.ndarray:
    """sensor_msgs/CompressedImage (png, jpeg) -> (H, W, 3) uint8 RGB."""
    from PIL import Image  # only needed for compressed images
    try:
        with Image.open(io.BytesIO(bytes(msg.data))) as im:
            return np.asarray(im.convert('RGB'))
    except OSError as e:
        raise ValueError(f'CompressedImage ({msg.format!r}) does not decode: {e}') from e


def imu_to_arrays(msg):
    """sensor_msgs/Imu -> (stamp_ns, accel (3,), gyro (3,), quat (4,) or None)."""
    acc, gyr, q = msg.linear_acceleration, msg.angular_velocity, msg.orientation
    quat = None if msg.orientation_covariance[0] == -1 else np.array([q.x, q.y, q.z, q.w])
    return (stamp_to_ns(msg.header.stamp), np.array([acc.x, acc.y, acc.z]),
            np.array([gyr.x, gyr.y, gyr.z]), quat)


def pose_to_matrix(position, orientation) -> np.ndarray:
    """geometry_msgs Point/Vector3 + Quaternion -> 4x4."""
    q = [orientation.x, orientation.y, orientation.z, orientation.w]
    return make_pose(quat_to_rot(q), [position.x, position.y, position.z])


def odometry_to_arrays(msg):
    """nav_msgs/Odometry -> (stamp_ns, T (4, 4), twist (6,) = v, w in child_frame_id)."""
    pose, twist = msg.pose.pose, msg.twist.twist
    return (stamp_to_ns(msg.header.stamp), pose_to_matrix(pose.position, pose.orientation),
            np.array([twist.linear.x, twist.linear.y, twist.linear.z,
                      twist.angular.x, twist.angular.y, twist.angular.z]))


def tf_to_dict(msg) -> dict:
    """tf2_msgs/TFMessage -> {(parent, child): T_parent_child 4x4}."""
    return {(t.header.frame_id, t.child_frame_id):
            pose_to_matrix(t.transform.translation, t.transform.rotation)
            for t in msg.transforms}
