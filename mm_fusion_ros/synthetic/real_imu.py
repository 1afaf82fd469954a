"""The real IMU of a hybrid sequence: a frame-aligned 100 Hz KITTI IMU (.mat) on its own path.

A hybrid sequence renders synthetic images and scans along a real KITTI trajectory and carries
the IMU recorded on that drive (kitti_sample/PROVENANCE.md, imu/NN.mat), so a model trains on
real IMU noise and bias. The .mat has 10 samples per frame interval, sample 10*k at frame k of
the trajectory's times (../sequences/NN/times.txt beside the pose file, else 10 Hz), so it lives
on exactly the clock of the rendered frames; a sequence cut to F frames keeps the first
10*(F-1)+1 samples. The .mat names no sequence and 01, 06 and 07 all have 1101 frames, so the
yaw rate it measured is checked against the trajectory's: another drive's IMU is refused.
"""
from pathlib import Path

import numpy as np

from mm_fusion_ros.geometry import so3_exp, so3_log
from mm_fusion_ros.kitti.imu import MAT_SAMPLES_PER_FRAME, read_mat_imu
from mm_fusion_ros.kitti.odometry import read_poses
from mm_fusion_ros.kitti.sample import ImuData
from mm_fusion_ros.synthetic.trajectory import kitti_trajectory_clock

# Between a drive's own IMU and the other drives' on kitti_sample 00-08 (docs/measured_figures.md).
MAX_YAW_RATE_RMS = 0.06  # rad/s


def load_real_imu(mat_path, poses_path, frames: int) -> ImuData:
    """The first 10*(frames-1)+1 samples of a .mat IMU, stamped on the trajectory's clock
    (seconds from its frame 0). A .mat whose length does not fit the pose file's times is a
    ValueError naming both files."""
    mat_path, poses_path = Path(mat_path), Path(poses_path)
    times, clock = kitti_trajectory_clock(poses_path, len(read_poses(poses_path)))
    if not 2 <= frames <= len(times):
        raise ValueError(f'frames={frames}: the trajectory {poses_path} has {len(times)} frames '
                         f'(clock: {clock}); need 2 <= frames <= {len(times)}')
    try:
        imu = read_mat_imu(mat_path, times - times[0])
    except ValueError as e:
        raise ValueError(f'IMU {mat_path} does not fit the trajectory {poses_path} '
                         f'(clock: {clock}): {e}') from e
    keep = slice(0, MAT_SAMPLES_PER_FRAME * (frames - 1) + 1)
    return ImuData(stamps=imu.stamps[keep], accel=imu.accel[keep], gyro=imu.gyro[keep],
                   source=str(mat_path))


def yaw_rate_mismatch(imu: ImuData, times, poses_base, R_base_imu) -> float:
    """RMS [rad/s] over the frame intervals of the ground truth's yaw rate (about base_link z)
    minus the gyro's, integrated over the 10 samples of each interval."""
    times = np.asarray(times, dtype=np.float64)
    n, per = len(times) - 1, MAT_SAMPLES_PER_FRAME
    if len(imu) != per * n + 1:
        raise ValueError(f'{imu.source}: {len(imu)} IMU samples for {len(times)} frames '
                         f'(expected {per * n + 1})')
    gyro_base = imu.gyro @ np.asarray(R_base_imu).T  # so3_exp(R w) = R so3_exp(w) R^T
    rate = 0.5 * (gyro_base[1:] + gyro_base[:-1])
    dt = np.diff(imu.stamps)[:, None]
    step = np.broadcast_to(np.eye(3), (n, 3, 3))
    for j in range(per):  # sub-step j of every frame interval at once
        step = step @ so3_exp(rate[j::per] * dt[j::per])
    rel_truth = np.swapaxes(poses_base[:-1, :3, :3], -1, -2) @ poses_base[1:, :3, :3]
    error = (so3_log(rel_truth)[:, 2] - so3_log(step)[:, 2]) / np.diff(times)
    return float(np.sqrt(np.mean(error ** 2)))


def check_imu_follows_trajectory(imu: ImuData, times, poses_base, R_base_imu,
                                 trajectory) -> float:
    """yaw_rate_mismatch, or a ValueError naming both files when it exceeds MAX_YAW_RATE_RMS."""
    rms = yaw_rate_mismatch(imu, times, poses_base, R_base_imu)
    if rms > MAX_YAW_RATE_RMS:
        raise ValueError(f'IMU {imu.source} does not follow the trajectory {trajectory}: its yaw '
                         f"rate differs from the poses' by {rms:.3f} rad/s RMS over "
                         f'{len(times)} frames (a drive and its own IMU: < {MAX_YAW_RATE_RMS} '
                         f'rad/s). A real IMU only makes sense along its own real path; is it '
                         f'the IMU of another sequence?')
    return rms
