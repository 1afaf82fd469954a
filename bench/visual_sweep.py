"""Accuracy and cost of the flow encoder's ground sweep alone (no training, no parameters).

For every sample of the given sequences: the untrained FlowVisualEncoder's (x, yaw) step
estimate against the ground truth, per sequence (bias, mean absolute error) beside the
mean-motion predictor's error (the sequence's own average step), and the forward time of the
visual branch per sample (one thread, batches of 8).

    python bench/visual_sweep.py --data_path runs/ablation/data_620x188_100_200 \\
        --sequences 00,01,02,03,04 [--image_height 96 --image_width 320]
"""
import argparse
from pathlib import Path
import time

import numpy as np
import torch

from mm_fusion_ros.config import SampleConfig
from mm_fusion_ros.kitti.dataset import collate_samples, KITTIOdomPointDataset
from mm_fusion_ros.kitti.ids import parse_sequences
from mm_fusion_ros.model.config import ModelConfig
from mm_fusion_ros.model.net import build_model


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--data_path', type=Path, required=True, help='KITTI-layout root')
    p.add_argument('--sequences', default='00,01,02,03,04', help='sequences measured')
    p.add_argument('--image_height', type=int, default=96, help='model input height [px]')
    p.add_argument('--image_width', type=int, default=320, help='model input width [px]')
    p.add_argument('--max_points', type=int, default=8192, help='points per scan (depth)')
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    cfg = ModelConfig(visual_encoder='flow', image_height=args.image_height,
                      image_width=args.image_width)
    model = build_model(cfg).eval()
    sample_cfg = SampleConfig(image_height=args.image_height, image_width=args.image_width,
                              max_points=args.max_points)
    print(f'{"seq":>4} {"steps":>5} {"x bias m":>9} {"x MAE m":>8} {"mean-motion x MAE":>17} '
          f'{"yaw bias mrad":>13} {"yaw MAE mrad":>12} {"mean-motion yaw MAE":>19} '
          f'{"ms/sample":>9}')
    for seq in parse_sequences(args.sequences):
        ds = KITTIOdomPointDataset(args.data_path, seq, sample_cfg=sample_cfg)
        rows, elapsed = [], 0.0
        for i in range(0, len(ds), 8):
            batch = collate_samples([ds[j] for j in range(i, min(i + 8, len(ds)))])
            start = time.perf_counter()
            with torch.no_grad():
                est = model.visual(batch['image'])[:, -2:]
            elapsed += time.perf_counter() - start
            rows.append(np.c_[est.numpy(), batch['target'][:, [0, 5]].numpy()])
        r = np.concatenate(rows)
        err = r[:, :2] - r[:, 2:]
        mm = np.abs(r[:, 2:] - r[:, 2:].mean(axis=0)).mean(axis=0)
        print(f'{seq:>4} {len(r):>5} {err[:, 0].mean():>+9.3f} {np.abs(err[:, 0]).mean():>8.3f} '
              f'{mm[0]:>17.3f} {1e3 * err[:, 1].mean():>+13.2f} '
              f'{1e3 * np.abs(err[:, 1]).mean():>12.2f} {1e3 * mm[1]:>19.2f} '
              f'{1e3 * elapsed / len(r):>9.1f}')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
