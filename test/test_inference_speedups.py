"""Issue 16 item 2: cheaper forms of the prediction path's model forward give what the plain
ones give.

- model/inference.py's inference_copy (Conv+BatchNorm folded) predicts as the eval-mode model,
  with and without the ScanCache, and leaves the model alone;
- camera.ground_view (three homography rows at once, grid built in front and moved last) and
  encoders.local_correlation (channel sums, one division) are bitwise the plain forms they
  replaced, and local_correlation's gradients are theirs too.
"""
import pytest
from test_model import drive_samples
import torch
from torch import nn
import torch.nn.functional as F

from mm_fusion_ros.kitti.dataset import collate_samples
from mm_fusion_ros.model import camera
from mm_fusion_ros.model.config import ModelConfig
from mm_fusion_ros.model.encoders import FlowVisualEncoder, local_correlation, ScanCache
from mm_fusion_ros.model.inference import fold_conv_bn, inference_copy
from mm_fusion_ros.model.net import build_model

pytestmark = pytest.mark.usefixtures('one_torch_thread')

H, W = 32, 96      # test_model.drive_samples' image size
SMALL = dict(image_height=H, image_width=W, bev_cells=32, bev_range_m=12.8,
             bev_max_shift_cells=4, bev_corr_radius=2, bev_channels=(8, 16, 16),
             flow_channels=(8, 16, 16, 24), visual_dim=32, point_dim=32, imu_dim=16,
             fusion_dim=32, head_hidden=32, camera_head_hidden=16)


def trained_looking(model):
    """BatchNorm statistics and affine parameters away from their initial 0 / 1, a non-zero
    head: a fresh model's would hide a wrong fold."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)
        for head in (model.head, model.camera_head):
            head.out.weight.copy_(torch.randn(head.out.weight.shape, generator=g) * 0.1)
    return model


def test_inference_copy_predicts_as_the_model():
    torch.manual_seed(0)
    model = trained_looking(build_model(ModelConfig(visual_encoder='flow', **SMALL))).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = inference_copy(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())
    # visual: stem 2 + local 2; point: stem 1, down 2, local 1
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 8
    assert not fast.training and not any(p.requires_grad for p in fast.parameters())
    samples = drive_samples(4, images=True)
    cache, fast_cache = ScanCache(), ScanCache()
    with torch.inference_mode():
        for sample in samples:
            batch = collate_samples([sample])
            want = model(batch)
            for got in (fast(batch), fast(batch, scan_cache=fast_cache),
                        model(batch, scan_cache=cache)):
                for k in ('mean', 'logvar', 'gates'):
                    torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=1e-5)
            assert want['mean'].abs().max() > 1e-3      # a prediction, not the zero head
        batch = collate_samples(samples[:3])             # a batch of several
        want, got = model(batch), fast(batch)
        torch.testing.assert_close(got['mean'], want['mean'], atol=1e-5, rtol=1e-5)
    # The model itself is untouched: same modules, same tensors.
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_fold_conv_bn_only_folds_eval_pairs():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.Conv2d(4, 4, 3), nn.ReLU(), nn.BatchNorm2d(4))
    assert fold_conv_bn(net) == 0                        # training mode: statistics still move
    net.eval()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_var.fill_(2.0)
            m.running_mean.fill_(0.3)
    x = torch.randn(2, 3, 8, 8)
    want = net(x)
    assert fold_conv_bn(net) == 1                        # the second BatchNorm follows a ReLU
    assert isinstance(net[1], nn.Identity) and isinstance(net[5], nn.BatchNorm2d)
    torch.testing.assert_close(net(x), want, atol=1e-5, rtol=1e-5)


def ground_view_plain(image, homography, cells, pixel_size=None):
    """camera.ground_view before issue 16 item 2: one row of the homography at a time, the grid
    stacked along its last dim."""
    b, j = homography.shape[:2]
    nx, ny = cells.shape[:2]
    h, w = pixel_size or image.shape[-2:]
    to_grid = torch.tensor([[2.0 / w, 0.0, 1.0 / w - 1.0], [0.0, 2.0 / h, 1.0 / h - 1.0],
                            [0.0, 0.0, 1.0]], dtype=homography.dtype)
    hm = to_grid @ homography
    x, y = cells[:, 0, 0].view(nx, 1), cells[0, :, 1].view(1, ny)
    gu, gv, d = (hm[..., i, 0, None, None] * x + (hm[..., i, 1, None, None] * y +
                                                  hm[..., i, 2, None, None]) for i in range(3))
    scale = d.clamp(min=1e-3).reciprocal()
    grid = torch.stack([gu * scale, gv * scale], dim=-1)
    view = F.grid_sample(image, grid.view(b, j * nx, ny, 2), align_corners=False)
    view = view.view(b, -1, j, nx, ny).transpose(1, 2)
    return view * (d > 0.1).to(view.dtype).unsqueeze(2)


def local_correlation_plain(f0, f1, radius):
    h, w = f0.shape[-2:]
    padded = F.pad(f1, (radius, radius, radius, radius))
    size = 2 * radius + 1
    return torch.stack([(f0 * padded[..., dy:dy + h, dx:dx + w]).mean(dim=1)
                        for dy in range(size) for dx in range(size)], dim=1)


def test_ground_view_is_the_plain_form():
    torch.manual_seed(0)
    enc = FlowVisualEncoder(ModelConfig())
    k, t = enc.calibration(2, None)
    ground = camera.ground_homography(k, t, enc.ground_z)
    turned = ground.unsqueeze(1) @ camera.planar_motion(enc.coarse_yaws.expand(2, -1))
    moved = ground @ camera.planar_motion(torch.tensor([0.01, -0.02]),
                                          torch.tensor([[1.2, 0.1], [0.4, -0.2]]))
    for image, homography, cells, size in (
            (torch.randn(2, 1, 96, 320), turned, enc.coarse_cells, None),
            (torch.randn(2, 1, 96, 320), ground.unsqueeze(1), enc.fine_cells, None),
            (torch.randn(2, 16, 24, 80), moved.unsqueeze(1), enc.flow_cells, (96, 320))):
        got = camera.ground_view(image, homography, cells, size)
        assert torch.equal(got, ground_view_plain(image, homography, cells, size))
    # Gradients reach the image (the residual path trains the stem through it).
    image = torch.randn(1, 4, 24, 80, requires_grad=True)
    camera.ground_view(image, moved[:1].unsqueeze(1), enc.flow_cells, (96, 320)).sum().backward()
    assert image.grad is not None and image.grad.abs().sum() > 0


@pytest.mark.parametrize('shape, radius', [((1, 32, 32, 32), 3), ((2, 8, 12, 7), 2),
                                           ((1, 5, 6, 6), 0)])
def test_local_correlation_is_the_plain_form(shape, radius):
    torch.manual_seed(0)
    f0 = torch.randn(shape, requires_grad=True)
    f1 = torch.randn(shape, requires_grad=True)
    got = local_correlation(f0, f1, radius)
    want = local_correlation_plain(f0, f1, radius)
    assert torch.equal(got, want)
    weight = torch.randn(want.shape)
    grads = torch.autograd.grad((got * weight).sum(), (f0, f1))
    grads_plain = torch.autograd.grad((want * weight).sum(), (f0, f1))
    for a, b in zip(grads, grads_plain):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
