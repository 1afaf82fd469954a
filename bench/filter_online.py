"""Cost of the inertial filter in the online node (filter/online.py), without ROS: a synthetic
60 s drive at 100 Hz IMU and 10 Hz scans, the IMU arriving in a Synchronizer, the source
polled at every IMU sample (publish_rate imu, as the node's timer) or not (scan), a step handed
over 50 ms after each scan. With --noise_net the filter carries a noise network of the shipped
shape (200-sample window, 32 channels, speed head; untrained weights cost the same), run once
per 10 samples at batch 1 as online, as one network and as deep ensembles (--members, the
ensemble size that train_imu_filter's --seeds gives), each run interleaved.

  OMP_NUM_THREADS=1 .venv/bin/python bench/filter_online.py --runs 3 [--noise_net [--members 1,5]]

Prints per run: microseconds per IMU sample (feeding the filter, and at IMU rate the pose,
covariance and twist of each sample) and per step (scan, relative-pose update, read-out).
"""
import argparse
import time

import numpy as np
import torch

from mm_fusion_ros.filter.config import FilterConfig
from mm_fusion_ros.filter.noise_net import build_noise_net, NoiseModel, NoiseNetConfig
from mm_fusion_ros.filter.online import FilterPoseSource, OnlineFilterConfig
from mm_fusion_ros.geometry import invert_pose, make_pose, pose_to_vec6
from mm_fusion_ros.sync.config import SyncConfig
from mm_fusion_ros.sync.synchronizer import Synchronizer
from mm_fusion_ros.synthetic.imu import imu_kinematics
from mm_fusion_ros.synthetic.trajectory import synthesize_drive
from mm_fusion_ros.trajectory.chain import OnlineTrajectory
from mm_fusion_ros.trajectory.covariance import diag_covariance

RATE, SCAN_EVERY, LATENCY = 100, 10, 5
LOGVAR = np.log(np.square([0.02, 0.02, 0.02, 2e-3, 2e-3, 2e-3]))


def data(duration):
    traj, _ = synthesize_drive(np.random.default_rng(0), duration + 1.0)
    t = np.arange(0.0, duration, 1.0 / RATE)
    rot, pos, _, force, rate = imu_kinematics(traj, t + traj.t_start, np.eye(4))
    scans = np.arange(60, len(t), SCAN_EVERY)
    T = make_pose(rot[scans], pos[scans])
    rel = pose_to_vec6(invert_pose(T[:-1]) @ T[1:])
    return 1_000_000_000 + np.round(t * 1e9).astype(np.int64), force, rate, scans, rel


def run(args, mode, model):
    stamps, acc, gyr, scans, rel = data(args.duration)
    src = FilterPoseSource(OnlineFilterConfig(publish_rate=mode), FilterConfig(), model, {})
    sync = Synchronizer(sync_cfg=SyncConfig(imu_keep_s=5.0))
    src.connect(sync.imu_after)
    traj = OnlineTrajectory(bridge=src, source=src)
    due = {int(scans[k]) + LATENCY: k for k in range(1, len(scans))}
    t_poll = t_step = 0.0
    cov = diag_covariance(LOGVAR)
    for i in range(len(stamps)):
        sync.add_imu(int(stamps[i]), acc[i], gyr[i])
        if mode == 'imu':
            t0 = time.perf_counter()
            src.poll()
            t_poll += time.perf_counter() - t0
        if i in due:
            k = due[i]
            t0 = time.perf_counter()
            traj.add_step(int(stamps[scans[k - 1]]), int(stamps[scans[k]]), rel[k - 1], cov)
            t_step += time.perf_counter() - t0
    n_steps = len(scans) - 1
    stats = src.stats()
    return (t_poll + t_step) / len(stamps) * 1e6, t_step / n_steps * 1e6, stats


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--runs', type=int, default=3)
    p.add_argument('--duration', type=float, default=60.0, help='drive length [s]')
    p.add_argument('--noise_net', action='store_true', help='with a noise network')
    p.add_argument('--members', default='1,5', help='with --noise_net: the ensemble sizes, '
                   'comma-separated (1: one network, the baseline)')
    args = p.parse_args()
    torch.set_num_threads(1)
    models = {'-': None}
    if args.noise_net:
        torch.manual_seed(0)
        models = {int(n): NoiseModel(build_noise_net(NoiseNetConfig(members=int(n))))
                  for n in args.members.split(',')}
    print('| run | publish_rate | networks | us per IMU sample (all work / samples) '
          '| us per step |')
    print('| --- | --- | --- | --- | --- |')
    for r in range(args.runs):
        for mode in ('scan', 'imu'):
            for members, model in models.items():
                per_sample, per_step, stats = run(args, mode, model)
                print(f'| {r + 1} | {mode} | {members} | {per_sample:.1f} | {per_step:.1f} |',
                      flush=True)
    print(f'last run: {stats}')


if __name__ == '__main__':
    main()
