"""FusionOdometryNet: encoders -> GatedFusion -> PoseHead, with the data statistics as buffers.

The IMU and target normalisation statistics are buffers, so they travel in every checkpoint's
state dict and the online node normalises exactly as training did. The network works in
normalised target units; `denormalize` maps its output back to metres and radians.
"""
import torch
from torch import nn

from mm_fusion_ros.model.camera import lidar_depth_image
from mm_fusion_ros.model.config import ModelConfig
from mm_fusion_ros.model.encoders import BevPointEncoder, build_encoders, FlowVisualEncoder
from mm_fusion_ros.model.feature_cache import FeatureCache, row_key
from mm_fusion_ros.model.fusion import GatedFusion
from mm_fusion_ros.model.head import PoseHead

BRANCHES = ('visual', 'point', 'imu')
NORM_KEYS = ('imu_mean', 'imu_std', 'target_mean', 'target_std')
INPUT_KEYS = ('image', 'points', 'points_mask', 'imu', 'dt', 'modality_mask')
# Optional batch keys: the camera calibration of the resized image (else the model's default),
# and calib_valid (B, 3): which of intrinsics, t_cam_lidar, t_imu_lidar are known.
CALIB_KEYS = ('intrinsics', 't_cam_lidar')
# Target dims of the camera's motion estimates (forward translation, yaw).
CAMERA_DIMS = (0, 5)
# The batch keys a frozen branch's output depends on (its feature cache key); 'lidar_kept' is
# the LiDAR column of the modality mask after modality dropout (the camera's depth reads it).
FEATURE_KEYS = {'visual': ('image', 'points', 'points_mask', 'lidar_kept', 'calib_valid')
                + CALIB_KEYS,
                'point': ('points', 'points_mask')}
# Cache rows one sample can take: the LiDAR's features, and the camera's with and without the
# LiDAR's depth (the fusion's modality dropout hides the LiDAR from the camera now and then).
# Counted in entries, a 1024-sample cache held ~340 samples: a full replay buffer then missed
# on most draws and ran both encoders again.
CACHE_ROWS_PER_SAMPLE = 3


class FusionOdometryNet(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        encoders = build_encoders(cfg)
        self.visual = encoders['visual']
        self.point = encoders['point']
        self.imu = encoders['imu']
        self.fusion = GatedFusion([self.visual.out_dim, self.point.out_dim, self.imu.out_dim],
                                  cfg.fusion_dim, cfg.fusion_dropout, cfg.modality_dropout)
        # Encoders may expose direct (x, y) translation estimates [m] as their last outputs;
        # standardised like the target they reach the head beside the fused vector.
        self.shift_estimates = getattr(self.point, 'shift_estimates', 0)
        # The flow encoder's (x, yaw) step estimates, likewise.
        self.camera_estimates = getattr(self.visual, 'motion_estimates', 0)
        # The camera's own pose head: from the visual features alone, trained by an auxiliary
        # loss (TrainConfig.aux_weight) on every sample with a camera; its (x, yaw) replace
        # the raw sweep estimates, so that without the LiDAR the network starts from a
        # learned camera estimate.
        self.camera_head = PoseHead(self.visual.out_dim, cfg.camera_head_hidden, cfg.logvar_min,
                                    cfg.logvar_max) \
            if self.camera_estimates and cfg.camera_head_hidden > 0 else None
        self.head = PoseHead(self.fusion.out_dim + 2 * self.shift_estimates +
                             self.camera_estimates, cfg.head_hidden, cfg.logvar_min,
                             cfg.logvar_max)
        for name in NORM_KEYS:
            init = torch.ones(6) if name.endswith('std') else torch.zeros(6)
            self.register_buffer(name, init)
        self.frozen = frozenset()
        self.feature_cache = None

    # --- normalisation -------------------------------------------------------------------
    def set_normalization(self, stats: dict) -> None:
        """stats: {imu_mean, imu_std, target_mean, target_std} -> six numbers each."""
        missing = [k for k in NORM_KEYS if k not in stats]
        if missing:
            raise ValueError(f'normalization statistics lack {missing}')
        for k in NORM_KEYS:
            value = torch.as_tensor(stats[k], dtype=torch.float32).reshape(-1)
            if value.numel() != 6 or not torch.isfinite(value).all():
                raise ValueError(f'normalization {k} must be 6 finite numbers, got {stats[k]}')
            if k.endswith('std') and (value <= 0).any():
                raise ValueError(f'normalization {k} must be positive, got {value.tolist()}')
            getattr(self, k).copy_(value)

    def normalization(self) -> dict:
        return {k: [float(v) for v in getattr(self, k).tolist()] for k in NORM_KEYS}

    def normalize_target(self, target):
        return (target.float() - self.target_mean) / self.target_std

    def denormalize(self, mean_n, logvar_n):
        """Normalised (mean, log-variance) -> metres / radians and their log-variance."""
        return (mean_n * self.target_std + self.target_mean,
                logvar_n + 2.0 * torch.log(self.target_std))

    # --- freezing ------------------------------------------------------------------------
    def set_frozen(self, branches) -> None:
        """Freeze encoder branches: no gradients, and their BatchNorm statistics stop moving."""
        unknown = sorted(set(branches) - set(BRANCHES))
        if unknown:
            raise ValueError(f'cannot freeze {unknown}; branches are {", ".join(BRANCHES)}')
        self.frozen = frozenset(branches)
        if self.feature_cache is not None:
            self.feature_cache.clear()
        for name in BRANCHES:
            for p in getattr(self, name).parameters():
                p.requires_grad_(name not in self.frozen)
        self.train(self.training)

    def use_feature_cache(self, capacity: int) -> None:
        """Keep the frozen camera and LiDAR encoders' features of up to `capacity` samples
        (model/feature_cache.py); 0 = off."""
        self.feature_cache = FeatureCache(capacity * CACHE_ROWS_PER_SAMPLE) \
            if capacity > 0 else None

    def load_state_dict(self, *args, **kwargs):
        if self.feature_cache is not None:
            self.feature_cache.clear()
        return super().load_state_dict(*args, **kwargs)

    def _feature_batch(self, batch, lidar_kept):
        """The batch as the camera's key sees it."""
        return dict(batch, lidar_kept=lidar_kept)

    def remember_features(self, batch, features: dict) -> None:
        """Hand frozen branches' features that another copy of this model computed for
        `batch` (one sample, no modality dropout: an online prediction) to the feature cache,
        so the sample's first training step skips those encoders. They are keyed (hashed)
        when training next looks the cache up, not here on the prediction path."""
        cache = self.feature_cache
        if cache is None:
            return
        keyed = self._feature_batch(batch, batch['modality_mask'].bool()[:, 1])
        handed = [(branch, [k for k in FEATURE_KEYS[branch] if k in keyed], rows)
                  for branch, rows in features.items()
                  if branch in self.frozen and branch in FEATURE_KEYS]

        def store():
            for branch, names, rows in handed:
                for i in range(rows.shape[0]):
                    cache.store(row_key(branch, keyed, names, i), rows[i])
        if handed:
            cache.defer(store)

    def _features(self, branch, batch, compute, scan_cache=None):
        """compute(batch) -> (B, D) features of a branch; a frozen one through the feature
        cache (not with a ScanCache: inference keeps its own per-scan cache)."""
        cache = self.feature_cache
        if cache is None or branch not in self.frozen or scan_cache is not None:
            return compute(batch)
        names = [k for k in FEATURE_KEYS[branch] if k in batch]
        keys = [row_key(branch, batch, names, i) for i in range(batch['points'].shape[0])]
        return cache.rows(keys, lambda index: compute({k: batch[k][index] for k in names}))

    def train(self, mode: bool = True):
        super().train(mode)
        for name in self.frozen:
            getattr(self, name).eval()
        return self

    # --- forward -------------------------------------------------------------------------
    def forward(self, batch: dict, scan_cache=None, features_out: dict = None) -> dict:
        """batch: the collated DESIGN §5 tensors (INPUT_KEYS, optionally CALIB_KEYS) on the
        model's device. scan_cache: an encoders.ScanCache for online inference one sample at
        a time (eval mode): the BEV point encoder's and the flow encoder's parts computed from
        the previous sample's second scan and frame are reused; other encoders ignore it.

        Returns normalised `mean` and `logvar` (B, 6) and the mean fusion `gates` (B, 3); with
        a camera head also `aux` = {'camera': (mean, logvar, camera present (B,))}.
        features_out: a dict to receive each branch's features (remember_features).
        """
        missing = [k for k in INPUT_KEYS if k not in batch]
        if missing:
            raise ValueError(f'batch lacks {missing}; expected the DESIGN §5 keys {INPUT_KEYS}')
        # Training-time modality dropout first: the camera branch reads the LiDAR's depth only
        # where the LiDAR is kept.
        mask = self.fusion.drop_modalities(batch['modality_mask'].bool())
        imu_norm = (batch['imu'].float() - self.imu_mean) / self.imu_std
        feats = [self._features('visual', self._feature_batch(batch, mask[:, 1]),
                                lambda b: self.visual_features(b, b['lidar_kept'], scan_cache),
                                scan_cache),
                 self._features('point', batch, lambda b: self.point(
                     b['points'], b['points_mask'], cache=scan_cache)
                     if scan_cache is not None and isinstance(self.point, BevPointEncoder) else
                     self.point(b['points'], b['points_mask']), scan_cache),
                 self.imu(imu_norm, batch['dt'])]
        if features_out is not None:
            features_out.update(zip(BRANCHES, feats))
        fused, gates, mask = self.fusion(feats, mask, dropped=True)
        extra, prior, aux = [], torch.zeros_like(fused[:, :6]), {}
        lidar = mask[:, 1:2].to(fused.dtype)
        camera = mask[:, 0:1].to(fused.dtype)
        if self.camera_estimates:
            dims = list(CAMERA_DIMS)
            est = feats[0][:, -self.camera_estimates:]
            # Standardised like the target; a missing camera gives 0, i.e. the mean step.
            est = ((est - self.target_mean[dims]) / self.target_std[dims]).clamp(-20.0, 20.0)
            if self.camera_head is not None:
                own_mean, own_logvar = self.camera_head(torch.cat(
                    [feats[0][:, :-self.camera_estimates], est], dim=1))
                own_mean = own_mean + torch.cat([est[:, :1], own_mean.new_zeros(len(est), 4),
                                                 est[:, 1:]], dim=1)
                aux['camera'] = (own_mean, own_logvar, mask[:, 0])
                est = own_mean[:, dims]
            extra.append(est * camera)
            if self.cfg.camera_prior:
                # Yaw always, forward translation where no LiDAR estimate takes its place.
                own = camera * (1.0 - lidar) if self.shift_estimates and self.cfg.shift_prior \
                    else camera
                prior[:, 0:1] += est[:, 0:1] * own
                prior[:, 5:6] += est[:, 1:2] * camera
        if self.shift_estimates:
            shifts = feats[1][:, -2 * self.shift_estimates:].view(-1, self.shift_estimates, 2)
            # Standardised like the target; a missing LiDAR gives 0, i.e. the mean step.
            shifts = ((shifts - self.target_mean[:2]) / self.target_std[:2]).clamp(-20.0, 20.0)
            extra.insert(0, shifts.flatten(1) * lidar)
            if self.cfg.shift_prior:
                # Forward translation = the raw-grid correlation estimate + a learned
                # correction. Only x: lateral steps of a car are centimetres, below the
                # estimate's noise.
                prior[:, 0:1] += shifts[:, 0, :1] * lidar
        mean, logvar = self.head(torch.cat([fused, *extra], dim=1))
        out = {'mean': mean + prior, 'logvar': logvar, 'gates': gates}
        if aux:
            out['aux'] = aux
        return out

    def visual_features(self, batch, lidar_present, cache=None):
        """lidar_present (B,): whether the camera may read the LiDAR's depth."""
        if not isinstance(self.visual, FlowVisualEncoder):
            return self.visual(batch['image'])
        b = batch['image'].shape[0]
        calib = self.visual.calibration(b, None)
        if all(k in batch for k in CALIB_KEYS):
            known = torch.ones(b, dtype=torch.bool, device=batch['image'].device)
            if 'calib_valid' in batch:
                known = batch['calib_valid'][:, :2].bool().all(dim=1)
            calib = tuple(torch.where(known.view(b, 1, 1), batch[k].float(), default)
                          for k, default in zip(CALIB_KEYS, calib))
        depth = None
        if self.cfg.visual_depth:
            depth = self.depth_images(batch['points'], batch['points_mask'], lidar_present,
                                      calib, cache)
        if cache is None:
            return self.visual(batch['image'], calib, depth)
        return self.visual(batch['image'], calib, depth, cache=cache)

    def depth_images(self, points, points_mask, present, calib, cache=None):
        """Both scans' LiDAR depth images (B, 2, 2, H, W); with a cache (one sample, eval) the
        first scan's is the previous sample's second when scan, LiDAR presence and calibration
        are the same."""
        if cache is None:
            return lidar_depth_image(points, points_mask, present, *calib, *self.visual.size)
        if points.shape[0] != 1 or self.training:
            raise ValueError('ScanCache serves inference (eval mode) on one sample at a time, '
                             f'got a batch of {points.shape[0]} in '
                             f'{"training" if self.training else "eval"} mode')

        def key(s):
            return (points[0, s], points_mask[0, s], present, *calib)

        def one(s):
            return lidar_depth_image(points[:, s:s + 1], points_mask[:, s:s + 1], present,
                                     *calib, *self.visual.size)
        first = cache.depth if cache.holds_depth(key(0)) else one(0)
        second = one(1)
        cache.store_depth(key(1), second)
        return torch.cat([first, second], dim=1)


def build_model(cfg: ModelConfig) -> FusionOdometryNet:
    return FusionOdometryNet(cfg)
