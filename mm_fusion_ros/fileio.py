"""The one way this package puts a file or a folder in place: atomically (stdlib only).

A file is written to a temporary file in the same folder, flushed and fsynced, renamed over the
target (os.replace is atomic within one filesystem) and the folder is fsynced, so the rename
itself survives a power cut. A crash (even kill -9) at any point leaves either the old file or
the new one, never a half-written one; at worst a hidden `.NAME.*.tmp` stays behind, which
`remove_stale_temps` clears at the next start. Folders (rosbag2 bags) are fsynced file by file
and renamed into place the same way; the folder they replace is removed only after the new one
is in place, and is put back when that rename fails.
"""
from contextlib import contextmanager
import logging
import os
from pathlib import Path
import shutil
import tempfile

log = logging.getLogger(__name__)

# Read once at import: os.umask can only be read by setting it, which is not thread-safe later.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def temp_prefix(path: Path) -> str:
    return f'.{Path(path).name}.'


@contextmanager
def atomic_open(path, mode: str = 'wb', encoding: str = None):
    """`with atomic_open(path) as f: f.write(...)`: the target changes only when the block ends
    without an exception. Parent folders are created. Text modes take `encoding` (utf-8)."""
    if mode not in ('wb', 'w'):
        raise ValueError(f'atomic_open: mode must be "wb" or "w", got {mode!r}')
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), suffix='.tmp', dir=path.parent)
    try:
        text = mode == 'w'
        with os.fdopen(fd, mode, encoding=(encoding or 'utf-8') if text else None,
                       newline='' if text else None) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the usual mode
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        if str(path) in str(e):
            raise
        # A full disk says "[Errno 28] No space left on device" without naming the file.
        raise OSError(e.errno, f'{path} not written: {e.strerror or e}') from e
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path, data: bytes) -> Path:
    with atomic_open(path, 'wb') as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path, text: str, encoding: str = 'utf-8') -> Path:
    with atomic_open(path, 'w', encoding=encoding) as f:
        f.write(text)
    return Path(path)


def fsync_dir(folder) -> None:
    """Persist renames in `folder` (POSIX); a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:
        log.debug('fsync of %s not supported: %s', folder, e)
    finally:
        os.close(fd)


def fsync_tree(folder) -> None:
    """fsync every file and folder under `folder` (before it is renamed into place)."""
    for root, _, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(root)


def replace_dir(new_dir, target) -> Path:
    """Put the finished folder `new_dir` at `target` (same filesystem), replacing what is there.

    The old `target` is first renamed aside within the same parent; if the second rename fails
    it is renamed back, so a failure never loses the previous folder. It is deleted only once
    the new one is in place.
    """
    new_dir, target = Path(new_dir), Path(target)
    fsync_tree(new_dir)
    aside = None
    if target.exists() or target.is_symlink():
        aside = Path(tempfile.mkdtemp(prefix=temp_prefix(target), suffix='.old',
                                      dir=target.parent))
        aside.rmdir()   # only the unique name is wanted; os.replace needs it free
        os.replace(target, aside)
    try:
        os.replace(new_dir, target)
    except BaseException:
        if aside is not None:
            os.replace(aside, target)
        raise
    fsync_dir(target.parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    return target


def remove_stale_temps(path) -> list:
    """Delete the temporary files that a killed writer of `path` left behind; -> removed paths.

    Only names this module makes for `path` (`.NAME.*.tmp` beside it) are touched."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    removed = []
    for tmp in path.parent.glob(f'{temp_prefix(path)}*.tmp'):
        try:
            tmp.unlink()
            removed.append(tmp)
        except OSError as e:
            log.warning('could not remove the stale temporary file %s: %s', tmp, e)
    if removed:
        log.info('removed %d stale temporary file(s) of %s (a writer was killed)', len(removed),
                 path)
    return removed
