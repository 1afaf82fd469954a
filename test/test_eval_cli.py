"""evaluate_odometry end to end: one sequence, several sequences with baselines, bad inputs."""
import json
import shutil

import numpy as np
from PIL import Image
import pytest

from mm_fusion_ros.cli import evaluate_odometry
from mm_fusion_ros.eval import baselines, metrics
from mm_fusion_ros.eval.trajectory_io import (
    read_kitti_poses,
    read_steps,
    write_kitti_poses,
    write_segment,
    write_steps,
)
from mm_fusion_ros.geometry import cam0_to_base_link, make_pose, rpy_to_rot, so3_exp
from mm_fusion_ros.kitti.odometry import Calib, NOMINAL_TR, write_calib

TOP_KEYS = {'t_rel', 'r_rel', 'ate', 'rpe_trans', 'rpe_rot', 'per_length', 'ate_sim3',
            'num_poses'}


def drifted(gt, scale, yaw_deg_per_frame):
    """GT steps with a scale error and a yaw drift about camera y, chained from GT's first pose."""
    steps = np.linalg.inv(gt[:-1]) @ gt[1:]
    u, _, vt = np.linalg.svd(steps[:, :3, :3])
    steps[:, :3, :3] = so3_exp([0.0, np.deg2rad(yaw_deg_per_frame), 0.0]) @ (u @ vt)
    steps[:, :3, 3] *= scale
    out = [gt[0]]
    for step in steps:
        out.append(out[-1] @ step)
    return np.stack(out)


@pytest.fixture
def data_tree(tmp_path, kitti_sample):
    """DATA/poses with real GT of 00, 05, 07, 09 and PRED/07.txt, PRED/09.txt predictions."""
    data, pred_dir = tmp_path / 'data', tmp_path / 'results'
    (data / 'poses').mkdir(parents=True)
    for seq in ('00', '05', '07', '09'):
        shutil.copy(kitti_sample / 'poses' / f'{seq}.txt', data / 'poses' / f'{seq}.txt')
    for seq, scale in (('07', 1.02), ('09', 0.97)):
        gt = read_kitti_poses(data / 'poses' / f'{seq}.txt')
        write_kitti_poses(pred_dir / f'{seq}.txt', drifted(gt, scale, 0.01))
    return data, pred_dir


def test_single_sequence_json_and_plot(tmp_path, data_tree, capsys):
    data, pred_dir = data_tree
    gt_path, pred_path = data / 'poses' / '07.txt', pred_dir / '07.txt'
    out_json, out_png = tmp_path / 'out' / 'm.json', tmp_path / 'out' / 'm.png'
    rc = evaluate_odometry.main(['--gt', str(gt_path), '--pred', str(pred_path),
                                 '--json', str(out_json), '--plot', str(out_png)])
    assert rc == 0
    report = json.loads(out_json.read_text())
    assert TOP_KEYS <= set(report)
    gt, pred = read_kitti_poses(gt_path), read_kitti_poses(pred_path)
    expected = metrics.evaluate(gt, pred)
    for key in ('t_rel', 'r_rel', 'ate', 'ate_sim3', 'rpe_trans', 'rpe_rot'):
        assert report[key] == pytest.approx(expected[key], rel=1e-12), key
    assert report['num_poses'] == 1101
    assert set(report['per_length']) == {str(k) for k in metrics.SEGMENT_LENGTHS}
    assert report['per_length']['100']['count'] == expected['per_length'][100]['count'] > 0
    assert report['per_length']['800'] == {'t_rel': None, 'r_rel': None, 'count': 0}
    assert 1.0 < report['t_rel'] < 5.0    # 2% scale + yaw drift

    table = capsys.readouterr().out
    assert 't_rel[%]' in table and 'RPE_r[deg]' in table
    assert f'{report["t_rel"]:.4f}' in table

    assert out_png.stat().st_size > 30_000
    assert sorted(p.name for p in out_png.parent.iterdir()) == ['m.json', 'm.png']  # no temps
    image = np.asarray(Image.open(out_png).convert('RGB'))
    assert image.shape[0] > 300 and image.shape[1] > 1000
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 50   # drawn, not a blank canvas


def test_multi_sequence_with_baselines(tmp_path, data_tree, capsys):
    data, pred_dir = data_tree
    out_json, out_png = tmp_path / 'multi.json', tmp_path / 'multi.png'
    rc = evaluate_odometry.main([
        '--data_path', str(data), '--sequences', '7,9', '--pred_dir', str(pred_dir),
        '--baseline', 'cv_oracle', '--baseline', 'mean_motion', '--train_sequences', '0,5',
        '--rpe_delta', '10', '--rpe_unit', 'm', '--json', str(out_json), '--plot', str(out_png)])
    assert rc == 0
    report = json.loads(out_json.read_text())
    assert TOP_KEYS <= set(report)
    assert set(report['sequences']) == {'07', '09'}
    per_seq = report['sequences']
    for seq in ('07', '09'):
        gt = read_kitti_poses(data / 'poses' / f'{seq}.txt')
        pred = read_kitti_poses(pred_dir / f'{seq}.txt')
        assert per_seq[seq]['t_rel'] == pytest.approx(metrics.kitti_metrics(gt, pred)['t_rel'])
        assert per_seq[seq]['rpe_trans'] == pytest.approx(metrics.rpe(gt, pred, 10, 'm')
                                                          .trans_rmse)
    # The average is the mean of per-sequence values (not pooled over segments).
    for key in ('t_rel', 'r_rel', 'ate'):
        assert report[key] == pytest.approx((per_seq['07'][key] + per_seq['09'][key]) / 2)
    assert report['num_poses'] == 1101 + 1591
    assert report['per_length']['100']['count'] == sum(per_seq[s]['per_length']['100']['count']
                                                       for s in per_seq)

    cv = report['baselines']['cv_oracle']
    gt07 = read_kitti_poses(data / 'poses' / '07.txt')
    assert cv['sequences']['07']['t_rel'] == pytest.approx(
        metrics.kitti_metrics(gt07, baselines.cv_oracle(gt07))['t_rel'])
    step = baselines.mean_step([read_kitti_poses(data / 'poses' / f'{s}.txt')
                                for s in ('00', '05')])
    mm = report['baselines']['mean_motion']['sequences']['07']
    assert mm['ate'] == pytest.approx(metrics.ate(gt07, baselines.mean_motion(gt07, step)))
    assert mm['t_rel'] > 10 * cv['sequences']['07']['t_rel']   # a blind guess is far worse

    table = capsys.readouterr().out
    for row in ('07        prediction', '09        cv_oracle', 'average   prediction',
                'average   mean_motion', 'RPE over pairs 10 m apart'):
        assert row in table
    assert out_png.stat().st_size > 60_000


def test_mismatched_lengths_name_both_files(tmp_path, data_tree, capsys):
    data, pred_dir = data_tree
    short = tmp_path / 'short.txt'
    write_kitti_poses(short, read_kitti_poses(pred_dir / '07.txt')[:-10])
    rc = evaluate_odometry.main(['--gt', str(data / 'poses' / '07.txt'), '--pred', str(short)])
    assert rc == 2
    err = capsys.readouterr().err
    assert str(data / 'poses' / '07.txt') in err and str(short) in err
    assert '1101' in err and '1091' in err


def test_malformed_prediction_names_line(tmp_path, data_tree, capsys):
    data, pred_dir = data_tree
    lines = (pred_dir / '09.txt').read_text().splitlines()
    lines[41] = lines[41].replace(lines[41].split()[3], 'abc', 1)
    (pred_dir / '09.txt').write_text('\n'.join(lines) + '\n')
    rc = evaluate_odometry.main(['--data_path', str(data), '--sequences', '07,09',
                                 '--pred_dir', str(pred_dir)])
    assert rc == 2
    assert f'{pred_dir / "09.txt"}:42: not a number' in capsys.readouterr().err


def test_missing_prediction_file(tmp_path, data_tree, capsys):
    data, pred_dir = data_tree
    rc = evaluate_odometry.main(['--data_path', str(data), '--sequences', '5',
                                 '--pred_dir', str(pred_dir)])
    assert rc == 2
    assert str(pred_dir / '05.txt') in capsys.readouterr().err


@pytest.mark.parametrize('argv,message', [
    (['--gt', 'a.txt'], 'needs both --gt and --pred'),
    (['--gt', 'a.txt', '--pred', 'b.txt', '--sequences', '7'], 'not both'),
    (['--sequences', '7'], 'go together'),
    (['--data_path', 'd', '--sequences', '7'], 'nothing to evaluate'),
    (['--data_path', 'd', '--sequences', '7', '--baseline', 'mean_motion'], '--train_sequences'),
    (['--gt', 'a', '--pred', 'b', '--baseline', 'imu'], 'need --data_path and --sequences'),
    (['--gt', 'a', '--pred', 'b', '--pred_frame', 'base_link'], '--calib'),
    (['--gt', 'a', '--pred', 'b', '--rpe_delta', '2.5'], 'positive integer'),
    (['--data_path', 'd', '--sequences', '0,4', '--baseline', 'cv_oracle', '--calib', 'c.txt'],
     '--calib is for one sequence'),
    (['--data_path', 'd', '--sequences', '7,x', '--baseline', 'cv_oracle'], 'not a number'),
])
def test_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        evaluate_odometry.main(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_kiss_icp_baseline_without_package(monkeypatch, capsys):
    monkeypatch.setattr(baselines, 'kiss_icp_available', lambda: False)
    with pytest.raises(SystemExit):
        evaluate_odometry.main(['--data_path', 'd', '--sequences', '7',
                                '--baseline', 'kiss_icp'])
    assert 'kiss-icp package is not installed' in capsys.readouterr().err


def test_single_sequence_base_link_prediction_with_calib(tmp_path, data_tree, capsys):
    data, pred_dir = data_tree
    gt_path = data / 'poses' / '07.txt'
    tr = make_pose(rpy_to_rot(0.01, -0.02, 0.005) @ NOMINAL_TR[:3, :3], [0.1, -0.05, -0.3])
    write_calib(tmp_path / 'calib.txt', Calib(P=np.tile(np.eye(3, 4), (4, 1, 1)), Tr=tr))
    pred_cam0 = read_kitti_poses(pred_dir / '07.txt')
    write_kitti_poses(tmp_path / 'base.txt', cam0_to_base_link(pred_cam0, tr))
    argv = ['--gt', str(gt_path), '--json', str(tmp_path / 'b.json')]
    rc = evaluate_odometry.main(argv + ['--pred', str(tmp_path / 'base.txt'), '--pred_frame',
                                        'base_link', '--calib', str(tmp_path / 'calib.txt')])
    assert rc == 0
    converted = json.loads((tmp_path / 'b.json').read_text())
    expected = metrics.kitti_metrics(read_kitti_poses(gt_path), pred_cam0)
    assert converted['t_rel'] == pytest.approx(expected['t_rel'], rel=1e-6)
    assert converted['r_rel'] == pytest.approx(expected['r_rel'], rel=1e-5)
    # Read as if already in cam0, the same file scores very differently.
    assert evaluate_odometry.main(argv + ['--pred', str(tmp_path / 'base.txt')]) == 0
    assert json.loads((tmp_path / 'b.json').read_text())['t_rel'] > 5 * expected['t_rel']


def test_online_trajectory_sidecar_reports_bridged_steps(tmp_path, data_tree, capsys):
    """A trajectory written by the online node (pose files + steps sidecar) is read back, and
    the evaluation says how many of its steps were bridged and where its segment starts."""
    data, pred_dir = data_tree
    gt = read_kitti_poses(data / 'poses' / '07.txt')[:200]
    pred = drifted(gt, 1.01, 0.0)
    stamps = 10**18 + np.arange(200) * 10**8
    bridged = np.zeros(200, dtype=bool)
    bridged[[5, 50, 51]] = True
    written = write_segment(tmp_path / 'traj', 1, stamps, pred, bridged, gt=gt,
                            gt_valid=np.ones(200, dtype=bool))
    assert sorted(p.name for p in (tmp_path / 'traj').iterdir()) == [
        'gt_base_link.seg1.txt', 'pred_base_link.seg1.steps.csv', 'pred_base_link.seg1.txt']
    steps = read_steps(written['steps'])
    assert (steps['stamp_ns'] == stamps).all() and (steps['bridged'] == bridged).all()
    out_json = tmp_path / 'm.json'
    assert evaluate_odometry.main(['--gt', str(written['gt']), '--pred', str(written['pred']),
                                   '--json', str(out_json)]) == 0
    report = json.loads(out_json.read_text())
    assert (report['bridged_steps'], report['steps'], report['segment']) == (3, 199, 1)
    assert report['first_stamp_ns'] == 10**18
    assert '3 of 199 steps bridged' in capsys.readouterr().out
    # a sidecar that does not match its pose file is refused, naming it
    write_steps(written['steps'], stamps[:10], 1, bridged[:10], bridged[:10])
    assert evaluate_odometry.main(['--gt', str(written['gt']), '--pred',
                                   str(written['pred'])]) == 2
    assert 'pred_base_link.seg1.steps.csv has 10 rows' in capsys.readouterr().err
