"""Issue 16: the prediction path's cheaper steps give what the plain ones give.

- resize_image (torch's uint8 antialiased bilinear, shared by the offline Dataset and the online
  synchronizer) stays close to PIL's Image.resize(BILINEAR), which it replaced: within 1 on
  under 1 % of the pixels at KITTI size, within 2 on ~8 % for a mild (0.8x) reduction;
- the inference cache (encoders.ScanCache: BEV grid, features and spectra, LiDAR depth image,
  flow encoder grey and stem features of the previous sample's second scan and frame) predicts
  as the uncached forward over a drive, across a gap, a weight change and a LiDAR dropout;
- the training-side feature cache (model/feature_cache.py: frozen encoders' features per
  sample, for repeated steps on replayed samples) gives what the encoders give, misses on any
  changed input, and is emptied when the weights are loaded.
"""
import numpy as np
from PIL import Image
import pytest
from test_model import drive_samples as model_drive_samples
import torch

from mm_fusion_ros.config import SampleConfig
from mm_fusion_ros.kitti.dataset import collate_samples
from mm_fusion_ros.kitti.sample import resize_image
from mm_fusion_ros.model import feature_cache
from mm_fusion_ros.model.config import ModelConfig
from mm_fusion_ros.model.encoders import ScanCache
from mm_fusion_ros.model.net import build_model, FusionOdometryNet
from mm_fusion_ros.sync.config import BufferConfig
from mm_fusion_ros.sync.replay_buffer import ReplayBuffer

H, W = 32, 96
SMALL = dict(image_height=H, image_width=W, bev_cells=32, bev_range_m=12.8,
             bev_max_shift_cells=4, bev_corr_radius=2, visual_channels=(8, 16),
             bev_channels=(8, 16, 16), visual_dim=32, point_dim=32, imu_dim=16,
             fusion_dim=32, head_hidden=32)


def pil_resize(image, width, height):
    """What resize_image was before issue 16."""
    return np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR)) \
        .transpose(2, 0, 1)


@pytest.mark.parametrize('src, dst, most, share', [
    ((376, 1241), (96, 320), 1, 0.01),    # KITTI -> the model: measured 1, 0.2 %
    ((375, 1242), (97, 311), 1, 0.01),
    ((188, 620), (96, 320), 1, 0.02),     # measured 1, 0.7 %
    ((40, 120), (32, 96), 2, 0.1),        # 0.8x: measured 2, 8 % (mean 0.08)
    ((20, 50), (32, 96), 0, 0.0)])        # enlarged: equal
def test_resize_close_to_pil(src, dst, most, share):
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:src[0], 0:src[1]]
    smooth = np.stack([127 + 120 * np.sin(x / 7.3 + c) * np.cos(y / 5.1) for c in range(3)],
                      axis=-1).astype(np.uint8)
    noise = rng.integers(0, 256, (*src, 3), dtype=np.uint8)
    cfg = SampleConfig(image_height=dst[0], image_width=dst[1])
    for image in (smooth, noise, noise[:, ::-1]):    # the last one not contiguous
        got = resize_image(image, cfg)
        want = pil_resize(np.ascontiguousarray(image), dst[1], dst[0])
        assert got.shape == want.shape == (3, *dst) and got.dtype == np.uint8
        assert got.flags.c_contiguous
        diff = np.abs(got.astype(int) - want.astype(int))
        assert diff.max() <= most and (diff > 0).mean() <= share, (diff.max(), (diff > 0).mean())
    same = rng.integers(0, 256, (*dst, 3), dtype=np.uint8)
    np.testing.assert_array_equal(resize_image(same, cfg), same.transpose(2, 0, 1))
    frozen = noise.copy()
    frozen.flags.writeable = False       # e.g. np.asarray of a PIL image
    np.testing.assert_array_equal(resize_image(frozen, cfg), resize_image(noise, cfg))


def drive_samples(frames, max_points=400):
    """Consecutive samples of one drive: sample k = frames and scans (k-1, k)."""
    return model_drive_samples(frames, max_points, images=True)


@pytest.mark.parametrize('visual, depth', [('flow', True), ('flow', False), ('dummy', True)])
def test_cached_forward_equals_uncached_over_a_drive(visual, depth):
    torch.manual_seed(0)
    model = build_model(ModelConfig(**SMALL, visual_encoder=visual, visual_depth=depth)).eval()
    samples = drive_samples(8)
    samples.insert(4, samples[0])    # a restart: its first scan and frame are not the cached ones
    cache = ScanCache()
    with torch.inference_mode():
        for i, sample in enumerate(samples):
            batch = collate_samples([sample])
            if i == 6:     # a training step changed the weights
                for p in model.parameters():
                    p.add_(0.01 * torch.randn_like(p))
                cache.weights_changed()
            if i == 8:     # the LiDAR dropped: zero depth images; sample 9 misses the depth
                batch['modality_mask'][0, 1] = False
            want = model(batch)
            got = model(batch, scan_cache=cache)
            for key in ('mean', 'logvar', 'gates'):
                torch.testing.assert_close(got[key], want[key], atol=1e-5, rtol=1e-5)
    # 9 samples: the first, the inserted one, the one after it and the one after the weight
    # change compute both scans' (frames') features; the other five reuse the first's.
    assert (cache.hits, cache.misses) == (5, 4)
    if visual == 'flow':
        # with depth images the frame cache also misses on the LiDAR dropout: the first
        # frame's depth image is now zeros, not the cached one
        assert (cache.frame_hits, cache.frame_misses) == ((4, 5) if depth else (5, 4))
    else:
        assert (cache.frame_hits, cache.frame_misses) == (0, 0)


def test_cache_refuses_training_mode_and_batches():
    torch.manual_seed(0)
    model = build_model(ModelConfig(**SMALL))
    samples = drive_samples(2)
    with pytest.raises(ValueError, match='one sample at a time'):
        model.train()(collate_samples(samples[:1]), scan_cache=ScanCache())
    with torch.no_grad(), pytest.raises(ValueError, match='one sample at a time'):
        model.eval()(collate_samples(samples), scan_cache=ScanCache())


@pytest.mark.parametrize('visual', ['flow', 'dummy'])
def test_feature_cache_steps_equal_uncached_steps(visual):
    torch.manual_seed(0)
    cfg = ModelConfig(**SMALL, visual_encoder=visual, fusion_dropout=0.0, modality_dropout=0.0)
    plain, cached = build_model(cfg), build_model(cfg)
    cached.load_state_dict(plain.state_dict())
    for model in (plain, cached):
        model.set_frozen(('visual', 'point'))
        model.train()
    cached.use_feature_cache(8)
    samples = drive_samples(4)
    batches = [collate_samples(samples[:2]), collate_samples(samples[:2]),
               collate_samples(samples[1:3])]
    changed = collate_samples(samples[:2])
    changed['points'][1, 0, :5] += 0.5          # row 1's first scan moved: must miss
    no_lidar = collate_samples(samples[:2])
    no_lidar['modality_mask'][:, 1] = False     # the camera's depth input changes
    for batch in batches + [changed, no_lidar]:
        for model in (plain, cached):
            model.zero_grad()
        want, got = plain(batch), cached(batch)
        for key in ('mean', 'logvar', 'gates'):
            torch.testing.assert_close(got[key], want[key], atol=1e-5, rtol=1e-5)
        # the trained parts still get their gradients, the same ones
        want['mean'].square().sum().backward()
        got['mean'].square().sum().backward()
        for (name, p), q in zip(plain.named_parameters(), cached.parameters()):
            assert (p.grad is None) == (q.grad is None), name
            if p.grad is not None:
                torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4)
    cache = cached.feature_cache
    # per branch: batches 1 and 2 the same two rows, batch 3 one new; changed: one new point
    # row (the camera's key holds the points too); no_lidar: the camera misses both rows (its
    # key holds the LiDAR's presence, the flow encoder reads the depth), the point branch hits
    assert cache.misses == (2 + 1 + 1 + 2) + (2 + 1 + 1)
    assert cache.hits == 5 * 2 * 2 - cache.misses     # 5 batches, 2 rows, 2 branches
    cached.load_state_dict(plain.state_dict())
    assert len(cache.entries) == 0


def test_feature_cache_capacity_counts_samples_with_every_kind_of_row():
    """use_feature_cache(n) keeps n samples' rows of both branches, the camera's with and
    without the LiDAR's depth: replaying them after all three kinds were stored only hits."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(**SMALL, visual_encoder='flow', fusion_dropout=0.0,
                                    modality_dropout=0.0))
    model.set_frozen(('visual', 'point'))
    model.train()
    model.use_feature_cache(2)
    batch = collate_samples(drive_samples(2))
    no_lidar = collate_samples(drive_samples(2))
    no_lidar['modality_mask'][:, 1] = False
    with torch.no_grad():
        model(batch)
        model(no_lidar)
        cache = model.feature_cache
        misses = cache.misses
        assert misses == 2 + 2 + 2                   # point, camera, camera without depth
        model(batch)
        model(no_lidar)
    assert cache.misses == misses and len(cache.entries) == 6


def test_feature_cache_leaves_trained_branches_and_inference_alone():
    torch.manual_seed(0)
    model = build_model(ModelConfig(**SMALL, fusion_dropout=0.0, modality_dropout=0.0))
    model.use_feature_cache(8)
    samples = drive_samples(2)
    model.train()(collate_samples(samples))          # nothing frozen: nothing cached
    assert (model.feature_cache.hits, model.feature_cache.misses) == (0, 0)
    model.set_frozen(('point',))
    with torch.inference_mode():
        model.eval()(collate_samples(samples[:1]), scan_cache=ScanCache())
    assert (model.feature_cache.hits, model.feature_cache.misses) == (0, 0)
    with pytest.raises(ValueError, match='capacity'):
        from mm_fusion_ros.model.feature_cache import FeatureCache
        FeatureCache(0)


def test_new_frozen_weights_drop_the_features_still_queued_for_the_cache():
    """Features handed over by the predictor (remember_features) but not yet stored must not
    outlive a weight load: they were served as the new weights' features."""
    cfg = ModelConfig(visual_encoder='dummy', point_encoder='pointnet', image_height=8,
                      image_width=8)
    torch.manual_seed(0)
    model = FusionOdometryNet(cfg)
    model.set_frozen({'point'})
    model.use_feature_cache(4)
    model.eval()
    batch = {'image': torch.zeros(1, 2, 3, 8, 8, dtype=torch.uint8),
             'points': torch.randn(1, 2, 16, 4),
             'points_mask': torch.ones(1, 2, 16, dtype=torch.bool),
             'imu': torch.zeros(1, 11, 6), 'dt': torch.tensor([0.1]),
             'modality_mask': torch.ones(1, 3, dtype=torch.bool)}
    old = {}
    model(batch, features_out=old)
    model.remember_features(batch, {'point': old['point']})
    model.load_state_dict({k: v + 1.0 if k.startswith('point.') else v
                           for k, v in model.state_dict().items()})
    got = {}
    model(batch, features_out=got)
    with torch.no_grad():
        fresh = model.point(batch['points'], batch['points_mask'])
    assert torch.allclose(got['point'], fresh) and not torch.equal(got['point'], old['point'])


def test_batches_drawn_from_the_replay_buffer_reuse_their_rows_digests(monkeypatch):
    """A batch stacked from the buffer's frozen arrays takes their remembered digests: the keys
    equal freshly hashed ones, the large inputs are hashed once per sample and not per draw,
    and a batch changed afterwards (in place, or an input replaced) is hashed afresh."""
    buf = ReplayBuffer(BufferConfig(capacity=8))
    for s in drive_samples(3):
        buf.add(s)
    names = ('points', 'points_mask')

    def keys(batch):
        return [feature_cache.row_key('point', batch, names, i)
                for i in range(batch['points'].shape[0])]
    drawn = buf.sample(3, np.random.default_rng(0))
    want = keys(collate_samples(drawn))               # hashed, nothing adopted
    hashed = []
    real = feature_cache._array_digest
    monkeypatch.setattr(feature_cache, '_array_digest', lambda a: hashed.append(a.shape) or
                        real(a))
    for _ in range(3):
        batch = collate_samples(drawn)
        feature_cache.adopt_row_digests(batch, drawn)
        assert keys(batch) == want
    large = [shape for shape in hashed if len(shape) > 1]
    assert len(large) == 3 * len(feature_cache.LARGE)  # each sample's arrays, once
    batch = collate_samples(drawn)
    feature_cache.adopt_row_digests(batch, drawn)
    batch['points'][1, 0, :5] += 0.5                   # in place: the version moves on
    changed = keys(batch)
    assert changed[0] == want[0] and changed[1] != want[1]
    batch = collate_samples(drawn)
    feature_cache.adopt_row_digests(batch, drawn)
    batch['points'] = batch['points'] + 0.0            # replaced (an augmentation): hashed
    assert keys(batch) == want
    # only read-only arrays that own their data are trusted
    assert feature_cache.frozen_array_digest(np.zeros(3)) is None
    view = np.zeros((2, 3))[0]
    view.flags.writeable = False
    assert feature_cache.frozen_array_digest(view) is None
