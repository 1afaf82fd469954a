"""GatedFusion: per-modality embeddings, learned gates and whole-modality dropout (DESIGN §6).

A modality whose mask is off (sensor missing, masked by config, or dropped during training)
contributes a learned "missing" embedding instead of its features, so the head always sees a
well-formed input and a lost sensor degrades the estimate instead of breaking it.
"""
import torch
from torch import nn

from mm_fusion_ros.config import MODALITIES


class GatedFusion(nn.Module):
    """in_dims: feature size per modality, in MODALITIES order (camera, lidar, imu)."""

    def __init__(self, in_dims, dim: int, dropout: float, modality_dropout: float):
        super().__init__()
        if len(in_dims) != len(MODALITIES):
            raise ValueError(f'GatedFusion needs {len(MODALITIES)} feature sizes, got {in_dims}')
        self.dim = dim
        self.out_dim = dim * len(MODALITIES)
        self.modality_dropout = modality_dropout
        self.proj = nn.ModuleList(nn.Sequential(nn.Linear(d, dim), nn.ReLU(inplace=True))
                                  for d in in_dims)
        self.missing = nn.Parameter(torch.zeros(len(MODALITIES), dim))
        # One gate vector per modality, computed from every embedding and the mask, so a
        # modality can be trusted less when another one disagrees or is missing.
        self.gate = nn.Linear(self.out_dim + len(MODALITIES), self.out_dim)
        self.dropout = nn.Dropout(dropout)

    def drop_modalities(self, mask):
        """Training-time whole-modality dropout that never removes the last present modality."""
        if not self.training or self.modality_dropout <= 0:
            return mask
        keep = torch.rand(mask.shape, device=mask.device) >= self.modality_dropout
        dropped = mask & keep
        emptied = ~dropped.any(dim=1, keepdim=True)
        return torch.where(emptied, mask, dropped)

    def forward(self, feats, mask, dropped: bool = False):
        """feats: list of (B, d_m); mask: (B, 3) bool; dropped: the caller already applied
        drop_modalities (so that encoders that read another modality, e.g. the LiDAR depth in
        the camera branch, saw the same mask).

        Returns fused (B, out_dim), mean gate per modality (B, 3) and the mask actually used
        (after training-time modality dropout).
        """
        mask = mask.bool() if dropped else self.drop_modalities(mask.bool())
        emb = torch.stack([p(f.float()) for p, f in zip(self.proj, feats)], dim=1)  # (B, 3, D)
        emb = torch.where(mask.unsqueeze(-1), emb, self.missing.unsqueeze(0).to(emb.dtype))
        flat = emb.flatten(1)
        gates = torch.sigmoid(self.gate(torch.cat([flat, mask.to(flat.dtype)], dim=1)))
        fused = self.dropout(flat * gates)
        return fused, gates.view(-1, len(MODALITIES), self.dim).mean(dim=-1), mask
