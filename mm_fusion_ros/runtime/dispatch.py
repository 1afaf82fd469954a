"""SampleDispatcher: the synchronizer's ready samples to the prediction, off the callbacks.

Subscription callbacks only convert and hand data to the Synchronizer, then call notify(): a
worker thread (dispatch_step) takes the ready samples to `handle` in stamp order, so no callback
ever waits for a prediction (a stream delayed behind another would count as missing once the
scans ran a timeout of sensor time ahead). Before each handle() call `on_backlog(n)` says how
many samples wait, the one in hand included, and 0 when all are done (the trainer starts no
gradient step meanwhile). A sample whose handling raises is recorded in the FaultLog (logged with
its traceback, counted) and the next one is handled.

Idle flush: when no sensor message came for `idle_flush_s` (the end of a bag, a stalled robot),
check_idle() releases the scans that still wait for a timeout, once per quiet spell. The clock
is injected, so the policy is tested without waiting.
"""
import threading
import time

from mm_fusion_ros.runtime.workers import FaultLog


class SampleDispatcher:
    WORKER = 'dispatch'

    def __init__(self, sync, handle, on_backlog=None, idle_flush_s: float = 1.0,
                 clock=time.monotonic, faults: FaultLog = None):
        self.sync, self.handle, self.on_backlog = sync, handle, on_backlog
        self.idle_flush_s = idle_flush_s
        self.clock = clock
        self.faults = faults or FaultLog()
        self.emitted = 0
        self.failed_samples = 0
        self._work = threading.Event()
        self._last_sensor = None
        self._flushed = True

    def notify(self, sensor: bool = True) -> None:
        """Input reached the synchronizer; `sensor` False for ground truth, which neither ends
        nor starts a quiet spell."""
        if sensor:
            self._last_sensor = self.clock()
            self._flushed = False
        self._work.set()

    def dispatch_step(self, timeout: float = 0.1) -> int:
        """One worker iteration: wait for work (at most timeout), then dispatch()."""
        if not self._work.wait(timeout):
            return 0
        self._work.clear()
        return self.dispatch()

    def dispatch(self) -> int:
        """Hand every ready sample on, in stamp order; -> how many."""
        ready = self.sync.pop_ready()
        try:
            for i, sample in enumerate(ready):
                if self.on_backlog is not None:
                    self.on_backlog(len(ready) - i)
                self.emitted += 1
                try:
                    self.handle(sample)
                except Exception as e:  # noqa: BLE001 - one bad sample must not end the thread
                    self.failed_samples += 1
                    self.faults.record(self.WORKER, e,
                                       f'sample of frame {sample["meta"].get("frame")}')
        finally:
            if ready and self.on_backlog is not None:
                self.on_backlog(0)
        return len(ready)

    def check_idle(self) -> bool:
        """Flush the synchronizer once per quiet spell of idle_flush_s; -> whether it did."""
        if self._flushed or self._last_sensor is None or \
                self.clock() - self._last_sensor <= self.idle_flush_s:
            return False
        self._flushed = True
        self.sync.flush()
        self._work.set()
        return True
