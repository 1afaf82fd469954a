"""The inertial filter under the fusion network on one sequence, with all sensors and with a
camera + LiDAR outage: KITTI t_rel / r_rel, and the drift over the outage and after it.

  .venv/bin/python bench/filter_outage.py --data_path data_hybrid --sequence 07 \\
      --checkpoint pretrain_models/multimodal_initial.pth \\
      --filter_checkpoint pretrain_models/imu_filter.pth --outage 20:20 --out_dir results/outage

Meant for a hybrid sequence (synth_kitti --trajectory poses/07.txt --imu_source imu/07.mat: a
real route with its real IMU, synthetic camera and LiDAR). Trajectories, each written to
OUT_DIR/NAME/NN.txt (cam0) by the same code predict_odometry runs:
- net, net_outage: the network's steps chained (predict_odometry --filter off [--outage]);
  in the outage the network sees the IMU alone;
- net_filter, net_filter_outage: the filter over the IMU updated by the network's steps
  (--filter on [--outage]); in the outage it takes none of them;
- filter_imu_only: the filter on the IMU alone (no relative pose at all), its own initial state.
Window errors: the relative pose from the first frame at or after a window's start to the last
frame at or before its end, against ground truth: translation error in % of the distance driven
in the window, rotation error in deg. Windows: the outage, and as long again after it.
"""
import argparse
import logging
from pathlib import Path
import sys
import time

import numpy as np
import torch

from mm_fusion_ros.cli import predict_odometry
from mm_fusion_ros.eval.metrics import kitti_metrics, rotation_angle
from mm_fusion_ros.eval.trajectory_io import (
    base_link_poses_to_cam0,
    read_kitti_poses,
    write_kitti_poses,
)
from mm_fusion_ros.filter.checkpoint import load_filter
from mm_fusion_ros.filter.config import parse_outage
from mm_fusion_ros.filter.sequence import filter_sequence
from mm_fusion_ros.geometry import invert_pose
from mm_fusion_ros.kitti.odometry import KittiSequence

ROWS = (('net', 'network alone', False, False), ('net_filter', 'network + filter', True, False),
        ('net_outage', 'network alone', False, True),
        ('net_filter_outage', 'network + filter', True, True),
        ('filter_imu_only', 'filter, IMU only (no network)', None, None))


def build_parser():
    p = argparse.ArgumentParser(prog='filter_outage', description=__doc__.splitlines()[0])
    p.add_argument('--data_path', type=Path, required=True, help='KITTI root of the sequence')
    p.add_argument('--sequence', default='07', help='sequence id')
    p.add_argument('--checkpoint', type=Path, required=True, help='fusion network checkpoint')
    p.add_argument('--filter_checkpoint', type=Path, required=True,
                   help='inertial filter checkpoint (train_imu_filter)')
    p.add_argument('--outage', default='20:20', help='START_S:DURATION_S of camera+LiDAR cut')
    p.add_argument('--out_dir', type=Path, required=True, help='trajectories go here')
    p.add_argument('--relpose_var_scale', type=float, default=1.0,
                   help="factor on the network's variances in the filter (predict_odometry's "
                        'flag; choose it on a validation sequence with bench/filter_var_scale.py)')
    p.add_argument('--threads', type=int, default=2, help='torch CPU threads')
    return p


def window_error(gt, pred, times, start, end):
    """(translation error [% of distance driven], rotation error [deg], distance [m]) of the
    motion between the first frame at or after `start` and the last at or before `end`."""
    a = int(np.searchsorted(times, start - 1e-9))
    b = int(np.searchsorted(times, end + 1e-9)) - 1
    if b <= a:
        return float('nan'), float('nan'), 0.0
    dist = float(np.linalg.norm(np.diff(gt[a:b + 1, :3, 3], axis=0), axis=1).sum())
    err = invert_pose(invert_pose(gt[a]) @ gt[b]) @ (invert_pose(pred[a]) @ pred[b])
    return (100.0 * float(np.linalg.norm(err[:3, 3])) / max(dist, 1e-9),
            float(np.degrees(rotation_angle(err[:3, :3]))), dist)


def run_all(args) -> dict:
    """{name: (cam0 poses, seconds)} of every row."""
    out = {}
    common = ['--checkpoint', str(args.checkpoint), '--data_path', str(args.data_path),
              '--sequences', args.sequence]
    for name, _, filtered, outage in ROWS[:4]:
        extra = ['--filter', 'on' if filtered else 'off']
        extra += ['--filter_checkpoint', str(args.filter_checkpoint),
                  '--relpose_var_scale', str(args.relpose_var_scale)] if filtered else []
        extra += ['--outage', args.outage] if outage else []
        t0 = time.perf_counter()
        if predict_odometry.main(common + extra + ['--out_dir', str(args.out_dir / name)]):
            raise SystemExit(f'filter_outage: predict_odometry failed for {name}')
        out[name] = (read_kitti_poses(args.out_dir / name / f'{args.sequence}.txt'),
                     time.perf_counter() - t0)
    seq = KittiSequence(args.data_path, args.sequence)
    t0 = time.perf_counter()
    run = filter_sequence(seq, *load_filter(args.filter_checkpoint))
    poses = base_link_poses_to_cam0(run.poses, seq.Tr)
    write_kitti_poses(args.out_dir / 'filter_imu_only' / f'{args.sequence}.txt', poses)
    out['filter_imu_only'] = (poses, time.perf_counter() - t0)
    print(f'filter_imu_only: start {run.result.init_info}; counts {run.result.counts}')
    return out


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    start, duration = parse_outage(args.outage)
    seq = KittiSequence(args.data_path, args.sequence)
    gt, times = read_kitti_poses(seq.poses_path), np.asarray(seq.times)
    trajectories = run_all(args)
    end = min(start + 2 * duration, float(times[-1]))
    print(f'\nsequence {args.sequence}: {len(times)} frames, {times[-1]:.1f} s; camera+LiDAR '
          f'outage {start:g}-{start + duration:g} s; after = {start + duration:g}-{end:g} s\n')
    print('| run | sensors | t_rel [%] | r_rel [deg/100m] | outage window: t [%] / r [deg] '
          '| after: t [%] / r [deg] | time [s] |')
    print('| --- | --- | --- | --- | --- | --- | --- |')
    for name, label, _, outage in ROWS:
        poses, seconds = trajectories[name]
        m = kitti_metrics(gt, poses)
        w_out = window_error(gt, poses, times, start, start + duration)
        w_after = window_error(gt, poses, times, start + duration, end)
        sensors = 'IMU only' if outage is None else ('20 s outage' if outage else 'all')
        sensors = sensors.replace('20 s', f'{duration:g} s')
        print(f'| {label} | {sensors} | {m["t_rel"]:.2f} | {m["r_rel"]:.3f} | '
              f'{w_out[0]:.2f} / {w_out[1]:.2f} | {w_after[0]:.2f} / {w_after[1]:.2f} | '
              f'{seconds:.0f} |')
    dist_out = window_error(gt, gt, times, start, start + duration)[2]
    dist_after = window_error(gt, gt, times, start + duration, end)[2]
    print(f'\ndistance driven: {dist_out:.1f} m in the outage window, {dist_after:.1f} m after')
    return 0


if __name__ == '__main__':
    sys.exit(main())
