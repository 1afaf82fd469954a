"""Street scenes of the synthetic world: a road with markings along the route, sidewalks, verges,
facades, parked cars, trees, street lamps, signs and walls, on a ground that follows the route's
height. The world frame is x east, y north, z up.

Everything here is a pure function of the Route and a numpy Generator, so a (seed, sequence)
pair always builds the same world. Objects are analytic primitives (yaw-oriented boxes,
vertical cylinders, spheres) that the LiDAR and the camera ray-cast alike (raycast.py); their
materials give both the camera's albedo and the LiDAR's reflectance.
"""
from dataclasses import dataclass, field
import logging

import numpy as np
from scipy.ndimage import distance_transform_edt, gaussian_filter
from scipy.spatial import cKDTree

log = logging.getLogger(__name__)

BOX, CYLINDER, SPHERE = 0, 1, 2
GROUND_ID, SKY_ID = -2, -1  # ray ids that are not objects

# Materials (index into the tables below).
FACADE, WALL, CAR, CABIN, METAL, TRUNK, FOLIAGE, SIGN = range(8)
REFLECTANCE = np.array([0.45, 0.40, 0.50, 0.10, 0.60, 0.35, 0.45, 0.90], dtype=np.float32)
GLASS = np.array([0.10, 0.13, 0.17], dtype=np.float32)
GLASS_REFLECTANCE = 0.06

FACADE_COLORS = np.array([[0.78, 0.72, 0.60], [0.62, 0.62, 0.64], [0.66, 0.38, 0.30],
                          [0.86, 0.85, 0.80], [0.80, 0.62, 0.38], [0.52, 0.56, 0.60],
                          [0.72, 0.66, 0.70]], dtype=np.float32)
CAR_COLORS = np.array([[0.85, 0.85, 0.86], [0.12, 0.12, 0.13], [0.55, 0.56, 0.58],
                       [0.60, 0.08, 0.07], [0.10, 0.20, 0.45], [0.30, 0.33, 0.30],
                       [0.80, 0.70, 0.30]], dtype=np.float32)
SIGN_COLORS = np.array([[0.90, 0.90, 0.88], [0.10, 0.30, 0.70], [0.80, 0.12, 0.10]],
                       dtype=np.float32)


@dataclass(frozen=True)
class Style:
    """The look of one sequence's streets, drawn once per (seed, sequence)."""

    lane_width: float
    parking_width: float
    sidewalk_width: float
    building_height: tuple
    open_lot_probability: float
    car_probability: float
    tree_probability: float
    lamp_spacing: float
    asphalt: float
    sidewalk: float
    grass: tuple
    sun: tuple

    @property
    def road_center(self) -> float:
        """Lateral offset of the centre line from the vehicle path (it drives the right lane)."""
        return 0.5 * self.lane_width

    @property
    def road_half_width(self) -> float:
        return self.lane_width + self.parking_width


def draw_style(rng) -> Style:
    low = rng.uniform(5.0, 12.0)
    sun_az, sun_el = rng.uniform(0.0, 2.0 * np.pi), rng.uniform(np.radians(30), np.radians(65))
    return Style(
        lane_width=rng.uniform(3.0, 3.6), parking_width=rng.uniform(2.0, 2.6),
        sidewalk_width=rng.uniform(2.5, 4.5), building_height=(low, low + rng.uniform(5.0, 20.0)),
        open_lot_probability=rng.uniform(0.05, 0.3), car_probability=rng.uniform(0.3, 0.8),
        tree_probability=rng.uniform(0.3, 0.9), lamp_spacing=rng.uniform(22.0, 40.0),
        asphalt=rng.uniform(0.20, 0.32), sidewalk=rng.uniform(0.45, 0.62),
        grass=tuple(rng.uniform([0.20, 0.32, 0.12], [0.35, 0.45, 0.22])),
        sun=(float(np.cos(sun_el) * np.cos(sun_az)), float(np.cos(sun_el) * np.sin(sun_az)),
             float(np.sin(sun_el))))


class NoiseTile:
    """A 256 x 256 periodic value-noise tile in [-0.5, 0.5], sampled bilinearly.

    Several scales of one tile give texture at every distance without per-pixel hashing.
    """

    SIZE = 256

    def __init__(self, rng):
        raw = gaussian_filter(rng.random((self.SIZE, self.SIZE)), 1.0, mode='wrap')
        raw = (raw - raw.min()) / max(raw.max() - raw.min(), 1e-9) - 0.5
        self.flat = raw.astype(np.float32).ravel()

    def __call__(self, u, v):
        """Noise at continuous tile coordinates (u, v) (one cell = one unit)."""
        fu, fv = np.floor(u), np.floor(v)
        au, av = (u - fu).astype(np.float32), (v - fv).astype(np.float32)
        iu = fu.astype(np.int64) & (self.SIZE - 1)
        iv = fv.astype(np.int64) & (self.SIZE - 1)
        iu1, iv1 = (iu + 1) & (self.SIZE - 1), (iv + 1) & (self.SIZE - 1)
        t = self.flat
        row0 = t[iv * self.SIZE + iu] * (1 - au) + t[iv * self.SIZE + iu1] * au
        row1 = t[iv1 * self.SIZE + iu] * (1 - au) + t[iv1 * self.SIZE + iu1] * au
        return row0 * (1 - av) + row1 * av


def _lod(footprint, feature_size):
    """Weight of a texture detail of `feature_size` metres seen at `footprint` metres/pixel:
    1 when it spans several pixels, fading to 0 before it would alias."""
    return np.clip(1.5 - footprint / feature_size, 0.0, 1.0).astype(np.float32)


class GroundMap:
    """The ground: a smooth height field that follows the route, plus route-relative
    coordinates (lateral offset, arc length) for the road texture.

    A raster covers the route's bounding box plus a margin. Each cell knows its nearest route
    sample (exact Euclidean distance transform); heights are that sample's road height,
    Gaussian-smoothed so the surface has no seams. Lateral/along coordinates are computed exactly
    from the nearest sample's tangent line, so lane markings are sharp at any raster resolution.
    """

    def __init__(self, route, style: Style, noise: NoiseTile, margin=180.0, max_cells=8e6):
        self.route = route
        self.style = style
        self.noise = noise
        lo = route.xy.min(axis=0) - margin
        hi = route.xy.max(axis=0) + margin
        area = float(np.prod(hi - lo))
        self.res = max(1.0, float(np.sqrt(area / max_cells)))
        self.inv_res = 1.0 / self.res
        self.x0, self.y0 = float(lo[0]), float(lo[1])
        self.nx = int(np.ceil((hi[0] - lo[0]) / self.res)) + 2
        self.ny = int(np.ceil((hi[1] - lo[1]) / self.res)) + 2
        ix = np.rint((route.xy[:, 0] - self.x0) * self.inv_res).astype(np.int64)
        iy = np.rint((route.xy[:, 1] - self.y0) * self.inv_res).astype(np.int64)
        owner = np.full((self.ny, self.nx), -1, dtype=np.int32)
        owner[iy, ix] = np.arange(len(route.xy), dtype=np.int32)
        near_y, near_x = distance_transform_edt(owner < 0, return_distances=False,
                                                return_indices=True)
        self.nearest = owner[near_y, near_x].ravel()
        del near_y, near_x
        heights = route.z[self.nearest].reshape(self.ny, self.nx)
        self.heights = gaussian_filter(heights, 4.0 / self.res, mode='nearest') \
            .astype(np.float32).ravel()
        self.route_xy = route.xy.astype(np.float64)
        self.route_t = route.tangent.astype(np.float64)
        self.route_s = route.s.astype(np.float64)

    def _cells(self, x, y):
        # Points off the raster take the edge cell's plane (np.minimum/maximum: cheaper than clip).
        gx = np.minimum(np.maximum((np.asarray(x) - self.x0) * self.inv_res, 0.0), self.nx - 1.0)
        gy = np.minimum(np.maximum((np.asarray(y) - self.y0) * self.inv_res, 0.0), self.ny - 1.0)
        ix = np.minimum(gx.astype(np.int64), self.nx - 2)
        iy = np.minimum(gy.astype(np.int64), self.ny - 2)
        return iy * self.nx + ix, (gx - ix).astype(np.float32), (gy - iy).astype(np.float32)

    def height_grad(self, x, y):
        """Bilinear height and its gradient (dh/dx, dh/dy) at world points."""
        i, fx, fy = self._cells(x, y)
        h = self.heights
        h00, h10, h01, h11 = h[i], h[i + 1], h[i + self.nx], h[i + self.nx + 1]
        lo = h00 + (h10 - h00) * fx
        hi = h01 + (h11 - h01) * fx
        gx = ((h10 - h00) * (1 - fy) + (h11 - h01) * fy) * self.inv_res
        return lo + (hi - lo) * fy, gx, (hi - lo) * self.inv_res

    def height(self, x, y):
        return self.height_grad(x, y)[0]

    def max_rise(self, origin, plane, radius) -> float:
        """Highest the ground gets above the plane (h0, dh/dx, dh/dy) at origin, within radius
        metres: rays that stay higher than that cannot hit the ground."""
        h0, gx, gy = plane
        cx = int((origin[0] - self.x0) * self.inv_res)
        cy = int((origin[1] - self.y0) * self.inv_res)
        r = int(np.ceil(radius * self.inv_res)) + 1
        x0, x1 = max(cx - r, 0), min(cx + r + 1, self.nx)
        y0, y1 = max(cy - r, 0), min(cy + r + 1, self.ny)
        if x1 <= x0 or y1 <= y0:
            return 0.0
        window = self.heights.reshape(self.ny, self.nx)[y0:y1, x0:x1]
        xs = self.x0 + self.res * np.arange(x0, x1) - origin[0]
        ys = self.y0 + self.res * np.arange(y0, y1) - origin[1]
        plane_z = h0 + gx * xs[None, :] + gy * ys[:, None]
        return max(float(np.max(window - plane_z)), 0.0)

    def route_coordinates(self, x, y):
        """(lateral offset left of the route, arc length) at world points."""
        gx = np.rint((np.asarray(x) - self.x0) * self.inv_res).astype(np.int64)
        gy = np.rint((np.asarray(y) - self.y0) * self.inv_res).astype(np.int64)
        near = self.nearest[np.clip(gy, 0, self.ny - 1) * self.nx + np.clip(gx, 0, self.nx - 1)]
        rx = x - self.route_xy[near, 0]
        ry = y - self.route_xy[near, 1]
        tx, ty = self.route_t[near, 0], self.route_t[near, 1]
        return (tx * ry - ty * rx).astype(np.float32), \
            (self.route_s[near] + tx * rx + ty * ry).astype(np.float32)

    def surface(self, x, y, footprint):
        """Road, markings, curb, sidewalk slabs, verge: albedo (k, 3), reflectance (k,)."""
        st, noise = self.style, self.noise
        lateral, along = self.route_coordinates(x, y)
        dl = lateral - st.road_center
        a = np.abs(dl)
        half = st.road_half_width
        xs, ys = x.astype(np.float32), y.astype(np.float32)
        fine = _lod(footprint, 0.25)
        # Grain, patches and stains: texture at every scale for visual odometry.
        grain = 0.16 * _lod(footprint, 0.08) * noise(xs * 12.0, ys * 12.0) \
            + 0.14 * fine * noise(xs * 4.0, ys * 4.0) + 0.12 * noise(xs * 0.6, ys * 0.6) \
            + 0.10 * noise(xs * 0.11 + 40.0, ys * 0.11)
        value = np.full(a.shape, st.asphalt, dtype=np.float32) + grain
        refl = np.full(a.shape, 0.12, dtype=np.float32) + 0.1 * grain

        paint = ((a < 0.075) & (_frac(along / 9.0) < 0.4)) \
            | (np.abs(a - st.lane_width) < 0.06) \
            | ((a > st.lane_width) & (a < half) & (_frac(along / 6.0) < 0.02))
        curb = (a >= half) & (a < half + 0.25)
        walk = (a >= half + 0.25) & (a < half + st.sidewalk_width)
        joints = (_frac(along / 1.2) < 0.03) | (_frac((a - half) / 1.2) < 0.03)
        verge = a >= half + st.sidewalk_width
        value = np.where(paint & (a < half), 0.85 + 0.3 * grain, value)
        refl = np.where(paint & (a < half), 0.6, refl)
        value = np.where(curb, 0.62 + grain, value)
        refl = np.where(curb, 0.35, refl)
        slab = st.sidewalk + 0.6 * grain - 0.12 * (joints * _lod(footprint, 0.08))
        value = np.where(walk, slab, value)
        refl = np.where(walk, 0.28 + 0.2 * grain, refl)

        albedo = np.repeat(value[:, None], 3, axis=1)
        albedo[:, 2] *= 1.04
        if verge.any():
            xv, yv, fv = xs[verge], ys[verge], fine[verge]
            blades = 0.8 + 0.5 * fv * noise(xv * 2.5 + 7.0, yv * 2.5) \
                + 0.5 * noise(xv * 0.4, yv * 0.4 + 9.0)
            dirt = np.clip(0.5 + 1.5 * noise(xv * 0.07, yv * 0.07 + 3.0), 0.0, 1.0)[:, None]
            grass = np.asarray(st.grass, dtype=np.float32)
            albedo[verge] = (grass * (1 - dirt) + np.float32([0.40, 0.34, 0.26]) * dirt) \
                * blades[:, None]
            refl[verge] = 0.35 + 0.2 * (blades - 0.8)
        return np.clip(albedo, 0.0, 1.0), np.clip(refl, 0.0, 1.0)


def _frac(x):
    return x - np.floor(x)


@dataclass
class Primitives:
    """Analytic scene objects. Boxes: centre, half extents (local x, y, z), yaw about z.
    Cylinders (vertical): centre, half = (r, r, half height). Spheres: centre, half = (r, r, r).
    params: per-material numbers (window grid for facades, ...)."""

    kind: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int8))
    center: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))
    half: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))
    yaw: np.ndarray = field(default_factory=lambda: np.zeros(0))
    material: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int16))
    color: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), np.float32))
    params: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))

    def __len__(self):
        return len(self.kind)

    def corners(self, idx=slice(None)) -> np.ndarray:
        """(n, 8, 3) corners of each primitive's oriented bounding box."""
        c, h, yaw = self.center[idx], self.half[idx], self.yaw[idx]
        signs = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)],
                         dtype=np.float64)
        local = signs[None] * h[:, None, :]
        cs, sn = np.cos(yaw)[:, None], np.sin(yaw)[:, None]
        out = np.empty_like(local)
        out[..., 0] = c[:, None, 0] + cs * local[..., 0] - sn * local[..., 1]
        out[..., 1] = c[:, None, 1] + sn * local[..., 0] + cs * local[..., 1]
        out[..., 2] = c[:, None, 2] + local[..., 2]
        return out

    def bound_radius(self) -> np.ndarray:
        """Horizontal radius of a circle around the centre containing the primitive."""
        return np.hypot(self.half[:, 0], self.half[:, 1])


class _PrimitiveList:
    """Accumulates primitives while a world is built, then freezes them into arrays."""

    def __init__(self):
        self.rows = []

    def add(self, kind, center, half, yaw, material, color, params=(0, 0, 0, 0)):
        self.rows.append((kind, tuple(center), tuple(half), float(yaw), material,
                          tuple(color), tuple(params)))

    def freeze(self) -> Primitives:
        if not self.rows:
            return Primitives()
        kind, center, half, yaw, material, color, params = zip(*self.rows)
        return Primitives(kind=np.array(kind, np.int8), center=np.array(center, np.float64),
                          half=np.array(half, np.float64), yaw=np.array(yaw, np.float64),
                          material=np.array(material, np.int16),
                          color=np.array(color, np.float32), params=np.array(params, np.float32))


class World:
    """A built scene: ground map, primitives, and a spatial index for distance culling."""

    def __init__(self, route, style: Style, ground: GroundMap, prims: Primitives,
                 noise: NoiseTile):
        self.route, self.style, self.ground, self.prims, self.noise = \
            route, style, ground, prims, noise
        self._radius = prims.bound_radius()
        self._max_radius = float(self._radius.max()) if len(prims) else 0.0
        self._tree = cKDTree(prims.center[:, :2]) if len(prims) else None

    def near(self, position, radius: float) -> np.ndarray:
        """Sorted indices of primitives within `radius` metres (horizontally) of position."""
        if self._tree is None:
            return np.zeros(0, dtype=np.int64)
        idx = np.asarray(self._tree.query_ball_point(position[:2], radius + self._max_radius),
                         dtype=np.int64)
        dist = np.linalg.norm(self.prims.center[idx, :2] - position[:2], axis=1)
        return np.sort(idx[dist - self._radius[idx] <= radius])


def build_world(route, rng, scene='street') -> World:
    """The scene along `route` (objects on both sides, never on the road)."""
    if scene != 'street':
        raise ValueError(f'scene {scene!r} not known; choose street')
    style = draw_style(rng)
    noise = NoiseTile(rng)
    ground = GroundMap(route, style, noise)
    builder = _StreetBuilder(route, style, ground, rng)
    prims = builder.build()
    log.debug('world: %d primitives along %.0f m of road', len(prims), route.s[-1] - route.s[0])
    return World(route, style, ground, prims, noise)


class _StreetBuilder:
    """Places objects along the route, side by side, rejecting any that would stand on a road
    (of this or another part of the route, where a real route crosses itself)."""

    def __init__(self, route, style: Style, ground: GroundMap, rng):
        self.route, self.style, self.ground, self.rng = route, style, ground, rng
        self.tree = cKDTree(route.xy)
        self.out = _PrimitiveList()
        self.normal = route.normal
        self.heading = np.arctan2(route.tangent[:, 1], route.tangent[:, 0])

    def build(self) -> Primitives:
        for side in (1.0, -1.0):
            self._buildings(side)
            self._cars(side)
            self._trees(side)
            self._lamps(side)
            self._signs(side)
        return self.out.freeze()

    # -- helpers ---------------------------------------------------------------------------
    def _at(self, s, lateral):
        """World xy, heading and ground height at arc length s and lateral offset."""
        i = int(np.clip(np.searchsorted(self.route.s, s), 0, len(self.route.s) - 1))
        xy = self.route.xy[i] + lateral * self.normal[i]
        return xy, float(self.heading[i]), float(self.ground.height(xy[0], xy[1]))

    def _edge(self, side):
        st = self.style
        return st.road_center + side * st.road_half_width

    def _clear(self, xy_points, distance):
        """True when every point keeps `distance` metres from the vehicle path."""
        dist, _ = self.tree.query(np.atleast_2d(xy_points))
        return bool(np.all(dist >= distance))

    @staticmethod
    def _rect(center, heading, half_len, half_wid, step=2.0):
        """Points along the outline of a rotated rectangle (for clearance checks)."""
        n = max(2, int(2 * half_len / step) + 1)
        m = max(2, int(2 * half_wid / step) + 1)
        u = np.concatenate([np.linspace(-half_len, half_len, n), np.full(m, half_len),
                            np.linspace(-half_len, half_len, n), np.full(m, -half_len)])
        v = np.concatenate([np.full(n, -half_wid), np.linspace(-half_wid, half_wid, m),
                            np.full(n, half_wid), np.linspace(-half_wid, half_wid, m)])
        c, s = np.cos(heading), np.sin(heading)
        return np.stack([center[0] + c * u - s * v, center[1] + s * u + c * v], axis=1)

    def _base_height(self, outline):
        return float(self.ground.height(outline[:, 0], outline[:, 1]).min()) - 0.3

    def _span(self):
        return float(self.route.s[0]), float(self.route.s[-1])

    # -- objects ---------------------------------------------------------------------------
    def _buildings(self, side):
        st, rng = self.style, self.rng
        s, end = self._span()
        s += rng.uniform(0.0, 10.0)
        inner_base = abs(self._edge(side)) + st.sidewalk_width
        while s < end:
            if rng.random() < st.open_lot_probability:
                gap = rng.uniform(10.0, 30.0)
                self._wall(side, s, gap, inner_base + rng.uniform(0.0, 1.0))
                s += gap
                continue
            length, depth = rng.uniform(10.0, 35.0), rng.uniform(8.0, 18.0)
            height = rng.uniform(*st.building_height)
            inner = inner_base + rng.uniform(0.5, 4.0)
            xy, heading, _ = self._at(s + 0.5 * length, side * (inner + 0.5 * depth))
            outline = self._rect(xy, heading, 0.5 * length, 0.5 * depth)
            if self._clear(outline, inner - 1.0):
                base = self._base_height(outline)
                color = FACADE_COLORS[rng.integers(len(FACADE_COLORS))] \
                    * rng.uniform(0.85, 1.1, size=3)
                params = (rng.uniform(2.2, 3.8), rng.uniform(2.8, 3.6), rng.uniform(0.0, 3.0),
                          rng.uniform(0.18, 0.32))
                self.out.add(BOX, (xy[0], xy[1], base + 0.5 * height),
                             (0.5 * length, 0.5 * depth, 0.5 * height), heading, FACADE,
                             np.clip(color, 0, 1), params)
            s += length + rng.uniform(0.5, 6.0)

    def _wall(self, side, s, length, inner):
        rng = self.rng
        if rng.random() < 0.5 or length < 4.0:
            return
        height = rng.uniform(0.8, 2.2)
        xy, heading, _ = self._at(s + 0.5 * length, side * (inner + 0.15))
        outline = self._rect(xy, heading, 0.5 * length, 0.15)
        if self._clear(outline, inner - 1.0):
            base = self._base_height(outline)
            color = (0.55, 0.53, 0.50) if rng.random() < 0.5 else (0.60, 0.32, 0.25)
            self.out.add(BOX, (xy[0], xy[1], base + 0.5 * height),
                         (0.5 * length, 0.15, 0.5 * height), heading, WALL, color)

    def _cars(self, side):
        st, rng = self.style, self.rng
        s, end = self._span()
        lateral = self._edge(side) - side * 0.5 * st.parking_width
        while s < end:
            slot = rng.uniform(5.5, 8.0)
            if rng.random() < st.car_probability:
                length, width = rng.uniform(3.9, 4.8), rng.uniform(1.7, 1.9)
                xy, heading, _ = self._at(s + 0.5 * slot, lateral + rng.normal(0.0, 0.1))
                heading += rng.normal(0.0, 0.03)
                outline = self._rect(xy, heading, 0.5 * length, 0.5 * width, step=1.0)
                if self._clear(outline, 1.5):
                    self._car(xy, heading, length, width, self._base_height(outline) + 0.3)
            s += slot

    def _car(self, xy, heading, length, width, ground):
        rng = self.rng
        color = CAR_COLORS[rng.integers(len(CAR_COLORS))]
        body_h = rng.uniform(0.7, 0.9)
        bottom = ground + 0.25
        self.out.add(BOX, (xy[0], xy[1], bottom + 0.5 * body_h),
                     (0.5 * length, 0.5 * width, 0.5 * body_h), heading, CAR, color)
        cab_len, cab_h = rng.uniform(0.45, 0.6) * length, rng.uniform(0.45, 0.6)
        back = rng.uniform(-0.15, 0.05) * length
        cx = xy[0] + np.cos(heading) * back
        cy = xy[1] + np.sin(heading) * back
        self.out.add(BOX, (cx, cy, bottom + body_h + 0.5 * cab_h),
                     (0.5 * cab_len, 0.5 * width - 0.08, 0.5 * cab_h), heading, CABIN, color)

    def _trees(self, side):
        st, rng = self.style, self.rng
        s, end = self._span()
        s += rng.uniform(0.0, 8.0)
        while s < end:
            step = rng.uniform(8.0, 20.0)
            if rng.random() < st.tree_probability:
                lateral = self._edge(side) + side * rng.uniform(0.8, 1.6)
                xy, heading, ground = self._at(s, lateral)
                crown = rng.uniform(1.2, 2.8)
                if self._clear(xy, crown + 1.2):
                    self._tree(xy, heading, ground, crown)
            s += step

    def _tree(self, xy, heading, ground, crown):
        rng = self.rng
        trunk_r, trunk_h = rng.uniform(0.12, 0.3), rng.uniform(2.0, 3.5)
        self.out.add(CYLINDER, (xy[0], xy[1], ground - 0.2 + 0.5 * (trunk_h + 0.2)),
                     (trunk_r, trunk_r, 0.5 * (trunk_h + 0.2)), 0.0, TRUNK, (0.32, 0.24, 0.16))
        green = np.clip(np.array([0.20, 0.38, 0.14]) * rng.uniform(0.7, 1.3, size=3), 0, 1)
        top = ground + trunk_h + 0.6 * crown
        if rng.random() < 0.3:  # clipped hedge-like crown
            self.out.add(BOX, (xy[0], xy[1], top), (0.8 * crown, 0.8 * crown, 0.7 * crown),
                         heading + rng.uniform(0, np.pi / 2), FOLIAGE, green)
        else:
            self.out.add(SPHERE, (xy[0], xy[1], top), (crown, crown, crown), 0.0, FOLIAGE,
                         green)

    def _lamps(self, side):
        st, rng = self.style, self.rng
        s, end = self._span()
        s += rng.uniform(0.0, st.lamp_spacing)
        while s < end:
            lateral = self._edge(side) + side * 0.45
            xy, heading, ground = self._at(s, lateral)
            if self._clear(xy, 1.5):
                height, radius = rng.uniform(6.0, 9.0), rng.uniform(0.08, 0.12)
                self.out.add(CYLINDER, (xy[0], xy[1], ground - 0.2 + 0.5 * (height + 0.2)),
                             (radius, radius, 0.5 * (height + 0.2)), 0.0, METAL,
                             (0.45, 0.46, 0.48))
                arm = 1.8
                toward_road = -side * np.array([-np.sin(heading), np.cos(heading)])
                cxy = xy + toward_road * 0.5 * arm
                self.out.add(BOX, (cxy[0], cxy[1], ground + height - 0.1),
                             (0.1, 0.5 * arm, 0.08), heading, METAL, (0.40, 0.41, 0.43))
            s += st.lamp_spacing * rng.uniform(0.9, 1.1)

    def _signs(self, side):
        rng = self.rng
        s, end = self._span()
        s += rng.uniform(0.0, 60.0)
        while s < end:
            lateral = self._edge(side) + side * rng.uniform(0.4, 1.0)
            xy, heading, ground = self._at(s, lateral)
            if self._clear(xy, 1.5):
                post = rng.uniform(2.0, 2.6)
                self.out.add(CYLINDER, (xy[0], xy[1], ground - 0.2 + 0.5 * (post + 0.2)),
                             (0.04, 0.04, 0.5 * (post + 0.2)), 0.0, METAL, (0.5, 0.5, 0.5))
                plate = rng.uniform(0.3, 0.45)
                # The plate faces traffic: its thin axis runs along the road.
                self.out.add(BOX, (xy[0], xy[1], ground + post + plate), (0.03, plate, plate),
                             heading, SIGN, SIGN_COLORS[rng.integers(len(SIGN_COLORS))])
            s += rng.uniform(40.0, 120.0)


# -- materials -------------------------------------------------------------------------------
def object_surface(noise: NoiseTile, material: int, color, params, half, center, face, u, v,
                   footprint):
    """Albedo (k, 3) and reflectance (k,) of hits on one object.

    face: 0..5 = box faces +x -x +y -y +z -z (cylinders/spheres: 0 side, 4 top);
    u, v: metres along the face horizontally and up from the object's bottom.
    """
    k = len(u)
    color = np.asarray(color, dtype=np.float32)
    # The object's position shifts its patch of the noise tile, so no two objects look alike.
    tone = 1.0 + 0.25 * noise(u * 2.0 + 0.37 * center[0], v * 2.0 + 0.37 * center[1]) \
        + 0.3 * noise(u * 0.3 + 0.11 * center[1], v * 0.3 + 0.11 * center[0])
    albedo = color[None, :] * tone[:, None]
    refl = np.full(k, REFLECTANCE[material], dtype=np.float32) * tone
    top = face == 4
    if material == FACADE:
        spacing, floor_h, offset, half_width = params
        wu = _frac((u + offset) / spacing)
        wv = _frac((v - 0.5) / floor_h)
        lod = _lod(footprint, 0.5)
        window = (np.abs(wu - 0.5) < half_width) & (wv > 0.3) & (wv < 0.85) \
            & (v > 3.0) & (v < 2.0 * half[2] - 1.0) & ~top & (lod > 0.0)
        albedo[window] = GLASS * (1.0 + 0.6 * noise(u[window] * 0.3, v[window] * 0.3))[:, None]
        refl[window] = GLASS_REFLECTANCE
        albedo[top] = 0.35 * tone[top, None]
    elif material == CABIN:
        side = ~top
        albedo[side] = GLASS * tone[side, None]
        refl[side] = GLASS_REFLECTANCE
    elif material == CAR:
        sill = v < 0.12
        albedo[sill] = 0.08
    elif material == WALL:
        course = np.floor(v / 0.25)
        mortar = (_frac(v / 0.25) < 0.1) | (_frac(u / 0.5 + 0.5 * course) < 0.05)
        albedo[mortar & (_lod(footprint, 0.05) > 0)] *= 1.3
    elif material == FOLIAGE:
        leaves = 0.7 + 0.9 * noise(u * 3.0, v * 3.0) + 0.3 * noise(u * 0.7 + 5.0, v * 0.7)
        albedo *= leaves[:, None]
    elif material == TRUNK:
        albedo *= (0.85 + 0.8 * noise(u * 8.0, v * 1.0))[:, None]
    elif material == SIGN:
        back = (face != 0) & (face != 1)
        albedo[back] = 0.5
        refl[back] = 0.5
    return np.clip(albedo, 0.0, 1.0), np.clip(refl, 0.0, 1.0)
