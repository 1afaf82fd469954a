"""Online adaptation in one process: the online node's trainer fed a sequence in order.

    python bench/online_adapt.py --checkpoint MODEL.pth --data_path DATA --sequence 07 \\
        [--steps_per_sample 1] [--seeds 0,1] \\
        [--config NAME:key=value,key=value ...] [--json OUT.json]

OnlineTrainer (training/online.py, the node's core) with the checkpoint, no ROS: every sample
of the sequence is predicted (the pose the node would publish), stored in the replay buffer,
and then the owed gradient steps run (`--steps_per_sample`, as updates_per_sample; at 1x the
node pays what its CPU allows, so this fixes the budget instead of the wall clock). Ground truth
is read only to score: per-step translation [m] and rotation [deg] error of the predictions over
the second half, against the same replay with training off (`off`, always run first).

Each `--config` is TrainConfig fields (supervision, learning_rate, self_*_weight,
freeze_*, ...) and OnlineConfig fields (prediction_ema) on top of the online node's defaults
(ONLINE_TRAIN_DEFAULTS); without any, one config `default` (the node's settings). It answers
quickly what the node's replays answer slowly (bench/selfsup.py is the offline counterpart);
the node's own on/off replay is what the demo prints.
"""
import argparse
from dataclasses import fields
import json
import math
from pathlib import Path
import sys
import tempfile
import time

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from mm_fusion_ros.config import SampleConfig  # noqa: E402
from mm_fusion_ros.kitti.dataset import KITTIOdomPointDataset  # noqa: E402
from mm_fusion_ros.model.config import ModelConfig  # noqa: E402
from mm_fusion_ros.sync.config import BufferConfig  # noqa: E402
from mm_fusion_ros.sync.replay_buffer import ReplayBuffer  # noqa: E402
from mm_fusion_ros.training.checkpoint import load_checkpoint  # noqa: E402
from mm_fusion_ros.training.config import TrainConfig  # noqa: E402
from mm_fusion_ros.training.online import (  # noqa: E402
    ONLINE_TRAIN_DEFAULTS,
    OnlineConfig,
    OnlineTrainer,
    sample_config_for,
)


def parse_config(text: str):
    """'NAME:key=value,...' -> (NAME, {field: typed value}) of TrainConfig, or of OnlineConfig
    for its fields (e.g. prediction_ema)."""
    name, _, body = text.partition(':')
    defaults = {f.name: (cls, getattr(cls(), f.name))
                for cls in (OnlineConfig, TrainConfig) for f in fields(cls)}
    out = {}
    for item in filter(None, body.split(',')):
        key, _, value = item.partition('=')
        if key not in defaults:
            raise SystemExit(f'--config {text!r}: {key!r} is not a TrainConfig or OnlineConfig '
                             'field')
        kind = type(defaults[key][1])
        out[key] = value.lower() == 'true' if kind is bool else kind(value)
    return name, out


def run(args, payload, samples, settings: dict, seed: int, training: bool) -> dict:
    online_keys = {f.name for f in fields(OnlineConfig)}
    train_cfg = TrainConfig(**{**ONLINE_TRAIN_DEFAULTS, 'seed': seed,
                               **{k: v for k, v in settings.items() if k not in online_keys}})
    with tempfile.TemporaryDirectory() as tmp:
        online = OnlineConfig(updates_per_sample=args.steps_per_sample if training else 0.0,
                              training_enabled=training, checkpoint_dir=tmp,
                              save_on_shutdown=False, num_threads=args.threads,
                              **{k: v for k, v in settings.items() if k in online_keys})
        trainer = OnlineTrainer(online, train_cfg, buffer=ReplayBuffer(
            BufferConfig(capacity=args.buffer)), sample_cfg=samples.cfg,
            initial=(payload, args.checkpoint))
        t0, steps, trans, rot = time.perf_counter(), 0, [], []
        for i in range(len(samples)):
            sample = samples.load(i)
            pred = trainer.on_sample(sample)
            target = np.asarray(sample['target'], dtype=np.float64)
            trans.append(float(np.linalg.norm(pred.mean[:3] - target[:3])))
            rot.append(float(np.degrees(np.linalg.norm(pred.mean[3:] - target[3:]))))
            if training:
                steps += trainer.train_pending()
        half = len(trans) // 2
        guard = trainer.metrics().get('guard_adapted_share', math.nan)
        return {'trans': float(np.mean(trans[half:])), 'rot': float(np.mean(rot[half:])),
                'steps': steps, 'wall_s': time.perf_counter() - t0, 'guard_adapted': guard}


def _share(value: float) -> str:
    """The guard's share of steps after which predictions got the adapted weights."""
    return 'always (no guard)' if math.isnan(value) else f'{100 * value:.0f} % of steps'


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--checkpoint', required=True, help='the pretrained fusion model')
    p.add_argument('--data_path', required=True, help='KITTI-layout tree with poses/ to score')
    p.add_argument('--sequence', required=True)
    p.add_argument('--steps_per_sample', type=float, default=1.0)
    p.add_argument('--buffer', type=int, default=1000, help='replay buffer capacity')
    p.add_argument('--seeds', default='0', help='comma-separated TrainConfig seeds')
    p.add_argument('--threads', type=int, default=1, help='torch threads')
    p.add_argument('--config', action='append', default=[],
                   help='NAME:key=value,... TrainConfig settings (repeatable)')
    p.add_argument('--json', type=Path, default=None, help='write the results here')
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    payload = load_checkpoint(args.checkpoint)
    model_cfg = ModelConfig.from_dict(payload['config']['model'])
    saved = payload['config'].get('sample', {})
    sample_cfg = sample_config_for(model_cfg, SampleConfig(
        max_points=saved.get('max_points', SampleConfig().max_points)))
    samples = KITTIOdomPointDataset(args.data_path, args.sequence, sample_cfg=sample_cfg)
    configs = dict(parse_config(c) for c in (args.config or ['default:']))
    seeds = [int(s) for s in args.seeds.split(',')]
    off = run(args, payload, samples, {}, 0, training=False)
    print(f'{len(samples)} samples of {args.sequence}; second half, per step: off '
          f'{off["trans"]:.4f} m, {off["rot"]:.4f} deg', flush=True)
    results = {'off': off, 'configs': {}}
    print('| config | seed | steps | trans [m] | on/off | rot [deg] | on/off | wall [s] | '
          'adapted weights used |')
    print('| --- | --- | --- | --- | --- | --- | --- | --- | --- |')
    for name, settings in configs.items():
        for seed in seeds:
            r = run(args, payload, samples, settings, seed, training=True)
            results['configs'].setdefault(name, {'settings': settings, 'runs': []})['runs'] \
                .append(dict(r, seed=seed))
            print(f'| {name} | {seed} | {r["steps"]} | {r["trans"]:.4f} | '
                  f'{r["trans"] / off["trans"]:.3f} | {r["rot"]:.4f} | '
                  f'{r["rot"] / off["rot"]:.3f} | {r["wall_s"]:.0f} | '
                  f'{_share(r["guard_adapted"])} |', flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == '__main__':
    sys.exit(main())
