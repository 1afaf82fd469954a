"""Strict KITTI pose-file reader and writer (numpy + geometry only).

A KITTI pose file has one line per frame: the row-major 3x4 [R|t] of cam0 at that frame in cam0 of
frame 0 (DESIGN §2). The reader refuses anything else and names the file and line, because a
silently mis-parsed trajectory yields plausible but wrong metrics.
"""
import logging
from pathlib import Path

import numpy as np

from mm_fusion_ros.fileio import atomic_write_text
from mm_fusion_ros.geometry import base_link_to_cam0

log = logging.getLogger(__name__)

# KITTI GT rotations are orthonormal to ~3e-7; %e printing of predictions stays well under this.
ORTHONORMALITY_TOL = 1e-3


def _parse_line(path, lineno: int, line: str) -> np.ndarray:
    fields = line.split()
    if len(fields) != 12:
        raise ValueError(f'{path}:{lineno}: expected 12 numbers (row-major 3x4 [R|t]), '
                         f'got {len(fields)}')
    try:
        values = np.array([float(f) for f in fields])
    except ValueError as e:
        raise ValueError(f'{path}:{lineno}: not a number in {line.strip()!r}') from e
    if not np.isfinite(values).all():
        raise ValueError(f'{path}:{lineno}: non-finite value in {line.strip()!r}')
    return values


def _check_rotations(path, rots: np.ndarray) -> None:
    """Vectorised check; the error names the first bad line."""
    err = np.max(np.abs(rots @ np.swapaxes(rots, -1, -2) - np.eye(3)), axis=(-2, -1))
    det = np.linalg.det(rots)
    bad = np.flatnonzero((err > ORTHONORMALITY_TOL) | (det < 0))
    if bad.size == 0:
        return
    i = int(bad[0])
    if err[i] > ORTHONORMALITY_TOL:
        raise ValueError(f'{path}:{i + 1}: rotation block is not orthonormal '
                         f'(max |R R^T - I| = {err[i]:.3g} > {ORTHONORMALITY_TOL:g})')
    raise ValueError(f'{path}:{i + 1}: rotation block is a reflection (det = {det[i]:.3g})')


def parse_kitti_poses(text: str, source='<string>') -> np.ndarray:
    """Parse KITTI pose text into (N, 4, 4); errors name `source` and the 1-based line."""
    lines = text.splitlines()
    while lines and not lines[-1].strip():       # trailing blank lines only
        lines.pop()
    if not lines:
        raise ValueError(f'{source}: no poses (empty file)')
    poses = np.zeros((len(lines), 4, 4))
    poses[:, 3, 3] = 1.0
    for i, line in enumerate(lines):
        if not line.strip():
            raise ValueError(f'{source}:{i + 1}: empty line inside the pose list')
        poses[i, :3, :] = _parse_line(source, i + 1, line).reshape(3, 4)
    _check_rotations(source, poses[:, :3, :3])
    return poses


def read_kitti_poses(path) -> np.ndarray:
    """Read a KITTI pose file strictly: (N, 4, 4) float64."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'pose file {path} not found')
    try:
        text = path.read_text(encoding='ascii')
    except UnicodeDecodeError as e:
        raise ValueError(f'{path}: not an ASCII KITTI pose file') from e
    return parse_kitti_poses(text, source=path)


def format_kitti_poses(poses, fmt='%.12e') -> str:
    """(N, 4, 4) or (N, 3, 4) poses -> KITTI text, one 12-number line per pose."""
    poses = np.asarray(poses, dtype=np.float64)
    if poses.ndim != 3 or poses.shape[1:] not in ((4, 4), (3, 4)):
        raise ValueError(f'poses must be (N, 4, 4) or (N, 3, 4), got {poses.shape}')
    if not np.isfinite(poses).all():
        bad = int(np.argwhere(~np.isfinite(poses).reshape(len(poses), -1).all(axis=1))[0, 0])
        raise ValueError(f'pose {bad} has non-finite values')
    rows = poses[:, :3, :].reshape(len(poses), 12)
    return ''.join(' '.join(fmt % v for v in row) + '\n' for row in rows)


def write_kitti_poses(path, poses, fmt='%.12e') -> Path:
    """Write poses in KITTI format atomically (fileio); returns the path."""
    path = Path(path)
    text = format_kitti_poses(poses, fmt)
    atomic_write_text(path, text, encoding='ascii')
    log.debug('wrote %d poses to %s', len(text.splitlines()), path)
    return path


def check_same_length(gt_path, gt, pred_path, pred) -> None:
    """ValueError naming both files when a prediction does not have one pose per GT frame."""
    if len(gt) != len(pred):
        raise ValueError(f'ground truth {gt_path} has {len(gt)} poses but prediction '
                         f'{pred_path} has {len(pred)}; they must match frame for frame')


def base_link_poses_to_cam0(poses_base, tr_velo_to_cam):
    """Predictions in odom/base_link -> KITTI cam0 poses, with the sequence's Tr (DESIGN §3)."""
    tr = np.asarray(tr_velo_to_cam, dtype=np.float64)
    if tr.shape == (3, 4):
        tr = np.vstack([tr, [0.0, 0.0, 0.0, 1.0]])
    if tr.shape != (4, 4):
        raise ValueError(f'Tr must be 3x4 or 4x4, got {tr.shape}')
    return base_link_to_cam0(poses_base, tr)


# --- online trajectories: KITTI pose files plus a per-pose sidecar -----------------------------
# The online node writes each trajectory segment as KITTI pose files (predicted, and ground truth
# where every pose has it) and, beside the predicted one, NAME.steps.csv: one row per pose with
# its stamp, its segment and whether the step into it was bridged. Segment 0 keeps the plain
# names (pred_base_link.txt); segment k >= 1 adds `.segK` (pred_base_link.seg1.txt). segments.csv
# in the same folder lists the segments and why each one started (start, rewind, gap).
STEPS_SUFFIX = '.steps.csv'
STEPS_HEADER = 'index,stamp_ns,segment,bridged,ground_truth'
SEGMENTS_FILE = 'segments.csv'
SEGMENTS_HEADER = 'segment,reason,first_stamp_ns,last_stamp_ns,poses,bridged,pred,gt'


def steps_path(pose_path) -> Path:
    """pred_base_link.txt -> pred_base_link.steps.csv."""
    pose_path = Path(pose_path)
    return pose_path.with_name(pose_path.stem + STEPS_SUFFIX)


def segment_file_name(stem: str, segment: int) -> str:
    return f'{stem}.txt' if segment == 0 else f'{stem}.seg{segment}.txt'


def write_steps(path, stamps_ns, segment: int, bridged, ground_truth) -> Path:
    rows = [STEPS_HEADER] + [f'{i},{int(s)},{segment},{int(b)},{int(g)}' for i, (s, b, g) in
                             enumerate(zip(stamps_ns, bridged, ground_truth))]
    return atomic_write_text(path, '\n'.join(rows) + '\n', encoding='ascii')


def read_steps(path) -> dict:
    """A steps sidecar -> {'stamp_ns', 'segment', 'bridged', 'ground_truth'} arrays; errors name
    the file and line."""
    path = Path(path)
    lines = path.read_text(encoding='ascii').splitlines()
    if not lines or lines[0].strip() != STEPS_HEADER:
        raise ValueError(f'{path}:1: expected the header {STEPS_HEADER!r}')
    rows = []
    for lineno, line in enumerate(lines[1:], start=2):
        fields = line.split(',')
        try:
            values = [int(v) for v in fields]
        except ValueError as e:
            raise ValueError(f'{path}:{lineno}: not integers: {line.strip()!r}') from e
        if len(values) != 5 or values[0] != lineno - 2 or not {values[3], values[4]} <= {0, 1}:
            raise ValueError(f'{path}:{lineno}: expected index {lineno - 2}, stamp, segment and '
                             f'two 0/1 flags, got {line.strip()!r}')
        rows.append(values)
    table = np.array(rows, dtype=np.int64).reshape(-1, 5)
    return {'stamp_ns': table[:, 1], 'segment': table[:, 2], 'bridged': table[:, 3].astype(bool),
            'ground_truth': table[:, 4].astype(bool)}


def write_segment(out_dir, segment: int, stamps_ns, poses, bridged, gt=None,
                  gt_valid=None) -> dict:
    """One segment's files in out_dir: predicted poses, their steps sidecar (gt_valid: which
    poses had ground truth) and, when given, the ground-truth poses.
    -> {'pred': path, 'steps': path[, 'gt': path]}."""
    out_dir = Path(out_dir)
    pred = write_kitti_poses(out_dir / segment_file_name('pred_base_link', segment), poses)
    valid = np.full(len(poses), gt is not None) if gt_valid is None else \
        np.asarray(gt_valid, dtype=bool)
    written = {'pred': pred,
               'steps': write_steps(steps_path(pred), stamps_ns, segment, bridged, valid)}
    if gt is not None:
        written['gt'] = write_kitti_poses(out_dir / segment_file_name('gt_base_link', segment),
                                          gt)
    return written


def write_segments_index(out_dir, rows) -> Path:
    """segments.csv from dicts with the SEGMENTS_HEADER keys."""
    keys = SEGMENTS_HEADER.split(',')
    lines = [SEGMENTS_HEADER] + [','.join(str(r.get(k, '')) for k in keys) for r in rows]
    return atomic_write_text(Path(out_dir) / SEGMENTS_FILE, '\n'.join(lines) + '\n')
