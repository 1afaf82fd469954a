"""Self-supervised vs supervised training offline, with each self-supervised term alone.

    python bench/selfsup.py --work_dir /tmp/selfsup [--frames 100] [--image_width 620]
        [--image_height 188] [--azimuth_steps 1000] [--train_sequences 00,01,02]
        [--test_sequences 03,04] [--epochs 5] [--methods gt,self,both,geometric,...]
        [--jobs 1] [--cost_only]

Synthetic sequences (built once into WORK_DIR/data with synth_kitti's writer, or --data_path)
train one model per method with train_multimodal.py: `gt` (ground-truth poses), `self` (the
three self-supervised terms, no ground truth read), `both`, and `geometric`, `photometric`,
`inertial` (supervision self with that term alone). Every run has the same seed, model and
schedule. predict_odometry then writes each model's trajectories of the held-out test
sequences, and evaluate_odometry's metrics score them against the poses, beside the baselines
mean_motion (the training sequences' mean step) and kiss_icp (KISS-ICP on the full scans).

The table: KITTI t_rel [%] / r_rel [deg/100 m] (devkit, 100..800 m segments: a sequence
shorter than 100 m has none), ATE [m] after SE(3) alignment, RPE over one frame (the per-step
error) and training time; then the issue's two checks (self within 1.5x of gt, and at most a
fifth of mean motion, in t_rel) and the cost per sample of each loss term (forward + backward
on one thread, cold = a scan seen the first time, warm = its kd-tree cached).
Sizes are flags, so the same script runs the full-size measurement (e.g. --frames 1000 and the
default KITTI image size) where there is time for it.
"""
import argparse
from concurrent.futures import ThreadPoolExecutor
import json
import os
from pathlib import Path
import subprocess
import sys
import time

REPO = Path(__file__).resolve().parents[1]
METHODS = {
    'gt': ['--supervision', 'gt'],
    'self': ['--supervision', 'self'],
    'both': ['--supervision', 'both'],
    'geometric': ['--supervision', 'self', '--self_photometric_weight', '0',
                  '--self_inertial_weight', '0'],
    'photometric': ['--supervision', 'self', '--self_geometric_weight', '0',
                    '--self_inertial_weight', '0'],
    'inertial': ['--supervision', 'self', '--self_geometric_weight', '0',
                 '--self_photometric_weight', '0'],
}
COLUMNS = (('t_rel', 't_rel[%]'), ('r_rel', 'r_rel[deg/100m]'), ('ate', 'ATE[m]'),
           ('rpe_trans', 'RPE_t[m]'), ('rpe_rot', 'RPE_r[deg]'))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--work_dir', type=Path, required=True,
                   help='data/ (reused when present), runs/ and results_seedN.json go here')
    p.add_argument('--data_path', type=Path, default=None,
                   help='an existing KITTI-layout tree instead of generating WORK_DIR/data')
    p.add_argument('--frames', type=int, default=100, help='frames per generated sequence')
    p.add_argument('--image_width', type=int, default=620, help='generated image width [px]')
    p.add_argument('--image_height', type=int, default=188, help='generated image height [px]')
    p.add_argument('--azimuth_steps', type=int, default=1000, help='LiDAR azimuth steps')
    p.add_argument('--beams', type=int, default=64, help='LiDAR beams')
    p.add_argument('--train_sequences', default='00,01,02', help='training sequence ids')
    p.add_argument('--test_sequences', default='03,04', help='held-out sequence ids')
    p.add_argument('--methods', default=','.join(METHODS),
                   help=f'comma-separated subset of {",".join(METHODS)}')
    p.add_argument('--epochs', type=int, default=5, help='training epochs per method')
    p.add_argument('--batch_size', type=int, default=4, help='samples per step')
    p.add_argument('--learning_rate', type=float, default=1e-3, help='AdamW learning rate')
    p.add_argument('--max_points', type=int, default=16384, help='points per scan')
    p.add_argument('--seed', type=int, default=0, help='seed of training (init, order, dropout)')
    p.add_argument('--data_seed', type=int, default=0, help='seed of the generated sequences')
    p.add_argument('--threads', type=int, default=1, help='torch threads per training run')
    p.add_argument('--jobs', type=int, default=1, help='training runs at once')
    p.add_argument('--extra', default='', help='more train_multimodal flags for every run')
    p.add_argument('--no_kiss_icp', action='store_true', help='skip the KISS-ICP baseline')
    p.add_argument('--cost_only', action='store_true',
                   help='only measure the cost per sample of each loss term')
    return p.parse_args(argv)


def run(cmd, log_path: Path, threads: int):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads),
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO),
                                                        os.environ.get('PYTHONPATH')])))
    start = time.perf_counter()
    with open(log_path, 'w') as log:
        out = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f'{" ".join(map(str, cmd))} failed (rc {out.returncode}); see '
                           f'{log_path}')
    return time.perf_counter() - start


def make_data(args) -> Path:
    if args.data_path is not None:
        return args.data_path
    from mm_fusion_ros.kitti.ids import parse_sequences
    from mm_fusion_ros.synthetic.writer import generate_sequence
    root = args.work_dir / 'data'
    for seq in parse_sequences(args.train_sequences) + parse_sequences(args.test_sequences):
        if (root / 'sequences' / seq / 'times.txt').is_file():
            continue
        start = time.perf_counter()
        s = generate_sequence(root, seq, args.frames, seed=args.data_seed,
                              image_size=(args.image_width, args.image_height),
                              azimuth_steps=args.azimuth_steps, beams=args.beams)
        print(f'generated sequence {seq}: {s.frames} frames, {s.points[1]:.0f} points/scan, '
              f'{time.perf_counter() - start:.0f} s', flush=True)
    return root


def train_and_predict(method, data: Path, args) -> dict:
    out = args.work_dir / 'runs' / f'{method}_seed{args.seed}'
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / 'model.pth'
    train = [sys.executable, str(REPO / 'train_multimodal.py'), '--data_path', str(data),
             '--train_sequences', args.train_sequences, '--val_sequences', args.test_sequences,
             '--num_epochs', str(args.epochs), '--batch_size', str(args.batch_size),
             '--learning_rate', str(args.learning_rate), '--max_points', str(args.max_points),
             '--seed', str(args.seed), '--threads', str(args.threads), '--output_checkpoint',
             str(ckpt), '--log_csv', str(out / 'train.csv')] + METHODS[method] + \
        args.extra.split()
    train_s = run(train, out / 'train.log', args.threads)
    predict = [sys.executable, '-m', 'mm_fusion_ros.cli.predict_odometry', '--checkpoint',
               str(ckpt), '--data_path', str(data), '--sequences', args.test_sequences,
               '--out_dir', str(out / 'pred')]
    run(predict, out / 'predict.log', args.threads)
    print(f'{method}: trained in {train_s:.0f} s', flush=True)
    return {'train_s': train_s, 'pred_dir': out / 'pred'}


def evaluate(data: Path, args, pred_dir=None, baselines=()) -> dict:
    """{name: average metrics over the test sequences} via evaluate_odometry."""
    from mm_fusion_ros.cli import evaluate_odometry as ev
    argv = ['--data_path', str(data), '--sequences', args.test_sequences]
    if pred_dir is not None:
        argv += ['--pred_dir', str(pred_dir)]
    for name in baselines:
        argv += ['--baseline', name]
    if 'mean_motion' in baselines:
        argv += ['--train_sequences', args.train_sequences]
    parsed = ev.build_parser().parse_args(argv)
    results, _ = ev.evaluate_all(parsed)
    return {name: ev.average(per_seq) for name, per_seq in results.items()}


def loss_costs(data: Path, args) -> dict:
    """ms per sample (forward + backward) of each term, cold and warm scan cache."""
    import torch

    from mm_fusion_ros.config import SampleConfig
    from mm_fusion_ros.kitti.dataset import collate_samples, KITTIOdomPointDataset
    from mm_fusion_ros.model.selfsup import SelfSupervisedLoss, TERMS

    torch.set_num_threads(1)
    seq = args.train_sequences.split(',')[0]
    ds = KITTIOdomPointDataset(data, seq, sample_cfg=SampleConfig(max_points=args.max_points))
    picks = list(range(0, len(ds), max(1, len(ds) // 8)))[:8]
    batch = collate_samples([ds[i] for i in picks])
    pose = (batch['target'].float() + 0.02).requires_grad_(True)
    out = {}
    for term in TERMS:
        loss = SelfSupervisedLoss()
        times = []
        for _ in range(3):     # first pass: every scan new; then cached
            start = time.perf_counter()
            value, _ = loss(pose, batch, terms=(term,))[term]
            value.sum().backward()
            times.append(1000.0 * (time.perf_counter() - start) / len(picks))
        out[term] = {'cold_ms': times[0], 'warm_ms': min(times[1:])}
    shape = tuple(batch['image'].shape[-2:])
    return {'terms': out, 'points': int(batch['points'].shape[2]), 'image': shape,
            'samples': len(picks)}


def fmt(v):
    return 'n/a' if v is None or v != v else f'{v:.4f}'


def main(argv=None) -> int:
    args = parse_args(argv)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    print(f'cores {os.cpu_count()}, load average {os.getloadavg()[0]:.2f} at start', flush=True)
    data = make_data(args)
    costs = loss_costs(data, args)
    print(f'\ncost per sample of each loss term ({costs["points"]} points, image '
          f'{costs["image"][1]}x{costs["image"][0]}, {costs["samples"]} samples, one thread, '
          'forward + backward):')
    for term, c in costs['terms'].items():
        print(f'  {term:<12} cold {c["cold_ms"]:7.1f} ms   warm {c["warm_ms"]:7.1f} ms')
    if args.cost_only:
        return 0
    methods = [m.strip() for m in args.methods.split(',') if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f'unknown methods {unknown}; choose from {", ".join(METHODS)}')
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        runs = dict(zip(methods, pool.map(lambda m: train_and_predict(m, data, args), methods)))
    rows = {m: {**evaluate(data, args, pred_dir=r['pred_dir'])['prediction'],
                'train_s': r['train_s']} for m, r in runs.items()}
    baselines = ('mean_motion',) + (() if args.no_kiss_icp else ('kiss_icp',))
    rows.update(evaluate(data, args, baselines=baselines))
    header = f'{"method":<12}' + ''.join(f' {t:>16}' for _, t in COLUMNS) + f' {"train_s":>8}'
    print(f'\nheld-out sequences {args.test_sequences}; trained on {args.train_sequences} '
          f'({args.epochs} epochs, batch {args.batch_size}, lr {args.learning_rate}, '
          f'{args.max_points} points); RPE over 1 frame; averages over the test sequences')
    print(header + '\n' + '-' * len(header))
    for name, m in rows.items():
        train_s = f'{m["train_s"]:8.0f}' if 'train_s' in m else f'{"":>8}'
        print(f'{name:<12}' + ''.join(f' {fmt(m.get(k)):>16}' for k, _ in COLUMNS) +
              f' {train_s}')
    checks = {}
    if 'self' in rows and 'gt' in rows:
        checks['self_over_gt_t_rel'] = rows['self']['t_rel'] / rows['gt']['t_rel']
        print(f'\nself / gt t_rel: {checks["self_over_gt_t_rel"]:.2f} (target <= 1.5)')
    if 'self' in rows:
        checks['self_over_mean_motion_t_rel'] = \
            rows['self']['t_rel'] / rows['mean_motion']['t_rel']
        print(f'self / mean motion t_rel: {checks["self_over_mean_motion_t_rel"]:.2f} '
              '(target <= 0.2)')
    print(f'load average {os.getloadavg()[0]:.2f} at end')
    report = {'args': {k: str(v) for k, v in vars(args).items()}, 'rows': rows,
              'checks': checks, 'costs': costs}
    path = args.work_dir / f'results_seed{args.seed}.json'
    path.write_text(json.dumps(report, indent=2, default=str) + '\n')
    print(f'wrote {path}')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
