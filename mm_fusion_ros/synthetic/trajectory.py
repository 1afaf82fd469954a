"""Vehicle trajectories of the synthetic world: smooth synthetic drives or a real KITTI route.

A Trajectory is the continuous-time pose of the vehicle reference frame in the world frame (x
east, y north, z up): a C2 cubic spline through knot positions and scipy's RotationSpline through
knot rotations. The reference sits where the KITTI car's Velodyne does, VELODYNE_HEIGHT above the
road, so it is base_link itself for the default LiDAR mount (domain.py moves the LiDAR). Frame
poses and the IMU both sample the same spline, so the IMU is consistent with the ground truth by
construction. A Route is the ground line under the vehicle (0.5 m samples, with
straight run-outs before the start and after the end) along which the world is built.
"""
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.interpolate import CubicSpline
from scipy.spatial.transform import Rotation, RotationSpline

from mm_fusion_ros.geometry import cam0_to_base_link, invert_pose, make_pose, rpy_to_rot
from mm_fusion_ros.kitti.odometry import read_poses, read_times

VELODYNE_HEIGHT = 1.73      # m above the road, as on the KITTI car
FRAME_RATE = 10.0           # Hz, times.txt
ROUTE_SPACING = 0.5         # m between Route samples
RUN_OUT = 160.0             # m of straight road before the start and after the end


@dataclass(frozen=True)
class Kinematics:
    """Trajectory state at M times; rates and accelerations for the IMU."""

    rot: np.ndarray     # (M, 3, 3) world <- body
    pos: np.ndarray     # (M, 3) world
    vel: np.ndarray     # (M, 3) world
    acc: np.ndarray     # (M, 3) world
    omega: np.ndarray   # (M, 3) angular rate, body axes
    alpha: np.ndarray   # (M, 3) angular acceleration, body axes


class Trajectory:
    """Continuous-time T_world_base through knot poses (times strictly increasing)."""

    def __init__(self, times, poses):
        times = np.asarray(times, dtype=np.float64)
        poses = np.asarray(poses, dtype=np.float64)
        if times.ndim != 1 or len(times) < 2 or poses.shape != (len(times), 4, 4):
            raise ValueError(f'Trajectory needs >= 2 knot times and (N, 4, 4) poses; got '
                             f'{times.shape} and {poses.shape}')
        if np.any(np.diff(times) <= 0):
            raise ValueError('Trajectory knot times must be strictly increasing')
        self.times = times
        self._pos = CubicSpline(times, poses[:, :3, 3], axis=0)
        self._rot = RotationSpline(times, Rotation.from_matrix(poses[:, :3, :3]))

    @property
    def t_start(self) -> float:
        return float(self.times[0])

    @property
    def t_end(self) -> float:
        return float(self.times[-1])

    def poses(self, t) -> np.ndarray:
        t = np.atleast_1d(np.asarray(t, dtype=np.float64))
        return make_pose(self._rot(t).as_matrix(), self._pos(t))

    def kinematics(self, t, step=1e-3) -> Kinematics:
        t = np.atleast_1d(np.asarray(t, dtype=np.float64))
        omega = self._rot(t, 1)  # RotationSpline's rate is in body axes
        # Angular acceleration only feeds the small lever-arm term: a central difference is ample.
        alpha = (self._rot(t + step, 1) - self._rot(t - step, 1)) / (2.0 * step)
        return Kinematics(rot=self._rot(t).as_matrix(), pos=self._pos(t), vel=self._pos(t, 1),
                          acc=self._pos(t, 2), omega=np.atleast_2d(omega),
                          alpha=np.atleast_2d(alpha))


@dataclass(frozen=True)
class Route:
    """Ground line of the drive: where the road is. Arrays are (n,) or (n, 2)."""

    xy: np.ndarray        # ground point, world
    z: np.ndarray         # road height
    tangent: np.ndarray   # unit heading in the xy plane
    s: np.ndarray         # arc length [m], 0 at the vehicle's start

    @property
    def normal(self) -> np.ndarray:
        """Unit left normal in the xy plane."""
        return np.stack([-self.tangent[:, 1], self.tangent[:, 0]], axis=1)


@dataclass(frozen=True)
class DriveConfig:
    """Shape of a synthetic drive: urban speeds, smooth curves, gentle grades, some stops."""

    min_speed: float = 5.0          # m/s
    max_speed: float = 15.0         # m/s
    max_accel: float = 1.5          # m/s^2, peak of a speed change
    segment_s: tuple = (6.0, 14.0)  # s, duration of one speed segment
    stop_probability: float = 0.12  # chance that a segment (not the first) is a stop
    stop_s: tuple = (2.0, 5.0)      # s, time standing still
    min_radius: float = 45.0        # m, tightest curve
    max_grade: float = 0.05         # rise over run


def frame_times(rng, frames: int, rate=FRAME_RATE, jitter=0.0015) -> np.ndarray:
    """Frame stamps [s]: t_0 = 0, then rate Hz with uniform jitter of +-jitter seconds."""
    times = np.arange(frames, dtype=np.float64) / rate
    times[1:] += rng.uniform(-jitter, jitter, size=max(frames - 1, 0))
    return times


def _cosine_ramp(u):
    """0 -> 1 with zero slope at both ends (u in [0, 1])."""
    return 0.5 - 0.5 * np.cos(np.pi * np.clip(u, 0.0, 1.0))


def speed_profile(rng, duration: float, cfg: DriveConfig, dt=0.01):
    """(times, speed) on a dt grid: piecewise-constant targets joined by cosine ramps."""
    t = np.arange(0.0, duration + dt, dt)
    v = np.empty_like(t)
    current = rng.uniform(cfg.min_speed + 1.0, 0.8 * cfg.max_speed)
    start, first = 0.0, True
    v[:] = current
    while start < t[-1]:
        stop = not first and rng.random() < cfg.stop_probability
        target = 0.0 if stop else rng.uniform(cfg.min_speed, cfg.max_speed)
        ramp = max(1.0, np.pi * abs(target - current) / (2.0 * cfg.max_accel))
        hold = rng.uniform(*cfg.stop_s) if stop else rng.uniform(*cfg.segment_s)
        after = t >= start
        v[after] = current + (target - current) * _cosine_ramp((t[after] - start) / ramp)
        current, start, first = target, start + ramp + hold, False
    return t, v


def _curvature_profile(rng, length: float, cfg: DriveConfig, ds: float):
    """Curvature along s: straights, and curves of 15-90 deg entered and left over 20 m ramps.

    The heading stays within +-75 deg of the initial direction, so the road always progresses
    (it never crosses itself) and a long drive stays a compact strip for the ground map.
    """
    s = np.arange(0.0, length + ds, ds)
    kappa = np.zeros_like(s)
    limit, ramp = np.radians(75.0), 20.0
    heading, cursor = 0.0, 0.0
    while cursor < s[-1]:
        cursor += rng.uniform(20.0, 150.0)  # straight
        turn = rng.choice([-1.0, 1.0]) * rng.uniform(np.radians(15.0), np.radians(90.0))
        if abs(heading + turn) > limit:
            turn = -turn
        turn = float(np.clip(turn, -limit - heading, limit - heading))
        if abs(turn) < np.radians(5.0):
            continue
        radius = rng.uniform(cfg.min_radius, 250.0)
        arc = max(0.0, abs(turn) * radius - ramp)
        k = np.sign(turn) / radius
        turn = k * (arc + ramp)  # what the ramps and arc really turn
        u_in = (s - cursor) / ramp
        u_out = (s - cursor - ramp - arc) / ramp
        kappa += k * (_cosine_ramp(u_in) - _cosine_ramp(u_out))
        heading += turn
        cursor += 2.0 * ramp + arc
    return s, kappa


def _grade_profile(rng, s, cfg: DriveConfig):
    """Road height z(s): a sum of three gentle hills, max grade <= cfg.max_grade."""
    z = np.zeros_like(s)
    for _ in range(3):
        wavelength = rng.uniform(150.0, 600.0)
        amp = rng.uniform(0.2, 1.0) * cfg.max_grade / 3.0 * wavelength / (2.0 * np.pi)
        z += amp * np.sin(2.0 * np.pi * s / wavelength + rng.uniform(0.0, 2.0 * np.pi))
    return z


def synthesize_drive(rng, duration: float, cfg: DriveConfig = DriveConfig()):
    """A synthetic drive of `duration` seconds -> (Trajectory in the world, Route)."""
    t, v = speed_profile(rng, duration + 2.0, cfg)
    dist = np.concatenate([[0.0], np.cumsum(0.5 * (v[1:] + v[:-1]) * np.diff(t))])
    ds = 0.1
    length = dist[-1] + 2.0 * RUN_OUT
    s_geo, kappa = _curvature_profile(rng, length, cfg, ds)
    s_geo = s_geo - RUN_OUT  # the vehicle starts RUN_OUT metres into the road
    heading0 = rng.uniform(-np.pi, np.pi)
    psi = heading0 + np.concatenate([[0.0], np.cumsum(0.5 * (kappa[1:] + kappa[:-1]) * ds)])
    xy = np.zeros((len(s_geo), 2))
    xy[1:, 0] = np.cumsum(0.5 * (np.cos(psi[1:]) + np.cos(psi[:-1])) * ds)
    xy[1:, 1] = np.cumsum(0.5 * (np.sin(psi[1:]) + np.sin(psi[:-1])) * ds)
    xy -= np.array([np.interp(0.0, s_geo, xy[:, 0]), np.interp(0.0, s_geo, xy[:, 1])])
    z = _grade_profile(rng, s_geo, cfg)
    z -= np.interp(0.0, s_geo, z)
    grade = np.gradient(z, ds)

    # 50 Hz knots of the vehicle state, then the spline (the ground truth) through them.
    knots = slice(None, None, 2)
    sk = dist[knots]
    yaw = np.interp(sk, s_geo, psi)
    pitch = -np.arctan(np.interp(sk, s_geo, grade))  # uphill = nose up = negative OXTS pitch
    rot = rpy_to_rot(np.zeros_like(yaw), pitch, yaw)
    ground = np.stack([np.interp(sk, s_geo, xy[:, 0]), np.interp(sk, s_geo, xy[:, 1]),
                       np.interp(sk, s_geo, z)], axis=1)
    pos = ground + VELODYNE_HEIGHT * rot[:, :, 2]
    traj = Trajectory(t[knots], make_pose(rot, pos))

    step = int(round(ROUTE_SPACING / ds))
    route = Route(xy=xy[::step].copy(), z=z[::step].copy(),
                  tangent=np.stack([np.cos(psi[::step]), np.sin(psi[::step])], axis=1),
                  s=s_geo[::step].copy())
    return traj, route


def route_from_poses(poses_world) -> Route:
    """The ground line under a sequence of base_link poses, resampled every 0.5 m and extended
    by straight run-outs, so a real (not flat) KITTI route gets a road under it."""
    poses_world = np.asarray(poses_world, dtype=np.float64)
    ground = poses_world[:, :3, 3] - VELODYNE_HEIGHT * poses_world[:, :3, 2]
    keep = np.concatenate([[True], np.linalg.norm(np.diff(ground[:, :2], axis=0), axis=1) > 0.05])
    ground = ground[keep]
    if len(ground) < 2:  # a vehicle that never moves: its heading tells where the road goes
        fwd = poses_world[0, :2, 0] / max(np.linalg.norm(poses_world[0, :2, 0]), 1e-9)
        ground = np.stack([ground[0], ground[0] + np.append(fwd, 0.0)])
    seg = np.linalg.norm(np.diff(ground[:, :2], axis=0), axis=1)
    s_knots = np.concatenate([[0.0], np.cumsum(seg)])
    s_in = np.arange(0.0, s_knots[-1] + 1e-9, ROUTE_SPACING)
    xy = np.stack([np.interp(s_in, s_knots, ground[:, i]) for i in range(2)], axis=1)
    z = np.interp(s_in, s_knots, ground[:, 2])
    tangent = _unit_tangents(xy) if len(xy) > 1 else np.array([ground[1, :2] - ground[0, :2]])
    tangent /= np.linalg.norm(tangent, axis=1, keepdims=True)
    run = np.arange(1, int(RUN_OUT / ROUTE_SPACING) + 1) * ROUTE_SPACING
    before = xy[0] - run[::-1, None] * tangent[0]
    after = xy[-1] + run[:, None] * tangent[-1]
    return Route(
        xy=np.concatenate([before, xy, after]),
        z=np.concatenate([np.full(len(run), z[0]), z, np.full(len(run), z[-1])]),
        tangent=np.concatenate([np.repeat(tangent[:1], len(run), 0), tangent,
                                np.repeat(tangent[-1:], len(run), 0)]),
        s=np.concatenate([-run[::-1], s_in, s_in[-1] + run]))


def _unit_tangents(xy):
    tangent = np.gradient(xy, axis=0)
    # Smooth over ~5 m so GPS wiggle in real poses does not wobble the road direction.
    kernel = np.ones(11) / 11.0
    pad = np.pad(tangent, ((5, 5), (0, 0)), mode='edge')
    return np.stack([np.convolve(pad[:, i], kernel, mode='valid') for i in range(2)], axis=1)


def kitti_times_path(poses_path) -> Path:
    """DATA/poses/NN.txt -> DATA/sequences/NN/times.txt, where KITTI keeps a pose file's times."""
    poses_path = Path(poses_path)
    return poses_path.parent.parent / 'sequences' / poses_path.stem / 'times.txt'


def load_kitti_trajectory(poses_path, frames: int, tr_velo_to_cam0):
    """First `frames` poses of a KITTI pose file as T_odom_base, and their times.

    Times come from ../sequences/<stem>/times.txt beside the poses folder when it exists,
    else 10 Hz. Returns (times (frames,), poses_base (frames, 4, 4), times_source).
    """
    poses_path = Path(poses_path)
    poses_cam0 = read_poses(poses_path)
    if len(poses_cam0) < max(frames, 2):
        raise ValueError(f'{poses_path}: {len(poses_cam0)} poses, but --frames {frames} '
                         f'(and at least 2) are needed')
    poses_base = cam0_to_base_link(poses_cam0[:frames], tr_velo_to_cam0)
    # Odom is the first base_link pose; KITTI files already start at the identity.
    poses_base = invert_pose(poses_base[0]) @ poses_base
    times, source = kitti_trajectory_clock(poses_path, len(poses_cam0))
    if len(times) < frames:
        raise ValueError(f'{source}: {len(times)} times, but --frames {frames}')
    return times[:frames] - times[0], poses_base, source


def kitti_trajectory_clock(poses_path, pose_count: int):
    """(times of a pose file's poses, where they came from): ../sequences/NN/times.txt beside
    the poses folder when it exists, else FRAME_RATE Hz for its pose_count poses."""
    times_path = kitti_times_path(poses_path)
    if times_path.is_file():
        return read_times(times_path), str(times_path)
    return np.arange(pose_count) / FRAME_RATE, f'{FRAME_RATE:g} Hz (no {times_path})'


def extend_for_imu(times, poses, margin=0.2):
    """Knots padded at both ends by a constant-velocity pose, so the spline stays tame where
    the 100 Hz IMU samples run slightly past the last frame."""
    times = np.asarray(times, dtype=np.float64)
    poses = np.asarray(poses, dtype=np.float64)

    def extrapolate(a, b, dt_ab, dt_out):
        step = invert_pose(a) @ b
        rotvec = Rotation.from_matrix(step[:3, :3]).as_rotvec() * (dt_out / dt_ab)
        return b @ make_pose(Rotation.from_rotvec(rotvec).as_matrix(),
                             step[:3, 3] * (dt_out / dt_ab))

    head = extrapolate(poses[1], poses[0], times[1] - times[0], margin)
    tail = extrapolate(poses[-2], poses[-1], times[-1] - times[-2], margin)
    return (np.concatenate([[times[0] - margin], times, [times[-1] + margin]]),
            np.concatenate([head[None], poses, tail[None]]))
