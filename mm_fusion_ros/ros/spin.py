"""One init/run/shutdown pattern for the node processes (STYLE §5), shared by online_finetune
and the synchronizer alone.

Order: rclpy.init; build every node completely (parameters, cores, publishers, subscriptions;
no thread runs yet); tune the process (runtime/process.py); start the nodes' worker threads;
spin each node in a SingleThreadedExecutor of its own thread; print topics.READY_LINE. SIGINT and
SIGTERM only set an event (rclpy's own handler would shut the context down under threads that
are still publishing); then the executors stop, the nodes shut down in reverse order (final
files, last poses) while the context is valid, and rclpy last.

Exit code 1 when the nodes cannot be built (bad parameter, missing checkpoint), a callback raised
out of spin, a worker thread ended (runtime/workers.py), or a file was not written at shutdown.
"""
import logging
import signal
import sys
import threading

import rclpy
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.signals import SignalHandlerOptions
from rclpy.utilities import remove_ros_args

from mm_fusion_ros.bag.topics import READY_LINE
from mm_fusion_ros.runtime.process import (
    freeze_gc,
    keep_freed_memory,
    MemoryTrimmer,
    name_os_thread,
)

log = logging.getLogger(__name__)


def spin_nodes(make_nodes, args=None, usage: str = '') -> int:
    """usage: printed for -h/--help (outside --ros-args), and nothing is started then."""
    if usage and {'-h', '--help'} & set(remove_ros_args(sys.argv if args is None else args)):
        print(usage)
        return 0
    logging.basicConfig(level=logging.INFO, format='[%(levelname)s] [%(name)s]: %(message)s')
    trimmer = MemoryTrimmer(keep_freed_memory())
    stop = threading.Event()
    rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
    previous = {sig: signal.signal(sig, lambda *_: stop.set())
                for sig in (signal.SIGINT, signal.SIGTERM)}
    nodes, spinners, problems = [], [], []
    try:
        nodes = make_nodes()
        freeze_gc()
        for node in nodes:
            node.start()
        spinners = [_Spinner(node) for node in nodes]
        print(READY_LINE, flush=True)
        while not stop.is_set() and not _trouble(nodes, spinners):
            stop.wait(0.5)
            trimmer.maybe_trim()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except (ValueError, FileNotFoundError) as e:
        if nodes:
            raise
        log.error('cannot start: %s', e)
        return 1
    finally:
        for spinner in spinners:
            spinner.stop()
        for node in reversed(nodes):
            node.shutdown()
            node.destroy_node()
        rclpy.try_shutdown()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    problems = _trouble(nodes, spinners)
    for problem in problems:
        log.error('%s', problem)
    return 1 if problems else 0


def _trouble(nodes, spinners) -> list:
    """What makes the process fail: callbacks that raised out of spin, node problems."""
    out = [f'callbacks of {s.name} raised; see the traceback above' for s in spinners
           if not s.thread.is_alive() and not s.clean_exit]
    for node in nodes:
        out += node.problems()
    return out


class _Spinner:
    """One node in a SingleThreadedExecutor spun by a thread of its own."""

    def __init__(self, node):
        self.name = node.get_name()
        self.clean_exit = False   # stays False when a callback raised out of spin()
        self.executor = SingleThreadedExecutor()
        self.executor.add_node(node)
        self.thread = threading.Thread(target=self._spin, name=f'spin_{self.name}', daemon=True)
        self.thread.start()

    def _spin(self):
        name_os_thread(f'spin {self.name.removeprefix("mm_fusion_")}')
        try:
            self.executor.spin()
        except ExternalShutdownException:
            pass
        self.clean_exit = True

    def stop(self):
        self.executor.shutdown(timeout_sec=5.0)
        self.thread.join(timeout=10.0)
