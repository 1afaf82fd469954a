"""Self-supervised losses from the sample alone (DESIGN §9): no ground truth anywhere.

Each term takes the predicted relative pose, the head's de-normalised 6-vector (translation [m],
so(3) log [rad]) of T(k-1 <- k) in base_link (= velodyne), and the collated batch tensors, and
returns per-sample values (B,) with a validity mask (B,). A term is valid for a sample only when
its inputs are real (modality_mask) and its calibration is known (calib_valid), so a dead camera
or an unknown extrinsic never yields a bogus loss; an invalid sample's value is 0.

- geometric: scan k mapped into scan k-1 with the prediction, point-to-plane residuals against
  k-1 (normals from each matched point's neighbourhood in k-1), correspondences found again from
  the current prediction by nearest neighbour within a radius (scipy cKDTree on detached
  numbers), a truncated Cauchy kernel, and the ground limited to a share of the source points:
  the LiDAR's rings on flat ground move with the sensor and would read as zero motion, and the
  ground constrains only z, roll and pitch, so walls, poles and cars carry x, y and yaw.
- photometric: scan k projected into image k (intrinsics, t_cam_lidar), points hidden behind
  nearer ones dropped (a z-buffer), moved into frame k-1 with the prediction and image k-1
  sampled there (grid_sample); 3x3 patches compared with image k at the original pixels by
  SSIM + L1, over an image pyramid so that the coarse levels widen the basin.
- inertial: the gyro integrated over the part (t_prev, t_cur] of the IMU window, rotated into
  base_link with t_imu_lidar, against the predicted rotation; the gyro bias is allowed for by a
  dead band (bias bound x dt) under a Huber kernel.

The per-scan work of the geometric term (kd-tree, normals) is cached by the scan's content, so
a replayed sample or a scan seen again costs a hash.

The geometric term also comes in a solved form (SelfSupervisedLoss(solve_iterations=N)): the
first time a sample is trained on, Gauss-Newton (IRLS with the Cauchy weights) solves the same
objective from the prediction, and every step on it after that is the objective's quadratic
model at that solution, 1/2 d^T H d with H its Gauss-Newton Hessian. Online, a replay buffer
draws each sample many times; the direct term pays the correspondence search and normals every
time, the solved one once per sample. Pure torch + numpy + scipy; no rclpy.
"""
from collections import OrderedDict
from dataclasses import dataclass, field, fields, replace
import hashlib

import numpy as np
from scipy.spatial import cKDTree
from scipy.spatial.transform import Rotation
import torch
import torch.nn.functional as F

from mm_fusion_ros.model.feature_cache import row_key
from mm_fusion_ros.model.losses import so3_exp

TERMS = ('geometric', 'photometric', 'inertial')
CAMERA, LIDAR, IMU = range(3)          # modality_mask columns
INTRINSICS, CAM_LIDAR, IMU_LIDAR = range(3)   # calib_valid columns


@dataclass(frozen=True)
class SelfSupParams:
    """Tuning of the self-supervised terms (the weights live in TrainConfig)."""

    geo_points: int = field(default=4096, metadata={
        'help': 'source points of scan k per sample used by the geometric term'})
    geo_ground_z_m: float = field(default=-1.4, metadata={
        'help': 'points below this height in base_link count as ground (the road is 1.73 m '
                'below the LiDAR; cf. ModelConfig.bev_z_min)'})
    geo_ground_share: float = field(default=0.25, metadata={
        'help': 'largest share of the source points taken from the ground'})
    geo_max_dist_m: float = field(default=1.0, metadata={
        'help': 'correspondence radius: nearest neighbour in scan k-1 within this distance'})
    geo_kernel_m: float = field(default=0.1, metadata={
        'help': 'scale of the Cauchy kernel on point-to-plane residuals [m]'})
    geo_normal_k: int = field(default=10, metadata={
        'help': 'neighbours in scan k-1 whose plane gives a point its normal'})
    geo_normal_radius_m: float = field(default=1.5, metadata={
        'help': 'a neighbourhood wider than this gives no normal'})
    geo_planarity: float = field(default=0.05, metadata={
        'help': 'largest smallest-eigenvalue share of a neighbourhood that counts as a plane'})
    geo_min_pairs: int = field(default=64, metadata={
        'help': 'fewer correspondences than this: the term is invalid for the sample'})
    photo_levels: int = field(default=3, metadata={
        'help': 'image pyramid levels (each halves the resolution; coarse ones widen the basin)'})
    photo_ssim_weight: float = field(default=0.85, metadata={
        'help': 'share of SSIM (vs L1) in the photometric error'})
    photo_min_depth_m: float = field(default=1.0, metadata={
        'help': 'points nearer to the camera than this are not used'})
    photo_zbuffer_px: int = field(default=2, metadata={
        'help': 'z-buffer cell size [px of the full-resolution image]'})
    photo_occlusion_m: float = field(default=0.5, metadata={
        'help': 'a point deeper than its z-buffer cell nearest + this (+5 %) is occluded'})
    photo_min_points: int = field(default=32, metadata={
        'help': 'fewer visible points than this: the term is invalid for the sample'})
    gyro_bias_rad_s: float = field(default=0.002, metadata={
        'help': 'gyro bias (and noise) allowed for: the inertial residual has a dead band of '
                'this x dt; keep it well below the rotation of a straight-driving step'})
    gyro_scale_rad: float = field(default=0.0005, metadata={
        'help': 'rotation residual [rad] at which the inertial Huber kernel turns linear'})
    cache_scans: int = field(default=128, metadata={
        'help': 'scans whose kd-tree and normals are kept (about 1 MB each at 16384 points); '
                'with the solved geometric term at most SOLVED_CACHE_SCANS'})

    def __post_init__(self):
        for f in fields(self):
            if f.name != 'geo_ground_z_m' and getattr(self, f.name) < 0:
                raise ValueError(f'SelfSupParams.{f.name} must be >= 0, got '
                                 f'{getattr(self, f.name)}')
        if self.geo_normal_k < 3 or self.photo_levels < 1 or self.geo_max_dist_m <= 0 or \
                self.geo_kernel_m <= 0 or self.gyro_scale_rad <= 0:
            raise ValueError('SelfSupParams needs geo_normal_k >= 3, photo_levels >= 1 and '
                             'positive geo_max_dist_m, geo_kernel_m, gyro_scale_rad')
        if not 0.0 <= self.geo_ground_share <= 1.0 or not 0.0 <= self.photo_ssim_weight <= 1.0:
            raise ValueError('SelfSupParams shares must be in [0, 1]')


# --- rigid motion ----------------------------------------------------------------------------
def pose_matrices(pose6):
    """(B, 6) translation + so(3) log -> rotation (B, 3, 3) and translation (B, 3)."""
    return so3_exp(pose6[:, 3:]), pose6[:, :3]


def transform(rot, trans, points):
    """points (B, N, 3) -> R p + t."""
    return points @ rot.transpose(-1, -2) + trans.unsqueeze(-2)


# --- geometric -------------------------------------------------------------------------------
class _TargetScan:
    """Scan k-1 as a correspondence target: kd-tree, and normals computed on demand per point
    (only points that get matched need one; NaN = not computed yet, zero = no plane)."""

    def __init__(self, xyz: np.ndarray):
        self.xyz = xyz
        self.tree = cKDTree(xyz)
        self.normals = np.full(xyz.shape, np.nan, dtype=np.float32)

    def normals_at(self, idx: np.ndarray, p: SelfSupParams) -> np.ndarray:
        todo = np.unique(idx[np.isnan(self.normals[idx, 0])])
        if len(todo):
            k = min(p.geo_normal_k, len(self.xyz))
            dist, nb = self.tree.query(self.xyz[todo], k=k)
            c = self.xyz[nb] - self.xyz[nb].mean(axis=1, keepdims=True)   # (M, k, 3)
            cov = np.einsum('mki,mkj->mij', c, c)
            val, vec = np.linalg.eigh(cov)
            normal = vec[:, :, 0]
            planar = (val[:, 0] <= p.geo_planarity * val.sum(axis=1)) & \
                (val[:, 1] > 0.05 * val[:, 2]) & (dist[:, -1] <= p.geo_normal_radius_m)
            self.normals[todo] = np.where(planar[:, None], normal, 0.0)
        return self.normals[idx]


class ScanCache:
    """LRU of _TargetScan keyed by the scan's bytes, so replayed samples reuse their tree."""

    def __init__(self, size: int):
        self.size = size
        self.entries = OrderedDict()
        self.hits = self.misses = 0

    def get(self, xyz: np.ndarray) -> _TargetScan:
        key = hashlib.blake2b(np.ascontiguousarray(xyz).tobytes(), digest_size=16).digest()
        entry = self.entries.get(key)
        if entry is not None:
            self.entries.move_to_end(key)
            self.hits += 1
            return entry
        self.misses += 1
        entry = _TargetScan(xyz)
        if self.size > 0:
            self.entries[key] = entry
            while len(self.entries) > self.size:
                self.entries.popitem(last=False)
        return entry


def source_indices(xyz: np.ndarray, p: SelfSupParams) -> np.ndarray:
    """Indices of the source points used: at most geo_points, of which at most
    geo_ground_share from the ground; a fixed draw (seeded) so a sample always uses the same."""
    rng = np.random.default_rng(len(xyz))
    ground = xyz[:, 2] < p.geo_ground_z_m
    g_idx, s_idx = np.nonzero(ground)[0], np.nonzero(~ground)[0]
    n_ground = min(len(g_idx), int(round(p.geo_points * p.geo_ground_share)))
    n_struct = min(len(s_idx), p.geo_points - n_ground)
    pick = [rng.choice(g_idx, n_ground, replace=False), rng.choice(s_idx, n_struct, replace=False)]
    return np.sort(np.concatenate(pick))


def cauchy(residual, scale: float):
    """Cauchy (Lorentzian) kernel in units of scale: ~ (r/s)^2 near 0, log-growth beyond."""
    return torch.log1p((residual / scale).square())


def geometric_loss(pose6, points, points_mask, modality_mask, params: SelfSupParams,
                   cache: ScanCache = None):
    """Point-to-plane ICP objective of scan k moved into scan k-1 by the prediction.

    Value per sample: the mean over the used source points of the truncated kernel, where a
    point without a correspondence (none within geo_max_dist_m, or no plane there) counts as
    the truncation value, so leaving the overlap never lowers the loss.
    """
    b = pose6.shape[0]
    dev = pose6.device
    rot, trans = pose_matrices(pose6)
    rot_np = rot.detach().double().cpu().numpy()
    trans_np = trans.detach().double().cpu().numpy()
    pts = points[..., :3].detach().float().cpu().numpy()
    mask = points_mask.bool().cpu().numpy()
    lidar = modality_mask[:, LIDAR].bool().cpu().numpy()
    cache = cache or ScanCache(0)
    rows = []
    valid = np.zeros(b, dtype=bool)
    for i in range(b):
        if not lidar[i] or mask[i, 0].sum() < params.geo_normal_k or \
                mask[i, 1].sum() < params.geo_min_pairs:
            rows.append(None)
            continue
        target = cache.get(np.ascontiguousarray(pts[i, 0][mask[i, 0]]))
        src = pts[i, 1][mask[i, 1]]
        src = src[source_indices(src, params)]
        moved = src @ rot_np[i].T + trans_np[i]
        dist, j = target.tree.query(moved, distance_upper_bound=params.geo_max_dist_m)
        hit = np.isfinite(dist)
        normals = np.zeros_like(src)
        normals[hit] = target.normals_at(j[hit], params)
        hit &= normals.any(axis=1)
        valid[i] = hit.sum() >= params.geo_min_pairs
        rows.append((src[hit], target.xyz[j[hit]], normals[hit], len(src)))
    values = torch.zeros(b, device=dev)
    if not valid.any():
        return values + pose6.sum() * 0.0, torch.from_numpy(valid).to(dev)
    cap = float(np.log1p((params.geo_max_dist_m / params.geo_kernel_m) ** 2))
    width = max(len(r[0]) for r, v in zip(rows, valid) if v)
    src_t, tgt_t, nrm_t = (torch.zeros(b, width, 3) for _ in range(3))
    used = torch.zeros(b, width, dtype=torch.bool)
    totals = torch.ones(b)
    for i, row in enumerate(rows):
        if valid[i]:
            n = len(row[0])
            src_t[i, :n], tgt_t[i, :n], nrm_t[i, :n] = (torch.from_numpy(a) for a in row[:3])
            used[i, :n] = True
            totals[i] = row[3]
    src_t, tgt_t, nrm_t, used, totals = (x.to(dev) for x in (src_t, tgt_t, nrm_t, used, totals))
    moved = transform(rot.float(), trans.float(), src_t)
    residual = ((moved - tgt_t) * nrm_t).sum(-1)
    rho = cauchy(residual, params.geo_kernel_m).clamp(max=cap)
    matched = used.sum(-1)
    values = ((rho * used).sum(-1) + (totals - matched) * cap) / totals
    valid_t = torch.from_numpy(valid).to(dev)
    return torch.where(valid_t, values, torch.zeros_like(values)), valid_t


def solve_geometric(pose6, target: _TargetScan, src, params: SelfSupParams, iterations: int):
    """Gauss-Newton (IRLS with the Cauchy weights) of the geometric objective: `src` (scan k's
    used source points) moved by the pose into `target` (scan k-1), correspondences found again
    at every iteration, from pose6 (translation, so(3) log).

    Returns (pose6 at the solution, H (6, 6)), H the Gauss-Newton Hessian of the term's value
    (the mean of the Cauchy kernel over all len(src) source points) in the left perturbation
    R <- exp(dtheta) R, t <- exp(dtheta) t + dt, ordered (dt, dtheta); None where fewer than
    geo_min_pairs match.
    """
    rot = Rotation.from_rotvec(pose6[3:]).as_matrix()
    trans = np.array(pose6[:3], dtype=np.float64)
    for it in range(iterations + 1):
        moved = src @ rot.T + trans
        dist, j = target.tree.query(moved, distance_upper_bound=params.geo_max_dist_m)
        hit = np.isfinite(dist)
        normals = np.zeros_like(src)
        normals[hit] = target.normals_at(j[hit], params)
        hit &= normals.any(axis=1)
        if hit.sum() < params.geo_min_pairs:
            return None
        m, n = moved[hit], normals[hit]
        r = ((m - target.xyz[j[hit]]) * n).sum(axis=1)
        w = 1.0 / (1.0 + (r / params.geo_kernel_m) ** 2)
        jac = np.c_[n, np.cross(m, n)]          # d r / d (dt, dtheta)
        normal_eq = (jac * w[:, None]).T @ jac
        if it == iterations:
            break
        dx = -np.linalg.solve(normal_eq + 1e-9 * np.eye(6), (jac * w[:, None]).T @ r)
        d_rot = Rotation.from_rotvec(dx[3:]).as_matrix()
        rot, trans = d_rot @ rot, d_rot @ trans + dx[:3]
    # log1p((r/s)^2): gradient 2 w r / s^2, Gauss-Newton Hessian 2 w J^T J / s^2 per point.
    hessian = 2.0 * normal_eq / (params.geo_kernel_m ** 2 * len(src))
    return np.r_[trans, Rotation.from_matrix(rot).as_rotvec()], hessian


# The solved term's quadratic q is softened to SOLVED_SOFT * log1p(q / SOLVED_SOFT): equal near the
# solution, while a sample whose solution lies far from the prediction (a wrong minimum) pulls
# with a gradient that stops growing once q passes SOLVED_SOFT.
SOLVED_SOFT = 1.0
SOLVED_CACHE_SCANS = 2


class SolvedGeometric:
    """The geometric term in its solved form: per sample (keyed by its two scans) the
    Gauss-Newton solution and Hessian, solved once from the first prediction it is asked at."""

    def __init__(self, iterations: int, capacity: int, points: int = None):
        """points: source points per sample in the solve (None: the params' geo_points)."""
        if iterations < 1 or capacity < 1:
            raise ValueError(f'SolvedGeometric needs iterations >= 1 and capacity >= 1, got '
                             f'{iterations}, {capacity}')
        self.iterations, self.capacity, self.points = iterations, capacity, points
        self.solutions = OrderedDict()
        self.solved = self.reused = 0

    def _solution(self, i, pose6, batch, lidar, params, cache):
        points, points_mask = batch['points'], batch['points_mask']
        if not lidar[i]:
            # Not cached: the key (the points) does not say whether the LiDAR is present, and
            # a masked LiDAR (modality dropout) must neither store nor get a solution.
            return None
        key = row_key('geometric', batch, ('points', 'points_mask'), i)
        if key in self.solutions:
            self.solutions.move_to_end(key)
            self.reused += 1
            return self.solutions[key]
        self.solved += 1
        pts = points[i, ..., :3].detach().double().cpu().numpy()
        mask = points_mask[i].bool().cpu().numpy()
        found = None
        if lidar[i] and mask[0].sum() >= params.geo_normal_k and \
                mask[1].sum() >= params.geo_min_pairs:
            target = cache.get(np.ascontiguousarray(pts[0][mask[0]].astype(np.float32)))
            src = pts[1][mask[1]]
            own = params if self.points is None else replace(params, geo_points=self.points)
            found = solve_geometric(pose6[i].detach().double().cpu().numpy(), target,
                                    src[source_indices(src, own)], own, self.iterations)
        self.solutions[key] = found
        while len(self.solutions) > self.capacity:
            self.solutions.popitem(last=False)
        return found

    def offsets(self, pose6, batch: dict, params, cache):
        """Each sample's solution as seen from pose6: (d (B, 6), H (B, 6, 6), valid (B,)), d the
        left perturbation (dt, dtheta) that takes the solution to pose6 (zero where invalid)."""
        b, dev = pose6.shape[0], pose6.device
        lidar = batch['modality_mask'][:, LIDAR].bool().cpu().numpy()
        found = [self._solution(i, pose6, batch, lidar, params, cache) for i in range(b)]
        valid = torch.tensor([f is not None for f in found], device=dev)
        star = torch.tensor(np.stack([f[0] if f is not None else np.zeros(6) for f in found]),
                            dtype=torch.float32, device=dev)
        hess = torch.tensor(np.stack([f[1] if f is not None else np.zeros((6, 6))
                                      for f in found]), dtype=torch.float32, device=dev)
        rot, trans = pose_matrices(pose6.float())
        rel = rot @ so3_exp(star[:, 3:]).transpose(-1, -2)        # exp(dtheta)
        dtheta = torch.stack([rel[:, 2, 1] - rel[:, 1, 2], rel[:, 0, 2] - rel[:, 2, 0],
                              rel[:, 1, 0] - rel[:, 0, 1]], dim=-1) / 2.0
        dt = trans - (rel @ star[:, :3].unsqueeze(-1)).squeeze(-1)
        d = torch.cat([dt, dtheta], dim=-1)
        return torch.where(valid.unsqueeze(-1), d, torch.zeros_like(d)), hess, valid

    def __call__(self, pose6, batch: dict, params, cache):
        d, hess, valid = self.offsets(pose6, batch, params, cache)
        if not valid.any():
            return torch.zeros(pose6.shape[0], device=pose6.device) + pose6.sum() * 0.0, valid
        q = 0.5 * (d.unsqueeze(1) @ hess @ d.unsqueeze(-1)).reshape(-1)
        values = SOLVED_SOFT * torch.log1p(q.clamp(min=0.0) / SOLVED_SOFT)
        return torch.where(valid, values, torch.zeros_like(values)), valid


def point_displacement(d, points, mask):
    """(B,) mean squared displacement [m^2] of each sample's points (B, N, 3) where mask (B, N)
    under the small left perturbation d (B, 6) = (dt, dtheta): mean |dt + dtheta x p|^2. With
    the points of scan k in its own frame, not where the step moves them: the lever differs by
    the step itself (about a metre), a small share of the points' range."""
    moved = d[:, None, :3] + torch.cross(d[:, None, 3:].expand_as(points), points, dim=-1)
    mask = mask.to(points.dtype)
    return ((moved ** 2).sum(-1) * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)


# --- photometric -----------------------------------------------------------------------------
def project(points_cam, intrinsics):
    """(B, N, 3) camera-frame points -> pixel (u, v) (B, N, 2) and depth z (B, N)."""
    z = points_cam[..., 2]
    uvw = points_cam @ intrinsics.transpose(-1, -2)
    return uvw[..., :2] / z.clamp(min=1e-3).unsqueeze(-1), z


def zbuffer_visible(uv, z, ok, height, width, cell: int, slack_m: float):
    """Points not hidden by a nearer point of the same z-buffer cell (detached)."""
    b, n = z.shape
    cols = max(1, -(-width // cell))
    rows = max(1, -(-height // cell))
    cu = (uv[..., 0] / cell).floor().clamp(0, cols - 1).long()
    cv = (uv[..., 1] / cell).floor().clamp(0, rows - 1).long()
    flat = (torch.arange(b, device=z.device).unsqueeze(1) * rows + cv) * cols + cu
    depth = torch.where(ok, z, torch.full_like(z, float('inf')))
    nearest = torch.full((b * rows * cols,), float('inf'), device=z.device)
    nearest = nearest.scatter_reduce(0, flat.reshape(-1), depth.reshape(-1), reduce='amin')
    front = nearest[flat]
    return ok & (z <= front * 1.05 + slack_m)


PATCH = torch.tensor([(dx, dy) for dy in (-1, 0, 1) for dx in (-1, 0, 1)], dtype=torch.float32)


def sample_patches(image, uv):
    """image (B, C, H, W) float, uv (B, N, 2) pixel centres -> (B, C, N, 9) 3x3 patches."""
    _, _, h, w = image.shape
    grid = uv.unsqueeze(2) + PATCH.to(uv.device)                  # (B, N, 9, 2)
    scale = torch.tensor([2.0 / max(w - 1, 1), 2.0 / max(h - 1, 1)], device=uv.device)
    return F.grid_sample(image, grid * scale - 1.0, mode='bilinear', padding_mode='border',
                         align_corners=True)


def patch_error(a, b, ssim_weight: float):
    """SSIM + L1 dissimilarity of (B, C, N, 9) patches -> (B, N)."""
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    mu_a, mu_b = a.mean(-1), b.mean(-1)
    var_a = (a - mu_a.unsqueeze(-1)).square().mean(-1)
    var_b = (b - mu_b.unsqueeze(-1)).square().mean(-1)
    cov = ((a - mu_a.unsqueeze(-1)) * (b - mu_b.unsqueeze(-1))).mean(-1)
    ssim = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / \
        ((mu_a.square() + mu_b.square() + c1) * (var_a + var_b + c2))
    dissim = ((1.0 - ssim) / 2.0).clamp(0.0, 1.0).mean(1)
    l1 = (a - b).abs().mean(-1).mean(1)
    return ssim_weight * dissim + (1.0 - ssim_weight) * l1


def photometric_loss(pose6, image, points, points_mask, intrinsics, t_cam_lidar, modality_mask,
                     calib_valid, params: SelfSupParams):
    """Scan k's points seen in image k, warped into image k-1 by the prediction."""
    b = pose6.shape[0]
    dev = pose6.device
    usable = modality_mask[:, CAMERA].bool() & modality_mask[:, LIDAR].bool() & \
        calib_valid[:, INTRINSICS].bool() & calib_valid[:, CAM_LIDAR].bool()
    if not usable.any():
        return torch.zeros(b, device=dev) + pose6.sum() * 0.0, usable
    h, w = image.shape[-2:]
    K = intrinsics.float()
    rot_cl, t_cl = t_cam_lidar[:, :3, :3].float(), t_cam_lidar[:, :3, 3].float()
    with torch.no_grad():
        pts = points[:, 1, :, :3].float()
        ok = points_mask[:, 1].bool() & usable.unsqueeze(1)
        uv, z = project(transform(rot_cl, t_cl, pts), K)
        ok &= (z > params.photo_min_depth_m) & inside(uv, h, w)
        ok = zbuffer_visible(uv, z, ok, h, w, params.photo_zbuffer_px, params.photo_occlusion_m)
        # Only the points seen in image k go on (about a fifth of a scan): gathered and padded.
        width = max(int(ok.sum(-1).max()), 1)
        order = torch.argsort(ok.to(torch.int8), dim=1, descending=True, stable=True)[:, :width]
        pts = torch.gather(pts, 1, order.unsqueeze(-1).expand(-1, -1, 3))
        uv = torch.gather(uv, 1, order.unsqueeze(-1).expand(-1, -1, 2))
        ok = torch.gather(ok, 1, order)
    rot, trans = pose_matrices(pose6.float())
    warped_uv, warped_z = project(transform(rot_cl, t_cl, transform(rot, trans, pts)), K)
    with torch.no_grad():
        ok &= (warped_z > params.photo_min_depth_m) & inside(warped_uv, h, w)
        ok = zbuffer_visible(warped_uv.detach(), warped_z.detach(), ok, h, w,
                             params.photo_zbuffer_px, params.photo_occlusion_m)
    count = ok.sum(-1)
    valid = usable & (count >= params.photo_min_points)
    frames = image.float() / 255.0
    prev, cur = frames[:, 0], frames[:, 1]
    total = torch.zeros(b, device=dev)
    levels = 0
    for level in range(params.photo_levels):
        s = 2 ** level
        if min(h, w) // s < 4:
            break
        levels += 1
        if level:
            prev, cur = F.avg_pool2d(prev, 2), F.avg_pool2d(cur, 2)
        # pixel centres of a level-s image: (u + 0.5) / s - 0.5
        with torch.no_grad():
            reference = sample_patches(cur, (uv + 0.5) / s - 0.5)
        err = patch_error(sample_patches(prev, (warped_uv + 0.5) / s - 0.5), reference,
                          params.photo_ssim_weight)
        total = total + (err * ok).sum(-1) / count.clamp(min=1)
    values = total / max(levels, 1)    # the levels computed (small images have fewer)
    return torch.where(valid, values, torch.zeros_like(values)), valid


def inside(uv, height, width, margin=1.0):
    return (uv[..., 0] >= margin) & (uv[..., 0] <= width - 1 - margin) & \
        (uv[..., 1] >= margin) & (uv[..., 1] <= height - 1 - margin)


# --- inertial --------------------------------------------------------------------------------
def gyro_rotation(imu, dt, imu_span, t_imu_lidar, steps: int = 20):
    """Rotation (B, 3, 3) of base_link over (t_prev, t_cur] from the gyro of the IMU window.

    The window's K rows sit evenly over [t_cur - imu_span, t_cur]; the gyro is interpolated
    linearly at `steps` + 1 times over the last dt of it, rotated into base_link
    (w_base = R_imu_lidar^T w_imu) and integrated by midpoint steps, right-multiplied.
    """
    b, k, _ = imu.shape
    gyro = imu[..., 3:].double()
    span = imu_span.double().clamp(min=1e-6)
    frac = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64, device=imu.device)
    t = (span - dt.double()).unsqueeze(1) + frac * dt.double().unsqueeze(1)   # from window start
    pos = (t / span.unsqueeze(1) * (k - 1)).clamp(0, k - 1)
    lo = pos.floor().long().clamp(max=k - 2)
    a = (pos - lo).unsqueeze(-1)
    gather = lambda idx: torch.gather(gyro, 1, idx.unsqueeze(-1).expand(-1, -1, 3))  # noqa: E731
    w = gather(lo) * (1 - a) + gather(lo + 1) * a                               # (B, S+1, 3)
    w = w @ t_imu_lidar[:, :3, :3].double()       # row vectors: (R^T w)^T = w^T R
    mid = 0.5 * (w[:, 1:] + w[:, :-1]) * (dt.double() / steps).view(b, 1, 1)
    rot = torch.eye(3, dtype=torch.float64, device=imu.device).expand(b, 3, 3)
    for step in so3_exp(mid).unbind(1):
        rot = rot @ step
    return rot


def huber(x, delta: float = 1.0):
    return torch.where(x <= delta, 0.5 * x.square(), delta * (x - 0.5 * delta))


def inertial_loss(pose6, imu, dt, imu_span, t_imu_lidar, modality_mask, calib_valid,
                  params: SelfSupParams):
    """Robust distance of the predicted rotation to the gyro-integrated one (bias allowed)."""
    b = pose6.shape[0]
    valid = modality_mask[:, IMU].bool() & calib_valid[:, IMU_LIDAR].bool() & \
        (imu_span >= dt - 1e-4) & (dt > 0)
    if not valid.any():
        return torch.zeros(b, device=pose6.device) + pose6.sum() * 0.0, valid
    with torch.no_grad():
        gyro = gyro_rotation(imu, dt, imu_span, t_imu_lidar).float()
    err = gyro.transpose(-1, -2) @ so3_exp(pose6[:, 3:].float())
    # sin(angle) * axis: smooth everywhere, zero exactly at the gyro's rotation.
    vee = torch.stack([err[:, 2, 1] - err[:, 1, 2], err[:, 0, 2] - err[:, 2, 0],
                       err[:, 1, 0] - err[:, 0, 1]], dim=-1) / 2.0
    angle = torch.sqrt(vee.square().sum(-1) + 1e-12) - 1e-6
    excess = (angle - params.gyro_bias_rad_s * dt.float()).clamp(min=0.0)
    values = huber(excess / params.gyro_scale_rad)
    return torch.where(valid, values, torch.zeros_like(values)), valid


# --- all terms ---------------------------------------------------------------------------
def term_available(batch: dict, term: str):
    """(B,) samples whose inputs and calibration a term needs are there (checked before the
    term itself, which may still find too few points or pairs)."""
    m, c = batch['modality_mask'].bool(), batch['calib_valid'].bool()
    if term == 'geometric':
        return m[:, LIDAR]
    if term == 'photometric':
        return m[:, CAMERA] & m[:, LIDAR] & c[:, INTRINSICS] & c[:, CAM_LIDAR]
    if term == 'inertial':
        return m[:, IMU] & c[:, IMU_LIDAR]
    raise ValueError(f'self-supervised term {term!r} unknown; choose from {", ".join(TERMS)}')


class SelfSupervisedLoss:
    """The three terms on a batch, with the geometric term's scan cache kept across calls."""

    def __init__(self, params: SelfSupParams = None, solve_iterations: int = 0,
                 solve_capacity: int = 1024, solve_points: int = None):
        """solve_iterations > 0: the geometric term in its solved form (SolvedGeometric),
        keeping the solutions of up to solve_capacity samples, solved with solve_points source
        points each (None: params.geo_points)."""
        self.params = params or SelfSupParams()
        # Solved, a target scan's tree serves the one solve of the sample whose first scan it
        # is (the solution is kept), so a few trees do: keeping cache_scans of them (~1 MB
        # each) grew the learner's memory long after its replay buffer was full.
        scans = self.params.cache_scans if solve_iterations <= 0 else \
            min(self.params.cache_scans, SOLVED_CACHE_SCANS)
        self.cache = ScanCache(scans)
        self.solved = SolvedGeometric(solve_iterations, solve_capacity, solve_points) \
            if solve_iterations > 0 else None

    def __call__(self, pose6, batch: dict, terms=TERMS) -> dict:
        """{term: (values (B,), valid (B,))} for the requested terms."""
        p = self.params
        out = {}
        for term in terms:
            if term == 'geometric' and self.solved is not None:
                out[term] = self.solved(pose6, batch, p, self.cache)
            elif term == 'geometric':
                out[term] = geometric_loss(pose6, batch['points'], batch['points_mask'],
                                           batch['modality_mask'], p, self.cache)
            elif term == 'photometric':
                out[term] = photometric_loss(pose6, batch['image'], batch['points'],
                                             batch['points_mask'], batch['intrinsics'],
                                             batch['t_cam_lidar'], batch['modality_mask'],
                                             batch['calib_valid'], p)
            elif term == 'inertial':
                out[term] = inertial_loss(pose6, batch['imu'], batch['dt'], batch['imu_span'],
                                          batch['t_imu_lidar'], batch['modality_mask'],
                                          batch['calib_valid'], p)
            else:
                raise ValueError(f'self-supervised term {term!r} unknown; choose from '
                                 f'{", ".join(TERMS)}')
        return out
