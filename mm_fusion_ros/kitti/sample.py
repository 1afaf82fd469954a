"""The one DESIGN §5 sample builder, shared by the offline Dataset and the online synchronizer.

A sample is the step between LiDAR scans k-1 and k. Every array has a fixed shape for a given
SampleConfig (so batches collate), and a missing input is zero-filled with its modality_mask off,
exactly as a dropped sensor is, so one model serves every case.
"""
from dataclasses import dataclass
import zlib

import numpy as np
import torch

from mm_fusion_ros.config import SampleConfig
from mm_fusion_ros.geometry import invert_pose, pose_to_vec6, relative_pose

# The calibration keys (and imu_span) came after the first replay-buffer format; CALIB_KEYS
# lists them so readers of older files can fill them in as unknown.
CALIB_KEYS = ('imu_span', 'intrinsics', 't_cam_lidar', 't_imu_lidar', 'calib_valid')
SAMPLE_KEYS = ('image', 'points', 'points_mask', 'imu', 'dt', 'target', 'target_valid',
               'modality_mask') + CALIB_KEYS + ('meta',)
# Everything but meta: the arrays that collate into tensors (the one list; no copies elsewhere).
TENSOR_KEYS = tuple(k for k in SAMPLE_KEYS if k != 'meta')
# What calib_valid's three flags stand for, in order.
CALIBRATIONS = ('intrinsics', 't_cam_lidar', 't_imu_lidar')


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


@dataclass(frozen=True)
class Calibration:
    """How the sensors relate (DESIGN §5 `calib`); a field left None is unknown.

    Offline it comes from calib.txt (P2, Tr) and calib_imu_to_velo.txt (sequence_calibration in
    kitti/dataset.py); online from CameraInfo and /tf_static or node parameters. The sample
    carries it as fixed-shape arrays so that batches collate and the replay buffer stores it.
    """

    intrinsics: np.ndarray = None    # (3, 3) camera2 K for images of image_size
    image_size: tuple = None         # (width, height) [px] of the images K belongs to
    t_cam_lidar: np.ndarray = None   # (4, 4) camera2 (optical axes) <- velodyne
    t_imu_lidar: np.ndarray = None   # (4, 4) imu_link <- velodyne

    def __post_init__(self):
        for name, shape in (('intrinsics', (3, 3)), ('t_cam_lidar', (4, 4)),
                            ('t_imu_lidar', (4, 4))):
            value = getattr(self, name)
            if value is None:
                continue
            value = np.asarray(value, dtype=np.float64)
            if value.shape != shape or not np.isfinite(value).all():
                raise ValueError(f'Calibration.{name} must be a finite {shape} matrix, got '
                                 f'shape {value.shape}')
            object.__setattr__(self, name, value)
        if (self.intrinsics is None) != (self.image_size is None):
            raise ValueError('Calibration: intrinsics and image_size come together (K belongs '
                             'to an image size)')
        if self.image_size is not None:
            width, height = (int(v) for v in self.image_size)
            if width < 1 or height < 1:
                raise ValueError(f'Calibration.image_size must be positive, got '
                                 f'{self.image_size}')
            object.__setattr__(self, 'image_size', (width, height))

    @classmethod
    def from_transforms(cls, camera_matrix=None, image_size=None, T_velo_cam=None,
                        T_velo_imu=None) -> 'Calibration':
        """From what a robot publishes: CameraInfo's K (or P[:, :3]) with its width and height,
        and the /tf_static transforms velodyne -> camera2 and velodyne -> imu_link (parent <-
        child, as the bag writes them)."""
        return cls(intrinsics=camera_matrix, image_size=image_size,
                   t_cam_lidar=None if T_velo_cam is None else invert_pose(T_velo_cam),
                   t_imu_lidar=None if T_velo_imu is None else invert_pose(T_velo_imu))


def scale_intrinsics(K, image_size, cfg: SampleConfig) -> np.ndarray:
    """K of a (width, height) image -> K of the resized cfg image. resize_image maps pixel
    centres onto pixel centres (u' + 0.5 = (u + 0.5) * s), hence the half-pixel terms."""
    sx, sy = cfg.image_width / image_size[0], cfg.image_height / image_size[1]
    out = np.array(K, dtype=np.float64)
    out[0] *= sx
    out[1] *= sy
    out[0, 2] += 0.5 * sx - 0.5
    out[1, 2] += 0.5 * sy - 0.5
    return out


def calibration_arrays(cfg: SampleConfig, calibration: Calibration = None) -> dict:
    """The sample's calibration entries; unknown parts are zeros (K) or identity with their
    calib_valid flag off."""
    c = calibration or Calibration()
    eye = np.eye(4, dtype=np.float32)
    known = (c.intrinsics is not None, c.t_cam_lidar is not None, c.t_imu_lidar is not None)
    return {
        'intrinsics': (scale_intrinsics(c.intrinsics, c.image_size, cfg).astype(np.float32)
                       if known[0] else np.zeros((3, 3), dtype=np.float32)),
        't_cam_lidar': c.t_cam_lidar.astype(np.float32) if known[1] else eye,
        't_imu_lidar': c.t_imu_lidar.astype(np.float32) if known[2] else eye.copy(),
        'calib_valid': np.array(known, dtype=bool),
    }


def unknown_calibration(cfg: SampleConfig = None) -> dict:
    """CALIB_KEYS entries of a sample whose calibration and IMU span are unknown (e.g. one
    stored by an older replay buffer)."""
    out = calibration_arrays(cfg or SampleConfig())
    out['imu_span'] = np.float32(0.0)
    return out


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
    """(H, W, 3) uint8 -> (3, h, w) uint8 at the configured size (bilinear, antialiased).

    torch's uint8 antialiased bilinear resize on the channels-last view: the filter of PIL's
    Image.resize(BILINEAR) (support scaled by the reduction, pixel centres onto pixel centres)
    in fixed point: within 1 or 2 of PIL's pixels (test_resize_close_to_pil), for several
    times less CPU (docs/online_runtime.md). The offline Dataset and the online synchronizer both
    resize here, so training and inference see the same pixels."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f'image must be (H, W, 3) uint8, got {image.shape} {image.dtype}')
    if image.shape[:2] == (cfg.image_height, cfg.image_width):
        return np.ascontiguousarray(image.transpose(2, 0, 1))
    if not image.flags.writeable or not image.flags.c_contiguous:   # torch wants writeable
        image = np.array(image, order='C')
    hwc = torch.from_numpy(image)
    out = torch.nn.functional.interpolate(
        hwc.permute(2, 0, 1).unsqueeze(0), size=(cfg.image_height, cfg.image_width),
        mode='bilinear', align_corners=False, antialias=True)
    return out[0].contiguous().numpy()


def sample_points(scan: np.ndarray, n: int, rng: np.random.Generator):
    """Subsample (without replacement) or zero-pad a (M, 4) scan to n points plus a mask."""
    scan = np.asarray(scan, dtype=np.float32).reshape(-1, 4)
    if n == 0 or len(scan) == n:
        return scan, np.ones(len(scan), dtype=bool)
    if len(scan) > n:
        # A boolean mask keeps the points in scan order, as sorted indices would, for less;
        # np.compress takes the rows in a fifth of the time of scan[keep], the same rows.
        keep = np.zeros(len(scan), dtype=bool)
        keep[rng.choice(len(scan), size=n, replace=False)] = True
        return np.compress(keep, scan, axis=0), np.ones(n, dtype=bool)
    out = np.zeros((n, 4), dtype=np.float32)
    out[:len(scan)] = scan
    mask = np.zeros(n, dtype=bool)
    mask[:len(scan)] = True
    return out, mask


def warm_up_preprocessing(cfg: SampleConfig) -> None:
    """Resize a KITTI-sized frame and subsample a scan once: a process's first resize_image
    took ~7 ms against ~0.3 ms later (torch's first interpolate), a cost the first sample of
    an online replay would pay while the next ones queue behind it."""
    resize_image(np.zeros((376, 1241, 3), np.uint8), cfg)
    n = max(cfg.max_points, 1)
    sample_points(np.zeros((2 * n, 4), np.float32), n, np.random.default_rng(0))


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
                 sequence='', frame=0, point_sets=None, calibration: Calibration = None) -> dict:
    """Build the DESIGN §5 sample for the step (k-1 -> k).

    stamps: (t_prev, t_cur) scan times [s] on the sequence clock.
    images: two (H, W, 3) uint8 camera frames nearest the scans, or None.
    scans:  two (M, 4) float32 scans (x, y, z, intensity in base_link = velodyne), or None.
    point_sets: instead of scans (cfg.max_points > 0 only), the two scans already subsampled
            by subsample_scan(cfg, scan, cfg.max_points, sequence, frame - 1 / frame).
    imu:    ImuData covering at least the window (may be the whole sequence), or None.
    poses:  two 4x4 T_odom_base poses (ground truth), or None when unknown (live data).
    calibration: how camera, LiDAR and IMU relate, or None when unknown (calib_valid off).
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

    t0, t1 = imu_window_bounds(cfg, t_prev, t_cur)
    return {
        'image': image,
        'points': points,
        'points_mask': points_mask,
        'imu': imu_window,
        'dt': np.float32(t_cur - t_prev),
        'target': target,
        'target_valid': np.bool_(target_valid),
        'modality_mask': np.array([has_camera, has_lidar, has_imu], dtype=bool),
        # Seconds the imu rows span, ending at t_cur (longer than dt with imu_window_s).
        'imu_span': np.float32(t1 - t0),
        **calibration_arrays(cfg, calibration),
        'meta': {'sequence': str(sequence), 'frame': int(frame),
                 'stamp_prev': t_prev, 'stamp_cur': t_cur},
    }
