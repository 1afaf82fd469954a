"""Online synchronizer: stamped camera / LiDAR / IMU / ground-truth streams -> DESIGN §5 samples.

Pure Python + numpy (no ROS): the node converts messages at the edge and calls add_*; this core
decides when a sample (scan k-1 -> k) is complete and builds it with the same build_sample as the
offline Dataset. The clock is the sensor stamps (integer nanoseconds): the watermark is the newest
scan stamp seen, and every timeout and lateness bound is measured against it, never against the
wall clock, so the behaviour is reproducible.

Per scan, in stamp order:
- camera: once the camera stream has passed the scan's stamp (a frame at or after it arrived),
  the nearest unused frame within `slop_s` pairs with it (a frame pairs with one scan only);
  none within slop, or no frame after `camera_timeout_s` of sensor time -> camera missing.
- ground truth (when used, see SyncConfig.ground_truth): the pose within `gt_slop_s`, else
  missing once the GT stream passed the scan or `gt_timeout_s` elapsed.
- IMU: the sample waits until an IMU stamp >= the scan stamp arrived (or `imu_timeout_s`); the
  window itself is cut and resampled by build_sample from the ring buffer.
A missing camera/IMU either masks the modality off or drops the sample (`missing_policy`).
Scans further apart than `max_scan_gap_s` restart the chain. Every drop is counted by reason.

Time going back: when the scans jump back by more than `rewind_s` (a looped bag, a restarted
player) a new run starts: what is pending is flushed (emitted as far as it can be), then
forgotten, and the samples of the new run carry meta['run'] + 1, so the trajectory starts a new
segment. A stream that jumps back (the IMU leads a bag) is held until every stream of the old
run has followed, so the old run still gets what comes late on the others; a stream that does
not follow within max_lateness_s of held sensor time no longer holds the run back, and its
old-run messages that come after the new run started are dropped as 'before_rewind'.
The IMU is kept `imu_keep_s` behind the newest scan: imu_between() hands it to the trajectory
to bridge a hole in the scans with the gyro, imu_after() to the online inertial filter.
"""
import bisect
from collections import Counter, deque
from dataclasses import dataclass
import logging
import threading

import numpy as np

from mm_fusion_ros.config import SampleConfig
from mm_fusion_ros.kitti.sample import (
    build_sample,
    Calibration,
    ImuData,
    resize_image,
    subsample_scan,
)
from mm_fusion_ros.stamps import NS_PER_S
from mm_fusion_ros.sync.config import SyncConfig

log = logging.getLogger(__name__)

# IMU kept before the oldest window start: resample_imu looks 0.05 s beyond the window.
IMU_MARGIN_NS = 100_000_000
INPUTS = ('image', 'cloud', 'imu', 'ground_truth')
MAX_HELD = 5000    # messages of the next run held until the scans go back too


def seconds_to_ns(seconds: float) -> int:
    return int(round(float(seconds) * NS_PER_S))


@dataclass
class _Scan:
    """A scan waiting for (or holding) its camera frame and ground-truth pose."""

    stamp: int
    points: np.ndarray         # the whole scan until subsampled, then None
    point_set: tuple = None    # (points, mask) at max_points, made once for both its samples
    image: np.ndarray = None   # resized (h, w, 3) uint8 once paired
    camera: str = 'pending'    # pending | paired | missing | unused
    pose: np.ndarray = None
    gt: str = 'pending'        # pending | found | missing | unused
    frame: int = -1


class ImuRing:
    """Stamp-sorted, fixed-capacity IMU store (int ns stamps, accel + gyro rows)."""

    def __init__(self, capacity: int):
        self.stamps = np.empty(capacity, dtype=np.int64)
        self.data = np.empty((capacity, 6), dtype=np.float64)
        self.n = 0

    def __len__(self):
        return self.n

    def insert(self, stamp: int, row: np.ndarray) -> str:
        """'ok', 'duplicate', or 'queue_full' (the new sample is older than a full ring)."""
        n, cap = self.n, len(self.stamps)
        pos = n if n == 0 or stamp > self.stamps[n - 1] else int(
            np.searchsorted(self.stamps[:n], stamp))
        if pos < n and self.stamps[pos] == stamp:
            return 'duplicate'
        result = 'ok'
        if n == cap:
            if pos == 0:
                return 'queue_full'
            self._drop_front(1)
            n, pos, result = n - 1, pos - 1, 'evicted'
        self.stamps[pos + 1:n + 1] = self.stamps[pos:n]
        self.data[pos + 1:n + 1] = self.data[pos:n]
        self.stamps[pos] = stamp
        self.data[pos] = row
        self.n = n + 1
        return result

    def prune_before(self, stamp: int) -> None:
        """Drop samples older than stamp, keeping the last one before it (window coverage)."""
        k = max(int(np.searchsorted(self.stamps[:self.n], stamp)) - 1, 0)
        if k:
            self._drop_front(k)

    def _drop_front(self, k: int) -> None:
        n = self.n
        self.stamps[:n - k] = self.stamps[k:n]
        self.data[:n - k] = self.data[k:n]
        self.n = n - k

    def clear(self) -> None:
        self.n = 0

    def between(self, t0_ns: int, t1_ns: int, margin_ns: int = IMU_MARGIN_NS):
        """(stamps_ns, gyro (M, 3)) copies over [t0 - margin, t1 + margin], or None when
        fewer than two samples lie there."""
        stamps = self.stamps[:self.n]
        lo = int(np.searchsorted(stamps, int(t0_ns) - margin_ns, side='left'))
        hi = int(np.searchsorted(stamps, int(t1_ns) + margin_ns, side='right'))
        if hi - lo < 2:
            return None
        return stamps[lo:hi].copy(), self.data[lo:hi, 3:].copy()

    def after(self, stamp_ns: int):
        """(stamps_ns, accel (M, 3), gyro (M, 3)) copies of the samples after stamp_ns."""
        stamps = self.stamps[:self.n]
        lo = int(np.searchsorted(stamps, int(stamp_ns), side='right'))
        data = self.data[lo:self.n]
        return stamps[lo:].copy(), data[:, :3].copy(), data[:, 3:].copy()


class Synchronizer:
    """Pairs scans with camera frames, IMU and ground truth; emits samples via pop_ready().

    origin_ns: the stamp that becomes t = 0 s of the samples' sequence clock (build_sample works
    in float seconds); None takes the first stamp received. Stamps are ints in nanoseconds.
    calibration: how the sensors relate (kitti.sample.Calibration), put into every sample;
    None until set_calibration gives it (e.g. once CameraInfo and /tf_static arrived).
    Thread-safe: every public method holds one lock.
    """

    def __init__(self, sample_cfg: SampleConfig = None, sync_cfg: SyncConfig = None, *,
                 origin_ns: int = None, calibration: Calibration = None):
        self.sample_cfg = sample_cfg or SampleConfig()
        self.cfg = sync_cfg or SyncConfig()
        self._uses = set(self.sample_cfg.modalities)
        self._lock = threading.Lock()
        ns = seconds_to_ns
        self._slop = ns(self.cfg.slop_s)
        self._gt_slop = ns(self.cfg.gt_slop_s)
        self._lateness = ns(self.cfg.max_lateness_s)
        self._max_gap = ns(self.cfg.max_scan_gap_s)
        self._reorder = ns(self.cfg.reorder_window_s)
        self._camera_timeout = ns(self.cfg.camera_timeout_s)
        self._imu_timeout = ns(self.cfg.imu_timeout_s)
        self._gt_timeout = ns(self.cfg.gt_timeout_s)
        self._imu_history = max(ns(self.sample_cfg.imu_window_s) + IMU_MARGIN_NS,
                                ns(self.cfg.imu_keep_s))
        self._rewind = ns(self.cfg.rewind_s)
        self._run = 0
        self._rewinds = 0
        self._newest = {}           # newest stamp of each input stream in this run
        self._awaiting = set()      # streams whose messages of the old run may still come
        self._run_ref = None        # newest stamp of a run started by a rewind
        self._held, self._held_streams = [], set()   # the next run's first messages (_hold)
        self._received = Counter()
        self._dropped = Counter()
        self._masked = Counter()
        self._emitted = 0
        self._nonfinite_points = 0
        self._origin = None if origin_ns is None else int(origin_ns)
        self._calibration = calibration
        self._imu = ImuRing(self.cfg.max_imu_samples)
        self._ready = deque()
        self._clear_streams()

    # ----------------------------------------------------------------- inputs

    def add_image(self, stamp_ns: int, image: np.ndarray) -> None:
        """A camera frame, (H, W, 3) uint8 RGB."""
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f'add_image: image must be (H, W, 3) uint8, got {image.shape} '
                             f'{image.dtype}')
        with self._lock:
            self._route('image', stamp_ns, image)
            self._advance()

    def add_cloud(self, stamp_ns: int, points: np.ndarray) -> None:
        """A LiDAR scan, (N, 4) x, y, z, intensity in base_link. Kept by reference until used.

        Rows with NaN/Inf (no-return points of organised clouds) are removed and counted.
        """
        points = np.asarray(points, dtype=np.float32)
        if points.ndim != 2 or points.shape[1] != 4:
            raise ValueError(f'add_cloud: points must be (N, 4), got {points.shape}')
        # The per-row test is 40x slower than the whole-array one: only when something is off.
        finite = None if np.isfinite(points).all() else np.isfinite(points).all(axis=1)
        with self._lock:
            if finite is not None:
                self._nonfinite_points += int((~finite).sum())
                points = points[finite]
            self._route('cloud', stamp_ns, points)
            self._advance()

    def add_imu(self, stamp_ns: int, accel, gyro) -> None:
        """One IMU sample: accel (3,) [m/s^2], gyro (3,) [rad/s] in imu_link."""
        self.add_imu_batch([stamp_ns], np.reshape(accel, (1, -1)), np.reshape(gyro, (1, -1)))

    def add_imu_batch(self, stamps_ns, accel, gyro, then=None) -> None:
        """M IMU samples: stamps (M,) int ns, accel (M, 3), gyro (M, 3); any order.

        then(), if given, runs under the lock once the rows are in: before pop_ready can hand
        out a sample they complete (the intake process forwards the rows to the prediction
        process there, so they reach it ahead of that sample).

        The result (samples, their IMU, every counter) is the one of M add_imu calls in this
        order: each row goes the same way, but the pending scans are re-examined only after a
        row that can change them (the IMU reaching a waiting scan's stamp, a row inserted
        before newer ones, a full ring, a new run) and once at the end, not after every row.
        """
        stamps = np.asarray(stamps_ns, dtype=np.int64).reshape(-1)
        rows = np.concatenate([np.asarray(accel, dtype=np.float64),
                               np.asarray(gyro, dtype=np.float64)], axis=-1) \
            if np.ndim(accel) == 2 and np.ndim(gyro) == 2 else None
        if rows is None or rows.shape != (len(stamps), 6):
            raise ValueError(f'add_imu: accel and gyro must be (M, 3) with M = {len(stamps)} '
                             f'stamps, got {np.shape(accel)} and {np.shape(gyro)}')
        with self._lock:
            ring = self._imu
            for stamp, row in zip(stamps.tolist(), rows):
                if ring.n == len(ring.stamps):
                    self._advance()   # prunes as the previous row's add_imu would have
                run, n = self._run, ring.n
                self._route('imu', stamp, row)
                if self._run != run or (ring.n > n and ring.stamps[ring.n - 1] != stamp) or \
                        (self._scans and self._imu_latest is not None and
                         self._imu_latest >= self._scans[0].stamp):
                    self._advance()
            self._advance()
            if then is not None:
                then()

    def add_ground_truth(self, stamp_ns: int, pose) -> None:
        """Ground-truth T_odom_base (4, 4) at a scan's stamp (bags carry it; live robots don't)."""
        pose = np.asarray(pose, dtype=np.float64)
        if pose.shape != (4, 4) or not np.isfinite(pose).all():
            raise ValueError(f'add_ground_truth: pose must be a finite (4, 4) matrix, got shape '
                             f'{pose.shape}')
        with self._lock:
            self._route('ground_truth', stamp_ns, pose)
            self._advance()

    def set_calibration(self, calibration: Calibration) -> None:
        """Calibration for the samples emitted from now on (None: unknown again)."""
        if calibration is not None and not isinstance(calibration, Calibration):
            raise ValueError(f'set_calibration: expected a Calibration, got '
                             f'{type(calibration).__name__}')
        with self._lock:
            self._calibration = calibration

    @property
    def calibration(self):
        return self._calibration

    def reject(self, kind: str, reason: str = 'bad_message') -> None:
        """Count an input of `kind` (one of INPUTS) that could not be read, as a drop."""
        with self._lock:
            self._received[kind] += 1
            self._dropped[reason] += 1

    # ---------------------------------------------------------------- outputs

    def pop_ready(self) -> list:
        """Samples completed since the last call, in stamp order."""
        with self._lock:
            out = list(self._ready)
            self._ready.clear()
            return out

    def flush(self) -> None:
        """End of stream: resolve every pending scan as if all timeouts had expired."""
        with self._lock:
            if self._held:   # nothing of the old run can come any more
                self._start_run(min(s for _, s, _ in self._held), self._held[0][0])
            self._flushing = True
            try:
                self._advance()
            finally:
                self._flushing = False

    def imu_between(self, t0_ns: int, t1_ns: int):
        """(stamps_ns, gyro (M, 3)) copies of the IMU held over [t0, t1] plus IMU_MARGIN_NS on
        either side, or None when fewer than two samples are held there."""
        with self._lock:
            return self._imu.between(t0_ns, t1_ns)

    def imu_after(self, stamp_ns: int):
        """(stamps_ns, accel (M, 3), gyro (M, 3)) copies of the IMU held after stamp_ns, in
        stamp order (M may be 0): how the online filter (filter/online.py) reads the IMU without
        a path of its own into the intake."""
        with self._lock:
            return self._imu.after(stamp_ns)

    @property
    def run(self) -> int:
        """meta['run'] of the samples being built now (0, +1 at every rewind)."""
        return self._run

    @property
    def origin_ns(self):
        """The stamp that is t = 0 s of the samples' meta stamps (None until the first input)."""
        return self._origin

    @property
    def stats(self) -> dict:
        with self._lock:
            return {
                'received': {k: self._received[k] for k in INPUTS},
                'emitted': self._emitted,
                'dropped': dict(self._dropped),
                'masked': {k: self._masked[k] for k in ('camera', 'imu', 'target')},
                'pending': {'scans': len(self._scans), 'images': len(self._images),
                            'imu': len(self._imu), 'ground_truth': len(self._gt_poses),
                            'ready': len(self._ready)},
                'nonfinite_points': self._nonfinite_points,
                'watermark_ns': self._watermark,
                'run': self._run,
                'rewinds': self._rewinds,
            }

    # --------------------------------------------------------------- internal

    def _clear_streams(self):
        self._scans = []
        self._image_stamps, self._images = [], []
        self._gt_stamps, self._gt_poses = [], []
        self._prev = None
        self._frame = 0
        self._watermark = None
        self._camera_latest = self._imu_latest = self._gt_latest = None
        self._gt_seen = False
        self._flushing = False

    def _accept(self, kind: str, stamp_ns) -> int:
        """Count the input; the stamp as int, or None when it is too late or left over from
        the run before a rewind (counted). A stamp far behind its stream starts a new run."""
        stamp = int(stamp_ns)
        self._received[kind] += 1
        if self._origin is None:
            self._origin = stamp
        newest = self._newest.get(kind)
        if newest is not None and stamp < newest - self._rewind:
            self._start_run(stamp, kind)
        elif kind in self._awaiting and abs(stamp - self._run_ref) > self._rewind:
            self._dropped['before_rewind'] += 1
            return None
        self._awaiting.discard(kind)
        self._newest[kind] = max(self._newest.get(kind, stamp), stamp)
        if self._run_ref is not None:
            self._run_ref = max(self._run_ref, stamp)
        if self._watermark is not None and stamp < self._watermark - self._lateness:
            self._dropped['late'] += 1
            return None
        return stamp

    # --- one input into the current run (under the lock; the caller advances) ---------------

    def _route(self, kind: str, stamp_ns, payload) -> None:
        if not self._hold(kind, int(stamp_ns), payload):
            self._insert(kind, int(stamp_ns), payload)

    def _insert(self, kind: str, stamp_ns: int, payload) -> None:
        stamp = self._accept(kind, stamp_ns)
        if stamp is not None:
            {'image': self._insert_image, 'cloud': self._insert_cloud, 'imu': self._insert_imu,
             'ground_truth': self._insert_gt}[kind](stamp, payload)

    def _insert_image(self, stamp: int, image) -> None:
        if 'camera' not in self._uses:
            return
        pos = bisect.bisect_left(self._image_stamps, stamp)
        if pos < len(self._image_stamps) and self._image_stamps[pos] == stamp:
            self._dropped['duplicate'] += 1
            return
        self._image_stamps.insert(pos, stamp)
        self._images.insert(pos, image)
        self._camera_latest = _newer(self._camera_latest, stamp)
        if len(self._images) > self.cfg.max_pending:
            self._image_stamps.pop(0)
            self._images.pop(0)
            self._dropped['queue_full'] += 1

    def _insert_cloud(self, stamp: int, points) -> None:
        if self._prev is not None and stamp <= self._prev.stamp:
            self._dropped['late'] += 1  # its neighbours' sample was already emitted
            return
        pos = bisect.bisect_left(self._scans, stamp, key=lambda s: s.stamp)
        if pos < len(self._scans) and self._scans[pos].stamp == stamp:
            self._dropped['duplicate'] += 1
            return
        self._scans.insert(pos, _Scan(stamp, points))
        self._watermark = _newer(self._watermark, stamp)
        if len(self._scans) > self.cfg.max_pending:
            self._scans.pop(0)
            self._dropped['queue_full'] += 1

    def _insert_imu(self, stamp: int, row) -> None:
        if 'imu' not in self._uses:
            return
        if not np.isfinite(row).all():
            self._dropped['nonfinite'] += 1
            return
        result = self._imu.insert(stamp, row)
        if result in ('duplicate', 'queue_full'):
            self._dropped[result] += 1
            return
        if result == 'evicted':
            self._dropped['queue_full'] += 1
        self._imu_latest = _newer(self._imu_latest, stamp)

    def _insert_gt(self, stamp: int, pose) -> None:
        if self.cfg.ground_truth == 'ignore':
            return
        self._gt_seen = True
        pos = bisect.bisect_left(self._gt_stamps, stamp)
        if pos < len(self._gt_stamps) and self._gt_stamps[pos] == stamp:
            self._dropped['duplicate'] += 1
            return
        self._gt_stamps.insert(pos, stamp)
        self._gt_poses.insert(pos, pose)
        self._gt_latest = _newer(self._gt_latest, stamp)
        if len(self._gt_poses) > self.cfg.max_pending:
            self._gt_stamps.pop(0)
            self._gt_poses.pop(0)
            self._dropped['queue_full'] += 1

    def _hold(self, kind: str, stamp: int, payload) -> bool:
        """A stream that goes back starts the next run early: its messages wait here until
        every stream of the old run has gone back too (the run changes there), so what the old
        run still receives on the other streams is used, whichever stream leads the next pass
        (the IMU leads a bag; across topics the next pass's first scan can overtake the last
        pass's final image). A stream that does not follow within max_lateness_s of held sensor
        time (a lost sensor) does not hold the new run back any longer."""
        if kind not in self._held_streams:
            newest = self._newest.get(kind)
            if newest is None or stamp >= newest - self._rewind:
                return False
            self._held_streams.add(kind)
        self._held.append((kind, stamp, payload))
        stamps = [s for _, s, _ in self._held]
        if self._held_streams >= set(self._newest) or \
                max(stamps) - min(stamps) > self._lateness or len(self._held) > MAX_HELD:
            self._start_run(min(stamps), kind)
        return True

    def _start_run(self, stamp: int, cause: str) -> None:
        """Time went back to `stamp` (seen on `cause`): finish what the old run can still
        emit, forget it, and count a new run."""
        self._flushing = True
        try:
            self._advance()
        finally:
            self._flushing = False
        self._awaiting = set(self._newest) - {cause} - self._held_streams
        self._clear_streams()
        self._imu.clear()
        self._newest = {}
        self._run += 1
        self._rewinds += 1
        self._run_ref = stamp
        log.info('time went back on %s (to %d ns): run %d starts', cause, stamp, self._run)
        held, self._held, self._held_streams = self._held, [], set()
        for kind, held_stamp, payload in held:
            self._insert(kind, held_stamp, payload)

    def _waited(self, stamp: int, timeout: int) -> bool:
        return self._flushing or self._watermark >= stamp + timeout

    def _advance(self):
        """Process pending scans in stamp order as far as their inputs are complete."""
        while self._scans:
            scan = self._scans[0]
            if not self._waited(scan.stamp, self._reorder):
                break  # an older scan may still arrive
            if not (self._resolve_camera(scan) and self._resolve_gt(scan)):
                break
            prev = self._prev
            if prev is not None and scan.stamp - prev.stamp <= self._max_gap:
                if not self._imu_complete(scan):
                    break
                self._take_next_scan()
                self._emit(prev, scan)
            else:
                if prev is not None:
                    self._dropped['gap'] += 1
                    log.debug('scan gap %.3f s: chain restarted',
                              (scan.stamp - prev.stamp) / NS_PER_S)
                self._take_next_scan()
        self._prune()

    def _take_next_scan(self):
        scan = self._scans.pop(0)
        scan.frame = self._frame
        self._frame += 1
        self._prev = scan

    def _resolve_camera(self, scan: _Scan) -> bool:
        if scan.camera != 'pending':
            return True
        if 'camera' not in self._uses:
            scan.camera = 'unused'
            return True
        passed = self._camera_latest is not None and self._camera_latest >= scan.stamp
        if not (passed or self._waited(scan.stamp, self._camera_timeout)):
            return False
        i = _nearest(self._image_stamps, scan.stamp, self._slop)
        if i is None:
            scan.camera = 'missing'
        else:
            scan.camera = 'paired'
            # Resized once here; build_sample's own resize is then a no-op (same result).
            scan.image = resize_image(self._images[i], self.sample_cfg).transpose(1, 2, 0)
            # A frame serves one scan only: reused, it would fake zero visual motion.
            del self._image_stamps[i], self._images[i]
        return True

    def _resolve_gt(self, scan: _Scan) -> bool:
        if scan.gt != 'pending':
            return True
        mode = self.cfg.ground_truth
        if mode == 'ignore' or (mode == 'auto' and not self._gt_seen):
            scan.gt = 'unused'
            return True
        i = _nearest(self._gt_stamps, scan.stamp, self._gt_slop)
        if i is not None:
            scan.gt, scan.pose = 'found', self._gt_poses[i]
            return True
        passed = self._gt_latest is not None and self._gt_latest > scan.stamp + self._gt_slop
        if passed or self._waited(scan.stamp, self._gt_timeout):
            scan.gt = 'missing'
            return True
        return False

    def _late_gt_lookup(self, scan: _Scan):
        """GT that arrived after the scan was resolved (first GT message, cross-topic order)."""
        if scan.gt in ('unused', 'missing') and self._gt_seen:
            i = _nearest(self._gt_stamps, scan.stamp, self._gt_slop)
            if i is not None:
                scan.gt, scan.pose = 'found', self._gt_poses[i]

    def _imu_complete(self, scan: _Scan) -> bool:
        if 'imu' not in self._uses:
            return True
        if self._imu_latest is not None and self._imu_latest >= scan.stamp:
            return True
        return self._waited(scan.stamp, self._imu_timeout)

    def _emit(self, prev: _Scan, scan: _Scan):
        """Build the sample prev -> scan, or drop it by policy (counted)."""
        drop_missing = self.cfg.missing_policy == 'drop'
        for s in (prev, scan):
            self._late_gt_lookup(s)
        poses = (prev.pose, scan.pose) if prev.gt == scan.gt == 'found' else None
        if poses is None and self.cfg.ground_truth == 'require':
            self._dropped['no_ground_truth'] += 1
            return
        images = (prev.image, scan.image) if prev.camera == scan.camera == 'paired' else None
        if images is None and 'camera' in self._uses and drop_missing:
            self._dropped['no_camera'] += 1
            return
        scans, point_sets = (prev.points, scan.points), None
        if self.sample_cfg.max_points and 'lidar' in self._uses:
            scans, point_sets = None, (self._point_set(prev), self._point_set(scan))
        sample = build_sample(self.sample_cfg, stamps=(self._seconds(prev.stamp),
                                                       self._seconds(scan.stamp)),
                              images=images, scans=scans, point_sets=point_sets,
                              imu=self._imu_data(), poses=poses, sequence=self.cfg.sequence,
                              frame=scan.frame, calibration=self._calibration)
        has_camera, _, has_imu = sample['modality_mask']
        if 'imu' in self._uses and not has_imu and drop_missing:
            self._dropped['no_imu'] += 1
            return
        self._masked['camera'] += int('camera' in self._uses and not has_camera)
        self._masked['imu'] += int('imu' in self._uses and not has_imu)
        self._masked['target'] += int(poses is None)
        sample['meta']['stamp_prev_ns'] = prev.stamp
        sample['meta']['stamp_cur_ns'] = scan.stamp
        sample['meta']['run'] = self._run
        self._ready.append(sample)
        self._emitted += 1
        if len(self._ready) > self.cfg.max_pending:
            self._ready.popleft()
            self._dropped['queue_full'] += 1

    def _point_set(self, scan: _Scan):
        """The scan subsampled once, exactly as build_sample would; the full scan is let go."""
        if scan.point_set is None:
            scan.point_set = subsample_scan(self.sample_cfg, scan.points,
                                            self.sample_cfg.max_points, self.cfg.sequence,
                                            scan.frame)
            scan.points = None
        return scan.point_set

    def _imu_data(self):
        if 'imu' not in self._uses or len(self._imu) < 2:
            return None
        n = self._imu.n
        data = self._imu.data[:n]
        return ImuData(stamps=self._seconds(self._imu.stamps[:n]), accel=data[:, :3].copy(),
                       gyro=data[:, 3:].copy(), source='synchronizer', t0_ns=self._origin)

    def _seconds(self, stamp):
        """ns -> seconds on the sample clock; the int subtraction first keeps full precision."""
        return (stamp - self._origin) / NS_PER_S

    def _prune(self):
        """Drop inputs that no pending or future scan can use (memory stays bounded)."""
        if self._watermark is None:
            return
        # Pending scans are newer than the late bound (their waits end before it) and newer
        # than the last processed scan: nothing older than both can pair with a scan any more.
        late_bound = self._watermark - self._lateness
        ref = max(late_bound, self._prev.stamp) if self._prev else late_bound
        _prune_sorted(self._image_stamps, self._images, ref - self._slop)
        _prune_sorted(self._gt_stamps, self._gt_poses, ref - self._gt_slop)
        # The next sample's IMU window starts at the last processed scan (or imu_window_s
        # before a newer scan).
        imu_ref = self._prev.stamp if self._prev else late_bound
        self._imu.prune_before(imu_ref - self._imu_history)


def _newer(latest, stamp: int) -> int:
    return stamp if latest is None else max(latest, stamp)


def _nearest(stamps: list, stamp: int, tolerance: int):
    """Index of the stamp nearest to `stamp` within tolerance (ties: the earlier), else None."""
    pos = bisect.bisect_left(stamps, stamp)
    best = None
    for i in (pos - 1, pos):
        if 0 <= i < len(stamps) and abs(stamps[i] - stamp) <= tolerance:
            if best is None or abs(stamps[i] - stamp) < abs(stamps[best] - stamp):
                best = i
    return best


def _prune_sorted(stamps: list, items: list, before: int) -> None:
    k = bisect.bisect_left(stamps, before)
    del stamps[:k], items[:k]
