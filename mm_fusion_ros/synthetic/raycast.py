"""Analytic ray casting against the synthetic world, shared by the LiDAR and the camera.

Rays leave one origin and form a 2D grid (LiDAR: beams x azimuth steps; camera: rows x
columns). The ground is intersected for every ray (Newton's method on the height field, with a
marching search for rays near the horizon); each object only for the rectangular block of rays
its bounding box can reach (the sensor computes the blocks), which keeps the cost close to one
intersection per ray. Depth is the ray parameter t: the range for unit LiDAR directions, the
camera z for camera directions (x/z, y/z, 1).
"""
from dataclasses import dataclass

import numpy as np

from mm_fusion_ros.synthetic.world import (
    BOX,
    CYLINDER,
    GROUND_ID,
    object_surface,
    PRISM,
    SKY_ID,
    SPHERE,
)


@dataclass(frozen=True)
class RayGrid:
    origin: np.ndarray      # (3,) float64, world
    dirs: np.ndarray        # (3, h, w) float32, world
    t_min: float            # nearest valid hit
    t_max: float            # farthest valid hit


@dataclass(frozen=True)
class Hits:
    t: np.ndarray           # (h, w) float32, inf where nothing was hit
    ids: np.ndarray         # (h, w) int32: primitive index, GROUND_ID or SKY_ID


@dataclass(frozen=True)
class Surfaces:
    normal: np.ndarray      # (3, h, w) float32, world, facing the sensor
    albedo: np.ndarray      # (3, h, w) float32 in [0, 1]
    reflectance: np.ndarray  # (h, w) float32 in [0, 1] (LiDAR material reflectance)


def cast(world, rays: RayGrid, blocks) -> Hits:
    """Nearest hit per ray. blocks: (primitive index, row slice, column slice) triples."""
    t = ground_hits(world.ground, rays)
    ids = np.where(np.isfinite(t), GROUND_ID, SKY_ID).astype(np.int32)
    o = rays.origin
    for i, rows, cols in blocks:
        d = rays.dirs[:, rows, cols]
        ti = intersect(world.prims, i, o, d[0], d[1], d[2], rays.t_min)
        tb = t[rows, cols]
        closer = ti < tb
        if closer.any():
            np.copyto(tb, ti, where=closer)
            ids[rows, cols][closer] = i
    t[t > rays.t_max] = np.inf
    ids[~np.isfinite(t)] = SKY_ID
    return Hits(t=t, ids=ids)


# -- ground ----------------------------------------------------------------------------------
def ground_hits(ground, rays: RayGrid, iterations=2, march_steps=10) -> np.ndarray:
    """t of the first ground crossing per ray (inf for none within t_max)."""
    o = rays.origin
    dx, dy, dz = (c.ravel() for c in rays.dirs)
    h0, gx0, gy0 = (float(v[0]) for v in ground.height_grad(o[:1], o[1:2]))
    above = float(o[2]) - h0
    approach = dz - (gx0 * dx + gy0 * dy)  # descent rate toward the local ground plane
    t = np.full(dx.shape, np.inf, dtype=np.float32)

    steep = np.flatnonzero(approach < -0.02)
    t_start = np.float32(above) / -approach[steep]
    near = t_start < 3.0 * rays.t_max
    steep, t_start = steep[near], t_start[near]
    _newton(ground, o, dx, dy, dz, steep, t_start, iterations, rays, t)

    # Near-horizontal rays may still meet ground that rises above the local plane: bracket the
    # crossing by marching, but only for rays that could reach the highest such ground.
    reach = float(np.max(np.sqrt(dx * dx + dy * dy))) * rays.t_max
    rise = ground.max_rise(o, (h0, gx0, gy0), reach)
    flat = np.flatnonzero((approach >= -0.02) & (approach < (rise - above) / rays.t_max))
    if flat.size:
        samples = rays.t_max * (np.arange(1, march_steps + 1) / march_steps) ** 1.5
        found = np.full(flat.size, np.nan, dtype=np.float32)
        prev = np.zeros(flat.size, dtype=np.float32)
        for ts in samples.astype(np.float32):
            todo = np.isnan(found)
            if not todo.any():
                break
            f = _residual(ground, o, dx, dy, dz, flat[todo], ts)
            crossed = np.flatnonzero(todo)[f < 0]
            found[crossed] = 0.5 * (prev[crossed] + ts)
            prev[todo] = ts
        ok = ~np.isnan(found)
        _newton(ground, o, dx, dy, dz, flat[ok], found[ok], iterations + 2, rays, t)
    return t.reshape(rays.dirs.shape[1:])


def _residual(ground, o, dx, dy, dz, idx, ts):
    x = o[0] + ts * dx[idx]
    y = o[1] + ts * dy[idx]
    return o[2] + ts * dz[idx] - ground.height(x, y)


def _newton(ground, o, dx, dy, dz, idx, t, iterations, rays, out, extra=4, tol=0.02):
    """Newton steps on f(t) = ray height - ground height; `iterations` for every ray, then up to
    `extra` more for the few (grazing) rays not yet within tol. Writes converged hits to out."""
    if not idx.size:
        return
    t = t.astype(np.float32)
    done = np.zeros(idx.size, dtype=bool)
    active = np.arange(idx.size)
    for it in range(iterations + extra + 1):
        sub = idx[active]
        ddx, ddy, ddz = dx[sub], dy[sub], dz[sub]
        ta = t[active]
        h, gx, gy = ground.height_grad(o[0] + ta * ddx, o[1] + ta * ddy)
        f = o[2] + ta * ddz - h
        slope = ddz - gx * ddx - gy * ddy
        descending = slope < -1e-6
        t[active] = ta - np.where(descending, f / np.where(descending, slope, -1.0), 0.0)
        if it >= iterations:
            converged = np.abs(f) < tol
            done[active[converged]] = True
            active = active[~converged]
            if not active.size:
                break
    ok = done & (t > rays.t_min) & (t <= rays.t_max)
    out[idx[ok]] = t[ok]


# -- primitives ------------------------------------------------------------------------------
def intersect(prims, i, o, dx, dy, dz, t_min):
    """t of the entry hit of rays o + t d with primitive i (inf for a miss)."""
    kind = prims.kind[i]
    c = prims.center[i]
    h = prims.half[i]
    rx, ry, rz = float(o[0] - c[0]), float(o[1] - c[1]), float(o[2] - c[2])
    with np.errstate(divide='ignore', invalid='ignore', over='ignore'):
        if kind == BOX:
            return _box(rx, ry, rz, float(h[0]), float(h[1]), float(h[2]),
                        float(prims.yaw[i]), dx, dy, dz, t_min)
        if kind == CYLINDER:
            return _cylinder(rx, ry, rz, float(h[0]), float(h[2]), dx, dy, dz, t_min)
        if kind == SPHERE:
            return _sphere(rx, ry, rz, float(h[0]), dx, dy, dz, t_min)
        if kind == PRISM:
            return _prism(rx, ry, rz, float(h[0]), float(h[1]), float(h[2]),
                          float(prims.yaw[i]), dx, dy, dz, t_min)
    raise ValueError(f'unknown primitive kind {kind} (object {i})')


def _box(rx, ry, rz, hx, hy, hz, yaw, dx, dy, dz, t_min):
    cs, sn = np.cos(yaw), np.sin(yaw)
    px, py = cs * rx + sn * ry, -sn * rx + cs * ry
    lx = cs * dx + sn * dy
    ly = cs * dy - sn * dx
    near = np.full(dx.shape, -np.inf, dtype=np.float32)
    far = np.full(dx.shape, np.inf, dtype=np.float32)
    for p, e, d in ((px, hx, lx), (py, hy, ly), (rz, hz, dz)):
        inv = 1.0 / d
        a = (-e - p) * inv
        b = (e - p) * inv
        np.fmax(near, np.fmin(a, b), out=near)
        np.fmin(far, np.fmax(a, b), out=far)
    hit = (near <= far) & (near > t_min)
    return np.where(hit, near, np.float32(np.inf))


def _prism(rx, ry, rz, hx, hy, hz, yaw, dx, dy, dz, t_min):
    """Gable-roof prism: the x and z slabs of its box, then the two roof planes
    +-k y + z <= hz (k = 2 hz / hy), which also bound y."""
    cs, sn = np.cos(yaw), np.sin(yaw)
    px, py = cs * rx + sn * ry, -sn * rx + cs * ry
    lx = cs * dx + sn * dy
    ly = cs * dy - sn * dx
    near = np.full(dx.shape, -np.inf, dtype=np.float32)
    far = np.full(dx.shape, np.inf, dtype=np.float32)
    for p, e, d in ((px, hx, lx), (rz, hz, dz)):
        inv = 1.0 / d
        a = (-e - p) * inv
        b = (e - p) * inv
        np.fmax(near, np.fmin(a, b), out=near)
        np.fmin(far, np.fmax(a, b), out=far)
    k = 2.0 * hz / hy
    for sign in (1.0, -1.0):
        rate = sign * k * ly + dz           # d/dt of (plane value), entering where < 0
        room = hz - (sign * k * py + rz)    # distance to the plane at t = 0, inside where > 0
        t = room / rate
        near = np.where(rate < 0, np.fmax(near, t), near)
        far = np.where(rate > 0, np.fmin(far, t), far)
        far = np.where((rate == 0) & (room < 0), np.float32(-np.inf), far)
    hit = (near <= far) & (near > t_min)
    return np.where(hit, near, np.float32(np.inf))


def _cylinder(rx, ry, rz, r, hz, dx, dy, dz, t_min):
    a = dx * dx + dy * dy
    b = rx * dx + ry * dy
    c = rx * rx + ry * ry - r * r
    disc = b * b - a * c
    t = (-b - np.sqrt(np.maximum(disc, 0.0))) / a
    z = rz + t * dz
    side = (disc >= 0) & (t > t_min) & (np.abs(z) <= hz)
    out = np.where(side, t, np.float32(np.inf))
    if rz > hz:  # seen from above: the top cap
        tc = (hz - rz) / dz
        xc, yc = rx + tc * dx, ry + tc * dy
        cap = (tc > t_min) & (xc * xc + yc * yc <= r * r)
        out = np.where(cap & (tc < out), tc, out)
    return out


def _sphere(rx, ry, rz, r, dx, dy, dz, t_min):
    a = dx * dx + dy * dy + dz * dz
    b = rx * dx + ry * dy + rz * dz
    c = rx * rx + ry * ry + rz * rz - r * r
    disc = b * b - a * c
    t = (-b - np.sqrt(np.maximum(disc, 0.0))) / a
    return np.where((disc >= 0) & (t > t_min), t, np.float32(np.inf))


# -- surfaces --------------------------------------------------------------------------------
def surfaces(world, rays: RayGrid, hits: Hits, blocks, pixel_angle=0.0) -> Surfaces:
    """Normal, albedo and reflectance where the rays hit. pixel_angle [rad] sets the texture
    level of detail (0: full detail, as for the LiDAR)."""
    shape = hits.t.shape
    normal = np.zeros((3,) + shape, dtype=np.float32)
    normal[2] = 1.0
    albedo = np.zeros((3,) + shape, dtype=np.float32)
    refl = np.zeros(shape, dtype=np.float32)
    _ground_surfaces(world, rays, hits, pixel_angle, normal, albedo, refl)
    for i, rows, cols in blocks:
        mask = hits.ids[rows, cols] == i
        if not mask.any():
            continue
        d = rays.dirs[:, rows, cols][:, mask]
        t = hits.t[rows, cols][mask]
        n, face, u, v = _object_geometry(world.prims, i, rays.origin, d, t)
        footprint = _footprint(d, t, n, pixel_angle)
        prims = world.prims
        alb, ref = object_surface(world.noise, int(prims.material[i]), prims.color[i],
                                  prims.params[i], prims.half[i], prims.center[i], face, u, v,
                                  footprint)
        normal[:, rows, cols][:, mask] = n
        albedo[:, rows, cols][:, mask] = alb.T
        refl[rows, cols][mask] = ref
    return Surfaces(normal=normal, albedo=albedo, reflectance=refl)


def _footprint(d, t, n, pixel_angle):
    """Metres of surface one pixel covers (grazing views stretch it)."""
    if not pixel_angle:
        return np.zeros(len(t), dtype=np.float32)
    length = np.sqrt(np.sum(d * d, axis=0))
    cos = np.abs(np.sum(d * n, axis=0)) / length
    return (t * length * pixel_angle / np.maximum(cos, 0.2)).astype(np.float32)


def _ground_surfaces(world, rays, hits, pixel_angle, normal, albedo, refl):
    flat_ids = hits.ids.ravel()
    idx = np.flatnonzero(flat_ids == GROUND_ID)
    if not idx.size:
        return
    o = rays.origin
    d = rays.dirs.reshape(3, -1)[:, idx]
    t = hits.t.ravel()[idx]
    x = o[0] + t * d[0]
    y = o[1] + t * d[1]
    _, gx, gy = world.ground.height_grad(x, y)
    n = np.stack([-gx, -gy, np.ones_like(gx)])
    n /= np.sqrt(np.sum(n * n, axis=0))
    alb, ref = world.ground.surface(x, y, _footprint(d, t, n, pixel_angle))
    normal.reshape(3, -1)[:, idx] = n
    albedo.reshape(3, -1)[:, idx] = alb.T
    refl.reshape(-1)[idx] = ref


def _object_geometry(prims, i, o, d, t):
    """Normal (3, k), face id, and face coordinates (u, v) of hits on primitive i."""
    kind = prims.kind[i]
    c = prims.center[i]
    h = prims.half[i]
    rel = (o - c)[:, None].astype(np.float32) + d * t
    if kind == BOX:
        cs, sn = np.cos(prims.yaw[i]), np.sin(prims.yaw[i])
        lx = cs * rel[0] + sn * rel[1]
        ly = cs * rel[1] - sn * rel[0]
        lz = rel[2]
        q = np.abs(np.stack([lx / h[0], ly / h[1], lz / h[2]]))
        axis = np.argmax(q, axis=0)
        negative = np.choose(axis, [lx, ly, lz]) < 0
        face = 2 * axis + negative
        sign = np.where(negative, -1.0, 1.0).astype(np.float32)
        nl = np.zeros((3, len(t)), dtype=np.float32)
        nl[axis, np.arange(len(t))] = sign
        n = np.stack([cs * nl[0] - sn * nl[1], sn * nl[0] + cs * nl[1], nl[2]])
        u = np.where(axis == 0, ly, lx)
        v = np.where(axis == 2, ly, lz + h[2])
        face = np.where(axis == 2, np.where(negative, 5, 4), face)
        return n.astype(np.float32), face, u, v.astype(np.float32)
    if kind == PRISM:
        return _prism_geometry(prims, i, rel, h, len(t))
    if kind == CYLINDER:
        r = h[0]
        cap = (rel[2] > h[2] - 1e-3) & (rel[0] ** 2 + rel[1] ** 2 < (r * 0.999) ** 2)
        n = np.stack([rel[0] / r, rel[1] / r, np.zeros_like(rel[0])])
        n[:, cap] = np.array([[0.0], [0.0], [1.0]], dtype=np.float32)
        face = np.where(cap, 4, 0)
        return n, face, np.arctan2(rel[1], rel[0]) * r, rel[2] + h[2]
    r = h[0]
    n = rel / r
    return n, np.zeros(len(t), dtype=np.int64), np.arctan2(n[1], n[0]) * r, rel[2] + r


def _prism_geometry(prims, i, rel, h, k):
    """Normal, face (0/1 gables at +-x, 2/3 roof slopes facing +-y, 5 bottom) and (u, v) on a
    gable-roof prism: the face whose plane the hit lies on (largest signed distance)."""
    cs, sn = np.cos(prims.yaw[i]), np.sin(prims.yaw[i])
    lx = cs * rel[0] + sn * rel[1]
    ly = cs * rel[1] - sn * rel[0]
    lz = rel[2]
    hx, hy, hz = (float(v) for v in h)
    slope = 2.0 * hz / hy
    norm = np.sqrt(slope * slope + 1.0)
    dist = np.stack([np.abs(lx) - hx, (slope * ly + lz - hz) / norm,
                     (-slope * ly + lz - hz) / norm, -lz - hz])
    which = np.argmax(dist, axis=0)
    face = np.choose(which, [np.where(lx < 0, 1, 0), 2, 3, 5])
    nl = np.zeros((3, k), dtype=np.float32)
    gable = which == 0
    nl[0, gable] = np.where(lx[gable] < 0, -1.0, 1.0)
    for w, sign in ((1, 1.0), (2, -1.0)):
        nl[1, which == w] = sign * slope / norm
        nl[2, which == w] = 1.0 / norm
    nl[2, which == 3] = -1.0
    n = np.stack([cs * nl[0] - sn * nl[1], sn * nl[0] + cs * nl[1], nl[2]]).astype(np.float32)
    on_slope = (which == 1) | (which == 2)
    u = np.where(gable, ly, lx)
    # Slopes: metres up from the eave; gables: up from the bottom; bottom: across.
    v = np.where(on_slope, (hy - np.abs(ly)) * norm, np.where(gable, lz + hz, ly))
    return n, face, u.astype(np.float32), v.astype(np.float32)
