"""Per-modality encoders and their Dummy stand-ins (DESIGN §6).

Each encoder maps its part of a batch to a (B, out_dim) feature vector; the Dummy of a slot has the
same interface and output size but returns zeros and has no parameters, so a config can drop a
branch (for speed or an ablation) without touching the rest of the network.
"""
import math

import torch
from torch import nn

from mm_fusion_ros.model import camera
from mm_fusion_ros.model.config import ModelConfig

# uint8 pixels -> roughly zero-mean, unit-variance inputs (fixed, so no data statistics needed).
PIXEL_MEAN = 0.45 * 255.0
PIXEL_STD = 0.25 * 255.0
# KITTI scans arrive at 10 Hz, so dt * DT_SCALE is ~1.
DT_SCALE = 10.0


def conv_bn_relu(c_in, c_out, stride):
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


def strided_cnn(c_in, widths, pool_hw, out_dim):
    """Stride-2 conv stack, adaptive pooling to a small grid (keeps coarse layout), linear."""
    layers, c = [], c_in
    for w in widths:
        layers.append(conv_bn_relu(c, w, 2))
        c = w
    layers += [nn.AdaptiveAvgPool2d(pool_hw), nn.Flatten(),
               nn.Linear(c * pool_hw[0] * pool_hw[1], out_dim), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class VisualEncoder(nn.Module):
    """Small CNN over the image pair stacked as 6 channels (uint8 in, normalised here)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.out_dim = cfg.visual_dim
        self.size = (cfg.image_height, cfg.image_width)
        self.net = strided_cnn(6, cfg.visual_channels, (2, 4), cfg.visual_dim)

    def forward(self, image):
        if tuple(image.shape[-2:]) != self.size:
            raise ValueError(f'image size {tuple(image.shape[-2:])} does not match the model '
                             f'(image_height, image_width) = {self.size}')
        x = image.flatten(1, 2).float()
        return self.net((x - PIXEL_MEAN) / PIXEL_STD)


class FlowVisualEncoder(nn.Module):
    """Measures the motion between the two frames (visual_encoder = 'flow').

    - Ground sweep (model/camera.py, no parameters but the softmax sharpness): both frames'
      high-passed grey images, weighted by where they differ (the pixels that carry motion:
      lane lines parallel to the motion and camera-fixed haze do not change and would read as
      zero motion), are mapped onto the road plane; a coarse then a fine sweep over the yaw,
      each scoring every translation by FFT correlation, gives the step (x, y, yaw) in
      metres and radians. `motion_estimates` = (x, yaw) are the last two outputs; the network
      standardises them like the target, as it does the BEV encoder's shift estimates.
    - Learned residual (the siamese part): a shared two-layer stem over each frame (RGB, plus
      the LiDAR's inverse depth and hit channels where the LiDAR is present), both frames'
      features mapped onto the road plane, frame k's warped by the sweep's step (so what is
      left is the sweep's error), then a local cost volume with frame k-1's features and
      coordinate planes through a strided CNN, as the BEV encoder's local path.
    Matching is parameter-free, so what is learned is how the residual maps to motion, not the
    scenes of a small training set.
    """

    motion_estimates = 2

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        h, w = self.size = (cfg.image_height, cfg.image_width)
        intrinsics, t_cam_lidar = camera.default_calibration(h, w)
        self.register_buffer('intrinsics', intrinsics, persistent=False)
        self.register_buffer('t_cam_lidar', t_cam_lidar, persistent=False)
        cell = cfg.ipm_cell_m
        region = (cfg.ipm_near_m, cfg.ipm_far_m, cfg.ipm_half_width_m)
        self.register_buffer('fine_cells', camera.ground_cells(*region, cell), persistent=False)
        self.register_buffer('coarse_cells', camera.ground_cells(*region, 2 * cell),
                             persistent=False)
        self.register_buffer('flow_cells', camera.ground_cells(*region, cfg.flow_cell_m),
                             persistent=False)
        self.ground_z = -cfg.ground_height_m
        # Yaw hypotheses: coarse every 5 mrad, then nine around the coarse peak every 1.25 mrad.
        n = int(math.ceil(cfg.ipm_max_yaw / 0.005))
        self.register_buffer('coarse_yaws', torch.arange(-n, n + 1) * 0.005, persistent=False)
        self.register_buffer('fine_yaws', torch.arange(-4, 5) * 0.00125, persistent=False)
        self.shift = {s: (int(math.ceil(cfg.ipm_max_step_m / (s * cell))),
                          int(math.ceil(0.6 / (s * cell)))) for s in (1, 2)}
        self.box = max(3, int(round(w / 36)) // 2 * 2 + 1)   # 9 px at 320 px wide
        self.log_beta = nn.Parameter(torch.tensor(math.log(5.0)))
        c_in = 3 + (2 if cfg.visual_depth else 0)
        c1, c2 = cfg.flow_channels[:2]
        self.stem = nn.Sequential(conv_bn_relu(c_in, c1, 2), conv_bn_relu(c1, c2, 2))
        x, y = self.flow_cells.shape[:2]
        ax = (torch.arange(x, dtype=torch.float32) + 0.5) / x * 2.0 - 1.0
        ay = (torch.arange(y, dtype=torch.float32) + 0.5) / y * 2.0 - 1.0
        self.register_buffer('coords', torch.stack(torch.meshgrid(ax, ay, indexing='ij')),
                             persistent=False)
        self.radius = cfg.flow_corr_radius
        self.local = strided_cnn((2 * self.radius + 1) ** 2 + c2 + 2, cfg.flow_channels[2:],
                                 (4, 2), cfg.visual_dim)
        self.out_dim = cfg.visual_dim + 1 + self.motion_estimates

    def calibration(self, b, calib):
        if calib is not None:
            return calib[0].float(), calib[1].float()
        return (self.intrinsics.expand(b, -1, -1), self.t_cam_lidar.expand(b, -1, -1))

    def forward(self, image, calib=None, depth=None, cache: 'ScanCache' = None):
        """image (B, 2, 3, H, W) uint8; calib (intrinsics (B, 3, 3), t_cam_lidar (B, 4, 4)) or
        None for the default; depth (B, 2, 2, H, W) from camera.lidar_depth_image or None.
        cache: reuse the previous sample's second frame (inference on one sample at a time)."""
        if tuple(image.shape[-2:]) != self.size:
            raise ValueError(f'image size {tuple(image.shape[-2:])} does not match the model '
                             f'(image_height, image_width) = {self.size}')
        b = image.shape[0]
        k, t = self.calibration(b, calib)
        ground = camera.ground_homography(k, t, self.ground_z)
        gray, feats = self.frame_features(image, depth, cache)
        scores, yaw0 = self.sweep(gray, ground)
        cell = self.cfg.ipm_cell_m
        mx, my = self.shift[1]
        axes = (self.fine_yaws, torch.arange(-mx, mx + 1, device=image.device) * cell,
                torch.arange(-my, my + 1, device=image.device) * cell)
        est, peak = camera.peak_soft_argmax(scores, axes, (2, 3, 3), self.log_beta)
        step = torch.stack([est[:, 1], est[:, 2], est[:, 0] + yaw0], dim=1)   # x, y, yaw
        residual = self.residual(feats, step.detach(), ground)
        return torch.cat([residual, peak.unsqueeze(1) / 10.0, step[:, [0, 2]]], dim=1)

    def frame_features(self, image, depth, cache=None):
        """The per-frame parts: high-passed grey (B, 2, 1, H, W) and stem features
        (B, 2, C, h, w). With a cache, frame k-1 of this sample is reused when it is the frame
        k (image and depth equal) of the previous one."""
        if cache is None:
            return self._frame_features(image, depth)
        if image.shape[0] != 1 or self.training:
            raise ValueError('ScanCache serves inference (eval mode) on one sample at a time, '
                             f'got a batch of {image.shape[0]} in '
                             f'{"training" if self.training else "eval"} mode')
        depth0 = None if depth is None else depth[:, :1]
        depth1 = None if depth is None else depth[:, 1:]
        with torch.no_grad():
            hit = cache.holds_frame(image[0, 0], depth0)
            if hit and cache.frame_feats is not None:
                cache.frame_hits += 1
                gray1, feats1 = self._frame_features(image[:, 1:], depth1)
                gray = torch.cat([cache.frame_gray, gray1], dim=1)
                feats = torch.cat([cache.frame_feats, feats1], dim=1)
            else:
                cache.frame_misses += 1
                gray, feats = self._frame_features(image, depth)
            cache.store_frame(image[0, 1], depth1, gray[:, 1:], feats[:, 1:])
        return gray, feats

    def _frame_features(self, image, depth):
        b, s = image.shape[:2]
        x = (image.float() - PIXEL_MEAN) / PIXEL_STD
        gray = camera.high_pass_gray(x.flatten(0, 1), self.box).view(b, s, 1, *self.size)
        if self.cfg.visual_depth:
            x = torch.cat([x, depth if depth is not None else
                           x.new_zeros(b, s, 2, *self.size)], dim=2)
        feats = self.stem(x.flatten(0, 1))
        return gray, feats.view(b, s, *feats.shape[1:])

    @torch.no_grad()
    def sweep(self, gray, ground):
        """Score volume (B, 9, 2 mx + 1, 2 my + 1) of the fine sweep and its yaw centre (B,),
        from both frames' high-passed grey (B, 2, 1, H, W)."""
        b = gray.shape[0]
        change = (gray[:, 1] - gray[:, 0]).abs()
        weight = (camera.box_mean(camera.box_mean(change, 5, -1), 5, -2) + 1e-3).sqrt()
        first, second = gray[:, 0] * weight, gray[:, 1] * weight

        def scores(cells, yaws, shift):
            view0 = camera.ground_view(first, ground.unsqueeze(1), cells)[:, 0]
            view1 = camera.ground_view(second, ground.unsqueeze(1) @ camera.planar_motion(yaws),
                                       cells)
            return camera.shift_correlation(view0, view1, *shift)

        coarse = scores(self.coarse_cells, self.coarse_yaws.expand(b, -1), self.shift[2])
        yaw0 = self.coarse_yaws[coarse.flatten(2).amax(dim=2).argmax(dim=1)]
        return scores(self.fine_cells, yaw0.unsqueeze(1) + self.fine_yaws, self.shift[1]), yaw0

    def residual(self, feats, step, ground):
        """Local cost volume of frame k-1's ground view against frame k's, warped by `step`."""
        b = feats.shape[0]
        view0 = camera.ground_view(feats[:, 0], ground.unsqueeze(1), self.flow_cells,
                                   self.size)[:, 0]
        moved = ground @ camera.planar_motion(step[:, 2], step[:, :2])
        view1 = camera.ground_view(feats[:, 1], moved.unsqueeze(1), self.flow_cells,
                                   self.size)[:, 0]
        coords = self.coords.unsqueeze(0).expand(b, -1, -1, -1)
        return self.local(torch.cat([local_correlation(view0, view1, self.radius), view0,
                                     coords], dim=1))


def bev_grid(points, mask, cfg: ModelConfig):
    """(B, S, N, 4) scans -> (B, 3 S, G, G) grids: density, max height, mean intensity per scan.

    Density is splatted bilinearly onto the four nearest cells, so it changes smoothly with
    sub-cell motion; rows follow x (forward), columns y (left).
    Every point goes through the same few whole-tensor ops (no boolean indexing, whose
    nonzero() calls dominated): the grids are padded by one cell on each side, so the four
    corners of a kept point always lie inside them, and dropped points are sent past their
    end: faster on CPU than masking each corner (docs/measured_figures.md), with bitwise equal
    grids.
    """
    b, s, n, _ = points.shape
    g, r = cfg.bev_cells, cfg.bev_range_m
    res = 2.0 * r / g
    x, y, z, intensity = points.float().unbind(-1)
    u = (x + r) / res - 0.5
    v = (y + r) / res - 0.5
    keep = mask & (z >= cfg.bev_z_min) & (z <= cfg.bev_z_max) & \
        (u > -1) & (u < g) & (v > -1) & (v < g)
    gp = g + 2                       # padded side
    cells = b * s * gp * gp          # index of the first cell past the grids: dropped points
    base = torch.arange(b * s, device=points.device).view(b, s, 1) * (gp * gp)

    u0, v0 = torch.floor(u), torch.floor(v)
    du, dv = u - u0, v - v0
    corner = torch.where(keep, base + (u0.long() + 1) * gp + (v0.long() + 1), cells)
    offsets = torch.tensor([0, 1, gp, gp + 1], device=points.device).view(4, 1, 1, 1)
    weights = torch.stack([(1 - du) * (1 - dv), (1 - du) * dv, du * (1 - dv), du * dv])
    density = points.new_zeros(cells + gp + 2, dtype=torch.float32).index_add_(
        0, (corner.unsqueeze(0) + offsets).reshape(-1), weights.reshape(-1))[:cells]

    iu = torch.round(u).long().clamp(0, g - 1) + 1
    iv = torch.round(v).long().clamp(0, g - 1) + 1
    near = torch.where(keep, base + iu * gp + iv, cells).reshape(-1)
    height = ((z - cfg.bev_z_min) / (cfg.bev_z_max - cfg.bev_z_min) + 1e-3).reshape(-1)
    max_height = points.new_zeros(cells + 1, dtype=torch.float32).scatter_reduce_(
        0, near, height, 'amax', include_self=True)[:cells]
    count = points.new_zeros(cells + 1, dtype=torch.float32).index_add_(
        0, near, torch.ones_like(height))[:cells]
    sum_int = points.new_zeros(cells + 1, dtype=torch.float32).index_add_(
        0, near, intensity.reshape(-1))[:cells]
    mean_int = sum_int / count.clamp(min=1.0)

    grids = torch.stack([torch.log1p(density), max_height, mean_int], dim=1)   # (cells, 3)
    grids = grids.view(b, s, gp, gp, 3)[:, :, 1:-1, 1:-1]
    return grids.permute(0, 1, 4, 2, 3).reshape(b, s * 3, g, g)


def local_correlation(f0, f1, radius: int):
    """FlowNet-style cost volume: channel-mean of f0 * f1 shifted by every (dy, dx) in
    [-radius, radius]^2 -> (B, (2 radius + 1)^2, H, W). Parameter-free matching, so the
    displacement evidence it exposes does not have to be memorised per scene."""
    h, w = f0.shape[-2:]
    padded = nn.functional.pad(f1, (radius, radius, radius, radius))
    size = 2 * radius + 1
    # Channel sums, divided once: what mean() computes on CPU (a sum, then a division), with
    # one division instead of one per shift.
    return torch.stack([(f0 * padded[..., dy:dy + h, dx:dx + w]).sum(dim=1)
                        for dy in range(size) for dx in range(size)], dim=1).div_(f0.shape[1])


def global_correlation(f0, f1, max_shift: int):
    """Whole-grid cross-correlation sum_x <f0(x), f1(x + d)> for |d| <= max_shift cells, via FFT,
    standardised per sample -> (B, (2 max_shift + 1)^2). Its peak is the dominant shift of the
    scene between the scans, i.e. the translation, at full grid resolution."""
    return correlate_spectra(spectrum(f0), spectrum(f1), f0.shape[-2:], max_shift)


def spectrum(f):
    """The per-grid half of global_correlation: rfft2 of (B, C, G, G) grids."""
    return torch.fft.rfft2(f.float())


def correlate_spectra(s0, s1, size, max_shift: int):
    """global_correlation from the two grids' spectra (spectrum) and the grid size."""
    corr = torch.fft.irfft2((s0.conj() * s1).sum(dim=1), s=size)
    corr = torch.roll(corr, shifts=(max_shift, max_shift), dims=(-2, -1))
    corr = corr[..., :2 * max_shift + 1, :2 * max_shift + 1].flatten(1)
    return (corr - corr.mean(dim=1, keepdim=True)) / (corr.std(dim=1, keepdim=True) + 1e-6)


def soft_argmax(scores, max_shift: int, log_beta):
    """Expected (row, col) shift [cells] under softmax(beta * scores) over the shift window:
    a sub-cell estimate of the dominant shift that is the same function in every scene."""
    size = 2 * max_shift + 1
    axis = torch.arange(size, device=scores.device, dtype=scores.dtype) - max_shift
    offsets = torch.stack(torch.meshgrid(axis, axis, indexing='ij'), dim=-1).view(-1, 2)
    return torch.softmax(scores * log_beta.exp(), dim=1) @ offsets


class BevPointEncoder(nn.Module):
    """Both scans as BEV grids through a shared (siamese) conv stem, then two matching paths:

    - global: FFT cross-correlation of the two feature grids (and of the raw grids) over shifts
      up to bev_max_shift_cells, flattened into an MLP; it sees the common shift (translation).
      Soft-argmax turns each correlation into an (x, y) translation estimate in metres; these
      `shift_estimates` pairs are the last 2 k outputs, which the network standardises like
      the target so that they are usable from the first step;
    - local: at quarter resolution, a cost volume of radius bev_corr_radius plus the first scan's
      features and x, y coordinate planes through a strided CNN; rotation shows up as a
      position-dependent shift.
    Matching is parameter-free, so what is learned is how a shift maps to motion, not the
    scenes. A global max-pool over points cannot see such shifts (docs/stage2_tracking.md).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.radius = cfg.bev_corr_radius
        self.max_shift = cfg.bev_max_shift_cells
        stem, match_c = cfg.bev_channels[0], cfg.bev_channels[1]
        quarter = (cfg.bev_cells + 3) // 4
        axis = (torch.arange(quarter, dtype=torch.float32) + 0.5) / quarter * 2.0 - 1.0
        self.register_buffer('coords', torch.stack(torch.meshgrid(axis, axis, indexing='ij')),
                             persistent=False)
        self.stem = conv_bn_relu(3, stem, 1)
        # The local cost volume is the costliest part: built at quarter resolution it is ~4x
        # cheaper than at half resolution (bench/train_throughput.py).
        self.down = nn.Sequential(conv_bn_relu(stem, match_c, 2),
                                  conv_bn_relu(match_c, match_c, 2))
        self.local = strided_cnn((2 * self.radius + 1) ** 2 + match_c + 2, cfg.bev_channels[2:],
                                 (4, 4), cfg.point_dim)
        self.shift = nn.Sequential(nn.Linear((2 * self.max_shift + 1) ** 2, cfg.point_dim),
                                   nn.ReLU(inplace=True))
        # Softmax sharpness of the two peak estimates (raw grids, learned features); 3 suits
        # standardised correlations (measured, docs/stage2_tracking.md).
        self.log_beta = nn.Parameter(torch.full((2,), math.log(3.0)))
        self.cell_m = 2.0 * cfg.bev_range_m / cfg.bev_cells
        self.shift_estimates = 2
        self.out_dim = 2 * cfg.point_dim + 2 * self.shift_estimates

    def forward(self, points, points_mask, cache: 'ScanCache' = None):
        """cache: reuse the previous sample's second scan (inference on one sample at a time)."""
        grid, feats, quarters, spectra = self._scan_features(points, points_mask, cache)
        b = grid.shape[0]
        size = grid.shape[-2:]
        # Raw-grid correlation: a shift estimate that is right before any training.
        raw = correlate_spectra(*spectra[0], size, self.max_shift)
        corr = correlate_spectra(*spectra[1], size, self.max_shift)
        # Scan k sees the scene moved by -t, so the peak sits at -t / cell (rows x, cols y).
        shifts = torch.cat([soft_argmax(raw, self.max_shift, self.log_beta[0]),
                            soft_argmax(corr, self.max_shift, self.log_beta[1])], dim=1)
        shifts = -shifts * self.cell_m
        h0, h1 = quarters.view(b, 2, *quarters.shape[1:]).unbind(1)
        coords = self.coords.unsqueeze(0).expand(b, -1, -1, -1)
        local = self.local(torch.cat([local_correlation(h0, h1, self.radius), h0, coords], dim=1))
        return torch.cat([self.shift(corr), local, shifts], dim=1)

    def _scan_features(self, points, points_mask, cache):
        """Per-scan parts: BEV grids (B, 6, G, G), stem features (2 B, C, G, G), quarter
        resolution features (2 B, C', G/4, G/4), scans interleaved (b0 s0, b0 s1, b1 s0 ...),
        and the spectra ((raw grid 0, 1), (features 0, 1)) the global correlations need."""
        g = self.cfg.bev_cells
        if cache is None:
            with torch.no_grad():
                grid = bev_grid(points, points_mask, self.cfg)
            feats = self.stem(grid.view(-1, 3, g, g))
            b = grid.shape[0]
            f0, f1 = feats.view(b, 2, *feats.shape[1:]).unbind(1)
            spectra = ((spectrum(grid[:, :3]), spectrum(grid[:, 3:])),
                       (spectrum(f0), spectrum(f1)))
            return grid, feats, self.down(feats), spectra
        if points.shape[0] != 1 or self.training:
            raise ValueError('ScanCache serves inference (eval mode) on one sample at a time, '
                             f'got a batch of {points.shape[0]} in '
                             f'{"training" if self.training else "eval"} mode')
        with torch.no_grad():
            hit = cache.holds(points[0, 0], points_mask[0, 0])
            first = cache.grid if hit else bev_grid(points[:, :1], points_mask[:, :1], self.cfg)
            second = bev_grid(points[:, 1:], points_mask[:, 1:], self.cfg)
            grid = torch.cat([first, second], dim=1)
            raw = (cache.grid_spectrum if hit else spectrum(first), spectrum(second))
            if hit and cache.feats is not None:
                cache.hits += 1
                new_feats = self.stem(second.view(1, 3, g, g))
                new_quarters = self.down(new_feats)
                feats = torch.cat([cache.feats, new_feats])
                quarters = torch.cat([cache.quarters, new_quarters])
                learned = (cache.feats_spectrum, spectrum(new_feats))
            else:
                cache.misses += 1
                feats = self.stem(grid.view(2, 3, g, g))
                quarters = self.down(feats)
                learned = (spectrum(feats[:1]), spectrum(feats[1:]))
            cache.store(points[0, 1], points_mask[0, 1], second, feats[1:], quarters[1:],
                        raw[1], learned[1])
        return grid, feats, quarters, (raw, learned)


class ScanCache:
    """The previous sample's second scan and camera frame, for online inference one sample at a
    time.

    Scan k is the second scan of sample k and the first of sample k+1, as the same point set
    (kitti.sample.subsample_scan), and camera frame k likewise, so the per-scan and per-frame
    parts of the encoders are computed once: the BEV encoder's grid, stem, down and their FFT
    spectra; the LiDAR depth image (model/net.py); the flow encoder's high-passed grey and stem
    features. A first scan or frame counts as the cached one only when it is equal to it (points
    and mask; image and depth image; the depth image also keys on the calibration and whether
    the LiDAR is present), so a gap or a restart simply misses. Grids, spectra of grids, depth
    images and grey depend on the inputs alone, features also on the weights: call
    `weights_changed()` after every weight update.
    """

    # The model's branches (FusionOdometryNet attributes) whose features it keeps: new weights
    # elsewhere (the fusion and pose heads) leave it valid.
    BRANCHES = ('visual', 'point')

    def __init__(self):
        self.points = self.mask = self.grid = self.feats = self.quarters = None
        self.grid_spectrum = self.feats_spectrum = None
        self.depth_key = self.depth = None
        self.frame_image = self.frame_depth = self.frame_gray = self.frame_feats = None
        self.hits = self.misses = 0
        self.frame_hits = self.frame_misses = 0

    def holds(self, points, mask) -> bool:
        return self.points is not None and self.points.shape == points.shape and \
            torch.equal(self.points, points) and torch.equal(self.mask, mask)

    def store(self, points, mask, grid, feats, quarters, grid_spectrum=None,
              feats_spectrum=None) -> None:
        self.points, self.mask, self.grid = points.clone(), mask.clone(), grid
        self.feats, self.quarters = feats, quarters
        self.grid_spectrum, self.feats_spectrum = grid_spectrum, feats_spectrum

    def holds_depth(self, key) -> bool:
        """key: (points, mask, present, intrinsics, t_cam_lidar) of one scan."""
        return self.depth_key is not None and all(
            a.shape == b.shape and torch.equal(a, b) for a, b in zip(self.depth_key, key))

    def store_depth(self, key, depth) -> None:
        self.depth_key, self.depth = tuple(k.clone() for k in key), depth

    def holds_frame(self, image, depth) -> bool:
        """image (3, H, W) uint8 and depth (1, 1, 2, H, W) or None of a sample's first frame."""
        if self.frame_image is None or self.frame_image.shape != image.shape or \
                not torch.equal(self.frame_image, image):
            return False
        if depth is None or self.frame_depth is None:
            return depth is None and self.frame_depth is None
        return torch.equal(self.frame_depth, depth)

    def store_frame(self, image, depth, gray, feats) -> None:
        self.frame_image = image.clone()
        self.frame_depth = None if depth is None else depth.clone()
        self.frame_gray, self.frame_feats = gray, feats

    def weights_changed(self) -> None:
        self.feats = self.quarters = self.feats_spectrum = self.frame_feats = None


class PointNetEncoder(nn.Module):
    """Shared per-point MLP, masked max-pool per scan, then an MLP over both scans' features."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.out_dim = cfg.point_dim
        self.register_buffer('scale', torch.tensor(
            [cfg.bev_range_m, cfg.bev_range_m, cfg.bev_z_max, 1.0]), persistent=False)
        layers, c = [], 4
        for w in cfg.pointnet_widths:
            layers += [nn.Linear(c, w), nn.ReLU(inplace=True)]
            c = w
        self.mlp = nn.Sequential(*layers)
        self.merge = nn.Sequential(nn.Linear(3 * c, cfg.point_dim), nn.ReLU(inplace=True))

    def forward(self, points, points_mask):
        feats = self.mlp(points.float() / self.scale)      # (B, 2, N, C)
        feats = feats.masked_fill(~points_mask.unsqueeze(-1), float('-inf')).amax(dim=2)
        feats = torch.where(torch.isfinite(feats), feats, torch.zeros_like(feats))
        first, second = feats[:, 0], feats[:, 1]
        return self.merge(torch.cat([first, second, second - first], dim=-1))


class ImuEncoder(nn.Module):
    """1-D convolutions over the normalised K x 6 window plus a dt channel; the flattened raw
    window is also fed to the output layer, so a plain integral over time is one linear map."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.out_dim = cfg.imu_dim
        self.steps = cfg.imu_steps
        c = cfg.imu_channels
        self.conv = nn.Sequential(nn.Conv1d(7, c, 3, padding=1), nn.ReLU(inplace=True),
                                  nn.Conv1d(c, c, 3, padding=1), nn.ReLU(inplace=True))
        self.out = nn.Sequential(nn.Linear((c + 7) * self.steps, cfg.imu_dim),
                                 nn.ReLU(inplace=True))

    def forward(self, imu_norm, dt):
        if imu_norm.shape[1] != self.steps:
            raise ValueError(f'IMU window has {imu_norm.shape[1]} steps, the model expects '
                             f'imu_steps={self.steps}')
        dt_plane = (dt.float() * DT_SCALE).view(-1, 1, 1).expand(-1, 1, self.steps)
        x = torch.cat([imu_norm.transpose(1, 2), dt_plane], dim=1)            # (B, 7, K)
        return self.out(torch.cat([self.conv(x), x], dim=1).flatten(1))


class DummyEncoder(nn.Module):
    """Stand-in of any encoder: zeros of the slot's feature size, no parameters."""

    def __init__(self, out_dim: int):
        super().__init__()
        self.out_dim = out_dim

    def forward(self, first, *rest):
        return first.new_zeros((first.shape[0], self.out_dim), dtype=torch.float32)


def build_encoders(cfg: ModelConfig) -> dict:
    """{'visual', 'point', 'imu'} -> encoder modules chosen by the config."""
    visual = {'cnn': VisualEncoder, 'flow': FlowVisualEncoder}.get(cfg.visual_encoder)
    visual = visual(cfg) if visual else DummyEncoder(cfg.visual_dim)
    point = {'bev': BevPointEncoder, 'pointnet': PointNetEncoder}.get(cfg.point_encoder)
    point = point(cfg) if point else DummyEncoder(cfg.point_dim)
    imu = ImuEncoder(cfg) if cfg.imu_encoder == 'conv' else DummyEncoder(cfg.imu_dim)
    return {'visual': visual, 'point': point, 'imu': imu}
