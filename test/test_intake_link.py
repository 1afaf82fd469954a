"""The intake process's link (runtime/intake_link.py), without ROS: a real spawned child writes
samples through the shared-memory ring, IMU, T_base_imu and ground truth on the queue; the
parent hands them on in order. The node with a real intake process: test_online_e2e.py and
test_online_filter.py (intake: process)."""
import multiprocessing
import os
import signal
import time

import numpy as np
import pytest
import torch.multiprocessing as tmp

from mm_fusion_ros.config import SampleConfig
from mm_fusion_ros.runtime.intake_link import (
    ImuMirror,
    IntakeChannels,
    IntakeLink,
    RingSink,
)
from mm_fusion_ros.sync.config import SyncConfig
from mm_fusion_ros.sync.replay_buffer import EXPECTED_DTYPES, expected_shapes
from mm_fusion_ros.sync.synchronizer import Synchronizer
from mm_fusion_ros.training.learner import SampleRing

CFG = SampleConfig(image_width=32, image_height=16, max_points=64, imu_steps=10)
T_BASE_IMU = np.diag([1.0, -1.0, -1.0, 1.0])


def fake_sample(i: int) -> dict:
    rng = np.random.default_rng(i)
    sample = {k: (rng.random(shape) * 100).astype(EXPECTED_DTYPES[k])
              for k, shape in expected_shapes(CFG).items()}
    sample['meta'] = {'frame': i, 'stamps': [i * 0.1, (i + 1) * 0.1]}
    return sample


def imu_rows(t0_ns: int, n: int, rate_hz=100):
    stamps = t0_ns + np.arange(n, dtype=np.int64) * (1_000_000_000 // rate_hz)
    accel = np.stack([np.full(n, 0.1), np.zeros(n), np.full(n, 9.81)], 1)
    gyro = np.stack([np.zeros(n), np.zeros(n), np.linspace(0.0, 0.1, n)], 1)
    return stamps, accel, gyro


def child_writes(spec, channels):
    """The intake process's part, in plain Python: settings, IMU, frames, samples, GT, end
    (it ends by itself: a stop signal is ignored)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sink = RingSink(channels, supervision='self')
    sink.configure(SyncConfig())
    for i in range(spec['samples']):
        stamps, accel, gyro = imu_rows(i * 100_000_000, 10)
        sink.forward_imu(stamps, accel, gyro, T_BASE_IMU if i >= 2 else None)
        sink.on_ground_truth(i * 100_000_000, np.eye(4) * (i + 1))
        sink.on_sample(fake_sample(i))
    if spec.get('crash'):   # dies without 'end', after what it sent left its queue
        channels.queue.close()
        channels.queue.join_thread()
        os._exit(3)
    sink.end()


def make_link(ctx, samples, slots=3, crash=False):
    got, backlog, gt = [], [], []
    channels = IntakeChannels(ring=SampleRing(ctx, CFG, slots), queue=ctx.Queue(),
                              written=ctx.Value('q', 0, lock=False), parent_pid=os.getpid())
    link = IntakeLink(ctx, channels, ImuMirror(SyncConfig(), CFG.imu_window_s), child_writes,
                      {'samples': samples, 'crash': crash}, on_sample=got.append,
                      on_backlog=backlog.append, on_ground_truth=lambda s, p: gt.append((s, p)))
    return link, got, backlog, gt


def run_link(link, got, samples, pause_s=0.0) -> bool:
    """Start the child, hand its items on until `samples` samples arrived, stop it: whether
    it ended cleanly."""
    link.start()
    deadline = time.monotonic() + 60
    while len(got) < samples and time.monotonic() < deadline:
        link.step(0.1)
        time.sleep(pause_s)
    return link.stop(timeout=30)


def test_samples_imu_frames_and_ground_truth_arrive_in_order_through_a_small_ring():
    """12 samples through 3 slots: the child waits for free slots; every sample arrives whole,
    in order, copied out of its slot; the backlog is reported before each and 0 at the end."""
    ctx = tmp.get_context('spawn')
    link, got, backlog, gt = make_link(ctx, 12)
    assert run_link(link, got, 12, pause_s=0.01)   # a slow predictor: the child waits for slots
    assert [s['meta']['frame'] for s in got] == list(range(12))
    for i, sample in enumerate(got):
        want = fake_sample(i)
        for k in expected_shapes(CFG):
            np.testing.assert_array_equal(sample[k], want[k], err_msg=k)
    slots = link.channels.ring.views().values()
    assert not any(np.shares_memory(got[0]['image'], v) for v in slots)
    assert backlog[-1] == 0 and min(b for b in backlog if b) >= 1 and len(backlog) >= 12
    assert link.backlog == 0 and link.problems() == []
    assert [s for s, _ in gt] == [i * 100_000_000 for i in range(12)]
    np.testing.assert_array_equal(link.base_imu(), T_BASE_IMU)
    np.testing.assert_array_equal(link.rot_base_imu(), T_BASE_IMU[:3, :3])
    stamps, accel, gyro = link.imu.imu_after(1_000_000_000)
    assert len(stamps) == 19 and np.all(np.diff(stamps) > 0)    # 1.01 .. 1.19 s
    np.testing.assert_allclose(accel[:, 2], 9.81)


def test_a_sample_whose_prediction_raises_is_counted_and_the_next_ones_arrive():
    ctx = tmp.get_context('spawn')
    link, got, backlog, _ = make_link(ctx, 5)

    def predict(sample):
        if sample['meta']['frame'] == 2:
            raise ValueError('a bad sample')
        got.append(sample)

    link.on_sample = predict
    assert run_link(link, got, 4)
    assert [s['meta']['frame'] for s in got] == [0, 1, 3, 4]
    assert link.failed_samples == 1 and backlog[-1] == 0 and link.backlog == 0
    assert 'a bad sample' in str(link.faults.snapshot())


def test_an_item_whose_handler_raises_is_recorded_and_the_link_goes_on():
    """Ground truth (or IMU) the parent cannot take is recorded; the items behind it still
    arrive, and stop() (the node's shutdown, which then writes the final files) completes."""
    ctx = tmp.get_context('spawn')
    link, got, _, gt = make_link(ctx, 4)

    def take_ground_truth(stamp, pose):
        if stamp == 100_000_000:
            raise ValueError('a bad pose')
        gt.append((stamp, pose))

    link.on_ground_truth = take_ground_truth
    assert run_link(link, got, 4)
    assert [s['meta']['frame'] for s in got] == [0, 1, 2, 3]
    assert [s for s, _ in gt] == [0, 200_000_000, 300_000_000]
    assert 'a bad pose' in str(link.faults.snapshot())


def test_a_child_that_dies_is_reported_and_its_samples_kept():
    ctx = tmp.get_context('spawn')
    link, got, _, _ = make_link(ctx, 2, slots=4, crash=True)
    link.start()
    link.process.join(timeout=60)
    assert link.process.exitcode == 3
    assert link.problems() == ['the intake process ended (exit code 3)']
    assert not link.stop(timeout=5)     # no 'end': not a clean stop
    assert [s['meta']['frame'] for s in got] == [0, 1]
    # The node's shutdown stops the link and then asks again: the death is still reported
    # (it was not, and the node exited 0).
    assert link.problems() == ['the intake process did not stop cleanly (exit code 3, no end '
                               'message)']


def test_the_imu_mirror_answers_as_the_synchronizer_does():
    """The same IMU stream, one NaN row and a duplicate included, into a Synchronizer and a
    mirror: imu_between and imu_after give the same arrays over the kept window."""
    sync_cfg = SyncConfig()
    sync = Synchronizer(CFG, sync_cfg)
    mirror = ImuMirror(sync_cfg, CFG.imu_window_s)
    stamps, accel, gyro = imu_rows(5_000_000_000, 150)
    gyro[40] = np.nan
    sync.add_cloud(4_990_000_000, np.ones((100, 4), np.float32))   # a run to hold IMU for
    for lo in range(0, 150, 7):
        hi = min(lo + 7, 150)
        for target in (sync.add_imu_batch, mirror.add):
            target(stamps[lo:hi], accel[lo:hi], gyro[lo:hi])
    mirror.add(stamps[10:11], accel[10:11], gyro[10:11])     # a duplicate
    t0, t1 = int(stamps[20]), int(stamps[90])
    a, b = sync.imu_between(t0, t1), mirror.imu_between(t0, t1)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    for x, y in zip(sync.imu_after(int(stamps[30])), mirror.imu_after(int(stamps[30]))):
        np.testing.assert_array_equal(x, y)
    assert len(mirror) == 149                      # the NaN row left out


def test_the_imu_mirror_keeps_its_window_and_starts_afresh_on_a_rewind():
    sync_cfg = SyncConfig(imu_keep_s=1.0, rewind_s=1.0)
    mirror = ImuMirror(sync_cfg, imu_window_s=0.5)
    keep_s = 1.0 + 1.0                             # imu_keep_s + KEEP_SLACK_NS
    mirror.add(*imu_rows(0, 1000))                 # 10 s
    stamps, _, _ = mirror.imu_after(-1)
    assert (stamps[-1] - stamps[0]) / 1e9 == pytest.approx(keep_s, abs=0.011)
    late = imu_rows(9_500_000_000, 3)     # late rows of the same run (within rewind_s) are kept
    mirror.add(*late)
    assert mirror.imu_after(9_499_000_000)[0].tolist()[:3] == late[0].tolist()
    looped = [np.concatenate([a, b]) for a, b in zip(imu_rows(10_000_000_000, 2),
                                                     imu_rows(2_000_000_000, 5))]
    mirror.add(*looped, run=1)                     # back by 8 s within the batch: a looped bag
    stamps, _, _ = mirror.imu_after(-1)
    assert stamps.tolist() == imu_rows(2_000_000_000, 5)[0].tolist()
    # An IMU that leads the next pass still carries the old run's number (the synchronizer's
    # run changes with the scans): its rows are held, and are the new run's first ones.
    mirror.add(*imu_rows(0, 10), run=1)
    assert mirror.imu_after(-1)[0].tolist() == imu_rows(2_000_000_000, 5)[0].tolist()
    mirror.add(*imu_rows(100_000_000, 10), run=2)
    assert mirror.imu_after(-1)[0].tolist() == imu_rows(0, 20)[0].tolist()


def test_the_imu_mirror_keeps_the_imu_that_leads_a_looped_bag_as_the_synchronizer_does():
    """The second pass of a bag whose IMU leads its scans by 0.3 s: the IMU's rows come with
    the old run's number. The mirror answers as the Synchronizer over the new run's start
    (before, it dropped the 0.3 s the IMU led by)."""
    sync_cfg = SyncConfig(ground_truth='ignore')
    cfg = CFG.replace(modalities=('lidar', 'imu'))
    sync = Synchronizer(cfg, sync_cfg)
    mirror = ImuMirror(sync_cfg, cfg.imu_window_s, min_keep_s=2.0)
    rng = np.random.default_rng(0)
    base = 100_000_000_000

    def imu(t0):
        stamps, accel, gyro = imu_rows(t0, 10)
        sync.add_imu_batch(stamps, accel, gyro,
                           then=lambda: mirror.add(stamps, accel, gyro, run=sync.run))

    for k in range(100):                            # the first pass, 10 s
        imu(base + k * 100_000_000)
        sync.add_cloud(base + k * 100_000_000 + 50_000_000,
                       rng.normal(size=(64, 4)).astype(np.float32))
    for k in range(3):                              # the second pass: the IMU leads
        imu(base + k * 100_000_000)
    for k in range(3, 6):
        imu(base + k * 100_000_000)
        sync.add_cloud(base + (k - 3) * 100_000_000 + 50_000_000,
                       rng.normal(size=(64, 4)).astype(np.float32))
    assert sync.run == 1
    for a, b in zip(sync.imu_after(base - 1), mirror.imu_after(base - 1)):
        np.testing.assert_array_equal(a, b)
    assert mirror.imu_after(base - 1)[0][0] == base
    for a, b in zip(sync.imu_between(base, base + 300_000_000),
                    mirror.imu_between(base, base + 300_000_000)):
        np.testing.assert_array_equal(a, b)
    longer = ImuMirror(sync_cfg, imu_window_s=0.5, min_keep_s=4.0)   # the longest bridge
    longer.add(*imu_rows(0, 1000))
    stamps, _, _ = longer.imu_after(-1)
    assert (stamps[-1] - stamps[0]) / 1e9 == pytest.approx(4.0, abs=0.011)


def test_the_sink_waits_for_a_free_slot_and_gives_up_when_its_parent_is_gone():
    ctx = multiprocessing.get_context('spawn')
    channels = IntakeChannels(ring=SampleRing(ctx, CFG, 1), queue=ctx.Queue(),
                              written=ctx.Value('q', 0, lock=False),
                              parent_pid=-1)                   # not our parent
    sink = RingSink(channels, 'self')
    sink.on_sample(fake_sample(0))                 # the one slot
    with pytest.raises(RuntimeError, match='prediction process is gone'):
        sink.on_sample(fake_sample(1))
    assert channels.written.value == 1


def orphan_fills_its_queue_and_ends(_spec, _channels):
    """A child whose parent is gone (parent_pid is not its parent): ~1 MB of IMU nobody reads,
    more than the pipe holds, then the sink's end()."""
    ctx = multiprocessing.get_context('spawn')
    channels = IntakeChannels(ring=SampleRing(ctx, CFG, 1), queue=ctx.Queue(),
                              written=ctx.Value('q', 0, lock=False), parent_pid=-1)
    sink = RingSink(channels, 'self')
    for i in range(200):
        sink.forward_imu(*imu_rows(i * 1_000_000_000, 100))
    sink.end()


def test_an_orphaned_sink_ends_although_nobody_reads_its_queue():
    """end() waits for the queue's pipe to take everything only while the parent lives: an
    orphan (its parent killed with -9 mid-replay) would otherwise hang on a full pipe, with its
    DDS participant and shared memory, until SIGKILL."""
    ctx = multiprocessing.get_context('spawn')
    child = ctx.Process(target=orphan_fills_its_queue_and_ends, args=(None, None))
    child.start()
    child.join(60.0)
    try:
        assert child.exitcode == 0, 'the orphaned sink did not end'
    finally:
        if child.is_alive():
            child.kill()
            child.join(5.0)


def test_a_sample_the_ring_cannot_take_gives_its_slot_back():
    ctx = multiprocessing.get_context('spawn')
    ring = SampleRing(ctx, CFG, 1)
    bad = fake_sample(0)
    bad['points'] = np.full(bad['points'].shape, 'not a number', dtype=object)
    with pytest.raises(ValueError):
        ring.write(bad, timeout=10.0)
    slot, _ = ring.write(fake_sample(1), timeout=10.0)    # the one slot is free again
    assert np.array_equal(ring.views()['points'][slot], fake_sample(1)['points'])
