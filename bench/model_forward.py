"""CPU time of the online prediction path's model forward at full KITTI size, per variant.

    python bench/model_forward.py [--reps 5] [--samples 8] [--variants base fold ...]
                                  [--threads 1] [--detail] [--profile base]

config/finetune.yaml's model (visual_encoder flow, 320x96 images, 16384 points per scan, one torch
thread), eval mode, torch.inference_mode and an encoders.ScanCache, as
training/online.py's OnlineTrainer.on_sample calls it: consecutive samples of one synthetic drive
(~120k-point scans subsampled to 16384 by kitti.sample.build_sample, 1241x376 frames resized to
320x96), so every sample after the first reuses the previous one's second scan and frame.

Each repetition runs the drive once per variant, each variant with a fresh ScanCache of its
own, interleaved per sample (every variant forwards sample i before any forwards sample i+1,
the order rotated): the first sample (a cache miss) is not timed, the others are, with
time.thread_time (CPU time of this thread: other jobs on a shared machine do not count, though
they still slow it through shared caches; torch runs inline with one thread). Stages are this
thread's CPU time around the encoders (forward hooks) and module functions (wrapped in place),
nested stages subtracted, as bench/profile_stages.py does; modules replaced by scripted or
compiled ones sit behind a plain wrapper, so their stage hooks still work.

Outputs of every variant are compared with the base model's (max abs difference of mean and
logvar over all samples). The paired column is, per repetition, base minus the variant (same
repetition, so load changes on a shared machine mostly cancel).

Variants (issue 16 item 2). ground_view and local_correlation are run in their form before
issue 16 item 2 (main at 5f44769, copied below) except in the *_fns variants, which use the
package's current ones:
  base      eval(), torch.inference_mode(), ScanCache: the online path as it was
  fold      + model/inference.py's inference_copy (Conv+BatchNorm folded)
  base_fns  base with the current ground_view / local_correlation
  fold_fns  both
  cl        channels_last weights of the conv stacks (deep copy)
  fold_cl   fold + channels_last
  jit       fold, conv stacks torch.jit.trace + freeze + optimize_for_inference (mkldnn)
  jit_nomkl fold, conv stacks torch.jit.trace + freeze
  compile   fold, conv stacks torch.compile (inductor; the first drive pays the compilation)
  compile_fns  fold_fns, parameter-free tensor functions (ground_view, peak_soft_argmax,
            box_mean, planar_motion, lidar_depth_image, local_correlation, bev_grid,
            soft_argmax) through torch.compile
"""
import argparse
from collections import defaultdict
import copy
import functools
import statistics
import sys
import time

import numpy as np
import torch

from mm_fusion_ros.config import SampleConfig
from mm_fusion_ros.geometry import make_pose, rpy_to_rot
from mm_fusion_ros.kitti.dataset import collate_samples
from mm_fusion_ros.kitti.sample import build_sample
from mm_fusion_ros.model import camera as camera_mod
from mm_fusion_ros.model import encoders as enc_mod
from mm_fusion_ros.model import net as net_mod
from mm_fusion_ros.model.config import ModelConfig
from mm_fusion_ros.model.encoders import ScanCache
from mm_fusion_ros.model.net import build_model

KITTI_HW = (376, 1241)
FRAMES_HZ = 10.0


# --- data ----------------------------------------------------------------------------------
def world_points(rng, n=120_000):
    """A static scene around a straight road: ground ring-ish points, walls, posts."""
    ground = np.column_stack([rng.uniform(-40, 60, n // 3), rng.uniform(-30, 30, n // 3),
                              np.full(n // 3, -1.73) + rng.normal(0, 0.02, n // 3)])
    walls = np.column_stack([rng.uniform(-40, 60, n // 3),
                             np.where(rng.random(n // 3) < 0.5, -8.0, 9.0) +
                             rng.normal(0, 0.1, n // 3), rng.uniform(-1.7, 3.0, n // 3)])
    m = n - 2 * (n // 3)
    centers = rng.uniform(-30, 50, (m // 50, 2))
    posts = np.concatenate([np.column_stack([c + rng.normal(0, 0.3, (50, 2)),
                                             rng.uniform(-1.7, 2.5, 50)]) for c in centers])
    xyz = np.concatenate([ground, walls, posts[:m]])
    return np.column_stack([xyz, rng.uniform(0, 1, len(xyz))]).astype(np.float32)


def drive_samples(count, cfg: SampleConfig, seed=0):
    """count consecutive samples (frame k-1, k) of a drive at ~10 m/s with a slight turn."""
    rng = np.random.default_rng(seed)
    world = world_points(rng)
    y, x = np.mgrid[0:KITTI_HW[0], 0:KITTI_HW[1]]
    texture = (127 + 60 * np.sin(x / 9.1) * np.cos(y / 6.7))[..., None] + \
        rng.normal(0, 30, (*KITTI_HW, 3))
    scans, images, poses = [], [], []
    for k in range(count + 1):
        pose = make_pose(rpy_to_rot(0.0, 0.0, 0.01 * k), [1.0 * k, 0.02 * k, 0.0])
        inv = np.linalg.inv(pose)
        xyz = world[:, :3] @ inv[:3, :3].T + inv[:3, 3]
        scans.append(np.column_stack([xyz, world[:, 3]]).astype(np.float32))
        images.append(np.clip(np.roll(texture, (k, 7 * k), axis=(0, 1)), 0, 255)
                      .astype(np.uint8))
        poses.append(pose)
    return [build_sample(cfg, stamps=(k / FRAMES_HZ - 0.1, k / FRAMES_HZ),
                         images=images[k - 1:k + 1], scans=scans[k - 1:k + 1],
                         poses=poses[k - 1:k + 1], sequence='bench', frame=k)
            for k in range(1, count + 1)]


def batches(samples):
    out = []
    for s in samples:
        b = collate_samples([s])
        out.append({k: v for k, v in b.items() if isinstance(v, torch.Tensor)})
    return out


# --- stage timer ---------------------------------------------------------------------------
class Stages:
    """Exclusive thread CPU time per named stage; nested stages subtracted."""

    def __init__(self):
        self.stack = []
        self.time = defaultdict(float)
        self.enabled = True

    def start(self, name):
        if self.enabled:
            self.stack.append([name, time.thread_time(), 0.0])

    def stop(self, *_):
        if not self.enabled:
            return
        name, t0, nested = self.stack.pop()
        dt = time.thread_time() - t0
        self.time[name] += dt - nested
        if self.stack:
            self.stack[-1][2] += dt

    def hook(self, module, name):
        a = module.register_forward_pre_hook(lambda *_: self.start(name))
        b = module.register_forward_hook(self.stop)
        return [a, b]

    def reset(self):
        self.time.clear()


STAGES = Stages()
FUNCTION_STAGES = ((enc_mod, 'bev_grid', 'BEV grids'),
                   (net_mod, 'lidar_depth_image', 'LiDAR depth image'))
# --detail: the functions inside the encoders' "rest" stages.
DETAIL_STAGES = tuple((camera_mod, f, f'fn camera.{f}') for f in (
    'ground_view', 'shift_correlation', 'peak_soft_argmax', 'high_pass_gray', 'box_mean',
    'ground_homography', 'planar_motion')) + tuple((enc_mod, f, f'fn encoders.{f}') for f in (
        'local_correlation', 'correlate_spectra', 'spectrum', 'soft_argmax'))


DETAILED = False


def wrap_functions(detail=False):
    global DETAILED
    DETAILED = detail
    for mod, attr, name in FUNCTION_STAGES + (DETAIL_STAGES if detail else ()):
        if (mod, attr) in CURRENT_FNS:      # wrapped by use_functions
            continue
        fn = getattr(mod, attr)

        @functools.wraps(fn)
        def wrapped(*a, _fn=fn, _name=name, **k):
            STAGES.start(_name)
            try:
                return _fn(*a, **k)
            finally:
                STAGES.stop()
        setattr(mod, attr, wrapped)


def hook_model(model):
    """Stage hooks on the model's parts (those that are still nn.Modules with hooks)."""
    parts = [(model, 'fusion, heads, rest'), (model.imu, 'IMU encoder')]
    visual, point = model.visual, model.point
    parts += [(visual, 'visual: rest (sweep, ground views, peak)'),
              (visual.stem, 'visual: stem CNN'), (visual.local, 'visual: local CNN'),
              (point, 'point: rest (correlations, FFT)'),
              (point.stem, 'point: stem CNN'), (point.down, 'point: down CNN'),
              (point.local, 'point: local CNN')]
    handles = []
    for module, name in parts:
        try:
            handles += STAGES.hook(module, name)
        except (AttributeError, RuntimeError):   # scripted modules take no Python hooks
            pass
    return handles


# --- variants ------------------------------------------------------------------------------
# The two functions as they were before issue 16 item 2 (main at 5f44769), for A/B in one run:
# variants named *_fns use the package's current ones, the others these.
def local_correlation_before(f0, f1, radius: int):
    h, w = f0.shape[-2:]
    padded = torch.nn.functional.pad(f1, (radius, radius, radius, radius))
    size = 2 * radius + 1
    return torch.stack([(f0 * padded[..., dy:dy + h, dx:dx + w]).mean(dim=1)
                        for dy in range(size) for dx in range(size)], dim=1)


def ground_view_before(image, homography, cells, pixel_size=None):
    b, j = homography.shape[:2]
    nx, ny = cells.shape[:2]
    h, w = pixel_size or image.shape[-2:]
    to_grid = torch.tensor([[2.0 / w, 0.0, 1.0 / w - 1.0], [0.0, 2.0 / h, 1.0 / h - 1.0],
                            [0.0, 0.0, 1.0]], dtype=homography.dtype, device=homography.device)
    hm = to_grid @ homography
    x, y = cells[:, 0, 0].view(nx, 1), cells[0, :, 1].view(1, ny)
    gu, gv, d = (hm[..., i, 0, None, None] * x + (hm[..., i, 1, None, None] * y +
                                                  hm[..., i, 2, None, None]) for i in range(3))
    scale = d.clamp(min=1e-3).reciprocal()
    grid = torch.stack([gu * scale, gv * scale], dim=-1)
    view = torch.nn.functional.grid_sample(image, grid.view(b, j * nx, ny, 2),
                                           align_corners=False)
    view = view.view(b, -1, j, nx, ny).transpose(1, 2)
    return view * (d > 0.1).to(view.dtype).unsqueeze(2)


CURRENT_FNS = {(enc_mod, 'local_correlation'): enc_mod.local_correlation,
               (camera_mod, 'ground_view'): camera_mod.ground_view}
BEFORE_FNS = {(enc_mod, 'local_correlation'): local_correlation_before,
              (camera_mod, 'ground_view'): ground_view_before}


# compile_fns: the parameter-free tensor functions of the forward through torch.compile
# (inductor, C++ on CPU): fuses their many small elementwise ops.
COMPILED_FNS = ((camera_mod, 'ground_view'), (camera_mod, 'peak_soft_argmax'),
                (camera_mod, 'box_mean'), (camera_mod, 'planar_motion'),
                (camera_mod, 'lidar_depth_image'), (enc_mod, 'local_correlation'),
                (enc_mod, 'bev_grid'), (enc_mod, 'soft_argmax'))
ORIGINAL = {}
COMPILED = {}


def use_functions(name):
    """Put the variant's versions of the changed functions in place (wrapped for --detail)."""
    if not ORIGINAL:
        ORIGINAL.update({k: getattr(*k) for k in COMPILED_FNS + ((net_mod, 'lidar_depth_image'),)})
    for key in COMPILED_FNS:
        setattr(*key, ORIGINAL[key])
    if name.startswith('compile_fns'):
        if not COMPILED:
            for mod, attr in COMPILED_FNS:
                raw = CURRENT_FNS.get((mod, attr), ORIGINAL[(mod, attr)])
                raw = getattr(raw, '__wrapped__', raw)      # not the stage wrapper
                COMPILED[(mod, attr)] = torch.compile(raw, dynamic=False)
        for key, fn in COMPILED.items():
            setattr(*key, fn)
        enc_mod.bev_grid = functools.partial(_timed, COMPILED[(enc_mod, 'bev_grid')], 'BEV grids')
        net_mod.lidar_depth_image = functools.partial(
            _timed, COMPILED[(camera_mod, 'lidar_depth_image')], 'LiDAR depth image')
        return
    net_mod.lidar_depth_image = ORIGINAL[(net_mod, 'lidar_depth_image')]
    for (mod, attr), fn in (CURRENT_FNS if name.endswith('_fns') else BEFORE_FNS).items():
        if DETAILED:
            stage = f'fn {mod.__name__.split(".")[-1]}.{attr}'
            fn = functools.partial(_timed, fn, stage)
        setattr(mod, attr, fn)


def _timed(fn, stage, *a, **k):
    STAGES.start(stage)
    try:
        return fn(*a, **k)
    finally:
        STAGES.stop()


CONV_STACKS = (('visual', 'stem'), ('visual', 'local'), ('point', 'stem'), ('point', 'down'),
               ('point', 'local'))


def variant_base(model, example):
    return model


def variant_fold(model, example):
    from mm_fusion_ros.model.inference import inference_copy
    return inference_copy(model)


def variant_fold_cl(model, example):
    m = variant_fold(model, example)
    for a, b in CONV_STACKS:
        getattr(getattr(m, a), b).to(memory_format=torch.channels_last)
    return m


def variant_cl(model, example):
    m = copy.deepcopy(model)
    for a, b in CONV_STACKS:
        getattr(getattr(m, a), b).to(memory_format=torch.channels_last)
    return m


def _stack_inputs(model, example):
    """Each conv stack's input of the example (cache miss: both frames / scans)."""
    seen = {}
    handles = [getattr(getattr(model, a), b).register_forward_pre_hook(
        functools.partial(lambda key, mod, inp: seen.setdefault(key, inp[0].clone()), (a, b)))
        for a, b in CONV_STACKS]
    with torch.inference_mode():
        model(example)
    for h in handles:
        h.remove()
    return seen


class Wrapped(torch.nn.Module):
    """A replaced (scripted, compiled) module behind a plain one, so stage hooks still work."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


def _replace_stacks(model, example, make):
    m = copy.deepcopy(model)
    inputs = _stack_inputs(m, example)
    for (a, b), x in inputs.items():
        parent = getattr(m, a)
        setattr(parent, b, Wrapped(make(getattr(parent, b), x)))
    return m


def variant_jit(model, example):
    """Conv stacks (after Conv+BN folding) traced, frozen, optimize_for_inference (mkldnn)."""
    def make(stack, x):
        with torch.no_grad():
            traced = torch.jit.trace(stack, x.clone())
            return torch.jit.optimize_for_inference(torch.jit.freeze(traced.eval()))
    return _replace_stacks(variant_fold(model, example), example, make)


def variant_jit_nomkl(model, example):
    """Conv stacks traced and frozen only (no mkldnn conversion)."""
    def make(stack, x):
        with torch.no_grad():
            return torch.jit.freeze(torch.jit.trace(stack, x.clone()).eval())
    return _replace_stacks(variant_fold(model, example), example, make)


def variant_compile(model, example):
    """torch.compile (inductor) of the conv stacks, dynamic=False."""
    def make(stack, x):
        return torch.compile(stack, dynamic=False)
    return _replace_stacks(variant_fold(model, example), example, make)


VARIANTS = {'base': variant_base, 'fold': variant_fold, 'base_fns': variant_base,
            'fold_fns': variant_fold, 'compile_fns': variant_fold, 'cl': variant_cl,
            'fold_cl': variant_fold_cl, 'jit': variant_jit, 'jit_nomkl': variant_jit_nomkl,
            'compile': variant_compile}


# --- run -----------------------------------------------------------------------------------
def run_drive(model, data, timed=True, name='base'):
    """Online-style: a fresh ScanCache, the first sample untimed, the rest timed.
    Returns (outputs, total thread CPU s of the timed samples)."""
    use_functions(name)
    cache = ScanCache()
    outs, total = [], 0.0
    with torch.inference_mode():
        STAGES.enabled = False
        outs.append(model(data[0], scan_cache=cache))
        STAGES.enabled = timed
        for batch in data[1:]:
            t0 = time.thread_time()
            outs.append(model(batch, scan_cache=cache))
            total += time.thread_time() - t0
        STAGES.enabled = True
    return outs, total


def max_diff(outs, ref):
    return max(float((o[k] - r[k]).abs().max()) for o, r in zip(outs, ref)
               for k in ('mean', 'logvar'))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--reps', type=int, default=5)
    p.add_argument('--samples', type=int, default=8, help='samples per drive (first untimed)')
    p.add_argument('--variants', nargs='+', default=['base', 'fold', 'base_fns', 'fold_fns'],
                   choices=sorted(VARIANTS))
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--detail', action='store_true',
                   help='also time the camera / correlation functions inside the encoders')
    p.add_argument('--profile', default=None, choices=sorted(VARIANTS),
                   help='also print torch.profiler op table of this variant')
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cfg = ModelConfig(visual_encoder='flow')       # config/finetune.yaml: defaults + flow
    scfg = SampleConfig(image_height=cfg.image_height, image_width=cfg.image_width,
                        max_points=16384, imu_steps=cfg.imu_steps)
    t0 = time.perf_counter()
    data = batches(drive_samples(args.samples, scfg, args.seed))
    print(f'data: {len(data)} samples, points {tuple(data[0]["points"].shape)}, kept '
          f'{int(data[0]["points_mask"].sum())}, image {tuple(data[0]["image"].shape)} '
          f'({time.perf_counter() - t0:.1f} s)', flush=True)
    base = build_model(cfg).eval()
    # Non-trivial BatchNorm statistics and head weights, as a trained checkpoint has: the
    # fresh model's (mean 0, var 1, zero head) would hide folding errors.
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in base.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
        for head in (base.head, base.camera_head):
            head.out.weight.copy_(torch.randn(head.out.weight.shape, generator=g) * 0.05)
    wrap_functions(args.detail)
    models = {}
    for name in args.variants:
        t0 = time.perf_counter()
        models[name] = VARIANTS[name](base, data[0])
        t_build = time.perf_counter() - t0
        t0 = time.perf_counter()
        run_drive(models[name], data, timed=False, name=name)    # warm-up (and compilation)
        print(f'{name}: built in {t_build:.2f} s, first drive {time.perf_counter() - t0:.2f} s',
              flush=True)
    ref, _ = run_drive(base, data, timed=False)
    for name, m in models.items():
        outs, _ = run_drive(m, data, timed=False, name=name)
        print(f'{name}: max |out - base| = {max_diff(outs, ref):.3g}')
    for m in models.values():
        hook_model(m)
    totals = defaultdict(list)
    stages = defaultdict(lambda: defaultdict(list))
    n = len(data) - 1
    names = list(models)
    for rep in range(args.reps):
        # Interleaved per sample: each variant its own ScanCache, the variants take turns on
        # every sample (order rotated per repetition), so load changes hit all of them alike.
        caches = {name: ScanCache() for name in names}
        rep_total = defaultdict(float)
        rep_stage = defaultdict(lambda: defaultdict(float))
        with torch.inference_mode():
            for i, batch in enumerate(data):
                k = (rep + i) % len(names)
                for name in names[k:] + names[:k]:
                    use_functions(name)
                    STAGES.reset()
                    STAGES.enabled = i > 0
                    t0 = time.thread_time()
                    models[name](batch, scan_cache=caches[name])
                    dt = time.thread_time() - t0
                    STAGES.enabled = True
                    if i > 0:       # the first sample misses the cache: not timed
                        rep_total[name] += dt
                        for stage, t in STAGES.time.items():
                            rep_stage[name][stage] += t
        for name in names:
            totals[name].append(1e3 * rep_total[name] / n)
            for stage, t in rep_stage[name].items():
                stages[name][stage].append(1e3 * t / n)
        print(f'rep {rep}: ' + ', '.join(f'{k} {totals[k][-1]:.2f}' for k in names), flush=True)
    print(f'\nms per forward (thread CPU), {n} samples per drive, {args.reps} reps, '
          f'{args.threads} thread(s)')
    first = names[0]
    print(f'| variant | median | min | reps | paired {first} - variant, median (reps) |\n'
          '|---|---:|---:|---|---|')
    for name in names:
        diff = [a - b for a, b in zip(totals[first], totals[name])]
        print(f'| {name} | {statistics.median(totals[name]):.2f} | {min(totals[name]):.2f} | '
              + ' '.join(f'{v:.2f}' for v in totals[name]) + f' | {statistics.median(diff):+.2f} ('
              + ' '.join(f'{v:+.2f}' for v in diff) + ') |')
    all_stages = sorted({s for name in names for s in stages[name]})
    print('\nper stage, median ms (reps)')
    print('| stage | ' + ' | '.join(names) + ' |\n|---|' + '---:|' * len(names))
    for s in all_stages:
        cells = []
        for name in names:
            v = stages[name].get(s)
            cells.append(f'{statistics.median(v):.2f} ({" ".join(f"{x:.2f}" for x in v)})'
                         if v else '-')
        print(f'| {s} | ' + ' | '.join(cells) + ' |')
    if args.profile:
        from torch.profiler import profile, ProfilerActivity
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run_drive(models[args.profile], data, timed=False, name=args.profile)
        print(prof.key_averages().table(sort_by='self_cpu_time_total', row_limit=40))
    return 0


if __name__ == '__main__':
    sys.exit(main())
