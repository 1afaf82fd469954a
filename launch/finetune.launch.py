"""Online fine-tuning: online_finetune (synchronizer + trainer), a bag player, optionally RViz.

  ros2 launch mm_fusion_ros finetune.launch.py bag:=bags/kitti_00 \
      checkpoint:=pretrain_models/multimodal_initial.pth rate:=1.0 rviz:=true supervision:=self

The bag is played by `ros2 bag play` where the ROS 2 CLI has rosbag2, else by this package's
bag_player. Either starts only once the online node printed that it is ready (topics.READY_LINE;
torch and the model load first): an event handler on the node's output starts it. bag_player then
also waits for its subscribers to be matched; `ros2 bag play` gets `--delay play_delay` seconds
for that discovery. Without `bag:=` only the online node starts (e.g. for a live robot or an
external player). `supervision:=gt|self|both` sets train.supervision (empty: the config's, else
the node's default, self). Both players play only the topics the bag has, so a bag without
ground truth plays. Without the launch package (pip-only installs), `mm_fusion_run finetune`
starts the same processes from the same config. The player and the online node get
config/fastdds_replay.xml as FASTDDS_DEFAULT_PROFILES_FILE unless it is set (see that file). The
online node keeps its own node names (mm_fusion_trainer, mm_fusion_synchronizer): a launch
`name=` would rename every node of the process to one name.
"""
import importlib.util
import os
import shutil

from ament_index_python.packages import get_package_share_directory
from launch.actions import (
    DeclareLaunchArgument,
    ExecuteProcess,
    LogInfo,
    OpaqueFunction,
    RegisterEventHandler,
)
from launch.conditions import IfCondition
from launch.event_handlers import OnProcessIO
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

from launch import LaunchDescription
from mm_fusion_ros.bag import topics
from mm_fusion_ros.ros.runner import replay_plan


def dds_env():
    """Replay Fast DDS profile for the processes started here, unless the user set one."""
    if os.environ.get('FASTDDS_DEFAULT_PROFILES_FILE'):
        return {}
    profile = os.path.join(get_package_share_directory('mm_fusion_ros'), 'config',
                           'fastdds_replay.xml')
    return {'FASTDDS_DEFAULT_PROFILES_FILE': profile} if os.path.isfile(profile) else {}


def _has_ros2_bag():
    return shutil.which('ros2') is not None and importlib.util.find_spec('ros2bag') is not None


def _sim_time(context) -> bool:
    return LaunchConfiguration('use_sim_time').perform(context).lower() == 'true'


def _player(context, bag, names):
    """The player action for bag:= (bag_player plays `names`)."""
    rate = LaunchConfiguration('rate').perform(context)
    clock = _sim_time(context)
    if _has_ros2_bag():
        cmd = ['ros2', 'bag', 'play', bag, '--rate', rate,
               '--delay', LaunchConfiguration('play_delay').perform(context)]
        return ExecuteProcess(cmd=cmd + (['--clock'] if clock else []), output='screen',
                              name='ros2_bag_play', additional_env=dds_env())
    args = [bag, '--rate', rate, '--topics', *names] + (['--clock'] if clock else [])
    return Node(package='mm_fusion_ros', executable='bag_player', name='bag_player',
                arguments=args, output='screen', additional_env=dds_env())


def _online(context):
    """online_finetune, and the player started by the first ready line on its output."""
    share = get_package_share_directory('mm_fusion_ros')
    config = LaunchConfiguration('config').perform(context) or \
        os.path.join(share, 'config', 'finetune.yaml')
    overrides = {'use_sim_time': _sim_time(context)}
    checkpoint = LaunchConfiguration('checkpoint').perform(context)
    if checkpoint:
        overrides['initial_checkpoint'] = checkpoint
    supervision = LaunchConfiguration('supervision').perform(context)
    if supervision:
        overrides['train.supervision'] = supervision
    bag = LaunchConfiguration('bag').perform(context)
    names, bag_params = replay_plan(bag) if bag else ((), {})
    overrides = {**bag_params, **overrides}   # the bag's static transforms without tf2_msgs
    online = Node(package='mm_fusion_ros', executable='online_finetune',
                  parameters=[config, overrides], output='screen', emulate_tty=True,
                  additional_env=dds_env())
    if not bag:
        return [online]
    player = _player(context, bag, names)
    started = []

    def on_output(event):
        if not started and topics.READY_LINE.encode() in event.text:
            started.append(True)
            return [LogInfo(msg='online node ready: starting the player'), player]
        return None

    return [online, RegisterEventHandler(OnProcessIO(target_action=online, on_stdout=on_output,
                                                     on_stderr=on_output))]


def generate_launch_description():
    share = get_package_share_directory('mm_fusion_ros')
    return LaunchDescription([
        DeclareLaunchArgument('bag', default_value='', description='rosbag2 folder to replay'),
        DeclareLaunchArgument('checkpoint', default_value='',
                              description='initial checkpoint (empty: a fresh model)'),
        DeclareLaunchArgument('config', default_value='',
                              description='parameter file (default: config/finetune.yaml)'),
        DeclareLaunchArgument('rate', default_value='1.0', description='replay rate'),
        DeclareLaunchArgument('supervision', default_value='',
                              description='train.supervision: gt | self | both (empty: the '
                                          "config's, else self)"),
        DeclareLaunchArgument('use_sim_time', default_value='false',
                              description='use the bag clock (/clock) instead of wall time'),
        DeclareLaunchArgument('rviz', default_value='true', description='start RViz'),
        DeclareLaunchArgument('play_delay', default_value='1.0',
                              description='ros2 bag play only: seconds between its start and '
                                          'its first message, for DDS discovery'),
        OpaqueFunction(function=_online),
        OpaqueFunction(function=lambda context: [_rviz(context, share)]),
    ])


def _rviz(context, share):
    """RViz on the clock of the poses it shows: with use_sim_time their stamps are bag time,
    and an RViz on wall time would find no transform for any of them."""
    return Node(package='rviz2', executable='rviz2', name='rviz2', output='screen',
                arguments=['-d', os.path.join(share, 'config', 'mm_fusion.rviz')],
                parameters=[{'use_sim_time': _sim_time(context)}],
                condition=IfCondition(LaunchConfiguration('rviz')))
