"""The one DESIGN §5 sample builder, shared by the offline Dataset and the online synchronizer.

A sample is the step between LiDAR scans k-1 and k. Every array has a fixed shape for a given
SampleConfig (so batches collate), and a missing input is zero-filled with its modality_mask off,
exactly as a dropped sensor is, so one model serves every case.
"""
from dataclasses import dataclass
import zlib

import numpy as np
from PIL import Image

from mm_fusion_ros.config import SampleConfig
from mm_fusion_ros.geometry import pose_to_vec6, relative_pose

SAMPLE_KEYS = ('image', 'points', 'points_mask', 'imu', 'dt', 'target', 'target_valid',
               'modality_mask', 'meta')


@dataclass(frozen=True)
class ImuData:
    """IMU samples on the sequence clock (seconds, the clock of times.txt) in imu_link axes."""

    stamps: np.ndarray          # (M,) float64, strictly increasing
    accel: np.ndarray           # (M, 3) specific force [m/s^2], gravity included
    gyro: np.ndarray            # (M, 3) angular rate [rad/s]
    source: str = ''            # file or folder it came from, for error messages
    rpy: np.ndarray = None      # (M, 3) roll, pitch, yaw [rad] when the source has them
    t0_ns: int = None           # absolute epoch [ns] of the sequence clock's zero, if known

    def __len__(self):
        return len(self.stamps)

    def window(self, t_start, t_end):
        """Index slice of the samples with t_start <= stamp <= t_end."""
        lo = int(np.searchsorted(self.stamps, t_start, side='left'))
        hi = int(np.searchsorted(self.stamps, t_end, side='right'))
        return slice(lo, hi)


def imu_window_bounds(cfg: SampleConfig, t_prev: float, t_cur: float):
    """IMU history of a sample: (t_prev, t_cur] by default, else imu_window_s ending at t_cur."""
    length = cfg.imu_window_s if cfg.imu_window_s > 0 else (t_cur - t_prev)
    return t_cur - length, t_cur


def resample_imu(cfg: SampleConfig, imu: ImuData, t_prev: float, t_cur: float):
    """K x 6 (accel, gyro) linearly interpolated at K evenly spaced times of the window.

    Returns None when no IMU sample falls inside the window or the window is not covered
    (an IMU gap): the caller masks the modality off instead of extrapolating.
    """
    t0, t1 = imu_window_bounds(cfg, t_prev, t_cur)
    if imu is None or len(imu) == 0 or imu.stamps[0] > t0 + 0.02 or imu.stamps[-1] < t1 - 0.02:
        return None
    sl = imu.window(t0 - 0.05, t1 + 0.05)
    stamps = imu.stamps[sl]
    if len(stamps) < 2:
        return None
    # Largest hole inside the window: more than 5 nominal steps missing means a sensor gap.
    gaps = np.diff(stamps)
    if gaps.max() > max(0.06, 5.0 * np.median(gaps)):
        return None
    query = np.linspace(t0, t1, cfg.imu_steps)
    data = np.concatenate([imu.accel[sl], imu.gyro[sl]], axis=1)
    out = np.stack([np.interp(query, stamps, data[:, c]) for c in range(6)], axis=1)
    return out.astype(np.float32)


def resize_image(image: np.ndarray, cfg: SampleConfig) -> np.ndarray:
    """(H, W, 3) uint8 -> (3, h, w) uint8 at the configured size (bilinear)."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f'image must be (H, W, 3) uint8, got {image.shape} {image.dtype}')
    if image.shape[:2] != (cfg.image_height, cfg.image_width):
        image = np.asarray(Image.fromarray(image).resize(
            (cfg.image_width, cfg.image_height), Image.BILINEAR))
    return np.ascontiguousarray(image.transpose(2, 0, 1))


def sample_points(scan: np.ndarray, n: int, rng: np.random.Generator):
    """Subsample (without replacement) or zero-pad a (M, 4) scan to n points plus a mask."""
    scan = np.asarray(scan, dtype=np.float32).reshape(-1, 4)
    if n == 0 or len(scan) == n:
        return scan, np.ones(len(scan), dtype=bool)
    if len(scan) > n:
        # A boolean mask keeps the points in scan order, as sorted indices would, for less.
        keep = np.zeros(len(scan), dtype=bool)
        keep[rng.choice(len(scan), size=n, replace=False)] = True
        return scan[keep], np.ones(n, dtype=bool)
    out = np.zeros((n, 4), dtype=np.float32)
    out[:len(scan)] = scan
    mask = np.zeros(n, dtype=bool)
    mask[:len(scan)] = True
    return out, mask


def point_rng(cfg: SampleConfig, sequence: str, frame: int) -> np.random.Generator:
    """Deterministic per (seed, sequence, scan frame): a scan always gets the same points.
    (frame + 1: the first scan of build_sample's default frame 0 is frame -1.)"""
    return np.random.default_rng([cfg.seed, zlib.crc32(str(sequence).encode()), int(frame) + 1])


def subsample_scan(cfg: SampleConfig, scan: np.ndarray, n: int, sequence: str, frame: int):
    """Scan `frame` of `sequence` at n points (+ mask), drawn by its own generator.

    Per scan, not per sample: scan k is the same point set as the second scan of sample k and
    as the first of sample k+1, so the online synchronizer subsamples each scan once and
    reuses it (and the model sees one consistent scan in both steps).
    """
    return sample_points(scan, n, point_rng(cfg, sequence, frame))


def build_sample(cfg: SampleConfig, *, stamps, images=None, scans=None, imu=None, poses=None,
                 sequence='', frame=0, point_sets=None) -> dict:
    """Build the DESIGN §5 sample for the step (k-1 -> k).

    stamps: (t_prev, t_cur) scan times [s] on the sequence clock.
    images: two (H, W, 3) uint8 camera frames nearest the scans, or None.
    scans:  two (M, 4) float32 scans (x, y, z, intensity in base_link = velodyne), or None.
    point_sets: instead of scans (cfg.max_points > 0 only), the two scans already subsampled
            by subsample_scan(cfg, scan, cfg.max_points, sequence, frame - 1 / frame).
    imu:    ImuData covering at least the window (may be the whole sequence), or None.
    poses:  two 4x4 T_odom_base poses (ground truth), or None when unknown (live data).
    Modalities not in cfg.modalities are masked off as if the sensor were missing.
    """
    t_prev, t_cur = float(stamps[0]), float(stamps[1])
    if not t_cur > t_prev:
        raise ValueError(f'sequence {sequence} frame {frame}: scan stamps not increasing '
                         f'({t_prev} -> {t_cur})')
    use = set(cfg.modalities)
    h, w = cfg.image_height, cfg.image_width

    image = np.zeros((2, 3, h, w), dtype=np.uint8)
    has_camera = 'camera' in use and images is not None
    if has_camera:
        image = np.stack([resize_image(np.asarray(im), cfg) for im in images])

    if point_sets is not None and (scans is not None or not cfg.max_points):
        raise ValueError('build_sample: point_sets replace scans, with max_points > 0')
    has_lidar = 'lidar' in use and (scans is not None or point_sets is not None)
    if has_lidar:
        n = cfg.max_points or max(len(s) for s in scans)
        pairs = point_sets or [subsample_scan(cfg, s, n, sequence, f)
                               for s, f in zip(scans, (frame - 1, frame))]
        points = np.stack([p for p, _ in pairs])
        points_mask = np.stack([m for _, m in pairs])
        if not np.isfinite(points).all():
            raise ValueError(f'sequence {sequence} frame {frame}: scan has non-finite values')
    else:
        n = cfg.max_points or 1
        points = np.zeros((2, n, 4), dtype=np.float32)
        points_mask = np.zeros((2, n), dtype=bool)

    imu_window = resample_imu(cfg, imu, t_prev, t_cur) if 'imu' in use and imu else None
    has_imu = imu_window is not None
    if not has_imu:
        imu_window = np.zeros((cfg.imu_steps, 6), dtype=np.float32)

    target_valid = poses is not None
    target = (pose_to_vec6(relative_pose(poses[0], poses[1])).astype(np.float32)
              if target_valid else np.zeros(6, dtype=np.float32))

    return {
        'image': image,
        'points': points,
        'points_mask': points_mask,
        'imu': imu_window,
        'dt': np.float32(t_cur - t_prev),
        'target': target,
        'target_valid': np.bool_(target_valid),
        'modality_mask': np.array([has_camera, has_lidar, has_imu], dtype=bool),
        'meta': {'sequence': str(sequence), 'frame': int(frame),
                 'stamp_prev': t_prev, 'stamp_cur': t_cur},
    }
