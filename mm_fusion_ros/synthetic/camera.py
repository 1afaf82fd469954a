"""Camera 2 of the synthetic world: KITTI-like calibration and a per-pixel ray-cast render.

Every pixel's ray is cast against the same primitives the LiDAR sees, so a LiDAR point projected
through P2 * Tr lands on a pixel whose rendered depth is the point's depth. Shading: Lambert sun
plus sky light, no shadows; distance haze toward a sky gradient; procedural textures from the
world's materials, faded with distance so they do not alias.

Exposure (a domain setting, off by default): the linear image is scaled by 2**EV, gets
Poisson-Gaussian sensor noise (variance ~ read + signal), saturates at white, then passes a
gamma tone curve before 8-bit quantisation.
"""
from dataclasses import dataclass

import numpy as np

from mm_fusion_ros.geometry import make_pose
from mm_fusion_ros.kitti.odometry import Calib
from mm_fusion_ros.synthetic.raycast import cast, RayGrid, surfaces
from mm_fusion_ros.synthetic.world import SKY_ID

KITTI_SIZE = (1241, 376)  # width, height of KITTI odometry 00-02 images
# KITTI odometry 00 calib.txt: shared rectified K, each camera's P[:, 3], and Tr (velo -> cam0).
KITTI_K = np.array([[7.188560e+02, 0.0, 6.071928e+02],
                    [0.0, 7.188560e+02, 1.852157e+02],
                    [0.0, 0.0, 1.0]])
KITTI_P_OFFSETS = np.array([[0.0, 0.0, 0.0],
                            [-3.861448e+02, 0.0, 0.0],
                            [4.538225e+01, -1.130887e-01, 3.779761e-03],
                            [-3.372877e+02, 2.369057e+00, 4.915215e-03]])
KITTI_TR = np.array([[4.276802385584e-04, -9.999672484946e-01, -8.084491683471e-03,
                      -1.198459927713e-02],
                     [-7.210626507497e-03, 8.081198471645e-03, -9.999413164504e-01,
                      -5.403984729748e-02],
                     [9.999738645903e-01, 4.859485810390e-04, -7.206933692422e-03,
                      -2.921968648686e-01],
                     [0.0, 0.0, 0.0, 1.0]])

HAZE = np.array([0.78, 0.82, 0.87], dtype=np.float32)
ZENITH = np.array([0.32, 0.50, 0.80], dtype=np.float32)


def kitti_calib(width=KITTI_SIZE[0], height=KITTI_SIZE[1]) -> Calib:
    """KITTI 00's calibration with intrinsics scaled to width x height.

    Each camera keeps its metric offset from cam0 (K^-1 P[:, 3]); Tr's rotation is
    re-orthonormalised so poses converted with it stay rotations to 1e-12.
    """
    if width < 8 or height < 8:
        raise ValueError(f'image size {width}x{height} too small (>= 8x8)')
    sx, sy = width / KITTI_SIZE[0], height / KITTI_SIZE[1]
    k = KITTI_K * np.array([[sx], [sy], [1.0]])
    offsets = np.linalg.solve(KITTI_K, KITTI_P_OFFSETS.T).T  # metres in each camera
    P = np.stack([np.hstack([k, (k @ t)[:, None]]) for t in offsets])
    u, _, vt = np.linalg.svd(KITTI_TR[:3, :3])
    tr = KITTI_TR.copy()
    tr[:3, :3] = u @ vt
    return Calib(P=P, Tr=tr)


@dataclass(frozen=True)
class CameraModel:
    width: int
    height: int
    fx: float
    fy: float
    cx: float
    cy: float

    @classmethod
    def from_calib(cls, calib: Calib, width: int, height: int) -> 'CameraModel':
        k = calib.K2
        return cls(int(width), int(height), float(k[0, 0]), float(k[1, 1]), float(k[0, 2]),
                   float(k[1, 2]))


class Camera:
    """Renders camera 2. Depth is the optical-axis depth z (inf where only sky is seen)."""

    def __init__(self, model: CameraModel, max_depth=160.0, near=0.3, haze_scale=90.0,
                 exposure_ev=0.0, gamma=1.0, noise=0.0):
        self.model = model
        self.max_depth, self.near, self.haze_scale = max_depth, near, haze_scale
        self.gain, self.gamma, self.noise = 2.0 ** exposure_ev, gamma, noise
        u = (np.arange(model.width) - model.cx) / model.fx
        v = (np.arange(model.height) - model.cy) / model.fy
        uu, vv = np.meshgrid(u, v)
        self.dirs = np.stack([uu, vv, np.ones_like(uu)]).astype(np.float32)

    def blocks(self, world, idx, pose):
        """(primitive, row slice, column slice): the image rectangle each primitive can cover,
        from its oriented box's corners in the camera frame (conservative)."""
        if not len(idx):
            return []
        m = self.model
        rot, o = pose[:3, :3], pose[:3, 3]
        cam = (world.prims.corners(idx) - o) @ rot  # (n, 8, 3) in the camera frame
        lo, hi = cam.min(axis=1), cam.max(axis=1)
        z0 = np.maximum(lo[:, 2], self.near)
        z1 = hi[:, 2]
        keep = (z1 > self.near) & (lo[:, 2] < self.max_depth)

        def extent(a0, a1):
            top = np.where(a1 >= 0, a1 / z0, a1 / z1)
            bottom = np.where(a0 <= 0, a0 / z0, a0 / z1)
            return bottom, top

        x_lo, x_hi = extent(lo[:, 0], hi[:, 0])
        y_lo, y_hi = extent(lo[:, 1], hi[:, 1])
        c0 = np.clip(np.floor(m.fx * x_lo + m.cx), 0, m.width).astype(np.int64)
        c1 = np.clip(np.ceil(m.fx * x_hi + m.cx) + 1, 0, m.width).astype(np.int64)
        r0 = np.clip(np.floor(m.fy * y_lo + m.cy), 0, m.height).astype(np.int64)
        r1 = np.clip(np.ceil(m.fy * y_hi + m.cy) + 1, 0, m.height).astype(np.int64)
        keep &= (c1 > c0) & (r1 > r0)
        return [(int(i), slice(int(r0[k]), int(r1[k])), slice(int(c0[k]), int(c1[k])))
                for k, i in enumerate(idx) if keep[k]]

    def rays(self, pose) -> RayGrid:
        rot = pose[:3, :3].astype(np.float32)
        dirs = (rot @ self.dirs.reshape(3, -1)).reshape(self.dirs.shape)
        return RayGrid(origin=pose[:3, 3].astype(np.float64), dirs=dirs, t_min=self.near,
                       t_max=self.max_depth)

    def render(self, world, pose, rng=None):
        """-> (rgb (H, W, 3) uint8, depth (H, W) float32) for camera pose T_world_cam.
        rng: the generator of this frame's sensor noise (needed when noise > 0)."""
        rays = self.rays(pose)
        idx = world.near(rays.origin, self.max_depth)
        blocks = self.blocks(world, idx, pose)
        hits = cast(world, rays, blocks)
        surf = surfaces(world, rays, hits, blocks, pixel_angle=1.0 / self.model.fx)
        color = self._shade(world, rays, hits, surf)
        if self.gain != 1.0 or self.gamma != 1.0 or self.noise:
            color = self._expose(color, rng)
        rgb = np.clip(color * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.ascontiguousarray(rgb.transpose(1, 2, 0)), hits.t

    def _expose(self, color, rng):
        """Linear image (3, H, W) -> exposed, noisy, saturated, tone-mapped image in [0, 1]."""
        color = color * np.float32(self.gain)
        if self.noise:
            if rng is None:
                raise ValueError('camera noise > 0 needs a generator: render(..., rng)')
            sigma = np.float32(self.noise / 255.0) * np.sqrt(0.5 + np.clip(color, 0.0, 1.0))
            color += sigma * rng.standard_normal(color.shape, dtype=np.float32)
        color = np.clip(color, 0.0, 1.0)
        if self.gamma != 1.0:
            color **= np.float32(1.0 / self.gamma)
        return color

    def _shade(self, world, rays, hits, surf):
        sun = np.asarray(world.style.sun, dtype=np.float32)
        n = surf.normal
        sun_light = np.clip(np.tensordot(sun, n, axes=1), 0.0, None)
        light = 0.32 + 0.22 * (0.5 + 0.5 * n[2]) + 0.72 * sun_light
        color = surf.albedo * light
        depth = np.where(np.isfinite(hits.t), hits.t, np.float32(self.max_depth))
        fog = np.exp(-depth / self.haze_scale).astype(np.float32)
        d = rays.dirs
        elevation = d[2] / np.sqrt(np.sum(d * d, axis=0))
        up = np.clip(elevation * 2.5, 0.0, 1.0) ** 0.7
        sky = HAZE[:, None, None] + (ZENITH - HAZE)[:, None, None] * up
        color = color * fog + HAZE[:, None, None] * (1.0 - fog)
        return np.where(hits.ids == SKY_ID, sky, color)


def camera_pose(velo_pose, calib: Calib) -> np.ndarray:
    """T_world_cam2 from T_world_velo."""
    T_cam2_velo = calib.T_cam2_velo
    rot = T_cam2_velo[:3, :3].T
    return velo_pose @ make_pose(rot, -rot @ T_cam2_velo[:3, 3])
