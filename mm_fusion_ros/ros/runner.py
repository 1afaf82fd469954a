"""mm_fusion_run: start what the launch files start, without the `launch` package.

No wheel exists for launch/launch_ros, so pip-only installs and CI use this runner. It reads the
same config file and starts the same processes as launch/*.launch.py:

  mm_fusion_run finetune --bag bags/kitti_00 [--checkpoint C] [--config config/finetune.yaml]
                         [--rate R] [--out_dir runs/online] [--set key:=value ...]
      online_finetune + bag_player; after the bag ends and the last pose is published, calls
      ~/save_checkpoint (the path it returns is printed), then stops the node with SIGINT
      (final checkpoint, buffer, trajectories) and prints a summary. The player plays the
      topics of the contract that the bag has (a bag without ground truth trains under
      train.supervision self, the online default). Where tf2_msgs does not import (pip-only
      installs) /tf_static cannot be played: the bag's static transforms go to the node as
      frames.static_transforms instead (a --set of it wins), so the samples carry the
      calibration the self-supervised losses need.
  mm_fusion_run replay --bag bags/kitti_00 [--rate R] [--loop]
      bag_player only, playing at once (= replay.launch.py wait:=false; the launch file
      waits for subscribers by default).

Child processes inherit this environment (ROS_DOMAIN_ID and the localhost DDS settings), plus
FASTDDS_DEFAULT_PROFILES_FILE=config/fastdds_replay.xml unless it is set (see that file: without
it, Fast DDS can stall a replayed topic for seconds).
"""
import argparse
import importlib.util
import json
import os
from pathlib import Path
import signal
import subprocess
import sys
import threading
import time

from mm_fusion_ros.bag import topics as contract
from mm_fusion_ros.bag.playback import replay_topics
from mm_fusion_ros.bag.reader import bag_topics, static_transforms
from mm_fusion_ros.sync.frames import transform_line


def _config_dir() -> Path:
    """config/ of a source checkout (editable install), else the share folder of the prefix
    this module is installed in (a venv, `pip install --prefix`, a colcon install: sys.prefix
    is the interpreter's, /usr for a colcon workspace), else the ament index's, else
    sys.prefix's."""
    here = Path(__file__).resolve()
    source = here.parents[2] / 'config'
    if source.is_dir():
        return source
    for prefix in here.parents[2:]:      # PREFIX/lib/pythonX.Y/site-packages/mm_fusion_ros/ros
        share = prefix / 'share' / 'mm_fusion_ros' / 'config'
        if share.is_dir():
            return share
    try:
        from ament_index_python.packages import get_package_share_directory
        return Path(get_package_share_directory('mm_fusion_ros')) / 'config'
    except (ImportError, KeyError, LookupError, OSError):
        return Path(sys.prefix) / 'share' / 'mm_fusion_ros' / 'config'


CONFIG_DIR = _config_dir()
DEFAULT_CONFIG = CONFIG_DIR / 'finetune.yaml'
DDS_PROFILE = CONFIG_DIR / 'fastdds_replay.xml'


def replay_env(base=None) -> dict:
    """The environment for the player and the online node: `base` (default os.environ) with
    the replay Fast DDS profile, unless the user chose a profile already."""
    env = dict(os.environ if base is None else base)
    if not env.get('FASTDDS_DEFAULT_PROFILES_FILE') and DDS_PROFILE.is_file():
        env['FASTDDS_DEFAULT_PROFILES_FILE'] = str(DDS_PROFILE)
    return env


def player_command(bag, rate, loop=False, topics=contract.REPLAY_TOPICS, wait=True):
    """bag_player; it waits for matched subscribers unless wait is False."""
    cmd = [sys.executable, '-m', 'mm_fusion_ros.ros.bag_player', str(bag), '--rate', str(rate)]
    cmd += (['--loop'] if loop else []) + (['--no_wait'] if not wait else [])
    return cmd + (['--topics', *topics] if topics else [])


def replay_plan(bag):
    """(topics to play, {node parameter: value} the bag implies): the contract's topics the
    bag has; its /tf_static as frames.static_transforms where tf2_msgs does not import (the
    node cannot read /tf_static then). Shared with launch/finetune.launch.py."""
    available = bag_topics(bag)
    names = replay_topics(bag, available)
    params = {}
    if contract.TF_STATIC_TOPIC in available and importlib.util.find_spec('tf2_msgs') is None:
        params['frames.static_transforms'] = [transform_line(*t) for t in static_transforms(bag)]
    return names, params


def online_command(config, out_dir, checkpoint=None, overrides=()):
    out = Path(out_dir)
    params = {'checkpoint_dir': out / 'checkpoints', 'trajectory_dir': out / 'trajectory',
              'log_csv': out / 'online_log.csv', 'tensorboard_dir': out / 'tensorboard'}
    if checkpoint:
        params['initial_checkpoint'] = checkpoint
    cmd = [sys.executable, '-m', 'mm_fusion_ros.ros.online', '--ros-args']
    if config:
        cmd += ['--params-file', str(config)]
    for key, value in params.items():
        cmd += ['-p', f'{key}:={value}']
    for item in overrides:
        if ':=' not in item:
            raise ValueError(f'--set {item!r}: expected key:=value')
        cmd += ['-p', item]
    return cmd


class OdomWatcher:
    """Counts /mm_fusion/odom messages and calls the trainer's services (rclpy client side)."""

    def __init__(self):
        from nav_msgs.msg import Odometry
        import rclpy
        from std_srvs.srv import SetBool, Trigger
        rclpy.init(args=['mm_fusion_run'])   # not sys.argv: rcl read --set's k:=v as remaps
        self.rclpy = rclpy
        self.node = rclpy.create_node('mm_fusion_run')
        self.count = 0
        self.last_wall = time.monotonic()
        self.odom_sub = self.node.create_subscription(Odometry, contract.ODOM_OUT_TOPIC,
                                                      self._on_odom, 100)
        self.save = self.node.create_client(Trigger, contract.SAVE_SERVICE)
        self.set_training = self.node.create_client(SetBool, contract.SET_TRAINING_SERVICE)
        self.Trigger, self.SetBool = Trigger, SetBool
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._spin, daemon=True)
        self._thread.start()

    def _spin(self):
        while not self._stop.is_set() and self.rclpy.ok():
            self.rclpy.spin_once(self.node, timeout_sec=0.1)

    def _on_odom(self, _msg):
        self.count += 1
        self.last_wall = time.monotonic()

    def wait_for_node(self, process, log_path, timeout_s):
        """Until the node's /mm_fusion/odom publisher matched ours, so no pose goes uncounted;
        RuntimeError if the node exits first or the deadline passes."""
        end = time.monotonic() + timeout_s
        while self.odom_sub.get_publisher_count() == 0:
            if process.poll() is not None:
                raise RuntimeError(f'online node exited with code {process.returncode} before '
                                   f'publishing /mm_fusion/odom; see {log_path}')
            if time.monotonic() > end:
                raise RuntimeError(f'online node did not advertise /mm_fusion/odom within '
                                   f'{timeout_s:.0f} s; see {log_path}')
            time.sleep(0.1)

    def wait_idle(self, idle_s, deadline_s):
        """Until no pose arrived for idle_s (the node flushed its last scans), or the deadline."""
        end = time.monotonic() + deadline_s
        while time.monotonic() < end and time.monotonic() - self.last_wall < idle_s:
            time.sleep(0.1)

    def call(self, client, request, timeout=60.0):
        if not client.wait_for_service(timeout_sec=timeout):
            raise RuntimeError(f'service {client.srv_name} not available after {timeout} s')
        future = client.call_async(request)
        end = time.monotonic() + timeout
        while not future.done() and time.monotonic() < end:
            time.sleep(0.05)
        if not future.done():
            raise RuntimeError(f'service {client.srv_name} did not answer in {timeout} s')
        return future.result()

    def close(self):
        self._stop.set()
        self._thread.join(timeout=5.0)
        self.node.destroy_node()
        self.rclpy.try_shutdown()


def run_finetune(args) -> int:
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = args.config if args.config else None
    try:
        names, bag_params = replay_plan(args.bag)
    except ValueError as e:
        print(f'mm_fusion_run: error: {e}', file=sys.stderr)
        return 2
    if bag_params:
        print(f'mm_fusion_run: no tf2_msgs here: the /tf_static of {args.bag} goes to the node '
              'as frames.static_transforms', flush=True)
    node_cmd = online_command(config, out_dir, args.checkpoint,
                              [f'{k}:={json.dumps(v)}' for k, v in bag_params.items()] + args.set)
    node_log = open(out_dir / 'online_node.log', 'w')
    env = replay_env()
    node = subprocess.Popen(node_cmd, stdout=node_log, stderr=subprocess.STDOUT, env=env)
    watcher = OdomWatcher()
    summary = {'bag': str(args.bag), 'out_dir': str(out_dir)}
    try:
        watcher.wait_for_node(node, out_dir / 'online_node.log', args.start_timeout)
        player = subprocess.run(player_command(args.bag, args.rate, topics=names),
                                capture_output=True, text=True, timeout=args.timeout, env=env)
        summary['player'] = player.stdout.strip().splitlines()[:1]
        if player.returncode != 0:
            print(player.stdout + player.stderr, file=sys.stderr)
            raise RuntimeError(f'bag_player failed with exit code {player.returncode}')
        watcher.wait_idle(idle_s=args.idle_s, deadline_s=120.0)
        summary['poses_published'] = watcher.count
        response = watcher.call(watcher.save, watcher.Trigger.Request())
        if not response.success:
            raise RuntimeError(f'save_checkpoint failed: {response.message}')
        summary['saved_checkpoint'] = response.message
        print(f'checkpoint saved by service call: {response.message}')
    finally:
        watcher.close()
        if node.poll() is None:
            node.send_signal(signal.SIGINT)
        try:
            code = node.wait(timeout=120)
        except subprocess.TimeoutExpired:
            node.kill()
            code = node.wait()
        node_log.close()
    summary['node_exit_code'] = code
    trajectory = out_dir / 'trajectory'
    summary['trajectory'] = sorted(str(p) for p in trajectory.glob('*.txt'))
    print(json.dumps(summary, indent=2))
    if code != 0:
        print(f'online node exited with {code}; see {out_dir / "online_node.log"}',
              file=sys.stderr)
    return code


def run_replay(args) -> int:
    return subprocess.call(player_command(args.bag, args.rate, loop=args.loop, topics=None,
                                          wait=False), env=replay_env())


def build_parser():
    p = argparse.ArgumentParser(prog='mm_fusion_run', description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest='command', required=True)
    ft = sub.add_parser('finetune', help='online fine-tuning on a replayed bag')
    ft.add_argument('--bag', type=Path, required=True, help='rosbag2 folder to replay')
    ft.add_argument('--checkpoint', default=None, help='initial checkpoint (default: fresh model)')
    ft.add_argument('--config', default=str(DEFAULT_CONFIG), help='ROS parameter file')
    ft.add_argument('--rate', type=float, default=1.0, help='replay rate (x real time)')
    ft.add_argument('--out_dir', default='runs/online', help='checkpoints, logs, trajectories')
    ft.add_argument('--set', action='append', default=[], metavar='KEY:=VALUE',
                    help='extra node parameter, e.g. --set updates_per_sample:=4.0')
    ft.add_argument('--idle_s', type=float, default=2.5,
                    help='the run is over when no pose arrived for this long after the bag')
    ft.add_argument('--timeout', type=float, default=3600.0, help='max replay time [s]')
    ft.add_argument('--start_timeout', type=float, default=120.0,
                    help='max time for the online node to start (load model, checkpoint) [s]')
    rp = sub.add_parser('replay', help='play a bag (bag_player)')
    rp.add_argument('--bag', type=Path, required=True, help='rosbag2 folder to replay')
    rp.add_argument('--rate', type=float, default=1.0, help='replay rate (x real time)')
    rp.add_argument('--loop', action='store_true', help='play again from the start until stopped')
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not (args.bag / 'metadata.yaml').is_file():
        parser.error(f'--bag {args.bag}: not a rosbag2 folder (no metadata.yaml)')
    if args.command == 'finetune':
        if args.config and not Path(args.config).is_file():
            parser.error(f'--config {args.config}: file not found')
        return run_finetune(args)
    return run_replay(args)


if __name__ == '__main__':
    sys.exit(main())
