"""The intake process and its link to the prediction process (OnlineConfig.intake = 'process').

On 2 cores the node's intake (taking 1-2 MB messages from DDS, decoding, the synchronizer,
resizing and subsampling) used as much CPU as the prediction, and both shared one GIL: the
process never got more than about one core (bench/online.py's CPU by thread,
docs/online_runtime.md). With `intake: process` the synchronizer node runs in a child process of
its own (ros/intake_process.py) and hands the prediction process what the trainer node took from
it in one process, through one ordered channel:

- samples: the arrays in a ring of shared-memory slots (training/learner.py's SampleRing), then
  ('sample', slot, other arrays, meta) on the queue; the parent copies them out and frees the
  slot. With no free slot the child's dispatch worker waits, so the synchronizer's own queue
  bounds the backlog and counts its drops (queue_full) as in one process.
- ('imu', stamps, accel, gyro, run): every IMU batch the synchronizer took, in its IMU frame, for
  the trajectory's bridge and the inertial filter (ImuMirror: the Synchronizer's imu_between /
  imu_after over the same window);
- ('sync_config', SyncConfig): first, the synchronizer's settings (ImuMirror.configure);
- ('frames', T_base_imu): when the child learns or changes it;
- ('gt', stamp, pose): the recorded ground truth, for scoring;
- ('end',): the child's nodes have shut down and handed on their last samples.

A sample whose prediction raises is counted (failed_samples) and recorded in the FaultLog, and
the next one is handled, as the SampleDispatcher does in one process.

The backlog the trainer gates its gradient steps on (samples waiting for their prediction) is
the samples the child wrote and the parent has not yet handled (a shared counter). Stopping:
the parent signals the child (SIGINT), keeps handling samples until 'end', then shuts its own
node down; a child that dies is reported in problems() (the node exits 1); a child whose parent
died stops by itself. Plain Python: the child's entry point is injected (tests use one without
ROS).
"""
from collections import deque
from dataclasses import dataclass
import logging
import os
import queue
import signal
import threading
import time

import numpy as np

from mm_fusion_ros.runtime.workers import FaultLog
from mm_fusion_ros.sync.config import SyncConfig
from mm_fusion_ros.sync.synchronizer import IMU_MARGIN_NS, ImuRing, seconds_to_ns

log = logging.getLogger(__name__)

RING_SLOTS = 8               # ~0.75 MB each at the default sample size
STOP_TIMEOUT_S = 60.0        # the child's last samples and its shutdown
SLOT_WAIT_S = 0.5            # a writer waiting for a free slot checks on its parent this often
KEEP_SLACK_NS = 1_000_000_000


class ImuMirror:
    """The IMU the intake process forwarded: the Synchronizer's imu_between and imu_after over
    the last `keep_ns` (behind the newest sample). Non-finite rows and duplicate stamps are
    left out, as the Synchronizer leaves them out; a batch of a new run (the synchronizer's
    run number: a looped bag) starts afresh from the batch's jump back in time, as the
    Synchronizer's new run clears its IMU. Rows more than rewind_s behind the newest one are
    the next run's: held, as the Synchronizer holds them, and the first rows of that run when
    it starts (an IMU that leads a looped bag comes with the old run's number). configure()
    takes the intake's own settings (its first message)."""

    def __init__(self, sync_cfg: SyncConfig, imu_window_s: float, min_keep_s: float = 0.0):
        self.imu_window_s, self.min_keep_s = imu_window_s, min_keep_s
        self._lock = threading.Lock()
        self.configure(sync_cfg)

    def configure(self, sync_cfg: SyncConfig) -> None:
        """Keep what the synchronizer keeps (its IMU history behind the last processed scan,
        which lags the newest IMU: plus KEEP_SLACK_NS), at least min_keep_s (the trajectory's
        longest bridge)."""
        history = max(seconds_to_ns(self.imu_window_s) + IMU_MARGIN_NS,
                      seconds_to_ns(sync_cfg.imu_keep_s))
        with self._lock:
            self.keep_ns = max(history + KEEP_SLACK_NS, seconds_to_ns(self.min_keep_s))
            self.rewind_ns = seconds_to_ns(sync_cfg.rewind_s)
            self._ring = ImuRing(sync_cfg.max_imu_samples)
            self._held = deque(maxlen=sync_cfg.max_imu_samples)   # the next run's first rows
            self.run = 0

    def add(self, stamps_ns, accel, gyro, run: int = 0) -> None:
        stamps = np.asarray(stamps_ns, dtype=np.int64).reshape(-1)
        rows = np.concatenate([np.asarray(accel, np.float64), np.asarray(gyro, np.float64)], 1)
        with self._lock:
            ring = self._ring
            if run != self.run:
                self.run = run
                ring.clear()
                back = np.flatnonzero(np.diff(stamps) < -self.rewind_ns)
                if len(back):   # rows of the old run ahead of the jump back
                    stamps, rows = stamps[back[-1] + 1:], rows[back[-1] + 1:]
                held, self._held = list(self._held), deque(maxlen=self._held.maxlen)
                for stamp, row in held:
                    ring.insert(stamp, row)
            for stamp, row in zip(stamps.tolist(), rows):
                if not np.isfinite(row).all():
                    continue
                if self._held or (ring.n and stamp < ring.stamps[ring.n - 1] - self.rewind_ns):
                    self._held.append((stamp, row))
                else:
                    ring.insert(stamp, row)
            if ring.n:
                ring.prune_before(int(ring.stamps[ring.n - 1]) - self.keep_ns)

    def imu_between(self, t0_ns: int, t1_ns: int):
        with self._lock:
            return self._ring.between(t0_ns, t1_ns, IMU_MARGIN_NS)

    def imu_after(self, stamp_ns: int):
        with self._lock:
            return self._ring.after(stamp_ns)

    def __len__(self):
        return self._ring.n


@dataclass
class IntakeChannels:
    """What both processes hold (picklable through multiprocessing's spawn)."""
    ring: object            # training.learner.SampleRing
    queue: object           # ctx.Queue, child -> parent, in order
    written: object         # ctx.Value('q', lock=False): samples the child wrote. Without a
    # lock: a child killed while holding one would block every read of the backlog for good.
    parent_pid: int


class RingSink:
    """Child side: the synchronizer node's sink (on_sample, on_ground_truth) and the IMU
    intake's forward hook, writing to the channels."""

    on_backlog = None        # the parent tracks the backlog (IntakeLink.backlog)

    def __init__(self, channels: IntakeChannels, supervision: str):
        self.channels, self.supervision = channels, supervision
        self._base_imu = None

    def configure(self, sync_cfg: SyncConfig) -> None:
        self.channels.queue.put(('sync_config', sync_cfg))

    def on_sample(self, sample: dict) -> None:
        ch = self.channels
        while True:
            written = ch.ring.write(sample, timeout=SLOT_WAIT_S)
            if written is not None:
                break
            if os.getppid() != ch.parent_pid:
                raise RuntimeError('the prediction process is gone; sample not handed on')
        slot, other = written
        ch.written.value += 1     # one writer (the dispatch thread): no lock, see IntakeChannels
        ch.queue.put(('sample', slot, other, sample['meta']))

    def on_ground_truth(self, stamp_ns: int, pose) -> None:
        self.channels.queue.put(('gt', int(stamp_ns), np.asarray(pose, np.float64)))

    def forward_imu(self, stamps_ns, accel, gyro, base_imu=None, run: int = 0) -> None:
        """An IMU batch as the synchronizer took it, with its run number after it; T_base_imu
        (4, 4) or None, sent when it changed."""
        if not _same(base_imu, self._base_imu):
            self._base_imu = None if base_imu is None else np.array(base_imu, np.float64)
            self.channels.queue.put(('frames', self._base_imu))
        self.channels.queue.put(('imu', np.asarray(stamps_ns, np.int64),
                                 np.asarray(accel, np.float64), np.asarray(gyro, np.float64),
                                 int(run)))

    def end(self) -> None:
        link_queue = self.channels.queue
        link_queue.put(('end',))
        link_queue.close()
        if os.getppid() == self.channels.parent_pid:
            link_queue.join_thread()   # everything put is in the pipe before exit
        else:
            # Nobody reads the pipe any more, and this process holds its read end too, so a
            # full pipe would block the feeder thread, and the join (here or at exit), for good.
            link_queue.cancel_join_thread()


def _same(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return np.array_equal(a, b)


class IntakeLink:
    """Parent side: starts the intake process, hands what it sends to the trainer node's
    handlers (on_sample, on_backlog, on_ground_truth) from the caller's thread (step), mirrors
    its IMU and T_base_imu."""

    WORKER = 'intake_link'

    def __init__(self, ctx, channels: IntakeChannels, imu: ImuMirror, target, spec,
                 on_sample, on_backlog=None, on_ground_truth=None, faults: FaultLog = None):
        self.ctx, self.channels, self.imu = ctx, channels, imu
        self.target, self.spec = target, spec
        self.on_sample, self.on_backlog = on_sample, on_backlog
        self.on_ground_truth = on_ground_truth
        self.faults = faults or FaultLog()
        self.process = None
        self.handled = 0
        self.failed_samples = 0
        self.ended = False
        self._base_imu = None
        self._stopping = False

    # --- what the trainer asks for -----------------------------------------------------------
    def base_imu(self):
        """T_base_imu (4, 4) as the intake process knows it, or None."""
        return self._base_imu

    def rot_base_imu(self):
        return None if self._base_imu is None else self._base_imu[:3, :3]

    @property
    def backlog(self) -> int:
        return self.channels.written.value - self.handled

    # --- life cycle ----------------------------------------------------------------------
    def start(self) -> None:
        self.process = self.ctx.Process(target=self.target, args=(self.spec, self.channels),
                                        name='intake', daemon=True)
        self.process.start()

    def alive(self) -> bool:
        return self.process is not None and self.process.is_alive()

    def step(self, timeout: float = 0.1) -> bool:
        """Handle the next item (waiting at most timeout); False when none came."""
        try:
            item = self.channels.queue.get(timeout=timeout)
        except queue.Empty:
            return False
        kind = item[0]
        if kind == 'sample':
            self._sample(*item[1:])     # counts and records its own failures
            return True
        try:
            if kind == 'imu':
                self.imu.add(*item[1:])
            elif kind == 'sync_config':
                self.imu.configure(item[1])
            elif kind == 'frames':
                self._base_imu = item[1]
            elif kind == 'gt':
                if self.on_ground_truth is not None:
                    self.on_ground_truth(item[1], item[2])
            elif kind == 'end':
                self.ended = True
        except Exception as e:  # noqa: BLE001 - the items behind it, and stop(), go on
            self.faults.record(self.WORKER, e, f'{kind} from the intake process')
        return True

    def _sample(self, slot, other, meta) -> None:
        ring = self.channels.ring
        try:
            try:   # copied out: the buffer and the learner keep the arrays after reuse
                sample = {k: np.array(v) for k, v in ring.read(slot, other, meta).items()
                          if k != 'meta'}
            finally:
                ring.release(slot)
            sample['meta'] = meta
            if self.on_backlog is not None:
                self.on_backlog(max(self.backlog, 1))
            self.on_sample(sample)
        except Exception as e:  # noqa: BLE001 - one bad sample must not hold the others back
            self.failed_samples += 1
            self.faults.record(self.WORKER, e, f'sample of frame {meta.get("frame")}')
        finally:
            self.handled += 1
            if self.on_backlog is not None and self.backlog == 0:
                self.on_backlog(0)

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> bool:
        """Ask the child to stop, handle what it still sends until 'end'; True when it ended
        cleanly within timeout."""
        self._stopping = True
        while self.step(0.0) and not self.ended:   # already queued: it may have ended
            pass
        if self.alive() and not self.ended:
            os.kill(self.process.pid, signal.SIGINT)
        deadline = time.monotonic() + timeout
        while not self.ended and time.monotonic() < deadline:
            if not self.step(0.1) and not self.alive():
                break
        while self.step(0.0):   # anything put just before 'end' or before a crash
            pass
        if self.process is not None:
            self.process.join(timeout=max(deadline - time.monotonic(), 1.0))
            if self.process.is_alive():
                log.error('the intake process did not stop within %.0f s; killed', timeout)
                self.process.kill()
                self.process.join(timeout=5.0)
        return self.ended and self.process is not None and self.process.exitcode == 0

    def problems(self) -> list:
        """A child that died, or that did not end cleanly when stopped (no 'end', a non-zero
        exit code, killed after the timeout): the node then exits 1. Also after stop(), which
        the node's shutdown calls before it asks once more."""
        if self.process is None or self.alive():
            return []
        code = self.process.exitcode
        if not self._stopping:
            return [f'the intake process ended (exit code {code})']
        if self.ended and code == 0:
            return []
        return [f'the intake process did not stop cleanly (exit code {code}'
                f'{"" if self.ended else ", no end message"})']
