"""Process tuning of the online node, in one place: malloc, the garbage collector and the
training thread's priority (stdlib only; every measure is a no-op where unsupported).

The measurements behind these choices, with the commands: docs/online_runtime.md.
"""
import ctypes
import gc
import logging
import os
import platform
import threading
import time

log = logging.getLogger(__name__)

# Every this many seconds the main thread hands the heap's free pages back (malloc_trim): with
# keep_freed_memory alone RSS crept over a long replay (fragments of MB-sized blocks).
TRIM_PERIOD_S = 5.0
TRAIN_THREAD_NICE = 10     # where SCHED_IDLE is unavailable


def keep_freed_memory():
    """glibc malloc: serve blocks below 64 MB from the heap and keep what is freed (trim only
    past 256 MB), instead of mapping each MB-sized tensor and message buffer afresh (a new
    mapping is page-faulted and zeroed on first touch, which slowed inference down).
    Returns the function that gives the free pages back (see MemoryTrimmer), or None off
    glibc."""
    if platform.system() != 'Linux' or platform.libc_ver()[0] != 'glibc':
        return None
    try:
        libc = ctypes.CDLL('libc.so.6')
    except OSError:
        return None
    m_trim_threshold, m_mmap_threshold = -1, -3    # <malloc.h>
    if not (libc.mallopt(m_mmap_threshold, 64 << 20) and
            libc.mallopt(m_trim_threshold, 256 << 20)):
        return None
    return lambda: libc.malloc_trim(0)


class MemoryTrimmer:
    """Calls `trim` at most every `period_s` (the clock is injected for tests)."""

    def __init__(self, trim, period_s: float = TRIM_PERIOD_S, clock=time.monotonic):
        self.trim, self.period_s, self.clock = trim, period_s, clock
        self._last = clock()

    def maybe_trim(self) -> bool:
        if self.trim is None or self.clock() - self._last < self.period_s:
            return False
        self.trim()
        self._last = self.clock()
        return True


def freeze_gc() -> None:
    """torch, rclpy and the model make hundreds of thousands of long-lived objects: frozen, the
    collector's full passes (which hold the GIL, stalling intake) skip them."""
    gc.collect()
    gc.freeze()


def name_os_thread(name: str) -> None:
    """Give the calling thread `name` in the kernel too (Linux prctl PR_SET_NAME; cut to 15
    bytes), so per-thread CPU in /proc/<pid>/task/*/comm, top -H and py-spy tells intake,
    prediction and training apart (bench/online.py reports it). Python's thread names are not
    the kernel's. A no-op where unsupported."""
    if platform.system() != 'Linux':
        return
    try:
        ctypes.CDLL(None).prctl(15, name.encode()[:15], 0, 0, 0)   # 15: PR_SET_NAME
    except (OSError, AttributeError) as e:
        log.debug('thread name not set: %s', e)


def lower_thread_priority(nice: int = TRAIN_THREAD_NICE) -> None:
    """Put the calling thread at idle priority (SCHED_IDLE; lowering one's own priority needs no
    privilege, and Linux schedules threads separately), else raise its nice value: sensor
    intake and the published poses go first and training takes the CPU time they leave."""
    if hasattr(os, 'sched_setscheduler') and hasattr(os, 'SCHED_IDLE'):
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))   # 0: this thread
            return
        except OSError as e:
            log.debug('SCHED_IDLE refused (%s); using nice %d', e, nice)
    if not hasattr(os, 'setpriority') or not hasattr(threading, 'get_native_id'):
        return
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, max(os.getpriority(os.PRIO_PROCESS, tid), nice))
    except OSError as e:
        log.warning('could not lower the training thread priority: %s', e)
