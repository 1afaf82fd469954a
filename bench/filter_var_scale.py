"""The filter under the network with several --relpose_var_scale values, to choose the scale on
a validation sequence: the network runs once, then the filter (in-process, the functions
predict_odometry calls) with each scale, with all sensors and with camera + LiDAR cut.

  OMP_NUM_THREADS=1 .venv/bin/python bench/filter_var_scale.py --data_path data_hybrid \\
      --sequence 04 --checkpoint pretrain_models/multimodal_initial.pth \\
      --filter_checkpoint pretrain_models/imu_filter.pth --scales 1,100,1e4 --outage 5:10

It also prints how the network's claimed variances compare with its errors on the sequence:
per dimension, the mean of error^2 / variance (1 for a calibrated head) and the network's step
errors. The scale with the lowest all-sensor t_rel is printed last; choose it on a sequence
that is not the one you then report (the filter's validation sequence 04, not 07).
"""
import argparse
from pathlib import Path
import sys

import numpy as np
import torch

from mm_fusion_ros.cli.predict_odometry import load_predictor, predict_sequence, sequence_dataset
from mm_fusion_ros.eval.metrics import kitti_metrics
from mm_fusion_ros.eval.trajectory_io import base_link_poses_to_cam0, read_kitti_poses
from mm_fusion_ros.filter.checkpoint import load_filter
from mm_fusion_ros.filter.config import FilterRunConfig, parse_outage
from mm_fusion_ros.filter.sequence import filter_sequence, outage_steps
from mm_fusion_ros.geometry import invert_pose, pose_to_vec6


def build_parser():
    p = argparse.ArgumentParser(prog='filter_var_scale', description=__doc__.splitlines()[0])
    p.add_argument('--data_path', type=Path, required=True, help='KITTI root of the sequence')
    p.add_argument('--sequence', required=True, help='sequence id (with poses, to score)')
    p.add_argument('--checkpoint', type=Path, required=True, help='fusion network checkpoint')
    p.add_argument('--filter_checkpoint', type=Path, required=True,
                   help='inertial filter checkpoint (train_imu_filter)')
    p.add_argument('--scales', default='1,100,1e4', help='comma-separated variance factors')
    p.add_argument('--outage', default=None,
                   help='START_S:DURATION_S of a camera+LiDAR cut, also run per scale')
    p.add_argument('--threads', type=int, default=1, help='torch CPU threads')
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    scales = [float(s) for s in args.scales.split(',')]
    core, scfg = load_predictor(str(args.checkpoint), 'cpu')
    ds = sequence_dataset(argparse.Namespace(data_path=args.data_path, pointcloud_path=None,
                                             imu_path=None), args.sequence, scfg)
    seq = ds.sequences[0]
    pred = predict_sequence(core, ds, 8)
    gt = read_kitti_poses(seq.poses_path)
    truth = pose_to_vec6(invert_pose(seq.poses_base[:-1]) @ seq.poses_base[1:])
    err = pred.steps - truth
    run_cfg = FilterRunConfig()
    floored = run_cfg.relpose_logvar(pred.logvars)
    np.set_printoptions(precision=4, suppress=False)
    print(f'sequence {args.sequence}: {len(truth)} steps')
    print('network step error, mean abs (x y z [m], rx ry rz [rad]):', np.abs(err).mean(0))
    print('mean error^2 / variance, head as is:        ', (err ** 2 / np.exp(pred.logvars))
          .mean(0))
    print('mean error^2 / variance, with the floors:    ', (err ** 2 / np.exp(floored)).mean(0))
    cfg, model = load_filter(str(args.filter_checkpoint))
    cases = [('all', None)]
    if args.outage:
        start, duration = parse_outage(args.outage)
        cases.append(('outage', ~outage_steps(seq.times, [(start, duration)])))
    results = {}
    print('\n| scale | sensors | t_rel [%] | r_rel [deg/100m] |\n| --- | --- | --- | --- |')
    for scale in scales:
        for name, valid in cases:
            run = filter_sequence(seq, cfg, model, pred.steps, pred.logvars, valid, scale,
                                  run_cfg.relpose_min_logvar)
            m = kitti_metrics(gt, base_link_poses_to_cam0(run.poses, seq.Tr))
            results[(scale, name)] = m['t_rel']
            print(f'| {scale:g} | {name} | {m["t_rel"]:.2f} | {m["r_rel"]:.3f} |', flush=True)
    run = filter_sequence(seq, cfg, model)
    m = kitti_metrics(gt, base_link_poses_to_cam0(run.poses, seq.Tr))
    print(f'| - | IMU only (no network) | {m["t_rel"]:.2f} | {m["r_rel"]:.3f} |')
    best = min(scales, key=lambda s: results[(s, 'all')])
    print(f'\nlowest all-sensor t_rel: scale {best:g} ({results[(best, "all")]:.2f} %)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
