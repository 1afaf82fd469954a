"""Cost of handing one DESIGN §5 sample to the learner process, three ways (issue 16).

    python bench/learner_transfer.py [--samples 200] [--image_size W H] [--max_points N]

ring: the arrays copied into a shared-memory slot (training/learner.py SampleRing), a small
message on a queue. torch_queue: the arrays as torch tensors on a torch.multiprocessing queue
(each put moves every tensor into a new shared-memory segment; the receiver maps them). pickle:
the numpy arrays on a plain multiprocessing queue (pickled, through a pipe). The sample has the
shape SampleConfig gives (image 2x3xHxW uint8 after resize, points 2xNx4 float32, ...).
Reported: the sender's CPU per sample (process time: the send call and the queue's feeder
thread, the cost the predictor pays) and the wall time per sample until the receiver has copied
all of them (its throughput). Both processes run at once, so on 2 cores they compete.
"""
import argparse
from pathlib import Path
import sys
import time

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.multiprocessing as tmp  # noqa: E402

from mm_fusion_ros.config import SampleConfig  # noqa: E402
from mm_fusion_ros.sync.replay_buffer import (  # noqa: E402
    ARRAY_KEYS,
    EXPECTED_DTYPES,
    expected_shapes,
)
from mm_fusion_ros.training.learner import SampleRing  # noqa: E402


def make_sample(cfg: SampleConfig) -> dict:
    rng = np.random.default_rng(0)
    shapes = expected_shapes(cfg)
    out = {k: rng.integers(0, 255, shapes[k]).astype(EXPECTED_DTYPES[k]) for k in ARRAY_KEYS}
    out['meta'] = {'frame': 0, 'stamp_prev_ns': 0, 'stamp_cur_ns': 1}
    return out


def receiver(kind, inbox, done, ring):
    kept = 0
    done.put('ready')
    while True:
        msg = inbox.get()
        if msg is None:
            done.put(kept)
            return
        if kind == 'ring':
            _, slot, other, meta = msg
            sample = ring.read(slot, other, meta)
            copies = {k: np.array(v) for k, v in sample.items() if k != 'meta'}
            ring.release(slot)
        elif kind == 'torch_queue':
            copies = {k: np.array(v.numpy()) for k, v in msg.items() if k != 'meta'}
        else:
            copies = {k: np.array(v) for k, v in msg.items() if k != 'meta'}
        kept += len(copies) > 0


def run(kind, sample, cfg, n):
    ctx = tmp.get_context('spawn')
    ring = SampleRing(ctx, cfg) if kind == 'ring' else None
    inbox, done = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=receiver, args=(kind, inbox, done, ring))
    proc.start()
    done.get()        # the receiver has started (spawn, imports)
    tensors = {k: torch.from_numpy(v) for k, v in sample.items() if k != 'meta'}
    missed = 0
    c0, t0 = time.process_time(), time.perf_counter()
    for _ in range(n):
        if kind == 'ring':
            written = ring.write(sample)
            if written is None:
                missed += 1
                time.sleep(0.001)
                continue
            inbox.put(('sample', *written, dict(sample['meta'])))
        elif kind == 'torch_queue':   # a fresh tensor per sample, as each sample is new
            inbox.put({**{k: v.clone() for k, v in tensors.items()}, 'meta': sample['meta']})
        else:
            inbox.put(sample)
        time.sleep(0.002)   # samples arrive one at a time, as from the synchronizer
    inbox.put(None)
    kept = done.get()
    wall = time.perf_counter() - t0 - 0.002 * n
    cpu = time.process_time() - c0
    proc.join()
    return {'kind': kind, 'sender_cpu_ms': 1e3 * cpu / n, 'wall_ms': 1e3 * wall / n,
            'kept': kept, 'missed': missed}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--samples', type=int, default=200)
    p.add_argument('--image_size', type=int, nargs=2, default=(320, 96), metavar=('W', 'H'))
    p.add_argument('--max_points', type=int, default=16384)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    cfg = SampleConfig(image_width=args.image_size[0], image_height=args.image_size[1],
                       max_points=args.max_points)
    sample = make_sample(cfg)
    size = sum(v.nbytes for k, v in sample.items() if k != 'meta')
    shapes = ', '.join(f'{k} {sample[k].shape}' for k in ARRAY_KEYS[:3])
    print(f'sample: {size / 1e6:.2f} MB ({shapes})')
    print(f'{"kind":<12} {"sender CPU ms":>14} {"wall ms":>8} {"kept":>5} {"missed":>6}')
    for kind in ('ring', 'torch_queue', 'pickle'):
        r = run(kind, sample, cfg, args.samples)
        print(f'{r["kind"]:<12} {r["sender_cpu_ms"]:>14.3f} {r["wall_ms"]:>8.3f} {r["kept"]:>5} '
              f'{r["missed"]:>6}')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
