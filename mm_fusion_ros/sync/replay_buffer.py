"""Replay buffer of DESIGN §5 samples for online training (pure numpy, thread-safe).

Bounded by sample count and by bytes (the sum of a sample's numpy nbytes). Policies: 'fifo'
evicts the oldest; 'reservoir' keeps a uniform random subset of every sample ever offered
(Algorithm R, seeded). Mini-batches mix the newest samples with older ones. Stored arrays are
private read-only copies, so a trainer thread can use what sample() returns while the
synchronizer thread keeps adding. save()/load() persist the buffer in one .npz file (written
atomically, fileio.atomic_open) so a restarted node resumes with its memory. A format-1 file
(from before samples carried their calibration) loads with the calibration marked unknown.
"""
import json
import logging
from pathlib import Path
import threading
import zipfile

import numpy as np

from mm_fusion_ros.config import SampleConfig
from mm_fusion_ros.fileio import atomic_open
from mm_fusion_ros.kitti.sample import (
    CALIB_KEYS,
    SAMPLE_KEYS,
    TENSOR_KEYS,
    unknown_calibration,
)
from mm_fusion_ros.sync.config import BufferConfig

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
ARRAY_KEYS = TENSOR_KEYS
# Format 1 stored these keys; format 2 added CALIB_KEYS.
FORMAT_1_KEYS = tuple(k for k in ARRAY_KEYS if k not in CALIB_KEYS)
EXPECTED_DTYPES = {'image': 'uint8', 'points': 'float32', 'points_mask': 'bool', 'imu': 'float32',
                   'dt': 'float32', 'target': 'float32', 'target_valid': 'bool',
                   'modality_mask': 'bool', 'imu_span': 'float32', 'intrinsics': 'float32',
                   't_cam_lidar': 'float32', 't_imu_lidar': 'float32', 'calib_valid': 'bool'}
_META_KEY = '__meta__'


def sample_nbytes(sample: dict) -> int:
    """Bytes of a sample's numpy arrays (meta not counted)."""
    return int(sum(np.asarray(sample[k]).nbytes for k in ARRAY_KEYS))


def expected_shapes(cfg: SampleConfig) -> dict:
    """Per-sample shapes fixed by a SampleConfig (points only when max_points > 0)."""
    shapes = {'image': (2, 3, cfg.image_height, cfg.image_width), 'imu': (cfg.imu_steps, 6),
              'dt': (), 'target': (6,), 'target_valid': (), 'modality_mask': (3,),
              'imu_span': (), 'intrinsics': (3, 3), 't_cam_lidar': (4, 4),
              't_imu_lidar': (4, 4), 'calib_valid': (3,)}
    if cfg.max_points > 0:
        shapes.update(points=(2, cfg.max_points, 4), points_mask=(2, cfg.max_points))
    return shapes


class ReplayBuffer:
    """Bounded store of samples; sample() returns lists of sample dicts for collate_samples."""

    def __init__(self, cfg: BufferConfig = None):
        self.cfg = cfg or BufferConfig()
        self._lock = threading.Lock()
        self._rng = np.random.default_rng(self.cfg.seed)
        self._samples = []   # slots; order is insertion order for fifo, arbitrary for reservoir
        self._ids = []       # insertion number of each slot (newest = largest)
        self._sizes = []
        self._bytes = 0
        self._offered = 0    # samples ever passed to add()
        self._evicted = 0
        self._discarded = 0  # reservoir: offered but not kept

    def __len__(self):
        with self._lock:
            return len(self._samples)

    @property
    def nbytes(self) -> int:
        with self._lock:
            return self._bytes

    def stats(self) -> dict:
        with self._lock:
            return {'size': len(self._samples), 'bytes': self._bytes,
                    'total_added': self._offered, 'evicted': self._evicted,
                    'discarded': self._discarded, 'capacity': self.cfg.capacity,
                    'max_bytes': self.cfg.max_bytes, 'policy': self.cfg.policy}

    def add(self, sample: dict) -> bool:
        """Store a private read-only copy of the sample; False if the reservoir passed it over."""
        return self.add_private_copy(self.private_copy(sample))

    def add_private_copy(self, item: dict) -> bool:
        """add() for a copy that private_copy made (stored as it is, not copied again)."""
        size = sample_nbytes(item)
        with self._lock:
            self._offered += 1
            if self.cfg.policy == 'fifo':
                self._add_fifo(item, size)
                return True
            return self._add_reservoir(item, size)

    def private_copy(self, sample: dict) -> dict:
        """The read-only copy add() stores, after the checks add() makes (ValueError): for a
        sample that waits before it is added and whose arrays the caller does not own."""
        missing = [k for k in SAMPLE_KEYS if k not in sample]
        if missing:
            raise ValueError(f'ReplayBuffer.add: sample lacks keys {missing}')
        item = _frozen_copy(sample)
        size = sample_nbytes(item)
        if size > self.cfg.max_bytes:
            raise ValueError(f'ReplayBuffer.add: one sample has {size} bytes, more than '
                             f'max_bytes={self.cfg.max_bytes}')
        return item

    def sample(self, batch_size: int, rng: np.random.Generator) -> list:
        """batch_size samples: recent_fraction of them from the newest recent_window, the rest
        uniform over the whole buffer; without replacement while the buffer is large enough.

        The arrays are the buffer's read-only arrays (never modified afterwards); meta is copied.
        """
        if batch_size < 1:
            raise ValueError(f'batch_size must be >= 1, got {batch_size}')
        with self._lock:
            n = len(self._samples)
            if n == 0:
                raise ValueError('ReplayBuffer.sample: the buffer is empty')
            idx = self._draw(batch_size, rng)
            return [_shallow_copy(self._samples[i]) for i in idx]

    def newest(self, count: int = 1) -> list:
        """The newest `count` samples, oldest first."""
        with self._lock:
            order = np.argsort(self._ids)[-count:] if count > 0 else []
            return [_shallow_copy(self._samples[i]) for i in order]

    def clear(self) -> None:
        with self._lock:
            self._samples, self._ids, self._sizes = [], [], []
            self._bytes = 0

    # ------------------------------------------------------------- persistence

    def save(self, path) -> Path:
        """Write the buffer to one .npz file atomically (fileio.atomic_open); returns path."""
        path = Path(path)
        with self._lock:
            samples = list(self._samples)
            order = np.argsort(self._ids, kind='stable')
            samples = [samples[i] for i in order]
            meta = {'format_version': FORMAT_VERSION, 'count': len(samples),
                    'keys': list(ARRAY_KEYS), 'config': self.cfg.to_dict(),
                    'offered': self._offered, 'evicted': self._evicted,
                    'discarded': self._discarded, 'rng_state': self._rng.bit_generator.state,
                    'meta': [s['meta'] for s in samples], 'layout': {}}
        arrays = {}
        for key in ARRAY_KEYS:
            values = [s[key] for s in samples]
            shapes = {v.shape for v in values}
            if len(shapes) <= 1:
                meta['layout'][key] = 'stacked'
                dtype = values[0].dtype if values else np.dtype(EXPECTED_DTYPES[key])
                arrays[key] = np.stack(values) if values else np.zeros((0,), dtype=dtype)
            else:  # e.g. max_points=0: scans of different sizes
                meta['layout'][key] = 'flat'
                arrays[key] = np.concatenate([v.ravel() for v in values])
                arrays[key + '__shapes'] = np.array([v.shape for v in values], dtype=np.int64)
        try:
            text = json.dumps(meta, default=_json_value)
        except TypeError as e:
            raise ValueError(f'{path}: sample meta is not JSON-serialisable ({e})') from e
        arrays[_META_KEY] = np.frombuffer(text.encode(), dtype=np.uint8)
        with atomic_open(path, 'wb') as f:
            np.savez(f, **arrays)
        log.info('replay buffer saved: %d samples, %d bytes -> %s', len(samples),
                 sum(sample_nbytes(s) for s in samples), path)
        return path

    @classmethod
    def load(cls, path, cfg: BufferConfig = None, sample_cfg: SampleConfig = None):
        """A buffer restored from save(); cfg defaults to the saved one. With sample_cfg, the
        stored shapes must match it. Errors name the file and the offending key."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f'{path}: replay buffer file not found')
        try:
            with np.load(path, allow_pickle=False) as npz:
                data = {k: npz[k] for k in npz.files}
        except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
            raise ValueError(f'{path}: not a readable replay buffer .npz ({e})') from e
        try:
            meta = _read_meta(path, data)
            samples = _unpack_samples(path, data, meta)
        except (AttributeError, TypeError, KeyError, IndexError) as e:   # a foreign .npz
            raise ValueError(f'{path}: not a replay buffer written by ReplayBuffer.save '
                             f'({type(e).__name__}: {e})') from e
        if sample_cfg is not None:
            _check_shapes(path, samples, sample_cfg)
        try:
            saved_cfg = BufferConfig.from_dict(meta['config'])
            buf = cls(cfg or saved_cfg)
            buf._offered = int(meta['offered'])
            buf._evicted = int(meta['evicted'])
            buf._discarded = int(meta['discarded'])
            if buf.cfg.policy == saved_cfg.policy == 'reservoir':
                buf._rng.bit_generator.state = meta['rng_state']
        except (ValueError, TypeError, KeyError) as e:
            raise ValueError(f'{path}: bad buffer config or counters in meta ({e})') from e
        kept = _newest_that_fit(samples, buf.cfg)
        if len(kept) < len(samples):
            log.warning('%s: %d samples do not fit capacity=%d / max_bytes=%d; kept the newest '
                        '%d', path, len(samples), buf.cfg.capacity, buf.cfg.max_bytes, len(kept))
            buf._evicted += len(samples) - len(kept)
        for i, s in enumerate(kept):
            buf._append(s, sample_nbytes(s), i)
        return buf

    # ---------------------------------------------------------------- internal

    def _append(self, item, size, item_id):
        self._samples.append(item)
        self._ids.append(item_id)
        self._sizes.append(size)
        self._bytes += size

    def _remove(self, i):
        self._bytes -= self._sizes[i]
        del self._samples[i], self._ids[i], self._sizes[i]
        self._evicted += 1

    def _add_fifo(self, item, size):
        while self._samples and (len(self._samples) >= self.cfg.capacity
                                 or self._bytes + size > self.cfg.max_bytes):
            self._remove(0)
        self._append(item, size, self._offered)

    def _add_reservoir(self, item, size) -> bool:
        """Algorithm R: the n-th offered sample replaces a random slot with probability k/n."""
        n = len(self._samples)
        if n < self.cfg.capacity and self._bytes + size <= self.cfg.max_bytes:
            self._append(item, size, self._offered)
            return True
        j = int(self._rng.integers(self._offered))
        if j >= n:
            self._discarded += 1
            return False
        self._bytes += size - self._sizes[j]
        self._samples[j], self._ids[j], self._sizes[j] = item, self._offered, size
        self._evicted += 1
        # A larger newcomer may overflow the byte bound: evict other random slots.
        while self._bytes > self.cfg.max_bytes:
            others = [i for i in range(len(self._samples)) if i != j]
            victim = others[int(self._rng.integers(len(others)))]
            self._remove(victim)
            j -= int(victim < j)
        return True

    def _draw(self, batch_size, rng):
        n = len(self._samples)
        recent = np.argsort(self._ids)[-min(self.cfg.recent_window, n):]
        n_recent = int(round(batch_size * self.cfg.recent_fraction))
        picked = list(rng.choice(recent, size=n_recent, replace=n_recent > len(recent))) \
            if n_recent else []
        rest = batch_size - n_recent
        if rest:
            left = np.setdiff1d(np.arange(n), picked)
            pool, replace = (left, False) if len(left) >= rest else (np.arange(n), True)
            picked += list(rng.choice(pool, size=rest, replace=replace))
        return [int(i) for i in picked]


def _frozen_copy(sample: dict) -> dict:
    out = {}
    for key in ARRAY_KEYS:
        arr = np.array(sample[key], copy=True)
        arr.flags.writeable = False
        out[key] = arr
    out['meta'] = dict(sample['meta'])
    return out


def _shallow_copy(item: dict) -> dict:
    out = dict(item)
    out['meta'] = dict(item['meta'])
    return out


def _json_value(value):
    """numpy scalars/arrays in meta -> plain Python for JSON."""
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    raise TypeError(f'{type(value).__name__} in sample meta')


def _read_meta(path, data) -> dict:
    if _META_KEY not in data:
        raise ValueError(f'{path}: no {_META_KEY!r} entry; not written by ReplayBuffer.save')
    try:
        meta = json.loads(data[_META_KEY].tobytes().decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f'{path}: {_META_KEY!r} is not valid JSON') from e
    version = meta.get('format_version')
    if version not in (1, FORMAT_VERSION):
        raise ValueError(f'{path}: format_version {version!r}, expected 1 or '
                         f'{FORMAT_VERSION}')
    need = ('count', 'keys', 'config', 'offered', 'evicted', 'discarded', 'rng_state', 'meta',
            'layout')
    missing = [k for k in need if k not in meta]
    if missing:
        raise ValueError(f'{path}: meta lacks keys {missing}')
    keys = FORMAT_1_KEYS if version == 1 else ARRAY_KEYS
    if list(meta['keys']) != list(keys):
        raise ValueError(f'{path}: sample keys {meta["keys"]} differ from {list(keys)} (format '
                         f'{version})')
    if len(meta['meta']) != meta['count']:
        raise ValueError(f'{path}: {len(meta["meta"])} meta entries for {meta["count"]} samples')
    if not all(isinstance(m, dict) for m in meta['meta']):
        raise ValueError(f'{path}: the meta entry of a sample is not a JSON object')
    return meta


def _unpack_samples(path, data, meta) -> list:
    n = int(meta['count'])
    columns = {}
    stored = meta['keys']
    if len(stored) < len(ARRAY_KEYS):
        log.warning('%s: format-1 replay buffer; its %d samples load with the calibration '
                    'unknown (no self-supervised photometric or gyro term)', path, n)
        for key, value in unknown_calibration().items():
            columns[key] = [value] * n
    for key in stored:
        if key not in data:
            raise ValueError(f'{path}: array {key!r} missing')
        arr = data[key]
        if arr.dtype != np.dtype(EXPECTED_DTYPES[key]):
            raise ValueError(f'{path}: array {key!r} has dtype {arr.dtype}, expected '
                             f'{EXPECTED_DTYPES[key]}')
        if meta['layout'].get(key) == 'flat':
            columns[key] = _split_flat(path, key, arr, data.get(key + '__shapes'), n)
        elif n and len(arr) != n:
            raise ValueError(f'{path}: array {key!r} holds {len(arr)} samples, meta says {n}')
        else:
            columns[key] = list(arr[:n])
    samples = []
    for i in range(n):
        item = {k: np.asarray(columns[k][i]) for k in ARRAY_KEYS}
        item['meta'] = dict(meta['meta'][i])
        samples.append(_frozen_copy(item))
    return samples


def _split_flat(path, key, flat, shapes, n) -> list:
    if shapes is None or shapes.ndim != 2 or len(shapes) != n:
        raise ValueError(f'{path}: array {key + "__shapes"!r} missing or not one row per sample')
    sizes = np.prod(shapes, axis=1)
    if sizes.sum() != flat.size:
        raise ValueError(f'{path}: array {key!r} has {flat.size} values, shapes need '
                         f'{int(sizes.sum())}')
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    return [flat[bounds[i]:bounds[i + 1]].reshape(shapes[i]) for i in range(n)]


def _check_shapes(path, samples, sample_cfg):
    want = expected_shapes(sample_cfg)
    for i, s in enumerate(samples):
        for key, shape in want.items():
            if s[key].shape != shape:
                raise ValueError(f'{path}: sample {i} {key!r} has shape {s[key].shape}, the '
                                 f'sample config needs {shape}')


def _newest_that_fit(samples, cfg) -> list:
    kept, total = [], 0
    for s in reversed(samples):
        size = sample_nbytes(s)
        if len(kept) >= cfg.capacity or total + size > cfg.max_bytes:
            break
        kept.append(s)
        total += size
    return kept[::-1]


def open_buffer(path, buffer_cfg: BufferConfig, sample_cfg: SampleConfig) -> ReplayBuffer:
    """The replay buffer saved at `path` when that file exists (its samples must have the
    shapes of sample_cfg, else ValueError naming the file), else an empty one."""
    if path and Path(path).is_file():
        buffer = ReplayBuffer.load(path, buffer_cfg, sample_cfg=sample_cfg)
        log.info('resumed %d samples from %s', len(buffer), path)
        return buffer
    return ReplayBuffer(buffer_cfg)
