"""Settings of the inertial filter and its noise network, each declared once (STYLE §9).

Stored in checkpoints as plain dicts (`to_dict`/`from_dict`); fields added later get defaults so
older checkpoints keep loading with allow_missing.
"""
from dataclasses import dataclass, field
import math

import numpy as np

from mm_fusion_ros.config import ConfigBase

INIT_SOURCES = ('estimate', 'true_velocity')
SPEED_MODES = ('off', 'init', 'on')
# World axes of the attitude error that consider updates leave alone (xi_R is in world axes).
CONSIDER_ATTITUDE = {'none': (), 'tilt': (0, 1), 'yaw': (2,), 'all': (0, 1, 2)}
CONSIDER_UPDATES = ('speed', 'speed_nhc')
# Updates that leave the gyro bias alone (consider_gyro_bias).
CONSIDER_BIAS_UPDATES = ('none', 'speed', 'nhc', 'speed_nhc')
IDENTITY_3X4 = (1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def _positive(cfg, *names):
    for name in names:
        value = getattr(cfg, name)
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f'{type(cfg).__name__}.{name} must be a positive number, '
                             f'got {value!r}')


def _nonnegative(cfg, *names):
    for name in names:
        value = getattr(cfg, name)
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise ValueError(f'{type(cfg).__name__}.{name} must be >= 0, got {value!r}')


def check_choice(cfg, name, choices):
    """Raise a ValueError naming the config class and field when its value is not a choice."""
    value = getattr(cfg, name)
    if value not in choices:
        raise ValueError(f'{type(cfg).__name__}.{name} {value!r} not understood; choose one of '
                         f'{choices}')


def _triple(cfg, name):
    value = tuple(float(v) for v in getattr(cfg, name))
    if len(value) != 3 or not all(math.isfinite(v) for v in value):
        raise ValueError(f'{type(cfg).__name__}.{name} must be 3 finite numbers, got {value!r}')
    object.__setattr__(cfg, name, value)


@dataclass(frozen=True)
class FilterConfig(ConfigBase):
    """The invariant EKF: IMU noise model, priors, pseudo-measurements, guards, extrinsics."""

    gravity: float = field(default=9.81, metadata={'help': 'gravity magnitude [m/s^2]'})
    gyro_noise: float = field(default=1.5e-3, metadata={
        'help': 'gyro white-noise density [rad/s/sqrt(Hz)]'})
    accel_noise: float = field(default=3e-2, metadata={
        'help': 'accelerometer white-noise density [m/s^2/sqrt(Hz)]'})
    gyro_bias_walk: float = field(default=1e-5, metadata={
        'help': 'gyro bias random walk [rad/s^2/sqrt(Hz)]'})
    accel_bias_walk: float = field(default=1e-3, metadata={
        'help': 'accelerometer bias random walk [m/s^3/sqrt(Hz)]'})
    init_tilt_sigma_deg: float = field(default=1.0, metadata={
        'help': 'prior sigma of the initial roll and pitch from gravity alignment [deg]'})
    init_yaw_sigma_deg: float = field(default=1e-3, metadata={
        'help': 'prior sigma of the initial yaw [deg]; yaw is the odom frame gauge, so tiny'})
    init_speed_sigma: float = field(default=3.0, metadata={
        'help': 'prior sigma of the initial forward speed when no speed estimate exists [m/s]'})
    init_vel_sigma: float = field(default=0.3, metadata={
        'help': 'prior sigma of the initial lateral/vertical velocity, and of the forward speed '
                'with a known initial velocity [m/s]'})
    init_gyro_bias_sigma: float = field(default=2e-4, metadata={
        'help': 'prior sigma of the gyro bias [rad/s]'})
    init_accel_bias_sigma: float = field(default=5e-2, metadata={
        'help': 'prior sigma of the accelerometer bias [m/s^2]'})
    init_window_s: float = field(default=0.5, metadata={
        'help': 'IMU span averaged for the initial gravity alignment [s]'})
    init_source: str = field(default='estimate', metadata={
        'help': 'initial velocity: estimate (ours: zero-velocity detection or the speed '
                'network) or true_velocity (ground truth, for the AI-IMU comparison only)'})
    nhc_lateral_sigma: float = field(default=0.3, metadata={
        'help': 'base sigma of the zero lateral body velocity pseudo-measurement [m/s]'})
    nhc_vertical_sigma: float = field(default=0.3, metadata={
        'help': 'base sigma of the zero vertical body velocity pseudo-measurement [m/s]'})
    nhc_every: int = field(default=10, metadata={
        'help': 'IMU samples between vehicle pseudo-measurement updates (0 = none)'})
    nhc_rpy_deg: tuple = field(default=(0.0, 0.0, 0.0), metadata={
        'help': 'roll, pitch, yaw of the vehicle motion frame in the IMU frame [deg]'})
    nhc_lever_arm: tuple = field(default=(0.0, 0.0, 0.0), metadata={
        'help': 'point of the vehicle that does not slip (rear axle), in the IMU frame [m]'})
    nhc_slip_sigma: float = field(default=0.0, metadata={
        'help': 'sideslip: the lateral pseudo-measurement sigma grows by this times the '
                'centripetal acceleration |v omega_z| (estimated forward speed times the '
                'bias-corrected yaw rate, vehicle axes), added in quadrature before '
                'pseudo_var_scale [s] (0 = off)'})
    nhc_slip_vertical_sigma: float = field(default=0.0, metadata={
        'help': 'the same term for the vertical pseudo-measurement [s] (0 = off)'})
    nhc_slip_mean: float = field(default=0.02, metadata={
        'help': 'sideslip: the lateral pseudo-measurement expects this times v omega_z '
                'instead of 0 [s] (0 = off); fitted by train_imu_filter, the default is the '
                'fit on the KITTI training sequences (docs/inertial_filter.md)'})
    nhc_min_speed: float = field(default=0.0, metadata={
        'help': 'pseudo-measurements only above this estimated speed [m/s]'})
    zupt_window_s: float = field(default=0.4, metadata={
        'help': 'IMU span tested for standstill [s]'})
    zupt_gyro_max: float = field(default=0.01, metadata={
        'help': 'standstill when every |gyro| of the span is below this [rad/s]'})
    zupt_accel_std_max: float = field(default=0.05, metadata={
        'help': 'and the std of |accel| over the span is below this [m/s^2]'})
    zupt_max_speed: float = field(default=1.0, metadata={
        'help': 'standstill also needs the estimated speed below this [m/s] (the IMU test '
                'alone fires on smooth roads at speed)'})
    zupt_sigma: float = field(default=0.02, metadata={
        'help': 'sigma of the zero-velocity update [m/s] (0 = no zero-velocity updates)'})
    speed_mode: str = field(default='init', metadata={
        'help': 'learned body-speed measurement: off, init (initial speed only) or on '
                '(initial speed and an update every speed_every samples)'})
    speed_every: int = field(default=10, metadata={
        'help': 'IMU samples between learned-speed updates with speed_mode on'})
    speed_max: float = field(default=0.0, metadata={
        'help': 'learned-speed updates only while the estimated speed is below this [m/s]: '
                'the network cannot measure speeds it never saw in training (0 = no limit)'})
    speed_var_scale: float = field(default=1.0, metadata={
        'help': 'factor on the speed network variance (its errors are correlated in time)'})
    pseudo_var_scale: float = field(default=1.0, metadata={
        'help': 'factor on the pseudo-measurement variances (their errors are correlated in '
                'time); fitted by train_imu_filter'})
    consider_attitude: str = field(default='tilt', metadata={
        'help': 'attitude that the updates named by consider_updates do not correct (Schmidt '
                'consider update; their errors pull the attitude off a good gyro): none, tilt '
                '(world x, y), yaw (world z) or all'})
    consider_updates: str = field(default='speed', metadata={
        'help': 'which updates consider_attitude applies to: speed (learned speed) or '
                'speed_nhc (and the lateral/vertical pseudo-measurements); zero velocity and '
                'relative poses always correct the attitude'})
    consider_nhc_attitude: str = field(default='none', metadata={
        'help': 'attitude that the lateral/vertical pseudo-measurements do not correct, '
                'independent of consider_attitude: none, tilt, yaw or all (with '
                'consider_updates speed_nhc they also leave consider_attitude alone)'})
    consider_gyro_bias: str = field(default='none', metadata={
        'help': 'updates that do not correct the gyro bias (it moves the attitude later): '
                'none, speed (learned speed), nhc (lateral/vertical pseudo-measurements) or '
                'speed_nhc'})
    consider_zero_rate: str = field(default='yaw', metadata={
        'help': 'attitude that the zero-rate update at standstill does not correct (it observes '
                'the gyro bias, and through the bias the attitude integrated before; a car that '
                'still creeps and turns would book its turn as a yaw step): none, tilt, yaw or '
                'all'})
    imu_time_offset_s: float = field(default=0.0, metadata={
        'help': "added to every IMU stamp before use: the IMU clock's offset to the scans' "
                '(negative: the IMU is stamped late). train_imu_filter fits it from the gyro '
                "against the ground truth's rotations [s]"})
    max_gyro: float = field(default=8.0, metadata={
        'help': 'IMU samples with |gyro| above this are rejected as spikes [rad/s]'})
    max_accel: float = field(default=60.0, metadata={
        'help': 'IMU samples with |accel| above this are rejected as spikes [m/s^2]'})
    max_gap_s: float = field(default=0.1, metadata={
        'help': 'an IMU interval longer than this is counted as a gap [s]'})
    max_clones: int = field(default=4, metadata={
        'help': 'scan poses kept for relative-pose updates; the oldest is dropped beyond'})
    relpose_gate_chi2: float = field(default=0.0, metadata={
        'help': 'reject a relative pose whose Mahalanobis distance^2 exceeds this (0 = off)'})
    T_imu_lidar: tuple = field(default=IDENTITY_3X4, metadata={
        'help': 'base_link (LiDAR) pose in the IMU frame, 12 numbers row-major [R|t]; identity '
                'for the .mat IMU in vehicle axes'})

    def __post_init__(self):
        _positive(self, 'gravity', 'gyro_noise', 'accel_noise', 'gyro_bias_walk',
                  'accel_bias_walk', 'init_tilt_sigma_deg', 'init_yaw_sigma_deg',
                  'init_speed_sigma', 'init_vel_sigma', 'init_gyro_bias_sigma',
                  'init_accel_bias_sigma', 'init_window_s', 'nhc_lateral_sigma',
                  'nhc_vertical_sigma', 'zupt_window_s', 'zupt_gyro_max', 'zupt_accel_std_max',
                  'speed_var_scale', 'pseudo_var_scale', 'max_gyro', 'max_accel', 'max_gap_s')
        _nonnegative(self, 'nhc_slip_sigma', 'nhc_slip_vertical_sigma', 'nhc_min_speed',
                     'zupt_sigma', 'zupt_max_speed', 'relpose_gate_chi2',
                     'speed_max')
        for name in ('nhc_slip_mean', 'imu_time_offset_s'):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value)):
                raise ValueError(f'FilterConfig.{name} must be a finite number, got {value!r}')
        for name in ('nhc_every', 'speed_every', 'max_clones'):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f'FilterConfig.{name} must be an integer >= 0, got {value!r}')
        if self.max_clones < 2:
            raise ValueError(f'FilterConfig.max_clones must be >= 2, got {self.max_clones}')
        check_choice(self, 'init_source', INIT_SOURCES)
        check_choice(self, 'speed_mode', SPEED_MODES)
        check_choice(self, 'consider_attitude', tuple(CONSIDER_ATTITUDE))
        check_choice(self, 'consider_updates', CONSIDER_UPDATES)
        check_choice(self, 'consider_nhc_attitude', tuple(CONSIDER_ATTITUDE))
        check_choice(self, 'consider_gyro_bias', CONSIDER_BIAS_UPDATES)
        check_choice(self, 'consider_zero_rate', tuple(CONSIDER_ATTITUDE))
        _triple(self, 'nhc_rpy_deg')
        _triple(self, 'nhc_lever_arm')
        tr = tuple(float(v) for v in self.T_imu_lidar)
        if len(tr) != 12 or not all(math.isfinite(v) for v in tr):
            raise ValueError(f'FilterConfig.T_imu_lidar must be 12 finite numbers (row-major '
                             f'3x4), got {len(tr)}')
        rot = np.asarray(tr).reshape(3, 4)[:, :3]
        if np.abs(rot @ rot.T - np.eye(3)).max() > 1e-4 or np.linalg.det(rot) < 0:
            raise ValueError('FilterConfig.T_imu_lidar: its 3x3 block is not a rotation')
        object.__setattr__(self, 'T_imu_lidar', tr)

    @property
    def T_imu_lidar_matrix(self) -> np.ndarray:
        out = np.eye(4)
        out[:3] = np.asarray(self.T_imu_lidar).reshape(3, 4)
        return out


def matrix_to_3x4(T) -> tuple:
    """(4, 4) -> the 12-number row-major tuple of FilterConfig.T_imu_lidar."""
    return tuple(float(v) for v in np.asarray(T, dtype=np.float64)[:3].ravel())


FILTER_SWITCH = ('off', 'on')


def parse_outage(text) -> tuple:
    """'START_S:DURATION_S' -> (start, duration) in seconds on the sequence clock (times.txt)."""
    bad = ValueError(f'outage {text!r} not understood: give START_S:DURATION_S with START_S >= 0 '
                     f'and DURATION_S > 0 (seconds of times.txt), e.g. 20:20')
    parts = str(text).split(':')
    if len(parts) != 2:
        raise bad
    try:
        start, duration = float(parts[0]), float(parts[1])
    except ValueError as e:
        raise bad from e
    if not (math.isfinite(start) and math.isfinite(duration) and start >= 0 and duration > 0):
        raise bad
    return start, duration


@dataclass(frozen=True)
class RelativePoseNoise(ConfigBase):
    """How the network's relative poses are weighted in the filter: offline (FilterRunConfig,
    predict_odometry) and online (filter.online.OnlineFilterConfig) alike."""

    relpose_var_scale: float = field(default=1.0, metadata={
        'help': 'factor on the variance (exp of the log-variance head) of the network relative '
                'poses given to the filter'})
    relpose_min_std_m: float = field(default=0.01, metadata={
        'help': 'floor of the standard deviation of each translation of a network relative pose '
                'given to the filter [m]: a briefly trained head can claim 1e-4 m, which the '
                'filter cannot take (measured: docs/inertial_filter.md)'})
    relpose_min_std_rad: float = field(default=1e-3, metadata={
        'help': 'floor of the standard deviation of each rotation of a network relative pose '
                'given to the filter [rad]'})

    def __post_init__(self):
        _positive(self, 'relpose_var_scale', 'relpose_min_std_m', 'relpose_min_std_rad')

    @property
    def relpose_min_logvar(self) -> np.ndarray:
        """(6,) floor of the relative-pose log-variance (translation, then rotation)."""
        std = [self.relpose_min_std_m] * 3 + [self.relpose_min_std_rad] * 3
        return np.log(np.square(std))

    def relpose_logvar(self, logvar) -> np.ndarray:
        """The log-variance given to the filter: the network's, scaled, then floored."""
        scaled = np.asarray(logvar, dtype=np.float64) + math.log(self.relpose_var_scale)
        return np.maximum(scaled, self.relpose_min_logvar)


@dataclass(frozen=True)
class FilterRunConfig(RelativePoseNoise):
    """How predict_odometry produces a trajectory: the network's steps chained, or the inertial
    filter over the sequence's IMU updated by them; and sensor outages to simulate."""

    filter: str = field(default='off', metadata={
        'help': 'on|off. on: the inertial filter runs over the sequence IMU, updated by the '
                'network relative poses with their log-variance, and writes its trajectory; '
                'off: the network steps are chained'})
    filter_checkpoint: str = field(default='', metadata={
        'help': 'inertial filter checkpoint (train_imu_filter) or a fusion checkpoint that '
                'embeds one; empty: the filter embedded in --checkpoint'})
    outage: tuple = field(default=(), metadata={
        'help': 'START_S:DURATION_S on the sequence clock: camera and LiDAR cut for that window '
                '(the network sees the IMU alone there; the filter takes no relative pose there '
                'and bridges on the IMU and its pseudo-measurements)'})

    def __post_init__(self):
        super().__post_init__()
        if self.filter not in FILTER_SWITCH:
            raise ValueError(f'FilterRunConfig.filter must be on or off, got {self.filter!r}')
        outage = tuple(str(o) for o in self.outage)
        for item in outage:
            parse_outage(item)
        object.__setattr__(self, 'outage', outage)

    @property
    def enabled(self) -> bool:
        return self.filter == 'on'

    @property
    def outage_windows(self) -> list:
        return [parse_outage(item) for item in self.outage]
