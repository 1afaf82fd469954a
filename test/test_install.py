"""Both installs put executables where `ros2 run/launch` look (DESIGN §1): the editable pip
install this suite runs in (dev.sh), a regular pip install into a prefix, and colcon build; and
`pip install .` alone, into a fresh venv, brings every dependency the commands need."""
import base64
from concurrent.futures import ThreadPoolExecutor
import hashlib
import importlib.metadata as md
import os
from pathlib import Path
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
import pytest

from mm_fusion_ros.prefix_install import ENTRY_POINTS, write_wrappers

REPO = Path(__file__).resolve().parents[1]
ROS_SCRIPTS = ('bag_player', 'online_finetune', 'synchronizer', 'mm_fusion_run')


def _run_exe(exe, env=None):
    out = subprocess.run([str(exe), '--help'], capture_output=True, text=True, timeout=120,
                         env=env, cwd='/')
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_editable_install_has_lib_executables_and_share(tmp_path):
    prefix = tmp_path / 'prefix'
    subprocess.run([sys.executable, '-m', 'mm_fusion_ros.prefix_install', '--prefix', str(prefix)],
                   check=True, capture_output=True, timeout=60)
    for name in ENTRY_POINTS:
        assert os.access(prefix / 'lib' / 'mm_fusion_ros' / name, os.X_OK), name
    assert (prefix / 'share/mm_fusion_ros/package.xml').resolve() == REPO / 'package.xml'
    # ros2launch walks share/PKG/launch with os.walk, which does not enter symlinked folders.
    launch_dir = prefix / 'share/mm_fusion_ros/launch'
    assert launch_dir.is_dir() and not launch_dir.is_symlink()
    assert (launch_dir / 'finetune.launch.py').is_file()
    assert (prefix / 'share/ament_index/resource_index/packages/mm_fusion_ros').is_file()
    # The venv that runs this suite was set up the same way by dev.sh.
    exe = Path(sys.prefix) / 'lib' / 'mm_fusion_ros' / 'check_kitti'
    assert 'usage: check_kitti' in _run_exe(exe, env={'PATH': '/usr/bin:/bin'})


def test_lib_executables_do_not_start_again_in_a_spawned_process(tmp_path):
    """multiprocessing's spawn runs the parent's main script again as __mp_main__ (the learner
    and intake processes of online_finetune under `ros2 launch`, which starts the lib/
    executable): the script must then only define, not call main. Each script runs here as
    spawn runs it, with --help in argv, so a main that does run exits before 'defined only'."""
    for path in write_wrappers(tmp_path):
        code = ('import runpy, sys; sys.argv = [sys.argv[1], "--help"]; '
                'runpy.run_path(sys.argv[0], run_name="__mp_main__"); print("defined only")')
        out = subprocess.run([sys.executable, '-c', code, path], capture_output=True, text=True,
                             timeout=120, cwd='/')
        assert out.returncode == 0 and out.stdout.strip().endswith('defined only'), \
            (path, out.stdout[-500:], out.stderr[-500:])


def test_ament_index_finds_the_package():
    env = dict(os.environ, AMENT_PREFIX_PATH=sys.prefix)
    code = ('from ament_index_python.packages import get_package_share_directory as g;'
            'print(g("mm_fusion_ros"))')
    out = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip(), 'package.xml').is_file()


@pytest.fixture(scope='module')
def wheel(tmp_path_factory):
    """This package's wheel, built from a copy of the source tree (without touching this env)."""
    tmp = tmp_path_factory.mktemp('wheel')
    src = tmp / 'src'
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(
        '.venv', '.git', 'build', 'data', 'data_*', '*.egg-info', '__pycache__', 'bags',
        'logs', 'results', 'pretrain_models', 'runs', 'demo_out'))
    subprocess.run([sys.executable, '-m', 'pip', 'wheel', '-q', '--no-deps',
                    '--no-build-isolation', '-w', str(tmp / 'out'), str(src)],
                   check=True, capture_output=True, timeout=300)
    return next((tmp / 'out').glob('mm_fusion_ros-*.whl'))


def test_regular_pip_install_places_data_files(wheel):
    """A wheel's .data/data/ tree is what pip installs under PREFIX."""
    with zipfile.ZipFile(wheel) as zf:
        data = {n.split('.data/data/', 1)[1]: zf.getinfo(n) for n in zf.namelist()
                if '.data/data/' in n}
    lib = sorted(n.rsplit('/', 1)[1] for n in data if n.startswith('lib/mm_fusion_ros/'))
    assert lib == sorted(ENTRY_POINTS)
    assert data['lib/mm_fusion_ros/check_kitti'].external_attr >> 16 & 0o111  # executable
    shipped = ['package.xml'] + [str(p.relative_to(REPO)) for d in ('launch', 'config')
                                 for p in (REPO / d).glob('*') if p.is_file()]
    for rel in shipped:
        assert f'share/mm_fusion_ros/{rel}' in data, rel


def test_colcon_build(tmp_path):
    colcon = Path(sys.prefix) / 'bin' / 'colcon'
    ws = tmp_path / 'ws'
    (ws / 'src').mkdir(parents=True)
    os.symlink(REPO, ws / 'src' / 'mm_fusion_ros')
    out = subprocess.run([str(colcon), 'build', '--base-paths', 'src'], cwd=ws,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    install = ws / 'install' / 'mm_fusion_ros'
    assert (install / 'share' / 'mm_fusion_ros' / 'package.xml').is_file()
    site = next(install.glob('lib/python3*/site-packages'))
    env = {'PATH': f'{Path(sys.executable).parent}:/usr/bin:/bin', 'PYTHONPATH': str(site)}
    for name in ('check_kitti', 'evaluate_odometry'):
        assert f'usage: {name}' in _run_exe(install / 'lib' / 'mm_fusion_ros' / name, env=env)
    # mm_fusion_run finds its parameter file and DDS profile in the workspace's share folder
    # (sys.prefix is the interpreter's; it looked only there).
    found = subprocess.run([sys.executable, '-c', 'from mm_fusion_ros.ros import runner; '
                            'print(runner.DEFAULT_CONFIG); print(runner.DDS_PROFILE)'],
                           env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert found.returncode == 0, found.stderr
    share = install / 'share' / 'mm_fusion_ros' / 'config'
    assert found.stdout.split() == [str(share / 'finetune.yaml'),
                                    str(share / 'fastdds_replay.xml')], found.stdout


# --- pip install . into a fresh venv, offline ---------------------------------------------------
def _installed_closure(requirements, extras):
    """The distributions of this env that `requirements` (texts, markers evaluated with
    `extras`) need, recursively; fails naming a requirement this env does not satisfy."""
    found, todo = {}, [(Requirement(t), ('',) + tuple(extras)) for t in requirements]
    while todo:
        req, marker_extras = todo.pop()
        if req.marker and not any(req.marker.evaluate({'extra': e}) for e in marker_extras):
            continue
        name = canonicalize_name(req.name)
        try:
            dist = md.distribution(req.name)
        except md.PackageNotFoundError:
            pytest.fail(f'{req} is needed but not installed in {sys.prefix}')
        assert req.specifier.contains(dist.version, prereleases=True), (str(req), dist.version)
        known = found.get(name, (None, set()))[1]
        if name in found and set(req.extras) <= known:
            continue
        found[name] = (dist, known | set(req.extras))
        todo += [(Requirement(t), ('',) + tuple(req.extras)) for t in dist.requires or []]
    return [dist for dist, _ in found.values()]


def _wheel_of_installed(dist, out_dir) -> Path:
    """Pack an installed distribution back into a wheel, from the files its RECORD lists.

    The wheels this env was installed from are not kept on disk (pip's cache may be empty), so
    this is how the fresh venv gets exactly this env's versions without a network: files under
    site-packages go to the wheel's root, other files under the prefix to <name>.data/data/, and
    console scripts are left to pip, which writes them from entry_points.txt. Stored, not
    compressed: torch is ~750 MB and deflating it would dominate the test's time.
    """
    assert dist.files, f'{dist.name}: no RECORD, so its files are unknown (not installed by pip)'
    site, prefix = Path(dist.locate_file('')), Path(sys.prefix)
    info = next(f.parts[0] for f in dist.files
                if f.parts[0].endswith('.dist-info') and f.name == 'METADATA')
    data = info[:-len('.dist-info')] + '.data'
    scripts = {e.name for e in dist.entry_points if e.group in ('console_scripts', 'gui_scripts')}
    skip = {f'{info}/{n}' for n in ('RECORD', 'INSTALLER', 'REQUESTED', 'direct_url.json')}
    path = Path(out_dir) / f'{info[:-len(".dist-info")]}-py3-none-any.whl'
    record = []
    with zipfile.ZipFile(path, 'w', zipfile.ZIP_STORED) as zf:
        for f in dist.files:
            src = Path(os.path.normpath(dist.locate_file(f)))
            if str(f) in skip or '__pycache__' in f.parts or f.suffix == '.pyc' or \
                    not src.is_file():
                continue
            if src.is_relative_to(site):
                arc = src.relative_to(site).as_posix()
            elif src.is_relative_to(prefix / 'bin'):
                if src.name in scripts:
                    continue
                arc = f'{data}/scripts/{src.name}'
            elif src.is_relative_to(prefix):
                arc = f'{data}/data/{src.relative_to(prefix).as_posix()}'
            else:
                raise AssertionError(f'{dist.name}: {src} is outside {prefix}')
            digest, size = hashlib.sha256(), 0
            with open(src, 'rb') as fin, zf.open(zipfile.ZipInfo.from_file(src, arc), 'w') as out:
                while chunk := fin.read(1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
            b64 = base64.urlsafe_b64encode(digest.digest()).rstrip(b'=').decode()
            record.append(f'{arc},sha256={b64},{size}')
        zf.writestr(f'{info}/RECORD', '\n'.join(record + [f'{info}/RECORD,,']) + '\n')
    return path


def _pip_install(venv, house, target):
    """pip install `target` into `venv` from the wheels in `house` only: no index, no config."""
    env = {k: v for k, v in os.environ.items() if not k.startswith('PIP_')}
    env.update(PIP_CONFIG_FILE=os.devnull, PYTHONNOUSERSITE='1')
    out = subprocess.run([sys.executable, '-m', 'pip', '--python', str(venv / 'bin' / 'python'),
                          'install', '-q', '--no-index', '--find-links', str(house),
                          '--no-compile', '--no-cache-dir', target],
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.fixture
def scratch(tmp_path):
    """A folder for ~2.7 GB of wheels and venv, removed afterwards (pytest keeps the folders of
    its last runs). On tmpfs when it has room: on disk, writing and deleting it took minutes
    on the shared development machine."""
    shm = Path('/dev/shm')
    base = shm if shm.is_dir() and shutil.disk_usage(shm).free > 6 << 30 else tmp_path
    folder = Path(tempfile.mkdtemp(prefix='mm_fusion_ros_install_', dir=base))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_pip_install_alone_gives_runnable_commands(wheel, scratch):
    """`pip install .` into a fresh venv brings all that the commands need (each answers --help)
    and resolves torch to the locked CPU build; `.[ros]` then adds the nodes."""
    t0, tmp_path = time.monotonic(), scratch
    house = tmp_path / 'wheels'
    house.mkdir()
    requires = md.metadata('mm_fusion_ros').get_all('Requires-Dist')
    with ThreadPoolExecutor(2) as pool:   # hashing and zip CRCs release the GIL
        list(pool.map(lambda d: _wheel_of_installed(d, house),
                      _installed_closure(requires, extras=('ros',))))
    venv = tmp_path / 'venv'
    subprocess.run([sys.executable, '-m', 'venv', '--without-pip', str(venv)], check=True,
                   timeout=120)

    _pip_install(venv, house, str(wheel))
    site = next((venv / 'lib').glob('python3*/site-packages'))
    assert [p.name for p in site.glob('torch-*.dist-info')] == ['torch-2.13.0+cpu.dist-info']
    _all_answer(venv, [[name, '--help'] for name in sorted(set(ENTRY_POINTS) - set(ROS_SCRIPTS))])
    _main_commands_run(venv, tmp_path / 'tiny')

    _pip_install(venv, house, f'{wheel}[ros]')
    # The nodes' --help lists their parameters without starting anything; importing their
    # modules brings rclpy, the interfaces and torch.
    _all_answer(venv, [[name, '--help'] for name in ROS_SCRIPTS])
    print(f'fresh venv: wheels, installs and {len(ENTRY_POINTS)} commands in '
          f'{time.monotonic() - t0:.0f} s')


def _main_commands_run(venv, work):
    """pip install . alone runs the offline job on a tiny tree: synthetic data, training, a
    prediction and its KITTI metrics (one torch thread, a tiny model)."""
    env = {'PATH': f'{venv / "bin"}:/usr/bin:/bin', 'HOME': str(venv), 'OMP_NUM_THREADS': '1'}
    data, ckpt, pred = work / 'data', work / 'tiny.pth', work / 'pred'
    for cmd in (
            ['synth_kitti', '--out', data, '--sequences', '00,01', '--frames', '6',
             '--image_width', '96', '--image_height', '32', '--azimuth_steps', '300'],
            ['train_multimodal', '--data_path', data, '--train_sequences', '00',
             '--val_sequences', '01', '--num_epochs', '1', '--batch_size', '2',
             '--output_checkpoint', ckpt, '--image_height', '32', '--image_width', '96',
             '--visual_encoder', 'dummy', '--bev_cells', '32', '--max_points', '512'],
            ['predict_odometry', '--checkpoint', ckpt, '--data_path', data, '--sequences', '01',
             '--out_dir', pred],
            ['evaluate_odometry', '--gt', data / 'poses' / '01.txt', '--pred', pred / '01.txt']):
        out = subprocess.run([str(c) for c in cmd], env=env, cwd=work.parent, capture_output=True,
                             text=True, timeout=600)
        assert out.returncode == 0, f'{cmd[0]}: {out.stdout[-2000:]}{out.stderr[-4000:]}'
    assert 'ATE[m]' in out.stdout and 'prediction' in out.stdout, out.stdout


def _all_answer(venv, commands):
    """Run the commands at once (each imports torch: seconds of CPU), outside the source tree
    and this env; each must exit 0, a console script printing its usage."""
    env = {'PATH': f'{venv / "bin"}:/usr/bin:/bin', 'HOME': str(venv), 'ROS_DOMAIN_ID': '0'}
    procs = [(cmd, subprocess.Popen(cmd, env=env, cwd='/', stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)) for cmd in commands]
    for cmd, proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f'{cmd}: {err}'
        assert cmd[1] != '--help' or f'usage: {cmd[0]}' in out, (cmd, out)
