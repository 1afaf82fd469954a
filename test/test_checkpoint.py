"""Checkpoint files: atomic writes, weights_only loading, refusal of foreign/corrupt/malicious
files, rebuilding the model from the stored config, and config/optimizer mismatches."""
import os
from pathlib import Path
import pickle
import random

import numpy as np
import pytest
import torch

from mm_fusion_ros.config import SampleConfig
from mm_fusion_ros.kitti.dataset import collate_samples
from mm_fusion_ros.kitti.sample import build_sample
from mm_fusion_ros.model.config import ModelConfig
from mm_fusion_ros.model.net import build_model
from mm_fusion_ros.training import checkpoint as ckpt_mod
from mm_fusion_ros.training.checkpoint import (
    epoch_checkpoint_path,
    FORMAT_VERSION,
    load_checkpoint,
    save_checkpoint,
)
from mm_fusion_ros.training.config import TrainConfig
from mm_fusion_ros.training.core import TrainerCore

CFG = ModelConfig(image_height=16, image_width=32, bev_cells=16, bev_range_m=8.0,
                  bev_max_shift_cells=3, visual_channels=(8,), bev_channels=(4, 8, 8),
                  visual_dim=16, point_dim=16, imu_dim=8, fusion_dim=16, head_hidden=16)
SAMPLE_CFG = SampleConfig(image_height=16, image_width=32, max_points=64)


def batch(seed=0, n=2):
    rng = np.random.default_rng(seed)
    samples = []
    for k in range(n):
        scans = [rng.normal(0, 4, (80, 4)).astype(np.float32) for _ in range(2)]
        images = [rng.integers(0, 255, (16, 32, 3), dtype=np.uint8) for _ in range(2)]
        poses = [np.eye(4), np.eye(4)]
        poses[1][0, 3] = 0.8 + 0.1 * k
        samples.append(build_sample(SAMPLE_CFG, stamps=(0.0, 0.1), images=images, scans=scans,
                                    poses=poses, sequence='00', frame=k + 1))
    return collate_samples(samples)


@pytest.fixture
def trained(tmp_path):
    torch.set_num_threads(1)
    core = TrainerCore(CFG, TrainConfig(learning_rate=1e-3), 'cpu')
    for i in range(3):
        core.step(batch(i))
    core.epoch = 1
    path = save_checkpoint(tmp_path / 'models' / 'm.pth',
                           core.state_dict(metrics={'loss': 0.5}, sample_cfg=SAMPLE_CFG))
    return core, path


def test_round_trip_rebuilds_the_model_from_its_own_config(trained):
    core, path = trained
    ckpt = load_checkpoint(path)
    assert ckpt['format_version'] == FORMAT_VERSION and ckpt['step'] == 3
    assert ckpt['epoch'] == 1 and ckpt['metrics'] == {'loss': 0.5} and ckpt['frozen'] == []
    assert ckpt['config']['sample'] == SAMPLE_CFG.to_dict()
    assert len(ckpt['normalization']['imu_std']) == 6
    model = build_model(ModelConfig.from_dict(ckpt['config']['model']))
    model.load_state_dict(ckpt['model'])
    model.eval()
    core.model.eval()
    b = batch(9)
    torch.testing.assert_close(model(b)['mean'], core.model(b)['mean'], rtol=0, atol=0)
    assert [p.name for p in path.parent.iterdir()] == ['m.pth'], 'no temporary file left'


def test_resume_restores_optimizer_step_and_epoch(trained):
    core, path = trained
    fresh = TrainerCore(CFG, TrainConfig(learning_rate=1e-3), 'cpu')
    fresh.load_state_dict(load_checkpoint(path), source=path, load_optimizer=True)
    assert (fresh.step_count, fresh.epoch) == (3, 1)
    b = batch(5)
    torch.manual_seed(0)   # same dropout draws for both
    fresh.step(b)
    torch.manual_seed(0)
    core.step(b)
    for (name, p), q in zip(core.model.named_parameters(), fresh.model.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=0, msg=name)


def _amp_core():
    """A core training with amp as on CUDA (TrainerCore enables amp on CUDA only): autocast
    float16 and a GradScaler, here CPU's, doubling its scale after every finite step."""
    core = TrainerCore(CFG, TrainConfig(learning_rate=1e-3, amp=True), 'cpu')
    core.amp = True
    core.scaler = torch.amp.GradScaler('cpu', init_scale=1024.0, growth_interval=1)
    return core


def test_resume_with_amp_keeps_the_loss_scale(tmp_path):
    torch.set_num_threads(1)
    core = _amp_core()
    for i in range(3):
        assert core.step(batch(i)).applied
    assert core.scaler.get_scale() == 8192.0
    path = save_checkpoint(tmp_path / 'amp.pth', core.state_dict())
    payload = load_checkpoint(path)               # weights_only: the scaler state is plain
    assert payload['grad_scaler']['scale'] == 8192.0
    resumed = _amp_core()
    resumed.load_state_dict(payload, source=path, load_optimizer=True)
    assert resumed.scaler.get_scale() == 8192.0
    # Without amp now, or from a file without amp: nothing to restore, and nothing fails.
    plain = TrainerCore(CFG, TrainConfig(learning_rate=1e-3), 'cpu')
    plain.load_state_dict(payload, source=path, load_optimizer=True)
    assert plain.state_dict()['grad_scaler'] is None
    older = dict(payload)
    del older['grad_scaler']
    fresh = _amp_core()
    fresh.load_state_dict(older, source=path, load_optimizer=True)
    assert fresh.scaler.get_scale() == 1024.0


def test_interrupted_save_keeps_the_previous_file(trained, monkeypatch):
    core, path = trained
    before = path.read_bytes()

    def crash(obj, f):
        f.write(b'partial')
        raise OSError('disk full')

    monkeypatch.setattr(ckpt_mod.torch, 'save', crash)
    with pytest.raises(OSError, match='disk full'):
        save_checkpoint(path, core.state_dict())
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == ['m.pth']


def test_non_plain_payload_is_refused_before_writing(tmp_path):
    payload = {'format_version': 1, 'model': {}, 'config': {'model': {}}, 'step': 0,
               'epoch': 0, 'metrics': {'path': Path('/x')}, 'frozen': []}
    with pytest.raises(ValueError, match=r'metrics.*PosixPath'):
        save_checkpoint(tmp_path / 'x.pth', payload)
    assert not list(tmp_path.iterdir())


# Seeded random bytes: torch's unpickler fails on them in several ways (IndexError among them).
@pytest.mark.parametrize('content', [b'', b'not a checkpoint at all\n'] +
                         [random.Random(seed).randbytes(2048) for seed in range(8)])
def test_corrupt_files_are_refused_naming_the_file(tmp_path, content):
    path = tmp_path / 'broken.pth'
    path.write_bytes(content)
    with pytest.raises(ValueError, match='broken.pth'):
        load_checkpoint(path)


@pytest.mark.parametrize('keep', [0.02, 0.5, 0.9, 0.999])
def test_truncated_checkpoint_is_refused(trained, keep):
    """Where the file ends decides what torch raises (some cuts give a bare OSError, errno
    22, without the file's name); each is a ValueError naming it."""
    _, path = trained
    data = path.read_bytes()
    cut = path.with_name('cut.pth')
    cut.write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(ValueError, match=r'cut.pth: not a readable checkpoint'):
        load_checkpoint(cut)


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match='nope.pth'):
        load_checkpoint(tmp_path / 'nope.pth')


def test_foreign_dicts_are_refused(tmp_path):
    foreign = tmp_path / 'foreign.pth'
    torch.save({'state_dict': {'w': torch.ones(2)}, 'epoch': 3}, foreign)
    with pytest.raises(ValueError, match=r"foreign.pth: not an mm_fusion_ros checkpoint, "
                                         r"missing keys \['format_version', 'model'"):
        load_checkpoint(foreign)
    future = tmp_path / 'future.pth'
    torch.save({'format_version': 99, 'model': {}, 'config': {'model': {}}, 'step': 0,
                'epoch': 0, 'metrics': {}, 'frozen': []}, future)
    with pytest.raises(ValueError, match='future.pth: checkpoint format_version 99'):
        load_checkpoint(future)
    tensor = tmp_path / 'tensor.pth'
    torch.save(torch.zeros(3), tensor)
    with pytest.raises(ValueError, match='tensor.pth: checkpoint holds a Tensor'):
        load_checkpoint(tensor)


class Exploit:
    """Unpickling this would run a shell command (the classic __reduce__ attack)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


@pytest.mark.parametrize('writer', ['torch', 'pickle'])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, trained, writer):
    _, good = trained
    marker = tmp_path / 'pwned'
    payload = load_checkpoint(good)
    payload['metrics'] = {'x': Exploit(marker)}
    path = tmp_path / 'evil.pth'
    if writer == 'torch':
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    with pytest.raises(ValueError, match=r'evil.pth: refused to load.*(system|operand)'):
        load_checkpoint(path)
    assert not marker.exists()


def test_incompatible_config_names_the_mismatching_keys(trained):
    _, path = trained
    other = TrainerCore(CFG.replace(bev_cells=32, point_dim=24), TrainConfig(), 'cpu')
    with pytest.raises(ValueError, match=r'm.pth: checkpoint model config differs in: '
                                         r'bev_cells \(checkpoint 16, requested 32\); point_dim'):
        other.load_state_dict(load_checkpoint(path), source=path)


def test_weights_that_do_not_fit_are_a_clear_error(trained):
    _, path = trained
    payload = load_checkpoint(path)
    payload['model'] = {k: v for k, v in payload['model'].items() if not k.startswith('head.')}
    core = TrainerCore(CFG, TrainConfig(), 'cpu')
    with pytest.raises(ValueError, match=r'(?s)m.pth: model weights do not fit.*head.out.weight'):
        core.load_state_dict(payload, source=path)


def test_resuming_with_another_frozen_set_is_refused(trained):
    _, path = trained
    core = TrainerCore(CFG, TrainConfig(freeze_visual=True), 'cpu')
    ckpt = load_checkpoint(path)
    core.load_state_dict(ckpt, source=path)   # weights alone load fine
    with pytest.raises(ValueError, match=r"optimizer state covers other parameters.*now: "
                                         r"\['visual'\]"):
        core.load_state_dict(ckpt, source=path, load_optimizer=True)
    ckpt['optimizer'] = None
    with pytest.raises(ValueError, match='no optimizer state'):
        TrainerCore(CFG, TrainConfig(), 'cpu').load_state_dict(ckpt, source=path,
                                                              load_optimizer=True)


def test_epoch_checkpoint_names():
    assert epoch_checkpoint_path('pretrain_models/multimodal_finetuned.pth', 3) == \
        Path('pretrain_models/multimodal_finetuned_epoch3.pth')
    assert epoch_checkpoint_path('out/model', 1) == Path('out/model_epoch1.pth')
