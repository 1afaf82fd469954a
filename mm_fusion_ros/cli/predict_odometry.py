"""predict_odometry: run a checkpoint over KITTI sequences and write KITTI-format trajectories.

Each sample (k-1 -> k) gives a relative pose of base_link; the chain of them from the identity is
converted to cam0 with the sequence's Tr (DESIGN §3), so `OUT/NN.txt` lines up with
`DATA/poses/NN.txt` and any KITTI tool (evaluate_odometry, the devkit, evo) reads it. The sample
settings (modalities, IMU window, point count) come from the checkpoint unless overridden.
A frame whose sample cannot be built (a bad file, skipped) repeats the previous predicted step,
and the count is reported, so the trajectory keeps one pose per frame. Ground truth is never
read: sequences without poses/ (KITTI 11-21) predict the same way, and OUT/NN.txt (cam0, one
3x4 pose per frame starting at the identity) is what the KITTI benchmark's submission wants.

--filter on: the inertial filter (mm_fusion_ros/filter, docs/inertial_filter.md) runs over the
sequence's IMU and takes each predicted step, with the variance of the network's log-variance
head, as a relative-pose update; steps not predicted are bridged on the IMU. The file is the
filter's pose at each frame, in the same format. --outage START_S:DURATION_S cuts camera and
LiDAR for that window: the network sees the IMU alone there, and the filter takes none of
those steps (it carries the pose on the IMU and its pseudo-measurements).
"""
import argparse
from dataclasses import dataclass
import logging
from pathlib import Path
import sys
import time

import numpy as np
from tqdm import tqdm

from mm_fusion_ros.config import ConfigFlags, SampleConfig
from mm_fusion_ros.eval.trajectory_io import base_link_poses_to_cam0, write_kitti_poses
from mm_fusion_ros.filter.checkpoint import load_filter
from mm_fusion_ros.filter.config import FilterRunConfig, parse_outage
from mm_fusion_ros.filter.sequence import check_imu_covers, filter_sequence, outage_steps
from mm_fusion_ros.geometry import chain_relative, vec6_to_pose
from mm_fusion_ros.kitti.dataset import collate_samples, KITTIOdomPointDataset
from mm_fusion_ros.kitti.ids import parse_sequences
from mm_fusion_ros.kitti.imu import require_sequence_imu
from mm_fusion_ros.model.config import ModelConfig
from mm_fusion_ros.training.checkpoint import load_checkpoint
from mm_fusion_ros.training.config import TrainConfig
from mm_fusion_ros.training.core import TrainerCore
from mm_fusion_ros.training.distributed import resolve_device

log = logging.getLogger('predict_odometry')
# Sample settings the checkpoint's may be overridden with; image size and K belong to the model.
SAMPLE_FLAGS = ConfigFlags(SampleConfig, exclude=('image_height', 'image_width', 'imu_steps'),
                           unset=True, unset_help="default: the checkpoint's")
FILTER_FLAGS = ConfigFlags(FilterRunConfig, repeat=('outage',),
                           types={'outage': lambda text: _arg(parse_outage, text)})


def _arg(parse, text):
    """argparse type: the parser's ValueError message as the usage error."""
    try:
        parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e
    return text


def build_parser():
    p = argparse.ArgumentParser(prog='predict_odometry', description=__doc__.splitlines()[0])
    p.add_argument('--checkpoint', type=Path, required=True, help='model checkpoint (.pth)')
    p.add_argument('--data_path', type=Path, required=True, help='KITTI root (sequences/, poses/)')
    p.add_argument('--pointcloud_path', type=Path, default=None,
                   help='root of the Velodyne scans (default: DATA/pointclouds if present)')
    p.add_argument('--imu_path', type=Path, default=None, help='folder of NN.mat IMU files')
    p.add_argument('--sequences', required=True, help='comma-separated ids, e.g. 07 or 7,9,10')
    p.add_argument('--out_dir', type=Path, required=True, help='writes OUT_DIR/NN.txt (cam0)')
    p.add_argument('--batch_size', type=int, default=8, help='samples per forward pass')
    p.add_argument('--device', default='auto', choices=('auto', 'cpu', 'cuda'),
                   help='where the model runs')
    SAMPLE_FLAGS.add(p.add_argument_group('sample settings'))
    FILTER_FLAGS.add(p.add_argument_group('inertial filter and sensor outages'))
    return p


def load_predictor(path, device):
    """(TrainerCore in eval use, SampleConfig) rebuilt from a checkpoint alone."""
    payload = load_checkpoint(path)
    model_cfg = ModelConfig.from_dict(payload['config']['model'])
    core = TrainerCore(model_cfg, TrainConfig(), device=device,
                       normalization=payload.get('normalization'))
    core.load_state_dict(payload, source=str(path))
    saved = payload['config'].get('sample')
    sample_cfg = SampleConfig.from_dict(saved) if saved else SampleConfig(
        image_height=model_cfg.image_height, image_width=model_cfg.image_width,
        imu_steps=model_cfg.imu_steps)
    return core, sample_cfg


@dataclass
class SequencePrediction:
    """The network over one sequence, step k-1 -> k at row k-1."""

    steps: np.ndarray       # (N-1, 6) mean; a step not predicted repeats the previous one
    logvars: np.ndarray     # (N-1, 6) log-variance of the predicted steps (NaN elsewhere)
    predicted: np.ndarray   # (N-1,) bool
    skipped: int            # samples that could not be built

    @property
    def filled(self) -> int:
        return int((~self.predicted).sum())


def predict_sequence(core, dataset, batch_size, desc='', masked=None,
                     masked_dataset=None) -> SequencePrediction:
    """Every frame step of a one-sequence dataset. masked (N-1,) bool: steps whose camera and
    LiDAR are cut; their samples come from masked_dataset (the same sequence, IMU only), or
    are not predicted when it is None."""
    n_frames = len(dataset.sequences[0])
    steps = np.full((n_frames - 1, 6), np.nan)
    logvars = np.full((n_frames - 1, 6), np.nan)
    skipped = 0
    masked = np.zeros(n_frames - 1, bool) if masked is None else masked
    other = ({key: j for j, key in enumerate(masked_dataset.index)}
             if masked_dataset is not None else {})

    def sample(i):
        key = dataset.index[i]
        if not masked[key[1] - 1]:
            return dataset[i]
        return masked_dataset[other[key]] if key in other else None

    indices = range(len(dataset))
    batches = [indices[i:i + batch_size] for i in range(0, len(dataset), batch_size)]
    for chunk in tqdm(batches, desc=desc, unit='batch', disable=not sys.stderr.isatty()):
        samples = [sample(i) for i in chunk]
        skipped += sum(s is None and not masked[dataset.index[i][1] - 1]
                       for s, i in zip(samples, chunk))
        batch = collate_samples(samples)
        if batch is None:
            continue
        mean, logvar = core.predict(batch)
        for meta, m, lv in zip(batch['meta'], mean.cpu().numpy(), logvar.cpu().numpy()):
            steps[meta['frame'] - 1] = m
            logvars[meta['frame'] - 1] = lv
    # A missing step repeats the previous one (constant velocity) so every frame has a pose.
    predicted = ~np.isnan(steps[:, 0])
    for k in np.flatnonzero(~predicted):
        steps[k] = steps[k - 1] if k > 0 and not np.isnan(steps[k - 1, 0]) else 0.0
    return SequencePrediction(steps, logvars, predicted, skipped)


def sequence_dataset(args, seq_id, sample_cfg):
    return KITTIOdomPointDataset(args.data_path, seq_id, pointcloud_path=args.pointcloud_path,
                                 sample_cfg=sample_cfg, on_bad_frame='skip',
                                 imu_path=args.imu_path, ground_truth='ignore')


def predict_trajectory(args, core, sample_cfg, run_cfg, inertial, seq_id):
    """(cam0 poses (N, 4, 4) from the identity, what was done) for one sequence; inertial: the
    filter's (FilterConfig, noise model), or None to chain the network's steps."""
    dataset = sequence_dataset(args, seq_id, sample_cfg)
    seq = dataset.sequences[0]
    if inertial is not None:   # before the network runs: a missing IMU fails at once
        check_imu_covers(require_sequence_imu(seq), seq.times, seq_id, inertial[0])
    masked = outage_steps(seq.times, run_cfg.outage_windows)
    if run_cfg.outage and not masked.any():
        raise ValueError(f'--outage {" ".join(run_cfg.outage)} covers no frame of sequence '
                         f'{seq_id} (its frames span {seq.times[0]:.2f}-{seq.times[-1]:.2f} s)')
    imu_only = None
    if masked.any() and 'imu' in sample_cfg.modalities:
        imu_only = sequence_dataset(args, seq_id, sample_cfg.replace(modalities=('imu',)))
    pred = predict_sequence(core, dataset, args.batch_size, seq_id, masked, imu_only)
    note = (f'{pred.filled} steps not predicted, {pred.skipped} samples skipped, '
            f'{int(masked.sum())} steps with camera and LiDAR cut')
    if inertial is None:
        poses = chain_relative(vec6_to_pose(pred.steps))
        return base_link_poses_to_cam0(poses, seq.Tr), note + '; network steps chained'
    run = filter_sequence(seq, *inertial, pred.steps, pred.logvars, pred.predicted & ~masked,
                          run_cfg.relpose_var_scale, run_cfg.relpose_min_logvar)
    note += (f'; filter: {run.result.counts["relpose_applied"]} relative poses applied, '
             f'{run.bridged} steps bridged on the IMU, start {run.result.init_info}')
    return base_link_poses_to_cam0(run.poses, seq.Tr), note


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s')
    try:
        device = resolve_device(args.device)
        sequences = parse_sequences(args.sequences)
        core, sample_cfg = load_predictor(args.checkpoint, device)
        sample_cfg = sample_cfg.replace(**SAMPLE_FLAGS.values(args))
        if args.batch_size < 1:
            raise ValueError(f'--batch_size must be >= 1, got {args.batch_size}')
        if sample_cfg.max_points == 0 and args.batch_size > 1:
            raise ValueError('--max_points 0 keeps every point, so scans differ in size: use '
                             '--batch_size 1')
        run_cfg = FILTER_FLAGS.build(args)
        inertial = None
        if run_cfg.enabled:
            inertial = load_filter(run_cfg.filter_checkpoint or args.checkpoint)
        elif run_cfg.filter_checkpoint:
            log.warning('--filter_checkpoint acts only with --filter on')
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for seq in sequences:
        t0 = time.perf_counter()
        try:
            poses_cam0, note = predict_trajectory(args, core, sample_cfg, run_cfg, inertial, seq)
        except (ValueError, FileNotFoundError) as e:
            print(f'predict_odometry: sequence {seq}: {e}', file=sys.stderr)
            return 1
        out = write_kitti_poses(args.out_dir / f'{seq}.txt', poses_cam0)
        elapsed = time.perf_counter() - t0
        print(f'[{seq}] {len(poses_cam0)} poses -> {out} ({len(poses_cam0) / elapsed:.1f} '
              f'frames/s; {note})')
    return 0


if __name__ == '__main__':
    sys.exit(main())
