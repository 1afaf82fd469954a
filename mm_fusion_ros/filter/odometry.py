"""Inertial odometry around the invariant EKF: IMU screening, initialisation, pseudo-measurements,
scan clones and relative-pose updates. One object serves online (fed sample by sample) and
offline (`run_filter` feeds a whole sequence through the same object), so both give the same
poses by construction.

Frames: the filter's world is gravity aligned (z up) with its origin and zero yaw at the IMU's
first pose; `odom` is DESIGN §3's (the first base_link pose). Poses come out as T_odom_base with
base_link = T_imu_lidar applied to the IMU pose. Stamps are seconds on one clock.

Noise model: anything with `window` (IMU samples per input), `has_speed` and
`predict(windows (B, window, 6) accel+gyro) -> dict of (B,) arrays` with keys lateral_logvar,
vertical_logvar and, when has_speed, speed, speed_logvar (forward speed at the window's end) and
speed0, speed0_logvar (at its start). filter.noise_net.NoiseModel is the learned one.
"""
from collections import deque
import copy
from dataclasses import dataclass, field
import logging
import math

import numpy as np

from mm_fusion_ros.filter.config import CONSIDER_ATTITUDE, FilterConfig
from mm_fusion_ros.filter.ekf import GYRO_BIAS_DIMS, InvariantEKF
from mm_fusion_ros.filter.lie import se3_exp
from mm_fusion_ros.geometry import (
    invert_pose,
    make_pose,
    rot_to_rpy,
    rpy_to_rot,
    so3_exp,
    so3_log,
)

log = logging.getLogger(__name__)

STAMP_TOL = 1e-6          # [s] two stamps within this are the same scan
HISTORY_S = 1.0           # [s] of nominal states kept to back-date a late scan
COUNT_KEYS = ('imu_accepted', 'imu_rejected_nonfinite', 'imu_rejected_spike',
              'imu_rejected_stamp', 'imu_gaps', 'zupt_updates', 'nhc_updates', 'speed_updates',
              'scans', 'scans_late', 'scans_too_old', 'clones_evicted', 'relpose_applied',
              'relpose_gated', 'relpose_no_clone', 'relpose_waiting_dropped', 'relpose_failed')


def _logvar_to_cov(logvar):
    logvar = np.asarray(logvar, dtype=np.float64)
    if logvar.shape != (6,) or not np.isfinite(logvar).all():
        raise ValueError(f'relative pose log-variance must be 6 finite numbers, got {logvar}')
    return np.diag(np.exp(np.clip(logvar, -30.0, 30.0)))


class InertialOdometry:
    """Online inertial odometry: feed IMU samples, scan stamps and relative poses in time order.

    add_imu(stamp, accel, gyro)          every IMU sample (imu_link, specific force and rate)
    add_scan(stamp)                      a scan stamp: the pose there is cloned for relative poses
    add_relative_pose(t0, t1, vec6, logvar6 | cov6=...)   the network's motion of base_link
                                                           between two scan stamps
    pose() -> (stamp, T_odom_base, cov6) at the newest IMU sample; None until initialised.
    Scans whose relative pose never comes are bridged by the IMU and the pseudo-measurements.
    """

    def __init__(self, cfg: FilterConfig = None, noise_model=None, true_velocity=None,
                 precomputed_noise=None, initial_state=None):
        """true_velocity: IMU velocity at the first sample in IMU axes, used only with
        cfg.init_source true_velocity (ground truth; label such runs). initial_state: a known
        (R_world_imu, v_world) at the first sample, in a gravity-aligned world (z up), instead of
        the alignment (e.g. handed over from a previous run, or a test's truth)."""
        cfg = FilterConfig() if cfg is None else cfg
        self.cfg = cfg
        self.noise_model = noise_model
        if cfg.init_source == 'true_velocity' and true_velocity is None:
            raise ValueError('FilterConfig.init_source is true_velocity but no true_velocity '
                             '(initial IMU velocity in IMU axes) was given')
        self.true_velocity = None if true_velocity is None else np.asarray(true_velocity, float)
        self.precomputed_noise = precomputed_noise or {}
        self.initial_state = initial_state
        self.counts = dict.fromkeys(COUNT_KEYS, 0)
        self.T_imu_lidar = cfg.T_imu_lidar_matrix
        self.R_ic = rpy_to_rot(*np.radians(cfg.nhc_rpy_deg))
        self.lever = np.asarray(cfg.nhc_lever_arm, dtype=np.float64)
        self.window_n = noise_model.window if noise_model is not None else 0
        self.zupt_n = 0
        self.ekf = None
        self.t0 = None
        self.T_world_odom = None
        self._events = []          # before initialisation: ('imu'|'scan'|'rel', args)
        self._init_samples = []    # valid (t, a, g) buffered before initialisation
        self._last = None          # newest valid sample (t, a, g)
        self._valid_n = 0
        self._window = deque(maxlen=max(self.window_n, 1))
        self._zupt_buf = deque(maxlen=1)
        self._history = deque()    # (t, R, p) after each propagation
        self._corrections = deque()  # (t, 9-dim error) of each update since the history's start
        self._pending_scans = []   # scan stamps ahead of the filter, ascending
        self._waiting_rel = []     # relative poses whose end scan is still ahead
        self._open_scans = {}      # cloned scan stamp -> (T_odom_base, cov6), still improving
        self._settled = set()      # cloned scans whose ending relative pose was applied
        self._record_only = set()  # scan stamps to read out, not clone
        self._finished_scans = []  # (stamp, T_odom_base, cov6) whose clone was let go
        self.standstill = False
        self._lazy_cov = None      # (ekf, its cov_version, pose covariance) for pose()

    # ------------------------------------------------------------ inputs
    def add_imu(self, stamp, accel, gyro) -> bool:
        """One IMU sample; False (and counted) when it is rejected. Its stamp is on the IMU's
        clock: the filter works on the scans' clock, stamp + cfg.imu_time_offset_s."""
        stamp = float(stamp) + self.cfg.imu_time_offset_s
        accel = np.asarray(accel, dtype=np.float64)
        gyro = np.asarray(gyro, dtype=np.float64)
        reason = self._screen(stamp, accel, gyro)
        if reason is not None:
            self.counts[reason] += 1
            return False
        self.counts['imu_accepted'] += 1
        if self.ekf is None:
            self._events.append(('imu', (stamp, accel, gyro)))
            self._init_samples.append((stamp, accel, gyro))
            self._last = (stamp, accel, gyro)
            if self._ready_to_initialise():
                self._initialise()
            return True
        self._step(stamp, accel, gyro)
        return True

    def add_scan(self, stamp, clone=True):
        """A scan's stamp: its pose is cloned (exactly, or back-dated when already passed).

        clone=False only records the pose there (pop_scan_poses), for runs that will never get
        a relative pose for this scan: cloning costs 6 state dimensions per held scan.
        """
        stamp = float(stamp)
        self.counts['scans'] += 1
        if not clone:
            self._record_only.add(stamp)
        if self.ekf is None:
            self._events.append(('scan', (stamp,)))
            return
        self._add_scan(stamp)

    def add_relative_pose(self, stamp_from, stamp_to, vec6, logvar6=None, cov6=None):
        """Motion of base_link from scan stamp_from to scan stamp_to (DESIGN §5 6-vector) with
        its log-variance per dimension (the network's head) or a full 6x6 covariance."""
        if (logvar6 is None) == (cov6 is None):
            raise ValueError('give exactly one of logvar6 and cov6 for a relative pose')
        if cov6 is None:
            cov = _logvar_to_cov(logvar6)
        else:
            cov = np.asarray(cov6, dtype=np.float64)
            if cov.shape != (6, 6) or not np.isfinite(cov).all():
                raise ValueError(f'relative pose covariance must be finite 6x6, got {cov.shape}')
            # Refused here, naming cov6: inside an update it failed half-way through a step
            # (the scan already popped, the filter propagated to it).
            if np.abs(cov - cov.T).max() > 1e-9 * max(np.abs(cov).max(), 1.0) or \
                    np.linalg.eigvalsh(0.5 * (cov + cov.T)).min() <= 0:
                raise ValueError('relative pose covariance cov6 must be symmetric positive '
                                 f'definite, got eigenvalues {np.linalg.eigvalsh(cov).round(9)}')
        vec6 = np.asarray(vec6, dtype=np.float64)
        if vec6.shape != (6,) or not np.isfinite(vec6).all():
            raise ValueError(f'relative pose must be 6 finite numbers, got {vec6}')
        args = (float(stamp_from), float(stamp_to), vec6, cov)
        if self.ekf is None:
            self._events.append(('rel', args))
            return
        self._add_relative(*args)

    # ------------------------------------------------------------ outputs
    @property
    def initialised(self) -> bool:
        return self.ekf is not None

    @property
    def stamp(self):
        return None if self._last is None or self.ekf is None else self._last[0]

    def pose(self, propagate=True):
        """(stamp, T_odom_base (4, 4), 6x6 covariance: position then rotation, odom axes).

        propagate=False leaves the filter's covariance propagation alone (it runs every
        cov_every samples, as when nothing is read): the covariance is then the one at the
        last propagation or update, at most cov_every - 1 samples old, computed once per
        change of the filter's covariance (the same array until it changes; do not modify it).
        """
        if self.ekf is None:
            return None
        T = self.T_world_odom_inv @ make_pose(self.ekf.R, self.ekf.p) @ self.T_imu_lidar
        if propagate:
            return self._last[0], T, self._odom_cov(self.ekf.pose_covariance(self.T_imu_lidar))
        ekf = self.ekf
        if self._lazy_cov is None or self._lazy_cov[0] is not ekf or \
                self._lazy_cov[1] != ekf.cov_version:
            cov = self._odom_cov(ekf.pose_covariance(self.T_imu_lidar, propagate=False))
            self._lazy_cov = (ekf, ekf.cov_version, cov)
        return self._last[0], T, self._lazy_cov[2]

    def pose_world_imu(self):
        """(R, p) of imu_link in the filter's gravity-aligned world (no covariance flush)."""
        return self.ekf.R, self.ekf.p

    def velocity_body(self):
        return self.ekf.R.T @ self.ekf.v

    def pop_scan_poses(self) -> list:
        """[(stamp, T_odom_base, cov6)] of scans done since the last call, in stamp order.

        A scan's pose is the filter's estimate at its stamp once the relative pose ending there
        was applied (or when it was cloned, if none came); it is done when its clone is let go.
        """
        out = sorted(self._finished_scans, key=lambda r: r[0])
        self._finished_scans = []
        return out

    def close(self) -> list:
        """Let every clone go (end of a sequence) and return pop_scan_poses().

        Scans at most max_gap_s after the last IMU sample are reached with that sample's rates
        first (a negative imu_time_offset_s leaves the last scans of a recording after it)."""
        if self.ekf is not None:
            t, a, g = self._last
            while self._pending_scans and self._pending_scans[0] <= t + self.cfg.max_gap_s:
                t_s = self._pending_scans.pop(0)
                if t_s > t:
                    self.ekf.propagate(g, a, t_s - t)
                    t = t_s
                self._clone(t_s)
            for key in list(self.ekf.clones):
                self._drop_clone(key)
        # Relative poses still waiting for a scan the IMU never reached: counted, not lost.
        self.counts['relpose_waiting_dropped'] += len(self._waiting_rel)
        self._waiting_rel = []
        return self.pop_scan_poses()

    def scan_pose(self, stamp):
        """(T_odom_base, cov6) of a scan still held as a clone, else None."""
        key = self._clone_key(float(stamp))
        if key is None:
            return None
        return self._clone_readout(key)

    def scan_settled(self, stamp) -> bool:
        """Whether a held scan's pose has had the relative pose ending there applied."""
        key = self._clone_key(float(stamp))
        return key is not None and key in self._settled

    def scan_readout(self, stamp):
        """(T_odom_base, cov6) of a held scan as last read out: when it was cloned, or right
        after the relative pose ending there (what pop_scan_poses will give); else None."""
        key = self._clone_key(float(stamp))
        return None if key is None else self._open_scans[key]

    def forecast(self, stamp):
        """(T_odom_base, cov6) at a stamp ahead of the newest IMU sample, by at most
        max_gap_s: the state carried there with that sample's rates held, on a copy (the
        filter is not changed); else None. A scan reached this way is the online node's pose
        while the IMU that reaches it is still to come (an IMU stamped late)."""
        if self.ekf is None:
            return None
        t, accel, gyro = self._last
        dt = float(stamp) - t
        if not STAMP_TOL < dt <= self.cfg.max_gap_s:
            return None
        ekf = copy.copy(self.ekf)
        ekf.P = self.ekf.P.copy()      # flush() writes into P; the nominal state is replaced
        ekf.propagate(gyro, accel, dt)
        T = self.T_world_odom_inv @ make_pose(ekf.R, ekf.p) @ self.T_imu_lidar
        return T, self._odom_cov(ekf.pose_covariance(self.T_imu_lidar))

    def _clone_readout(self, key):
        R, p, cov = self.ekf.clone_pose(key)
        q = p + R @ self.T_imu_lidar[:3, 3]
        J = np.zeros((6, 6))
        J[0:3, 0:3] = -_skew(q)
        J[0:3, 3:6] = np.eye(3)
        J[3:6, 0:3] = np.eye(3)
        T = self.T_world_odom_inv @ make_pose(R, p) @ self.T_imu_lidar
        return T, self._odom_cov(J @ cov @ J.T)

    # ------------------------------------------------------------ internals
    def _screen(self, stamp, accel, gyro):
        return screen_imu_sample(self.cfg, None if self._last is None else self._last[0],
                                 stamp, accel, gyro)

    def _ready_to_initialise(self) -> bool:
        if self.initial_state is not None:
            return True
        t_first, t_last = self._init_samples[0][0], self._init_samples[-1][0]
        need_speed = (self.cfg.init_source == 'estimate' and self.cfg.speed_mode != 'off'
                      and self.noise_model is not None and self.noise_model.has_speed)
        if need_speed and len(self._init_samples) < self.window_n:
            return False
        return t_last - t_first >= self.cfg.init_window_s

    def _initialise(self):
        cfg = self.cfg
        samples = self._init_samples
        t = np.array([s[0] for s in samples])
        acc = np.array([s[1] for s in samples])
        gyr = np.array([s[2] for s in samples])
        dt_med = float(np.median(np.diff(t))) if len(t) > 1 else 0.01
        self.zupt_n = max(2, int(round(cfg.zupt_window_s / dt_med)))
        self._zupt_buf = deque(maxlen=self.zupt_n)
        head = t - t[0] <= cfg.init_window_s
        fwd = self.R_ic[:, 0]
        sig_f = cfg.init_speed_sigma
        sig_l = cfg.init_vel_sigma
        net = (self.window_n and self.noise_model.has_speed and cfg.speed_mode != 'off'
               and len(t) >= self.window_n)
        out = self._noise_for(self.window_n, acc[:self.window_n],
                              gyr[:self.window_n]) if net else None
        # A quiet IMU is not enough on a smooth road: with a speed network, it must agree.
        still = self._is_still(acc[head], gyr[head]) and (
            out is None or out['speed0'] < cfg.zupt_max_speed)
        bg0 = gyr[head].mean(axis=0) if still else np.zeros(3)
        if still:
            v_body, sig_f, sig_l = np.zeros(3), cfg.zupt_sigma or 0.02, cfg.zupt_sigma or 0.02
            self.init_info = {'method': 'standstill', 'speed': 0.0}
        elif cfg.init_source == 'true_velocity':
            v_body, sig_f = self.true_velocity, cfg.init_vel_sigma
            self.init_info = {'method': 'true_velocity (ground truth)',
                              'speed': float(np.linalg.norm(v_body))}
        elif out is not None:
            v_body = fwd * max(out['speed0'], 0.0)
            sig_f = math.sqrt(math.exp(out['speed0_logvar']) * cfg.speed_var_scale)
            self.init_info = {'method': 'speed network', 'speed': float(out['speed0'])}
        else:
            v_body = np.zeros(3)
            self.init_info = {'method': 'unknown speed (zero, wide prior)', 'speed': 0.0}
        # Gravity from the specific force over the buffer, less the velocity change that the
        # speeds at its ends (network) and the gyro's turning imply.
        span = slice(0, self.window_n) if out is not None else head
        v_end = fwd * max(out['speed'], 0.0) if out is not None and not still else v_body
        R0 = gravity_alignment(t[span], acc[span], gyr[span] - bg0, v_body, v_end)
        if self.initial_state is not None:
            R0 = np.asarray(self.initial_state[0], dtype=np.float64)
            v_body, sig_f = R0.T @ np.asarray(self.initial_state[1], float), cfg.init_vel_sigma
            self.init_info = {'method': 'given initial state',
                              'speed': float(np.linalg.norm(v_body))}
        self.init_info['tilt_deg'] = [round(float(math.degrees(a)), 3)
                                      for a in rot_to_rpy(R0)[:2]]
        tilt = math.radians(cfg.init_tilt_sigma_deg)
        P0 = np.zeros((15, 15))
        P0[0:3, 0:3] = np.diag([tilt**2, tilt**2, math.radians(cfg.init_yaw_sigma_deg)**2])
        cov_v_body = self.R_ic @ np.diag([sig_f**2, sig_l**2, sig_l**2]) @ self.R_ic.T
        P0[3:6, 3:6] = R0 @ cov_v_body @ R0.T
        P0[6:9, 6:9] = np.eye(3) * 1e-8
        P0[9:12, 9:12] = np.eye(3) * cfg.init_gyro_bias_sigma**2
        P0[12:15, 12:15] = np.eye(3) * cfg.init_accel_bias_sigma**2
        self.ekf = InvariantEKF(R0, R0 @ v_body, np.zeros(3), bg0, np.zeros(3), P0,
                                gravity=cfg.gravity, gyro_noise=cfg.gyro_noise,
                                accel_noise=cfg.accel_noise, gyro_bias_walk=cfg.gyro_bias_walk,
                                accel_bias_walk=cfg.accel_bias_walk, cov_every=cfg.nhc_every or 10)
        self.ekf.on_correction = self._record_correction
        self.t0 = t[0]
        self.T_world_odom = make_pose(R0, np.zeros(3)) @ self.T_imu_lidar
        self.T_world_odom_inv = invert_pose(self.T_world_odom)
        log.debug('filter initialised at %.3f s: %s', self.t0, self.init_info)
        events, self._events, self._init_samples = self._events, [], []
        first = True
        for kind, args in events:
            if kind == 'imu':
                if first:   # the initial state sits at the first sample
                    self._last = args
                    self._valid_n = 1
                    self._push_window(args[1], args[2])
                    self._history.append((args[0], self.ekf.R, self.ekf.p))
                    first = False
                else:
                    self._step(*args)
            elif kind == 'scan':
                self._add_scan(*args)
            else:
                self._add_relative(*args)

    def _is_still(self, acc, gyr) -> bool:
        if self.cfg.zupt_sigma <= 0 or len(acc) < 2:
            return False
        return bool(np.abs(gyr).max() < self.cfg.zupt_gyro_max
                    and np.linalg.norm(acc, axis=1).std() < self.cfg.zupt_accel_std_max)

    def _push_window(self, accel, gyro):
        self._window.append(np.concatenate([accel, gyro]))
        self._zupt_buf.append(np.concatenate([accel, gyro]))

    def _step(self, stamp, accel, gyro):
        t_prev, a_prev, g_prev = self._last
        if stamp - t_prev > self.cfg.max_gap_s:
            self.counts['imu_gaps'] += 1
        while self._pending_scans and self._pending_scans[0] <= stamp + STAMP_TOL:
            t_s = self._pending_scans.pop(0)
            if t_s > t_prev + STAMP_TOL and t_s < stamp - STAMP_TOL:
                u = (t_s - t_prev) / (stamp - t_prev)
                a_s, g_s = a_prev + u * (accel - a_prev), g_prev + u * (gyro - g_prev)
                self.ekf.propagate(0.5 * (g_prev + g_s), 0.5 * (a_prev + a_s), t_s - t_prev)
                t_prev, a_prev, g_prev = t_s, a_s, g_s
            elif t_s >= stamp - STAMP_TOL:
                self.ekf.propagate(0.5 * (g_prev + gyro), 0.5 * (a_prev + accel), stamp - t_prev)
                t_prev, a_prev, g_prev = stamp, accel, gyro
            self._clone(t_s)
        if stamp > t_prev:
            self.ekf.propagate(0.5 * (g_prev + gyro), 0.5 * (a_prev + accel), stamp - t_prev)
        self._last = (stamp, accel, gyro)
        self._valid_n += 1
        self._push_window(accel, gyro)
        self._history.append((stamp, self.ekf.R, self.ekf.p))
        while self._history and self._history[0][0] < stamp - HISTORY_S:
            self._history.popleft()
        while self._corrections and self._corrections[0][0] < stamp - HISTORY_S:
            self._corrections.popleft()
        self._pseudo_updates()

    def _record_correction(self, dx):
        # At the newest accepted sample's time (its history entry was appended before the
        # update). An update inside _step's pending-scan loop is at most one IMU interval
        # later than that: carried back slightly short, a first-order error.
        self._corrections.append((self._last[0], dx))

    def _corrected(self, t_h, R, p):
        """A history entry (t_h, R, p) with the updates made at or after t_h applied, each
        carried back to t_h as add_clone's back-dated Jacobian carries the error: xi_R(t_h) =
        xi_R, xi_p(t_h) = xi_p - s xi_v + s^2/2 [g]x xi_R with s = t - t_h. The history keeps
        the nominal states as they were; without this a late scan's clone fell back to a pose
        that later updates had already corrected."""
        for t, dx in self._corrections:
            if t < t_h - STAMP_TOL:
                continue
            s = t - t_h
            xi_p = dx[6:9] - s * dx[3:6] + 0.5 * s * s * np.cross(self.ekf.g, dx[0:3])
            cR, cp = se3_exp(np.concatenate([dx[0:3], xi_p]))
            R, p = cR @ R, cR @ p + cp
        return R, p

    def _noise_for(self, n, acc=None, gyr=None):
        """Noise-model output for the window ending at valid sample n (cached, precomputed)."""
        if n in self.precomputed_noise:
            return self.precomputed_noise[n]
        if acc is None:
            window = np.asarray(self._window)[None]
        else:
            window = np.concatenate([acc, gyr], axis=1)[None]
        out = self.noise_model.predict(window)
        return {k: float(v[0]) for k, v in out.items()}

    def _pseudo_updates(self):
        cfg = self.cfg
        n = self._valid_n
        nhc_due = cfg.nhc_every and n % cfg.nhc_every == 0
        speed_due = (cfg.speed_mode == 'on' and cfg.speed_every and n % cfg.speed_every == 0
                     and self.window_n and self.noise_model.has_speed)
        if not (nhc_due or speed_due):
            return
        have_net = self.window_n and len(self._window) >= self.window_n
        out = self._noise_for(n) if have_net else None
        if nhc_due:
            buf = np.asarray(self._zupt_buf)
            self.standstill = (len(buf) >= self.zupt_n
                               and self._is_still(buf[:, :3], buf[:, 3:])
                               and float(np.linalg.norm(self.ekf.v)) < cfg.zupt_max_speed)
            if self.standstill:
                self.ekf.update_body_velocity((0, 1, 2), np.zeros(3), [cfg.zupt_sigma] * 3)
                axes = CONSIDER_ATTITUDE[cfg.consider_zero_rate]
                self.ekf.update_zero_rate(buf[:, 3:].mean(axis=0), cfg.zupt_gyro_max / 3.0,
                                          self.ekf.attitude_dims(axes) if axes else None)
                self.counts['zupt_updates'] += 1
            else:
                speed = float(np.linalg.norm(self.ekf.v))
                if speed >= cfg.nhc_min_speed:
                    if out is not None:
                        var = np.exp([out['lateral_logvar'], out['vertical_logvar']])
                    else:
                        var = np.array([cfg.nhc_lateral_sigma, cfg.nhc_vertical_sigma]) ** 2
                    values = np.zeros(2)
                    if cfg.nhc_slip_sigma or cfg.nhc_slip_vertical_sigma or cfg.nhc_slip_mean:
                        a_c = self._centripetal()
                        var = var + np.square(a_c * np.array([cfg.nhc_slip_sigma,
                                                              cfg.nhc_slip_vertical_sigma]))
                        values[0] = cfg.nhc_slip_mean * a_c
                    sig = np.sqrt(var * cfg.pseudo_var_scale)
                    self.ekf.update_body_velocity((1, 2), values, sig, self.R_ic,
                                                  self.lever, self._last[2],
                                                  consider=self._consider('nhc'))
                    self.counts['nhc_updates'] += 1
        in_range = cfg.speed_max <= 0 or float(np.linalg.norm(self.ekf.v)) < cfg.speed_max
        if speed_due and out is not None and not self.standstill and in_range:
            sig = math.sqrt(math.exp(out['speed_logvar']) * cfg.speed_var_scale)
            self.ekf.update_body_velocity((0,), [max(out['speed'], 0.0)], [sig], self.R_ic,
                                          self.lever, self._last[2],
                                          consider=self._consider('speed'))
            self.counts['speed_updates'] += 1

    def _centripetal(self) -> float:
        """v omega_z: the estimated forward speed times the bias-corrected yaw rate, both in
        the vehicle motion frame (R_ic) [m/s^2]; > 0 turning left while driving forward."""
        speed = (self.R_ic.T @ (self.ekf.R.T @ self.ekf.v))[0]
        rate = (self.R_ic.T @ (self._last[2] - self.ekf.bg))[2]
        return float(speed * rate)

    def _consider(self, kind):
        """Error dimensions that a speed or nhc (lateral/vertical) update leaves alone:
        attitude axes (consider_attitude, consider_nhc_attitude) and the gyro bias."""
        cfg = self.cfg
        axes = set()
        if kind == 'speed' or cfg.consider_updates == 'speed_nhc':
            axes |= set(CONSIDER_ATTITUDE[cfg.consider_attitude])
        if kind == 'nhc':
            axes |= set(CONSIDER_ATTITUDE[cfg.consider_nhc_attitude])
        dims = self.ekf.attitude_dims(sorted(axes))
        if cfg.consider_gyro_bias in (kind, 'speed_nhc'):
            dims = np.concatenate([dims, GYRO_BIAS_DIMS])
        return dims if len(dims) else None

    def _clone_key(self, stamp):
        for key in self.ekf.clones:
            if abs(key - stamp) <= STAMP_TOL:
                return key
        return None

    def _clone(self, stamp, rot=None, pos=None, back_s=0.0):
        if stamp in self._record_only:
            self._record_only.discard(stamp)
            T = self.T_world_odom_inv @ make_pose(self.ekf.R if rot is None else rot,
                                                  self.ekf.p if pos is None else pos)
            cov = self._odom_cov(self.ekf.pose_covariance(self.T_imu_lidar))
            self._finished_scans.append((stamp, T @ self.T_imu_lidar, cov))
            return
        if self._clone_key(stamp) is not None:
            return
        while len(self.ekf.clones) >= self.cfg.max_clones:
            self._drop_clone(next(iter(self.ekf.clones)))
            self.counts['clones_evicted'] += 1
        self.ekf.add_clone(stamp, rot, pos, back_s)
        self._open_scans[stamp] = self._clone_readout(stamp)
        self._apply_waiting()

    def _drop_clone(self, key):
        self.ekf.drop_clone(key)
        self._settled.discard(key)
        T, cov = self._open_scans.pop(key)
        self._finished_scans.append((key, T, cov))

    def _add_scan(self, stamp):
        now = self._last[0]
        if stamp > now + STAMP_TOL:
            self._pending_scans.append(stamp)
            self._pending_scans.sort()
            return
        if stamp >= now - STAMP_TOL:
            self._clone(stamp)
            return
        # Late: the filter already passed the stamp. Move the current pose back by the IMU
        # motion since then (from the nominal history), and clone with the back-dated Jacobian.
        hist = self._history
        if not hist or stamp < hist[0][0]:
            self.counts['scans_too_old'] += 1
            return
        self.counts['scans_late'] += 1
        ts = np.array([h[0] for h in hist])
        i = int(np.searchsorted(ts, stamp))
        t1, R1, p1 = hist[i]
        rot, pos = self._corrected(t1, R1, p1)
        if i > 0 and t1 > stamp:
            t0_, R0_, p0_ = hist[i - 1]
            R0_, p0_ = self._corrected(t0_, R0_, p0_)
            u = (stamp - t0_) / (t1 - t0_)
            rot = R0_ @ so3_exp(u * so3_log(R0_.T @ rot))
            pos = p0_ + u * (pos - p0_)
        self._clone(stamp, rot, pos, back_s=now - stamp)

    def _add_relative(self, t_from, t_to, vec6, cov):
        key_from, key_to = self._clone_key(t_from), self._clone_key(t_to)
        if key_from is None and not self._is_pending(t_from):
            self.counts['relpose_no_clone'] += 1
            return
        if key_from is None or key_to is None:
            if self._is_pending(t_to):
                self._waiting_rel.append((t_from, t_to, vec6, cov))
            else:
                self.counts['relpose_no_clone'] += 1
            return
        try:
            nis = self.ekf.update_relative_pose(key_from, key_to, vec6, cov, self.T_imu_lidar,
                                                self.cfg.relpose_gate_chi2)
        except ValueError as e:
            # A covariance that is not positive definite (numerically): this update is lost,
            # counted, and the step it may be called from goes on (no half-advanced state).
            self.counts['relpose_failed'] += 1
            log.warning('relative pose %.3f -> %.3f s not applied: %s', t_from, t_to, e)
            return
        if self.cfg.relpose_gate_chi2 > 0 and nis > self.cfg.relpose_gate_chi2:
            self.counts['relpose_gated'] += 1
        else:
            self.counts['relpose_applied'] += 1
            self._open_scans[key_to] = self._clone_readout(key_to)
            self._settled.add(key_to)
        # Clones older than the measurement's end are not needed any more.
        for key in [k for k in self.ekf.clones if k < key_to - STAMP_TOL]:
            self._drop_clone(key)

    def _is_pending(self, stamp) -> bool:
        return any(abs(t - stamp) <= STAMP_TOL for t in self._pending_scans)

    def _apply_waiting(self):
        def cloned(w):
            return self._clone_key(w[0]) is not None and self._clone_key(w[1]) is not None
        ready = [w for w in self._waiting_rel if cloned(w)]
        self._waiting_rel = [w for w in self._waiting_rel if not cloned(w)]
        for args in ready:
            self._add_relative(*args)

    def _odom_cov(self, cov_world):
        """World (gravity-aligned) pose covariance -> odom axes."""
        Rw = self.T_world_odom[:3, :3]
        J = np.zeros((6, 6))
        J[:3, :3] = Rw.T
        J[3:, 3:] = Rw.T
        return J @ cov_world @ J.T


def screen_imu_sample(cfg: FilterConfig, last_stamp, stamp, accel, gyro):
    """Why an IMU sample is rejected (a counts key), or None: non-finite values, a rate or
    specific force beyond cfg.max_gyro / cfg.max_accel, a stamp not after the last accepted."""
    if accel.shape != (3,) or gyro.shape != (3,):
        raise ValueError(f'IMU sample needs 3 accel and 3 gyro values, got {accel.shape} and '
                         f'{gyro.shape}')
    g2 = float(gyro @ gyro)
    a2 = float(accel @ accel)
    if not (math.isfinite(stamp) and math.isfinite(g2) and math.isfinite(a2)):
        return 'imu_rejected_nonfinite'
    if g2 > cfg.max_gyro**2 or a2 > cfg.max_accel**2:
        return 'imu_rejected_spike'
    if last_stamp is not None and stamp <= last_stamp:
        return 'imu_rejected_stamp'
    return None


def gravity_alignment(t, accel, gyro, v_start, v_end) -> np.ndarray:
    """Initial attitude (roll, pitch; yaw 0) from IMU samples over [t0, t1] and the body
    velocities at both ends: in the first body frame B0, mean(R_B0_B f) = dv/T - g_B0, where
    dv = R_B0_B(t1) v_end - v_start, so a car that turns or speeds up is not taken as tilted."""
    t = np.asarray(t, dtype=np.float64)
    if len(t) < 2:
        a = np.asarray(accel, dtype=np.float64).reshape(-1, 3).mean(axis=0)
        R_end, mean_f, span = np.eye(3), a, 1.0
    else:
        dt = np.diff(t)
        incs = so3_exp(0.5 * (gyro[:-1] + gyro[1:]) * dt[:, None])
        rots = np.empty((len(t), 3, 3))
        rots[0] = np.eye(3)
        for i, inc in enumerate(incs):
            rots[i + 1] = rots[i] @ inc
        f = np.einsum('nij,nj->ni', rots, accel)
        span = t[-1] - t[0]
        mean_f = (0.5 * (f[:-1] + f[1:]) * dt[:, None]).sum(axis=0) / span
        R_end = rots[-1]
    up = mean_f - (R_end @ np.asarray(v_end, float) - np.asarray(v_start, float)) / span
    roll = math.atan2(up[1], up[2])
    pitch = math.atan2(-up[0], math.hypot(up[1], up[2]))
    return rpy_to_rot(roll, pitch, 0.0)


def _skew(v):
    return np.array([[0.0, -v[2], v[1]], [v[2], 0.0, -v[0]], [-v[1], v[0], 0.0]])


@dataclass
class FilterResult:
    """Output of run_filter. Poses are T_odom_base; covariances 6x6 (position, rotation)."""

    scan_stamps: np.ndarray            # (K,)
    scan_poses: np.ndarray             # (K, 4, 4) at each scan stamp, after its relative pose
    scan_covs: np.ndarray              # (K, 6, 6)
    imu_stamps: np.ndarray             # (M,) accepted IMU samples after initialisation
    imu_poses: np.ndarray              # (M, 4, 4)
    speed: np.ndarray                  # (M,) estimated speed |v| [m/s]
    counts: dict = field(default_factory=dict)
    init_info: dict = field(default_factory=dict)


def run_filter(cfg: FilterConfig, stamps, accel, gyro, scan_stamps, rel_poses=None,
               rel_logvars=None, rel_mask=None, noise_model=None, true_velocity=None,
               precompute=True, initial_state=None) -> FilterResult:
    """Offline: run the online object over a sequence, with relative poses at zero latency.

    rel_poses (K-1, 6) are the motions between consecutive scan stamps (DESIGN §5), rel_logvars
    their log-variances, rel_mask (K-1,) False where a step is missing (camera and LiDAR gone);
    rel_poses None runs on the IMU alone. Scan k's pose is the state at its stamp after the
    relative pose ending there.
    """
    stamps = np.asarray(stamps, dtype=np.float64)
    accel = np.asarray(accel, dtype=np.float64)
    gyro = np.asarray(gyro, dtype=np.float64)
    scan_stamps = np.asarray(scan_stamps, dtype=np.float64)
    if accel.shape != (len(stamps), 3) or gyro.shape != (len(stamps), 3):
        raise ValueError(f'accel {accel.shape} and gyro {gyro.shape} must be ({len(stamps)}, 3)')
    k = len(scan_stamps)
    if rel_poses is not None:
        rel_poses = np.asarray(rel_poses, dtype=np.float64)
        rel_logvars = np.asarray(rel_logvars, dtype=np.float64)
        if rel_poses.shape != (k - 1, 6) or rel_logvars.shape != (k - 1, 6):
            raise ValueError(f'{k} scan stamps need ({k - 1}, 6) relative poses and log-variances,'
                             f' got {rel_poses.shape} and {rel_logvars.shape}')
        rel_mask = np.ones(k - 1, bool) if rel_mask is None else np.asarray(rel_mask, bool)
    pre = None
    if precompute and noise_model is not None:
        pre = precompute_noise(cfg, noise_model, stamps, accel, gyro)
    odo = InertialOdometry(cfg, noise_model, true_velocity, pre, initial_state)
    imu_t, imu_T, imu_speed = [], [], []
    next_scan = 0
    on_scan_clock = stamps + cfg.imu_time_offset_s
    for i in range(len(stamps)):
        # Scans up to this sample's stamp: those strictly before it are cloned while it is
        # propagated, one at its stamp right after.
        t_i = on_scan_clock[i]
        while next_scan < k and scan_stamps[next_scan] < t_i - STAMP_TOL:
            _scan_event(odo, scan_stamps, next_scan, rel_poses, rel_logvars, rel_mask)
            next_scan += 1
        if not odo.add_imu(stamps[i], accel[i], gyro[i]):
            continue
        while next_scan < k and scan_stamps[next_scan] <= t_i + STAMP_TOL:
            _scan_event(odo, scan_stamps, next_scan, rel_poses, rel_logvars, rel_mask)
            next_scan += 1
        if odo.initialised:
            R, p = odo.pose_world_imu()
            imu_t.append(t_i)
            imu_T.append(make_pose(R, p))
            imu_speed.append(float(np.linalg.norm(odo.ekf.v)))
    while next_scan < k:    # after the last sample: close() reaches those within max_gap_s
        _scan_event(odo, scan_stamps, next_scan, rel_poses, rel_logvars, rel_mask)
        next_scan += 1
    if not odo.initialised:
        raise ValueError(f'the filter never initialised: {odo.counts["imu_accepted"]} IMU samples '
                         f'accepted of {len(stamps)}')
    scan_poses = np.full((k, 4, 4), np.nan)
    scan_covs = np.full((k, 6, 6), np.nan)
    index = {float(t): j for j, t in enumerate(scan_stamps)}
    for stamp, T, cov in odo.close():
        j = index.get(stamp)
        if j is not None:
            scan_poses[j], scan_covs[j] = T, cov
    imu_T = np.asarray(imu_T).reshape(-1, 4, 4)
    imu_T = odo.T_world_odom_inv @ imu_T @ odo.T_imu_lidar
    return FilterResult(scan_stamps, scan_poses, scan_covs, np.asarray(imu_t), imu_T,
                        np.asarray(imu_speed), dict(odo.counts), dict(odo.init_info))


def _scan_event(odo, scan_stamps, j, rel_poses, rel_logvars, rel_mask):
    odo.add_scan(scan_stamps[j], clone=rel_poses is not None)
    if rel_poses is not None and j > 0 and rel_mask[j - 1]:
        odo.add_relative_pose(scan_stamps[j - 1], scan_stamps[j], rel_poses[j - 1],
                              rel_logvars[j - 1])


def precompute_noise(cfg: FilterConfig, noise_model, stamps, accel, gyro) -> dict:
    """Noise-model outputs for every valid-sample count at which the online object asks for
    them, computed in batches (same windows: the last `window` accepted samples)."""
    valid = np.zeros(len(stamps), bool)
    last = None
    for i in range(len(stamps)):
        valid[i] = screen_imu_sample(cfg, last, float(stamps[i]), accel[i], gyro[i]) is None
        if valid[i]:
            last = float(stamps[i])
    data = np.concatenate([accel, gyro], axis=1)[valid]
    n = noise_model.window
    counts = np.arange(1, len(data) + 1)
    every = [e for e in (cfg.nhc_every, cfg.speed_every) if e]
    due = np.zeros(len(data), bool)
    for e in every:
        due |= counts % e == 0
    due &= counts >= n
    ends = np.flatnonzero(due)
    out = {}
    if len(ends):
        windows = np.lib.stride_tricks.sliding_window_view(data, n, axis=0)  # (L-n+1, 6, n)
        batch = np.swapaxes(windows[ends - n + 1], 1, 2)
        pred = noise_model.predict(batch)
        for j, e in enumerate(ends):
            out[int(e) + 1] = {key: float(v[j]) for key, v in pred.items()}
    return out
