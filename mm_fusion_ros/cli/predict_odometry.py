"""predict_odometry: run a checkpoint over KITTI sequences and write KITTI-format trajectories.

Each sample (k-1 -> k) gives a relative pose of base_link; the chain of them from the identity is
converted to cam0 with the sequence's Tr (DESIGN §3), so `OUT/NN.txt` lines up with
`DATA/poses/NN.txt` and any KITTI tool (evaluate_odometry, the devkit, evo) reads it. The sample
settings (modalities, IMU window, point count) come from the checkpoint unless overridden.
A frame whose sample cannot be built (a bad file, skipped) repeats the previous predicted step,
and the count is reported, so the trajectory keeps one pose per frame. Ground truth is never
read: sequences without poses/ (KITTI 11-21) predict the same way, and OUT/NN.txt (cam0, one
3x4 pose per frame starting at the identity) is what the KITTI benchmark's submission wants.
"""
import argparse
import logging
from pathlib import Path
import sys
import time

import numpy as np
from tqdm import tqdm

from mm_fusion_ros.config import ConfigFlags, SampleConfig
from mm_fusion_ros.eval.trajectory_io import base_link_poses_to_cam0, write_kitti_poses
from mm_fusion_ros.geometry import chain_relative, vec6_to_pose
from mm_fusion_ros.kitti.dataset import collate_samples, KITTIOdomPointDataset
from mm_fusion_ros.kitti.ids import parse_sequences
from mm_fusion_ros.model.config import ModelConfig
from mm_fusion_ros.training.checkpoint import load_checkpoint
from mm_fusion_ros.training.config import TrainConfig
from mm_fusion_ros.training.core import TrainerCore
from mm_fusion_ros.training.distributed import resolve_device

log = logging.getLogger('predict_odometry')
# Sample settings the checkpoint's may be overridden with; image size and K belong to the model.
SAMPLE_FLAGS = ConfigFlags(SampleConfig, exclude=('image_height', 'image_width', 'imu_steps'),
                           unset=True, unset_help="default: the checkpoint's")


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


def predict_sequence(core, dataset, batch_size, desc=''):
    """Relative steps (N-1, 6) for every frame step of a one-sequence dataset, and skips."""
    n_frames = len(dataset.sequences[0])
    steps = np.full((n_frames - 1, 6), np.nan)
    skipped = 0
    indices = range(len(dataset))
    batches = [indices[i:i + batch_size] for i in range(0, len(dataset), batch_size)]
    for chunk in tqdm(batches, desc=desc, unit='batch', disable=not sys.stderr.isatty()):
        samples = [dataset[i] for i in chunk]
        skipped += sum(s is None for s in samples)
        batch = collate_samples(samples)
        if batch is None:
            continue
        mean, _ = core.predict(batch)
        for meta, step in zip(batch['meta'], mean.cpu().numpy()):
            steps[meta['frame'] - 1] = step
    # A missing step repeats the previous one (constant velocity) so every frame has a pose.
    missing = np.isnan(steps[:, 0])
    for k in np.nonzero(missing)[0]:
        steps[k] = steps[k - 1] if k > 0 and not np.isnan(steps[k - 1, 0]) else 0.0
    return steps, int(missing.sum()), skipped


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s')
    try:
        device = resolve_device(args.device)
        sequences = parse_sequences(args.sequences)
        core, sample_cfg = load_predictor(args.checkpoint, device)
        sample_cfg = sample_cfg.replace(**SAMPLE_FLAGS.values(args))
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for seq in sequences:
        t0 = time.perf_counter()
        try:
            dataset = KITTIOdomPointDataset(args.data_path, seq,
                                            pointcloud_path=args.pointcloud_path,
                                            sample_cfg=sample_cfg, on_bad_frame='skip',
                                            imu_path=args.imu_path, ground_truth='ignore')
        except (ValueError, FileNotFoundError) as e:
            print(f'predict_odometry: sequence {seq}: {e}', file=sys.stderr)
            return 1
        steps, filled, skipped = predict_sequence(core, dataset, args.batch_size, desc=seq)
        poses_base = chain_relative(vec6_to_pose(steps))
        poses_cam0 = base_link_poses_to_cam0(poses_base, dataset.sequences[0].Tr)
        out = write_kitti_poses(args.out_dir / f'{seq}.txt', poses_cam0)
        elapsed = time.perf_counter() - t0
        print(f'[{seq}] {len(poses_cam0)} poses -> {out} ({len(steps) / elapsed:.1f} samples/s; '
              f'{filled} steps filled by repeating the previous one, {skipped} samples skipped)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
