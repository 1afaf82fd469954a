"""train_imu_filter: fit the inertial filter to a vehicle from real IMU + ground-truth poses.

  train_imu_filter --kitti_sample /work/shared/kitti_sample --out pretrain_models/imu_filter.pth

The IMU clock offset and steps 1-2 fit on the training sequences only; the validation sequence
gives the network's early stopping, and step 3 chooses on `tune_sequences`, which by default
include the validation sequence 04 (the training sequences see an in-sample network), so 04's
figures are not held out. No test sequence (01, 07) is used by default:
1. vehicle calibration: the IMU's rotation in base_link (hand-eye, gyro vs GT rotations) and the
   direction the vehicle moves in, in IMU axes (the pseudo-measurements' frame);
2. the noise network: Gaussian negative log-likelihood of the GT lateral and vertical velocity
   of the vehicle frame (the pseudo-measurements' actual error) and of the forward speed at the
   window's end and start, over IMU windows ending at every scan;
3. the pseudo-measurement variance factor: the per-window variance is right for one sample, but
   the errors are correlated over seconds, so the filter runs over the tuning sequences with
   each factor of `tune_scales` (then of `tune_speed_scales`) and keeps the best by issue 13's
   two targets (TuneScore): first the fewest tuning sequences whose r_rel exceeds the plain
   gyro integral's on the filter's clock, then the lowest mean t_rel. Of the `seeds` networks
   the one whose tuned filter scores best the same way is kept; with `ensemble`, the deep
   ensemble of all seeds' networks is one more candidate.
The result is one DESIGN §7 checkpoint (filter.checkpoint).
"""
import argparse
import dataclasses
from dataclasses import dataclass, field
import logging
import math
from pathlib import Path
import sys
import time
from typing import NamedTuple

import numpy as np
import torch

from mm_fusion_ros.config import ConfigBase
from mm_fusion_ros.filter.checkpoint import filter_payload, save_filter_checkpoint
from mm_fusion_ros.filter.config import FilterConfig
from mm_fusion_ros.filter.kitti_data import (
    concat_windows,
    fit_imu_time_offset,
    fit_vehicle_calibration,
    gyro_r_rel,
    load_imu_sequence,
    on_scan_clock,
    run_on_sequence,
    window_labels,
)
from mm_fusion_ros.filter.noise_net import NoiseEnsemble, NoiseModel, NoiseNet, NoiseNetConfig
from mm_fusion_ros.kitti.ids import parse_sequences

log = logging.getLogger(__name__)

STOP_SPEED = 0.3   # [m/s] a training window ending slower than this is a standstill
TUNED = ('pseudo_var_scale', 'speed_mode', 'speed_var_scale')
SPEED_RANGE_MARGIN = 0.95   # speed updates below this share of the fastest training speed


@dataclass(frozen=True)
class TrainFilterConfig(ConfigBase):
    """Settings of train_imu_filter (each is a flag of the same name)."""

    kitti_sample: str = field(default='', metadata={
        'help': 'KITTI root with poses/NN.txt, sequences/NN/times.txt and imu/NN.mat'})
    imu_path: str = field(default='', metadata={
        'help': 'folder of NN.mat IMU files (default KITTI_SAMPLE/imu)'})
    out: str = field(default='pretrain_models/imu_filter.pth', metadata={
        'help': 'checkpoint to write (DESIGN §7 format, kind imu_filter)'})
    train_sequences: str = field(default='00,02,05,06,08', metadata={
        'help': 'comma-separated training sequences'})
    val_sequences: str = field(default='04', metadata={
        'help': 'comma-separated validation sequences (early stopping of the network, scored; '
                'never fitted, but chosen on where also in tune_sequences, as 04 by default)'})
    time_offset_search_s: float = field(default=0.2, metadata={
        'help': "the IMU clock's offset to the scans is fitted on the training sequences within "
                '+- this (FilterConfig imu_time_offset_s) before anything else; 0: taken as '
                'zero [s]'})
    epochs: int = field(default=25, metadata={'help': 'passes over the training windows'})
    batch_size: int = field(default=256, metadata={'help': 'windows per step'})
    learning_rate: float = field(default=2e-3, metadata={'help': 'AdamW learning rate'})
    weight_decay: float = field(default=1e-4, metadata={'help': 'AdamW weight decay'})
    window: int = field(default=200, metadata={'help': 'IMU samples per network window'})
    channels: int = field(default=32, metadata={'help': 'noise network convolution width'})
    hidden: int = field(default=64, metadata={'help': 'noise network dense width'})
    speed_head: bool = field(default=True, metadata={
        'help': 'train the learned body-speed head (initial speed and speed updates)'})
    stop_oversample: int = field(default=20, metadata={
        'help': 'repeat training windows that end at a standstill this often (they are rare)'})
    max_windows_per_sequence: int = field(default=0, metadata={
        'help': 'keep at most N evenly spaced windows per sequence (0 = all; for quick runs)'})
    tune_scales: str = field(default='1,3,10', metadata={
        'help': 'candidate pseudo-measurement variance factors (empty = keep 1)'})
    tune_speed_scales: str = field(default='10,30,100', metadata={
        'help': 'candidate speed-network variance factors for learned speed updates; the '
                'filter keeps them only if they lower t_rel (empty = initial speed only)'})
    tune_sequences: str = field(default='00,02,05,06,08,04', metadata={
        'help': 'sequences whose mean t_rel chooses the variance factors (the training ones '
                'see an in-sample network, so the validation sequence is included)'})
    seed: int = field(default=0, metadata={'help': 'torch and shuffling seed'})
    seeds: int = field(default=5, metadata={
        'help': 'networks trained, with seeds seed, seed+1, ...; the one whose tuned filter has '
                'the best TuneScore over tune_sequences is kept (without tuning: the lowest '
                'validation loss). One network varies much from seed to seed'})
    ensemble: bool = field(default=True, metadata={
        'help': "with seeds > 1, the seeds' networks as one deep ensemble (NoiseEnsemble) are "
                'a further candidate, tuned and scored as each seed is (docs/'
                'inertial_filter.md, "Session 40")'})
    select_rotation: bool = field(default=True, metadata={
        'help': 'choose the variance factors and the seed first by the fewest tune_sequences '
                "whose r_rel exceeds the plain gyro integral's (on the filter's clock), then "
                'by mean t_rel; false: by mean t_rel alone'})
    threads: int = field(default=2, metadata={'help': 'torch CPU threads'})

    def __post_init__(self):
        for name in ('epochs', 'batch_size', 'window', 'channels', 'hidden', 'threads',
                     'stop_oversample', 'seeds'):
            if getattr(self, name) < 1:
                raise ValueError(f'TrainFilterConfig.{name} must be >= 1, got '
                                 f'{getattr(self, name)}')
        if self.learning_rate <= 0:
            raise ValueError(f'learning_rate must be > 0, got {self.learning_rate}')


def add_config_flags(parser, cls):
    """One flag per dataclass field, default and help from the field (bools take on/off)."""
    for f in dataclasses.fields(cls):
        kind = f.type if isinstance(f.type, type) else type(f.default)
        if kind is bool:
            parser.add_argument(f'--{f.name}', choices=('on', 'off'),
                                default='on' if f.default else 'off', help=f.metadata['help'])
        else:
            parser.add_argument(f'--{f.name}', type=kind, default=f.default,
                                help=f.metadata['help'] + f' (default: {f.default})')


def config_from_args(cls, args):
    values = {}
    for f in dataclasses.fields(cls):
        value = getattr(args, f.name)
        values[f.name] = (value == 'on') if isinstance(f.default, bool) else value
    return cls(**values)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog='train_imu_filter',
        description='Fit the inertial filter (vehicle calibration, noise network, '
                    'pseudo-measurement variance) on real KITTI IMU and ground-truth poses.')
    add_config_flags(p, TrainFilterConfig)
    return p


def _nll(mean, logvar, target):
    return 0.5 * (logvar + (target - mean) ** 2 * torch.exp(-logvar))


def loss_terms(net_out, batch):
    """Per-term mean NLL: lateral, vertical (zero-mean), speed, speed0."""
    lat = _nll(0.0, net_out[:, 0], batch['lateral']).mean()
    ver = _nll(0.0, net_out[:, 1], batch['vertical']).mean()
    terms = {'lateral': lat, 'vertical': ver}
    if net_out.shape[1] > 2:
        # The speed means learn from a Huber loss; their log-variances from the NLL of the
        # detached means (a joint NLL lets the variance swallow the hard windows, e.g. stops).
        for name, m, lv in (('speed', 2, 3), ('speed0', 4, 5)):
            mean = net_out[:, m]
            terms[name] = torch.nn.functional.smooth_l1_loss(mean, batch[name])
            terms[name + '_nll'] = _nll(mean.detach(), net_out[:, lv], batch[name]).mean()
    return terms


def _tensors(ws, index=None):
    sel = slice(None) if index is None else index
    return {'windows': torch.from_numpy(ws.windows[sel]),
            **{k: torch.from_numpy(getattr(ws, k)[sel].astype(np.float32))
               for k in ('lateral', 'vertical', 'speed', 'speed0')}}


@torch.no_grad()
def evaluate_windows(net, ws, batch_size=2048) -> dict:
    net.eval()
    sums, n = {}, 0
    speed_err = []
    for i in range(0, len(ws.windows), batch_size):
        batch = _tensors(ws, slice(i, i + batch_size))
        out = net(batch['windows'])
        for k, v in loss_terms(out, batch).items():
            sums[k] = sums.get(k, 0.0) + float(v) * len(out)
        if out.shape[1] > 2:
            speed_err.append((out[:, 2] - batch['speed']).abs().numpy())
        n += len(out)
    metrics = {f'nll_{k}': v / n for k, v in sums.items()}
    metrics['loss'] = sum(metrics.values())
    if speed_err:
        metrics['speed_mae'] = float(np.concatenate(speed_err).mean())
    return metrics


def train_noise_net(cfg: TrainFilterConfig, train_ws, val_ws):
    """Train the network; returns (net at its best validation loss, history, best epoch)."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    net = NoiseNet(NoiseNetConfig(window=cfg.window, channels=cfg.channels, hidden=cfg.hidden,
                                  speed_head=cfg.speed_head))
    flat = train_ws.windows.reshape(-1, 6)
    net.set_normalization(flat.mean(axis=0), flat.std(axis=0))
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.learning_rate,
                            weight_decay=cfg.weight_decay)
    stops = np.flatnonzero(np.abs(train_ws.speed) < STOP_SPEED)
    per_epoch = len(train_ws.windows) + (cfg.stop_oversample - 1) * len(stops)
    steps = cfg.epochs * int(np.ceil(per_epoch / cfg.batch_size))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.learning_rate, total_steps=steps)
    history, best, best_state, best_epoch = [], np.inf, None, 0
    for epoch in range(1, cfg.epochs + 1):
        net.train()
        t0 = time.perf_counter()
        order = rng.permutation(np.concatenate([np.arange(len(train_ws.windows))]
                                               + [stops] * (cfg.stop_oversample - 1)))
        total = 0.0
        for i in range(0, len(order), cfg.batch_size):
            batch = _tensors(train_ws, np.sort(order[i:i + cfg.batch_size]))
            loss = sum(loss_terms(net(batch['windows']), batch).values())
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 5.0)
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(batch['windows'])
        row = {'epoch': epoch, 'train_loss': total / len(order),
               'seconds': time.perf_counter() - t0}
        if val_ws is not None:
            row.update({f'val_{k}': v for k, v in evaluate_windows(net, val_ws).items()})
        history.append(row)
        log.info('epoch %d %s', epoch, ' '.join(f'{k} {v:.4f}' for k, v in row.items()
                                                 if k != 'epoch'))
        score = row.get('val_loss', row['train_loss'])
        if score < best:
            best, best_epoch = score, epoch
            best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    net.load_state_dict(best_state)
    return net.eval(), history, best_epoch


@dataclass(frozen=True, order=True)
class TuneScore:
    """A filter over the tuning sequences, ordered best first by issue 13's two targets: the
    sequences whose r_rel exceeds the plain gyro integral's (the rotation target; always 0
    without gyro baselines), then the mean t_rel (the translation target). Before session 36
    only t_rel chose (docs/inertial_filter.md, "Session 36")."""

    rotation_misses: int
    t_rel: float

    def __str__(self):
        return f'r_rel above the gyro on {self.rotation_misses}, mean t_rel {self.t_rel:.4f}'


class Candidate(NamedTuple):
    """A trained network (or ensemble) with its tuned filter, ranked by score."""

    score: object          # TuneScore, or the validation loss without tuning
    name: str
    net: torch.nn.Module
    history: list
    best_epoch: int
    model: NoiseModel
    filter_cfg: FilterConfig
    table: dict


def score_filter(cfg: FilterConfig, model, seqs, gyro_r_rels=None) -> TuneScore:
    """gyro_r_rels: each sequence's plain gyro integral r_rel, or None (t_rel alone)."""
    metrics = [run_on_sequence(s, cfg, model)[2] for s in seqs]
    t_rel = float(np.nanmean([m['t_rel'] for m in metrics]))
    t_rel = t_rel if math.isfinite(t_rel) else math.inf   # no segment scored: never preferred
    misses = 0 if gyro_r_rels is None else sum(
        not m['r_rel'] <= g for m, g in zip(metrics, gyro_r_rels))
    log.info('%s: mean t_rel %.3f %%, r_rel above the gyro on %s (%s)',
             ' '.join(f'{k}={v}' for k, v in cfg.to_dict().items() if k in TUNED), t_rel,
             'n/a' if gyro_r_rels is None else f'{misses} of {len(seqs)}',
             ', '.join(f'{s.name} {m["t_rel"]:.2f} / {m["r_rel"]:.4f}'
                       for s, m in zip(seqs, metrics)))
    return TuneScore(misses, t_rel)


def tune_filter(base: FilterConfig, model, seqs, scales, speed_scales, gyro_r_rels=None):
    """Variance factors by TuneScore over seqs: first the pseudo-measurements', then whether
    learned speed updates (and with which factor) beat the initial speed alone.
    -> (the best config, {setting: TuneScore})."""
    table = {}
    best_cfg, best = base, None
    for scale in scales or [base.pseudo_var_scale]:
        cfg = base.replace(pseudo_var_scale=float(scale))
        table[f'pseudo_var_scale={scale:g}'] = score = score_filter(cfg, model, seqs,
                                                                    gyro_r_rels)
        if best is None or score < best:
            best_cfg, best = cfg, score
    if model is not None and model.has_speed:
        base = best_cfg
        for scale in speed_scales:
            cfg = base.replace(speed_mode='on', speed_var_scale=float(scale))
            table[f'speed_mode=on speed_var_scale={scale:g}'] = score = score_filter(
                cfg, model, seqs, gyro_r_rels)
            if score < best:
                best_cfg, best = cfg, score
    return best_cfg, table


def run(cfg: TrainFilterConfig) -> dict:
    if not cfg.kitti_sample:
        raise ValueError('--kitti_sample is required (a KITTI root with poses/, sequences/ and '
                         'imu/)')
    torch.set_num_threads(cfg.threads)
    root = Path(cfg.kitti_sample)
    imu_path = Path(cfg.imu_path) if cfg.imu_path else root / 'imu'
    train = [load_imu_sequence(root, s, imu_path) for s in parse_sequences(cfg.train_sequences)]
    val = ([load_imu_sequence(root, s, imu_path) for s in parse_sequences(cfg.val_sequences)]
           if cfg.val_sequences.strip() else [])
    offset, offset_costs = (fit_imu_time_offset(train, cfg.time_offset_search_s)
                            if cfg.time_offset_search_s > 0 else (0.0, {}))
    # The calibration and the labels index IMU samples: they see them on the scans' clock, as
    # the filter will (it shifts the stamps itself, so the runs below take the raw sequences).
    calib = fit_vehicle_calibration([on_scan_clock(s, offset) for s in train])

    def make(seqs):
        return concat_windows([window_labels(on_scan_clock(s, offset), calib, cfg.window,
                                             max_windows=cfg.max_windows_per_sequence)
                               for s in seqs])
    train_ws = make(train)
    val_ws = make(val) if val else None
    log.info('%d training windows, %d validation windows of %d samples', len(train_ws.windows),
             0 if val_ws is None else len(val_ws.windows), cfg.window)
    # Speed updates only inside the speed range the network was trained on.
    speed_max = SPEED_RANGE_MARGIN * float(np.abs(train_ws.speed).max())
    base_cfg = FilterConfig(nhc_rpy_deg=calib.nhc_rpy_deg, nhc_slip_mean=calib.slip_s,
                            imu_time_offset_s=offset,
                            speed_mode='init' if cfg.speed_head else 'off',
                            speed_max=speed_max if cfg.speed_head else 0.0)
    scales = [float(s) for s in cfg.tune_scales.split(',') if s.strip()]
    speed_scales = [float(s) for s in cfg.tune_speed_scales.split(',') if s.strip()]
    tune, gyro = [], None
    if scales or speed_scales:
        loaded = {s.name: s for s in train + val}
        tune = [loaded.get(s) or load_imu_sequence(root, s, imu_path)
                for s in parse_sequences(cfg.tune_sequences)]
        if cfg.select_rotation:
            gyro = [gyro_r_rel(s, offset) for s in tune]
            log.info("plain gyro integral r_rel on the filter's clock: %s",
                     ', '.join(f'{s.name} {g:.4f}' for s, g in zip(tune, gyro)))
    t0 = time.perf_counter()
    candidates = []

    def add_candidate(name, net, history, best_epoch, val_loss=None):
        """val_loss: the score without tuning (default: the history's lowest)."""
        model = NoiseModel(net)
        filter_cfg, table = base_cfg, {}
        if tune:
            filter_cfg, table = tune_filter(base_cfg, model, tune, scales, speed_scales, gyro)
            score = min(table.values())
            log.info('%s over %d tuning sequences: %s%s', name, len(tune), score,
                     '' if gyro else ' (select_rotation off)')
        else:
            score = (val_loss if val_loss is not None else
                     min(h.get('val_loss', h['train_loss']) for h in history))
            log.info('%s: loss %.4f', name, score)
        candidates.append(Candidate(score, name, net, history, best_epoch, model, filter_cfg,
                                    table))

    for seed in range(cfg.seed, cfg.seed + cfg.seeds):
        add_candidate(f'seed {seed}', *train_noise_net(cfg.replace(seed=seed), train_ws, val_ws))
    ensemble_val = {}
    if cfg.ensemble and cfg.seeds > 1:
        members = list(candidates)
        ensemble = NoiseEnsemble(c.net for c in members).eval()
        # Its history: the members' mean per epoch; its loss, the mixture's.
        history = [{'epoch': row['epoch'],
                    **{k: float(np.mean([c.history[i][k] for c in members]))
                       for k in row if k != 'epoch'}}
                   for i, row in enumerate(members[0].history)]
        ensemble_val = evaluate_windows(ensemble, val_ws) if val_ws is not None else {}
        add_candidate(f'ensemble of seeds {cfg.seed}-{cfg.seed + cfg.seeds - 1}', ensemble,
                      history, max(c.best_epoch for c in members), ensemble_val.get('loss'))
    train_s = time.perf_counter() - t0
    score, chosen, net, history, best_epoch, model, filter_cfg, table = min(
        candidates, key=lambda c: c.score)
    if len(candidates) > 1:
        log.info('kept %s (%s)', chosen, '; '.join(f'{c.name}: {c.score}' for c in candidates))
    t_rel_of = (lambda s: s.t_rel) if tune else float
    metrics = {'history': history, 'best_epoch': best_epoch, 'train_seconds': train_s,
               'seed': chosen, 'seed_scores': {c.name: t_rel_of(c.score) for c in candidates},
               'ensemble_val': ensemble_val,
               'tune_t_rel': {k: v.t_rel for k, v in table.items()},
               'gyro_r_rel': ({s.name: g for s, g in zip(tune, gyro)} if gyro else {}),
               'tune_rotation_misses': ({k: v.rotation_misses for k, v in table.items()}
                                        if gyro else {}),
               'seed_rotation_misses': ({c.name: c.score.rotation_misses for c in candidates}
                                        if gyro else {}),
               'imu_time_offset_s': offset, 'imu_time_offset_rms_rad': offset_costs,
               'calibration': {'R_base_imu': calib.R_base_imu.tolist(),
                               'nhc_rpy_deg': list(calib.nhc_rpy_deg),
                               'nhc_point_base': calib.nhc_point_base.tolist(),
                               'slip_s': calib.slip_s}}
    for s in val:
        metrics[f'val_{s.name}'] = {k: v for k, v in run_on_sequence(
            s, filter_cfg, model)[2].items() if k in ('t_rel', 'r_rel')}
        log.info('validation %s%s: t_rel %.2f %% r_rel %.3f deg/100m', s.name,
                 ' (also a tuning sequence: not held out)' if s.name in [t.name for t in tune]
                 else '', metrics[f'val_{s.name}']['t_rel'], metrics[f'val_{s.name}']['r_rel'])
    payload = filter_payload(filter_cfg, net, cfg, metrics, step=0, epoch=best_epoch)
    path = save_filter_checkpoint(cfg.out, payload)
    log.info('wrote %s (%s)', path, ', '.join(f'{k} {getattr(filter_cfg, k)}' for k in TUNED))
    return metrics


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s')
    try:
        cfg = config_from_args(TrainFilterConfig, args)
        run(cfg)
    except (ValueError, FileNotFoundError) as e:
        print(f'train_imu_filter: error: {e}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
