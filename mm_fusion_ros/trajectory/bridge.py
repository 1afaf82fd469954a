"""Bridging a missing step: the motion between two scans that no sample covers.

A step is missing when a sample does not start where the previous one ended (a scan lost in
transport, cut from the bag, or a sample dropped by the synchronizer's policy). The trajectory
asks a StepBridge for the motion over that interval; anything with this method will do, e.g.
an inertial filter that propagates through the hole:

    bridge(t0_ns, t1_ns, recent: list[StepInfo]) -> BridgedStep or None (cannot bridge)

ConstantVelocityBridge is the one used now: the body twist averaged over the last predicted
steps, with the rotation replaced by the integrated gyro of the IMU that the synchronizer still
holds when it covers the interval. Its covariance is the recent steps' one scaled to the
interval's length and inflated by `variance_scale`: a bridged step is known less well than a
predicted one.
"""
from dataclasses import dataclass

import numpy as np

from mm_fusion_ros.geometry import (
    pose_to_vec6,
    se3_exp,
    se3_log,
    so3_exp,
    so3_log,
    vec6_to_pose,
)
from mm_fusion_ros.stamps import NS_PER_S

# Longest pause between IMU samples that still counts as covering an interval (OXTS: 100 Hz).
MAX_IMU_SPACING_NS = 100_000_000


@dataclass(frozen=True)
class StepInfo:
    """A predicted step of the trajectory, as the bridge sees it."""

    dt: float              # [s]
    mean6: np.ndarray      # DESIGN §5 6-vector
    cov6: np.ndarray       # its 6x6 covariance


@dataclass(frozen=True)
class BridgedStep:
    mean6: np.ndarray
    cov6: np.ndarray
    source: str            # 'imu' (gyro rotation) or 'velocity' (constant twist only)


def integrate_gyro(stamps_ns, gyro, t0_ns: int, t1_ns: int,
                   max_spacing_ns: int = MAX_IMU_SPACING_NS):
    """Rotation R(t0 -> t1) = prod exp(w dt) of gyro samples (rad/s, frame of the IMU), the rates
    linearly interpolated onto the interval's ends; None when the samples do not cover it."""
    stamps = np.asarray(stamps_ns, dtype=np.int64)
    gyro = np.asarray(gyro, dtype=np.float64).reshape(-1, 3)
    if len(stamps) < 2 or stamps[0] > t0_ns + max_spacing_ns or \
            stamps[-1] < t1_ns - max_spacing_ns:
        return None
    inside = stamps[(stamps > t0_ns) & (stamps < t1_ns)]
    grid = np.concatenate([[t0_ns], inside, [t1_ns]])
    if np.max(np.diff(grid)) > max_spacing_ns:
        return None
    seconds = (grid - t0_ns) / NS_PER_S
    ref = (stamps - t0_ns) / NS_PER_S
    rates = np.stack([np.interp(seconds, ref, gyro[:, i]) for i in range(3)], axis=1)
    rot = np.eye(3)
    for k in range(len(grid) - 1):
        rot = rot @ so3_exp(0.5 * (rates[k] + rates[k + 1]) * (seconds[k + 1] - seconds[k]))
    return rot


class ConstantVelocityBridge:
    """Constant body twist of the last `history` steps; gyro rotation where the IMU covers it.

    imu(t0_ns, t1_ns) -> (stamps_ns, gyro) or None: the IMU samples held for that interval (the
    synchronizer's Synchronizer.imu_between). rot_base_imu: R_base_imu (or a function returning
    it or None, asked at each bridge: /tf_static may come late), so gyro rates (in imu_link)
    are turned into base_link; None takes the frames as aligned.
    """

    def __init__(self, history: int = 3, variance_scale: float = 4.0, imu=None,
                 rot_base_imu=None):
        if history < 1 or not variance_scale > 0:
            raise ValueError(f'ConstantVelocityBridge needs history >= 1 and variance_scale > 0, '
                             f'got {history}, {variance_scale}')
        self.history = history
        self.variance_scale = variance_scale
        self.imu = imu
        self.rot_base_imu = rot_base_imu

    def bridge(self, t0_ns: int, t1_ns: int, recent) -> BridgedStep:
        use = list(recent)[-self.history:]
        if not use or t1_ns <= t0_ns:
            return None
        gap_s = (t1_ns - t0_ns) / NS_PER_S
        twist = np.mean([se3_log(vec6_to_pose(s.mean6)) / s.dt for s in use], axis=0)
        phi, source = twist[3:] * gap_s, 'velocity'
        held = self.imu(t0_ns, t1_ns) if self.imu is not None else None
        rot = integrate_gyro(*held, t0_ns, t1_ns) if held is not None else None
        if rot is not None:
            r_bi = self.rot_base_imu() if callable(self.rot_base_imu) else self.rot_base_imu
            if r_bi is not None:
                r_bi = np.asarray(r_bi, dtype=np.float64)
                rot = r_bi @ rot @ r_bi.T
            phi, source = so3_log(rot), 'imu'
        mean6 = pose_to_vec6(se3_exp(np.concatenate([twist[:3] * gap_s, phi])))
        scale = (gap_s / np.mean([s.dt for s in use])) ** 2 * self.variance_scale
        cov6 = np.mean([s.cov6 for s in use], axis=0) * scale
        return BridgedStep(mean6=mean6, cov6=cov6, source=source)
