"""An HDL-64E-like spinning LiDAR, ray-cast against the synthetic world.

64 beams from +2 to -24.9 deg (upper block 1/3 deg apart down to -8.33, lower block ~0.52 deg);
other beam counts or fields of view are spaced evenly from top_deg to bottom_deg;
one ray per beam and azimuth step, range <= 120 m with Gaussian range noise. Reflectance comes
from the surface material and the angle of incidence. Rays that hit nothing (sky, or farther
than the range) return no point. Points are in the sensor (= base_link) frame, beam by beam
from the top beam down, each beam starting behind the vehicle and turning clockwise as the
Velodyne does. The scan is taken at one instant (no motion skew within a revolution).

Default azimuth steps: 2000 per revolution (0.18 deg), what an HDL-64E gives at KITTI's 10 Hz
(~1.3 M points/s); with KITTI-like streets that yields 100k-125k points, as KITTI scans have.
"""
from dataclasses import dataclass

import numpy as np

from mm_fusion_ros.synthetic.raycast import cast, RayGrid, surfaces


@dataclass(frozen=True)
class LidarConfig:
    beams: int = 64
    azimuth_steps: int = 2000
    max_range: float = 120.0     # m
    min_range: float = 1.0       # m, nearer returns are the vehicle itself
    range_noise: float = 0.02    # m, sigma
    top_deg: float = 2.0
    bottom_deg: float = -24.9

    def __post_init__(self):
        if self.beams < 1:
            raise ValueError(f'LiDAR beams must be >= 1, got {self.beams}')
        if self.azimuth_steps < 8:
            raise ValueError(f'LiDAR azimuth_steps must be >= 8, got {self.azimuth_steps}')
        if not self.bottom_deg < self.top_deg:
            raise ValueError(f'LiDAR field of view needs bottom_deg < top_deg, got '
                             f'{self.bottom_deg}, {self.top_deg}')
        if not 0 < self.min_range < self.max_range:
            raise ValueError(f'LiDAR range must satisfy 0 < min_range < max_range, got '
                             f'{self.min_range}, {self.max_range}')


def beam_elevations(cfg: LidarConfig) -> np.ndarray:
    """Beam elevations [rad], descending: the HDL-64E's two blocks for 64 beams over its own
    field of view; otherwise evenly spaced over [bottom_deg, top_deg], so fewer beams keep the
    whole vertical field of view (32 beams over the HDL-64E's 26.9 deg: 0.87 deg apart)."""
    if cfg.beams == 64 and (cfg.top_deg, cfg.bottom_deg) == (2.0, -24.9):
        # The HDL-64E's two blocks of 32 lasers.
        deg = np.concatenate([np.linspace(cfg.top_deg, -8.33, 32),
                              np.linspace(-8.83, cfg.bottom_deg, 32)])
    else:
        deg = np.linspace(cfg.top_deg, cfg.bottom_deg, cfg.beams)
    return np.radians(deg)


class Lidar:
    def __init__(self, cfg: LidarConfig = LidarConfig()):
        self.cfg = cfg
        self.elevation = beam_elevations(cfg)
        # Azimuth of column j: pi at j = 0 (behind), decreasing (clockwise seen from above).
        self.azimuth = np.pi - 2.0 * np.pi * np.arange(cfg.azimuth_steps) / cfg.azimuth_steps
        el, az = np.meshgrid(self.elevation, self.azimuth, indexing='ij')
        self.dirs = np.stack([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az),
                              np.sin(el)]).astype(np.float32)

    def blocks(self, world, idx, pose):
        """(primitive, beam slice, azimuth slice) blocks each primitive can reach from `pose`.

        Bounds are computed in a yaw-only sensor frame from the primitive's oriented box, then
        widened by the sensor's tilt, so they are conservative.
        """
        if not len(idx):
            return []
        cfg = self.cfg
        prims = world.prims
        o, rot = pose[:3, 3], pose[:3, :3]
        yaw = np.arctan2(rot[1, 0], rot[0, 0])
        tilt = float(np.arccos(np.clip(rot[2, 2], -1.0, 1.0)))
        margin = tilt + np.radians(0.3)
        c, h, pyaw = prims.center[idx], prims.half[idx], prims.yaw[idx]
        # Sensor position in each primitive's local frame -> horizontal distance to its box.
        rx, ry = o[0] - c[:, 0], o[1] - c[:, 1]
        cs, sn = np.cos(pyaw), np.sin(pyaw)
        lx, ly = np.abs(cs * rx + sn * ry) - h[:, 0], np.abs(-sn * rx + cs * ry) - h[:, 1]
        inside = (lx < 0.5) & (ly < 0.5)
        dmin = np.hypot(np.maximum(lx, 0.0), np.maximum(ly, 0.0))
        corners = prims.corners(idx)[:, ::2, :2] - o[:2]
        dmax = np.linalg.norm(corners, axis=2).max(axis=1)
        zlo, zhi = c[:, 2] - h[:, 2] - o[2], c[:, 2] + h[:, 2] - o[2]
        el_hi = np.arctan2(zhi, np.where(zhi > 0, dmin, dmax)) + margin
        el_lo = np.arctan2(zlo, np.where(zlo < 0, dmin, dmax)) - margin
        center_az = np.arctan2(-ry, -rx)
        rel = np.arctan2(corners[..., 1], corners[..., 0]) - center_az[:, None]
        rel = (rel + np.pi) % (2.0 * np.pi) - np.pi
        step = 2.0 * np.pi / cfg.azimuth_steps
        az_hi = center_az + rel.max(axis=1) - yaw + margin + step
        az_lo = center_az + rel.min(axis=1) - yaw - margin - step

        neg_el = -self.elevation  # ascending
        row0 = np.searchsorted(neg_el, -el_hi, side='left')
        row1 = np.searchsorted(neg_el, -el_lo, side='right')
        scale = cfg.azimuth_steps / (2.0 * np.pi)
        col0 = np.floor((np.pi - az_hi) * scale).astype(np.int64)
        col1 = np.ceil((np.pi - az_lo) * scale).astype(np.int64) + 1
        out = []
        for k, i in enumerate(idx):
            if row1[k] <= row0[k]:
                continue
            rows = slice(int(row0[k]), int(row1[k]))
            out.extend((int(i), rows, cols) for cols in
                       _wrapped_columns(col0[k], col1[k], cfg.azimuth_steps, inside[k]))
        return out

    def rays(self, pose) -> RayGrid:
        rot = pose[:3, :3].astype(np.float32)
        dirs = (rot @ self.dirs.reshape(3, -1)).reshape(self.dirs.shape)
        return RayGrid(origin=pose[:3, 3].astype(np.float64), dirs=dirs,
                       t_min=self.cfg.min_range, t_max=self.cfg.max_range)

    def scan(self, world, pose, rng) -> np.ndarray:
        """(M, 4) float32 x, y, z, reflectance in the sensor frame at world pose `pose`."""
        rays = self.rays(pose)
        idx = world.near(rays.origin, self.cfg.max_range)
        blocks = self.blocks(world, idx, pose)
        hits = cast(world, rays, blocks)
        surf = surfaces(world, rays, hits, blocks)
        valid = np.isfinite(hits.t)
        count = int(valid.sum())
        rng_t = hits.t[valid] + rng.normal(0.0, self.cfg.range_noise, count).astype(np.float32)
        d = rays.dirs[:, valid]
        cos = np.abs(np.sum(d * surf.normal[:, valid], axis=0))
        intensity = surf.reflectance[valid] * (0.35 + 0.65 * cos) \
            + rng.normal(0.0, 0.01, count).astype(np.float32)
        points = np.empty((count, 4), dtype=np.float32)
        points[:, :3] = (self.dirs[:, valid] * rng_t).T
        points[:, 3] = np.clip(intensity, 0.0, 1.0)
        return points


def _wrapped_columns(col0, col1, steps, full):
    """Column slices covering [col0, col1) modulo steps (or everything)."""
    if full or col1 - col0 >= steps:
        return [slice(0, steps)]
    shift = (col0 // steps) * steps
    col0, col1 = int(col0 - shift), int(col1 - shift)
    if col1 <= steps:
        return [slice(col0, col1)]
    return [slice(col0, steps), slice(0, col1 - steps)]
