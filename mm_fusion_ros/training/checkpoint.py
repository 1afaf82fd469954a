"""Checkpoint files (DESIGN §7): one format for the offline and the online trainer.

A checkpoint is `torch.save` of a dict of plain values and tensors:
  format_version, model (state dict), optimizer (state dict or None), config {model, train,
  sample}, step, epoch, metrics, frozen, normalization, optimizer_params, grad_scaler (amp's
  GradScaler state, or None without amp; absent in older files).
Writes go to a temporary file in the same folder, are fsynced and renamed over the target, so a
crash never leaves a half-written checkpoint. Reads use `torch.load(weights_only=True)`, which
refuses pickles that would construct arbitrary objects or run code.
"""
import errno
import logging
from pathlib import Path
import pickle
import warnings
import zipfile

import torch

from mm_fusion_ros.fileio import atomic_open

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
REQUIRED_KEYS = ('format_version', 'model', 'config', 'step', 'epoch', 'metrics', 'frozen')
PLAIN_TYPES = (str, int, float, bool, type(None), torch.Tensor)


def check_plain(value, where='checkpoint'):
    """Raise ValueError naming the first value that weights_only loading would refuse."""
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, (str, int)):
                raise ValueError(f'{where}: key {k!r} is not a str/int')
            check_plain(v, f'{where}[{k!r}]')
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            check_plain(v, f'{where}[{i}]')
    elif not isinstance(value, PLAIN_TYPES):
        raise ValueError(f'{where}: {type(value).__name__} is not a plain type; checkpoints hold '
                         'only dicts, lists, numbers, strings and tensors')


def save_checkpoint(path, payload: dict) -> Path:
    """Atomically write `payload` to `path` (parent folders created; fileio.atomic_open).
    Returns the path."""
    path = Path(path)
    missing = [k for k in REQUIRED_KEYS if k not in payload]
    if missing:
        raise ValueError(f'{path}: checkpoint payload lacks {missing}')
    check_plain(payload)
    with atomic_open(path, 'wb') as f:
        torch.save(payload, f)
    return path


def load_checkpoint(path) -> dict:
    """Read and validate a checkpoint; ValueError naming the file on anything unexpected."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'{path}: checkpoint not found')
    try:
        with warnings.catch_warnings():
            # torch warns about the pickle protocol of files it is about to refuse anyway.
            warnings.filterwarnings('ignore', message='Detected pickle protocol')
            payload = torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f'{path}: refused to load: not plain checkpoint data '
                         f'({_unpickle_reason(e)}); weights_only loading rejects corrupt files '
                         'and pickled objects, which could run code') from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, KeyError, IndexError,
            UnicodeDecodeError) as e:
        # IndexError: torch's unpickler on some random bytes (~5 % of 2 kB draws).
        raise ValueError(f'{path}: not a readable checkpoint (corrupt or truncated: {e})') from e
    except OSError as e:
        if e.errno != errno.EINVAL or e.filename:
            raise       # permissions, I/O errors: not the file's content, and they name it
        # errno 22 without a file name: torch on a zip whose directory points past its end.
        raise ValueError(f'{path}: not a readable checkpoint (corrupt or truncated: {e})') from e
    validate_payload(payload, path)
    return payload


def _unpickle_reason(error) -> str:
    """The informative line of torch's long weights_only error (e.g. the blocked GLOBAL)."""
    boiler = ('Weights only load failed', 'Please file an issue', 'Check the documentation')
    lines = [ln.strip() for ln in str(error).splitlines()
             if ln.strip() and not ln.strip().startswith(boiler)]
    return '; '.join(lines) or type(error).__name__


def validate_payload(payload, path) -> None:
    if not isinstance(payload, dict):
        raise ValueError(f'{path}: checkpoint holds a {type(payload).__name__}, expected a dict '
                         'written by mm_fusion_ros')
    missing = [k for k in REQUIRED_KEYS if k not in payload]
    if missing:
        raise ValueError(f'{path}: not an mm_fusion_ros checkpoint, missing keys {missing} '
                         f'(has {sorted(map(str, payload))[:12]})')
    if payload['format_version'] != FORMAT_VERSION:
        raise ValueError(f'{path}: checkpoint format_version {payload["format_version"]!r}, this '
                         f'code reads version {FORMAT_VERSION}')
    config = payload['config']
    if not isinstance(config, dict) or not isinstance(config.get('model'), dict):
        raise ValueError(f'{path}: checkpoint config must be a dict with a "model" section')
    if not isinstance(payload['model'], dict):
        raise ValueError(f'{path}: checkpoint "model" must be a state dict')


def epoch_checkpoint_path(output, epoch: int) -> Path:
    """pretrain_models/x.pth, 3 -> pretrain_models/x_epoch3.pth (beside the output)."""
    output = Path(output)
    return output.with_name(f'{output.stem}_epoch{epoch}{output.suffix or ".pth"}')


def checkpoint_imu_window(payload):
    """imu_window_s of a checkpoint's sample config, or None when it records none."""
    sample = ((payload or {}).get('config') or {}).get('sample') or {}
    value = sample.get('imu_window_s')
    return None if value is None else float(value)


def resolve_imu_window(requested, saved, source) -> float:
    """The IMU window [s] of a run on a trained model: `requested` when given (not None), else
    the window the model was trained with (`saved`, from checkpoint_imu_window), else 0 (the
    interval between scans). A requested window unlike the trained one is used, and logged."""
    if requested is None:
        return saved if saved is not None else 0.0
    if saved is not None and requested != saved:
        log.warning('%s was trained with IMU windows of %g s; using %g s', source, saved,
                    requested)
    return float(requested)
