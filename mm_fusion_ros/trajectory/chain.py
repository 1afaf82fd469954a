"""OnlineTrajectory: every step of motion accounted for (DESIGN §11), without ROS.

Samples arrive as predicted steps (stamp_prev_ns -> stamp_cur_ns, 6-vector, covariance). They
chain by stamps, not by arrival:
- a sample that starts where the last one ended extends the segment;
- one that starts later left a hole: the hole is bridged (bridge.StepBridge; flagged and
  counted) when it is at most `max_bridge_s` long, else a new segment starts ('gap');
- one that starts earlier, or carries another synchronizer run id (time went back, e.g. a
  looped bag), starts a new segment ('rewind'). Segments keep their poses; each starts at the
  identity (odom = the segment's first base_link pose, DESIGN §3).
Ground truth comes from the recorded ground-truth messages (add_ground_truth), looked up at each
pose's stamp (nearest within gt_slop_s; a message that comes after its pose fills it in later),
never from the samples' targets, so a lost step shows in the evaluation. Poses and covariances
come from a PoseSource: the chain of steps with first-order SE(3) covariance, or the inertial
filter (filter/online.py, same two methods; it is the bridge too).
"""
import bisect
from collections import deque
from dataclasses import dataclass, field
import threading

import numpy as np

from mm_fusion_ros.config import ConfigBase
from mm_fusion_ros.geometry import invert_pose, vec6_to_pose
from mm_fusion_ros.stamps import NS_PER_S
from mm_fusion_ros.trajectory import covariance
from mm_fusion_ros.trajectory.bridge import ConstantVelocityBridge, StepInfo

BRIDGE_MODES = ('imu', 'velocity', 'off')
PENDING_GT = 256        # poses that may still receive a late ground-truth message


@dataclass(frozen=True)
class TrajectoryConfig(ConfigBase):
    """How the online trajectory bridges holes and finds ground truth."""

    bridge: str = field(default='imu', metadata={
        'help': "missing steps: 'imu' = gyro rotation + constant velocity, 'velocity' = "
                "constant velocity only, 'off' = start a new segment instead (with the "
                'inertial filter running, it bridges holes from its own state, with the IMU)'})
    bridge_history: int = field(default=3, metadata={
        'help': 'predicted steps averaged for the constant-velocity twist of a bridge'})
    bridge_variance_scale: float = field(default=4.0, metadata={
        'help': "a bridged step's covariance: the recent steps' one scaled to its length, "
                'times this'})
    max_bridge_s: float = field(default=2.0, metadata={
        'help': 'a longer hole is not bridged: a new segment starts [s]'})
    gt_slop_s: float = field(default=0.01, metadata={
        'help': 'max |ground-truth stamp - pose stamp| for a ground-truth pose to belong to a '
                'pose [s]'})
    gt_history: int = field(default=2000, metadata={
        'help': 'ground-truth messages held for the lookup (the newest)'})

    def __post_init__(self):
        if self.bridge not in BRIDGE_MODES:
            raise ValueError(f'TrajectoryConfig.bridge must be one of {BRIDGE_MODES}, got '
                             f'{self.bridge!r}')
        if self.bridge_history < 1 or self.gt_history < 1:
            raise ValueError('TrajectoryConfig needs bridge_history >= 1 and gt_history >= 1')
        if not (self.bridge_variance_scale > 0 and self.max_bridge_s > 0
                and self.gt_slop_s >= 0):
            raise ValueError('TrajectoryConfig needs bridge_variance_scale > 0, max_bridge_s > 0 '
                             'and gt_slop_s >= 0')


class ChainPoseSource:
    """PoseSource by composition: T_k = T_{k-1} step, covariance by covariance.compose.

    The interface a filter implements instead: start(stamp_ns) at the identity, and
    add(stamp_prev_ns, stamp_cur_ns, mean6, cov6, measured) -> (pose 4x4, body covariance
    6x6); measured False: the step was predicted without camera and LiDAR (chained all the
    same here; a filter carries on with the IMU instead).
    """

    def start(self, stamp_ns: int) -> None:
        self.pose, self.cov = np.eye(4), np.zeros((6, 6))

    def add(self, stamp_prev_ns: int, stamp_cur_ns: int, mean6, cov6, measured=True,
            bridged=False):
        """measured: the step came from camera or LiDAR; bridged: it spans a hole (a
        StepBridge's). Both only matter to a source that keeps state (the inertial filter)."""
        step = vec6_to_pose(mean6)
        self.cov = covariance.compose(self.cov, step, covariance.step_covariance(mean6, cov6))
        self.pose = self.pose @ step
        return self.pose, self.cov


@dataclass
class PoseRecord:
    """One pose of the trajectory, as published."""

    stamp_ns: int
    segment: int
    index: int                 # within the segment; 0 is its first pose (the identity)
    pose: np.ndarray           # 4x4 T_odom_base_pred
    cov: np.ndarray            # 6x6 pose covariance in odom (x y z, rotation about x y z)
    twist: np.ndarray          # (6,) in base_link_pred at this pose
    twist_cov: np.ndarray      # 6x6
    dt: float                  # length of the step into this pose [s]
    bridged: str               # '' (predicted), or the bridge's source ('imu', 'velocity')
    gt_pose: np.ndarray = None  # ground truth relative to the segment's first one, if known


@dataclass
class SegmentTrack:
    """A segment's poses for writing: stamps (N,), poses (N, 4, 4), bridged (N,) bool,
    gt (N, 4, 4) relative to its first pose or None when any pose lacks ground truth."""

    segment: int
    reason: str                # why it started: 'start', 'rewind', 'gap'
    stamps_ns: np.ndarray
    poses: np.ndarray
    bridged: np.ndarray
    gt: np.ndarray = None
    gt_valid: np.ndarray = field(default=None)


class _Segment:
    """Growable columns of one segment (compact: ~200 bytes a pose)."""

    def __init__(self, number: int, reason: str, run, stamp_ns: int, history: int = 16):
        self.number, self.reason, self.run = number, reason, run
        self.n = 0
        self.stamps = np.zeros(256, dtype=np.int64)
        self.poses = np.zeros((256, 3, 4))
        self.bridged = np.zeros(256, dtype=bool)
        self.gt = np.zeros((256, 3, 4))
        self.gt_valid = np.zeros(256, dtype=bool)
        self.recent = deque(maxlen=history)   # StepInfo of the latest predicted steps
        self.append(stamp_ns, np.eye(4), False)

    @property
    def last_stamp(self) -> int:
        return int(self.stamps[self.n - 1])

    def append(self, stamp_ns: int, pose, bridged: bool) -> int:
        if self.n == len(self.stamps):
            for name in ('stamps', 'poses', 'bridged', 'gt', 'gt_valid'):
                old = getattr(self, name)
                new = np.zeros((2 * len(old),) + old.shape[1:], dtype=old.dtype)
                new[:self.n] = old[:self.n]
                setattr(self, name, new)
        i = self.n
        self.stamps[i], self.poses[i], self.bridged[i] = stamp_ns, pose[:3], bridged
        self.n += 1
        return i

    def relative_gt(self, i: int):
        if not (self.gt_valid[0] and self.gt_valid[i]):
            return None
        first, pose = np.eye(4), np.eye(4)
        first[:3], pose[:3] = self.gt[0], self.gt[i]
        return invert_pose(first) @ pose

    def track(self) -> SegmentTrack:
        n = self.n
        poses = np.zeros((n, 4, 4))
        poses[:, :3], poses[:, 3, 3] = self.poses[:n], 1.0
        valid = self.gt_valid[:n].copy()
        gt = None
        if valid.all():
            gt = np.zeros((n, 4, 4))
            gt[:, :3], gt[:, 3, 3] = self.gt[:n], 1.0
            gt = invert_pose(gt[0]) @ gt
        return SegmentTrack(segment=self.number, reason=self.reason,
                            stamps_ns=self.stamps[:n].copy(), poses=poses,
                            bridged=self.bridged[:n].copy(), gt=gt, gt_valid=valid)


class GroundTruthIndex:
    """The newest `capacity` ground-truth poses by stamp; nearest lookup within a tolerance.
    A stamp received again (a looped bag) replaces the pose held for it."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.stamps, self.poses = [], {}
        self.order = deque()

    def add(self, stamp_ns: int, pose) -> None:
        if stamp_ns not in self.poses:
            bisect.insort(self.stamps, stamp_ns)
            self.order.append(stamp_ns)
        self.poses[stamp_ns] = np.asarray(pose, dtype=np.float64)
        while len(self.order) > self.capacity:
            old = self.order.popleft()
            del self.poses[old]
            del self.stamps[bisect.bisect_left(self.stamps, old)]

    def nearest(self, stamp_ns: int, tolerance_ns: int):
        pos = bisect.bisect_left(self.stamps, stamp_ns)
        best = None
        for i in (pos - 1, pos):
            if 0 <= i < len(self.stamps) and abs(self.stamps[i] - stamp_ns) <= tolerance_ns and \
                    (best is None or abs(self.stamps[i] - stamp_ns) < abs(best - stamp_ns)):
                best = self.stamps[i]
        return None if best is None else self.poses[best]


class OnlineTrajectory:
    """Chains predicted steps by stamps into segments; thread-safe (one lock)."""

    def __init__(self, cfg: TrajectoryConfig = None, bridge=None, source=None):
        self.cfg = cfg or TrajectoryConfig()
        if bridge is None and self.cfg.bridge != 'off':
            bridge = ConstantVelocityBridge(self.cfg.bridge_history,
                                            self.cfg.bridge_variance_scale)
        self.bridge = bridge
        self.source = source or ChainPoseSource()
        self._lock = threading.Lock()
        self._segments = []
        self._gt = GroundTruthIndex(self.cfg.gt_history)
        self._pending = deque(maxlen=PENDING_GT)   # (segment, row, stamp) without GT yet
        self._slop = int(round(self.cfg.gt_slop_s * NS_PER_S))
        self.counts = {'poses': 0, 'steps': 0, 'bridged': 0, 'bridged_imu': 0,
                       'segments': 0, 'rewind': 0, 'gap': 0}

    # --- inputs --------------------------------------------------------------------------
    def add_ground_truth(self, stamp_ns: int, pose) -> None:
        """A recorded ground-truth pose T_odom_base (any frame origin; made relative later)."""
        with self._lock:
            self._gt.add(int(stamp_ns), pose)
            still = deque(maxlen=PENDING_GT)
            for seg, row, stamp in self._pending:
                if abs(stamp - stamp_ns) <= self._slop:
                    seg.gt[row], seg.gt_valid[row] = np.asarray(pose)[:3], True
                else:
                    still.append((seg, row, stamp))
            self._pending = still

    def add_step(self, stamp_prev_ns: int, stamp_cur_ns: int, mean6, cov6, run=None,
                 measured=True) -> list:
        """A predicted step; -> the PoseRecords it made (a bridged one first, if any).
        measured False: predicted without camera and LiDAR (see ChainPoseSource)."""
        stamp_prev_ns, stamp_cur_ns = int(stamp_prev_ns), int(stamp_cur_ns)
        if stamp_cur_ns <= stamp_prev_ns:
            raise ValueError(f'trajectory step {stamp_prev_ns} -> {stamp_cur_ns} ns does not go '
                             'forward in time')
        mean6 = np.asarray(mean6, dtype=np.float64).reshape(6)
        cov6 = np.asarray(cov6, dtype=np.float64).reshape(6, 6)
        if not (np.isfinite(mean6).all() and np.isfinite(cov6).all()):
            # Chained, one NaN would make every later pose of the segment NaN; left out, the
            # step is a gap that the next one bridges.
            raise ValueError(f'trajectory step {stamp_prev_ns} -> {stamp_cur_ns} ns: the '
                             f'prediction is not finite (mean {mean6.tolist()}); not chained')
        out = []
        with self._lock:
            seg = self._segments[-1] if self._segments else None
            if seg is None:
                seg = self._start(stamp_prev_ns, 'start', run)
            elif run != seg.run or stamp_prev_ns < seg.last_stamp:
                seg = self._start(stamp_prev_ns, 'rewind', run)
            elif stamp_prev_ns > seg.last_stamp:
                bridged = self._bridge(seg, seg.last_stamp, stamp_prev_ns)
                if bridged is None:
                    seg = self._start(stamp_prev_ns, 'gap', run)
                else:
                    out.append(bridged)
            dt = (stamp_cur_ns - stamp_prev_ns) / NS_PER_S
            out.append(self._add(seg, stamp_prev_ns, stamp_cur_ns, mean6, cov6, '', measured))
            seg.recent.append(StepInfo(dt=dt, mean6=mean6, cov6=cov6))
            self.counts['steps'] += 1
        return out

    # --- outputs -------------------------------------------------------------------------
    def tracks(self) -> list:
        """Every segment's poses, for writing (copies)."""
        with self._lock:
            return [seg.track() for seg in self._segments]

    def stats(self) -> dict:
        with self._lock:
            return dict(self.counts)

    # --- internal (under the lock) ---------------------------------------------------------
    def _start(self, stamp_ns: int, reason: str, run) -> _Segment:
        seg = _Segment(len(self._segments), reason, run, stamp_ns,
                       history=max(16, self.cfg.bridge_history))
        self._segments.append(seg)
        self.source.start(stamp_ns)
        self._lookup_gt(seg, 0, stamp_ns)
        self.counts['segments'] += 1
        self.counts['poses'] += 1
        if reason in self.counts:
            self.counts[reason] += 1
        return seg

    def _bridge(self, seg, t0_ns: int, t1_ns: int):
        if self.bridge is None or (t1_ns - t0_ns) / NS_PER_S > self.cfg.max_bridge_s:
            return None
        step = self.bridge.bridge(t0_ns, t1_ns, list(seg.recent))
        if step is None:
            return None
        self.counts['bridged'] += 1
        self.counts['bridged_imu'] += int(step.source == 'imu')
        return self._add(seg, t0_ns, t1_ns, step.mean6, step.cov6, step.source)

    def _add(self, seg, stamp_prev_ns, stamp_cur_ns, mean6, cov6, bridged,
             measured=True) -> PoseRecord:
        pose, cov = self.source.add(stamp_prev_ns, stamp_cur_ns, mean6, cov6,
                                    measured and not bridged, bridged=bool(bridged))
        row = seg.append(stamp_cur_ns, pose, bool(bridged))
        self._lookup_gt(seg, row, stamp_cur_ns)
        self.counts['poses'] += 1
        dt = (stamp_cur_ns - stamp_prev_ns) / NS_PER_S
        return PoseRecord(stamp_ns=stamp_cur_ns, segment=seg.number, index=row,
                          pose=pose.copy(), cov=covariance.odom_covariance(pose, cov),
                          twist=covariance.twist(mean6, dt),
                          twist_cov=covariance.twist_covariance(mean6, cov6, dt), dt=dt,
                          bridged=bridged, gt_pose=seg.relative_gt(row))

    def _lookup_gt(self, seg, row: int, stamp_ns: int) -> None:
        pose = self._gt.nearest(stamp_ns, self._slop)
        if pose is None:
            self._pending.append((seg, row, stamp_ns))
        else:
            seg.gt[row], seg.gt_valid[row] = pose[:3], True
