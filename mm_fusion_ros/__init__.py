"""mm_fusion_ros: online training of a camera + LiDAR + IMU odometry model on KITTI."""
__version__ = '0.1.0'
