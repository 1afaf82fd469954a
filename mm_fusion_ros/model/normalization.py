"""Training-set statistics for the network's input/target normalisation (numpy only).

Computed once from the training sequences' raw data (not from samples, so it is cheap and does
not depend on the batch order) and stored in the model's buffers, hence in every checkpoint.
"""
import logging

import numpy as np

from mm_fusion_ros.geometry import pose_to_vec6, relative_pose

log = logging.getLogger(__name__)

# Floors keep a constant channel (e.g. z motion on flat synthetic ground) from blowing up.
IMU_STD_FLOOR = 1e-3
TARGET_STD_FLOOR = np.array([1e-3] * 3 + [1e-4] * 3)
# Target scale when no ground truth may be read (self-supervised training): zero mean, and the
# spread of a car's 0.1 s step (up to ~2 m forward, centimetres sideways and up, a few
# hundredths of a radian of yaw). It only sets the units the network's outputs are in.
TARGET_PRIOR_MEAN = np.zeros(6)
TARGET_PRIOR_STD = np.array([1.0, 0.05, 0.03, 0.003, 0.005, 0.02])


def imu_statistics(imus) -> tuple:
    """Per-channel mean/std of (accel xyz, gyro xyz) over ImuData objects (None entries skipped).

    Returns (mean (6,), std (6,)); identity statistics (0, 1) when no IMU data exists.
    """
    rows = [np.concatenate([np.asarray(d.accel), np.asarray(d.gyro)], axis=1)
            for d in imus if d is not None and len(d) > 0]
    if not rows:
        log.warning('no IMU data in the training set: IMU normalisation left at mean 0, std 1')
        return np.zeros(6), np.ones(6)
    data = np.concatenate(rows).astype(np.float64)
    if not np.isfinite(data).all():
        raise ValueError('IMU data of the training set contains non-finite values')
    return data.mean(axis=0), np.maximum(data.std(axis=0), IMU_STD_FLOOR)


def target_statistics(pose_arrays) -> tuple:
    """Per-dim mean/std of the relative-pose 6-vectors (k-1 -> k) over (N, 4, 4) pose arrays."""
    steps = [pose_to_vec6(relative_pose(p[:-1], p[1:])) for p in pose_arrays if len(p) > 1]
    if not steps:
        raise ValueError('no consecutive poses in the training set to compute target statistics')
    data = np.concatenate(steps)
    return data.mean(axis=0), np.maximum(data.std(axis=0), TARGET_STD_FLOOR)


def sequence_statistics(sequences, use_poses: bool = True) -> dict:
    """{imu_mean, imu_std, target_mean, target_std} (plain lists) over KittiSequence objects.

    use_poses=False (self-supervised training, or sequences without poses/) takes the target
    statistics from TARGET_PRIOR_* instead of the ground truth.
    """
    imu_mean, imu_std = imu_statistics(s.imu for s in sequences)
    if use_poses:
        target_mean, target_std = target_statistics(s.poses_base for s in sequences)
    else:
        target_mean, target_std = TARGET_PRIOR_MEAN, TARGET_PRIOR_STD
    return {'imu_mean': imu_mean.tolist(), 'imu_std': imu_std.tolist(),
            'target_mean': target_mean.tolist(), 'target_std': target_std.tolist()}
