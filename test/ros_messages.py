"""rclpy sensor messages built from arrays, for the tests that publish or decode them (the
package itself only reads these messages: mm_fusion_ros/messages.py)."""
import numpy as np
from sensor_msgs.msg import Image as ImageMsg
from sensor_msgs.msg import PointCloud2, PointField

from mm_fusion_ros.messages import FLOAT32, ns_to_stamp


def cloud_msg_fields(points, names=('x', 'y', 'z', 'intensity')) -> dict:
    """(N, C) array -> the PointCloud2 attributes (unorganised, float32, little-endian).

    'fields' is a list of (name, offset, datatype, count) tuples.
    """
    points = np.ascontiguousarray(points, dtype='<f4')
    if points.ndim != 2 or points.shape[1] != len(names):
        raise ValueError(f'points must be (N, {len(names)}) for fields {names}, got '
                         f'{points.shape}')
    step = 4 * len(names)
    return {'height': 1, 'width': len(points), 'is_bigendian': False, 'point_step': step,
            'row_step': step * len(points), 'is_dense': bool(np.isfinite(points).all()),
            'fields': [(n, 4 * i, FLOAT32, 1) for i, n in enumerate(names)],
            'data': points.tobytes()}


def array_to_cloud(points, stamp_ns: int, frame_id: str,
                   names=('x', 'y', 'z', 'intensity')):
    """(N, C) array -> sensor_msgs/msg/PointCloud2 (rclpy message)."""
    attrs = cloud_msg_fields(points, names)
    msg = PointCloud2()
    msg.header.stamp.sec, msg.header.stamp.nanosec = ns_to_stamp(stamp_ns)
    msg.header.frame_id = frame_id
    msg.fields = [PointField(name=n, offset=o, datatype=d, count=c)
                  for n, o, d, c in attrs.pop('fields')]
    for key, value in attrs.items():
        setattr(msg, key, value)
    return msg


def image_msg_fields(image, encoding='rgb8') -> dict:
    """(H, W, 3) uint8 RGB -> the sensor_msgs/Image attributes (rgb8 or bgr8, no padding)."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f'image must be (H, W, 3) uint8, got {image.shape} {image.dtype}')
    if encoding not in ('rgb8', 'bgr8'):
        raise ValueError(f'encoding must be rgb8 or bgr8, got {encoding!r}')
    pixels = image if encoding == 'rgb8' else image[:, :, ::-1]
    return {'height': image.shape[0], 'width': image.shape[1], 'encoding': encoding,
            'is_bigendian': False, 'step': 3 * image.shape[1],
            'data': np.ascontiguousarray(pixels).tobytes()}


def array_to_image(image, stamp_ns: int, frame_id: str, encoding='rgb8'):
    """(H, W, 3) uint8 RGB -> sensor_msgs/msg/Image (rclpy message)."""
    msg = ImageMsg()
    msg.header.stamp.sec, msg.header.stamp.nanosec = ns_to_stamp(stamp_ns)
    msg.header.frame_id = frame_id
    for key, value in image_msg_fields(image, encoding).items():
        setattr(msg, key, value)
    return msg
