"""OXTS (GPS/IMU) synthesis: the 30 KITTI raw fields at 100 Hz from a Trajectory.

The OXTS unit (imu_link) rides on base_link at the calib_imu_to_velo offset, so its specific
force includes the lever-arm terms of the vehicle's rotation. Accelerations and rates get white
noise plus a slowly wandering bias (random walk); the navigation solution (lat/lon/alt,
roll/pitch/yaw, velocities) is written exact, as OXTS's filtered solution nearly is.
"""
from dataclasses import dataclass

import numpy as np

from mm_fusion_ros.geometry import rot_to_rpy, rpy_to_rot
from mm_fusion_ros.kitti.raw import OXTS_INDEX, OXTS_NAMES

GRAVITY = 9.81                       # m/s^2 near Karlsruhe (9.809)
IMU_RATE = 100.0                     # Hz
GEO_ORIGIN = (49.0110, 8.4160, 112.0)  # lat [deg], lon [deg], alt [m] of the world origin
EPOCH_NS = 1_317_384_000 * 10**9     # 2011-09-30 12:00:00 UTC
_WGS84_A, _WGS84_E2 = 6378137.0, 6.69437999014e-3

# KITTI raw 2011_10_03 calib_imu_to_velo.txt (imu_link -> velodyne), rotation re-orthonormalised.
KITTI_R_VELO_IMU = np.array([[9.999976e-01, 7.553071e-04, -2.035826e-03],
                             [-7.854027e-04, 9.998898e-01, -1.482298e-02],
                             [2.024406e-03, 1.482454e-02, 9.998881e-01]])
KITTI_T_VELO_IMU = np.array([-8.086759e-01, 3.195559e-01, -7.997231e-01])

# Constant status fields: an RTK-grade solution with a good satellite count.
_STATUS = {'pos_accuracy': 0.05, 'vel_accuracy': 0.02, 'navstat': 4, 'numsats': 9,
           'posmode': 5, 'velmode': 5, 'orimode': 6}


@dataclass(frozen=True)
class ImuNoise:
    """White noise (per 100 Hz sample) and bias model of the synthetic OXTS unit."""

    accel_sigma: float = 0.05        # m/s^2
    gyro_sigma: float = 0.002        # rad/s
    accel_bias: float = 0.03         # m/s^2, sigma of the initial bias
    gyro_bias: float = 3e-4          # rad/s
    accel_walk: float = 2e-3         # m/s^2 / sqrt(s), bias random walk
    gyro_walk: float = 2e-5          # rad/s / sqrt(s)


def orthonormalize(rot) -> np.ndarray:
    u, _, vt = np.linalg.svd(np.asarray(rot, dtype=np.float64))
    return u @ np.diag([1.0, 1.0, np.linalg.det(u @ vt)]) @ vt


def kitti_T_velo_imu() -> np.ndarray:
    out = np.eye(4)
    out[:3, :3] = orthonormalize(KITTI_R_VELO_IMU)
    out[:3, 3] = KITTI_T_VELO_IMU
    return out


def sequence_epoch_ns(sequence) -> int:
    """Absolute time of times.txt's zero: a fixed epoch plus one hour per sequence id."""
    return EPOCH_NS + int(sequence) * 3600 * 10**9


def imu_sample_times(t_end: float, rate=IMU_RATE) -> np.ndarray:
    """0, 1/rate, ... up to the first sample at or after t_end (the clock rule's coverage)."""
    count = int(np.ceil(t_end * rate - 1e-9)) + 1
    return np.arange(count) / rate


def imu_kinematics(traj, times, T_base_imu):
    """(R_world_imu, p, v, specific force, angular rate) of imu_link, noise-free."""
    kin = traj.kinematics(times)
    rot_bi, lever = T_base_imu[:3, :3], T_base_imu[:3, 3]
    w, alpha = kin.omega, kin.alpha
    w_x_r = np.cross(w, lever)
    lever_acc = np.cross(alpha, lever) + np.cross(w, w_x_r)
    pos = kin.pos + kin.rot @ lever
    vel = kin.vel + np.einsum('nij,nj->ni', kin.rot, w_x_r)
    acc = kin.acc + np.einsum('nij,nj->ni', kin.rot, lever_acc)
    rot = kin.rot @ rot_bi
    force = np.einsum('nji,nj->ni', rot, acc + np.array([0.0, 0.0, GRAVITY]))
    rate = w @ rot_bi  # R_bi^T w, row-wise
    return rot, pos, vel, force, rate


def add_sensor_noise(values, rng, sigma, bias0, walk, dt):
    """White noise plus a bias that starts random and wanders as a random walk."""
    if not (sigma or bias0 or walk):
        return values.copy()
    bias = rng.normal(0.0, bias0, size=3) + np.cumsum(
        rng.normal(0.0, walk * np.sqrt(dt), size=values.shape), axis=0)
    return values + bias + rng.normal(0.0, sigma, size=values.shape)


def local_to_geodetic(pos, origin=GEO_ORIGIN):
    """World (x east, y north, z up) -> lat, lon [deg], alt [m] on the tangent plane at origin."""
    lat0, lon0, alt0 = origin
    phi = np.radians(lat0)
    den = 1.0 - _WGS84_E2 * np.sin(phi) ** 2
    r_north = _WGS84_A * (1.0 - _WGS84_E2) / den ** 1.5
    r_east = _WGS84_A / np.sqrt(den) * np.cos(phi)
    return (lat0 + np.degrees(pos[:, 1] / r_north), lon0 + np.degrees(pos[:, 0] / r_east),
            alt0 + pos[:, 2])


def synthesize_oxts(traj, times, T_base_imu, rng, noise: ImuNoise = ImuNoise()) -> np.ndarray:
    """(M, 30) OXTS fields at `times` (seconds on the sequence clock)."""
    times = np.asarray(times, dtype=np.float64)
    dt = float(np.median(np.diff(times))) if len(times) > 1 else 1.0 / IMU_RATE
    rot, pos, vel, force, rate = imu_kinematics(traj, times, T_base_imu)
    accel = add_sensor_noise(force, rng, noise.accel_sigma, noise.accel_bias, noise.accel_walk,
                             dt)
    gyro = add_sensor_noise(rate, rng, noise.gyro_sigma, noise.gyro_bias, noise.gyro_walk, dt)
    return _oxts_fields(rot, pos, vel, accel, gyro)


def measured_oxts(traj, times, T_base_imu, accel, gyro) -> np.ndarray:
    """(M, 30) OXTS fields with measured accel/gyro (a real IMU, imu_link axes) at `times`.

    Only the navigation solution (lat/lon/alt, roll/pitch/yaw, velocities) comes from the
    trajectory; ax..az and wx..wz are the given values unchanged, and af..au, wf..wu are those
    values rotated into the heading-aligned level frame of the trajectory's attitude.
    """
    times = np.asarray(times, dtype=np.float64)
    accel = np.asarray(accel, dtype=np.float64)
    gyro = np.asarray(gyro, dtype=np.float64)
    if accel.shape != (len(times), 3) or gyro.shape != (len(times), 3):
        raise ValueError(f'accel and gyro must be ({len(times)}, 3) like the {len(times)} times; '
                         f'got {accel.shape} and {gyro.shape}')
    rot, pos, vel, _, _ = imu_kinematics(traj, times, T_base_imu)
    return _oxts_fields(rot, pos, vel, accel, gyro)


def _oxts_fields(rot, pos, vel, accel, gyro) -> np.ndarray:
    """The 30 OXTS columns from imu_link's attitude, position, velocity and its measurements."""
    roll, pitch, yaw = rot_to_rpy(rot)
    level = rpy_to_rot(roll, pitch, np.zeros_like(yaw))  # body -> heading-aligned level frame
    heading = rpy_to_rot(np.zeros_like(yaw), np.zeros_like(yaw), yaw)
    lat, lon, alt = local_to_geodetic(pos)

    out = np.zeros((len(pos), len(OXTS_NAMES)))
    out[:, _cols('lat', 'lon', 'alt')] = np.stack([lat, lon, alt], axis=1)
    out[:, _cols('roll', 'pitch', 'yaw')] = np.stack([roll, pitch, yaw], axis=1)
    out[:, _cols('vn', 've')] = vel[:, [1, 0]]
    out[:, _cols('vf', 'vl', 'vu')] = np.einsum('nji,nj->ni', heading, vel)
    out[:, _cols('ax', 'ay', 'az')] = accel
    out[:, _cols('af', 'al', 'au')] = np.einsum('nij,nj->ni', level, accel)
    out[:, _cols('wx', 'wy', 'wz')] = gyro
    out[:, _cols('wf', 'wl', 'wu')] = np.einsum('nij,nj->ni', level, gyro)
    for name, value in _STATUS.items():
        out[:, OXTS_INDEX[name]] = value
    return out


def _cols(*names):
    return [OXTS_INDEX[n] for n in names]
