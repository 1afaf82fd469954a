"""Hybrid sequences: synthetic images and scans along real KITTI 07, carrying 07's real IMU."""
from pathlib import Path
import shutil

from conftest import KITTI_SAMPLE
import numpy as np
import pytest

from mm_fusion_ros.cli import synth_kitti
from mm_fusion_ros.geometry import rot_to_rpy, so3_exp, so3_log
from mm_fusion_ros.kitti.checks import check_sequence
from mm_fusion_ros.kitti.imu import read_mat_imu
from mm_fusion_ros.kitti.odometry import KittiSequence, read_poses, read_times
from mm_fusion_ros.kitti.raw import OXTS_INDEX, read_oxts_folder
from mm_fusion_ros.synthetic.camera import Camera, camera_pose, CameraModel
from mm_fusion_ros.synthetic.imu import sequence_epoch_ns
from mm_fusion_ros.synthetic.trajectory import load_kitti_trajectory, route_from_poses
from mm_fusion_ros.synthetic.writer import generate_sequence, sequence_world

# 60 frames hold 07's whole first left turn (1.66 rad); the real IMU and ground truth disagree by
# up to 0.035 rad mid-turn (real timing), but by 0.005 rad once it is complete.
FRAMES = 60
SAMPLES = 10 * (FRAMES - 1) + 1
SIZE = (320, 96)
SMALL = dict(image_size=SIZE, azimuth_steps=1000)


def _sample(*parts) -> Path:
    path = KITTI_SAMPLE.joinpath(*parts)
    if not path.is_file():
        raise FileNotFoundError(f'{path}: the shared real KITTI sample is required')
    return path


POSES_07 = _sample('poses', '07.txt')
TIMES_07 = _sample('sequences', '07', 'times.txt')
IMU_07 = _sample('imu', '07.mat')


@pytest.fixture(scope='module')
def hybrid(tmp_path_factory):
    root = tmp_path_factory.mktemp('hybrid')
    summary = generate_sequence(root, '07', FRAMES, seed=0, trajectory=POSES_07,
                                imu_source=IMU_07, **SMALL)
    return root, summary, KittiSequence(root, '07')


def _source_imu():
    """The real IMU as the reader gives it, cut to the written frames."""
    full = read_mat_imu(IMU_07, read_times(TIMES_07))
    return full.stamps[:SAMPLES], full.accel[:SAMPLES], full.gyro[:SAMPLES]


def test_written_imu_is_the_real_imu_on_the_frames_clock(hybrid):
    root, summary, seq = hybrid
    imu = seq.imu  # what every reader and the bag converter take
    assert imu.source == str(root / 'sequences' / '07' / 'oxts')
    stamps, accel, gyro = _source_imu()
    assert len(imu) == summary.imu_samples == SAMPLES
    np.testing.assert_allclose(imu.accel, accel, rtol=0, atol=1e-9)
    np.testing.assert_allclose(imu.gyro, gyro, rtol=0, atol=1e-9)
    np.testing.assert_allclose(imu.stamps, stamps, rtol=0, atol=1e-9)
    # Clock rule: the first OXTS stamp is frame 0's time, and sample 10*k sits at frame k.
    assert imu.stamps[0] == 0.0 and imu.t0_ns == sequence_epoch_ns('07')
    np.testing.assert_allclose(imu.stamps[::10], seq.times, rtol=0, atol=1e-9)
    assert np.abs(np.linalg.norm(imu.accel, axis=1).mean() - 9.8) < 0.3  # gravity included
    assert summary.imu == f'real, from {IMU_07}'
    assert str(IMU_07) in (root / 'sequences' / '07' / 'oxts' / 'source.txt').read_text()
    assert not (root / 'imus').exists(), 'the OXTS folder is the one copy of the IMU'
    report = check_sequence(seq, need_imu=True)
    assert report.ok, report.problems


def test_navigation_fields_come_from_the_ground_truth(hybrid):
    root, _, seq = hybrid
    _, fields = read_oxts_folder(root / 'sequences' / '07' / 'oxts')
    rot_imu = seq.poses_base[:, :3, :3] @ seq.T_base_imu[:3, :3]
    yaw_error = fields[::10, OXTS_INDEX['yaw']] - rot_to_rpy(rot_imu)[2]
    assert np.abs(np.angle(np.exp(1j * yaw_error))).max() < 1e-6
    speed = np.linalg.norm(np.diff(seq.poses_base[:, :3, 3], axis=0), axis=1) \
        / np.diff(seq.times)
    vf = fields[::10, OXTS_INDEX['vf']]
    assert vf.max() > 5.0 and np.abs(vf[1:-1] - speed[1:]).max() < 0.5  # 07 starts slowly
    # af..au are the measured ax..az rotated into the level frame (same magnitude).
    level = fields[:, [OXTS_INDEX[n] for n in ('af', 'al', 'au')]]
    np.testing.assert_allclose(np.linalg.norm(level, axis=1),
                               np.linalg.norm(seq.imu.accel, axis=1), rtol=1e-9)


def test_poses_and_times_are_real_07(hybrid):
    root, _, seq = hybrid
    np.testing.assert_allclose(read_poses(root / 'poses' / '07.txt'),
                               read_poses(POSES_07)[:FRAMES], atol=1e-6)
    np.testing.assert_allclose(seq.times, read_times(TIMES_07)[:FRAMES], atol=1e-9)


def test_scan_and_image_are_rendered_at_the_real_pose(hybrid):
    _, _, seq = hybrid
    _, poses, _ = load_kitti_trajectory(POSES_07, FRAMES, seq.calib.Tr)
    world = sequence_world('07', 0, route_from_poses(poses))
    camera = Camera(CameraModel.from_calib(seq.calib, *SIZE))
    k = 30  # mid-turn
    image, points = seq.load_image(k), seq.load_scan(k)
    matches = {}
    for at in (k, k - 3):  # the written pose, and a control 3 frames earlier
        rgb, depth = camera.render(world, camera_pose(seq.poses_base[at], seq.calib))
        matches[at] = ((rgb == image).all(axis=-1).mean(), _depth_agreement(points, depth, seq))
    assert matches[k][0] > 0.99, 'image k is not the view from pose k'
    assert matches[k][1] > 0.9, f'only {matches[k][1]:.1%} of scan k lies on the view from pose k'
    assert matches[k - 3][0] < 0.5 and matches[k - 3][1] < 0.5, matches


def _depth_agreement(points, depth, seq):
    """Share of the scan's points (in camera 2's view) whose depth matches the rendered depth
    between the four pixel centres around them (test_synthetic's projection check)."""
    height, width = depth.shape
    uvw = np.c_[points[:, :3], np.ones(len(points))] @ (seq.calib.P[2] @ seq.calib.Tr).T
    front = uvw[:, 2] > 2.0
    u, v, w = uvw[front, 0] / uvw[front, 2], uvw[front, 1] / uvw[front, 2], uvw[front, 2]
    inside = (u >= 0) & (u < width - 1) & (v >= 0) & (v < height - 1)
    u, v, w = u[inside], v[inside], w[inside]
    assert len(w) > 3000, 'too few LiDAR points in the camera view to compare'
    i0, j0 = np.floor(v).astype(int), np.floor(u).astype(int)
    corners = np.stack([depth[i0, j0], depth[i0 + 1, j0], depth[i0, j0 + 1],
                        depth[i0 + 1, j0 + 1]])
    tol = np.maximum(0.08, 0.01 * w)
    return float(((w >= corners.min(axis=0) - tol) & (w <= corners.max(axis=0) + tol)).mean())


def test_gyro_heading_matches_the_ground_truth(hybrid):
    _, _, seq = hybrid
    imu, poses = seq.imu, seq.poses_base
    gyro_base = imu.gyro @ seq.T_base_imu[:3, :3].T
    rot = np.eye(3)
    for j in range(len(imu) - 1):
        rot = rot @ so3_exp(0.5 * (gyro_base[j] + gyro_base[j + 1])
                            * (imu.stamps[j + 1] - imu.stamps[j]))
    truth = poses[0, :3, :3].T @ poses[-1, :3, :3]
    true_yaw = so3_log(truth)[2]
    assert true_yaw > 1.5, 'the 60 frames should hold the whole left turn'
    assert abs(so3_log(rot)[2] - true_yaw) < 0.02
    assert np.linalg.norm(so3_log(rot.T @ truth)) < 0.03
    # Frame by frame, the gyro's yaw rate follows the poses'.
    rel = np.swapaxes(poses[:-1, :3, :3], -1, -2) @ poses[1:, :3, :3]
    true_rate = so3_log(rel)[:, 2] / np.diff(seq.times)
    mid = 0.5 * (gyro_base[1:, 2] + gyro_base[:-1, 2]) * np.diff(imu.stamps)
    gyro_rate = mid.reshape(FRAMES - 1, 10).sum(axis=1) / np.diff(seq.times)
    assert np.corrcoef(true_rate, gyro_rate)[0, 1] > 0.98


def test_ten_hz_clock_when_no_times_file(tmp_path):
    """A pose file without times.txt beside it: frames at 10 Hz, and the IMU on that clock."""
    poses = tmp_path / 'traj' / 'poses' / '07.txt'
    poses.parent.mkdir(parents=True)
    shutil.copy(POSES_07, poses)
    summary = generate_sequence(tmp_path / 'out', '07', 4, trajectory=poses, imu_source=IMU_07,
                                images=False, scans=False, **SMALL)
    imu = KittiSequence(tmp_path / 'out', '07').imu
    np.testing.assert_allclose(imu.stamps, np.arange(31) / 100.0, rtol=0, atol=1e-9)
    np.testing.assert_allclose(imu.gyro, _source_imu()[2][:31], rtol=0, atol=1e-9)
    assert '10 Hz' in summary.trajectory


@pytest.mark.parametrize('case, error, message', [
    ('no trajectory', ValueError, 'needs trajectory'),
    ('IMU of 04 (2701 samples)', ValueError, r'04\.mat.* does not fit .*07\.txt'),
    ('IMU of 06 (same length)', ValueError, r'06\.mat does not follow .*07\.txt'),
    ('pose file cut to 30 lines', ValueError, r'07\.mat.* does not fit .*10 Hz'),
    ('missing .mat', FileNotFoundError, r'nope\.mat'),
])
def test_bad_imu_source_is_refused_before_writing(tmp_path, case, error, message):
    trajectory, imu_source = {
        'no trajectory': (None, IMU_07),
        'IMU of 04 (2701 samples)': (POSES_07, _sample('imu', '04.mat')),
        'IMU of 06 (same length)': (POSES_07, _sample('imu', '06.mat')),
        'pose file cut to 30 lines': (_cut_poses(tmp_path, 30), IMU_07),
        'missing .mat': (POSES_07, tmp_path / 'nope.mat'),
    }[case]
    out = tmp_path / 'out'
    with pytest.raises(error, match=message):
        generate_sequence(out, '07', 20, trajectory=trajectory, imu_source=imu_source, **SMALL)
    assert not out.exists(), 'a refused input must leave no files behind'


def _cut_poses(tmp_path, lines):
    path = tmp_path / 'cut' / 'poses' / '07.txt'
    path.parent.mkdir(parents=True)
    path.write_text(''.join(POSES_07.read_text().splitlines(keepends=True)[:lines]))
    return path


def test_cli_hybrid_summary_and_errors(tmp_path, capsys):
    base = ['--out', str(tmp_path), '--sequences', '07', '--frames', '3', '--image_width', '64',
            '--image_height', '24', '--azimuth_steps', '200', '--beams', '16']
    assert synth_kitti.main(base + ['--trajectory', str(POSES_07),
                                    '--imu_source', str(IMU_07)]) == 0
    assert f'IMU: real, from {IMU_07}' in capsys.readouterr().out
    with pytest.raises(SystemExit):
        synth_kitti.main(base + ['--imu_source', str(IMU_07)])
    assert '--imu_source' in capsys.readouterr().err
    wrong = ['--trajectory', str(POSES_07), '--imu_source', str(_sample('imu', '04.mat'))]
    assert synth_kitti.main(base + ['--overwrite'] + wrong) == 1
    assert '04.mat' in capsys.readouterr().err
    assert '--imu_source' in synth_kitti.build_parser().format_help()
