"""The small network that adapts the filter's pseudo-measurement noise and measures body speed.

Input: the last `window` IMU samples (accel xyz, gyro xyz in imu_link), normalised per channel
with statistics of the training data (stored in the state dict). Output per window:
lateral_logvar, vertical_logvar (noise of the zero lateral / vertical velocity pseudo-
measurements), and with the speed head speed, speed_logvar (forward speed at the window's end)
and speed0, speed0_logvar (at its start, for the initial state).

`members` > 1 makes a deep ensemble (Lakshminarayanan et al., NeurIPS 2017): networks trained
from different seeds, their outputs combined as one Gaussian mixture. One network varies much
from seed to seed (docs/inertial_filter.md, "Session 36"); the mixture averages that out, and
where the members disagree, as off their training data, its variance grows.
"""
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from mm_fusion_ros.config import ConfigBase

OUTPUT_KEYS = ('lateral_logvar', 'vertical_logvar', 'speed', 'speed_logvar', 'speed0',
               'speed0_logvar')


@dataclass(frozen=True)
class NoiseNetConfig(ConfigBase):
    """Shape of the noise network (saved in its checkpoint, so it rebuilds itself)."""

    window: int = field(default=200, metadata={'help': 'IMU samples per input window'})
    channels: int = field(default=32, metadata={'help': 'width of the convolution layers'})
    hidden: int = field(default=64, metadata={'help': 'width of the hidden dense layer'})
    speed_head: bool = field(default=True, metadata={
        'help': 'also predict the forward speed at the window end and start'})
    logvar_min: float = field(default=-12.0, metadata={'help': 'lower clamp of log-variances'})
    logvar_max: float = field(default=6.0, metadata={'help': 'upper clamp of log-variances'})
    members: int = field(default=1, metadata={
        'help': 'networks of this shape combined as a deep ensemble (1: a single network)'})

    def __post_init__(self):
        if self.window < 16:
            raise ValueError(f'NoiseNetConfig.window must be >= 16 samples, got {self.window}')
        if self.channels < 1 or self.hidden < 1:
            raise ValueError('NoiseNetConfig.channels and hidden must be >= 1')
        if not self.logvar_min < self.logvar_max:
            raise ValueError('NoiseNetConfig.logvar_min must be below logvar_max')
        if self.members < 1:
            raise ValueError(f'NoiseNetConfig.members must be >= 1, got {self.members}')


class NoiseNet(nn.Module):
    """Strided 1-D convolutions over the window, pooled, then a dense head."""

    def __init__(self, cfg: NoiseNetConfig):
        super().__init__()
        self.cfg = cfg
        c = cfg.channels
        self.register_buffer('mean', torch.zeros(6))
        self.register_buffer('std', torch.ones(6))
        self.conv = nn.Sequential(
            nn.Conv1d(6, c, 5, stride=2, padding=2), nn.GELU(),
            nn.Conv1d(c, c, 5, stride=2, padding=2), nn.GELU(),
            nn.Conv1d(c, c, 5, stride=2, padding=2), nn.GELU())
        n_out = 6 if cfg.speed_head else 2
        self.head = nn.Sequential(nn.Linear(3 * c, cfg.hidden), nn.GELU(),
                                  nn.Linear(cfg.hidden, n_out))

    def set_normalization(self, mean, std):
        self.mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.std.copy_(torch.as_tensor(np.maximum(std, 1e-6), dtype=torch.float32))

    def forward(self, windows):
        """(B, window, 6) -> (B, 2 or 6): the OUTPUT_KEYS in order, log-variances clamped."""
        x = ((windows - self.mean) / self.std).transpose(1, 2)
        h = self.conv(x)
        # Mean, max and the last step: the newest samples matter most for the present.
        h = torch.cat([h.mean(dim=2), h.amax(dim=2), h[:, :, -1]], dim=1)
        out = self.head(h)
        lo, hi = self.cfg.logvar_min, self.cfg.logvar_max
        cols = [out[:, 0:1].clamp(lo, hi), out[:, 1:2].clamp(lo, hi)]
        if self.cfg.speed_head:
            cols += [out[:, 2:3], out[:, 3:4].clamp(lo, hi),
                     out[:, 4:5], out[:, 5:6].clamp(lo, hi)]
        return torch.cat(cols, dim=1)


class NoiseEnsemble(nn.Module):
    """Networks of one shape as a deep ensemble: each output is the Gaussian mixture of the
    members' (equal weights) moment-matched to one Gaussian. A zero-mean pseudo-measurement's
    variance is the members' mean variance; a speed's mean is the members' mean and its
    variance their mean variance plus the spread of their means."""

    def __init__(self, members):
        super().__init__()
        members = list(members)
        if not members:
            raise ValueError('NoiseEnsemble needs at least one network')
        shape = members[0].cfg.replace(members=1)
        for m in members:
            if m.cfg.replace(members=1) != shape:
                raise ValueError(f'NoiseEnsemble members differ in shape: {m.cfg} vs {shape}')
        self.cfg = shape.replace(members=len(members))
        self.members = nn.ModuleList(members)

    def forward(self, windows):
        outs = torch.stack([m(windows) for m in self.members])   # (members, B, columns)
        lo, hi = self.cfg.logvar_min, self.cfg.logvar_max

        def mixed_logvar(var):
            return var.mean(dim=0).clamp_min(1e-30).log().clamp(lo, hi)

        cols = [mixed_logvar(outs[:, :, i:i + 1].exp()) for i in (0, 1)]
        if self.cfg.speed_head:
            for m, lv in ((2, 3), (4, 5)):
                means = outs[:, :, m:m + 1]
                var = outs[:, :, lv:lv + 1].exp() + (means - means.mean(dim=0)) ** 2
                cols += [means.mean(dim=0), mixed_logvar(var)]
        return torch.cat(cols, dim=1)


def build_noise_net(cfg: NoiseNetConfig) -> nn.Module:
    """An untrained network of this config (an ensemble if cfg.members > 1): the module that
    a checkpoint's state dict loads into."""
    if cfg.members == 1:
        return NoiseNet(cfg)
    return NoiseEnsemble(NoiseNet(cfg.replace(members=1)) for _ in range(cfg.members))


class NoiseModel:
    """numpy face of a NoiseNet for the filter (filter.odometry's noise-model interface)."""

    def __init__(self, net, batch_size=2048):
        """net: a NoiseNet or a NoiseEnsemble."""
        self.net = net.eval()
        self.window = net.cfg.window
        self.has_speed = net.cfg.speed_head
        self.batch_size = batch_size

    @torch.no_grad()
    def predict(self, windows) -> dict:
        windows = np.asarray(windows, dtype=np.float32)
        if windows.ndim != 3 or windows.shape[1:] != (self.window, 6):
            raise ValueError(f'noise model expects (B, {self.window}, 6) IMU windows, got '
                             f'{windows.shape}')
        outs = [self.net(torch.from_numpy(windows[i:i + self.batch_size])).numpy()
                for i in range(0, len(windows), self.batch_size)]
        out = np.concatenate(outs).astype(np.float64) if outs else np.zeros((0, 6))
        return {k: out[:, i] for i, k in enumerate(OUTPUT_KEYS[:out.shape[1]])}
