"""Inertial filter (mm_fusion_ros.filter) on synthetic drives: exact reproduction with a perfect
IMU, NEES consistency, pseudo-measurements against lateral drift, covariance growth and shrink,
bad-sample rejection, relative-pose updates with missing and late scans, online = offline,
consider updates that leave the attitude alone, sideslip in the lateral pseudo-measurement;
the noise network's deep ensemble."""
import math

import numpy as np
import pytest
from scipy.stats import chi2
import torch

from mm_fusion_ros.filter.checkpoint import (
    build_filter,
    filter_payload,
    load_filter,
    save_filter_checkpoint,
)
from mm_fusion_ros.filter.config import CONSIDER_ATTITUDE, FilterConfig
from mm_fusion_ros.filter.ekf import GYRO_BIAS_DIMS, InvariantEKF
from mm_fusion_ros.filter.noise_net import NoiseEnsemble, NoiseModel, NoiseNet, NoiseNetConfig
from mm_fusion_ros.filter.odometry import InertialOdometry, run_filter
from mm_fusion_ros.filter.online import OnlineFilterConfig
from mm_fusion_ros.geometry import invert_pose, make_pose, pose_to_vec6, so3_exp, so3_log
from mm_fusion_ros.synthetic.imu import add_sensor_noise, imu_kinematics
from mm_fusion_ros.synthetic.trajectory import synthesize_drive

RATE = 100.0
SCAN_EVERY = 10          # IMU samples per scan (10 Hz scans)


def drive(seed, duration=20.0):
    """Truth of a synthetic drive at 100 Hz: stamps, R_world_imu, p, v, specific force, rate."""
    rng = np.random.default_rng(seed)
    traj, _ = synthesize_drive(rng, duration + 1.0)
    t = np.arange(0.0, duration, 1.0 / RATE)
    rot, pos, vel, force, rate = imu_kinematics(traj, t + traj.t_start, np.eye(4))
    return t, rot, pos - pos[0], vel, force, rate     # the filter starts at the origin


def noisy(force, rate, cfg, seed):
    """IMU samples with the white noise and bias the filter's config describes."""
    rng = np.random.default_rng(seed)
    dt = 1.0 / RATE
    acc = add_sensor_noise(force, rng, cfg.accel_noise / np.sqrt(dt), cfg.init_accel_bias_sigma,
                           cfg.accel_bias_walk, dt)
    gyr = add_sensor_noise(rate, rng, cfg.gyro_noise / np.sqrt(dt), cfg.init_gyro_bias_sigma,
                           cfg.gyro_bias_walk, dt)
    return acc, gyr


def truth_poses(rot, pos, idx):
    """T_odom_imu at sample indices, odom = the first pose."""
    T = make_pose(rot[idx], pos[idx])
    return invert_pose(make_pose(rot[0], pos[0])) @ T


def true_relative(rot, pos, scan_idx):
    T = make_pose(rot[scan_idx], pos[scan_idx])
    return pose_to_vec6(invert_pose(T[:-1]) @ T[1:])


IMU_ONLY = dict(nhc_every=0, zupt_sigma=0.0, speed_mode='off')


def test_perfect_imu_reproduces_the_trajectory():
    t, rot, pos, vel, force, rate = drive(seed=1)
    cfg = FilterConfig(**IMU_ONLY)
    scans = t[::SCAN_EVERY]
    res = run_filter(cfg, t, force, rate, scans, initial_state=(rot[0], vel[0]))
    assert res.init_info['method'] == 'given initial state'
    truth = truth_poses(rot, pos, np.arange(0, len(t), SCAN_EVERY))
    pos_err = np.linalg.norm(res.scan_poses[:, :3, 3] - truth[:, :3, 3], axis=1)
    rot_err = np.linalg.norm(so3_log(np.swapaxes(truth[:, :3, :3], 1, 2)
                                     @ res.scan_poses[:, :3, :3]), axis=1)
    path = np.linalg.norm(np.diff(pos, axis=0), axis=1).sum()
    assert path > 100.0
    assert pos_err.max() < 0.05, pos_err.max()        # over 20 s and > 100 m
    assert rot_err.max() < 1e-4, rot_err.max()
    # The IMU-rate trajectory passes through the scan poses.
    at_scans = np.searchsorted(res.imu_stamps, scans[1:])
    np.testing.assert_allclose(res.imu_poses[at_scans], res.scan_poses[1:], atol=1e-9)


def test_an_imu_stamped_late_is_put_back_on_the_scans_clock():
    """The same perfect IMU stamped 40 ms late: with imu_time_offset_s -0.04 the filter
    reproduces the trajectory at the scan stamps (the last scan, after the last sample, is
    reached within max_gap_s); without it every scan pose is off by 40 ms of motion."""
    t, rot, pos, vel, force, rate = drive(seed=1)
    scans = t[::SCAN_EVERY]
    truth = truth_poses(rot, pos, np.arange(0, len(t), SCAN_EVERY))
    errors = {}
    for offset in (-0.04, 0.0):
        res = run_filter(FilterConfig(**IMU_ONLY, imu_time_offset_s=offset), t + 0.04, force,
                         rate, scans, initial_state=(rot[0], vel[0]))
        found = np.isfinite(res.scan_poses).all(axis=(1, 2))
        errors[offset] = np.linalg.norm(res.scan_poses[found, :3, 3] - truth[found, :3, 3],
                                        axis=1)
        if offset:
            assert found.all()
            np.testing.assert_allclose(res.imu_stamps, t[:len(res.imu_stamps)], atol=1e-9)
    assert errors[-0.04].max() < 0.05, errors[-0.04].max()
    assert np.median(errors[0.0]) > 0.2, np.median(errors[0.0])     # 12.5 m/s * 40 ms = 0.5 m


@pytest.mark.parametrize('late', [0.04, 0.15])
def test_a_scan_ahead_of_the_imu_is_forecast_and_its_relative_pose_waits_for_the_imu(late):
    """Online with the IMU stamped `late` s late: each scan and its relative pose arrive when
    the IMU's own clock reaches the scan, before the filter does. forecast() gives the pose
    there at once (the newest rates held) without changing the filter, while the scan is at
    most max_gap_s ahead (0.1 s; at 0.15 s the start of the relative pose is ahead too). The
    relative pose waits and is applied when the IMU reaches the scan, so the scan poses are
    the offline run's."""
    t, rot, pos, vel, force, rate = drive(seed=3, duration=10.0)
    cfg = FilterConfig(**IMU_ONLY, imu_time_offset_s=-late)
    scan_idx = np.arange(0, len(t), SCAN_EVERY)
    rel = true_relative(rot, pos, scan_idx)
    logvar = np.tile(np.log(np.array([0.05] * 3 + [2e-3] * 3) ** 2), (len(rel), 1))
    truth = truth_poses(rot, pos, scan_idx)
    offline = run_filter(cfg, t + late, force, rate, t[scan_idx], rel, logvar,
                         initial_state=(rot[0], vel[0]))
    odo = InertialOdometry(cfg, initial_state=(rot[0], vel[0]))
    forecast_err, settled = [], {}
    k = 0
    for i in range(len(t)):
        odo.add_imu(t[i] + late, force[i], rate[i])
        if k < len(scan_idx) and t[i] + late >= t[scan_idx[k]] - 1e-9:
            odo.add_scan(t[scan_idx[k]])
            if k > 0:
                odo.add_relative_pose(t[scan_idx[k - 1]], t[scan_idx[k]], rel[k - 1],
                                      logvar[k - 1])
            if k > 0:       # the first scan is the filter's start, reached at once
                assert odo.scan_readout(t[scan_idx[k]]) is None    # the filter is not there
                before = (odo.ekf.R.copy(), odo.ekf.p.copy(), odo.ekf.P.copy(), odo.stamp)
                ahead = odo.forecast(t[scan_idx[k]])
                after = (odo.ekf.R, odo.ekf.p, odo.ekf.P, odo.stamp)
                for b, a in zip(before, after):
                    np.testing.assert_array_equal(b, a)
                if t[scan_idx[k]] - odo.stamp > cfg.max_gap_s:
                    assert ahead is None
                else:
                    T, cov = ahead
                    assert np.isfinite(cov).all() and np.all(np.diag(cov) > 0)
                    forecast_err.append(np.linalg.norm(T[:3, 3] - truth[k, :3, 3]))
            k += 1
        for stamp, T, _ in odo.pop_scan_poses():
            settled[stamp] = T
    for stamp, T, _ in odo.close():
        settled[stamp] = T
    if late < cfg.max_gap_s:
        assert len(forecast_err) == len(scan_idx) - 1
        assert max(forecast_err) < 0.05, max(forecast_err)   # 12 m/s x 40 ms = 0.5 m
    else:
        assert len(forecast_err) < 3        # only near the start
    assert odo.counts['relpose_applied'] == len(rel)
    assert odo.counts['relpose_no_clone'] == 0
    online = np.stack([settled[s] for s in t[scan_idx]])
    np.testing.assert_allclose(online, offline.scan_poses, atol=1e-6)
    assert odo.forecast(odo.stamp + cfg.max_gap_s + 0.01) is None
    assert odo.forecast(odo.stamp) is None
    assert odo.counts['relpose_waiting_dropped'] == 0
    # A relative pose to a scan that the IMU never reaches is counted when the filter closes.
    last = odo.stamp
    odo.add_scan(last + 1.0)
    odo.add_scan(last + 1.1)
    odo.add_relative_pose(last + 1.0, last + 1.1, rel[-1], logvar[-1])
    odo.close()
    assert odo.counts['relpose_waiting_dropped'] == 1


def _right_invariant_error(R_hat, v_hat, p_hat, R, v, p):
    eta = R @ R_hat.T
    return np.concatenate([so3_log(eta), v - eta @ v_hat, p - eta @ p_hat])


def test_nees_within_chi2_bounds_over_simulated_drives():
    """Monte Carlo over a drive with the network's relative poses: the 9-dim (attitude,
    velocity, position) NEES averaged over runs stays inside the two-sided 99 % chi-square
    bounds of its degrees of freedom at >= 90 % of the scan times, and on average."""
    cfg = FilterConfig(**IMU_ONLY, gyro_noise=2e-3, accel_noise=5e-2, gyro_bias_walk=1e-4,
                       accel_bias_walk=2e-3, init_gyro_bias_sigma=1e-3,
                       init_accel_bias_sigma=5e-2)
    sig_t, sig_r = 0.05, 2e-3     # relative pose noise per scan step [m], [rad]
    logvar = np.log(np.array([sig_t] * 3 + [sig_r] * 3) ** 2)
    t, rot, pos, vel, force, rate = drive(seed=2, duration=8.0)
    scan_idx = np.arange(0, len(t), SCAN_EVERY)
    rel_true = true_relative(rot, pos, scan_idx)
    runs, nees = 24, []
    for run in range(runs):
        rng = np.random.default_rng(100 + run)
        acc, gyr = noisy(force, rate, cfg, seed=200 + run)
        rel = rel_true + rng.normal(0.0, [sig_t] * 3 + [sig_r] * 3, size=rel_true.shape)
        # The initial state is drawn from the filter's own prior (tilt, velocity) around truth.
        tilt = np.radians(cfg.init_tilt_sigma_deg)
        xi_r = rng.normal(0.0, [tilt, tilt, 0.0])
        xi_v = rng.normal(0.0, cfg.init_vel_sigma, 3)
        R_hat = so3_exp(-xi_r) @ rot[0]
        odo = InertialOdometry(cfg, initial_state=(R_hat, so3_exp(-xi_r) @ (vel[0] - xi_v)))
        per_run = []
        for i in range(len(t)):
            odo.add_imu(t[i], acc[i], gyr[i])
            if i % SCAN_EVERY == 0:
                k = i // SCAN_EVERY
                odo.add_scan(t[i])
                if k > 0:
                    odo.add_relative_pose(t[i - SCAN_EVERY], t[i], rel[k - 1], logvar)
                    ekf = odo.ekf
                    ekf.flush()
                    err = _right_invariant_error(ekf.R, ekf.v, ekf.p, rot[i], vel[i], pos[i])
                    per_run.append(err @ np.linalg.solve(ekf.P[:9, :9], err))
        nees.append(per_run)
    per_time = np.asarray(nees).mean(axis=0)          # average over runs, per scan time
    lo, hi = chi2.ppf([0.005, 0.995], 9 * runs) / runs
    inside = (per_time > lo) & (per_time < hi)
    assert inside.mean() >= 0.9, (lo, hi, per_time.round(1))
    assert lo < per_time.mean() < hi, (lo, hi, per_time.mean())


def test_pseudo_measurements_remove_lateral_drift():
    """A lateral accelerometer bias makes the IMU alone drift sideways; the zero lateral
    velocity pseudo-measurement keeps the car on its track."""
    t, rot, pos, vel, force, rate = drive(seed=3)
    acc = force + np.array([0.0, 0.08, 0.0])
    idx = np.arange(0, len(t), SCAN_EVERY)
    truth = truth_poses(rot, pos, idx)
    lateral = {}
    for name, nhc_every in (('imu_only', 0), ('pseudo', 10)):
        cfg = FilterConfig(nhc_every=nhc_every, zupt_sigma=0.0, speed_mode='off',
                           init_accel_bias_sigma=1e-3, nhc_lateral_sigma=0.05,
                           nhc_vertical_sigma=0.2)
        res = run_filter(cfg, t, acc, rate, t[idx], initial_state=(rot[0], vel[0]))
        err = res.scan_poses[:, :3, 3] - truth[:, :3, 3]
        lat = np.einsum('ni,ni->n', err, truth[:, :3, 1])   # along the true body y axis
        lateral[name] = np.abs(lat).max()
    assert lateral['imu_only'] > 5.0, lateral
    assert lateral['pseudo'] < 0.1 * lateral['imu_only'], lateral


def test_missing_measurements_widen_and_a_measurement_shrinks_the_covariance():
    t, rot, pos, vel, force, rate = drive(seed=4, duration=8.0)
    cfg = FilterConfig(**IMU_ONLY)
    acc, gyr = noisy(force, rate, cfg, seed=5)
    scan_idx = np.arange(0, len(t), SCAN_EVERY)
    rel = true_relative(rot, pos, scan_idx)
    logvar = np.log(np.array([0.02] * 3 + [1e-3] * 3) ** 2)
    odo = InertialOdometry(cfg, initial_state=(rot[0], vel[0]))
    pos_trace, vel_trace = [], []
    gap = range(30, 60)         # scans 30..59: camera and LiDAR gone
    for i in range(len(t)):
        odo.add_imu(t[i], acc[i], gyr[i])
        if i % SCAN_EVERY:
            continue
        k = i // SCAN_EVERY
        odo.add_scan(t[i])
        if k in gap or k == 0:
            cov = odo.pose()[2]
        else:
            odo.ekf.flush()
            before = np.trace(odo.ekf.P[3:6, 3:6])
            odo.add_relative_pose(t[i - SCAN_EVERY], t[i], rel[k - 1], logvar)
            after = np.trace(odo.ekf.P[3:6, 3:6])
            assert after < before, (k, before, after)      # a measurement shrinks it
            cov = odo.pose()[2]
        pos_trace.append(np.trace(cov[:3, :3]))
        vel_trace.append(np.trace(odo.ekf.P[3:6, 3:6]))
    pos_trace, vel_trace = np.array(pos_trace), np.array(vel_trace)
    in_gap = np.array(list(gap))
    assert np.all(np.diff(pos_trace[in_gap]) > 0)             # grows at every scan of the gap
    assert np.all(np.diff(vel_trace[in_gap]) > 0)
    assert vel_trace[in_gap[-1]] > 3 * vel_trace[in_gap[0] - 1]
    assert vel_trace[in_gap[-1] + 3] < 0.5 * vel_trace[in_gap[-1]]   # shrinks after the gap
    assert odo.counts['relpose_applied'] == sum(1 for k in range(1, len(scan_idx))
                                                if k not in gap)


def test_bad_imu_samples_are_rejected_and_counted():
    t, rot, pos, vel, force, rate = drive(seed=6, duration=5.0)
    cfg = FilterConfig(**IMU_ONLY)
    scans = t[::SCAN_EVERY]
    clean = run_filter(cfg, t, force, rate, scans, initial_state=(rot[0], vel[0]))
    acc, gyr, st = force.copy(), rate.copy(), t.copy()
    acc[100, 1] = np.nan                  # NaN
    gyr[205] = [0.0, 0.0, 50.0]           # a gyro spike far beyond a car's rates
    acc[307] = [400.0, 0.0, 9.8]          # an accelerometer spike
    bad = run_filter(cfg, st, acc, gyr, scans, initial_state=(rot[0], vel[0]))
    assert bad.counts['imu_rejected_nonfinite'] == 1
    assert bad.counts['imu_rejected_spike'] == 2
    assert bad.counts['imu_accepted'] == len(t) - 3
    # Rejecting a sample is the same as never having received it.
    keep = np.setdiff1d(np.arange(len(t)), [100, 205, 307])
    ref = run_filter(cfg, t[keep], force[keep], rate[keep], scans,
                     initial_state=(rot[0], vel[0]))
    np.testing.assert_allclose(bad.scan_poses, ref.scan_poses, atol=1e-12)
    assert np.abs(bad.scan_poses - clean.scan_poses).max() < 0.05
    # A sample whose stamp goes back is refused as well.
    odo = InertialOdometry(cfg, initial_state=(rot[0], vel[0]))
    assert odo.add_imu(t[0], force[0], rate[0]) and odo.add_imu(t[1], force[1], rate[1])
    assert not odo.add_imu(t[0], force[0], rate[0])
    assert odo.counts['imu_rejected_stamp'] == 1


def test_relative_poses_with_missing_and_late_scans():
    """Noisy IMU plus the network's relative poses: accurate; a masked step is bridged; scan
    stamps that arrive after the filter passed them (online latency) give nearly the same."""
    t, rot, pos, vel, force, rate = drive(seed=7, duration=15.0)
    cfg = FilterConfig(nhc_every=0, zupt_sigma=0.0, speed_mode='off')
    acc, gyr = noisy(force, rate, cfg, seed=8)
    scan_idx = np.arange(0, len(t), SCAN_EVERY)
    rng = np.random.default_rng(9)
    rel = true_relative(rot, pos, scan_idx) + rng.normal(0, [0.03] * 3 + [1e-3] * 3,
                                                          (len(scan_idx) - 1, 6))
    logvar = np.tile(np.log(np.array([0.03] * 3 + [1e-3] * 3) ** 2), (len(rel), 1))
    mask = np.ones(len(rel), bool)
    mask[50:80] = False          # 3 s without camera and LiDAR
    truth = truth_poses(rot, pos, scan_idx)
    imu_only = run_filter(cfg, t, acc, gyr, t[scan_idx], initial_state=(rot[0], vel[0]))
    fused = run_filter(cfg, t, acc, gyr, t[scan_idx], rel, logvar, mask,
                       initial_state=(rot[0], vel[0]))
    err = lambda r: np.linalg.norm(r.scan_poses[:, :3, 3] - truth[:, :3, 3], axis=1)  # noqa
    assert fused.counts['relpose_applied'] == mask.sum()
    assert np.isfinite(fused.scan_poses).all()
    assert err(fused).max() < 0.5 * err(imu_only).max()

    # Online: each scan is announced 3 IMU samples late, its relative pose 5 samples late.
    odo = InertialOdometry(cfg, initial_state=(rot[0], vel[0]))
    late_scans, late_rel, poses = [], [], {}
    for i in range(len(t)):
        odo.add_imu(t[i], acc[i], gyr[i])
        if i % SCAN_EVERY == 0:
            late_scans.append((i + 3, t[i]))
            k = i // SCAN_EVERY
            if k > 0 and mask[k - 1]:
                late_rel.append((i + 5, k))
        while late_scans and late_scans[0][0] == i:
            odo.add_scan(late_scans.pop(0)[1])
        while late_rel and late_rel[0][0] == i:
            k = late_rel.pop(0)[1]
            odo.add_relative_pose(t[scan_idx[k - 1]], t[scan_idx[k]], rel[k - 1], logvar[k - 1])
        for stamp, T, _ in odo.pop_scan_poses():
            poses[stamp] = T
    for stamp, T, _ in odo.close():
        poses[stamp] = T
    assert odo.counts['scans_late'] == len(scan_idx)
    online = np.stack([poses[s] for s in t[scan_idx] if s in poses])
    assert len(online) == len(scan_idx)
    gap = np.abs(online[:, :3, 3] - fused.scan_poses[:, :3, 3]).max()
    assert gap < 0.2, gap


@pytest.mark.parametrize('nhc', [0, 10])
def test_a_late_scan_keeps_the_corrections_made_since_its_stamp(nhc):
    """A scan announced after the filter passed its stamp is cloned where the filter now puts
    it: a relative pose applied between its stamp and its arrival (here it corrects a prior
    speed 1 m/s too slow) moves it as it moves an on-time clone. Before, the late clone took
    the nominal history as it was and lost the correction (0.54 m off here)."""
    cfg = FilterConfig(zupt_sigma=0.0, nhc_every=nhc, speed_mode='off')

    def clone_x(late):
        odo = InertialOdometry(cfg, initial_state=(np.eye(3), np.array([9.0, 0.0, 0.0])))
        for i in range(51):
            odo.add_imu(i * 0.01, [0.0, 0.0, 9.81], [0.0, 0.0, 0.0])
        odo.add_scan(0.5)
        odo.add_scan(0.6)
        if not late:
            odo.add_scan(0.62)
        for i in range(51, 66):
            odo.add_imu(i * 0.01, [0.0, 0.0, 9.81], [0.0, 0.0, 0.0])
        odo.add_relative_pose(0.5, 0.6, np.array([1.0, 0, 0, 0, 0, 0]),
                              logvar6=np.log([1e-4] * 3 + [1e-6] * 3))
        for i in range(66, 71):
            odo.add_imu(i * 0.01, [0.0, 0.0, 9.81], [0.0, 0.0, 0.0])
        if late:
            odo.add_scan(0.62)
        assert odo.counts['scans_late'] == int(late)
        return odo.scan_pose(0.62)[0][:3, 3]

    on_time, late = clone_x(False), clone_x(True)
    assert 6.0 < on_time[0] < 6.2, on_time     # 0.62 s at ~10 m/s, not 9 m/s
    np.testing.assert_allclose(late, on_time, atol=1e-3)


def test_an_update_that_fails_is_counted_and_the_filter_goes_on():
    """A relative-pose update whose innovation covariance is not positive definite (here a
    covariance broken on purpose) is lost and counted; it does not escape from the IMU step
    that applies it and leave the filter half-advanced."""
    odo = InertialOdometry(FilterConfig(zupt_sigma=0.0, nhc_every=0, speed_mode='off'),
                           initial_state=(np.eye(3), np.array([10.0, 0.0, 0.0])))
    for i in range(21):
        odo.add_imu(i * 0.01, [0.0, 0.0, 9.81], [0.0, 0.0, 0.0])
    odo.add_scan(0.1)
    odo.add_scan(0.25)                       # ahead: the relative pose waits for the IMU
    odo.add_relative_pose(0.1, 0.25, np.array([1.5, 0, 0, 0, 0, 0]),
                          logvar6=np.log([1e-4] * 3 + [1e-6] * 3))
    odo.ekf.P = -np.eye(odo.ekf.P.shape[0])
    for i in range(21, 31):                  # the step that reaches 0.25 s applies it
        odo.add_imu(i * 0.01, [0.0, 0.0, 9.81], [0.0, 0.0, 0.0])
    assert odo.counts['relpose_failed'] == 1 and odo.counts['relpose_applied'] == 0
    assert odo.counts['imu_accepted'] == 31 and odo.stamp == pytest.approx(0.3)
    assert odo.ekf.p[0] == pytest.approx(3.0)          # 0.3 s at 10 m/s, integrated once


def test_online_object_equals_offline_run():
    t, rot, pos, vel, force, rate = drive(seed=10, duration=6.0)
    cfg = FilterConfig(speed_mode='off')
    acc, gyr = noisy(force, rate, cfg, seed=11)
    scans = t[::SCAN_EVERY]
    off = run_filter(cfg, t, acc, gyr, scans)
    odo = InertialOdometry(cfg)
    got = {}
    for i in range(len(t)):
        odo.add_imu(t[i], acc[i], gyr[i])
        if i % SCAN_EVERY == 0:
            odo.add_scan(t[i])
    for stamp, T, cov in odo.close():
        got[stamp] = (T, cov)
    on = np.stack([got[s][0] for s in scans])
    np.testing.assert_allclose(on, off.scan_poses, atol=1e-12)
    assert off.init_info['method'] == 'unknown speed (zero, wide prior)'
    # The car drives at > 5 m/s: the pseudo-measurements cannot know its speed, so without
    # a speed network the start is wrong, but gravity alignment still gives the tilt.
    assert abs(off.init_info['tilt_deg'][0]) < 5 and abs(off.init_info['tilt_deg'][1]) < 5


def _correlated_ekf(seed):
    """An EKF moving at 10 m/s with one cloned pose and a dense covariance, so that a speed
    measurement would correct the attitude through the cross-covariance."""
    rng = np.random.default_rng(seed)
    ekf = InvariantEKF(so3_exp(np.array([0.02, -0.03, 0.7])), np.array([7.0, 7.0, 0.1]),
                       np.zeros(3), np.zeros(3), np.zeros(3), np.eye(15),
                       gravity=9.81, gyro_noise=1e-3, accel_noise=1e-2, gyro_bias_walk=1e-5,
                       accel_bias_walk=1e-3)
    ekf.add_clone('scan')
    A = rng.normal(0.0, 0.02, (21, 21))
    ekf.P = A @ A.T + 1e-6 * np.eye(21)
    return ekf


def test_consider_update_leaves_the_attitude_and_follows_the_joseph_form():
    """A speed update with the tilt as consider states corrects velocity but neither the
    current nor the cloned tilt, and its covariance is the Joseph form with the zeroed gain."""
    full, cons = _correlated_ekf(7), _correlated_ekf(7)
    R0, v0, clone0 = cons.R.copy(), cons.v.copy(), cons.clones['scan'][0].copy()
    P0 = cons.P.copy()
    c = cons.attitude_dims((0, 1))
    np.testing.assert_array_equal(c, [0, 1, 15, 16])
    full.update_body_velocity((0,), [10.5], [0.01])
    cons.update_body_velocity((0,), [10.5], [0.01], consider=c)
    # The correction's rotation about world x, y (the tilt).
    assert np.abs(so3_log(full.R @ R0.T)[:2]).max() > 1e-3      # a full update tilts the car
    np.testing.assert_allclose(so3_log(cons.R @ R0.T)[:2], 0.0, atol=1e-15)
    np.testing.assert_allclose(so3_log(cons.clones['scan'][0] @ clone0.T)[:2], 0.0, atol=1e-15)
    assert abs((cons.R.T @ cons.v)[0] - 10.5) < 0.5 * abs((R0.T @ v0)[0] - 10.5)
    # Joseph form with the modified gain, written out.
    H = np.zeros((1, 21))
    H[0, 3:6] = R0[:, 0]
    S = H @ P0 @ H.T + 1e-4
    K = P0 @ H.T / S
    K[c] = 0.0
    I_KH = np.eye(21) - K @ H
    np.testing.assert_allclose(cons.P, I_KH @ P0 @ I_KH.T + 1e-4 * K @ K.T, atol=1e-15)
    np.testing.assert_array_equal(cons.P, cons.P.T)
    assert np.linalg.eigvalsh(cons.P).min() > 0.0
    np.testing.assert_array_equal(cons.P[np.ix_(c, c)], P0[np.ix_(c, c)])


def test_consider_yaw_and_gyro_bias_leave_them_unchanged():
    """Consider dimensions beyond the tilt: the yaw (current and cloned) and the gyro bias stay
    where they were while the velocity is corrected; the covariance stays symmetric and PSD
    and keeps the consider block."""
    full, cons = _correlated_ekf(11), _correlated_ekf(11)
    R0, v0, bg0, clone0 = cons.R.copy(), cons.v.copy(), cons.bg.copy(), cons.clones['scan'][0]
    clone0 = clone0.copy()
    P0 = cons.P.copy()
    c = np.concatenate([cons.attitude_dims((2,)), GYRO_BIAS_DIMS])
    np.testing.assert_array_equal(c, [2, 17, 9, 10, 11])
    lever = np.array([-0.8, 0.0, 0.0])
    gyro = np.array([0.01, -0.02, 0.3])
    for ekf, consider in ((full, None), (cons, c)):
        ekf.update_body_velocity((1, 2), [0.0, 0.0], [0.01, 0.01], lever=lever, gyro=gyro,
                                 consider=consider)
    assert np.abs(so3_log(full.R @ R0.T)[2]) > 1e-3 and np.abs(full.bg - bg0).max() > 1e-3
    assert abs(so3_log(cons.R @ R0.T)[2]) < 1e-15
    assert abs(so3_log(cons.clones['scan'][0] @ clone0.T)[2]) < 1e-15
    np.testing.assert_array_equal(cons.bg, bg0)

    def lateral(R, v):        # |lateral, vertical velocity| of the lever point (bias kept)
        return np.abs((R.T @ v + np.cross(gyro - bg0, lever))[1:]).max()

    assert lateral(cons.R, cons.v) < 0.5 * lateral(R0, v0)
    np.testing.assert_array_equal(cons.P, cons.P.T)
    assert np.linalg.eigvalsh(cons.P).min() > 0.0
    np.testing.assert_array_equal(cons.P[np.ix_(c, c)], P0[np.ix_(c, c)])


def test_zero_rate_update_with_the_yaw_as_consider_state():
    """FilterConfig.consider_zero_rate: a zero-rate update at standstill corrects the gyro bias
    in both cases, the yaw (current and cloned) only without the consider set."""
    full, cons = _correlated_ekf(5), _correlated_ekf(5)
    R0, bg0, clone0 = cons.R.copy(), cons.bg.copy(), cons.clones['scan'][0].copy()
    c = cons.attitude_dims(CONSIDER_ATTITUDE['yaw'])
    rate = np.array([0.0, 0.0, 2e-3])            # a car that still turns slowly
    full.update_zero_rate(rate, 3e-3)
    cons.update_zero_rate(rate, 3e-3, consider=c)
    assert abs(so3_log(full.R @ R0.T)[2]) > 1e-4
    assert abs(so3_log(cons.R @ R0.T)[2]) < 1e-15
    assert abs(so3_log(cons.clones['scan'][0] @ clone0.T)[2]) < 1e-15
    for ekf in (full, cons):
        assert abs(ekf.bg[2] - rate[2]) < abs(bg0[2] - rate[2])
    np.testing.assert_array_equal(cons.P, cons.P.T)
    assert np.linalg.eigvalsh(cons.P).min() > 0.0
    assert FilterConfig().consider_zero_rate == 'yaw'
    with pytest.raises(ValueError, match='consider_zero_rate'):
        FilterConfig(consider_zero_rate='pitch')


def test_consider_dims_per_update_kind():
    """consider_attitude (speed; nhc too with consider_updates speed_nhc), consider_nhc_attitude
    (nhc only) and consider_gyro_bias pick the dimensions of each kind of update."""
    def dims(kind, **kw):
        odo = InertialOdometry(FilterConfig(**kw))
        odo.ekf = _correlated_ekf(3)
        got = odo._consider(kind)
        return None if got is None else sorted(int(i) for i in got)

    assert dims('speed') == [0, 1, 15, 16] and dims('nhc') is None     # the defaults
    assert dims('nhc', consider_nhc_attitude='yaw') == [2, 17]
    assert dims('speed', consider_nhc_attitude='yaw') == [0, 1, 15, 16]
    assert dims('nhc', consider_updates='speed_nhc', consider_nhc_attitude='yaw') == [
        0, 1, 2, 15, 16, 17]
    assert dims('speed', consider_attitude='none', consider_gyro_bias='speed') == [9, 10, 11]
    assert dims('nhc', consider_gyro_bias='speed') is None
    assert dims('nhc', consider_gyro_bias='nhc') == [9, 10, 11]
    assert dims('speed', consider_gyro_bias='speed_nhc') == [0, 1, 9, 10, 11, 15, 16]


class _BiasedSpeed:
    """A noise model that claims 1 m/s more than the truth's mean speed, confidently."""

    window, has_speed = 20, True

    def __init__(self, speed):
        self.speed = speed

    def predict(self, windows):
        n = len(windows)
        return {'lateral_logvar': np.full(n, -4.0), 'vertical_logvar': np.full(n, -4.0),
                'speed': np.full(n, self.speed), 'speed_logvar': np.full(n, -4.0),
                'speed0': np.full(n, self.speed), 'speed0_logvar': np.full(n, -4.0)}


def test_consider_tilt_keeps_a_perfect_gyro_attitude_under_biased_speed_updates():
    """FilterConfig.consider_attitude: with a perfect IMU, biased learned-speed updates tilt the
    filter unless they are consider updates for the tilt (the default). What is left comes from
    the gyro bias, which the speed updates still correct."""
    t, rot, pos, vel, force, rate = drive(seed=8, duration=10.0)
    model = _BiasedSpeed(float(np.linalg.norm(vel, axis=1).mean()) + 1.0)
    idx = np.arange(0, len(t), SCAN_EVERY)
    truth = truth_poses(rot, pos, idx)
    tilt_err = {}
    for mode in ('none', 'tilt'):
        cfg = FilterConfig(nhc_every=0, zupt_sigma=0.0, speed_mode='on', consider_attitude=mode)
        res = run_filter(cfg, t, force, rate, t[idx], noise_model=model,
                         initial_state=(rot[0], vel[0]))
        assert res.counts['speed_updates'] > 50
        err = so3_log(truth[:, :3, :3] @ np.swapaxes(res.scan_poses[:, :3, :3], 1, 2))
        tilt_err[mode] = np.abs(err[:, :2]).max()
    assert FilterConfig().consider_attitude == 'tilt'
    assert tilt_err['none'] > 0.01, tilt_err
    assert tilt_err['tilt'] < 0.01 * tilt_err['none'], tilt_err


def test_consider_setting_round_trips_and_old_checkpoints_get_the_default():
    names = ('consider_attitude', 'consider_updates', 'consider_nhc_attitude',
             'consider_gyro_bias')
    values = ('yaw', 'speed_nhc', 'tilt', 'nhc')
    stored = FilterConfig(**dict(zip(names, values))).to_dict()
    cfg, _ = build_filter({'config': {'filter': stored}})
    assert tuple(getattr(cfg, n) for n in names) == values
    old = {k: v for k, v in stored.items() if not k.startswith('consider_')}
    cfg, _ = build_filter({'config': {'filter': old}})      # written before the fields existed
    assert tuple(getattr(cfg, n) for n in names) == ('tilt', 'speed', 'none', 'none')


def _slip_circle(v=20.0, w=0.15, c=0.02, duration=10.0):
    """A perfect IMU on a circle driven with sideslip: constant forward speed v, yaw rate w and
    lateral body velocity c v w (world z up, level road); all constant in the body frame."""
    t = np.arange(0.0, duration, 1.0 / RATE)
    v_lat = c * v * w
    acc = np.tile([-w * v_lat, w * v, 9.81], (len(t), 1))
    gyr = np.tile([0.0, 0.0, w], (len(t), 1))
    return t, acc, gyr, np.array([v, v_lat, 0.0])


def test_sideslip_mean_keeps_a_slipping_car_on_its_track():
    """FilterConfig.nhc_slip_mean: in a curve with sideslip the zero lateral velocity pseudo-
    measurement is wrong and pulls the filter off a perfect IMU (position and roll); expecting
    c v omega_z with the true c leaves it on the track."""
    t, acc, gyr, v_body = _slip_circle(c=0.02)
    base = dict(zupt_sigma=0.0, speed_mode='off', nhc_lateral_sigma=0.1, nhc_vertical_sigma=0.1)
    scans = t[::SCAN_EVERY]
    ref = run_filter(FilterConfig(nhc_every=0, **base), t, acc, gyr, scans,
                     initial_state=(np.eye(3), v_body))      # IMU alone: the truth here
    err = {}
    for c in (0.0, 0.02):
        res = run_filter(FilterConfig(nhc_every=10, nhc_slip_mean=c, **base), t, acc, gyr,
                         scans, initial_state=(np.eye(3), v_body))
        assert res.counts['nhc_updates'] > 90
        dp = np.abs(res.scan_poses[:, :3, 3] - ref.scan_poses[:, :3, 3]).max()
        rot = so3_log(ref.scan_poses[:, :3, :3] @ np.swapaxes(res.scan_poses[:, :3, :3], 1, 2))
        err[c] = (dp, np.abs(rot[:, 0]).max())
    assert FilterConfig().nhc_slip_mean == 0.02
    assert err[0.0][0] > 0.2 and err[0.0][1] > 1e-4, err        # 0.54 m, 0.024 deg
    assert err[0.02][0] < 1e-3 and err[0.02][1] < 1e-5, err


def _record_body_velocity_sigmas(ekf, seen):
    """Wrap ekf.update_body_velocity so that each call appends (rows, sigmas) to seen."""
    update = ekf.update_body_velocity

    def spy(rows, values, sigmas, *args, **kwargs):
        seen.append((tuple(rows), np.array(sigmas)))
        return update(rows, values, sigmas, *args, **kwargs)
    ekf.update_body_velocity = spy


def test_sideslip_sigma_inflates_the_lateral_variance_with_the_centripetal_acceleration():
    """FilterConfig.nhc_slip_sigma (and nhc_slip_vertical_sigma): the pseudo-measurement sigma
    grows, in quadrature, by the factor times |v omega_z|; straight ahead it is unchanged."""
    t, acc, gyr, v_body = _slip_circle(v=20.0, w=0.15, c=0.0, duration=1.0)
    sigmas = {}
    for kw in ({}, {'nhc_slip_sigma': 0.1}, {'nhc_slip_sigma': 0.1,
                                             'nhc_slip_vertical_sigma': 0.05}):
        odo = InertialOdometry(FilterConfig(zupt_sigma=0.0, speed_mode='off',
                                            nhc_lateral_sigma=0.1, nhc_vertical_sigma=0.2,
                                            **kw), initial_state=(np.eye(3), v_body))
        seen = []
        for i in range(len(t)):
            odo.add_imu(t[i], acc[i], gyr[i])
            if i == 0:
                _record_body_velocity_sigmas(odo.ekf, seen)
        sigmas[tuple(kw.values())] = seen[-1][1]
        assert seen[-1][0] == (1, 2)
        assert odo._centripetal() == pytest.approx(20.0 * 0.15, rel=1e-3)
    a_c = 3.0
    np.testing.assert_allclose(sigmas[()], [0.1, 0.2])
    np.testing.assert_allclose(sigmas[(0.1,)], [np.hypot(0.1, 0.1 * a_c), 0.2], rtol=1e-3)
    np.testing.assert_allclose(sigmas[(0.1, 0.05)],
                               [np.hypot(0.1, 0.1 * a_c), np.hypot(0.2, 0.05 * a_c)], rtol=1e-3)


def test_sideslip_and_zero_rate_settings_round_trip_and_old_checkpoints_get_the_defaults():
    names = ('nhc_slip_sigma', 'nhc_slip_vertical_sigma', 'nhc_slip_mean', 'consider_zero_rate')
    values = (0.1, 0.05, -0.01, 'all')
    stored = FilterConfig(**dict(zip(names, values))).to_dict()
    cfg, _ = build_filter({'config': {'filter': stored}})
    assert tuple(getattr(cfg, n) for n in names) == values
    old = {k: v for k, v in stored.items() if k not in names}
    cfg, _ = build_filter({'config': {'filter': old}})      # written before the fields existed
    assert tuple(getattr(cfg, n) for n in names) == (0.0, 0.0, 0.02, 'yaw')


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match='init_source'):
        FilterConfig(init_source='oracle')
    with pytest.raises(ValueError, match='T_imu_lidar'):
        FilterConfig(T_imu_lidar=(2.0,) * 12)
    with pytest.raises(ValueError, match='gyro_noise'):
        FilterConfig(gyro_noise=-1.0)
    with pytest.raises(ValueError, match='consider_attitude'):
        FilterConfig(consider_attitude='pitch')
    with pytest.raises(ValueError, match='consider_updates'):
        FilterConfig(consider_updates='zupt')
    with pytest.raises(ValueError, match='consider_nhc_attitude'):
        FilterConfig(consider_nhc_attitude='roll')
    with pytest.raises(ValueError, match='consider_gyro_bias'):
        FilterConfig(consider_gyro_bias='zupt')
    with pytest.raises(ValueError, match='nhc_slip_sigma'):
        FilterConfig(nhc_slip_sigma=-0.1)
    with pytest.raises(ValueError, match='nhc_slip_mean'):
        FilterConfig(nhc_slip_mean=float('nan'))
    for bad in (float('nan'), float('inf')):    # it can come from any checkpoint's config
        with pytest.raises(ValueError, match='imu_time_offset_s must be a finite number'):
            FilterConfig(imu_time_offset_s=bad)
    with pytest.raises(ValueError, match='imu_outage_s must be a finite number > 0'):
        OnlineFilterConfig(imu_outage_s=float('inf'))
    with pytest.raises(ValueError, match='true_velocity'):
        InertialOdometry(FilterConfig(init_source='true_velocity'))
    odo = InertialOdometry(FilterConfig())
    for cov6 in (-np.eye(6), np.eye(6) + np.triu(np.ones((6, 6)), 1)):
        with pytest.raises(ValueError, match='cov6 must be symmetric positive definite'):
            odo.add_relative_pose(0.0, 0.1, np.zeros(6), cov6=cov6)
    assert not odo._events                          # nothing queued for the filter


def constant_net(cfg, outputs):
    """A NoiseNet whose six outputs are these values for any window."""
    net = NoiseNet(cfg)
    with torch.no_grad():
        net.head[-1].weight.zero_()
        net.head[-1].bias.copy_(torch.tensor(outputs))
    return net.eval()


def test_a_deep_ensemble_is_the_moment_matched_mixture_of_its_members(tmp_path):
    cfg = NoiseNetConfig(window=16, channels=4, hidden=8)
    a = [-2.0, -4.0, 10.0, math.log(0.25), 8.0, 0.0]
    b = [-3.0, -1.0, 12.0, math.log(0.75), 8.0, math.log(3.0)]
    ensemble = NoiseEnsemble([constant_net(cfg, a), constant_net(cfg, b)])
    assert ensemble.cfg.members == 2
    windows = np.random.default_rng(0).normal(0, 1, (3, 16, 6))
    out = NoiseModel(ensemble).predict(windows)
    expected = {'lateral_logvar': math.log((math.exp(-2) + math.exp(-3)) / 2),
                'vertical_logvar': math.log((math.exp(-4) + math.exp(-1)) / 2),
                'speed': 11.0, 'speed_logvar': math.log(0.5 + 1.0),     # + the means' spread
                'speed0': 8.0, 'speed0_logvar': math.log(2.0)}
    for key, value in expected.items():
        np.testing.assert_allclose(out[key], value, rtol=1e-5, err_msg=key)
    # It travels in a filter checkpoint and comes back under weights_only as an ensemble.
    path = save_filter_checkpoint(tmp_path / 'ensemble.pth',
                                  filter_payload(FilterConfig(), ensemble))
    _, model = load_filter(path)
    assert isinstance(model.net, NoiseEnsemble) and model.net.cfg == ensemble.cfg
    back = model.predict(windows)
    assert all(np.array_equal(back[k], out[k]) for k in out)
    # A checkpoint from before the field (no 'members') is one network.
    payload = filter_payload(FilterConfig(), constant_net(cfg, a))
    del payload['config']['model']['members']
    assert isinstance(build_filter(payload)[1].net, NoiseNet)
    with pytest.raises(ValueError, match='members differ in shape'):
        NoiseEnsemble([constant_net(cfg, a), NoiseNet(cfg.replace(channels=8))])
