"""Features of frozen encoders, kept per sample so that repeated training steps skip them.

A frozen branch has fixed weights and runs in eval mode (FusionOdometryNet.set_frozen), so its
output for a sample is a function of that sample's inputs alone. Online, a replay buffer draws
the same samples again and again: with the camera and LiDAR encoders frozen, a step costs the
fusion, the heads and the losses instead of two full encoder passes per sample. Each batch row
is keyed by a hash of exactly the inputs its branch reads, so a changed, augmented or unseen
input simply misses. Call `clear()` whenever the frozen weights could change (the model does
on set_frozen and load_state_dict). The online trainer also hands over the features its
prediction of a new sample computed (`defer`: hashed and stored by the next training lookup, so
the prediction path pays no hashing), so a sample's first step skips the encoders too; those
come from the inference copy with its per-scan cache, equal to the plain forward within 1e-5
(test/test_inference_cache.py). Thread-safe: prediction stores while a step reads.
"""
from collections import deque, OrderedDict
import hashlib
import threading
import weakref

import numpy as np
import torch

# The batch's large inputs are digested once per tensor row however many keys read them (the
# camera's, the LiDAR's and the solved geometric term's): digests are remembered per tensor
# object and in-place version, and forgotten with the tensor.
LARGE = ('image', 'points', 'points_mask')
_memo = {}
_memo_lock = threading.Lock()


def _array_digest(a: np.ndarray) -> bytes:
    h = hashlib.blake2b(str((a.dtype.str, a.shape)).encode(), digest_size=16)
    h.update(memoryview(np.ascontiguousarray(a)).cast('B'))
    return h.digest()


def tensor_digest(t) -> bytes:
    return _array_digest(t.detach().cpu().numpy())


# The replay buffer's arrays are private read-only copies that never change (sync/
# replay_buffer.py), and the buffer draws each of them into many batches: their digests are
# remembered while they live, and a batch stacked from them takes its rows' digests from there
# instead of hashing its large inputs again at every step (~9 ms of a ~40 ms head step).
_frozen = {}


def frozen_array_digest(a) -> bytes:
    """The digest of a read-only array that owns its data (remembered while it lives), or None
    for any other array, whose contents could still change."""
    if not isinstance(a, np.ndarray) or a.flags.writeable or not a.flags.owndata:
        return None
    k = id(a)
    with _memo_lock:
        entry = _frozen.get(k)
    if entry is not None and entry[0]() is a:
        return entry[1]
    digest = _array_digest(a)
    with _memo_lock:
        _frozen[k] = (weakref.ref(a, lambda _, k=k: _frozen.pop(k, None)), digest)
    return digest


def adopt_row_digests(batch: dict, samples) -> None:
    """Give the batch's large input tensors, stacked from `samples` in order (collate_samples
    of samples without None), the frozen arrays' digests as their rows' digests."""
    for name in LARGE:
        t = batch.get(name)
        if not isinstance(t, torch.Tensor) or t.device.type != 'cpu' or \
                len(samples) != t.shape[0]:
            continue
        digests = [frozen_array_digest(s.get(name)) for s in samples]
        if any(d is None for d in digests) or any(
                tuple(s[name].shape) != tuple(t.shape[1:]) or s[name].dtype != t.numpy().dtype
                for s in samples):
            continue
        k = id(t)
        with _memo_lock:
            _memo[k] = (weakref.ref(t, lambda _, k=k: _memo.pop(k, None)), t._version,
                        dict(enumerate(digests)))


def _row_digest(t, i: int) -> bytes:
    try:
        version = t._version
    except RuntimeError:           # an inference tensor keeps no version: no memo
        return tensor_digest(t[i])
    k = id(t)
    with _memo_lock:
        entry = _memo.get(k)
        if entry is None or entry[0]() is not t or entry[1] != version:
            entry = _memo[k] = (weakref.ref(t, lambda _, k=k: _memo.pop(k, None)), version, {})
        digest = entry[2].get(i)
    if digest is None:
        digest = entry[2][i] = tensor_digest(t[i])
    return digest


def row_key(kind: str, batch: dict, names, i: int) -> bytes:
    """Digest of row i of the batch entries `names` (what `kind` reads from that row)."""
    h = hashlib.blake2b(kind.encode(), digest_size=16)
    for name in names:
        h.update(_row_digest(batch[name], i) if name in LARGE else tensor_digest(batch[name][i]))
    return h.digest()


class FeatureCache:
    """LRU of per-row encoder features, keyed by row_key."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f'FeatureCache capacity must be >= 1, got {capacity}')
        self.capacity = capacity
        self.entries = OrderedDict()
        self.hits = self.misses = self.stored = 0
        self._lock = threading.Lock()
        # Hand-overs waiting for the training side (a bounded queue: the oldest are dropped
        # when training does not run, and those samples' first steps simply miss).
        self._pending = deque(maxlen=64)

    def __deepcopy__(self, memo):
        """A copy of the model (e.g. the online inference copy) starts with its own, empty,
        cache."""
        return FeatureCache(self.capacity)

    def __reduce__(self):
        return FeatureCache, (self.capacity,)

    def clear(self) -> None:
        """Forget every entry, and the hand-overs still queued (features of the old weights
        would come back at the next rows() call)."""
        with self._lock:
            self.entries.clear()
            self._pending.clear()

    def defer(self, store) -> None:
        """Queue store() (a callable that calls `store`) for the next `rows` call."""
        self._pending.append(store)

    def _drain(self) -> None:
        while self._pending:
            try:
                store = self._pending.popleft()
            except IndexError:
                return
            store()

    def store(self, key: bytes, features) -> None:
        """Keep one row's features (D,), computed elsewhere from the inputs `key` names."""
        with self._lock:
            self.entries[key] = features.detach().clone()
            self.entries.move_to_end(key)
            self.stored += 1
            self._trim()

    def _trim(self) -> None:
        while len(self.entries) > self.capacity:
            self.entries.popitem(last=False)

    def rows(self, keys, compute):
        """Features (B, D) of a branch: keys, each row's row_key; compute(index) -> features
        of the rows in `index` (a LongTensor), run once for all misses."""
        self._drain()
        batch_size = len(keys)
        with self._lock:
            found = {i: self.entries[k] for i, k in enumerate(keys) if k in self.entries}
            for i in found:
                self.entries.move_to_end(keys[i])
        missing = [i for i in range(batch_size) if i not in found]
        self.hits += len(found)
        self.misses += len(missing)
        if missing:
            fresh = compute(torch.tensor(missing, dtype=torch.long)).detach()
            with self._lock:
                for i, row in zip(missing, fresh):
                    found[i] = self.entries[keys[i]] = row.clone()
                self._trim()
        return torch.stack([found[i] for i in range(batch_size)])
