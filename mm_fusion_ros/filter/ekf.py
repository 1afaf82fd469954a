"""Right-invariant EKF on SE_2(3) with IMU biases and cloned scan poses (numpy only).

State: X = (R, v, p) in SE_2(3) (imu_link in the odom frame: attitude, velocity, position) and
the biases b_g, b_a. Error: X = exp(xi) X_hat (right-invariant, as in AI-IMU dead-reckoning,
Brossard et al. 2020), b = b_hat + db; the 15-dim error is [xi_R, xi_v, xi_p, db_g, db_a], then
6 dims (xi_R, xi_p) per cloned pose. The invariant error makes the propagation Jacobian depend
on the state only through the bias terms, which keeps the filter consistent about the yaw and
position it cannot observe.

Covariance propagation is lazy: the nominal state follows every IMU sample, the covariance is
propagated in one step over the samples since the last flush (with the transition of the
state at the flush's start; exact for a constant F, since F is nilpotent of order 4), at most
`cov_every` samples apart and always before an update or a read-out that asks for it.
`cov_version` counts the changes of the covariance, so that a read-out can be kept until it
changes (InertialOdometry.pose with propagate=False).
"""
import numpy as np

from mm_fusion_ros.filter.lie import hat, se3_exp, se23_exp, so3_exp, so3_right_jacobian
from mm_fusion_ros.geometry import so3_log

STATE_DIM = 15
CLONE_DIM = 6
GYRO_BIAS_DIMS = np.arange(9, 12)   # db_g in the error [xi_R, xi_v, xi_p, db_g, db_a]
I3 = np.eye(3)


class InvariantEKF:
    """The filter's state, covariance, propagation and updates; no I/O, no clocks."""

    def __init__(self, rot, vel, pos, gyro_bias, accel_bias, cov, *, gravity, gyro_noise,
                 accel_noise, gyro_bias_walk, accel_bias_walk, cov_every=10):
        self.R = np.array(rot, dtype=np.float64)
        self.v = np.array(vel, dtype=np.float64)
        self.p = np.array(pos, dtype=np.float64)
        self.bg = np.array(gyro_bias, dtype=np.float64)
        self.ba = np.array(accel_bias, dtype=np.float64)
        self.P = np.array(cov, dtype=np.float64)
        if self.P.shape != (STATE_DIM, STATE_DIM):
            raise ValueError(f'initial covariance must be 15x15, got {self.P.shape}')
        self.g = np.array([0.0, 0.0, -float(gravity)])
        self.q = np.concatenate([np.full(3, gyro_noise**2), np.full(3, accel_noise**2),
                                 np.full(3, gyro_bias_walk**2), np.full(3, accel_bias_walk**2)])
        self.cov_every = max(1, int(cov_every))
        self.clones = {}            # key -> [R, p]; error block order = insertion order
        self.cov_version = 0        # +1 at every change of P
        self.on_correction = None   # called with the 9-dim (xi_R, xi_v, xi_p) of each update
        self._pending_dt = 0.0
        self._pending_n = 0
        self._pending_state = None

    # ---------------------------------------------------------------- propagation
    def propagate(self, gyro, accel, dt):
        """One IMU interval: rates and specific force (imu_link, bias not removed), dt [s]."""
        if self._pending_n == 0:
            self._pending_state = (self.R, self.v, self.p)
        w = (gyro - self.bg) * dt
        a = accel - self.ba
        # Specific force rotated with the interval's mid attitude R Exp(w/2) (first order).
        half = 0.5 * np.array([w[1] * a[2] - w[2] * a[1], w[2] * a[0] - w[0] * a[2],
                               w[0] * a[1] - w[1] * a[0]])
        acc = self.R @ (a + half) + self.g
        self.p = self.p + self.v * dt + (0.5 * dt * dt) * acc
        self.v = self.v + acc * dt
        self.R = self.R @ so3_exp(w)
        self._pending_dt += dt
        self._pending_n += 1
        if self._pending_n >= self.cov_every:
            self.flush()

    def flush(self):
        """Propagate the covariance over the samples since the last flush."""
        if self._pending_n == 0:
            return
        R, v, p = self._pending_state
        dt = self._pending_dt
        self._pending_dt, self._pending_n, self._pending_state = 0.0, 0, None
        self.cov_version += 1
        F = np.zeros((STATE_DIM, STATE_DIM))
        F[3:6, 0:3] = hat(self.g)
        F[6:9, 3:6] = I3
        F[0:3, 9:12] = -R
        F[3:6, 9:12] = -hat(v) @ R
        F[6:9, 9:12] = -hat(p) @ R
        F[3:6, 12:15] = -R
        Fdt = F * dt
        Fdt2 = Fdt @ Fdt
        phi = np.eye(STATE_DIM) + Fdt + 0.5 * Fdt2 + (Fdt2 @ Fdt) / 6.0
        G = np.zeros((STATE_DIM, 12))
        G[0:3, 0:3] = R
        G[3:6, 0:3] = hat(v) @ R
        G[6:9, 0:3] = hat(p) @ R
        G[3:6, 3:6] = R
        G[9:12, 6:9] = I3
        G[12:15, 9:12] = I3
        # Noise over the interval: the first-order term plus the transition of its midpoint.
        gm = G + 0.5 * Fdt @ G
        qd = (gm * (self.q * dt)) @ gm.T
        P = self.P
        n = STATE_DIM
        P[:n, :n] = phi @ P[:n, :n] @ phi.T + qd
        if P.shape[0] > n:
            P[:n, n:] = phi @ P[:n, n:]
            P[n:, :n] = P[:n, n:].T

    # ---------------------------------------------------------------- updates
    def update(self, H, residual, noise_cov, gate_chi2=0.0, consider=None):
        """EKF update with Jacobian H (m, dim), residual z - h(x) (m,), noise (m, m).

        consider: error dimensions this update must not correct (Schmidt "consider" update):
        their gain rows are zeroed and the covariance follows the Joseph form with that gain,
        P+ = (I - KH) P (I - KH)^T + K R K^T, which keeps their own block and lowers their
        correlations with the updated dimensions.
        Returns the Mahalanobis distance^2 of the residual (NIS); nothing changes when it exceeds
        gate_chi2 > 0 (then the caller counts a rejection).
        """
        self.flush()
        P = self.P
        PHt = P @ H.T
        S = H @ PHt + noise_cov
        S = 0.5 * (S + S.T)
        try:
            chol = np.linalg.cholesky(S)
        except np.linalg.LinAlgError as e:
            raise ValueError(f'innovation covariance not positive definite: {np.diag(S)}') from e
        sol = np.linalg.solve(chol, residual)
        nis = float(sol @ sol)
        if gate_chi2 > 0.0 and nis > gate_chi2:
            return nis
        # K = P H^T S^-1 through the Cholesky factor: W = P H^T L^-T, K = W L^-1.
        W = np.linalg.solve(chol, PHt.T).T
        dx = W @ sol
        P = P - W @ W.T
        if consider is not None and len(consider):
            # With K = D K_opt (D zeroes the consider rows) the Joseph form is
            # P - K_opt S K_opt^T everywhere except the consider-consider block, which stays.
            c = np.asarray(consider)
            dx[c] = 0.0
            P[np.ix_(c, c)] = self.P[np.ix_(c, c)]
        self.P = 0.5 * (P + P.T)
        self.cov_version += 1
        self._retract(dx)
        return nis

    def _retract(self, dx):
        if self.on_correction is not None:
            self.on_correction(dx[:9].copy())
        dR, dv, dp = se23_exp(dx[:9])
        self.R = dR @ self.R
        self.v = dR @ self.v + dv
        self.p = dR @ self.p + dp
        self.bg = self.bg + dx[GYRO_BIAS_DIMS]
        self.ba = self.ba + dx[12:15]
        for i, clone in enumerate(self.clones.values()):
            j = STATE_DIM + CLONE_DIM * i
            cR, cp = se3_exp(dx[j:j + 6])
            clone[0] = cR @ clone[0]
            clone[1] = cR @ clone[1] + cp

    def attitude_dims(self, axes) -> np.ndarray:
        """Error indices of the attitude about the world axes `axes` (0, 1: tilt, 2: yaw), of
        the current pose and of every cloned pose (their xi_R is in world axes too)."""
        axes = np.asarray(axes, dtype=int)
        starts = [0] + [STATE_DIM + CLONE_DIM * i for i in range(len(self.clones))]
        return np.concatenate([s + axes for s in starts]) if len(axes) else axes

    def update_body_velocity(self, rows, values, sigmas, R_ic=None, lever=None, gyro=None,
                             gate_chi2=0.0, consider=None):
        """Measure rows of the velocity of a point `lever` (imu frame) in a frame R_ic (imu<-c).

        h = R_ic^T (R^T v + (gyro - b_g) x lever): rows 1, 2 are the vehicle's lateral and
        vertical velocity (pseudo-measurement 0), row 0 its forward speed.
        """
        R_ic = I3 if R_ic is None else R_ic
        body = self.R.T @ self.v
        Hv = R_ic.T @ self.R.T
        Hbg = np.zeros((3, 3))
        if lever is not None and gyro is not None and np.any(lever):
            body = body + np.cross(gyro - self.bg, lever)
            Hbg = R_ic.T @ hat(lever)
        pred = R_ic.T @ body
        rows = list(rows)
        H = np.zeros((len(rows), self.P.shape[0]))
        H[:, 3:6] = Hv[rows]
        H[:, 9:12] = Hbg[rows]
        residual = np.asarray(values, dtype=np.float64) - pred[rows]
        return self.update(H, residual, np.diag(np.asarray(sigmas, dtype=np.float64) ** 2),
                           gate_chi2, consider)

    def update_zero_rate(self, gyro_mean, sigma, consider=None):
        """At standstill the mean gyro is its bias: z = gyro_mean, h = b_g."""
        H = np.zeros((3, self.P.shape[0]))
        H[:, 9:12] = I3
        return self.update(H, np.asarray(gyro_mean) - self.bg, np.eye(3) * sigma**2,
                           consider=consider)

    # ---------------------------------------------------------------- clones
    def add_clone(self, key, rot=None, pos=None, back_s=0.0):
        """Stochastic cloning of the pose (R, p) under `key`.

        By default the current pose. A pose `back_s` seconds in the past (a scan whose stamp
        the filter has already passed) is given as (rot, pos); its error follows from the
        current one through the inverse of the IMU transition over back_s (biases ignored):
        xi_R(t-s) = xi_R, xi_p(t-s) = xi_p - s xi_v + s^2/2 [g]x xi_R.
        """
        self.flush()
        if key in self.clones:
            raise ValueError(f'a pose is already cloned under {key!r}')
        n = self.P.shape[0]
        J = np.zeros((CLONE_DIM, n))
        J[0:3, 0:3] = I3
        J[3:6, 6:9] = I3
        if back_s:
            J[3:6, 3:6] = -back_s * I3
            J[3:6, 0:3] = 0.5 * back_s * back_s * hat(self.g)
        JP = J @ self.P
        P = np.zeros((n + CLONE_DIM, n + CLONE_DIM))
        P[:n, :n] = self.P
        P[n:, :n] = JP
        P[:n, n:] = JP.T
        P[n:, n:] = JP @ J.T
        self.P = P
        self.cov_version += 1
        self.clones[key] = [(self.R if rot is None else np.asarray(rot, dtype=np.float64)).copy(),
                            (self.p if pos is None else np.asarray(pos, dtype=np.float64)).copy()]

    def clone_index(self, key) -> int:
        try:
            return STATE_DIM + CLONE_DIM * list(self.clones).index(key)
        except ValueError as e:
            raise KeyError(f'no cloned pose under {key!r}; have {list(self.clones)}') from e

    def drop_clone(self, key):
        j = self.clone_index(key)
        keep = np.r_[0:j, j + CLONE_DIM:self.P.shape[0]]
        self.P = self.P[np.ix_(keep, keep)]
        self.cov_version += 1
        del self.clones[key]

    def clone_pose(self, key):
        """(R, p) and the 6x6 covariance of the (xi_R, xi_p) error of a cloned pose."""
        j = self.clone_index(key)
        R, p = self.clones[key]
        return R.copy(), p.copy(), self.P[j:j + 6, j:j + 6].copy()

    def update_relative_pose(self, key_from, key_to, vec6, cov6, T_imu_lidar, gate_chi2=0.0):
        """Relative pose of base_link from the pose cloned under key_from to key_to (None: now).

        vec6 = (translation, so(3) log) of T_lidar(from)^-1 T_lidar(to), as the fusion network
        predicts it (DESIGN §5), with its 6x6 covariance. With X = T_imu_lidar:
        h = X^-1 T_a^-1 T_b X; translation residual z_t - h_t, rotation log(h_R^T z_R).
        """
        self.flush()
        ja = self.clone_index(key_from)
        Ra, pa = self.clones[key_from]
        if key_to is None:
            Rb, pb, jbR, jbp = self.R, self.p, 0, 6
        else:
            jb = self.clone_index(key_to)
            (Rb, pb), jbR, jbp = self.clones[key_to], jb, jb + 3
        Rx, px = T_imu_lidar[:3, :3], T_imu_lidar[:3, 3]
        qb = pb + Rb @ px
        rot_pred = Rx.T @ Ra.T @ Rb @ Rx
        t_pred = Rx.T @ (Ra.T @ (qb - pa) - px)
        vec6 = np.asarray(vec6, dtype=np.float64)
        rot_meas = so3_exp(vec6[3:])
        residual = np.concatenate([vec6[:3] - t_pred, so3_log(rot_pred.T @ rot_meas)])
        A = Rx.T @ Ra.T
        B = Rx.T @ Rb.T
        H = np.zeros((6, self.P.shape[0]))
        qx = hat(qb)
        H[0:3, jbR:jbR + 3] += -A @ qx
        H[0:3, jbp:jbp + 3] += A
        H[0:3, ja:ja + 3] += A @ qx
        H[0:3, ja + 3:ja + 6] += -A
        H[3:6, jbR:jbR + 3] += B
        H[3:6, ja:ja + 3] += -B
        # The network's rotation noise is on the log; on the right perturbation it is J_r n.
        cov = np.array(cov6, dtype=np.float64)
        Jr = np.eye(6)
        Jr[3:, 3:] = so3_right_jacobian(vec6[3:])
        return self.update(H, residual, Jr @ cov @ Jr.T, gate_chi2)

    # ---------------------------------------------------------------- read-out
    def pose_covariance(self, T_imu_lidar=None, propagate=True):
        """6x6 covariance of base_link's pose: position in odom, then rotation about odom axes.

        propagate=False: with the covariance as last propagated or updated, without propagating
        it over the samples since (at most cov_every - 1).

        The right-invariant error gives p = p_hat + xi_R x p_hat + xi_p, so d(position) =
        xi_p - [q]x xi_R for the point q = p + R t_imu_lidar, and the rotation error is xi_R.
        """
        if propagate:
            self.flush()
        q = self.p if T_imu_lidar is None else self.p + self.R @ T_imu_lidar[:3, 3]
        J = np.zeros((6, STATE_DIM))
        J[0:3, 0:3] = -hat(q)
        J[0:3, 6:9] = I3
        J[3:6, 0:3] = I3
        return J @ self.P[:STATE_DIM, :STATE_DIM] @ J.T
