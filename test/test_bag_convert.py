"""kitti_to_bag (issue 4): KITTI -> rosbag2 round trips read back with rosbags and, independently,
with the mcap + mcap-ros2-support libraries; LIO fields; bad input never leaves half a bag."""
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time

from conftest import make_tiny_kitti, T0_NS
from mcap.reader import make_reader
from mcap_ros2.decoder import DecoderFactory
import numpy as np
from PIL import Image
import pytest
from scipy.io import savemat
import yaml

from mm_fusion_ros.bag import topics
from mm_fusion_ros.bag.lidar import point_time, ring_index
from mm_fusion_ros.bag.reader import bag_topics, read_messages, read_numpy
from mm_fusion_ros.bag.writer import (
    convert_sequence,
    ConvertOptions,
    FALLBACK_EPOCH_NS,
    IMU_MARGIN_S,
)
from mm_fusion_ros.cli import kitti_to_bag
from mm_fusion_ros.geometry import invert_pose, rot_to_quat, rpy_to_rot
from mm_fusion_ros.kitti.odometry import KittiSequence
from mm_fusion_ros.kitti.raw import OXTS_INDEX, read_oxts_folder
from mm_fusion_ros.messages import cloud_to_structured

FRAMES = 12


@pytest.fixture(scope='module')
def kitti(tmp_path_factory):
    return make_tiny_kitti(tmp_path_factory.mktemp('kitti') / 'data', frames=FRAMES)


@pytest.fixture(scope='module')
def seq(kitti):
    return KittiSequence(kitti, '00')


@pytest.fixture(scope='module')
def mcap_raw(kitti, tmp_path_factory):
    out = tmp_path_factory.mktemp('bags') / 'kitti_00'
    summary = convert_sequence(ConvertOptions(data_path=kitti, sequence='00', output=out))
    return out, summary


def _by_topic(bag):
    out = {}
    for m in read_numpy(bag):
        out.setdefault(m.topic, []).append(m)
    return out


def _oxts(seq):
    """OXTS stamps [ns] and fields of the samples the writer keeps (frame span +- margin)."""
    stamps, fields = read_oxts_folder(seq.seq_dir / 'oxts')
    frame_ns = T0_NS + np.round(seq.times * 1e9).astype(np.int64)
    margin = int(IMU_MARGIN_S * 1e9)
    keep = (stamps >= frame_ns[0] - margin) & (stamps <= frame_ns[-1] + margin)
    return stamps[keep], fields[keep]


def _tree_digest(folder):
    h = hashlib.sha256()
    for p in sorted(folder.rglob('*')):
        h.update(str(p.relative_to(folder)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def _leftovers(parent, name):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f'.{name}.partial'))


def test_round_trip_counts_stamps_and_sensor_data(mcap_raw, seq):
    bag, summary = mcap_raw
    stamps_ox, fields = _oxts(seq)
    expected = {topics.TF_STATIC_TOPIC: 1, topics.IMAGE_TOPIC: FRAMES,
                topics.CAMERA_INFO_TOPIC: FRAMES, topics.CLOUD_TOPIC: FRAMES,
                topics.IMU_TOPIC: len(stamps_ox), topics.GT_ODOM_TOPIC: FRAMES}
    assert summary.counts == expected
    assert {t: c for t, (_, c) in bag_topics(bag).items()} == expected
    assert summary.frames_written == FRAMES and not summary.skipped and not summary.warnings

    msgs = _by_topic(bag)
    frame_ns = T0_NS + np.round(seq.times * 1e9).astype(np.int64)
    for topic in (topics.IMAGE_TOPIC, topics.CAMERA_INFO_TOPIC, topics.CLOUD_TOPIC,
                  topics.GT_ODOM_TOPIC):
        assert [m.stamp_ns for m in msgs[topic]] == frame_ns.tolist(), topic
        assert [m.log_time_ns for m in msgs[topic]] == frame_ns.tolist(), topic
    everything = list(read_numpy(bag))
    assert all(m.log_time_ns == m.stamp_ns for m in everything if m.topic != '/tf_static')
    assert np.all(np.diff([m.log_time_ns for m in everything]) >= 0), 'not in record order'

    for k, m in enumerate(msgs[topics.CLOUD_TOPIC]):
        assert m.frame_id == 'velodyne'
        assert m.data.tobytes() == seq.scan_path(k).read_bytes(), f'cloud {k} not bit-exact'
    for k, m in enumerate(msgs[topics.IMAGE_TOPIC]):
        assert m.frame_id == 'camera2'
        np.testing.assert_array_equal(m.data, np.asarray(Image.open(seq.image_path(k))))

    imu = msgs[topics.IMU_TOPIC]
    assert [m.stamp_ns for m in imu] == stamps_ox.tolist()
    accel = np.stack([m.data.accel for m in imu])
    gyro = np.stack([m.data.gyro for m in imu])
    quat = np.stack([m.data.quat for m in imu])
    idx = OXTS_INDEX
    # imu_link is the OXTS body frame: values pass through unchanged.
    np.testing.assert_array_equal(accel, fields[:, [idx['ax'], idx['ay'], idx['az']]])
    np.testing.assert_array_equal(gyro, fields[:, [idx['wx'], idx['wy'], idx['wz']]])
    rpy = fields[:, [idx['roll'], idx['pitch'], idx['yaw']]]
    np.testing.assert_allclose(quat, rot_to_quat(rpy_to_rot(*rpy.T)), atol=1e-12)
    raw_imu = next(read_messages(bag, [topics.IMU_TOPIC])).msg
    assert raw_imu.header.frame_id == 'imu_link'
    for cov in (raw_imu.orientation_covariance, raw_imu.angular_velocity_covariance,
                raw_imu.linear_acceleration_covariance):
        cov = np.asarray(cov).reshape(3, 3)
        assert np.all(np.diag(cov) > 0) and np.count_nonzero(cov - np.diag(np.diag(cov))) == 0


def test_camera_info_tf_static_and_ground_truth(mcap_raw, seq):
    bag, _ = mcap_raw
    msgs = _by_topic(bag)
    P2 = seq.calib.P[2]
    height, width = np.asarray(Image.open(seq.image_path(0))).shape[:2]
    for m in msgs[topics.CAMERA_INFO_TOPIC]:
        assert m.frame_id == 'camera2'
        assert (m.data.width, m.data.height) == (width, height)
        np.testing.assert_array_equal(m.data.K, P2[:, :3])
        np.testing.assert_array_equal(m.data.P, P2)
    info = next(read_messages(bag, [topics.CAMERA_INFO_TOPIC])).msg
    assert info.distortion_model == 'plumb_bob'
    np.testing.assert_array_equal(info.d, np.zeros(5))
    np.testing.assert_array_equal(info.r, np.eye(3).ravel())

    (tf,) = msgs[topics.TF_STATIC_TOPIC]
    assert tf.stamp_ns == T0_NS
    assert set(tf.data) == {('base_link', 'velodyne'), ('velodyne', 'camera2'),
                            ('velodyne', 'imu_link')}
    np.testing.assert_allclose(tf.data[('base_link', 'velodyne')], np.eye(4), atol=1e-12)
    np.testing.assert_allclose(tf.data[('velodyne', 'camera2')],
                               invert_pose(seq.calib.T_cam2_velo), atol=1e-9)
    np.testing.assert_allclose(tf.data[('velodyne', 'imu_link')], seq.T_base_imu, atol=1e-9)
    # camera2 sits K^-1 P2[:, 3] (~6 cm, KITTI's baseline term) away from cam0
    cam0_in_velo = invert_pose(seq.calib.Tr)[:3, 3]
    offset = tf.data[('velodyne', 'camera2')][:3, 3] - cam0_in_velo
    baseline = np.linalg.norm(np.linalg.solve(P2[:, :3], P2[:, 3]))
    assert 0.05 < baseline < 0.07 and abs(np.linalg.norm(offset) - baseline) < 1e-9

    odom = msgs[topics.GT_ODOM_TOPIC]
    assert {(m.data.frame_id, m.data.child_frame_id) for m in odom} == {('odom', 'base_link')}
    poses = np.stack([m.data.pose for m in odom])
    np.testing.assert_allclose(poses, seq.poses_base, atol=1e-9)
    twist = np.stack([m.data.twist for m in odom])
    # make_tiny_kitti drives at 10 m/s with a yaw rate of 0.1 rad/s
    np.testing.assert_allclose(twist[:, 5], 0.1, rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(twist[:, :3], axis=1), 10.0, rtol=1e-3)
    assert np.all(twist[:, 0] > 9.9), 'velocity must be expressed in base_link (forward = x)'


def test_metadata_is_humble_readable(mcap_raw):
    bag, _ = mcap_raw
    meta = yaml.safe_load((bag / 'metadata.yaml').read_text())['rosbag2_bagfile_information']
    assert meta['version'] == 8 and meta['storage_identifier'] == 'mcap'
    by_name = {t['topic_metadata']['name']: t['topic_metadata']
               for t in meta['topics_with_message_count']}
    for name, topic in by_name.items():
        # humble parses offered_qos_profiles as a YAML string (a v9 list breaks it)
        assert isinstance(topic['offered_qos_profiles'], str), name
        (qos,) = yaml.safe_load(topic['offered_qos_profiles'])
        assert qos['reliability'] == 1, name                    # RELIABLE
        assert qos['durability'] == (1 if name == '/tf_static' else 2), name  # latched / volatile
        assert qos['depth'] == {'/tf_static': 1, topics.IMU_TOPIC: 1000}.get(name, 100), name
    assert meta['relative_file_paths'] == ['kitti_00.mcap']


def test_mcap_ros2_library_decodes_every_message(mcap_raw, seq):
    bag, summary = mcap_raw
    counts, clouds = {}, []
    with open(bag / 'kitti_00.mcap', 'rb') as f:
        reader = make_reader(f, decoder_factories=[DecoderFactory()])
        for _, channel, message, msg in reader.iter_decoded_messages(log_time_order=True):
            counts[channel.topic] = counts.get(channel.topic, 0) + 1
            if channel.topic == topics.CLOUD_TOPIC:
                clouds.append(bytes(msg.data))
            if channel.topic == topics.IMAGE_TOPIC and counts[channel.topic] == 1:
                assert (msg.encoding, msg.step) == ('rgb8', 3 * msg.width)
            if channel.topic == topics.IMU_TOPIC:
                assert msg.header.frame_id == 'imu_link'
            assert message.log_time == message.publish_time
    assert counts == summary.counts
    assert clouds == [seq.scan_path(k).read_bytes() for k in range(FRAMES)]


def test_png_format_and_sqlite3_storage(kitti, seq, tmp_path):
    out = tmp_path / 'png_sqlite'
    summary = convert_sequence(ConvertOptions(data_path=kitti, sequence='00', output=out,
                                              storage='sqlite3', image_format='png',
                                              distro='jazzy'))
    assert sorted(p.name for p in out.iterdir()) == ['metadata.yaml', 'png_sqlite.db3']
    assert topics.IMAGE_TOPIC not in summary.counts
    assert summary.counts[topics.COMPRESSED_IMAGE_TOPIC] == FRAMES
    meta = yaml.safe_load((out / 'metadata.yaml').read_text())['rosbag2_bagfile_information']
    assert meta['version'] == 9 and meta['storage_identifier'] == 'sqlite3'
    compressed = [m.msg for m in read_messages(out, [topics.COMPRESSED_IMAGE_TOPIC])]
    assert [c.format for c in compressed] == ['png'] * FRAMES
    assert [bytes(c.data) for c in compressed] == \
        [seq.image_path(k).read_bytes() for k in range(FRAMES)]
    msgs = _by_topic(out)
    for k, m in enumerate(msgs[topics.COMPRESSED_IMAGE_TOPIC]):
        np.testing.assert_array_equal(m.data, np.asarray(Image.open(seq.image_path(k))))
    assert [m.data.tobytes() for m in msgs[topics.CLOUD_TOPIC]] == \
        [seq.scan_path(k).read_bytes() for k in range(FRAMES)]
    assert len(msgs[topics.IMU_TOPIC]) == summary.counts[topics.IMU_TOPIC] > 0


def test_lio_fields_ring_and_time(kitti, seq, tmp_path):
    out = tmp_path / 'lio'
    convert_sequence(ConvertOptions(data_path=kitti, sequence='00', output=out, lio_fields=True,
                                    start=2, end=5))
    clouds = [m.msg for m in read_messages(out, [topics.CLOUD_TOPIC])]
    assert len(clouds) == 3
    # IMU is cropped to the converted frames' span plus IMU_MARGIN_S on each side
    imu_ns = [m.log_time_ns for m in read_messages(out, [topics.IMU_TOPIC])]
    frame_ns = T0_NS + np.round(seq.times * 1e9).astype(np.int64)
    margin = int(IMU_MARGIN_S * 1e9)
    assert (imu_ns[0], imu_ns[-1]) == (frame_ns[2] - margin, frame_ns[4] + margin)
    assert len(imu_ns) == 41
    for k, msg in zip(range(2, 5), clouds):
        pts = cloud_to_structured(msg)
        assert [f.name for f in msg.fields] == ['x', 'y', 'z', 'intensity', 'ring', 'time']
        assert (msg.point_step, msg.row_step) == (22, 22 * len(pts))
        assert pts['ring'].dtype == np.uint16 and pts['time'].dtype == np.float32
        assert pts['ring'].min() >= 0 and pts['ring'].max() <= 63
        assert pts['time'].min() >= 0.0 and pts['time'].max() < np.float32(0.1)
        scan = np.fromfile(seq.scan_path(k), dtype='<f4').reshape(-1, 4)
        for i, name in enumerate(('x', 'y', 'z', 'intensity')):
            np.testing.assert_array_equal(pts[name], scan[:, i])
    # the documented conventions, point by point
    probe = np.array([[10.0, 0.0, 0.0, 0], [-10.0, 1e-9, 0, 0], [0.0, 10.0, 0.0, 0],
                      [0.0, -10.0, 0.0, 0], [-10.0, -1e-9, 0, 0],
                      [10.0, 0.0, 10 * np.tan(np.radians(-24.8)), 0],
                      [10.0, 0.0, 10 * np.tan(np.radians(1.9)), 0], [10.0, 0.0, -50.0, 0]])
    np.testing.assert_allclose(point_time(probe)[:4], [0.05, 0.0, 0.025, 0.075], atol=1e-6)
    assert point_time(probe)[4] < np.float32(0.1) and point_time(probe)[4] > 0.0999
    np.testing.assert_array_equal(ring_index(probe)[5:], [0, 63, 0])
    assert ring_index(probe)[0] == int((0 + 24.9) / 26.9 * 64)


def test_existing_output_needs_overwrite_and_stays_intact(kitti, tmp_path, capsys):
    out = tmp_path / 'bag'
    args = ['--data_path', str(kitti), '--sequence', '0', '--output', str(out), '--end', '3']
    assert kitti_to_bag.main(args) == 0
    assert 'frames: 3 of 3 written' in capsys.readouterr().out
    before = _tree_digest(out)
    assert kitti_to_bag.main(args + ['--image_format', 'png']) == 1
    assert '--overwrite' in capsys.readouterr().err
    assert _tree_digest(out) == before
    assert kitti_to_bag.main(args + ['--image_format', 'png', '--overwrite']) == 0
    assert topics.COMPRESSED_IMAGE_TOPIC in bag_topics(out)
    assert _leftovers(tmp_path, 'bag') == []
    precious = tmp_path / 'notes'
    precious.mkdir()
    (precious / 'keep.txt').write_text('mine')
    assert kitti_to_bag.main(args[:-3] + [str(precious), '--overwrite']) == 1
    assert 'not a rosbag2 folder' in capsys.readouterr().err
    assert (precious / 'keep.txt').read_text() == 'mine'


def _corrupt_copy(kitti, tmp_path):
    root = tmp_path / 'data'
    shutil.copytree(kitti, root)
    return root, KittiSequence(root, '00')


def test_bad_frames_fail_or_are_skipped(kitti, tmp_path):
    root, seq = _corrupt_copy(kitti, tmp_path)
    bad_scan = seq.scan_path(6)
    bad_scan.write_bytes(bad_scan.read_bytes()[:-5])              # truncated
    out = tmp_path / 'bag'
    with pytest.raises(ValueError, match=f'{bad_scan}.*--skip_bad'):
        convert_sequence(ConvertOptions(data_path=root, sequence='00', output=out))
    assert not out.exists() and _leftovers(tmp_path, 'bag') == []

    nan_scan = np.fromfile(seq.scan_path(3), dtype='<f4')
    nan_scan[5] = np.nan
    nan_scan.tofile(seq.scan_path(3))
    seq.image_path(9).unlink()
    with pytest.raises(ValueError, match=f'{seq.scan_path(3)}: scan contains NaN'):
        convert_sequence(ConvertOptions(data_path=root, sequence='00', output=out))
    with pytest.raises(ValueError, match=f'{seq.image_path(9)}: image not found'):
        convert_sequence(ConvertOptions(data_path=root, sequence='00', output=out, start=7))
    assert not out.exists()
    # An image that cannot be read (here a folder in its place; permissions, I/O errors) is a
    # bad frame too: skipped with --skip_bad, not a traceback.
    seq.image_path(8).unlink()
    seq.image_path(8).mkdir()
    summary = convert_sequence(ConvertOptions(data_path=root, sequence='00', output=out,
                                              skip_bad=True))
    assert [k for k, _ in summary.skipped] == [3, 6, 8, 9]
    assert 'NaN' in summary.skipped[0][1] and str(bad_scan) in summary.skipped[1][1]
    assert f'{seq.image_path(8)}: image not readable' in summary.skipped[2][1]
    assert str(seq.image_path(9)) in summary.skipped[3][1]
    kept = [k for k in range(FRAMES) if k not in (3, 6, 8, 9)]
    frame_ns = (T0_NS + np.round(seq.times * 1e9).astype(np.int64))[kept].tolist()
    msgs = _by_topic(out)
    for topic in (topics.IMAGE_TOPIC, topics.CAMERA_INFO_TOPIC, topics.CLOUD_TOPIC,
                  topics.GT_ODOM_TOPIC):
        assert [m.stamp_ns for m in msgs[topic]] == frame_ns, topic
    assert len(msgs[topics.IMU_TOPIC]) == len(_oxts(seq)[0]), 'IMU of skipped frames is kept'


def test_interrupted_conversion_leaves_no_bag(kitti, tmp_path):
    out = tmp_path / 'bag'
    seen = []

    def interrupt_at_frame_5(frames, total):
        for item in frames:
            seen.append(item[0])
            if item[0] == 5:
                raise KeyboardInterrupt
            yield item

    with pytest.raises(KeyboardInterrupt):
        convert_sequence(ConvertOptions(data_path=kitti, sequence='00', output=out),
                         progress=interrupt_at_frame_5)
    assert seen == [0, 1, 2, 3, 4, 5]
    assert not out.exists() and _leftovers(tmp_path, 'bag') == []


KILLED_CONVERSION = """
import sys, time
from pathlib import Path
from mm_fusion_ros.bag.writer import convert_sequence, ConvertOptions

def stall_at_frame_5(frames, total):
    for item in frames:
        if item[0] == 5:
            Path(sys.argv[3]).touch()
            time.sleep(600)
        yield item

convert_sequence(ConvertOptions(data_path=sys.argv[1], sequence='00', output=sys.argv[2]),
                 progress=stall_at_frame_5)
"""


def test_a_conversion_killed_mid_way_leaves_its_staging_to_the_next(kitti, tmp_path):
    """kill -9 skips every cleanup: the next conversion to the same output removes the staging
    folder the dead process left (it is as large as the bag), not one of a live process."""
    out, ready = tmp_path / 'bag', tmp_path / 'at_frame_5'
    proc = subprocess.Popen([sys.executable, '-c', KILLED_CONVERSION, str(kitti), str(out),
                             str(ready)])
    try:
        deadline = time.monotonic() + 60
        while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready.exists(), 'the conversion did not reach frame 5'
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    left = _leftovers(tmp_path, 'bag')
    assert len(left) == 1 and left[0].startswith(f'.bag.partial-{proc.pid}-'), left
    live = tmp_path / f'.bag.partial-{os.getppid()}-x'     # a live process's: kept
    older = tmp_path / '.bag.partial-12345678'             # an older version's name: kept
    live.mkdir()
    older.mkdir()
    convert_sequence(ConvertOptions(data_path=kitti, sequence='00', output=out))
    assert _leftovers(tmp_path, 'bag') == sorted([live.name, older.name])
    assert bag_topics(out)[topics.CLOUD_TOPIC][1] == FRAMES


def test_missing_oxts_converts_without_imu(kitti, tmp_path, caplog):
    root, seq = _corrupt_copy(kitti, tmp_path)
    shutil.rmtree(seq.seq_dir / 'oxts')
    out = tmp_path / 'bag'
    summary = convert_sequence(ConvertOptions(data_path=root, sequence='00', output=out))
    assert topics.IMU_TOPIC not in summary.counts
    assert topics.IMU_TOPIC not in bag_topics(out)
    assert any(str(seq.seq_dir / 'oxts') in w for w in summary.warnings)
    assert str(seq.seq_dir / 'oxts') in caplog.text
    # no IMU clock: frames sit on the documented fallback epoch
    cloud_ns = [m.stamp_ns for m in read_numpy(out, [topics.CLOUD_TOPIC])]
    assert cloud_ns == (FALLBACK_EPOCH_NS + np.round(seq.times * 1e9).astype(np.int64)).tolist()
    assert summary.t0_ns == FALLBACK_EPOCH_NS


def test_bad_options_are_clear_errors(kitti, tmp_path, capsys):
    with pytest.raises(ValueError, match='storage .*mcap, sqlite3'):
        ConvertOptions(data_path=kitti, sequence='00', output=tmp_path / 'x', storage='rosbag')
    with pytest.raises(ValueError, match='outside the 12 frames'):
        convert_sequence(ConvertOptions(data_path=kitti, sequence='00', output=tmp_path / 'x',
                                        end=40))
    assert kitti_to_bag.main(['--data_path', str(kitti), '--sequence', '05', '--output',
                              str(tmp_path / 'x')]) == 1
    assert 'sequences present: 00' in capsys.readouterr().err
    assert not (tmp_path / 'x').exists()


def test_mat_imu_without_orientation_follows_rep145(kitti, tmp_path):
    root, seq = _corrupt_copy(kitti, tmp_path)
    shutil.rmtree(seq.seq_dir / 'oxts')
    rng = np.random.default_rng(3)
    data = rng.normal(0, 1, (10 * (FRAMES - 1) + 1, 6))
    (root / 'imus').mkdir()
    savemat(root / 'imus' / '00.mat', {'imu_data_interp': data})
    out = tmp_path / 'bag'
    summary = convert_sequence(ConvertOptions(data_path=root, sequence='00', output=out))
    assert summary.t0_ns == FALLBACK_EPOCH_NS and not summary.warnings
    imu = list(read_messages(out, [topics.IMU_TOPIC]))
    assert len(imu) == len(data)
    # sample 10 k sits at times.txt[k], on the same clock as the frames
    frame_ns = FALLBACK_EPOCH_NS + np.round(seq.times * 1e9).astype(np.int64)
    assert [m.log_time_ns for m in imu[::10]] == frame_ns.tolist()
    for m, row in zip(imu, data):
        assert m.msg.orientation_covariance[0] == -1.0
        acc, gyr = m.msg.linear_acceleration, m.msg.angular_velocity
        np.testing.assert_array_equal([acc.x, acc.y, acc.z, gyr.x, gyr.y, gyr.z], row)
    assert all(s.quat is None for s in (m.data for m in read_numpy(out, [topics.IMU_TOPIC])))


def test_no_ground_truth_and_sequence_without_poses(kitti, tmp_path, capsys):
    out = tmp_path / 'no_gt'
    assert kitti_to_bag.main(['--data_path', str(kitti), '--sequence', '0', '--output', str(out),
                              '--no_ground_truth', '--quiet']) == 0
    have = bag_topics(out)
    assert topics.GT_ODOM_TOPIC not in have
    assert {topics.CLOUD_TOPIC, topics.IMAGE_TOPIC, topics.IMU_TOPIC} <= set(have)
    # A test sequence (no poses file) converts, saying so, with every sensor topic.
    root, seq = _corrupt_copy(kitti, tmp_path)
    seq.poses_path.unlink()
    assert kitti_to_bag.main(['--data_path', str(root), '--sequence', '00', '--output',
                              str(tmp_path / 'test_seq')]) == 0
    printed = capsys.readouterr().out
    assert f'note: {seq.poses_path} not found' in printed and 'warning' not in printed
    assert bag_topics(tmp_path / 'test_seq') == have
