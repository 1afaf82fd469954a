"""Offline trainer (train_multimodal.py): KITTI folders -> DataLoader -> TrainerCore -> files.

Initial training:
  train_multimodal.py --data_path data --train_sequences 00,01 --output_checkpoint X.pth
Fine-tuning (model config and normalisation come from the checkpoint):
  train_multimodal.py ... --finetune_checkpoint X.pth --freeze_visual --learning_rate 5e-5
Runs single-process or under `torchrun --nproc_per_node=N` (DDP; rank 0 writes logs/checkpoints).
"""
import argparse
import logging
import os
from pathlib import Path
import sys
import time

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from mm_fusion_ros.config import MODALITIES, parse_modalities, SampleConfig
from mm_fusion_ros.kitti.dataset import collate_samples, KITTIOdomPointDataset
from mm_fusion_ros.kitti.odometry import parse_sequences
from mm_fusion_ros.model.config import ModelConfig, REAL_ENCODER
from mm_fusion_ros.model.normalization import sequence_statistics
from mm_fusion_ros.training.checkpoint import (
    checkpoint_imu_window,
    epoch_checkpoint_path,
    load_checkpoint,
    resolve_imu_window,
    save_checkpoint,
)
from mm_fusion_ros.training.config import TrainConfig
from mm_fusion_ros.training.core import TrainerCore
from mm_fusion_ros.training.distributed import (
    all_reduce_sum,
    barrier,
    cleanup,
    DistInfo,
    init_distributed,
)
from mm_fusion_ros.training.logging import CsvLog, NullLog, progress, TensorBoardLog

log = logging.getLogger(__name__)

DEFAULT_INITIAL = 'pretrain_models/multimodal_initial.pth'
DEFAULT_FINETUNED = 'pretrain_models/multimodal_finetuned.pth'
# CLI flag -> ModelConfig field, for flags that shape the network (default None = unset).
MODEL_FLAGS = ('image_height', 'image_width', 'imu_steps', 'visual_encoder', 'point_encoder',
               'imu_encoder', 'bev_cells', 'bev_range_m', 'bev_max_shift_cells', 'shift_prior',
               'visual_depth', 'camera_prior', 'ground_height_m', 'flow_cell_m',
               'flow_corr_radius', 'camera_head_hidden')
SWITCHES = ('shift_prior', 'visual_depth', 'camera_prior')
ON_OFF = {'on': True, 'off': False}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog='train_multimodal',
        description='Train or fine-tune the camera + LiDAR + IMU odometry model on KITTI-layout '
                    'folders (real or synthetic).')
    data = p.add_argument_group('data')
    data.add_argument('--data_path', type=Path, required=True,
                      help='KITTI odometry root (sequences/, poses/)')
    data.add_argument('--pointcloud_path', type=Path, default=None,
                      help='Velodyne root (default DATA/pointclouds if present, else DATA)')
    data.add_argument('--imu_path', type=Path, default=None,
                      help='folder of frame-aligned NN.mat IMU files (else oxts/ or DATA/imus/)')
    data.add_argument('--kitti_raw_root', type=Path, default=None,
                      help='KITTI raw root, to find OXTS through the devkit drive mapping')
    data.add_argument('--train_sequences', required=True,
                      help='comma-separated training sequence ids (0,1,8 = 00,01,08)')
    data.add_argument('--val_sequences', default='',
                      help='comma-separated validation sequence ids (default: none)')
    data.add_argument('--modalities', default=','.join(MODALITIES),
                      help='inputs used, a subset of camera,lidar,imu; the rest are masked off')
    data.add_argument('--max_points', type=int, default=16384,
                      help='points per scan after subsampling/padding (0 = all; batch size 1)')
    data.add_argument('--imu_window_s', type=float, default=None,
                      help='IMU history per sample [s] ending at the current scan (0 = the '
                           'interval between scans); stored in the checkpoint, and by default '
                           "a fine-tuning run uses its checkpoint's (else 0)")
    data.add_argument('--max_samples_per_sequence', type=int, default=0,
                      help='keep at most N evenly spaced samples of each sequence, training and '
                           'validation (0 = all); for quick runs')
    data.add_argument('--num_workers', type=int, default=0,
                      help='DataLoader worker processes per training process')

    model = p.add_argument_group('model (from the checkpoint when fine-tuning)')
    model.add_argument('--image_height', type=int, default=None, help='image height [px] (96)')
    model.add_argument('--image_width', type=int, default=None, help='image width [px] (320)')
    model.add_argument('--imu_steps', type=int, default=None, help='IMU steps K (11)')
    model.add_argument('--visual_encoder', default=None,
                       help='real | dummy | cnn | flow (real = flow, the default)')
    model.add_argument('--point_encoder', default=None,
                       help='real | dummy | bev | pointnet (real = bev)')
    model.add_argument('--imu_encoder', default=None, help='real | dummy | conv (real = conv)')
    model.add_argument('--bev_cells', type=int, default=None, help='BEV grid cells per side (128)')
    model.add_argument('--bev_range_m', type=float, default=None,
                       help='BEV half extent [m] (25.6)')
    model.add_argument('--bev_max_shift_cells', type=int, default=None,
                       help='largest BEV shift matched [cells] (10)')
    model.add_argument('--shift_prior', choices=sorted(ON_OFF), default=None,
                       help='BEV: forward translation = correlation estimate + learned '
                            'correction (on) or learned alone (off); default on')
    model.add_argument('--visual_depth', choices=sorted(ON_OFF), default=None,
                       help='flow: LiDAR depth as extra image channels (default on)')
    model.add_argument('--camera_prior', choices=sorted(ON_OFF), default=None,
                       help="flow: yaw (and x without LiDAR) = the camera's ground-sweep "
                            'estimate + learned correction (on) or learned alone (off)')
    model.add_argument('--ground_height_m', type=float, default=None,
                       help='flow: height of base_link above the road [m] (1.73)')
    model.add_argument('--flow_cell_m', type=float, default=None,
                       help='flow: ground cell of the learned cost volume [m] (0.4)')
    model.add_argument('--flow_corr_radius', type=int, default=None,
                       help='flow: radius of the learned cost volume [cells] (2)')
    model.add_argument('--camera_head_hidden', type=int, default=None,
                       help="flow: hidden size of the camera's own pose head (64; 0 = none)")

    train = p.add_argument_group('training')
    train.add_argument('--finetune_checkpoint', type=Path, default=None,
                       help='start from this checkpoint (its model config and normalisation)')
    train.add_argument('--resume_optimizer', action='store_true',
                       help='also restore optimiser state, step and epoch; training continues '
                            'up to --num_epochs in total')
    train.add_argument('--output_checkpoint', type=Path, default=None,
                       help=f'written after every epoch (default {DEFAULT_INITIAL}, or '
                            f'{DEFAULT_FINETUNED} when fine-tuning)')
    train.add_argument('--save_every_epoch', type=int, default=0,
                       help='also write <output stem>_epochN.pth every N epochs (0 = off)')
    train.add_argument('--num_epochs', type=int, default=3, help='number of epochs')
    train.add_argument('--batch_size', type=int, default=2, help='samples per step per process')
    train.add_argument('--learning_rate', type=float, default=1e-4, help='AdamW learning rate')
    train.add_argument('--lr_schedule', default='cosine',
                       help='constant | cosine (per step, down to --lr_min_ratio at the end)')
    train.add_argument('--lr_min_ratio', type=float, default=0.05,
                       help='final cosine learning rate as a fraction of --learning_rate')
    train.add_argument('--weight_decay', type=float, default=1e-4, help='AdamW weight decay')
    train.add_argument('--grad_clip', type=float, default=5.0,
                       help='global gradient-norm clip (0 = off)')
    train.add_argument('--loss', default='l1', help='l1 | l2 | gaussian_nll | laplace_nll')
    train.add_argument('--rotation_weight', type=float, default=1.0,
                       help='weight of rotation vs translation dims (normalised units)')
    train.add_argument('--aux_weight', type=float, default=1.0,
                       help="weight of the per-branch heads' auxiliary losses (flow encoder)")
    for branch in ('visual', 'point', 'imu'):
        train.add_argument(f'--freeze_{branch}', action='store_true',
                           help=f'freeze the {branch} encoder (weights and BatchNorm statistics)')
    train.add_argument('--aug_point_jitter', type=float, default=0.0,
                       help='Gaussian jitter on point xyz [m]')
    train.add_argument('--aug_point_dropout', type=float, default=0.0,
                       help='probability of dropping each point')
    train.add_argument('--aug_yaw_deg', type=float, default=0.0,
                       help='max random yaw of both scans; target conjugated, camera masked')
    train.add_argument('--aug_brightness', type=float, default=0.0,
                       help='max brightness shift (fraction of 255)')
    train.add_argument('--aug_contrast', type=float, default=0.0, help='max contrast change')
    for name in ('camera', 'lidar', 'imu'):
        train.add_argument(f'--aug_drop_{name}', type=float, default=0.0,
                           help=f'probability of masking off the {name} of a training sample '
                                '(as a missing sensor)')
    train.add_argument('--seed', type=int, default=0, help='seed of init, data order, dropout')

    run = p.add_argument_group('run')
    run.add_argument('--device', default='auto', help='auto | cpu | cuda')
    run.add_argument('--amp', action='store_true',
                     help='mixed precision on CUDA (warned and ignored on CPU)')
    run.add_argument('--threads', type=int, default=0,
                     help='torch CPU threads per process (0 = $OMP_NUM_THREADS if set, else '
                          'cores / processes)')
    run.add_argument('--log_csv', type=Path, default=None,
                     help='per-epoch CSV log (default logs/<output stem>.csv)')
    run.add_argument('--tensorboard_dir', type=Path, default=None,
                     help='write TensorBoard event files here (default: none)')
    return p


# --- configuration ---------------------------------------------------------------------------
def model_overrides(args) -> dict:
    """Model fields given on the command line ('real' mapped to each slot's real encoder)."""
    out = {}
    for name in MODEL_FLAGS:
        value = getattr(args, name)
        if value is None:
            continue
        if name in SWITCHES:
            value = ON_OFF[value]
        elif value == 'real' and name in REAL_ENCODER:
            value = REAL_ENCODER[name]
        out[name] = value
    return out


def resolve_model_config(args, ckpt, source) -> ModelConfig:
    """A fresh config from the flags, or the checkpoint's; conflicting flags are an error."""
    overrides = model_overrides(args)
    if ckpt is None:
        return ModelConfig(**overrides)
    try:
        saved = ModelConfig.from_dict(ckpt['config']['model'])
    except (ValueError, TypeError) as e:
        raise ValueError(f'{source}: model config not understood: {e}') from e
    conflicts = [f'--{k} {v!r} (checkpoint has {getattr(saved, k)!r})'
                 for k, v in overrides.items() if getattr(saved, k) != v]
    if conflicts:
        raise ValueError(f'{source}: the model config comes from the checkpoint; conflicting '
                         'flags: ' + ', '.join(conflicts) + '. Drop them to fine-tune.')
    return saved


def train_config(args) -> TrainConfig:
    return TrainConfig(
        learning_rate=args.learning_rate, lr_schedule=args.lr_schedule,
        lr_min_ratio=args.lr_min_ratio, weight_decay=args.weight_decay,
        grad_clip=args.grad_clip, loss=args.loss, rotation_weight=args.rotation_weight,
        aux_weight=args.aux_weight,
        batch_size=args.batch_size, num_epochs=args.num_epochs, seed=args.seed, amp=args.amp,
        freeze_visual=args.freeze_visual, freeze_point=args.freeze_point,
        freeze_imu=args.freeze_imu, aug_point_jitter_m=args.aug_point_jitter,
        aug_point_dropout=args.aug_point_dropout, aug_yaw_max_deg=args.aug_yaw_deg,
        aug_brightness=args.aug_brightness, aug_contrast=args.aug_contrast,
        aug_drop_camera=args.aug_drop_camera, aug_drop_lidar=args.aug_drop_lidar,
        aug_drop_imu=args.aug_drop_imu)


def sample_config(args, model_cfg: ModelConfig, ckpt=None) -> SampleConfig:
    if args.max_points == 0 and args.batch_size > 1:
        raise ValueError('--max_points 0 keeps every point, so scans differ in size: use '
                         '--batch_size 1')
    return SampleConfig(image_height=model_cfg.image_height, image_width=model_cfg.image_width,
                        max_points=args.max_points, imu_steps=model_cfg.imu_steps,
                        imu_window_s=resolve_imu_window(args.imu_window_s,
                                                        checkpoint_imu_window(ckpt),
                                                        args.finetune_checkpoint),
                        modalities=parse_modalities(args.modalities), seed=args.seed)


# --- data ------------------------------------------------------------------------------------
def make_dataset(args, sequences, cfg: SampleConfig) -> KITTIOdomPointDataset:
    dataset = KITTIOdomPointDataset(args.data_path, parse_sequences(sequences),
                                    pointcloud_path=args.pointcloud_path, sample_cfg=cfg,
                                    on_bad_frame='skip', imu_path=args.imu_path,
                                    raw_root=args.kitti_raw_root)
    if args.max_samples_per_sequence > 0:
        limit_samples(dataset, args.max_samples_per_sequence)
    return dataset


def limit_samples(dataset: KITTIOdomPointDataset, n: int) -> None:
    """Keep at most n evenly spaced samples per sequence (spread over the whole drive, so a
    short run still sees its turns and speeds). Normalisation still uses whole sequences."""
    by_seq = {}
    for entry in dataset.index:
        by_seq.setdefault(entry[0], []).append(entry)
    kept = []
    for entries in by_seq.values():
        if len(entries) > n:
            picks = np.linspace(0, len(entries) - 1, n).round().astype(int)
            entries = [entries[i] for i in np.unique(picks)]
        kept.extend(entries)
    dataset.index = kept


def collate(samples):
    """collate_samples, but an all-skipped batch becomes {'num_skipped': n} so the count
    survives (TrainerCore treats it as an empty batch)."""
    batch = collate_samples(samples)
    return batch if batch is not None else {'num_skipped': len(samples)}


class ShardSampler(Sampler):
    """Every world_size-th index from rank, in order: a DDP evaluation shard without padding."""

    def __init__(self, n: int, rank: int, world_size: int):
        self.indices = list(range(rank, n, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


def make_loaders(args, dist_info: DistInfo, train_set, val_set):
    # Same permutation for the same (seed, epoch) whatever happened before: resumable.
    sampler = DistributedSampler(train_set, num_replicas=dist_info.world_size,
                                 rank=dist_info.rank, shuffle=True, seed=args.seed)
    common = dict(batch_size=args.batch_size, num_workers=args.num_workers, collate_fn=collate,
                  pin_memory=dist_info.device.type == 'cuda',
                  persistent_workers=args.num_workers > 0)
    train_loader = DataLoader(train_set, sampler=sampler, **common)
    val_loader = None
    if val_set is not None:
        val_loader = DataLoader(val_set, sampler=ShardSampler(len(val_set), dist_info.rank,
                                                              dist_info.world_size), **common)
    return train_loader, sampler, val_loader


# --- the loop --------------------------------------------------------------------------------
def seed_epoch(seed: int, epoch: int, rank: int) -> None:
    """Dropout, modality dropout and augmentation draw from torch's RNG: seeding it per epoch
    makes a resumed run repeat exactly what an uninterrupted one does."""
    torch.manual_seed((seed * 100_003 + epoch) * 1_009 + rank)


def train_one_epoch(core, loader, dist_info, tb, epoch):
    sums = torch.zeros(4, dtype=torch.float64)   # loss * samples, samples, skipped, steps
    start = time.perf_counter()
    cfg, n = core.train_cfg, max(len(loader), 1)
    bar = progress(loader, total=len(loader), desc=f'epoch {epoch + 1}',
                   enabled=dist_info.is_main)
    for i, batch in enumerate(bar):
        # The schedule depends only on (epoch, batch index): resumed runs follow it exactly.
        core.set_lr(cfg.lr_at((epoch + i / n) / max(cfg.num_epochs, 1)))
        stats = core.step(batch)
        sums += torch.tensor([stats.loss * stats.samples if stats.samples else 0.0,
                              stats.samples, stats.skipped, float(stats.applied)],
                             dtype=torch.float64)
        if stats.applied:
            bar.set_postfix(loss=f'{stats.loss:.4f}')
            if core.step_count % 10 == 0:
                tb.scalars('step', {'loss': stats.loss, 'grad_norm': stats.grad_norm},
                           core.step_count)
    elapsed = time.perf_counter() - start
    sums = all_reduce_sum(sums, dist_info)
    samples = int(sums[1])
    return {'loss': float(sums[0]) / samples if samples else float('nan'),
            'train_samples': samples, 'skipped': int(sums[2]), 'steps': int(sums[3]),
            'time_s': elapsed, 'samples_per_s': samples / elapsed if elapsed > 0 else 0.0}


def epoch_row(epoch, train_stats, val, lr, total_time) -> dict:
    val = val or {}
    return {'epoch': epoch, 'loss': train_stats['loss'], 'val_loss': val.get('loss'),
            'val_trans_err': val.get('trans_err'), 'val_rot_err': val.get('rot_err_deg'),
            'lr': lr, 'samples_per_s': train_stats['samples_per_s'], 'time_s': total_time,
            'skipped': train_stats['skipped'] + val.get('skipped', 0),
            'train_samples': train_stats['train_samples'], 'steps': train_stats['steps'],
            'val_mean_motion_trans_err': val.get('mean_motion_trans_err'),
            'val_mean_motion_rot_err': val.get('mean_motion_rot_err_deg')}


def save_epoch(core, args, sample_cfg, row) -> None:
    metrics = {k: v for k, v in row.items() if v is not None}
    payload = core.state_dict(metrics=metrics, sample_cfg=sample_cfg)
    save_checkpoint(args.output_checkpoint, payload)
    n = args.save_every_epoch
    if n > 0 and core.epoch % n == 0:
        save_checkpoint(epoch_checkpoint_path(args.output_checkpoint, core.epoch), payload)


def thread_count(requested: int, world_size: int) -> int:
    """Threads per process: never more than the cores, since an oversubscribed OpenMP pool
    spins and can run 10-100x slower (measured, docs/stage2_tracking.md)."""
    if requested > 0:
        return requested
    env = os.environ.get('OMP_NUM_THREADS', '')
    if env.isdigit() and int(env) > 0:
        return int(env)
    return max(1, (os.cpu_count() or 1) // world_size)


def build_core(args, dist_info: DistInfo):
    """Configs, datasets and the TrainerCore (weights/optimiser from a checkpoint if given)."""
    ckpt = load_checkpoint(args.finetune_checkpoint) if args.finetune_checkpoint else None
    model_cfg = resolve_model_config(args, ckpt, args.finetune_checkpoint)
    train_cfg = train_config(args)
    sample_cfg = sample_config(args, model_cfg, ckpt)
    train_set = make_dataset(args, args.train_sequences, sample_cfg)
    if len(train_set) == 0:
        raise ValueError(f'no training samples in sequences {args.train_sequences} under '
                         f'{args.data_path}')
    val_set = make_dataset(args, args.val_sequences, sample_cfg) if args.val_sequences else None
    # Normalisation statistics travel in the checkpoint's buffers when fine-tuning.
    normalization = None if ckpt else sequence_statistics(train_set.sequences)
    core = TrainerCore(model_cfg, train_cfg, dist_info.device, normalization,
                       distributed=dist_info.enabled)
    if ckpt is not None:
        core.load_state_dict(ckpt, source=args.finetune_checkpoint,
                             load_optimizer=args.resume_optimizer)
    log.info('training %d samples (%s), validating %d; %d processes on %s, %d threads each; '
             'frozen: %s; starting at epoch %d', len(train_set),
             ','.join(s.sequence for s in train_set.sequences), len(val_set) if val_set else 0,
             dist_info.world_size, dist_info.device, torch.get_num_threads(),
             list(train_cfg.frozen) or 'none', core.epoch)
    return core, sample_cfg, train_set, val_set


def run_epoch(core, epoch, loaders, dist_info, tb) -> dict:
    """Train one epoch, validate, advance core.epoch; returns the epoch's CSV row."""
    train_loader, sampler, val_loader = loaders
    start = time.perf_counter()
    seed_epoch(core.train_cfg.seed, epoch, dist_info.rank)
    sampler.set_epoch(epoch)
    stats = train_one_epoch(core, train_loader, dist_info, tb, epoch)
    val = None
    if val_loader is not None:
        val = core.evaluate(val_loader, reduce=lambda t: all_reduce_sum(t, dist_info))
    core.epoch = epoch + 1
    row = epoch_row(core.epoch, stats, val, core.lr, time.perf_counter() - start)
    log.info('epoch %d: %s', core.epoch,
             ', '.join(f'{k} {v:.4g}' for k, v in row.items() if isinstance(v, float)))
    return row


def run(args, dist_info: DistInfo) -> int:
    torch.set_num_threads(thread_count(args.threads, dist_info.world_size))
    core, sample_cfg, train_set, val_set = build_core(args, dist_info)
    loaders = make_loaders(args, dist_info, train_set, val_set)
    csv_log, tb = open_logs(args, dist_info)
    first_epoch = core.epoch
    try:
        for epoch in range(first_epoch, core.train_cfg.num_epochs):
            row = run_epoch(core, epoch, loaders, dist_info, tb)
            if dist_info.is_main:
                csv_log.write(row)
                tb.scalars('epoch', row, core.epoch)
                save_epoch(core, args, sample_cfg, row)
            barrier(dist_info)
    finally:
        tb.close()
    if core.epoch == first_epoch and dist_info.is_main:
        log.warning('checkpoint is at epoch %d already (--num_epochs %d): nothing to train',
                    core.epoch, core.train_cfg.num_epochs)
        save_epoch(core, args, sample_cfg, {'epoch': core.epoch})
    if dist_info.is_main:
        print(f'wrote {args.output_checkpoint} (epoch {core.epoch}, step {core.step_count}); '
              f'skipped: {core.counters}')
    return 0


def open_logs(args, dist_info: DistInfo):
    if not dist_info.is_main:
        return NullLog(), NullLog()
    csv_log = CsvLog(args.log_csv, append=args.resume_optimizer)
    tb = TensorBoardLog(args.tensorboard_dir) if args.tensorboard_dir else NullLog()
    return csv_log, tb


def fill_defaults(args) -> None:
    if args.output_checkpoint is None:
        args.output_checkpoint = Path(DEFAULT_FINETUNED if args.finetune_checkpoint
                                      else DEFAULT_INITIAL)
    if args.log_csv is None:
        args.log_csv = Path('logs') / f'{args.output_checkpoint.stem}.csv'
    for name in ('num_epochs', 'batch_size', 'save_every_epoch', 'num_workers', 'threads',
                 'max_points', 'max_samples_per_sequence', 'imu_window_s'):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            raise ValueError(f'--{name} must be >= 0, got {getattr(args, name)}')
    if args.batch_size == 0:
        raise ValueError('--batch_size must be >= 1')


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    dist_info = None
    try:
        fill_defaults(args)
        dist_info = init_distributed(args.device)
        logging.basicConfig(level=logging.INFO if dist_info.is_main else logging.WARNING,
                            format=f'[rank {dist_info.rank}] %(levelname)s %(name)s: '
                                   '%(message)s')
        return run(args, dist_info)
    except (ValueError, FileNotFoundError) as e:
        print(f'train_multimodal: error: {e}', file=sys.stderr)
        return 2
    finally:
        if dist_info is not None:
            cleanup(dist_info)


if __name__ == '__main__':
    raise SystemExit(main())
