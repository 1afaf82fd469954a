"""ament_python package mm_fusion_ros: colcon build, or pip install -e . beside the ROS 2 wheels.

Dependencies are pinned in requirements.txt, not here: a colcon build inside a ROS 2 install
takes them from rosdep (package.xml), a pip install from requirements.txt.
"""
from glob import glob
import importlib.util

from setuptools import find_packages, setup

PACKAGE = 'mm_fusion_ros'

# Executables and their PREFIX/lib/mm_fusion_ros wrappers are defined once, in prefix_install.
_spec = importlib.util.spec_from_file_location('prefix_install', 'mm_fusion_ros/prefix_install.py')
prefix_install = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(prefix_install)
ENTRY_POINTS = prefix_install.ENTRY_POINTS


setup(
    name=PACKAGE,
    version='0.1.0',
    packages=find_packages(exclude=['test', 'test.*', 'bench']),
    data_files=[
        ('share/ament_index/resource_index/packages', [f'resource/{PACKAGE}']),
        (f'share/{PACKAGE}', ['package.xml']),
        (f'share/{PACKAGE}/launch', glob('launch/*.py')),
        (f'share/{PACKAGE}/config', glob('config/*')),
        (f'lib/{PACKAGE}', prefix_install.write_wrappers('build/lib_wrappers')),
    ],
    install_requires=['setuptools'],
    zip_safe=True,
    maintainer='mm_fusion_ros maintainers',
    maintainer_email='maintainers@mm-fusion-ros.invalid',
    description='Online training of a camera + LiDAR + IMU odometry model on KITTI (ROS 2).',
    license='Apache-2.0',
    entry_points={'console_scripts': [f'{k} = {v}' for k, v in ENTRY_POINTS.items()]},
)
