"""Online fine-tuning: online_finetune (synchronizer + trainer), a bag player, optionally RViz.

  ros2 launch mm_fusion_ros finetune.launch.py bag:=bags/kitti_00 \
      checkpoint:=pretrain_models/multimodal_initial.pth rate:=1.0 rviz:=true

The bag is played by `ros2 bag play` where the ROS 2 CLI has rosbag2, else by this package's
bag_player. Without `bag:=` only the online node starts (e.g. for a live robot or an external
player). Without the launch package (pip-only installs), `mm_fusion_run finetune` starts the same
processes from the same config. The player and the online node get config/fastdds_replay.xml as
FASTDDS_DEFAULT_PROFILES_FILE unless it is set (see that file). The online node keeps its own node
names (mm_fusion_trainer, mm_fusion_synchronizer): a launch `name=` would rename every node of
the process to one name.
"""
import importlib.util
import os
import shutil

from ament_index_python.packages import get_package_share_directory
from launch.actions import DeclareLaunchArgument, ExecuteProcess, OpaqueFunction
from launch.conditions import IfCondition
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

from launch import LaunchDescription

SENSOR_TOPICS = ['/kitti/camera/image_raw', '/kitti/velodyne/points', '/kitti/imu/data',
                 '/kitti/ground_truth/odom', '/tf_static', '/kitti/camera/camera_info']


def dds_env():
    """Replay Fast DDS profile for the processes started here, unless the user set one."""
    if os.environ.get('FASTDDS_DEFAULT_PROFILES_FILE'):
        return {}
    profile = os.path.join(get_package_share_directory('mm_fusion_ros'), 'config',
                           'fastdds_replay.xml')
    return {'FASTDDS_DEFAULT_PROFILES_FILE': profile} if os.path.isfile(profile) else {}


def _has_ros2_bag():
    return shutil.which('ros2') is not None and importlib.util.find_spec('ros2bag') is not None


def _player(context):
    bag = LaunchConfiguration('bag').perform(context)
    if not bag:
        return []
    rate = LaunchConfiguration('rate').perform(context)
    clock = LaunchConfiguration('use_sim_time').perform(context).lower() == 'true'
    if _has_ros2_bag():
        cmd = ['ros2', 'bag', 'play', bag, '--rate', rate]
        if clock:
            cmd.append('--clock')
        return [ExecuteProcess(cmd=cmd, output='screen', name='ros2_bag_play',
                               additional_env=dds_env())]
    args = [bag, '--rate', rate, '--wait_for_subscribers', '--topics', *SENSOR_TOPICS[:4]]
    if clock:
        args.append('--clock')
    return [Node(package='mm_fusion_ros', executable='bag_player', name='bag_player',
                 arguments=args, output='screen', additional_env=dds_env())]


def _online(context):
    share = get_package_share_directory('mm_fusion_ros')
    config = LaunchConfiguration('config').perform(context) or \
        os.path.join(share, 'config', 'finetune.yaml')
    overrides = {'use_sim_time': LaunchConfiguration('use_sim_time').perform(context) == 'true'}
    checkpoint = LaunchConfiguration('checkpoint').perform(context)
    if checkpoint:
        overrides['initial_checkpoint'] = checkpoint
    return [Node(package='mm_fusion_ros', executable='online_finetune',
                 parameters=[config, overrides], output='screen', emulate_tty=True,
                 additional_env=dds_env())]


def generate_launch_description():
    share = get_package_share_directory('mm_fusion_ros')
    return LaunchDescription([
        DeclareLaunchArgument('bag', default_value='', description='rosbag2 folder to replay'),
        DeclareLaunchArgument('checkpoint', default_value='',
                              description='initial checkpoint (empty: a fresh model)'),
        DeclareLaunchArgument('config', default_value='',
                              description='parameter file (default: config/finetune.yaml)'),
        DeclareLaunchArgument('rate', default_value='1.0', description='replay rate'),
        DeclareLaunchArgument('use_sim_time', default_value='false',
                              description='use the bag clock (/clock) instead of wall time'),
        DeclareLaunchArgument('rviz', default_value='true', description='start RViz'),
        OpaqueFunction(function=_online),
        OpaqueFunction(function=_player),
        Node(package='rviz2', executable='rviz2', name='rviz2', output='screen',
             arguments=['-d', os.path.join(share, 'config', 'mm_fusion.rviz')],
             condition=IfCondition(LaunchConfiguration('rviz'))),
    ])
