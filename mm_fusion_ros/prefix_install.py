"""Place node executables and share files where ROS 2 looks for them, for pip installs.

`ros2 run` / `ros2 launch` find executables in PREFIX/lib/mm_fusion_ros/ and package files in
PREFIX/share/mm_fusion_ros/. colcon and a regular `pip install .` put them there from setup.py's
data_files; an editable `pip install -e .` cannot (setuptools drops data_files in editable mode),
so after it run `python -m mm_fusion_ros.prefix_install` (dev.sh does). Standard library only:
setup.py imports this file at build time.
"""
import argparse
import os
from pathlib import Path
import shutil
import sys

PACKAGE = 'mm_fusion_ros'

# Console scripts; each also becomes PREFIX/lib/mm_fusion_ros/<name>.
ENTRY_POINTS = {
    'synth_kitti': 'mm_fusion_ros.cli.synth_kitti:main',
    'check_kitti': 'mm_fusion_ros.cli.check_kitti:main',
    'kitti_to_bag': 'mm_fusion_ros.cli.kitti_to_bag:main',
    'bag_player': 'mm_fusion_ros.ros.bag_player:main',
    'train_multimodal': 'mm_fusion_ros.training.offline:main',
    'train_imu_filter': 'mm_fusion_ros.filter.train:main',
    'predict_odometry': 'mm_fusion_ros.cli.predict_odometry:main',
    'evaluate_odometry': 'mm_fusion_ros.cli.evaluate_odometry:main',
    'online_finetune': 'mm_fusion_ros.ros.online:main',
    'synchronizer': 'mm_fusion_ros.ros.online:synchronizer_main',
    'mm_fusion_run': 'mm_fusion_ros.ros.runner:main',
}

# Both a POSIX shell script and Python: the shell line re-executes the file with the prefix's
# python3 (a venv or /usr), else python3 on PATH (a colcon prefix has no interpreter of its own).
# The __main__ guard matters: a process that multiprocessing spawns (the learner, the intake)
# runs this file again as __mp_main__; without the guard it would start the node a second time.
WRAPPER = """#!/bin/sh
'''true'; py="$(dirname -- "$0")/../../bin/python3"
[ -x "$py" ] || py=python3
exec "$py" "$0" "$@"
' '''
import sys
from {module} import {func}
if __name__ == '__main__':
    sys.exit({func}())
"""

SHARE_DIRS = ('launch', 'config')


def write_wrappers(out_dir) -> list:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, target in sorted(ENTRY_POINTS.items()):
        module, func = target.split(':')
        path = out_dir / name
        path.write_text(WRAPPER.format(module=module, func=func))
        path.chmod(0o755)
        paths.append(str(path))
    return paths


def install(prefix, source_dir) -> None:
    """Wrappers into PREFIX/lib/PACKAGE; package.xml, launch/, config/ linked into share/."""
    prefix, source_dir = Path(prefix), Path(source_dir).resolve()
    if not (source_dir / 'package.xml').is_file():
        raise FileNotFoundError(f'{source_dir}/package.xml not found: pass --source_dir')
    write_wrappers(prefix / 'lib' / PACKAGE)
    index = prefix / 'share' / 'ament_index' / 'resource_index' / 'packages'
    index.mkdir(parents=True, exist_ok=True)
    (index / PACKAGE).touch()
    share = prefix / 'share' / PACKAGE
    share.mkdir(parents=True, exist_ok=True)
    _replace_with_link(share / 'package.xml', source_dir / 'package.xml')
    for name in SHARE_DIRS:
        # Real folders of per-file symlinks: ros2launch finds launch files with os.walk, which
        # does not enter a symlinked folder; the file links keep an editable install editable.
        folder = share / name
        if folder.is_symlink() or folder.is_file():
            folder.unlink()
        folder.mkdir(exist_ok=True)
        for old in folder.iterdir():
            if old.is_symlink():
                old.unlink()
        for src in sorted((source_dir / name).iterdir()):
            if src.is_file():
                _replace_with_link(folder / src.name, src)


def _replace_with_link(link, target):
    if link.is_symlink() or link.is_file():
        link.unlink()
    elif link.is_dir():
        shutil.rmtree(link)
    os.symlink(target, link)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--prefix', default=sys.prefix, help='install prefix (default: this env)')
    parser.add_argument('--source_dir', default=Path(__file__).resolve().parents[1],
                        help='the package source tree (default: the one this file is in)')
    args = parser.parse_args(argv)
    install(args.prefix, args.source_dir)
    print(f'installed {len(ENTRY_POINTS)} executables in {Path(args.prefix) / "lib" / PACKAGE}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
