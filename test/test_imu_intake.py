"""The batched IMU intake (sync/imu_intake.py) against the one-message-at-a-time path the node
had: the same synchronizer state from the same serialized messages, bad and foreign-frame
messages counted alike; and the numpy CDR decoder against rosbags' decode_cdr."""
import threading

import numpy as np
import pytest
from test_synchronizer import CFG, image, MS, scan

from mm_fusion_ros.messages import (
    cdr_typestore,
    decode_cdr,
    imu_batch_to_arrays,
    imu_to_arrays,
    stamp_to_ns,
)
from mm_fusion_ros.sync.frames import FrameConfig, FrameError, FrameGuard
from mm_fusion_ros.sync.imu_intake import ImuIntake
from mm_fusion_ros.sync.synchronizer import Synchronizer

IMU = 'sensor_msgs/msg/Imu'


def serialized_imu(stamp_ns, gyro, frame_id='imu_link', accel=(0.0, 0.0, 9.81),
                   little_endian=True) -> bytes:
    store = cdr_typestore()
    t = store.types
    sec, nsec = divmod(stamp_ns, 1_000_000_000)
    vec = t['geometry_msgs/msg/Vector3']
    msg = t[IMU](header=t['std_msgs/msg/Header'](
        stamp=t['builtin_interfaces/msg/Time'](sec=sec, nanosec=nsec), frame_id=frame_id),
        orientation=t['geometry_msgs/msg/Quaternion'](x=0.0, y=0.0, z=0.0, w=1.0),
        orientation_covariance=np.arange(9.0), angular_velocity=vec(*map(float, gyro)),
        angular_velocity_covariance=np.zeros(9), linear_acceleration=vec(*map(float, accel)),
        linear_acceleration_covariance=np.ones(9))
    return bytes(store.serialize_cdr(msg, IMU, little_endian=little_endian))


def test_numpy_decode_equals_decode_cdr():
    raws = [serialized_imu(5 * 10**9 + 7 * k, (0.1 * k, np.nan if k == 3 else 0.2, 0.3),
                           frame_id, accel=(1.0, 2.0, k), little_endian=little)
            for k, (frame_id, little) in enumerate(
                [('imu_link', True), ('', True), ('a', False), ('imu_link', False),
                 ('base_link_long_name', True), ('imu_link', True)])]
    raws.insert(2, b'\x00\x01\x00\x00not an imu message')
    stamps, accel, gyro, frame_ids, bad = imu_batch_to_arrays(raws)
    assert [i for i, _ in bad] == [2] and isinstance(bad[0][1], ValueError)
    for i, raw in enumerate(raws):
        if i == 2:
            continue
        msg = decode_cdr(raw, IMU)
        want_accel, want_gyro = imu_to_arrays(msg)
        assert stamps[i] == stamp_to_ns(msg.header.stamp)
        assert frame_ids[i] == msg.header.frame_id
        np.testing.assert_array_equal(accel[i], want_accel)
        np.testing.assert_array_equal(gyro[i], want_gyro)


def one_by_one(sync, frames, raws):
    """The node's former IMU callback, once per message."""
    for raw in raws:
        try:
            msg = decode_cdr(raw, IMU)
            sync.add_imu(stamp_to_ns(msg.header.stamp), *frames.imu(
                *imu_to_arrays(msg), msg.header.frame_id))
        except ValueError as e:
            sync.reject('imu', 'wrong_frame' if isinstance(e, FrameError) else 'bad_message')


@pytest.mark.parametrize('batch', [1, 7, 1000])
def test_batched_intake_equals_messages_one_at_a_time(batch):
    frames_cfg = FrameConfig(static_transforms=['imu_link imu_rotated 0 0 0 0 0 0.7071068 '
                                                '0.7071068'])
    rng = np.random.default_rng(0)
    stream = []
    for t in range(0, 1000, 10):
        frame_id = 'imu_rotated' if t % 50 == 0 else 'imu_link'
        stream.append(('imu', serialized_imu(t * MS, (0.0, rng.normal(), t / 1000),
                                             frame_id)))
        if t in (200, 210):
            stream.append(('imu', serialized_imu(t * MS, (1.0, 0.0, 0.0))))   # duplicate
        if t == 300:
            stream += [('imu', b'\x00\x01\x00\x00junk'),                      # bad_message
                       ('imu', serialized_imu(t * MS + 1, (0, 0, 0), 'camera'))]   # wrong_frame
        if t == 400:
            stream.append(('imu', serialized_imu(t * MS + 2, (np.nan, 0, 0))))  # nonfinite
        if t % 100 == 40:
            stream += [('image', (t - 40) * MS), ('cloud', (t - 40) * MS)]
    results = []
    for mode in ('one', 'batch'):
        sync = Synchronizer(CFG, origin_ns=0)
        frames = FrameGuard(frames_cfg)
        intake, pending, samples = ImuIntake(sync, frames), [], []
        for kind, item in stream + [('end', None)]:
            if kind == 'imu':
                pending.append(item)
                if len(pending) < batch:
                    continue
            if pending:
                if mode == 'one':
                    one_by_one(sync, frames, pending)
                else:
                    intake.add_raw(pending)
                pending = []
            if kind in ('image', 'cloud'):
                k = item // (100 * MS)
                sync.add_image(item, image(k)) if kind == 'image' else \
                    sync.add_cloud(item, scan(k))
            samples += sync.pop_ready()
        sync.flush()
        results.append((samples + sync.pop_ready(), sync.stats, sync.imu_between(0, 10**9)))
    (one, stats_one, held_one), (got, stats_got, held_got) = results
    assert stats_got == stats_one and len(got) == len(one) == 9
    assert stats_one['dropped'] == {'bad_message': 1, 'wrong_frame': 1, 'duplicate': 2,
                                    'nonfinite': 1}
    for a, b in zip(one, got):
        for key in ('imu', 'modality_mask', 'image', 'points'):
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    np.testing.assert_array_equal(held_one[1], held_got[1])


def test_intake_reports_what_it_skipped():
    sync = Synchronizer(CFG, origin_ns=0)
    intake = ImuIntake(sync, FrameGuard())
    added, skipped = intake.add_raw([serialized_imu(0, (0, 0, 0)), b'junk',
                                     serialized_imu(MS, (0, 0, 0), 'camera')])
    assert added == 1 and [reason for reason, _ in skipped] == ['bad_message', 'wrong_frame']
    assert "'camera'" in str(skipped[1][1])
    assert sync.stats['received']['imu'] == 3


def test_forwarded_imu_is_out_before_a_sample_it_completes_can_be_popped():
    """The intake process forwards each IMU batch to the prediction process; its dispatch
    thread must not hand on a sample that the batch completed ahead of the batch itself, or
    the filter and the bridge there would see the sample without its last IMU rows."""
    sync = Synchronizer(CFG, origin_ns=0)
    popped, order = [], []

    def pop():
        popped.extend(sync.pop_ready())
        order.append('sample' if popped else 'nothing')

    def forward(stamps, accel, gyro):
        popper = threading.Thread(target=pop)     # the dispatch thread, woken meanwhile
        popper.start()
        popper.join(0.3)
        order.append('imu')
        threads.append(popper)

    threads = []
    intake = ImuIntake(sync, FrameGuard())
    intake.add_raw([serialized_imu(t * MS, (0, 0, 0)) for t in range(0, 60, 10)])
    for k in range(3):
        sync.add_image(k * 100 * MS, image(k))
        sync.add_cloud(k * 100 * MS, scan(k))
    assert sync.pop_ready() == []                 # the scans wait for the IMU
    intake.forward = forward
    intake.add_raw([serialized_imu(t * MS, (0, 0, 0)) for t in range(60, 310, 10)])
    threads[0].join(10.0)
    assert popped and order == ['imu', 'sample']
