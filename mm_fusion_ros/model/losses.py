"""Pose losses and error metrics (DESIGN §6).

All losses take the network's normalised mean / log-variance and the normalised target. Only
samples with target_valid contribute. Dims 0-2 are translation, 3-5 the so(3) rotation; the
rotation dims are weighted by `rotation_weight`.

The self-supervised terms, which need no target, are in model/selfsup.py (DESIGN §9).
"""
import math

import torch

LOSSES = ('l1', 'l2', 'gaussian_nll', 'laplace_nll')


def dim_weights(rotation_weight: float, device) -> torch.Tensor:
    return torch.tensor([1.0, 1.0, 1.0] + [float(rotation_weight)] * 3, device=device)


def gaussian_nll(err, logvar):
    return 0.5 * (err.square() * torch.exp(-logvar) + logvar)


def laplace_nll(err, logvar):
    # Laplace with variance exp(logvar): scale b = sqrt(exp(logvar) / 2).
    return err.abs() * math.sqrt(2.0) * torch.exp(-0.5 * logvar) + 0.5 * logvar


def per_sample_loss(mean, logvar, target, kind: str, rotation_weight: float,
                    calibrate_logvar: bool = True):
    """(B,) loss per sample (no validity masking yet).

    l1 / l2 train the mean alone; with calibrate_logvar the log-variance is fitted to the
    detached residual by the matching NLL (Laplace for l1, Gaussian for l2), so it is a usable
    uncertainty without pulling on the mean. gaussian_nll / laplace_nll are the
    uncertainty-weighted losses: large predicted variance down-weights a sample's residual.
    """
    if kind not in LOSSES:
        raise ValueError(f'loss {kind!r} unknown; choose one of {", ".join(LOSSES)}')
    err = mean - target
    if kind == 'l1':
        per_dim = err.abs()
        if calibrate_logvar:
            per_dim = per_dim + laplace_nll(err.detach(), logvar)
    elif kind == 'l2':
        per_dim = err.square()
        if calibrate_logvar:
            per_dim = per_dim + gaussian_nll(err.detach(), logvar)
    elif kind == 'gaussian_nll':
        per_dim = gaussian_nll(err, logvar)
    else:
        per_dim = laplace_nll(err, logvar)
    return (per_dim * dim_weights(rotation_weight, mean.device)).mean(dim=-1)


def masked_mean(values, valid):
    """Mean over valid entries; an all-invalid batch gives a zero that keeps the graph."""
    valid = valid.bool()
    if not valid.any():
        return values.sum() * 0.0
    return values[valid].mean()


def so3_exp(w):
    """(..., 3) axis-angle -> (..., 3, 3) rotation (Rodrigues), differentiable and stable at 0."""
    theta2 = (w * w).sum(-1, keepdim=True).unsqueeze(-1)
    theta = torch.sqrt(theta2.clamp(min=1e-12))
    small = theta2 < 1e-8
    a = torch.where(small, 1.0 - theta2 / 6.0, torch.sin(theta) / theta)
    b = torch.where(small, 0.5 - theta2 / 24.0, (1.0 - torch.cos(theta)) / theta2.clamp(min=1e-12))
    zero = torch.zeros_like(w[..., 0])
    k = torch.stack([zero, -w[..., 2], w[..., 1],
                     w[..., 2], zero, -w[..., 0],
                     -w[..., 1], w[..., 0], zero], dim=-1).view(w.shape[:-1] + (3, 3))
    eye = torch.eye(3, dtype=w.dtype, device=w.device).expand_as(k)
    return eye + a * k + b * (k @ k)


def rotation_angle_error(w_pred, w_true):
    """(B,) angle [rad] of R_pred^T R_true."""
    rel = so3_exp(w_pred.double()).transpose(-1, -2) @ so3_exp(w_true.double())
    cos = ((rel.diagonal(dim1=-2, dim2=-1).sum(-1) - 1.0) / 2.0).clamp(-1.0, 1.0)
    return torch.arccos(cos)


def translation_error(t_pred, t_true):
    """(B,) Euclidean translation error [m]."""
    return torch.linalg.vector_norm(t_pred.double() - t_true.double(), dim=-1)


def auxiliary_parts(out: dict, target_n, valid, kind: str, rotation_weight: float,
                    calibrate_logvar: bool = True) -> dict:
    """{'aux_<head>': (per-sample loss (B,), valid (B,))} for each auxiliary head of the network
    (out['aux']: name -> (mean, logvar, present)): the pose loss on the samples where that
    head's input is present and the target valid (TrainerCore.combine weighs and averages)."""
    parts = {}
    for name, (mean, logvar, present) in out.get('aux', {}).items():
        per = per_sample_loss(mean.float(), logvar.float(), target_n, kind, rotation_weight,
                              calibrate_logvar)
        parts[f'aux_{name}'] = (per, valid & present)
    return parts
