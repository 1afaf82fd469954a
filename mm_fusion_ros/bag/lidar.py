"""Per-point `ring` and `time` fields for LIO tools (FAST-LIO, LIO-SAM), from the geometry alone.

KITTI's .bin scans carry only x, y, z, reflectance, so both fields are reconstructed:

- ring: uint16 in 0..63, the beam's elevation atan2(z, hypot(x, y)) binned uniformly over the
  HDL-64E's vertical field of view, -24.9..+2.0 deg; ring 0 is the lowest beam (the Velodyne
  driver's numbering). Points outside the field of view are clamped to ring 0 or 63. The real
  sensor's beams are not evenly spaced (1/3 deg upper block, 1/2 deg lower block), so a ring is
  a scan line for de-skewing and feature extraction, not a calibrated laser id.
- time: float32 seconds since the start of the sweep, in [0, 0.1). The HDL-64E spins clockwise
  seen from above (azimuth atan2(y, x) decreasing) at 10 Hz, and a KITTI sweep starts and ends
  at the rear: azimuth +180 deg is time 0, left (+90) 0.025 s, front (0) 0.05 s, right (-90)
  0.075 s. KITTI's times.txt stamp (the header stamp) is when the sweep faces forward, so the
  sweep itself starts about 0.05 s before the header stamp.
"""
import numpy as np

HDL64_RINGS = 64
HDL64_ELEVATION_DEG = (-24.9, 2.0)
SCAN_PERIOD_S = 0.1
# Largest float32 below the period, so a float32 `time` stays strictly inside [0, 0.1).
_LAST_TIME = np.nextafter(np.float32(SCAN_PERIOD_S), np.float32(0.0))


def ring_index(points: np.ndarray) -> np.ndarray:
    """(N, >=3) points -> (N,) uint16 ring in 0..HDL64_RINGS-1 (0 = lowest beam)."""
    xyz = np.asarray(points, dtype=np.float64)[:, :3]
    elevation = np.degrees(np.arctan2(xyz[:, 2], np.hypot(xyz[:, 0], xyz[:, 1])))
    low, high = HDL64_ELEVATION_DEG
    ring = np.floor((elevation - low) / (high - low) * HDL64_RINGS)
    return np.clip(ring, 0, HDL64_RINGS - 1).astype(np.uint16)


def point_time(points: np.ndarray) -> np.ndarray:
    """(N, >=2) points -> (N,) float32 seconds since the sweep start at the rear, in [0, 0.1)."""
    xyz = np.asarray(points, dtype=np.float64)
    azimuth = np.arctan2(xyz[:, 1], xyz[:, 0])            # (-pi, pi], CCW from the front
    fraction = (np.pi - azimuth) / (2.0 * np.pi)           # clockwise from the rear
    return np.minimum((fraction * SCAN_PERIOD_S).astype(np.float32), _LAST_TIME)


def lio_fields(points: np.ndarray):
    """Extra PointCloud2 columns ((name, array), ...) for MessageFactory.point_cloud."""
    return (('ring', ring_index(points)), ('time', point_time(points)))
