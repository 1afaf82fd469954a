"""fileio: the one atomic-write helper (files and bag folders), including a writer killed by -9."""
import errno
import os
from pathlib import Path
import signal
import subprocess
import sys

from conftest import REPO
import pytest

from mm_fusion_ros import fileio


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


def test_replace_dir_keeps_the_old_folder_when_the_rename_fails(tmp_path, monkeypatch):
    target = tmp_path / 'bag'
    target.mkdir()
    (target / 'metadata.yaml').write_text('old')
    new = tmp_path / 'staging' / 'bag'
    new.mkdir(parents=True)
    (new / 'metadata.yaml').write_text('new')
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
    proc = subprocess.Popen([sys.executable, '-c', WRITER, str(path)], stdout=subprocess.PIPE,
                            text=True, cwd=REPO)
    try:
        assert proc.stdout.readline().strip() == 'writing'
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert path.read_bytes() == b'old'
    stale = [p for p in tmp_path.iterdir() if p.name != 'buffer.npz']
    assert len(stale) == 1 and stale[0].name.startswith('.buffer.npz.')
    (tmp_path / '.other.npz.x.tmp').write_bytes(b'')      # another file's temp: not ours
    assert fileio.remove_stale_temps(path) == stale
    assert sorted(p.name for p in tmp_path.iterdir()) == ['.other.npz.x.tmp', 'buffer.npz']
