"""Model layer: encoders, fusion, head, losses, augmentation and normalisation statistics."""
import math

import numpy as np
import pytest
import torch

from mm_fusion_ros.config import SampleConfig
from mm_fusion_ros.geometry import invert_pose, make_pose, pose_to_vec6, rpy_to_rot, vec6_to_pose
from mm_fusion_ros.kitti.dataset import collate_samples
from mm_fusion_ros.kitti.sample import build_sample, ImuData
from mm_fusion_ros.model.augment import augment_batch, AugmentParams, photometric, rotate_yaw
from mm_fusion_ros.model.config import ModelConfig
from mm_fusion_ros.model.encoders import bev_grid, BevPointEncoder, global_correlation, ScanCache
from mm_fusion_ros.model.fusion import GatedFusion
from mm_fusion_ros.model.losses import per_sample_loss, rotation_angle_error, so3_exp
from mm_fusion_ros.model.net import build_model
from mm_fusion_ros.model.normalization import imu_statistics, target_statistics

H, W = 32, 96
SMALL = dict(image_height=H, image_width=W, bev_cells=32, bev_range_m=12.8,
             bev_max_shift_cells=4, bev_corr_radius=2, visual_channels=(8, 16),
             bev_channels=(8, 16, 16), visual_dim=32, point_dim=32, imu_dim=16,
             fusion_dim=32, head_hidden=32)


def scene_points(rng, n=600):
    """Static world: vertical posts around the origin (above the BEV height cut)."""
    centers = rng.uniform(-10, 10, size=(n // 20, 2))
    pts = [np.column_stack([c + rng.normal(0, 0.2, (20, 2)), rng.uniform(-1.0, 1.5, 20),
                            rng.uniform(0, 1, 20)]) for c in centers]
    return np.concatenate(pts)


def make_sample(rng, step=(1.0, 0.1, 0.0), yaw=0.05, cfg=None, n=600):
    """A DESIGN §5 sample from an analytic world and a known relative pose."""
    cfg = cfg or SampleConfig(image_height=H, image_width=W, max_points=n)
    world = scene_points(rng, n)
    pose0 = make_pose(rpy_to_rot(0.0, 0.0, 0.3), [2.0, -1.0, 0.0])
    pose1 = pose0 @ make_pose(rpy_to_rot(0.0, 0.0, yaw), step)
    scans = []
    for pose in (pose0, pose1):
        inv = invert_pose(pose)
        xyz = world[:, :3] @ inv[:3, :3].T + inv[:3, 3]
        scans.append(np.column_stack([xyz, world[:, 3]]).astype(np.float32))
    stamps = np.linspace(0.0, 0.2, 21)
    imu = ImuData(stamps=stamps, accel=np.tile([0.5, 0.0, 9.81], (21, 1)),
                  gyro=np.tile([0.0, 0.0, yaw / 0.1], (21, 1)))
    images = [rng.integers(0, 255, (H, W, 3), dtype=np.uint8) for _ in range(2)]
    return build_sample(cfg, stamps=(0.05, 0.15), images=images, scans=scans, imu=imu,
                        poses=(pose0, pose1), sequence='00', frame=1)


@pytest.fixture
def batch():
    rng = np.random.default_rng(0)
    return collate_samples([make_sample(rng), make_sample(rng, step=(0.5, 0.0, 0.0))])


@pytest.mark.parametrize('visual, point, imu', [('cnn', 'bev', 'conv'),
                                                ('dummy', 'pointnet', 'conv'),
                                                ('cnn', 'dummy', 'dummy')])
def test_every_encoder_combination_runs_and_rebuilds_from_its_dict(batch, visual, point, imu):
    cfg = ModelConfig(visual_encoder=visual, point_encoder=point, imu_encoder=imu, **SMALL)
    torch.manual_seed(0)
    model = build_model(cfg)
    out = model(batch)
    assert out['mean'].shape == (2, 6) and out['logvar'].shape == (2, 6)
    assert out['gates'].shape == (2, 3)
    assert torch.isfinite(out['mean']).all() and torch.isfinite(out['logvar']).all()
    out['mean'].sum().backward()
    rebuilt = build_model(ModelConfig.from_dict(cfg.to_dict()))
    rebuilt.load_state_dict(model.state_dict())
    model.eval()
    rebuilt.eval()
    torch.testing.assert_close(rebuilt(batch)['mean'], model(batch)['mean'])
    dummy_slots = [n for n, kind in (('visual', visual), ('point', point), ('imu', imu))
                   if kind == 'dummy']
    for name in dummy_slots:
        assert not list(getattr(model, name).parameters())


def test_model_config_rejects_bad_values():
    with pytest.raises(ValueError, match='point_encoder'):
        ModelConfig(point_encoder='voxelnet')
    with pytest.raises(ValueError, match='bev_max_shift_cells'):
        ModelConfig(bev_cells=16, bev_max_shift_cells=8)
    with pytest.raises(ValueError, match='unknown keys'):
        ModelConfig.from_dict({**ModelConfig().to_dict(), 'depth': 3})


def test_wrong_image_size_is_a_clear_error(batch):
    model = build_model(ModelConfig(**{**SMALL, 'image_width': 64}))
    with pytest.raises(ValueError, match='image size'):
        model(batch)


def test_masked_modality_contributes_nothing(batch):
    torch.manual_seed(0)
    model = build_model(ModelConfig(**SMALL)).eval()
    torch.nn.init.normal_(model.head.out.weight)   # the zero-initialised head hides inputs
    masked = dict(batch, modality_mask=torch.tensor([[False, True, True]] * 2))
    changed = dict(masked, image=torch.randint(0, 255, batch['image'].shape, dtype=torch.uint8),
                   modality_mask=masked['modality_mask'])
    torch.testing.assert_close(model(masked)['mean'], model(changed)['mean'])
    # With the camera present, the same image change does move the output.
    live = dict(changed, modality_mask=torch.ones(2, 3, dtype=torch.bool))
    assert not torch.allclose(model(batch)['mean'], model(live)['mean'])
    nothing = dict(batch, modality_mask=torch.zeros(2, 3, dtype=torch.bool))
    assert torch.isfinite(model(nothing)['mean']).all()


def test_modality_dropout_never_removes_the_last_present_modality():
    fusion = GatedFusion([4, 4, 4], 8, dropout=0.0, modality_dropout=0.9).train()
    torch.manual_seed(1)
    mask = torch.rand(500, 3) > 0.3
    mask[0] = torch.tensor([False, True, False])
    kept = fusion.drop_modalities(mask)
    assert not (kept & ~mask).any(), 'dropout must never switch a missing modality on'
    assert (kept.any(dim=1) == mask.any(dim=1)).all()
    assert (kept != mask).any(), 'with p=0.9 some modalities must be dropped'
    assert torch.equal(fusion.eval().drop_modalities(mask), mask)


def test_bev_grid_places_points_and_honours_mask_and_height_cut():
    cfg = ModelConfig(bev_cells=8, bev_range_m=4.0, bev_max_shift_cells=2, bev_z_min=-1.0,
                      bev_z_max=3.0)
    # Cell size 1 m; cell centres at -3.5 .. 3.5. Points: one on a centre, one masked,
    # one below the height cut, one between four centres.
    pts = torch.tensor([[[[0.5, 1.5, 1.0, 0.8], [2.5, 2.5, 0.0, 0.2],
                          [0.5, 1.5, -1.5, 0.3], [-1.0, -2.0, 0.0, 0.4]]] * 2])
    mask = torch.tensor([[[True, False, True, True]] * 2])
    grid = bev_grid(pts, mask, cfg)
    assert grid.shape == (1, 6, 8, 8)
    density = torch.expm1(grid[0, 0])
    assert density[4, 5] == pytest.approx(1.0)
    assert density.sum() == pytest.approx(2.0, abs=1e-5)
    for r, c in ((2, 1), (2, 2), (3, 1), (3, 2)):
        assert density[r, c] == pytest.approx(0.25)
    assert grid[0, 1, 4, 5] == pytest.approx((1.0 + 1.0) / 4.0 + 1e-3)   # max height
    assert grid[0, 2, 4, 5] == pytest.approx(0.8)                         # mean intensity
    torch.testing.assert_close(grid[0, :3], grid[0, 3:])


def reference_bev_grid(points, mask, cfg):
    """bev_grid written as a plain loop over points: the definition the fast one must meet."""
    b, s, n, _ = points.shape
    g, r = cfg.bev_cells, cfg.bev_range_m
    res = 2.0 * r / g
    out = np.zeros((b, s, 3, g, g))
    count = np.zeros((b, s, g, g))
    for i, j, k in np.ndindex(b, s, n):
        x, y, z, intensity = points[i, j, k].double().tolist()
        u, v = (x + r) / res - 0.5, (y + r) / res - 0.5
        if not (mask[i, j, k] and cfg.bev_z_min <= z <= cfg.bev_z_max and -1 < u < g
                and -1 < v < g):
            continue
        u0, v0 = math.floor(u), math.floor(v)
        for a, c in ((0, 0), (0, 1), (1, 0), (1, 1)):
            if 0 <= u0 + a < g and 0 <= v0 + c < g:
                w = (u - u0 if a else 1 - (u - u0)) * (v - v0 if c else 1 - (v - v0))
                out[i, j, 0, u0 + a, v0 + c] += w
        iu, iv = min(max(round(u), 0), g - 1), min(max(round(v), 0), g - 1)
        height = (z - cfg.bev_z_min) / (cfg.bev_z_max - cfg.bev_z_min) + 1e-3
        out[i, j, 1, iu, iv] = max(out[i, j, 1, iu, iv], height)
        out[i, j, 2, iu, iv] += intensity
        count[i, j, iu, iv] += 1
    out[:, :, 0] = np.log1p(out[:, :, 0])
    out[:, :, 2] /= np.maximum(count, 1.0)
    return torch.from_numpy(out.reshape(b, s * 3, g, g)).float()


def test_bev_grid_matches_a_per_point_loop_at_the_borders_and_across_a_batch():
    cfg = ModelConfig(bev_cells=8, bev_range_m=4.0, bev_max_shift_cells=2, bev_z_min=-1.0,
                      bev_z_max=3.0)
    gen = torch.Generator().manual_seed(3)
    # Spread past the grid (|x|, |y| up to 5 m on a 4 m half-width), so points fall outside,
    # on the border cells and half outside them (u in (-1, 0) or (g - 1, g)).
    points = (torch.rand(3, 2, 200, 4, generator=gen) * 2 - 1) * torch.tensor([5., 5., 2.5, 1.])
    mask = torch.rand(3, 2, 200, generator=gen) > 0.2
    grid = bev_grid(points, mask, cfg)
    torch.testing.assert_close(grid, reference_bev_grid(points, mask, cfg), atol=1e-5, rtol=1e-5)
    assert grid[:, 0::3].sum() > 0 and (grid[:, 0::3, 0] > 0).any() and \
        (grid[:, 0::3, -1] > 0).any(), 'the border rows must receive splats in this test'


def drive_samples(frames, max_points=400, images=False):
    """Consecutive samples of one drive through the posts world: sample k = scans (k-1, k),
    and with `images` camera frames (k-1, k) of a texture shifting with k."""
    rng = np.random.default_rng(5)
    world = scene_points(rng, 800)
    cfg = SampleConfig(image_height=H, image_width=W, max_points=max_points)
    base = rng.integers(0, 256, (60, 200, 3), dtype=np.uint8) if images else None
    scans, poses, frames_rgb = [], [], []
    for k in range(frames + 1):
        pose = make_pose(rpy_to_rot(0.0, 0.0, 0.02 * k), [0.8 * k, 0.05 * k, 0.0])
        inv = invert_pose(pose)
        xyz = world[:, :3] @ inv[:3, :3].T + inv[:3, 3]
        scans.append(np.column_stack([xyz, world[:, 3]]).astype(np.float32))
        poses.append(pose)
        if images:
            frames_rgb.append(np.ascontiguousarray(np.roll(base, (k, 3 * k), axis=(0, 1))))
    return [build_sample(cfg, stamps=(0.1 * k - 0.1, 0.1 * k), scans=scans[k - 1:k + 1],
                         images=frames_rgb[k - 1:k + 1] if images else None,
                         poses=poses[k - 1:k + 1], sequence='07', frame=k)
            for k in range(1, frames + 1)]


def test_scan_cache_reuses_the_shared_scan_and_predicts_as_without_it():
    torch.manual_seed(0)
    model = build_model(ModelConfig(**SMALL)).eval()
    samples = drive_samples(7)
    # A sample that does not follow its predecessor (a restart): its first scan is not cached.
    samples.insert(4, samples[0])
    cache = ScanCache()
    with torch.no_grad():
        for i, sample in enumerate(samples):
            batch = collate_samples([sample])
            if i == 6:
                for p in model.point.stem.parameters():   # a training step changed the weights
                    p.add_(0.01)
                cache.weights_changed()
            want = model(batch)
            got = model(batch, scan_cache=cache)
            torch.testing.assert_close(got['mean'], want['mean'], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got['logvar'], want['logvar'], atol=1e-5, rtol=1e-5)
    # 8 samples: the first, the inserted one, the one after it and the one right after the
    # weight change compute both scans' features; the other four reuse the first scan's.
    assert (cache.hits, cache.misses) == (4, 4)
    with pytest.raises(ValueError, match='one sample at a time'):
        model.train()(collate_samples(samples[:1]), scan_cache=cache)


def test_global_correlation_peaks_at_the_shift():
    torch.manual_seed(0)
    f0 = torch.rand(1, 4, 32, 32)
    f1 = torch.roll(f0, shifts=(3, -2), dims=(-2, -1))
    corr = global_correlation(f0, f1, max_shift=5).view(11, 11)
    peak = divmod(int(corr.argmax()), 11)
    assert (peak[0] - 5, peak[1] - 5) == (3, -2)


def test_losses_weighting_validity_and_uncertainty():
    mean = torch.tensor([[1.0, 0, 0, 0, 0, 2.0]])
    target = torch.zeros(1, 6)
    logvar = torch.zeros(1, 6)
    assert per_sample_loss(mean, logvar, target, 'l1', 1.0, False).item() == pytest.approx(0.5)
    assert per_sample_loss(mean, logvar, target, 'l1', 3.0, False).item() == pytest.approx(7 / 6)
    assert per_sample_loss(mean, logvar, target, 'l2', 1.0, False).item() == pytest.approx(5 / 6)
    # Gaussian NLL over logvar is smallest at logvar = log(err^2).
    err = torch.tensor([[0.5] * 6])
    grid = torch.linspace(-4, 2, 601)
    nll = [per_sample_loss(err, torch.full((1, 6), float(v)), target, 'gaussian_nll', 1.0).item()
           for v in grid]
    assert float(grid[int(np.argmin(nll))]) == pytest.approx(math.log(0.25), abs=0.02)
    # Calibration term trains logvar without pulling on the mean.
    m = mean.clone().requires_grad_(True)
    lv = logvar.clone().requires_grad_(True)
    per_sample_loss(m, lv, target, 'l1', 1.0, True).sum().backward()
    torch.testing.assert_close(m.grad, torch.sign(mean) / 6)
    assert lv.grad.abs().sum() > 0
    with pytest.raises(ValueError, match='loss'):
        per_sample_loss(mean, logvar, target, 'huber', 1.0)


def test_so3_exp_and_rotation_error_match_numpy_geometry():
    rng = np.random.default_rng(3)
    w = rng.normal(0, 0.8, (5, 3))
    torch.testing.assert_close(so3_exp(torch.from_numpy(w)), torch.from_numpy(
        vec6_to_pose(np.column_stack([np.zeros((5, 3)), w]))[:, :3, :3]))
    a = torch.tensor([[0.0, 0.0, 0.1]])
    b = torch.tensor([[0.0, 0.0, 0.1 + math.radians(2.0)]])
    assert math.degrees(float(rotation_angle_error(a, b))) == pytest.approx(2.0, abs=1e-6)


def test_yaw_augmentation_keeps_scans_and_target_consistent():
    rng = np.random.default_rng(5)
    n = 400
    batch = collate_samples([make_sample(rng, step=(1.2, 0.3, 0.05), yaw=0.08, n=n)])
    angle = torch.tensor([0.7])
    out = rotate_yaw(batch, angle)
    # p_prev = T p_cur must hold before and after (same world points, same order).
    for b in (batch, out):
        pose = vec6_to_pose(b['target'][0].double().numpy())
        p0, p1 = b['points'][0, 0, :, :3].double().numpy(), b['points'][0, 1, :, :3].double()
        np.testing.assert_allclose(p1.numpy() @ pose[:3, :3].T + pose[:3, 3], p0, atol=1e-4)
    rot = rpy_to_rot(0.0, 0.0, 0.7)
    conj = make_pose(rot, np.zeros(3))
    expected = pose_to_vec6(conj @ vec6_to_pose(batch['target'][0].double().numpy()) @
                            invert_pose(conj))
    np.testing.assert_allclose(out['target'][0].numpy(), expected, atol=1e-5)
    np.testing.assert_allclose(out['imu'][0, :, 3:].numpy(),
                               batch['imu'][0, :, 3:].numpy() @ rot.T, atol=1e-5)
    assert not out['modality_mask'][0, 0] and out['modality_mask'][0, 1:].all()
    assert batch['modality_mask'][0, 0], 'the input batch must not be modified'


def test_yaw_augmentation_turns_the_imu_as_mounted():
    """The IMU's vectors turn with the vehicle seen from imu_link (t_imu_lidar: imu_link <-
    base_link). For an IMU mounted upside down (180 deg about x) a yaw of +a is a yaw of -a in
    its own axes; a tilted one tells imu_link <- base_link from its inverse. Unknown
    calibration (calib_valid off, whatever t_imu_lidar holds): taken as axis-aligned."""
    rng = np.random.default_rng(8)
    cfg = SampleConfig(image_height=H, image_width=W, max_points=200)
    mounts = [rpy_to_rot(np.pi, 0.0, 0.3), rpy_to_rot(0.4, -0.3, 0.2)]
    batch = collate_samples([make_sample(rng, cfg=cfg, n=200) for _ in range(3)])
    for k, r_ib in enumerate(mounts):
        batch['t_imu_lidar'][k] = torch.from_numpy(make_pose(r_ib, [0.8, 0.0, -0.3])).float()
        batch['calib_valid'][k, 2] = True
    batch['t_imu_lidar'][2] = torch.from_numpy(make_pose(mounts[1], np.zeros(3))).float()
    batch['calib_valid'][2, 2] = False
    gyro_base = np.array([0.1, -0.2, 0.5])
    for k, r_ib in enumerate(mounts):
        batch['imu'][k, :, 3:] = torch.from_numpy(gyro_base @ r_ib.T).float()   # in imu_link
    batch['imu'][2, :, 3:] = torch.from_numpy(gyro_base).float()
    angle = 0.7
    out = rotate_yaw(batch, torch.tensor([angle] * 3))
    expected = np.tile(rpy_to_rot(0.0, 0.0, angle) @ gyro_base, (out['imu'].shape[1], 1))
    # Back in base_link axes, each reads the yawed vehicle's rate R w.
    for k, r_ib in enumerate(mounts):
        np.testing.assert_allclose(out['imu'][k, :, 3:].double().numpy() @ r_ib, expected,
                                   atol=1e-5, err_msg=f'mount {k}')
    np.testing.assert_allclose(out['imu'][2, :, 3:].double().numpy(), expected, atol=1e-5)


def test_random_augmentation_flags():
    rng = np.random.default_rng(6)
    batch = collate_samples([make_sample(rng), make_sample(rng)])
    assert augment_batch(batch, AugmentParams()) is batch
    torch.manual_seed(0)
    out = augment_batch(batch, AugmentParams(point_jitter_m=0.05, point_dropout=0.5))
    assert 0.3 < out['points_mask'].float().mean() < 0.7
    moved = (out['points'] - batch['points'])[..., :3].abs()
    assert moved.max() > 0 and moved[~out['points_mask']].max() == 0
    torch.testing.assert_close(out['target'], batch['target'])
    img = photometric(batch['image'], brightness=0.2, contrast=0.3)
    assert img.dtype == torch.uint8 and not torch.equal(img, batch['image'])


def test_normalisation_statistics():
    imu = ImuData(stamps=np.arange(4.0), accel=np.array([[0, 0, 9], [2, 0, 11]] * 2, float),
                  gyro=np.zeros((4, 3)))
    mean, std = imu_statistics([imu, None])
    np.testing.assert_allclose(mean, [1, 0, 10, 0, 0, 0])
    np.testing.assert_allclose(std, [1, 1e-3, 1, 1e-3, 1e-3, 1e-3])
    assert imu_statistics([None])[1].tolist() == [1.0] * 6
    step = make_pose(rpy_to_rot(0, 0, 0.02), [1.0, 0.0, 0.0])
    poses = [np.eye(4)]
    for _ in range(5):
        poses.append(poses[-1] @ step)
    tmean, tstd = target_statistics([np.array(poses)])
    np.testing.assert_allclose(tmean, [1, 0, 0, 0, 0, 0.02], atol=1e-9)
    assert (tstd <= 1e-3).all()
    with pytest.raises(ValueError, match='consecutive poses'):
        target_statistics([np.eye(4)[None]])


def test_denormalize_inverts_normalize(batch):
    model = build_model(ModelConfig(**SMALL))
    model.set_normalization({'imu_mean': [0] * 6, 'imu_std': [1] * 6,
                             'target_mean': [1, 0, 0, 0, 0, 0.01],
                             'target_std': [0.2, 0.01, 0.01, 0.001, 0.001, 0.005]})
    target = batch['target'].float()
    mean, logvar = model.denormalize(model.normalize_target(target), torch.zeros(2, 6))
    torch.testing.assert_close(mean, target)
    torch.testing.assert_close(logvar[0, 0], torch.tensor(2 * math.log(0.2)))
    with pytest.raises(ValueError, match='target_std'):
        model.set_normalization({**model.normalization(), 'target_std': [0] * 6})


@pytest.mark.parametrize('step', [0.4, 1.0, 1.7])
def test_bev_raw_shift_estimate_measures_the_translation(step):
    """The untrained encoder's raw-grid soft-argmax estimate is already the forward step."""
    rng = np.random.default_rng(2)
    cfg = ModelConfig(bev_cells=64, bev_range_m=12.8, bev_max_shift_cells=6)
    encoder = BevPointEncoder(cfg).eval()
    b = collate_samples([make_sample(rng, step=(step, 0.0, 0.0), yaw=0.0, n=1000)])
    out = encoder(b['points'], b['points_mask'])
    assert out.shape == (1, encoder.out_dim)
    raw_x, raw_y = out[0, -4:-2].tolist()
    assert raw_x == pytest.approx(step, abs=0.15) and raw_y == pytest.approx(0.0, abs=0.15)
