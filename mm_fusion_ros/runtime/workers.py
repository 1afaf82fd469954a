"""Worker threads that do not die silently.

Every exception a worker step raises is logged with its traceback, counted per worker and kept
for /diagnostics (diagnostics.fault_status: ERROR while the last one is recent), and the worker
carries on with its next step. Only what is not an Exception (SystemExit, KeyboardInterrupt,
GeneratorExit) ends a worker; it is then marked `failed`, and the process exits non-zero
(ros/spin.py watches `failed`).
"""
import logging
import threading
import time

from mm_fusion_ros.runtime.process import name_os_thread

log = logging.getLogger(__name__)


class FaultLog:
    """Counts and last messages of the exceptions of a process's workers (thread-safe).

    Each worker's first exception of a kind is logged with its traceback; repeats of the same
    kind are logged with their traceback at most once per `repeat_log_s`, and counted always.
    """

    def __init__(self, clock=time.monotonic, repeat_log_s: float = 10.0):
        self.clock = clock
        self.repeat_log_s = repeat_log_s
        self._lock = threading.Lock()
        self._counts = {}
        self._last = {}          # worker -> (time, message)
        self._logged = {}        # (worker, type name) -> time logged

    def record(self, worker: str, error: BaseException, what: str = '') -> None:
        """Call from the `except` block (the traceback is logged from the active exception)."""
        now = self.clock()
        message = f'{what}: {type(error).__name__}: {error}' if what else \
            f'{type(error).__name__}: {error}'
        key = (worker, type(error).__name__)
        with self._lock:
            self._counts[worker] = self._counts.get(worker, 0) + 1
            self._last[worker] = (now, message)
            count = self._counts[worker]
            loud = key not in self._logged or now - self._logged[key] >= self.repeat_log_s
            if loud:
                self._logged[key] = now
        if loud:
            log.error('%s worker: %s (error %d of this worker)', worker, message, count,
                      exc_info=error)

    def snapshot(self) -> dict:
        """{worker: (count, seconds since the last one, its message)}."""
        now = self.clock()
        with self._lock:
            return {w: (n, now - self._last[w][0], self._last[w][1])
                    for w, n in self._counts.items()}

    @property
    def total(self) -> int:
        with self._lock:
            return sum(self._counts.values())


class Worker:
    """Runs `step()` over and over in a daemon thread until stop(); see the module docstring.

    `step` does one unit of work and returns (it may block briefly, e.g. waiting for work
    with a timeout). After an exception the worker pauses `error_pause_s`, so a step that fails
    at once every time does not spin.
    """

    def __init__(self, name: str, step, faults: FaultLog, setup=None,
                 error_pause_s: float = 0.1):
        self.name, self.step, self.faults, self.setup = name, step, faults, setup
        self.error_pause_s = error_pause_s
        self.failed = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> bool:
        """Ask the loop to end and wait; False when it did not end in time."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        name_os_thread(self.name)
        try:
            if self.setup is not None:
                self.setup()
            while not self._stop.is_set():
                try:
                    self.step()
                except Exception as e:  # noqa: BLE001 - logged with traceback, counted, reported
                    self.faults.record(self.name, e)
                    self._stop.wait(self.error_pause_s)
        except BaseException as e:  # noqa: BLE001 - recorded with traceback; the node exits 1
            self.failed = True
            self.faults.record(self.name, e, 'worker ended')


class Pacer:
    """A worker step's pace: wait() returns every period_s (on a fixed schedule from the first
    call; ticks missed while a step ran long are skipped, not caught up). A waiting Python thread
    costs far less CPU than an rclpy timer at the same rate, whose every tick goes through the
    executor (docs/inertial_filter.md, "Online")."""

    def __init__(self, period_s: float, clock=time.monotonic, sleep=time.sleep):
        if not period_s > 0:
            raise ValueError(f'Pacer period must be > 0 s, got {period_s}')
        self.period_s, self.clock, self.sleep = period_s, clock, sleep
        self._next = None

    def wait(self) -> None:
        now = self.clock()
        self._next = now if self._next is None else self._next + self.period_s
        if self._next < now:
            self._next = now
        elif self._next > now:
            self.sleep(self._next - now)


class LogThrottle:
    """At most one log line per key (e.g. (topic, reason)) every `period_s`; -> whether to log.
    Keyed, unlike rclpy's throttle (one per call site), so each bad topic is named."""

    def __init__(self, period_s: float = 5.0, clock=time.monotonic):
        self.period_s, self.clock = period_s, clock
        self._last = {}

    def ready(self, key) -> bool:
        now = self.clock()
        if key in self._last and now - self._last[key] < self.period_s:
            return False
        self._last[key] = now
        return True
