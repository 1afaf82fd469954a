"""KITTI odometry layout (DESIGN §2): calib, times, poses, Velodyne scans, images; read and write.

Real KITTI and the synthetic world share this code, so every path and format lives here once.
The sequence-id helpers live in kitti/ids.py (below raw.py and imu.py, which this module uses);
they are re-exported here, where the dataset, the synthetic writer and some CLIs import them.
"""
from dataclasses import dataclass
from functools import cached_property
import logging
from pathlib import Path

import numpy as np
from PIL import Image

from mm_fusion_ros.fileio import atomic_write_text
from mm_fusion_ros.geometry import cam0_to_base_link, make_pose
from mm_fusion_ros.kitti.ids import normalize_sequence_id
from mm_fusion_ros.kitti.imu import load_sequence_imu
from mm_fusion_ros.kitti.raw import read_calib_imu_to_velo

log = logging.getLogger(__name__)

CALIB_KEYS = ('P0', 'P1', 'P2', 'P3', 'Tr')


@dataclass(frozen=True)
class Calib:
    """calib.txt: P (4, 3, 4) rectified projections P0..P3 and Tr (4, 4) velodyne -> cam0."""

    P: np.ndarray
    Tr: np.ndarray

    @property
    def T_cam2_velo(self) -> np.ndarray:
        """velodyne -> camera2 (rectified, optical axes): cam0 shifted by P2's baseline offset."""
        K = self.P[2][:, :3]
        offset = np.linalg.solve(K, self.P[2][:, 3])
        return make_pose(np.eye(3), offset) @ self.Tr

    @property
    def K2(self) -> np.ndarray:
        return self.P[2][:, :3].copy()


def read_calib(path) -> Calib:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'{path}: calib file not found')
    values = {}
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        key, sep, rest = line.partition(':')
        if not sep:
            raise ValueError(f'{path}:{lineno}: expected "KEY: 12 numbers", got {line[:60]!r}')
        try:
            nums = np.array([float(x) for x in rest.split()], dtype=np.float64)
        except ValueError as e:
            raise ValueError(f'{path}:{lineno}: non-numeric value in {key.strip()}') from e
        if key.strip() in CALIB_KEYS and nums.size != 12:
            raise ValueError(f'{path}:{lineno}: {key.strip()} has {nums.size} numbers, '
                             'expected 12')
        values[key.strip()] = nums
    missing = [k for k in CALIB_KEYS if k not in values]
    if missing:
        raise ValueError(f'{path}: missing calibration keys {missing}')
    P = np.stack([values[k].reshape(3, 4) for k in ('P0', 'P1', 'P2', 'P3')])
    Tr = np.vstack([values['Tr'].reshape(3, 4), [0.0, 0.0, 0.0, 1.0]])
    return Calib(P=P, Tr=Tr)


def write_calib(path, calib: Calib) -> None:
    lines = [f'P{i}: ' + ' '.join(f'{v:.12e}' for v in calib.P[i].ravel()) for i in range(4)]
    lines.append('Tr: ' + ' '.join(f'{v:.12e}' for v in calib.Tr[:3].ravel()))
    _write_text(path, '\n'.join(lines) + '\n')


def read_times(path) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'{path}: times file not found')
    times = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            times.append(float(line))
        except ValueError as e:
            raise ValueError(f'{path}:{lineno}: not a time in seconds: {line[:40]!r}') from e
    times = np.asarray(times, dtype=np.float64)
    bad = np.nonzero(np.diff(times) <= 0)[0]
    if bad.size:
        raise ValueError(f'{path}:{bad[0] + 2}: times not strictly increasing '
                         f'({times[bad[0]]} then {times[bad[0] + 1]})')
    return times


def write_times(path, times) -> None:
    _write_text(path, ''.join(f'{t:.6e}\n' for t in np.asarray(times, dtype=np.float64)))


def read_poses(path) -> np.ndarray:
    """KITTI pose file -> (N, 4, 4); 12 floats per line, row-major 3x4."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'{path}: pose file not found')
    rows = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 12:
            raise ValueError(f'{path}:{lineno}: {len(parts)} values, expected 12')
        try:
            rows.append([float(x) for x in parts])
        except ValueError as e:
            raise ValueError(f'{path}:{lineno}: non-numeric value') from e
    poses = np.zeros((len(rows), 4, 4))
    if rows:
        poses[:, :3, :] = np.asarray(rows).reshape(-1, 3, 4)
    poses[:, 3, 3] = 1.0
    return poses


def write_poses(path, poses) -> None:
    poses = np.asarray(poses, dtype=np.float64)
    _write_text(path, ''.join(' '.join(f'{v:.9e}' for v in p[:3].ravel()) + '\n' for p in poses))


def read_velodyne(path) -> np.ndarray:
    """(M, 4) float32 x, y, z, reflectance; a size that is not a multiple of 16 is an error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'{path}: scan not found')
    size = path.stat().st_size
    if size % 16:
        raise ValueError(f'{path}: {size} bytes is not a multiple of 16 (truncated scan?)')
    return np.fromfile(path, dtype='<f4').reshape(-1, 4)


def write_velodyne(path, points) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.ascontiguousarray(points, dtype='<f4').reshape(-1, 4).tofile(path)


def read_image(path) -> np.ndarray:
    """(H, W, 3) uint8 RGB."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'{path}: image not found')
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert('RGB'))
    except OSError as e:
        raise ValueError(f'{path}: unreadable image ({e})') from e


def resolve_pointcloud_root(data_path, pointcloud_path=None) -> Path:
    """DESIGN §2: --pointcloud_path, else DATA/pointclouds where it exists, else DATA."""
    if pointcloud_path:
        root = Path(pointcloud_path)
        if not root.is_dir():
            raise FileNotFoundError(f'--pointcloud_path {root} is not a folder')
        return root
    candidate = Path(data_path) / 'pointclouds'
    return candidate if candidate.is_dir() else Path(data_path)


def velodyne_dir(pointcloud_root, sequence) -> Path:
    """POINTS/sequences/NN/velodyne, or POINTS/NN/velodyne; the first that exists."""
    seq = normalize_sequence_id(sequence)
    root = Path(pointcloud_root)
    for cand in (root / 'sequences' / seq / 'velodyne', root / seq / 'velodyne'):
        if cand.is_dir():
            return cand
    return root / 'sequences' / seq / 'velodyne'


def _write_text(path, text) -> None:
    atomic_write_text(path, text)


class KittiSequence:
    """One odometry sequence: lazily loaded times, calib, poses, file paths and IMU.

    Only times.txt is required; calib, poses, images, scans and IMU are each optional (a real
    KITTI test sequence has no poses; the real-IMU layout has no images), and reading a missing
    one raises FileNotFoundError naming the path.
    """

    def __init__(self, data_path, sequence, pointcloud_path=None, imu_path=None, raw_root=None):
        self.data_path = Path(data_path)
        self.sequence = normalize_sequence_id(sequence)
        self.seq_dir = self.data_path / 'sequences' / self.sequence
        self.times_path = self.seq_dir / 'times.txt'
        if not self.times_path.is_file():
            have = sorted(p.name for p in (self.data_path / 'sequences').glob('*')) \
                if (self.data_path / 'sequences').is_dir() else []
            raise FileNotFoundError(f'{self.times_path} not found (sequence {self.sequence}); '
                                    f'sequences present: {", ".join(have) or "none"}')
        self.pointcloud_root = resolve_pointcloud_root(self.data_path, pointcloud_path)
        self.velodyne_dir = velodyne_dir(self.pointcloud_root, self.sequence)
        self.image_dir = self.seq_dir / 'image_2'
        self.calib_path = self.seq_dir / 'calib.txt'
        self.poses_path = self.data_path / 'poses' / f'{self.sequence}.txt'
        self.imu_path = imu_path
        self.raw_root = raw_root

    def __len__(self):
        return len(self.times)

    def __repr__(self):
        return f'KittiSequence({str(self.data_path)!r}, {self.sequence!r})'

    @cached_property
    def times(self) -> np.ndarray:
        return read_times(self.times_path)

    @cached_property
    def calib(self) -> Calib:
        return read_calib(self.calib_path)

    @property
    def has_calib(self) -> bool:
        return self.calib_path.is_file()

    @property
    def has_poses(self) -> bool:
        return self.poses_path.is_file()

    @property
    def has_images(self) -> bool:
        return self.image_dir.is_dir()

    @property
    def has_scans(self) -> bool:
        return self.velodyne_dir.is_dir()

    @cached_property
    def poses_cam0(self) -> np.ndarray:
        poses = read_poses(self.poses_path)
        if len(poses) != len(self.times):
            raise ValueError(f'{self.poses_path}: {len(poses)} poses but {self.times_path} has '
                             f'{len(self.times)} times')
        return poses

    @cached_property
    def Tr(self) -> np.ndarray:
        """velodyne -> cam0. Without calib.txt (real-IMU-only layout), KITTI's nominal axes."""
        if self.has_calib:
            return self.calib.Tr
        log.warning('%s missing: using the nominal velodyne->cam0 axis swap for poses',
                    self.calib_path)
        return NOMINAL_TR.copy()

    @cached_property
    def poses_base(self) -> np.ndarray:
        """Ground truth as T_odom_base (DESIGN §3)."""
        return cam0_to_base_link(self.poses_cam0, self.Tr)

    def image_path(self, k: int) -> Path:
        return self.image_dir / f'{k:06d}.png'

    def scan_path(self, k: int) -> Path:
        return self.velodyne_dir / f'{k:06d}.bin'

    def load_image(self, k: int) -> np.ndarray:
        return read_image(self.image_path(k))

    def load_scan(self, k: int) -> np.ndarray:
        return read_velodyne(self.scan_path(k))

    @cached_property
    def imu(self):
        """ImuData on the sequence clock, or None when no IMU source exists (see kitti.imu)."""
        return load_sequence_imu(self)

    @cached_property
    def T_base_imu(self):
        """imu_link -> base_link (= velodyne) from calib_imu_to_velo.txt, else None."""
        path = self.seq_dir / 'calib_imu_to_velo.txt'
        return read_calib_imu_to_velo(path) if path.is_file() else None


# KITTI's velodyne -> cam0 is, up to ~1 deg and ~30 cm, this axis permutation (x fwd -> z, y left
# -> -x, z up -> -y); used only to express poses when a layout ships no calib.txt.
NOMINAL_TR = np.array([[0.0, -1.0, 0.0, 0.0],
                       [0.0, 0.0, -1.0, 0.0],
                       [1.0, 0.0, 0.0, 0.0],
                       [0.0, 0.0, 0.0, 1.0]])
