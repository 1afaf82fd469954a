"""OnlineTrainer (issue 7), the pure core of online fine-tuning: no rclpy, real model and buffer.

Samples come from make_tiny_kitti through the offline Dataset, i.e. the DESIGN §5 samples that the
synchronizer also builds. The model is small (Dummy visual encoder, a 32-cell BEV) so every test
takes well under a second of training.
"""
import dataclasses
import os
from pathlib import Path
import threading
import time

from conftest import make_tiny_kitti
import numpy as np
import pytest
import torch

from mm_fusion_ros.config import SampleConfig
from mm_fusion_ros.eval.trajectory_io import read_kitti_poses, read_steps
from mm_fusion_ros.filter.checkpoint import embed_filter, filter_payload, load_filter
from mm_fusion_ros.filter.config import FilterConfig
from mm_fusion_ros.geometry import chain_relative, invert_pose, vec6_to_pose
from mm_fusion_ros.kitti.dataset import collate_samples, KITTIOdomPointDataset
from mm_fusion_ros.kitti.odometry import KittiSequence
from mm_fusion_ros.model.config import ModelConfig
from mm_fusion_ros.runtime.params import as_number, TrainerParameters
from mm_fusion_ros.sync.config import BufferConfig
from mm_fusion_ros.sync.replay_buffer import open_buffer, ReplayBuffer
from mm_fusion_ros.training.checkpoint import load_checkpoint, save_checkpoint
from mm_fusion_ros.training.config import TrainConfig
from mm_fusion_ros.training.online import (
    initial_payload,
    is_resume,
    OnlineConfig,
    OnlineTrainer,
    sample_config_for,
    synthetic_sample,
)
from mm_fusion_ros.trajectory.chain import OnlineTrajectory, TrajectoryConfig

FRAMES = 9
MODEL = ModelConfig(image_height=16, image_width=48, visual_encoder='dummy', bev_cells=32,
                    bev_max_shift_cells=4, bev_channels=(4, 8, 16), point_dim=16, imu_channels=8,
                    imu_dim=8, visual_dim=8, fusion_dim=16, head_hidden=16)
TRAIN = TrainConfig(learning_rate=1e-3, batch_size=2)


@pytest.fixture(scope='module', autouse=True)
def one_torch_thread():
    """On 2 cores two intra-op threads made these tiny steps ~20x slower (measured): use one,
    as OnlineConfig.num_threads=1 does, and give the rest of the suite its setting back."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    root = make_tiny_kitti(tmp_path_factory.mktemp('kitti') / 'data', frames=FRAMES)
    sample_cfg = sample_config_for(MODEL, SampleConfig(max_points=128))
    dataset = KITTIOdomPointDataset(root, ['00'], sample_cfg=sample_cfg)
    samples = [dataset[i] for i in range(len(dataset))]
    return {'root': root, 'samples': samples, 'sample_cfg': sample_cfg}


def make_trainer(tmp_path, **online):
    cfg = OnlineConfig(checkpoint_dir=str(tmp_path / 'ckpt'), **online)
    return OnlineTrainer(cfg, TRAIN, MODEL)


def params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def feed_ground_truth(trainer, root):
    """The recorded ground truth, as the node hands it on: T_odom_base at each scan's stamp."""
    seq = KittiSequence(root, '00')
    for t, pose in zip(seq.times, seq.poses_base):
        trainer.trajectory.add_ground_truth(round(t * 1e9), pose)
    return seq.poses_base


def test_predictions_chain_into_trajectories(data, tmp_path):
    trainer = make_trainer(tmp_path, training_enabled=False)
    poses = feed_ground_truth(trainer, data['root'])
    preds = [trainer.on_sample(s) for s in data['samples']]
    assert [p.frame for p in preds] == list(range(1, FRAMES))
    # each published pose is the previous one times the predicted step
    expected = chain_relative([vec6_to_pose(p.mean) for p in preds])
    np.testing.assert_allclose(np.stack([p.pose for p in preds]), expected[1:], atol=1e-9)
    track, = trainer.trajectories()
    assert track.poses.shape == track.gt.shape == (FRAMES, 4, 4) and not track.bridged.any()
    np.testing.assert_allclose(track.poses, expected, atol=1e-9)
    # the ground truth is the recorded one, relative to the first scan
    np.testing.assert_allclose(track.gt, invert_pose(poses[0]) @ poses, atol=1e-9)
    np.testing.assert_allclose(preds[-1].poses[0].gt_pose, track.gt[-1], atol=1e-9)
    # with training off the inference copy is the untouched initial model: same output twice;
    # the sample goes back in time, so it starts a second segment
    again = trainer.on_sample(data['samples'][0])
    np.testing.assert_allclose(again.mean, preds[0].mean, atol=1e-6)
    assert [t.reason for t in trainer.trajectories()] == ['start', 'rewind']
    assert trainer.metrics()['online_samples'] == FRAMES
    assert trainer.metrics()['camera_masked_samples'] == 0
    # consecutive samples of the Dataset share a scan: each one after the first reused it
    # (the repeated first sample follows the last one, so it missed)
    assert (trainer.metrics()['scan_cache_hits'], trainer.metrics()['scan_cache_misses']) == \
        (FRAMES - 2, 2)


def test_a_sample_the_buffer_refuses_is_still_predicted_and_counted(data, tmp_path, caplog):
    """A replay buffer too small for one sample (buffer.max_bytes) loses the samples for
    training only: every pose is still predicted and chained, and the refusals are counted
    (before, on_sample raised after the prediction and no pose went out)."""
    cfg = OnlineConfig(checkpoint_dir=str(tmp_path / 'ckpt'))
    trainer = OnlineTrainer(cfg, TRAIN, MODEL, buffer=ReplayBuffer(BufferConfig(max_bytes=1000)))
    preds = [trainer.on_sample(s) for s in data['samples']]
    assert [p.frame for p in preds] == list(range(1, FRAMES))
    m = trainer.metrics()
    assert m['online_samples'] == FRAMES - 1 and m['buffer_size'] == 0
    assert m['buffer_rejected_samples'] == FRAMES - 1
    assert m['trajectory_poses'] == FRAMES
    assert 'not stored for training' in caplog.text and 'max_bytes' in caplog.text
    trainer.shutdown()


@pytest.mark.parametrize('mode', ['imu', 'velocity'])
def test_the_bridge_takes_the_imu_only_when_told_to(tmp_path, mode):
    """trajectory.bridge 'velocity' is constant velocity only: the node's use_imu handed the
    IMU to the bridge anyway, and it bridged with the gyro as 'imu' does."""
    traj = OnlineTrajectory(TrajectoryConfig(bridge=mode))
    trainer = OnlineTrainer(OnlineConfig(checkpoint_dir=str(tmp_path / 'ckpt')), TRAIN, MODEL,
                            trajectory=traj)
    stamps = np.arange(0, 2_000_000_001, 10_000_000)           # 100 Hz, turning
    gyro = np.tile([0.0, 0.0, 0.5], (len(stamps), 1))
    trainer.use_imu(lambda t0, t1: (stamps, gyro), None)
    step, cov = np.array([1.0, 0, 0, 0, 0, 0]), np.eye(6) * 1e-4
    traj.add_step(0, 100_000_000, step, cov)
    records = traj.add_step(300_000_000, 400_000_000, step, cov)   # the scan at 0.2 s is lost
    assert [r.bridged for r in records if r.bridged] == [mode]
    trainer.shutdown()


def test_step_debt_honours_updates_per_sample_and_cap(data, tmp_path):
    trainer = make_trainer(tmp_path, updates_per_sample=1.5, max_step_debt=4, min_buffer=2)
    s = data['samples']
    trainer.on_sample(s[0])
    assert trainer.pending_steps() == 0            # 1.5 owed, but the buffer is below min_buffer
    trainer.on_sample(s[1])
    assert trainer.pending_steps() == 3            # 3.0 owed
    assert trainer.train_pending(max_steps=1) == 1
    assert trainer.pending_steps() == 2
    for sample in s[2:5]:
        trainer.on_sample(sample)
    assert trainer.step_debt == 4.0                # 2 + 3 * 1.5 capped at max_step_debt
    before = params(trainer.core.model)
    assert trainer.train_pending() == 4
    assert trainer.pending_steps() == 0 and trainer.train_pending() == 0
    assert trainer.core.step_count == trainer.steps_done == 5
    after = params(trainer.core.model)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    # the inference copy follows the trained weights
    for k, v in trainer.infer_model.state_dict().items():
        assert torch.equal(v, after[k]), k


def test_no_step_starts_while_samples_wait_for_their_prediction(data, tmp_path):
    trainer = make_trainer(tmp_path, updates_per_sample=2.0, min_buffer=1)
    for sample in data['samples'][:3]:
        trainer.on_sample(sample)
    assert trainer.pending_steps() == 6
    trainer.set_backlog(2)                          # two samples still to predict
    assert trainer.pending_steps() == 0 and trainer.train_pending() == 0
    woke = threading.Event()
    waiter = threading.Thread(target=lambda: (trainer.wait_for_work(5.0), woke.set()))
    waiter.start()
    assert not woke.wait(0.3)                       # the training thread keeps waiting ...
    trainer.set_backlog(0)                          # ... until the predictions are done
    assert woke.wait(5.0)
    waiter.join()
    assert trainer.train_pending() == 6 and trainer.core.step_count == 6


def test_the_imu_window_comes_from_the_initial_checkpoint(data, tmp_path, caplog):
    trainer = make_trainer(tmp_path)
    trainer.sample_cfg = data['sample_cfg'].replace(imu_window_s=0.5)
    path = trainer.save_checkpoint(tmp_path / 'window.pth')
    resumed = make_trainer(tmp_path, initial_checkpoint=str(path))
    assert resumed.checkpoint_imu_window_s == 0.5
    # the node's default (0) takes the checkpoint's window; another one is used, and logged
    assert sample_config_for(MODEL, SampleConfig(), resumed.checkpoint_imu_window_s) \
        .imu_window_s == 0.5
    with caplog.at_level('WARNING'):
        assert sample_config_for(MODEL, SampleConfig(imu_window_s=1.0), 0.5).imu_window_s == 1.0
    assert 'trained with IMU windows of 0.5 s' in caplog.text
    assert make_trainer(tmp_path).checkpoint_imu_window_s is None   # a fresh model


def test_set_training_false_stops_steps(data, tmp_path):
    trainer = make_trainer(tmp_path, updates_per_sample=2.0, min_buffer=1)
    s = data['samples']
    trainer.on_sample(s[0])
    trainer.set_training(False)
    assert trainer.step_debt == 0.0
    for sample in s[1:4]:
        trainer.on_sample(sample)
    assert trainer.pending_steps() == 0 and trainer.train_pending() == 0
    assert trainer.core.step_count == 0 and len(trainer.buffer) == 4
    trainer.set_training(True)
    trainer.on_sample(s[4])
    assert trainer.train_pending() == 2 and trainer.core.step_count == 2
    assert trainer.metrics()['online_samples'] == 5


def test_set_training_false_waits_for_the_step_in_flight(data, tmp_path):
    trainer = make_trainer(tmp_path, updates_per_sample=1.0, min_buffer=1)
    for sample in data['samples'][:3]:
        trainer.on_sample(sample)
    started, release = threading.Event(), threading.Event()
    step = trainer.core.step

    def slow_step(batch):
        started.set()
        release.wait(10.0)
        return step(batch)

    trainer.core.step = slow_step
    worker = threading.Thread(target=trainer.train_pending, kwargs={'max_steps': 1})
    worker.start()
    assert started.wait(10.0)
    switch = threading.Thread(target=trainer.set_training, args=(False,))
    switch.start()
    switch.join(0.2)
    assert switch.is_alive(), 'set_training(False) returned while a step was still running'
    release.set()
    switch.join(10.0)
    worker.join(10.0)
    assert trainer.core.step_count == 1           # the step in flight finished, no other began
    assert trainer.train_pending() == 0


@pytest.mark.parametrize('error', [RuntimeError, TypeError])
def test_a_failing_step_is_paid_off_not_retried_forever(data, tmp_path, error):
    """Any exception (not only RuntimeError and ValueError) is a failed step, counted."""
    trainer = make_trainer(tmp_path, updates_per_sample=2.0, min_buffer=1)
    trainer.on_sample(data['samples'][0])
    step = trainer.core.step
    calls = []

    def fail_once(batch):
        calls.append(1)
        if len(calls) == 1:
            raise error('simulated failure')
        return step(batch)

    trainer.core.step = fail_once
    with pytest.raises(error, match='simulated'):
        trainer.train_pending()
    assert trainer.steps_failed == 1 and trainer.pending_steps() == 1
    assert trainer.train_pending() == 1 and trainer.pending_steps() == 0
    assert trainer.metrics()['online_steps_failed'] == 1


def test_checkpoint_is_atomic_and_loadable(data, tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path, updates_per_sample=1.0, min_buffer=2)
    for sample in data['samples'][:4]:
        trainer.on_sample(sample)
    trainer.train_pending()
    path = trainer.save_checkpoint()
    assert path == tmp_path / 'ckpt' / f'online_step{trainer.core.step_count:07d}.pth'
    payload = load_checkpoint(path)
    assert payload['step'] == trainer.core.step_count == 4   # owed below min_buffer too
    assert payload['metrics']['online_samples'] == 4
    assert payload['metrics']['online_steps'] == 4
    assert payload['config']['model'] == MODEL.to_dict()
    for k, v in trainer.core.model.state_dict().items():
        assert torch.equal(payload['model'][k], v), k
    # a write that dies half-way leaves the old file intact and no temporary file behind
    before = path.read_bytes()

    def broken_save(obj, f, *args, **kwargs):
        f.write(b'partial')
        raise OSError('disk full')

    monkeypatch.setattr(torch, 'save', broken_save)
    with pytest.raises(OSError, match='disk full'):
        trainer.save_checkpoint(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_checkpoints_taken_while_training_are_consistent(data, tmp_path):
    """Each checkpoint holds the state after a whole number of steps: AdamW's per-parameter
    step counters all equal the checkpoint's step (a snapshot taken mid-step would mix them)."""
    trainer = make_trainer(tmp_path, updates_per_sample=4.0, min_buffer=1)
    stop = threading.Event()

    def keep_training():
        while not stop.is_set():
            for sample in data['samples']:
                trainer.on_sample(sample)
                trainer.train_pending()

    worker = threading.Thread(target=keep_training)
    worker.start()
    try:
        payloads = [load_checkpoint(trainer.save_checkpoint(tmp_path / 'live.pth'))
                    for _ in range(6)]
    finally:
        stop.set()
        worker.join(60.0)
    assert len({p['step'] for p in payloads}) > 1, 'training did not run during the saves'
    for p in payloads:
        counters = {float(s['step']) for s in p['optimizer']['state'].values()}
        # (before the first step AdamW has no state yet)
        assert counters == ({float(p['step'])} if p['step'] else set()), (p['step'], counters)


def test_shutdown_writes_checkpoint_buffer_trajectories_and_log(data, tmp_path):
    out = tmp_path / 'out'
    trainer = make_trainer(tmp_path, updates_per_sample=1.0, min_buffer=2,
                           buffer_path=str(out / 'buffer.npz'), trajectory_dir=str(out / 'traj'),
                           log_csv=str(out / 'log.csv'), log_every=1)
    feed_ground_truth(trainer, data['root'])
    for sample in data['samples']:
        trainer.on_sample(sample)
        trainer.train_pending()
    written = trainer.shutdown()
    assert set(written) == {'checkpoint', 'buffer', 'pred', 'steps', 'gt', 'segments'}
    final = load_checkpoint(written['checkpoint'])
    assert Path(written['checkpoint']).name == 'final.pth'
    assert final['step'] == trainer.core.step_count == FRAMES - 1  # owed 1 per sample
    assert len(ReplayBuffer.load(written['buffer'])) == FRAMES - 1
    pred = read_kitti_poses(out / 'traj' / 'pred_base_link.txt')
    gt = read_kitti_poses(out / 'traj' / 'gt_base_link.txt')
    assert pred.shape == gt.shape == (FRAMES, 4, 4)
    np.testing.assert_allclose(pred, trainer.trajectories()[0].poses, atol=1e-9)
    assert read_steps(out / 'traj' / 'pred_base_link.steps.csv')['ground_truth'].all()
    assert (out / 'traj' / 'segments.csv').read_text().splitlines()[1].startswith('0,start,')
    rows = (out / 'log.csv').read_text().splitlines()
    assert rows[0].startswith('step,loss') and len(rows) == 1 + FRAMES - 1
    assert not list(tmp_path.rglob('*.tmp'))


def test_restart_resumes_buffer_weights_optimizer_and_step(data, tmp_path):
    buffer_path = tmp_path / 'buffer.npz'
    first = make_trainer(tmp_path, updates_per_sample=1.0, min_buffer=2,
                         buffer_path=str(buffer_path))
    for sample in data['samples'][:6]:
        first.on_sample(sample)
        first.train_pending()
    final = first.shutdown()['checkpoint']
    saved = load_checkpoint(final)

    buffer_cfg = BufferConfig(capacity=100)
    resumed = OnlineTrainer(OnlineConfig(initial_checkpoint=final, buffer_path=str(buffer_path),
                                         checkpoint_dir=str(tmp_path / 'ckpt2'), min_buffer=2),
                            TRAIN, buffer=open_buffer(buffer_path, buffer_cfg, data['sample_cfg']))
    metrics = resumed.metrics()
    assert metrics['resumed_buffer_samples'] == metrics['buffer_size'] == 6
    assert metrics['initial_step'] == saved['step'] == resumed.core.step_count == 6
    assert metrics['optimizer_resumed']
    for k, v in resumed.infer_model.state_dict().items():
        assert torch.equal(v, saved['model'][k]), k
    # the resumed buffer satisfies min_buffer at once: the first new sample is trained on
    resumed.on_sample(data['samples'][6])
    assert resumed.train_pending() == 1 and resumed.core.step_count == 7
    # a buffer of samples with another shape is refused, naming the file
    other = sample_config_for(MODEL, SampleConfig(max_points=64))
    with pytest.raises(ValueError, match='buffer.npz'):
        open_buffer(buffer_path, buffer_cfg, other)
    assert len(open_buffer(tmp_path / 'missing.npz', buffer_cfg, other)) == 0


def test_bad_config_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match='updates_per_sample >= 0'):
        OnlineConfig(updates_per_sample=-1.0)
    with pytest.raises(ValueError, match="device='tpu'"):
        OnlineConfig(device='tpu')
    with pytest.raises(FileNotFoundError, match='nope.pth'):
        OnlineTrainer(OnlineConfig(initial_checkpoint=str(tmp_path / 'nope.pth')), TRAIN)


def test_a_skipped_sample_is_bridged_not_lost(data, tmp_path):
    trainer = make_trainer(tmp_path, training_enabled=False)
    preds = [trainer.on_sample(s) for k, s in enumerate(data['samples']) if k != 4]
    bridged = [p for p in preds if len(p.poses) == 2]
    assert len(bridged) == 1 and bridged[0].poses[0].bridged == 'velocity'
    stamps = [r.stamp_ns for p in preds for r in p.poses]
    assert stamps == [round(s['meta']['stamp_cur'] * 1e9) for s in data['samples']]
    assert trainer.metrics()['trajectory_bridged'] == 1
    track, = trainer.trajectories()
    assert len(track.stamps_ns) == FRAMES and track.bridged.tolist().count(True) == 1


def test_run_time_parameters_are_applied_whole_or_not_at_all(tmp_path):
    trainer = make_trainer(tmp_path)
    params = TrainerParameters(trainer)
    ok, reason = params.update({'train.learning_rate': 1e-5, 'train.batch_size': 8})
    assert not ok and 'train.batch_size is fixed at start' in reason
    ok, reason = params.update({'training_enabled': False, 'train.learning_rate': -1.0})
    assert not ok and 'must be a number > 0' in reason
    assert trainer.training_enabled and trainer.core.optimizer.param_groups[0]['lr'] == 1e-3
    assert params.update({'training_enabled': False,
                          'train.learning_rate': as_number('1e-5')}) == (True, '')
    assert not trainer.training_enabled
    assert trainer.core.optimizer.param_groups[0]['lr'] == 1e-5


def test_autosave_failure_is_counted_and_training_goes_on(data, tmp_path):
    blocker = tmp_path / 'not_a_folder'
    blocker.write_text('')
    trainer = make_trainer(tmp_path, updates_per_sample=1.0, min_buffer=1,
                           autosave_interval_s=1e-6)
    trainer.cfg = trainer.cfg.replace(checkpoint_dir=str(blocker / 'ckpt'))
    for sample in data['samples'][:3]:
        trainer.on_sample(sample)
        with pytest.raises(OSError):
            trainer.train_pending()
    assert trainer.core.step_count == 3            # the steps ran; only the save failed
    m = trainer.metrics()
    assert (m['autosaves'], m['autosave_failures'], m['online_steps']) == (0, 3, 3)


def test_autosave_writes_checkpoint_and_buffer_and_resume_picks_the_newest(data, tmp_path):
    cfg = dict(updates_per_sample=1.0, min_buffer=1, autosave_interval_s=1e-6,
               buffer_path=str(tmp_path / 'buffer.npz'))
    first = make_trainer(tmp_path, **cfg)
    for sample in data['samples'][:4]:
        first.on_sample(sample)
        first.train_pending()
    assert first.metrics()['autosaves'] == 4
    autosave = load_checkpoint(tmp_path / 'ckpt' / 'autosave.pth')
    assert autosave['step'] == 4 and len(ReplayBuffer.load(tmp_path / 'buffer.npz')) == 4
    # a writer killed mid-write left a temporary file: the next start clears it
    (tmp_path / 'ckpt' / '.autosave.pth.abc123.tmp').write_bytes(b'partial')
    online = OnlineConfig(checkpoint_dir=str(tmp_path / 'ckpt'), resume=True,
                          initial_checkpoint=str(tmp_path / 'nope.pth'), **cfg)
    payload, source = initial_payload(online)
    assert Path(source).name == 'autosave.pth' and payload['step'] == 4
    resumed = OnlineTrainer(online, TRAIN, initial=(payload, source),
                            buffer=open_buffer(cfg['buffer_path'], BufferConfig(),
                                               data['sample_cfg']))
    assert resumed.core.step_count == 4 and resumed.metrics()['resumed_buffer_samples'] == 4
    assert not list((tmp_path / 'ckpt').glob('*.tmp'))


@pytest.mark.parametrize('order', [('autosave.pth', 'final.pth'), ('final.pth', 'autosave.pth')])
def test_resume_takes_the_checkpoint_saved_last_whatever_the_file_times(tmp_path, caplog, order):
    trainer = make_trainer(tmp_path, training_enabled=False)
    earlier, later = (trainer.checkpoint_path(name) for name in order)
    for step, path in enumerate((earlier, later), start=1):
        trainer.core.step_count = step      # stands in for the training between the saves
        trainer.save_checkpoint(path)
    # a `cp -r` or a restored backup: the file times say the opposite of the save order
    now = time.time()
    os.utime(earlier, (now + 100, now + 100))
    os.utime(later, (now - 100, now - 100))
    online = OnlineConfig(checkpoint_dir=str(tmp_path / 'ckpt'), resume=True)
    with caplog.at_level('INFO'):
        payload, source = initial_payload(online)
    assert (source, payload['step']) == (str(later), 2) and is_resume(online, source)
    assert f'resuming from {later}' in caplog.text
    # checkpoints written before the save time was recorded: their file times decide
    for path in (earlier, later):
        legacy = load_checkpoint(path)
        del legacy['saved_unix_s']
        save_checkpoint(path, legacy)
    os.utime(earlier, (now + 100, now + 100))
    assert initial_payload(online)[1] == str(earlier)


def test_resume_skips_a_checkpoint_that_cannot_be_loaded(tmp_path, caplog):
    trainer = make_trainer(tmp_path, training_enabled=False)
    autosave, final = trainer.checkpoint_path('autosave.pth'), trainer.checkpoint_path('final.pth')
    trainer.save_checkpoint(autosave)
    trainer.core.step_count = 5
    trainer.save_checkpoint(final)
    with open(final, 'r+b') as f:       # the one saved last, truncated
        f.truncate(final.stat().st_size // 2)
    online = OnlineConfig(checkpoint_dir=str(tmp_path / 'ckpt'), resume=True)
    with caplog.at_level('WARNING'):
        payload, source = initial_payload(online)
    assert (source, payload['step']) == (str(autosave), 0)
    assert f'{final} cannot be loaded' in caplog.text
    autosave.write_bytes(b'garbage')
    with pytest.raises(ValueError) as err:
        initial_payload(online)
    assert str(autosave) in str(err.value) and str(final) in str(err.value)


def test_autosave_runs_when_steps_keep_failing(data, tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path, updates_per_sample=1.0, min_buffer=1,
                           autosave_interval_s=1e-6)

    def failing_step(batch):
        raise RuntimeError('step failed')
    monkeypatch.setattr(trainer.core, 'step', failing_step)
    trainer.on_sample(data['samples'][0])
    with pytest.raises(RuntimeError, match='step failed'):
        trainer.train_pending()
    assert trainer.checkpoint_path('autosave.pth').is_file()
    m = trainer.metrics()
    assert (m['autosaves'], m['online_steps_failed']) == (1, 1)
    # the autosave fails too: the step's error is raised, the autosave's counted
    blocker = tmp_path / 'not_a_folder'
    blocker.write_text('')
    trainer.cfg = trainer.cfg.replace(checkpoint_dir=str(blocker / 'ckpt'))
    trainer.on_sample(data['samples'][1])
    with pytest.raises(RuntimeError, match='step failed'):
        trainer.train_pending()
    m = trainer.metrics()
    assert (m['autosaves'], m['autosave_failures'], m['online_steps_failed']) == (1, 1, 2)


def test_a_file_that_cannot_be_written_at_shutdown_does_not_stop_the_others(data, tmp_path):
    blocker = tmp_path / 'file'
    blocker.write_text('')
    trainer = make_trainer(tmp_path, buffer_path=str(blocker / 'buffer.npz'),
                           trajectory_dir=str(tmp_path / 'traj'), training_enabled=False)
    for sample in data['samples'][:3]:
        trainer.on_sample(sample)
    written = trainer.shutdown()
    assert [what for what, _ in trainer.write_failures] == ['buffer']
    assert Path(written['checkpoint']).is_file() and Path(written['pred']).is_file()


def test_self_supervised_training_needs_no_ground_truth_and_logs_each_term(data, tmp_path):
    """train.supervision self (the online default) on samples without a target, as a robot's
    are: the steps apply, the weights change, and each loss part reaches the CSV, TensorBoard
    and the /diagnostics values."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from mm_fusion_ros.runtime.diagnostics import trainer_status
    samples = [{**s, 'target': np.zeros_like(s['target']), 'target_valid': np.False_}
               for s in data['samples']]
    out = tmp_path / 'out'
    cfg = OnlineConfig(checkpoint_dir=str(tmp_path / 'ckpt'), min_buffer=2, log_every=1,
                       log_csv=str(out / 'log.csv'), tensorboard_dir=str(out / 'tb'))
    trainer = OnlineTrainer(cfg, TRAIN.replace(supervision='self'), MODEL)
    before = params(trainer.core.model)
    for sample in samples:
        trainer.on_sample(sample)
        trainer.train_pending()
    assert trainer.core.step_count == trainer.steps_done == FRAMES - 1
    after = params(trainer.core.model)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    metrics = trainer.metrics()
    assert metrics['samples_without_target'] == FRAMES - 1
    assert metrics['supervision'] == 'self'
    assert np.isnan(metrics['last_loss_gt']) and np.isfinite(metrics['last_loss_inertial'])
    status = trainer_status('t', metrics, {}, {})
    values = status.values
    assert values['supervision'] == 'self' and values['loss_gt'] == 'nan'
    assert status.level == 0
    # Samples the learner process missed, or whose prediction raised in the node: a warning.
    lost = trainer_status('t', {**metrics, 'learner_missed_samples': 3,
                                'intake_failed_samples': 0}, {}, {})
    assert lost.level == 1 and '3 learner_missed_samples' in lost.message
    assert lost.values['learner_missed_samples'] == '3'
    assert float(values['loss_inertial']) == pytest.approx(metrics['last_loss_inertial'],
                                                          rel=1e-5)
    trainer.shutdown()
    header, *rows = [r.split(',') for r in (out / 'log.csv').read_text().splitlines()]
    assert header[-4:] == ['loss_gt', 'loss_geometric', 'loss_photometric', 'loss_inertial']
    assert len(rows) == FRAMES - 1
    assert all(r[header.index('loss_gt')] == '' for r in rows)
    assert all(float(r[header.index('loss_inertial')]) >= 0 for r in rows)
    events = EventAccumulator(str(out / 'tb'))
    events.Reload()
    assert {'online/loss', 'online/loss_inertial'} <= set(events.Tags()['scalars'])
    assert 'online/loss_gt' not in events.Tags()['scalars']


def test_a_log_with_other_columns_is_started_afresh(data, tmp_path):
    log_csv = tmp_path / 'log.csv'
    log_csv.write_text('step,loss,lr\n1,0.5,0.001\n')     # a log of an older version
    trainer = make_trainer(tmp_path, min_buffer=1, log_csv=str(log_csv), log_every=1)
    trainer.on_sample(data['samples'][0])
    trainer.train_pending()
    trainer.shutdown()
    rows = log_csv.read_text().splitlines()
    assert rows[0].split(',')[-1] == 'loss_inertial' and len(rows) == 2


def test_predictions_use_the_moving_average_of_the_weights_with_prediction_ema(data, tmp_path):
    trainer = make_trainer(tmp_path, updates_per_sample=1.0, min_buffer=2, prediction_ema=0.75)
    start = params(trainer.core.model)
    for sample in data['samples'][:2]:
        trainer.on_sample(sample)
    assert trainer.train_pending(max_steps=1) == 1
    first = params(trainer.core.model)
    assert trainer.train_pending(max_steps=1) == 1
    second = params(trainer.core.model)
    infer = trainer.infer_model.state_dict()
    moved = 0
    for k, v in infer.items():
        if not v.is_floating_point():          # BatchNorm's step counter follows the model
            assert torch.equal(v, second[k]), k
            continue
        ema = 0.75 * (0.75 * start[k] + 0.25 * first[k]) + 0.25 * second[k]
        torch.testing.assert_close(v, ema, rtol=1e-5, atol=1e-6)
        moved += not torch.equal(v, second[k])
    assert moved, 'the prediction weights equal the trained ones: no average was taken'
    with pytest.raises(ValueError, match='prediction_ema'):
        OnlineConfig(prediction_ema=1.0)


def test_frozen_features_of_a_prediction_serve_the_first_step(data, tmp_path):
    """With the encoders frozen, the prediction's camera and LiDAR features go to the training
    model's feature cache: a new sample's first step skips those encoders, and the features
    are the ones the training model computes itself."""
    train = TrainConfig(learning_rate=1e-3, batch_size=2, freeze_visual=True, freeze_point=True,
                        freeze_imu=True, supervision='self', self_photometric_weight=0.0,
                        self_inertial_weight=0.0, self_geometric_solve=3)
    # no modality dropout: a LiDAR dropped in training changes the camera's input (its key)
    model = dataclasses.replace(MODEL, modality_dropout=0.0)
    trainer = OnlineTrainer(OnlineConfig(checkpoint_dir=str(tmp_path / 'ckpt'),
                                         updates_per_sample=0.0, min_buffer=1), train, model)
    cache = trainer.core.model.feature_cache
    trainer.on_sample(data['samples'][0])
    # handed over, not hashed on the prediction path: stored at the first training lookup
    assert cache.stored == 0 and not cache.entries and len(cache._pending) == 1
    trainer.step_debt = 1.0
    assert trainer.train_pending() == 1
    assert cache.stored == 2 and len(cache.entries) == 2     # camera and LiDAR, one sample
    assert (cache.hits, cache.misses) == (4, 0)    # a batch of 2 draws of the one sample
    stored = dict(cache.entries)
    cache.clear()
    trainer.step_debt = 1.0
    trainer.train_pending()                         # computed by the training model itself
    assert cache.misses == 4                        # both rows of both branches
    for key, row in cache.entries.items():
        torch.testing.assert_close(row, stored[key], atol=1e-5, rtol=1e-5)
    assert trainer.core.selfsup.solved.solved == 1 and trainer.core.selfsup.solved.reused == 3


def test_the_warm_up_leaves_nothing_behind_and_the_predictions_alone(data, tmp_path):
    """warm_up runs the prediction model on a synthetic sample of the run's shape before the
    first real one: the predictions, the buffer, the trajectory, the counters and the scan
    cache are those of a run without it."""
    cold = make_trainer(tmp_path / 'a', training_enabled=False, warm_up=0)
    warm = make_trainer(tmp_path / 'b', training_enabled=False, warm_up=2)
    before = params(warm.infer_model)
    assert cold.warm_up() == 0.0 and warm.warm_up() > 0.0
    assert all(torch.equal(v, before[k]) for k, v in params(warm.infer_model).items())
    assert (warm.samples_seen, len(warm.buffer), warm.scan_cache.hits,
            warm.scan_cache.misses) == (0, 0, 0, 0)
    assert warm.trajectory.stats() == cold.trajectory.stats()
    for sample in data['samples'][:4]:
        a, b = cold.on_sample(sample), warm.on_sample(sample)
        np.testing.assert_array_equal(a.mean, b.mean)
        np.testing.assert_array_equal(a.logvar, b.logvar)
    assert warm.metrics()['scan_cache_hits'] == cold.metrics()['scan_cache_hits'] == 3
    with pytest.raises(ValueError, match='warm_up'):
        OnlineConfig(warm_up=-1)


@pytest.mark.parametrize('frozen', [True, False])
def test_new_weights_keep_the_scan_cache_where_the_encoders_are_frozen(data, tmp_path, frozen):
    """Steps on the heads alone (finetune.yaml freezes the encoders) leave the cached scan
    features valid: the next prediction reuses them and equals an uncached forward with the
    new weights. Steps that reach the LiDAR encoder make it compute both scans again."""
    train = dataclasses.replace(TRAIN, freeze_visual=frozen, freeze_point=frozen,
                                freeze_imu=frozen)
    trainer = OnlineTrainer(OnlineConfig(checkpoint_dir=str(tmp_path / 'ckpt'),
                                         updates_per_sample=1.0, min_buffer=1), train, MODEL)
    samples = data['samples']
    for sample in samples[:2]:
        trainer.on_sample(sample)
    before = params(trainer.infer_model)
    assert trainer.train_pending() == 2
    assert any(not torch.equal(v, before[k]) for k, v in params(trainer.infer_model).items())
    cache = trainer.scan_cache
    hits, misses = cache.hits, cache.misses
    pred = trainer.on_sample(samples[2])
    assert (cache.hits - hits, cache.misses - misses) == ((1, 0) if frozen else (0, 1))
    with torch.inference_mode():
        out = trainer.infer_model(trainer.core.to_device(collate_samples([samples[2]])))
        mean, _ = trainer.infer_model.denormalize(out['mean'].float(), out['logvar'].float())
    np.testing.assert_allclose(pred.mean, mean[0].numpy(), rtol=1e-5, atol=1e-6)


def test_the_warm_up_takes_the_scan_caches_path_too(data, tmp_path, monkeypatch):
    """From its second pass on, the warm-up's sample has the previous pass's second scan as
    its first, as consecutive samples of a replay do: the cache's path (the new scan alone
    through the convolutions) runs before the first real sample."""
    import mm_fusion_ros.training.online as online
    caches = []

    class Recorded(online.ScanCache):
        def __init__(self):
            super().__init__()
            caches.append(self)
    trainer = make_trainer(tmp_path, training_enabled=False, warm_up=3)
    monkeypatch.setattr(online, 'ScanCache', Recorded)
    assert trainer.warm_up() > 0.0
    assert len(caches) == 1 and (caches[0].hits, caches[0].misses) == (2, 1)


def test_a_failed_warm_up_is_a_warning_not_a_node_that_does_not_start(tmp_path, monkeypatch,
                                                                       caplog):
    import mm_fusion_ros.training.online as online

    def broken(cfg):
        raise ValueError('no such shape')
    monkeypatch.setattr(online, 'synthetic_sample', broken)
    trainer = make_trainer(tmp_path, training_enabled=False)
    assert trainer.warm_up() >= 0.0
    assert 'warm-up of the prediction model failed (ValueError: no such shape)' in caplog.text


def test_synthetic_sample_has_the_shape_of_a_real_one(data):
    real, fake = data['samples'][0], synthetic_sample(data['sample_cfg'])
    assert set(fake) == set(real)
    for key, value in real.items():
        if key != 'meta':
            assert np.shape(fake[key]) == np.shape(value) and \
                np.asarray(fake[key]).dtype == np.asarray(value).dtype, key
    assert fake['modality_mask'].all() and fake['calib_valid'].all()
    assert fake['points_mask'].all()


def test_learning_rate_warms_up_over_the_first_steps(data, tmp_path):
    trainer = make_trainer(tmp_path, updates_per_sample=0.0, min_buffer=1, lr_warmup_steps=4)
    for sample in data['samples'][:2]:
        trainer.on_sample(sample)
    lrs = []
    for _ in range(6):
        trainer.step_debt = 1.0
        assert trainer.train_pending() == 1
        lrs.append(trainer.core.lr)
        if len(lrs) == 2:
            trainer.set_learning_rate(2e-3)     # a runtime change sets what the ramp reaches
    np.testing.assert_allclose(lrs, [2.5e-4, 5e-4, 1.5e-3, 2e-3, 2e-3, 2e-3])
    with pytest.raises(ValueError, match='lr_warmup_steps'):
        OnlineConfig(lr_warmup_steps=-1)


def test_a_filter_in_the_initial_checkpoint_travels_on_when_it_does_not_run(tmp_path):
    """filter.mode off: the filter does not run, yet the checkpoints written online carry the
    one the initial checkpoint embeds, so nothing the run started from is lost."""
    fresh = load_checkpoint(make_trainer(tmp_path).save_checkpoint(tmp_path / 'fresh.pth'))
    with_filter = save_checkpoint(tmp_path / 'with_filter.pth', embed_filter(
        fresh, filter_payload(FilterConfig(nhc_every=7))))
    resumed = make_trainer(tmp_path, initial_checkpoint=str(with_filter))
    assert resumed.filter is None
    cfg, noise = load_filter(resumed.save_checkpoint(tmp_path / 'online.pth'))
    assert cfg == FilterConfig(nhc_every=7) and noise is None
    assert 'filter' not in load_checkpoint(make_trainer(tmp_path).save_checkpoint(
        tmp_path / 'none.pth'))
