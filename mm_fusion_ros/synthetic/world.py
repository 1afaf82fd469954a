"""Scenes of the synthetic world, on a ground that follows the route's height (world frame: x
east, y north, z up). Two styles:

- street (the default): a road with markings, sidewalks, verges, facades at the sidewalk,
  parked cars, trees, street lamps, signs and walls;
- suburban: a residential street as in KITTI's residential drives, without markings, with a
  planting strip between curb and sidewalk; detached houses with gable roofs set back behind
  front gardens, hedges or low walls along the property line with gaps for driveways, garages,
  garden and street trees (some conifers), shrubs, and few parked cars.

Everything here is a pure function of the Route and a numpy Generator, so a (seed, sequence)
pair always builds the same world. Objects are analytic primitives (yaw-oriented boxes,
vertical cylinders, spheres, gable-roof prisms) that the LiDAR and the camera ray-cast alike
(raycast.py); their materials give both the camera's albedo and the LiDAR's reflectance.
"""
from dataclasses import dataclass, field
import logging

import numpy as np
from scipy.ndimage import distance_transform_edt, gaussian_filter
from scipy.spatial import cKDTree

log = logging.getLogger(__name__)

# Gable-roof prism: the box |x| <= hx, |y| <= hy, |z| <= hz cut by two planes that meet in a
# ridge along local x at z = +hz and reach the eaves at y = +-hy, z = -hz.
BOX, CYLINDER, SPHERE, PRISM = 0, 1, 2, 3
SCENES = ('street', 'suburban')
GROUND_ID, SKY_ID = -2, -1  # ray ids that are not objects

# Materials (index into the tables below; append only).
FACADE, WALL, CAR, CABIN, METAL, TRUNK, FOLIAGE, SIGN, HOUSE, ROOF = range(10)
REFLECTANCE = np.array([0.45, 0.40, 0.50, 0.10, 0.60, 0.35, 0.45, 0.90, 0.50, 0.25],
                       dtype=np.float32)
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
HOUSE_FLOOR = 0.8  # m from a house's box bottom (0.3 m under the ground) to its ground floor
HOUSE_COLORS = np.array([[0.90, 0.88, 0.82], [0.88, 0.80, 0.62], [0.80, 0.78, 0.74],
                         [0.86, 0.70, 0.58], [0.66, 0.36, 0.28], [0.74, 0.76, 0.70]],
                        dtype=np.float32)
ROOF_COLORS = np.array([[0.55, 0.24, 0.16], [0.42, 0.20, 0.14], [0.24, 0.24, 0.26],
                        [0.36, 0.28, 0.24]], dtype=np.float32)


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
    scene: str = 'street'
    markings: bool = True          # centre, lane and parking lines
    planting_strip: float = 0.0    # m of grass between curb and sidewalk
    setback: tuple = (0.0, 0.0)    # m from the property line to a house front (suburban)
    hedge_probability: float = 0.0  # chance that a lot's frontage is a hedge (suburban)
    dirt: float = 1.0              # weight of bare-soil patches in the grass (lawns: less)

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


def draw_suburban_style(rng) -> Style:
    """A residential street: narrow unmarked road, houses of 1-2 storeys (building_height is
    the storey height) set back behind front gardens, few parked cars, many trees."""
    sun_az, sun_el = rng.uniform(0.0, 2.0 * np.pi), rng.uniform(np.radians(30), np.radians(65))
    near = rng.uniform(3.0, 6.0)
    return Style(
        lane_width=rng.uniform(2.75, 3.25), parking_width=rng.uniform(1.8, 2.3),
        sidewalk_width=rng.uniform(1.5, 2.5), building_height=(2.6, 3.0),
        open_lot_probability=rng.uniform(0.05, 0.2), car_probability=rng.uniform(0.05, 0.2),
        tree_probability=rng.uniform(0.5, 0.9), lamp_spacing=rng.uniform(28.0, 45.0),
        asphalt=rng.uniform(0.22, 0.34), sidewalk=rng.uniform(0.45, 0.6),
        grass=tuple(rng.uniform([0.20, 0.34, 0.12], [0.33, 0.46, 0.20])),
        sun=(float(np.cos(sun_el) * np.cos(sun_az)), float(np.cos(sun_el) * np.sin(sun_az)),
             float(np.sin(sun_el))),
        scene='suburban', markings=False,
        planting_strip=0.0 if rng.random() < 0.3 else rng.uniform(1.5, 2.5),
        setback=(near, near + rng.uniform(3.0, 7.0)), hedge_probability=rng.uniform(0.4, 0.8),
        dirt=rng.uniform(0.2, 0.5))


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

        strip = st.planting_strip  # 0 on a street: the sums below are then exact no-ops
        curb = (a >= half) & (a < half + 0.25)
        walk = (a >= half + 0.25 + strip) & (a < half + strip + st.sidewalk_width)
        joints = (_frac(along / 1.2) < 0.03) | (_frac((a - (half + strip)) / 1.2) < 0.03)
        verge = (a >= half + strip + st.sidewalk_width) \
            | ((a >= half + 0.25) & (a < half + 0.25 + strip))
        if st.markings:
            paint = ((a < 0.075) & (_frac(along / 9.0) < 0.4)) \
                | (np.abs(a - st.lane_width) < 0.06) \
                | ((a > st.lane_width) & (a < half) & (_frac(along / 6.0) < 0.02))
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
            if st.dirt != 1.0:
                dirt *= np.float32(st.dirt)
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
    if scene not in SCENES:
        raise ValueError(f'scene {scene!r} not known; choose one of {", ".join(SCENES)}')
    draw, builder_class = {'street': (draw_style, _StreetBuilder),
                           'suburban': (draw_suburban_style, _SuburbBuilder)}[scene]
    style = draw(rng)
    noise = NoiseTile(rng)
    ground = GroundMap(route, style, noise)
    builder = builder_class(route, style, ground, rng)
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


class _SuburbBuilder(_StreetBuilder):
    """A residential street, lot by lot: frontage (hedge, low wall or open), a house with a
    gable roof set back behind its front garden, maybe a garage and a car in the driveway,
    garden trees and shrubs; street trees in the planting strip, a few parked cars."""

    def build(self) -> Primitives:
        for side in (1.0, -1.0):
            self._lots(side)
            self._cars(side)
            self._street_trees(side)
            self._lamps(side)
            self._signs(side)
        return self.out.freeze()

    def _lots(self, side):
        st, rng = self.style, self.rng
        s, end = self._span()
        s += rng.uniform(0.0, 10.0)
        front = abs(self._edge(side)) + st.planting_strip + st.sidewalk_width  # property line
        while s < end:
            width = rng.uniform(15.0, 26.0)
            setback = rng.uniform(*st.setback)
            if rng.random() < st.open_lot_probability:  # a garden or meadow without a house
                self._frontage(side, s, width, front, None)
                self._garden(side, s, width, front, front + 25.0, None)
                s += width
                continue
            length = rng.uniform(8.0, min(14.0, width - 4.0))
            offset = rng.uniform(1.5, width - length - 1.5)
            gaps = (offset, width - offset - length)  # beside the house, before and after it
            drive = None
            if max(gaps) >= 3.5:  # a driveway in the wider gap, maybe a garage at its end
                drive = offset / 2 if gaps[0] >= gaps[1] else offset + length + gaps[1] / 2
            self._frontage(side, s, width, front, drive)
            built = self._house(side, s + offset, length, front + setback)
            if drive is not None:
                self._driveway(side, s + drive, front, setback, max(gaps))
            self._garden(side, s, width, front, front + (setback if built else 25.0), drive)
            s += width

    def _frontage(self, side, s, width, front, drive):
        """Hedge or low wall along the property line, with a 3 m gap for the driveway (or a
        1.2 m gate); in pieces of <= 6 m so it follows curves."""
        st, rng = self.style, self.rng
        kind = rng.random()
        if kind >= st.hedge_probability + 0.5 * (1.0 - st.hedge_probability):
            return  # an open front garden
        hedge = kind < st.hedge_probability
        gap = (drive - 1.5, drive + 1.5) if drive is not None else \
            (0.5 * width - 0.6, 0.5 * width + 0.6)
        height = rng.uniform(0.9, 1.9) if hedge else rng.uniform(0.5, 1.1)
        thick = rng.uniform(0.5, 0.9) if hedge else 0.2
        green = np.clip(np.array([0.16, 0.32, 0.11]) * rng.uniform(0.75, 1.2, size=3), 0, 1)
        wall = HOUSE_COLORS[rng.integers(len(HOUSE_COLORS))] * 0.9
        for a, b in ((0.0, gap[0]), (gap[1], width)):
            pieces = max(1, int(np.ceil((b - a) / 6.0)))
            for k in range(pieces):
                u0 = a + (b - a) * k / pieces
                u1 = a + (b - a) * (k + 1) / pieces
                if u1 - u0 < 0.5:
                    continue
                lateral = side * (front + 0.1 + 0.5 * thick)
                xy, heading, _ = self._at(s + 0.5 * (u0 + u1), lateral)
                outline = self._rect(xy, heading, 0.5 * (u1 - u0), 0.5 * thick, step=1.0)
                if not self._clear(outline, front - 0.5):
                    continue
                base = self._base_height(outline)
                center = (xy[0], xy[1], base + 0.5 * (height + 0.3))
                half = (0.5 * (u1 - u0), 0.5 * thick, 0.5 * (height + 0.3))
                if hedge:
                    self.out.add(BOX, center, half, heading, FOLIAGE, green)
                else:
                    self.out.add(BOX, center, half, heading, WALL, wall)

    def _house(self, side, s, length, inner) -> bool:
        """A detached house of 1-2 storeys whose front is `inner` metres from the route, its
        gable roof's ridge along the road or across it. False where it does not fit."""
        st, rng = self.style, self.rng
        depth = rng.uniform(8.0, 12.0)
        xy, heading, _ = self._at(s + 0.5 * length, side * (inner + 0.5 * depth))
        outline = self._rect(xy, heading, 0.5 * length, 0.5 * depth)
        if not self._clear(outline, inner - 1.0):
            return False
        base = self._base_height(outline)  # 0.3 m below the lowest ground under the house
        storey = rng.uniform(*st.building_height)
        walls = HOUSE_FLOOR + storey * (1 + (rng.random() < 0.6)) + 0.3  # + knee wall
        color = np.clip(HOUSE_COLORS[rng.integers(len(HOUSE_COLORS))]
                        * rng.uniform(0.9, 1.05, size=3), 0, 1)
        windows = (rng.uniform(2.4, 3.4), storey, rng.uniform(0.0, 3.0), rng.uniform(0.14, 0.24))
        self.out.add(BOX, (xy[0], xy[1], base + 0.5 * walls), (0.5 * length, 0.5 * depth,
                                                                  0.5 * walls),
                     heading, HOUSE, color, windows)
        pitch = np.radians(rng.uniform(28.0, 45.0))
        along = rng.random() < 0.65
        ridge, span = (length, depth) if along else (depth, length)
        eave, gable = 0.5, 0.25  # overhangs [m]
        rise = (0.5 * span + eave) * np.tan(pitch)
        self.out.add(PRISM, (xy[0], xy[1], base + walls + 0.5 * rise),
                     (0.5 * ridge + gable, 0.5 * span + eave, 0.5 * rise),
                     heading if along else heading + 0.5 * np.pi, ROOF,
                     ROOF_COLORS[rng.integers(len(ROOF_COLORS))] * rng.uniform(0.85, 1.1),
                     (*color, 0.0))
        return True

    def _driveway(self, side, s, front, setback, room):
        """A garage at the driveway's end (where the gap beside the house allows one) and
        sometimes a car on the driveway, nose toward the house."""
        rng = self.rng
        if room >= 4.0 and rng.random() < 0.4:
            xy, heading, _ = self._at(s, side * (front + setback + 3.0))
            outline = self._rect(xy, heading, 1.6, 3.0)
            if self._clear(outline, front + setback - 1.0):
                base = self._base_height(outline)
                color = HOUSE_COLORS[rng.integers(len(HOUSE_COLORS))]
                self.out.add(BOX, (xy[0], xy[1], base + 1.45), (1.6, 3.0, 1.45), heading,
                             HOUSE, color, (3.0, 2.6, 0.0, 0.0))
        if setback >= 5.5 and rng.random() < 0.35:
            length, width = rng.uniform(3.9, 4.8), rng.uniform(1.7, 1.9)
            xy, heading, _ = self._at(s, side * (front + 0.5 + 0.5 * length))
            heading += side * 0.5 * np.pi + rng.normal(0.0, 0.03)
            outline = self._rect(xy, heading, 0.5 * length, 0.5 * width, step=1.0)
            if self._clear(outline, front - 0.5):
                self._car(xy, heading, length, width, self._base_height(outline) + 0.3)

    def _garden(self, side, s, width, front, house_front, drive):
        """Shrubs and a tree between the property line and the house (off the driveway), and
        trees behind the house. Crowns stay clear of the house front."""
        rng = self.rng
        spots = []  # (along the lot, lateral, largest crown radius or 0 for a shrub)
        if house_front - front > 3.0:
            for _ in range(rng.integers(0, 3)):
                spots.append((rng.uniform(1.0, width - 1.0),
                              rng.uniform(front + 1.2, house_front - 1.0), 0.0))
            if rng.random() < 0.5:
                lateral = rng.uniform(front + 2.0, house_front - 0.5)
                spots.append((rng.uniform(2.0, width - 2.0), lateral,
                              max(house_front - lateral, lateral - front) - 0.3))
        for _ in range(rng.integers(0, 3)):  # backyard: seen over and beside the roofs
            spots.append((rng.uniform(2.0, width - 2.0),
                          house_front + rng.uniform(14.0, 24.0), 3.5))
        for along, lateral, crown in spots:
            if drive is not None and abs(along - drive) < 2.5:
                continue
            xy, heading, ground = self._at(s + along, side * lateral)
            if not crown:
                r = rng.uniform(0.4, 1.0)
                if self._clear(xy, front + r):
                    green = np.clip(np.array([0.20, 0.36, 0.14]) * rng.uniform(0.7, 1.2, 3), 0, 1)
                    self.out.add(SPHERE, (xy[0], xy[1], ground + 0.5 * r), (r, r, r), 0.0,
                                 FOLIAGE, green)
            elif self._clear(xy, front + 1.0):
                if rng.random() < 0.3:
                    self._conifer(xy, ground, rng.uniform(5.0, 12.0))
                else:
                    self._tree(xy, heading, ground, min(rng.uniform(1.5, 3.5), crown))

    def _conifer(self, xy, ground, height):
        """A spruce: a short trunk under three stacked, narrowing spheres."""
        rng = self.rng
        r = rng.uniform(0.22, 0.32) * height
        self.out.add(CYLINDER, (xy[0], xy[1], ground - 0.2 + 0.5 * (0.25 * height + 0.2)),
                     (0.15, 0.15, 0.5 * (0.25 * height + 0.2)), 0.0, TRUNK, (0.30, 0.22, 0.15))
        green = np.clip(np.array([0.10, 0.24, 0.12]) * rng.uniform(0.8, 1.2, size=3), 0, 1)
        z = ground + 0.25 * height + r
        for scale in (1.0, 0.72, 0.45):
            self.out.add(SPHERE, (xy[0], xy[1], z), (r * scale,) * 3, 0.0, FOLIAGE, green)
            z += 1.35 * r * scale

    def _tree(self, xy, heading, ground, crown):
        """A deciduous tree: trunk, and a round crown of one or two overlapping spheres whose
        bottom clears 2.2 m (pruned for the traffic under it)."""
        rng = self.rng
        trunk_r, trunk_h = rng.uniform(0.12, 0.3), rng.uniform(2.2, 3.2) + 0.3 * crown
        self.out.add(CYLINDER, (xy[0], xy[1], ground - 0.2 + 0.5 * (trunk_h + 0.2)),
                     (trunk_r, trunk_r, 0.5 * (trunk_h + 0.2)), 0.0, TRUNK, (0.32, 0.24, 0.16))
        green = np.clip(np.array([0.20, 0.38, 0.14]) * rng.uniform(0.7, 1.3, size=3), 0, 1)
        top = ground + trunk_h + 0.7 * crown
        self.out.add(SPHERE, (xy[0], xy[1], top), (crown,) * 3, 0.0, FOLIAGE, green)
        if rng.random() < 0.5:
            angle, r = rng.uniform(0.0, 2.0 * np.pi), crown * rng.uniform(0.55, 0.8)
            off = (crown - 0.6 * r) * np.array([np.cos(angle), np.sin(angle)])
            self.out.add(SPHERE, (xy[0] + off[0], xy[1] + off[1], top + 0.3 * crown),
                         (r,) * 3, 0.0, FOLIAGE, green * rng.uniform(0.9, 1.1))

    def _street_trees(self, side):
        st, rng = self.style, self.rng
        if st.planting_strip < 1.0:
            return
        s, end = self._span()
        s += rng.uniform(0.0, 8.0)
        lateral = self._edge(side) + side * (0.25 + 0.5 * st.planting_strip)
        while s < end:
            if rng.random() < st.tree_probability:
                xy, heading, ground = self._at(s, lateral)
                crown = rng.uniform(1.5, 3.0)
                if self._clear(xy, crown + 1.2):
                    self._tree(xy, heading, ground, crown)
            s += rng.uniform(9.0, 16.0)


# -- materials -------------------------------------------------------------------------------
def object_surface(noise: NoiseTile, material: int, color, params, half, center, face, u, v,
                   footprint):
    """Albedo (k, 3) and reflectance (k,) of hits on one object.

    face: 0..5 = box faces +x -x +y -y +z -z (cylinders/spheres: 0 side, 4 top; prisms: 0, 1
    gables, 2, 3 roof slopes on the +y and -y sides, 5 bottom);
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
    elif material == HOUSE:  # plastered walls, a darker plinth, a window grid per floor
        spacing, floor_h, offset, half_width = params
        wu = _frac((u + offset) / spacing)
        wv = _frac((v - HOUSE_FLOOR) / floor_h)
        window = (np.abs(wu - 0.5) < half_width) & (wv > 0.3) & (wv < 0.78) \
            & (v > HOUSE_FLOOR) & (v < 2.0 * half[2] - 0.4) & ~top & (_lod(footprint, 0.4) > 0)
        albedo[(v < HOUSE_FLOOR) & ~top] *= 0.7
        albedo[window] = GLASS * (1.0 + 0.6 * noise(u[window] * 0.3, v[window] * 0.3))[:, None]
        refl[window] = GLASS_REFLECTANCE
        albedo[top] = 0.3 * tone[top, None]
    elif material == ROOF:  # tile courses on the slopes, the wall colour (params) on the gables
        slope = (face == 2) | (face == 3)
        course = slope & (_frac(v / 0.3) < 0.2)
        albedo[course] *= (1.0 - 0.4 * _lod(footprint[course], 0.1))[:, None]
        gable = face <= 1
        albedo[gable] = np.asarray(params[:3], dtype=np.float32) * tone[gable, None]
        refl[gable] = REFLECTANCE[HOUSE] * tone[gable]
        albedo[face == 5] *= 0.4  # the eaves' underside, in shade
    return np.clip(albedo, 0.0, 1.0), np.clip(refl, 0.0, 1.0)
