"""Sensor ablation of the trained model on a held-out synthetic sequence (issue 17's table).

For each visual encoder and seed: train on synthetic 00-02 (validation 03) with the demo's
command, predict held-out 04 with every subset of inputs (`predict_odometry --modalities`) and
score it (`evaluate_odometry`: devkit t_rel, RPE per step); mean motion (the training-set
average step) is the baseline. Every step is the console command a user would type, run as a
subprocess with one torch thread.

    python bench/ablation.py --encoders cnn,flow --seeds 0              # demo size (620x188)
    python bench/ablation.py --encoders cnn,flow --seeds 0,1,2 \\
        --width 1241 --height 376 --azimuth_steps 2000                   # full size

The data is generated once per size under --workdir and reused. Extra training flags go after
`--`, e.g. `-- --drop_lidar 0.5`. Targets (issue 17): camera + IMU at most twice the t_rel of
all three; camera alone at most a third of mean motion; all three no worse than --ref_all.
"""
import argparse
import json
import os
from pathlib import Path
import subprocess
import sys
import time

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TRAIN, VAL, TEST = '00,01,02', '03', '04'
ROWS = (('camera + LiDAR + IMU', 'camera,lidar,imu'), ('LiDAR + IMU', 'lidar,imu'),
        ('LiDAR', 'lidar'), ('camera + IMU', 'camera,imu'), ('IMU', 'imu'),
        ('camera', 'camera'))
MEAN_MOTION = 'mean motion (baseline)'


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--workdir', type=Path, default=Path('runs/ablation'),
                   help='data, checkpoints, predictions and the JSON report go here')
    p.add_argument('--encoders', default='cnn,flow', help='visual encoders compared')
    p.add_argument('--seeds', default='0', help='comma-separated training seeds')
    p.add_argument('--width', type=int, default=620, help='synthetic image width [px]')
    p.add_argument('--height', type=int, default=188, help='synthetic image height [px]')
    p.add_argument('--frames', type=int, default=100, help='frames of 00-03')
    p.add_argument('--test_frames', type=int, default=200, help='frames of held-out 04')
    p.add_argument('--azimuth_steps', type=int, default=1000, help='LiDAR rays per revolution')
    p.add_argument('--epochs', type=int, default=4, help='training epochs')
    p.add_argument('--max_points', type=int, default=8192, help='points per scan')
    p.add_argument('--rows', default='all',
                   help="comma-separated modality sets to score (default: the table's six)")
    p.add_argument('--reuse', action='store_true',
                   help='keep the trained model (and training time) and the scores a run '
                        'folder already has')
    p.add_argument('--tag', default='',
                   help='suffix of the run folders and report (to compare training flags)')
    p.add_argument('--ref_all', type=float, default=2.86,
                   help="t_rel [%%] of all three inputs to beat (today's cnn, issue 17)")
    p.add_argument('train_args', nargs='*', help='extra train_multimodal flags (after --)')
    return p.parse_args(argv)


def run(cmd, log_path: Path) -> float:
    """Run a command with one torch thread, its output to log_path; returns wall seconds."""
    env = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1')
    start = time.perf_counter()
    with open(log_path, 'w') as log:
        code = subprocess.call([str(c) for c in cmd], stdout=log, stderr=subprocess.STDOUT,
                               env=env, cwd=REPO)
    if code != 0:
        raise SystemExit(f'ablation: {" ".join(map(str, cmd))} failed ({code}); see {log_path}')
    return time.perf_counter() - start


def make_data(args) -> Path:
    data = args.workdir / f'data_{args.width}x{args.height}_{args.frames}_{args.test_frames}'
    for seqs, frames in ((f'{TRAIN},{VAL}', args.frames), (TEST, args.test_frames)):
        missing = [s for s in seqs.split(',') if not (data / 'poses' / f'{s}.txt').is_file()]
        if missing:
            data.mkdir(parents=True, exist_ok=True)
            wall = run([sys.executable, '-m', 'mm_fusion_ros.cli.synth_kitti', '--out', data,
                        '--sequences', ','.join(missing), '--frames', frames, '--image_width',
                        args.width, '--image_height', args.height, '--azimuth_steps',
                        args.azimuth_steps], data / f'synth_{missing[0]}.log')
            print(f'generated {",".join(missing)} ({frames} frames) in {wall:.0f} s', flush=True)
    return data


def evaluate(data: Path, out_json: Path, log: Path, pred_dir=None, baseline=False) -> dict:
    cmd = [sys.executable, '-m', 'mm_fusion_ros.cli.evaluate_odometry', '--data_path', data,
           '--sequences', TEST, '--json', out_json]
    if pred_dir is not None:
        cmd += ['--pred_dir', pred_dir]
    if baseline:
        cmd += ['--baseline', 'mean_motion', '--train_sequences', TRAIN]
    run(cmd, log)
    report = json.loads(out_json.read_text())
    return report['baselines']['mean_motion'] if baseline else report


def train_and_score(args, data: Path, encoder: str, seed: int, rows) -> dict:
    """{'train_s', 'rows': {label: {t_rel, rpe_trans, samples_per_s}}} of one model."""
    out = args.workdir / f'{data.name}_{encoder}{args.tag}_s{seed}'
    out.mkdir(parents=True, exist_ok=True)
    ckpt, timing = out / 'model.pth', out / 'train_s.txt'
    if args.reuse and ckpt.is_file() and timing.is_file():
        return score(args, data, encoder, seed, rows, out, float(timing.read_text()))
    train_s = run([sys.executable, REPO / 'train_multimodal.py', '--data_path', data,
                   '--pointcloud_path', data / 'pointclouds', '--visual_encoder', encoder,
                   '--max_points', args.max_points, '--train_sequences', TRAIN,
                   '--val_sequences', VAL, '--num_epochs', args.epochs, '--batch_size', 4,
                   '--learning_rate', '1e-3', '--seed', seed, '--threads', 1,
                   '--output_checkpoint', ckpt, '--log_csv', out / 'train.csv',
                   *args.train_args], out / 'train.log')
    timing.write_text(f'{train_s:.1f}\n')
    return score(args, data, encoder, seed, rows, out, train_s)


def score(args, data: Path, encoder: str, seed: int, rows, out: Path, train_s: float) -> dict:
    ckpt = out / 'model.pth'
    result = {'train_s': train_s, 'rows': {}}
    for label, modalities in rows:
        pred = out / f'pred_{modalities.replace(",", "_")}'
        if args.reuse and (pred / 'eval.json').is_file():
            m = json.loads((pred / 'eval.json').read_text())
            result['rows'][label] = {'t_rel': m['t_rel'], 'rpe_trans': m['rpe_trans']}
            continue
        predict_s = run([sys.executable, '-m', 'mm_fusion_ros.cli.predict_odometry',
                         '--checkpoint', ckpt, '--data_path', data, '--pointcloud_path',
                         data / 'pointclouds', '--sequences', TEST, '--out_dir', pred,
                         '--modalities', modalities, '--device', 'cpu'],
                        pred.with_suffix('.log'))
        m = evaluate(data, pred / 'eval.json', pred / 'eval.log', pred_dir=pred)
        result['rows'][label] = {'t_rel': m['t_rel'], 'rpe_trans': m['rpe_trans'],
                                 'predict_s': predict_s}
    print(f'{encoder} seed {seed}: trained in {train_s:.0f} s; ' + '; '.join(
        f'{k} {v["t_rel"]:.2f} %' for k, v in result['rows'].items()), flush=True)
    return result


def fmt(values) -> str:
    """'t_rel (RPE)' of one seed, or 'mean ± std' of t_rel over seeds."""
    if len(values) == 1:
        return f'{values[0][0]:6.2f} ({values[0][1]:.3f})'
    t = np.array([v[0] for v in values])
    return f'{t.mean():6.2f} ± {t.std():.2f}'


def print_table(results: dict, mean_motion: dict, encoders, seeds, rows, ref_all) -> None:
    cols = [(e, s) for e in encoders for s in seeds]
    head = '| inputs | ' + ' | '.join(f'{e} s{s}' for e, s in cols)
    if len(seeds) > 1:
        head += ' | ' + ' | '.join(f'{e} mean ± std' for e in encoders)
    print('\nt_rel % (RPE m/step) on held-out 04\n' + head + ' |')
    print('|' + '---|' * (head.count('|')))
    for label, _ in rows:
        cells = [fmt([(results[c]['rows'][label]['t_rel'],
                       results[c]['rows'][label]['rpe_trans'])]) for c in cols]
        if len(seeds) > 1:
            cells += [fmt([(results[(e, s)]['rows'][label]['t_rel'], 0.0) for s in seeds])
                      for e in encoders]
        print(f'| {label} | ' + ' | '.join(cells) + ' |')
    mm = fmt([(mean_motion['t_rel'], mean_motion['rpe_trans'])])
    print(f'| {MEAN_MOTION} | ' + ' | '.join([mm] * (len(cols) + (len(encoders)
                                                                   if len(seeds) > 1 else 0)))
          + ' |')
    labels = dict(rows)
    if not {'camera + LiDAR + IMU', 'camera + IMU', 'camera'} <= set(labels):
        return
    print('\ntargets: camera+IMU <= 2 x all three; camera <= mean motion / 3; all three <= '
          f'{ref_all} %')
    for e in encoders:
        for s in seeds:
            r = {k: v['t_rel'] for k, v in results[(e, s)]['rows'].items()}
            checks = (r['camera + IMU'] <= 2 * r['camera + LiDAR + IMU'],
                      r['camera'] <= mean_motion['t_rel'] / 3,
                      r['camera + LiDAR + IMU'] <= ref_all)
            print(f'  {e} seed {s}: ' + ', '.join(
                f'{name} {"met" if ok else "MISSED"}'
                for name, ok in zip(('camera+IMU', 'camera', 'all three'), checks)))


def main(argv=None) -> int:
    args = parse_args(argv)
    args.workdir = args.workdir.resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    encoders = [e for e in args.encoders.split(',') if e]
    seeds = [int(s) for s in args.seeds.split(',') if s]
    rows = ROWS if args.rows == 'all' else [
        (next((lbl for lbl, m in ROWS if m == r), r), r) for r in args.rows.split(';')]
    print(f'load average {os.getloadavg()[0]:.2f} at start; extra training flags: '
          f'{" ".join(args.train_args) or "none"}', flush=True)
    data = make_data(args)
    mean_motion = evaluate(data, args.workdir / f'{data.name}_mean_motion.json',
                           args.workdir / f'{data.name}_mean_motion.log', baseline=True)
    results = {(e, s): train_and_score(args, data, e, s, rows) for e in encoders for s in seeds}
    print_table(results, mean_motion, encoders, seeds, rows, args.ref_all)
    for e in encoders:
        times = [results[(e, s)]['train_s'] for s in seeds]
        print(f'{e}: training wall {np.mean(times):.0f} s per run (1 thread)')
    report = {'args': {k: str(v) for k, v in vars(args).items()},
              'mean_motion': mean_motion,
              'results': {f'{e}_s{s}': r for (e, s), r in results.items()}}
    path = args.workdir / f'{data.name}{args.tag}_report.json'
    path.write_text(json.dumps(report, indent=2) + '\n')
    print(f'load average {os.getloadavg()[0]:.2f} at end; report {path}')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
