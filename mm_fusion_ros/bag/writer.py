"""KITTI odometry sequence -> ROS 2 bag (rosbag2 folder, mcap or sqlite3), written with rosbags.

Topics and frames follow DESIGN §4 (see bag/topics.py). What the bag holds:

- Clock: every header stamp is sensor time and the bag's record time equals it. Scans, images,
  camera_info and ground truth sit at t0 + times.txt[k]; IMU samples at their OXTS stamps. t0 is
  `ImuData.t0_ns` (the absolute time of the sequence clock's zero, from the OXTS timestamps) when
  the IMU source has one, else FALLBACK_EPOCH_NS (2011-09-30 00:00:00 UTC, a KITTI recording day),
  so every source lands on one clock.
- /kitti/imu/data: OXTS ax ay az / wx wy wz are already in imu_link axes (x forward, y left, z up;
  kitti/raw.py), so the values are written unchanged; orientation is the OXTS roll/pitch/yaw
  (R = Rz(yaw) Ry(pitch) Rx(roll), yaw 0 = east: ENU per REP 103/145) when the source has it, else
  orientation_covariance[0] = -1. IMU samples within IMU_MARGIN_S of the converted frame span are
  kept, so the first and last scan intervals are covered.
- /kitti/ground_truth/odom: pose = poses_base[k] (T_odom_base); twist = backward finite difference
  over (k-1, k] expressed in base_link at k (frame 0 takes frame 1's), i.e. v = R_k^T (p_k -
  p_{k-1}) / dt and w = log(R_{k-1}^T R_k) / dt. Left out with ground_truth=False (a bag like a
  robot's recording, for self-supervised runs scored afterwards against the kept-back poses),
  and absent, with a note, when the sequence has no poses file (KITTI 11-21).
- /tf_static: base_link->velodyne identity, velodyne->camera2 = inv(T_cam2_velo),
  velodyne->imu_link = T_velo_imu (calib_imu_to_velo.txt); offered TRANSIENT_LOCAL so players
  republish it latched.
- Metadata version: humble reads rosbag2 metadata up to what it parses, and its parser reads
  `offered_qos_profiles` as a YAML string (the v4..v8 form); v9 turned it into a YAML list that
  humble rejects ("yaml-cpp: bad conversion", ros2/rosbag2#2013). rosbags writes only v8 and v9,
  so humble bags are v8 (humble ignores the newer keys) and jazzy/kilted bags v9 (what they write).

The bag is written into a hidden temporary folder beside the output and put in place only after
it is complete (fileio.replace_dir: fsynced, swapped in atomically where the OS can; a bag it
replaces is removed only once the new one is in place, and one left aside by a killed replace is
put back first); an existing output is replaced only with overwrite=True. The temporary folder's
name holds the writer's process id, so a conversion killed mid-way (kill -9: no cleanup) leaves
it only until the next conversion to the same output removes it.
"""
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
import datetime as dt
import io
import logging
import os
from pathlib import Path
import shutil
import tempfile
import time

import numpy as np
from PIL import Image
from rosbags.interfaces import (
    Qos,
    QosDurability,
    QosHistory,
    QosLiveliness,
    QosReliability,
    QosTime,
)
from rosbags.rosbag2 import StoragePlugin, Writer
from rosbags.typesys import get_typestore, Stores

from mm_fusion_ros.bag import topics
from mm_fusion_ros.bag.lidar import lio_fields
from mm_fusion_ros.bag.messages import MessageFactory
from mm_fusion_ros.fileio import recover_replaced_dir, replace_dir
from mm_fusion_ros.geometry import invert_pose, rot_to_quat, rpy_to_rot, so3_log
from mm_fusion_ros.kitti.odometry import KittiSequence, read_velodyne
from mm_fusion_ros.stamps import NS_PER_S

log = logging.getLogger(__name__)

# distro -> (rosbags typestore, rosbag2 metadata version that distro's `ros2 bag` reads).
DISTROS = {
    'humble': (Stores.ROS2_HUMBLE, 8),
    'jazzy': (Stores.ROS2_JAZZY, 9),
    'kilted': (Stores.ROS2_KILTED, 9),
}
STORAGES = {'mcap': StoragePlugin.MCAP, 'sqlite3': StoragePlugin.SQLITE3}
IMAGE_FORMATS = ('raw', 'png')
FALLBACK_EPOCH_NS = int(dt.datetime(2011, 9, 30, tzinfo=dt.timezone.utc).timestamp()) * NS_PER_S
IMU_MARGIN_S = 0.1
PREFETCH_FRAMES = 4
PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'


def offered_qos(transient_local=False, depth=topics.SENSOR_QUEUE_DEPTH) -> Qos:
    """The QoS recorded as offered by the topic's publisher (RELIABLE, default deadlines)."""
    durability = QosDurability.TRANSIENT_LOCAL if transient_local else QosDurability.VOLATILE
    unset = QosTime(0, 0)
    return Qos(QosHistory.KEEP_LAST, depth, QosReliability.RELIABLE, durability, unset, unset,
               QosLiveliness.AUTOMATIC, unset, False)


class FrameError(ValueError):
    """A corrupt or missing input file of one frame; the message names the file."""

    def __init__(self, frame: int, message: str):
        super().__init__(message)
        self.frame = frame


@dataclass(frozen=True)
class ConvertOptions:
    data_path: Path
    sequence: str
    output: Path
    pointcloud_path: Path = None
    imu_path: Path = None
    storage: str = 'mcap'
    image_format: str = 'raw'
    distro: str = 'humble'
    start: int = 0
    end: int = None             # exclusive; None = to the last frame
    lio_fields: bool = False
    overwrite: bool = False
    skip_bad: bool = False
    ground_truth: bool = True   # write /kitti/ground_truth/odom when the sequence has poses

    def __post_init__(self):
        for name, value, allowed in (('storage', self.storage, STORAGES),
                                     ('image_format', self.image_format, IMAGE_FORMATS),
                                     ('distro', self.distro, DISTROS)):
            if value not in allowed:
                raise ValueError(f'{name} {value!r} not supported; choose one of '
                                 f'{", ".join(allowed)}')
        if self.start < 0 or (self.end is not None and self.end <= self.start):
            raise ValueError(f'frame range start={self.start} end={self.end} is empty or '
                             'negative (end is exclusive)')


@dataclass
class ConvertSummary:
    output: Path
    storage: str
    distro: str
    metadata_version: int
    frames_total: int = 0
    frames_written: int = 0
    skipped: list = field(default_factory=list)   # (frame, reason)
    counts: dict = field(default_factory=dict)    # topic -> messages
    start_ns: int = 0
    end_ns: int = 0
    t0_ns: int = 0
    t0_source: str = ''
    size_bytes: int = 0
    wall_s: float = 0.0
    warnings: list = field(default_factory=list)
    notes: list = field(default_factory=list)     # what was left out on purpose or as expected

    @property
    def duration_s(self) -> float:
        return (self.end_ns - self.start_ns) * 1e-9

    @property
    def message_count(self) -> int:
        return sum(self.counts.values())


@dataclass
class Frame:
    index: int
    image: object = None      # (H, W, 3) uint8 for raw, PNG bytes for png
    size: tuple = None        # (width, height)
    scan: np.ndarray = None


def convert_sequence(opts: ConvertOptions, progress=None) -> ConvertSummary:
    """Write the bag; progress(iterable, total) may wrap the frame loop (e.g. tqdm)."""
    began = time.perf_counter()
    output = Path(opts.output)
    # Before the check: a bag left aside by a killed replace is back, so it is not overwritten
    # without --overwrite.
    recover_replaced_dir(output)
    remove_stale_staging(output)
    _check_output(output, opts.overwrite)
    source = SequenceSource(opts)
    store, version = DISTROS[opts.distro]
    summary = ConvertSummary(output=output, storage=opts.storage, distro=opts.distro,
                             metadata_version=version, warnings=source.warnings,
                             notes=source.notes,
                             frames_total=len(source.frames), t0_ns=source.t0_ns,
                             t0_source=source.t0_source)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f'{_staging_prefix(output)}{os.getpid()}-',
                                    dir=output.parent))
    try:
        bag_dir = staging / output.name
        with Writer(bag_dir, version=version, storage_plugin=STORAGES[opts.storage]) as writer:
            BagWriter(writer, MessageFactory(get_typestore(store)), source, opts,
                      summary).write_all(progress)
        replace_dir(bag_dir, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    summary.size_bytes = sum(p.stat().st_size for p in output.rglob('*') if p.is_file())
    summary.wall_s = time.perf_counter() - began
    return summary


def _staging_prefix(output: Path) -> str:
    return f'.{output.name}.partial-'


def remove_stale_staging(output) -> list:
    """Delete the staging folders (`.NAME.partial-PID-*`, as large as the bag) that a killed
    conversion to `output` left beside it: those whose process is gone; -> the removed paths.
    A folder of a live process (or of an older version, without a pid) is left alone. The pid
    is looked up on this machine only: two machines converting to one shared folder at once
    are not supported (as replace_dir's two writers of one target are not)."""
    output = Path(output)
    if not output.parent.is_dir():
        return []
    prefix, removed = _staging_prefix(output), []
    for path in output.parent.iterdir():
        # '<pid>-<mkdtemp suffix>': that suffix has no '-', so an older version's never parses
        pid, dash, _ = path.name[len(prefix):].partition('-')
        if not (path.name.startswith(prefix) and dash and pid.isascii() and pid.isdigit()
                and path.is_dir()) or int(pid) == os.getpid() or _process_alive(int(pid)):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    if removed:
        log.warning('removed %d folder(s) that a killed conversion to %s left: %s', len(removed),
                    output, ', '.join(p.name for p in removed))
    return removed


def _process_alive(pid: int) -> bool:
    """False only when no process `pid` exists on this machine: another user's process, or a
    number no pid can be, counts as alive (kept)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def _check_output(output: Path, overwrite: bool) -> None:
    if not output.exists():
        return
    if not overwrite:
        raise FileExistsError(f'{output} exists; pass --overwrite to replace it')
    is_bag = output.is_dir() and (output / 'metadata.yaml').is_file()
    if not is_bag and not (output.is_dir() and not any(output.iterdir())):
        raise FileExistsError(f'{output} exists and is not a rosbag2 folder (no metadata.yaml); '
                              'refusing to replace it even with --overwrite')


class SequenceSource:
    """What one sequence offers for the bag: frames, stamps, calib, ground truth, IMU."""

    def __init__(self, opts: ConvertOptions):
        self.opts = opts
        self.warnings = []
        self.notes = []
        self.seq = KittiSequence(opts.data_path, opts.sequence,
                                 pointcloud_path=opts.pointcloud_path, imu_path=opts.imu_path)
        times = self.seq.times
        end = len(times) if opts.end is None else opts.end
        if end > len(times) or opts.start >= len(times):
            raise ValueError(f'frame range {opts.start}..{end} (end exclusive) is outside the '
                             f'{len(times)} frames of {self.seq.times_path}')
        self.frames = range(opts.start, end)
        self.has_images = self._available(self.seq.has_images, self.seq.image_dir,
                                          'no camera topics')
        self.has_scans = self._available(self.seq.has_scans, self.seq.velodyne_dir,
                                         f'no {topics.CLOUD_TOPIC}')
        if not opts.ground_truth:
            self.has_gt = False
            self._note(f'ground truth left out (--no_ground_truth): no {topics.GT_ODOM_TOPIC}')
        else:
            self.has_gt = self.seq.has_poses
            if not self.has_gt:
                self._note(f'{self.seq.poses_path} not found (no ground truth, as for KITTI '
                           f'11-21): no {topics.GT_ODOM_TOPIC}')
        self.imu = self.seq.imu
        if self.imu is None:
            self._warn(f'no IMU for sequence {self.seq.sequence}: {self.seq.seq_dir / "oxts"} '
                       f'not found (nor --imu_path, {self.seq.data_path / "imus"}); '
                       f'writing no {topics.IMU_TOPIC}')
        if self.imu is not None and self.imu.t0_ns is not None:
            self.t0_ns, self.t0_source = int(self.imu.t0_ns), f'IMU clock ({self.imu.source})'
        else:
            self.t0_ns, self.t0_source = FALLBACK_EPOCH_NS, 'fallback epoch 2011-09-30 UTC'
        if not (self.has_images or self.has_scans or self.imu is not None):
            raise FileNotFoundError(f'sequence {self.seq.sequence}: no images '
                                    f'({self.seq.image_dir}), scans ({self.seq.velodyne_dir}) '
                                    'or IMU; nothing to convert')
        self.frame_ns = self.t0_ns + np.round(times * NS_PER_S).astype(np.int64)
        self.calib = self.seq.calib if (self.has_images or self.has_scans) else None

    def _available(self, present: bool, path, consequence: str) -> bool:
        if not present:
            self._warn(f'{path} not found: {consequence}')
        return present

    def _note(self, message: str) -> None:
        log.info(message)
        self.notes.append(message)

    def _warn(self, message: str) -> None:
        log.warning(message)
        self.warnings.append(message)

    def imu_selection(self):
        """(stamps_ns, accel, gyro, quats or None) of the samples around the frame span."""
        imu = self.imu
        stamps_ns = self.t0_ns + np.round(imu.stamps * NS_PER_S).astype(np.int64)
        margin = int(IMU_MARGIN_S * NS_PER_S)
        lo = self.frame_ns[self.frames[0]] - margin
        hi = self.frame_ns[self.frames[-1]] + margin
        keep = (stamps_ns >= lo) & (stamps_ns <= hi)
        quats = None
        if imu.rpy is not None:
            rpy = imu.rpy[keep]
            quats = rot_to_quat(rpy_to_rot(rpy[:, 0], rpy[:, 1], rpy[:, 2]))
        return stamps_ns[keep], imu.accel[keep], imu.gyro[keep], quats

    def static_transforms(self):
        """(parent, child, T_parent_child) for /tf_static."""
        out = [(topics.BASE_FRAME, topics.VELODYNE_FRAME, np.eye(4))]
        if self.calib is not None:
            out.append((topics.VELODYNE_FRAME, topics.CAMERA_FRAME,
                        invert_pose(self.calib.T_cam2_velo)))
        T_velo_imu = self.seq.T_base_imu
        if T_velo_imu is None:
            self._warn(f'{self.seq.seq_dir / "calib_imu_to_velo.txt"} not found: '
                       f'/tf_static has no {topics.VELODYNE_FRAME}->{topics.IMU_FRAME}')
        else:
            out.append((topics.VELODYNE_FRAME, topics.IMU_FRAME, T_velo_imu))
        return out

    def ground_truth(self):
        """(poses_base (N, 4, 4), twist (N, 6)) for every frame of the sequence."""
        poses = self.seq.poses_base
        twist = np.zeros((len(poses), 6))
        if len(poses) > 1:
            dts = np.diff(self.seq.times)[:, None]
            R_prev, R_cur = poses[:-1, :3, :3], poses[1:, :3, :3]
            dp = poses[1:, :3, 3] - poses[:-1, :3, 3]
            twist[1:, :3] = np.einsum('nji,nj->ni', R_cur, dp) / dts
            twist[1:, 3:] = so3_log(np.swapaxes(R_prev, -1, -2) @ R_cur) / dts
            twist[0] = twist[1]
        return poses, twist

    def load_frame(self, k: int) -> Frame:
        """Read and validate frame k's files; FrameError names the bad file."""
        frame = Frame(k)
        if self.has_images:
            path = self.seq.image_path(k)
            frame.image, frame.size = _load_png(path, k, decode=self.opts.image_format == 'raw')
        if self.has_scans:
            frame.scan = _load_scan(self.seq.scan_path(k), k)
        return frame


def _load_png(path: Path, k: int, decode: bool):
    try:
        data = path.read_bytes()
    except FileNotFoundError as e:
        raise FrameError(k, f'{path}: image not found (frame {k})') from e
    except OSError as e:    # unreadable (permissions, I/O): a bad frame, skippable as one
        raise FrameError(k, f'{path}: image not readable (frame {k}): {e}') from e
    if not data.startswith(PNG_SIGNATURE):
        raise FrameError(k, f'{path}: not a PNG file (frame {k})')
    try:
        with Image.open(io.BytesIO(data)) as im:
            if decode:
                rgb = np.asarray(im if im.mode == 'RGB' else im.convert('RGB'))
                return rgb, (rgb.shape[1], rgb.shape[0])
            size = im.size
            im.verify()  # chunk CRCs and completeness, without decoding the pixels
            return data, size
    except (OSError, SyntaxError, ValueError) as e:
        raise FrameError(k, f'{path}: unreadable PNG (frame {k}): {e}') from e


def _load_scan(path: Path, k: int) -> np.ndarray:
    try:
        scan = read_velodyne(path)
    except (FileNotFoundError, ValueError) as e:
        raise FrameError(k, f'{e} (frame {k})') from e
    if len(scan) == 0:
        raise FrameError(k, f'{path}: empty scan (frame {k})')
    if not np.isfinite(scan).all():
        raise FrameError(k, f'{path}: scan contains NaN or Inf values (frame {k})')
    return scan


class BagWriter:
    """Writes one sequence's messages in stamp order into an open rosbags Writer."""

    def __init__(self, writer: Writer, factory: MessageFactory, source: SequenceSource,
                 opts: ConvertOptions, summary: ConvertSummary):
        self.writer, self.f, self.src, self.opts, self.summary = \
            writer, factory, source, opts, summary
        self.conns = {}
        self.start_ns = None
        self.end_ns = None

    def _connect(self, topic, msgtype, transient_local=False):
        depth = 1 if transient_local else \
            topics.IMU_QUEUE_DEPTH if msgtype == topics.IMU_TYPE else topics.SENSOR_QUEUE_DEPTH
        self.conns[topic] = (self.writer.add_connection(
            topic, msgtype, typestore=self.f.store,
            offered_qos_profiles=[offered_qos(transient_local, depth)]), msgtype)
        self.summary.counts[topic] = 0

    def _write(self, topic, stamp_ns, msg):
        conn, msgtype = self.conns[topic]
        self.writer.write(conn, int(stamp_ns), self.f.serialize(msg, msgtype))
        self.summary.counts[topic] += 1
        self.start_ns = stamp_ns if self.start_ns is None else min(self.start_ns, stamp_ns)
        self.end_ns = stamp_ns if self.end_ns is None else max(self.end_ns, stamp_ns)

    def write_all(self, progress=None):
        src = self.src
        self._connect(topics.TF_STATIC_TOPIC, topics.TF_TYPE, transient_local=True)
        if src.has_images:
            if self.opts.image_format == 'raw':
                self._connect(topics.IMAGE_TOPIC, topics.IMAGE_TYPE)
            else:
                self._connect(topics.COMPRESSED_IMAGE_TOPIC, topics.COMPRESSED_IMAGE_TYPE)
            self._connect(topics.CAMERA_INFO_TOPIC, topics.CAMERA_INFO_TYPE)
        if src.has_scans:
            self._connect(topics.CLOUD_TOPIC, topics.CLOUD_TYPE)
        if src.imu is not None:
            self._connect(topics.IMU_TOPIC, topics.IMU_TYPE)
            imu = src.imu_selection()
        else:
            imu = (np.zeros(0, dtype=np.int64),)
        gt = None
        if src.has_gt:
            self._connect(topics.GT_ODOM_TOPIC, topics.ODOMETRY_TYPE)
            gt = src.ground_truth()

        first_ns = int(src.frame_ns[src.frames[0]])
        if len(imu[0]):
            first_ns = min(first_ns, int(imu[0][0]))
        self._write(topics.TF_STATIC_TOPIC, first_ns,
                    self.f.tf_message(first_ns, src.static_transforms()))

        next_imu = 0
        frames = _prefetch(src.load_frame, src.frames, self.opts.skip_bad)
        if progress is not None:
            frames = progress(frames, len(src.frames))
        for k, frame, error in frames:
            stamp_ns = int(src.frame_ns[k])
            next_imu = self._write_imu(imu, next_imu, stamp_ns)
            if error is not None:
                log.warning('skipping frame %d: %s', k, error)
                self.summary.skipped.append((k, str(error)))
                continue
            self._write_frame(frame, stamp_ns, gt)
            self.summary.frames_written += 1
        self._write_imu(imu, next_imu, None)
        self.summary.start_ns, self.summary.end_ns = self.start_ns, self.end_ns

    def _write_imu(self, imu, next_imu: int, until_ns):
        """Write IMU samples from next_imu with stamp <= until_ns (None: all); -> next index."""
        stamps = imu[0]
        stop = len(stamps) if until_ns is None else \
            int(np.searchsorted(stamps, until_ns, side='right'))
        if stop > next_imu:
            _, accel, gyro, quats = imu
            for i in range(next_imu, stop):
                msg = self.f.imu(stamps[i], topics.IMU_FRAME, accel[i], gyro[i],
                                 None if quats is None else quats[i])
                self._write(topics.IMU_TOPIC, stamps[i], msg)
        return max(stop, next_imu)

    def _write_frame(self, frame: Frame, stamp_ns: int, gt):
        f, src = self.f, self.src
        if frame.image is not None:
            width, height = frame.size
            self._write(topics.CAMERA_INFO_TOPIC, stamp_ns, f.camera_info(
                stamp_ns, topics.CAMERA_FRAME, src.calib.P[2], width, height))
            if self.opts.image_format == 'raw':
                self._write(topics.IMAGE_TOPIC, stamp_ns, f.image(stamp_ns, topics.CAMERA_FRAME,
                                                             frame.image))
            else:
                self._write(topics.COMPRESSED_IMAGE_TOPIC, stamp_ns,
                            f.compressed_image(stamp_ns, topics.CAMERA_FRAME, frame.image))
        if frame.scan is not None:
            extra = lio_fields(frame.scan) if self.opts.lio_fields else ()
            self._write(topics.CLOUD_TOPIC, stamp_ns,
                        f.point_cloud(stamp_ns, topics.VELODYNE_FRAME, frame.scan, extra))
        if gt is not None:
            poses, twist = gt
            k = frame.index
            self._write(topics.GT_ODOM_TOPIC, stamp_ns, f.odometry(
                stamp_ns, topics.ODOM_FRAME, topics.BASE_FRAME, poses[k], twist[k]))


def _prefetch(load, indices, skip_bad: bool):
    """Yield (k, frame, error) in order, loading PREFETCH_FRAMES ahead on threads.

    PNG decoding and file reads release the GIL, so loading overlaps with serializing and
    writing. A FrameError is raised at its frame, or yielded as `error` when skip_bad.
    """
    with ThreadPoolExecutor(max_workers=2) as pool:
        pending = deque()
        it = iter(indices)
        for k in it:
            pending.append((k, pool.submit(load, k)))
            if len(pending) >= PREFETCH_FRAMES:
                break
        while pending:
            k, future = pending.popleft()
            nxt = next(it, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(load, nxt)))
            try:
                yield k, future.result(), None
            except FrameError as e:
                if not skip_bad:
                    for _, later in pending:
                        later.cancel()
                    raise FrameError(e.frame, f'{e}; pass --skip_bad to skip bad frames') \
                        from e
                yield k, None, e
