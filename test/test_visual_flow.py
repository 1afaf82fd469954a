"""The flow visual encoder (issue 17): it measures the motion between two rendered frames, reads
the LiDAR depth only where the LiDAR is present, and carries the estimate without the LiDAR."""
import csv
import os
from pathlib import Path
import subprocess
import sys

import numpy as np
import pytest
import torch

from mm_fusion_ros.config import SampleConfig
from mm_fusion_ros.geometry import make_pose, pose_to_vec6, relative_pose, rpy_to_rot
from mm_fusion_ros.kitti.dataset import collate_samples
from mm_fusion_ros.kitti.odometry import KittiSequence
from mm_fusion_ros.kitti.sample import build_sample, ImuData
from mm_fusion_ros.model import camera
from mm_fusion_ros.model.augment import drop_modalities
from mm_fusion_ros.model.config import ModelConfig
from mm_fusion_ros.model.encoders import FlowVisualEncoder
from mm_fusion_ros.model.losses import auxiliary_parts
from mm_fusion_ros.model.net import build_model
from mm_fusion_ros.synthetic.camera import Camera, camera_pose, CameraModel, kitti_calib
from mm_fusion_ros.synthetic.lidar import Lidar, LidarConfig
from mm_fusion_ros.synthetic.trajectory import synthesize_drive
from mm_fusion_ros.synthetic.writer import generate_sequence, sequence_world
from mm_fusion_ros.training.config import TrainConfig
from mm_fusion_ros.training.core import TrainerCore

REPO = Path(__file__).resolve().parents[1]
W, H = 320, 96


pytestmark = pytest.mark.usefixtures('one_torch_thread')


@pytest.fixture(scope='module')
def scene():
    """A synthetic street, its camera 2 at the model's default size, and a pose on the road."""
    traj, route = synthesize_drive(np.random.default_rng(3), 12.0)
    world = sequence_world('00', 0, route)
    calib = kitti_calib(W, H)
    cam = Camera(CameraModel.from_calib(calib, W, H))
    return world, calib, cam, traj.poses(2.0)[0]


def moved(pose, step, yaw):
    """pose after driving `step` metres along an arc that turns by `yaw`."""
    return pose @ make_pose(rpy_to_rot(0.0, 0.0, yaw),
                            [step * np.cos(yaw / 2), step * np.sin(yaw / 2), 0.0])


def render_pair(scene, step, yaw):
    world, calib, cam, pose0 = scene
    frames = [cam.render(world, camera_pose(p, calib))[0] for p in (pose0, moved(pose0, step,
                                                                                    yaw))]
    return torch.from_numpy(np.stack(frames).transpose(0, 3, 1, 2)).unsqueeze(0)


def test_untrained_flow_encoder_measures_the_step_between_rendered_frames(scene):
    """Its ground-sweep estimates (last two outputs: x [m], yaw [rad]) follow the true step."""
    encoder = FlowVisualEncoder(ModelConfig(visual_encoder='flow')).eval()
    truth = [(0.0, 0.0), (0.5, 0.0), (1.0, 0.02), (1.0, -0.02), (1.5, 0.0)]
    with torch.no_grad():
        est = torch.cat([encoder(render_pair(scene, *t))[:, -2:] for t in truth]).numpy()
    truth = np.array(truth)
    assert np.abs(est[:, 0] - truth[:, 0]).max() < 0.25, est
    assert np.abs(est[:, 1] - truth[:, 1]).max() < 0.004, est
    # The step moves with the true one: strictly increasing over 0, 0.5, 1.5 m.
    assert est[0, 0] < est[1, 0] < est[4, 0]
    assert est[2, 1] > 0.01 > -0.01 > est[3, 1]


def test_lidar_depth_lands_where_the_camera_sees_the_point(scene):
    """The default calibration projects a scan onto the pixels whose rendered depth is the
    points' depth (the synthetic world renders with KITTI 00's camera)."""
    world, calib, cam, pose0 = scene
    _, depth = cam.render(world, camera_pose(pose0, calib))
    scan = Lidar(LidarConfig(beams=32, azimuth_steps=720)).scan(world, pose0,
                                                              np.random.default_rng(0))
    k, t = camera.default_calibration(H, W)
    pts = torch.from_numpy(scan[None, None].astype(np.float32))
    mask = torch.ones(pts.shape[:3], dtype=torch.bool)
    image = camera.lidar_depth_image(pts, mask, torch.tensor([True]), k[None], t[None], H, W)
    hit = image[0, 0, 1] > 0
    assert int(hit.sum()) > 300
    lidar_z = 4.0 / image[0, 0, 0][hit]
    rendered_z = torch.from_numpy(np.asarray(depth, dtype=np.float32))[hit]
    close = (lidar_z - rendered_z).abs() < 0.05 * rendered_z
    assert close.float().mean() > 0.9, close.float().mean()
    masked = camera.lidar_depth_image(pts, mask, torch.tensor([False]), k[None], t[None], H, W)
    assert not masked.any()


def rendered_sample(scene, step, yaw, cfg):
    """A DESIGN §5 sample of camera, LiDAR and IMU for a known step on the synthetic street."""
    world, calib, cam, pose0 = scene
    poses = (pose0, moved(pose0, step, yaw))
    images = [cam.render(world, camera_pose(p, calib))[0] for p in poses]
    lidar = Lidar(LidarConfig(beams=16, azimuth_steps=360))
    scans = [lidar.scan(world, p, np.random.default_rng(i)) for i, p in enumerate(poses)]
    stamps = np.linspace(0.0, 0.2, 21)
    imu = ImuData(stamps=stamps, accel=np.tile([0.5, 0.0, 9.81], (21, 1)),
                  gyro=np.tile([0.0, 0.0, yaw / 0.1], (21, 1)))
    return build_sample(cfg, stamps=(0.05, 0.15), images=images, scans=scans, imu=imu,
                        poses=poses, sequence='00', frame=1)


def test_masked_lidar_gives_finite_bounded_poses_and_hides_its_depth(scene):
    cfg = SampleConfig(image_height=H, image_width=W, max_points=2048)
    batch = collate_samples([rendered_sample(scene, 1.0, 0.01, cfg),
                             rendered_sample(scene, 0.5, -0.02, cfg)])
    torch.manual_seed(0)
    model = build_model(ModelConfig(visual_encoder='flow')).eval()
    model.set_normalization({'imu_mean': [0, 0, 9.8, 0, 0, 0], 'imu_std': [1] * 6,
                             'target_mean': [1.0, 0, 0, 0, 0, 0],
                             'target_std': [0.3, 0.05, 0.02, 0.002, 0.002, 0.01]})
    torch.nn.init.normal_(model.head.out.weight, std=0.1)   # not the zero-initialised head
    no_lidar = dict(batch, modality_mask=torch.tensor([[True, False, True]] * 2))
    noise = dict(no_lidar, points=torch.randn_like(batch['points']) * 10.0)
    with torch.no_grad():
        out = model(no_lidar)
        torch.testing.assert_close(model(noise)['mean'], out['mean'])   # no LiDAR, no depth
        # With the LiDAR, its depth does reach the camera branch's learned part.
        seen = model.visual_features(batch, batch['modality_mask'][:, 1])
        unseen = model.visual_features(batch, no_lidar['modality_mask'][:, 1])
        assert not torch.allclose(seen[:, :-3], unseen[:, :-3])
        assert not torch.allclose(model(dict(noise, modality_mask=batch['modality_mask']))
                                  ['mean'], model(batch)['mean'])
        mean, logvar = model.denormalize(out['mean'], out['logvar'])
        for modalities in ([True, False, False], [False, False, True], [False, False, False]):
            alone = model(dict(batch, modality_mask=torch.tensor([modalities] * 2)))
            assert torch.isfinite(alone['mean']).all() and torch.isfinite(alone['logvar']).all()
    assert torch.isfinite(mean).all() and torch.isfinite(logvar).all()
    assert mean[:, :3].norm(dim=1).max() < 5.0 and mean[:, 3:].norm(dim=1).max() < 0.5
    # The camera's own estimate carries the forward step: the 1 m step predicts farther.
    assert mean[0, 0] > mean[1, 0] + 0.2


def test_modality_dropout_probabilities_and_never_an_empty_sample():
    torch.manual_seed(0)
    mask = torch.ones(4000, 3, dtype=torch.bool)
    mask[:1000, 0] = False
    kept = drop_modalities(mask, (0.0, 0.6, 0.2))
    assert not (kept & ~mask).any() and kept.any(dim=1).all()
    assert torch.equal(kept[:, 0], mask[:, 0])
    assert 0.55 < 1.0 - kept[:, 1].float().mean() < 0.65
    alone = torch.zeros(100, 3, dtype=torch.bool)
    alone[:, 1] = True
    assert torch.equal(drop_modalities(alone, (0.0, 1.0, 0.0)), alone)


def test_camera_imu_model_beats_mean_motion_on_a_held_out_sequence(tmp_path):
    """Camera + IMU alone (no LiDAR at all), a short training run: the held-out drive is
    faster than the training drives, so predicting their average step is far off."""
    data = tmp_path / 'data'
    for seq in ('00', '02', '06', '03'):
        generate_sequence(data, seq, 16, seed=0, image_size=(W, H), scans=False, workers=1)
    train = ['00', '02', '06']
    gap = abs(mean_step(data, ['03']) - mean_step(data, train))
    assert gap > 0.3, 'the held-out drive must differ from the average one to be a test'
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=os.pathsep.join(
        filter(None, [str(REPO), os.environ.get('PYTHONPATH')])))
    cmd = [sys.executable, str(REPO / 'train_multimodal.py'), '--data_path', str(data),
           '--train_sequences', ','.join(train), '--val_sequences', '03',
           '--modalities', 'camera,imu', '--visual_encoder', 'flow', '--point_encoder', 'dummy',
           '--max_points', '1', '--batch_size', '4', '--learning_rate', '1e-3',
           '--num_epochs', '4', '--output_checkpoint', 'm.pth', '--log_csv', 'log.csv']
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(tmp_path / 'log.csv', newline='') as f:
        last = list(csv.DictReader(f))[-1]
    model_err = float(last['val_trans_err'])
    baseline_err = float(last['val_mean_motion_trans_err'])
    assert int(last['train_samples']) == 3 * 15
    assert baseline_err > 0.3
    assert model_err <= 0.5 * baseline_err, (model_err, baseline_err)


def mean_step(data, sequences) -> float:
    steps = [pose_to_vec6(relative_pose(p[:-1], p[1:]))[:, 0]
             for p in (KittiSequence(data, s).poses_base for s in sequences)]
    return float(np.concatenate(steps).mean())


def test_camera_head_has_its_own_loss_on_samples_with_a_camera(scene):
    cfg = SampleConfig(image_height=H, image_width=W, max_points=512)
    batch = collate_samples([rendered_sample(scene, 1.0, 0.01, cfg),
                             rendered_sample(scene, 0.5, -0.02, cfg)])
    torch.manual_seed(0)
    model = build_model(ModelConfig(visual_encoder='flow')).eval()
    target = model.normalize_target(batch['target'])
    valid = torch.ones(2, dtype=torch.bool)
    out = model(batch)
    mean, logvar, present = out['aux']['camera']
    assert mean.shape == (2, 6) and present.tolist() == [True, True]
    per, keep = auxiliary_parts(out, target, valid, 'l1', 1.0)['aux_camera']
    assert keep.tolist() == [True, True] and bool((per > 0).all())
    blind = model(dict(batch, modality_mask=torch.tensor([[False, True, True]] * 2)))
    assert auxiliary_parts(blind, target, valid, 'l1', 1.0)['aux_camera'][1].tolist() == \
        [False, False]
    assert 'aux' not in build_model(ModelConfig(visual_encoder='flow',
                                                camera_head_hidden=0))(batch)
    # The validation loss is the training loss: with the camera head's part (it was left out,
    # so val_loss read lower than the training loss for the same weights).
    core = TrainerCore(ModelConfig(visual_encoder='flow'), TrainConfig(), 'cpu')
    core.model.load_state_dict(model.state_dict())
    core.model.eval()
    with torch.no_grad():
        parts = core.loss_parts(core.model(batch), batch, ('gt',))
    assert set(parts) == {'gt', 'aux_camera'}
    training_loss = float(core.combine(parts)[0])
    gt_only = float(core.combine({'gt': parts['gt']})[0])
    assert core.evaluate([batch])['loss'] == pytest.approx(training_loss, rel=1e-5)
    assert abs(training_loss - gt_only) > 1e-3 * abs(training_loss)


def test_batch_calibration_is_used_where_known(scene):
    """A batch's own intrinsics / t_cam_lidar replace the default; unknown ones (calib_valid
    off, zeros) fall back to it instead of projecting through a zero matrix."""
    cfg = SampleConfig(image_height=H, image_width=W, max_points=512)
    batch = collate_samples([rendered_sample(scene, 1.0, 0.0, cfg)] * 2)
    model = build_model(ModelConfig(visual_encoder='flow')).eval()
    k, t = camera.default_calibration(H, W)
    with torch.no_grad():
        default = model.visual_features(batch, batch['modality_mask'][:, 1])
        same = model.visual_features(dict(batch, intrinsics=k.expand(2, 3, 3),
                                          t_cam_lidar=t.expand(2, 4, 4)),
                                     batch['modality_mask'][:, 1])
        shifted = k.clone()
        shifted[1, 2] += 8.0   # principal point 8 px lower: the road moves in the image
        other = model.visual_features(dict(batch, intrinsics=shifted.expand(2, 3, 3),
                                           t_cam_lidar=t.expand(2, 4, 4),
                                           calib_valid=torch.tensor([[True] * 3, [False] * 3])),
                                      batch['modality_mask'][:, 1])
    torch.testing.assert_close(same, default)
    assert not torch.allclose(other[0], default[0])
    torch.testing.assert_close(other[1], default[1])
