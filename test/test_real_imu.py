"""Real KITTI IMU (issue 8): the .mat reader on every shipped sequence, its errors on bad files,
modality masking of IMU-only samples, and a short real IMU-only training run.

test/test_kitti_readers.py already covers sequence 07's count/stamps/|a|/net yaw and the missing
03.mat; this file covers the other sequences, per-frame yaw rates, bad files and training."""
import csv
import os

import numpy as np
import pytest
from scipy.io import savemat

from mm_fusion_ros.config import SampleConfig
from mm_fusion_ros.kitti.dataset import KITTIOdomPointDataset
from mm_fusion_ros.kitti.imu import MAT_KEY, read_mat_imu
from mm_fusion_ros.kitti.odometry import KittiSequence
from mm_fusion_ros.training.offline import main as train_main

IMU_SEQUENCES = ('00', '01', '02', '04', '05', '06', '07', '08')


def snapshot(root):
    """(path, size, mtime) of every file under root: to prove a run wrote nothing there."""
    return sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns)
                  for p in root.rglob('*') if p.is_file())


@pytest.mark.parametrize('seq', IMU_SEQUENCES)
def test_every_real_mat_file_is_frame_aligned(kitti_sample, seq):
    s = KittiSequence(kitti_sample, seq, imu_path=kitti_sample / 'imu')
    imu = s.imu
    assert len(imu) == 10 * (len(s.times) - 1) + 1
    np.testing.assert_allclose(imu.stamps[::10], s.times, atol=1e-12)
    assert np.all(np.diff(imu.stamps) > 0)
    assert 9.6 < np.linalg.norm(imu.accel, axis=1).mean() < 10.2
    # Gravity is on +z (specific force of a car standing on the road), x is forward.
    assert 9.0 < imu.accel[:, 2].mean() < 10.5


@pytest.mark.parametrize('seq', ['00', '07'])
def test_gyro_yaw_rate_follows_ground_truth_per_frame(kitti_sample, seq):
    """The gyro z integral over each frame interval matches the GT heading change per frame."""
    s = KittiSequence(kitti_sample, seq, imu_path=kitti_sample / 'imu')
    imu = s.imu
    dyaw_gyro = np.add.reduceat(imu.gyro[:-1, 2] * np.diff(imu.stamps),
                                np.arange(0, len(imu) - 1, 10))
    yaw_gt = np.unwrap(np.arctan2(s.poses_base[:, 1, 0], s.poses_base[:, 0, 0]))
    dyaw_gt = np.diff(yaw_gt)
    assert dyaw_gyro.shape == dyaw_gt.shape
    assert np.corrcoef(dyaw_gyro, dyaw_gt)[0, 1] > 0.99
    assert np.median(np.abs(dyaw_gyro - dyaw_gt)) < 2e-3   # rad per frame


def write_mat(path, **arrays):
    savemat(path, arrays)
    return path


def test_truncated_mat_array_is_refused_naming_the_file(tmp_path):
    times = np.arange(5) * 0.1
    path = write_mat(tmp_path / '07.mat', **{MAT_KEY: np.zeros((40, 6))})   # 41 expected
    with pytest.raises(ValueError, match=r'07\.mat: 40 IMU samples.*5 frames.*41'):
        read_mat_imu(path, times)


def test_wrong_key_and_wrong_shape_are_refused_naming_the_file(tmp_path):
    times = np.arange(5) * 0.1
    path = write_mat(tmp_path / '04.mat', imu_data=np.zeros((41, 6)))
    with pytest.raises(ValueError, match=r"04\.mat: key 'imu_data_interp' not found.*imu_data"):
        read_mat_imu(path, times)
    path = write_mat(tmp_path / '05.mat', **{MAT_KEY: np.zeros((41, 5))})
    with pytest.raises(ValueError, match=r'05\.mat: imu_data_interp has shape \(41, 5\)'):
        read_mat_imu(path, times)
    garbage = tmp_path / '06.mat'
    garbage.write_bytes(b'not a MATLAB file at all' * 10)
    with pytest.raises(ValueError, match=r'06\.mat: not a readable MATLAB file'):
        read_mat_imu(garbage, times)


def test_sequence_03_without_imu_is_a_clear_cli_error(kitti_sample, tmp_path, capsys):
    rc = train_main(['--data_path', str(kitti_sample), '--imu_path', str(kitti_sample / 'imu'),
                     '--modalities', 'imu', '--train_sequences', '03',
                     '--output_checkpoint', str(tmp_path / 'x.pth'),
                     '--log_csv', str(tmp_path / 'x.csv')])
    assert rc == 2
    err = capsys.readouterr().err
    assert '03.mat' in err and 'no IMU for sequence 03' in err
    assert not (tmp_path / 'x.pth').exists()


def test_imu_only_samples_mask_camera_and_lidar(kitti_sample):
    cfg = SampleConfig(image_height=16, image_width=32, max_points=64, imu_steps=21,
                       imu_window_s=1.0, modalities=('imu',))
    ds = KITTIOdomPointDataset(kitti_sample, '04', sample_cfg=cfg,
                               imu_path=kitti_sample / 'imu')
    assert len(ds) == 270
    late = ds[50]
    assert late['modality_mask'].tolist() == [False, False, True]
    assert not late['image'].any() and not late['points'].any() and not late['points_mask'].any()
    assert late['imu'].shape == (21, 6) and np.abs(late['imu']).max() > 1.0
    assert late['target_valid'] and late['target'][0] > 0.5        # driving forward
    # A 1 s history is not covered by the IMU before t = 1 s: masked off, zeros, target kept.
    early = ds[0]
    assert early['modality_mask'].tolist() == [False, False, False]
    assert not early['imu'].any() and early['target_valid']


def read_csv(path):
    with open(path, newline='') as f:
        # An empty cell is a figure that does not apply (e.g. a self-supervised loss term).
        return [{k: float(v) for k, v in row.items() if v != ''} for row in csv.DictReader(f)]


def test_short_real_imu_only_training_lowers_validation_loss(kitti_sample, tmp_path):
    before = snapshot(kitti_sample)
    cwd = os.getcwd()
    os.chdir(tmp_path)   # any relative default path would land here, not in the data
    try:
        rc = train_main([
            '--data_path', str(kitti_sample), '--imu_path', str(kitti_sample / 'imu'),
            '--modalities', 'imu', '--train_sequences', '00,05,08', '--val_sequences', '04',
            '--visual_encoder', 'dummy', '--point_encoder', 'dummy', '--image_height', '8',
            '--image_width', '8', '--max_points', '1', '--imu_window_s', '1.0',
            '--imu_steps', '21', '--max_samples_per_sequence', '400', '--batch_size', '32',
            '--num_epochs', '4', '--learning_rate', '1e-3', '--threads', '1',
            '--output_checkpoint', 'imu.pth'])
    finally:
        os.chdir(cwd)
    assert rc == 0
    assert snapshot(kitti_sample) == before
    rows = read_csv(tmp_path / 'logs' / 'imu.csv')
    assert [r['epoch'] for r in rows] == [1, 2, 3, 4]
    assert all(r['train_samples'] == 1200 for r in rows)
    first, last = rows[0], rows[-1]
    assert last['val_loss'] < first['val_loss']
    assert last['val_trans_err'] < first['val_trans_err']
    assert last['val_trans_err'] < 0.9 * last['val_mean_motion_trans_err']   # 0.48 vs 0.65
    # The IMU window travels in the checkpoint, where predict_odometry reads it back.
    from mm_fusion_ros.cli.predict_odometry import load_predictor
    _, sample_cfg = load_predictor(tmp_path / 'imu.pth', 'cpu')
    assert sample_cfg.imu_window_s == 1.0 and sample_cfg.imu_steps == 21
    assert sample_cfg.modalities == ('imu',)
