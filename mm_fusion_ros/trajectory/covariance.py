"""First-order uncertainty of the online trajectory on SE(3), and the published twist.

A predicted step is the DESIGN §5 6-vector m = (t, w): translation and so(3) log rotation from
base_link at scan k-1 to base_link at k, with a covariance S_m over those six numbers (the
network's diag(exp(logvar))). Poses carry their uncertainty as a right perturbation,
T = T_bar exp(xi) with xi = (rho, phi) in the body frame of T. To first order:
- a step m + n is T_step_bar exp(G n) with G = blockdiag(R_bar^T, J_r(w)) (step_covariance);
- chaining T_k = T_{k-1} dT gives S_k = Ad(dT^-1) S_{k-1} Ad(dT^-1)^T + S_step (compose), so
  rotation uncertainty reaches position as the trajectory goes on;
- nav_msgs/Odometry wants the pose covariance in header.frame_id (odom): position error and
  rotation error about the odom axes, d = blockdiag(R, R) xi (odom_covariance).
The twist goes in child_frame_id (base_link_pred at scan k), as nav_msgs/Odometry defines it:
v = dR^T t / dt, w = log(dR) / dt (the bag writer's ground-truth twist is the same).
"""
import numpy as np

from mm_fusion_ros.geometry import (
    invert_pose,
    se3_adjoint,
    skew,
    so3_exp,
    so3_right_jacobian,
    vec6_to_pose,
)


def diag_covariance(logvar) -> np.ndarray:
    """6x6 covariance of a 6-vector from its predicted log-variance."""
    return np.diag(np.exp(np.asarray(logvar, dtype=np.float64).reshape(6)))


def step_covariance(mean6, cov6) -> np.ndarray:
    """Covariance of a step's right perturbation xi from the covariance of its 6-vector."""
    mean6 = np.asarray(mean6, dtype=np.float64)
    g = np.zeros((6, 6))
    g[:3, :3] = so3_exp(mean6[3:]).T
    g[3:, 3:] = so3_right_jacobian(mean6[3:])
    return g @ np.asarray(cov6, dtype=np.float64) @ g.T


def compose(cov_prev, step_pose, step_cov) -> np.ndarray:
    """Covariance of T_prev @ step (both right-perturbed, independent)."""
    ad = se3_adjoint(invert_pose(step_pose))
    return ad @ np.asarray(cov_prev, dtype=np.float64) @ ad.T + step_cov


def odom_covariance(pose, cov) -> np.ndarray:
    """Body-frame right-perturbation covariance -> the Odometry pose covariance in odom."""
    b = np.zeros((6, 6))
    b[:3, :3] = b[3:, 3:] = np.asarray(pose, dtype=np.float64)[:3, :3]
    return b @ cov @ b.T


def twist(mean6, dt: float) -> np.ndarray:
    """(vx, vy, vz, wx, wy, wz) of base_link at scan k in its own frame, from the step k-1 -> k."""
    step = vec6_to_pose(mean6)
    out = np.empty(6)
    out[:3] = step[:3, :3].T @ step[:3, 3] / dt
    out[3:] = np.asarray(mean6, dtype=np.float64)[3:] / dt
    return out


def twist_covariance(mean6, cov6, dt: float) -> np.ndarray:
    """First-order covariance of twist(mean6 + n, dt) for n ~ N(0, cov6)."""
    mean6 = np.asarray(mean6, dtype=np.float64)
    rot_t = so3_exp(mean6[3:]).T
    j = np.zeros((6, 6))
    j[:3, :3] = rot_t
    j[:3, 3:] = skew(rot_t @ mean6[:3]) @ so3_right_jacobian(mean6[3:])
    j[3:, 3:] = np.eye(3)
    j /= dt
    return j @ np.asarray(cov6, dtype=np.float64) @ j.T
