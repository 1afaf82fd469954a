"""Message <-> numpy conversion with fakes, real rclpy messages and rosbags-deserialised ones."""
from io import BytesIO
from types import SimpleNamespace as NS

from nav_msgs.msg import Odometry
import numpy as np
from PIL import Image
import pytest
from ros_messages import array_to_cloud, array_to_image, cloud_msg_fields, image_msg_fields
from rosbags.typesys import get_typestore, Stores
from sensor_msgs.msg import Imu, PointCloud2

from mm_fusion_ros import messages
from mm_fusion_ros.geometry import make_pose, rpy_to_rot
from mm_fusion_ros.ros import conversions as cv

STORE = get_typestore(Stores.ROS2_HUMBLE)
RNG = np.random.default_rng(0)


def points(n=50):
    return RNG.normal(0, 20, size=(n, 4)).astype(np.float32)


def field(name, offset, datatype, count=1):
    return NS(name=name, offset=offset, datatype=datatype, count=count)


def fake_cloud(fields, step, data, width, height=1, bigendian=False, row_step=None):
    return NS(fields=fields, point_step=step, data=data, width=width, height=height,
              is_bigendian=bigendian, row_step=row_step or width * step)


def rosbags_roundtrip(msg, msgtype):
    """Serialise to CDR and back, as a message read from a bag is."""
    return STORE.deserialize_cdr(STORE.serialize_cdr(msg, msgtype), msgtype)


def rosbags_header(ns=0, frame='f'):
    Time, Header = STORE.types['builtin_interfaces/msg/Time'], STORE.types['std_msgs/msg/Header']
    return Header(stamp=Time(sec=ns // 10**9, nanosec=ns % 10**9), frame_id=frame)


def test_stamps():
    assert cv.stamp_to_ns(NS(sec=12, nanosec=345)) == 12_000_000_345
    assert cv.ns_to_stamp(1_317_384_000_123_456_789) == (1_317_384_000, 123_456_789)
    assert cv.stamp_to_ns(NS(sec=1_317_384_000, nanosec=123_456_789)) == 1_317_384_000_123_456_789


def test_rclpy_cloud_round_trip():
    pts = points(1000)
    msg = array_to_cloud(pts, 5_000_000_001, 'velodyne')
    assert isinstance(msg, PointCloud2)
    assert (msg.header.stamp.sec, msg.header.stamp.nanosec) == (5, 1)
    assert msg.header.frame_id == 'velodyne'
    assert type(msg.data).__name__ == 'array'   # rclpy's uint8[]: array.array('B')
    out = cv.cloud_to_array(msg)
    assert out.dtype == np.float32 and out.flags.c_contiguous
    np.testing.assert_array_equal(out, pts)


def test_raw_subscription_bytes_decode_as_views_with_the_same_decoders():
    """A raw rclpy subscription hands over serialized CDR: decode_cdr reads it without copying
    the payload, and the decoders give what the rclpy message gives."""
    from rclpy.serialization import serialize_message
    pts = points(500)
    raw = serialize_message(array_to_cloud(pts, 5_000_000_001, 'velodyne'))
    msg = cv.decode_cdr(raw, 'sensor_msgs/msg/PointCloud2')
    assert cv.stamp_to_ns(msg.header.stamp) == 5_000_000_001
    assert np.shares_memory(msg.data, np.frombuffer(raw, np.uint8))
    np.testing.assert_array_equal(cv.cloud_to_array(msg), pts)
    im = rgb_image(6, 9)
    raw = serialize_message(array_to_image(im, 7, 'camera2', 'bgr8'))
    np.testing.assert_array_equal(cv.image_to_array(cv.decode_cdr(raw, 'sensor_msgs/msg/Image')),
                                  im)
    with pytest.raises(ValueError, match='PointCloud2: serialized message does not decode'):
        cv.decode_cdr(raw[:40], 'sensor_msgs/msg/PointCloud2')


def test_rosbags_cloud_round_trip():
    pts = points(300)
    attrs = cloud_msg_fields(pts)
    PointField = STORE.types['sensor_msgs/msg/PointField']
    fields = [PointField(name=n, offset=o, datatype=d, count=c) for n, o, d, c in attrs['fields']]
    msg = STORE.types['sensor_msgs/msg/PointCloud2'](
        header=rosbags_header(), height=1, width=attrs['width'], fields=fields,
        is_bigendian=False, point_step=attrs['point_step'], row_step=attrs['row_step'],
        data=np.frombuffer(attrs['data'], dtype=np.uint8), is_dense=True)
    msg = rosbags_roundtrip(msg, 'sensor_msgs/msg/PointCloud2')
    np.testing.assert_array_equal(cv.cloud_to_array(msg), pts)


def test_big_endian_mixed_types_and_padding():
    pts = points(64)
    rec = np.zeros(64, dtype=np.dtype({
        'names': ['x', 'y', 'z', 'intensity', 'ring'],
        'formats': ['>f4', '>f4', '>f4', '>u2', '>u2'],
        'offsets': [0, 4, 8, 16, 20], 'itemsize': 32}))
    for i, n in enumerate('xyz'):
        rec[n] = pts[:, i]
    rec['intensity'] = np.arange(64) * 1000
    rec['ring'] = 7
    msg = fake_cloud([field('x', 0, 7), field('y', 4, 7), field('z', 8, 7),
                      field('intensity', 16, 4), field('ring', 20, 4)], 32, rec.tobytes(), 64,
                     bigendian=True)
    out = cv.cloud_to_array(msg)
    np.testing.assert_array_equal(out[:, :3], pts[:, :3])
    np.testing.assert_array_equal(out[:, 3], np.arange(64) * 1000)
    msg.is_bigendian = False   # read with the wrong byte order: garbage, so the flag matters
    assert not np.array_equal(cv.cloud_to_array(msg)[:, :3], pts[:, :3])


@pytest.mark.parametrize('layout', ['offset_8', 'reordered', 'big_endian', 'gap'])
def test_float32_fields_in_any_layout_give_x_y_z_intensity(layout):
    """KITTI's layout (x, y, z, intensity float32 side by side) is read in one strided copy;
    every other layout by field. Both give the same columns."""
    pts = points(40)
    names, offsets, order = ['x', 'y', 'z', 'intensity'], [8, 12, 16, 20], '<f4'
    if layout == 'reordered':
        offsets = [12, 16, 20, 8]       # intensity first in memory
    elif layout == 'big_endian':
        order = '>f4'
    elif layout == 'gap':
        offsets = [8, 12, 16, 24]       # 4 bytes between z and intensity
    rec = np.zeros(40, dtype=np.dtype({'names': names + ['ring'],
                                       'formats': [order] * 4 + ['<u2'],
                                       'offsets': offsets + [0], 'itemsize': 32}))
    for i, n in enumerate(names):
        rec[n] = pts[:, i]
    fields = [field(n, o, 7) for n, o in zip(names, offsets)] + [field('ring', 0, 4)]
    msg = fake_cloud(fields, 32, rec.tobytes(), 40, bigendian=layout == 'big_endian')
    out = cv.cloud_to_array(msg)
    assert out.dtype == np.float32 and out.flags.c_contiguous and out.flags.writeable
    np.testing.assert_array_equal(out, pts)
    block = messages._float32_block(cv.cloud_to_structured(msg), names)
    assert (block is not None) == (layout == 'offset_8')   # which path read it


def test_intensity_aliases_missing_fields_and_float64():
    pts = points(10).astype(np.float64)
    xyz = [field('x', 0, 8), field('y', 8, 8), field('z', 16, 8)]
    no_i = fake_cloud(xyz, 32, pts.tobytes(), 10)
    out = cv.cloud_to_array(no_i)
    np.testing.assert_array_equal(out[:, :3], pts[:, :3].astype(np.float32))
    assert not out[:, 3].any()
    reflect = fake_cloud(xyz + [field('reflectance', 24, 8)], 32, pts.tobytes(), 10)
    np.testing.assert_array_equal(cv.cloud_to_array(reflect)[:, 3], pts[:, 3].astype(np.float32))
    alias_i = fake_cloud(xyz + [field('i', 24, 8)], 32, pts.tobytes(), 10)
    np.testing.assert_array_equal(cv.cloud_to_array(alias_i)[:, 3], pts[:, 3].astype(np.float32))
    with pytest.raises(ValueError, match=r"no field 'z'.*\['x', 'y'\]"):
        cv.cloud_to_array(fake_cloud(xyz[:2], 32, pts.tobytes(), 10))
    with pytest.raises(ValueError, match='need 320'):
        cv.cloud_to_array(fake_cloud(xyz, 32, pts.tobytes()[:100], 10))
    with pytest.raises(ValueError, match='unknown datatype 9'):
        cv.cloud_to_array(fake_cloud([field('x', 0, 9)], 32, pts.tobytes(), 10))


def test_organised_cloud_with_row_padding():
    pts = points(12).reshape(3, 4, 4)     # height 3, width 4
    row = np.zeros((3, 4 * 16 + 8), dtype=np.uint8)   # 8 padding bytes a row
    row[:, :64] = pts.view(np.uint8).reshape(3, 64)
    msg = fake_cloud([field(n, 4 * i, 7) for i, n in enumerate(('x', 'y', 'z', 'intensity'))],
                     16, row.tobytes(), 4, height=3, row_step=72)
    np.testing.assert_array_equal(cv.cloud_to_array(msg), pts.reshape(12, 4))
    # A list payload (some message implementations) works too.
    msg.data = list(row.tobytes())
    np.testing.assert_array_equal(cv.cloud_to_array(msg), pts.reshape(12, 4))


def rgb_image(h=5, w=7):
    return RNG.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def fake_image(pixels, encoding, step=None, bigendian=False):
    h, w = pixels.shape[:2]
    row = pixels.reshape(h, -1).view(np.uint8)
    step = step or row.shape[1]
    data = np.zeros((h, step), dtype=np.uint8)
    data[:, :row.shape[1]] = row
    return NS(height=h, width=w, encoding=encoding, step=step, is_bigendian=bigendian,
              data=data.tobytes())


@pytest.mark.parametrize('encoding,make', [
    ('rgb8', lambda im: im),
    ('bgr8', lambda im: im[:, :, ::-1]),
    ('8UC3', lambda im: im[:, :, ::-1]),
    ('rgba8', lambda im: np.dstack([im, np.full(im.shape[:2], 9, np.uint8)])),
    ('bgra8', lambda im: np.dstack([im[:, :, ::-1], np.full(im.shape[:2], 9, np.uint8)])),
])
def test_colour_encodings_with_padded_rows(encoding, make):
    im = rgb_image()
    pixels = np.ascontiguousarray(make(im))
    row_bytes = pixels.shape[1] * pixels.shape[2]
    for step in (row_bytes, row_bytes + 5):   # step > width * channels: padded rows
        out = cv.image_to_array(fake_image(pixels, encoding, step))
        assert out.shape == (5, 7, 3) and out.dtype == np.uint8
        np.testing.assert_array_equal(out, im)


def test_mono_encodings():
    grey = RNG.integers(0, 256, size=(4, 6, 1), dtype=np.uint8)
    out = cv.image_to_array(fake_image(grey, 'mono8', step=8))
    np.testing.assert_array_equal(out, np.repeat(grey, 3, axis=2))
    wide = np.array([[0, 257, 65535, 32896]], dtype=np.uint16).reshape(1, 4, 1)
    for bigendian in (False, True):
        pixels = wide.astype('>u2' if bigendian else '<u2')
        out = cv.image_to_array(fake_image(pixels, 'mono16', bigendian=bigendian))
        np.testing.assert_array_equal(out[0, :, 0], [0, 1, 255, 128])


def test_image_errors_name_the_problem():
    with pytest.raises(ValueError, match="'yuv422' not supported"):
        cv.image_to_array(fake_image(rgb_image(), 'yuv422'))
    msg = fake_image(rgb_image(), 'rgb8')
    msg.data = msg.data[:-1]
    with pytest.raises(ValueError, match='needs 105'):
        cv.image_to_array(msg)
    msg = fake_image(rgb_image(), 'rgb8')
    msg.step = 20
    with pytest.raises(ValueError, match='step 20 < 21'):
        cv.image_to_array(msg)


def test_rclpy_and_rosbags_images():
    im = rgb_image(6, 9)
    for encoding in ('rgb8', 'bgr8'):
        msg = array_to_image(im, 7, 'camera2', encoding)
        assert msg.encoding == encoding and msg.header.frame_id == 'camera2'
        np.testing.assert_array_equal(cv.image_to_array(msg), im)
    attrs = image_msg_fields(im, 'bgr8')
    msg = STORE.types['sensor_msgs/msg/Image'](
        header=rosbags_header(), **{**attrs, 'data': np.frombuffer(attrs['data'], np.uint8)})
    np.testing.assert_array_equal(
        cv.image_to_array(rosbags_roundtrip(msg, 'sensor_msgs/msg/Image')), im)


def test_compressed_images():
    im = rgb_image(16, 16)
    buf = BytesIO()
    Image.fromarray(im).save(buf, format='PNG')
    msg = STORE.types['sensor_msgs/msg/CompressedImage'](
        header=rosbags_header(), format='png',
        data=np.frombuffer(buf.getvalue(), dtype=np.uint8))
    msg = rosbags_roundtrip(msg, 'sensor_msgs/msg/CompressedImage')
    np.testing.assert_array_equal(cv.compressed_image_to_array(msg), im)
    smooth = np.tile(np.linspace(0, 255, 32, dtype=np.uint8)[None, :, None], (32, 1, 3))
    buf = BytesIO()
    Image.fromarray(smooth).save(buf, format='JPEG', quality=95)
    out = cv.compressed_image_to_array(NS(format='jpeg', data=buf.getvalue()))
    assert out.shape == (32, 32, 3)
    assert np.abs(out.astype(int) - smooth).mean() < 3
    with pytest.raises(ValueError, match="format 'png'"):
        cv.compressed_image_to_array(NS(format='png', data=b'\x89PNG broken'))


def test_imu_messages():
    msg = Imu()
    msg.linear_acceleration.x, msg.linear_acceleration.y, msg.linear_acceleration.z = 1., 2., 9.8
    msg.angular_velocity.x, msg.angular_velocity.y, msg.angular_velocity.z = .1, .2, .3
    accel, gyro = cv.imu_to_arrays(msg)
    np.testing.assert_array_equal(accel, [1, 2, 9.8])
    np.testing.assert_array_equal(gyro, [.1, .2, .3])
    V3, Q = STORE.types['geometry_msgs/msg/Vector3'], STORE.types['geometry_msgs/msg/Quaternion']
    bag_msg = STORE.types['sensor_msgs/msg/Imu'](
        header=rosbags_header(), orientation=Q(x=0., y=0., z=0., w=1.),
        orientation_covariance=np.zeros(9), angular_velocity=V3(x=.1, y=.2, z=.3),
        angular_velocity_covariance=np.zeros(9), linear_acceleration=V3(x=1., y=2., z=9.8),
        linear_acceleration_covariance=np.zeros(9))
    accel, gyro = cv.imu_to_arrays(rosbags_roundtrip(bag_msg, 'sensor_msgs/msg/Imu'))
    np.testing.assert_array_equal(np.concatenate([accel, gyro]), [1, 2, 9.8, .1, .2, .3])


def test_odometry_pose_round_trip_and_covariance():
    pose = make_pose(rpy_to_rot(0.1, -0.2, 2.5), [10.0, -3.0, 0.5])
    log_var = np.log([0.01, 0.02, 0.03, 0.001, 0.002, 0.003])
    position, quat, cov = cv.pose_to_odometry_fields(pose, log_var)
    msg = Odometry()
    p, q = msg.pose.pose.position, msg.pose.pose.orientation
    p.x, p.y, p.z = position
    q.x, q.y, q.z, q.w = quat
    msg.pose.covariance = cov
    np.testing.assert_allclose(cv.odometry_to_pose(msg), pose, atol=1e-12)
    cov = np.asarray(msg.pose.covariance).reshape(6, 6)
    np.testing.assert_allclose(np.diag(cov), np.exp(log_var))
    assert not (cov - np.diag(np.diag(cov))).any()
    assert cv.pose_to_odometry_fields(pose)[2] == [0.0] * 36
    with pytest.raises(ValueError, match='not a quaternion'):
        cv.odometry_to_pose(NS(pose=NS(pose=NS(position=NS(x=0, y=0, z=0),
                                               orientation=NS(x=0, y=0, z=0, w=0)))))
    with pytest.raises(ValueError, match='6 values'):
        cv.pose_to_odometry_fields(pose, [0.0] * 5)


def test_a_static_transform_that_is_not_a_pose_is_refused_naming_its_frames():
    """/tf_static (and a bag's) entries: a zero quaternion is not read as the identity, nor a
    NaN translation stored (it turned every transformed cloud into dropped points)."""
    def tf(t, q):
        return NS(header=NS(frame_id='base_link'), child_frame_id='velodyne',
                  transform=NS(translation=NS(x=t[0], y=t[1], z=t[2]),
                               rotation=NS(x=q[0], y=q[1], z=q[2], w=q[3])))
    np.testing.assert_allclose(cv.transform_to_matrix(tf([1, 2, 3], [0, 0, 0, 1])),
                               make_pose(np.eye(3), [1, 2, 3]))
    for bad in (tf([0, 0, 0], [0, 0, 0, 0]), tf([np.nan, 0, 0], [0, 0, 0, 1]),
                tf([0, 0, 0], [0, 0, np.inf, 1])):
        with pytest.raises(ValueError, match="'base_link' -> 'velodyne'.*not a pose"):
            cv.transform_to_matrix(bad)
        with pytest.raises(ValueError, match='not a pose'):
            messages.tf_to_dict(NS(transforms=[bad]))


def test_full_size_kitti_cloud_round_trip():
    pts = points(120_000)
    msg = array_to_cloud(pts, 0, 'velodyne')
    np.testing.assert_array_equal(cv.cloud_to_array(msg), pts)
