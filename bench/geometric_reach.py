"""How well the geometric self-supervised term knows each step's motion, from where the network
stands: per sample, Gauss-Newton steps of the term's own point-to-plane objective (its
correspondences, normals, Cauchy weights and source points) from the network's prediction.

    python bench/geometric_reach.py --checkpoint MODEL.pth --data_path DATA --sequence 04 \\
        [--every 2] [--iterations 5] [--points 4096,2048]

Prints the network's mean translation error per step, the refined pose's, the size of the
correction and its correlation with the network's error. Ground truth is read only to score.
A refined pose near the truth says the term's signal is there; what online adaptation then
makes of it is bench/online_adapt.py's question.
"""
import argparse
from pathlib import Path
import sys
import time

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from mm_fusion_ros.cli.predict_odometry import load_predictor  # noqa: E402
from mm_fusion_ros.config import SampleConfig  # noqa: E402
from mm_fusion_ros.kitti.dataset import collate_samples, KITTIOdomPointDataset  # noqa: E402
from mm_fusion_ros.model.selfsup import (  # noqa: E402
    _TargetScan,
    SelfSupParams,
    solve_geometric,
    source_indices,
)
from mm_fusion_ros.training.online import sample_config_for  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--checkpoint', required=True, help='the fusion model')
    p.add_argument('--data_path', required=True, help='KITTI-layout tree with poses/ to score')
    p.add_argument('--sequence', required=True)
    p.add_argument('--every', type=int, default=1, help='use every N-th sample')
    p.add_argument('--iterations', type=int, default=5, help='Gauss-Newton steps')
    p.add_argument('--points', default='4096',
                   help='comma-separated source-point counts per sample, each run in turn on the '
                        'same samples (the direct term uses 4096; TrainConfig.'
                        'self_geometric_solve_points the solved one)')
    args = p.parse_args(argv)
    for points in (int(n) for n in args.points.split(',')):
        reach(args, points)
    return 0


def reach(args, points: int) -> None:
    torch.set_num_threads(1)
    core, saved = load_predictor(args.checkpoint, 'cpu')
    # The samples the online node builds (bench/online_adapt.py does the same).
    sample_cfg = sample_config_for(core.model_cfg, SampleConfig(max_points=saved.max_points))
    samples = KITTIOdomPointDataset(args.data_path, args.sequence, sample_cfg=sample_cfg)
    params = SelfSupParams(geo_points=points)
    rows, seconds = [], []
    for i in range(0, len(samples), args.every):
        sample = samples.load(i)
        mean = core.predict(collate_samples([sample]))[0]
        pred = mean[0].detach().cpu().numpy().astype(np.float64)
        pts = np.asarray(sample['points'])[..., :3].astype(np.float64)
        mask = np.asarray(sample['points_mask'], dtype=bool)
        src = pts[1][mask[1]]
        t0 = time.perf_counter()
        solved = solve_geometric(pred, _TargetScan(np.ascontiguousarray(pts[0][mask[0]])),
                                 src[source_indices(src, params)], params, args.iterations)
        seconds.append(time.perf_counter() - t0)    # the kd-tree and normals included
        if solved is None:
            continue
        refined = solved[0]
        truth = np.asarray(sample['target'], dtype=np.float64)
        rows.append((np.linalg.norm(pred[:3] - truth[:3]), np.linalg.norm(refined[:3] - truth[:3]),
                     np.linalg.norm(refined[:3] - pred[:3])))
    err, ref, corr = np.array(rows).T
    print(f'{args.sequence}: {len(rows)} samples (every {args.every}, {args.iterations} '
          f'Gauss-Newton steps, {points} source points); mean translation error per step: '
          f'network {err.mean() * 1e3:.1f} mm, refined {ref.mean() * 1e3:.1f} mm; correction '
          f'{corr.mean() * 1e3:.1f} mm, correlation with the network error '
          f'{np.corrcoef(corr, err)[0, 1]:.2f}; solve {np.mean(seconds) * 1e3:.1f} ms per sample',
          flush=True)


if __name__ == '__main__':
    sys.exit(main())
