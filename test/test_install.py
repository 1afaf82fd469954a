"""Both installs put executables where `ros2 run/launch` look (DESIGN §1): the editable pip
install this suite runs in (dev.sh), a regular pip install into a prefix, and colcon build."""
import os
from pathlib import Path
import shutil
import subprocess
import sys
import zipfile

from mm_fusion_ros.prefix_install import ENTRY_POINTS

REPO = Path(__file__).resolve().parents[1]


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


def test_ament_index_finds_the_package():
    env = dict(os.environ, AMENT_PREFIX_PATH=sys.prefix)
    code = ('from ament_index_python.packages import get_package_share_directory as g;'
            'print(g("mm_fusion_ros"))')
    out = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip(), 'package.xml').is_file()


def test_regular_pip_install_places_data_files(tmp_path):
    """A wheel's .data/data/ tree is what pip installs under PREFIX (without touching this env)."""
    src = tmp_path / 'src'
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(
        '.venv', '.git', 'build', 'data', 'data_*', '*.egg-info', '__pycache__', 'bags',
        'logs', 'results', 'pretrain_models', 'runs', 'demo_out'))
    subprocess.run([sys.executable, '-m', 'pip', 'wheel', '-q', '--no-deps',
                    '--no-build-isolation', '-w', str(tmp_path / 'wheel'), str(src)],
                   check=True, capture_output=True, timeout=300)
    wheel = next((tmp_path / 'wheel').glob('mm_fusion_ros-*.whl'))
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
