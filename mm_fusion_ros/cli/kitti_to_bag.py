"""kitti_to_bag: convert one KITTI odometry sequence into a ROS 2 bag (mcap or sqlite3).

Written with rosbags, so no ROS 2 install is needed; `ros2 bag info/play` of the chosen distro
and Foxglove read the result. Topics, frames, stamps and QoS: see mm_fusion_ros/bag/writer.py.
Exit status: 0 on success, 1 on bad input data (the message names the file), 2 on a
malformed command line or a bad flag value (argparse; the message names the flag).
"""
import argparse
import logging
from pathlib import Path
import sys

from tqdm import tqdm

from mm_fusion_ros.bag.writer import (
    convert_sequence,
    ConvertOptions,
    DISTROS,
    IMAGE_FORMATS,
    STORAGES,
)
from mm_fusion_ros.kitti.ids import normalize_sequence_id


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='kitti_to_bag', description=__doc__.splitlines()[0])
    p.add_argument('--data_path', type=Path, required=True,
                   help='KITTI root holding sequences/ and poses/')
    p.add_argument('--pointcloud_path', type=Path, default=None,
                   help='root of the Velodyne scans (default: DATA/pointclouds if present, '
                        'else DATA)')
    p.add_argument('--sequence', required=True, help='sequence id, e.g. 00 or 7')
    p.add_argument('--output', type=Path, required=True,
                   help='bag folder to create (e.g. bags/kitti_00); must not exist '
                        'unless --overwrite')
    p.add_argument('--storage', choices=sorted(STORAGES), default='mcap',
                   help='rosbag2 storage plugin (default: mcap)')
    p.add_argument('--image_format', choices=IMAGE_FORMATS, default='raw',
                   help='raw: sensor_msgs/Image rgb8 on /kitti/camera/image_raw; png: the PNG '
                        'files as CompressedImage on /kitti/camera/image_raw/compressed')
    p.add_argument('--distro', choices=sorted(DISTROS), default='humble',
                   help='ROS 2 distro whose message definitions and bag metadata version to '
                        'write (default: humble, the oldest LTS; its bags also play on newer '
                        'distros)')
    p.add_argument('--start', type=int, default=0, help='first frame to convert (default: 0)')
    p.add_argument('--end', type=int, default=None,
                   help='frame to stop before (exclusive; default: after the last frame)')
    p.add_argument('--lio_fields', action='store_true',
                   help='add per-point ring (uint16) and time (float32 s since sweep start) '
                        'fields for FAST-LIO / LIO-SAM')
    p.add_argument('--overwrite', action='store_true',
                   help='replace an existing bag at --output (only once the new one is complete)')
    p.add_argument('--skip_bad', action='store_true',
                   help='skip frames with a missing or corrupt image/scan (image, scan and ground '
                        'truth of that frame; IMU kept) instead of failing')
    p.add_argument('--imu_path', type=Path, default=None,
                   help="folder of NN.mat frame-aligned IMU files (default: the sequence's "
                        'oxts/ folder, else DATA/imus/NN.mat)')
    p.add_argument('--no_ground_truth', action='store_true',
                   help='leave /kitti/ground_truth/odom out, as a robot recording has none '
                        '(self-supervised runs; score against DATA/poses afterwards). A '
                        'sequence without a poses file (KITTI 11-21) converts without it anyway')
    p.add_argument('--quiet', action='store_true', help='no progress bar or summary')
    return p


def options_from_args(args) -> ConvertOptions:
    return ConvertOptions(
        data_path=args.data_path, sequence=normalize_sequence_id(args.sequence),
        output=args.output, pointcloud_path=args.pointcloud_path, imu_path=args.imu_path,
        storage=args.storage, image_format=args.image_format, distro=args.distro,
        start=args.start, end=args.end, lio_fields=args.lio_fields, overwrite=args.overwrite,
        skip_bad=args.skip_bad, ground_truth=not args.no_ground_truth)


def tqdm_progress(frames, total):
    return tqdm(frames, total=total, unit='frame', desc='kitti_to_bag',
                disable=not sys.stderr.isatty())


def format_summary(s) -> str:
    lines = [f'wrote {s.output} ({s.storage}, {s.distro}, metadata v{s.metadata_version}): '
             f'{s.message_count} messages, {s.duration_s:.2f} s of data, '
             f'{s.size_bytes / 1e6:.1f} MB in {s.wall_s:.1f} s',
             f'clock: t0 = {s.t0_ns} ns ({s.t0_source})',
             f'frames: {s.frames_written} of {s.frames_total} written, '
             f'{len(s.skipped)} skipped']
    lines += [f'  skipped frame {k}: {reason}' for k, reason in s.skipped]
    width = max(len(t) for t in s.counts) if s.counts else 0
    lines += [f'  {topic:<{width}}  {count:>7d}' for topic, count in s.counts.items()]
    lines += [f'note: {n}' for n in s.notes]
    lines += [f'warning: {w}' for w in s.warnings]
    return '\n'.join(lines)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(name)s: %(message)s')
    try:
        opts = options_from_args(args)
    except ValueError as e:
        parser.error(str(e))
    try:
        summary = convert_sequence(opts, progress=None if args.quiet else tqdm_progress)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f'kitti_to_bag: error: {e}', file=sys.stderr)
        return 1
    if not args.quiet:
        print(format_summary(summary))
    return 0


if __name__ == '__main__':
    sys.exit(main())
