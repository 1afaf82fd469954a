"""Per-sample CPU of the online prediction path, stage by stage, at full KITTI size.

    python bench/profile_online.py [--frames 30] [--work_dir DIR] [--visual flow dummy]
                                   [--imu_intake auto|single|batch] [--num_threads 1]
                                   [--src DIR] [--compare_with DIR]

A synthetic full-size sequence (1241x376 images, 64-beam ~128k-point scans, 100 Hz IMU; built
once into --work_dir by bench/online.py's prepare_bag) is read as the raw CDR bytes the node's
raw subscriptions receive. They are fed in record order, in this one thread, through the calls
the online node makes: conversions.decode_cdr and the message -> numpy decoders, the frame check,
the Synchronizer, then OnlineTrainer.on_sample for every ready sample (collate, the model, the
replay buffer, the trajectory) and the odometry message the trainer node publishes (filled and
published on a real rclpy publisher). No mocks: each stage is the CPU time of this thread
(time.thread_time; torch runs inline with one thread) around the real call (module functions
wrapped in place, torch forward hooks on the encoders); a stage's time excludes the stages
nested in it, and "Python overhead" is the thread's CPU time over the whole replay minus every
stage. CPU time, so that other jobs on a shared machine do not inflate it; the wall time is
printed too. The rclpy executor's own cost per message (wait set, take, callback) is measured
apart: N IMU messages queued in an in-process subscription, then taken one callback each or
drained in batches (ros/imu_intake.py, when the code has it).

IMU intake: 'single' is one decode + add_imu per message (the node before issue 16); 'batch'
drains what is queued between two other messages and adds it with one add_imu_batch (the node
after); 'auto' takes 'batch' when the code under test has it.

--src DIR profiles the package in DIR (e.g. `git archive main | tar -x -C DIR` for a before
measurement); --compare_with DIR runs the profile of DIR first, then this tree's, on the same
bag, and prints both tables.
"""
import argparse
import importlib
import json
import os
from pathlib import Path
import subprocess
import sys
import tempfile
import time

from bag_args import add_bag_arguments  # beside this file; standard library only

HERE = Path(__file__).resolve().parent


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_bag_arguments(p, frames=30)
    p.add_argument('--visual', nargs='+', default=['flow', 'dummy'],
                   help='visual encoders to profile (model.visual_encoder)')
    p.add_argument('--imu_intake', choices=('auto', 'single', 'batch'), default='auto')
    p.add_argument('--num_threads', type=int, default=1,
                   help='torch threads (config/finetune.yaml: 1)')
    p.add_argument('--rclpy_messages', type=int, default=2000,
                   help='IMU messages for the executor measurement (0: skip it)')
    p.add_argument('--src', type=Path, default=None,
                   help='profile the mm_fusion_ros package in this folder')
    p.add_argument('--compare_with', type=Path, default=None,
                   help='first profile the package in this folder (before), then this one')
    p.add_argument('--json', type=Path, default=None, help='also write the results here')
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix='profile_online_'))
    work.mkdir(parents=True, exist_ok=True)
    if args.compare_with is not None:
        return compare(args, work)
    if args.src is not None:
        sys.path.insert(0, str(args.src.resolve()))
        # Bound now: bench/online.py (imported by profile_stages) puts this tree first.
        importlib.import_module('mm_fusion_ros')
    sys.path.insert(1, str(HERE))
    from profile_stages import run_profile  # after --src is on the path
    results = run_profile(args, work)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


def compare(args, work: Path) -> int:
    """The package in --compare_with, then this tree's, each in a fresh process."""
    outs = []
    for label, src in (('before', args.compare_with), ('after', None)):
        out = work / f'profile_{label}.json'
        cmd = [sys.executable, __file__, '--frames', str(args.frames), '--work_dir', str(work),
               '--image_size', *map(str, args.image_size), '--azimuth_steps',
               str(args.azimuth_steps), '--visual', *args.visual, '--num_threads',
               str(args.num_threads), '--rclpy_messages', str(args.rclpy_messages),
               '--json', str(out)]
        if src is not None:
            cmd += ['--src', str(src)]
        print(f'=== {label}: {src or "this tree"}', flush=True)
        subprocess.run(cmd, check=True, env={**os.environ, 'PYTHONUNBUFFERED': '1'})
        outs.append(json.loads(out.read_text()))
    print('\n=== before -> after, ms per sample (same bag, back to back)')
    for visual in args.visual:
        before, after = (o['runs'].get(visual) for o in outs)
        if before and after:
            print(f'{visual}: total {before["total_ms"]:.1f} -> {after["total_ms"]:.1f} ms/sample'
                  f', IMU intake {before["imu_us_per_msg"]:.0f} -> '
                  f'{after["imu_us_per_msg"]:.0f} us/message')
    return 0


if __name__ == '__main__':
    t0 = time.monotonic()
    code = main()
    print(f'({time.monotonic() - t0:.0f} s)')
    sys.exit(code)
