"""The inertial filter as the online trajectory's pose source and bridge (filter/online.py),
without ROS: the synchronizer's IMU store is a real Synchronizer fed the samples as they "arrive",
the steps come as the trainer hands them over. Equal to the offline run_filter at scan rate;
poses at IMU rate between scans; a hole bridged by the filter; camera and LiDAR gone -> the
IMU carries the pose on."""
import contextlib

import numpy as np
import pytest
from test_filter import drive, noisy, true_relative

from mm_fusion_ros.filter import online as online_filter
from mm_fusion_ros.filter.config import FilterConfig
from mm_fusion_ros.filter.odometry import InertialOdometry, run_filter
from mm_fusion_ros.filter.online import build_filter_source, FilterPoseSource, OnlineFilterConfig
from mm_fusion_ros.geometry import invert_pose, so3_exp, so3_log
from mm_fusion_ros.sync.config import SyncConfig
from mm_fusion_ros.sync.synchronizer import Synchronizer
from mm_fusion_ros.trajectory.bridge import ConstantVelocityBridge
from mm_fusion_ros.trajectory.chain import OnlineTrajectory, TrajectoryConfig
from mm_fusion_ros.trajectory.covariance import diag_covariance

T0_NS = 1_317_384_000_000_000_000   # an epoch-sized clock: the source works relative to it
FIRST_SCAN = 60                       # 0.6 s of IMU before the first scan (init window 0.5 s)
SCAN_EVERY = 10
LATENCY = 5                           # IMU samples that arrive before a step is handed over
LOGVAR = np.log(np.square([0.02, 0.02, 0.02, 2e-3, 2e-3, 2e-3]))


@pytest.fixture(scope='module')
def world():
    cfg = FilterConfig()
    t, rot, pos, vel, force, rate = drive(seed=3, duration=8.0)
    acc, gyr = noisy(force, rate, cfg, seed=4)
    scans = np.arange(FIRST_SCAN, len(t), SCAN_EVERY)
    rng = np.random.default_rng(5)
    rel = true_relative(rot, pos, scans) + rng.normal(0, 1, (len(scans) - 1, 6)) * \
        np.exp(0.5 * LOGVAR)
    stamps_ns = T0_NS + np.round(t * 1e9).astype(np.int64)
    return dict(cfg=cfg, t=t, rot=rot, pos=pos, acc=acc, gyr=gyr, scans=scans, rel=rel,
                stamps_ns=stamps_ns)


class Replay:
    """The IMU arriving in a Synchronizer (its store is what the source reads), steps handed
    to the trajectory LATENCY samples after their scan, and poll() at every IMU sample."""

    def __init__(self, world, rate='scan', measured=None, skip=(), imu_late_ns=0,
                 latency=LATENCY, imu_cut=(), imu_spikes=(), **source_cfg):
        """imu_late_ns: the IMU stamped this late, and the filter told so (imu_time_offset_s);
        latency: IMU samples (by their true time) that arrive before a step is handed over;
        imu_cut: indices of IMU samples that never arrive; imu_spikes: indices of samples that
        arrive with an accelerometer spike the filter rejects; source_cfg: OnlineFilterConfig
        fields."""
        self.w = world
        cfg = world['cfg'].replace(imu_time_offset_s=-imu_late_ns / 1e9)
        self.src = FilterPoseSource(OnlineFilterConfig(publish_rate=rate, **source_cfg), cfg,
                                    None, section={}, fallback=ConstantVelocityBridge())
        self.sync = Synchronizer(sync_cfg=SyncConfig(imu_keep_s=5.0))
        self.src.connect(self.sync.imu_after)
        self.traj = OnlineTrajectory(TrajectoryConfig(), bridge=self.src, source=self.src)
        self.records, self.imu_records = [], []
        scans = world['scans']
        due = {int(scans[k]) + latency: k for k in range(1, len(scans)) if k not in skip}
        measured = measured or (lambda k: True)
        self.queued = []     # scans and relative poses the filter holds, after each step
        self.placed = []     # steps placed by the filter so far, after each step
        for i in range(len(world['t'])):
            if i not in imu_cut:
                accel = world['acc'][i] * (1e3 if i in imu_spikes else 1.0)
                self.sync.add_imu(int(world['stamps_ns'][i]) + imu_late_ns, accel,
                                  world['gyr'][i])
            if rate == 'imu':
                self.imu_records += self.src.poll()
            if i in due:
                k = due[i]
                a, b = (int(world['stamps_ns'][scans[j]]) for j in (k - 1, k))
                self.records += self.traj.add_step(a, b, world['rel'][k - 1],
                                                   diag_covariance(LOGVAR),
                                                   measured=measured(k))
                odo = self.src.odo
                self.queued.append(len(odo._pending_scans) + len(odo._waiting_rel)
                                   + sum(e[0] != 'imu' for e in odo._events))
                self.placed.append(self.src.counts['filter_steps'])

    def offline(self, mask=None):
        """run_filter on the IMU the source was given, relative poses as the source gave them."""
        w, src = self.w, self.src
        first = np.searchsorted(w['stamps_ns'], src._origin - 1_000_000_000, 'right')
        t = (w['stamps_ns'][first:] - src._origin) / 1e9
        scan_t = (w['stamps_ns'][w['scans']] - src._origin) / 1e9
        logvars = np.tile(src.cfg.relpose_logvar(LOGVAR), (len(scan_t) - 1, 1))
        return run_filter(w['cfg'], t, w['acc'][first:], w['gyr'][first:], scan_t, w['rel'],
                          logvars, rel_mask=mask)


def from_scan1(poses):
    """Poses relative to scan 1's: the source anchors on scan 0 as the filter knows it after
    the first relative pose, the offline run reads scan 0 out when it is cloned."""
    return invert_pose(poses[1]) @ poses[1:]


def test_scan_rate_poses_equal_the_offline_filter(world):
    rep = Replay(world, 'scan')
    track = rep.traj.tracks()[0]
    assert len(track.poses) == len(world['scans'])
    assert rep.src.counts['filter_steps'] == len(world['scans']) - 1   # initialised at once
    assert rep.src.counts['filter_chained_steps'] == 0
    off = rep.offline()
    np.testing.assert_allclose(from_scan1(track.poses), from_scan1(off.scan_poses), atol=1e-9)
    # The published covariance is the filter's (odom axes, rotated into the segment frame).
    last = rep.records[-1]
    rot0 = track.poses[1][:3, :3] @ off.scan_poses[1][:3, :3].T
    b = np.zeros((6, 6))
    b[:3, :3] = b[3:, 3:] = rot0
    np.testing.assert_allclose(last.cov, b @ off.scan_covs[-1] @ b.T, rtol=1e-6, atol=1e-12)
    assert np.all(np.diag(last.cov) > 0)
    assert rep.src.poll() == []          # scan rate: nothing between scans


def test_the_filter_keeps_only_its_newest_scan_stamps(world, monkeypatch):
    """A long drive must not grow the source's memory by a stamp per scan."""
    monkeypatch.setattr(online_filter, 'SCANNED_KEPT', 4)
    rep = Replay(world, 'scan')
    assert len(rep.src._scanned) == 4
    track = rep.traj.tracks()[0]
    np.testing.assert_allclose(from_scan1(track.poses), from_scan1(rep.offline().scan_poses),
                               atol=1e-9)


def test_imu_rate_poses_between_scans(world):
    rep = Replay(world, 'imu')
    recs = rep.imu_records
    stamps = np.array([r.stamp_ns for r in recs])
    assert np.all(np.diff(stamps) == 10_000_000), 'one pose per IMU sample, in order'
    scan_ns = world['stamps_ns'][world['scans']]
    # From the IMU sample after the first step was handed over (then the filter is anchored).
    assert stamps[0] == scan_ns[1] + (LATENCY + 1) * 10_000_000
    between = (stamps > scan_ns[2]) & (stamps < scan_ns[3])
    assert between.sum() == SCAN_EVERY - 1
    assert all(np.all(np.diag(r.cov) > 0) for r in recs)
    # The IMU poses lie between the scan poses around them (the trajectory of the same run) ...
    track = rep.traj.tracks()[0]
    xyz = np.array([r.pose[:3, 3] for r in recs])
    k = np.searchsorted(track.stamps_ns, stamps) - 1
    inner = (k >= 0) & (k + 1 < len(track.stamps_ns))
    u = ((stamps - track.stamps_ns[k]) / 1e8)[inner, None]
    lerp = (1 - u) * track.poses[k[inner], :3, 3] + u * track.poses[k[inner] + 1, :3, 3]
    assert np.linalg.norm(xyz[inner] - lerp, axis=1).max() < 0.3   # later updates move them
    # ... and follow the truth on the ground (height drifts: the start-up tilt without a speed
    # network, docs/inertial_filter.md) ...
    idx = np.searchsorted(world['stamps_ns'], stamps)
    i0 = world['scans'][0]
    truth = (world['pos'][idx] - world['pos'][i0]) @ world['rot'][i0]
    assert np.linalg.norm(xyz[:, :2] - truth[:, :2], axis=1).max() < 1.0
    # ... the twist is the body velocity ...
    speed = np.linalg.norm(np.array([r.twist[:3] for r in recs]), axis=1)
    assert np.all(speed > 0) and np.all(np.isfinite(speed))
    # ... and the scan poses (scans cloned back-dated) stay close to the offline run's.
    off = from_scan1(rep.offline().scan_poses)
    track = from_scan1(rep.traj.tracks()[0].poses)
    diff = np.linalg.norm(track[:, :3, 3] - off[:, :3, 3], axis=1)
    rot = np.linalg.norm(so3_log(np.swapaxes(track[:, :3, :3], 1, 2) @ off[:, :3, :3]), axis=1)
    assert diff.max() < 0.05 and rot.max() < 2e-3, (diff.max(), rot.max())


def test_the_twist_covariance_matches_the_filter_state_it_comes_from(world):
    """Monte Carlo over the filter's own error (right-invariant attitude and velocity, gyro
    bias): the published twist covariance is that of the twist it is computed from. An
    uncertain yaw does not widen the body velocity (before, the lateral sigma grew with the
    speed times the yaw sigma: 0.64 m/s here, at 7.35 m/s and 5 deg; the lever arm is 0)."""
    src = Replay(world, 'imu').src
    ekf = src.odo.ekf
    ekf.flush()
    rng = np.random.default_rng(4)
    P = ekf.P[:15, :15].copy()
    P[2, 2] += np.radians(5.0) ** 2                 # yaw, as after a long drive
    ekf.P[:15, :15] = P
    cov = src._twist_covariance()
    gyro_var = src.filter_cfg.gyro_noise ** 2 / max(src._imu_dt, 1e-3)
    R0, v0, bg0 = ekf.R.copy(), ekf.v.copy(), ekf.bg.copy()
    base = src._twist()
    draws = []
    for xi in rng.multivariate_normal(np.zeros(15), P, 4000):
        dR = so3_exp(xi[0:3])
        ekf.R, ekf.v, ekf.bg = dR @ R0, dR @ v0 + xi[3:6], bg0 + xi[9:12]
        draws.append(src._twist() - base)
    ekf.R, ekf.v, ekf.bg = R0, v0, bg0
    sample = np.cov(np.array(draws).T)
    expected = cov - np.diag([0, 0, 0] + [gyro_var] * 3)
    scale = np.sqrt(np.outer(np.diag(sample), np.diag(sample))) + 1e-12
    assert np.abs(expected - sample).max() / scale.max() < 0.1, (np.diag(expected),
                                                                 np.diag(sample))
    np.testing.assert_allclose(np.diag(expected), np.diag(sample), rtol=0.1, atol=1e-10)
    assert np.linalg.norm(v0) > 5.0 and np.sqrt(cov[1, 1]) < 0.1


@pytest.mark.parametrize('rate', ['scan', 'imu'])
def test_an_imu_stamped_late_gives_the_same_poses_on_the_scans_clock(world, rate):
    """The IMU stamped 30 ms late, with imu_time_offset_s -0.03: the scan poses and the
    IMU-rate poses (stamped on the scans' clock) are those of the IMU stamped on time."""
    on_time, late = Replay(world, rate), Replay(world, rate, imu_late_ns=30_000_000)
    a, b = on_time.traj.tracks()[0], late.traj.tracks()[0]
    np.testing.assert_array_equal(a.stamps_ns, b.stamps_ns)
    np.testing.assert_allclose(a.poses, b.poses, atol=1e-6)
    if rate == 'imu':
        assert [r.stamp_ns for r in late.imu_records] == \
            [r.stamp_ns for r in on_time.imu_records][:len(late.imu_records)]
        assert len(late.imu_records) >= len(on_time.imu_records) - 3
        np.testing.assert_allclose([r.pose for r in late.imu_records],
                                   [r.pose for r in on_time.imu_records][:len(late.imu_records)],
                                   atol=1e-6)


def test_a_step_ahead_of_the_imu_is_placed_by_a_forecast(world):
    """The IMU stamped 60 ms late and replayed by its stamps, so a step handed over as the
    IMU stamps reach 10 ms past its scan finds the filter (on the scans' clock) 50 ms short of
    it. Its pose there is a forecast, not a chained network step, and every relative pose is
    applied later. The first step is chained: anchored on scan 0 as the filter knew it before
    any relative pose (this filter has no speed network), the poses were 4 m off those with
    the IMU on time. From scan 1 on they stay near them."""
    on_time = Replay(world, 'scan')
    late = Replay(world, 'scan', imu_late_ns=60_000_000, latency=1 - 6)
    steps = len(world['scans']) - 1
    stats = late.src.stats()
    assert stats['filter_chained_steps'] == 1, stats
    assert stats['filter_forecast_steps'] == steps - 1, stats
    assert on_time.src.stats()['filter_forecast_steps'] == 0
    late.src.odo.close()
    assert late.src.stats()['filter_relpose_applied'] == steps
    a, b = on_time.traj.tracks()[0], late.traj.tracks()[0]
    np.testing.assert_array_equal(a.stamps_ns, b.stamps_ns)
    a, b = from_scan1(a.poses), from_scan1(b.poses)
    gap = np.linalg.norm(a[:, :3, 3] - b[:, :3, 3], axis=1)
    # A forecast lacks its own step's relative pose (measured: up to 0.16 m here, the same
    # 10 or 50 ms short of the scan), and the difference does not add up along the drive.
    assert gap.max() < 0.25 and gap.mean() < 0.1, gap
    assert gap.max() > 1e-6


@pytest.mark.parametrize('rate', ['scan', 'imu'])
def test_a_missing_step_is_bridged_by_the_filter(world, rate):
    hole = (20, 21, 22)          # steps 19->20, 20->21, 21->22 never arrive
    rep = Replay(world, rate, skip=hole)
    bridged = [r for r in rep.records if r.bridged]
    assert [r.bridged for r in bridged] == ['filter']
    rec = bridged[0]
    scan_ns = world['stamps_ns'][world['scans']]
    assert rec.stamp_ns == scan_ns[22] and rec.dt == pytest.approx(0.3)
    by_stamp = {r.stamp_ns: r for r in rep.records}
    trace = [np.trace(by_stamp[scan_ns[k]].cov[:3, :3]) for k in (16, 19, 22, 23)]
    measured, bridged_growth = trace[1] - trace[0], trace[2] - trace[1]
    assert bridged_growth > 3 * measured > 0, \
        f'the position covariance grows over the hole more than over measured steps: {trace}'
    assert trace[3] < trace[2], 'and shrinks with the next relative pose'
    stats = rep.traj.stats()
    assert stats['bridged'] == 1 and stats['segments'] == 1
    # The hole is a bridged step, not an IMU-only one (it was counted as both).
    assert rep.src.counts['filter_bridged'] == 1
    assert rep.src.counts['filter_imu_only_steps'] == 0
    off = rep.offline(mask=~np.isin(np.arange(1, len(scan_ns)), hole))
    expect = from_scan1(off.scan_poses)[21]                    # scan 22
    track = rep.traj.tracks()[0]
    got = from_scan1(track.poses)[list(track.stamps_ns).index(rec.stamp_ns) - 1]
    # Offline clones scans 20 and 21 too (no relative pose comes for them): 1e-7 m apart.
    tol = 1e-6 if rate == 'scan' else 0.05
    assert np.abs(got[:3, 3] - expect[:3, 3]).max() < tol


def test_without_camera_and_lidar_the_imu_carries_the_pose_on(world):
    masked = range(15, 35)          # 2 s: the network's IMU-only steps are not used
    rep = Replay(world, 'imu', measured=lambda k: k not in masked)
    assert rep.src.counts['filter_imu_only_steps'] == len(masked)
    applied = rep.src.stats()['filter_relpose_applied']
    assert applied == len(world['scans']) - 1 - len(masked)
    scan_ns = world['stamps_ns'][world['scans']]
    inside = [r for r in rep.imu_records if scan_ns[15] < r.stamp_ns < scan_ns[34]]
    assert len(inside) == 19 * SCAN_EVERY - 1, 'IMU-rate poses go on through the outage'
    trace = [np.trace(r.cov[:3, :3]) for r in inside]
    assert trace[-1] > 2 * trace[0], 'the position covariance grows on the IMU alone'
    recs = {r.stamp_ns: r for r in rep.records}
    assert all(np.isfinite(recs[s].pose).all() for s in scan_ns[1:])
    # The poses in the outage are the filter's, not the network's steps (equal to offline).
    off = Replay(world, 'scan', measured=lambda k: k not in masked)
    mask = ~np.isin(np.arange(1, len(scan_ns)), list(masked))
    res = off.offline(mask=mask)
    np.testing.assert_allclose(from_scan1(off.traj.tracks()[0].poses),
                               from_scan1(res.scan_poses), atol=1e-9)


@pytest.mark.parametrize('rate', ['scan', 'imu'])
def test_an_imu_outage_is_chained_and_the_filter_restarts_after_it(world, rate):
    """The IMU gone for 2 s while scans and steps go on. The filter queued every scan of an
    outage until the IMU reached it (without bound), then integrated across the whole gap.
    Now the steps of the outage are chained, and the filter starts again when the IMU is back."""
    cut = range(300, 500)
    rep = Replay(world, rate, imu_cut=cut, imu_outage_s=0.5)
    stats = rep.src.stats()
    assert stats['filter_restarts'] == 1
    scan_t = world['t'][world['scans']]
    in_outage = np.sum((scan_t > world['t'][300] + 0.5) & (scan_t < world['t'][500]))
    assert stats['filter_scans_without_imu'] >= in_outage - 1 > 10
    # At most the scans of imu_outage_s (0.5 s: 5) and their relative poses.
    assert max(rep.queued) <= 12, rep.queued
    # After the return the filter is ready again and places the steps (the last five).
    assert rep.src.odo.initialised and rep.src._anchor is not None
    placed = np.diff(rep.placed)
    mid = int(np.searchsorted(scan_t, world['t'][400]))   # step mid-1 -> mid, chained
    assert placed[-5:].all() and not placed[mid - 2]
    track = rep.traj.tracks()[0]
    assert len(track.poses) == len(world['scans']) and np.isfinite(track.poses).all()
    steps = np.linalg.norm(np.diff(track.poses[:, :3, 3], axis=0), axis=1)
    truth = np.linalg.norm(true_relative(world['rot'], world['pos'], world['scans'])[:, :3],
                           axis=1)
    assert np.abs(steps - truth).max() < 0.1, 'no jump where the filter stops or takes over'
    assert rep.src.counts['filter_chained_steps'] >= in_outage - 1


def test_imu_samples_the_filter_rejects_for_seconds_are_an_outage_too(world):
    """2 s of samples that arrive but fail the filter's screen (a spike on every one): the
    outage counts from the last accepted sample, so the scans are not queued either."""
    rep = Replay(world, 'scan', imu_spikes=range(300, 500), imu_outage_s=0.5)
    stats = rep.src.stats()
    assert stats['filter_imu_rejected_spike'] == 200
    assert stats['filter_restarts'] == 1 and stats['filter_scans_without_imu'] > 10
    assert max(rep.queued) <= 12, rep.queued
    assert rep.src.odo.initialised and np.isfinite(rep.traj.tracks()[0].poses).all()


def test_the_imu_absent_from_the_start_queues_nothing(world):
    rep = Replay(world, 'scan', imu_cut=range(len(world['t'])), imu_outage_s=0.5)
    assert max(rep.queued) <= 12
    assert rep.src.counts['filter_chained_steps'] == len(world['scans']) - 1
    assert rep.src.stats()['filter_restarts'] == 0


def test_until_the_filter_is_ready_the_steps_are_chained_then_continue(world):
    late = dict(world, scans=world['scans'][world['scans'] >= 0] - FIRST_SCAN + 10)
    rep = Replay(late, 'scan')     # IMU from 0.1 s before the first scan: not ready at once
    assert rep.src.counts['filter_chained_steps'] > 0 and rep.src.counts['filter_steps'] > 0
    poses = rep.traj.tracks()[0].poses
    steps = np.linalg.norm(np.diff(poses[:, :3, 3], axis=0), axis=1)
    truth = np.linalg.norm(late['rel'][:, :3], axis=1)
    assert np.abs(steps - truth).max() < 0.2, 'no jump where the filter takes over'


def test_build_filter_source_modes(tmp_path):
    from mm_fusion_ros.filter.checkpoint import embed_filter, filter_payload
    from mm_fusion_ros.filter.noise_net import NoiseNet, NoiseNetConfig
    src, why = build_filter_source(OnlineFilterConfig())
    assert src is None and 'no weights' in why and 'filter.checkpoint' in why
    src, why = build_filter_source(OnlineFilterConfig(mode='on'))
    assert src is not None and src.noise_model is None and 'WITHOUT' in why
    assert build_filter_source(OnlineFilterConfig(mode='off'))[0] is None
    net = NoiseNet(NoiseNetConfig(window=16, channels=4, hidden=8, speed_head=False))
    fusion = embed_filter({'model': {}, 'config': {}}, filter_payload(FilterConfig(), net))
    src, why = build_filter_source(OnlineFilterConfig(), fusion, 'init.pth')
    assert src.noise_model is not None and 'init.pth' in why
    with pytest.raises(ValueError, match='publish_rate'):
        OnlineFilterConfig(publish_rate='fast')


@contextlib.contextmanager
def _probe_node(*params):
    """A node in a context of its own, started with `-p NAME:=VALUE` for each of params."""
    import rclpy
    from rclpy.node import Node
    context = rclpy.Context()
    rclpy.init(context=context, args=['x', '--ros-args', *[a for p in params for a in ('-p', p)]])
    try:
        node = Node('params_probe', context=context)
        try:
            yield node
        finally:
            node.destroy_node()
    finally:
        rclpy.try_shutdown(context=context)


def test_filter_mode_on_given_as_a_ros_argument_is_a_mode_not_a_boolean():
    """`--set filter.mode:=on` reaches the node as YAML 1.1, which reads on / off as booleans:
    the text parameter takes them, the config makes them its modes; a bad text still fails
    naming the field."""
    from mm_fusion_ros.ros.params import declare_config
    with _probe_node('filter.mode:=on', 'filter.publish_rate:=scan') as node:
        cfg = declare_config(node, OnlineFilterConfig, 'filter.')
        assert cfg.mode == 'on' and cfg.publish_rate == 'scan'
    with _probe_node('filter.publish_rate:=no') as node:
        with pytest.raises(ValueError, match='publish_rate'):
            declare_config(node, OnlineFilterConfig, 'filter.')
    assert OnlineFilterConfig(mode=False).mode == 'off'


def test_a_double_parameter_given_as_an_integer_or_as_text_is_taken_as_a_double():
    """`--set filter.relpose_var_scale:=300` reaches the node as an integer and `1e-5` as text
    (YAML 1.1); both are the doubles they mean, as `ros2 param set` takes them (as_doubles).
    Text that is no number still fails, naming the parameter."""
    from rclpy.exceptions import InvalidParameterTypeException
    from rclpy.parameter import Parameter

    from mm_fusion_ros.ros.params import declare_config
    with _probe_node('filter.relpose_var_scale:=300', 'filter.relpose_min_std_m:=1e-3') as node:
        cfg = declare_config(node, OnlineFilterConfig, 'filter.')
        assert cfg.relpose_var_scale == 300.0 and isinstance(cfg.relpose_var_scale, float)
        assert cfg.relpose_min_std_m == 1e-3
        for name in ('filter.relpose_var_scale', 'filter.relpose_min_std_m'):
            assert node.get_parameter(name).type_ == Parameter.Type.DOUBLE
    with _probe_node('filter.relpose_var_scale:=big') as node:
        with pytest.raises(InvalidParameterTypeException, match='filter.relpose_var_scale'):
            declare_config(node, OnlineFilterConfig, 'filter.')


def test_imu_rate_read_out_leaves_the_covariance_propagation_alone(world):
    """pose(propagate=False) at every sample: the filter ends as if nothing was read (its
    covariance propagated every cov_every samples), and the covariance read is the one at the
    last propagation or update, computed once per change and never more than cov_every - 1
    samples old."""
    w = world
    t = (w['stamps_ns'] - w['stamps_ns'][0]) / 1e9
    read, quiet = (InertialOdometry(w['cfg']) for _ in range(2))
    scans = set(w['scans'].tolist())
    last, since, oldest = None, 0, 0
    for i in range(len(t)):
        for odo in (read, quiet):
            odo.add_imu(t[i], w['acc'][i], w['gyr'][i])
            if i in scans:
                odo.add_scan(t[i])
        if not read.initialised:
            continue
        _, T, cov = read.pose(propagate=False)
        if read.ekf._pending_n == 0:      # just propagated or updated: the current covariance
            fresh = read._odom_cov(read.ekf.pose_covariance(read.T_imu_lidar))
            np.testing.assert_array_equal(cov, fresh)
            since = 0
        elif last is not None:
            assert cov is last, 'computed again without a change of the covariance'
            since += 1
        oldest = max(oldest, since)
        last = cov
    assert 0 < oldest < read.ekf.cov_every
    np.testing.assert_array_equal(read.ekf.P, quiet.ekf.P)
    np.testing.assert_array_equal(read.ekf.p, quiet.ekf.p)
