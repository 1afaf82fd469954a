"""Features of frozen encoders, kept per sample so that repeated training steps skip them.

A frozen branch has fixed weights and runs in eval mode (FusionOdometryNet.set_frozen), so its
output for a sample is a function of that sample's inputs alone. Online, a replay buffer draws
the same samples again and again: with the camera and LiDAR encoders frozen, a step costs the
fusion, the heads and the losses instead of two full encoder passes per sample. Each batch row
is keyed by a hash of exactly the inputs its branch reads, so a changed, augmented or unseen
input simply misses. Call `clear()` whenever the frozen weights could change (the model does
on set_frozen and load_state_dict). The online trainer also stores the features its prediction
of a new sample computed (`store`), so a sample's first step skips the encoders too; those
come from the inference copy with its per-scan cache, equal to the plain forward within 1e-5
(test/test_inference_cache.py). Thread-safe: prediction stores while a step reads.
"""
from collections import OrderedDict
import hashlib
import threading

import torch


def row_key(branch: str, tensors) -> bytes:
    """Digest of one batch row's inputs of a branch (tensors: that row's slices)."""
    h = hashlib.blake2b(branch.encode(), digest_size=16)
    for t in tensors:
        t = t.detach()
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(memoryview(t.contiguous().cpu().numpy()).cast('B'))
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

    def __deepcopy__(self, memo):
        """A copy of the model (e.g. the online inference copy) starts with its own, empty,
        cache."""
        return FeatureCache(self.capacity)

    def __reduce__(self):
        return FeatureCache, (self.capacity,)

    def clear(self) -> None:
        with self._lock:
            self.entries.clear()

    def store(self, branch: str, key_tensors, features) -> None:
        """Keep one row's features (D,), computed elsewhere from exactly these inputs."""
        key = row_key(branch, key_tensors)
        with self._lock:
            self.entries[key] = features.detach().clone()
            self.entries.move_to_end(key)
            self.stored += 1
            self._trim()

    def _trim(self) -> None:
        while len(self.entries) > self.capacity:
            self.entries.popitem(last=False)

    def rows(self, branch: str, batch_size: int, key_rows, compute):
        """Features (B, D) of a branch: key_rows(i) -> the tensors row i's output depends on;
        compute(index) -> features of the rows in `index` (a LongTensor), run once for all
        misses."""
        keys = [row_key(branch, key_rows(i)) for i in range(batch_size)]
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
