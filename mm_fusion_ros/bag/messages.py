"""numpy -> rosbags messages for kitti_to_bag (numpy + rosbags only).

`MessageFactory` builds typestore messages from numpy arrays; the decoders, which read rosbags
and rclpy messages alike, are in mm_fusion_ros/messages.py.

Covariances are diagonal 1-sigma figures squared, never all-zero (REP 145: zeros would claim a
perfectly known value):
- IMU orientation: OXTS RT3003 datasheet, roll/pitch 0.03 deg, heading 0.1 deg;
- IMU rates and accelerations: vibration level of KITTI's car-mounted OXTS, ~0.01 rad/s and
  ~0.1 m/s^2 (the sensor's white noise is far below that);
- ground-truth pose: KITTI's GPS/IMU ground truth is accurate to ~10 cm and ~0.1 deg;
- ground-truth twist (finite differences of 10 Hz poses): ~0.1 m/s and ~0.01 rad/s.
"""
import numpy as np

from mm_fusion_ros.geometry import rot_to_quat
from mm_fusion_ros.messages import ns_to_stamp, POINT_FIELD_DTYPES

IMU_ORIENTATION_VAR = np.array([np.deg2rad(0.03), np.deg2rad(0.03), np.deg2rad(0.1)]) ** 2
IMU_GYRO_VAR = np.full(3, 0.01 ** 2)
IMU_ACCEL_VAR = np.full(3, 0.1 ** 2)
GT_POSE_VAR = np.concatenate([np.full(3, 0.1 ** 2), np.full(3, np.deg2rad(0.1) ** 2)])
GT_TWIST_VAR = np.concatenate([np.full(3, 0.1 ** 2), np.full(3, 0.01 ** 2)])

# numpy type codes (without byte order) -> sensor_msgs/PointField datatypes.
POINTFIELD_CODES = {np.dtype(code).str[1:]: dt for dt, code in POINT_FIELD_DTYPES.items()}

XYZI_FIELDS = (('x', 'f4'), ('y', 'f4'), ('z', 'f4'), ('intensity', 'f4'))


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
        sec, nanosec = ns_to_stamp(stamp_ns)
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
