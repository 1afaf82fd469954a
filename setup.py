"""ament_python package mm_fusion_ros: `pip install .` (plus extras), or colcon build in ROS 2.

The dependencies are declared here, once, as floors: below them the code is known not to work
(torch < 2.3 has no torch.amp.GradScaler('cuda'), rosbags < 0.10.10 no Kilted typestore) or
was never tried. requirements.txt pins the exact set that dev.sh and CI install and test; a
colcon build inside a ROS 2 install takes the same packages from rosdep (package.xml).
test/test_dependencies.py keeps the three in step with the imports.
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

# What every command needs (pip install .).
INSTALL_REQUIRES = [
    'matplotlib>=3.5',
    'numpy>=1.26',
    'pillow>=9.1',
    'rosbags>=0.10.10',
    'scipy>=1.10',
    'tensorboard>=2.10',    # torch.utils.tensorboard
    'torch>=2.3',           # requirements.txt: 2.13.0, the CPU build
    'tqdm>=4.62',
]
EXTRAS_REQUIRE = {
    # The nodes (pip install .[ros]): the ROS 2 Kilted wheels, no ROS install needed; rclpy, the
    # middleware dev.sh selects, and the interfaces the nodes and bag_player load.
    'ros': [
        'ros-rclpy>=9.1',
        'ros-rmw-fastrtps-cpp>=9.3',
        'ros-rcl-interfaces>=2.3',
        'ros-sensor-msgs>=5.5',
        'ros-geometry-msgs>=5.5',
        'ros-nav-msgs>=5.5',
        'ros-std-srvs>=5.5',
        'ros-diagnostic-msgs>=5.5',
        'ros-rosgraph-msgs>=2.3',
        'ros-ament-index-python>=1.11',
    ],
    # The KISS-ICP baseline of evaluate_odometry (--baseline kiss_icp).
    'kiss': ['kiss-icp>=1.0'],
    # The test suite's tools (it also needs .[ros,kiss]).
    'test': [
        'colcon-common-extensions>=0.3',
        'evo>=1.28',
        'mcap>=1.1',
        'mcap-ros2-support>=0.5',
        'packaging>=23',
        'pytest>=8',
        'pyyaml>=6.0',
        'ruff>=0.17.6',
    ],
}


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
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    python_requires='>=3.11',
    zip_safe=True,
    maintainer='mm_fusion_ros maintainers',
    maintainer_email='maintainers@mm-fusion-ros.invalid',
    description='Online training of a camera + LiDAR + IMU odometry model on KITTI (ROS 2).',
    license='Apache-2.0',
    entry_points={'console_scripts': [f'{k} = {v}' for k, v in ENTRY_POINTS.items()]},
)
