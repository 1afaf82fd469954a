"""PoseHead: 6-DoF mean and log-variance of the (normalised) relative pose (DESIGN §6)."""
import torch
from torch import nn


class PoseHead(nn.Module):
    def __init__(self, in_dim: int, hidden: int, logvar_min: float, logvar_max: float):
        super().__init__()
        self.hidden = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True))
        self.out = nn.Linear(hidden, 12)
        # Zero init: an untrained head predicts the training-set mean step (normalised 0) with
        # unit normalised variance, a sane starting point on small data.
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.logvar_range = (logvar_min, logvar_max)

    def forward(self, x):
        mean, logvar = self.out(self.hidden(x)).float().split(6, dim=-1)
        return mean, torch.clamp(logvar, *self.logvar_range)
