"""Topic names, message types and frame ids of the DESIGN §4 topic contract, written once.

kitti_to_bag writes these; the bag player, the synchronizer node and the tests read them.
"""

IMAGE_TOPIC = '/kitti/camera/image_raw'
COMPRESSED_IMAGE_TOPIC = '/kitti/camera/image_raw/compressed'
CAMERA_INFO_TOPIC = '/kitti/camera/camera_info'
CLOUD_TOPIC = '/kitti/velodyne/points'
IMU_TOPIC = '/kitti/imu/data'
GT_ODOM_TOPIC = '/kitti/ground_truth/odom'
TF_STATIC_TOPIC = '/tf_static'

IMAGE_TYPE = 'sensor_msgs/msg/Image'
COMPRESSED_IMAGE_TYPE = 'sensor_msgs/msg/CompressedImage'
CAMERA_INFO_TYPE = 'sensor_msgs/msg/CameraInfo'
CLOUD_TYPE = 'sensor_msgs/msg/PointCloud2'
IMU_TYPE = 'sensor_msgs/msg/Imu'
ODOMETRY_TYPE = 'nav_msgs/msg/Odometry'
TF_TYPE = 'tf2_msgs/msg/TFMessage'

# REP 105 / DESIGN §3 frames.
ODOM_FRAME = 'odom'
BASE_FRAME = 'base_link'
VELODYNE_FRAME = 'velodyne'
IMU_FRAME = 'imu_link'
CAMERA_FRAME = 'camera2'

# Queue depths of replayed topics (bag metadata, bag player, replay subscribers): ~10 s of data,
# so a busy consumer does not drop samples (STYLE §4: replay feeds training); the drops measured
# at smaller depths are in docs/measured_figures.md.
SENSOR_QUEUE_DEPTH = 100     # 10 Hz images, clouds, camera_info, ground truth
IMU_QUEUE_DEPTH = 1000       # 100 Hz IMU
