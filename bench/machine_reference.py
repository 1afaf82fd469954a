"""A fixed CPU workload, timed beside a bench so that runs made at different moments compare.

    python bench/machine_reference.py [--samples 10] [--passes 3] [--json]

The shared development machine is not equally fast all the time: bench/profile_online.py on the
same code and bag measured 6.5 ms per sample once and 10.0 ms twenty minutes later
(docs/online_runtime.md, "Session 38"). A bench verdict alone cannot tell a slower
pipeline from a slower machine, so bench/online.py runs this before every case and after the
last one and prints it beside its figures.

The workload is the model forward that bench/online.py's node runs for every scan: the default
ModelConfig with the Dummy visual encoder, as config/finetune.yaml's model with the bench's
`model.visual_encoder:=dummy`, on consecutive full-size synthetic samples (bench/
model_forward.py's drive: ~120k-point scans subsampled to 16384), in eval mode under
torch.inference_mode with an encoders.ScanCache and one torch thread, as
OnlineTrainer.on_sample runs it. Each pass after the first sample is timed in CPU time of this
thread (time.thread_time); the figure is the median over all timed forwards. Fresh weights
(seed 0): the cost does not depend on their values.
"""
import argparse
import json
from pathlib import Path
import statistics
import sys
import time

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model_forward import batches, drive_samples  # noqa: E402  (beside this file)
import torch  # noqa: E402

from mm_fusion_ros.config import SampleConfig  # noqa: E402
from mm_fusion_ros.model.config import ModelConfig  # noqa: E402
from mm_fusion_ros.model.encoders import ScanCache  # noqa: E402
from mm_fusion_ros.model.net import build_model  # noqa: E402


def forward_ms(samples: int = 10, passes: int = 3) -> float:
    """Median CPU ms of one prediction forward (module docstring)."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = ModelConfig(visual_encoder='dummy')
    shape = SampleConfig(image_height=cfg.image_height, image_width=cfg.image_width,
                         max_points=16384, imu_steps=cfg.imu_steps)
    data = batches(drive_samples(samples + 1, shape, 0))
    model = build_model(cfg).eval()
    times = []
    with torch.inference_mode():
        for _ in range(passes):
            cache = ScanCache()
            model(data[0], scan_cache=cache)       # fills the cache: not timed
            for batch in data[1:]:
                t0 = time.thread_time()
                model(batch, scan_cache=cache)
                times.append(time.thread_time() - t0)
    return statistics.median(times) * 1e3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--samples', type=int, default=10, help='timed samples per pass')
    p.add_argument('--passes', type=int, default=3)
    p.add_argument('--json', action='store_true', help='print {"forward_ms": ...} only')
    args = p.parse_args(argv)
    if args.samples < 1 or args.passes < 1:
        p.error('--samples and --passes must be >= 1')
    ms = forward_ms(args.samples, args.passes)
    print(json.dumps({'forward_ms': round(ms, 3)}) if args.json else
          f"model forward (bench/online.py's model, one thread): {ms:.2f} ms CPU, median of "
          f'{args.samples * args.passes}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
