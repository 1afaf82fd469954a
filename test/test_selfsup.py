"""Self-supervised losses (model/selfsup.py) on rendered synthetic frames, and training with them.

The geometric and photometric terms must be smallest at the true relative pose and, from a pose
perturbed in any one of the six degrees of freedom, their gradient must point back toward it;
the gyro term must vanish at the true rotation; a masked-off modality or unknown calibration
must contribute nothing.
"""
import csv
import os
from pathlib import Path
import shutil
import subprocess
import sys

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
import torch

from mm_fusion_ros.cli import predict_odometry
from mm_fusion_ros.config import SampleConfig
from mm_fusion_ros.eval.trajectory_io import read_kitti_poses
from mm_fusion_ros.geometry import cam0_to_base_link, make_pose, rpy_to_rot, so3_exp, vec6_to_pose
from mm_fusion_ros.kitti.dataset import collate_samples, KITTIOdomPointDataset
from mm_fusion_ros.kitti.sample import build_sample, Calibration, ImuData
from mm_fusion_ros.model import selfsup
from mm_fusion_ros.model.config import ModelConfig
from mm_fusion_ros.model.selfsup import (
    gyro_rotation,
    SelfSupervisedLoss,
    SelfSupParams,
    TERMS,
)
from mm_fusion_ros.synthetic.writer import generate_sequence
from mm_fusion_ros.training.checkpoint import load_checkpoint
from mm_fusion_ros.training.config import TrainConfig
from mm_fusion_ros.training.core import TrainerCore

REPO = Path(__file__).resolve().parents[1]
# Rendered at 400x120 and resized to the model's 320x96: the intrinsics are scaled on the way.
CFG = SampleConfig(image_height=96, image_width=320, max_points=4096)
PERTURB = (0.3, 0.3, 0.3, 0.02, 0.02, 0.02)   # m, m, m, rad, rad, rad
DOF = ('x', 'y', 'z', 'roll', 'pitch', 'yaw')


pytestmark = pytest.mark.usefixtures('one_torch_thread')


@pytest.fixture(scope='module')
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp('selfsup')
    generate_sequence(root, '00', 3, seed=0, image_size=(400, 120), azimuth_steps=500, beams=32,
                      workers=1)
    return root


@pytest.fixture(scope='module')
def batch(world):
    dataset = KITTIOdomPointDataset(world, '00', sample_cfg=CFG)
    out = collate_samples([dataset[0], dataset[1]])
    assert out['calib_valid'].all() and out['modality_mask'].all()
    return out


@pytest.mark.parametrize('term', ['geometric', 'photometric'])
@pytest.mark.parametrize('dof', range(6))
def test_term_is_smallest_at_the_true_pose_and_its_gradient_points_back(batch, term, dof):
    loss = SelfSupervisedLoss(SelfSupParams(geo_points=2048))
    truth = batch['target'].float()
    at_truth, valid = loss(truth, batch, terms=(term,))[term]
    assert valid.all()
    for sign in (1.0, -1.0):
        pose = truth.clone()
        pose[:, dof] += sign * PERTURB[dof]
        pose.requires_grad_(True)
        value, valid = loss(pose, batch, terms=(term,))[term]
        assert valid.all()
        assert (at_truth < value.detach()).all(), (DOF[dof], sign, at_truth, value)
        value.sum().backward()
        # A gradient step (pose - lr * grad) moves this degree of freedom back toward the truth.
        step = -pose.grad[:, dof]
        assert (torch.sign(step) == -sign).all(), (DOF[dof], sign, pose.grad)
        lr = 0.1 * PERTURB[dof] / step.abs()
        moved = pose.detach().clone()
        moved[:, dof] += lr * step
        assert (loss(moved, batch, terms=(term,))[term][0] < value.detach()).all()


def imu_window_sample(T_imu_lidar, rate_base, bias, window_s, dt=0.1):
    """A sample whose gyro (in imu_link) turns base_link at rate_base over (t_prev, t_cur] and
    at a fast-changing rate before t_prev (inside a window longer than dt), plus a constant
    bias. The window rows fall every 10 ms, on t_prev too, so the resampling is exact."""
    t_prev, t_cur = 1.0, 1.0 + dt
    stamps = np.arange(0.0, 2.0, 0.005)
    before = np.minimum(stamps - t_prev, 0.0)[:, None] * [5.0, -7.0, 11.0]
    rate = rate_base + before
    gyro = rate @ T_imu_lidar[:3, :3].T + bias            # w_imu = R_imu_lidar w_base
    accel = np.tile([0.0, 0.0, 9.81], (len(stamps), 1))
    span = window_s or dt
    cfg = SampleConfig(image_height=8, image_width=8, max_points=16,
                       imu_steps=int(round(span / 0.01)) + 1, imu_window_s=window_s,
                       modalities=('imu',))
    sample = build_sample(cfg, stamps=(t_prev, t_cur), imu=ImuData(stamps, accel, gyro),
                          calibration=Calibration(t_imu_lidar=T_imu_lidar))
    return collate_samples([sample])


@pytest.mark.parametrize('window_s', [0.0, 0.3])
def test_gyro_term_is_zero_at_the_true_rotation(window_s):
    T_imu_lidar = make_pose(rpy_to_rot(0.02, -0.01, np.pi / 2), [0.8, -0.3, 0.8])
    rate = np.array([0.01, -0.02, 0.3])
    batch = imu_window_sample(T_imu_lidar, rate, bias=[0.001, -0.0005, 0.0015],
                              window_s=window_s)
    assert float(batch['imu_span'][0]) == pytest.approx(window_s or 0.1)
    truth = torch.zeros(1, 6)
    truth[0, 3:] = torch.from_numpy(rate * 0.1)
    gyro = gyro_rotation(batch['imu'], batch['dt'], batch['imu_span'], batch['t_imu_lidar'])
    # The bias shows in the integral (0.1 s x 0.0019 rad/s); the dead band allows for it.
    np.testing.assert_allclose(gyro[0].numpy(), so3_exp(rate * 0.1), atol=3e-4)
    loss = SelfSupervisedLoss()
    value, valid = loss(truth, batch, terms=('inertial',))['inertial']
    assert valid.all() and float(value) == 0.0
    for axis in range(3):
        wrong = truth.clone()
        wrong[0, 3 + axis] += 0.002
        wrong.requires_grad_(True)
        value, _ = loss(wrong, batch, terms=('inertial',))['inertial']
        value.sum().backward()
        assert float(value.detach()) > 0 and float(wrong.grad[0, 3 + axis]) > 0
    assert not wrong.grad[0, :3].any()   # the gyro says nothing about translation


def test_rendered_gyro_term_is_zero_at_the_true_rotation(batch):
    loss = SelfSupervisedLoss()
    value, valid = loss(batch['target'].float(), batch, terms=('inertial',))['inertial']
    assert valid.all() and (value == 0).all()


@pytest.mark.parametrize('off', ['camera', 'lidar', 'imu', 'intrinsics', 't_cam_lidar',
                                 't_imu_lidar'])
def test_masked_off_modality_or_unknown_calibration_adds_no_term(batch, off):
    dead = dict(batch)
    if off in ('camera', 'lidar', 'imu'):
        mask = batch['modality_mask'].clone()
        mask[0, ('camera', 'lidar', 'imu').index(off)] = False
        dead['modality_mask'] = mask
    else:
        valid = batch['calib_valid'].clone()
        valid[0, ('intrinsics', 't_cam_lidar', 't_imu_lidar').index(off)] = False
        dead['calib_valid'] = valid
    if off == 'camera':   # a dead camera delivers black frames: they must not count
        dead['image'] = torch.zeros_like(batch['image'])
    needs = {'geometric': ('lidar',), 'photometric': ('camera', 'lidar', 'intrinsics',
                                                      't_cam_lidar'),
             'inertial': ('imu', 't_imu_lidar')}
    pose = (batch['target'].float() + 0.05).requires_grad_(True)
    out = SelfSupervisedLoss()(pose, dead)
    for term in TERMS:
        value, valid = out[term]
        lost = off in needs[term]
        assert valid.tolist() == [not lost, True], term
        if lost:
            assert float(value[0].detach()) == 0.0
            grad, = torch.autograd.grad(value.sum(), pose, allow_unused=True, retain_graph=True)
            assert grad is None or not grad[0].any(), term
    # TrainerCore under `self`: the dead sample adds no count to the lost terms.
    model = ModelConfig(image_height=96, image_width=320, bev_cells=32, bev_range_m=12.8,
                        bev_max_shift_cells=4, visual_channels=(4, 8), point_dim=16,
                        visual_dim=16, fusion_dim=16, head_hidden=16)
    core = TrainerCore(model, TrainConfig(supervision='self', batch_size=2), 'cpu')
    stats = core.step(dead)
    assert stats.applied and stats.samples == 2
    for term in TERMS:
        assert stats.term_samples[term] == (1 if off in needs[term] else 2), term
    assert 'gt' not in stats.terms


def test_photometric_levels_beyond_the_image_do_not_shrink_the_term(batch):
    """96-pixel-high images have 5 pyramid levels of at least 4 pixels: asking for 8 gives the
    term of those 5 (it was divided by 8)."""
    pose = batch['target'].float() + torch.tensor(PERTURB) / 3.0
    five = SelfSupervisedLoss(SelfSupParams(photo_levels=5))(pose, batch,
                                                             terms=('photometric',))
    eight = SelfSupervisedLoss(SelfSupParams(photo_levels=8))(pose, batch,
                                                              terms=('photometric',))
    torch.testing.assert_close(eight['photometric'][0], five['photometric'][0])
    assert (five['photometric'][0] > 0).all()


def test_all_terms_invalid_skips_the_step(batch):
    dead = dict(batch, modality_mask=torch.zeros_like(batch['modality_mask']))
    model = ModelConfig(image_height=96, image_width=320, bev_cells=32, bev_range_m=12.8,
                        bev_max_shift_cells=4)
    core = TrainerCore(model, TrainConfig(supervision='self'), 'cpu')
    stats = core.step(dead)
    assert not stats.applied and stats.samples == 0 and core.step_count == 0


def test_scan_cache_reuses_trees_of_replayed_scans(batch):
    loss = SelfSupervisedLoss(SelfSupParams(geo_points=1024, cache_scans=4))
    pose = batch['target'].float()
    first, _ = loss(pose, batch, terms=('geometric',))['geometric']
    again, _ = loss(pose, batch, terms=('geometric',))['geometric']
    assert (loss.cache.misses, loss.cache.hits) == (2, 2)
    torch.testing.assert_close(first, again)


def run_train(args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS='1',
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get('PYTHONPATH')])))
    return subprocess.run([sys.executable, str(REPO / 'train_multimodal.py')] + args, cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=600)


def test_offline_self_supervision_trains_without_poses_and_its_loss_falls(tmp_path):
    data = tmp_path / 'data'
    for seq in ('11', '12'):
        generate_sequence(data, seq, 8, seed=0, image_size=(96, 32), azimuth_steps=360,
                          beams=16, workers=1)
    shutil.rmtree(data / 'poses')      # like KITTI's test sequences 11-21
    tiny = ['--data_path', str(data), '--train_sequences', '11', '--val_sequences', '12',
            '--image_height', '32', '--image_width', '96', '--bev_cells', '32',
            '--bev_range_m', '12.8', '--bev_max_shift_cells', '4', '--max_points', '1024',
            '--batch_size', '2', '--learning_rate', '3e-3', '--lr_schedule', 'constant',
            '--threads', '1']
    out = run_train(tiny + ['--num_epochs', '1'], tmp_path)
    assert out.returncode == 2
    assert 'poses/11.txt' in out.stderr and 'supervision self' in out.stderr, out.stderr

    log = tmp_path / 'self.csv'
    out = run_train(tiny + ['--supervision', 'self', '--num_epochs', '6', '--output_checkpoint',
                            str(tmp_path / 'self.pth'), '--log_csv', str(log),
                            '--tensorboard_dir', str(tmp_path / 'tb')], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = list(csv.DictReader(log.open()))
    assert len(rows) == 6
    losses = [float(r['loss']) for r in rows]
    assert losses[-1] < 0.9 * losses[0], losses
    for part in TERMS:   # each term logged, for training and validation
        assert rows[-1][f'loss_{part}'] and rows[-1][f'val_loss_{part}'], part
    assert rows[-1]['loss_gt'] == rows[-1]['val_trans_err'] == ''   # no ground truth anywhere
    events = EventAccumulator(str(tmp_path / 'tb'))
    events.Reload()
    tags = set(events.Tags()['scalars'])
    for part in TERMS:
        assert {f'epoch/loss_{part}', f'epoch/val_loss_{part}', f'step/loss_{part}'} <= tags
    assert len(events.Scalars('epoch/loss_geometric')) == 6
    ckpt = load_checkpoint(tmp_path / 'self.pth')
    assert ckpt['config']['train']['supervision'] == 'self'
    assert ckpt['normalization']['target_mean'] == [0.0] * 6    # the prior, not the poses

    # predict_odometry on the sequence without poses: the benchmark's NN.txt, in cam0.
    assert predict_odometry.main(['--checkpoint', str(tmp_path / 'self.pth'), '--data_path',
                                  str(data), '--sequences', '12', '--out_dir',
                                  str(tmp_path / 'pred')]) == 0
    poses = read_kitti_poses(tmp_path / 'pred' / '12.txt')
    assert len(poses) == 8
    np.testing.assert_allclose(poses[0], np.eye(4), atol=1e-12)
    core, sample_cfg = predict_odometry.load_predictor(tmp_path / 'self.pth', 'cpu')
    dataset = KITTIOdomPointDataset(data, '12', sample_cfg=sample_cfg, ground_truth='auto')
    step, _ = core.predict(collate_samples([dataset[3]]))   # frames 3 -> 4
    base = cam0_to_base_link(poses, dataset.sequences[0].Tr)
    np.testing.assert_allclose(np.linalg.inv(base[3]) @ base[4], vec6_to_pose(step[0].numpy()),
                               atol=1e-5)


def test_supervision_config_is_checked():
    with pytest.raises(ValueError, match='supervision'):
        TrainConfig(supervision='none')
    with pytest.raises(ValueError, match='weight > 0'):
        TrainConfig(supervision='self', self_geometric_weight=0, self_photometric_weight=0,
                    self_inertial_weight=0)
    assert TrainConfig(supervision='both', self_photometric_weight=0).loss_terms == \
        ('gt', 'geometric', 'inertial')
    old = TrainConfig().to_dict()
    for key in ('supervision', 'self_geometric_weight', 'self_photometric_weight',
                'self_inertial_weight'):
        del old[key]        # a checkpoint from before these fields
    assert TrainConfig.from_dict(old, allow_missing=True) == TrainConfig()


def test_solved_geometric_term_reaches_the_truth_and_its_gradient_points_back(batch):
    """The solved form: Gauss-Newton from a perturbed pose lands near the true step, the
    quadratic is smallest there and its gradient points back in each degree of freedom; a
    sample is solved once, then reused; a masked-off LiDAR adds no term."""
    loss = SelfSupervisedLoss(SelfSupParams(geo_points=2048), solve_iterations=8)
    truth = batch['target'].float()
    start = truth + torch.tensor(PERTURB) / 3.0
    value, valid = loss(start, batch, terms=('geometric',))['geometric']
    assert valid.all() and (value > 0).all()
    assert (loss.solved.solved, loss.solved.reused) == (2, 0)
    stars = [loss.solved.solutions[k][0] for k in loss.solved.solutions]
    for star, want in zip(stars, truth.double().numpy()):
        assert np.abs(star[:3] - want[:3]).max() < 0.02, (star, want)     # metres
        assert np.abs(star[3:] - want[3:]).max() < 0.002, (star, want)    # radians
    at_truth = loss(truth, batch, terms=('geometric',))['geometric'][0]
    assert loss.solved.reused == 2 and float(at_truth.max()) < 1e-2 * float(value.min())
    for dof in range(6):
        for sign in (1.0, -1.0):
            pose = truth.clone()
            pose[:, dof] += sign * PERTURB[dof] / 3.0
            pose.requires_grad_(True)
            value, valid = loss(pose, batch, terms=('geometric',))['geometric']
            assert valid.all() and (value.detach() > at_truth).all(), (DOF[dof], sign)
            value.sum().backward()
            assert (torch.sign(-pose.grad[:, dof]) == -sign).all(), (DOF[dof], sign, pose.grad)
    assert loss.solved.solved == 2
    dead = dict(batch, modality_mask=batch['modality_mask'].clone())
    dead['modality_mask'][0, 1] = False
    dead['points'] = batch['points'] + 1.0        # new scans: solved again, row 0 invalid
    value, valid = loss(start.requires_grad_(True), dead, terms=('geometric',))['geometric']
    assert valid.tolist() == [False, True] and float(value[0].detach()) == 0.0
    grad, = torch.autograd.grad(value.sum(), start)
    assert not grad[0].any()
    # each target scan's tree served its one solve: only the last few are kept
    assert loss.cache.misses == 3 and len(loss.cache.entries) == selfsup.SOLVED_CACHE_SCANS
    # The same scans with their LiDAR masked (modality dropout changes only the mask): no
    # term, though their solutions are cached; and back with the LiDAR, row 0 is solved now
    # (the cache kept "no solution" for a masked first sighting, and served a solution to it).
    masked = dict(batch, modality_mask=batch['modality_mask'].clone())
    masked['modality_mask'][:, 1] = False
    assert not loss(truth, masked, terms=('geometric',))['geometric'][1].any()
    back = dict(dead, modality_mask=batch['modality_mask'])
    assert loss(truth, back, terms=('geometric',))['geometric'][1].all()


def test_the_solve_takes_its_own_number_of_source_points(batch, monkeypatch):
    """TrainConfig.self_geometric_solve_points reaches the solve; the direct term keeps
    SelfSupParams.geo_points."""
    seen, real = [], selfsup.solve_geometric

    def counting(pose6, target, src, params, iterations):
        seen.append((len(src), params.geo_points))
        return real(pose6, target, src, params, iterations)
    monkeypatch.setattr(selfsup, 'solve_geometric', counting)
    loss = SelfSupervisedLoss(SelfSupParams(geo_points=2048), solve_iterations=3, solve_points=512)
    value, valid = loss(batch['target'].float(), batch, terms=('geometric',))['geometric']
    assert seen == [(512, 512), (512, 512)] and valid.all()
    core = TrainerCore(ModelConfig(image_height=96, image_width=320, bev_cells=32,
                                   bev_range_m=12.8, bev_max_shift_cells=4),
                       TrainConfig(supervision='self', self_geometric_solve=2,
                                   self_geometric_solve_points=300), 'cpu')
    assert core.selfsup.solved.points == 300
