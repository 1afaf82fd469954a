"""eval/: devkit metrics vs a plain-loop devkit, ATE/RPE vs evo, strict pose I/O, baselines."""
import json
import math

from evo import main_ape, main_rpe
from evo.core import metrics as evo_metrics
from evo.core.trajectory import PosePath3D
import numpy as np
import pytest
from scipy.io import savemat
from scipy.spatial.transform import Rotation

from mm_fusion_ros.cli import evaluate_odometry
from mm_fusion_ros.eval import baselines, metrics
from mm_fusion_ros.eval.trajectory_io import (
    base_link_poses_to_cam0,
    check_same_length,
    parse_kitti_poses,
    read_kitti_poses,
    write_kitti_poses,
)
from mm_fusion_ros.geometry import (
    base_link_to_cam0,
    cam0_to_base_link,
    chain_relative,
    invert_pose,
    make_pose,
    rpy_to_rot,
    so3_exp,
)
from mm_fusion_ros.kitti.odometry import Calib, NOMINAL_TR, read_times, write_calib, write_times
from mm_fusion_ros.kitti.raw import read_calib_imu_to_velo, write_calib_imu_to_velo
from mm_fusion_ros.kitti.sample import ImuData


def perturb(gt, scale=1.02, yaw_deg_per_frame=0.01, noise=0.0, seed=0):
    """Chain GT steps with a scale error, a yaw drift about camera y and optional step noise."""
    rng = np.random.default_rng(seed)
    steps = np.linalg.inv(gt[:-1]) @ gt[1:]
    u, _, vt = np.linalg.svd(steps[:, :3, :3])
    steps[:, :3, :3] = u @ vt     # proper rotations, so the chain stays in SO(3) for evo
    steps[:, :3, 3] *= scale
    drift = so3_exp(np.array([0.0, np.deg2rad(yaw_deg_per_frame), 0.0]))
    steps[:, :3, :3] = drift @ steps[:, :3, :3]
    if noise:
        steps[:, :3, 3] += rng.normal(0, noise, (len(steps), 3))
        steps[:, :3, :3] = so3_exp(rng.normal(0, noise * 0.01, (len(steps), 3))) @ steps[:, :3, :3]
    out = [gt[0]]
    for step in steps:
        out.append(out[-1] @ step)
    return np.stack(out)


@pytest.fixture
def gt07(kitti_sample):
    return read_kitti_poses(kitti_sample / 'poses' / '07.txt')


@pytest.fixture
def pred07(gt07):
    return perturb(gt07, noise=0.01)


# ---------------------------------------------------------------- KITTI devkit

def devkit_loop(gt, pred, lengths=(100, 200, 300, 400, 500, 600, 700, 800), step_size=10):
    """The devkit's calcSequenceErrors as its C++ is written: plain loops, segment by segment."""
    dist = [0.0]
    for i in range(1, len(gt)):
        dx = gt[i][0][3] - gt[i - 1][0][3]
        dy = gt[i][1][3] - gt[i - 1][1][3]
        dz = gt[i][2][3] - gt[i - 1][2][3]
        dist.append(dist[i - 1] + math.sqrt(dx * dx + dy * dy + dz * dz))
    errors = []
    for first in range(0, len(gt), step_size):
        for length in lengths:
            last = -1
            for i in range(first, len(dist)):
                if dist[i] > dist[first] + length:
                    last = i
                    break
            if last == -1:
                continue
            delta_gt = np.linalg.inv(gt[first]) @ gt[last]
            delta_pred = np.linalg.inv(pred[first]) @ pred[last]
            e = np.linalg.inv(delta_pred) @ delta_gt
            t_err = math.sqrt(e[0][3] ** 2 + e[1][3] ** 2 + e[2][3] ** 2)
            d = 0.5 * (e[0][0] + e[1][1] + e[2][2] - 1.0)
            r_err = math.acos(max(min(d, 1.0), -1.0))
            errors.append((first, last, length, t_err / length, r_err / length))
    return errors


def test_devkit_metrics_match_plain_loop_on_real_07(gt07, pred07):
    ref = devkit_loop(gt07, pred07)
    seg = metrics.segment_errors(gt07, pred07)
    order = np.lexsort((seg.length, seg.first))    # the loop's order: first frame, then length
    assert [(f, la, ln) for f, la, ln, _, _ in ref] == list(
        zip(seg.first[order].tolist(), seg.last[order].tolist(), seg.length[order].tolist()))
    np.testing.assert_allclose(seg.t_err[order], [e[3] for e in ref], rtol=1e-9)
    np.testing.assert_allclose(seg.r_err[order], [e[4] for e in ref], rtol=1e-7)

    got = metrics.kitti_metrics(gt07, pred07)
    assert got['t_rel'] == pytest.approx(np.mean([e[3] for e in ref]) * 100, rel=1e-10)
    assert got['r_rel'] == pytest.approx(np.mean([e[4] for e in ref]) * 18000 / np.pi, rel=1e-9)
    for length in (100, 400, 600):
        sel = [e for e in ref if e[2] == length]
        assert got['per_length'][length]['count'] == len(sel) > 0
        assert got['per_length'][length]['t_rel'] == pytest.approx(
            np.mean([e[3] for e in sel]) * 100, rel=1e-10)
    # Sequence 07 is ~695 m long: no 700/800 m segment exists, as in the devkit.
    assert got['per_length'][800] == {'t_rel': pytest.approx(math.nan, nan_ok=True),
                                      'r_rel': pytest.approx(math.nan, nan_ok=True), 'count': 0}
    assert got['num_segments'] == len(ref)
    # A 2% scale error and 0.01 deg/frame of yaw drift show up as such.
    assert 1.5 < got['t_rel'] < 4.0
    assert 1.0 < got['r_rel'] < 2.0


def test_identical_trajectories_score_zero(gt07):
    got = metrics.kitti_metrics(gt07, gt07.copy())
    assert got['t_rel'] < 1e-9
    assert got['r_rel'] < 1e-5       # the devkit's acos of a trace at 1 - 1e-16
    assert metrics.ate(gt07, gt07) < 1e-9
    assert metrics.ate(gt07, gt07, with_scale=True) < 1e-9
    rel = metrics.rpe(gt07, gt07)
    assert rel.trans_rmse < 1e-9 and rel.rot_rmse < 1e-6


def test_uniform_scale_error_gives_that_t_rel():
    # A straight 1 km line in 1 m steps, every step 1% too long. The devkit ends a segment at the
    # first frame *beyond* first + length, so an L m segment spans L + 1 m: error 1% * (L + 1) / L.
    n = 1001
    gt = make_pose(np.broadcast_to(np.eye(3), (n, 3, 3)),
                   np.stack([np.zeros(n), np.zeros(n), np.arange(n, dtype=float)], axis=1))
    pred = gt.copy()
    pred[:, :3, 3] *= 1.01
    got = metrics.kitti_metrics(gt, pred)
    counts = {k: len(range(0, n - k - 1, 10)) for k in metrics.SEGMENT_LENGTHS}
    assert [got['per_length'][k]['count'] for k in (100, 800)] == [counts[100], counts[800]] \
        == [90, 20]
    for k in metrics.SEGMENT_LENGTHS:
        assert got['per_length'][k]['t_rel'] == pytest.approx((k + 1) / k, rel=1e-9)
    expected = sum(counts[k] * (k + 1) / k for k in counts) / sum(counts.values())
    assert got['t_rel'] == pytest.approx(expected, rel=1e-9)
    assert 1.0 < got['t_rel'] < 1.01
    assert got['r_rel'] == pytest.approx(0.0, abs=1e-9)


def test_uniform_scale_error_on_real_07(gt07):
    pred = gt07.copy()
    pred[:, :3, 3] *= 1.01
    got = metrics.kitti_metrics(gt07, pred)
    # Each segment's error is 1% of its chord |p_last - p_first|, which on this loop is far
    # shorter than the path length for long segments.
    first, last, length = metrics.segment_pairs(gt07)
    chord = np.linalg.norm(gt07[last, :3, 3] - gt07[first, :3, 3], axis=1)
    assert got['t_rel'] == pytest.approx(np.mean(chord / length), rel=1e-6)
    assert 0.3 < got['t_rel'] < 1.0
    assert got['r_rel'] < 1e-5


def test_short_trajectory_has_no_segments():
    gt = make_pose(np.broadcast_to(np.eye(3), (20, 3, 3)), np.zeros((20, 3)) + [[0, 0, 1]])
    gt[:, 2, 3] = np.arange(20.0)
    got = metrics.kitti_metrics(gt, gt)
    assert math.isnan(got['t_rel']) and got['num_segments'] == 0


# ---------------------------------------------------------------- evo agreement

def _evo(poses):
    return PosePath3D(poses_se3=list(poses))


@pytest.mark.parametrize('with_scale', [False, True])
def test_ate_matches_evo(gt07, pred07, with_scale):
    theirs = main_ape.ape(_evo(gt07), _evo(pred07), evo_metrics.PoseRelation.translation_part,
                          align=True, correct_scale=with_scale).stats['rmse']
    ours = metrics.ate(gt07, pred07, with_scale=with_scale)
    assert ours == pytest.approx(theirs, rel=1e-9)
    assert ours > 1.0     # the perturbation is real, the comparison is not 0 == 0


def test_sim3_alignment_removes_scale(gt07):
    pred = gt07.copy()
    pred[:, :3, 3] = 0.5 * pred[:, :3, 3] @ rpy_to_rot(0.1, -0.2, 0.3).T + [3.0, -1.0, 2.0]
    assert metrics.ate(gt07, pred, with_scale=True) < 1e-9
    assert metrics.ate(gt07, pred) > 10.0


@pytest.mark.parametrize('delta,unit,from_ref', [(1, 'frames', False), (7, 'frames', False),
                                                 (50.0, 'm', False), (100.0, 'm', False),
                                                 (100.0, 'm', True)])
def test_rpe_matches_evo(gt07, pred07, delta, unit, from_ref):
    evo_unit = evo_metrics.Unit.frames if unit == 'frames' else evo_metrics.Unit.meters
    ours = metrics.rpe(gt07, pred07, delta, unit, pairs_from_reference=from_ref)
    for relation, value in ((evo_metrics.PoseRelation.translation_part, ours.trans_rmse),
                            (evo_metrics.PoseRelation.rotation_angle_deg, ours.rot_rmse)):
        res = main_rpe.rpe(_evo(gt07), _evo(pred07), relation, delta=delta, delta_unit=evo_unit,
                           pairs_from_reference=from_ref)
        assert value == pytest.approx(res.stats['rmse'], rel=1e-9)
        assert value > 1e-3
    # Same pairs as evo's (its delta_ids are the second index of each pair).
    metric = evo_metrics.RPE(evo_metrics.PoseRelation.translation_part, delta, evo_unit,
                             pairs_from_reference=from_ref)
    metric.process_data((_evo(gt07), _evo(pred07)))
    assert ours.pairs[:, 1].tolist() == metric.delta_ids


def test_rotation_angle_matches_scipy_on_nearly_orthonormal_matrices():
    rng = np.random.default_rng(3)
    rots = so3_exp(rng.normal(0, 0.01, (200, 3))) + rng.normal(0, 2e-7, (200, 3, 3))
    theirs = np.linalg.norm(Rotation.from_matrix(rots).as_rotvec(), axis=1)
    np.testing.assert_allclose(metrics.rotation_angle(rots), theirs, rtol=1e-9)


def test_rpe_rejects_bad_delta(gt07):
    with pytest.raises(ValueError, match='positive integer'):
        metrics.rpe(gt07, gt07, 1.5, 'frames')
    with pytest.raises(ValueError, match='no pose pair'):
        metrics.rpe(gt07, gt07, 1e6, 'm')
    with pytest.raises(ValueError, match='unit'):
        metrics.rpe(gt07, gt07, 1, 'seconds')
    with pytest.raises(ValueError, match='1100'):
        metrics.ate(gt07, gt07[:1100])


# ---------------------------------------------------------------- strict pose I/O

def test_pose_file_round_trip(tmp_path, gt07):
    path = write_kitti_poses(tmp_path / 'out' / '07.txt', gt07)
    back = read_kitti_poses(path)
    np.testing.assert_allclose(back, gt07, rtol=0, atol=1e-9)
    assert len(path.read_text().splitlines()) == len(gt07)
    assert all(len(line.split()) == 12 for line in path.read_text().splitlines())


GOOD = '1 0 0 0 0 1 0 0 0 0 1 0\n'


@pytest.mark.parametrize('bad_line,message', [
    ('1 0 0 0 0 1 0 0 0 0 1\n', 'expected 12 numbers'),
    ('1 0 0 0 0 1 0 0 0 0 1 0 5\n', 'got 13'),
    ('1 0 0 0 0 1 0 x 0 0 1 0\n', 'not a number'),
    ('1 0 0 0 0 1 0 nan 0 0 1 0\n', 'non-finite'),
    ('1.1 0 0 0 0 1 0 0 0 0 1 0\n', 'not orthonormal'),
    ('-1 0 0 0 0 1 0 0 0 0 1 0\n', 'reflection'),
    ('\n', 'empty line'),
])
def test_malformed_pose_line_names_file_and_line(tmp_path, bad_line, message):
    path = tmp_path / 'pred.txt'
    path.write_text(GOOD + GOOD + bad_line + GOOD)
    with pytest.raises(ValueError, match=message) as info:
        read_kitti_poses(path)
    assert f'{path}:3:' in str(info.value)


def test_missing_and_empty_pose_files(tmp_path):
    with pytest.raises(FileNotFoundError, match='nope.txt'):
        read_kitti_poses(tmp_path / 'nope.txt')
    (tmp_path / 'empty.txt').write_text('\n\n')
    with pytest.raises(ValueError, match='empty file'):
        read_kitti_poses(tmp_path / 'empty.txt')
    assert len(parse_kitti_poses(GOOD * 3 + '\n\n')) == 3   # trailing blank lines are fine


def test_length_mismatch_names_both_files(tmp_path, gt07):
    gt_path = write_kitti_poses(tmp_path / 'gt.txt', gt07)
    pred_path = write_kitti_poses(tmp_path / 'pred.txt', gt07[:-5])
    with pytest.raises(ValueError) as info:
        check_same_length(gt_path, read_kitti_poses(gt_path), pred_path,
                          read_kitti_poses(pred_path))
    msg = str(info.value)
    assert str(gt_path) in msg and str(pred_path) in msg and '1101' in msg and '1096' in msg
    check_same_length('a', gt07, 'b', gt07)   # equal lengths pass


def test_base_link_predictions_convert_to_cam0(gt07):
    tr = make_pose(rpy_to_rot(0.01, -0.02, 0.005) @ NOMINAL_TR[:3, :3], [0.1, -0.05, -0.3])
    base = cam0_to_base_link(gt07, tr)
    np.testing.assert_allclose(base_link_poses_to_cam0(base, tr[:3]), gt07, atol=1e-9)
    with pytest.raises(ValueError, match='Tr must be'):
        base_link_poses_to_cam0(base, np.eye(3))


# ---------------------------------------------------------------- baselines

def test_cv_oracle_on_real_07(gt07):
    pred = baselines.cv_oracle(gt07)
    np.testing.assert_allclose(pred[:2], gt07[:2], atol=1e-9)
    # Step k repeats GT step k-1.
    step_pred = np.linalg.inv(pred[5]) @ pred[6]
    np.testing.assert_allclose(step_pred, np.linalg.inv(gt07[4]) @ gt07[5], atol=1e-6)
    got = metrics.kitti_metrics(gt07, pred)
    assert 0.8 < got['t_rel'] < 1.5      # measured 1.096 %
    assert 0.2 < got['r_rel'] < 0.8      # measured 0.486 deg/100 m
    rot = pred[:, :3, :3]   # steps re-projected onto SO(3)
    assert np.abs(rot @ rot.transpose(0, 2, 1) - np.eye(3)).max() < 1e-6


def test_mean_step_and_mean_motion():
    step = make_pose(rpy_to_rot(0.0, 0.01, 0.0), [0.0, 0.0, 1.0])
    traj = np.stack([np.linalg.matrix_power(step, k) for k in range(50)])
    vec = baselines.mean_step([traj, traj[:10]])
    np.testing.assert_allclose(vec, [0, 0, 1, 0, 0.01, 0], atol=1e-12)
    np.testing.assert_allclose(baselines.mean_motion(traj, vec), traj, atol=1e-9)
    np.testing.assert_allclose(baselines.mean_motion(traj, step), traj, atol=1e-9)
    slow = baselines.mean_motion(traj, make_pose(np.eye(3), [0, 0, 0.5]))
    assert slow[-1, 2, 3] == pytest.approx(24.5)
    with pytest.raises(ValueError, match='6-vector'):
        baselines.mean_motion(traj, np.zeros(5))


def analytic_motion(t):
    """Smooth IMU-frame trajectory with exact specific force and body rates at times t."""
    p = np.stack([10 * t + 5 * np.sin(0.3 * t), 8 * np.sin(0.2 * t), 0.5 * np.sin(0.5 * t)], -1)
    acc = np.stack([-0.45 * np.sin(0.3 * t), -0.32 * np.sin(0.2 * t),
                    -0.125 * np.sin(0.5 * t)], -1)
    yaw, dyaw = 0.4 * np.sin(0.25 * t) + 0.05 * t, 0.1 * np.cos(0.25 * t) + 0.05
    pitch, dpitch = 0.03 * np.sin(0.7 * t), 0.021 * np.cos(0.7 * t)
    roll, droll = 0.02 * np.sin(0.9 * t), 0.018 * np.cos(0.9 * t)
    rot = rpy_to_rot(roll, pitch, yaw)
    # Body rates of R = Rz(yaw) Ry(pitch) Rx(roll).
    gyro = np.stack([droll - dyaw * np.sin(pitch),
                     dpitch * np.cos(roll) + dyaw * np.sin(roll) * np.cos(pitch),
                     -dpitch * np.sin(roll) + dyaw * np.cos(roll) * np.cos(pitch)], -1)
    accel = np.einsum('nji,nj->ni', rot, acc + [0.0, 0.0, baselines.GRAVITY])
    return make_pose(rot, p), accel, gyro


T_BASE_IMU = make_pose(rpy_to_rot(0.01, -0.02, 0.03), [-0.81, 0.32, -0.80])


@pytest.fixture(scope='module')
def synthetic_imu_run():
    rng = np.random.default_rng(1)
    times = np.arange(301) * 0.1 + np.r_[0.0, rng.uniform(-0.003, 0.003, 300)]
    stamps = np.arange(0.0, 30.0 + 1e-9, 0.01)
    _, accel, gyro = analytic_motion(stamps)
    imu = ImuData(stamps=stamps, accel=accel, gyro=gyro, source='synthetic')
    gt_base = analytic_motion(times)[0] @ invert_pose(T_BASE_IMU)
    return gt_base, times, imu


def test_imu_dead_reckoning_reproduces_analytic_trajectory(synthetic_imu_run):
    gt_base, times, imu = synthetic_imu_run
    pred = baselines.imu_dead_reckoning(gt_base, times, imu, T_BASE_IMU)
    pos_err = np.linalg.norm(pred[:, :3, 3] - gt_base[:, :3, 3], axis=1)
    assert metrics.trajectory_distances(gt_base)[-1] > 290
    assert pos_err.max() < 5e-3              # measured 2.5e-4 m over ~300 m
    rot_err = metrics.rotation_angle(np.swapaxes(pred[:, :3, :3], 1, 2) @ gt_base[:, :3, :3])
    assert np.rad2deg(rot_err).max() < 1e-3
    heading = baselines.gyro_heading_error(gt_base, times, imu, T_BASE_IMU)
    assert np.abs(heading).max() < 1e-3


def test_imu_errors_are_detected(synthetic_imu_run):
    gt_base, times, imu = synthetic_imu_run
    bias = 0.01   # rad/s on the (nearly vertical) z gyro -> 17 deg of yaw after 30 s
    biased = ImuData(stamps=imu.stamps, accel=imu.accel, gyro=imu.gyro + [0, 0, bias])
    heading = baselines.gyro_heading_error(gt_base, times, biased, T_BASE_IMU)
    assert heading[-1] == pytest.approx(np.rad2deg(bias * (times[-1] - times[0])), rel=0.02)
    # Ignoring the IMU's mounting (identity extrinsics) breaks the reconstruction.
    wrong = baselines.imu_dead_reckoning(gt_base, times, imu, np.eye(4))
    assert np.linalg.norm(wrong[:, :3, 3] - gt_base[:, :3, 3], axis=1).max() > 1.0
    short = ImuData(stamps=imu.stamps[:2000], accel=imu.accel[:2000], gyro=imu.gyro[:2000],
                    source='short.mat')
    with pytest.raises(ValueError, match='short.mat covers'):
        baselines.imu_dead_reckoning(gt_base, times, short, T_BASE_IMU)


def test_kiss_icp_missing_is_reported(monkeypatch):
    monkeypatch.setattr(baselines, 'kiss_icp_available', lambda: False)
    with pytest.raises(ModuleNotFoundError, match='pip install kiss-icp'):
        baselines.kiss_icp_odometry([np.zeros((10, 4))])


def _write_synthetic_kitti(root, seq='03'):
    """KITTI tree of an analytic drive: times, calib, GT poses, IMU .mat, IMU extrinsics."""
    seq_dir = root / 'sequences' / seq
    frames = 251
    write_times(seq_dir / 'times.txt', np.arange(frames) * 0.1037)
    times = read_times(seq_dir / 'times.txt')
    tr = make_pose(rpy_to_rot(0.01, -0.02, 0.005) @ NOMINAL_TR[:3, :3], [0.1, -0.05, -0.3])
    P = np.tile(np.hstack([np.eye(3), np.zeros((3, 1))]), (4, 1, 1))
    write_calib(seq_dir / 'calib.txt', Calib(P=P, Tr=tr))
    write_calib_imu_to_velo(seq_dir / 'calib_imu_to_velo.txt', T_BASE_IMU)
    t_base_imu = read_calib_imu_to_velo(seq_dir / 'calib_imu_to_velo.txt')
    stamps = np.interp(np.arange(10 * (frames - 1) + 1) / 10, np.arange(frames), times)
    _, accel, gyro = analytic_motion(stamps)
    (root / 'imus').mkdir(parents=True)
    savemat(root / 'imus' / f'{seq}.mat', {'imu_data_interp': np.hstack([accel, gyro])})
    gt_base = analytic_motion(times)[0] @ invert_pose(t_base_imu)
    gt_cam0 = base_link_to_cam0(gt_base, tr)
    write_kitti_poses(root / 'poses' / f'{seq}.txt', gt_cam0)
    return gt_cam0, tr


def test_cli_imu_baseline_and_base_link_predictions(tmp_path, capsys):
    data = tmp_path / 'kitti'
    gt_cam0, tr = _write_synthetic_kitti(data)
    pred_cam0 = perturb(gt_cam0, scale=1.03, yaw_deg_per_frame=0.02)
    write_kitti_poses(tmp_path / 'pred' / '03.txt', cam0_to_base_link(pred_cam0, tr))
    out = tmp_path / 'res.json'
    rc = evaluate_odometry.main(['--data_path', str(data), '--sequences', '3', '--pred_dir',
                                 str(tmp_path / 'pred'), '--pred_frame', 'base_link',
                                 '--baseline', 'imu', '--baseline', 'cv_oracle',
                                 '--json', str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    expected = metrics.kitti_metrics(gt_cam0, pred_cam0)
    assert report['sequences']['03']['t_rel'] == pytest.approx(expected['t_rel'], rel=1e-6)
    assert report['sequences']['03']['r_rel'] == pytest.approx(expected['r_rel'], rel=1e-5)
    imu = report['baselines']['imu']['sequences']['03']
    assert imu['t_rel'] < 0.01 and imu['ate'] < 0.01      # noise-free IMU: near exact
    assert abs(imu['gyro_heading_error_final_deg']) < 1e-3
    assert report['baselines']['cv_oracle']['t_rel'] > 10 * imu['t_rel']
    assert 'imu baseline, sequence 03: gyro heading drift' in capsys.readouterr().out


def test_late_step_errors_average_the_second_half_only():
    """The on/off score of an adapting run: steps of the second half only, in metres/degrees."""
    n = 11
    xyz = np.stack([np.arange(n, dtype=float), np.zeros(n), np.zeros(n)], axis=1)
    gt = make_pose(np.tile(np.eye(3), (n, 1, 1)), xyz)      # 1 m steps along x
    steps = np.tile(np.eye(4), (n - 1, 1, 1))
    steps[:, 0, 3] = 1.0
    steps[:5, 1, 3] = 0.3                      # a lateral error in the first half only ...
    steps[5:, 1, 3] = 0.1                      # ... and a smaller one in the second
    steps[7, :3, :3] = rpy_to_rot(0.0, 0.0, np.deg2rad(2.0))
    late = metrics.late_step_errors(gt, chain_relative(steps))
    assert late['steps'] == 5
    assert late['trans'] == pytest.approx(0.1, abs=1e-9)
    assert late['rot_deg'] == pytest.approx(2.0 / 5, abs=1e-9)
