"""Odometry metrics (numpy only): KITTI devkit segment errors, ATE and RPE.

- `kitti_metrics` follows the KITTI odometry devkit (evaluate_odometry.cpp): segments of 100..800
  m of ground-truth path length, a first frame every 10 frames, the last frame the first one whose
  path distance exceeds first + length, errors of inv(delta_pred) * delta_gt over the length. Done
  for all segments at once instead of the devkit's per-segment loop, with the devkit's formulas
  (general 4x4 inverse, acos of the clamped trace) so the numbers match it.
- `ate` and `rpe` follow evo (evo/core/metrics.py, geometry.umeyama_alignment) with its defaults:
  Umeyama alignment of the estimate onto the reference, RPE over consecutive pairs
  (all_pairs=False), pairs chosen on the estimate's path for a delta in metres
  (pairs_from_reference=False), rotation errors as the angle of the nearest rotation in degrees
  (evo's rotation_angle_deg).
"""
from dataclasses import dataclass
import math

import numpy as np

SEGMENT_LENGTHS = (100, 200, 300, 400, 500, 600, 700, 800)
STEP_SIZE = 10
RPE_UNITS = ('frames', 'm')


def _check_pair(gt, pred):
    gt = np.asarray(gt, dtype=np.float64)
    pred = np.asarray(pred, dtype=np.float64)
    for name, arr in (('gt', gt), ('pred', pred)):
        if arr.ndim != 3 or arr.shape[1:] != (4, 4):
            raise ValueError(f'{name} poses must be (N, 4, 4), got {arr.shape}')
    if len(gt) != len(pred):
        raise ValueError(f'gt has {len(gt)} poses but pred has {len(pred)}')
    if len(gt) < 2:
        raise ValueError(f'need at least 2 poses, got {len(gt)}')
    return gt, pred


def trajectory_distances(poses) -> np.ndarray:
    """Path length from frame 0 to each frame, summed exactly as the devkit does."""
    pos = np.asarray(poses, dtype=np.float64)[:, :3, 3]
    d = np.diff(pos, axis=0)
    steps = np.sqrt(d[:, 0] * d[:, 0] + d[:, 1] * d[:, 1] + d[:, 2] * d[:, 2])
    return np.concatenate([[0.0], np.cumsum(steps)])


@dataclass(frozen=True)
class SegmentErrors:
    """One entry per evaluated segment (devkit's errors vector)."""

    first: np.ndarray       # (S,) first frame
    last: np.ndarray        # (S,) last frame
    length: np.ndarray      # (S,) nominal segment length [m]
    t_err: np.ndarray       # (S,) translation error / length [m/m]
    r_err: np.ndarray       # (S,) rotation error / length [rad/m]


def segment_pairs(gt, lengths=SEGMENT_LENGTHS, step_size=STEP_SIZE):
    """(first, last, length) of every devkit segment, lengths in the order given."""
    dist = trajectory_distances(gt)
    firsts = np.arange(0, len(dist), step_size)
    out = []
    for length in lengths:
        # First index whose distance exceeds dist[first] + length (lastFrameFromSegmentLength).
        last = np.searchsorted(dist, dist[firsts] + length, side='right')
        ok = last < len(dist)
        out.append((firsts[ok], last[ok], np.full(int(ok.sum()), float(length))))
    if not out:
        raise ValueError('lengths must not be empty')
    return tuple(np.concatenate(parts) for parts in zip(*out))


def segment_errors(gt, pred, lengths=SEGMENT_LENGTHS, step_size=STEP_SIZE) -> SegmentErrors:
    """Devkit calcSequenceErrors, vectorised over all segments."""
    gt, pred = _check_pair(gt, pred)
    first, last, length = segment_pairs(gt, lengths, step_size)
    inv = np.linalg.inv   # the devkit inverts with a general matrix inverse, not R^T
    delta_gt = inv(gt[first]) @ gt[last]
    delta_pred = inv(pred[first]) @ pred[last]
    err = inv(delta_pred) @ delta_gt
    t = err[:, :3, 3]
    t_err = np.sqrt(t[:, 0] * t[:, 0] + t[:, 1] * t[:, 1] + t[:, 2] * t[:, 2])
    cos = 0.5 * (err[:, 0, 0] + err[:, 1, 1] + err[:, 2, 2] - 1.0)
    r_err = np.arccos(np.clip(cos, -1.0, 1.0))
    return SegmentErrors(first, last, length, t_err / length, r_err / length)


def _t_rel(t_err):
    return float(np.mean(t_err) * 100.0) if len(t_err) else math.nan


def _r_rel(r_err):
    return float(np.mean(r_err) * 180.0 / np.pi * 100.0) if len(r_err) else math.nan


def kitti_metrics(gt, pred, lengths=SEGMENT_LENGTHS, step_size=STEP_SIZE) -> dict:
    """t_rel [%] and r_rel [deg/100 m] averaged over all segments, plus a per-length breakdown.

    A trajectory shorter than the shortest length has no segments: t_rel and r_rel are NaN.
    """
    seg = segment_errors(gt, pred, lengths, step_size)
    per_length = {}
    for length in lengths:
        sel = seg.length == float(length)
        per_length[int(length)] = {'t_rel': _t_rel(seg.t_err[sel]),
                                   'r_rel': _r_rel(seg.r_err[sel]),
                                   'count': int(sel.sum())}
    return {'t_rel': _t_rel(seg.t_err), 'r_rel': _r_rel(seg.r_err),
            'num_segments': len(seg.t_err), 'per_length': per_length}


def umeyama(src, dst, with_scale=False):
    """Least-squares (R, t, s) with dst ~ s R src + t for (N, 3) point sets (Umeyama 1991)."""
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 3:
        raise ValueError(f'point sets must both be (N, 3), got {src.shape} and {dst.shape}')
    mean_src, mean_dst = src.mean(axis=0), dst.mean(axis=0)
    src_c, dst_c = src - mean_src, dst - mean_dst
    var_src = np.sum(src_c * src_c) / len(src)
    cov = dst_c.T @ src_c / len(src)
    u, d, vt = np.linalg.svd(cov)
    if np.count_nonzero(d > np.finfo(d.dtype).eps) < 2:
        raise ValueError('degenerate point set (collinear or constant): cannot align')
    sign = np.eye(3)
    if np.linalg.det(u) * np.linalg.det(vt) < 0.0:
        sign[2, 2] = -1.0   # keep a right-handed rotation (Kabsch)
    rot = u @ sign @ vt
    scale = float(np.trace(np.diag(d) @ sign) / var_src) if with_scale else 1.0
    trans = mean_dst - scale * rot @ mean_src
    return rot, trans, scale


def ate(gt, pred, with_scale=False) -> float:
    """RMSE [m] of position errors after SE(3) (or Sim(3) with_scale) Umeyama alignment."""
    gt, pred = _check_pair(gt, pred)
    rot, trans, scale = umeyama(pred[:, :3, 3], gt[:, :3, 3], with_scale)
    aligned = scale * pred[:, :3, 3] @ rot.T + trans
    err = np.linalg.norm(aligned - gt[:, :3, 3], axis=1)
    return float(np.sqrt(np.mean(err * err)))


def rotation_angle(rot) -> np.ndarray:
    """Angle [rad] of (..., 3, 3) matrices, taken of the nearest rotation as evo/scipy do.

    Products of KITTI poses are orthonormal only to ~1e-7, which would swamp the angle of a small
    error if the trace were used raw; projecting onto SO(3) first (U V^T) avoids that.
    """
    rot = np.asarray(rot, dtype=np.float64)
    u, _, vt = np.linalg.svd(rot)
    r = u @ vt
    vee = np.stack([r[..., 2, 1] - r[..., 1, 2], r[..., 0, 2] - r[..., 2, 0],
                    r[..., 1, 0] - r[..., 0, 1]], axis=-1)
    trace = r[..., 0, 0] + r[..., 1, 1] + r[..., 2, 2]
    return np.arctan2(0.5 * np.linalg.norm(vee, axis=-1), 0.5 * (trace - 1.0))


def _rigid_inverse(poses):
    rot_t = np.swapaxes(poses[..., :3, :3], -1, -2)
    out = np.zeros_like(poses)
    out[..., :3, :3] = rot_t
    out[..., :3, 3] = -(rot_t @ poses[..., :3, 3:4])[..., 0]
    out[..., 3, 3] = 1.0
    return out


def _path_pairs(positions, delta):
    """evo's filter_pairs_by_path (consecutive): a new id once the path since the last >= delta."""
    steps = np.linalg.norm(np.diff(positions, axis=0), axis=1).tolist()
    ids, path = [0], 0.0
    for i, step in enumerate(steps, start=1):
        path += step
        if path >= delta:
            ids.append(i)
            path = 0.0
    return np.asarray(ids, dtype=np.int64)


def rpe_pairs(gt, pred, delta, unit='frames', pairs_from_reference=False) -> np.ndarray:
    """(K, 2) index pairs evo's RPE compares for this delta (consecutive pairs)."""
    if unit not in RPE_UNITS:
        raise ValueError(f'RPE unit {unit!r} not understood; choose one of {RPE_UNITS}')
    if unit == 'frames':
        if delta < 1 or int(delta) != delta:
            raise ValueError(f'RPE delta in frames must be a positive integer, got {delta}')
        ids = np.arange(0, len(gt), int(delta))
    else:
        if not delta > 0:
            raise ValueError(f'RPE delta in metres must be positive, got {delta}')
        ids = _path_pairs((gt if pairs_from_reference else pred)[:, :3, 3], float(delta))
    if len(ids) < 2:
        raise ValueError(f'RPE delta {delta} {unit} gives no pose pair on a trajectory of '
                         f'{len(gt)} poses; use a smaller delta')
    return np.stack([ids[:-1], ids[1:]], axis=1)


@dataclass(frozen=True)
class RpeResult:
    pairs: np.ndarray       # (K, 2) compared frame indices
    trans: np.ndarray       # (K,) translation error [m]
    rot_deg: np.ndarray     # (K,) rotation error [deg]

    @property
    def trans_rmse(self) -> float:
        return float(np.sqrt(np.mean(self.trans * self.trans)))

    @property
    def rot_rmse(self) -> float:
        return float(np.sqrt(np.mean(self.rot_deg * self.rot_deg)))


def rpe(gt, pred, delta=1, unit='frames', pairs_from_reference=False) -> RpeResult:
    """Relative pose error E = inv(gt_i^-1 gt_j) (pred_i^-1 pred_j) over evo's pairs."""
    gt, pred = _check_pair(gt, pred)
    pairs = rpe_pairs(gt, pred, delta, unit, pairs_from_reference)
    i, j = pairs[:, 0], pairs[:, 1]
    rel_gt = _rigid_inverse(gt[i]) @ gt[j]
    rel_pred = _rigid_inverse(pred[i]) @ pred[j]
    err = _rigid_inverse(rel_gt) @ rel_pred
    return RpeResult(pairs, np.linalg.norm(err[:, :3, 3], axis=1),
                     np.rad2deg(rotation_angle(err[:, :3, :3])))


def late_step_errors(gt, pred, start_fraction=0.5) -> dict:
    """Mean per-step (one frame) translation [m] and rotation [deg] error over the poses from
    `start_fraction` of the trajectory on: how well a model that adapts online does once it
    has adapted (its first steps are those of the model it started from)."""
    rel = rpe(gt, pred, 1)
    late = rel.pairs[:, 0] >= int(start_fraction * (len(rel.pairs) + 1))
    return {'trans': float(rel.trans[late].mean()), 'rot_deg': float(rel.rot_deg[late].mean()),
            'steps': int(late.sum())}


def evaluate(gt, pred, rpe_delta=1, rpe_unit='frames') -> dict:
    """Every headline number for one sequence, keyed as the evaluate_odometry JSON."""
    gt, pred = _check_pair(gt, pred)
    kitti = kitti_metrics(gt, pred)
    rel = rpe(gt, pred, rpe_delta, rpe_unit)
    return {'t_rel': kitti['t_rel'], 'r_rel': kitti['r_rel'],
            'ate': ate(gt, pred), 'ate_sim3': ate(gt, pred, with_scale=True),
            'rpe_trans': rel.trans_rmse, 'rpe_rot': rel.rot_rmse,
            'rpe_delta': rpe_delta, 'rpe_unit': rpe_unit,
            'per_length': kitti['per_length'], 'num_segments': kitti['num_segments'],
            'num_poses': len(gt)}
