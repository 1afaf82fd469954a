"""Camera geometry of the visual flow encoder: calibration, LiDAR depth in the image, and the
ground-plane sweep that measures the vehicle's planar motion between two frames.

Calibration is a pair of batch tensors: `intrinsics` (B, 3, 3) of the image as the model sees it
(after resizing) and `t_cam_lidar` (B, 4, 4) mapping base_link (= velodyne) points into the camera
(optical axes). A batch that carries both keys uses them; otherwise the model falls back to
KITTI 00's camera 2 scaled to its input size, which is exactly what the synthetic world renders.

Ground sweep (inverse perspective mapping). The road around the car is nearly a plane at
`ground_height_m` below base_link; sampling an image at the projections of a metric grid of
that plane gives a top-down view of the road in which the car's planar motion between frames
k-1 and k is a rotation by the yaw and a shift by the translation. For every yaw hypothesis,
frame k's view is sampled on the grid rotated by that yaw, and one FFT cross-correlation with
frame k-1's view scores every translation at once. The peak of the (yaw, x, y) score volume is
the step, in metres and radians, before any training (as the BEV point encoder's raw-grid
correlation is for the LiDAR). Measured in docs/stage2_tracking.md.
"""
import torch
import torch.nn.functional as F

from mm_fusion_ros.synthetic.camera import kitti_calib

# KITTI's camera frames were recorded at 1241 x 376 (synthetic/camera.py).
DEFAULT_SOURCE_SIZE = (1241, 376)


def default_calibration(height: int, width: int):
    """(intrinsics (3, 3), t_cam_lidar (4, 4)) float32: KITTI 00's camera 2 for a frame resized
    from 1241 x 376 to width x height (pixel centres map as PIL's resize maps them)."""
    calib = kitti_calib()
    sx, sy = width / DEFAULT_SOURCE_SIZE[0], height / DEFAULT_SOURCE_SIZE[1]
    k = torch.tensor(calib.K2, dtype=torch.float64)
    k[0, 0] *= sx
    k[1, 1] *= sy
    k[0, 2] = (k[0, 2] + 0.5) * sx - 0.5
    k[1, 2] = (k[1, 2] + 0.5) * sy - 0.5
    return k.float(), torch.tensor(calib.T_cam2_velo, dtype=torch.float32)


def project(points, intrinsics, t_cam_lidar):
    """(..., 3) base_link points -> pixel (u, v) (..., 2) and optical depth z (...).

    intrinsics / t_cam_lidar broadcast against the points' leading dims (e.g. (B, 1, 1, 3, 3)
    for (B, X, Y, 3) points). Written out per row: batched 3x3 matmuls over many points are
    several times slower on CPU."""
    proj = intrinsics @ t_cam_lidar[..., :3, :]
    x, y, z = points.unbind(-1)
    u, v, w = (proj[..., i, 0] * x + proj[..., i, 1] * y + proj[..., i, 2] * z +
               proj[..., i, 3] for i in range(3))
    return torch.stack([u, v], dim=-1) / w.clamp(min=1e-3).unsqueeze(-1), w


def pixel_grid(uv, height: int, width: int):
    """Pixel coordinates -> grid_sample coordinates (align_corners=False)."""
    return torch.stack([(uv[..., 0] + 0.5) / width * 2.0 - 1.0,
                        (uv[..., 1] + 0.5) / height * 2.0 - 1.0], dim=-1)


def lidar_depth_image(points, points_mask, present, intrinsics, t_cam_lidar, height: int,
                      width: int, max_depth: float = 80.0):
    """Scans (B, S, N, 4) -> (B, S, 2, H, W): inverse depth [1/m] x 4 of the nearest point per
    pixel, and a 0/1 channel saying where a point landed. Samples whose LiDAR is not `present`
    (B,) get zeros, exactly like a pixel no point reached."""
    b, s, n, _ = points.shape
    uv, z = project(points[..., :3].float(), intrinsics.view(b, 1, 1, 3, 3),
                    t_cam_lidar.view(b, 1, 1, 4, 4))
    u, v = torch.round(uv[..., 0]).long(), torch.round(uv[..., 1]).long()
    keep = points_mask & present.view(b, 1, 1) & (z > 0.5) & (z < max_depth) & \
        (u >= 0) & (u < width) & (v >= 0) & (v < height)
    cells = b * s * height * width
    base = torch.arange(b * s, device=points.device).view(b, s, 1) * (height * width)
    index = torch.where(keep, base + v.clamp(0, height - 1) * width + u.clamp(0, width - 1),
                        cells).reshape(-1)
    inv = (4.0 / z.clamp(min=0.5)).reshape(-1)
    depth = points.new_zeros(cells + 1, dtype=torch.float32).scatter_reduce_(
        0, index, inv, 'amax', include_self=True)[:cells]
    hit = points.new_zeros(cells + 1, dtype=torch.float32).index_fill_(0, index, 1.0)[:cells]
    return torch.stack([depth.view(b, s, height, width), hit.view(b, s, height, width)], dim=2)


def ground_cells(near: float, far: float, half_width: float, cell: float):
    """Metric ground grid (X, Y, 2) of cell centres in base_link: rows x (near to far),
    columns y (right to left), as the BEV grids."""
    xs = torch.arange(near + cell / 2, far, cell, dtype=torch.float32)
    ys = torch.arange(-half_width + cell / 2, half_width, cell, dtype=torch.float32)
    return torch.stack(torch.meshgrid(xs, ys, indexing='ij'), dim=-1)


def ground_homography(intrinsics, t_cam_lidar, ground_z: float):
    """(B, 3, 3) maps ground points (x, y, 1) of base_link (z = ground_z) to image pixels
    (homogeneous)."""
    proj = intrinsics @ t_cam_lidar[..., :3, :]
    return torch.stack([proj[..., 0], proj[..., 1], proj[..., 2] * ground_z + proj[..., 3]],
                       dim=-1)


def planar_motion(yaw, shift=None):
    """(..., 3, 3) homogeneous 2-D maps g -> R(-yaw) (g - shift): where a ground point g of frame
    k-1 lies in frame k after the car turned by yaw and moved by shift (..., 2)."""
    c, s = torch.cos(yaw), torch.sin(yaw)
    zero, one = torch.zeros_like(c), torch.ones_like(c)
    if shift is None:
        tx = ty = zero
    else:
        tx = -(c * shift[..., 0] + s * shift[..., 1])
        ty = s * shift[..., 0] - c * shift[..., 1]
    return torch.stack([c, s, tx, -s, c, ty, zero, zero, one], dim=-1).view(*c.shape, 3, 3)


def ground_view(image, homography, cells, pixel_size=None):
    """Sample image (B, C, H, W) at the ground cells (X, Y, 2) of a regular grid through
    per-view homographies (B, J, 3, 3) -> (B, J, C, X, Y); zero outside the image and behind
    the camera.

    pixel_size: (height, width) of the frame the homography's pixels refer to, when `image` is
    a feature map covering that frame at a lower resolution."""
    b, j = homography.shape[:2]
    nx, ny = cells.shape[:2]
    h, w = pixel_size or image.shape[-2:]
    # Pixel -> grid_sample coordinates folded into the homography: g = (2 / w) u + 1 / w - 1.
    to_grid = torch.tensor([[2.0 / w, 0.0, 1.0 / w - 1.0], [0.0, 2.0 / h, 1.0 / h - 1.0],
                            [0.0, 0.0, 1.0]], dtype=homography.dtype, device=homography.device)
    hm = to_grid @ homography
    # On a regular grid each row of H applied to (x, y, 1) is a sum of an x and a y part; the
    # three rows at once (B, J, 3, X, Y): few, larger ops (per-op overhead dominated on CPU).
    x, y = cells[:, 0, 0].view(nx, 1), cells[0, :, 1].view(1, ny)
    hm = hm.unsqueeze(-1).unsqueeze(-1)
    uvd = hm[..., 0, :, :] * x + (hm[..., 1, :, :] * y + hm[..., 2, :, :])
    d = uvd[:, :, 2]
    # (B, J, 2, X, Y) moved last: a strided view grid_sample reads as it is (stacking along the
    # last dim interleaves element by element, ~2x slower on CPU); same values.
    grid = (uvd[:, :, :2] * d.clamp(min=1e-3).reciprocal().unsqueeze(2)).movedim(2, -1)
    # One grid_sample per image, the J views stacked along the output rows (no image copies).
    view = F.grid_sample(image, grid.reshape(b, j * nx, ny, 2), align_corners=False)
    view = view.view(b, -1, j, nx, ny).transpose(1, 2)
    return view * (d > 0.1).to(view.dtype).unsqueeze(2)


def fft_size(n: int) -> int:
    """Smallest 5-smooth integer >= n: FFTs of such sizes are several times faster."""
    while True:
        m = n
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        if m == 1:
            return n
        n += 1


def shift_correlation(first, second, max_x: int, max_y: int):
    """Cross-correlation sum_g <first(g + d), second(g)> over shifts |d_x| <= max_x,
    |d_y| <= max_y cells, zero-padded (no wrap-around): (B, C, X, Y), (B, J, C, X, Y) ->
    (B, J, 2 max_x + 1, 2 max_y + 1)."""
    # Zero padding by the largest shift is enough to keep wrapped-around products out.
    size = (fft_size(first.shape[-2] + max_x), fft_size(first.shape[-1] + max_y))
    spec = torch.fft.rfft2(first.float(), s=size).unsqueeze(1) * \
        torch.fft.rfft2(second.float(), s=size).conj()
    corr = torch.fft.irfft2(spec.sum(dim=2), s=size)
    corr = torch.roll(corr, shifts=(max_x, max_y), dims=(-2, -1))
    return corr[..., :2 * max_x + 1, :2 * max_y + 1]


def peak_soft_argmax(scores, axes, window, log_beta):
    """Sub-cell peak of a (B, D1, D2, ...) score volume: softmax(beta * standardised scores)
    within `window` cells per axis of the hard maximum (so a far-off secondary peak does not
    pull the estimate toward the middle), expectation of each axis' values -> (B, n_axes).

    axes: one 1-D tensor of values per score axis."""
    b = scores.shape[0]
    flat = scores.flatten(1)
    z = (flat - flat.mean(dim=1, keepdim=True)) / (flat.std(dim=1, keepdim=True) + 1e-6)
    best = torch.unravel_index(z.argmax(dim=1), scores.shape[1:])
    near = torch.ones_like(z, dtype=torch.bool).view_as(scores)
    for i, (idx, win) in enumerate(zip(best, window)):
        pos = torch.arange(scores.shape[1 + i], device=scores.device)
        shape = [1] * scores.dim()
        shape[1 + i] = -1
        near = near & ((pos.view(shape) - idx.view([b] + [1] * (scores.dim() - 1))).abs()
                       <= win)
    weights = torch.softmax(torch.where(near.flatten(1), z * log_beta.exp(),
                                        torch.full_like(z, -1e4)), dim=1).view_as(scores)
    out = []
    for i, values in enumerate(axes):
        dims = [d for d in range(1, scores.dim()) if d != 1 + i]
        out.append((weights.sum(dim=dims) * values.to(weights.dtype)).sum(dim=1))
    return torch.stack(out, dim=1), z.amax(dim=1)


def box_mean(x, box: int, dim: int):
    """Mean over a window of `box` (odd) along dim, clipped at the borders; by cumulative sums,
    several times faster on CPU than avg_pool2d."""
    r, n = box // 2, x.shape[dim]
    pad = [0, 0] * (x.dim() - 1 - dim % x.dim()) + [r + 1, r]
    c = F.pad(x, pad).cumsum(dim)
    sums = c.narrow(dim, box, n) - c.narrow(dim, 0, n)
    i = torch.arange(n, device=x.device)
    count = (torch.clamp(i + r, max=n - 1) - torch.clamp(i - r, min=0) + 1).to(x.dtype)
    shape = [1] * x.dim()
    shape[dim] = n
    return sums / count.view(shape)


def high_pass_gray(image, box: int):
    """(B, 3, H, W) normalised frames -> (B, 1, H, W) grey minus its local box mean: keeps the
    texture that moves with the road, drops shading and haze that stay with the camera."""
    gray = image.mean(dim=1, keepdim=True)
    return gray - box_mean(box_mean(gray, box, -1), box, -2)
