"""TrainerCore and the offline trainer (train_multimodal.py) on tiny synthetic KITTI trees."""
import csv
import logging
import math
import os
from pathlib import Path
import subprocess
import sys

import numpy as np
import pytest
import torch

from mm_fusion_ros.config import SampleConfig
from mm_fusion_ros.geometry import pose_to_vec6, relative_pose
from mm_fusion_ros.kitti.dataset import collate_samples, KITTIOdomPointDataset
from mm_fusion_ros.kitti.odometry import KittiSequence, read_velodyne, write_velodyne
from mm_fusion_ros.model.config import ModelConfig
from mm_fusion_ros.model.normalization import sequence_statistics, target_statistics
from mm_fusion_ros.synthetic.writer import generate_sequence
from mm_fusion_ros.training.checkpoint import load_checkpoint, save_checkpoint
from mm_fusion_ros.training.config import TrainConfig
from mm_fusion_ros.training.core import TrainerCore
from mm_fusion_ros.training.distributed import DistInfo
from mm_fusion_ros.training.offline import build_core, build_parser

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / 'train_multimodal.py'
ALL = '00,01,02,03,04,05,06,07,08'
# Size flags for a fast model; the model ones are only allowed when not fine-tuning.
TINY_MODEL = ['--image_height', '32', '--image_width', '96', '--bev_cells', '32',
              '--bev_range_m', '12.8', '--bev_max_shift_cells', '4']
SMALL_SCANS = ['--max_points', '1024']


pytestmark = pytest.mark.usefixtures('one_torch_thread')


def synth(root, sequences, frames, azimuth_steps=180, beams=16):
    for seq in sequences:
        generate_sequence(root, seq, frames, seed=0, image_size=(96, 32),
                          azimuth_steps=azimuth_steps, beams=beams, workers=1)
    return root


@pytest.fixture(scope='module')
def plan_root(tmp_path_factory):
    """cwd of the plan's commands: data/ holds sequences 00..08 (5 frames each)."""
    root = tmp_path_factory.mktemp('plan')
    synth(root / 'data', ALL.split(','), frames=5)
    return root


def run_cli(args, cwd, expect_rc=0, launcher=None):
    env = dict(os.environ, OMP_NUM_THREADS='1',
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get('PYTHONPATH')])))
    cmd = (launcher or [sys.executable]) + [str(SCRIPT)] + [str(a) for a in args]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == expect_rc, f'{cmd}\nrc {proc.returncode}\n{proc.stderr[-3000:]}'
    return proc


def read_csv(path):
    with open(path, newline='') as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope='module')
def initial_ckpt(plan_root):
    """The initial model, trained by the plan's first step (no --finetune_checkpoint)."""
    run_cli(['--data_path', 'data', '--pointcloud_path', 'data/pointclouds',
             '--train_sequences', ALL, '--num_epochs', '1',
             '--output_checkpoint', 'pretrain_models/multimodal_initial.pth',
             *TINY_MODEL, *SMALL_SCANS], plan_root)
    return plan_root / 'pretrain_models' / 'multimodal_initial.pth'


def test_plan_finetune_command_exactly_as_written(plan_root, initial_ckpt):
    run_cli(['--data_path', 'data', '--pointcloud_path', 'data/pointclouds',
             '--train_sequences', '00,01,02,03,04,05,06,07,08',
             '--finetune_checkpoint', 'pretrain_models/multimodal_initial.pth',
             '--freeze_visual', '--learning_rate', '5e-5', '--num_epochs', '5',
             '--output_checkpoint', 'pretrain_models/multimodal_finetuned.pth',
             '--log_csv', 'logs/finetune.csv', '--save_every_epoch', '1', *SMALL_SCANS],
            plan_root)
    out = plan_root / 'pretrain_models'
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ['multimodal_initial.pth', 'multimodal_finetuned.pth'] +
        [f'multimodal_finetuned_epoch{n}.pth' for n in range(1, 6)])
    rows = read_csv(plan_root / 'logs' / 'finetune.csv')
    header = (plan_root / 'logs' / 'finetune.csv').read_text().splitlines()[0]
    assert header.startswith('epoch,loss,val_loss,val_trans_err,val_rot_err,lr,samples_per_s,'
                             'time_s,skipped')
    assert [r['epoch'] for r in rows] == ['1', '2', '3', '4', '5']
    assert all(int(r['train_samples']) == 36 for r in rows)
    lrs = [float(r['lr']) for r in rows]   # cosine schedule from 5e-5 down to 5 %
    assert 5e-5 > lrs[0] and lrs == sorted(lrs, reverse=True) and lrs[-1] >= 0.05 * 5e-5
    assert all(math.isfinite(float(r['loss'])) for r in rows)

    init, fine = load_checkpoint(initial_ckpt), load_checkpoint(out / 'multimodal_finetuned.pth')
    assert fine['config']['model'] == init['config']['model']
    assert fine['normalization'] == init['normalization']
    assert fine['frozen'] == ['visual'] and fine['epoch'] == 5 and fine['step'] == 5 * 18
    assert fine['optimizer'] is not None and fine['metrics']['epoch'] == 5
    visual = [k for k in init['model'] if k.startswith('visual.')]
    assert any(k.endswith('running_mean') for k in visual)
    for k in visual:   # weights and BatchNorm statistics of the frozen branch
        assert torch.equal(init['model'][k], fine['model'][k]), k
    changed = [k for k in init['model'] if k.startswith(('point.', 'fusion.', 'head.', 'imu.'))
               and not torch.equal(init['model'][k], fine['model'][k])]
    assert any(k.startswith('point.') for k in changed) and any(
        k.startswith('head.') for k in changed)
    epoch3 = load_checkpoint(out / 'multimodal_finetuned_epoch3.pth')
    assert epoch3['epoch'] == 3 and epoch3['optimizer'] is not None
    assert epoch3['config'] == fine['config']


def test_finetune_refuses_conflicting_model_flags(plan_root, initial_ckpt):
    proc = run_cli(['--data_path', 'data', '--train_sequences', '00',
                    '--finetune_checkpoint', initial_ckpt, '--bev_cells', '64',
                    '--output_checkpoint', 'x.pth'], plan_root, expect_rc=2)
    assert 'bev_cells' in proc.stderr and 'multimodal_initial.pth' in proc.stderr
    assert not (plan_root / 'x.pth').exists()


def test_a_finished_checkpoint_run_again_keeps_its_figures(plan_root, initial_ckpt, tmp_path):
    """--num_epochs already reached: nothing is trained, and the written checkpoint keeps the
    loss and epoch figures of the run that made it (they were replaced by the epoch alone)."""
    out = tmp_path / 'again.pth'
    run_cli(['--data_path', 'data', '--pointcloud_path', 'data/pointclouds',
             '--train_sequences', '00', '--finetune_checkpoint', initial_ckpt,
             '--resume_optimizer', '--num_epochs', '1', '--output_checkpoint', out,
             *SMALL_SCANS], plan_root)
    before = load_checkpoint(initial_ckpt)['metrics']
    after = load_checkpoint(out)['metrics']
    assert 'loss' in before and after == before


def test_resume_reproduces_an_uninterrupted_run(plan_root, tmp_path):
    # A constant learning rate makes a 1-epoch run the first half of a 2-epoch run.
    common = ['--data_path', plan_root / 'data', '--train_sequences', '0,1', '--batch_size', '2',
              '--seed', '7', '--aug_point_jitter', '0.02', '--aug_yaw_deg', '5',
              '--lr_schedule', 'constant', *SMALL_SCANS]
    run_cli([*common, *TINY_MODEL, '--num_epochs', '2', '--output_checkpoint', 'a.pth',
             '--log_csv', 'a.csv', '--save_every_epoch', '1'], tmp_path)
    run_cli([*common, *TINY_MODEL, '--num_epochs', '1', '--output_checkpoint', 'b.pth',
             '--log_csv', 'b.csv'], tmp_path)
    run_cli([*common, '--num_epochs', '2', '--finetune_checkpoint', 'b.pth',
             '--resume_optimizer', '--output_checkpoint', 'c.pth', '--log_csv', 'b.csv'],
            tmp_path)
    a1, b = load_checkpoint(tmp_path / 'a_epoch1.pth'), load_checkpoint(tmp_path / 'b.pth')
    for k in a1['model']:
        assert torch.equal(a1['model'][k], b['model'][k]), k
    a, c = load_checkpoint(tmp_path / 'a.pth'), load_checkpoint(tmp_path / 'c.pth')
    assert (a['epoch'], a['step']) == (c['epoch'], c['step']) == (2, 8)
    for k in a['model']:
        torch.testing.assert_close(c['model'][k], a['model'][k], rtol=1e-5, atol=1e-6)
    for pid, state in a['optimizer']['state'].items():
        torch.testing.assert_close(c['optimizer']['state'][pid]['exp_avg_sq'],
                                   state['exp_avg_sq'], rtol=1e-5, atol=1e-9)
    rows_a, rows_c = read_csv(tmp_path / 'a.csv'), read_csv(tmp_path / 'b.csv')
    assert [r['epoch'] for r in rows_c] == ['1', '2'], 'the resumed run appends to its log'
    assert float(rows_c[1]['loss']) == pytest.approx(float(rows_a[1]['loss']), rel=1e-5)


def test_two_process_torchrun_writes_one_checkpoint_and_one_csv(plan_root, tmp_path):
    launcher = [sys.executable, '-m', 'torch.distributed.run', '--standalone',
                '--nproc_per_node=2']
    run_cli(['--data_path', plan_root / 'data', '--train_sequences', '0,1', '--val_sequences',
             '2', '--batch_size', '2', '--num_epochs', '1', '--device', 'cpu',
             '--output_checkpoint', 'out/model.pth', '--log_csv', 'logs/train.csv',
             *TINY_MODEL, *SMALL_SCANS], tmp_path, launcher=launcher)
    assert [p.name for p in (tmp_path / 'out').iterdir()] == ['model.pth']
    assert [p.name for p in (tmp_path / 'logs').iterdir()] == ['train.csv']
    rows = read_csv(tmp_path / 'logs' / 'train.csv')
    assert len(rows) == 1
    # 8 training samples over 2 processes x batch 2: 2 synchronised steps; all 4 val samples.
    assert int(rows[0]['train_samples']) == 8 and int(rows[0]['steps']) == 4
    assert math.isfinite(float(rows[0]['val_trans_err']))
    ckpt = load_checkpoint(tmp_path / 'out' / 'model.pth')
    assert ckpt['step'] == 2 and ckpt['epoch'] == 1
    assert not any(k.startswith('module.') for k in ckpt['model'])


def test_integrity_failures_are_skipped_and_counted(plan_root, tmp_path):
    data = tmp_path / 'data'
    synth(data, ['00'], frames=5)
    scan_path = data / 'pointclouds' / 'sequences' / '00' / 'velodyne' / '000002.bin'
    scan = read_velodyne(scan_path)
    scan[5, 0] = np.nan
    write_velodyne(scan_path, scan)
    run_cli(['--data_path', data, '--train_sequences', '0', '--num_epochs', '1',
             '--output_checkpoint', 'm.pth', '--log_csv', 'log.csv', '--tensorboard_dir', 'tb',
             *TINY_MODEL, *SMALL_SCANS], tmp_path)
    row = read_csv(tmp_path / 'log.csv')[0]
    # Frame 2 is in samples 1->2 and 2->3: both skipped, the other two trained on.
    assert int(row['skipped']) == 2 and int(row['train_samples']) == 2
    events = list((tmp_path / 'tb').glob('events.out.tfevents.*'))
    assert len(events) == 1 and events[0].stat().st_size > 0


def mean_step(root, sequences):
    steps = [pose_to_vec6(relative_pose(s.poses_base[:-1], s.poses_base[1:]))
             for s in (KittiSequence(root, q) for q in sequences)]
    return np.concatenate(steps).mean(axis=0)


def test_the_validation_baseline_is_the_training_sets_mean_step_also_when_self_supervised(
        plan_root):
    """Under supervision self the model's target_mean is the zero prior: the mean-motion
    baseline was then 'no motion' (about 12x too easy in a review's run). It is the training
    sequences' mean step from their ground truth, wherever they have one."""
    args = build_parser().parse_args([
        '--data_path', str(plan_root / 'data'), '--train_sequences', '00,01',
        '--val_sequences', '03', '--supervision', 'self', *TINY_MODEL, *SMALL_SCANS])
    core, _, train_set, val_set = build_core(args, DistInfo())
    assert not core.model.target_mean.any()
    expected = target_statistics(s.poses_base for s in train_set.sequences)[0]
    np.testing.assert_allclose(core.baseline_step, expected)
    assert expected[0] > 0.3
    batch = collate_samples([val_set[i] for i in range(2)])
    t = batch['target'].float()
    metrics = core.evaluate([batch])
    want = float(np.linalg.norm(t[:, :3].numpy() - expected[:3], axis=1).mean())
    assert metrics['mean_motion_trans_err'] == pytest.approx(want, rel=1e-5)


def test_resume_flags_that_would_silently_change_the_run_are_refused_or_named(plan_root, caplog):
    """--resume_optimizer without a checkpoint started a fresh model over the output and the
    log; a resume with other training flags, and validation on a trained-on sequence, are
    named in the log."""
    base = ['--data_path', str(plan_root / 'data'), '--train_sequences', '00,01',
            *TINY_MODEL, *SMALL_SCANS]
    with pytest.raises(ValueError, match='--resume_optimizer resumes the checkpoint'):
        build_core(build_parser().parse_args(base + ['--resume_optimizer']), DistInfo())
    core, sample_cfg, *_ = build_core(
        build_parser().parse_args(base + ['--learning_rate', '1e-3']), DistInfo())
    ckpt = plan_root / 'resume_flags.pth'
    save_checkpoint(ckpt, core.state_dict(sample_cfg=sample_cfg))
    finetune = ['--data_path', str(plan_root / 'data'), '--train_sequences', '00,01',
                '--val_sequences', '01,02', *SMALL_SCANS]
    with caplog.at_level(logging.WARNING):
        build_core(build_parser().parse_args(finetune + [
            '--finetune_checkpoint', str(ckpt), '--resume_optimizer',
            '--learning_rate', '1e-4']), DistInfo())
    assert 'learning_rate 0.001 -> 0.0001' in caplog.text
    assert 'sequences 01 are both trained on and validated on' in caplog.text


def test_lidar_imu_model_beats_mean_motion_on_a_held_out_sequence(tmp_path):
    data = synth(tmp_path / 'data', [f'{i:02d}' for i in range(9)], frames=20,
                 azimuth_steps=360, beams=32)
    train = '00,01,02,04,05,06,07,08'
    held_out = KittiSequence(data, '03')
    gap = abs(mean_step(data, ['03'])[0] - mean_step(data, train.split(','))[0])
    assert gap > 0.15, 'the held-out drive must differ from the average one to be a test'
    run_cli(['--data_path', data, '--train_sequences', train, '--val_sequences', '03',
             '--modalities', 'lidar,imu', '--visual_encoder', 'dummy', '--batch_size', '4',
             '--learning_rate', '1e-3', '--num_epochs', '6', '--max_points', '2048',
             '--image_height', '32', '--image_width', '96', '--bev_cells', '64',
             '--bev_range_m', '12.8', '--bev_max_shift_cells', '6',
             '--output_checkpoint', 'm.pth', '--log_csv', 'log.csv'], tmp_path)
    last = read_csv(tmp_path / 'log.csv')[-1]
    model_err = float(last['val_trans_err'])
    baseline_err = float(last['val_mean_motion_trans_err'])
    assert int(last['train_samples']) == 8 * 19 and len(held_out) == 20
    assert baseline_err > 0.1
    assert model_err <= 0.5 * baseline_err, (model_err, baseline_err)


# --- TrainerCore in-process ------------------------------------------------------------------
@pytest.fixture(scope='module')
def samples(plan_root):
    cfg = SampleConfig(image_height=32, image_width=96, max_points=512)
    ds = KITTIOdomPointDataset(plan_root / 'data', ['00', '01'], sample_cfg=cfg)
    return [ds[i] for i in range(len(ds))], sequence_statistics(ds.sequences)


TINY_CFG = ModelConfig(image_height=32, image_width=96, bev_cells=32, bev_range_m=12.8,
                       bev_max_shift_cells=4, fusion_dropout=0.0, modality_dropout=0.0)


def test_overfitting_four_samples_cuts_the_loss_tenfold(samples):
    data, norm = samples
    batch = collate_samples(data[:4])
    core = TrainerCore(TINY_CFG, TrainConfig(learning_rate=1e-3, loss='l1',
                                             calibrate_logvar=False), 'cpu', norm)
    before = core.evaluate([batch])['loss']
    for _ in range(150):
        stats = core.step(batch)
        assert stats.applied
    after = core.evaluate([batch])['loss']
    assert after <= before / 10, (before, after)


@pytest.mark.parametrize('branch', ['visual', 'point', 'imu'])
def test_frozen_branch_stays_bit_identical(samples, branch):
    data, norm = samples
    core = TrainerCore(TINY_CFG, TrainConfig(**{f'freeze_{branch}': True}), 'cpu', norm)
    module = getattr(core.model, branch)
    frozen = {k: v.clone() for k, v in module.state_dict().items()}
    others = {k: v.clone() for k, v in core.model.state_dict().items()
              if not k.startswith(f'{branch}.') and v.is_floating_point()}
    in_optimizer = {id(p) for g in core.optimizer.param_groups for p in g['params']}
    assert all(not p.requires_grad and id(p) not in in_optimizer for p in module.parameters())
    for i in range(3):
        assert core.step(collate_samples(data[2 * i:2 * i + 2])).applied
    for k, v in module.state_dict().items():
        assert torch.equal(v, frozen[k]), k
    now = core.model.state_dict()
    assert sum(not torch.equal(now[k], v) for k, v in others.items()) > 10
    bn = [m for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(not m.training for m in bn) and core.model.training


def test_non_finite_samples_and_losses_are_skipped_and_counted(samples):
    data, norm = samples
    core = TrainerCore(TINY_CFG, TrainConfig(), 'cpu', norm)
    batch = collate_samples(data[:3])
    batch['target'][1, 0] = float('nan')
    stats = core.step(batch)
    assert stats.applied and stats.samples == 2 and stats.skipped == 1
    assert core.counters['skipped_nonfinite'] == 1

    before = {k: v.clone() for k, v in core.model.state_dict().items()}
    huge = collate_samples(data[:2])
    huge['imu'][:] = 3e38   # finite input, overflowing network
    stats = core.step(huge)
    assert not stats.applied and stats.skipped == 2 and core.step_count == 1
    assert core.counters['skipped_nonfinite'] == 3
    for k, v in core.model.state_dict().items():
        assert torch.equal(v, before[k]), k

    stats = core.step({'num_skipped': 2})   # a batch whose samples all failed integrity
    assert not stats.applied and stats.skipped == 2 and core.counters['skipped_integrity'] == 2
    metrics = core.evaluate([collate_samples(data[:2]), {'num_skipped': 1}])
    assert metrics['samples'] == 2 and metrics['skipped'] == 1


def test_predict_evaluate_and_learning_rate(samples, caplog):
    data, norm = samples
    with caplog.at_level(logging.WARNING):
        core = TrainerCore(TINY_CFG.replace(shift_prior=False, camera_prior=False),
                           TrainConfig(amp=True), 'cpu', norm)
    assert 'CUDA-only' in caplog.text and not core.amp
    batch = collate_samples(data[:2])
    mean, logvar = core.predict(batch)
    assert mean.shape == logvar.shape == (2, 6) and core.model.training
    # Without the LiDAR and camera priors the untrained head predicts the training-set mean step.
    torch.testing.assert_close(mean, core.model.target_mean.expand(2, 6))
    metrics = core.evaluate([batch])
    assert metrics['trans_err'] == pytest.approx(metrics['mean_motion_trans_err'], rel=1e-6)
    core.set_lr(3e-4)
    assert core.lr == 3e-4 and core.step(batch).lr == 3e-4
    with pytest.raises(ValueError, match='learning rate'):
        core.set_lr(0.0)


def test_train_config_validation():
    with pytest.raises(ValueError, match='loss'):
        TrainConfig(loss='mse')
    with pytest.raises(ValueError, match='aug_point_dropout'):
        TrainConfig(aug_point_dropout=1.5)
    assert TrainConfig(freeze_imu=True, freeze_visual=True).frozen == ('visual', 'imu')
    assert TrainConfig.from_dict(TrainConfig().to_dict()) == TrainConfig()


def test_fine_tuning_keeps_the_checkpoints_imu_window_unless_told(caplog):
    from mm_fusion_ros.training.checkpoint import checkpoint_imu_window, resolve_imu_window
    ckpt = {'config': {'sample': SampleConfig(imu_window_s=1.0).to_dict()}}
    assert resolve_imu_window(None, checkpoint_imu_window(ckpt), 'a.pth') == 1.0
    assert resolve_imu_window(None, checkpoint_imu_window(None), None) == 0.0
    # a checkpoint that recorded no sample config
    assert resolve_imu_window(None, checkpoint_imu_window({'config': {}}), 'old.pth') == 0.0
    with caplog.at_level(logging.WARNING):
        assert resolve_imu_window(0.5, checkpoint_imu_window(ckpt), 'a.pth') == 0.5
    assert 'a.pth was trained with IMU windows of 1 s; using 0.5 s' in caplog.text
