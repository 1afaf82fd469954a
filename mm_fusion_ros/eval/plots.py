"""Evaluation figures (matplotlib, Agg canvas; no global backend switch, no display needed)."""
from dataclasses import dataclass, field
import logging
import math
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
import numpy as np

from mm_fusion_ros.fileio import atomic_open

log = logging.getLogger(__name__)


@dataclass
class PlotEntry:
    """One row of the figure: a sequence's GT, the trajectories to compare and their metrics."""

    title: str
    gt: np.ndarray                                      # (N, 4, 4) KITTI cam0 poses
    trajectories: dict = field(default_factory=dict)    # name -> (N, 4, 4) cam0 poses
    per_length: dict = field(default_factory=dict)      # name -> {length: {t_rel, r_rel, count}}
    # Trajectories that set the view besides GT; others (diverging baselines) may leave it.
    view_names: tuple = None                            # None: all trajectories


def _view_limits(entry: PlotEntry, margin=0.1):
    names = entry.trajectories if entry.view_names is None else entry.view_names
    pts = [entry.gt[:, [0, 2], 3]] + [entry.trajectories[n][:, [0, 2], 3]
                                      for n in names if n in entry.trajectories]
    pts = np.concatenate(pts)
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    pad = margin * max(float(np.max(hi - lo)), 1.0)
    return (lo[0] - pad, hi[0] + pad), (lo[1] - pad, hi[1] + pad)


def _top_down(ax, entry: PlotEntry):
    # KITTI cam0: x right, z forward, y down, so the ground plane is x-z.
    ax.plot(entry.gt[:, 0, 3], entry.gt[:, 2, 3], 'k-', lw=2.0, label='ground truth')
    for name, poses in entry.trajectories.items():
        ax.plot(poses[:, 0, 3], poses[:, 2, 3], '-', lw=1.2, label=name)
    ax.plot(entry.gt[0, 0, 3], entry.gt[0, 2, 3], 'ko', ms=5)
    xlim, zlim = _view_limits(entry)
    ax.set_xlim(*xlim)
    ax.set_ylim(*zlim)
    ax.set_xlabel('x [m]')
    ax.set_ylabel('z [m]')
    ax.set_aspect('equal', adjustable='box')
    ax.set_title(f'{entry.title}: trajectory (top-down)')
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc='best')


def _per_length(ax, entry: PlotEntry, key, ylabel):
    shown = []
    for name, per_length in entry.per_length.items():
        lengths = sorted(int(k) for k in per_length)
        values = [per_length[k][key] if k in per_length else per_length[str(k)][key]
                  for k in lengths]
        keep = [(n, v) for n, v in zip(lengths, values) if v is not None and not math.isnan(v)]
        if keep:
            ax.plot(*zip(*keep), 'o-', ms=4, label=name)
            shown.extend(v for _, v in keep)
    positive = [v for v in shown if v > 0]
    # A diverging baseline next to a good model spans decades: a log axis keeps both readable.
    if positive and len(positive) == len(shown) and max(positive) > 50 * min(positive):
        ax.set_yscale('log')
    ax.set_xlabel('segment length [m]')
    ax.set_ylabel(ylabel)
    ax.set_title(f'{entry.title}: {ylabel}')
    ax.grid(True, alpha=0.3)
    if entry.per_length:
        ax.legend(fontsize=7, loc='best')


def plot_report(path, entries) -> Path:
    """Write a PNG with one row per entry: top-down trajectories, t_rel and r_rel per length."""
    entries = list(entries)
    if not entries:
        raise ValueError('plot_report needs at least one entry')
    fig = Figure(figsize=(15, 4.6 * len(entries)), dpi=90)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(entries), 3, squeeze=False)
    for row, entry in zip(axes, entries):
        _top_down(row[0], entry)
        _per_length(row[1], entry, 't_rel', 'translation error [%]')
        _per_length(row[2], entry, 'r_rel', 'rotation error [deg/100 m]')
    fig.tight_layout()
    path = Path(path)
    with atomic_open(path) as f:     # a reader never sees a half-written figure
        fig.savefig(f, format=path.suffix[1:] or 'png')
    log.info('wrote %s', path)
    return path
