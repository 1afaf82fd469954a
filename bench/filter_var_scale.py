"""The filter under the network on the hybrid 07 with several --relpose_var_scale values:
the network runs once, then the filter (in-process, the functions predict_odometry calls) with
each scale, with all sensors and with camera + LiDAR cut 20-40 s.

  OMP_NUM_THREADS=1 .venv/bin/python bench/filter_var_scale.py

Paths are those of docs/inertial_filter.md's hybrid run (relative to the repository root):
data_hybrid/, pretrain_models/multimodal_initial.pth, pretrain_models/imu_filter.pth; the
network's steps are saved to results/outage/net_pred.npz. Scale 1 reproduces
bench/filter_outage.py's network + filter rows.
"""
import argparse
from pathlib import Path

import numpy as np
import torch

from mm_fusion_ros.cli.predict_odometry import load_predictor, predict_sequence, sequence_dataset
from mm_fusion_ros.eval.metrics import kitti_metrics
from mm_fusion_ros.eval.trajectory_io import base_link_poses_to_cam0, read_kitti_poses
from mm_fusion_ros.filter.checkpoint import load_filter
from mm_fusion_ros.filter.config import FilterRunConfig
from mm_fusion_ros.filter.sequence import filter_sequence, outage_steps
from mm_fusion_ros.geometry import invert_pose, pose_to_vec6

torch.set_num_threads(1)
args = argparse.Namespace(data_path=Path('data_hybrid'), pointcloud_path=None, imu_path=None)
core, scfg = load_predictor('pretrain_models/multimodal_initial.pth', 'cpu')
ds = sequence_dataset(args, '07', scfg)
seq = ds.sequences[0]
pred = predict_sequence(core, ds, 8)
np.savez('results/outage/net_pred.npz', steps=pred.steps, logvars=pred.logvars)
print('logvar mean', pred.logvars.mean(0).round(2), 'median', np.median(pred.logvars, 0).round(2))
gt = read_kitti_poses(seq.poses_path)
gsteps = pose_to_vec6(invert_pose(seq.poses_base[:-1]) @ seq.poses_base[1:])
err = pred.steps - gsteps
print('net step error mean abs', np.abs(err).mean(0).round(4), 'rmse',
      np.sqrt((err**2).mean(0)).round(4))
cfg, model = load_filter('pretrain_models/imu_filter.pth')
cut = outage_steps(seq.times, [(20.0, 20.0)])
for scale in (1.0, 100.0, 1e4):
    for name, valid in (('all', None), ('outage', ~cut)):
        run = filter_sequence(seq, cfg, model, pred.steps, pred.logvars, valid, scale,
                              FilterRunConfig().relpose_min_logvar)
        m = kitti_metrics(gt, base_link_poses_to_cam0(run.poses, seq.Tr))
        print(f'scale {scale:g} {name}: t_rel {m["t_rel"]:.2f} r_rel {m["r_rel"]:.3f}')
