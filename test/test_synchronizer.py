"""Synchronizer policies with fake stamped data (STYLE §6): no ROS graph, sensor-time clock."""
from conftest import make_tiny_kitti, T0_NS
import numpy as np
import pytest

from mm_fusion_ros.config import SampleConfig
from mm_fusion_ros.geometry import invert_pose
from mm_fusion_ros.kitti.dataset import collate_samples, KITTIOdomPointDataset
from mm_fusion_ros.kitti.sample import Calibration, calibration_arrays, SAMPLE_KEYS
from mm_fusion_ros.sync.config import SyncConfig
from mm_fusion_ros.sync.synchronizer import Synchronizer

MS = 1_000_000
S = 1_000_000_000
CFG = SampleConfig(image_height=8, image_width=8, max_points=16, imu_steps=5)


def image(value):
    """An 8x8 frame whose pixels all equal value, so a sample shows which frame it paired."""
    return np.full((8, 8, 3), value, dtype=np.uint8)


def scan(k):
    return np.random.default_rng(k).normal(size=(20, 4)).astype(np.float32)


def feed_imu(sync, t0_ms, t1_ms, step_ms=10):
    """IMU at 100 Hz whose gyro z equals the stamp in seconds (interpolation is then exact)."""
    for t in range(t0_ms, t1_ms + 1, step_ms):
        sync.add_imu(t * MS, [0.0, 0.0, 9.81], [0.0, 0.0, t / 1000])


def feed_scans(sync, times_ms, images=True, gt=False):
    for k, t in enumerate(times_ms):
        if images:
            sync.add_image(t * MS, image(k))
        if gt:
            sync.add_ground_truth(t * MS, np.eye(4))
        sync.add_cloud(t * MS, scan(k))


def make(**kw):
    return Synchronizer(CFG, SyncConfig(**kw), origin_ns=0)


def pairs(samples):
    """(stamp_prev_ms, stamp_cur_ms) of each sample."""
    return [(s['meta']['stamp_prev_ns'] // MS, s['meta']['stamp_cur_ns'] // MS) for s in samples]


def camera_values(sample):
    return [int(sample['image'][i].max()) if sample['modality_mask'][0] else None for i in (0, 1)]


def test_stamp_order_meta_and_sample_contract():
    sync = make(sequence='online')
    feed_imu(sync, 0, 400)
    feed_scans(sync, [0, 100, 200, 300])
    out = sync.pop_ready()
    assert pairs(out) == [(0, 100), (100, 200), (200, 300)]
    assert [s['meta']['frame'] for s in out] == [1, 2, 3]
    assert {s['meta']['sequence'] for s in out} == {'online'}
    assert all(set(s) == set(SAMPLE_KEYS) for s in out)
    assert out[0]['meta']['stamp_prev'] == 0.0 and out[0]['meta']['stamp_cur'] == 0.1
    assert [s['modality_mask'].tolist() for s in out] == [[True, True, True]] * 3
    assert not any(s['target_valid'] for s in out)  # no GT stream: live robot
    batch = collate_samples(out)
    assert tuple(batch['image'].shape) == (3, 2, 3, 8, 8)
    assert sync.pop_ready() == []
    assert sync.stats['emitted'] == 3 and sync.stats['dropped'] == {}


def test_nearest_camera_frame_within_slop_is_paired():
    sync = make(slop_s=0.05)
    feed_imu(sync, 0, 500)
    sync.add_image(1 * MS, image(1))          # scan 0: 1 ms off
    sync.add_cloud(0, scan(0))
    sync.add_image(70 * MS, image(10))        # scan 100: 30 ms before
    sync.add_image(140 * MS, image(12))       # 40 ms after, and passes the scan stamp
    sync.add_image(90 * MS, image(13))        # 10 ms before
    sync.add_image(103 * MS, image(11))       # 3 ms after: the nearest (out of order)
    sync.add_cloud(100 * MS, scan(1))
    sync.add_image(250 * MS, image(20))       # exactly slop after scan 200: still pairs
    sync.add_cloud(200 * MS, scan(2))
    sync.add_image(350 * MS + 1, image(30))   # 1 ns beyond slop: no pair
    sync.add_cloud(300 * MS, scan(3))
    out = sync.pop_ready()
    assert [camera_values(s) for s in out] == [[1, 11], [11, 20], [None, None]]
    assert sync.stats['masked']['camera'] == 1


def test_imu_window_between_scans_and_waits_for_imu():
    sync = make()
    feed_imu(sync, 0, 90)
    feed_scans(sync, [0, 100])
    assert sync.pop_ready() == []  # IMU has not reached the scan at 0.1 s yet
    feed_imu(sync, 100, 100)
    (sample,) = sync.pop_ready()
    np.testing.assert_allclose(sample['imu'][:, 5], np.linspace(0.0, 0.1, CFG.imu_steps),
                               rtol=0, atol=1e-7)
    np.testing.assert_allclose(sample['imu'][:, 2], 9.81, rtol=1e-6)
    assert sample['dt'] == np.float32(0.1)


def test_imu_window_config_longer_than_scan_interval():
    cfg = SampleConfig(image_height=8, image_width=8, max_points=16, imu_steps=5,
                       imu_window_s=0.3)
    sync = Synchronizer(cfg, SyncConfig(), origin_ns=0)
    feed_imu(sync, 0, 700)
    feed_scans(sync, [0, 100, 200, 300, 400, 500])
    out = sync.pop_ready()
    assert [bool(s['modality_mask'][2]) for s in out] == [False, False, True, True, True]
    np.testing.assert_allclose(out[-1]['imu'][:, 5], np.linspace(0.2, 0.5, 5), atol=1e-7)


def test_cross_stream_out_of_order_gives_the_in_order_result():
    def run(order):
        sync = make(reorder_window_s=0.0)
        events = []
        for k, t in enumerate(range(0, 600, 100)):
            events += [(t, 'cloud', k), (t + 3, 'image', k), (t, 'gt', k)]
        events += [(t, 'imu', t) for t in range(0, 700, 10)]
        for t, kind, k in order(events):
            if kind == 'cloud':
                sync.add_cloud(t * MS, scan(k))
            elif kind == 'image':
                sync.add_image(t * MS, image(k))
            elif kind == 'gt':
                pose = np.eye(4)
                pose[0, 3] = k
                sync.add_ground_truth(t * MS, pose)
            else:
                sync.add_imu(t * MS, [0, 0, 9.81], [0, 0, t / 1000])
        sync.flush()
        return sync.pop_ready(), sync.stats

    rng = np.random.default_rng(3)
    in_order, _ = run(sorted)
    # Each message delivered up to 80 ms late (well within max_lateness), scans never swapped.
    delays = {}
    shuffled, stats = run(lambda ev: sorted(ev, key=lambda e: e[0] + delays.setdefault(
        e, rng.uniform(0, 80) if e[1] != 'cloud' else 0)))
    assert len(in_order) == 5 and stats['dropped'] == {}
    for a, b in zip(in_order, shuffled):
        for key in SAMPLE_KEYS:
            if key != 'meta':
                np.testing.assert_array_equal(a[key], b[key], err_msg=key)
        assert a['meta'] == b['meta']
    assert all(s['target_valid'] for s in shuffled)


def test_scans_out_of_order_within_reorder_window():
    sync = make(reorder_window_s=0.15)
    feed_imu(sync, 0, 600)
    for t in (0, 200, 100, 300, 500, 400):  # pairs of scans swapped
        sync.add_image(t * MS, image(t // 100))
        sync.add_cloud(t * MS, scan(t))
    sync.flush()
    out = sync.pop_ready()
    assert pairs(out) == [(0, 100), (100, 200), (200, 300), (300, 400), (400, 500)]
    assert [camera_values(s) for s in out][1] == [1, 2]
    assert sync.stats['dropped'] == {}


def test_scan_behind_an_emitted_sample_is_dropped_as_late():
    sync = make()  # reorder_window 0: samples go out at once
    feed_imu(sync, 0, 400)
    feed_scans(sync, [0, 200])
    assert pairs(sync.pop_ready()) == [(0, 200)]
    sync.add_cloud(100 * MS, scan(9))
    assert sync.stats['dropped'] == {'late': 1}


def test_messages_older_than_lateness_bound_are_dropped_and_counted():
    sync = make(max_lateness_s=0.5)
    feed_imu(sync, 0, 2000)
    feed_scans(sync, [1900, 2000])
    before = sync.stats['dropped'].get('late', 0)
    sync.add_image(1499 * MS, image(7))      # watermark 2.0 - 0.5 = 1.5: late
    sync.add_imu(1400 * MS, [0, 0, 0], [0, 0, 0])
    sync.add_ground_truth(1000 * MS, np.eye(4))
    sync.add_cloud(1200 * MS, scan(5))
    sync.add_image(1600 * MS, image(8))      # within the bound: accepted
    stats = sync.stats
    assert stats['dropped']['late'] - before == 4
    assert stats['received'] == {'image': 4, 'cloud': 3, 'imu': 202, 'ground_truth': 1}


def test_gap_restarts_the_chain():
    sync = make(max_scan_gap_s=0.3)
    feed_imu(sync, 0, 1000)
    feed_scans(sync, [0, 100, 200, 800, 900])
    out = sync.pop_ready()
    assert pairs(out) == [(0, 100), (100, 200), (800, 900)]
    assert [s['meta']['frame'] for s in out] == [1, 2, 4]
    assert sync.stats['dropped'] == {'gap': 1}


@pytest.mark.parametrize('policy', ['mask', 'drop'])
def test_missing_camera_after_timeout(policy):
    sync = make(camera_timeout_s=0.3, missing_policy=policy)
    feed_imu(sync, 0, 1000)
    feed_scans(sync, [0, 100])                   # camera stream then dies
    feed_scans(sync, [200, 300, 400], images=False)
    assert pairs(sync.pop_ready()) == [(0, 100)]  # scan 0.2 still waits for its frame
    sync.add_cloud(500 * MS, scan(5))             # watermark 0.5 >= 0.2 + timeout
    out = sync.pop_ready()
    if policy == 'mask':
        assert pairs(out) == [(100, 200)]
        assert out[0]['modality_mask'].tolist() == [False, True, True]  # scan 0.2 has none
        assert not out[0]['image'].any()
        assert sync.stats['masked']['camera'] == 1
    else:
        assert out == [] and sync.stats['dropped'] == {'no_camera': 1}


def test_missing_camera_frame_resolves_at_once_when_the_stream_moved_on():
    sync = make(missing_policy='drop')
    feed_imu(sync, 0, 400)
    feed_scans(sync, [0, 100])
    sync.add_cloud(200 * MS, scan(2))   # its frame was lost ...
    sync.add_image(300 * MS, image(3))  # ... the camera stream is already past it
    sync.add_cloud(300 * MS, scan(3))
    assert pairs(sync.pop_ready()) == [(0, 100)]
    assert sync.stats['dropped'] == {'no_camera': 2}  # 0.1 -> 0.2 and 0.2 -> 0.3


@pytest.mark.parametrize('policy', ['mask', 'drop'])
def test_missing_imu_after_timeout(policy):
    sync = make(imu_timeout_s=0.2, missing_policy=policy)
    feed_imu(sync, 0, 150)                       # IMU stream stops at 0.15 s
    feed_scans(sync, [0, 100, 200, 300])
    assert pairs(sync.pop_ready()) == [(0, 100)]
    feed_scans(sync, [400], images=False)        # watermark 0.4 >= 0.2 + 0.2
    out = sync.pop_ready()
    if policy == 'mask':
        assert pairs(out) == [(100, 200)]
        assert out[0]['modality_mask'].tolist() == [True, True, False]
        assert not out[0]['imu'].any()
        assert sync.stats['masked']['imu'] == 1
    else:
        assert out == [] and sync.stats['dropped'] == {'no_imu': 1}


def test_ground_truth_modes():
    def run(mode, gt_times):
        sync = make(ground_truth=mode)
        feed_imu(sync, 0, 600)
        for k, t in enumerate([0, 100, 200, 300, 400]):
            if t in gt_times:
                sync.add_ground_truth(t * MS, np.eye(4) + np.diag([0, 0, 0, 0.0]) + 0)
            sync.add_image(t * MS, image(k))
            sync.add_cloud(t * MS, scan(k))
        sync.flush()
        return sync.pop_ready(), sync.stats

    out, _ = run('auto', [0, 100, 200, 300, 400])
    assert [bool(s['target_valid']) for s in out] == [True] * 4
    out, stats = run('auto', [0, 100, 300, 400])    # GT of 0.2 lost: the stream moved past it
    assert [bool(s['target_valid']) for s in out] == [True, False, False, True]
    assert stats['masked']['target'] == 2
    out, stats = run('require', [0, 100, 300, 400])
    assert pairs(out) == [(0, 100), (300, 400)]
    assert stats['dropped'] == {'no_ground_truth': 2}
    out, _ = run('ignore', [0, 100, 200, 300, 400])
    assert not any(s['target_valid'] for s in out)


def test_ground_truth_waits_once_received():
    sync = make(gt_timeout_s=0.3)
    feed_imu(sync, 0, 600)
    sync.add_ground_truth(0, np.eye(4))
    feed_scans(sync, [0, 100])
    assert sync.pop_ready() == []              # GT of 0.1 not here yet
    pose = np.eye(4)
    pose[0, 3] = 1.5
    sync.add_ground_truth(100 * MS, pose)
    (sample,) = sync.pop_ready()
    assert sample['target_valid'] and sample['target'][0] == pytest.approx(1.5)


def test_duplicates_queue_full_and_nonfinite_are_counted():
    sync = make(max_pending=3, camera_timeout_s=5.0, max_lateness_s=5.0)
    feed_imu(sync, 0, 100)
    sync.add_imu(50 * MS, [0, 0, 0], [0, 0, 0])               # duplicate stamp
    sync.add_imu(200 * MS, [np.nan, 0, 0], [0, 0, 0])          # non-finite
    for t in range(0, 600, 100):                                # camera never comes
        sync.add_cloud(t * MS, scan(t))
    sync.add_cloud(500 * MS, scan(1))                           # duplicate scan
    cloud = scan(0)
    cloud[:3, 0] = np.nan
    sync.add_cloud(600 * MS, cloud)
    stats = sync.stats
    assert stats['dropped'] == {'duplicate': 2, 'nonfinite': 1, 'queue_full': 4}
    assert stats['pending']['scans'] == 3
    assert stats['nonfinite_points'] == 3


def test_queues_stay_bounded_on_a_long_stream():
    sync = make()
    peak = dict.fromkeys(('scans', 'images', 'imu', 'ground_truth', 'ready'), 0)

    def track():
        for key, value in sync.stats['pending'].items():
            peak[key] = max(peak[key], value)

    for k in range(300):
        t = k * 100
        sync.add_cloud(t * MS, scan(k))   # waits for its frame, GT and IMU
        track()
        for offset in (7, 40, 73):        # a 30 Hz camera: two of three frames never pair
            sync.add_image((t + offset) * MS, image(k % 250))
            track()
        sync.add_ground_truth(t * MS, np.eye(4))
        track()
        for t_imu in range(t - 90 if k else 0, t + 1, 10):
            sync.add_imu(t_imu * MS, [0.0, 0.0, 9.81], [0.0, 0.0, 0.0])
            track()
        sync.pop_ready()
    assert sync.stats['emitted'] == 299 and sync.stats['dropped'] == {}
    # IMU: imu_keep_s (2.5 s, for bridging) behind the last processed scan, the 0.1 s interval
    # to the next one and one older sample, at 100 Hz. Frames: a paired one
    # is consumed, unpaired ones live until older than the last processed scan - slop (at
    # t + 0.073 with scan t: t - 0.127, t - 0.06, t - 0.027, t + 0.04, t + 0.073). GT: the
    # previous and the current scan's.
    assert peak == {'scans': 1, 'images': 5, 'imu': 261, 'ground_truth': 2, 'ready': 1}


def test_flush_releases_a_waiting_scan():
    sync = make()
    feed_imu(sync, 0, 100)
    sync.add_cloud(0, scan(0))
    sync.add_image(0, image(0))
    sync.add_cloud(100 * MS, scan(1))      # no frame yet, camera not past it
    assert sync.pop_ready() == []
    sync.flush()
    (sample,) = sync.pop_ready()
    assert sample['modality_mask'].tolist() == [False, True, True]


def play(sync, t0_ms, t1_ms):
    """A bag's worth of 10 Hz scans, frames and GT with 100 Hz IMU, in stamp order."""
    for t in range(t0_ms, t1_ms + 1, 10):
        sync.add_imu(t * MS, [0.0, 0.0, 9.81], [0.0, 0.0, t / 1000])
        if t % 100 == 0:
            k = t // 100
            sync.add_image(t * MS, image(k))
            sync.add_ground_truth(t * MS, np.eye(4))
            sync.add_cloud(t * MS, scan(k))


def test_time_going_back_starts_a_new_run_with_the_same_samples():
    """A looped bag: the second pass is not dropped as late; it is a new run whose samples are
    those of the first pass. The IMU leads the second pass, then the scans: each is held until
    every stream has gone back, so the first pass's last frame, coming late on the other
    streams, still makes its sample and nothing of the first pass is dropped."""
    sync = make(ground_truth='require', rewind_s=0.5)
    play(sync, 0, 600)
    feed_imu(sync, 610, 750)
    first = sync.pop_ready()
    sync.add_imu(0, [0.0, 0.0, 9.81], [0.0, 0.0, 0.0])   # 0.75 s back (> rewind_s): held
    sync.add_image(700 * MS, image(7))                     # pass one's last frame, late
    sync.add_ground_truth(700 * MS, np.eye(4))
    sync.add_cloud(700 * MS, scan(7))
    last = sync.pop_ready()
    sync.add_cloud(0, scan(0))                # the scans go back: run 1 starts
    sync.add_ground_truth(800 * MS, np.eye(4))   # pass one's, after that: not used
    play(sync, 0, 600)                        # (IMU and scan at 0 come a second time)
    second = sync.pop_ready()
    assert pairs(first) == pairs(second) == [(k, k + 100) for k in range(0, 600, 100)]
    assert pairs(last) == [(600, 700)] and last[0]['meta']['run'] == 0
    assert {s['meta']['run'] for s in first} == {0} and {s['meta']['run'] for s in second} == {1}
    for a, b in zip(first, second):
        for key in SAMPLE_KEYS:
            if key != 'meta':
                np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    stats = sync.stats
    assert (stats['run'], stats['rewinds']) == (1, 1)
    assert stats['dropped'] == {'duplicate': 1, 'late': 1}


def test_a_scan_of_the_next_pass_overtaking_the_last_frame_loses_nothing():
    """Across topics the next pass's first scan can arrive before the last pass's final image
    (seen in a 20-minute looped replay): the scan is held, the image still pairs in run 0."""
    sync = make(ground_truth='require', rewind_s=0.5)
    play(sync, 0, 600)
    feed_imu(sync, 610, 700)
    sync.add_cloud(700 * MS, scan(7))
    sync.add_ground_truth(700 * MS, np.eye(4))
    sync.add_imu(0, [0.0, 0.0, 9.81], [0.0, 0.0, 0.0])    # pass two: IMU and scan first
    sync.add_cloud(0, scan(0))
    sync.add_image(700 * MS, image(7))                     # pass one's last frame, late
    assert sync.stats['run'] == 0
    play(sync, 0, 600)                         # (IMU and scan at 0 come a second time)
    samples = sync.pop_ready()
    last = [s for s in samples if s['meta']['run'] == 0][-1]
    assert pairs([last]) == [(600, 700)] and camera_values(last) == [6, 7]
    assert [s['meta']['run'] for s in samples].count(1) == 6
    assert sync.stats['dropped'] == {'duplicate': 1, 'late': 1}   # the repeats only


def test_flush_starts_the_run_that_was_held():
    sync = make(rewind_s=0.5)
    play(sync, 0, 1000)
    for t in (0, 100):                         # the next pass, then the bag stops
        feed_imu(sync, t, t + 90)
        sync.add_image(t * MS, image(t // 100))
        sync.add_cloud(t * MS, scan(t // 100))
    assert sync.stats['run'] == 0              # ground truth has not gone back: held
    sync.pop_ready()
    sync.flush()
    (sample,) = sync.pop_ready()
    assert sample['meta']['run'] == 1 and pairs([sample]) == [(0, 100)]


def test_a_stream_that_goes_back_alone_starts_the_run_after_max_lateness():
    sync = make(rewind_s=0.5, max_lateness_s=1.0)
    play(sync, 0, 2000)
    feed_imu(sync, 0, 990)                    # the scans do not follow (a lost LiDAR)
    assert sync.stats['rewinds'] == 0
    feed_imu(sync, 1000, 1020)                # more than 1 s of held IMU: the run changes
    assert sync.stats['rewinds'] == 1 and sync.stats['pending']['imu'] == 103


def test_imu_is_held_for_bridging_a_hole():
    sync = make(imu_keep_s=2.0)
    feed_imu(sync, 0, 2000)
    feed_scans(sync, [0, 100, 200, 1500, 1600, 1700])   # a 1.3 s hole: the chain restarts
    stamps, gyro = sync.imu_between(200 * MS, 1500 * MS)
    assert stamps[0] == 100 * MS and stamps[-1] == 1600 * MS    # 0.1 s margin on each side
    np.testing.assert_allclose(gyro[:, 2], stamps / S)
    assert sync.imu_between(5000 * MS, 6000 * MS) is None


def test_unused_modalities_are_not_waited_for():
    cfg = SampleConfig(image_height=8, image_width=8, max_points=16, imu_steps=5,
                       modalities=('lidar',))
    sync = Synchronizer(cfg, SyncConfig(missing_policy='drop'), origin_ns=0)
    feed_scans(sync, [0, 100, 200], images=False)
    out = sync.pop_ready()
    assert pairs(out) == [(0, 100), (100, 200)]
    assert out[0]['modality_mask'].tolist() == [False, True, False]
    assert sync.stats['masked'] == {'camera': 0, 'imu': 0, 'target': 2}


def test_bad_inputs_and_config_raise_clear_errors():
    sync = make()
    with pytest.raises(ValueError, match='add_image'):
        sync.add_image(0, np.zeros((4, 4), dtype=np.uint8))
    with pytest.raises(ValueError, match='add_cloud'):
        sync.add_cloud(0, np.zeros((4, 3), dtype=np.float32))
    with pytest.raises(ValueError, match='add_imu'):
        sync.add_imu(0, [0, 0], [0, 0, 0])
    with pytest.raises(ValueError, match='add_ground_truth'):
        sync.add_ground_truth(0, np.eye(3))
    with pytest.raises(ValueError, match='set_calibration: expected a Calibration'):
        sync.set_calibration({'intrinsics': np.eye(3)})
    with pytest.raises(ValueError, match='intrinsics and image_size'):
        Calibration(intrinsics=np.eye(3))
    with pytest.raises(ValueError, match='missing_policy'):
        SyncConfig(missing_policy='ignore')
    with pytest.raises(ValueError, match='max_lateness_s'):
        SyncConfig(max_lateness_s=0.1, camera_timeout_s=0.3)
    with pytest.raises(ValueError, match='slop_s'):
        SyncConfig(slop_s=-1)
    with pytest.raises(ValueError, match='unknown keys'):
        SyncConfig.from_dict({'slop': 0.1})
    cfg = SyncConfig(slop_s=0.02, ground_truth='require')
    assert SyncConfig.from_dict(cfg.to_dict()) == cfg


def _kitti_events(seq, with_gt=True):
    """(stamp_ns, kind, index) of a KITTI tree as a bag would carry them."""
    events = []
    for k, t in enumerate(seq.times):
        ns = T0_NS + round(t * 1e9)
        events += [(ns, 'cloud', k), (ns, 'image', k)] + ([(ns, 'gt', k)] if with_gt else [])
    imu_ns = T0_NS + np.round(seq.imu.stamps * 1e9).astype(np.int64)
    return events + [(int(ns), 'imu', i) for i, ns in enumerate(imu_ns)]


def _feed_kitti(sync, seq, events):
    for ns, kind, i in events:
        if kind == 'cloud':
            sync.add_cloud(ns, seq.load_scan(i))
        elif kind == 'image':
            sync.add_image(ns, seq.load_image(i))
        elif kind == 'gt':
            sync.add_ground_truth(ns, seq.poses_base[i])
        else:
            sync.add_imu(ns, seq.imu.accel[i], seq.imu.gyro[i])
    sync.flush()
    return sync.pop_ready()


@pytest.mark.parametrize('shuffle', [False, True])
def test_kitti_stream_yields_the_dataset_samples_exactly(tmp_path, shuffle):
    root = make_tiny_kitti(tmp_path / 'kitti', frames=7)
    cfg = SampleConfig(image_height=16, image_width=48, max_points=256, imu_steps=11)
    dataset = KITTIOdomPointDataset(root, '00', sample_cfg=cfg)
    seq = dataset.sequences[0]
    events = _kitti_events(seq)
    if shuffle:  # topics interleave differently, each message up to 60 ms late
        rng = np.random.default_rng(0)
        events.sort(key=lambda e: e[0] + (0 if e[1] == 'cloud' else rng.integers(60 * MS)))
    else:
        events.sort(key=lambda e: (e[0], e[1]))
    # The calibration as a robot publishes it: CameraInfo's K with its size, and /tf_static's
    # velodyne -> camera2 and velodyne -> imu_link (what kitti_to_bag writes).
    calib = Calibration.from_transforms(
        camera_matrix=seq.calib.P[2][:, :3], image_size=seq.load_image(0).shape[1::-1],
        T_velo_cam=invert_pose(seq.calib.T_cam2_velo), T_velo_imu=seq.T_base_imu)
    for key, value in calibration_arrays(cfg, calib).items():
        np.testing.assert_allclose(value, dataset[0][key], rtol=1e-6, atol=1e-6, err_msg=key)
    assert dataset[0]['calib_valid'].tolist() == [True, True, True]
    if shuffle:  # given after construction, before the first sample, as a node would
        sync = Synchronizer(cfg, SyncConfig(sequence='00'), origin_ns=T0_NS)
        sync.set_calibration(dataset.calibrations[0])
    else:
        sync = Synchronizer(cfg, SyncConfig(sequence='00'), origin_ns=T0_NS,
                            calibration=dataset.calibrations[0])
    got = _feed_kitti(sync, seq, events)
    assert len(got) == len(dataset) == 6
    for i, sample in enumerate(got):
        want = dataset[i]
        for key in SAMPLE_KEYS:
            if key != 'meta':
                assert np.asarray(sample[key]).dtype == np.asarray(want[key]).dtype, key
                np.testing.assert_array_equal(sample[key], want[key], err_msg=f'{i} {key}')
        assert {k: sample['meta'][k] for k in want['meta']} == want['meta']
        assert sample['meta']['stamp_cur_ns'] == T0_NS + round(seq.times[i + 1] * 1e9)
    assert sync.stats['dropped'] == {}
    # A scan is subsampled once: the second scan of one sample is the first of the next.
    for before, after in zip(got, got[1:]):
        np.testing.assert_array_equal(before['points'][1], after['points'][0])
        np.testing.assert_array_equal(before['points_mask'][1], after['points_mask'][0])
    assert not np.array_equal(got[0]['points'][0], got[0]['points'][1])


def test_kitti_stream_without_ground_truth_is_live_data(tmp_path):
    root = make_tiny_kitti(tmp_path / 'kitti', frames=4)
    cfg = SampleConfig(image_height=16, image_width=48, max_points=64)
    dataset = KITTIOdomPointDataset(root, '00', sample_cfg=cfg)
    seq = dataset.sequences[0]
    sync = Synchronizer(cfg, SyncConfig(sequence='00'), origin_ns=T0_NS)
    got = _feed_kitti(sync, seq, sorted(_kitti_events(seq, with_gt=False)))
    assert [bool(s['target_valid']) for s in got] == [False] * 3
    # No calibration given: every sample says so, and its arrays are the neutral ones.
    assert [s['calib_valid'].tolist() for s in got] == [[False] * 3] * 3
    assert not got[0]['intrinsics'].any()
    np.testing.assert_array_equal(got[1]['points'], dataset[1]['points'])
    np.testing.assert_array_equal(got[1]['imu'], dataset[1]['imu'])


def imu_stream_events(seed):
    """Two passes of a bag (the second one a rewind) whose IMU is messy: local reordering,
    repeated stamps, NaN rows, a burst far behind the scans (late), a gap; each scan and frame
    arrive 0-40 ms of IMU ahead of the IMU that reaches their stamp, so IMU rows complete
    samples. Events are (kind, stamp, payload...) in arrival order."""
    rng = np.random.default_rng(seed)
    events = []
    for t0 in (0, 0):                                 # the second pass goes back: a new run
        imu = [t for t in range(t0, t0 + 1500, 10) if not 700 <= t < 760]   # a 60 ms gap
        for _ in range(15):                           # local reordering
            i = int(rng.integers(len(imu) - 3))
            imu[i], imu[i + 2] = imu[i + 2], imu[i]
        keyed = []
        for pos, t in enumerate(imu):
            gyro = [0.0, float(rng.normal()), t / 1000]
            keyed.append((pos, ('imu', t * MS, [0.0, 0.0, 9.81], gyro)))
            if rng.random() < 0.05:                   # the same stamp again
                keyed.append((pos, ('imu', t * MS, [1.0, 0.0, 9.81], gyro)))
            if rng.random() < 0.04:                   # a non-finite row
                keyed.append((pos, ('imu', t * MS + 3 * MS, [np.nan, 0.0, 9.81], gyro)))
            if t % 100 == 0:
                k, ahead = t // 100, int(rng.integers(0, 5))
                keyed += [(pos - ahead - 0.5, ('image', t * MS, image(k))),
                          (pos - ahead - 0.5, ('cloud', t * MS, scan(k)))]
            if t == 1200:    # behind the scans by more than max_lateness_s: late
                keyed += [(pos, ('imu', s * MS, [0.0, 0.0, 9.81], [0.0, 0.0, 0.0]))
                          for s in range(t - 1150, t - 1050, 10)]
        events += [e for _, e in sorted(keyed, key=lambda item: item[0])]
    return events


def run_events(sync, events, rng=None):
    """Feed events; IMU one add_imu each, or (rng given) runs of consecutive IMU events cut at
    random points into add_imu_batch calls. -> samples popped after every call."""
    samples, batch = [], []

    def flush_batch():
        if batch:
            stamps, accel, gyro = zip(*batch)
            sync.add_imu_batch(list(stamps), np.array(accel), np.array(gyro))
            batch.clear()
            samples.extend(sync.pop_ready())

    for kind, stamp, *payload in events:
        if kind == 'imu' and rng is not None:
            batch.append((stamp, *payload))
            if rng.random() < 0.1:
                flush_batch()
            continue
        flush_batch()
        {'imu': sync.add_imu, 'image': sync.add_image, 'cloud': sync.add_cloud}[kind](
            stamp, *payload)
        samples.extend(sync.pop_ready())
    flush_batch()
    sync.flush()
    return samples + sync.pop_ready()


@pytest.mark.parametrize('seed', range(4))
@pytest.mark.parametrize('cfg', [{}, {'max_imu_samples': 25, 'imu_keep_s': 0.3},
                                 {'imu_timeout_s': 0.0, 'reorder_window_s': 0.0}])
def test_add_imu_batch_equals_add_imu_one_by_one(seed, cfg):
    """Same samples (every array), same counters, same IMU held, whatever the cut."""
    events = imu_stream_events(seed)
    one = make(rewind_s=1.2, **cfg)
    batched = make(rewind_s=1.2, **cfg)
    expected = run_events(one, events)
    got = run_events(batched, events, np.random.default_rng(seed + 100))
    assert len(expected) > 20 and pairs(got) == pairs(expected)
    for a, b in zip(expected, got):
        assert a['meta'] == b['meta']
        for key in SAMPLE_KEYS:
            if key != 'meta':
                np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert batched.stats == one.stats
    assert {'duplicate', 'nonfinite', 'late'} <= set(one.stats['dropped'])
    assert one.stats['rewinds'] == 1
    held_one, held_batched = one.imu_between(0, 2 * S), batched.imu_between(0, 2 * S)
    np.testing.assert_array_equal(held_one[0], held_batched[0])
    np.testing.assert_array_equal(held_one[1], held_batched[1])
