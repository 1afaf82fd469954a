"""The learner process (issue 16): OnlineTrainer with learner='process', for real: a spawned
torch.multiprocessing process trains on the samples the predictor hands it through shared
memory and hands its weights back; no mocks. Same tiny model and samples as test_online_core.
"""
from dataclasses import replace
import multiprocessing
import os
from pathlib import Path
import signal
import threading
import time

from conftest import make_tiny_kitti
import numpy as np
import pytest
import torch

from mm_fusion_ros.config import SampleConfig
from mm_fusion_ros.kitti.dataset import KITTIOdomPointDataset
from mm_fusion_ros.model.config import ModelConfig
from mm_fusion_ros.runtime.params import TrainerParameters
from mm_fusion_ros.sync.config import BufferConfig
from mm_fusion_ros.sync.replay_buffer import ReplayBuffer
from mm_fusion_ros.training.checkpoint import load_checkpoint
from mm_fusion_ros.training.config import TrainConfig
from mm_fusion_ros.training.learner import (
    build_trainer,
    LearnerClient,
    LearnerError,
    ProcessOnlineTrainer,
)
from mm_fusion_ros.training.online import OnlineConfig, sample_config_for
from mm_fusion_ros.trajectory.chain import TrajectoryConfig

FRAMES = 9
MODEL = ModelConfig(image_height=16, image_width=48, visual_encoder='dummy', bev_cells=32,
                    bev_max_shift_cells=4, bev_channels=(4, 8, 16), point_dim=16, imu_channels=8,
                    imu_dim=8, visual_dim=8, fusion_dim=16, head_hidden=16)
TRAIN = TrainConfig(learning_rate=1e-3, batch_size=2)
DEADLINE_S = 30.0


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    root = make_tiny_kitti(tmp_path_factory.mktemp('kitti') / 'data', frames=FRAMES)
    sample_cfg = sample_config_for(MODEL, SampleConfig(max_points=128))
    dataset = KITTIOdomPointDataset(root, ['00'], sample_cfg=sample_cfg)
    return {'samples': [dataset[i] for i in range(len(dataset))], 'sample_cfg': sample_cfg}


@pytest.fixture
def make(tmp_path, data):
    made = []

    def build(filter_cfg=None, train=TRAIN, model=MODEL, **online):
        cfg = OnlineConfig(checkpoint_dir=str(tmp_path / 'ckpt'), learner='process',
                           num_threads=1, **online)
        trainer = build_trainer(cfg, train, model, data['sample_cfg'],
                                BufferConfig(capacity=50), TrajectoryConfig(), filter_cfg)
        made.append(trainer)
        return trainer
    yield build
    for trainer in made:     # a test that failed half way must not leave a learner behind
        if trainer.client.alive:
            trainer.client.process.kill()
            trainer.client.process.join(5)


def wait_until(condition, what):
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        assert time.monotonic() < deadline, f'no {what} within {DEADLINE_S} s'
        time.sleep(0.05)


def weights(trainer):
    return {k: v.detach().clone() for k, v in trainer.infer_model.state_dict().items()}


def test_the_learner_trains_and_the_predictor_takes_its_weights_between_samples(make, data):
    trainer = make(updates_per_sample=1.0, min_buffer=2)
    assert isinstance(trainer, ProcessOnlineTrainer) and trainer.client.alive
    assert os.getpid() != trainer.client.process.pid
    samples = data['samples']
    first = trainer.on_sample(samples[0])
    for s in samples[1:]:
        trainer.on_sample(s)
    # the learner may already have handed weights over during the loop; what counts is that
    # none reach the predictor after its last sample until the next one
    before, version = weights(trainer), trainer._version
    wait_until(lambda: trainer.metrics()['online_steps'] >= len(samples), 'steps')
    m = trainer.metrics()
    assert m['online_samples'] == len(samples) and m['buffer_size'] == len(samples)
    assert m['online_steps'] == trainer.core.step_count == len(samples)   # 1 per sample
    assert m['learner_missed_samples'] == 0 and m['learner_alive']
    # the weights reach the predictor at the next sample, not before: a version swap
    assert trainer._version == version
    assert trainer.client.weights.version.value > version
    assert all(torch.equal(before[k], v) for k, v in weights(trainer).items())
    again = trainer.on_sample(samples[0])
    assert trainer._version == trainer.client.weights.version.value > version
    assert any(not torch.equal(before[k], v) for k, v in weights(trainer).items())
    assert not np.allclose(again.mean, first.mean, atol=1e-7), 'the prediction did not change'
    trainer.shutdown()
    assert not trainer.client.alive and trainer.client.process.exitcode == 0


def test_the_predictor_hands_the_frozen_encoders_features_to_the_learner(make, data):
    """With frozen encoders the learner takes each sample's camera and LiDAR features from
    the predictor's forward pass instead of running those encoders again: its training
    lookups all hit (modality dropout off, so the camera's key never drops the LiDAR)."""
    model = replace(MODEL, modality_dropout=0.0)
    train = replace(TRAIN, freeze_visual=True, freeze_point=True)
    trainer = make(updates_per_sample=1.0, min_buffer=2, train=train, model=model)
    samples = data['samples']
    for s in samples:
        trainer.on_sample(s)
    wait_until(lambda: trainer.metrics()['online_steps'] >= len(samples) - 1, 'steps')
    m = trainer.metrics()
    assert m['feature_cache_hits'] >= 2 * 2 * (len(samples) - 1)   # rows x branches x steps
    assert m['feature_cache_misses'] == 0
    trainer.shutdown()


def test_heads_only_weights_reach_the_predictor_and_keep_its_scan_cache(make, data):
    """Steps on the heads alone (encoders frozen, as config/finetune.yaml): the predictor
    copies only what a step can change, holds exactly the learner's weights after the swap,
    and its cached scan features stay valid (a hit, not both scans again)."""
    train = replace(TRAIN, freeze_visual=True, freeze_point=True, freeze_imu=True)
    trainer = make(updates_per_sample=1.0, min_buffer=2, train=train)
    samples = data['samples']
    for s in samples[:4]:
        trainer.on_sample(s)
    wait_until(lambda: trainer.metrics()['online_steps'] >= 3, 'steps')
    trainer.set_training(False)          # no step may publish after the swap below
    shared = trainer.client.weights
    version, cache = shared.version.value, trainer.scan_cache
    hits, misses = cache.hits, cache.misses
    trainer.on_sample(samples[4])
    assert trainer._version == version > 1
    assert (cache.hits - hits, cache.misses - misses) == (1, 0)
    held = trainer.infer_model.state_dict()
    for key, dtype, offset, shape in shared.layout:
        view = shared.flats[dtype][offset:offset + int(np.prod(shape))].view(shape)
        assert torch.equal(held[key], view), key
    assert trainer._changing and all(k.split('.')[0] not in ('visual', 'point', 'imu')
                                     for k in trainer._changing)
    trainer.shutdown()


def test_the_learner_trains_beside_the_prediction_in_hand_and_waits_while_samples_queue(
        make, data):
    """The learner process runs at idle priority: it trains while the predictor works on one
    sample, and holds off only while more samples wait behind it."""
    trainer = make(updates_per_sample=1.0, min_buffer=2)
    samples = data['samples']
    trainer.set_backlog(2)                # one sample in hand, one waiting
    for s in samples:
        trainer.on_sample(s)
    trainer.metrics()                     # a round trip: every sample has reached the learner
    time.sleep(1.0)                       # ten of the learner's polls
    assert trainer.metrics()['online_steps'] == 0
    trainer.set_backlog(1)                # only the one being predicted
    wait_until(lambda: trainer.metrics()['online_steps'] >= len(samples),
               'steps beside a prediction')
    trainer.shutdown()


def test_save_checkpoint_via_the_learner_and_shutdown_files(make, data, tmp_path):
    trainer = make(updates_per_sample=1.0, min_buffer=2, buffer_path=str(tmp_path / 'buf.npz'),
                   log_csv=str(tmp_path / 'steps.csv'), log_every=1)
    for s in data['samples']:
        trainer.on_sample(s)
    wait_until(lambda: trainer.metrics()['online_steps'] >= 3, 'steps')
    path = trainer.save_checkpoint()
    assert path.parent == tmp_path / 'ckpt' and path.name.startswith('online_step')
    payload = load_checkpoint(path)     # weights_only=True
    assert payload['step'] >= 3 and payload['config']['model'] == MODEL.to_dict()
    assert payload['optimizer'] is not None
    assert payload['metrics']['online_samples'] == FRAMES - 1        # the predictor's count
    assert payload['metrics']['online_steps'] == payload['step']
    # an unwritable path is an error naming it, and the learner goes on
    with pytest.raises(LearnerError, match='not_a_dir'):
        (tmp_path / 'not_a_dir').write_text('')
        trainer.save_checkpoint(tmp_path / 'not_a_dir' / 'x.pth')
    assert trainer.client.alive
    written = trainer.shutdown()
    final = load_checkpoint(written['checkpoint'])
    assert final['metrics']['online_samples'] == FRAMES - 1
    assert len(ReplayBuffer.load(written['buffer'])) == FRAMES - 1
    rows = (tmp_path / 'steps.csv').read_text().splitlines()
    assert len(rows) - 1 == final['metrics']['online_steps'] >= 3    # the learner's CSV
    assert trainer.problems() == []


def test_set_training_false_stops_steps_and_the_learning_rate_reaches_the_learner(make, data,
                                                                                  tmp_path):
    trainer = make(updates_per_sample=2.0, min_buffer=2)
    trainer.set_learning_rate(1e-5)
    trainer.set_training(False)
    for s in data['samples']:
        trainer.on_sample(s)
    trainer.metrics()                   # a round trip: every sample has reached the learner
    a = load_checkpoint(trainer.save_checkpoint(tmp_path / 'a.pth'))
    assert a['metrics']['online_steps'] == 0 and a['metrics']['buffer_size'] == FRAMES - 1
    assert not a['metrics']['training_enabled']
    assert a['optimizer']['param_groups'][0]['lr'] == 1e-5
    trainer.set_training(True)
    trainer.on_sample(data['samples'][0])
    wait_until(lambda: trainer.metrics()['online_steps'] >= 2, 'steps after set_training(True)')
    trainer.set_training(False)         # returns after a step in flight: no step after it
    steps = trainer.core.step_count
    for s in data['samples']:
        trainer.on_sample(s)
    assert trainer.metrics()['online_steps'] == steps
    trainer.shutdown()


def test_a_sample_the_learner_cannot_store_is_reported_and_the_next_ones_are_stored(make, data):
    """Whatever a sample raises in the learner's intake thread is reported (the node's
    FaultLog, via train_pending) and the thread goes on: before, anything but a ValueError
    ended it, and from then on no slot was freed and no command answered."""
    trainer = make(updates_per_sample=0.0)
    samples = data['samples']
    slot, other = trainer.client.ring.write(samples[0], timeout=10.0)
    trainer.client.inbox.put(('sample', slot, other, 'not a meta dict'))   # AttributeError
    for s in samples[1:4]:
        trainer.on_sample(s)
    wait_until(lambda: trainer.metrics()['buffer_size'] == 3, 'the next samples stored')
    with pytest.raises(LearnerError, match='sample not stored: AttributeError'):
        trainer.train_pending()
    assert trainer.metrics()['learner_alive']
    trainer.shutdown()
    assert trainer.client.process.exitcode == 0


def test_errors_in_an_answer_that_came_too_late_are_still_reported():
    """A request that timed out (a learner busy with an autosave) gets its answer later; the
    learner's errors in it are not dropped with it."""

    client = LearnerClient.__new__(LearnerClient)
    client._replies, child_end = multiprocessing.Pipe(duplex=False)
    client._late_errors, client._late_lock = [], threading.Lock()
    child_end.send((1, True, {'errors': ['step: RuntimeError: late']}))   # for request 1
    child_end.send((2, True, {'errors': [], 'step': 7}))
    assert client._wait(2, 5.0, 'metrics') == {'errors': [], 'step': 7}
    assert client.take_late_errors() == ['step: RuntimeError: late']
    assert client.take_late_errors() == []


def test_ctrl_c_in_the_terminal_does_not_stop_the_learner_before_its_files(make, data,
                                                                           tmp_path):
    """Ctrl-C reaches the whole process group: the learner must wait for the predictor's
    shutdown, or the final checkpoint and the buffer are lost."""
    trainer = make(updates_per_sample=1.0, min_buffer=2, buffer_path=str(tmp_path / 'b.npz'))
    for s in data['samples'][:4]:
        trainer.on_sample(s)
    wait_until(lambda: trainer.metrics()['buffer_size'] == 4, 'samples stored')
    os.kill(trainer.client.process.pid, signal.SIGINT)
    trainer.client.process.join(2.0)               # returns early if the signal ended it
    assert trainer.client.alive
    written = trainer.shutdown()
    assert trainer.client.process.exitcode == 0
    assert Path(written['checkpoint']).exists() and Path(written['buffer']).exists()


def test_a_killed_learner_is_detected_and_is_a_problem(make, data):
    trainer = make(updates_per_sample=1.0)
    trainer.on_sample(data['samples'][0])
    os.kill(trainer.client.process.pid, signal.SIGKILL)
    trainer.client.process.join(10)
    with pytest.raises(LearnerError, match='died'):
        trainer.train_pending()
    assert trainer.train_pending() == 0            # reported again only after DEAD_REPORT_S
    assert trainer.on_sample(data['samples'][1]).frame == 2   # predictions go on
    assert not trainer.metrics()['learner_alive']
    with pytest.raises(LearnerError, match='not running'):
        trainer.save_checkpoint()
    # Run-time settings the learner cannot take are refused, and the predictor keeps its own
    # (before, the flag flipped and the service callback's exception stopped the executor).
    lr = trainer.core.optimizer.param_groups[0]['lr']
    with pytest.raises(LearnerError, match='not running'):
        trainer.set_training(False)
    assert trainer.training_enabled
    ok, reason = TrainerParameters(trainer).update({'train.learning_rate': 1e-5,
                                                    'training_enabled': False})
    assert not ok and reason.startswith('train.learning_rate not confirmed by the learner: ')
    assert trainer.core.optimizer.param_groups[0]['lr'] == lr and trainer.training_enabled
    trainer.shutdown()
    assert any('died' in p for p in trainer.problems())
    assert any('checkpoint' in p or 'learner' in p for p in trainer.problems())


def test_checkpoints_the_learner_writes_embed_the_predictors_filter(make, data):
    """The filter runs in the predictor; the learner writes the checkpoints: it gets the
    filter's section at spawn, so both modes' checkpoints carry it (DESIGN §10)."""
    from mm_fusion_ros.filter.checkpoint import load_filter
    from mm_fusion_ros.filter.online import OnlineFilterConfig
    trainer = make(filter_cfg=OnlineFilterConfig(mode='on'), min_buffer=2)
    assert trainer.filter is not None and trainer.filter_section is not None
    trainer.on_sample(data['samples'][0])
    cfg, noise = load_filter(trainer.save_checkpoint())   # weights_only, from the fusion file
    assert noise is None and cfg is not None
    written = trainer.shutdown()
    assert load_filter(written['checkpoint'])[0] == cfg
