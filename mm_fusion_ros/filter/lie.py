"""SO(3) Jacobians and the SE_2(3) exponential the invariant filter retracts with (numpy only).

Conventions follow mm_fusion_ros.geometry: so(3) vectors are axis * angle, rotations act on
column vectors. Single vectors only: the filter calls these once per update, not per batch.
"""
import math

import numpy as np

_SMALL = 1e-8
_I3 = np.eye(3)


def hat(w) -> np.ndarray:
    """3-vector -> cross-product matrix (scalar fast path of geometry.skew)."""
    return np.array([[0.0, -w[2], w[1]], [w[2], 0.0, -w[0]], [-w[1], w[0], 0.0]])


def so3_exp(w) -> np.ndarray:
    """Rodrigues for one 3-vector (scalar fast path of geometry.so3_exp)."""
    k = hat(w)
    theta2 = float(w[0] * w[0] + w[1] * w[1] + w[2] * w[2])
    if theta2 < 1e-16:
        return _I3 + k + 0.5 * (k @ k)
    theta = math.sqrt(theta2)
    return _I3 + (math.sin(theta) / theta) * k + ((1.0 - math.cos(theta)) / theta2) * (k @ k)


def so3_left_jacobian(phi) -> np.ndarray:
    """J_l(phi): Exp(phi + d) = Exp(J_l d) Exp(phi) to first order in d; also V of SE(3)."""
    k = hat(phi)
    theta2 = float(phi[0] * phi[0] + phi[1] * phi[1] + phi[2] * phi[2])
    if theta2 < _SMALL**2:
        return _I3 + 0.5 * k
    theta = math.sqrt(theta2)
    a = (1.0 - math.cos(theta)) / theta2
    b = (theta - math.sin(theta)) / (theta2 * theta)
    return _I3 + a * k + b * (k @ k)


def so3_right_jacobian(phi) -> np.ndarray:
    """J_r(phi) = J_l(-phi): Exp(phi + d) = Exp(phi) Exp(J_r d) to first order in d."""
    return so3_left_jacobian(-np.asarray(phi, dtype=np.float64))


def se23_exp(xi):
    """exp of a 9-vector (rotation, velocity, position) of se_2(3) -> (R, v, p)."""
    xi = np.asarray(xi, dtype=np.float64)
    jac = so3_left_jacobian(xi[:3])
    return so3_exp(xi[:3]), jac @ xi[3:6], jac @ xi[6:9]


def se3_exp(xi):
    """exp of a 6-vector (rotation, position) of se(3) -> (R, p)."""
    xi = np.asarray(xi, dtype=np.float64)
    return so3_exp(xi[:3]), so3_left_jacobian(xi[:3]) @ xi[3:6]
