"""Integrity checks of a KITTI tree, shared by `check_kitti` and the Dataset.

Each problem names its file (and frame when it belongs to one), so a user can find and fix it;
frame-level problems can be skipped (the Dataset then drops the samples touching that frame).
"""
from dataclasses import dataclass, field
import re

import numpy as np

from mm_fusion_ros.kitti.odometry import KittiSequence, read_calib, read_poses, read_times
from mm_fusion_ros.kitti.raw import read_oxts_folder

FRAME_NAME = {'.png': re.compile(r'^\d{6}\.png$'), '.bin': re.compile(r'^\d{6}\.bin$')}


@dataclass(frozen=True)
class Problem:
    path: str
    message: str
    frame: int = None  # None: the whole sequence is unusable, not just one frame

    def __str__(self):
        where = f' (frame {self.frame})' if self.frame is not None else ''
        return f'{self.path}{where}: {self.message}'


@dataclass
class CheckReport:
    sequence: str
    frames: int = 0
    problems: list = field(default_factory=list)

    @property
    def fatal(self):
        return [p for p in self.problems if p.frame is None]

    @property
    def bad_frames(self):
        return sorted({p.frame for p in self.problems if p.frame is not None})

    @property
    def ok(self):
        return not self.problems


def check_sequence(seq: KittiSequence, *, need_images=True, need_scans=True, need_poses=True,
                   read_scans=True, need_imu=False) -> CheckReport:
    """Validate one sequence. read_scans=False skips reading scan contents (finite values)."""
    report = CheckReport(seq.sequence)
    add = report.problems.append
    try:
        times = read_times(seq.times_path)
    except (ValueError, FileNotFoundError) as e:
        add(Problem(str(seq.times_path), str(e)))
        return report
    n = report.frames = len(times)

    if seq.calib_path.is_file():
        try:
            read_calib(seq.calib_path)
        except ValueError as e:
            add(Problem(str(seq.calib_path), str(e)))
    elif need_images or need_scans:
        add(Problem(str(seq.calib_path), 'calib file missing'))

    if need_poses:
        if not seq.poses_path.is_file():
            add(Problem(str(seq.poses_path), 'pose file missing'))
        else:
            try:
                poses = read_poses(seq.poses_path)
                if len(poses) != n:
                    add(Problem(str(seq.poses_path),
                                f'{len(poses)} poses but times.txt has {n} frames'))
            except ValueError as e:
                add(Problem(str(seq.poses_path), str(e)))

    if need_images:
        _check_frame_files(seq.image_dir, '.png', n, add)
    if need_scans:
        _check_frame_files(seq.velodyne_dir, '.bin', n, add)
        if seq.velodyne_dir.is_dir():
            for k in range(n):
                path = seq.scan_path(k)
                if path.is_file():
                    problem = check_scan_file(path, k, read=read_scans)
                    if problem:
                        add(problem)

    oxts_dir = seq.seq_dir / 'oxts'
    if oxts_dir.is_dir():
        try:
            stamps, _ = read_oxts_folder(oxts_dir)
            span = (stamps[-1] - stamps[0]) * 1e-9 if len(stamps) else 0.0
            if span + 0.05 < times[-1] - times[0]:
                add(Problem(str(oxts_dir), f'OXTS covers {span:.2f} s but the sequence lasts '
                                           f'{times[-1] - times[0]:.2f} s'))
        except (ValueError, FileNotFoundError) as e:
            add(Problem(str(oxts_dir), str(e)))
    elif need_imu:
        where = str(seq.imu_path or oxts_dir)
        try:
            if seq.imu is None:
                add(Problem(where, 'no IMU source for this sequence'))
        except (ValueError, FileNotFoundError) as e:
            add(Problem(where, str(e)))
    return report


def _check_frame_files(folder, suffix, n, add):
    if not folder.is_dir():
        add(Problem(str(folder), 'folder missing'))
        return
    names = {p.name for p in folder.iterdir()}
    for name in sorted(names):
        if name.endswith(suffix) and not FRAME_NAME[suffix].match(name):
            add(Problem(str(folder / name), f'file name is not %06d{suffix}'))
    for k in range(n):
        if f'{k:06d}{suffix}' not in names:
            add(Problem(str(folder / f'{k:06d}{suffix}'), 'missing', frame=k))
    extra = sorted(name for name in names
                   if FRAME_NAME[suffix].match(name) and int(name[:6]) >= n)
    if extra:
        add(Problem(str(folder), f'{len(extra)} files beyond the {n} frames of times.txt '
                                 f'(first: {extra[0]})'))


def check_scan_file(path, frame, *, read=True):
    """Problem for a truncated or non-finite scan, else None."""
    size = path.stat().st_size
    if size == 0 or size % 16:
        return Problem(str(path), f'{size} bytes is not a positive multiple of 16 '
                                  f'(truncated scan?)', frame)
    if read:
        data = np.fromfile(path, dtype='<f4')
        if not np.isfinite(data).all():
            return Problem(str(path), 'scan contains NaN or Inf values', frame)
    return None
