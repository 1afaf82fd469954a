"""OnlineTrainer: the pure core of online fine-tuning (no rclpy), driven by the ROS nodes.

New samples come from the synchronizer; each is predicted at once (the published pose) with an
inference copy of the model, so prediction latency never waits for a gradient step, and is added
to the replay buffer. Its step goes to the online trajectory (trajectory/chain.py), which chains
steps by stamps, bridges holes and starts segments. A training thread calls `train_pending()`,
which runs the gradient steps owed at `updates_per_sample` per new sample on mini-batches from
the buffer, then refreshes the inference copy. Checkpoints use the offline format (DESIGN §7),
plus the wall-clock time they were saved (SAVED_AT_KEY), which orders them on resume; every file
is written atomically (fileio).

Construction is complete before anything runs: the initial checkpoint (initial_payload), the
sample config it implies (sample_config_for), the replay buffer and the trajectory are made
first and handed to the constructor.
"""
from collections import deque
import copy
from dataclasses import dataclass, field
from datetime import datetime
import logging
import math
from pathlib import Path
import threading
import time

import numpy as np
import torch

from mm_fusion_ros.config import ConfigBase, MODALITIES, SampleConfig
from mm_fusion_ros.eval.trajectory_io import write_segment, write_segments_index
from mm_fusion_ros.fileio import remove_stale_temps
from mm_fusion_ros.filter.checkpoint import embed_filter, EMBED_KEY, filter_section
from mm_fusion_ros.filter.online import build_filter_source, FilterPoseSource, OnlineFilterConfig
from mm_fusion_ros.kitti.dataset import collate_samples
from mm_fusion_ros.kitti.sample import build_sample, Calibration
from mm_fusion_ros.model.config import ModelConfig
from mm_fusion_ros.model.encoders import BevPointEncoder, ScanCache
from mm_fusion_ros.model.feature_cache import adopt_row_digests
from mm_fusion_ros.model.selfsup import point_displacement
from mm_fusion_ros.sync.replay_buffer import open_buffer, ReplayBuffer
from mm_fusion_ros.synthetic.camera import kitti_calib
from mm_fusion_ros.training.checkpoint import (
    checkpoint_imu_window,
    load_checkpoint,
    resolve_imu_window,
    save_checkpoint,
)
from mm_fusion_ros.training.config import TrainConfig
from mm_fusion_ros.training.core import is_empty, TrainerCore
from mm_fusion_ros.training.distributed import resolve_device
from mm_fusion_ros.training.guard import DeploymentGuard
from mm_fusion_ros.training.logging import LOSS_PARTS
from mm_fusion_ros.trajectory.bridge import ConstantVelocityBridge
from mm_fusion_ros.trajectory.chain import OnlineTrajectory
from mm_fusion_ros.trajectory.covariance import diag_covariance

log = logging.getLogger(__name__)


# The online node's train.* defaults where they differ from TrainConfig's (the offline ones): a
# robot has no ground truth, so online training is self-supervised unless train.supervision says
# otherwise (DESIGN §9). ros/trainer_node.py declares the parameters with these; --help shows them.
ONLINE_TRAIN_DEFAULTS = {'supervision': 'self'}


# Under supervision gt, samples without ground truth cannot train: warned once after this many.
NO_TARGET_WARNING = 20
# With the deployment guard, a new sample enters the replay buffer only once the guard has
# scored it (which solves its LiDAR step, the dearest part of its preparation; the solution is
# kept for its training steps).
# A waiting sample is scored once updates_per_sample steps have run since the last one was (or
# when no step is owed); of the waiting ones the newest GUARD_QUEUE are kept and older ones
# skipped (counted). So a learner that falls behind the replay (5x on 2 cores) still gives each
# sample it takes its steps, instead of spending its time on scoring.
GUARD_QUEUE = 8
BUFFER_REJECT_LOG_EVERY = 100   # a buffer that refuses every sample: one error per 100
# Online checkpoints written with the guard on hold the weights it compares against (the
# entries a step can change): a resumed run goes on with that reference, not with the trained
# weights, which the guard may have rejected.
GUARD_REFERENCE_KEY = 'guard_reference'
# Online checkpoints record when they were saved (time.time()): resume takes the one saved last.
# File times are not the save order (`cp -r` of the folder or a restored backup resets them).
SAVED_AT_KEY = 'saved_unix_s'
# Columns of OnlineConfig.log_csv: one row per logged gradient step; loss_<part> is each part's
# unweighted mean over the samples it was valid for (TrainerCore.combine), empty when the step
# had none (a part the supervision does not use, a masked-off modality).
CSV_COLUMNS = ('step', 'loss', 'lr', 'grad_norm', 'batch', 'buffer_size', 'samples_seen',
               'step_time_s', 'wall_time') + tuple(f'loss_{part}' for part in LOSS_PARTS)


@dataclass(frozen=True)
class OnlineConfig(ConfigBase):
    """How the online trainer runs (model and optimiser settings: ModelConfig, TrainConfig)."""

    initial_checkpoint: str = field(default='', metadata={
        'help': 'checkpoint to fine-tune from; empty = a fresh model'})
    resume: bool = field(default=False, metadata={
        'help': 'start from the one saved last of checkpoint_dir/final.pth and autosave.pth '
                'when one exists (after a stop or a crash), else from initial_checkpoint'})
    resume_optimizer: bool = field(default=True, metadata={
        'help': "restore initial_checkpoint's optimiser state (AdamW moments) when it covers "
                'the same parameters; the learning rate is always train.learning_rate'})
    checkpoint_dir: str = field(default='checkpoints', metadata={
        'help': 'where save_checkpoint, autosave and the final checkpoint write'})
    updates_per_sample: float = field(default=1.0, metadata={
        'help': 'gradient steps owed per new synchronized sample. With the guard '
                '(guard_window > 0) a learner behind the replay gives the samples it scores '
                'these steps before it scores the next, and skips older waiting samples '
                '(guard_skipped_samples)'})
    warm_up: int = field(default=3, metadata={
        'help': 'forward passes of the prediction model on a synthetic sample at start-up, '
                "before the node takes samples: torch's first calls cost the first real "
                'samples tens of ms, a backlog that a fast replay drains slowly (0 = none)'})
    lr_warmup_steps: int = field(default=0, metadata={
        'help': 'the learning rate ramps up linearly over this many first gradient steps of the '
                'session (0 = none): a fresh AdamW takes steps of the full learning rate from '
                'the first one'})
    guard_window: int = field(default=0, metadata={
        'help': 'predictions use the adapted weights only while, over the last this many new '
                'samples (each scored before a step trains on it), their predicted steps lie '
                'significantly nearer (guard_confidence) to the LiDAR solution of each step '
                'than those of the weights training started from; else those '
                '(training/guard.py). 0 = always the adapted weights. Needs '
                'train.self_geometric_solve > 0 and the geometric term in train.supervision'})
    guard_min_samples: int = field(default=10, metadata={
        'help': 'scored samples before the guard may hand predictions the adapted weights'})
    guard_confidence: float = field(default=2.0, metadata={
        'help': 'the adapted weights must score better by this many standard errors of the '
                'mean paired difference over the guard window (a one-sided test)'})
    guard_retreat: int = field(default=10, metadata={
        'help': 'predictions go back to the initial weights at once when over the last this '
                'many scored samples the adapted ones scored significantly worse '
                '(guard_confidence), however the longer window reads: slow to adopt, quick to '
                'retreat (an adapted head can mistake a stop for the motion it trained on; '
                'docs/selfsup.md); at most guard_window samples. 0 = off'})
    max_step_debt: int = field(default=20, metadata={
        'help': 'cap on owed steps, so a burst of samples cannot stall the trainer for long'})
    min_buffer: int = field(default=4, metadata={'help': 'samples in the buffer before training'})
    training_enabled: bool = field(default=True, metadata={'help': 'run gradient steps'})
    prediction_ema: float = field(default=0.0, metadata={
        'help': 'predictions use an exponential moving average of the trained weights: after '
                'each step ema = d * ema + (1 - d) * weights with d this value (0 = the newest '
                'weights); it smooths the step-to-step noise of online updates. Checkpoints '
                'hold the trained weights'})
    autosave_interval_s: float = field(default=0.0, metadata={
        'help': 'write checkpoint_dir/autosave.pth every this many seconds (0 = never)'})
    autosave_buffer: bool = field(default=True, metadata={
        'help': 'autosave also writes the replay buffer to buffer_path (at KITTI size up to '
                'buffer.max_bytes each time), so a crashed node resumes with its memory'})
    save_on_shutdown: bool = field(default=True, metadata={
        'help': 'write checkpoint_dir/final.pth when the node shuts down'})
    buffer_path: str = field(default='', metadata={
        'help': 'replay buffer file: loaded at start when it exists, saved at shutdown'})
    trajectory_dir: str = field(default='', metadata={
        'help': 'write predicted and ground-truth trajectories (KITTI format) here at shutdown'})
    log_csv: str = field(default='', metadata={'help': 'CSV log of training steps'})
    tensorboard_dir: str = field(default='', metadata={'help': 'TensorBoard event folder'})
    log_every: int = field(default=10, metadata={'help': 'log a row every N gradient steps'})
    device: str = field(default='cpu', metadata={'help': 'cpu | cuda | auto'})
    num_threads: int = field(default=0, metadata={'help': 'torch threads (0 = torch default)'})
    learner: str = field(default='thread', metadata={
        'help': 'thread: gradient steps in a thread of the node process; process: in a learner '
                'process of their own (training/learner.py), weights handed over in shared '
                'memory'})
    intake: str = field(default='thread', metadata={
        'help': 'thread: the synchronizer (sensor intake, sample building) in this process; '
                'process: in a process of its own (ros/intake_process.py), samples handed '
                'over in shared memory, so intake and prediction each have a core'})

    def __post_init__(self):
        if self.guard_retreat < 0 or self.guard_retreat == 1:
            raise ValueError(f'OnlineConfig.guard_retreat must be 0 (off) or >= 2, got '
                             f'{self.guard_retreat}')
        if self.guard_window < 0 or self.guard_confidence < 0 or (
                self.guard_window and not 2 <= self.guard_min_samples <= self.guard_window):
            raise ValueError(f'OnlineConfig needs guard_window >= 0, guard_confidence >= 0 and, '
                             f'with a guard, 2 <= guard_min_samples <= guard_window; got '
                             f'{self.guard_window}, {self.guard_confidence}, '
                             f'{self.guard_min_samples}')
        if self.lr_warmup_steps < 0:
            raise ValueError(f'OnlineConfig.lr_warmup_steps must be >= 0, got '
                             f'{self.lr_warmup_steps}')
        if self.warm_up < 0:
            raise ValueError(f'OnlineConfig.warm_up must be >= 0, got {self.warm_up}')
        if self.updates_per_sample < 0 or self.max_step_debt < 1 or self.min_buffer < 1:
            raise ValueError('OnlineConfig needs updates_per_sample >= 0, max_step_debt >= 1, '
                             f'min_buffer >= 1; got {self.updates_per_sample}, '
                             f'{self.max_step_debt}, {self.min_buffer}')
        if not 0.0 <= self.prediction_ema < 1.0:
            raise ValueError(f'OnlineConfig.prediction_ema={self.prediction_ema}: needs '
                             '0 <= d < 1')
        if self.autosave_interval_s < 0 or self.log_every < 1:
            raise ValueError('OnlineConfig needs autosave_interval_s >= 0 and log_every >= 1')
        if self.device not in ('cpu', 'cuda', 'auto'):
            raise ValueError(f'OnlineConfig.device={self.device!r}; choose cpu, cuda or auto')
        for name in ('learner', 'intake'):
            if getattr(self, name) not in ('thread', 'process'):
                raise ValueError(f'OnlineConfig.{name}={getattr(self, name)!r}; choose thread '
                                 'or process')


def initial_payload(cfg: OnlineConfig):
    """(checkpoint payload or None, its path or ''): with `resume`, the one saved last of
    checkpoint_dir/final.pth and autosave.pth where one exists (_saved_last), else
    initial_checkpoint."""
    if cfg.resume:
        saved = [p for p in (Path(cfg.checkpoint_dir) / n for n in ('final.pth', 'autosave.pth'))
                 if p.is_file()]
        if saved:
            return _saved_last(saved)
    if cfg.initial_checkpoint:
        return load_checkpoint(cfg.initial_checkpoint), cfg.initial_checkpoint
    return None, ''


def _saved_last(paths) -> tuple:
    """(payload, path) of the checkpoint among `paths` saved last, by the SAVED_AT_KEY time
    it records; by its file time only when it records none (written before the key was). One
    that cannot be loaded is skipped with a warning (the other still holds the run); ValueError
    naming them all when none can."""
    candidates, errors = [], []
    for path in paths:
        try:
            payload = load_checkpoint(path)
        except ValueError as e:   # corrupt; an OSError (permissions, I/O) is raised, not skipped
            log.warning('resume: %s cannot be loaded (%s: %s); not resuming from it', path,
                        type(e).__name__, e)
            errors.append((path, e))
            continue
        saved_at = payload.get(SAVED_AT_KEY)
        if isinstance(saved_at, (int, float)) and not isinstance(saved_at, bool) and \
                0 < saved_at < 1e11:    # a time the log line below can print
            candidates.append((float(saved_at), 'saved', payload, path))
        else:
            candidates.append((path.stat().st_mtime, 'file time (no saved time recorded)',
                               payload, path))
    if not candidates:
        raise ValueError('resume: no checkpoint can be loaded: ' + '; '.join(
            f'{path}: {type(e).__name__}: {e}' for path, e in errors)) from errors[-1][1]
    _, _, payload, path = max(candidates, key=lambda c: c[0])
    log.info('resuming from %s, the checkpoint saved last (%s)', path, '; '.join(
        f'{p.name}: {how} {datetime.fromtimestamp(t).isoformat(timespec="milliseconds")}'
        for t, how, _, p in candidates))
    return payload, str(path)


def is_resume(cfg: OnlineConfig, source: str) -> bool:
    """Whether `source` (initial_payload's path) is this run's own final or autosave
    checkpoint, i.e. the run goes on where it stopped."""
    if not (cfg.resume and source):
        return False
    path = Path(source)
    return path.name in ('final.pth', 'autosave.pth') and \
        path.parent.resolve() == Path(cfg.checkpoint_dir).resolve()


# Batch entries that hold both scans or frames of a sample (dim 1: k-1, k).
PAIRED_KEYS = ('image', 'points', 'points_mask')


def synthetic_sample(cfg: SampleConfig, seed: int = 0) -> dict:
    """A sample of cfg's shape with every modality present: random images, two scans of
    random points around the car (the second 1 m behind the first), a level IMU at rest and a
    KITTI-like calibration (only its shape and paths matter: OnlineTrainer.warm_up)."""
    rng = np.random.default_rng(seed)
    h, w = cfg.image_height, cfg.image_width
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(2)]
    n = max(cfg.max_points, 1000)
    scan = np.column_stack([rng.uniform(-20, 20, (n, 2)), rng.uniform(-1.3, 2.5, n),
                            rng.uniform(0, 1, n)]).astype(np.float32)
    scans = [scan, scan - np.array([1.0, 0, 0, 0], np.float32)]
    kitti = kitti_calib(w, h)
    calib = Calibration(intrinsics=kitti.K2, image_size=(w, h), t_cam_lidar=kitti.T_cam2_velo,
                        t_imu_lidar=np.eye(4))
    sample = build_sample(cfg, stamps=(0.0, 0.1), images=images, scans=scans,
                          calibration=calib)
    sample['modality_mask'] = np.ones_like(sample['modality_mask'])   # the IMU branch too
    return sample


def sample_config_for(model_cfg: ModelConfig, base: SampleConfig,
                      checkpoint_window_s: float = None) -> SampleConfig:
    """The sample shape the model expects (image size and K come from the model). The IMU
    window is the one the checkpoint was trained with unless `base` asks for another (> 0;
    0 is the parameter's default, so it means "the checkpoint's")."""
    window = resolve_imu_window(base.imu_window_s or None, checkpoint_window_s,
                                'the initial checkpoint')
    return base.replace(image_height=model_cfg.image_height, image_width=model_cfg.image_width,
                        imu_steps=model_cfg.imu_steps, imu_window_s=window)


@dataclass
class Prediction:
    frame: int
    mean: np.ndarray          # (6,) relative pose k-1 -> k
    logvar: np.ndarray        # (6,)
    latency_s: float          # wall time spent predicting
    poses: list               # trajectory PoseRecords: a bridged one first if the sample left
    #                           a hole, then its own (published in this order)

    @property
    def pose(self) -> np.ndarray:
        return self.poses[-1].pose

    @property
    def stamp_ns(self) -> int:
        return self.poses[-1].stamp_ns


def sample_stamps_ns(meta: dict):
    """(stamp_prev_ns, stamp_cur_ns) of a sample: the synchronizer's int stamps, or the
    offline Dataset's seconds."""
    if 'stamp_prev_ns' in meta:
        return int(meta['stamp_prev_ns']), int(meta['stamp_cur_ns'])
    return int(round(meta['stamp_prev'] * 1e9)), int(round(meta['stamp_cur'] * 1e9))


class OnlineTrainer:
    """Predict every new sample, train on the replay buffer, checkpoint on request.

    Threads: `on_sample` (the synchronizer's dispatch thread), `train_pending` (the training
    thread) and `save_checkpoint` / `set_training` (service callbacks) may run concurrently.
    One gradient step at a time holds `_step_lock`; a checkpoint snapshots the weights and the
    optimiser under it, so it never mixes two steps.
    """

    def __init__(self, online_cfg: OnlineConfig, train_cfg: TrainConfig,
                 model_cfg: ModelConfig = None, buffer: ReplayBuffer = None,
                 sample_cfg: SampleConfig = None, trajectory: OnlineTrajectory = None,
                 initial=None):
        """initial: (payload, source) from initial_payload(online_cfg), loaded here if None.
        model_cfg is used for a fresh model only (a checkpoint brings its own); sample_cfg is
        recorded in checkpoints."""
        self.cfg = online_cfg
        if online_cfg.num_threads > 0:
            torch.set_num_threads(online_cfg.num_threads)
        device = resolve_device(online_cfg.device)
        payload, source = initial if initial is not None else initial_payload(online_cfg)
        if payload is not None:
            model_cfg = ModelConfig.from_dict(payload['config']['model'])
        self.checkpoint_imu_window_s = checkpoint_imu_window(payload)   # None: not recorded
        model_cfg = model_cfg or ModelConfig()
        self.core = TrainerCore(model_cfg, train_cfg, device=device,
                                normalization=payload.get('normalization') if payload else None)
        self.optimizer_resumed = False
        self.source = source
        if payload is not None:
            self._load_initial(payload, source)
        self.initial_step = self.core.step_count
        self.sample_cfg = sample_cfg
        self.trajectory = trajectory or OnlineTrajectory()
        source = self.trajectory.source     # the inertial filter, when it runs (filter/online.py)
        self.filter = source if isinstance(source, FilterPoseSource) else None
        # The filter's checkpoint section, embedded in every checkpoint written. A filter the
        # initial checkpoint carries travels on when it does not run here (filter.mode off):
        # a checkpoint written online keeps what the run started from.
        self.filter_section = self.filter.section if self.filter is not None else None
        if self.filter_section is None and payload is not None and EMBED_KEY in payload:
            self.filter_section = filter_section(payload, source)
        self.rng = np.random.default_rng(train_cfg.seed)
        self._model_lock = threading.Lock()     # guards the inference copy
        self._state_lock = threading.Lock()     # guards counters and trajectories
        self._step_lock = threading.Lock()      # one gradient step, or a checkpoint snapshot
        self._wakeup = threading.Condition()
        self._backlog = 0     # samples received, not yet predicted (see set_backlog)
        self.infer_model = copy.deepcopy(self.core.model).eval()
        self._ema = {k: v.detach().clone() for k, v in self.core.model.state_dict().items()} \
            if online_cfg.prediction_ema > 0 else None
        # What a step can change (frozen branches neither train nor move their BatchNorm
        # statistics): only these go to the inference copy after a step.
        model = self.core.model
        self._infer_tensors = self.infer_model.state_dict()
        self._changing = [n for n, p in model.named_parameters() if p.requires_grad] + \
            [n for n, _ in model.named_buffers()
             if n.split('.')[0] not in model.frozen and n in self._infer_tensors]
        # Consecutive samples share a scan: its half of the BEV encoder is computed once.
        self.scan_cache = ScanCache() if isinstance(self.infer_model.point, BevPointEncoder) \
            else None
        # New weights make the cache's features stale only where they reach the encoders whose
        # features it keeps: steps on the heads alone (encoders frozen, config/finetune.yaml)
        # keep it, instead of costing the next prediction both scans and frames again.
        self._weights_reach_cache = any(n.split('.')[0] in ScanCache.BRANCHES
                                        for n in self._changing)
        self._start_guard(online_cfg, payload if is_resume(online_cfg, self.source) else None)
        self.training_enabled = online_cfg.training_enabled
        self.base_lr = train_cfg.learning_rate     # what lr_warmup_steps ramps up to
        self.step_debt = 0.0
        self.samples_seen = 0
        self.steps_done = 0
        self.steps_failed = 0
        self.masked = {'camera': 0, 'lidar': 0, 'imu': 0, 'target': 0}
        self.last_stats = None
        self.latencies = deque(maxlen=1000)
        self.autosaves = 0
        self.autosave_failures = 0
        self.buffer_rejected = 0       # samples predicted but refused by the replay buffer
        self.write_failures = []     # (what, error) of files not written at shutdown
        self._last_autosave = time.monotonic()
        self.buffer = buffer if buffer is not None else ReplayBuffer()
        self.resumed_samples = len(self.buffer)
        for name in ('autosave.pth', 'final.pth'):
            remove_stale_temps(self.checkpoint_path(name))
        if online_cfg.buffer_path:
            remove_stale_temps(online_cfg.buffer_path)
        self._csv = None
        self._tb = None
        self._open_logs()

    def _load_initial(self, payload, source):
        self.core.load_state_dict(payload, source=source)
        self.core.step_count = int(payload.get('step', 0))
        self.core.epoch = int(payload.get('epoch', 0))
        if self.cfg.resume_optimizer and payload.get('optimizer') is not None:
            try:
                self.core.load_optimizer(payload, source)
                self.optimizer_resumed = True
            except ValueError as e:
                log.warning('optimizer state of %s not restored (%s); starting AdamW afresh',
                            source, e)
        log.info('fine-tuning from %s (step %d, optimizer %s)', source, self.core.step_count,
                 'restored' if self.optimizer_resumed else 'fresh')

    def _start_guard(self, cfg: OnlineConfig, resumed: dict = None) -> None:
        """The deployment guard (training/guard.py) over a frozen copy of the initial weights,
        or None. resumed: the payload of this run's own checkpoint it resumes from, whose
        GUARD_REFERENCE_KEY entry (if any) is the reference, and what predictions start with."""
        self.guard, self.reference, self._unscored = None, None, deque()
        self._steps_since_admit = math.inf
        self._adapted_deployed, self._guard_warned = True, False
        if not cfg.guard_window:
            return
        if self.core.selfsup.solved is None or 'geometric' not in self.core.train_cfg.loss_terms:
            log.warning('guard_window=%d is ignored: the guard scores samples with the solved '
                        'geometric term, which needs train.self_geometric_solve > 0 and '
                        'train.supervision self or both with train.self_geometric_weight > 0',
                        cfg.guard_window)
            return
        self.guard = DeploymentGuard(cfg.guard_window, cfg.guard_min_samples,
                                     cfg.guard_confidence, cfg.guard_retreat)
        self.reference = copy.deepcopy(self.core.model).eval().requires_grad_(False)
        # Frozen branches are the same in both copies: the reference reads the same features.
        self.reference.feature_cache = self.core.model.feature_cache
        state = self.reference.state_dict()
        self._reference_state = {k: state[k] for k in self._changing}
        self._adapted_deployed = False          # predictions start with the initial weights
        kept = (resumed or {}).get(GUARD_REFERENCE_KEY)
        if kept:
            self._restore_reference(kept)

    def _restore_reference(self, kept: dict) -> None:
        """A resumed run's reference and first predictions: the run's reference as saved."""
        ref = self._reference_state
        if set(kept) != set(ref) or any(tuple(kept[k].shape) != tuple(ref[k].shape)
                                        for k in ref):
            log.warning('the guard reference in %s does not fit this model: the guard compares '
                        "against the checkpoint's trained weights", self.source)
            return
        with torch.no_grad():
            for k, v in kept.items():
                ref[k].copy_(v)
                self._infer_tensors[k].copy_(v)
        log.info("resumed the guard's reference from %s: predictions start with it", self.source)

    def use_imu(self, imu, rot_base_imu=None, imu_after=None, base_imu=None) -> None:
        """Give the trajectory's bridge the IMU the synchronizer holds (imu_between) and
        R_base_imu (an array, or a function returning one or None); a bridge without these
        attributes is left alone. The inertial filter, when it runs, gets the IMU store
        (Synchronizer.imu_after) and T_base_imu (a function), and its fallback bridge the
        former two."""
        bridge = self.trajectory.bridge
        if self.filter is not None:
            self.filter.connect(imu_after, base_imu)
            bridge = self.filter.fallback
        # trajectory.bridge 'velocity': constant velocity only, so no IMU for the bridge.
        if bridge is not None and hasattr(bridge, 'imu') and \
                self.trajectory.cfg.bridge == 'imu':
            bridge.imu, bridge.rot_base_imu = imu, rot_base_imu

    # --- samples -------------------------------------------------------------------------
    def warm_up(self) -> float:
        """Run the prediction model `warm_up` times on a synthetic sample of this run's shape,
        with a ScanCache of its own; -> seconds taken. Call it before the first sample: the
        first forward of a process took 12-40 ms against ~5 ms later (dummy camera, 2 cores),
        and at 10x each sample behind is 10 ms of latency. Nothing the run keeps changes (no
        buffer, trajectory, counters or scan cache; eval mode, no gradients)."""
        if self.cfg.warm_up == 0:
            return 0.0
        t0 = time.perf_counter()
        try:
            shape = self.sample_cfg or sample_config_for(self.core.model_cfg, SampleConfig())
            batch = collate_samples([synthetic_sample(shape)])
            cache = ScanCache() if self.scan_cache is not None else None
            # The sample and its scans and frames swapped, in turn: from the second pass on the
            # first scan and frame are the cache's, as in a replay, so the passes warm up the
            # cache's path too (its convolutions see one scan at a time, shapes of their own;
            # docs/online_runtime.md, "Session 38").
            swapped = {k: v.flip(1) if k in PAIRED_KEYS else v for k, v in batch.items()}
            with self._model_lock, torch.inference_mode():
                passes = [self.core.to_device(batch), self.core.to_device(swapped)]
                for i in range(self.cfg.warm_up):
                    self.infer_model(passes[i % 2], scan_cache=cache)
        except Exception as e:  # noqa: BLE001 - only a saving: the node starts without it
            log.warning('warm-up of the prediction model failed (%s: %s); the first samples '
                        'pay its first calls', type(e).__name__, e)
        return time.perf_counter() - t0

    def on_sample(self, sample: dict) -> Prediction:
        """Predict the new sample's relative pose, store it in the buffer, owe training steps."""
        t0 = time.perf_counter()
        batch = collate_samples([sample])
        # inference_mode, not no_grad: no version counters or views tracked for autograd.
        with self._model_lock, torch.inference_mode():
            dev = self.core.to_device(batch)
            feats = {}
            out = self.infer_model(dev, scan_cache=self.scan_cache, features_out=feats)
            mean, logvar = self.infer_model.denormalize(out['mean'].float(),
                                                        out['logvar'].float())
        self._remember_features(dev, feats)
        mean = mean[0].cpu().numpy().astype(np.float64)
        logvar = logvar[0].cpu().numpy().astype(np.float64)
        latency = time.perf_counter() - t0
        try:
            self._arrive(sample)
        except ValueError as e:
            # The buffer refuses it (larger than buffer.max_bytes, keys missing): training
            # loses the sample, the prediction still goes out. Counted, reported.
            with self._state_lock:
                self.buffer_rejected += 1
                first = self.buffer_rejected == 1
            if first or self.buffer_rejected % BUFFER_REJECT_LOG_EVERY == 0:
                log.error('sample of frame %s not stored for training (%d so far): %s',
                          sample['meta'].get('frame'), self.buffer_rejected, e)
        meta = sample['meta']
        mask = np.asarray(sample['modality_mask'], dtype=bool)
        # Without camera and LiDAR the filter takes no relative pose: it carries on on the IMU.
        poses = self.trajectory.add_step(*sample_stamps_ns(meta), mean, diag_covariance(logvar),
                                         run=meta.get('run'), measured=bool(mask[:2].any()))
        pred = Prediction(frame=int(meta['frame']), mean=mean, logvar=logvar, latency_s=latency,
                          poses=poses)
        with self._state_lock:
            self.latencies.append(latency)
            self.samples_seen += 1
            for name, present in zip(MODALITIES, mask):
                self.masked[name] += int(not present)
            self.masked['target'] += int(not bool(sample['target_valid']))
            no_target = self.masked['target'] == self.samples_seen == NO_TARGET_WARNING
            if self.training_enabled:
                self.step_debt = min(self.step_debt + self.cfg.updates_per_sample,
                                     float(self.cfg.max_step_debt))
        if no_target and self.core.train_cfg.supervision == 'gt':
            log.warning('train.supervision is gt, but none of the first %d samples has ground '
                        'truth (nothing on the ground-truth topic?): no gradient step can run; '
                        'train.supervision self trains without it', NO_TARGET_WARNING)
        with self._wakeup:
            self._wakeup.notify_all()
        return pred

    def _arrive(self, sample: dict) -> None:
        """A new sample goes into the buffer, or, while the guard scores samples before training
        may use them, into the queue of those waiting for it (GUARD_QUEUE).

        A waiting sample is a private copy: the caller's arrays may not outlive the call (in
        the learner process they are views of a shared-memory slot, reused once released).
        Whether it waits is decided under the state lock, so a sample never waits while
        training is off (set_training stores the waiting ones) nor skips the guard while it
        is on."""
        with self._state_lock:
            wait = self.guard is not None and self.training_enabled
        if wait:
            own = self.buffer.private_copy(sample)    # checked as add() checks it (ValueError)
            with self._state_lock:
                if self.training_enabled:
                    if len(self._unscored) >= GUARD_QUEUE:
                        self._unscored.popleft()
                        self.guard.skipped += 1
                    self._unscored.append(own)
                    return
        self.buffer.add(sample)

    def _may_admit(self) -> bool:
        """A sample waits for the guard, training is on and no prediction waits."""
        return bool(self._unscored) and self.training_enabled and not self._backlog

    def _store_unscored(self) -> None:
        """Training off or shutting down (under _step_lock, so after an admission in
        progress): the waiting samples go into the buffer unscored (counted in
        guard_unscored_stored_samples)."""
        with self._state_lock:
            waiting = list(self._unscored)
            self._unscored.clear()
            if self.guard is not None:
                self.guard.stored_unscored += len(waiting)
        for item in waiting:
            self.buffer.add_private_copy(item)

    def _remember_features(self, batch, features) -> None:
        """The frozen encoders' features of the prediction, for the sample's first step."""
        if self.training_enabled and self.core.model.frozen:
            self.core.model.remember_features(batch, features)

    # --- training ------------------------------------------------------------------------
    def set_backlog(self, samples: int) -> None:
        """Samples received but not yet predicted (the caller's queue, the one in flight
        included). While there are any, no gradient step starts: predictions come first and
        training takes the time between them (a step started beside a fast replay made the
        predictions fall behind: docs/online_runtime.md)."""
        with self._wakeup:
            self._backlog = int(samples)
            if not self._backlog:
                self._wakeup.notify_all()

    def _may_train(self) -> bool:
        """Training is on, the buffer holds enough and no prediction waits (under _state_lock)."""
        return self.training_enabled and len(self.buffer) >= self.cfg.min_buffer and \
            not self._backlog

    def pending_steps(self) -> int:
        with self._state_lock:
            return int(math.floor(self.step_debt)) if self._may_train() else 0

    def train_pending(self, max_steps: int = None) -> int:
        """Run the owed gradient steps (at most max_steps); returns how many ran.

        A step that raises is still paid off (and counted in steps_failed), so one bad batch
        cannot make the trainer retry it forever. The autosave comes due however the steps
        end, so steps that keep failing do not stop the run's progress from being saved.
        """
        try:
            done = self._train_steps(max_steps)
        except Exception:
            # The step's error is the one raised; an autosave failing as well is counted (in
            # _maybe_autosave) and logged here.
            try:
                self._maybe_autosave()
            except OSError:
                log.exception('autosave after a failed training step failed too')
            raise
        self._maybe_autosave()
        return done

    def _train_steps(self, max_steps: int = None) -> int:
        done = 0
        while max_steps is None or done < max_steps:
            with self._step_lock:
                admitted = False
                if self._may_admit() and (self._steps_since_admit >= self.cfg.updates_per_sample
                                          or not self._step_ready()):
                    admitted = self._admit_new_sample()
                    if admitted:
                        self._steps_since_admit = 0
                if not self._take_step():
                    if admitted:
                        continue
                    break
                self._steps_since_admit += 1
                try:   # whatever fails, the step was paid for (_take_step): counted
                    drawn = self.buffer.sample(self.core.train_cfg.batch_size, self.rng)
                    batch = collate_samples(drawn)
                    adopt_row_digests(batch, drawn)
                    if self.steps_done < self.cfg.lr_warmup_steps:
                        self.core.set_lr(self.base_lr * (self.steps_done + 1)
                                         / self.cfg.lr_warmup_steps)
                    t0 = time.perf_counter()
                    stats = self.core.step(batch)
                except Exception:
                    with self._state_lock:
                        self.steps_failed += 1
                    raise
                elapsed = time.perf_counter() - t0
                if stats.applied:
                    self._refresh_inference_model()
            with self._state_lock:
                self.steps_done += 1
                self.last_stats = stats
            self._log_step(stats, elapsed, batch)
            done += 1
        return done

    @torch.no_grad()
    def _admit_new_sample(self) -> bool:
        """The guard's score of the oldest waiting sample, then the sample into the buffer, so
        no step trains on a sample before it is scored: how far the trained weights' prediction
        (eval mode, as predictions run) and the reference's move the sample's scan from where
        the LiDAR's solved step puts it (mean squared displacement of its points). The solution
        is kept for the steps. Returns whether a sample was taken."""
        with self._state_lock:
            if not self._unscored:
                return False
            samples = [self._unscored.popleft()]
        try:
            self._score(samples)
        finally:
            self.buffer.add_private_copy(samples[0])
        return True

    def _score(self, samples: list) -> None:
        try:                                        # scoring must never stop training
            batch = collate_samples(samples)
            if is_empty(batch):
                return
            batch, dropped = self.core.drop_nonfinite(self.core.to_device(batch))
            if batch is not None:
                self.guard.add(*self._guard_scores(batch))
            self.guard.unscorable += dropped
        except (RuntimeError, ValueError) as e:
            self.guard.unscorable += len(samples)
            log.warning('deployment guard: %d sample(s) not scored (%s)', len(samples), e)
        if self.guard.unscorable >= NO_TARGET_WARNING and not self.guard.scored and \
                not self._guard_warned:
            self._guard_warned = True
            log.warning('the deployment guard has scored none of %d samples (no LiDAR, or no '
                        'solution of its scans): predictions keep the initial weights; '
                        'guard_window:=0 hands them the adapted ones', self.guard.unscorable)

    def _guard_scores(self, batch):
        """(candidate scores, reference scores, valid) of a batch of new samples."""
        model, sup = self.core.model, self.core.selfsup
        model.eval()
        try:
            poses = [m.denormalize(out['mean'].float(), out['logvar'].float())[0]
                     for m, out in ((model, model(batch)), (self.reference,
                                                            self.reference(batch)))]
        finally:
            model.train()
        points, mask = batch['points'][:, 1, :, :3].float(), batch['points_mask'][:, 1]
        scores = []
        for pose in poses:
            d, _, valid = sup.solved.offsets(pose, batch, sup.params, sup.cache)
            scores.append(point_displacement(d, points, mask).tolist())
        return scores[0], scores[1], valid.tolist()

    def _step_ready(self) -> bool:
        with self._state_lock:
            return self._may_train() and self.step_debt >= 1.0

    def _take_step(self) -> bool:
        """Pay one owed step off if training may run now (called under _step_lock)."""
        with self._state_lock:
            if not self._may_train() or self.step_debt < 1.0:
                return False
            self.step_debt -= 1.0
            return True

    def wait_for_work(self, timeout: float) -> None:
        with self._wakeup:
            if self.pending_steps() == 0 and not self._may_admit():
                self._wakeup.wait(timeout)

    def wake(self) -> None:
        with self._wakeup:
            self._wakeup.notify_all()

    def set_training(self, enabled: bool) -> None:
        """Switch gradient steps on or off. Off returns once a step in progress has finished,
        so no step completes after it returns."""
        with self._state_lock:
            self.training_enabled = bool(enabled)
            if not enabled:
                self.step_debt = 0.0
        if not enabled:
            with self._step_lock:      # a step or an admission in progress finishes first
                self._store_unscored()
        self.wake()

    def set_learning_rate(self, lr: float) -> None:
        with self._step_lock:
            self.core.set_lr(lr)
            self.base_lr = float(lr)

    @torch.no_grad()
    def inference_state(self) -> dict:
        """The weights predictions should use after a step (a copy of the entries a step can
        change): the trained ones, or their moving average (prediction_ema; integer buffers
        such as BatchNorm's counter are copied)."""
        state = self.core.model.state_dict()
        if self._ema is None:
            return {k: state[k].detach().clone() for k in self._changing}
        d = self.cfg.prediction_ema
        for k in self._changing:
            if state[k].is_floating_point():
                self._ema[k].mul_(d).add_(state[k].detach(), alpha=1.0 - d)
            else:
                self._ema[k].copy_(state[k])
        return {k: self._ema[k].clone() for k in self._changing}

    def _refresh_inference_model(self):
        """Hand predictions the weights of the step just taken, or the initial ones while the
        guard prefers those (copied once per switch back)."""
        if self.guard is None:
            self._publish(self.inference_state())
            return
        adapted = self.guard.prefer_adapted()
        if adapted:
            self._publish(self.inference_state())
        else:
            if self._ema is not None:
                self.inference_state()      # the moving average follows every step
            if self._adapted_deployed:
                self._publish(self._reference_state)
        self._adapted_deployed = adapted

    def _publish(self, state: dict) -> None:
        with self._model_lock, torch.no_grad():
            for k, v in state.items():
                self._infer_tensors[k].copy_(v)
            self._weights_swapped()

    def _weights_swapped(self, whole: bool = False) -> None:
        """The inference copy took new weights (under _model_lock); `whole`: every tensor,
        frozen encoders included."""
        if self.scan_cache is not None and (whole or self._weights_reach_cache):
            self.scan_cache.weights_changed()

    # --- checkpoints and files -----------------------------------------------------------
    def checkpoint_path(self, name: str) -> Path:
        return Path(self.cfg.checkpoint_dir) / name

    def save_checkpoint(self, path=None) -> Path:
        """Atomically write the DESIGN §7 checkpoint; returns the path written.

        The payload is snapshotted (tensors cloned) between two gradient steps and written
        outside the lock, so training pauses only for the copy.
        """
        with self._step_lock:
            step = self.core.step_count
            payload = _clone_tensors(self.core.state_dict(metrics=self.metrics(),
                                                          sample_cfg=self.sample_cfg))
            payload[SAVED_AT_KEY] = time.time()
            if self.guard is not None:
                payload[GUARD_REFERENCE_KEY] = _clone_tensors(self._reference_state)
        if self.filter_section is not None:   # the filter's weights travel with the model
            payload = embed_filter(payload, self.filter_section)   # (DESIGN §10)
        path = Path(path) if path else self.checkpoint_path(f'online_step{step:07d}.pth')
        return save_checkpoint(path, payload)

    def metrics(self) -> dict:
        """Counters of this run, stored in every checkpoint's `metrics`."""
        with self._state_lock:
            stats = self.last_stats
            latencies = list(self.latencies)
            return {'online_samples': int(self.samples_seen),
                    'online_steps': int(self.steps_done),
                    'online_steps_failed': int(self.steps_failed),
                    'initial_step': int(self.initial_step),
                    'optimizer_resumed': bool(self.optimizer_resumed),
                    'resumed_buffer_samples': int(self.resumed_samples),
                    'buffer_size': len(self.buffer),
                    'training_enabled': bool(self.training_enabled),
                    'camera_masked_samples': int(self.masked['camera']),
                    'lidar_masked_samples': int(self.masked['lidar']),
                    'imu_masked_samples': int(self.masked['imu']),
                    'samples_without_target': int(self.masked['target']),
                    'predict_latency_p50_s': _percentile(latencies, 50),
                    'autosaves': int(self.autosaves),
                    'autosave_failures': int(self.autosave_failures),
                    'buffer_rejected_samples': int(self.buffer_rejected),
                    **{f'trajectory_{k}': int(v) for k, v in self.trajectory.stats().items()},
                    **(self.filter.stats() if self.filter is not None else {}),
                    'scan_cache_hits': self.scan_cache.hits if self.scan_cache else 0,
                    'scan_cache_misses': self.scan_cache.misses if self.scan_cache else 0,
                    **self._feature_cache_stats(),
                    'supervision': self.core.train_cfg.supervision,
                    **(self.guard.stats() if self.guard is not None else {}),
                    'last_loss': float(stats.loss) if stats else math.nan,
                    **{f'last_loss_{part}': float(stats.terms.get(part, math.nan))
                       if stats else math.nan for part in LOSS_PARTS}}

    def _feature_cache_stats(self) -> dict:
        """Hits and misses of the frozen encoders' feature cache (rows; training's lookups)."""
        cache = self.core.model.feature_cache
        if cache is None or not self.core.model.frozen:
            return {}
        return {'feature_cache_hits': int(cache.hits), 'feature_cache_misses': int(cache.misses)}

    def _maybe_autosave(self):
        """Checkpoint (and buffer) every autosave_interval_s. A failure is counted and raised
        to the training worker, which logs and reports it and carries on; the next try comes
        after the next interval."""
        interval = self.cfg.autosave_interval_s
        if not (interval > 0 and time.monotonic() - self._last_autosave >= interval):
            return
        self._last_autosave = time.monotonic()
        try:
            path = self.save_checkpoint(self.checkpoint_path('autosave.pth'))
            if self.cfg.buffer_path and self.cfg.autosave_buffer:
                self.buffer.save(self.cfg.buffer_path)
        except (OSError, ValueError, RuntimeError) as e:
            self.autosave_failures += 1
            raise OSError(f'autosave into {self.cfg.checkpoint_dir} failed: {e}') from e
        self.autosaves += 1
        log.info('autosaved %s', path)

    def trajectories(self) -> list:
        """The trajectory's segments (trajectory.chain.SegmentTrack), for writing."""
        return self.trajectory.tracks()

    def write_trajectories(self, out_dir) -> dict:
        """Each segment's KITTI pose files and steps sidecar, and segments.csv (eval/
        trajectory_io.py); -> {name: path}."""
        written, rows = {}, []
        for track in self.trajectories():
            if track.gt is None and len(track.stamps_ns) > 1:
                log.warning('segment %d: %d of %d poses have no ground truth: no ground-truth '
                            'file for it', track.segment, int((~track.gt_valid).sum()),
                            len(track.gt_valid))
            files = write_segment(out_dir, track.segment, track.stamps_ns, track.poses,
                                  track.bridged, gt=track.gt, gt_valid=track.gt_valid)
            suffix = f'.seg{track.segment}' if track.segment else ''
            written.update({f'{kind}{suffix}': str(path) for kind, path in files.items()})
            rows.append({'segment': track.segment, 'reason': track.reason,
                         'first_stamp_ns': int(track.stamps_ns[0]),
                         'last_stamp_ns': int(track.stamps_ns[-1]),
                         'poses': len(track.stamps_ns), 'bridged': int(track.bridged.sum()),
                         'pred': files['pred'].name,
                         'gt': files['gt'].name if 'gt' in files else ''})
        written['segments'] = str(write_segments_index(out_dir, rows))
        return written

    def problems(self) -> list:
        """What makes the node exit non-zero: files not written at shutdown."""
        return [f'{what} not written: {e}' for what, e in self.write_failures]

    def shutdown(self) -> dict:
        """Final checkpoint, buffer and trajectories, as configured; returns what was written.
        A file that cannot be written is logged with its traceback and listed in
        write_failures; the others are still written."""
        written = {}
        with self._step_lock:
            self._store_unscored()
        jobs = [('checkpoint', self.cfg.save_on_shutdown,
                 lambda: {'checkpoint': str(self.save_checkpoint(
                     self.checkpoint_path('final.pth')))}),
                ('buffer', bool(self.cfg.buffer_path),
                 lambda: {'buffer': str(self.buffer.save(self.cfg.buffer_path))}),
                ('trajectories', bool(self.cfg.trajectory_dir),
                 lambda: self.write_trajectories(self.cfg.trajectory_dir))]
        for what, wanted, write in jobs:
            if not wanted:
                continue
            try:
                written.update(write())
            except (OSError, ValueError, RuntimeError) as e:
                log.exception('%s not written at shutdown', what)
                self.write_failures.append((what, f'{type(e).__name__}: {e}'))
        self._close_logs()
        return written

    # --- logs ----------------------------------------------------------------------------
    def _open_logs(self):
        """The CSV (CSV_COLUMNS; an existing file with these columns is continued, one with
        others started afresh) and the TensorBoard writer, as configured."""
        if self.cfg.log_csv:
            path = Path(self.cfg.log_csv)
            path.parent.mkdir(parents=True, exist_ok=True)
            header = ','.join(CSV_COLUMNS)
            if path.is_file() and path.read_text().partition('\n')[0] != header:
                log.info('%s has other columns: starting a new log over it', path)
                path.unlink()
            new = not path.exists()
            self._csv = open(path, 'a', buffering=1)
            if new:
                self._csv.write(header + '\n')
        if self.cfg.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(self.cfg.tensorboard_dir)

    def _log_step(self, stats, elapsed, batch):
        step = self.core.step_count
        if self.steps_done % self.cfg.log_every:
            return
        n = 0 if batch is None or 'target' not in batch else int(batch['target'].shape[0])
        parts = [stats.terms.get(part, math.nan) for part in LOSS_PARTS]
        if self._csv:
            cells = [f'{v:.6g}' if math.isfinite(v) else '' for v in parts]
            self._csv.write(f'{step},{stats.loss:.6g},{stats.lr:.6g},{stats.grad_norm:.6g},{n},'
                            f'{len(self.buffer)},{self.samples_seen},{elapsed:.4f},'
                            f'{time.time():.3f},{",".join(cells)}\n')
        if self._tb and math.isfinite(stats.loss):
            self._tb.add_scalar('online/loss', stats.loss, step)
            self._tb.add_scalar('online/lr', stats.lr, step)
            self._tb.add_scalar('online/buffer_size', len(self.buffer), step)
            for part, value in zip(LOSS_PARTS, parts):
                if math.isfinite(value):
                    self._tb.add_scalar(f'online/loss_{part}', value, step)

    def _close_logs(self):
        if self._csv:
            self._csv.close()
            self._csv = None
        if self._tb:
            self._tb.close()
            self._tb = None


def _clone_tensors(value):
    """A copy of a nested dict/list payload whose tensors no longer share memory with the
    model or optimiser (on CPU, .cpu() returns the very tensor a later step changes)."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _clone_tensors(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clone_tensors(v) for v in value]
    return value


def _percentile(values, q) -> float:
    return float(np.percentile(values, q)) if values else math.nan


def build_online_trainer(online_cfg: OnlineConfig, train_cfg: TrainConfig,
                         model_cfg: ModelConfig, base_sample: SampleConfig,
                         buffer_cfg, trajectory_cfg,
                         filter_cfg: OnlineFilterConfig = None) -> OnlineTrainer:
    """Everything in its order: the initial checkpoint, the sample shape it implies, the
    replay buffer (resumed from buffer_path when it exists), the trajectory (over the inertial
    filter when filter_cfg finds its weights, filter/online.py), then the trainer.
    Nothing runs yet: the training thread is the caller's (ros/trainer_node.py)."""
    initial = initial_payload(online_cfg)
    payload = initial[0]
    if payload is not None:
        model_cfg = ModelConfig.from_dict(payload['config']['model'])
    sample_cfg = sample_config_for(model_cfg, base_sample, checkpoint_imu_window(payload))
    buffer = open_buffer(online_cfg.buffer_path, buffer_cfg, sample_cfg)   # logs a resume
    return OnlineTrainer(online_cfg, train_cfg, model_cfg, buffer=buffer, sample_cfg=sample_cfg,
                         trajectory=build_trajectory(trajectory_cfg, filter_cfg, *initial),
                         initial=initial)


def build_trajectory(trajectory_cfg, filter_cfg=None, payload=None, source=''):
    """The online trajectory; over the inertial filter (its pose source, and its bridge unless
    trajectory.bridge is off) when filter_cfg finds the filter's weights (logged either way)."""
    filt, why = build_filter_source(filter_cfg or OnlineFilterConfig(mode='off'), payload,
                                    source, None)
    log.info('%s', why)
    if filt is None:
        return OnlineTrajectory(trajectory_cfg)
    if trajectory_cfg.bridge != 'off':
        filt.fallback = ConstantVelocityBridge(trajectory_cfg.bridge_history,
                                               trajectory_cfg.bridge_variance_scale)
    return OnlineTrajectory(trajectory_cfg, bridge=filt if filt.fallback else None, source=filt)
