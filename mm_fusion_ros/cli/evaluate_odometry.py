"""evaluate_odometry: KITTI devkit metrics, ATE and RPE of predicted trajectories, with baselines.

  evaluate_odometry --gt poses/07.txt --pred results/07.txt [--json out.json] [--plot out.png]
  evaluate_odometry --data_path data --sequences 07,09,10 --pred_dir results/ \\
      [--baseline cv_oracle] [--baseline mean_motion --train_sequences 00,02,08]
  evaluate_odometry --data_path data --sequences 07 --compare net=results/net \
      --compare net+filter=results/net_filter --baseline imu

--compare NAME=PRED_DIR (repeatable) scores PRED_DIR/NN.txt as a row NAME beside the prediction
and the baselines, e.g. the network's trajectory with and without the inertial filter
(predict_odometry --filter on|off).

A trajectory written by the online node has a steps sidecar beside it (NAME.steps.csv,
eval/trajectory_io.py); then the report also says how many of its steps were bridged rather
than predicted, and which segment the file holds and the stamp it starts at.
"""
import argparse
import json
import logging
import math
from pathlib import Path
import sys

import numpy as np

from mm_fusion_ros.eval import baselines
from mm_fusion_ros.eval.metrics import evaluate, RPE_UNITS, SEGMENT_LENGTHS
from mm_fusion_ros.eval.plots import plot_report, PlotEntry
from mm_fusion_ros.eval.trajectory_io import (
    base_link_poses_to_cam0,
    check_same_length,
    read_kitti_poses,
    read_steps,
    steps_path,
)
from mm_fusion_ros.fileio import atomic_write_text
from mm_fusion_ros.geometry import cam0_to_base_link
from mm_fusion_ros.kitti.ids import parse_sequences
from mm_fusion_ros.kitti.imu import require_sequence_imu
from mm_fusion_ros.kitti.odometry import KittiSequence, read_calib

log = logging.getLogger(__name__)

PREDICTION = 'prediction'
BASELINES = ('mean_motion', 'cv_oracle', 'imu', 'kiss_icp')
SCALAR_KEYS = ('t_rel', 'r_rel', 'ate', 'ate_sim3', 'rpe_trans', 'rpe_rot')
COLUMNS = (('t_rel', 't_rel[%]'), ('r_rel', 'r_rel[deg/100m]'), ('ate', 'ATE[m]'),
           ('ate_sim3', 'ATE_sim3[m]'), ('rpe_trans', 'RPE_t[m]'), ('rpe_rot', 'RPE_r[deg]'))


def sequence_list(text) -> list:
    """argparse type: '7,09' -> ['07', '09'], with the reader's message on bad ids."""
    try:
        return parse_sequences(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def compare_arg(text) -> tuple:
    """argparse type: 'NAME=PRED_DIR' -> (NAME, Path(PRED_DIR))."""
    name, sep, folder = text.partition('=')
    name = name.strip()
    if not sep or not name or not folder or any(c.isspace() for c in name):
        raise argparse.ArgumentTypeError(f'{text!r}: give NAME=PRED_DIR, a row name without '
                                         'spaces and a folder of NN.txt predictions')
    if name in (PREDICTION, *BASELINES):
        raise argparse.ArgumentTypeError(f'{text!r}: the row name {name!r} is taken (by '
                                         f'{PREDICTION} and the baselines {", ".join(BASELINES)})')
    return name, Path(folder)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog='evaluate_odometry',
        description='KITTI odometry metrics (devkit t_rel/r_rel over 100..800 m segments), ATE '
                    '(SE(3) and Sim(3) Umeyama alignment) and RPE, as evo computes them.',
        epilog='With several sequences the average row is the mean of the per-sequence values '
               '(as papers report), not the pooled KITTI-server average of all segments.')
    one = p.add_argument_group('one sequence')
    one.add_argument('--gt', type=Path, help='ground-truth KITTI pose file (cam0 frame)')
    one.add_argument('--pred', type=Path, help='predicted KITTI pose file, one pose per GT frame')
    one.add_argument('--calib', type=Path,
                     help='KITTI calib.txt whose Tr converts --pred from base_link to cam0 '
                          '(only with --pred_frame base_link)')
    many = p.add_argument_group('several sequences')
    many.add_argument('--data_path', type=Path,
                      help='KITTI root: GT from DATA/poses/NN.txt, calib/times/IMU from '
                           'DATA/sequences/NN')
    many.add_argument('--sequences', type=sequence_list,
                      help='comma-separated sequence ids, zero-padded (7 -> 07); the average '
                           'row is the mean of the per-sequence values, as papers report')
    many.add_argument('--pred_dir', type=Path,
                      help='folder of predictions PRED_DIR/NN.txt (optional with --baseline or '
                           '--compare)')
    many.add_argument('--compare', action='append', type=compare_arg, default=[],
                      metavar='NAME=PRED_DIR',
                      help='another folder of predictions PRED_DIR/NN.txt, scored as the row '
                           'NAME (repeatable), e.g. net=results/net '
                           'net+filter=results/net_filter')
    p.add_argument('--pred_frame', choices=('cam0', 'base_link'), default='cam0',
                   help='frame of the predicted poses; base_link ones are converted to cam0 with '
                        'the Tr of the sequence (default: cam0)')
    p.add_argument('--baseline', action='append', choices=BASELINES, default=[],
                   help='add a baseline row (repeatable): mean_motion (needs --train_sequences), '
                        'cv_oracle (repeats the previous GT step), imu (dead reckoning, needs '
                        'IMU of the sequences), kiss_icp (needs the kiss-icp package and scans)')
    p.add_argument('--train_sequences', type=sequence_list,
                   help='sequences whose GT (DATA/poses) gives mean_motion its mean step')
    p.add_argument('--imu_path', type=Path,
                   help='folder of NN.mat IMU files for the imu baseline (default: the '
                        'IMU source found for each sequence, see kitti.imu)')
    p.add_argument('--pointcloud_path', type=Path,
                   help='root of the Velodyne scans for the kiss_icp baseline (default: DATA)')
    p.add_argument('--rpe_delta', type=float, default=1.0,
                   help='RPE pair spacing, in --rpe_unit (default: 1)')
    p.add_argument('--rpe_unit', choices=RPE_UNITS, default='frames',
                   help='unit of --rpe_delta: frames, or m of path length measured on the '
                        'prediction as evo does (default: frames)')
    p.add_argument('--json', type=Path, help='write all metrics to this JSON file')
    p.add_argument('--plot', type=Path,
                   help='write a PNG: top-down trajectories (x-z of cam0) and error per length')
    return p


def check_args(parser, args) -> None:
    single = args.gt is not None or args.pred is not None
    multi = args.data_path is not None and args.sequences is not None
    if single and (args.sequences or args.pred_dir):
        parser.error('use either --gt/--pred or --data_path/--sequences/--pred_dir, not both')
    if single and (args.gt is None or args.pred is None):
        parser.error('one-sequence mode needs both --gt and --pred')
    if not single and (args.sequences is None) != (args.data_path is None):
        parser.error('--sequences and --data_path go together')
    if not single and not multi:
        parser.error('give --gt and --pred, or --data_path and --sequences')
    if multi and args.pred_dir is None and not args.baseline and not args.compare:
        parser.error('nothing to evaluate: give --pred_dir, --compare and/or --baseline')
    names = [name for name, _ in args.compare]
    if len(set(names)) != len(names):
        parser.error(f'--compare names must differ, got {", ".join(names)}')
    if single and args.compare:
        parser.error('--compare needs --data_path and --sequences (it reads PRED_DIR/NN.txt)')
    if 'mean_motion' in args.baseline and (args.train_sequences is None or args.data_path is None):
        parser.error('--baseline mean_motion needs --data_path and --train_sequences')
    if single and {'imu', 'kiss_icp'} & set(args.baseline):
        parser.error('the imu and kiss_icp baselines need --data_path and --sequences')
    if single and args.pred_frame == 'base_link' and args.calib is None:
        parser.error('--pred_frame base_link with --gt/--pred needs --calib (for Tr)')
    if multi and args.calib is not None:
        parser.error('--calib is for one sequence (--gt/--pred): with --sequences each '
                     "sequence's own calib.txt under --data_path gives its Tr (KITTI's differs "
                     'between 00-02, 03 and 04-10)')
    if 'kiss_icp' in args.baseline and not baselines.kiss_icp_available():
        parser.error('--baseline kiss_icp: the kiss-icp package is not installed '
                     '(pip install kiss-icp)')
    if args.rpe_unit == 'frames' and (args.rpe_delta < 1 or not args.rpe_delta.is_integer()):
        parser.error(f'--rpe_delta {args.rpe_delta} must be a positive integer with frames')


class SequenceSource:
    """GT and sensor data of one sequence, read once and shared by the prediction and baselines."""

    def __init__(self, args, seq_id, gt_path):
        self.args, self.seq_id, self.gt_path = args, seq_id, gt_path
        self.gt = read_kitti_poses(gt_path)
        self._kitti = None

    @property
    def kitti(self) -> KittiSequence:
        if self._kitti is None:
            self._kitti = KittiSequence(self.args.data_path, self.seq_id,
                                        pointcloud_path=self.args.pointcloud_path,
                                        imu_path=self.args.imu_path)
        return self._kitti

    def tr(self) -> np.ndarray:
        if self.args.calib is not None:
            return read_calib(self.args.calib).Tr
        return self.kitti.Tr

    def gt_base(self) -> np.ndarray:
        return cam0_to_base_link(self.gt, self.tr())

    def read_prediction(self, path) -> np.ndarray:
        pred = read_kitti_poses(path)
        check_same_length(self.gt_path, self.gt, path, pred)
        if self.args.pred_frame == 'base_link':
            pred = base_link_poses_to_cam0(pred, self.tr())
        return pred


def imu_baseline(src: SequenceSource) -> tuple:
    seq = src.kitti
    imu = require_sequence_imu(seq)
    T_base_imu = seq.T_base_imu
    if T_base_imu is None:
        log.warning('sequence %s: no calib_imu_to_velo.txt; taking imu_link = base_link',
                    src.seq_id)
        T_base_imu = np.eye(4)
    gt_base = src.gt_base()
    if len(seq.times) != len(gt_base):
        raise ValueError(f'{seq.times_path} has {len(seq.times)} times but {src.gt_path} has '
                         f'{len(gt_base)} poses')
    pred = baselines.imu_dead_reckoning(gt_base, seq.times, imu, T_base_imu)
    heading = baselines.gyro_heading_error(gt_base, seq.times, imu, T_base_imu)
    extra = {'gyro_heading_error_final_deg': float(heading[-1]),
             'gyro_heading_error_max_deg': float(np.max(np.abs(heading)))}
    return base_link_poses_to_cam0(pred, src.tr()), extra


def kiss_icp_baseline(src: SequenceSource) -> tuple:
    seq = src.kitti
    scans = (seq.load_scan(k) for k in range(len(src.gt)))
    rel = baselines.kiss_icp_odometry(scans)
    pred_base = src.gt_base()[0] @ rel
    return base_link_poses_to_cam0(pred_base, src.tr()), {}


def online_steps(pred_path, poses: int) -> dict:
    """What the steps sidecar of an online trajectory says (none: {}): how many steps were
    bridged rather than predicted, and which segment the file is and where it starts."""
    sidecar = steps_path(pred_path)
    if not sidecar.is_file():
        return {}
    steps = read_steps(sidecar)
    if len(steps['stamp_ns']) != poses:
        raise ValueError(f'{sidecar} has {len(steps["stamp_ns"])} rows but {pred_path} has '
                         f'{poses} poses')
    return {'bridged_steps': int(steps['bridged'].sum()), 'steps': max(poses - 1, 0),
            'segment': int(steps['segment'][0]) if poses else 0,
            'first_stamp_ns': int(steps['stamp_ns'][0]) if poses else 0}


def baseline_trajectory(name, src: SequenceSource, train_step) -> tuple:
    """(cam0 poses, extra metrics) of one baseline on one sequence."""
    if name == 'cv_oracle':
        return baselines.cv_oracle(src.gt), {}
    if name == 'mean_motion':
        return baselines.mean_motion(src.gt, train_step), {}
    if name == 'imu':
        return imu_baseline(src)
    if name == 'kiss_icp':
        return kiss_icp_baseline(src)
    raise ValueError(f'unknown baseline {name!r}; choose from {BASELINES}')


def train_mean_step(args):
    if 'mean_motion' not in args.baseline:
        return None
    paths = [args.data_path / 'poses' / f'{s}.txt' for s in args.train_sequences]
    return baselines.mean_step([read_kitti_poses(p) for p in paths])


def sequence_jobs(args):
    """(sequence id, GT path, {row name: prediction path}) for every sequence to evaluate."""
    if args.gt is not None:
        return [(args.gt.stem, args.gt, {PREDICTION: args.pred})]
    folders = ([(PREDICTION, args.pred_dir)] if args.pred_dir else []) + list(args.compare)
    return [(s, args.data_path / 'poses' / f'{s}.txt',
             {name: folder / f'{s}.txt' for name, folder in folders}) for s in args.sequences]


def evaluate_all(args):
    """{method: {sequence: metrics}} and the plot entries."""
    step = train_mean_step(args)
    results, entries = {}, []
    for seq_id, gt_path, pred_paths in sequence_jobs(args):
        src = SequenceSource(args, seq_id, gt_path)
        trajectories = {}
        for name, pred_path in pred_paths.items():
            pred = src.read_prediction(pred_path)
            trajectories[name] = (pred, online_steps(pred_path, len(pred)))
        for name in dict.fromkeys(args.baseline):
            trajectories[name] = baseline_trajectory(name, src, step)
        for name, (poses, extra) in trajectories.items():
            metrics = evaluate(src.gt, poses, args.rpe_delta, args.rpe_unit)
            results.setdefault(name, {})[seq_id] = {**metrics, **extra}
        entries.append(PlotEntry(
            title=f'sequence {seq_id}', gt=src.gt,
            trajectories={n: t[0] for n, t in trajectories.items()},
            per_length={n: results[n][seq_id]['per_length'] for n in trajectories},
            view_names=tuple(pred_paths) or None))
    return results, entries


def _nanmean(values):
    values = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(values)) if values else math.nan


def average(per_sequence: dict) -> dict:
    """Mean of the per-sequence values (papers' convention); per-length counts are summed."""
    rows = list(per_sequence.values())
    out = {k: _nanmean([r[k] for r in rows]) for k in SCALAR_KEYS}
    out['per_length'] = {
        length: {'t_rel': _nanmean([r['per_length'][length]['t_rel'] for r in rows]),
                 'r_rel': _nanmean([r['per_length'][length]['r_rel'] for r in rows]),
                 'count': sum(r['per_length'][length]['count'] for r in rows)}
        for length in SEGMENT_LENGTHS}
    out['num_poses'] = sum(r['num_poses'] for r in rows)
    return out


def _fmt(value) -> str:
    return 'n/a' if value is None or math.isnan(value) else f'{value:.4f}'


def format_table(results: dict, args) -> str:
    width = max(12, *(len(name) for name in results))
    header = f'{"sequence":<9} {"method":<{width}}' + ''.join(f' {t:>16}' for _, t in COLUMNS)
    lines = [f'RPE over pairs {args.rpe_delta:g} {args.rpe_unit} apart; ATE after Umeyama '
             f'alignment', header, '-' * len(header)]
    for name, per_seq in results.items():
        for seq_id, m in per_seq.items():
            cells = ''.join(f' {_fmt(m[k]):>16}' for k, _ in COLUMNS)
            lines.append(f'{seq_id:<9} {name:<{width}}' + cells)
    if len(next(iter(results.values()))) > 1:
        for name, per_seq in results.items():
            avg = average(per_seq)
            lines.append(f'{"average":<9} {name:<{width}}' + ''.join(f' {_fmt(avg[k]):>16}'
                                                                     for k, _ in COLUMNS))
    for name in [PREDICTION, *(n for n, _ in args.compare)]:
        for seq_id, m in results.get(name, {}).items():
            if 'bridged_steps' in m:
                lines.append(f'{name}, sequence {seq_id}: {m["bridged_steps"]} of {m["steps"]} '
                             f'steps bridged (not predicted); segment {m["segment"]} from stamp '
                             f'{m["first_stamp_ns"]} ns')
    for seq_id, m in results.get('imu', {}).items():
        lines.append(f'imu baseline, sequence {seq_id}: gyro heading drift '
                     f'{m["gyro_heading_error_final_deg"]:+.3f} deg at the end, '
                     f'max |{m["gyro_heading_error_max_deg"]:.3f}| deg')
    return '\n'.join(lines)


def _json_ready(obj):
    """NaN -> null and int keys -> str, so the file is strict JSON."""
    if isinstance(obj, dict):
        return {str(k): _json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_ready(v) for v in obj]
    if isinstance(obj, float) and math.isnan(obj):
        return None
    return obj


def build_report(results: dict, args) -> dict:
    """Single sequence: its metrics at the top level; several: their average plus 'sequences'."""
    def summary(per_seq):
        if args.gt is not None:
            return dict(next(iter(per_seq.values())))
        return {**average(per_seq), 'sequences': per_seq}

    compared = {name for name, _ in args.compare}
    report = summary(results[PREDICTION]) if PREDICTION in results else {}
    report['baselines'] = {n: summary(r) for n, r in results.items()
                           if n != PREDICTION and n not in compared}
    if compared:
        report['compare'] = {n: summary(r) for n, r in results.items() if n in compared}
    if args.gt is None:
        report['average_of'] = 'per-sequence values (mean over sequences)'
    return _json_ready(report)


def write_json(path: Path, report: dict) -> None:
    atomic_write_text(path, json.dumps(report, indent=2, allow_nan=False) + '\n')


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s')
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    try:
        results, entries = evaluate_all(args)
    except (ValueError, FileNotFoundError, ModuleNotFoundError) as e:
        print(f'evaluate_odometry: error: {e}', file=sys.stderr)
        return 2
    print(format_table(results, args))
    if args.json:
        write_json(args.json, build_report(results, args))
        print(f'wrote {args.json}')
    if args.plot:
        plot_report(args.plot, entries)
        print(f'wrote {args.plot}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
