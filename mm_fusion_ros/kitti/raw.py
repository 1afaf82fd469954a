"""KITTI raw OXTS layout (DESIGN §2) and the devkit's odometry -> raw-drive mapping.

OXTS folder: timestamps.txt (`YYYY-MM-DD HH:MM:SS.nnnnnnnnn`, UTC), data/%010d.txt (30 fields a
line), dataformat.txt. Accelerations ax ay az and rates wx wy wz are in the OXTS body frame
(x forward, y left, z up), which is our `imu_link`.
"""
from dataclasses import dataclass
import datetime as dt
import logging
from pathlib import Path

import numpy as np

from mm_fusion_ros.geometry import make_pose
from mm_fusion_ros.kitti.ids import normalize_sequence_id
from mm_fusion_ros.stamps import NS_PER_S

log = logging.getLogger(__name__)

OXTS_FIELDS = (
    ('lat', 'latitude of the oxts-unit (deg)'),
    ('lon', 'longitude of the oxts-unit (deg)'),
    ('alt', 'altitude of the oxts-unit (m)'),
    ('roll', 'roll angle (rad), 0 = level, positive = left side up (-pi..pi)'),
    ('pitch', 'pitch angle (rad), 0 = level, positive = front down (-pi/2..pi/2)'),
    ('yaw', 'heading (rad), 0 = east, positive = counter clockwise (-pi..pi)'),
    ('vn', 'velocity towards north (m/s)'),
    ('ve', 'velocity towards east (m/s)'),
    ('vf', 'forward velocity, i.e. parallel to earth-surface (m/s)'),
    ('vl', 'leftward velocity, i.e. parallel to earth-surface (m/s)'),
    ('vu', 'upward velocity, i.e. perpendicular to earth-surface (m/s)'),
    ('ax', 'acceleration in x, i.e. in direction of vehicle front (m/s^2)'),
    ('ay', 'acceleration in y, i.e. in direction of vehicle left (m/s^2)'),
    ('az', 'acceleration in z, i.e. in direction of vehicle top (m/s^2)'),
    ('af', 'forward acceleration (m/s^2)'),
    ('al', 'leftward acceleration (m/s^2)'),
    ('au', 'upward acceleration (m/s^2)'),
    ('wx', 'angular rate around x (rad/s)'),
    ('wy', 'angular rate around y (rad/s)'),
    ('wz', 'angular rate around z (rad/s)'),
    ('wf', 'angular rate around forward axis (rad/s)'),
    ('wl', 'angular rate around leftward axis (rad/s)'),
    ('wu', 'angular rate around upward axis (rad/s)'),
    ('pos_accuracy', 'position accuracy (north/east in m)'),
    ('vel_accuracy', 'velocity accuracy (north/east in m/s)'),
    ('navstat', 'navigation status'),
    ('numsats', 'number of satellites tracked by primary GPS receiver'),
    ('posmode', 'position mode of primary GPS receiver'),
    ('velmode', 'velocity mode of primary GPS receiver'),
    ('orimode', 'orientation mode of primary GPS receiver'),
)
OXTS_NAMES = tuple(name for name, _ in OXTS_FIELDS)
OXTS_INDEX = {name: i for i, name in enumerate(OXTS_NAMES)}


def parse_oxts_timestamp(text: str) -> int:
    """'2011-09-30 12:00:00.123456789' -> integer nanoseconds since the Unix epoch (UTC)."""
    text = text.strip()
    date_part, _, frac = text.partition('.')
    base = dt.datetime.strptime(date_part, '%Y-%m-%d %H:%M:%S').replace(tzinfo=dt.timezone.utc)
    if frac and not frac.isdigit():
        raise ValueError(f'bad fractional seconds in {text!r}')
    nanos = int((frac + '000000000')[:9]) if frac else 0
    return int(base.timestamp()) * NS_PER_S + nanos


def format_oxts_timestamp(ns: int) -> str:
    sec, nanos = divmod(int(ns), NS_PER_S)
    base = dt.datetime.fromtimestamp(sec, tz=dt.timezone.utc)
    return f'{base:%Y-%m-%d %H:%M:%S}.{nanos:09d}'


def read_oxts_folder(folder):
    """-> (stamps_ns int64 (M,), fields float64 (M, 30)); errors name the bad file and line."""
    folder = Path(folder)
    ts_path = folder / 'timestamps.txt'
    if not ts_path.is_file():
        raise FileNotFoundError(f'{ts_path} not found (not an OXTS folder?)')
    stamps = []
    for lineno, line in enumerate(ts_path.read_text().splitlines(), 1):
        if line.strip():
            try:
                stamps.append(parse_oxts_timestamp(line))
            except ValueError as e:
                raise ValueError(f'{ts_path}:{lineno}: bad timestamp {line.strip()!r}') from e
    stamps = np.asarray(stamps, dtype=np.int64)
    data_dir = folder / 'data'
    files = sorted(data_dir.glob('*.txt'))
    if len(files) != len(stamps):
        raise ValueError(f'{data_dir}: {len(files)} data files but {ts_path} has '
                         f'{len(stamps)} timestamps')
    fields = np.empty((len(files), len(OXTS_NAMES)))
    for i, path in enumerate(files):
        fields[i] = parse_oxts_line(path)
    bad = np.nonzero(np.diff(stamps) <= 0)[0]
    if bad.size:
        raise ValueError(f'{ts_path}:{bad[0] + 2}: OXTS timestamps not increasing')
    return stamps, fields


def parse_oxts_line(path) -> np.ndarray:
    text = Path(path).read_text().split()
    if len(text) != len(OXTS_NAMES):
        raise ValueError(f'{path}: {len(text)} OXTS fields, expected {len(OXTS_NAMES)}')
    try:
        return np.array([float(x) for x in text])
    except ValueError as e:
        raise ValueError(f'{path}: non-numeric OXTS field') from e


def write_oxts_folder(folder, stamps_ns, fields) -> None:
    """Write an OXTS folder in the KITTI raw layout."""
    folder = Path(folder)
    fields = np.asarray(fields, dtype=np.float64)
    if fields.ndim != 2 or fields.shape[1] != len(OXTS_NAMES) or len(fields) != len(stamps_ns):
        raise ValueError(f'OXTS fields must be (M, {len(OXTS_NAMES)}) with M stamps; '
                         f'got {fields.shape} and {len(stamps_ns)} stamps')
    (folder / 'data').mkdir(parents=True, exist_ok=True)
    (folder / 'timestamps.txt').write_text(
        ''.join(format_oxts_timestamp(t) + '\n' for t in stamps_ns))
    (folder / 'dataformat.txt').write_text(
        ''.join(f'{name}: {desc}\n' for name, desc in OXTS_FIELDS))
    ints = {OXTS_INDEX[n] for n in ('navstat', 'numsats', 'posmode', 'velmode', 'orimode')}
    for i, row in enumerate(fields):
        text = ' '.join(str(int(v)) if j in ints else repr(float(v)) for j, v in enumerate(row))
        (folder / 'data' / f'{i:010d}.txt').write_text(text + '\n')


def read_calib_imu_to_velo(path) -> np.ndarray:
    """KITTI raw calib_imu_to_velo.txt -> T_velo_imu (4, 4) = imu_link -> velodyne."""
    path = Path(path)
    values = {}
    for line in path.read_text().splitlines():
        key, _, rest = line.partition(':')
        values[key.strip()] = rest
    try:
        rot = np.array([float(x) for x in values['R'].split()]).reshape(3, 3)
        trans = np.array([float(x) for x in values['T'].split()]).reshape(3)
    except (KeyError, ValueError) as e:
        raise ValueError(f'{path}: expected lines "R: 9 numbers" and "T: 3 numbers"') from e
    return make_pose(rot, trans)


def write_calib_imu_to_velo(path, T_velo_imu) -> None:
    T = np.asarray(T_velo_imu, dtype=np.float64)
    Path(path).write_text('calib_time: 25-May-2012 16:47:16\n'
                          'R: ' + ' '.join(f'{v:.12e}' for v in T[:3, :3].ravel()) + '\n'
                          'T: ' + ' '.join(f'{v:.12e}' for v in T[:3, 3]) + '\n')


@dataclass(frozen=True)
class RawDrive:
    """Where an odometry sequence lives in KITTI raw (devkit readme, odometry development kit)."""

    date: str
    drive: str
    first: int
    last: int


# The KITTI odometry devkit's mapping; sequence 03's drive (2011_09_26_drive_0067) was never
# part of the public raw release, so it has no OXTS.
ODOMETRY_TO_RAW = {
    '00': RawDrive('2011_10_03', '2011_10_03_drive_0027', 0, 4540),
    '01': RawDrive('2011_10_03', '2011_10_03_drive_0042', 0, 1100),
    '02': RawDrive('2011_10_03', '2011_10_03_drive_0034', 0, 4660),
    '03': RawDrive('2011_09_26', '2011_09_26_drive_0067', 0, 800),
    '04': RawDrive('2011_09_30', '2011_09_30_drive_0016', 0, 270),
    '05': RawDrive('2011_09_30', '2011_09_30_drive_0018', 0, 2760),
    '06': RawDrive('2011_09_30', '2011_09_30_drive_0020', 0, 1100),
    '07': RawDrive('2011_09_30', '2011_09_30_drive_0027', 0, 1100),
    '08': RawDrive('2011_09_30', '2011_09_30_drive_0028', 1100, 5170),
    '09': RawDrive('2011_09_30', '2011_09_30_drive_0033', 0, 1590),
    '10': RawDrive('2011_09_30', '2011_09_30_drive_0034', 0, 1200),
}
SEQUENCES_WITHOUT_RAW = ('03',)


def raw_oxts_for_sequence(raw_root, sequence):
    """OXTS of an odometry sequence from a KITTI raw root.

    Returns (stamps_ns, fields, t0_ns, source). Prefers the unsynced ~100 Hz `_extract` drive,
    cropped to the span of the synced frames; falls back to the 10 Hz `_sync` drive sliced to the
    devkit's frame range. t0_ns is the synced timestamp of the sequence's first frame.
    """
    seq = normalize_sequence_id(sequence)
    if seq not in ODOMETRY_TO_RAW:
        raise ValueError(f'sequence {seq} has no KITTI raw drive (only 00-10 do)')
    if seq in SEQUENCES_WITHOUT_RAW:
        raise FileNotFoundError(f'sequence {seq}: its raw drive {ODOMETRY_TO_RAW[seq].drive} '
                                f'is not in the public KITTI raw release, so it has no IMU')
    info = ODOMETRY_TO_RAW[seq]
    date_dir = Path(raw_root) / info.date
    sync_dir = date_dir / f'{info.drive}_sync' / 'oxts'
    extract_dir = date_dir / f'{info.drive}_extract' / 'oxts'
    if not sync_dir.is_dir() and not extract_dir.is_dir():
        raise FileNotFoundError(f'sequence {seq}: neither {sync_dir} nor {extract_dir} exists')
    t0_ns = t1_ns = None
    if sync_dir.is_dir():
        sync_stamps, sync_fields = read_oxts_folder(sync_dir)
        if len(sync_stamps) <= info.last:
            raise ValueError(f'{sync_dir}: {len(sync_stamps)} samples, but sequence {seq} needs '
                             f'frames {info.first}..{info.last}')
        t0_ns, t1_ns = int(sync_stamps[info.first]), int(sync_stamps[info.last])
        if not extract_dir.is_dir():
            sl = slice(info.first, info.last + 1)
            return sync_stamps[sl], sync_fields[sl], t0_ns, str(sync_dir)
    stamps, fields = read_oxts_folder(extract_dir)
    if t0_ns is None:
        log.warning('%s: no synced drive to anchor frame 0; using the first OXTS stamp',
                    extract_dir)
        t0_ns, t1_ns = int(stamps[0]), int(stamps[-1])
    keep = (stamps >= t0_ns - 100_000_000) & (stamps <= t1_ns + 100_000_000)
    return stamps[keep], fields[keep], t0_ns, str(extract_dir)
