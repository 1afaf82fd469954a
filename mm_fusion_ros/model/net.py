"""FusionOdometryNet: encoders -> GatedFusion -> PoseHead, with the data statistics as buffers.

The IMU and target normalisation statistics are buffers, so they travel in every checkpoint's
state dict and the online node normalises exactly as training did. The network works in
normalised target units; `denormalize` maps its output back to metres and radians.
"""
import torch
from torch import nn

from mm_fusion_ros.model.config import ModelConfig
from mm_fusion_ros.model.encoders import build_encoders
from mm_fusion_ros.model.fusion import GatedFusion
from mm_fusion_ros.model.head import PoseHead

BRANCHES = ('visual', 'point', 'imu')
NORM_KEYS = ('imu_mean', 'imu_std', 'target_mean', 'target_std')
INPUT_KEYS = ('image', 'points', 'points_mask', 'imu', 'dt', 'modality_mask')


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
        self.head = PoseHead(self.fusion.out_dim + 2 * self.shift_estimates, cfg.head_hidden,
                             cfg.logvar_min, cfg.logvar_max)
        for name in NORM_KEYS:
            init = torch.ones(6) if name.endswith('std') else torch.zeros(6)
            self.register_buffer(name, init)
        self.frozen = frozenset()

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
        for name in BRANCHES:
            for p in getattr(self, name).parameters():
                p.requires_grad_(name not in self.frozen)
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        for name in self.frozen:
            getattr(self, name).eval()
        return self

    # --- forward -------------------------------------------------------------------------
    def forward(self, batch: dict, scan_cache=None) -> dict:
        """batch: the collated DESIGN §5 tensors (INPUT_KEYS) on the model's device.
        scan_cache: an encoders.ScanCache for online inference with the BEV point encoder.

        Returns normalised `mean` and `logvar` (B, 6) and the mean fusion `gates` (B, 3).
        """
        missing = [k for k in INPUT_KEYS if k not in batch]
        if missing:
            raise ValueError(f'batch lacks {missing}; expected the DESIGN §5 keys {INPUT_KEYS}')
        imu_norm = (batch['imu'].float() - self.imu_mean) / self.imu_std
        feats = [self.visual(batch['image']),
                 self.point(batch['points'], batch['points_mask'])
                 if scan_cache is None else
                 self.point(batch['points'], batch['points_mask'], cache=scan_cache),
                 self.imu(imu_norm, batch['dt'])]
        fused, gates, mask = self.fusion(feats, batch['modality_mask'])
        if not self.shift_estimates:
            mean, logvar = self.head(fused)
            return {'mean': mean, 'logvar': logvar, 'gates': gates}
        shifts = feats[1][:, -2 * self.shift_estimates:].view(-1, self.shift_estimates, 2)
        # Standardised like the target; a missing LiDAR gives 0, i.e. the mean step.
        lidar = mask[:, 1:2].to(shifts.dtype)
        shifts = ((shifts - self.target_mean[:2]) / self.target_std[:2]).clamp(-20.0, 20.0)
        mean, logvar = self.head(torch.cat([fused, shifts.flatten(1) * lidar], dim=1))
        if self.cfg.shift_prior:
            # Forward translation = the raw-grid correlation estimate + a learned correction.
            # Only x: lateral steps of a car are centimetres, below the estimate's noise.
            mean = torch.cat([mean[:, :1] + shifts[:, 0, :1] * lidar, mean[:, 1:]], dim=1)
        return {'mean': mean, 'logvar': logvar, 'gates': gates}


def build_model(cfg: ModelConfig) -> FusionOdometryNet:
    return FusionOdometryNet(cfg)
