"""synth_kitti: write synthetic sequences in the exact KITTI odometry layout.

    synth_kitti --out data --sequences 00,01 --frames 200 --seed 0
    synth_kitti --out data_hybrid --sequences 07 --trajectory kitti_sample/poses/07.txt \
        --imu_source kitti_sample/imu/07.mat

    synth_kitti --out data_shift --sequences 08 --beams 32 --lidar_height 1.9 \
        --lidar_pitch_deg 3 --camera_exposure_ev -0.7 --camera_noise 3

Each sequence is its own street layout and drive (seed and sequence id both seed it); with
--trajectory the drive follows a real KITTI pose file instead, and with --imu_source as well the
OXTS folder carries that drive's real IMU (a hybrid sequence: real IMU noise, synthetic images
and scans rendered along the real path). The domain flags (--scene, --lidar_*, --camera_*; one
per DomainConfig field) make a world that differs from the default one for online adaptation.
"""
import argparse
import dataclasses
import logging
from pathlib import Path
import sys

from mm_fusion_ros.kitti.ids import parse_sequences
from mm_fusion_ros.synthetic.camera import KITTI_SIZE
from mm_fusion_ros.synthetic.domain import DomainConfig, SCENES
from mm_fusion_ros.synthetic.writer import generate_sequence

_DOMAIN_FIELDS = {f.name: f for f in dataclasses.fields(DomainConfig)}


def _domain_flag(p, name, **kwargs):
    """--NAME for DomainConfig.NAME: its default and help text, written once in the field."""
    f = _DOMAIN_FIELDS[name]
    p.add_argument(f'--{name}', default=f.default, help=f'{f.metadata["help"]} [{f.default}]',
                   **kwargs)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='synth_kitti', description=__doc__.splitlines()[0])
    p.add_argument('--out', type=Path, default=Path('data'),
                   help='dataset root to write (sequences/, poses/, pointclouds/) [data]')
    p.add_argument('--sequences', default='00',
                   help='comma-separated sequence ids, e.g. 00,01 (each a different world) [00]')
    p.add_argument('--frames', type=int, default=200, help='frames per sequence (10 Hz) [200]')
    p.add_argument('--seed', type=int, default=0, help='random seed; same seed, same bytes [0]')
    p.add_argument('--trajectory', type=Path, default=None,
                   help='follow this KITTI poses file (cam0 poses) instead of a synthetic drive; '
                        'times from ../sequences/NN/times.txt beside it when present')
    p.add_argument('--imu_source', type=Path, default=None,
                   help='real IMU of that same drive, frame-aligned (.mat, key imu_data_interp, '
                        '10 samples per frame interval: 10*(N-1)+1 for its N frames; e.g. '
                        "kitti_sample/imu/07.mat). Its accel/gyro go to sequences/NN/oxts/ on the "
                        "frames' clock instead of the synthetic IMU (the first 10*(F-1)+1 samples "
                        'for --frames F). Needs --trajectory; an IMU whose yaw rate does not '
                        'follow the trajectory is refused')
    p.add_argument('--image_width', type=int, default=KITTI_SIZE[0],
                   help=f'image width [px]; intrinsics scale with it [{KITTI_SIZE[0]}]')
    p.add_argument('--image_height', type=int, default=KITTI_SIZE[1],
                   help=f'image height [px]; intrinsics scale with it [{KITTI_SIZE[1]}]')
    p.add_argument('--azimuth_steps', type=int, default=2000,
                   help='LiDAR rays per beam and revolution (2000 = 0.18 deg, KITTI-like '
                        'point counts) [2000]')
    p.add_argument('--beams', type=int, default=64,
                   help='LiDAR beams, evenly spaced over the vertical field of view unless 64 '
                        "over the HDL-64E's own (its two blocks) [64]")
    _domain_flag(p, 'scene', choices=SCENES)
    _domain_flag(p, 'lidar_height', type=float)
    _domain_flag(p, 'lidar_pitch_deg', type=float)
    _domain_flag(p, 'lidar_top_deg', type=float)
    _domain_flag(p, 'lidar_bottom_deg', type=float)
    _domain_flag(p, 'camera_exposure_ev', type=float)
    _domain_flag(p, 'camera_gamma', type=float)
    _domain_flag(p, 'camera_noise', type=float)
    p.add_argument('--workers', type=int, default=None,
                   help='processes rendering frames (default: 2 for big jobs, else 1)')
    p.add_argument('--overwrite', action='store_true',
                   help='replace sequences that already exist under --out')
    p.add_argument('--no_images', action='store_true', help='skip image_2/ (camera)')
    p.add_argument('--no_scans', action='store_true', help='skip velodyne/ (LiDAR)')
    p.add_argument('-v', '--verbose', action='store_true', help='log progress')
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format='%(levelname)s %(name)s: %(message)s')
    try:
        sequences = parse_sequences(args.sequences)
    except ValueError as e:
        parser.error(f'--sequences: {e}')
    if args.trajectory is not None and not args.trajectory.is_file():
        parser.error(f'--trajectory {args.trajectory}: file not found')
    if args.imu_source is not None:
        if args.trajectory is None:
            parser.error(f'--imu_source {args.imu_source} needs --trajectory: a real IMU only '
                         'makes sense along its own real path')
        if not args.imu_source.is_file():
            parser.error(f'--imu_source {args.imu_source}: file not found')
    try:
        domain = DomainConfig(**{name: getattr(args, name) for name in _DOMAIN_FIELDS})
    except ValueError as e:
        parser.error(f'--{e}')
    summaries = []
    for seq in sequences:
        try:
            summaries.append(generate_sequence(
                args.out, seq, args.frames, args.seed,
                image_size=(args.image_width, args.image_height),
                azimuth_steps=args.azimuth_steps, beams=args.beams, trajectory=args.trajectory,
                imu_source=args.imu_source, workers=args.workers, overwrite=args.overwrite,
                images=not args.no_images, scans=not args.no_scans, domain=domain))
        except (ValueError, FileExistsError, FileNotFoundError) as e:
            print(f'synth_kitti: sequence {seq}: {e}', file=sys.stderr)
            return 1
    print_summary(args.out, summaries, (args.image_width, args.image_height))
    return 0


def print_summary(out, summaries, image_size):
    print(f'synth_kitti: wrote {len(summaries)} sequence(s) to {out} '
          f'(images {image_size[0]}x{image_size[1]})')
    print(f'{"seq":>4} {"frames":>6} {"span s":>7} {"points/scan (min/mean/max)":>28} '
          f'{"imu":>6} {"wall s":>7} {"s/frame":>7}  trajectory')
    for s in summaries:
        pts = f'{s.points[0]}/{s.points[1]:.0f}/{s.points[2]}'
        print(f'{s.sequence:>4} {s.frames:>6} {s.duration_s:>7.1f} {pts:>28} '
              f'{s.imu_samples:>6} {s.wall_s:>7.1f} {s.wall_s / s.frames:>7.3f}  {s.trajectory}')
    for s in summaries:
        print(f'{s.sequence:>4} IMU: {s.imu}')
        if s.domain:
            print(f'{s.sequence:>4} domain: ' + ', '.join(f'{k} {v}' for k, v in s.domain.items()))


if __name__ == '__main__':
    sys.exit(main())
