"""KITTIOdomPointDataset: DESIGN §5 samples from KITTI folders (real or synthetic), and collate.

Ground truth (poses/NN.txt) is required by default; with ground_truth='auto' a sequence without
it (KITTI 11-21, a robot's recording) yields samples with target_valid False, and 'ignore'
never reads it (self-supervised training that must not touch the answer).

The cheap integrity checks (counts, names, scan sizes) run at construction; bad frames either
fail with the full list of problems or, with on_bad_frame='skip', remove the samples that touch
them (counted in `skipped`). A sample that fails while loading (NaN scan, undecodable PNG) is
returned as None in skip mode; collate_samples drops it and reports the count per batch.
"""
from collections import Counter
import logging

import numpy as np
from PIL import Image
import torch
from torch.utils.data import Dataset

from mm_fusion_ros.config import SampleConfig
from mm_fusion_ros.geometry import invert_pose
from mm_fusion_ros.kitti.checks import check_sequence
from mm_fusion_ros.kitti.ids import parse_sequences
from mm_fusion_ros.kitti.odometry import KittiSequence
from mm_fusion_ros.kitti.sample import build_sample, Calibration, TENSOR_KEYS

log = logging.getLogger(__name__)

ON_BAD_FRAME = ('fail', 'skip')
GROUND_TRUTH = ('require', 'auto', 'ignore')


def image_size(seq: KittiSequence):
    """(width, height) of the sequence's first camera frame (header only), or None."""
    if not seq.has_images or len(seq) == 0 or not seq.image_path(0).is_file():
        return None
    try:
        with Image.open(seq.image_path(0)) as im:
            return im.size
    except OSError as e:
        raise ValueError(f'{seq.image_path(0)}: unreadable image ({e})') from e


def sequence_calibration(seq: KittiSequence) -> Calibration:
    """The DESIGN §5 calibration of a KITTI sequence: camera2's K (P2) for the size of its
    images and camera2 <- velodyne (Tr shifted by P2's baseline) from calib.txt; imu_link <-
    velodyne from calib_imu_to_velo.txt, else the identity (KITTI's OXTS axes are within about
    1 deg of the Velodyne's; only the rotation matters to the gyro term), noted in the log."""
    size = image_size(seq) if seq.has_calib else None
    T_velo_imu = seq.T_base_imu
    if T_velo_imu is None:
        log.info('sequence %s: no %s; taking imu_link aligned with velodyne (identity) for the '
                 'self-supervised gyro term', seq.sequence,
                 seq.seq_dir / 'calib_imu_to_velo.txt')
        T_velo_imu = np.eye(4)
    return Calibration(intrinsics=seq.calib.K2 if size else None, image_size=size,
                       t_cam_lidar=seq.calib.T_cam2_velo if seq.has_calib else None,
                       t_imu_lidar=invert_pose(T_velo_imu))


class KITTIOdomPointDataset(Dataset):
    """Samples (k-1 -> k) over one or more sequences."""

    def __init__(self, data_path, sequences, pointcloud_path=None, sample_cfg=None,
                 on_bad_frame='fail', imu_path=None, raw_root=None, ground_truth='require'):
        if on_bad_frame not in ON_BAD_FRAME:
            raise ValueError(f'on_bad_frame must be one of {ON_BAD_FRAME}, got {on_bad_frame!r}')
        if ground_truth not in GROUND_TRUTH:
            raise ValueError(f'ground_truth must be one of {GROUND_TRUTH}, got {ground_truth!r}')
        self.cfg = sample_cfg or SampleConfig()
        self.on_bad_frame = on_bad_frame
        self.skipped = Counter()
        use = set(self.cfg.modalities)
        self.sequences = []
        self.calibrations = []
        self.has_ground_truth = []
        self.index = []
        for seq_id in parse_sequences(sequences):
            seq = KittiSequence(data_path, seq_id, pointcloud_path=pointcloud_path,
                                imu_path=imu_path, raw_root=raw_root)
            use_gt = ground_truth == 'require' or (ground_truth == 'auto' and seq.has_poses)
            report = check_sequence(seq, need_images='camera' in use, need_scans='lidar' in use,
                                    need_poses=use_gt, read_scans=False)
            if report.fatal:
                hint = ('\n(ground truth is needed for supervision gt or both; supervision self '
                        'trains without poses/)' if not seq.has_poses else '')
                raise ValueError(f'sequence {seq.sequence} unusable:\n  ' +
                                 '\n  '.join(map(str, report.fatal)) + hint)
            bad = set(report.bad_frames)
            if bad and on_bad_frame == 'fail':
                raise ValueError(f'sequence {seq.sequence}: {len(bad)} bad frames (use skip to '
                                 f'drop them):\n  ' + '\n  '.join(map(str, report.problems)))
            if 'imu' in use and seq.imu is None:
                log.warning('sequence %s has no IMU source: its samples carry the IMU mask off',
                            seq.sequence)
            seq_idx = len(self.sequences)
            self.sequences.append(seq)
            self.calibrations.append(sequence_calibration(seq))
            self.has_ground_truth.append(use_gt)
            skipped = 0
            for k in range(1, len(seq)):
                if k in bad or k - 1 in bad:
                    skipped += 1
                else:
                    self.index.append((seq_idx, k))
            self.skipped['bad_frame'] += skipped
            if bad:
                log.warning('sequence %s: skipping %d samples touching %d bad frames',
                            seq.sequence, skipped, len(bad))

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
        poses = seq.poses_base[k - 1:k + 1] if self.has_ground_truth[seq_idx] else None
        return build_sample(self.cfg, stamps=seq.times[k - 1:k + 1], images=images, scans=scans,
                            imu=seq.imu if 'imu' in use else None, poses=poses,
                            sequence=seq.sequence, frame=k,
                            calibration=self.calibrations[seq_idx])

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
