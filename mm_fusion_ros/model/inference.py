"""Inference copies of a model: what eval mode computes, with fewer operations.

inference_copy(model) deep-copies the model and folds every BatchNorm that follows a
convolution in an nn.Sequential (encoders.conv_bn_relu) into that convolution's weight and bias
(torch.nn.utils.fusion.fuse_conv_bn_eval): in eval mode a BatchNorm is a fixed per-channel affine
map, so the folded convolution gives the same output up to float rounding. The copy is for
eval mode only (its BatchNorms are gone, so training it would differ) and has different
state-dict keys for the folded layers: rebuild it after the encoders' weights change.
"""
import copy

from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


def fold_conv_bn(module: nn.Module) -> int:
    """Fold, in place, each eval-mode BatchNorm directly after a Conv in an nn.Sequential into
    the Conv (the BatchNorm becomes nn.Identity, so indices stay). Returns how many."""
    folded = 0
    for child in module.modules():
        if not isinstance(child, nn.Sequential):
            continue
        layers = list(child)
        for i in range(len(layers) - 1):
            conv, bn = layers[i], layers[i + 1]
            if isinstance(conv, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and \
                    isinstance(bn, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)) and \
                    bn.track_running_stats and not conv.training and not bn.training:
                child[i] = fuse_conv_bn_eval(conv, bn)
                child[i + 1] = nn.Identity()
                folded += 1
    return folded


def inference_copy(model: nn.Module) -> nn.Module:
    """An eval-mode deep copy of `model` with its Conv+BatchNorm pairs folded; parameters
    without gradients. The original is left as it is."""
    out = copy.deepcopy(model).eval()
    fold_conv_bn(out)
    return out.requires_grad_(False)
