"""The main job on the embedded default (`./dev.sh demo`): the whole pipeline, end to end.

1. synth_kitti: synthetic sequences in the KITTI layout (training 00-02, validation 03, and 04,
   a street unlike the others, for online fine-tuning);
2. check_kitti on all of them;
3. train_multimodal: the initial model, then the training plan's fine-tuning command;
4. kitti_to_bag --no_ground_truth: sequence 04 -> a ROS 2 bag (mcap) without ground truth, as
   a robot records it; poses/04.txt is held back for scoring;
5. mm_fusion_run finetune: bag replay -> online_finetune (synchronizer, replay buffer, trainer)
   from the fine-tuned checkpoint, adapting self-supervised (train.supervision self) -> poses
   on /mm_fusion/odom -> a checkpoint saved by the ~/save_checkpoint service call; then the same
   replay with training off, the comparison;
6. evaluate_odometry: the adapted online trajectory vs the held-back poses and the baselines;
7. adaptation on / off: both runs scored against the held-back poses (per-step error over the
   second half of the replay, t_rel, r_rel), printed and written to results/adaptation.json.
Every step is a real subprocess running the same command a user would type; the demo stops at
the first failure. Outputs go under --workdir (default: the current folder: data/, bags/,
pretrain_models/, logs/, runs/, results/).
"""
import argparse
import json
import math
import os
from pathlib import Path
import random
import shutil
import subprocess
import sys
import time

from mm_fusion_ros.eval.metrics import kitti_metrics, late_step_errors
from mm_fusion_ros.eval.trajectory_io import read_kitti_poses
from mm_fusion_ros.fileio import atomic_write_text
from mm_fusion_ros.geometry import base_link_to_cam0
from mm_fusion_ros.kitti.odometry import KittiSequence
from mm_fusion_ros.training.checkpoint import load_checkpoint

TRAIN, VAL, ONLINE = '00,01,02', '03', '04'
# The rows of the adaptation on / off table: (label, key of adaptation()'s per-run dict).
ROWS = (('per-step translation error [m]', 'trans'), ('per-step rotation error [deg]', 'rot_deg'),
        ('t_rel [%]', 't_rel'), ('r_rel [deg/100 m]', 'r_rel'))


def build_parser():
    p = argparse.ArgumentParser(prog='demo', description=__doc__.splitlines()[0])
    p.add_argument('--workdir', type=Path, default=Path('.'), help='where outputs go')
    p.add_argument('--frames', type=int, default=100,
                   help='frames per training/validation sequence')
    p.add_argument('--online_frames', type=int, default=200,
                   help='frames of the sequence replayed for online fine-tuning')
    p.add_argument('--image_width', type=int, default=620, help='synthetic image width [px]')
    p.add_argument('--image_height', type=int, default=188, help='synthetic image height [px]')
    p.add_argument('--azimuth_steps', type=int, default=1000, help='LiDAR rays per revolution')
    p.add_argument('--epochs', type=int, default=4, help='epochs of the initial training')
    p.add_argument('--rate', type=float, default=1.0, help='bag replay rate for online tuning')
    p.add_argument('--fresh', action='store_true', help='delete previous demo outputs first')
    return p


def run(step, cmd, cwd, env):
    print(f'\n=== {step}\n$ {" ".join(str(c) for c in cmd)}', flush=True)
    t0 = time.monotonic()
    code = subprocess.call([str(c) for c in cmd], cwd=cwd, env=env)
    if code != 0:
        raise SystemExit(f'demo: step "{step}" failed with exit code {code}')
    print(f'--- {step}: done in {time.monotonic() - t0:.1f} s', flush=True)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    if args.fresh:
        for name in ('data', 'bags/demo_04', 'pretrain_models', 'logs', 'runs/demo',
                     'runs/demo_off', 'results'):
            shutil.rmtree(work / name, ignore_errors=True)
    env = dict(os.environ)
    env.setdefault('ROS_DOMAIN_ID', str(random.SystemRandom().randint(1, 101)))
    env.update(ROS_AUTOMATIC_DISCOVERY_RANGE='LOCALHOST', ROS_LOCALHOST_ONLY='1')
    py = sys.executable
    data = work / 'data'
    t_start = time.monotonic()

    all_seqs = f'{TRAIN},{VAL},{ONLINE}'
    # The online sequence is longer, so it has KITTI's 100 m segments for t_rel / r_rel.
    for seqs, frames in ((f'{TRAIN},{VAL}', args.frames), (ONLINE, args.online_frames)):
        missing = [s for s in seqs.split(',') if not (data / 'sequences' / s).is_dir()]
        if missing:
            run(f'1. synthetic KITTI sequences {",".join(missing)}', [
                py, '-m', 'mm_fusion_ros.cli.synth_kitti', '--out', data, '--sequences',
                ','.join(missing), '--frames', frames, '--image_width', args.image_width,
                '--image_height', args.image_height, '--azimuth_steps', args.azimuth_steps],
                work, env)
    run('2. integrity check', [py, '-m', 'mm_fusion_ros.cli.check_kitti', '--data_path', data,
                               '--sequences', all_seqs], work, env)
    common = ['--data_path', 'data', '--pointcloud_path', 'data/pointclouds',
              '--visual_encoder', 'flow', '--max_points', '8192']
    run('3a. initial model (offline)', [
        py, _repo() / 'train_multimodal.py', *common, '--train_sequences', TRAIN,
        '--val_sequences', VAL,
        '--num_epochs', args.epochs, '--batch_size', 4, '--learning_rate', '1e-3',
        '--output_checkpoint', 'pretrain_models/multimodal_initial.pth',
        '--log_csv', 'logs/initial.csv', '--tensorboard_dir', 'logs/tb_initial'], work, env)
    run('3b. fine-tuning (the command of the training plan)', [
        py, _repo() / 'train_multimodal.py', '--data_path', 'data',
        '--pointcloud_path', 'data/pointclouds',
        '--train_sequences', TRAIN, '--finetune_checkpoint',
        'pretrain_models/multimodal_initial.pth', '--freeze_visual', '--learning_rate', '5e-5',
        '--num_epochs', 1, '--output_checkpoint', 'pretrain_models/multimodal_finetuned.pth',
        '--log_csv', 'logs/finetune.csv', '--save_every_epoch', 1, '--max_points', '8192'],
        work, env)
    bag = work / 'bags' / 'demo_04'
    run('4. KITTI -> ROS 2 bag without ground truth (poses held back for scoring)', [
        py, '-m', 'mm_fusion_ros.cli.kitti_to_bag', '--data_path', data, '--sequence', ONLINE,
        '--output', bag, '--no_ground_truth', '--overwrite'], work, env)
    out, off = work / 'runs' / 'demo', work / 'runs' / 'demo_off'
    finetune = [py, '-m', 'mm_fusion_ros.ros.runner', 'finetune', '--bag', bag, '--rate',
                args.rate, '--checkpoint', work / 'pretrain_models' / 'multimodal_finetuned.pth',
                '--set', 'sample.max_points:=8192', '--set', 'train.supervision:=self']
    run('5a. online self-supervised adaptation on the replayed bag',
        [*finetune, '--out_dir', out], work, env)
    run('5b. the same replay with training off, for the comparison',
        [*finetune, '--out_dir', off, '--set', 'training_enabled:=false'], work, env)
    results = work / 'results' / 'online'
    results.mkdir(parents=True, exist_ok=True)
    shutil.copy(out / 'trajectory' / 'pred_base_link.txt', results / f'{ONLINE}.txt')
    # its steps sidecar too: the evaluation then reports how many steps were bridged
    shutil.copy(out / 'trajectory' / 'pred_base_link.steps.csv', results / f'{ONLINE}.steps.csv')
    run('6. evaluation: online poses vs ground truth and baselines', [
        py, '-m', 'mm_fusion_ros.cli.evaluate_odometry', '--data_path', data, '--sequences',
        ONLINE, '--pred_dir', results, '--pred_frame', 'base_link', '--train_sequences', TRAIN,
        '--baseline', 'mean_motion', '--baseline', 'cv_oracle', '--baseline', 'imu',
        '--json', work / 'results' / 'online_eval.json', '--plot',
        work / 'results' / 'online_eval.png'], work, env)
    print_adaptation(adaptation(data, ONLINE, {'on': out, 'off': off}),
                     work / 'results' / 'adaptation.json')
    print(f'\ndemo finished in {time.monotonic() - t_start:.0f} s; outputs: {data}, {bag}, '
          f'{work / "pretrain_models"}, {out}, {off}, {work / "results"}')
    return 0


def adaptation(data, sequence, runs: dict) -> dict:
    """Each online run (name -> mm_fusion_run --out_dir) scored against the sequence's poses,
    which its bag did not carry: per-step errors over the second half, t_rel and r_rel."""
    seq = KittiSequence(data, sequence)
    gt = seq.poses_base
    report = {'sequence': sequence, 'frames': len(gt)}
    for name, out_dir in runs.items():
        path = Path(out_dir) / 'trajectory' / 'pred_base_link.txt'
        pred = read_kitti_poses(path)
        if len(pred) != len(gt):
            raise SystemExit(f'demo: {path} has {len(pred)} poses, sequence {sequence} '
                             f'{len(gt)} frames (see {Path(out_dir) / "online_node.log"})')
        kitti = kitti_metrics(seq.poses_cam0, base_link_to_cam0(pred, seq.Tr))
        report[name] = {**late_step_errors(gt, pred), 't_rel': kitti['t_rel'],
                        'r_rel': kitti['r_rel'], **guard_figures(out_dir)}
    return report


def guard_figures(out_dir) -> dict:
    """The deployment guard's share of steps after which predictions used the adapted weights
    and its scored samples (training/guard.py), from the run's final checkpoint; {} without."""
    final = Path(out_dir) / 'checkpoints' / 'final.pth'
    if not final.is_file():
        return {}
    metrics = load_checkpoint(final).get('metrics', {})
    return {k: metrics[k] for k in ('guard_adapted_share', 'guard_scored_samples')
            if k in metrics}


def print_adaptation(report: dict, json_path: Path) -> None:
    on, off = report['on'], report['off']
    print(f'\n=== 7. adaptation on / off: sequence {report["sequence"]} ({report["frames"]} '
          f'frames), scored against the held-back poses\n'
          f'{"":34}{"training on":>12}{"training off":>14}{"on / off":>10}')
    for label, key in ROWS:
        ratio = on[key] / off[key] if off[key] else math.nan
        print(f'{label:34}{on[key]:>12.4f}{off[key]:>14.4f}{ratio:>10.3f}')
    print(f'(per-step errors: mean over the second half of the replay, {on["steps"]} steps)')
    if 'guard_adapted_share' in on:
        print(f'deployment guard: predictions used the adapted weights after '
              f'{100 * on["guard_adapted_share"]:.0f} % of the gradient steps (the initial ones '
              f'otherwise; {on["guard_scored_samples"]} samples scored against the LiDAR)')
    atomic_write_text(json_path, json.dumps(report, indent=2) + '\n')
    print(f'wrote {json_path}')


def _repo() -> Path:
    """train_multimodal.py sits at the repository root (the plan runs it from there)."""
    return Path(__file__).resolve().parents[2]


if __name__ == '__main__':
    sys.exit(main())
