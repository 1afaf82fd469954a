"""Offline trainer (train_multimodal.py): KITTI folders -> DataLoader -> TrainerCore -> files.

Initial training:
  train_multimodal.py --data_path data --train_sequences 00,01 --output_checkpoint X.pth
Fine-tuning (model config and normalisation come from the checkpoint):
  train_multimodal.py ... --finetune_checkpoint X.pth --freeze_visual --learning_rate 5e-5
Without ground truth (e.g. KITTI 11-21; poses/ is never read for training):
  train_multimodal.py --data_path data --train_sequences 11,12 --supervision self
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

from mm_fusion_ros.config import ConfigFlags, SampleConfig
from mm_fusion_ros.kitti.dataset import collate_samples, KITTIOdomPointDataset
from mm_fusion_ros.kitti.ids import parse_sequences
from mm_fusion_ros.model.config import ModelConfig, REAL_ENCODER
from mm_fusion_ros.model.normalization import sequence_statistics, target_statistics
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
from mm_fusion_ros.training.logging import (
    CsvLog,
    LOSS_PARTS,
    NullLog,
    progress,
    TensorBoardLog,
)

log = logging.getLogger(__name__)

DEFAULT_INITIAL = 'pretrain_models/multimodal_initial.pth'
DEFAULT_FINETUNED = 'pretrain_models/multimodal_finetuned.pth'
FROM_CHECKPOINT = "default {default} for a new model; fine-tuning takes the checkpoint's"


def _encoder(slot):
    """An encoder flag's parser: 'real' is the slot's real encoder (cnn, bev, conv)."""
    def parse(text):
        return REAL_ENCODER[slot] if text == 'real' else text
    parse.__name__ = f'{slot} name'
    return parse


# Every TrainConfig / ModelConfig / SampleConfig field is a flag of the same name, with the
# field's default and help. Model flags are unset unless given: a fine-tuning run takes the
# checkpoint's model, and a given flag must agree with it. The sample's image size and K come
# from the model, its subsampling seed from --seed.
TRAIN_FLAGS = ConfigFlags(TrainConfig, aliases={
    # The names the training plan and earlier releases used for these fields.
    'aug_point_jitter_m': 'aug_point_jitter', 'aug_yaw_max_deg': 'aug_yaw_deg'})
MODEL_FLAGS = ConfigFlags(ModelConfig, unset=True,
                          types={slot: _encoder(slot) for slot in REAL_ENCODER})
SAMPLE_FLAGS = ConfigFlags(SampleConfig, exclude=('image_height', 'image_width', 'imu_steps',
                                                  'seed'),
                           unset=('imu_window_s',), unset_help=FROM_CHECKPOINT)


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
    data.add_argument('--max_samples_per_sequence', type=int, default=0,
                      help='keep at most N evenly spaced samples of each sequence, training and '
                           'validation (0 = all); for quick runs')
    data.add_argument('--num_workers', type=int, default=0,
                      help='DataLoader worker processes per training process')
    SAMPLE_FLAGS.add(data)

    MODEL_FLAGS.add(p.add_argument_group(
        'model', "the network's shape; fine-tuning takes the checkpoint's, and a flag that "
                 "disagrees with it is an error. An encoder flag's 'real' means cnn, bev, conv"))

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
    TRAIN_FLAGS.add(train)

    run = p.add_argument_group('run')
    run.add_argument('--device', default='auto', help='auto | cpu | cuda')
    run.add_argument('--threads', type=int, default=0,
                     help='torch CPU threads per process (0 = $OMP_NUM_THREADS if set, else '
                          'cores / processes)')
    run.add_argument('--log_csv', type=Path, default=None,
                     help='per-epoch CSV log (default logs/<output stem>.csv)')
    run.add_argument('--tensorboard_dir', type=Path, default=None,
                     help='write TensorBoard event files here (default: none)')
    return p


# --- configuration ---------------------------------------------------------------------------
def resolve_model_config(args, ckpt, source) -> ModelConfig:
    """A fresh config from the flags, or the checkpoint's; conflicting flags are an error."""
    overrides = MODEL_FLAGS.values(args)
    if ckpt is None:
        return ModelConfig(**overrides)
    try:
        saved = ModelConfig.from_dict(ckpt['config']['model'])
    except (ValueError, TypeError) as e:
        raise ValueError(f'{source}: model config not understood: {e}') from e
    conflicts = [f'{MODEL_FLAGS.flag(k)} {v!r} (checkpoint has {getattr(saved, k)!r})'
                 for k, v in overrides.items() if getattr(saved, k) != v]
    if conflicts:
        raise ValueError(f'{source}: the model config comes from the checkpoint; conflicting '
                         'flags: ' + ', '.join(conflicts) + '. Drop them to fine-tune.')
    return saved


def sample_config(args, model_cfg: ModelConfig, train_cfg: TrainConfig, ckpt=None) -> SampleConfig:
    values = SAMPLE_FLAGS.values(args)
    if values['max_points'] == 0 and train_cfg.batch_size > 1:
        raise ValueError('--max_points 0 keeps every point, so scans differ in size: use '
                         '--batch_size 1')
    window = resolve_imu_window(values.pop('imu_window_s', None), checkpoint_imu_window(ckpt),
                                args.finetune_checkpoint)
    return SampleConfig(**values, image_height=model_cfg.image_height,
                        image_width=model_cfg.image_width, imu_steps=model_cfg.imu_steps,
                        imu_window_s=window, seed=train_cfg.seed)


# --- data ------------------------------------------------------------------------------------
def make_dataset(args, sequences, cfg: SampleConfig,
                 ground_truth='require') -> KITTIOdomPointDataset:
    dataset = KITTIOdomPointDataset(args.data_path, parse_sequences(sequences),
                                    pointcloud_path=args.pointcloud_path, sample_cfg=cfg,
                                    on_bad_frame='skip', imu_path=args.imu_path,
                                    raw_root=args.kitti_raw_root, ground_truth=ground_truth)
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
    # loss * samples, samples, skipped, steps, then (mean * count, count) per loss part
    sums = torch.zeros(4 + 2 * len(LOSS_PARTS), dtype=torch.float64)
    start = time.perf_counter()
    cfg, n = core.train_cfg, max(len(loader), 1)
    bar = progress(loader, total=len(loader), desc=f'epoch {epoch + 1}',
                   enabled=dist_info.is_main)
    for i, batch in enumerate(bar):
        # The schedule depends only on (epoch, batch index): resumed runs follow it exactly.
        core.set_lr(cfg.lr_at((epoch + i / n) / max(cfg.num_epochs, 1)))
        stats = core.step(batch)
        parts = []
        for part in LOSS_PARTS:
            n_part = stats.term_samples.get(part, 0) if stats.applied else 0
            parts += [stats.terms[part] * n_part if n_part else 0.0, n_part]
        sums += torch.tensor([stats.loss * stats.samples if stats.samples else 0.0,
                              stats.samples, stats.skipped, float(stats.applied)] + parts,
                             dtype=torch.float64)
        if stats.applied:
            bar.set_postfix(loss=f'{stats.loss:.4f}')
            if core.step_count % 10 == 0:
                tb.scalars('step', {'loss': stats.loss, 'grad_norm': stats.grad_norm,
                                    **{f'loss_{k}': v for k, v in stats.terms.items()}},
                           core.step_count)
    elapsed = time.perf_counter() - start
    sums = all_reduce_sum(sums, dist_info)
    samples = int(sums[1])
    out = {'loss': float(sums[0]) / samples if samples else float('nan'),
           'train_samples': samples, 'skipped': int(sums[2]), 'steps': int(sums[3]),
           'time_s': elapsed, 'samples_per_s': samples / elapsed if elapsed > 0 else 0.0}
    for i, part in enumerate(LOSS_PARTS):
        total, count = float(sums[4 + 2 * i]), float(sums[5 + 2 * i])
        out[f'loss_{part}'] = total / count if count else None
    return out


def epoch_row(epoch, train_stats, val, lr, total_time) -> dict:
    val = val or {}
    return {'epoch': epoch, 'loss': train_stats['loss'], 'val_loss': val.get('loss'),
            'val_trans_err': val.get('trans_err'), 'val_rot_err': val.get('rot_err_deg'),
            'lr': lr, 'samples_per_s': train_stats['samples_per_s'], 'time_s': total_time,
            'skipped': train_stats['skipped'] + val.get('skipped', 0),
            'train_samples': train_stats['train_samples'], 'steps': train_stats['steps'],
            'val_mean_motion_trans_err': val.get('mean_motion_trans_err'),
            'val_mean_motion_rot_err': val.get('mean_motion_rot_err_deg'),
            **{f'loss_{p}': train_stats.get(f'loss_{p}') for p in LOSS_PARTS},
            **{f'val_loss_{p}': val.get(f'loss_{p}') for p in LOSS_PARTS}}


def save_epoch(core, args, sample_cfg, row) -> None:
    metrics = {k: v for k, v in row.items() if v is not None}
    payload = core.state_dict(metrics=metrics, sample_cfg=sample_cfg)
    save_checkpoint(args.output_checkpoint, payload)
    n = args.save_every_epoch
    if n > 0 and core.epoch % n == 0:
        save_checkpoint(epoch_checkpoint_path(args.output_checkpoint, core.epoch), payload)


def thread_count(requested: int, world_size: int) -> int:
    """Threads per process: never more than the cores, since an oversubscribed OpenMP pool
    spins and runs many times slower (docs/stage2_tracking.md, Threads)."""
    if requested > 0:
        return requested
    env = os.environ.get('OMP_NUM_THREADS', '')
    if env.isdigit() and int(env) > 0:
        return int(env)
    return max(1, (os.cpu_count() or 1) // world_size)


def build_core(args, dist_info: DistInfo):
    """Configs, datasets and the TrainerCore (weights/optimiser from a checkpoint if given)."""
    if args.resume_optimizer and not args.finetune_checkpoint:
        raise ValueError('--resume_optimizer resumes the checkpoint given by '
                         '--finetune_checkpoint; none was given (a fresh run would overwrite '
                         '--output_checkpoint and append to --log_csv)')
    ckpt = load_checkpoint(args.finetune_checkpoint) if args.finetune_checkpoint else None
    model_cfg = resolve_model_config(args, ckpt, args.finetune_checkpoint)
    train_cfg = TRAIN_FLAGS.build(args)
    if ckpt is not None and args.resume_optimizer:
        _warn_changed_training(ckpt, train_cfg, args.finetune_checkpoint)
    overlap = sorted(set(parse_sequences(args.train_sequences))
                     & set(parse_sequences(args.val_sequences))) if args.val_sequences else []
    if overlap:
        log.warning('sequences %s are both trained on and validated on: the validation figures '
                    'are not held out', ','.join(overlap))
    sample_cfg = sample_config(args, model_cfg, train_cfg, ckpt)
    # Self-supervised training does not train on poses/ (the validation's baseline and scores
    # use them where they are usable).
    with_gt = train_cfg.supervision != 'self'
    train_set = make_dataset(args, args.train_sequences, sample_cfg,
                             ground_truth='require' if with_gt else 'ignore')
    if len(train_set) == 0:
        raise ValueError(f'no training samples in sequences {args.train_sequences} under '
                         f'{args.data_path}')
    val_set = make_dataset(args, args.val_sequences, sample_cfg,
                           ground_truth='require' if with_gt else 'auto') \
        if args.val_sequences else None
    # Normalisation statistics travel in the checkpoint's buffers when fine-tuning.
    normalization = None if ckpt else sequence_statistics(train_set.sequences,
                                                          use_poses=with_gt)
    core = TrainerCore(model_cfg, train_cfg, dist_info.device, normalization,
                       distributed=dist_info.enabled)
    if ckpt is not None:
        core.load_state_dict(ckpt, source=args.finetune_checkpoint,
                             load_optimizer=args.resume_optimizer)
    # The validation's mean-motion baseline is this training set's mean step (its ground
    # truth, also under supervision self), not the model's target_mean (zero under self, the
    # original training set's when fine-tuning); NaN where no training sequence has poses.
    posed = []
    for seq in train_set.sequences:
        try:
            if seq.has_poses:
                posed.append(seq.poses_base)
        except ValueError as e:    # under supervision self a pose file need not be usable
            log.warning('sequence %s: no mean-motion baseline from its poses (%s)',
                        seq.sequence, e)
    core.baseline_step = target_statistics(posed)[0] if posed else np.full(6, np.nan)
    log.info('training %d samples (%s), validating %d; %d processes on %s, %d threads each; '
             'frozen: %s; supervision %s (%s); starting at epoch %d', len(train_set),
             ','.join(s.sequence for s in train_set.sequences), len(val_set) if val_set else 0,
             dist_info.world_size, dist_info.device, torch.get_num_threads(),
             list(train_cfg.frozen) or 'none', train_cfg.supervision,
             ', '.join(train_cfg.loss_terms), core.epoch)
    return core, sample_cfg, train_set, val_set


def _warn_changed_training(ckpt, train_cfg: TrainConfig, source) -> None:
    """A resumed run trains with the flags given now; say which differ from the run it
    resumes (the checkpoint then records the new ones)."""
    saved = (ckpt.get('config') or {}).get('train') or {}
    now = train_cfg.to_dict()
    changed = [f'{k} {saved[k]!r} -> {now[k]!r}' for k in sorted(saved)
               if k in now and saved[k] != now[k] and not (
                   isinstance(saved[k], (list, tuple)) and list(saved[k]) == list(now[k]))]
    if changed:
        log.warning('%s: resuming with training settings other than the run it resumes: %s',
                    source, '; '.join(changed))


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
        # The checkpoint's own figures (its last epoch's loss and validation) are kept.
        save_epoch(core, args, sample_cfg, {**core.resumed_metrics, 'epoch': core.epoch})
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
    for name in ('save_every_epoch', 'num_workers', 'threads', 'max_samples_per_sequence'):
        if getattr(args, name) < 0:
            raise ValueError(f'--{name} must be >= 0, got {getattr(args, name)}')


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
