"""online_finetune: synchronizer + trainer in one process, sharing the replay buffer in memory.

The default of finetune.launch.py. Threads: each node spins in a single-threaded executor of its
own (the synchronizer's sensor callbacks only convert and enqueue, so one thread keeps up with a
5x replay, and a checkpoint written by a trainer service never holds the sensors back); the
synchronizer's dispatch thread predicts and publishes each sample; the trainer's thread runs the
gradient steps at idle priority and starts none while samples wait for their prediction
(OnlineTrainer.set_backlog). Measured on 2 cores, rclpy's MultiThreadedExecutor took fewer IMU
messages per second than a SingleThreadedExecutor.

The two-process form (synchronizer and trainer in separate processes) is not supported: samples
are ~0.5-1 MB each and would have to cross DDS a second time; run `synchronizer` alone only to
collect a buffer file (buffer_path) for later training.

SIGINT (Ctrl-C, `ros2 launch` shutdown) ends it cleanly: training stops, then the final
checkpoint (save_on_shutdown), the buffer (buffer_path) and the trajectories (trajectory_dir)
are written atomically.
"""
import ctypes
import gc
import logging
import platform
import signal
import threading
import time

import rclpy
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.signals import SignalHandlerOptions

from mm_fusion_ros.config import SampleConfig
from mm_fusion_ros.ros.params import declare_config
from mm_fusion_ros.ros.synchronizer_node import SynchronizerNode
from mm_fusion_ros.ros.trainer_node import TrainerNode
from mm_fusion_ros.sync.config import BufferConfig
from mm_fusion_ros.sync.replay_buffer import open_buffer
from mm_fusion_ros.training.online import sample_config_for

log = logging.getLogger(__name__)


# Every this many seconds the main thread hands the heap's free pages back (malloc_trim, ~5 ms):
# with keep_freed_memory alone RSS crept ~0.4 MB/s over a long replay (fragments of MB-sized
# blocks); with the trim it stays flat (bench/online.py, 60 s at 1x: +0.6 %).
TRIM_PERIOD_S = 5.0


def keep_freed_memory():
    """glibc malloc: serve blocks below 64 MB from the heap and keep what is freed (trim only
    past 256 MB), instead of mapping each MB-sized tensor and message buffer afresh: a new
    mapping is page-faulted and zeroed by the kernel on first touch, which made inference ~2x
    slower and predictions fall behind a 5x replay (bench/online.py, one run each: p95 321 ->
    64 ms with training off). Returns the function that gives the free pages back (call it
    now and then, see TRIM_PERIOD_S), or None off glibc."""
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


def spin_nodes(make_nodes, args=None) -> int:
    """STYLE §5: init, spin in try, catch KeyboardInterrupt/ExternalShutdownException, then
    shut the nodes down in reverse creation order (their `shutdown()` writes files) and
    rclpy last. Each node spins in its own thread; the cores log through `logging`, routed to
    stderr here. Returns 1 when the nodes cannot be built (bad parameter, missing checkpoint)
    or a callback raised, else 0."""
    logging.basicConfig(level=logging.INFO, format='[%(levelname)s] [%(name)s]: %(message)s')
    trim_memory = keep_freed_memory()
    # SIGINT/SIGTERM only set an event: rclpy's own handler would shut the context down at once,
    # under threads that are still publishing (a use-after-free seen as an exit by SIGSEGV).
    # Instead: stop the executors, shut the nodes down (final files, last poses) while the
    # context is valid, then shut rclpy down.
    stop = threading.Event()
    rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
    previous = {sig: signal.signal(sig, lambda *_: stop.set())
                for sig in (signal.SIGINT, signal.SIGTERM)}
    nodes, spinners = [], []
    try:
        nodes = make_nodes()
        # torch, rclpy and the model make ~300k long-lived objects: frozen, the collector's
        # full passes skip them (they took ~100 ms each, with the GIL, during a replay).
        gc.collect()
        gc.freeze()
        spinners = [_Spinner(node) for node in nodes]
        trimmed = time.monotonic()
        while not stop.is_set() and all(s.thread.is_alive() for s in spinners):
            stop.wait(0.5)
            if trim_memory is not None and time.monotonic() - trimmed >= TRIM_PERIOD_S:
                trim_memory()
                trimmed = time.monotonic()
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
            if hasattr(node, 'shutdown'):
                node.shutdown()
            node.destroy_node()
        rclpy.try_shutdown()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    failed = [s.name for s in spinners if not s.clean_exit]
    if failed:
        log.error('callbacks of %s raised; see the traceback above', ', '.join(failed))
    return 1 if failed else 0


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
        try:
            self.executor.spin()
        except ExternalShutdownException:
            pass
        self.clean_exit = True

    def stop(self):
        self.executor.shutdown(timeout_sec=5.0)
        self.thread.join(timeout=10.0)


def build_online_nodes():
    """Trainer first (its checkpoint fixes the sample shape), then the synchronizer feeding it.

    Returned in creation order, so spin_nodes shuts the synchronizer down first: its last
    samples reach the trainer before the trainer writes its final files."""
    holder = rclpy.create_node('mm_fusion_online_config')
    try:
        buffer_cfg = declare_config(holder, BufferConfig, prefix='buffer.')
        base_sample = declare_config(holder, SampleConfig, prefix='sample.')
    finally:
        holder.destroy_node()
    trainer = TrainerNode(buffer=None)
    sample_cfg = sample_config_for(trainer.model_cfg, base_sample,
                                   trainer.trainer.checkpoint_imu_window_s)
    buffer = open_buffer(trainer.online_cfg.buffer_path, buffer_cfg, sample_cfg)  # logs a resume
    trainer.trainer.set_buffer(buffer)
    trainer.trainer.sample_cfg = sample_cfg
    sync = SynchronizerNode(sample_cfg=sample_cfg, buffer=buffer, on_sample=trainer.on_sample,
                            on_backlog=trainer.trainer.set_backlog)
    return [trainer, sync]


def main(args=None) -> int:
    return spin_nodes(build_online_nodes, args)


def synchronizer_main(args=None) -> int:
    """The `synchronizer` executable: the synchronizer node alone, filling its buffer."""
    return spin_nodes(lambda: [SynchronizerNode()], args)


if __name__ == '__main__':
    raise SystemExit(main())
