"""The deployment guard (training/guard.py): online predictions use the adapted weights only
while their predicted steps lie significantly nearer the LiDAR's solved steps than the initial
weights' do (scored on samples not trained on yet).

The trainer tests run OnlineTrainer on rendered synthetic frames (a real scan pair per sample,
so the solved geometric term has a solution), with the pose head's output set to the true mean
step and then one copy (the one being trained, or the reference) moved 0.5 m off.
"""
import dataclasses
import multiprocessing
import time

import numpy as np
import pytest
import torch

from mm_fusion_ros.config import SampleConfig
from mm_fusion_ros.kitti.dataset import KITTIOdomPointDataset
from mm_fusion_ros.model.config import ModelConfig
from mm_fusion_ros.runtime.diagnostics import trainer_status
from mm_fusion_ros.sync.config import BufferConfig
from mm_fusion_ros.synthetic.writer import generate_sequence
from mm_fusion_ros.training import online as online_mod
from mm_fusion_ros.training.config import TrainConfig
from mm_fusion_ros.training.guard import DeploymentGuard
from mm_fusion_ros.training.learner import build_trainer, ProcessOnlineTrainer, SampleRing
from mm_fusion_ros.training.online import OnlineConfig, OnlineTrainer
from mm_fusion_ros.trajectory.chain import TrajectoryConfig

MODEL = ModelConfig(image_height=96, image_width=320, bev_cells=32, bev_range_m=12.8,
                    bev_max_shift_cells=4, visual_channels=(4, 8), point_dim=16, visual_dim=16,
                    fusion_dim=16, head_hidden=16, modality_dropout=0.0)
# The head alone adapts, on the solved geometric term (what the guard scores with).
HEAD = TrainConfig(learning_rate=1e-3, batch_size=2, supervision='self', freeze_visual=True,
                   freeze_point=True, freeze_imu=True, self_photometric_weight=0.0,
                   self_inertial_weight=0.0, self_geometric_solve=3)
OFF_M = 0.5

pytestmark = pytest.mark.usefixtures('one_torch_thread')


def test_guard_prefers_the_adapted_weights_only_on_significant_evidence_of_a_lower_score():
    guard = DeploymentGuard(window=4, min_samples=3, confidence=2.0)
    guard.add([0.1, 0.1], [0.2, 0.2], [True, True])
    assert not guard.prefer_adapted()                   # two samples are not enough
    guard.add([0.1, 5.0], [0.2, 0.0], [True, False])    # an unscorable row is only counted
    assert guard.prefer_adapted() and guard.unscorable == 1 and guard.scored == 3
    guard.add([0.5], [0.2], [True])                     # gains 0.1, 0.1, 0.1, -0.3: mean 0
    assert not guard.prefer_adapted()
    guard.add([0.1, 0.1, 0.1], [0.2, 0.2, 0.2], [True] * 3)     # the -0.3 is still in
    assert not guard.prefer_adapted()
    guard.add([0.1], [0.2], [True])                     # now it has left the window of 4
    assert guard.prefer_adapted()
    stats = guard.stats()
    assert stats['guard_switches'] == 3 and stats['guard_adapted_share'] == pytest.approx(2 / 5)
    assert stats['guard_candidate_score'] == pytest.approx(0.1)
    assert stats['guard_reference_score'] == pytest.approx(0.2)
    # a mean gain of 0.05 with a standard error of 0.15 is not enough at 2, enough at 0
    for confidence, expected in ((2.0, False), (0.0, True)):
        noisy = DeploymentGuard(window=4, min_samples=2, confidence=confidence)
        noisy.add([0.0, 0.3], [0.2, 0.2], [True, True])
        assert noisy.prefer_adapted() == expected
    with pytest.raises(ValueError, match='min_samples'):
        DeploymentGuard(window=3, min_samples=4)


def test_guard_retreats_at_once_when_the_adapted_weights_turn_consistently_worse():
    """A window of 50 that a long drive filled with gains keeps the adapted weights long after
    they turned worse (a stop); the recent check hands predictions back within `retreat`
    samples, and a noisy recent spell does not trigger it."""
    def drive_then_stop(retreat):
        guard = DeploymentGuard(window=50, min_samples=10, confidence=2.0, retreat=retreat)
        rng = np.random.default_rng(0)
        for _ in range(40):                             # the drive: clear gains
            guard.add([0.01 + 0.002 * rng.random()], [0.03 + 0.002 * rng.random()], [True])
        assert guard.prefer_adapted()
        decisions = []
        for _ in range(20):                             # the stop: consistently worse
            guard.add([0.0064 + 1e-4 * rng.random()], [1e-4 * rng.random()], [True])
            decisions.append(guard.prefer_adapted())
        return guard, decisions
    slow, decisions = drive_then_stop(retreat=0)
    assert all(decisions) and slow.margin() > 0         # the long window still prefers them
    quick, decisions = drive_then_stop(retreat=5)
    assert decisions.index(False) == 4 and not any(decisions[4:])   # at the 5th stop sample
    assert quick.stats()['guard_retreats'] == 16
    noisy = DeploymentGuard(window=50, min_samples=10, confidence=2.0, retreat=5)
    noisy.add([0.01] * 40, [0.03] * 40, [True] * 40)
    noisy.add([0.06, 0.0, 0.06, 0.0, 0.06], [0.03] * 5, [True] * 5)  # worse on average, noisy
    assert noisy.prefer_adapted() and noisy.retreats == 0
    with pytest.raises(ValueError, match='retreat'):
        DeploymentGuard(window=3, min_samples=2, retreat=1)
    with pytest.raises(ValueError, match='guard_retreat'):
        OnlineConfig(guard_retreat=1)
    assert DeploymentGuard(window=4, min_samples=2, retreat=10).retreat == 4   # the window's


@pytest.fixture(scope='module')
def samples(tmp_path_factory):
    root = tmp_path_factory.mktemp('guard')
    generate_sequence(root, '00', 6, seed=1, image_size=(400, 120), azimuth_steps=500, beams=32,
                      workers=1)
    cfg = SampleConfig(image_height=96, image_width=320, max_points=4096)
    dataset = KITTIOdomPointDataset(root, '00', sample_cfg=cfg)
    return [dataset[i] for i in range(len(dataset))]


def guarded_trainer(tmp_path, samples, learner='thread'):
    trainer = OnlineTrainer(OnlineConfig(checkpoint_dir=str(tmp_path), updates_per_sample=1.0,
                                         min_buffer=1, guard_window=4, guard_min_samples=2,
                                         learner=learner), HEAD, MODEL)
    truth = torch.tensor(np.mean([s['target'] for s in samples], axis=0), dtype=torch.float32)
    with torch.no_grad():
        for model in (trainer.core.model, trainer.reference, trainer.infer_model):
            model.target_mean.copy_(truth)     # the zero-initialised head predicts the truth
    return trainer


def off_by_half_a_metre(model):
    with torch.no_grad():
        model.head.out.bias[0] += OFF_M / float(model.target_std[0])


def head_bias(model):
    return model.head.out.bias.detach().clone()


def test_worse_adapted_weights_are_kept_from_the_predictions(tmp_path, samples):
    trainer = guarded_trainer(tmp_path, samples)
    off_by_half_a_metre(trainer.core.model)
    initial = head_bias(trainer.infer_model)
    for sample in samples:
        trainer.on_sample(sample)
        assert trainer.train_pending() == 1
    stats = trainer.metrics()
    assert trainer.core.selfsup.solved.solved == len(samples)     # one solve each, reused
    assert stats['guard_scored_samples'] == len(samples) and not stats['guard_adapted']
    assert stats['guard_candidate_score'] > 2 * stats['guard_reference_score']
    assert stats['guard_adapted_share'] == 0.0 and stats['online_steps'] == len(samples)
    assert not torch.equal(head_bias(trainer.core.model), initial)      # it did train
    assert torch.equal(head_bias(trainer.infer_model), initial)         # predictions did not
    shown = trainer_status('trainer', stats, {}, {}).values             # on /diagnostics
    assert shown['guard_adapted'] == 'False' and shown['guard_scored_samples'] == '5'


def test_better_adapted_weights_reach_the_predictions(tmp_path, samples):
    trainer = guarded_trainer(tmp_path, samples)
    off_by_half_a_metre(trainer.reference)          # the weights training started from
    trainer.on_sample(samples[0])
    trainer.train_pending()
    assert not trainer.metrics()['guard_adapted']   # one scored sample: not yet
    for sample in samples[1:]:
        trainer.on_sample(sample)
        trainer.train_pending()
    stats = trainer.metrics()
    assert stats['guard_adapted'] and stats['guard_switches'] == 1
    assert stats['guard_candidate_score'] < stats['guard_reference_score']
    assert torch.equal(head_bias(trainer.infer_model), head_bias(trainer.core.model))
    # and back: once the adapted weights score worse over a whole window (4 samples), the
    # reference's are handed over
    off_by_half_a_metre(trainer.core.model)
    off_by_half_a_metre(trainer.core.model)         # a metre off, the reference half a metre
    for sample in samples[:4]:
        trainer.on_sample(sample)
        trainer.train_pending()
    stats = trainer.metrics()
    assert not stats['guard_adapted'] and stats['guard_switches'] == 2
    assert torch.equal(head_bias(trainer.infer_model), head_bias(trainer.reference))


def buffered_frames(trainer):
    return sorted(int(s['meta']['frame']) for s in trainer.buffer._samples)


def test_a_learner_behind_the_replay_scores_and_trains_on_the_newest_samples(
        tmp_path, samples, monkeypatch):
    """Samples arrive faster than the learner prepares them: the newest GUARD_QUEUE wait for
    the guard, older ones are skipped and counted; each step first scores one waiting sample
    and stores it, so steps draw (and solve) only scored samples."""
    monkeypatch.setattr(online_mod, 'GUARD_QUEUE', 2)
    trainer = guarded_trainer(tmp_path, samples)
    for sample in samples:                              # 5 arrive before any step
        trainer.on_sample(sample)
    assert len(trainer.buffer) == 0 and trainer.metrics()['guard_skipped_samples'] == 3
    newest = sorted(int(s['meta']['frame']) for s in samples)[-2:]
    assert trainer.train_pending(max_steps=1) == 1
    stats = trainer.metrics()
    assert stats['guard_scored_samples'] == 1 and buffered_frames(trainer) == newest[:1]
    assert trainer.train_pending() == 4                 # 5 owed; the second scored first
    stats = trainer.metrics()
    assert stats['guard_scored_samples'] == 2 and buffered_frames(trainer) == newest
    assert trainer.core.selfsup.solved.solved == 2      # the skipped ones were never solved
    assert stats['online_steps'] == 5 and stats['guard_skipped_samples'] == 3


def test_each_scored_sample_gets_its_steps_before_the_next_is_scored(tmp_path, samples):
    trainer = guarded_trainer(tmp_path, samples)
    trainer.cfg = trainer.cfg.replace(updates_per_sample=2.0)
    for sample in samples[:3]:
        trainer.on_sample(sample)                       # 6 steps owed, 3 samples waiting
    scored = []
    for _ in range(6):
        assert trainer.train_pending(max_steps=1) == 1
        scored.append(trainer.metrics()['guard_scored_samples'])
    assert scored == [1, 1, 2, 2, 3, 3]


def test_waiting_samples_reach_the_buffer_when_training_stops(tmp_path, samples):
    trainer = guarded_trainer(tmp_path, samples)
    for sample in samples[:3]:
        trainer.on_sample(sample)
    assert len(trainer.buffer) == 0
    trainer.set_training(False)                         # nothing trains on them now: stored
    stats = trainer.metrics()
    assert len(trainer.buffer) == 3 and stats['guard_scored_samples'] == 0
    assert stats['guard_unscored_stored_samples'] == 3
    trainer.on_sample(samples[3])                       # and new ones go straight in
    assert len(trainer.buffer) == 4 and not trainer._may_admit()
    trainer.set_training(True)                          # on again: new ones wait for the guard
    trainer.on_sample(samples[4])
    assert len(trainer.buffer) == 4 and trainer.train_pending() == 1
    assert trainer.metrics()['guard_scored_samples'] == 1 and len(trainer.buffer) == 5


def test_a_waiting_sample_survives_the_reuse_of_its_shared_memory_slot(tmp_path, samples):
    """In the learner process a sample's arrays are views of a SampleRing slot, released
    once ingested: the sample waiting for the guard must not change when the slot is
    written again (it would be scored and stored with another sample's scans)."""
    sample_cfg = SampleConfig(image_height=96, image_width=320, max_points=4096)
    ring = SampleRing(multiprocessing.get_context('spawn'), sample_cfg, slots=1)
    trainer = guarded_trainer(tmp_path, samples)
    first, second = samples[1], samples[3]
    slot, other = ring.write(first)
    trainer.on_sample(ring.read(slot, other, dict(first['meta'])))
    ring.release(slot)
    slot_again, other = ring.write(second, timeout=10.0)   # the same memory, another sample
    assert slot_again == slot
    assert not np.array_equal(ring.views()['points'][slot], first['points'])
    assert trainer.train_pending() == 1
    stored = trainer.buffer._samples[0]
    assert int(stored['meta']['frame']) == int(first['meta']['frame'])
    for key in ('points', 'image', 'imu', 'target'):
        assert np.array_equal(stored[key], first[key]), key


def resume_guarded(tmp_path, learner='thread'):
    return build_trainer(OnlineConfig(checkpoint_dir=str(tmp_path), updates_per_sample=1.0,
                                      min_buffer=1, guard_window=4, guard_min_samples=2,
                                      resume=True, learner=learner, num_threads=1),
                         HEAD, MODEL, SampleConfig(image_height=96, image_width=320,
                                                   max_points=4096),
                         BufferConfig(capacity=50), TrajectoryConfig())


def test_a_resumed_run_goes_on_with_the_reference_the_guard_compared_against(tmp_path,
                                                                              samples):
    """The checkpoint's trained weights are ones the guard rejected: a resumed run must not
    deploy them, nor take them as its reference; it trains on from them."""
    trainer = guarded_trainer(tmp_path, samples)
    off_by_half_a_metre(trainer.core.model)
    initial = head_bias(trainer.infer_model)
    for sample in samples:
        trainer.on_sample(sample)
        trainer.train_pending()
    assert not trainer.metrics()['guard_adapted']
    trained = head_bias(trainer.core.model)
    trainer.save_checkpoint(trainer.checkpoint_path('final.pth'))
    resumed = resume_guarded(tmp_path)
    assert torch.equal(head_bias(resumed.core.model), trained)      # training goes on
    assert torch.equal(head_bias(resumed.reference), initial)       # the same reference
    assert torch.equal(head_bias(resumed.infer_model), initial)     # and predictions
    # an initial checkpoint that is not this run's own: its weights are the reference
    fresh = OnlineTrainer(OnlineConfig(checkpoint_dir=str(tmp_path / 'new'), guard_window=4,
                                       guard_min_samples=2,
                                       initial_checkpoint=str(tmp_path / 'final.pth')),
                          HEAD, MODEL)
    assert torch.equal(head_bias(fresh.reference), trained)
    # in the learner process: the predictor takes the reference with its first sample
    resumed = resume_guarded(tmp_path, learner='process')
    try:
        assert not torch.equal(head_bias(resumed.infer_model), initial)   # the payload's
        resumed.on_sample(samples[0])
        assert torch.equal(head_bias(resumed.infer_model), initial)
    finally:
        resumed.shutdown()


def test_the_guard_needs_the_solved_geometric_term(tmp_path, caplog):
    direct = dataclasses.replace(HEAD, self_geometric_solve=0)
    trainer = OnlineTrainer(OnlineConfig(checkpoint_dir=str(tmp_path), guard_window=4,
                                         guard_min_samples=2), direct, MODEL)
    assert trainer.guard is None and 'guard_window=4 is ignored' in caplog.text
    assert 'guard_adapted' not in trainer.metrics()
    with pytest.raises(ValueError, match='guard_min_samples'):
        OnlineConfig(guard_window=4, guard_min_samples=5)


def test_the_learner_process_runs_the_guard_and_reports_it(tmp_path, samples):
    """With learner:=process the learner keeps the guard (and the reference weights): it
    scores every sample it is handed, and its figures reach the node's metrics."""
    cfg = OnlineConfig(checkpoint_dir=str(tmp_path), learner='process', num_threads=1,
                       updates_per_sample=1.0, min_buffer=1, guard_window=4,
                       guard_min_samples=2)
    sample_cfg = SampleConfig(image_height=96, image_width=320, max_points=4096)
    trainer = build_trainer(cfg, HEAD, MODEL, sample_cfg, BufferConfig(capacity=50),
                            TrajectoryConfig())
    try:
        assert isinstance(trainer, ProcessOnlineTrainer) and trainer.guard is None
        for sample in samples:
            trainer.on_sample(sample)
        deadline = time.monotonic() + 60.0
        while trainer.metrics().get('guard_scored_samples', 0) < len(samples):
            assert time.monotonic() < deadline, f'guard figures: {trainer.metrics()}'
            time.sleep(0.1)
        stats = trainer.metrics()
        assert stats['online_steps'] >= 1 and stats['guard_unscorable_samples'] == 0
        assert stats['guard_candidate_score'] >= 0.0 and stats['guard_reference_score'] >= 0.0
    finally:
        trainer.shutdown()
    assert trainer.client.process.exitcode == 0


def test_a_sample_the_guard_cannot_score_does_not_stop_training(tmp_path, samples):
    trainer = guarded_trainer(tmp_path, samples)

    def broken(batch, **_):
        raise RuntimeError('reference copy broken')
    trainer.reference.forward = broken
    for sample in samples[:3]:
        trainer.on_sample(sample)
        assert trainer.train_pending() == 1
    stats = trainer.metrics()
    assert stats['guard_unscorable_samples'] == 3 and stats['guard_scored_samples'] == 0
    assert stats['online_steps'] == 3 and not stats['guard_adapted']
