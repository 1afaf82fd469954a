"""TrainerCore: model + optimiser + one training step, shared by the offline and online trainers.

It knows nothing about DataLoaders or epochs: `step` takes any collated batch dict (DESIGN §5
keys, or None when every sample of a batch was skipped), so the offline script feeds it from a
DataLoader and the online node from its replay buffer.

The loss follows TrainConfig.supervision (DESIGN §9): 'gt' trains on the samples whose target is
known, 'self' on the self-supervised terms of model/selfsup.py (which never read the target),
'both' on the sum. Each part is the mean over the samples where it is valid, weighted; a sample
counts as trained on when any part is valid for it. StepStats.terms reports each part.
"""
from dataclasses import dataclass, field
import logging
import math

import numpy as np
import torch

from mm_fusion_ros.kitti.sample import TENSOR_KEYS, unknown_calibration
from mm_fusion_ros.model.augment import augment_batch
from mm_fusion_ros.model.config import ModelConfig
from mm_fusion_ros.model.losses import (
    auxiliary_parts,
    masked_mean,
    per_sample_loss,
    rotation_angle_error,
    translation_error,
)
from mm_fusion_ros.model.net import build_model
from mm_fusion_ros.model.selfsup import SelfSupervisedLoss, term_available, TERMS
from mm_fusion_ros.training.checkpoint import FORMAT_VERSION

log = logging.getLogger(__name__)

FINITE_KEYS = ('points', 'imu', 'dt', 'target')


def is_empty(batch) -> bool:
    """None, or the {'num_skipped': n} marker of a batch whose samples were all skipped."""
    return batch is None or 'target' not in batch


def batch_skipped(batch) -> int:
    return 0 if batch is None else int(batch.get('num_skipped', 0))


@dataclass
class StepStats:
    loss: float          # mean loss over the samples that contributed (nan if none)
    samples: int         # samples that contributed to the loss
    skipped: int         # samples dropped in this step (integrity failures + non-finite)
    applied: bool        # whether the optimiser stepped
    grad_norm: float
    lr: float
    terms: dict = field(default_factory=dict)         # part (gt, TERMS) -> unweighted mean
    term_samples: dict = field(default_factory=dict)  # part -> samples it was valid for


class TrainerCore:
    """Build the model and AdamW; train, predict, evaluate, freeze, checkpoint."""

    def __init__(self, model_cfg: ModelConfig, train_cfg, device='cpu', normalization=None,
                 distributed: bool = False):
        self.model_cfg = model_cfg
        self.train_cfg = train_cfg
        self.device = torch.device(device)
        # Seeded init that leaves the caller's global RNG stream untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(train_cfg.seed)
            self.model = build_model(model_cfg)
        self.model.to(self.device)
        if normalization is not None:
            self.model.set_normalization(normalization)
        self.model.set_frozen(train_cfg.frozen)
        self.model.use_feature_cache(train_cfg.feature_cache)
        self.param_names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=train_cfg.learning_rate,
                                           weight_decay=train_cfg.weight_decay)
        self.amp = bool(train_cfg.amp and self.device.type == 'cuda')
        # evaluate()'s mean-motion baseline: the training set's mean step (6,), set by the
        # caller where its ground truth is known (NaN: unknown); None: the model's target_mean,
        # which is that mean only for a model fitted with supervision gt on this training set.
        self.baseline_step = None
        self.resumed_metrics = {}   # the figures of the run a resume (load_optimizer) goes on
        if train_cfg.amp and not self.amp:
            log.warning('amp requested on %s: mixed precision is CUDA-only, ignored', self.device)
        self.scaler = torch.amp.GradScaler('cuda', enabled=self.amp)
        self.distributed = distributed
        self.net = self.model
        if distributed:
            from torch.nn.parallel import DistributedDataParallel
            ids = [self.device.index] if self.device.type == 'cuda' else None
            # Unused parameters happen whenever a batch lacks a modality's gradient path.
            self.net = DistributedDataParallel(self.model, device_ids=ids,
                                               find_unused_parameters=True)
        self.step_count = 0
        self.epoch = 0
        self.counters = {'skipped_integrity': 0, 'skipped_nonfinite': 0, 'steps_skipped': 0}
        self.selfsup = SelfSupervisedLoss(solve_iterations=train_cfg.self_geometric_solve,
                                          solve_points=train_cfg.self_geometric_solve_points)

    # --- batches -------------------------------------------------------------------------
    def to_device(self, batch: dict) -> dict:
        out = {k: batch[k].to(self.device, non_blocking=True) for k in TENSOR_KEYS}
        out['meta'] = batch.get('meta', [])
        return out

    def drop_nonfinite(self, batch: dict):
        """Remove samples with NaN/Inf inputs or targets; returns (batch or None, dropped)."""
        ok = torch.ones(batch['target'].shape[0], dtype=torch.bool, device=self.device)
        for k in FINITE_KEYS:
            ok &= torch.isfinite(batch[k].float()).flatten(1).all(dim=1) \
                if batch[k].dim() > 1 else torch.isfinite(batch[k].float())
        dropped = int((~ok).sum())
        if dropped == 0:
            return batch, 0
        for meta in (m for m, good in zip(batch['meta'], ok.tolist()) if not good):
            log.warning('skipping sample with non-finite input or target: %s', meta)
        if dropped == len(ok):
            return None, dropped
        keep = {k: batch[k][ok] for k in TENSOR_KEYS}
        keep['meta'] = [m for m, good in zip(batch['meta'], ok.tolist()) if good]
        return keep, dropped

    def placeholder_batch(self) -> dict:
        """One all-masked sample with no valid target: lets a DDP rank with nothing to train
        on still join the gradient all-reduce with a zero loss."""
        c, d = self.model_cfg, self.device
        return {'image': torch.zeros(1, 2, 3, c.image_height, c.image_width, dtype=torch.uint8,
                                     device=d),
                'points': torch.zeros(1, 2, 1, 4, device=d),
                'points_mask': torch.zeros(1, 2, 1, dtype=torch.bool, device=d),
                'imu': torch.zeros(1, c.imu_steps, 6, device=d),
                'dt': torch.full((1,), 0.1, device=d),
                'target': torch.zeros(1, 6, device=d),
                'target_valid': torch.zeros(1, dtype=torch.bool, device=d),
                'modality_mask': torch.zeros(1, 3, dtype=torch.bool, device=d),
                **{k: torch.from_numpy(np.asarray(v)[None]).to(d)
                   for k, v in unknown_calibration().items()},
                'meta': []}

    # --- losses --------------------------------------------------------------------------
    def trainable(self, batch: dict, terms) -> torch.Tensor:
        """(B,) samples that some part of the loss could use (before computing it)."""
        ok = torch.zeros_like(batch['target_valid'], dtype=torch.bool)
        for term in terms:
            ok |= batch['target_valid'].bool() if term == 'gt' else term_available(batch, term)
        return ok

    def loss_parts(self, out: dict, batch: dict, terms) -> dict:
        """{part: (values (B,), valid (B,))} for the parts named in `terms`."""
        parts = {}
        if 'gt' in terms:
            per = per_sample_loss(out['mean'].float(), out['logvar'].float(),
                                  self.model.normalize_target(batch['target']),
                                  self.train_cfg.loss, self.train_cfg.rotation_weight,
                                  self.train_cfg.calibrate_logvar)
            parts['gt'] = (per, batch['target_valid'].bool())
            if self.train_cfg.aux_weight > 0:
                parts.update(auxiliary_parts(
                    out, self.model.normalize_target(batch['target']),
                    batch['target_valid'].bool(), self.train_cfg.loss,
                    self.train_cfg.rotation_weight, self.train_cfg.calibrate_logvar))
        own = [t for t in terms if t in TERMS]
        if own:
            pose = self.model.denormalize(out['mean'].float(), out['logvar'].float())[0]
            parts.update(self.selfsup(pose, batch, terms=own))
        return parts

    def combine(self, parts: dict):
        """Weighted sum of each part's mean over its valid, finite samples.

        Returns (loss, contributing (B,), non-finite (B,), {part: mean}, {part: count}).
        """
        weights = {'gt': 1.0, **self.train_cfg.self_weights}
        weights.update({name: self.train_cfg.aux_weight for name in parts
                        if name.startswith('aux_')})
        loss = None
        contributing = nonfinite = None
        means, counts = {}, {}
        for name, (values, valid) in parts.items():
            bad = valid & ~torch.isfinite(values)
            valid = valid & ~bad
            mean = masked_mean(torch.where(valid, values, torch.zeros_like(values)), valid)
            loss = weights[name] * mean if loss is None else loss + weights[name] * mean
            contributing = valid if contributing is None else contributing | valid
            nonfinite = bad if nonfinite is None else nonfinite | bad
            counts[name] = int(valid.sum())
            means[name] = float(mean.detach()) if counts[name] else math.nan
        return loss, contributing & ~nonfinite, nonfinite, means, counts

    # --- training ------------------------------------------------------------------------
    def step(self, batch) -> StepStats:
        """Forward, loss, skip non-finite, backward, clip, optimiser step."""
        if not self.model.training:     # train() walks every module: not on every step
            self.model.train()
        terms = self.train_cfg.loss_terms
        skipped = batch_skipped(batch)
        self.counters['skipped_integrity'] += skipped
        dropped = 0
        batch = None if is_empty(batch) else batch
        if batch is not None:
            batch, dropped = self.drop_nonfinite(self.to_device(batch))
        usable = batch is not None and bool(self.trainable(batch, terms).any())
        if not usable and not self.distributed:
            self.counters['skipped_nonfinite'] += dropped
            return StepStats(math.nan, 0, skipped + dropped, False, math.nan, self.lr)
        if batch is None:
            batch = self.placeholder_batch()

        batch = augment_batch(batch, self.train_cfg.augment)
        # A skipped step must not leave its batch's BatchNorm statistics behind.
        saved_buffers = [b.clone() for b in self.model.buffers()]
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
            out = self.net(batch)
        loss, valid, bad, means, counts = self.combine(self.loss_parts(out, batch, terms))
        dropped += int(bad.sum())
        n = int(valid.sum())
        self.counters['skipped_nonfinite'] += dropped
        if n == 0 and not self.distributed:
            self.restore_buffers(saved_buffers)
            return StepStats(math.nan, 0, skipped + dropped, False, math.nan, self.lr)

        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        grad_norm = self.clip_and_step()
        applied = math.isfinite(grad_norm)
        if not applied:
            self.restore_buffers(saved_buffers)
            self.counters['steps_skipped'] += 1
            self.counters['skipped_nonfinite'] += n
            log.warning('non-finite gradient at step %d: update skipped (%d samples)',
                        self.step_count, n)
        return StepStats(float(loss.detach()) if n else math.nan, n if applied else 0,
                         skipped + dropped + (0 if applied else n), applied, grad_norm, self.lr,
                         means, counts)

    @torch.no_grad()
    def restore_buffers(self, saved) -> None:
        for buf, old in zip(self.model.buffers(), saved):
            buf.copy_(old)

    def clip_and_step(self) -> float:
        """Unscale, clip, step unless the gradient is non-finite; returns the gradient norm.

        After a DDP backward every rank holds the same averaged gradient, so all ranks take the
        same decision here and stay in lockstep.
        """
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.scaler.unscale_(self.optimizer)
        clip = self.train_cfg.grad_clip if self.train_cfg.grad_clip > 0 else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
        if math.isfinite(grad_norm):
            self.scaler.step(self.optimizer)
            self.step_count += 1
        else:
            self.optimizer.zero_grad(set_to_none=True)
        self.scaler.update()
        return grad_norm

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]['lr'])

    def set_lr(self, lr: float) -> None:
        if not lr > 0:
            raise ValueError(f'learning rate must be > 0, got {lr}')
        for group in self.optimizer.param_groups:
            group['lr'] = float(lr)

    # --- inference -----------------------------------------------------------------------
    @torch.no_grad()
    def infer(self, batch: dict) -> dict:
        """Eval-mode forward of a device batch: normalised mean/logvar, gates and the
        auxiliary heads' outputs ('aux', which the loss of evaluate() includes as step()'s
        does)."""
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
                out = self.model(batch)
            res = {k: v.float() for k, v in out.items() if torch.is_tensor(v)}
            if 'aux' in out:
                res['aux'] = {name: (mean.float(), logvar.float(), present)
                              for name, (mean, logvar, present) in out['aux'].items()}
            return res
        finally:
            self.model.train(was_training)

    def predict(self, batch: dict):
        """(mean (B, 6), logvar (B, 6)) in metres / radians, computed in eval mode."""
        out = self.infer(self.to_device(batch))
        return self.model.denormalize(out['mean'], out['logvar'])

    @torch.no_grad()
    def evaluate(self, batches, reduce=None) -> dict:
        """Loss, its parts and the pose errors over an iterable of batches (empty batches count
        as skipped).

        reduce: optional function summing a 1-D tensor across processes (DDP sharded eval).
        The loss is the training loss of TrainConfig.supervision; the pose errors and the
        mean-motion baseline (always predicting the training-set mean step) cover the samples
        whose ground truth is known. `samples` counts those that entered the loss.
        """
        terms = self.train_cfg.loss_terms
        names = ('loss', 'trans_err', 'rot_err', 'mm_trans', 'mm_rot', 'gt_samples', 'samples',
                 'skipped') + tuple(f'{k}_{t}' for t in terms for k in ('sum', 'n'))
        sums = dict.fromkeys(names, 0.0)
        for batch in batches:
            sums['skipped'] += batch_skipped(batch)
            if is_empty(batch):
                continue
            batch, dropped = self.drop_nonfinite(self.to_device(batch))
            sums['skipped'] += dropped
            if batch is None:
                continue
            has_gt = batch['target_valid'].bool()
            if not (has_gt.any() or self.trainable(batch, terms).any()):
                continue
            out = self.infer(batch)
            loss, valid, _, means, counts = self.combine(self.loss_parts(out, batch, terms))
            n = int(valid.sum())
            sums['loss'] += float(loss) * n if n else 0.0
            sums['samples'] += n
            for t in terms:
                if counts[t]:
                    sums[f'sum_{t}'] += means[t] * counts[t]
                    sums[f'n_{t}'] += counts[t]
            if has_gt.any():
                mean = self.model.denormalize(out['mean'], out['logvar'])[0][has_gt]
                t = batch['target'].float()[has_gt]
                step = self.model.target_mean if self.baseline_step is None else \
                    torch.as_tensor(self.baseline_step, dtype=t.dtype, device=t.device)
                base = step.expand_as(t)
                sums['trans_err'] += float(translation_error(mean[:, :3], t[:, :3]).sum())
                sums['rot_err'] += float(rotation_angle_error(mean[:, 3:], t[:, 3:]).sum())
                sums['mm_trans'] += float(translation_error(base[:, :3], t[:, :3]).sum())
                sums['mm_rot'] += float(rotation_angle_error(base[:, 3:], t[:, 3:]).sum())
                sums['gt_samples'] += int(has_gt.sum())
        vector = torch.tensor([sums[k] for k in names], dtype=torch.float64)
        if reduce is not None:
            vector = reduce(vector)
        sums = dict(zip(names, vector.tolist()))

        def avg(key, count):
            return sums[key] / sums[count] if sums[count] > 0 else math.nan

        result = {'loss': avg('loss', 'samples'),
                  'trans_err': avg('trans_err', 'gt_samples'),
                  'rot_err_deg': math.degrees(avg('rot_err', 'gt_samples')),
                  'mean_motion_trans_err': avg('mm_trans', 'gt_samples'),
                  'mean_motion_rot_err_deg': math.degrees(avg('mm_rot', 'gt_samples')),
                  'samples': int(sums['samples']), 'gt_samples': int(sums['gt_samples']),
                  'skipped': int(sums['skipped'])}
        result.update({f'loss_{t}': avg(f'sum_{t}', f'n_{t}') for t in terms})
        return result

    # --- checkpoints ---------------------------------------------------------------------
    def state_dict(self, metrics=None, sample_cfg=None, include_optimizer=True) -> dict:
        """The DESIGN §7 checkpoint payload (plain values and tensors only)."""
        config = {'model': self.model_cfg.to_dict(), 'train': self.train_cfg.to_dict()}
        if sample_cfg is not None:
            config['sample'] = sample_cfg.to_dict()
        return {'format_version': FORMAT_VERSION,
                'model': {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
                'optimizer': self.optimizer.state_dict() if include_optimizer else None,
                # amp's loss scale, found over the run's steps; a resume without it starts
                # again at 65536 and skips the steps whose gradients overflow until it is back.
                'grad_scaler': self.scaler.state_dict() if include_optimizer and self.amp
                else None,
                'optimizer_params': list(self.param_names),
                'config': config,
                'step': int(self.step_count),
                'epoch': int(self.epoch),
                'metrics': dict(metrics or {}),
                'frozen': sorted(self.model.frozen),
                'normalization': self.model.normalization(),
                'counters': dict(self.counters)}

    def load_state_dict(self, payload: dict, source='checkpoint', load_optimizer=False) -> None:
        """Load a checkpoint payload (see checkpoint.load_checkpoint) into this core.

        The checkpoint's model config must equal this core's; otherwise ValueError naming the
        differing keys. With load_optimizer the optimiser state, step and epoch are restored.
        """
        check_model_config(payload['config']['model'], self.model_cfg, source)
        try:
            self.model.load_state_dict(payload['model'], strict=True)
        except RuntimeError as e:
            raise ValueError(f'{source}: model weights do not fit the network: {e}') from e
        if load_optimizer:
            self.load_optimizer(payload, source)

    def load_optimizer(self, payload: dict, source) -> None:
        if payload.get('optimizer') is None:
            raise ValueError(f'{source}: checkpoint has no optimizer state to resume from')
        saved = payload.get('optimizer_params')
        if saved is not None and list(saved) != self.param_names:
            extra = sorted(set(saved) ^ set(self.param_names))[:8]
            raise ValueError(f'{source}: optimizer state covers other parameters (frozen in the '
                             f'checkpoint: {payload.get("frozen")}, now: '
                             f'{sorted(self.model.frozen)}; differing: {extra})')
        try:
            self.optimizer.load_state_dict(payload['optimizer'])
        except (ValueError, KeyError) as e:
            raise ValueError(f'{source}: optimizer state does not fit: {e}') from e
        scaler_state = payload.get('grad_scaler')
        if self.amp and scaler_state:
            self.scaler.load_state_dict(scaler_state)
        # The requested learning rate / weight decay win over the saved ones.
        for group in self.optimizer.param_groups:
            group['lr'] = self.train_cfg.learning_rate
            group['weight_decay'] = self.train_cfg.weight_decay
        self.step_count = int(payload['step'])
        self.epoch = int(payload['epoch'])
        self.resumed_metrics = dict(payload.get('metrics') or {})
        self.counters.update({k: int(v) for k, v in payload.get('counters', {}).items()
                              if k in self.counters})


def check_model_config(saved: dict, current: ModelConfig, source) -> None:
    """ValueError naming every key where a checkpoint's model config differs from `current`."""
    try:
        saved_cfg = ModelConfig.from_dict(saved)
    except (ValueError, TypeError) as e:
        raise ValueError(f'{source}: model config not understood: {e}') from e
    a, b = saved_cfg.to_dict(), current.to_dict()
    diff = [f'{k} (checkpoint {a[k]!r}, requested {b[k]!r})' for k in a if a[k] != b[k]]
    if diff:
        raise ValueError(f'{source}: checkpoint model config differs in: ' + '; '.join(diff))
