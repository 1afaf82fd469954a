"""Frame checks of clouds and IMU samples (sync/frames.py), without ROS."""
import numpy as np
import pytest

from mm_fusion_ros.geometry import make_pose, rot_to_quat, rpy_to_rot
from mm_fusion_ros.sync.frames import FrameConfig, FrameError, FrameGuard, StaticTransforms

T_VELO_IMU = make_pose(rpy_to_rot(0.01, -0.02, 0.5), [-0.81, 0.32, -0.8])


def as_line(parent, child, pose):
    return ' '.join([parent, child, *(f'{v:.17g}' for v in pose[:3, 3]),
                     *(f'{v:.17g}' for v in rot_to_quat(pose[:3, :3]))])


def test_static_transforms_chain_both_ways():
    tfs = StaticTransforms.parse([as_line('base_link', 'velodyne', np.eye(4)),
                                  as_line('velodyne', 'imu_link', T_VELO_IMU)])
    np.testing.assert_allclose(tfs.lookup('base_link', 'imu_link'), T_VELO_IMU, atol=1e-12)
    np.testing.assert_allclose(tfs.lookup('imu_link', 'base_link') @ T_VELO_IMU, np.eye(4),
                               atol=1e-12)
    assert tfs.lookup('base_link', 'camera2') is None
    with pytest.raises(ValueError, match="'base_link velodyne 0 0'"):
        FrameConfig(static_transforms=('base_link velodyne 0 0',))


def test_clouds_and_imu_in_other_frames_are_transformed_or_refused():
    cfg = FrameConfig(static_transforms=(as_line('velodyne', 'lidar_top', T_VELO_IMU),
                                         as_line('velodyne', 'imu_link', T_VELO_IMU)))
    guard = FrameGuard(cfg)
    points = np.random.default_rng(0).normal(size=(50, 4)).astype(np.float32)
    assert guard.cloud(points, 'velodyne') is points and guard.cloud(points, '') is points
    moved = guard.cloud(points, 'lidar_top')
    np.testing.assert_allclose(moved[:, :3], points[:, :3] @ T_VELO_IMU[:3, :3].T +
                               T_VELO_IMU[:3, 3], atol=1e-5)
    np.testing.assert_array_equal(moved[:, 3], points[:, 3])
    with pytest.raises(FrameError, match="cloud in frame 'os_sensor', expected 'velodyne'"):
        guard.cloud(points, 'os_sensor')
    # an IMU in base_link (= velodyne here) is rotated into imu_link
    accel, gyro = guard.imu([0.0, 0.0, 9.81], [0.0, 0.0, 0.3], 'velodyne')
    np.testing.assert_allclose(gyro, T_VELO_IMU[:3, :3].T @ [0.0, 0.0, 0.3])
    with pytest.raises(FrameError, match="IMU sample in frame 'gps'"):
        guard.imu([0.0, 0.0, 9.81], [0.0, 0.0, 0.3], 'gps')
    assert guard.rot_base_imu() is None      # base_link is not connected to velodyne here
    guard.add_static('base_link', 'velodyne', np.eye(4))
    np.testing.assert_allclose(guard.rot_base_imu(), T_VELO_IMU[:3, :3], atol=1e-12)
