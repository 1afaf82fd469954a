"""Topic names, message types, frame ids and node names of the DESIGN §4 topic contract,
written once.

kitti_to_bag writes these; the bag player, the nodes, mm_fusion_run (ros/runner.py), the launch
files and the tests read them.
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
CLOCK_TYPE = 'rosgraph_msgs/msg/Clock'

# What online_finetune subscribes to by default, and what a replay for it plays.
SYNC_TOPICS = (IMAGE_TOPIC, CLOUD_TOPIC, IMU_TOPIC, GT_ODOM_TOPIC)
REPLAY_TOPICS = SYNC_TOPICS + (TF_STATIC_TOPIC, CAMERA_INFO_TOPIC)

# What the online node publishes and offers.
ODOM_OUT_TOPIC = '/mm_fusion/odom'
PATH_TOPIC = '/mm_fusion/path'
GT_PATH_TOPIC = '/mm_fusion/gt_path'
TRAINER_NODE = 'mm_fusion_trainer'
SYNCHRONIZER_NODE = 'mm_fusion_synchronizer'
SAVE_SERVICE = f'/{TRAINER_NODE}/save_checkpoint'
SET_TRAINING_SERVICE = f'/{TRAINER_NODE}/set_training'
# Printed on stdout (and logged) once the online node is built and spinning: launch files start
# the player on it.
READY_LINE = 'mm_fusion_ros online: ready'

TOPIC_TYPES = {
    IMAGE_TOPIC: IMAGE_TYPE,
    COMPRESSED_IMAGE_TOPIC: COMPRESSED_IMAGE_TYPE,
    CAMERA_INFO_TOPIC: CAMERA_INFO_TYPE,
    CLOUD_TOPIC: CLOUD_TYPE,
    IMU_TOPIC: IMU_TYPE,
    GT_ODOM_TOPIC: ODOMETRY_TYPE,
    TF_STATIC_TOPIC: TF_TYPE,
}

# REP 105 / DESIGN §3 frames.
ODOM_FRAME = 'odom'
BASE_FRAME = 'base_link'
VELODYNE_FRAME = 'velodyne'
IMU_FRAME = 'imu_link'
CAMERA_FRAME = 'camera2'
PRED_FRAME = 'base_link_pred'

# Queue depths of replayed topics (bag metadata, bag player, replay subscribers): ~10 s of data,
# so a busy consumer does not drop samples (STYLE §4: replay feeds training); the drops measured
# at smaller depths are in docs/measured_figures.md.
SENSOR_QUEUE_DEPTH = 100     # 10 Hz images, clouds, camera_info, ground truth
IMU_QUEUE_DEPTH = 1000       # 100 Hz IMU
