"""Training logs: one CSV row per epoch, TensorBoard scalars, a tqdm bar on interactive stderr.

Only the main process (rank 0) creates these; other ranks get NullLog.
"""
import csv
import logging
import math
from pathlib import Path
import sys

from tqdm import tqdm

from mm_fusion_ros.model.selfsup import TERMS

log = logging.getLogger(__name__)

# Each part of the loss (TrainerCore: gt and the self-supervised terms), training and validation.
LOSS_PARTS = ('gt',) + TERMS
CSV_FIELDS = ('epoch', 'loss', 'val_loss', 'val_trans_err', 'val_rot_err', 'lr',
              'samples_per_s', 'time_s', 'skipped', 'train_samples', 'steps',
              'val_mean_motion_trans_err', 'val_mean_motion_rot_err') + \
    tuple(f'loss_{t}' for t in LOSS_PARTS) + tuple(f'val_loss_{t}' for t in LOSS_PARTS)


def _cell(value):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ''
    return f'{value:.6g}' if isinstance(value, float) else str(value)


class CsvLog:
    """Epoch rows under the CSV_FIELDS header. `append` continues a log with the same header
    (resumed training); otherwise the file is started afresh."""

    def __init__(self, path, append: bool = False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if append and self.path.is_file() and self._header() == list(CSV_FIELDS):
            return
        if self.path.is_file():
            log.info('%s exists: starting a new log over it', self.path)
        with self.path.open('w', newline='') as f:
            csv.writer(f).writerow(CSV_FIELDS)

    def _header(self):
        with self.path.open(newline='') as f:
            return next(csv.reader(f), None)

    def write(self, row: dict) -> None:
        unknown = sorted(set(row) - set(CSV_FIELDS))
        if unknown:
            raise ValueError(f'{self.path}: CSV row has unknown columns {unknown}')
        with self.path.open('a', newline='') as f:
            csv.writer(f).writerow([_cell(row.get(k)) for k in CSV_FIELDS])
            f.flush()


class TensorBoardLog:
    """Scalars into TensorBoard event files under `folder`."""

    def __init__(self, folder):
        from torch.utils.tensorboard import SummaryWriter  # heavy import, only when asked for
        self.writer = SummaryWriter(log_dir=str(folder))

    def scalars(self, prefix: str, values: dict, step: int) -> None:
        for k, v in values.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                self.writer.add_scalar(f'{prefix}/{k}', v, step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


class NullLog:
    """Stand-in for CsvLog / TensorBoardLog on non-main ranks or when a log is not wanted."""

    def write(self, row) -> None:
        pass

    def scalars(self, prefix, values, step) -> None:
        pass

    def close(self) -> None:
        pass


def progress(iterable, total=None, desc='', enabled=True):
    """tqdm bar, shown only on an interactive stderr of the main process."""
    return tqdm(iterable, total=total, desc=desc, unit='batch', leave=False,
                disable=not (enabled and sys.stderr.isatty()))
