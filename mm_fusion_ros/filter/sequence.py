"""The inertial filter over one whole KITTI sequence, under the network's relative poses
(predict_odometry --filter on, bench/filter_outage.py).

Scans are the sequence's frames (times.txt); the filter runs over the sequence's IMU (every
source kitti.imu reads) with the network's step k-1 -> k as a relative-pose update where
`valid` says the network predicted it, and bridges the other steps on the IMU and its
pseudo-measurements. Output poses are T_base0_base (the first frame's base_link is the
identity), as the network's chained steps are.
"""
from dataclasses import dataclass
import logging
import math

import numpy as np

from mm_fusion_ros.filter.config import FilterConfig, matrix_to_3x4
from mm_fusion_ros.filter.odometry import FilterResult, run_filter, STAMP_TOL
from mm_fusion_ros.geometry import invert_pose
from mm_fusion_ros.kitti.imu import require_sequence_imu

log = logging.getLogger(__name__)


def outage_steps(times, windows) -> np.ndarray:
    """(K-1,) bool: step k-1 -> k touches an outage window (start, duration): one of its two
    frames, or the time between them, lies in [start, start + duration]."""
    times = np.asarray(times, dtype=np.float64)
    out = np.zeros(max(len(times) - 1, 0), dtype=bool)
    for start, duration in windows:
        out |= (times[1:] >= start) & (times[:-1] <= start + duration)
    return out


def sequence_filter_config(cfg: FilterConfig, seq) -> FilterConfig:
    """The filter's base_link pose in the IMU frame from the sequence's calib_imu_to_velo.txt
    where it has one (synthetic and hybrid sequences); else the checkpoint's (identity for the
    .mat IMU, whose axes are the vehicle's)."""
    if seq.T_base_imu is None:
        return cfg
    return cfg.replace(T_imu_lidar=matrix_to_3x4(invert_pose(seq.T_base_imu)))


def check_imu_covers(imu, times, sequence, cfg: FilterConfig = None):
    """ValueError naming the IMU source when it does not span every frame of the sequence, on
    the scans' clock (cfg.imu_time_offset_s); the filter reaches frames up to cfg.max_gap_s after
    the last sample."""
    if len(imu) < 2:
        raise ValueError(f'{imu.source}: {len(imu)} IMU samples for sequence {sequence}; the '
                         'filter needs the IMU over the whole sequence')
    offset, reach = (cfg.imu_time_offset_s, cfg.max_gap_s) if cfg is not None else (0.0, 0.0)
    first, last = float(imu.stamps[0]) + offset, float(imu.stamps[-1]) + offset
    if first > times[0] + STAMP_TOL or last < times[-1] - max(STAMP_TOL, reach):
        raise ValueError(f'{imu.source}: the IMU spans {first:.3f}-{last:.3f} s but sequence '
                         f'{sequence} has frames from {times[0]:.3f} to {times[-1]:.3f} s '
                         '(times.txt); the filter needs the IMU over every frame')


@dataclass
class SequenceFilterRun:
    poses: np.ndarray          # (K, 4, 4) T_base0_base at each frame
    result: FilterResult       # the filter's own output (odom = base_link at the first IMU sample)
    updates: int               # relative poses given to the filter
    bridged: int               # steps bridged on the IMU (not predicted, or in an outage)


def filter_sequence(seq, cfg: FilterConfig, noise_model, steps=None, logvars=None, valid=None,
                    var_scale=1.0, min_logvar=None) -> SequenceFilterRun:
    """Run the filter over `seq` (a KittiSequence). steps/logvars (K-1, 6): the network's mean
    and log-variance per step (DESIGN §5 6-vector of base_link); valid (K-1,) bool: the steps
    to use; var_scale multiplies their variance, min_logvar (6,) floors it (after the scale).
    steps None: the IMU alone."""
    times = np.asarray(seq.times, dtype=np.float64)
    imu = require_sequence_imu(seq)
    check_imu_covers(imu, times, seq.sequence, cfg)
    cfg = sequence_filter_config(cfg, seq)
    k = len(times)
    rel = (None, None, None)
    if steps is not None:
        steps = np.asarray(steps, dtype=np.float64)
        valid = np.ones(k - 1, bool) if valid is None else np.asarray(valid, bool)
        if steps.shape != (k - 1, 6) or valid.shape != (k - 1,):
            raise ValueError(f'sequence {seq.sequence}: {k} frames need ({k - 1}, 6) steps and '
                             f'({k - 1},) valid flags, got {steps.shape} and {valid.shape}')
        logvars = np.where(valid[:, None], np.asarray(logvars, dtype=np.float64), 0.0)
        logvars = logvars + math.log(var_scale)
        if min_logvar is not None:
            logvars = np.maximum(logvars, np.asarray(min_logvar, dtype=np.float64))
        rel = (np.where(valid[:, None], steps, 0.0), logvars, valid)
    res = run_filter(cfg, imu.stamps, imu.accel, imu.gyro, times, *rel,
                     noise_model=noise_model)
    missing = np.flatnonzero(~np.isfinite(res.scan_poses).all(axis=(1, 2)))
    if len(missing):
        raise ValueError(f'sequence {seq.sequence}: the filter has no pose at {len(missing)} '
                         f'frames (first {missing[:5].tolist()}); IMU {imu.source}: '
                         f'{res.counts}')
    poses = invert_pose(res.scan_poses[0]) @ res.scan_poses
    updates = int(rel[2].sum()) if rel[2] is not None else 0
    return SequenceFilterRun(poses, res, updates, k - 1 - updates)
