"""Training-time augmentation of a collated batch; every transform keeps inputs and target
consistent. Returns a new dict (the caller's batch, e.g. a replay buffer entry, is untouched).

Yaw rotation rotates both scans by the same R about the vertical axis, i.e. it pretends the
vehicle frame was yawed by R. The relative pose is then conjugated, T' = R T R^-1, which for
the 6-vector means t' = R t and w' = R w. The IMU window (imu_link axes) is rotated by R seen
from imu_link, R_ib R R_ib^T with R_ib the rotation of the sample's t_imu_lidar (base_link =
velodyne): for an IMU axis-aligned with base_link that is R itself, for one mounted upside down
it turns the other way. A sample whose t_imu_lidar is unknown (calib_valid) is taken as
axis-aligned (KITTI's is within about 1 deg). The lever arm is left out: the yawed vehicle's IMU
would sit elsewhere and feel slightly other accelerations in turns. Images cannot
be re-rendered from a yawed viewpoint, so rotated samples have their camera masked off,
exactly like a dropped camera; `yaw_prob` < 1 keeps the rest of the batch with images.
Modality dropout (`drop`) masks whole inputs exactly as a missing sensor is masked.
"""
from dataclasses import dataclass
import math

import torch


@dataclass(frozen=True)
class AugmentParams:
    point_jitter_m: float = 0.0      # Gaussian noise on valid points' xyz [m]
    point_dropout: float = 0.0       # probability of masking each valid point
    yaw_max_deg: float = 0.0         # rotation angle ~ U(-max, max) about z
    yaw_prob: float = 0.5            # fraction of samples that get a yaw rotation
    brightness: float = 0.0          # additive shift ~ U(-b, b) * 255, same for both frames
    contrast: float = 0.0            # gain ~ U(1 - c, 1 + c) around the image mean
    drop: tuple = (0.0, 0.0, 0.0)    # probability of masking off camera, LiDAR, IMU per sample

    @property
    def active(self) -> bool:
        return any(v > 0 for v in (self.point_jitter_m, self.point_dropout, self.yaw_max_deg,
                                   self.brightness, self.contrast, *self.drop))


def yaw_matrices(angles):
    """(B,) angles -> (B, 3, 3) rotations about z."""
    c, s = torch.cos(angles), torch.sin(angles)
    zero, one = torch.zeros_like(c), torch.ones_like(c)
    return torch.stack([c, -s, zero, s, c, zero, zero, zero, one], dim=-1).view(-1, 3, 3)


def rotate_yaw(batch: dict, angles) -> dict:
    """Apply per-sample yaw `angles` (B,) consistently to points, IMU, target; mask the camera
    of every sample with a non-zero angle."""
    out = dict(batch)
    rot = yaw_matrices(angles.float())                                    # (B, 3, 3)
    pts = batch['points'].clone()
    pts[..., :3] = torch.einsum('bij,bsnj->bsni', rot, pts[..., :3].float())
    out['points'] = pts
    imu = batch['imu'].float()
    imu_rot = rot
    if 't_imu_lidar' in batch and 'calib_valid' in batch:
        r_ib = batch['t_imu_lidar'][:, :3, :3].float()
        known = batch['calib_valid'][:, 2].bool().view(-1, 1, 1)
        r_ib = torch.where(known, r_ib, torch.eye(3, device=r_ib.device).expand_as(r_ib))
        imu_rot = r_ib @ rot @ r_ib.transpose(1, 2)
    out['imu'] = torch.cat([torch.einsum('bij,bkj->bki', imu_rot, imu[..., :3]),
                            torch.einsum('bij,bkj->bki', imu_rot, imu[..., 3:])], dim=-1)
    tgt = batch['target'].float()
    out['target'] = torch.cat([torch.einsum('bij,bj->bi', rot, tgt[:, :3]),
                               torch.einsum('bij,bj->bi', rot, tgt[:, 3:])], dim=-1)
    mask = batch['modality_mask'].clone()
    mask[:, 0] &= angles == 0
    out['modality_mask'] = mask
    return out


def photometric(image, brightness: float, contrast: float):
    """uint8 (B, 2, 3, H, W) -> uint8 with one random gain/shift per sample (both frames)."""
    b = image.shape[0]
    x = image.float()
    gain = 1.0 + (torch.rand(b, device=x.device) * 2 - 1) * contrast
    shift = (torch.rand(b, device=x.device) * 2 - 1) * brightness * 255.0
    mean = x.mean(dim=(1, 2, 3, 4), keepdim=True)
    x = (x - mean) * gain.view(b, 1, 1, 1, 1) + mean + shift.view(b, 1, 1, 1, 1)
    return x.round().clamp(0, 255).to(torch.uint8)


def drop_modalities(mask, probs):
    """Mask off each present modality (B, 3) with its own probability, never all of a sample's:
    a sample that would lose every input keeps its mask. Trains each branch to carry the
    estimate without the others (a LiDAR dropped often makes the camera learn the step)."""
    keep = torch.rand(mask.shape, device=mask.device) >= torch.tensor(probs, device=mask.device)
    dropped = mask & keep
    return torch.where(dropped.any(dim=1, keepdim=True), dropped, mask)


def augment_batch(batch: dict, params: AugmentParams) -> dict:
    """Random augmentation drawn from torch's global RNG (seeded per epoch by the trainer)."""
    if not params.active:
        return batch
    out = dict(batch)
    valid = batch['points_mask']
    if params.point_dropout > 0:
        valid = valid & (torch.rand(valid.shape, device=valid.device) >= params.point_dropout)
        out['points_mask'] = valid
    if params.point_jitter_m > 0:
        pts = batch['points'].clone()
        noise = torch.randn_like(pts[..., :3]) * params.point_jitter_m
        pts[..., :3] += noise * valid.unsqueeze(-1)
        out['points'] = pts
    if params.yaw_max_deg > 0:
        b = batch['target'].shape[0]
        dev = batch['target'].device
        angles = (torch.rand(b, device=dev) * 2 - 1) * math.radians(params.yaw_max_deg)
        angles = torch.where(torch.rand(b, device=dev) < params.yaw_prob, angles,
                             torch.zeros_like(angles))
        out = rotate_yaw(out, angles)
    if params.brightness > 0 or params.contrast > 0:
        out['image'] = photometric(batch['image'], params.brightness, params.contrast)
    if any(p > 0 for p in params.drop):
        out['modality_mask'] = drop_modalities(out['modality_mask'].bool(), params.drop)
    return out
