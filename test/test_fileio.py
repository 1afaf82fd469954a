"""fileio: the one atomic-write helper (files and bag folders), including a writer killed by -9."""
import ctypes
import errno
import os
from pathlib import Path
import signal
import subprocess
import sys
import time

from conftest import REPO
import pytest

from mm_fusion_ros import fileio


def kill_when_it_says(line: str, script: str, *args):
    """Run `script` in a child Python, SIGKILL it once it prints `line`."""
    proc = subprocess.Popen([sys.executable, '-c', script, *map(str, args)],
                            stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert proc.stdout.readline().strip() == line
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_atomic_write_replaces_and_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / 'sub' / 'f.txt'
    fileio.atomic_write_text(path, 'one\n')
    assert path.read_text() == 'one\n'
    assert oct(path.stat().st_mode & 0o777) != oct(0o600)   # not mkstemp's private mode
    with pytest.raises(RuntimeError, match='half-way'):
        with fileio.atomic_open(path, 'w') as f:
            f.write('two, partly')
            raise RuntimeError('died half-way')
    assert path.read_text() == 'one\n'
    assert sorted(p.name for p in path.parent.iterdir()) == ['f.txt']
    fileio.atomic_write_bytes(path, b'three')
    assert path.read_bytes() == b'three'
    with pytest.raises(ValueError, match='mode'):
        with fileio.atomic_open(path, 'a'):
            pass


def test_a_write_error_names_the_file(tmp_path):
    """A full disk says "[Errno 28] No space left on device", without naming the file."""
    path = tmp_path / 'ckpt' / 'autosave.pth'
    with pytest.raises(OSError, match='autosave.pth not written: No space left') as err:
        with fileio.atomic_open(path) as f:
            f.write(b'partly')
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert err.value.errno == errno.ENOSPC and str(path) in str(err.value)
    assert not path.exists() and list(path.parent.iterdir()) == []
    with pytest.raises(FileNotFoundError, match='gone.txt'):   # the same kind of OSError
        with fileio.atomic_open(tmp_path / 'gone.txt', 'w'):
            raise FileNotFoundError(errno.ENOENT, 'No such file or directory')


def make_bags(tmp_path):
    """-> (target holding 'old', staging/bag holding 'new')."""
    target = tmp_path / 'bag'
    target.mkdir()
    (target / 'metadata.yaml').write_text('old')
    new = tmp_path / 'staging' / 'bag'
    new.mkdir(parents=True)
    (new / 'metadata.yaml').write_text('new')
    return target, new


def test_replace_dir_keeps_the_old_folder_when_the_rename_fails(tmp_path, monkeypatch):
    target, new = make_bags(tmp_path)
    monkeypatch.setattr(fileio, '_RENAMEAT2', None)     # the two-rename path
    real_replace = os.replace
    calls = []

    def second_rename_fails(src, dst):
        calls.append((Path(src), Path(dst)))
        if len(calls) == 2:
            raise OSError('simulated: rename refused')
        return real_replace(src, dst)

    monkeypatch.setattr(fileio.os, 'replace', second_rename_fails)
    with pytest.raises(OSError, match='simulated'):
        fileio.replace_dir(new, target)
    assert (target / 'metadata.yaml').read_text() == 'old'    # put back, not deleted
    assert calls[1] == (new, target) and calls[2][1] == target
    monkeypatch.setattr(fileio.os, 'replace', real_replace)
    fileio.replace_dir(new, target)
    assert (target / 'metadata.yaml').read_text() == 'new'
    assert sorted(p.name for p in tmp_path.iterdir()) == ['bag', 'staging']


@pytest.mark.skipif(fileio._RENAMEAT2 is None, reason='no renameat2 in this libc')
def test_replace_dir_swaps_in_one_step_where_the_os_can(tmp_path, monkeypatch):
    target, new = make_bags(tmp_path)
    (target / 'old.mcap').write_text('old data')
    real_exchange, swaps = fileio._exchange, []

    def exchange(a, b):
        assert target.is_dir()      # target is never missing on this path
        real_exchange(a, b)         # recorded only once it worked (a failure falls back)
        swaps.append((Path(a), Path(b)))
        assert (target / 'metadata.yaml').read_text() == 'new'

    monkeypatch.setattr(fileio, '_exchange', exchange)
    assert fileio.replace_dir(new, target) == target
    assert len(swaps) == 1 and swaps[0][1] == target
    assert swaps[0][0].parent == tmp_path and swaps[0][0].name.startswith('.bag.')
    assert sorted(p.name for p in target.iterdir()) == ['metadata.yaml']   # old content gone
    assert sorted(p.name for p in tmp_path.iterdir()) == ['bag', 'staging']
    assert list((tmp_path / 'staging').iterdir()) == []
    # Nothing to replace: a plain rename, no exchange.
    fresh = tmp_path / 'staging' / 'fresh'
    fresh.mkdir()
    fileio.replace_dir(fresh, tmp_path / 'other')
    assert len(swaps) == 1 and (tmp_path / 'other').is_dir()


def test_replace_dir_falls_back_to_two_renames_where_exchange_is_unsupported(tmp_path,
                                                                              monkeypatch):
    target, new = make_bags(tmp_path)
    tried = []

    def renameat2_einval(*args):    # a filesystem without RENAME_EXCHANGE answers EINVAL
        tried.append(args)
        ctypes.set_errno(errno.EINVAL)
        return -1

    monkeypatch.setattr(fileio, '_RENAMEAT2', renameat2_einval)
    with pytest.raises(OSError) as err:     # what the exchange itself raises
        fileio._exchange(new, target)
    assert err.value.errno == errno.EINVAL and len(tried) == 1
    assert fileio.replace_dir(new, target) == target
    assert len(tried) == 2
    assert (target / 'metadata.yaml').read_text() == 'new'
    assert sorted(p.name for p in tmp_path.iterdir()) == ['bag', 'staging']
    assert list((tmp_path / 'staging').iterdir()) == []


KILLED_REPLACE = """
import os, sys, time
from mm_fusion_ros import fileio
fileio._RENAMEAT2 = None        # the two-rename path
real_replace = os.replace

def replace_then_hang(src, dst):
    real_replace(src, dst)
    print('between the renames', flush=True)
    time.sleep(60)

os.replace = replace_then_hang
fileio.replace_dir(sys.argv[1], sys.argv[2])
"""


def test_a_replace_killed_between_its_renames_is_recovered(tmp_path, monkeypatch):
    target, new = make_bags(tmp_path)
    kill_when_it_says('between the renames', KILLED_REPLACE, new, target)
    assert not target.exists()      # the window this fixes: only the aside holds the bag
    aside, = [p for p in tmp_path.iterdir() if p.name.startswith('.bag.')]
    assert aside.name.endswith('.old') and (aside / 'metadata.yaml').read_text() == 'old'
    assert fileio.recover_replaced_dir(target) == aside
    assert (target / 'metadata.yaml').read_text() == 'old'
    assert sorted(p.name for p in tmp_path.iterdir()) == ['bag', 'staging']
    assert fileio.recover_replaced_dir(target) is None     # nothing left to do

    # The same state by hand, plus an older stale aside: replace_dir restores the newest first.
    stale = tmp_path / '.bag.stale001.old'
    stale.mkdir()
    (stale / 'metadata.yaml').write_text('older')
    time.sleep(0.05)                # ctimes a clock tick apart
    os.replace(target, tmp_path / '.bag.killed01.old')
    restored = []
    real_recover = fileio.recover_replaced_dir

    def recover(t):
        restored.append(real_recover(t))
        assert (target / 'metadata.yaml').read_text() == 'old'
        return restored[-1]

    monkeypatch.setattr(fileio, 'recover_replaced_dir', recover)
    fileio.replace_dir(new, target)
    assert restored == [tmp_path / '.bag.killed01.old']
    assert (target / 'metadata.yaml').read_text() == 'new'
    assert sorted(p.name for p in tmp_path.iterdir()) == ['bag', 'staging']


def test_stale_asides_beside_an_existing_target_are_removed(tmp_path):
    target, _ = make_bags(tmp_path)
    ours = [tmp_path / '.bag.ab12cd34.old', tmp_path / '.bag.ef56gh78.del']
    for p in ours:
        p.mkdir()
        (p / 'metadata.yaml').write_text('stale')
    others = ['.bag.v2.ab12cd34.old',    # an aside of another folder, `bag.v2`
              '.bag.partial-ab12cd34',   # bag/writer.py's staging folder
              '.bag..old']
    for name in others:
        (tmp_path / name).mkdir()
    assert fileio.recover_replaced_dir(target) is None
    assert (target / 'metadata.yaml').read_text() == 'old'
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(['bag', 'staging'] + others)
    # Nothing of ours and no target: nothing is made up.
    assert fileio.recover_replaced_dir(tmp_path / 'missing') is None
    assert not (tmp_path / 'missing').exists()


WRITER = """
import sys, time
from mm_fusion_ros import fileio
with fileio.atomic_open(sys.argv[1], 'wb') as f:
    f.write(b'x' * 1000)
    f.flush()
    print('writing', flush=True)
    time.sleep(60)
"""


def test_a_writer_killed_mid_write_leaves_the_old_file_and_a_temp_that_is_cleared(tmp_path):
    path = tmp_path / 'buffer.npz'
    path.write_bytes(b'old')
    kill_when_it_says('writing', WRITER, path)
    assert path.read_bytes() == b'old'
    stale = [p for p in tmp_path.iterdir() if p.name != 'buffer.npz']
    assert len(stale) == 1 and stale[0].name.startswith('.buffer.npz.')
    (tmp_path / '.other.npz.x.tmp').write_bytes(b'')      # another file's temp: not ours
    (tmp_path / '.buffer.npz.v2.x.tmp').write_bytes(b'')  # nor is `buffer.npz.v2`'s
    assert fileio.remove_stale_temps(path) == stale
    assert sorted(p.name for p in tmp_path.iterdir()) == ['.buffer.npz.v2.x.tmp',
                                                          '.other.npz.x.tmp', 'buffer.npz']
