"""The synthetic world: physical consistency, KITTI layout, determinism, trajectory mode."""
import hashlib
from pathlib import Path

import numpy as np
import pytest

from mm_fusion_ros.cli import synth_kitti
from mm_fusion_ros.geometry import (
    make_pose,
    rot_to_rpy,
    rpy_to_rot,
    so3_exp,
    so3_log,
)
from mm_fusion_ros.kitti.checks import check_sequence
from mm_fusion_ros.kitti.odometry import KittiSequence, read_poses, read_times
from mm_fusion_ros.kitti.raw import OXTS_INDEX, read_oxts_folder
from mm_fusion_ros.synthetic.camera import Camera, camera_pose, CameraModel, kitti_calib
from mm_fusion_ros.synthetic.imu import (
    imu_sample_times,
    ImuNoise,
    kitti_T_velo_imu,
    sequence_epoch_ns,
    synthesize_oxts,
)
from mm_fusion_ros.synthetic.lidar import Lidar, LidarConfig
from mm_fusion_ros.synthetic.trajectory import DriveConfig, synthesize_drive, Trajectory
from mm_fusion_ros.synthetic.world import build_world
from mm_fusion_ros.synthetic.writer import generate_sequence

SMALL = dict(image_size=(320, 96), azimuth_steps=1000)
ACCEL = [OXTS_INDEX[n] for n in ('ax', 'ay', 'az')]
GYRO = [OXTS_INDEX[n] for n in ('wx', 'wy', 'wz')]

NO_NOISE = ImuNoise(0.0, 0.0, 0.0, 0.0, 0.0, 0.0)


def _drive_and_world(seed=0, seq=0, duration=12.0):
    traj, route = synthesize_drive(np.random.default_rng([seed, seq, 0]), duration)
    return traj, build_world(route, np.random.default_rng([seed, seq, 1]))


def _tree_digest(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob('*')) if p.is_file()}


@pytest.fixture(scope='module')
def small_sequence(tmp_path_factory):
    root = tmp_path_factory.mktemp('synth')
    summary = generate_sequence(root, '04', 10, seed=3, **SMALL)
    return root, summary


def test_calib_is_kitti_00_and_scales_with_the_image():
    full = kitti_calib()
    assert full.P[0][0, 0] == pytest.approx(718.856)
    assert full.P[2][0, 3] == pytest.approx(45.38225, abs=1e-6)
    assert full.P[1][0, 3] == pytest.approx(-386.1448, abs=1e-6)
    assert np.abs(full.Tr[:3, :3] @ full.Tr[:3, :3].T - np.eye(3)).max() < 1e-12
    # Camera z = velodyne x, camera x = -velodyne y, camera y = -velodyne z.
    assert full.Tr[2, 0] > 0.999 and full.Tr[0, 1] < -0.999 and full.Tr[1, 2] < -0.999
    small = kitti_calib(320, 96)
    assert small.P[2][0, 0] == pytest.approx(718.856 * 320 / 1241)
    # Each camera keeps its metric offset from cam0 whatever the image size.
    np.testing.assert_allclose(small.T_cam2_velo, full.T_cam2_velo, atol=1e-12)


def test_lidar_points_land_on_the_rendered_surfaces():
    traj, world = _drive_and_world(seed=1)
    calib = kitti_calib(320, 96)
    camera = Camera(CameraModel.from_calib(calib, 320, 96))
    pose = traj.poses(4.0)[0]
    points = Lidar(LidarConfig(azimuth_steps=1000)).scan(world, pose, np.random.default_rng(0))
    _, depth = camera.render(world, camera_pose(pose, calib))
    xyz1 = np.c_[points[:, :3], np.ones(len(points))]
    uvw = xyz1 @ (calib.P[2] @ calib.Tr).T
    front = uvw[:, 2] > 2.0
    u, v, w = uvw[front, 0] / uvw[front, 2], uvw[front, 1] / uvw[front, 2], uvw[front, 2]
    inside = (u >= 0) & (u < 319) & (v >= 0) & (v < 95)
    u, v, w = u[inside], v[inside], w[inside]
    assert len(w) > 3000, 'too few LiDAR points in the camera view to compare'
    # The surface depth at a sub-pixel position lies between the depths of the four pixel
    # centres around it (where the surface is continuous there).
    i0, j0 = np.floor(v).astype(int), np.floor(u).astype(int)
    corners = np.stack([depth[i0, j0], depth[i0 + 1, j0], depth[i0, j0 + 1],
                        depth[i0 + 1, j0 + 1]])
    tol = np.maximum(0.08, 0.01 * w)
    ok = (w >= corners.min(axis=0) - tol) & (w <= corners.max(axis=0) + tol)
    assert ok.mean() > 0.9, f'only {ok.mean():.1%} of points match the rendered depth'


def test_full_resolution_scan_has_kitti_like_point_count():
    traj, world = _drive_and_world(seed=2, seq=5)
    lidar = Lidar()  # the defaults: 64 beams x 2000 azimuth steps, 120 m
    points = lidar.scan(world, traj.poses(2.0)[0], np.random.default_rng(0))
    assert 60_000 <= len(points) <= 130_000
    assert points.dtype == np.float32 and np.isfinite(points).all()
    rng_xy = np.linalg.norm(points[:, :3], axis=1)
    assert rng_xy.max() <= 120.1 and rng_xy.min() >= 0.9
    assert 0.0 <= points[:, 3].min() and points[:, 3].max() <= 1.0
    assert points[:, 3].std() > 0.05, 'reflectance should vary with the material'
    # Most downward beams hit the ground ~1.73 m below the sensor near the vehicle.
    near = (rng_xy < 8.0) & (points[:, 2] < -1.0)
    assert abs(np.median(points[near, 2]) + 1.73) < 0.1


def test_gyro_integrates_to_the_ground_truth_rotation():
    rng = np.random.default_rng(7)
    traj, _ = synthesize_drive(rng, 30.0, DriveConfig(stop_probability=0.0))
    t = imu_sample_times(30.0)
    T_velo_imu = kitti_T_velo_imu()
    fields = synthesize_oxts(traj, t, T_velo_imu, rng, ImuNoise())
    rot_imu = traj.poses(t)[:, :3, :3] @ T_velo_imu[:3, :3]
    est = rot_imu[0].copy()
    gyro = fields[:, GYRO]
    for k in range(len(t) - 1):
        est = est @ so3_exp(0.5 * (gyro[k] + gyro[k + 1]) * (t[k + 1] - t[k]))
    true_yaw_change = rot_to_rpy(rot_imu[-1])[2] - rot_to_rpy(rot_imu[0])[2]
    est_yaw_change = rot_to_rpy(est)[2] - rot_to_rpy(rot_imu[0])[2]
    assert abs(np.angle(np.exp(1j * true_yaw_change))) > 0.2, 'the drive should turn'
    assert abs(np.angle(np.exp(1j * (est_yaw_change - true_yaw_change)))) < 0.02
    assert np.linalg.norm(so3_log(est.T @ rot_imu[-1])) < 0.03
    # The OXTS attitude and velocity fields are the trajectory's own.
    roll, pitch, yaw = rot_to_rpy(rot_imu)
    assert np.abs(np.angle(np.exp(1j * (fields[:, OXTS_INDEX['yaw']] - yaw)))).max() < 1e-9
    speed = np.linalg.norm(traj.kinematics(t).vel, axis=1)
    vf = fields[:, OXTS_INDEX['vf']]
    assert np.abs(vf - speed).max() < 0.05 and 5.0 < np.median(vf) < 15.0
    # lat/lon move as the OXTS unit does: ~111.2 km per degree of latitude at 49 deg north.
    imu_xy = traj.poses(t)[:, :2, :] @ T_velo_imu[:, 3]
    north = (fields[:, OXTS_INDEX['lat']] - fields[0, OXTS_INDEX['lat']]) * 111_220.0
    east = (fields[:, OXTS_INDEX['lon']] - fields[0, OXTS_INDEX['lon']]) * 111_320.0 \
        * np.cos(np.radians(fields[0, OXTS_INDEX['lat']]))
    moved = imu_xy - imu_xy[0]
    assert np.linalg.norm(moved[-1]) > 100.0
    np.testing.assert_allclose(np.stack([east, north], axis=1), moved,
                               atol=0.005 * np.linalg.norm(moved[-1]))


def test_specific_force_is_gravity_at_rest():
    tilt = rpy_to_rot(0.03, -0.05, 1.2)
    pose = make_pose(tilt, [3.0, -2.0, 1.73])
    still = Trajectory(np.arange(0.0, 6.0, 0.5), np.repeat(pose[None], 12, axis=0))
    t = imu_sample_times(5.0)
    T_velo_imu = kitti_T_velo_imu()
    fields = synthesize_oxts(still, t, T_velo_imu, np.random.default_rng(0), ImuNoise())
    accel, gyro = fields[:, ACCEL], fields[:, GYRO]
    assert np.linalg.norm(accel, axis=1).mean() == pytest.approx(9.81, abs=0.03)
    expected = (tilt @ T_velo_imu[:3, :3]).T @ np.array([0.0, 0.0, 9.81])
    np.testing.assert_allclose(accel.mean(axis=0), expected, atol=0.06)
    assert np.abs(gyro.mean(axis=0)).max() < 2e-3
    assert accel.std(axis=0).min() > 0.02, 'accelerometer white noise missing'


def test_a_stop_in_the_speed_profile_reads_gravity_only():
    traj, _ = synthesize_drive(np.random.default_rng(11), 40.0, DriveConfig(stop_probability=1.0))
    t = imu_sample_times(40.0)
    speed = np.linalg.norm(traj.kinematics(t).vel, axis=1)
    stopped = speed < 1e-3
    assert stopped.sum() > 100 and speed.max() > 5.0
    fields = synthesize_oxts(traj, t, kitti_T_velo_imu(), np.random.default_rng(0), NO_NOISE)
    np.testing.assert_allclose(np.linalg.norm(fields[stopped][:, ACCEL], axis=1), 9.81,
                               atol=2e-3)
    assert np.abs(fields[stopped][:, GYRO]).max() < 1e-3


def test_sequence_layout_counts_and_poses(small_sequence):
    root, summary = small_sequence
    seq_dir = root / 'sequences' / '04'
    times = read_times(seq_dir / 'times.txt')
    poses = read_poses(root / 'poses' / '04.txt')
    pngs = sorted((seq_dir / 'image_2').glob('*.png'))
    bins = sorted((root / 'pointclouds' / 'sequences' / '04' / 'velodyne').glob('*.bin'))
    assert len(times) == len(poses) == len(pngs) == len(bins) == summary.frames == 10
    assert [p.name for p in pngs] == [f'{k:06d}.png' for k in range(10)]
    assert times[0] == 0.0 and np.all(np.abs(np.diff(times) - 0.1) <= 0.0031)
    rot = poses[:, :3, :3]
    assert np.abs(rot @ rot.transpose(0, 2, 1) - np.eye(3)).max() < 1e-9
    np.testing.assert_allclose(poses[0], np.eye(4), atol=1e-12)
    step = np.linalg.norm(np.diff(poses[:, :3, 3], axis=0), axis=1)
    assert np.all(step < 1.6) and step.sum() > 0.3  # urban speeds, moving
    stamps, fields = read_oxts_folder(seq_dir / 'oxts')
    assert stamps[0] == sequence_epoch_ns('04')  # clock rule: times.txt's zero
    assert np.all(np.diff(stamps) == 10_000_000)
    assert (stamps[-1] - stamps[0]) * 1e-9 >= times[-1] and len(stamps) == summary.imu_samples
    assert fields.shape[1] == 30 and (seq_dir / 'oxts' / 'dataformat.txt').is_file()
    # The package's own reader sees a complete, consistent sequence.
    seq = KittiSequence(root, '04')
    report = check_sequence(seq, need_imu=True)
    assert report.ok, report.problems
    assert seq.load_image(0).shape == (96, 320, 3)
    np.testing.assert_allclose(seq.T_base_imu, kitti_T_velo_imu(), atol=1e-6)
    imu = seq.imu
    assert imu.stamps[0] == 0.0 and imu.stamps[-1] >= times[-1]


def test_same_seed_gives_byte_identical_files(small_sequence, tmp_path):
    root, _ = small_sequence
    again = tmp_path / 'again'
    generate_sequence(again, '04', 10, seed=3, workers=2, **SMALL)  # and in other processes
    first, second = _tree_digest(root), _tree_digest(again)
    assert len(first) > 100 and first == second


def test_sequences_and_seeds_build_different_worlds(small_sequence, tmp_path):
    _, world_a = _drive_and_world(seed=0, seq=0)
    _, world_b = _drive_and_world(seed=0, seq=1)
    _, world_c = _drive_and_world(seed=1, seq=0)
    assert len(world_a.prims) > 50
    for other in (world_b, world_c):
        assert len(other.prims) != len(world_a.prims) or \
            not np.allclose(other.prims.center, world_a.prims.center)
    root, _ = small_sequence
    generate_sequence(tmp_path, '05', 10, seed=3, images=False, scans=False, **SMALL)
    assert not (tmp_path / 'sequences' / '05' / 'image_2').exists()
    assert not np.allclose(read_poses(tmp_path / 'poses' / '05.txt'),
                           read_poses(root / 'poses' / '04.txt'))


def test_trajectory_follows_real_kitti_07(kitti_sample, tmp_path):
    source = kitti_sample / 'poses' / '07.txt'
    summary = generate_sequence(tmp_path, '07', 8, seed=0, trajectory=source, **SMALL)
    written = read_poses(tmp_path / 'poses' / '07.txt')
    np.testing.assert_allclose(written, read_poses(source)[:8], atol=1e-6)
    times = read_times(tmp_path / 'sequences' / '07' / 'times.txt')
    np.testing.assert_allclose(times, read_times(kitti_sample / 'sequences' / '07'
                                                 / 'times.txt')[:8], atol=1e-6)
    assert summary.points[0] > 20_000  # the scene is built along the real route


def test_cli_writes_and_refuses_to_overwrite(tmp_path, capsys):
    args = ['--out', str(tmp_path), '--sequences', '2', '--frames', '3', '--image_width', '64',
            '--image_height', '24', '--azimuth_steps', '200', '--beams', '16']
    assert synth_kitti.main(args) == 0
    out = capsys.readouterr().out
    assert 'wrote 1 sequence' in out and '02' in out
    assert (tmp_path / 'sequences' / '02' / 'image_2' / '000002.png').is_file()
    assert synth_kitti.main(args) == 1
    assert 'overwrite' in capsys.readouterr().err
    assert synth_kitti.main(args + ['--overwrite']) == 0
    with pytest.raises(SystemExit):
        synth_kitti.main(['--out', str(tmp_path), '--sequences', 'x1'])


def test_a_run_that_fails_half_way_leaves_a_sequence_every_reader_refuses(tmp_path,
                                                                          monkeypatch):
    """times.txt and the poses are written last: a run that stops at frame 3 of 6 (here an
    exception; a kill is the same) does not leave a sequence that looks whole with frames
    missing, which check_sequence would pass with frame-level problems only."""
    kwargs = dict(frames=6, image_size=(64, 24), azimuth_steps=100, beams=8, workers=1)
    scan, calls = Lidar.scan, []

    def fail_at_frame_3(self, *args):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError('simulated crash at frame 3')
        return scan(self, *args)

    monkeypatch.setattr(Lidar, 'scan', fail_at_frame_3)
    with pytest.raises(RuntimeError, match='simulated crash'):
        generate_sequence(tmp_path, '00', **kwargs)
    assert (tmp_path / 'sequences' / '00' / 'calib.txt').is_file()
    assert not (tmp_path / 'sequences' / '00' / 'times.txt').exists()
    assert not (tmp_path / 'poses' / '00.txt').exists()
    with pytest.raises(FileNotFoundError, match='times.txt'):
        KittiSequence(tmp_path, '00')


@pytest.mark.parametrize('kwargs, message', [
    (dict(frames=1), 'frames'),
    (dict(frames=4, imu_source='imus/00.mat'), 'imu_source'),
    (dict(frames=4, image_size=(4, 4)), 'image_size'),
    (dict(frames=4, sequence='a'), 'sequence id'),
])
def test_bad_arguments_are_named(tmp_path, kwargs, message):
    args = dict(sequence='00', seed=0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        generate_sequence(tmp_path, args.pop('sequence'), args.pop('frames'), **args)
