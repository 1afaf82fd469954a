"""Real KITTI IMU + ground truth for the filter: sequences, vehicle calibration, window labels.

Ground truth poses are cam0 poses converted to base_link with the sequence's Tr (DESIGN §3; the
nominal axis swap where the layout has no calib.txt, as kitti.odometry does). Everything fitted
here uses only the sequences it is given (the training sequences).
"""
from dataclasses import dataclass, replace
import logging
from pathlib import Path

import numpy as np
from scipy.spatial.transform import Rotation, Slerp

from mm_fusion_ros.eval.metrics import kitti_metrics, umeyama
from mm_fusion_ros.filter.odometry import run_filter
from mm_fusion_ros.geometry import base_link_to_cam0, rot_to_rpy, rpy_to_rot, so3_exp, so3_log
from mm_fusion_ros.kitti.odometry import KittiSequence

log = logging.getLogger(__name__)

MIN_SPEED_FOR_ALIGNMENT = 2.0   # [m/s] samples slower than this do not define the direction


@dataclass(frozen=True)
class ImuSequence:
    """One sequence: IMU samples, scan stamps and ground-truth T_odom_base at the scans."""

    name: str
    stamps: np.ndarray        # (M,) IMU stamps [s] on times.txt's clock
    accel: np.ndarray         # (M, 3)
    gyro: np.ndarray          # (M, 3)
    times: np.ndarray         # (K,) scan stamps
    gt_base: np.ndarray       # (K, 4, 4)
    tr: np.ndarray            # (4, 4) velodyne -> cam0 used for gt_base

    def frame_samples(self) -> np.ndarray:
        """(K,) index of the IMU sample at each scan stamp (nearest)."""
        idx = np.searchsorted(self.stamps, self.times)
        idx = np.clip(idx, 1, len(self.stamps) - 1)
        left = np.abs(self.stamps[idx - 1] - self.times) <= np.abs(self.stamps[idx] - self.times)
        return np.where(left, idx - 1, idx)


def load_imu_sequence(data_path, sequence, imu_path=None) -> ImuSequence:
    """A KITTI sequence with IMU and poses (imu_path: folder of NN.mat, default DATA/imu)."""
    data_path = Path(data_path)
    imu_path = Path(imu_path) if imu_path is not None else data_path / 'imu'
    seq = KittiSequence(data_path, sequence, imu_path=imu_path)
    imu = seq.imu
    if imu is None:
        raise FileNotFoundError(f'sequence {seq.sequence}: no IMU under {imu_path}')
    if not seq.has_poses:
        raise FileNotFoundError(f'{seq.poses_path}: sequence {seq.sequence} has no ground truth')
    return ImuSequence(seq.sequence, np.asarray(imu.stamps), np.asarray(imu.accel),
                       np.asarray(imu.gyro), np.asarray(seq.times), seq.poses_base, seq.Tr)


def gt_kinematics(seq: ImuSequence):
    """Per scan: body velocity and angular rate of base_link (central differences, base axes)."""
    pos = seq.gt_base[:, :3, 3]
    rot = seq.gt_base[:, :3, :3]
    t = seq.times
    v_w = np.gradient(pos, t, axis=0)
    v_b = np.einsum('nji,nj->ni', rot, v_w)
    rel = so3_log(np.swapaxes(rot[:-1], 1, 2) @ rot[1:]) / np.diff(t)[:, None]
    w_b = np.concatenate([rel[:1], 0.5 * (rel[:-1] + rel[1:]), rel[-1:]])
    return v_b, w_b


def _gyro_increments(seq: ImuSequence) -> np.ndarray:
    """(M-1, 3, 3) rotation over each IMU interval, trapezoidal rate, no bias removed."""
    dt = np.diff(seq.stamps)
    return so3_exp(0.5 * (seq.gyro[:-1] + seq.gyro[1:]) * dt[:, None])


def gyro_rotvecs(seq: ImuSequence) -> np.ndarray:
    """(K-1, 3) rotation vector of the gyro integral over each scan interval (imu axes)."""
    idx = seq.frame_samples()
    out = np.zeros((len(idx) - 1, 3))
    inc = _gyro_increments(seq)
    for k in range(len(idx) - 1):
        R = np.eye(3)
        for j in range(idx[k], idx[k + 1]):
            R = R @ inc[j]
        out[k] = so3_log(R)
    return out


def gyro_attitudes(seq: ImuSequence) -> np.ndarray:
    """(K, 3, 3) attitude at each scan from the plain gyro integral (no bias correction), from
    the ground truth's first one: issue 13's rotation baseline."""
    idx = seq.frame_samples()
    inc = _gyro_increments(seq)
    rots = np.empty((len(idx), 3, 3))
    R = seq.gt_base[0, :3, :3].copy()
    rots[0] = R
    for k in range(1, len(idx)):
        for j in range(idx[k - 1], idx[k]):
            R = R @ inc[j]
        rots[k] = R
    return rots


def gyro_r_rel(seq: ImuSequence, offset_s: float = 0.0) -> float:
    """KITTI r_rel [deg/100 m] of the plain gyro integral with the IMU stamps moved by offset_s
    (the filter's imu_time_offset_s: the gyro on the filter's own clock). r_rel compares
    relative rotations only, so the positions are the ground truth's."""
    shifted = on_scan_clock(seq, offset_s)
    poses = seq.gt_base.copy()
    poses[:, :3, :3] = gyro_attitudes(shifted)
    return kitti_metrics(base_link_to_cam0(seq.gt_base, seq.tr),
                         base_link_to_cam0(poses, seq.tr))['r_rel']


def on_scan_clock(seq: ImuSequence, offset_s: float) -> ImuSequence:
    """The sequence with its IMU stamps moved onto the scans' clock (FilterConfig
    imu_time_offset_s): what the filter sees, for fits and labels that index IMU samples."""
    return replace(seq, stamps=seq.stamps + offset_s) if offset_s else seq


def fit_imu_time_offset(seqs, search_s=0.2, step_s=0.005) -> tuple:
    """(offset [s], {'%+.3f' offset: cost}): the IMU clock's offset to the scans' (added to the IMU
    stamps), where the gyro integral's rotation angle over each scan interval best matches the
    ground truth's (RMS over all intervals of seqs; the angle needs no IMU-to-base rotation).
    Grid over +-search_s, refined by a parabola through the best point and its neighbours."""
    integrals = []
    for seq in seqs:
        dt = np.diff(seq.stamps)
        inc = Rotation.from_rotvec(0.5 * (seq.gyro[:-1] + seq.gyro[1:]) * dt[:, None])
        rots = [Rotation.identity()]
        for r in inc:       # left to right: R_k = R_(k-1) exp(w dt)
            rots.append(rots[-1] * r)
        rel = np.swapaxes(seq.gt_base[:-1, :3, :3], 1, 2) @ seq.gt_base[1:, :3, :3]
        integrals.append((seq, Slerp(seq.stamps, Rotation.concatenate(rots)),
                          np.linalg.norm(so3_log(rel), axis=1)))
    offsets = np.arange(-search_s, search_s + 0.5 * step_s, step_s)
    costs = []
    for off in offsets:
        err, n = 0.0, 0
        for seq, slerp, angle in integrals:
            t = seq.times - off                    # each scan's stamp on the IMU clock
            inside = (t >= seq.stamps[0]) & (t <= seq.stamps[-1])
            both = inside[:-1] & inside[1:]
            R = slerp(np.clip(t, seq.stamps[0], seq.stamps[-1]))
            gyro_angle = (R[:-1].inv() * R[1:]).magnitude()
            err += float(np.sum((gyro_angle[both] - angle[both]) ** 2))
            n += int(both.sum())
        costs.append(np.sqrt(err / max(n, 1)))
    costs = np.asarray(costs)
    i = int(np.argmin(costs))
    best = float(offsets[i])
    if 0 < i < len(costs) - 1:
        c0, c1, c2 = costs[i - 1:i + 2]
        curve = c0 - 2 * c1 + c2
        if curve > 0:
            best += float(0.5 * step_s * (c0 - c2) / curve)
    if i in (0, len(costs) - 1):
        log.warning('IMU time offset at the edge of the search (%+.3f s): widen it', best)
    log.info('IMU time offset %+.4f s (gyro vs ground-truth rotation per scan interval: RMS '
             '%.2e rad there, %.2e at 0)', best, costs[i],
             costs[int(np.argmin(np.abs(offsets)))])
    return float(best), {f'{o:+.3f}': float(c) for o, c in zip(offsets, costs)}


@dataclass(frozen=True)
class VehicleCalibration:
    """Fitted on training sequences: IMU axes vs base_link, and the vehicle's motion frame."""

    R_base_imu: np.ndarray     # (3, 3) hand-eye rotation of imu_link in base_link
    nhc_rpy_deg: tuple         # vehicle motion frame in the imu frame
    nhc_point_base: np.ndarray  # (3,) point of least side slip, base axes, from base_link
    slip_s: float = 0.0        # lateral velocity per v omega_z of the motion frame [s]


def fit_vehicle_calibration(seqs) -> VehicleCalibration:
    """Hand-eye rotation from gyro vs GT rotations, then the mean velocity direction in imu axes
    (the motion frame of the pseudo-measurements) and the point of least lateral slip."""
    a, b, v_all, w_all = [], [], [], []
    for seq in seqs:
        a.append(gyro_rotvecs(seq))
        rel = np.swapaxes(seq.gt_base[:-1, :3, :3], 1, 2) @ seq.gt_base[1:, :3, :3]
        b.append(so3_log(rel))
        v_b, w_b = gt_kinematics(seq)
        v_all.append(v_b)
        w_all.append(w_b)
    a, b = np.concatenate(a), np.concatenate(b)
    turning = np.linalg.norm(b, axis=1) > 0.01
    if turning.sum() < 10:
        raise ValueError('too few turns in the calibration sequences to fit the IMU rotation')
    R_base_imu, _, _ = umeyama(a[turning], b[turning])
    v_b, w_b = np.concatenate(v_all), np.concatenate(w_all)
    moving = np.linalg.norm(v_b, axis=1) > MIN_SPEED_FOR_ALIGNMENT
    # Point r (base axes) whose lateral and vertical velocity v + w x r is smallest.
    skew_rows = np.zeros((moving.sum(), 3, 3))
    w = w_b[moving]
    skew_rows[:, 0, 1], skew_rows[:, 0, 2] = -w[:, 2], w[:, 1]
    skew_rows[:, 1, 0], skew_rows[:, 1, 2] = w[:, 2], -w[:, 0]
    skew_rows[:, 2, 0], skew_rows[:, 2, 1] = -w[:, 1], w[:, 0]
    A = np.concatenate([skew_rows[:, 1], skew_rows[:, 2]])
    y = -np.concatenate([v_b[moving, 1], v_b[moving, 2]])
    point, *_ = np.linalg.lstsq(A, y, rcond=None)
    point[2] = 0.0   # vertical offset is not identified by planar driving
    v_nhc = v_b[moving] + np.cross(w, point)
    v_imu = v_nhc @ R_base_imu   # R^T v, row-wise
    yaw = float(np.arctan(np.median(v_imu[:, 1] / v_imu[:, 0])))
    pitch = float(-np.arctan(np.median(v_imu[:, 2] / v_imu[:, 0])))
    rpy = (0.0, float(np.degrees(pitch)), float(np.degrees(yaw)))
    # Sideslip: lateral velocity of the motion frame against v omega_z (centripetal
    # acceleration), least squares per sequence, the median over the sequences (one sequence
    # with a poor ground truth must not set the sign).
    R_ic = rpy_to_rot(*np.radians(rpy))
    per_seq = []
    for v_s, w_s in zip(v_all, w_all):
        keep = np.linalg.norm(v_s, axis=1) > MIN_SPEED_FOR_ALIGNMENT
        v_car = (v_s[keep] + np.cross(w_s[keep], point)) @ R_base_imu @ R_ic
        w_car = w_s[keep] @ R_base_imu @ R_ic
        a_c = v_car[:, 0] * w_car[:, 2]
        if a_c @ a_c > 0:
            per_seq.append(float(a_c @ v_car[:, 1] / (a_c @ a_c)))
    slip = float(np.median(per_seq)) if per_seq else 0.0
    log.info('vehicle calibration: imu in base rpy %s deg, motion frame rpy %s deg, no-slip '
             'point %s m, sideslip %.4f s (per sequence %s)',
             np.degrees(rot_to_rpy(R_base_imu)).round(3), np.round(rpy, 3), point.round(3),
             slip, np.round(per_seq, 4))
    return VehicleCalibration(R_base_imu, rpy, point, slip)


@dataclass(frozen=True)
class WindowSet:
    """IMU windows ending at scan stamps, with their ground-truth labels."""

    windows: np.ndarray        # (B, W, 6) float32
    lateral: np.ndarray        # (B,) lateral velocity of the vehicle frame [m/s]
    vertical: np.ndarray       # (B,) vertical velocity
    speed: np.ndarray          # (B,) forward speed at the window end
    speed0: np.ndarray         # (B,) forward speed at the window start


def window_labels(seq: ImuSequence, calib: VehicleCalibration, window: int, every=1,
                  max_windows=0) -> WindowSet:
    """Windows of `window` samples ending at every `every`-th scan (those with a full window)."""
    v_b, w_b = gt_kinematics(seq)
    v_nhc = v_b + np.cross(w_b, calib.nhc_point_base)
    R_ic = rpy_to_rot(*np.radians(calib.nhc_rpy_deg))
    v_car = v_nhc @ calib.R_base_imu @ R_ic          # R_ic^T R_base_imu^T v, row-wise
    ends = seq.frame_samples()
    keep = np.flatnonzero(ends >= window - 1)[::max(1, every)]
    if max_windows and len(keep) > max_windows:
        keep = keep[np.linspace(0, len(keep) - 1, max_windows).round().astype(int)]
    data = np.concatenate([seq.accel, seq.gyro], axis=1).astype(np.float32)
    view = np.lib.stride_tricks.sliding_window_view(data, window, axis=0)   # (M-W+1, 6, W)
    windows = np.ascontiguousarray(np.swapaxes(view[ends[keep] - window + 1], 1, 2))
    starts = seq.stamps[ends[keep] - window + 1]
    speed0 = np.interp(starts, seq.times, v_car[:, 0])
    return WindowSet(windows, v_car[keep, 1], v_car[keep, 2], v_car[keep, 0], speed0)


def concat_windows(sets) -> WindowSet:
    return WindowSet(*(np.concatenate([getattr(s, f) for s in sets])
                       for f in ('windows', 'lateral', 'vertical', 'speed', 'speed0')))


def initial_body_velocity(seq: ImuSequence, R_base_imu=None) -> np.ndarray:
    """Ground-truth velocity at the first scan in imu axes (for init_source true_velocity):
    the first step's displacement over its duration, in the first base_link frame."""
    step = (seq.gt_base[1, :3, 3] - seq.gt_base[0, :3, 3]) / (seq.times[1] - seq.times[0])
    v0 = seq.gt_base[0, :3, :3].T @ step
    return v0 if R_base_imu is None else R_base_imu.T @ v0


def run_on_sequence(seq: ImuSequence, cfg, noise_model=None, rel=None):
    """Run the filter over a sequence's IMU with scans at times.txt; (FilterResult, cam0 poses,
    KITTI metrics). The true initial velocity is passed only when cfg.init_source asks for it.
    rel: optional (rel_poses, rel_logvars, rel_mask) of the fusion network per scan step."""
    true_v = initial_body_velocity(seq) if cfg.init_source == 'true_velocity' else None
    rel_poses, rel_logvars, rel_mask = rel if rel is not None else (None, None, None)
    res = run_filter(cfg, seq.stamps, seq.accel, seq.gyro, seq.times, rel_poses, rel_logvars,
                     rel_mask, noise_model=noise_model, true_velocity=true_v)
    if not np.isfinite(res.scan_poses).all():
        missing = np.flatnonzero(~np.isfinite(res.scan_poses).all(axis=(1, 2)))
        raise ValueError(f'sequence {seq.name}: no filter pose at {len(missing)} scans '
                         f'(first {missing[:5].tolist()})')
    pred_base = seq.gt_base[0] @ res.scan_poses
    pred_cam0 = base_link_to_cam0(pred_base, seq.tr)
    gt_cam0 = base_link_to_cam0(seq.gt_base, seq.tr)
    return res, pred_cam0, kitti_metrics(gt_cam0, pred_cam0)
