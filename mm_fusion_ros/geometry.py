"""Rigid-body helpers shared by every layer (numpy only).

Conventions: rotation matrices act on column vectors; a pose T_a_b maps points from frame b to
frame a; quaternions are (x, y, z, w) as in geometry_msgs; so(3) vectors are axis * angle.
Functions accept a single item or a leading batch dimension where noted.
"""
import math

import numpy as np

_EPS = 1e-12


def skew(w):
    """(..., 3) -> (..., 3, 3) cross-product matrices."""
    w = np.asarray(w, dtype=np.float64)
    out = np.zeros(w.shape[:-1] + (3, 3))
    out[..., 0, 1], out[..., 0, 2] = -w[..., 2], w[..., 1]
    out[..., 1, 0], out[..., 1, 2] = w[..., 2], -w[..., 0]
    out[..., 2, 0], out[..., 2, 1] = -w[..., 1], w[..., 0]
    return out


def so3_exp(w):
    """Rodrigues: (..., 3) axis-angle -> (..., 3, 3) rotation."""
    w = np.asarray(w, dtype=np.float64)
    theta = np.linalg.norm(w, axis=-1)[..., None, None]
    k = skew(w)
    small = theta < 1e-8
    safe = np.where(small, 1.0, theta)
    a = np.where(small, 1.0 - theta**2 / 6.0, np.sin(safe) / safe)
    b = np.where(small, 0.5 - theta**2 / 24.0, (1.0 - np.cos(safe)) / safe**2)
    return np.eye(3) + a * k + b * (k @ k)


def so3_log(rot):
    """(..., 3, 3) rotation -> (..., 3) axis-angle, stable near 0 and pi."""
    rot = np.asarray(rot, dtype=np.float64)
    cos = np.clip((np.trace(rot, axis1=-2, axis2=-1) - 1.0) / 2.0, -1.0, 1.0)
    theta = np.arccos(cos)
    vee = np.stack([rot[..., 2, 1] - rot[..., 1, 2],
                    rot[..., 0, 2] - rot[..., 2, 0],
                    rot[..., 1, 0] - rot[..., 0, 1]], axis=-1)
    sin = np.sin(theta)
    small = theta < 1e-6
    scale = np.where(small, 0.5 + theta**2 / 12.0, theta / (2.0 * np.where(small, 1.0, sin)))
    w = vee * scale[..., None]
    # Near pi, sin -> 0 and the antisymmetric part vanishes: use the symmetric part instead.
    near_pi = theta > np.pi - 1e-4
    if np.any(near_pi):
        r = rot[near_pi]
        diag = np.clip((np.diagonal(r, axis1=-2, axis2=-1) + 1.0) / 2.0, 0.0, None)
        axis = np.sqrt(diag)
        idx = np.argmax(axis, axis=-1)
        rows = np.take_along_axis(r, idx[:, None, None], axis=-2)[:, 0, :]
        axis = (rows + np.eye(3)[idx]) / 2.0
        axis /= np.linalg.norm(axis, axis=-1, keepdims=True)
        sign = np.sign(np.sum(axis * vee[near_pi], axis=-1))
        sign = np.where(sign == 0, 1.0, sign)
        w[near_pi] = axis * (theta[near_pi] * sign)[:, None]
    return w


def make_pose(rot, trans):
    """Rotation (..., 3, 3) and translation (..., 3) -> (..., 4, 4) homogeneous transform."""
    rot = np.asarray(rot, dtype=np.float64)
    trans = np.asarray(trans, dtype=np.float64)
    out = np.zeros(rot.shape[:-2] + (4, 4))
    out[..., :3, :3] = rot
    out[..., :3, 3] = trans
    out[..., 3, 3] = 1.0
    return out


def invert_pose(pose):
    """Inverse of (..., 4, 4) rigid transforms without a general matrix inverse."""
    pose = np.asarray(pose, dtype=np.float64)
    rot_t = np.swapaxes(pose[..., :3, :3], -1, -2)
    return make_pose(rot_t, -(rot_t @ pose[..., :3, 3:4])[..., 0])


def relative_pose(pose_a, pose_b):
    """T_a_b = T_w_a^-1 T_w_b: motion from a to b expressed in a."""
    return invert_pose(pose_a) @ np.asarray(pose_b, dtype=np.float64)


def pose_to_vec6(pose):
    """(..., 4, 4) -> (..., 6) = (translation, so(3) log of the rotation); DESIGN §5 target."""
    pose = np.asarray(pose, dtype=np.float64)
    return np.concatenate([pose[..., :3, 3], so3_log(pose[..., :3, :3])], axis=-1)


def vec6_to_pose(vec):
    """Inverse of pose_to_vec6."""
    vec = np.asarray(vec, dtype=np.float64)
    return make_pose(so3_exp(vec[..., 3:]), vec[..., :3])


def rpy_to_rot(roll, pitch, yaw):
    """R = Rz(yaw) Ry(pitch) Rx(roll), the OXTS / ROS convention (fixed axes x, y, z)."""
    roll, pitch, yaw = (np.asarray(a, dtype=np.float64) for a in (roll, pitch, yaw))
    cr, sr, cp, sp, cy, sy = np.cos(roll), np.sin(roll), np.cos(pitch), np.sin(pitch), \
        np.cos(yaw), np.sin(yaw)
    out = np.empty(np.broadcast(roll, pitch, yaw).shape + (3, 3))
    out[..., 0, 0] = cy * cp
    out[..., 0, 1] = cy * sp * sr - sy * cr
    out[..., 0, 2] = cy * sp * cr + sy * sr
    out[..., 1, 0] = sy * cp
    out[..., 1, 1] = sy * sp * sr + cy * cr
    out[..., 1, 2] = sy * sp * cr - cy * sr
    out[..., 2, 0] = -sp
    out[..., 2, 1] = cp * sr
    out[..., 2, 2] = cp * cr
    return out


def rot_to_rpy(rot):
    """Inverse of rpy_to_rot: (..., 3, 3) -> (roll, pitch, yaw) arrays."""
    rot = np.asarray(rot, dtype=np.float64)
    pitch = np.arcsin(np.clip(-rot[..., 2, 0], -1.0, 1.0))
    roll = np.arctan2(rot[..., 2, 1], rot[..., 2, 2])
    yaw = np.arctan2(rot[..., 1, 0], rot[..., 0, 0])
    return roll, pitch, yaw


def rot_to_quat(rot):
    """(..., 3, 3) -> (..., 4) unit quaternion (x, y, z, w) with w >= 0."""
    rot = np.asarray(rot, dtype=np.float64)
    if rot.shape == (3, 3):
        return _rot_to_quat_one(rot.tolist())
    m = rot.reshape(-1, 3, 3)
    t = np.trace(m, axis1=1, axis2=2)
    cands = np.stack([
        np.stack([m[:, 2, 1] - m[:, 1, 2], m[:, 0, 2] - m[:, 2, 0], m[:, 1, 0] - m[:, 0, 1],
                  1.0 + t], axis=-1),
        np.stack([1.0 + m[:, 0, 0] - m[:, 1, 1] - m[:, 2, 2], m[:, 0, 1] + m[:, 1, 0],
                  m[:, 0, 2] + m[:, 2, 0], m[:, 2, 1] - m[:, 1, 2]], axis=-1),
        np.stack([m[:, 0, 1] + m[:, 1, 0], 1.0 - m[:, 0, 0] + m[:, 1, 1] - m[:, 2, 2],
                  m[:, 1, 2] + m[:, 2, 1], m[:, 0, 2] - m[:, 2, 0]], axis=-1),
        np.stack([m[:, 0, 2] + m[:, 2, 0], m[:, 1, 2] + m[:, 2, 1],
                  1.0 - m[:, 0, 0] - m[:, 1, 1] + m[:, 2, 2], m[:, 1, 0] - m[:, 0, 1]], axis=-1),
    ], axis=1)
    # Pick the numerically largest candidate per matrix (Shepperd's method).
    best = np.argmax(np.linalg.norm(cands, axis=-1), axis=1)
    q = cands[np.arange(len(m)), best]
    q /= np.linalg.norm(q, axis=-1, keepdims=True)
    q *= np.where(q[:, 3:4] < 0, -1.0, 1.0)
    return q.reshape(rot.shape[:-2] + (4,))


def _rot_to_quat_one(m):
    """rot_to_quat of one rotation (nested lists): the same candidates and choice, in plain
    Python floats, which is several times faster than the batched form for one matrix."""
    (a, b, c), (d, e, f), (g, h, i) = m
    cands = ((h - f, c - g, d - b, 1.0 + a + e + i), (1.0 + a - e - i, b + d, c + g, h - f),
             (b + d, 1.0 - a + e - i, f + h, c - g), (c + g, f + h, 1.0 - a - e + i, d - b))
    norms = [math.sqrt(sum(v * v for v in q)) for q in cands]
    best = norms.index(max(norms))
    q = np.array(cands[best]) / norms[best]
    return q if q[3] >= 0 else -q


def quat_to_rot(quat):
    """(..., 4) quaternion (x, y, z, w) -> (..., 3, 3); normalises first."""
    q = np.asarray(quat, dtype=np.float64)
    q = q / np.maximum(np.linalg.norm(q, axis=-1, keepdims=True), _EPS)
    x, y, z, w = q[..., 0], q[..., 1], q[..., 2], q[..., 3]
    out = np.empty(q.shape[:-1] + (3, 3))
    out[..., 0, 0] = 1 - 2 * (y * y + z * z)
    out[..., 0, 1] = 2 * (x * y - z * w)
    out[..., 0, 2] = 2 * (x * z + y * w)
    out[..., 1, 0] = 2 * (x * y + z * w)
    out[..., 1, 1] = 1 - 2 * (x * x + z * z)
    out[..., 1, 2] = 2 * (y * z - x * w)
    out[..., 2, 0] = 2 * (x * z - y * w)
    out[..., 2, 1] = 2 * (y * z + x * w)
    out[..., 2, 2] = 1 - 2 * (x * x + y * y)
    return out


def cam0_to_base_link(poses_cam0, tr_velo_to_cam):
    """DESIGN §3: T_odom_base(k) = Tr^-1 · P(k) · Tr for KITTI cam0 poses (N, 4, 4)."""
    tr = np.asarray(tr_velo_to_cam, dtype=np.float64)
    return invert_pose(tr) @ np.asarray(poses_cam0, dtype=np.float64) @ tr


def base_link_to_cam0(poses_base, tr_velo_to_cam):
    """Inverse of cam0_to_base_link: P(k) = Tr · T_odom_base(k) · Tr^-1."""
    tr = np.asarray(tr_velo_to_cam, dtype=np.float64)
    return tr @ np.asarray(poses_base, dtype=np.float64) @ invert_pose(tr)


def chain_relative(rel_poses, first=None):
    """Chain (N, 4, 4) relative poses into N+1 absolute poses from `first` (default I)."""
    rel = np.asarray(rel_poses, dtype=np.float64)
    out = np.empty((len(rel) + 1, 4, 4))
    out[0] = np.eye(4) if first is None else first
    for i, step in enumerate(rel):
        out[i + 1] = out[i] @ step
    return out


# --- SE(3) as a Lie group: twists xi = (rho, phi), translation part first (the order of the
# DESIGN §5 6-vector and of ROS covariances). Perturbations are on the right: T = T_bar exp(xi).

def _so3_series(theta):
    """(1 - cos t) / t^2 and (t - sin t) / t^3, with their Taylor forms near 0."""
    small = theta < 1e-4
    safe = np.where(small, 1.0, theta)
    b = np.where(small, 0.5 - theta**2 / 24.0, (1.0 - np.cos(safe)) / safe**2)
    c = np.where(small, 1.0 / 6.0 - theta**2 / 120.0, (safe - np.sin(safe)) / safe**3)
    return b, c


def so3_left_jacobian(w):
    """(..., 3) -> (..., 3, 3) J_l(w) = I + b K + c K^2; also SE(3)'s V matrix."""
    w = np.asarray(w, dtype=np.float64)
    b, c = _so3_series(np.linalg.norm(w, axis=-1)[..., None, None])
    k = skew(w)
    return np.eye(3) + b * k + c * (k @ k)


def so3_right_jacobian(w):
    """J_r(w) = J_l(-w): exp(w + d) ~ exp(w) exp(J_r(w) d) to first order."""
    return so3_left_jacobian(-np.asarray(w, dtype=np.float64))


def se3_exp(xi):
    """(..., 6) twist (rho, phi) -> (..., 4, 4) pose: rotation exp(phi), translation J_l rho."""
    xi = np.asarray(xi, dtype=np.float64)
    trans = (so3_left_jacobian(xi[..., 3:]) @ xi[..., :3, None])[..., 0]
    return make_pose(so3_exp(xi[..., 3:]), trans)


def se3_log(pose):
    """Inverse of se3_exp: (..., 4, 4) -> (..., 6)."""
    pose = np.asarray(pose, dtype=np.float64)
    phi = so3_log(pose[..., :3, :3])
    rho = np.linalg.solve(so3_left_jacobian(phi), pose[..., :3, 3:4])[..., 0]
    return np.concatenate([rho, phi], axis=-1)


def se3_adjoint(pose):
    """(..., 4, 4) -> (..., 6, 6) Ad_T with T exp(xi) T^-1 = exp(Ad_T xi): [[R, t^ R], [0, R]]."""
    pose = np.asarray(pose, dtype=np.float64)
    rot, trans = pose[..., :3, :3], pose[..., :3, 3]
    out = np.zeros(pose.shape[:-2] + (6, 6))
    out[..., :3, :3] = rot
    out[..., :3, 3:] = skew(trans) @ rot
    out[..., 3:, 3:] = rot
    return out
