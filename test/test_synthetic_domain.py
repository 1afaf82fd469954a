"""Domain options of the synthetic world: each changes what it should and nothing else, and the
written calibration stays consistent with what is rendered."""
import dataclasses
import hashlib
from pathlib import Path

from conftest import KITTI_SAMPLE
import numpy as np
import pytest
from scipy.spatial import cKDTree

from mm_fusion_ros.cli import synth_kitti
from mm_fusion_ros.geometry import invert_pose
from mm_fusion_ros.kitti.checks import check_sequence
from mm_fusion_ros.kitti.imu import read_mat_imu
from mm_fusion_ros.kitti.odometry import KittiSequence, read_poses, read_times
from mm_fusion_ros.synthetic.camera import Camera, camera_pose, CameraModel, kitti_calib
from mm_fusion_ros.synthetic.domain import DomainConfig
from mm_fusion_ros.synthetic.imu import kitti_T_velo_imu
from mm_fusion_ros.synthetic.lidar import beam_elevations, Lidar, LidarConfig
from mm_fusion_ros.synthetic.raycast import _prism_geometry, intersect
from mm_fusion_ros.synthetic.trajectory import (
    load_kitti_trajectory,
    route_from_poses,
    synthesize_drive,
)
from mm_fusion_ros.synthetic.world import (
    BOX,
    build_world,
    CAR,
    FACADE,
    FOLIAGE,
    HOUSE,
    PRISM,
    ROOF,
)
from mm_fusion_ros.synthetic.writer import generate_sequence, mount_lidar, sequence_world

SIZE = (320, 96)
SMALL = dict(image_size=SIZE, azimuth_steps=600)


def _digest(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob('*')) if p.is_file()}


def _changed(a: Path, b: Path) -> set:
    da, db = _digest(a), _digest(b)
    assert da.keys() == db.keys()
    return {k for k in da if da[k] != db[k]}


def _world(seed=1, seq=0, scene='street'):
    traj, route = synthesize_drive(np.random.default_rng([seed, seq, 0]), 12.0)
    return traj, build_world(route, np.random.default_rng([seed, seq, 1]), scene)


def depth_agreement(points, depth, calib):
    """Share of the scan's points in camera 2's view whose depth lies between the rendered
    depths of the four pixel centres around them (test_synthetic's projection check)."""
    height, width = depth.shape
    uvw = np.c_[points[:, :3], np.ones(len(points))] @ (calib.P[2] @ calib.Tr).T
    front = uvw[:, 2] > 2.0
    u, v, w = uvw[front, 0] / uvw[front, 2], uvw[front, 1] / uvw[front, 2], uvw[front, 2]
    inside = (u >= 0) & (u < width - 1) & (v >= 0) & (v < height - 1)
    u, v, w = u[inside], v[inside], w[inside]
    assert len(w) > 1500, f'too few LiDAR points ({len(w)}) in the camera view to compare'
    i0, j0 = np.floor(v).astype(int), np.floor(u).astype(int)
    corners = np.stack([depth[i0, j0], depth[i0 + 1, j0], depth[i0, j0 + 1],
                        depth[i0 + 1, j0 + 1]])
    tol = np.maximum(0.08, 0.01 * w)
    return float(((w >= corners.min(axis=0) - tol) & (w <= corners.max(axis=0) + tol)).mean())


def _ground_fit(points, mount):
    """Ground points (picked in the vehicle frame, within 15 m) and the plane z = a x + b y + c
    fitted to them in the sensor frame."""
    veh = points[:, :3] @ mount[:3, :3].T + mount[:3, 3]
    ground = (np.linalg.norm(veh[:, :2], axis=1) < 15.0) & (np.abs(veh[:, 2] + 1.73) < 0.15)
    p = points[ground]
    coef, *_ = np.linalg.lstsq(np.c_[p[:, 0], p[:, 1], np.ones(len(p))], p[:, 2], rcond=None)
    return p, coef


# -- LiDAR mount -------------------------------------------------------------------------------
def test_lidar_height_and_pitch_show_in_the_ground():
    traj, world = _world()
    lidar = Lidar(LidarConfig(azimuth_steps=600))
    vehicle = traj.poses(4.0)[0]
    for height, pitch in ((1.73, 0.0), (1.2, 0.0), (1.73, 5.0), (2.2, -4.0)):
        mount = DomainConfig(lidar_height=height, lidar_pitch_deg=pitch).T_vehicle_lidar()
        points = lidar.scan(world, vehicle @ mount, np.random.default_rng(0))
        if pitch == 0.0:  # the ground lies lidar_height below the sensor
            r = np.linalg.norm(points[:, :2], axis=1)
            near = (r < 8.0) & (points[:, 2] < -0.7 * height)
            assert abs(np.median(points[near, 2]) + height) < 0.05, (height, pitch)
        ground, (a, b, c) = _ground_fit(points, mount)
        assert len(ground) > 5000
        # Pitched down by p, the road ahead rises in the scan with slope tan(p).
        assert np.degrees(np.arctan(a)) == pytest.approx(pitch, abs=0.2), (height, pitch)
        assert abs(b) < 0.005 and c == pytest.approx(-height, abs=0.05)


def test_mounted_lidar_lands_on_the_rendered_surfaces():
    """The calibration mount_lidar returns is the one the scans and images are rendered with."""
    traj, world = _world(seed=2)
    vehicle_calib = kitti_calib(*SIZE)
    camera = Camera(CameraModel.from_calib(vehicle_calib, *SIZE))
    vehicle = traj.poses(np.array([3.0]))
    mount = DomainConfig(lidar_height=1.3, lidar_pitch_deg=6.0).T_vehicle_lidar()
    calib, T_lidar_imu, lidar_poses = mount_lidar(vehicle_calib, kitti_T_velo_imu(), vehicle,
                                                  mount)
    np.testing.assert_allclose(lidar_poses[0] @ T_lidar_imu, vehicle[0] @ kitti_T_velo_imu(),
                               atol=1e-12)  # the IMU stays where it was on the vehicle
    points = Lidar(LidarConfig(azimuth_steps=1000)).scan(world, lidar_poses[0],
                                                        np.random.default_rng(0))
    rgb, depth = camera.render(world, camera_pose(lidar_poses[0], calib))
    rgb0, _ = camera.render(world, camera_pose(vehicle[0], vehicle_calib))
    assert (rgb == rgb0).all(axis=-1).mean() > 0.999, 'the camera must not move with the LiDAR'
    assert depth_agreement(points, depth, calib) > 0.9
    # Control: the KITTI calibration does not fit the mounted LiDAR's scan.
    assert depth_agreement(points, depth, vehicle_calib) < 0.5


@pytest.fixture(scope='module')
def default_and_mounted(tmp_path_factory):
    root = tmp_path_factory.mktemp('mount')
    domain = DomainConfig(lidar_height=1.2, lidar_pitch_deg=5.0)
    generate_sequence(root / 'a', '04', 5, seed=3, **SMALL)
    summary = generate_sequence(root / 'b', '04', 5, seed=3, domain=domain, **SMALL)
    return root / 'a', root / 'b', domain, summary


def test_lidar_mount_changes_the_scans_and_calibration_only(default_and_mounted):
    a, b, domain, summary = default_and_mounted
    changed = _changed(a, b)
    scans = {k for k in changed if '/velodyne/' in k}
    assert len(scans) == 5
    # Images, times and the IMU are the vehicle's; the cam0 poses are the camera's own motion
    # (their text may differ in the last digit: they are computed through the new Tr).
    calibration = {'sequences/04/calib.txt', 'sequences/04/calib_imu_to_velo.txt'}
    assert calibration <= changed - scans <= calibration | {'poses/04.txt'}
    np.testing.assert_allclose(read_poses(b / 'poses' / '04.txt'),
                               read_poses(a / 'poses' / '04.txt'), rtol=0, atol=1e-12)
    sa, sb = KittiSequence(a, '04'), KittiSequence(b, '04')
    mount = domain.T_vehicle_lidar()
    np.testing.assert_allclose(sb.calib.Tr, sa.calib.Tr @ mount, atol=1e-11)
    np.testing.assert_allclose(sb.T_base_imu, invert_pose(mount) @ sa.T_base_imu, atol=1e-11)
    # base_link (= the LiDAR) moves as the mounted sensor does: T_odom_base = M^-1 V0^-1 V M.
    np.testing.assert_allclose(sb.poses_base, invert_pose(mount) @ sa.poses_base @ mount,
                               atol=1e-9)
    # ... and the IMU frame derived from either tree is the same physical frame.
    np.testing.assert_allclose(mount @ sb.poses_base @ sb.T_base_imu,
                               sa.poses_base @ sa.T_base_imu, atol=1e-9)
    assert check_sequence(sb, need_imu=True).ok
    assert summary.domain == {'lidar_height': 1.2, 'lidar_pitch_deg': 5.0}


def test_fewer_beams_keep_the_vertical_field_of_view():
    hdl64 = np.degrees(beam_elevations(LidarConfig()))
    for beams in (32, 16):
        deg = np.degrees(beam_elevations(LidarConfig(beams=beams)))
        assert len(np.unique(deg)) == beams and np.all(np.diff(deg) < 0)
        assert deg[0] == pytest.approx(hdl64[0]) and deg[-1] == pytest.approx(hdl64[-1])
    hdl32 = np.degrees(beam_elevations(LidarConfig(beams=32, top_deg=10.67, bottom_deg=-30.67)))
    np.testing.assert_allclose(np.diff(hdl32), -41.34 / 31, atol=1e-9)  # HDL-32E: 1.33 deg
    # A 32-beam scan sees the ground as near and as far as the 64-beam one.
    traj, world = _world()
    pose = traj.poses(4.0)[0]
    scans = {b: Lidar(LidarConfig(beams=b, azimuth_steps=600)).scan(
        world, pose, np.random.default_rng(0)) for b in (64, 32)}
    elevation = {b: np.degrees(np.arctan2(p[:, 2], np.linalg.norm(p[:, :2], axis=1)))
                 for b, p in scans.items()}
    assert len(np.unique(np.round(elevation[32], 1))) <= 32 * 3  # 32 rings (plus range noise)
    assert len(scans[32]) == pytest.approx(len(scans[64]) / 2, rel=0.1)
    for b in (64, 32):
        assert elevation[b].min() == pytest.approx(-24.9, abs=0.2)
        ground_r = np.linalg.norm(scans[b][elevation[b] < -24.0, :2], axis=1)
        assert np.median(ground_r) == pytest.approx(1.73 / np.tan(np.radians(24.9)), abs=0.15)


# -- camera exposure and noise -----------------------------------------------------------------
def test_exposure_gamma_and_noise_of_the_camera():
    traj, world = _world(seed=4)
    calib = kitti_calib(*SIZE)
    model = CameraModel.from_calib(calib, *SIZE)
    pose = camera_pose(traj.poses(5.0)[0], calib)
    base, depth0 = Camera(model).render(world, pose)
    same, _ = Camera(model).render(world, pose, np.random.default_rng(0))
    assert (same == base).all(), 'no noise configured: the generator must not be used'

    dark, depth = Camera(model, exposure_ev=-1.0).render(world, pose)
    np.testing.assert_array_equal(depth, depth0)
    unsaturated = (base > 20) & (base < 235)
    ratio = dark[unsaturated].astype(float) / base[unsaturated]
    assert np.median(ratio) == pytest.approx(0.5, abs=0.02)
    bright, _ = Camera(model, exposure_ev=1.0).render(world, pose)
    assert bright.mean() > 1.5 * base.mean() and (bright == 255).mean() > (base == 255).mean()
    lifted, _ = Camera(model, gamma=2.2).render(world, pose)
    mid = (base > 30) & (base < 200)
    expected = 255.0 * (base[mid] / 255.0) ** (1 / 2.2)
    assert np.abs(lifted[mid] - expected).max() <= 1.5

    noisy = Camera(model, noise=4.0)
    with pytest.raises(ValueError, match='noise'):
        noisy.render(world, pose)
    n1, _ = noisy.render(world, pose, np.random.default_rng(7))
    n2, _ = noisy.render(world, pose, np.random.default_rng(7))
    n3, _ = noisy.render(world, pose, np.random.default_rng(8))
    assert (n1 == n2).all() and (n1 != n3).mean() > 0.5
    diff = n1.astype(float) - base
    grey = (base > 100) & (base < 150)
    assert abs(diff[grey].mean()) < 0.2
    assert diff[grey].std() == pytest.approx(4.0, rel=0.15)  # sigma at mid-grey
    dark_px = (base > 5) & (base < 40)
    assert diff[dark_px].std() < diff[grey].std()  # shot noise grows with the signal


def test_camera_options_change_only_the_images_and_repeat_per_seed(tmp_path,
                                                                    default_and_mounted):
    a = default_and_mounted[0]
    domain = DomainConfig(camera_exposure_ev=-0.7, camera_gamma=1.3, camera_noise=3.0)
    generate_sequence(tmp_path / 'c', '04', 5, seed=3, domain=domain, **SMALL)
    assert _changed(a, tmp_path / 'c') == {f'sequences/04/image_2/{k:06d}.png'
                                           for k in range(5)}
    # Same seed, same bytes, in one process or two.
    generate_sequence(tmp_path / 'd', '04', 5, seed=3, domain=domain, workers=2, **SMALL)
    assert _changed(tmp_path / 'c', tmp_path / 'd') == set()
    img_a = KittiSequence(a, '04').load_image(2).astype(float)
    img_c = KittiSequence(tmp_path / 'c', '04').load_image(2).astype(float)
    assert img_c.mean() < 0.85 * img_a.mean()


# -- the CLI -----------------------------------------------------------------------------------
def test_every_domain_field_is_a_flag_with_its_default_and_help():
    parser = synth_kitti.build_parser()
    defaults = vars(parser.parse_args([]))
    for f in dataclasses.fields(DomainConfig):
        assert defaults[f.name] == f.default, f.name
    text = parser.format_help().replace('\n', ' ')
    for f in dataclasses.fields(DomainConfig):
        assert f'--{f.name}' in text
    args = parser.parse_args(['--lidar_height', '1.4', '--camera_noise', '2'])
    assert (args.lidar_height, args.camera_noise) == (1.4, 2.0)


@pytest.mark.parametrize('flag, value', [('--lidar_height', '0.1'), ('--lidar_pitch_deg', '45'),
                                         ('--camera_gamma', '0'), ('--camera_noise', '-1'),
                                         ('--lidar_bottom_deg', '5')])
def test_bad_domain_values_are_named(tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit):
        synth_kitti.main(['--out', str(tmp_path), flag, value])
    assert flag in capsys.readouterr().err
    assert not (tmp_path / 'sequences').exists()


# -- combined with a real route, its real IMU and fewer beams ---------------------------------
POSES_07 = KITTI_SAMPLE / 'poses' / '07.txt'
IMU_07 = KITTI_SAMPLE / 'imu' / '07.mat'


def test_domain_combines_with_a_real_route_and_its_imu(tmp_path, capsys):
    frames = 12
    args = ['--out', str(tmp_path), '--sequences', '07', '--frames', str(frames),
            '--image_width', str(SIZE[0]), '--image_height', str(SIZE[1]),
            '--azimuth_steps', '1000', '--beams', '32', '--trajectory', str(POSES_07),
            '--imu_source', str(IMU_07), '--lidar_height', '1.9', '--lidar_pitch_deg', '3',
            '--camera_exposure_ev', '-0.5', '--camera_noise', '2']
    assert synth_kitti.main(args) == 0
    out = capsys.readouterr().out
    assert 'domain: lidar_height 1.9, lidar_pitch_deg 3.0' in out
    seq = KittiSequence(tmp_path, '07')
    assert check_sequence(seq, need_imu=True).ok
    # The cam0 poses are real 07's whatever the LiDAR mount, and the IMU is 07's real IMU.
    np.testing.assert_allclose(read_poses(tmp_path / 'poses' / '07.txt'),
                               read_poses(POSES_07)[:frames], atol=1e-6)
    real = read_mat_imu(IMU_07, read_times(KITTI_SAMPLE / 'sequences' / '07' / 'times.txt'))
    samples = 10 * (frames - 1) + 1
    np.testing.assert_allclose(seq.imu.gyro, real.gyro[:samples], rtol=0, atol=1e-9)
    # Scan k lies on the surfaces seen from where the written calibration puts the LiDAR.
    domain = DomainConfig(lidar_height=1.9, lidar_pitch_deg=3.0)
    mount = domain.T_vehicle_lidar()
    _, vehicle, _ = load_kitti_trajectory(POSES_07, frames, kitti_calib(*SIZE).Tr)
    world = sequence_world('07', 0, route_from_poses(vehicle), domain.scene)
    camera = Camera(CameraModel.from_calib(seq.calib, *SIZE))
    k = 8
    lidar_world = mount @ seq.poses_base[k]  # odom is the vehicle's frame 0 (KITTI: identity)
    np.testing.assert_allclose(lidar_world, vehicle[k] @ mount, atol=1e-6)
    _, depth = camera.render(world, camera_pose(lidar_world, seq.calib))
    points = seq.load_scan(k)
    assert depth_agreement(points, depth, seq.calib) > 0.9
    elevation = np.degrees(np.arctan2(points[:, 2], np.linalg.norm(points[:, :2], axis=1)))
    assert elevation.min() == pytest.approx(-24.9, abs=0.3)  # the sensor's own frame


# -- the suburban scene ------------------------------------------------------------------------
def _per_km(world, mask):
    return mask.sum() / ((world.route.s[-1] - world.route.s[0]) / 1000.0)


def _nearest_corner(world, idx):
    """Horizontal distance from the vehicle path to each primitive's nearest box corner."""
    tree = cKDTree(world.route.xy)
    corners = world.prims.corners(idx)[:, :, :2]
    return tree.query(corners.reshape(-1, 2))[0].reshape(len(corners), 8).min(axis=1)


def _behind_sidewalk(world, idx):
    """How far each primitive's nearest corner stands behind the back of the sidewalk (the
    property line) on its side of the road."""
    st = world.style
    _, near = cKDTree(world.route.xy).query(world.prims.center[idx, :2])
    side = np.sign(np.sum((world.prims.center[idx, :2] - world.route.xy[near])
                          * world.route.normal[near], axis=1))
    line = np.abs(st.road_center + side * st.road_half_width) + st.planting_strip \
        + st.sidewalk_width
    return _nearest_corner(world, idx) - line


def test_suburban_has_houses_set_back_more_vegetation_and_fewer_cars():
    worlds = {scene: _world(seed=6, scene=scene)[1] for scene in ('street', 'suburban')}
    street, suburb = worlds['street'], worlds['suburban']
    assert street.route.s[-1] == suburb.route.s[-1], 'one drive, two scenes'
    sp, bp = street.prims, suburb.prims
    assert _per_km(suburb, bp.material == CAR) < 0.5 * _per_km(street, sp.material == CAR)
    assert _per_km(suburb, bp.material == FOLIAGE) > 1.5 * _per_km(street, sp.material == FOLIAGE)
    assert not (bp.material == FACADE).any() and not (sp.material == HOUSE).any()
    roofs = bp.kind == PRISM
    assert roofs.sum() >= 20 and (bp.material[roofs] == ROOF).all()
    # Houses stand behind a front garden; city facades at the back of the sidewalk.
    houses = np.flatnonzero((bp.material == HOUSE) & (bp.half[:, 2] > 2.0))  # not garages
    gardens = _behind_sidewalk(suburb, houses)
    assert gardens.min() > 2.0 and np.median(gardens) > suburb.style.setback[0]
    assert np.median(_behind_sidewalk(street, np.flatnonzero(sp.material == FACADE))) < 3.0
    # Nothing stands on the road: boxes by their corners, round things by their radius.
    boxes = np.flatnonzero(bp.kind == BOX)
    assert _nearest_corner(suburb, boxes).min() > 1.0
    round_ = np.flatnonzero(bp.kind != BOX)
    dist = cKDTree(suburb.route.xy).query(bp.center[round_, :2])[0]
    assert (dist - bp.half[round_, 0]).min() > 1.0
    # The road carries no markings: its brightest texels are far darker than paint.
    ground = suburb.ground
    lateral = np.linspace(-2.5, 2.5, 200)
    xy = suburb.route.xy[400] + lateral[:, None] * suburb.route.normal[400]
    albedo, _ = ground.surface(xy[:, 0], xy[:, 1], np.zeros(len(xy), np.float32))
    assert albedo.max() < 0.7


def test_gable_roof_intersection_and_normals():
    world = build_world(synthesize_drive(np.random.default_rng(0), 5.0)[1],
                        np.random.default_rng(1), 'suburban')
    i = int(np.flatnonzero(world.prims.kind == PRISM)[0])
    prims = world.prims
    c, (hx, hy, hz), yaw = prims.center[i], prims.half[i], prims.yaw[i]
    rot = np.array([[np.cos(yaw), -np.sin(yaw)], [np.sin(yaw), np.cos(yaw)]])
    # Rays straight down at local y = -hy/2, 0, hy/2 and y = 0.9 hy: the roof height there.
    local_y = np.array([-0.5, 0.0, 0.5, 0.9]) * hy
    starts = c[:2] + (rot @ np.stack([np.full(4, 0.3 * hx), local_y]))[:, :].T
    down = np.zeros((3, 4), np.float32)
    down[2] = -1.0
    t = np.array([float(intersect(prims, i, np.r_[p, c[2] + 10.0], down[0, k:k + 1],
                                  down[1, k:k + 1], down[2, k:k + 1], 0.0)[0])
                  for k, p in enumerate(starts)])
    expected_z = c[2] + hz - 2.0 * hz * np.abs(local_y) / hy
    np.testing.assert_allclose(c[2] + 10.0 - t, expected_z, atol=1e-3)
    # A level ray into the gable end below the roof line hits it; above the ridge it misses.
    along = np.r_[rot @ np.array([1.0, 0.0]), 0.0].astype(np.float32)
    origin = np.r_[c[:2] - (hx + 5.0) * along[:2], c[2] - 0.5 * hz]
    hit = intersect(prims, i, origin, along[:1], along[1:2], along[2:], 0.0)[0]
    assert float(hit) == pytest.approx(5.0, abs=1e-3)
    over = intersect(prims, i, origin + [0, 0, 1.01 * hz + 0.5 * hz], along[:1], along[1:2],
                     along[2:], 0.0)[0]
    assert np.isinf(over)
    # Normals: gable end faces back along the ray, slopes tilt by the roof's pitch.
    hits = np.stack([origin + hit * along] + [np.r_[p, z] for p, z in zip(starts, expected_z)])
    rel = (hits - c).T.astype(np.float32)
    n, face, _, _ = _prism_geometry(prims, i, rel, prims.half[i], len(hits))
    assert face[0] == 1 and np.allclose(n[:, 0], -along, atol=1e-6)
    pitch = np.arctan(2.0 * hz / hy)
    assert list(face[[1, 3]]) == [3, 2]
    np.testing.assert_allclose(n[2, [1, 3]], np.cos(pitch), atol=1e-5)


def test_suburban_scans_land_on_the_rendered_surfaces():
    traj, world = _world(seed=7, scene='suburban')
    calib = kitti_calib(*SIZE)
    pose = traj.poses(5.0)[0]
    points = Lidar(LidarConfig(azimuth_steps=1000)).scan(world, pose, np.random.default_rng(0))
    _, depth = Camera(CameraModel.from_calib(calib, *SIZE)).render(world,
                                                                    camera_pose(pose, calib))
    assert depth_agreement(points, depth, calib) > 0.9
    assert len(points) > 0.8 * 64 * 1000  # the ground and the gardens return most beams


def test_scene_changes_only_images_and_scans_and_repeats(tmp_path, default_and_mounted):
    a = default_and_mounted[0]
    domain = DomainConfig(scene='suburban')
    generate_sequence(tmp_path / 's', '04', 5, seed=3, domain=domain, **SMALL)
    changed = _changed(a, tmp_path / 's')
    assert {k.split('/')[-2] for k in changed} == {'image_2', 'velodyne'} and len(changed) == 10
    generate_sequence(tmp_path / 't', '04', 5, seed=3, domain=domain, workers=2, **SMALL)
    assert _changed(tmp_path / 's', tmp_path / 't') == set()
