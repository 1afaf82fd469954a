"""KITTIOdomPointDataset: DESIGN §5 samples from KITTI folders (real or synthetic), and collate.

The cheap integrity checks (counts, names, scan sizes) run at construction; bad frames either
fail with the full list of problems or, with on_bad_frame='skip', remove the samples that touch
them (counted in `skipped`). A sample that fails while loading (NaN scan, undecodable PNG) is
returned as None in skip mode; collate_samples drops it and reports the count per batch.
"""
from collections import Counter
import logging

import numpy as np
import torch
from torch.utils.data import Dataset

from mm_fusion_ros.config import SampleConfig
from mm_fusion_ros.kitti.checks import check_sequence
from mm_fusion_ros.kitti.odometry import KittiSequence, parse_sequences
from mm_fusion_ros.kitti.sample import build_sample

log = logging.getLogger(__name__)

ON_BAD_FRAME = ('fail', 'skip')
TENSOR_KEYS = ('image', 'points', 'points_mask', 'imu', 'dt', 'target', 'target_valid',
               'modality_mask')


class KITTIOdomPointDataset(Dataset):
    """Samples (k-1 -> k) over one or more sequences."""

    def __init__(self, data_path, sequences, pointcloud_path=None, sample_cfg=None,
                 on_bad_frame='fail', imu_path=None, raw_root=None):
        if on_bad_frame not in ON_BAD_FRAME:
            raise ValueError(f'on_bad_frame must be one of {ON_BAD_FRAME}, got {on_bad_frame!r}')
        self.cfg = sample_cfg or SampleConfig()
        self.on_bad_frame = on_bad_frame
        self.skipped = Counter()
        use = set(self.cfg.modalities)
        self.sequences = []
        self.index = []
        for seq_id in parse_sequences(sequences):
            seq = KittiSequence(data_path, seq_id, pointcloud_path=pointcloud_path,
                                imu_path=imu_path, raw_root=raw_root)
            report = check_sequence(seq, need_images='camera' in use, need_scans='lidar' in use,
                                    need_poses=True, read_scans=False)
            if report.fatal:
                raise ValueError(f'sequence {seq.sequence} unusable:\n  ' +
                                 '\n  '.join(map(str, report.fatal)))
            bad = set(report.bad_frames)
            if bad and on_bad_frame == 'fail':
                raise ValueError(f'sequence {seq.sequence}: {len(bad)} bad frames (use skip to '
                                 f'drop them):\n  ' + '\n  '.join(map(str, report.problems)))
            if 'imu' in use and seq.imu is None:
                log.warning('sequence %s has no IMU source: its samples carry the IMU mask off',
                            seq.sequence)
            seq_idx = len(self.sequences)
            self.sequences.append(seq)
            for k in range(1, len(seq)):
                if k in bad or k - 1 in bad:
                    self.skipped['bad_frame'] += 1
                else:
                    self.index.append((seq_idx, k))
            if bad:
                log.warning('sequence %s: skipping %d samples touching %d bad frames',
                            seq.sequence, self.skipped['bad_frame'], len(bad))

    def __len__(self):
        return len(self.index)

    def load(self, i) -> dict:
        """The sample, raising ValueError/FileNotFoundError naming the file on bad data."""
        seq_idx, k = self.index[i]
        seq = self.sequences[seq_idx]
        use = set(self.cfg.modalities)
        images = (seq.load_image(k - 1), seq.load_image(k)) if 'camera' in use else None
        scans = None
        if 'lidar' in use:
            scans = (seq.load_scan(k - 1), seq.load_scan(k))
            for j, scan in zip((k - 1, k), scans):
                if not np.isfinite(scan).all():
                    raise ValueError(f'{seq.scan_path(j)}: scan contains NaN or Inf values')
        return build_sample(self.cfg, stamps=seq.times[k - 1:k + 1], images=images, scans=scans,
                            imu=seq.imu if 'imu' in use else None,
                            poses=seq.poses_base[k - 1:k + 1], sequence=seq.sequence, frame=k)

    def __getitem__(self, i):
        if self.on_bad_frame == 'fail':
            return self.load(i)
        try:
            return self.load(i)
        except (ValueError, FileNotFoundError, OSError) as e:
            self.skipped['load_error'] += 1
            log.warning('skipping sample %d: %s', i, e)
            return None


def collate_samples(samples):
    """List of samples (None = skipped) -> batch dict of tensors, meta list and num_skipped.

    Returns None when every sample of the batch was skipped.
    """
    good = [s for s in samples if s is not None]
    if not good:
        return None
    batch = {k: torch.from_numpy(np.stack([np.asarray(s[k]) for s in good])) for k in TENSOR_KEYS}
    batch['meta'] = [s['meta'] for s in good]
    batch['num_skipped'] = len(samples) - len(good)
    return batch
