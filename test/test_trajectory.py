"""The online trajectory core (no ROS): SE(3) covariance against Monte Carlo, the child-frame
twist, chaining by stamps, bridging, segments and ground truth by nearest stamp."""
import numpy as np
import pytest

from mm_fusion_ros.geometry import (
    invert_pose,
    make_pose,
    pose_to_vec6,
    rpy_to_rot,
    so3_log,
    vec6_to_pose,
)
from mm_fusion_ros.trajectory import covariance
from mm_fusion_ros.trajectory.bridge import ConstantVelocityBridge, integrate_gyro
from mm_fusion_ros.trajectory.chain import OnlineTrajectory, TrajectoryConfig

MS = 1_000_000
DT_NS = 100 * MS
# A curved, climbing drive: 10 m/s, yawing 0.3 rad/s and pitching a little.
STEP = pose_to_vec6(make_pose(rpy_to_rot(0.004, -0.01, 0.03), [1.0, 0.05, 0.02]))
# Per-step noise of the 6-vector (translation [m], rotation [rad]), as a network predicts it.
STEP_COV = np.diag([0.03, 0.01, 0.01, 0.002, 0.002, 0.004]) ** 2


def odom_errors(poses, reference):
    """(M, 6) position error and rotation error about the odom axes, ROS covariance order."""
    dp = poses[:, :3, 3] - reference[:3, 3]
    dtheta = so3_log(poses[:, :3, :3] @ reference[:3, :3].T)
    return np.concatenate([dp, dtheta], axis=1)


def test_pose_covariance_matches_monte_carlo_on_a_curved_trajectory():
    steps, runs = 40, 20000
    rng = np.random.default_rng(0)
    pose, cov = np.eye(4), np.zeros((6, 6))
    sampled = np.tile(np.eye(4), (runs, 1, 1))
    old_way = np.zeros(6)
    for _ in range(steps):
        step = vec6_to_pose(STEP)
        cov = covariance.compose(cov, step, covariance.step_covariance(STEP, STEP_COV))
        pose = pose @ step
        noise = rng.multivariate_normal(np.zeros(6), STEP_COV, size=runs)
        sampled = sampled @ vec6_to_pose(STEP + noise)
        old_way += np.diag(STEP_COV)
    predicted = covariance.odom_covariance(pose, cov)
    empirical = np.cov(odom_errors(sampled, pose), rowvar=False)
    rel = np.linalg.norm(predicted - empirical) / np.linalg.norm(empirical)
    assert rel < 0.05, (rel, np.diag(predicted), np.diag(empirical))
    # rotation uncertainty reached the position: the lateral variance far exceeds the sum of
    # the steps' own variances, which is what adding per-step variances in the vehicle frame
    # published before
    assert predicted[1, 1] > 20 * old_way[1]
    assert np.linalg.norm(np.diag(old_way) - empirical) / np.linalg.norm(empirical) > 0.9


def test_twist_is_in_the_child_frame_with_its_covariance():
    dt = 0.1
    tw = covariance.twist(STEP, dt)
    step = vec6_to_pose(STEP)
    # velocity of base_link at k in its own frame: R_k^T (p_k - p_{k-1}) / dt
    np.testing.assert_allclose(tw[:3], step[:3, :3].T @ step[:3, 3] / dt)
    np.testing.assert_allclose(tw[3:], STEP[3:] / dt)
    rng = np.random.default_rng(1)
    noise = rng.multivariate_normal(np.zeros(6), STEP_COV, size=20000)
    samples = np.stack([covariance.twist(STEP + n, dt) for n in noise])
    empirical = np.cov(samples, rowvar=False)
    predicted = covariance.twist_covariance(STEP, STEP_COV, dt)
    assert np.linalg.norm(predicted - empirical) / np.linalg.norm(empirical) < 0.05


def true_poses(n):
    return np.stack([np.linalg.matrix_power(vec6_to_pose(STEP), k) for k in range(n)])


def feed(traj, stamps, keep, run=None):
    """Add the true step between consecutive kept stamps (None -> skipped sample)."""
    records = []
    for k in range(1, len(stamps)):
        if keep(k):
            records += traj.add_step(stamps[k - 1], stamps[k], STEP, STEP_COV, run=run)
    return records


def test_steps_chain_by_stamps_and_holes_are_bridged_and_counted():
    stamps = [10**12 + k * DT_NS for k in range(30)]
    traj = OnlineTrajectory(TrajectoryConfig(bridge='velocity'))
    records = feed(traj, stamps, keep=lambda k: k % 5 != 0)       # every fifth step lost
    assert [r.stamp_ns for r in records] == stamps[1:]            # one pose per scan
    bridged = [r for r in records if r.bridged]
    assert len(bridged) == 5 and {r.bridged for r in bridged} == {'velocity'}
    assert traj.stats()['bridged'] == 5 and traj.stats()['segments'] == 1
    # constant motion: the constant-velocity bridge restores the lost motion exactly
    np.testing.assert_allclose(records[-1].pose, true_poses(30)[-1], atol=1e-9)
    # a bridged step is less certain than a predicted one
    assert np.trace(bridged[0].cov) > np.trace(records[bridged[0].index - 2].cov)
    track, = traj.tracks()
    assert track.bridged.sum() == 5 and len(track.stamps_ns) == 30
    assert not track.bridged[0] and track.bridged[5]


def test_the_bridge_averages_as_many_steps_as_bridge_history_says():
    """bridge_history above 16 was cut to 16 by the segment's memory of recent steps: 30
    steps of 2 m then 20 of 1 m, a hole, and the bridged step is their 50-step mean."""
    stamps = [10**12 + k * DT_NS for k in range(53)]
    traj = OnlineTrajectory(TrajectoryConfig(bridge='velocity', bridge_history=50))
    records = []
    for k in range(1, 51):
        length = 2.0 if k <= 30 else 1.0
        records += traj.add_step(stamps[k - 1], stamps[k], [length, 0, 0, 0, 0, 0], STEP_COV)
    records += traj.add_step(stamps[51], stamps[52], [1.0, 0, 0, 0, 0, 0], STEP_COV)
    bridged, = [r for r in records if r.bridged]
    step = np.linalg.inv(records[records.index(bridged) - 1].pose) @ bridged.pose
    assert step[0, 3] == pytest.approx((30 * 2.0 + 20 * 1.0) / 50, rel=1e-6)


def test_a_prediction_that_is_not_finite_is_left_out_and_bridged():
    """Chained, one NaN would make the rest of the segment NaN (published and written)."""
    stamps = [10**12 + k * DT_NS for k in range(10)]
    traj = OnlineTrajectory(TrajectoryConfig(bridge='velocity'))
    records = feed(traj, stamps[:6], keep=lambda k: True)
    bad_cov = STEP_COV.copy()
    bad_cov[0, 0] = np.nan
    for mean, cov in ((np.full(6, np.nan), STEP_COV), (STEP, bad_cov)):
        with pytest.raises(ValueError, match='not finite'):
            traj.add_step(stamps[5], stamps[6], mean, cov)
    records += traj.add_step(stamps[6], stamps[7], STEP, STEP_COV)
    assert records[-2].bridged == 'velocity' and records[-2].stamp_ns == stamps[6]
    assert all(np.isfinite(r.pose).all() and np.isfinite(r.cov).all() for r in records)
    np.testing.assert_allclose(records[-1].pose, true_poses(8)[-1], atol=1e-9)
    assert traj.stats()['segments'] == 1


def test_without_bridging_a_hole_would_lose_the_motion():
    stamps = [k * DT_NS for k in range(1, 30)]
    traj = OnlineTrajectory(TrajectoryConfig(bridge='off'))
    feed(traj, stamps, keep=lambda k: k != 10)
    assert traj.stats()['gap'] == 1 and traj.stats()['bridged'] == 0
    first, second = traj.tracks()
    assert (first.reason, second.reason) == ('start', 'gap')
    assert len(first.stamps_ns) == 10 and second.stamps_ns[0] == stamps[10]


def test_gyro_rotation_bridges_a_long_hole_with_a_turn():
    """The vehicle turns harder during the hole: the gyro sees it, constant velocity does not."""
    yaw_rate = 0.3
    imu_t = np.arange(0, 3 * 10**9, 10 * MS)
    gyro = np.tile([0.0, 0.0, yaw_rate], (len(imu_t), 1))
    hole = (imu_t > 10 * DT_NS) & (imu_t < 14 * DT_NS)
    gyro[hole, 2] = 1.0
    rot_base_imu = rpy_to_rot(0.0, 0.0, np.pi / 2)   # imu_link yawed 90 deg: z axes agree
    bridge = ConstantVelocityBridge(history=3, imu=lambda t0, t1: (imu_t, gyro),
                                    rot_base_imu=rot_base_imu)
    traj = OnlineTrajectory(TrajectoryConfig(), bridge=bridge)
    step = pose_to_vec6(make_pose(rpy_to_rot(0, 0, yaw_rate * 0.1), [1.0, 0, 0]))
    stamps = [k * DT_NS for k in range(20)]
    records = []
    for k in range(1, 20):
        if k not in (11, 12, 13, 14):
            records += traj.add_step(stamps[k - 1], stamps[k], step, STEP_COV)
    b, = [r for r in records if r.bridged]
    assert b.bridged == 'imu' and b.stamp_ns == stamps[14]
    yaw_gap = so3_log(invert_pose(records[9].pose) @ b.pose)[2]
    expected = yaw_rate * 0.01 + 1.0 * 0.38 + yaw_rate * 0.01   # ramps at the hole's ends
    assert yaw_gap == pytest.approx(expected, rel=0.03)
    assert traj.stats()['bridged_imu'] == 1
    # IMU that does not cover the hole: constant velocity instead
    assert integrate_gyro(imu_t[:50], gyro[:50], 10 * DT_NS, 14 * DT_NS) is None


def test_time_going_back_or_a_new_run_starts_a_segment():
    stamps = [5 * 10**9 + k * DT_NS for k in range(10)]
    traj = OnlineTrajectory()
    feed(traj, stamps, keep=lambda k: True, run=0)
    feed(traj, stamps, keep=lambda k: True, run=0)               # the bag again: stamps repeat
    feed(traj, [s + 10**10 for s in stamps], keep=lambda k: True, run=1)   # a new run id
    tracks = traj.tracks()
    assert [t.reason for t in tracks] == ['start', 'rewind', 'rewind']
    assert [len(t.stamps_ns) for t in tracks] == [10, 10, 10]
    for t in tracks:
        np.testing.assert_allclose(t.poses, true_poses(10), atol=1e-9)
    assert traj.stats()['rewind'] == 2 and traj.stats()['poses'] == 30
    with pytest.raises(ValueError, match='forward'):
        traj.add_step(stamps[3], stamps[3], STEP, STEP_COV)


def test_ground_truth_is_the_recorded_pose_by_nearest_stamp():
    stamps = [10**12 + k * DT_NS for k in range(12)]
    origin = make_pose(rpy_to_rot(0.1, 0.0, 1.0), [100.0, -5.0, 2.0])   # not the identity
    truth = origin @ true_poses(12)
    traj = OnlineTrajectory(TrajectoryConfig(gt_slop_s=0.005))
    for k in range(6):   # messages 2 ms off the scan stamps; frame 3's is missing
        if k != 3:
            traj.add_ground_truth(stamps[k] + 2 * MS, truth[k])
    records = feed(traj, stamps[:6], keep=lambda k: True)
    np.testing.assert_allclose(records[1].gt_pose, true_poses(3)[2], atol=1e-9)
    assert records[2].gt_pose is None                     # frame 3: none within the slop
    # a message that comes after its pose still fills it in (not for the published record)
    traj.add_ground_truth(stamps[3] - 3 * MS, truth[3])
    for k in range(6, 12):
        traj.add_ground_truth(stamps[k], truth[k])
    feed(traj, stamps[5:], keep=lambda k: True)
    track, = traj.tracks()
    assert track.gt_valid.all()
    np.testing.assert_allclose(track.gt, true_poses(12), atol=1e-9)
    traj.add_step(stamps[11], stamps[11] + DT_NS, STEP, STEP_COV)   # no GT for this one
    assert traj.tracks()[0].gt is None
