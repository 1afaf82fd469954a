"""Synthetic-world speed: full-size frames (1241x376 image + 64-beam scan + 100 Hz OXTS).

    python bench/synth.py [--frames 40] [--azimuth_steps 2000 4000] [--scenes street suburban]

Generates the same sequence with 1 worker (the baseline, with per-part times) and with 2
workers, and compares the projected time of a 200-frame sequence with the 2-minute target
(< 0.6 s/frame on 2 cores, PNG encoding included). With several --scenes, each scene style is
measured on the same drive, the default (street) first.
"""
import argparse
import os
from pathlib import Path
import sys
import tempfile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mm_fusion_ros.synthetic.camera import KITTI_SIZE  # noqa: E402
from mm_fusion_ros.synthetic.domain import DomainConfig, SCENES  # noqa: E402
from mm_fusion_ros.synthetic.writer import generate_sequence  # noqa: E402

TARGET_S_PER_FRAME = 0.6
PARTS = ('trajectory', 'world', 'imu+text', 'lidar', 'camera', 'png', 'bin')


def run(frames, azimuth_steps, workers, seed, scene='street'):
    with tempfile.TemporaryDirectory(prefix='bench_synth_') as out:
        return generate_sequence(out, '00', frames, seed, image_size=KITTI_SIZE,
                                 azimuth_steps=azimuth_steps, workers=workers,
                                 domain=DomainConfig(scene=scene))


def report(label, s):
    per = s.wall_s / s.frames
    print(f'{label:<22} {s.wall_s:7.2f} s wall  {per:6.3f} s/frame  {1 / per:5.2f} frames/s  '
          f'points/scan {s.points[1]:.0f} (min {s.points[0]}, max {s.points[2]})')
    return per


def machine_load():
    try:
        return os.getloadavg()[0], os.cpu_count()
    except OSError:
        return float('nan'), os.cpu_count()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--frames', type=int, default=40, help='frames per run [40]')
    p.add_argument('--azimuth_steps', type=int, nargs='+', default=[2000, 4000],
                   help='LiDAR azimuth steps to measure [2000 4000]')
    p.add_argument('--seed', type=int, default=0, help='world seed [0]')
    p.add_argument('--scenes', nargs='+', default=['street'], choices=SCENES,
                   help='scene styles to measure, each on the same drive [street]')
    args = p.parse_args(argv)
    load, cores = machine_load()
    print(f'{args.frames} full-size frames ({KITTI_SIZE[0]}x{KITTI_SIZE[1]} image, 64 beams); '
          f'{cores} cores, 1-min load average {load:.1f} (other jobs inflate wall times)')
    for steps, scene in [(st, sc) for st in args.azimuth_steps for sc in args.scenes]:
        print(f'\n-- azimuth steps {steps}, scene {scene} --')
        base = run(args.frames, steps, 1, args.seed, scene)
        per1 = report('1 worker (baseline)', base)
        frame_parts = ('lidar', 'camera', 'png', 'bin')
        print('  CPU per part, 1 worker: ' + ', '.join(
            f'{k} {base.cpu_s[k] / (args.frames if k in frame_parts else 1):.3f}'
            + (' s/frame' if k in frame_parts else ' s') for k in PARTS))
        two = run(args.frames, steps, 2, args.seed, scene)
        per2 = report('2 workers', two)
        projected = 200 * per2
        verdict = 'meets' if per2 < TARGET_S_PER_FRAME else 'MISSES'
        print(f'  speed-up {per1 / per2:.2f}x; 200 frames ~{projected:.0f} s on 2 workers '
              f'({verdict} the < {TARGET_S_PER_FRAME} s/frame target)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
