"""KITTI readers, integrity checks, the DESIGN §5 sample and collate (issue 3), on real and
hand-made data."""
import logging
import shutil

from conftest import make_tiny_kitti
import numpy as np
import pytest
import torch

from mm_fusion_ros.cli import check_kitti
from mm_fusion_ros.config import SampleConfig
from mm_fusion_ros.geometry import pose_to_vec6, relative_pose
from mm_fusion_ros.kitti.checks import check_sequence
from mm_fusion_ros.kitti.dataset import collate_samples, KITTIOdomPointDataset
from mm_fusion_ros.kitti.ids import normalize_sequence_id, parse_sequences
from mm_fusion_ros.kitti.odometry import (
    KittiSequence,
    read_calib,
    read_poses,
    read_times,
    read_velodyne,
)
from mm_fusion_ros.kitti.raw import (
    format_oxts_timestamp,
    ODOMETRY_TO_RAW,
    parse_oxts_timestamp,
    raw_oxts_for_sequence,
    read_oxts_folder,
)

REAL_COUNTS = {'00': 4541, '01': 1101, '02': 4661, '03': 801, '04': 271, '05': 2761,
               '06': 1101, '07': 1101, '08': 4071, '09': 1591, '10': 1201}


def test_sequence_ids_are_zero_padded():
    assert normalize_sequence_id('0') == '00'
    assert normalize_sequence_id(7) == '07'
    assert parse_sequences('0,1, 8,01') == ['00', '01', '08']
    with pytest.raises(ValueError, match='not a number'):
        normalize_sequence_id('seq7')


@pytest.mark.parametrize('seq', sorted(REAL_COUNTS))
def test_real_poses_and_times(kitti_sample, seq):
    s = KittiSequence(kitti_sample, seq)
    assert len(s.times) == len(s.poses_cam0) == REAL_COUNTS[seq]
    rot = s.poses_cam0[:, :3, :3]
    assert np.abs(rot @ rot.transpose(0, 2, 1) - np.eye(3)).max() < 1e-6
    base = s.poses_base
    np.testing.assert_allclose(base[0], np.eye(4), atol=1e-6)
    # The vehicle drives forward along base_link x (REP 103), not along camera z.
    step = relative_pose(base[0], base[10])[:3, 3]
    assert step[0] > abs(step[1]) and step[0] > abs(step[2])


def test_real_mat_imu(kitti_sample):
    s = KittiSequence(kitti_sample, '07', imu_path=kitti_sample / 'imu')
    imu = s.imu
    assert len(imu) == 10 * (len(s.times) - 1) + 1
    np.testing.assert_allclose(imu.stamps[::10], s.times)
    assert 9.6 < np.linalg.norm(imu.accel, axis=1).mean() < 10.2
    # Gyro yaw integrated over the sequence vs ground-truth heading change (PROVENANCE: 6.47 rad).
    yaw_gyro = np.sum(imu.gyro[:-1, 2] * np.diff(imu.stamps))
    yaw_gt = np.unwrap(np.arctan2(s.poses_base[:, 1, 0], s.poses_base[:, 0, 0]))
    assert abs(yaw_gyro - (yaw_gt[-1] - yaw_gt[0])) < 0.1


def test_missing_mat_imu_names_file(kitti_sample):
    s = KittiSequence(kitti_sample, '03', imu_path=kitti_sample / 'imu')
    with pytest.raises(FileNotFoundError, match='03.mat'):
        _ = s.imu


def test_raw_mapping_and_missing_03(tmp_path):
    assert ODOMETRY_TO_RAW['08'].first == 1100 and ODOMETRY_TO_RAW['00'].last == 4540
    with pytest.raises(FileNotFoundError, match='not in the public KITTI raw release'):
        raw_oxts_for_sequence(tmp_path, '3')
    with pytest.raises(FileNotFoundError, match='2011_09_30_drive_0027'):
        raw_oxts_for_sequence(tmp_path, '07')


def test_oxts_timestamp_round_trip():
    text = '2011-09-30 12:01:02.123456789'
    assert format_oxts_timestamp(parse_oxts_timestamp(text)) == text


def test_tiny_tree_reads_back(tiny_kitti):
    s = KittiSequence(tiny_kitti, '0')
    assert len(s) == 6 and s.load_image(0).shape == (40, 120, 3)
    assert s.load_scan(2).shape == (574, 4)
    imu = s.imu
    assert imu.stamps[0] == 0.0 and imu.t0_ns is not None
    np.testing.assert_allclose(imu.gyro[:, 2], 0.1)
    assert check_sequence(s).ok


def test_truncated_scan_is_named(tiny_kitti):
    path = tiny_kitti / 'pointclouds/sequences/00/velodyne/000003.bin'
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(ValueError, match='000003.bin.*not a multiple of 16'):
        read_velodyne(path)
    report = check_sequence(KittiSequence(tiny_kitti, '00'))
    assert report.bad_frames == [3] and '000003.bin' in str(report.problems[0])


def test_missing_image_is_named(tiny_kitti):
    (tiny_kitti / 'sequences/00/image_2/000002.png').unlink()
    report = check_sequence(KittiSequence(tiny_kitti, '00'))
    assert report.bad_frames == [2]
    assert 'image_2/000002.png' in str(report.problems[0])


def test_non_increasing_times(tiny_kitti):
    path = tiny_kitti / 'sequences/00/times.txt'
    lines = path.read_text().splitlines()
    lines[3] = lines[1]
    path.write_text('\n'.join(lines) + '\n')
    with pytest.raises(ValueError, match=r'times.txt:4: times not strictly increasing'):
        read_times(path)


def test_malformed_calib(tiny_kitti):
    path = tiny_kitti / 'sequences/00/calib.txt'
    lines = path.read_text().splitlines()
    path.write_text('\n'.join(lines[:2] + [lines[2].rsplit(' ', 1)[0]] + lines[3:]) + '\n')
    with pytest.raises(ValueError, match=r'calib.txt:3: P2 has 11 numbers'):
        read_calib(path)
    path.write_text('\n'.join(lines[:4]) + '\n')
    with pytest.raises(ValueError, match=r"calib.txt: missing calibration keys \['Tr'\]"):
        read_calib(path)


def test_oxts_row_with_29_fields(tiny_kitti):
    path = tiny_kitti / 'sequences/00/oxts/data/0000000004.txt'
    path.write_text(' '.join(path.read_text().split()[:29]) + '\n')
    with pytest.raises(ValueError, match='0000000004.txt: 29 OXTS fields, expected 30'):
        read_oxts_folder(tiny_kitti / 'sequences/00/oxts')
    report = check_sequence(KittiSequence(tiny_kitti, '00'))
    assert any('29 OXTS fields' in str(p) for p in report.problems)


def test_malformed_pose_line(tmp_path):
    path = tmp_path / '00.txt'
    path.write_text('1 0 0 0 0 1 0 0 0 0 1 0\n1 0 0 0 0 1 0 0 0 0 1\n')
    with pytest.raises(ValueError, match=r'00.txt:2: 11 values, expected 12'):
        read_poses(path)


def test_check_kitti_cli(tiny_kitti, capsys):
    args = ['--data_path', str(tiny_kitti), '--sequences', '0']
    assert check_kitti.main(args) == 0
    (tiny_kitti / 'sequences/00/image_2/000004.png').unlink()
    assert check_kitti.main(args) == 1
    assert check_kitti.main(args + ['--on_bad_frame', 'skip']) == 0
    out = capsys.readouterr().out
    assert 'image_2/000004.png (frame 4): missing' in out
    assert 'would skip frames [4]' in out
    assert check_kitti.main(['--data_path', str(tiny_kitti), '--sequences', '05']) == 1
    # A sequence without ground truth (KITTI 11-21): checked with --no_poses, and a pose file
    # that is there is still checked.
    poses = tiny_kitti / 'poses/00.txt'
    text = poses.read_text()
    poses.unlink()
    ok = args + ['--on_bad_frame', 'skip']
    assert check_kitti.main(ok) == 1 and 'pose file missing' in capsys.readouterr().out
    assert check_kitti.main(ok + ['--no_poses']) == 0
    poses.write_text(text.splitlines()[0] + '\n')
    assert check_kitti.main(ok + ['--no_poses']) == 1
    assert '1 poses but times.txt has 6 frames' in capsys.readouterr().out


def test_sample_shapes_and_target(tiny_kitti):
    cfg = SampleConfig(image_height=16, image_width=48, max_points=256, imu_steps=11)
    ds = KITTIOdomPointDataset(tiny_kitti, '00', sample_cfg=cfg)
    assert len(ds) == 5
    s = ds[2]
    assert s['image'].shape == (2, 3, 16, 48) and s['image'].dtype == np.uint8
    assert s['points'].shape == (2, 256, 4) and s['points'].dtype == np.float32
    assert s['points_mask'].all()
    assert s['imu'].shape == (11, 6) and s['imu'].dtype == np.float32
    np.testing.assert_allclose(s['imu'][:, 5], 0.1, atol=1e-6)  # gyro z
    assert s['modality_mask'].tolist() == [True, True, True]
    seq = ds.sequences[0]
    np.testing.assert_allclose(s['target'], pose_to_vec6(relative_pose(*seq.poses_base[1:3])),
                               atol=1e-6)
    assert s['target'][0] == pytest.approx(1.0, abs=0.01)  # 10 m/s for 0.1 s, forward
    np.testing.assert_array_equal(ds[2]['points'], s['points'])  # deterministic subsampling
    padded = KITTIOdomPointDataset(tiny_kitti, '00', sample_cfg=cfg.replace(max_points=800))[0]
    assert padded['points_mask'].sum(axis=1).tolist() == [500, 537]


def test_sample_calibration_from_calib_files(tiny_kitti):
    cfg = SampleConfig(image_height=16, image_width=48, max_points=64)
    ds = KITTIOdomPointDataset(tiny_kitti, '00', sample_cfg=cfg)
    s = ds[0]
    seq = ds.sequences[0]
    assert s['calib_valid'].tolist() == [True, True, True]
    assert s['imu_span'] == s['dt'] == np.float32(0.1)
    # A point seen at pixel (u, v) of the 120x40 frame lands on the same spot, scaled by the
    # resize (pixel centres aligned), in the 48x16 sample image.
    point_cam = np.array([1.5, -0.4, 12.0])
    full = seq.calib.K2 @ point_cam
    small = s['intrinsics'].astype(np.float64) @ point_cam
    np.testing.assert_allclose(small[:2] / small[2],
                               (full[:2] / full[2] + 0.5) * [48 / 120, 16 / 40] - 0.5, atol=1e-4)
    np.testing.assert_allclose(s['t_cam_lidar'], seq.calib.T_cam2_velo, atol=1e-6)
    np.testing.assert_allclose(s['t_imu_lidar'], np.linalg.inv(seq.T_base_imu), atol=1e-6)
    # Without calib_imu_to_velo.txt: imu_link taken as aligned with the LiDAR (still valid).
    (seq.seq_dir / 'calib_imu_to_velo.txt').unlink()
    s = KITTIOdomPointDataset(tiny_kitti, '00', sample_cfg=cfg)[0]
    assert s['calib_valid'].tolist() == [True, True, True]
    np.testing.assert_array_equal(s['t_imu_lidar'], np.eye(4))


def test_ground_truth_required_optional_or_ignored(tiny_kitti):
    cfg = SampleConfig(image_height=16, image_width=48, max_points=64)
    ignored = KITTIOdomPointDataset(tiny_kitti, '00', sample_cfg=cfg, ground_truth='ignore')
    assert not any(ignored[i]['target_valid'] for i in range(len(ignored)))
    assert not ignored[0]['target'].any()
    assert KITTIOdomPointDataset(tiny_kitti, '00', sample_cfg=cfg, ground_truth='auto')[0][
        'target_valid']
    (tiny_kitti / 'poses' / '00.txt').unlink()      # a test sequence, like KITTI 11-21
    with pytest.raises(ValueError, match=r'(?s)poses/00.txt: pose file missing.*supervision self'):
        KITTIOdomPointDataset(tiny_kitti, '00', sample_cfg=cfg)
    auto = KITTIOdomPointDataset(tiny_kitti, '00', sample_cfg=cfg, ground_truth='auto')
    assert len(auto) == 5 and not auto[4]['target_valid']
    with pytest.raises(ValueError, match='ground_truth must be one of'):
        KITTIOdomPointDataset(tiny_kitti, '00', sample_cfg=cfg, ground_truth='maybe')


def test_modalities_mask_inputs(tiny_kitti):
    shutil.rmtree(tiny_kitti / 'sequences/00/image_2')
    cfg = SampleConfig(image_height=16, image_width=48, max_points=64, modalities=('lidar', 'imu'))
    s = KITTIOdomPointDataset(tiny_kitti, '00', sample_cfg=cfg)[0]
    assert s['modality_mask'].tolist() == [False, True, True]
    assert not s['image'].any()


def test_skip_bad_frames_and_collate(tiny_kitti, caplog):
    path = tiny_kitti / 'pointclouds/sequences/00/velodyne/000005.bin'
    path.write_bytes(b'\x00' * 10)
    cfg = SampleConfig(image_height=16, image_width=48, max_points=128)
    with pytest.raises(ValueError, match='000005.bin'):
        KITTIOdomPointDataset(tiny_kitti, '00', sample_cfg=cfg)
    ds = KITTIOdomPointDataset(tiny_kitti, '00', sample_cfg=cfg, on_bad_frame='skip')
    assert len(ds) == 4 and ds.skipped['bad_frame'] == 1
    # A second sequence's log line counts its own skipped samples, not the running total.
    make_tiny_kitti(tiny_kitti, '01')
    (tiny_kitti / 'pointclouds/sequences/01/velodyne/000002.bin').write_bytes(b'\x00' * 10)
    with caplog.at_level(logging.WARNING):
        both = KITTIOdomPointDataset(tiny_kitti, '00,01', sample_cfg=cfg, on_bad_frame='skip')
    assert both.skipped['bad_frame'] == 1 + 2
    assert 'sequence 01: skipping 2 samples touching 1 bad frames' in caplog.text
    nan_scan = tiny_kitti / 'pointclouds/sequences/00/velodyne/000001.bin'
    data = np.fromfile(nan_scan, dtype='<f4')
    data[7] = np.nan
    data.tofile(nan_scan)
    batch = collate_samples([ds[i] for i in range(4)])
    assert batch['num_skipped'] == 2  # samples 0->1 and 1->2 touch the NaN scan
    assert batch['points'].shape == (2, 2, 128, 4) and batch['points'].dtype == torch.float32
    assert [m['frame'] for m in batch['meta']] == [3, 4]


def test_batch_of_four_collates(tiny_kitti):
    cfg = SampleConfig(image_height=16, image_width=48, max_points=128)
    ds = KITTIOdomPointDataset(tiny_kitti, '00', sample_cfg=cfg)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collate_samples)
    batch = next(iter(loader))
    assert batch['image'].shape == (4, 2, 3, 16, 48) and batch['image'].dtype == torch.uint8
    assert batch['imu'].shape == (4, 11, 6) and batch['target'].shape == (4, 6)
    assert batch['modality_mask'].shape == (4, 3) and batch['num_skipped'] == 0
