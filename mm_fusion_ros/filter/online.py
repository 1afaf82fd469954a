"""The inertial filter in the online node (DESIGN §10, §11): pose source and bridge of the
trajectory, and odometry at IMU rate.

FilterPoseSource implements what trajectory.chain.OnlineTrajectory asks of a pose source
(start, add) and of a bridge (bridge), over one filter.odometry.InertialOdometry per trajectory
segment. The IMU comes from the synchronizer's store (Synchronizer.imu_after: the samples after a
stamp), pulled when a step arrives and, at IMU rate, by poll(); the synchronizer's intake is not
touched. Per step k-1 -> k of the network: the IMU up to scan k, scan k (a cloned pose), the
network's relative pose with its log-variance (RelativePoseNoise: scaled, floored); the pose is
the filter's at scan k after that update, with its covariance. Where the IMU has not reached
scan k yet (an IMU stamped late, imu_time_offset_s < 0), the pose is the filter's state carried
to the scan with the newest rates (InertialOdometry.forecast), published at once; the relative
pose is applied when the IMU reaches the scan. A step predicted without camera
and LiDAR gives the filter no relative pose: it carries on with the IMU and its pseudo-
measurements. A missing step (a hole) is bridged by the filter the same way.

Frames: each segment starts at the identity (DESIGN §3). The filter's own odom is base_link at
its first IMU sample, so the source keeps an anchor A (segment frame <- filter odom) chosen where
the filter's poses begin, so that the published poses stay continuous: until the filter has
initialised (init_window_s of IMU, or the noise network's window), steps are chained as
ChainPoseSource does; from then on pose = A @ T_filter. With the IMU from before the segment's
first scan held, the filter is ready at once and A = T_filter(first scan)^-1: the poses are then
the offline run_filter's (tested). poll() (publish_rate imu) feeds the IMU as it comes and
returns a PoseRecord per sample; scans then arrive after the filter passed them and are cloned
back-dated (InertialOdometry), which the offline run does not do: scan poses differ from it
slightly (docs/inertial_filter.md, "Online"). Reading the IMU-rate poses leaves the filter's
covariance propagation to its own cadence (every cov_every samples, as offline): their
covariances are those of the last propagation or update.
"""
from collections import OrderedDict
from dataclasses import dataclass, field
import logging
import math
import threading

import numpy as np

from mm_fusion_ros.filter.checkpoint import (
    build_filter,
    EMBED_KEY,
    filter_payload,
    filter_section,
    KIND,
)
from mm_fusion_ros.filter.config import (
    check_choice,
    FilterConfig,
    matrix_to_3x4,
    RelativePoseNoise,
)
from mm_fusion_ros.filter.ekf import STATE_DIM
from mm_fusion_ros.filter.odometry import InertialOdometry, STAMP_TOL
from mm_fusion_ros.geometry import invert_pose, pose_to_vec6, skew, vec6_to_pose
from mm_fusion_ros.stamps import NS_PER_S
from mm_fusion_ros.training.checkpoint import load_checkpoint
from mm_fusion_ros.trajectory import covariance
from mm_fusion_ros.trajectory.bridge import BridgedStep
from mm_fusion_ros.trajectory.chain import PoseRecord

log = logging.getLogger(__name__)

FILTER_MODES = ('auto', 'on', 'off')
PUBLISH_RATES = ('scan', 'imu')
# IMU fed from this long before a segment's first scan where the synchronizer still holds it,
# so the filter can be initialised when the first step arrives.
START_BACK_NS = 1_000_000_000
FINISHED_KEPT = 64      # scan poses whose clone was let go, kept for look-ups
# The newest scan stamps given to the filter (a scan comes back as the next sample's first
# scan); not the whole drive's, which grew with every scan.
SCANNED_KEPT = 64


@dataclass(frozen=True)
class OnlineFilterConfig(RelativePoseNoise):
    """The inertial filter in the online node (ROS parameters filter.*)."""

    mode: str = field(default='auto', metadata={
        'help': 'auto: the filter runs when its weights are found (filter.checkpoint, else '
                'embedded in the initial or resumed checkpoint), else the network steps are '
                'chained (logged); on: always (without weights: fixed pseudo-measurement noise, '
                'no learned speed); off: never'})
    checkpoint: str = field(default='', metadata={
        'help': 'inertial filter checkpoint (train_imu_filter, e.g. '
                'pretrain_models/imu_filter.pth) or a fusion checkpoint that embeds one; '
                'empty: the one embedded in the initial checkpoint'})
    publish_rate: str = field(default='imu', metadata={
        'help': "with the filter: 'imu' = /mm_fusion/odom and /tf at every IMU sample (poses "
                "between scans), 'scan' = one pose per scan; without it always 'scan'"})
    poll_period_s: float = field(default=0.01, metadata={
        'help': 'with publish_rate imu: how often the node feeds the filter the new IMU '
                'samples and publishes their poses [s]'})
    imu_outage_s: float = field(default=1.0, metadata={
        'help': 'the IMU silent for longer than this is an outage: the scans in it are '
                'chained from the network steps and not queued in the filter, and the filter '
                'restarts (re-initialises) when the IMU comes back [s]'})

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.mode, bool):   # YAML 1.1 (ROS parameters) reads on / off as booleans
            object.__setattr__(self, 'mode', 'on' if self.mode else 'off')
        check_choice(self, 'mode', FILTER_MODES)
        check_choice(self, 'publish_rate', PUBLISH_RATES)
        for name in ('poll_period_s', 'imu_outage_s'):
            if not 0 < getattr(self, name) < math.inf:
                raise ValueError(f'OnlineFilterConfig.{name} must be a finite number > 0, got '
                                 f'{getattr(self, name)}')


def _embeds_filter(payload) -> bool:
    return payload is not None and (payload.get('kind') == KIND or EMBED_KEY in payload)


def build_filter_source(cfg: OnlineFilterConfig, payload=None, source='', fallback=None):
    """(FilterPoseSource or None, a sentence for the log saying what runs and why).

    payload/source: the initial (or resumed) checkpoint, which may embed the filter; fallback:
    the bridge used while the filter cannot bridge yet (not initialised)."""
    if cfg.mode == 'off':
        return None, 'inertial filter off (filter.mode off): the network steps are chained'
    if cfg.checkpoint:
        section, where = filter_section(load_checkpoint(cfg.checkpoint), cfg.checkpoint), \
            cfg.checkpoint
    elif _embeds_filter(payload):
        section, where = filter_section(payload, source), source
    elif cfg.mode == 'auto':
        return None, ('inertial filter off: no weights (filter.checkpoint is empty and '
                      f'{source or "the fresh model"} embeds none); the network steps are '
                      'chained. Set filter.checkpoint (train_imu_filter) to use it, or '
                      'filter.mode on to run it with fixed noise')
    else:
        section = {k: v for k, v in filter_payload(FilterConfig()).items()
                   if k != 'format_version'}
        src = FilterPoseSource(cfg, FilterConfig(), None, section, fallback)
        return src, ('inertial filter on WITHOUT noise-network weights (filter.mode on, no '
                     'filter.checkpoint, none embedded): fixed pseudo-measurement noise, no '
                     'learned speed; publishing at ' + cfg.publish_rate + ' rate')
    filter_cfg, model = build_filter(section, where)
    src = FilterPoseSource(cfg, filter_cfg, model, section, fallback)
    net = 'with its noise network' if model is not None else 'without a noise network'
    return src, (f'inertial filter on from {where} ({net}); publishing at '
                 f'{cfg.publish_rate} rate')


def _block_rot(rot, cov):
    """blockdiag(rot, rot) cov blockdiag(rot, rot)^T."""
    b = np.zeros((6, 6))
    b[:3, :3] = b[3:, 3:] = rot
    return b @ cov @ b.T


def _psd(cov):
    cov = 0.5 * (cov + cov.T)
    w, v = np.linalg.eigh(cov)
    return (v * np.maximum(w, 0.0)) @ v.T


class FilterPoseSource:
    """Pose source and bridge of OnlineTrajectory over the inertial filter; thread-safe.

    connect(imu_after, base_imu) gives it the synchronizer's IMU store (imu_after(stamp_ns) ->
    (stamps_ns, accel, gyro)) and T_base_imu (a function returning it or None, asked when a
    segment's filter is made; None keeps the checkpoint's T_imu_lidar).
    """

    def __init__(self, cfg: OnlineFilterConfig, filter_cfg: FilterConfig, noise_model,
                 section: dict, fallback=None):
        self.cfg, self.filter_cfg, self.noise_model = cfg, filter_cfg, noise_model
        self.section = section     # the filter checkpoint section: embedded in checkpoints
        self.fallback = fallback   # bridge while the filter cannot (not initialised yet)
        self.imu_after, self.base_imu = None, None
        self._lock = threading.Lock()
        self.counts = {'filter_steps': 0, 'filter_forecast_steps': 0, 'filter_chained_steps': 0,
                       'filter_imu_only_steps': 0, 'filter_bridged': 0, 'filter_imu_poses': 0,
                       'filter_segments': 0, 'filter_restarts': 0,
                       'filter_scans_without_imu': 0}
        self._retired = {}   # counts of the filters before the current one (segments, restarts)
        self.odo = None
        self._anchor = None
        self.segment = -1
        self._extrinsic_logged = False

    @property
    def imu_rate(self) -> bool:
        return self.cfg.publish_rate == 'imu'

    @property
    def imu_poses_flowing(self) -> bool:
        """publish_rate imu and the filter's poses anchored: poll() gives the IMU-rate poses."""
        return self.imu_rate and self._anchor is not None

    def connect(self, imu_after, base_imu=None) -> None:
        with self._lock:
            self.imu_after, self.base_imu = imu_after, base_imu

    def stats(self) -> dict:
        """Counters of the source and of its filters over the run (filter.odometry's, as
        filter_<name>), for checkpoint metrics and /diagnostics."""
        with self._lock:
            out = dict(self.counts)
            odo = dict(self.odo.counts) if self.odo is not None else {}
            for k in set(odo) | set(self._retired):
                out[f'filter_{k}'] = int(odo.get(k, 0) + self._retired.get(k, 0))
            return out

    # --- PoseSource ----------------------------------------------------------------------
    def start(self, stamp_ns: int) -> None:
        """A new segment at scan stamp_ns (the identity): a new filter."""
        with self._lock:
            self.segment += 1
            self.counts['filter_segments'] += 1
            self._origin = int(stamp_ns)
            self._fed_ns = self._imu_clock(self._origin) - START_BACK_NS
            # The newest sample the filter accepted (its screen rejects spikes and NaN): an
            # outage is counted from it, not from the newest one read.
            self._good_ns = self._fed_ns
            self._imu_fed = False        # no sample accepted by this filter yet
            self._pose, self._cov = np.eye(4), np.zeros((6, 6))   # the newest scan pose
            self._imu_out = []           # IMU-rate records not yet handed out by poll
            self._imu_dt, self._gyro = 0.01, np.zeros(3)
            self._new_filter()
            self._feed(self._imu_clock(self._origin) + self._tol_ns)
            self.odo.add_scan(self._sec(self._origin))

    def add(self, stamp_prev_ns: int, stamp_cur_ns: int, mean6, cov6, measured=True,
            bridged=False):
        """Step prev -> cur: -> (pose 4x4 in the segment, covariance 6x6 in base_link).
        bridged: a hole's step (bridge()'s: filter_bridged when the filter bridged it, the
        fallback's otherwise), not an IMU-only step."""
        with self._lock:
            if measured:
                logvar = self.cfg.relpose_logvar(np.log(np.diag(np.asarray(cov6, float))))
                self._scan_event(stamp_cur_ns, (stamp_prev_ns, mean6, logvar))
            else:
                self._scan_event(stamp_cur_ns, None)
                self.counts['filter_imu_only_steps'] += int(not bridged)
            pose, cov = self._place(stamp_prev_ns, stamp_cur_ns, mean6, cov6)
            self._pose, self._cov = pose, cov
            return pose.copy(), _block_rot(pose[:3, :3].T, cov)

    # --- StepBridge ----------------------------------------------------------------------
    def bridge(self, t0_ns: int, t1_ns: int, recent):
        """The filter's motion over a hole (IMU and pseudo-measurements), or the fallback
        bridge's while the filter has no pose at both ends."""
        with self._lock:
            if self.odo is not None:
                self._scan_event(t1_ns, None)
                ends = [self._filter_scan_pose(t, current=True) for t in (t0_ns, t1_ns)]
                if all(e is not None for e in ends):
                    (T0, C0), (T1, C1) = ends
                    step = invert_pose(T0) @ T1
                    grown = _block_rot(T1[:3, :3].T, _psd(C1 - C0))
                    self.counts['filter_bridged'] += 1
                    return BridgedStep(mean6=pose_to_vec6(step), cov6=grown, source='filter')
        if self.fallback is None:
            return None
        return self.fallback.bridge(t0_ns, t1_ns, recent)

    # --- IMU rate ------------------------------------------------------------------------
    def poll(self) -> list:
        """Feed the IMU that came since the last call. With publish_rate imu: a PoseRecord
        (segment frame, covariance in odom, twist in base_link) per IMU sample fed since the
        last call (here or with a step) once the filter's poses are anchored; else []."""
        with self._lock:
            if self.odo is None:
                return []
            self._feed(None)
            self._drain()
            out, self._imu_out = self._imu_out, []
            self.counts['filter_imu_poses'] += len(out)
            return out

    # --- internal (under the lock) ---------------------------------------------------------
    def _new_filter(self):
        """A fresh filter (a segment's start, or a restart after an IMU outage); its poses are
        anchored afresh, continuous with the last published pose."""
        if self.odo is not None:
            self.odo.close()     # counts the relative poses still waiting, which are lost
            for k, v in self.odo.counts.items():
                self._retired[k] = self._retired.get(k, 0) + int(v)
        self._anchor = None          # segment frame <- filter odom, once poses come from it
        self._finished = OrderedDict()
        self._scanned = OrderedDict()   # as an ordered set, the newest SCANNED_KEPT
        self._imu_cov_key, self._imu_covs = None, None   # see _imu_record
        self.odo = InertialOdometry(self._segment_config(), self.noise_model)

    @property
    def _outage_ns(self) -> int:
        return round(self.cfg.imu_outage_s * NS_PER_S)

    @property
    def _tol_ns(self) -> int:
        return int(STAMP_TOL * NS_PER_S)

    def _sec(self, stamp_ns: int) -> float:
        return (int(stamp_ns) - self._origin) / NS_PER_S

    @property
    def _offset_ns(self) -> int:
        return round(self.filter_cfg.imu_time_offset_s * NS_PER_S)

    def _imu_clock(self, stamp_ns: int) -> int:
        """A scan-clock stamp on the IMU's clock (FilterConfig imu_time_offset_s): the IMU the
        filter needs up to a scan carries stamps up to this."""
        return int(stamp_ns) - self._offset_ns

    def _segment_config(self) -> FilterConfig:
        T_base_imu = self.base_imu() if callable(self.base_imu) else None
        if T_base_imu is None:
            if not self._extrinsic_logged:
                log.info('inertial filter: no base_link <- IMU transform known; using the '
                         "checkpoint's T_imu_lidar")
                self._extrinsic_logged = True
            return self.filter_cfg
        return self.filter_cfg.replace(T_imu_lidar=matrix_to_3x4(invert_pose(T_base_imu)))

    def _feed(self, until_ns, limit=None) -> None:
        """Give the filter the held IMU after the last fed sample, up to until_ns (None: all),
        at most `limit` samples; with publish_rate imu, keep a record of each for poll()."""
        if self.imu_after is None:
            return
        stamps, accel, gyro = self.imu_after(self._fed_ns)
        n = len(stamps) if until_ns is None else int(np.searchsorted(stamps, until_ns, 'right'))
        n = n if limit is None else min(n, limit)
        for i in range(n):
            stamp = int(stamps[i])
            if self._imu_fed and stamp - self._good_ns > self._outage_ns:
                # Back after an outage: carrying the old state across it would integrate
                # seconds without measurements (velocity off by bias x duration). The filter
                # starts again from this sample; the steps are chained until it is ready.
                log.warning('inertial filter: no usable IMU sample in the store for %.2f s '
                            '(over filter.imu_outage_s); restarting the filter',
                            (stamp - self._good_ns) / NS_PER_S)
                self.counts['filter_restarts'] += 1
                self._new_filter()
                self._imu_fed = False
            self._imu_dt = (stamp - self._fed_ns) / NS_PER_S
            self._fed_ns, self._gyro = stamp, gyro[i]
            if not self.odo.add_imu(self._sec(stamp), accel[i], gyro[i]):
                continue      # rejected and counted by the filter
            self._imu_fed, self._good_ns = True, stamp
            if self.imu_rate and self._anchor is not None and self.odo.initialised:
                self._imu_out.append(self._imu_record(stamp + self._offset_ns))

    def _imu_record(self, stamp_ns: int) -> PoseRecord:
        """The pose and twist at the newest sample (stamp_ns on the scans' clock); their
        covariances as of the filter's last covariance propagation or update (at most
        cov_every - 1 samples before), computed once per change of the filter's covariance or
        of the anchor (the records share them)."""
        _, T, cov = self.odo.pose(propagate=False)
        key = self._imu_cov_key
        if key is None or key[0] is not cov or key[1] is not self._anchor:
            self._imu_cov_key = (cov, self._anchor)
            self._imu_covs = (_block_rot(self._anchor[:3, :3], cov), self._twist_covariance())
        return PoseRecord(stamp_ns=stamp_ns, segment=self.segment, index=-1,
                          pose=self._anchor @ T, cov=self._imu_covs[0], twist=self._twist(),
                          twist_cov=self._imu_covs[1], dt=0.0, bridged='')

    def _scan_event(self, stamp_ns: int, relative):
        """Scan `stamp_ns` (and the relative pose ending there) into the filter, as the offline
        run_filter orders them: after the IMU up to the scan, before the next sample."""
        if self.imu_rate:
            self._feed(None)
        else:
            self._feed(self._imu_clock(stamp_ns) + self._tol_ns)
        if self._imu_clock(stamp_ns) - self._good_ns > self._outage_ns:
            # The IMU is out: the filter could only queue the scan (and its relative pose)
            # until the IMU reaches it, which over a long outage grows without bound. The
            # step is chained instead (_place finds no filter pose).
            self.counts['filter_scans_without_imu'] += 1
            return
        if stamp_ns not in self._scanned:
            self._scanned[stamp_ns] = None
            if len(self._scanned) > SCANNED_KEPT:
                self._scanned.popitem(last=False)
            self.odo.add_scan(self._sec(stamp_ns))
        if relative is not None:
            prev_ns, mean6, logvar = relative
            self.odo.add_relative_pose(self._sec(prev_ns), self._sec(stamp_ns), mean6, logvar)
        if self.odo.initialised and self.odo.scan_readout(self._sec(stamp_ns)) is None:
            self._feed(None, limit=1)    # a scan between two samples is cloned by the next
        self._drain()

    def _drain(self):
        for stamp, T, cov in self.odo.pop_scan_poses():
            self._finished[stamp] = (T, cov)
            while len(self._finished) > FINISHED_KEPT:
                self._finished.popitem(last=False)

    def _filter_scan_pose(self, stamp_ns, current=False):
        """(T_odom_base, cov6 in the filter's odom) at a scan, or None: as read out after the
        relative pose ending there (offline run_filter's scan pose), or with `current` the
        clone's estimate now, where it is still held (later updates included)."""
        if not self.odo.initialised:
            return None
        t = self._sec(stamp_ns)
        held = (self.odo.scan_pose if current else self.odo.scan_readout)(t)
        return held if held is not None else self._finished.get(t)

    def _place(self, prev_ns, cur_ns, mean6, cov6):
        """(pose, covariance in the segment's odom axes) at scan cur."""
        now = self._filter_scan_pose(cur_ns)
        forecast = now is None and self.odo.initialised
        if forecast:
            # The IMU that takes the filter to this scan is still to come (an IMU stamped late:
            # imu_time_offset_s < 0): the filter's state carried there now, rather than wait
            # for it; the scan's relative pose is applied when the IMU reaches it.
            now = self.odo.forecast(self._sec(cur_ns))
            if now is not None and self._anchor is None and not \
                    self.odo.scan_settled(self._sec(prev_ns)):
                # Anchored on a forecast, the poses would stay off by what this step's relative
                # pose, still to come, corrects (metres while the filter does not know its
                # speed yet): anchor once prev's pose has had its relative pose.
                now = None
        if now is None:     # no filter pose (yet): chain, and anchor afresh when one comes
            self._anchor = None
            step = vec6_to_pose(mean6)
            body = _block_rot(self._pose[:3, :3].T, self._cov)
            body = covariance.compose(body, step, covariance.step_covariance(mean6, cov6))
            pose = self._pose @ step
            self.counts['filter_chained_steps'] += 1
            return pose, _block_rot(pose[:3, :3], body)
        if self._anchor is None and forecast:
            # Continuous with the pose at prev, as the filter knows it after the relative pose
            # ending there; the filter's own motion prev -> cur (a forecast) on from it.
            self._anchor = self._pose @ invert_pose(
                self._filter_scan_pose(prev_ns, current=True)[0])
        elif self._anchor is None:
            # Continuous with the pose at prev: through the filter's own motion prev -> cur
            # where prev is still cloned (a step without a relative pose), else the network's
            # step (a relative pose lets prev's clone go; its read-out from when it was cloned
            # can be far off while the filter did not know its speed yet).
            before = self._filter_scan_pose(prev_ns, current=True) \
                if self.odo.scan_pose(self._sec(prev_ns)) is not None else None
            if before is not None:
                self._anchor = self._pose @ invert_pose(before[0])
            else:
                self._anchor = self._pose @ vec6_to_pose(mean6) @ invert_pose(now[0])
        self.counts['filter_steps'] += 1
        self.counts['filter_forecast_steps'] += forecast
        return self._anchor @ now[0], _block_rot(self._anchor[:3, :3], now[1])

    def _twist(self):
        """Twist of base_link in base_link from the filter state (linear, angular)."""
        ekf, T_il = self.odo.ekf, self.odo.T_imu_lidar
        omega = self._gyro - ekf.bg                          # imu_link rate, bias removed
        v_imu = ekf.R.T @ ekf.v - skew(T_il[:3, 3]) @ omega  # velocity of base_link, IMU axes
        return (np.stack([v_imu, omega]) @ T_il[:3, :3]).reshape(6)

    def _twist_covariance(self):
        """Covariance of _twist() from the filter's covariance (as last propagated).

        With the right-invariant error (v = dR v_hat + xi_v, R = dR R_hat) the body velocity
        R^T v has the error R_hat^T xi_v: the attitude's cancels, so an uncertain yaw does not
        make the twist uncertain. The rate omega = gyro - b_g has the error -db_g, and the lever
        arm's term -[t]x omega the error [t]x db_g; then both into base_link axes."""
        ekf, T_il = self.odo.ekf, self.odo.T_imu_lidar
        J = np.zeros((6, STATE_DIM))
        J[:3, 3:6] = ekf.R.T
        J[:3, 9:12] = skew(T_il[:3, 3])
        J[3:, 9:12] = -np.eye(3)
        rot = np.kron(np.eye(2), T_il[:3, :3].T)
        cov = rot @ J @ ekf.P[:STATE_DIM, :STATE_DIM] @ J.T @ rot.T
        gyro_var = self.filter_cfg.gyro_noise ** 2 / max(self._imu_dt, 1e-3)
        cov[3:, 3:] += np.eye(3) * gyro_var
        return cov
