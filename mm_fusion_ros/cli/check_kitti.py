"""check_kitti: validate a KITTI odometry tree (real or synthetic) before training or converting.

Exit status: 0 when every sequence is clean (or, with --on_bad_frame skip, when only individual
frames are bad: they are listed as what would be skipped), 1 otherwise.
"""
import argparse
import sys

from mm_fusion_ros.kitti.checks import check_sequence
from mm_fusion_ros.kitti.ids import parse_sequences
from mm_fusion_ros.kitti.odometry import KittiSequence


def build_parser():
    p = argparse.ArgumentParser(prog='check_kitti', description=__doc__.splitlines()[0])
    p.add_argument('--data_path', required=True, help='KITTI root holding sequences/ and poses/')
    p.add_argument('--pointcloud_path', default=None,
                   help='root of the Velodyne scans '
                        '(default: DATA/pointclouds if present, else DATA)')
    p.add_argument('--sequences', required=True, help='comma-separated ids, e.g. 00,01 or 0,1')
    p.add_argument('--imu_path', default=None, help='folder of NN.mat IMU files (optional)')
    p.add_argument('--on_bad_frame', choices=('fail', 'skip'), default='fail',
                   help='fail: any bad file fails the check; skip: list bad frames as skipped')
    p.add_argument('--no_images', action='store_true', help='do not require image_2/')
    p.add_argument('--no_scans', action='store_true', help='do not require Velodyne scans')
    p.add_argument('--no_poses', action='store_true',
                   help="do not require poses/NN.txt (KITTI 11-21, a robot's own data: what "
                        'predict_odometry and --supervision self use); poses present are still '
                        'checked')
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        sequences = parse_sequences(args.sequences)
    except ValueError as e:
        parser.error(str(e))
    status = 0
    for seq_id in sequences:
        try:
            seq = KittiSequence(args.data_path, seq_id, pointcloud_path=args.pointcloud_path,
                                imu_path=args.imu_path)
        except FileNotFoundError as e:
            print(f'[{seq_id}] FAIL {e}')
            status = 1
            continue
        report = check_sequence(seq, need_images=not args.no_images,
                                need_scans=not args.no_scans, need_imu=args.imu_path is not None,
                                need_poses=not args.no_poses or seq.poses_path.is_file())
        imu_text = _imu_summary(seq)
        if report.ok:
            print(f'[{seq_id}] OK   {report.frames} frames, {imu_text}')
            continue
        for problem in report.problems:
            print(f'[{seq_id}] BAD  {problem}')
        if report.fatal or args.on_bad_frame == 'fail':
            status = 1
            print(f'[{seq_id}] FAIL {len(report.problems)} problems')
        else:
            bad = report.bad_frames
            print(f'[{seq_id}] SKIP would skip frames {bad} ({len(bad)} of {report.frames}), '
                  f'{imu_text}')
    return status


def _imu_summary(seq):
    try:
        imu = seq.imu
    except (ValueError, FileNotFoundError) as e:
        return f'IMU error: {e}'
    if imu is None:
        return 'no IMU'
    rate = (len(imu) - 1) / max(imu.stamps[-1] - imu.stamps[0], 1e-9)
    return f'IMU {len(imu)} samples at {rate:.0f} Hz from {imu.source}'


if __name__ == '__main__':
    sys.exit(main())
