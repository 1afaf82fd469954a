"""How well the geometric self-supervised term knows each step's motion, from where the network
stands: per sample, Gauss-Newton steps of the term's own point-to-plane objective (its
correspondences, normals, Cauchy weights and source points) from the network's prediction.

    python bench/geometric_reach.py --checkpoint MODEL.pth --data_path DATA --sequence 04 \\
        [--every 2] [--iterations 5]

Prints the network's mean translation error per step, the refined pose's, the size of the
correction and its correlation with the network's error. Ground truth is read only to score.
A refined pose near the truth says the term's signal is there; what online adaptation then
makes of it is bench/online_adapt.py's question.
"""
import argparse
from pathlib import Path
import sys

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
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    core, saved = load_predictor(args.checkpoint, 'cpu')
    # The samples the online node builds (bench/online_adapt.py does the same).
    sample_cfg = sample_config_for(core.model_cfg, SampleConfig(max_points=saved.max_points))
    samples = KITTIOdomPointDataset(args.data_path, args.sequence, sample_cfg=sample_cfg)
    params = SelfSupParams()
    rows = []
    for i in range(0, len(samples), args.every):
        sample = samples.load(i)
        mean = core.predict(collate_samples([sample]))[0]
        pred = mean[0].detach().cpu().numpy().astype(np.float64)
        pts = np.asarray(sample['points'])[..., :3].astype(np.float64)
        mask = np.asarray(sample['points_mask'], dtype=bool)
        src = pts[1][mask[1]]
        solved = solve_geometric(pred, _TargetScan(np.ascontiguousarray(pts[0][mask[0]])),
                                 src[source_indices(src, params)], params, args.iterations)
        if solved is None:
            continue
        refined = solved[0]
        truth = np.asarray(sample['target'], dtype=np.float64)
        rows.append((np.linalg.norm(pred[:3] - truth[:3]), np.linalg.norm(refined[:3] - truth[:3]),
                     np.linalg.norm(refined[:3] - pred[:3])))
    err, ref, corr = np.array(rows).T
    print(f'{args.sequence}: {len(rows)} samples (every {args.every}, {args.iterations} '
          f'Gauss-Newton steps); mean translation error per step: network {err.mean() * 1e3:.1f} '
          f'mm, refined {ref.mean() * 1e3:.1f} mm; correction {corr.mean() * 1e3:.1f} mm, '
          f'correlation with the network error {np.corrcoef(corr, err)[0, 1]:.2f}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
