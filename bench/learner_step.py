"""Cost of one online gradient step, for several training settings on the same samples.

    python bench/learner_step.py --checkpoint MODEL.pth --data_path DATA --sequence 07 \\
        [--samples 30] [--steps 100] [--max_points 8192] \\
        --config NAME:key=value,... [--config ...]

The online node's trainer (training/online.py OnlineTrainer, thread learner, no ROS) with the
checkpoint: the first `--samples` samples of the sequence are predicted and stored, as the node
does, then `--steps` warm-up steps fill the per-sample caches (feature cache, kd-trees, solved
geometric term) as a running node's buffer would be, then `--steps` steps are timed. Each
`--config` is TrainConfig fields on top of the online node's defaults (ONLINE_TRAIN_DEFAULTS,
the syntax of bench/online_adapt.py); the first one is the baseline the others are compared
with. One torch thread. What a first step on a new sample costs beyond that (its encoders when
they are not frozen or their features not passed from the prediction, its kd-tree, its
Gauss-Newton solve) is in the node's replay, not here.
"""
import argparse
from pathlib import Path
import sys
import tempfile
import time

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from online_adapt import parse_config  # noqa: E402
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


def time_steps(args, payload, samples, settings: dict) -> float:
    """Mean wall time [s] of one step after the warm-up."""
    train_cfg = TrainConfig(**{**ONLINE_TRAIN_DEFAULTS, **settings})
    with tempfile.TemporaryDirectory() as tmp:
        online = OnlineConfig(updates_per_sample=0.0, checkpoint_dir=tmp, save_on_shutdown=False,
                              num_threads=1, max_step_debt=10 ** 6)
        trainer = OnlineTrainer(online, train_cfg, buffer=ReplayBuffer(BufferConfig()),
                                sample_cfg=samples.cfg, initial=(payload, args.checkpoint))
        for i in range(min(args.samples, len(samples))):
            trainer.on_sample(samples.load(i))
        for timed in (False, True):
            trainer.step_debt = float(args.steps)
            t0 = time.perf_counter()
            done = trainer.train_pending()
            if timed:
                return (time.perf_counter() - t0) / max(done, 1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--checkpoint', required=True, help='the pretrained fusion model')
    p.add_argument('--data_path', required=True, help='KITTI-layout tree')
    p.add_argument('--sequence', required=True)
    p.add_argument('--samples', type=int, default=30, help='samples in the buffer')
    p.add_argument('--steps', type=int, default=100, help='warm-up steps, then timed steps')
    p.add_argument('--max_points', type=int, default=8192, help='points per scan')
    p.add_argument('--config', action='append', required=True,
                   help='NAME:key=value,... TrainConfig settings (repeatable; first = baseline)')
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    payload = load_checkpoint(args.checkpoint)
    model_cfg = ModelConfig.from_dict(payload['config']['model'])
    samples = KITTIOdomPointDataset(args.data_path, args.sequence, sample_cfg=sample_config_for(
        model_cfg, SampleConfig(max_points=args.max_points)))
    configs = [parse_config(c) for c in args.config]
    print(f'{args.sequence}: {args.samples} samples, {args.max_points} points, {args.steps} '
          'warm-up then timed steps, one thread')
    print('| config | ms per step | x baseline |')
    print('| --- | --- | --- |')
    base = None
    for name, settings in configs:
        cost = time_steps(args, payload, samples, settings)
        base = base or cost
        print(f'| {name} | {cost * 1e3:.1f} | {cost / base:.2f} |', flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
