"""The online runtime's pure cores (mm_fusion_ros/runtime), with injected clocks and no ROS."""
import logging
import os
from pathlib import Path
import sys
import threading
import time

import pytest

from mm_fusion_ros.runtime import diagnostics
from mm_fusion_ros.runtime.dispatch import SampleDispatcher
from mm_fusion_ros.runtime.paths import OdomOrder, PathThrottle, PoseTrail
from mm_fusion_ros.runtime.process import MemoryTrimmer
from mm_fusion_ros.runtime.workers import FaultLog, Pacer, Worker


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_a_worker_logs_counts_and_carries_on(caplog):
    faults, done = FaultLog(), threading.Event()
    calls = []

    def step():
        calls.append(1)
        if len(calls) in (2, 3):
            raise OSError(f'disk full ({len(calls)})')
        if len(calls) == 5:
            done.set()

    worker = Worker('trainer', step, faults, error_pause_s=0.0)
    with caplog.at_level(logging.ERROR):
        worker.start()
        assert done.wait(10.0)
        assert worker.stop(10.0)
    assert not worker.failed and len(calls) >= 5
    count, _, message = faults.snapshot()['trainer']
    assert count == 2 and message == 'OSError: disk full (3)'
    # the first one was logged with its traceback; the repeat of the same kind was not
    assert caplog.text.count('Traceback') == 1 and 'disk full (2)' in caplog.text


def test_a_worker_that_cannot_carry_on_is_marked_failed():
    faults = FaultLog()

    def step():
        raise SystemExit(3)

    worker = Worker('dispatch', step, faults)
    worker.start()
    worker._thread.join(10.0)
    assert worker.failed and not worker.alive
    assert faults.snapshot()['dispatch'][2].startswith('worker ended: SystemExit')


def test_fault_log_repeats_are_throttled_by_the_clock(caplog):
    clock = Clock()
    faults = FaultLog(clock=clock, repeat_log_s=10.0)
    with caplog.at_level(logging.ERROR):
        for dt in (0.0, 1.0, 12.0):
            clock.t += dt
            try:
                raise ValueError('bad batch')
            except ValueError as e:
                faults.record('trainer', e, 'step')
    assert caplog.text.count('Traceback') == 2
    assert faults.snapshot()['trainer'] == (3, 0.0, 'step: ValueError: bad batch')


class FakeSync:
    """Stands in for the Synchronizer's two outputs the dispatcher uses."""

    def __init__(self, frames):
        self.ready = [{'meta': {'frame': k}} for k in frames]
        self.flushes = 0

    def pop_ready(self):
        out, self.ready = self.ready, []
        return out

    def flush(self):
        self.flushes += 1


def test_dispatch_reports_the_backlog_and_survives_a_bad_sample():
    calls, faults = [], FaultLog()

    def handle(sample):
        calls.append(('sample', sample['meta']['frame']))
        if sample['meta']['frame'] == 2:
            raise RuntimeError('shape mismatch')

    sync = FakeSync([1, 2, 3])
    dispatcher = SampleDispatcher(sync, handle, on_backlog=lambda n: calls.append(('backlog', n)),
                                  faults=faults)
    dispatcher.notify()
    assert dispatcher.dispatch_step(timeout=1.0) == 3
    assert calls == [('backlog', 3), ('sample', 1), ('backlog', 2), ('sample', 2),
                     ('backlog', 1), ('sample', 3), ('backlog', 0)]
    assert dispatcher.emitted == 3 and dispatcher.failed_samples == 1
    assert faults.snapshot()['dispatch'][2] == 'sample of frame 2: RuntimeError: shape mismatch'
    assert dispatcher.dispatch_step(timeout=0.01) == 0          # nothing new: waits, returns


def test_idle_flush_once_per_quiet_spell():
    clock = Clock()
    sync = FakeSync([])
    dispatcher = SampleDispatcher(sync, lambda s: None, idle_flush_s=1.0, clock=clock)
    assert not dispatcher.check_idle()            # nothing received yet
    dispatcher.notify()
    clock.t += 0.5
    assert not dispatcher.check_idle()
    dispatcher.notify(sensor=False)               # ground truth does not end the quiet spell
    clock.t += 0.6
    assert dispatcher.check_idle() and sync.flushes == 1
    clock.t += 5.0
    assert not dispatcher.check_idle()            # once per spell
    dispatcher.notify()
    clock.t += 1.5
    assert dispatcher.check_idle() and sync.flushes == 2


def test_diagnostics_levels():
    stats = {'received': {'cloud': 10}, 'dropped': {}, 'masked': {'camera': 0}, 'run': 1,
             'rewinds': 1}
    buffer = {'size': 9, 'bytes': 100, 'capacity': 1000}
    ok = diagnostics.synchronizer_status('sync', stats, buffer, {'cloud': 10.0}, 9, 0, {})
    assert ok.level == diagnostics.OK and ok.values['rewinds'] == '1'
    dropped = dict(stats, dropped={'late': 2})
    assert diagnostics.synchronizer_status('sync', dropped, buffer, {}, 9, 0, {}).level == \
        diagnostics.WARN
    recent = {'trainer': (3, 5.0, 'autosave: PermissionError: denied')}
    status = diagnostics.trainer_status('t', {'online_steps': 7, 'online_samples': 9},
                                        {'bridged': 2, 'segments': 1}, recent)
    assert status.level == diagnostics.ERROR and 'autosave: PermissionError' in status.message
    assert status.values['errors_trainer'] == '3' and status.values['trajectory_bridged'] == '2'
    old = {'trainer': (3, diagnostics.ERROR_HOLD_S + 1, 'x')}
    assert diagnostics.trainer_status('t', {}, {}, old).level == diagnostics.WARN


def test_path_throttle_and_trail():
    clock = Clock()
    throttle = PathThrottle(0.5, clock=clock)
    assert throttle.added()                       # the first pose goes out at once
    throttle.published()
    clock.t += 0.2
    assert not throttle.added() and throttle.pending
    clock.t += 0.4
    assert throttle.added()
    trail = PoseTrail(3)
    for k in range(5):
        trail.add(0, k)
    assert list(trail.items) == [2, 3, 4]
    trail.add(1, 'new segment')
    assert list(trail.items) == ['new segment']
    with pytest.raises(ValueError, match='max_poses'):
        PoseTrail(0)


def test_odometry_goes_forward_in_time_and_never_back_to_an_older_segment():
    order = OdomOrder()
    assert order.admit(0, 5_000) and order.admit(0, 5_010)
    assert not order.admit(0, 5_005)              # a scan pose behind the IMU-rate poses
    assert order.admit(1, 100)                    # a rewind: the new segment starts earlier
    # IMU-rate poses of the old segment still on their way: later stamps, but not published
    assert not order.admit(0, 5_020)
    assert order.admit(1, 110)


def test_memory_trimmer_period():
    clock, trims = Clock(), []
    trimmer = MemoryTrimmer(lambda: trims.append(clock.t), period_s=5.0, clock=clock)
    clock.t += 4.0
    assert not trimmer.maybe_trim()
    clock.t += 1.0
    assert trimmer.maybe_trim() and trims == [105.0]
    assert not MemoryTrimmer(None, clock=clock).maybe_trim()


def test_pacer_keeps_a_fixed_schedule_and_skips_missed_ticks():
    now = [100.0]
    slept = []

    def sleep(s):
        slept.append(round(s, 9))
        now[0] += s
    pace = Pacer(0.01, clock=lambda: now[0], sleep=sleep)
    pace.wait()                      # the first call starts the schedule: no wait
    now[0] += 0.003                  # a step of 3 ms
    pace.wait()                      # waits the rest of the period
    now[0] += 0.025                  # a step that ran long: 2 ticks missed, not caught up
    pace.wait()
    now[0] += 0.002
    pace.wait()
    assert slept == [0.007, 0.008]
    with pytest.raises(ValueError, match='period'):
        Pacer(0.0)


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='/proc and prctl are Linux')
def test_a_worker_thread_carries_its_name_in_the_kernel():
    """bench/online.py splits the node's CPU by the kernel's thread names (/proc/.../comm)."""
    seen = threading.Event()

    def comm_names():
        return {(task / 'comm').read_text().strip()
                for task in Path(f'/proc/{os.getpid()}/task').iterdir()}

    worker = Worker('dispatch_probe', lambda: seen.wait(0.05), FaultLog())
    assert 'dispatch_probe' not in comm_names()
    worker.start()
    try:
        for _ in range(100):
            if 'dispatch_probe' in comm_names():
                break
            time.sleep(0.02)
        assert 'dispatch_probe' in comm_names()
    finally:
        seen.set()
        worker.stop(5.0)
