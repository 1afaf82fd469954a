"""Training throughput and peak memory of TrainerCore on CPU.

Full-resolution synthetic KITTI frames (1242x375 images, HDL-64E-like scans) become DESIGN §5
samples at the default 96x320 image size; each configuration (visual encoder cnn | flow |
dummy, batch 1 | 2 | 8, max_points 16k | 32k | all) then runs training steps on batches already
in memory, in its own process so that its peak RSS (ru_maxrss) is its own, and times inference
(eval-mode forward, no gradient) on the same batch. Data loading (PNG
decode + resize + scan read + subsampling) is timed separately. The same run measures the
PointNet point encoder as the baseline for the BEV encoder, and compares the dummy-visual 16k
figures with the 20 samples/s target.

    python bench/train_throughput.py                # all configurations, 2 threads
    python bench/train_throughput.py --quick        # 16k points only
    python bench/train_throughput.py --quick --visuals cnn,flow --batches 4
"""
import argparse
import json
import os
from pathlib import Path
import resource
import subprocess
import sys
import tempfile
import time

TARGET_SAMPLES_PER_S = 20.0
POINT_SETTINGS = {'16k': 16384, '32k': 32768, 'all': 0}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--frames', type=int, default=5, help='synthetic frames generated')
    p.add_argument('--threads', type=int, default=1,
                   help='torch threads per measurement (2 stalls when other processes share '
                        'the 2 cores; docs/stage2_tracking.md)')
    p.add_argument('--min_time', type=float, default=4.0, help='seconds timed per config')
    p.add_argument('--quick', action='store_true', help='only max_points 16k')
    p.add_argument('--visuals', default='cnn,dummy,flow', help='visual encoders measured')
    p.add_argument('--batches', default='1,2,8', help='batch sizes measured')
    p.add_argument('--worker', type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument('--batch', type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument('--visual', default='cnn', help=argparse.SUPPRESS)
    p.add_argument('--point', default='bev', help=argparse.SUPPRESS)
    return p.parse_args(argv)


def rss_mb() -> float:
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith('VmRSS:'):
                return int(line.split()[1]) / 1024.0
    return float('nan')


def worker(args) -> None:
    """One measurement: train steps on an in-memory batch; prints a JSON line."""
    import torch

    from mm_fusion_ros.model.config import ModelConfig
    from mm_fusion_ros.training.config import TrainConfig
    from mm_fusion_ros.training.core import TrainerCore

    torch.set_num_threads(args.threads)
    payload = torch.load(args.worker, weights_only=True)
    rows = torch.arange(args.batch) % payload['samples']['target'].shape[0]
    batch = {k: v[rows] for k, v in payload['samples'].items() if torch.is_tensor(v)}
    core = TrainerCore(ModelConfig(visual_encoder=args.visual, point_encoder=args.point),
                       TrainConfig(batch_size=args.batch), 'cpu', payload['normalization'])
    before = rss_mb()
    for _ in range(2):
        core.step(batch)
    steps, start = 0, time.perf_counter()
    while steps < 3 or time.perf_counter() - start < args.min_time:
        core.step(batch)
        steps += 1
    elapsed = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    core.infer(batch)
    infers, start = 0, time.perf_counter()
    while infers < 3 or time.perf_counter() - start < args.min_time / 2:
        core.infer(batch)
        infers += 1
    infer_s = (time.perf_counter() - start) / infers
    print(json.dumps({'samples_per_s': steps * args.batch / elapsed,
                      'step_ms': 1000.0 * elapsed / steps, 'rss_before_mb': before,
                      'peak_mb': peak, 'points': int(batch['points'].shape[2]),
                      'infer_ms_per_sample': 1000.0 * infer_s / args.batch}))


def make_data(root: Path, frames: int) -> None:
    from mm_fusion_ros.synthetic.writer import generate_sequence
    start = time.perf_counter()
    summary = generate_sequence(root, '00', frames, seed=0)
    print(f'synthetic full-resolution sequence: {frames} frames, {summary.points[1]:.0f} '
          f'points/scan, {time.perf_counter() - start:.1f} s')


def cache_samples(root: Path, name: str, max_points: int, tmp: Path):
    """Load every sample once (timed) and store them for the worker processes."""
    import torch

    from mm_fusion_ros.config import SampleConfig
    from mm_fusion_ros.kitti.dataset import collate_samples, KITTIOdomPointDataset
    from mm_fusion_ros.model.normalization import sequence_statistics

    cfg = SampleConfig(max_points=max_points)
    ds = KITTIOdomPointDataset(root, '00', sample_cfg=cfg)
    start = time.perf_counter()
    samples = [ds[i] for i in range(len(ds))]
    load_ms = 1000.0 * (time.perf_counter() - start) / len(ds)
    if max_points == 0:   # 'all': pad every scan to the largest so batches stack
        n = max(s['points'].shape[1] for s in samples)
        ds = KITTIOdomPointDataset(root, '00', sample_cfg=SampleConfig(max_points=n))
        samples = [ds[i] for i in range(len(ds))]
    path = tmp / f'samples_{name}.pt'
    batch = collate_samples(samples)
    torch.save({'samples': {k: v for k, v in batch.items() if torch.is_tensor(v)},
                'normalization': sequence_statistics(ds.sequences)}, path)
    return path, load_ms


def measure(cache: Path, batch: int, visual: str, point: str, args) -> dict:
    cmd = [sys.executable, __file__, '--worker', str(cache), '--batch', str(batch),
           '--visual', visual, '--point', point, '--threads', str(args.threads),
           '--min_time', str(args.min_time)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f'measurement {visual}/{point}/batch {batch} failed:\n{out.stderr}')
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        worker(args)
        return 0
    print(f'cores {os.cpu_count()}, threads {args.threads}, load average '
          f'{os.getloadavg()[0]:.2f} at start')
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        make_data(tmp / 'kitti', args.frames)
        settings = {'16k': 16384} if args.quick else POINT_SETTINGS
        rows, dummy16 = [], {}
        for name, max_points in settings.items():
            cache, load_ms = cache_samples(tmp / 'kitti', name, max_points, tmp)
            print(f'data loading, max_points {name}: {load_ms:.1f} ms/sample '
                  f'({1000.0 / load_ms:.0f} samples/s in one process)')
            for visual in args.visuals.split(','):
                for batch in (int(b) for b in args.batches.split(',')):
                    r = measure(cache, batch, visual, 'bev', args)
                    rows.append((name, visual, 'bev', batch, r))
                    if name == '16k' and visual == 'dummy':
                        dummy16[batch] = r['samples_per_s']
            if name == '16k' and not args.quick:
                for batch in (2, 8):
                    rows.append((name, 'dummy', 'pointnet', batch,
                                 measure(cache, batch, 'dummy', 'pointnet', args)))
        print(f'\n{"points":>6} {"N":>7} {"visual":>6} {"point":>8} {"batch":>5} '
              f'{"samples/s":>9} {"ms/step":>8} {"train ms/sample":>15} '
              f'{"infer ms/sample":>15} {"RSS MB":>7} {"peak MB":>7}')
        for name, visual, point, batch, r in rows:
            print(f'{name:>6} {r["points"]:>7} {visual:>6} {point:>8} {batch:>5} '
                  f'{r["samples_per_s"]:>9.1f} {r["step_ms"]:>8.1f} '
                  f'{1000.0 / r["samples_per_s"]:>15.1f} {r["infer_ms_per_sample"]:>15.1f} '
                  f'{r["rss_before_mb"]:>7.0f} {r["peak_mb"]:>7.0f}')
        if not dummy16:
            return 0
        best = max(dummy16.values())
        verdict = 'meets' if best >= TARGET_SAMPLES_PER_S else 'MISSES'
        print(f'\ntarget: dummy visual, 16k points >= {TARGET_SAMPLES_PER_S:.0f} samples/s: '
              f'best {best:.1f} (batch {max(dummy16, key=dummy16.get)}) -> {verdict}')
        print(f'load average at end {os.getloadavg()[0]:.2f}')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
