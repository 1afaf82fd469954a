"""Replay a KITTI bag: `ros2 bag play` where rosbag2 is installed, else this package's bag_player.

  ros2 launch mm_fusion_ros replay.launch.py bag:=bags/kitti_00 rate:=1.0 loop:=false wait:=true

The player gets config/fastdds_replay.xml as FASTDDS_DEFAULT_PROFILES_FILE unless it is set.
"""
import importlib.util
import os
import shutil

from ament_index_python.packages import get_package_share_directory
from launch.actions import DeclareLaunchArgument, ExecuteProcess, OpaqueFunction
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

from launch import LaunchDescription


def dds_env():
    """Replay Fast DDS profile for the player, unless the user set one."""
    if os.environ.get('FASTDDS_DEFAULT_PROFILES_FILE'):
        return {}
    profile = os.path.join(get_package_share_directory('mm_fusion_ros'), 'config',
                           'fastdds_replay.xml')
    return {'FASTDDS_DEFAULT_PROFILES_FILE': profile} if os.path.isfile(profile) else {}


def _player(context):
    bag = LaunchConfiguration('bag').perform(context)
    rate = LaunchConfiguration('rate').perform(context)
    loop = LaunchConfiguration('loop').perform(context).lower() == 'true'
    clock = LaunchConfiguration('clock').perform(context).lower() == 'true'
    extra = (['--loop'] if loop else []) + (['--clock'] if clock else [])
    if shutil.which('ros2') and importlib.util.find_spec('ros2bag') is not None:
        return [ExecuteProcess(cmd=['ros2', 'bag', 'play', bag, '--rate', rate, *extra],
                               output='screen', name='ros2_bag_play', additional_env=dds_env())]
    wait = LaunchConfiguration('wait').perform(context).lower() == 'true'
    return [Node(package='mm_fusion_ros', executable='bag_player', name='bag_player',
                 arguments=[bag, '--rate', rate, *extra] + ([] if wait else ['--no_wait']),
                 output='screen', additional_env=dds_env())]


def generate_launch_description():
    return LaunchDescription([
        DeclareLaunchArgument('bag', description='rosbag2 folder to replay'),
        DeclareLaunchArgument('rate', default_value='1.0', description='replay rate'),
        DeclareLaunchArgument('loop', default_value='false', description='loop the bag'),
        DeclareLaunchArgument('clock', default_value='false', description='publish /clock'),
        DeclareLaunchArgument('wait', default_value='true',
                              description='bag_player: wait (at most 30 s) for matched '
                                          'subscribers before playing'),
        OpaqueFunction(function=_player),
    ])
