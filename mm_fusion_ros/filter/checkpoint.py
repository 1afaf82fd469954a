"""Filter checkpoints (DESIGN §7): standalone, or embedded in a fusion-model checkpoint.

Standalone: the §7 dict {format_version, model (noise-net state dict), optimizer None, config
{model: NoiseNetConfig, filter: FilterConfig, train: ...}, step, epoch, metrics, frozen} plus
kind 'imu_filter', written atomically and read with weights_only=True by training.checkpoint.
Embedded: the same dict (without its own format_version) under the key 'filter' of a fusion
payload, so one file carries the network and the filter under it.
"""
import numpy as np
import torch

from mm_fusion_ros.filter.config import FilterConfig
from mm_fusion_ros.filter.noise_net import build_noise_net, NoiseModel, NoiseNetConfig
from mm_fusion_ros.training.checkpoint import (
    check_plain,
    FORMAT_VERSION,
    load_checkpoint,
    save_checkpoint,
)

KIND = 'imu_filter'
EMBED_KEY = 'filter'
FILTER_KEYS = ('model', 'config', 'metrics')


def filter_payload(filter_cfg: FilterConfig, net=None, train_cfg=None,
                   metrics=None, step=0, epoch=0) -> dict:
    """A standalone filter checkpoint payload (plain values and tensors only); net: a
    NoiseNet or a NoiseEnsemble."""
    config = {'filter': filter_cfg.to_dict(),
              'model': net.cfg.to_dict() if net is not None else {},
              'train': train_cfg.to_dict() if train_cfg is not None else {}}
    state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()} if net else {}
    payload = {'format_version': FORMAT_VERSION, 'kind': KIND, 'model': state,
               'optimizer': None, 'config': config, 'step': int(step), 'epoch': int(epoch),
               'metrics': _plain_metrics(metrics or {}), 'frozen': False}
    check_plain(payload, 'filter checkpoint')
    return payload


def _plain_metrics(metrics):
    out = {}
    for k, v in metrics.items():
        if isinstance(v, dict):
            out[str(k)] = _plain_metrics(v)
        elif isinstance(v, (np.floating, np.integer)):
            out[str(k)] = v.item()
        else:
            out[str(k)] = v
    return out


def save_filter_checkpoint(path, payload: dict):
    return save_checkpoint(path, payload)


def embed_filter(fusion_payload: dict, payload: dict) -> dict:
    """A copy of a fusion-model checkpoint payload that also carries the filter (key 'filter')."""
    if not isinstance(fusion_payload, dict):
        raise ValueError('embed_filter needs a checkpoint payload dict')
    inner = {k: v for k, v in payload.items() if k != 'format_version'}
    out = dict(fusion_payload)
    out[EMBED_KEY] = inner
    check_plain(out, 'checkpoint with filter')
    return out


def filter_section(payload: dict, source='checkpoint') -> dict:
    """The filter part of a loaded payload: itself when standalone, else its 'filter' key."""
    if payload.get('kind') == KIND:
        return payload
    inner = payload.get(EMBED_KEY)
    if inner is None:
        raise ValueError(f'{source}: holds no inertial filter (no {EMBED_KEY!r} key and not a '
                         f'{KIND} checkpoint); train one with train_imu_filter')
    if not isinstance(inner, dict) or inner.get('kind') != KIND:
        raise ValueError(f'{source}: its {EMBED_KEY!r} entry is not an {KIND} section')
    return inner


def build_filter(section: dict, source='checkpoint', **overrides):
    """(FilterConfig, NoiseModel or None) from a filter section; overrides replace config
    fields (e.g. init_source='true_velocity' for a labelled comparison run)."""
    try:
        cfg = section['config']
        filter_cfg = FilterConfig.from_dict(cfg['filter'], allow_missing=True)
        if overrides:
            filter_cfg = filter_cfg.replace(**overrides)
        model = None
        if cfg.get('model'):
            net = build_noise_net(NoiseNetConfig.from_dict(cfg['model'], allow_missing=True))
            net.load_state_dict(section['model'])
            model = NoiseModel(net)
    except (KeyError, TypeError, RuntimeError) as e:
        raise ValueError(f'{source}: malformed {KIND} section ({e})') from e
    return filter_cfg, model


def load_filter(path, **overrides):
    """(FilterConfig, NoiseModel or None) from a standalone or fusion checkpoint file, loaded
    with weights_only=True."""
    payload = load_checkpoint(path)
    return build_filter(filter_section(payload, str(path)), str(path), **overrides)


def state_dict_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
