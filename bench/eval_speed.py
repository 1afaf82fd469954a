"""Speed of eval.metrics against evo on real KITTI 00 GT (4541 poses) vs a perturbed copy.

Target: the devkit metrics (8 segment lengths, translation + rotation) at least 10x faster than
evo's per-segment route, evo_rpe with delta in metres for each of the 8 lengths. Both run in the
same process on the same arrays; medians over --repeats runs. The script also prints how far the
shared numbers (ATE, RPE) differ, so a fast-but-wrong result would show.

  .venv/bin/python bench/eval_speed.py [--poses PATH] [--repeats 5] [--no_all_pairs]
"""
import argparse
import copy
import logging
import os
from pathlib import Path
import statistics
import sys
import time

from evo import main_ape
from evo.core import metrics as evo_metrics
from evo.core.trajectory import PosePath3D
import numpy as np

from mm_fusion_ros.eval import metrics
from mm_fusion_ros.eval.trajectory_io import read_kitti_poses
from mm_fusion_ros.geometry import so3_exp

REPO = Path(__file__).resolve().parents[1]
DEFAULT_POSES = Path(os.environ.get('MMF_KITTI_SAMPLE', REPO.parent / 'shared' / 'kitti_sample')
                     ) / 'poses' / '00.txt'
TRANS = evo_metrics.PoseRelation.translation_part
ROT = evo_metrics.PoseRelation.rotation_angle_deg


def perturbed(gt, scale=1.02, yaw_deg_per_frame=0.01, noise=0.01, seed=0):
    rng = np.random.default_rng(seed)
    steps = np.linalg.inv(gt[:-1]) @ gt[1:]
    u, _, vt = np.linalg.svd(steps[:, :3, :3])
    noise_rot = so3_exp(rng.normal(0, noise * 0.01, (len(steps), 3)))
    steps[:, :3, :3] = so3_exp([0.0, np.deg2rad(yaw_deg_per_frame), 0.0]) @ noise_rot @ (u @ vt)
    steps[:, :3, 3] = scale * steps[:, :3, 3] + rng.normal(0, noise, (len(steps), 3))
    out = [gt[0]]
    for step in steps:
        out.append(out[-1] @ step)
    return np.stack(out)


def median_time(fn, repeats, setup=tuple):
    """Median wall time of fn(*setup()); setup (fresh copies for evo, which mutates) is untimed."""
    times, result = [], None
    for _ in range(repeats):
        inputs = setup()
        start = time.perf_counter()
        result = fn(*inputs)
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def ours_devkit(gt, pred):
    return metrics.kitti_metrics(gt, pred)


def evo_rpe(ref, est, relation, delta, unit, all_pairs=False):
    """evo's RPE metric class (what evo_rpe runs), without main_rpe's in-place trimming."""
    metric = evo_metrics.RPE(relation, delta, unit, all_pairs=all_pairs,
                             pairs_from_reference=True)
    metric.process_data((ref, est))
    return metric.get_statistic(evo_metrics.StatisticsType.rmse)


def evo_segments(ref, est, all_pairs):
    """evo's per-segment route: RPE with delta = L metres (pairs on the GT path, as the devkit),
    translation and rotation, for L = 100..800."""
    return {length: tuple(evo_rpe(ref, est, relation, float(length), evo_metrics.Unit.meters,
                                  all_pairs) for relation in (TRANS, ROT))
            for length in metrics.SEGMENT_LENGTHS}


def evo_ate(ref, est_se3, est_sim3):
    """evo_ape with SE(3) and Sim(3) alignment (each aligns its own copy in place)."""
    return tuple(main_ape.ape(ref, est, TRANS, align=True, correct_scale=scale).stats['rmse']
                 for est, scale in ((est_se3, False), (est_sim3, True)))


def evo_rpe_frames(ref, est):
    return tuple(evo_rpe(ref, est, relation, 1, evo_metrics.Unit.frames)
                 for relation in (TRANS, ROT))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--poses', type=Path, default=DEFAULT_POSES,
                        help='KITTI GT pose file (default: the shared real sequence 00)')
    parser.add_argument('--repeats', type=int, default=5, help='timed runs per entry')
    parser.add_argument('--no_all_pairs', action='store_true',
                        help='skip evo with all_pairs=True (overlapping segments, slow)')
    args = parser.parse_args(argv)
    logging.getLogger('evo').setLevel(logging.WARNING)

    gt = read_kitti_poses(args.poses)
    pred = perturbed(gt)
    ref, est = PosePath3D(poses_se3=list(gt)), PosePath3D(poses_se3=list(pred))
    print(f'{args.poses}: {len(gt)} poses, path '
          f'{metrics.trajectory_distances(gt)[-1]:.0f} m; median of {args.repeats} runs')

    rows = []
    t_ours, dev = median_time(lambda: ours_devkit(gt, pred), args.repeats)
    t_evo, _ = median_time(lambda: evo_segments(ref, est, False), args.repeats)
    rows.append(('devkit t_rel/r_rel, 8 lengths', t_ours, 'evo_rpe 8x(m, t+r) consecutive',
                 t_evo))
    if not args.no_all_pairs:
        t_all, _ = median_time(lambda: evo_segments(ref, est, True), max(1, args.repeats // 2))
        rows.append(('devkit t_rel/r_rel, 8 lengths', t_ours, 'evo_rpe 8x(m, t+r) all_pairs',
                     t_all))
    t_ate, ate = median_time(lambda: (metrics.ate(gt, pred), metrics.ate(gt, pred, True)),
                             args.repeats)
    t_evo_ate, evo_ate_vals = median_time(
        lambda a, b, c: evo_ate(a, b, c), args.repeats,
        setup=lambda: (ref, copy.deepcopy(est), copy.deepcopy(est)))
    rows.append(('ATE SE(3) + Sim(3)', t_ate, 'evo_ape x2', t_evo_ate))
    t_rpe, rel = median_time(lambda: metrics.rpe(gt, pred, 1, 'frames'), args.repeats)
    t_evo_rpe, evo_rel = median_time(lambda: evo_rpe_frames(ref, est), args.repeats)
    rows.append(('RPE 1 frame (t + r)', t_rpe, 'evo_rpe x2', t_evo_rpe))

    print(f'{"ours":<32} {"ms":>9}   {"evo":<34} {"ms":>9} {"speed-up":>9}')
    for name, ours, evo_name, theirs in rows:
        print(f'{name:<32} {ours * 1e3:9.2f}   {evo_name:<34} {theirs * 1e3:9.2f} '
              f'{theirs / ours:8.1f}x')
    ours_vals = [*ate, rel.trans_rmse, rel.rot_rmse]
    evo_vals = [*evo_ate_vals, *evo_rel]
    worst = max(abs(a - b) / abs(b) for a, b in zip(ours_vals, evo_vals))
    print(f'ATE/RPE agreement with evo: max relative difference {worst:.2e}')
    print(f'devkit on this pair: t_rel {dev["t_rel"]:.4f} %, r_rel {dev["r_rel"]:.4f} deg/100 m, '
          f'{dev["num_segments"]} segments')
    ratio = rows[0][3] / rows[0][1]
    print(f'target >= 10x for the devkit metrics: {"met" if ratio >= 10 else "NOT met"} '
          f'({ratio:.1f}x)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
