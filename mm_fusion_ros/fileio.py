"""The one way this package puts a file or a folder in place: atomically (stdlib only).

A file is written to a temporary file in the same folder, flushed and fsynced, renamed over the
target (os.replace is atomic within one filesystem) and the folder is fsynced, so the rename
itself survives a power cut. A crash (even kill -9) at any point leaves either the old file or
the new one, never a half-written one; at worst a hidden `.NAME.*.tmp` stays behind, which
`remove_stale_temps` clears at the next start. Folders (rosbag2 bags) are fsynced file by file
and swapped with the folder they replace in one step (Linux renameat2 RENAME_EXCHANGE), so the
target exists at every instant; where that is unsupported the old folder is renamed aside
(`.NAME.*.old`) and the new one renamed in, and `recover_replaced_dir` puts the old one back
after a kill between the two renames.
"""
from contextlib import contextmanager
import ctypes
import glob
import logging
import os
from pathlib import Path
import shutil
import sys
import tempfile

log = logging.getLogger(__name__)

# Read once at import: os.umask can only be read by setting it, which is not thread-safe later.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def temp_prefix(path: Path) -> str:
    return f'.{Path(path).name}.'


def _ours(path: Path, suffix: str) -> list:
    """The hidden names this module made for `path` beside it: `.NAME.<random>SUFFIX`.

    The random part of mkstemp/mkdtemp has no dot, so `.NAME.v2.*` (another file `NAME.v2`)
    never matches."""
    prefix, found = temp_prefix(path), []
    for p in path.parent.glob(f'{glob.escape(prefix)}*{suffix}'):
        middle = p.name[len(prefix):-len(suffix)]
        if middle and '.' not in middle:
            found.append(p)
    return sorted(found)


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


AT_FDCWD = -100
RENAME_EXCHANGE = 2     # linux/fs.h


def _load_renameat2():
    """libc's renameat2 (Linux 3.15+, glibc 2.28+), or None where there is none."""
    if not sys.platform.startswith('linux'):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    fn.restype = ctypes.c_int
    return fn


_RENAMEAT2 = _load_renameat2()


def _exchange(a, b) -> None:
    """Swap two existing paths in one atomic step (renameat2 RENAME_EXCHANGE)."""
    if _RENAMEAT2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(a), None, str(b))


def _aside_name(target: Path) -> Path:
    aside = Path(tempfile.mkdtemp(prefix=temp_prefix(target), suffix='.old', dir=target.parent))
    aside.rmdir()   # only the unique name is wanted; os.replace needs it free
    return aside


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _discard(aside: Path) -> None:
    """Delete an aside that holds a replaced folder; a failure is only logged."""
    # Renamed to `.NAME.*.del` first: a kill mid-delete must not leave a partial `.old` that
    # recover_replaced_dir would put back.
    trash = aside.with_suffix('.del')
    try:
        os.replace(aside, trash)
    except OSError:
        trash = aside
    try:
        _remove(trash)
    except OSError as e:
        log.warning('could not remove the replaced folder %s: %s', trash, e)


def _swap_in(new_dir: Path, target: Path) -> bool:
    """Replace `target` by exchanging it with `new_dir`; False (nothing changed) where the
    filesystem or kernel cannot exchange."""
    aside = _aside_name(target)
    # Beside target first, so a kill at any point leaves only names recover_replaced_dir clears.
    os.replace(new_dir, aside)
    try:
        _exchange(aside, target)
    except OSError as e:
        # ENOSYS (old kernel, seccomp), EINVAL (a filesystem without it), ...: a failed
        # renameat2 changed nothing, so the two renames below are as safe as ever.
        log.debug('renameat2(RENAME_EXCHANGE) unavailable for %s (%s); renaming instead',
                  target, e)
        os.replace(aside, new_dir)
        return False
    fsync_dir(target.parent)
    _discard(aside)     # it now holds the old folder
    return True


def replace_dir(new_dir, target) -> Path:
    """Put the finished folder `new_dir` at `target` (same filesystem), replacing what is there.

    `target` is swapped with the new folder in one step where the OS can, so it exists (old or
    new) at every instant. Elsewhere the old one is renamed aside (`.NAME.*.old`) and renamed
    back if the second rename fails; after a kill between the two, `recover_replaced_dir`
    (called here first) puts it back. The old folder is deleted only once the new one is in
    place. Not for two writers of one target at once.
    """
    new_dir, target = Path(new_dir), Path(target)
    recover_replaced_dir(target)
    fsync_tree(new_dir)
    aside = None
    if target.exists() or target.is_symlink():
        if _RENAMEAT2 is not None and _swap_in(new_dir, target):
            return target
        aside = _aside_name(target)
        os.replace(target, aside)
    try:
        os.replace(new_dir, target)
    except BaseException:
        if aside is not None:
            os.replace(aside, target)
        raise
    fsync_dir(target.parent)
    if aside is not None:
        _discard(aside)
    return target


def recover_replaced_dir(target) -> Path | None:
    """Undo what a replace_dir killed mid-way left beside `target`; -> the aside put back, or None.

    When `target` is missing, the newest aside made for it (`.NAME.*.old`, the previous folder)
    is renamed back; the other asides are stale and deleted. Only names this module makes for
    `target` are touched."""
    target = Path(target)
    if not target.parent.is_dir():
        return None
    asides = _ours(target, '.old')
    restored = None
    if asides and not (target.exists() or target.is_symlink()):
        # ctime changes on rename: the newest was put aside last, by the replace that was killed.
        restored = max(asides, key=lambda p: p.lstat().st_ctime_ns)
        os.replace(restored, target)
        fsync_dir(target.parent)
        asides.remove(restored)
        log.warning('%s was missing (a replace of it was killed): restored it from %s', target,
                    restored)
    removed = 0
    for stale in asides + _ours(target, '.del'):
        try:
            _remove(stale)
            removed += 1
        except OSError as e:
            log.warning('could not remove the stale folder %s: %s', stale, e)
    if removed:
        log.info('removed %d stale aside folder(s) of %s', removed, target)
    return restored


def remove_stale_temps(path) -> list:
    """Delete the temporary files that a killed writer of `path` left behind; -> removed paths.

    Only names this module makes for `path` (`.NAME.*.tmp` beside it) are touched."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    removed = []
    for tmp in _ours(path, '.tmp'):
        try:
            tmp.unlink()
            removed.append(tmp)
        except OSError as e:
            log.warning('could not remove the stale temporary file %s: %s', tmp, e)
    if removed:
        log.info('removed %d stale temporary file(s) of %s (a writer was killed)', len(removed),
                 path)
    return removed
