"""The learner process: online training outside the prediction process's GIL (DESIGN §11).

With OnlineConfig.learner = 'process' the node's OnlineTrainer is a ProcessOnlineTrainer: it
predicts every sample as in thread mode, and a learner process (torch.multiprocessing, spawn:
the parent runs DDS threads, so fork is unsafe) owns the TrainerCore (model + AdamW), the replay
buffer, the step debt, the CSV/TensorBoard logs, autosave and the checkpoints. Three channels:

- samples: the arrays go into a ring of shared-memory slots (SampleRing: one copy in the
  predictor, no pickling); a small message (slot, meta) follows on `inbox`. With no free slot
  the learner misses the sample (counted: learner_missed_samples), the prediction never waits.
- weights: after each applied step the learner copies its state_dict into shared memory and
  bumps a version (SharedWeights; a lock held only for the copy). Before each sample the
  predictor loads them when the version changed and the lock is free, else it tries again at
  the next sample: prediction never waits for the learner.
- commands (set_training, set_lr, save, metrics, shutdown) travel on `inbox` behind the
  samples sent before them (so a checkpoint or the final buffer holds every sample predicted
  before the request); replies come back on a pipe, with a timeout (LearnerError).

A learner that dies is detected by the node's training worker (train_pending raises, the
FaultLog reports it) and is listed in problems(), so the process exits non-zero. A learner
whose parent died (kill -9) exits without writing, as a crashed thread-mode node would.
"""
from dataclasses import dataclass
import itertools
import logging
import math
import os
from pathlib import Path
import queue
import signal
import threading
import time

import numpy as np
import torch
import torch.multiprocessing as tmp

from mm_fusion_ros.config import SampleConfig
from mm_fusion_ros.filter.online import OnlineFilterConfig
from mm_fusion_ros.kitti.dataset import collate_samples
from mm_fusion_ros.model.config import ModelConfig
from mm_fusion_ros.runtime.process import lower_thread_priority, name_os_thread
from mm_fusion_ros.sync.config import BufferConfig
from mm_fusion_ros.sync.replay_buffer import (
    ARRAY_KEYS,
    EXPECTED_DTYPES,
    expected_shapes,
    open_buffer,
    ReplayBuffer,
)
from mm_fusion_ros.training.checkpoint import checkpoint_imu_window, load_checkpoint
from mm_fusion_ros.training.config import TrainConfig
from mm_fusion_ros.training.online import (
    build_online_trainer,
    build_trajectory,
    initial_payload,
    OnlineConfig,
    OnlineTrainer,
    sample_config_for,
)
from mm_fusion_ros.trajectory.chain import OnlineTrajectory

log = logging.getLogger(__name__)

RING_SLOTS = 32              # shared-memory sample slots (~0.75 MB each at the default size)
START_TIMEOUT_S = 120.0      # spawn, import torch, load the checkpoint and the buffer
REPLY_TIMEOUT_S = 60.0       # a command waits at most one gradient step plus its own work
SHUTDOWN_TIMEOUT_S = 300.0   # final checkpoint and buffer (up to buffer.max_bytes)
DEAD_REPORT_S = 5.0          # a dead learner is reported to the FaultLog this often
# metrics() keys the learner owns; the others are the predictor's counters.
LEARNER_KEYS = ('online_steps', 'online_steps_failed', 'initial_step', 'optimizer_resumed',
                'resumed_buffer_samples', 'buffer_size', 'training_enabled', 'autosaves',
                'autosave_failures', 'supervision', 'last_loss', 'guard_', 'feature_cache_')
# The sample's meta carries the predictor's frozen-branch features under this key to the
# learner (popped there before the sample is stored).
FEATURES_META_KEY = '_frozen_features'


class LearnerError(RuntimeError):
    """The learner did not answer, answered with an error, or is gone."""


class SharedWeights:
    """A model's state_dict in shared memory (one flat tensor per dtype) plus a version."""

    def __init__(self, ctx, state_dict: dict):
        self.layout, sizes = [], {}
        for key, value in state_dict.items():
            offset = sizes.get(value.dtype, 0)
            self.layout.append((key, value.dtype, offset, tuple(value.shape)))
            sizes[value.dtype] = offset + value.numel()
        self.flats = {dtype: torch.zeros(n, dtype=dtype).share_memory_()
                      for dtype, n in sizes.items()}
        self.lock = ctx.Lock()
        self.version = ctx.Value('q', 0, lock=False)   # written under self.lock
        self._copy(state_dict, to_shared=True)

    def _copy(self, state_dict: dict, to_shared: bool, keys=None) -> None:
        with torch.no_grad():
            for key, dtype, offset, shape in self.layout:
                if keys is not None and key not in keys:
                    continue
                n = math.prod(shape)
                view = self.flats[dtype][offset:offset + n].view(shape)
                if to_shared:
                    if key in state_dict:    # a step publishes only what it can change
                        view.copy_(state_dict[key].detach())
                else:
                    state_dict[key].copy_(view)

    def publish(self, state_dict: dict) -> int:
        """Learner: copy the weights in (all, or the entries given; waits only for a
        reader's copy); the new version."""
        with self.lock:
            self._copy(state_dict, to_shared=True)
            self.version.value += 1
            return self.version.value

    def load_into(self, state_dict: dict, known: int, keys=None):
        """Predictor: copy a newer version into state_dict's tensors (only `keys`, if given)
        unless the learner is writing; returns the version loaded, or None (unchanged, or busy:
        try next time)."""
        if self.version.value == known or not self.lock.acquire(block=False):
            return None
        try:
            self._copy(state_dict, to_shared=False, keys=keys)
            return self.version.value
        finally:
            self.lock.release()


class SampleRing:
    """Fixed-shape sample arrays in shared-memory slots; free slot numbers on a queue."""

    def __init__(self, ctx, sample_cfg: SampleConfig, slots: int = RING_SLOTS):
        shapes = expected_shapes(sample_cfg)
        self.arrays = {k: torch.from_numpy(np.zeros((slots,) + shapes[k],
                                                    dtype=EXPECTED_DTYPES[k])).share_memory_()
                       for k in ARRAY_KEYS if k in shapes}
        self.free = ctx.Queue()
        for slot in range(slots):
            self.free.put(slot)
        self._views = None

    def views(self) -> dict:
        if self._views is None:   # numpy views of the shared tensors, made once per process
            self._views = {k: v.numpy() for k, v in self.arrays.items()}
        return self._views

    def write(self, sample: dict, timeout: float = None):
        """Writer: (slot, arrays of another shape, e.g. unpadded scans), or None when no slot
        is free (at once, or within timeout seconds)."""
        try:
            slot = self.free.get_nowait() if timeout is None else self.free.get(timeout=timeout)
        except queue.Empty:
            return None
        views, other = self.views(), {}
        try:
            for key in ARRAY_KEYS:
                value = np.asarray(sample[key])
                if key in views and value.shape == views[key].shape[1:]:
                    views[key][slot] = value
                else:
                    other[key] = value
        except BaseException:
            self.free.put(slot)    # not taken: a slot lost here would shrink the ring for good
            raise
        return slot, other

    def read(self, slot: int, other: dict, meta: dict) -> dict:
        """Learner: the sample in `slot` (views: copy before release)."""
        sample = {k: v[slot] for k, v in self.views().items()}
        sample.update(other)
        sample['meta'] = meta
        return sample

    def release(self, slot: int) -> None:
        self.free.put(slot)


@dataclass
class LearnerSpec:
    """What the learner process builds itself from (picklable)."""
    online_cfg: OnlineConfig
    train_cfg: TrainConfig
    model_cfg: ModelConfig
    sample_cfg: SampleConfig
    buffer_cfg: BufferConfig
    checkpoint: str          # the predictor's initial checkpoint ('' = fresh model)
    parent_pid: int
    filter_section: dict = None   # the predictor's inertial filter, embedded in checkpoints


# --- the learner process -------------------------------------------------------------------
class LearnerTrainer(OnlineTrainer):
    """OnlineTrainer's training half, in the learner process: the same step debt, gradient
    steps, logs, autosave and checkpoints; samples come from ingest() (no prediction) and each
    applied step publishes the weights to the predictor."""

    def __init__(self, spec: LearnerSpec, weights: SharedWeights, buffer: ReplayBuffer,
                 initial):
        super().__init__(spec.online_cfg.replace(trajectory_dir=''), spec.train_cfg,
                         spec.model_cfg, buffer=buffer, sample_cfg=spec.sample_cfg,
                         initial=initial)
        self.infer_model = None          # the predictor's copy is the one in use
        self.filter_section = spec.filter_section
        self.weights = weights
        self.predictor_metrics = {}      # the predictor's counters, sent with each command
        # What predictions start with: the loaded model, or a resumed guard's reference.
        deployed = self.core.model.state_dict()
        if self.guard is not None:
            deployed = {**deployed, **self._reference_state}
        self.weights.publish(deployed)

    def ingest(self, sample: dict) -> None:
        features = sample['meta'].pop(FEATURES_META_KEY, None)
        if features:
            try:                  # only a saving: the sample's first step computes them anyway
                self._adopt_features(sample, features)
            except Exception as e:  # noqa: BLE001 - only a saving, never a lost sample
                log.warning('features from the predictor not adopted for a sample (%s: %s); '
                            'the learner computes them itself', type(e).__name__, e)
        self._arrive(sample)
        with self._state_lock:
            self.samples_seen += 1
            if self.training_enabled:
                self.step_debt = min(self.step_debt + self.cfg.updates_per_sample,
                                     float(self.cfg.max_step_debt))
        self.wake()

    def _adopt_features(self, sample: dict, features: dict) -> None:
        """The predictor's frozen-branch features of the sample, for its first uses here (the
        guard's score, its first step): keyed by this process's own copy of the inputs, so a
        sample that differs in any byte simply misses."""
        if not (self.training_enabled and self.core.model.frozen):
            return
        batch = self.core.to_device(collate_samples([sample]))
        dev = batch['points'].device
        self.core.model.remember_features(
            batch, {name: torch.from_numpy(rows).to(dev) for name, rows in features.items()})

    def _publish(self, state: dict) -> None:
        self.weights.publish(state)

    def metrics(self) -> dict:
        own = super().metrics()
        merged = dict(self.predictor_metrics) or dict(own)
        merged.update({k: v for k, v in own.items() if k.startswith(LEARNER_KEYS)})
        return merged


class Learner:
    """The learner process's loop: an intake thread stores samples as they come (so the ring
    slots are freed at once) and queues commands; the main thread answers commands and runs
    the owed steps between them."""

    def __init__(self, spec, weights, ring, inbox, replies, backlog):
        self.spec, self.ring, self.inbox, self.replies = spec, ring, inbox, replies
        self.backlog = backlog
        self.commands = queue.Queue()
        self.errors = []
        cfg = spec.online_cfg
        buffer = open_buffer(cfg.buffer_path, spec.buffer_cfg, spec.sample_cfg)
        payload = load_checkpoint(spec.checkpoint) if spec.checkpoint else None
        self.trainer = LearnerTrainer(spec, weights, buffer, (payload, spec.checkpoint))

    def _intake(self):
        name_os_thread('learner intake')
        while True:
            msg = self.inbox.get()
            if msg[0] == 'sample':
                _, slot, other, meta = msg
                try:
                    self.trainer.ingest(self.ring.read(slot, other, meta))
                except Exception as e:  # noqa: BLE001 - the intake thread must go on
                    self._error(f'sample not stored: {type(e).__name__}: {e}')
                finally:
                    self.ring.release(slot)
                continue
            self.commands.put(msg)
            self.trainer.wake()
            if msg[2] == 'shutdown':
                return

    def _error(self, message):
        log.error('%s', message)
        self.errors.append(message)

    def run(self) -> None:
        name_os_thread('learner')
        threading.Thread(target=self._intake, name='learner-intake', daemon=True).start()
        self.replies.send((0, True, self._state()))      # ready
        while os.getppid() == self.spec.parent_pid:
            try:
                msg = self.commands.get_nowait()
            except queue.Empty:
                msg = None
            if msg is not None:
                if self._answer(*msg[1:]):
                    return
                continue
            # Only a queue of samples behind the one being predicted holds training back: this
            # process runs at idle priority, so while the predictor works it takes only the
            # CPU time nobody else wants (waiting for every prediction left a core idle and
            # halved the steps at 1x: docs/selfsup.md).
            self.trainer._backlog = max(self.backlog.value - 1, 0)
            try:
                if not self.trainer.train_pending(max_steps=1):
                    self.trainer.wait_for_work(0.1)
            except Exception as e:  # noqa: BLE001 - as the thread learner's Worker: a failed
                # step is reported, and the learner lives on to write its final files
                log.exception('learner step')
                self._error(f'{type(e).__name__}: {e}')
        log.error('the predictor process (pid %d) is gone: the learner stops without writing',
                  self.spec.parent_pid)
        self.trainer._close_logs()

    def _state(self) -> dict:
        errors, self.errors = self.errors, []
        return {'metrics': self.trainer.metrics(), 'step': self.trainer.core.step_count,
                'buffer': self.trainer.buffer.stats(), 'errors': errors}

    def _answer(self, req_id, name, args) -> bool:
        """Handle one command and reply; True after shutdown."""
        trainer = self.trainer
        if 'metrics' in args:
            trainer.predictor_metrics = args['metrics']
        try:
            if name == 'set_training':
                trainer.set_training(args['enabled'])
                value = self._state()
            elif name == 'set_lr':
                trainer.set_learning_rate(args['lr'])
                value = None
            elif name == 'save':
                value = str(trainer.save_checkpoint(args['path']))
            elif name == 'metrics':
                value = self._state()
            elif name == 'shutdown':
                written = trainer.shutdown()
                value = {'written': written, 'failures': list(trainer.write_failures)}
            else:
                raise ValueError(f'unknown learner command {name!r}')
        except (OSError, ValueError, RuntimeError) as e:
            self.replies.send((req_id, False, f'{type(e).__name__}: {e}'))
            return name == 'shutdown'
        self.replies.send((req_id, True, value))
        return name == 'shutdown'


def learner_main(spec, weights, ring, inbox, replies, backlog) -> None:
    """Entry point of the spawned process."""
    logging.basicConfig(level=logging.INFO, format='[learner] %(levelname)s %(name)s: '
                                                   '%(message)s')
    lower_thread_priority()   # this thread and the ones it starts: prediction goes first
    # Ctrl-C in a terminal reaches the whole process group: the predictor stops this process
    # (a shutdown command, after which it writes its files), or it stops by itself when the
    # predictor is gone. SIGTERM still ends it (LearnerClient.join's last resort).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        learner = Learner(spec, weights, ring, inbox, replies, backlog)
    except (OSError, ValueError, RuntimeError) as e:
        log.exception('learner not started')
        replies.send((0, False, f'{type(e).__name__}: {e}'))
        return
    learner.run()


# --- the predictor's side ------------------------------------------------------------------
class LearnerClient:
    """Starts the learner process and talks to it (thread-safe: one request at a time)."""

    def __init__(self, spec: LearnerSpec, state_dict: dict):
        ctx = tmp.get_context('spawn')
        self.weights = SharedWeights(ctx, state_dict)
        self.ring = SampleRing(ctx, spec.sample_cfg)
        self.inbox = ctx.Queue()
        self.backlog = ctx.Value('i', 0, lock=False)
        self._replies, child_end = ctx.Pipe(duplex=False)
        self.process = ctx.Process(target=learner_main, name='learner', daemon=True,
                                   args=(spec, self.weights, self.ring, self.inbox, child_end,
                                         self.backlog))
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self.missed = 0
        self.closed = False
        self.features = None     # the next sample's frozen-branch features (predictor thread)
        self._late_errors, self._late_lock = [], threading.Lock()
        self.process.start()
        child_end.close()
        self.ready = self._wait(0, START_TIMEOUT_S, 'start')

    @property
    def alive(self) -> bool:
        return self.process.is_alive()

    def send_sample(self, sample: dict) -> bool:
        """Hand a sample to the learner; False (counted) when the ring is full."""
        if self.closed:
            return False
        features, self.features = self.features, None
        written = self.ring.write(sample)
        if written is None:
            self.missed += 1
            return False
        meta = dict(sample['meta'])
        if features:
            meta[FEATURES_META_KEY] = features
        self.inbox.put(('sample', *written, meta))
        return True

    def request(self, name: str, timeout: float = REPLY_TIMEOUT_S, **args):
        with self._lock:
            if self.closed or not self.alive:
                raise LearnerError(f'learner {name}: the learner process is not running '
                                   f'(exit code {self.process.exitcode})')
            req_id = next(self._ids)
            self.inbox.put(('command', req_id, name, args))
            if name == 'shutdown':
                self.closed = True
            return self._wait(req_id, timeout, name)

    def _wait(self, req_id, timeout, what):
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            try:
                ready = self._replies.poll(min(max(left, 0.0), 0.5))
            except (EOFError, OSError):
                ready = False
            if ready:
                try:
                    got, ok, value = self._replies.recv()
                except (EOFError, OSError) as e:
                    raise LearnerError(f'learner {what}: the learner process is gone '
                                       f'(exit code {self.process.exitcode})') from e
                if got != req_id:         # the late answer to a request that timed out:
                    if ok and isinstance(value, dict):   # the errors it carries still count
                        with self._late_lock:
                            self._late_errors.extend(value.get('errors', []))
                    continue
                if not ok:
                    raise LearnerError(f'learner {what}: {value}')
                return value
            if not self.alive:
                raise LearnerError(f'learner {what}: the learner process ended (exit code '
                                   f'{self.process.exitcode})')
            if left <= 0:
                raise LearnerError(f'learner {what}: no answer within {timeout:.0f} s')

    def take_late_errors(self) -> list:
        """The learner's errors that came with answers nobody waited for any more."""
        with self._late_lock:
            errors, self._late_errors = self._late_errors, []
        return errors

    def join(self, timeout: float = 10.0) -> None:
        self.closed = True
        self.process.join(timeout)
        if self.process.is_alive():
            log.error('the learner process did not end within %.0f s: terminating it', timeout)
            self.process.terminate()
            self.process.join(timeout)
        # Nobody reads the inbox any more: samples still in its pipe must not hold this
        # process's exit (the queue's feeder thread would block on a full pipe for good).
        self.inbox.cancel_join_thread()


class LearnerBuffer:
    """The predictor's view of the learner's replay buffer: add() sends, the rest reports
    the learner's last known state."""

    def __init__(self, client: LearnerClient, stats: dict):
        self.client, self._stats = client, dict(stats)

    def add(self, sample: dict) -> bool:
        return self.client.send_sample(sample)

    def __len__(self):
        return int(self._stats['size'])

    def stats(self) -> dict:
        return {**self._stats, 'learner_missed': self.client.missed}

    def save(self, path):
        raise RuntimeError('the replay buffer lives in the learner process: it is saved there '
                           '(buffer_path) at shutdown and autosave')


class ProcessOnlineTrainer(OnlineTrainer):
    """OnlineTrainer whose training half runs in a learner process (module docstring).

    The node sees the same interface as in thread mode: on_sample predicts (after loading new
    weights), set_training / set_learning_rate / save_checkpoint / metrics / shutdown become
    learner commands, and train_pending (the node's training worker) watches the learner."""

    def __init__(self, online_cfg: OnlineConfig, train_cfg: TrainConfig, model_cfg: ModelConfig,
                 sample_cfg: SampleConfig, buffer_cfg: BufferConfig,
                 trajectory: OnlineTrajectory = None, initial=None):
        # The learner process keeps the log and the guard.
        super().__init__(online_cfg.replace(log_csv='', tensorboard_dir='', guard_window=0),
                         train_cfg, model_cfg, buffer=ReplayBuffer(BufferConfig(capacity=1)),
                         sample_cfg=sample_cfg, trajectory=trajectory, initial=initial)
        self.cfg = online_cfg
        spec = LearnerSpec(online_cfg, train_cfg, self.core.model_cfg, sample_cfg, buffer_cfg,
                           self.source, os.getpid(), self.filter_section)
        self._infer_state = self.infer_model.state_dict()
        self._changing_keys = frozenset(self._changing)
        self._closing = threading.Event()
        self._dead_reported = -math.inf
        self._learner_errors = []
        self.learner_problem = ''
        self.weight_swaps = 0
        self.client = LearnerClient(spec, self._infer_state)
        self._version = 0     # the learner's first weights (what it deploys) load at once
        self.buffer = LearnerBuffer(self.client, {})
        self._apply(self.client.ready)
        self.resumed_samples = len(self.buffer)

    # --- prediction side ----------------------------------------------------------------
    def on_sample(self, sample: dict):
        with self._model_lock:
            # After the first (whole) state only what a step can change: the learner never
            # writes the rest again (a 3-4 MB copy per swap against ~1 MB of heads).
            keys = None if self._version == 0 else self._changing_keys
            version = self.client.weights.load_into(self._infer_state, self._version, keys)
            if version is not None:
                self._version = version
                self.weight_swaps += 1
                self._weights_swapped(whole=keys is None)
        return super().on_sample(sample)

    def set_backlog(self, samples: int) -> None:
        self.client.backlog.value = int(samples)

    def _remember_features(self, batch, features) -> None:
        """The frozen branches' features go to the learner with the sample (send_sample), so
        that it does not run those encoders again for the sample's guard score and first
        step (a few kB against ~35 ms of encoders at full size)."""
        frozen = self.core.model.frozen
        if self.training_enabled and frozen:
            self.client.features = {name: rows.detach().cpu().numpy().copy()
                                    for name, rows in features.items() if name in frozen}

    # --- the node's training worker: watch the learner ------------------------------------
    def pending_steps(self) -> int:
        return 0

    def wait_for_work(self, timeout: float) -> None:
        self._closing.wait(timeout)

    def wake(self) -> None:
        pass

    def train_pending(self, max_steps: int = None) -> int:
        """Raise (for the worker's FaultLog) what went wrong in the learner: its errors since
        the last metrics, or its death (every DEAD_REPORT_S while it stays dead)."""
        if self._learner_errors:
            raise LearnerError(f'learner: {self._learner_errors.pop(0)}')
        if not self.client.alive and not self.client.closed:
            self.learner_problem = f'the learner process died (exit code ' \
                                   f'{self.client.process.exitcode})'
            if time.monotonic() - self._dead_reported >= DEAD_REPORT_S:
                self._dead_reported = time.monotonic()
                raise LearnerError(f'{self.learner_problem}: nothing more is trained or saved; '
                                   f'this trainer still predicts with the last weights, but '
                                   f'the trainer node stops on it (a problem)')
        return 0

    # --- commands -------------------------------------------------------------------------
    def _apply(self, state: dict) -> None:
        """Take the learner's counters from a reply."""
        self._learner_metrics = state['metrics']
        self._learner_errors += self.client.take_late_errors() + state.get('errors', [])
        self.core.step_count = int(state['step'])
        self.buffer._stats = dict(state['buffer'])

    def _local_metrics(self) -> dict:
        return {**OnlineTrainer.metrics(self), 'weight_swaps': self.weight_swaps,
                'learner_missed_samples': self.client.missed}

    def set_training(self, enabled: bool) -> None:
        """LearnerError when the learner did not confirm it. A learner that is gone never
        takes it: the predictor's flag then stays as it was. One that did not answer in time
        still has the command queued and takes it later: the predictor keeps the new flag, so
        the two agree either way."""
        with self._state_lock:
            before, self.training_enabled = self.training_enabled, bool(enabled)
        try:
            self._apply(self.client.request('set_training', enabled=bool(enabled),
                                            metrics=self._local_metrics()))
        except LearnerError:
            if not self.client.alive:
                with self._state_lock:
                    self.training_enabled = before
            raise

    def set_learning_rate(self, lr: float) -> None:
        """As set_training: the predictor's copy of the rate follows what the learner will
        have (not taken when it is gone, taken when the command is only unconfirmed)."""
        try:
            self.client.request('set_lr', lr=float(lr))
        except LearnerError:
            if self.client.alive:
                self.core.set_lr(lr)
            raise
        self.core.set_lr(lr)

    def save_checkpoint(self, path=None) -> Path:
        return Path(self.client.request('save', path=str(path) if path else None,
                                        metrics=self._local_metrics()))

    def metrics(self) -> dict:
        local = self._local_metrics()
        if self.client.alive and not self.client.closed:
            try:
                self._apply(self.client.request('metrics', metrics=local, timeout=5.0))
            except LearnerError as e:
                log.warning('learner metrics: %s', e)
        learner = {k: v for k, v in self._learner_metrics.items() if k.startswith(LEARNER_KEYS)}
        return {**local, **learner, 'learner_alive': self.client.alive}

    def problems(self) -> list:
        return super().problems() + ([self.learner_problem] if self.learner_problem else [])

    def shutdown(self) -> dict:
        """The learner writes the final checkpoint and buffer and ends; the trajectories are
        written here (they are the predictor's)."""
        self._closing.set()
        written = {}
        try:
            reply = self.client.request('shutdown', timeout=SHUTDOWN_TIMEOUT_S,
                                        metrics=self._local_metrics())
            written.update(reply['written'])
            self.write_failures.extend(tuple(f) for f in reply['failures'])
        except LearnerError as e:
            log.error('%s', e)
            self.write_failures.append(('learner files', str(e)))
        self.client.join()
        if self.cfg.trajectory_dir:
            try:
                written.update(self.write_trajectories(self.cfg.trajectory_dir))
            except (OSError, ValueError, RuntimeError) as e:
                log.exception('trajectories not written at shutdown')
                self.write_failures.append(('trajectories', f'{type(e).__name__}: {e}'))
        return written


def build_trainer(online_cfg: OnlineConfig, train_cfg: TrainConfig, model_cfg: ModelConfig,
                  base_sample: SampleConfig, buffer_cfg, trajectory_cfg,
                  filter_cfg: OnlineFilterConfig = None) -> OnlineTrainer:
    """online_cfg.learner 'thread': training.online.build_online_trainer; 'process': the same
    order, but the replay buffer is opened by the learner process."""
    if online_cfg.learner == 'thread':
        return build_online_trainer(online_cfg, train_cfg, model_cfg, base_sample, buffer_cfg,
                                    trajectory_cfg, filter_cfg)
    initial = initial_payload(online_cfg)
    payload = initial[0]
    if payload is not None:
        model_cfg = ModelConfig.from_dict(payload['config']['model'])
    sample_cfg = sample_config_for(model_cfg, base_sample, checkpoint_imu_window(payload))
    return ProcessOnlineTrainer(online_cfg, train_cfg, model_cfg, sample_cfg, buffer_cfg,
                                trajectory=build_trajectory(trajectory_cfg, filter_cfg, *initial),
                                initial=initial)
