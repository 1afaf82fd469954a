"""Reference trajectories a learned model has to beat (numpy only; kiss_icp when installed).

Each baseline returns (N, 4, 4) poses in the frame of the ground truth it is given (cam0 poses in,
cam0 poses out; T_odom_base in, T_odom_base out), starting at the first GT pose.
"""
import importlib.util
import logging

import numpy as np

from mm_fusion_ros.geometry import (
    chain_relative,
    invert_pose,
    pose_to_vec6,
    relative_pose,
    rot_to_rpy,
    so3_exp,
    vec6_to_pose,
)

log = logging.getLogger(__name__)

GRAVITY = 9.81   # [m/s^2], along -z of odom
# IMU must cover the frame times to within this [s]; the .mat IMU starts exactly at frame 0.
IMU_COVERAGE_TOL = 0.02


def _check_poses(poses, name='poses'):
    poses = np.asarray(poses, dtype=np.float64)
    if poses.ndim != 3 or poses.shape[1:] != (4, 4) or len(poses) < 2:
        raise ValueError(f'{name} must be (N, 4, 4) with N >= 2, got {poses.shape}')
    return poses


def _nearest_rotation(rot):
    u, _, vt = np.linalg.svd(rot)
    return u @ vt


def relative_steps(poses) -> np.ndarray:
    """(N-1, 4, 4) frame-to-frame motions T_k^-1 T_k+1, rotations projected onto SO(3).

    KITTI GT rotations are orthonormal only to ~2e-7; chaining thousands of raw steps would
    compound that to ~1e-3 (seen on sequence 00), so each step is made a proper rotation.
    """
    poses = _check_poses(poses)
    steps = relative_pose(poses[:-1], poses[1:])
    steps[:, :3, :3] = _nearest_rotation(steps[:, :3, :3])
    return steps


def mean_step(pose_arrays) -> np.ndarray:
    """Average relative step (vec6: translation, so(3) log) over every step of every trajectory."""
    steps = [pose_to_vec6(relative_steps(p)) for p in pose_arrays]
    if not steps:
        raise ValueError('mean_step needs at least one training trajectory')
    return np.concatenate(steps).mean(axis=0)


def mean_motion(gt_poses, step) -> np.ndarray:
    """Every step is the training set's mean step (a 4x4 pose or a vec6)."""
    gt = _check_poses(gt_poses, 'gt_poses')
    step = np.asarray(step, dtype=np.float64)
    if step.shape == (6,):
        step = vec6_to_pose(step)
    if step.shape != (4, 4):
        raise ValueError(f'step must be a 4x4 pose or a 6-vector, got {step.shape}')
    return chain_relative(np.broadcast_to(step, (len(gt) - 1, 4, 4)), first=gt[0])


def cv_oracle(gt_poses) -> np.ndarray:
    """Constant velocity with an oracle: step k repeats GT step k-1 (step 0 is GT step 0)."""
    gt = _check_poses(gt_poses, 'gt_poses')
    steps = relative_steps(gt)
    return chain_relative(np.concatenate([steps[:1], steps[:-1]]), first=gt[0])


def _imu_timeline(times, imu):
    """Frame times merged with the IMU stamps inside them, and each frame's index in it."""
    times = np.asarray(times, dtype=np.float64)
    stamps = np.asarray(imu.stamps, dtype=np.float64)
    if times.ndim != 1 or len(times) < 2 or np.any(np.diff(times) <= 0):
        raise ValueError('times must be (N,) strictly increasing with N >= 2')
    if len(stamps) < 2 or stamps[0] > times[0] + IMU_COVERAGE_TOL \
            or stamps[-1] < times[-1] - IMU_COVERAGE_TOL:
        span = f'{stamps[0]:.3f}..{stamps[-1]:.3f}' if len(stamps) else 'empty'
        raise ValueError(f'IMU {imu.source or "(unnamed)"} covers {span} s but the frames span '
                         f'{times[0]:.3f}..{times[-1]:.3f} s')
    inside = stamps[(stamps > times[0]) & (stamps < times[-1])]
    timeline = np.unique(np.concatenate([times, inside]))
    return timeline, np.searchsorted(timeline, times)


def _interp_rows(query, stamps, values):
    return np.stack([np.interp(query, stamps, values[:, c]) for c in range(values.shape[1])],
                    axis=1)


def _integrate_gyro(rot0, timeline, gyro):
    """R(t) from R(t0) = rot0 with the mean rate of each interval (second order)."""
    dt = np.diff(timeline)
    increments = so3_exp(0.5 * (gyro[:-1] + gyro[1:]) * dt[:, None])
    rots = np.empty((len(timeline), 3, 3))
    rots[0] = rot0
    for i, inc in enumerate(increments):
        rots[i + 1] = rots[i] @ inc
    return rots


def _imu_poses(gt_poses_base, T_base_imu):
    T_base_imu = np.asarray(T_base_imu, dtype=np.float64)
    if T_base_imu.shape != (4, 4):
        raise ValueError(f'T_base_imu must be 4x4, got {T_base_imu.shape}')
    return _check_poses(gt_poses_base, 'gt_poses_base') @ T_base_imu, T_base_imu


def imu_dead_reckoning(gt_poses_base, times, imu, T_base_imu) -> np.ndarray:
    """Strapdown integration of the IMU from the first GT pose: (N, 4, 4) T_odom_base.

    Attitude from the gyro (starting at the GT attitude); acceleration = R f + g, g = 9.81 m/s^2
    along -z of odom; positions integrated exactly for piecewise-linear acceleration. The initial
    velocity is fixed so that the position at frame 1 equals GT: positions are linear in v0, so it
    is the finite difference of the first two GT frames minus the IMU's own displacement there.
    """
    T_odom_imu_gt, T_base_imu = _imu_poses(gt_poses_base, T_base_imu)
    if len(times) != len(T_odom_imu_gt):
        raise ValueError(f'{len(times)} times for {len(T_odom_imu_gt)} poses')
    timeline, frame_idx = _imu_timeline(times, imu)
    accel = _interp_rows(timeline, imu.stamps, np.asarray(imu.accel, dtype=np.float64))
    gyro = _interp_rows(timeline, imu.stamps, np.asarray(imu.gyro, dtype=np.float64))
    rots = _integrate_gyro(T_odom_imu_gt[0, :3, :3], timeline, gyro)

    acc_world = np.einsum('nij,nj->ni', rots, accel) + np.array([0.0, 0.0, -GRAVITY])
    dt = np.diff(timeline)[:, None]
    vel = np.concatenate([np.zeros((1, 3)),
                          np.cumsum(0.5 * (acc_world[:-1] + acc_world[1:]) * dt, axis=0)])
    disp = vel[:-1] * dt + dt * dt * (acc_world[:-1] / 3.0 + acc_world[1:] / 6.0)
    pos_zero_v = np.concatenate([np.zeros((1, 3)), np.cumsum(disp, axis=0)])

    p0 = T_odom_imu_gt[0, :3, 3]
    t_rel = timeline - timeline[0]
    k1 = frame_idx[1]
    v0 = (T_odom_imu_gt[1, :3, 3] - p0 - pos_zero_v[k1]) / t_rel[k1]
    pos = p0 + pos_zero_v + v0 * t_rel[:, None]

    out = np.zeros((len(frame_idx), 4, 4))
    out[:, :3, :3] = rots[frame_idx]
    out[:, :3, 3] = pos[frame_idx]
    out[:, 3, 3] = 1.0
    return out @ invert_pose(T_base_imu)


def gyro_heading_error(gt_poses_base, times, imu, T_base_imu) -> np.ndarray:
    """(N,) yaw [deg] of the gyro-integrated base_link attitude minus GT yaw, wrapped to ±180."""
    T_odom_imu_gt, T_base_imu = _imu_poses(gt_poses_base, T_base_imu)
    if len(times) != len(T_odom_imu_gt):
        raise ValueError(f'{len(times)} times for {len(T_odom_imu_gt)} poses')
    timeline, frame_idx = _imu_timeline(times, imu)
    gyro = _interp_rows(timeline, imu.stamps, np.asarray(imu.gyro, dtype=np.float64))
    rots = _integrate_gyro(T_odom_imu_gt[0, :3, :3], timeline, gyro)[frame_idx]
    rot_base = rots @ T_base_imu[:3, :3].T
    yaw_pred = rot_to_rpy(rot_base)[2]
    yaw_gt = rot_to_rpy(np.asarray(gt_poses_base)[:, :3, :3])[2]
    return np.rad2deg(np.angle(np.exp(1j * (yaw_pred - yaw_gt))))


def kiss_icp_available() -> bool:
    return importlib.util.find_spec('kiss_icp') is not None


def kiss_icp_odometry(scans, max_range=100.0, min_range=0.0, deskew=False) -> np.ndarray:
    """KISS-ICP LiDAR odometry over an iterable of (M, >=3) scans: (N, 4, 4) scan poses.

    Poses are of the scan frame (base_link = velodyne) relative to the first scan. Needs the
    `kiss_icp` package (pip install kiss-icp); it is not a dependency of this project.
    """
    if not kiss_icp_available():
        raise ModuleNotFoundError('the kiss_icp baseline needs the kiss-icp package, which is not '
                                  'installed (pip install kiss-icp)')
    from kiss_icp.config import KISSConfig
    from kiss_icp.kiss_icp import KissICP

    config = KISSConfig()
    config.data.deskew = deskew
    config.data.max_range = max_range
    config.data.min_range = min_range
    config.mapping.voxel_size = max_range / 100.0  # kiss-icp's own default rule
    odometry = KissICP(config=config)
    poses = []
    for scan in scans:
        points = np.asarray(scan, dtype=np.float64)[:, :3]
        odometry.register_frame(points, np.zeros(0))   # no per-point stamps: deskew off
        poses.append(np.array(odometry.last_pose, dtype=np.float64))
    if not poses:
        raise ValueError('kiss_icp_odometry got no scans')
    return np.stack(poses)
