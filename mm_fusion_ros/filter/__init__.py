"""Inertial filter under the learned odometry (DESIGN §10): an invariant EKF on SE_2(3) with IMU
biases, vehicle pseudo-measurements whose noise a small network adapts, and relative-pose updates
from the fusion network through cloned scan poses.

Layers: lie, config, ekf, odometry are numpy only (layer 2 beside model/ and eval/); noise_net
adds torch; checkpoint and train use training.checkpoint and the KITTI readers (layer 3).
"""
