"""The bag player alone: how far behind its schedule it publishes, and its CPU, with the
read-ahead (`bag_player --read_ahead_mb`) against without it, on a bag in or out of the page cache.

    python bench/player.py [--rate 10] [--runs 3] [--read_ahead_mb 64] [--cold]
                           [--frames 450] [--image_size W H] [--azimuth_steps N] [--work_dir DIR]

The synthetic sequence of bench/online.py (full KITTI size by default; built once into
--work_dir) is played by `bag_player`, a process of its own, into a bare subscriber process
that takes the sensor topics (those bench/online.py plays) raw with the synchronizer's replay
QoS. Each run plays the bag once with --read_ahead_mb and once with 0 (no read-ahead), the order
alternating between runs. With --cold the bag's files are dropped from the page cache before
each play (posix_fadvise DONTNEED). Per play: the messages published more than 10 ms after
they were due and the latest (the player's report), the effective rate, the player's user and
system CPU (the whole process, its start-up included) and the messages the subscriber got.
Figures: docs/online_runtime.md, "Session 37".
"""
import argparse
import json
import os
from pathlib import Path
import random
import re
import signal
import subprocess
import sys
import tempfile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bag_args import add_bag_arguments  # noqa: E402  (beside this file)
from online import prepare_bag, SENSOR_TOPICS  # noqa: E402  (bench/online.py, beside this file)

from mm_fusion_ros.bag.playback import BagSource, LATE_S  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DDS_PROFILE = REPO / 'config' / 'fastdds_replay.xml'

SUBSCRIBER = """
import json, sys
import rclpy
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from mm_fusion_ros.ros.conversions import import_message_class
from mm_fusion_ros.ros.qos import input_qos
from mm_fusion_ros.bag import topics
rclpy.init()
node = rclpy.create_node('bench_player_sink')
big, small = input_qos('replay')
counts = {}
for topic, msgtype in json.loads(sys.argv[1]).items():
    counts[topic] = 0
    qos = big if topic in (topics.IMAGE_TOPIC, topics.CLOUD_TOPIC) else small
    node.create_subscription(import_message_class(msgtype), topic,
                             lambda raw, t=topic: counts.__setitem__(t, counts[t] + 1), qos,
                             raw=True)
executor = SingleThreadedExecutor()
executor.add_node(node)
print('ready', flush=True)
try:
    executor.spin()
except (KeyboardInterrupt, ExternalShutdownException):
    pass
print(json.dumps(counts), flush=True)
"""

REPORT = re.compile(r'effective rate ([\d.]+)x\).*?; (\d+) message\(s\) more than [\d.]+ ms '
                    r'behind schedule \(at most ([\d.]+) ms\)')


def evict(bag: Path) -> None:
    """Drop the bag's files from the page cache (pages mapped elsewhere may stay)."""
    for path in bag.iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def play(bag: Path, names, types: dict, rate: float, read_ahead_mb: float, env) -> dict:
    sink = subprocess.Popen([sys.executable, '-c', SUBSCRIBER, json.dumps(types)], env=env,
                            stdout=subprocess.PIPE, text=True)
    try:
        if sink.stdout.readline().strip() != 'ready':
            raise RuntimeError('the subscriber did not start')
        player = subprocess.Popen(
            [sys.executable, '-m', 'mm_fusion_ros.ros.bag_player', str(bag), '--rate', str(rate),
             '--read_ahead_mb', str(read_ahead_mb), '--topics', *names],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        out = player.stdout.read()
        _, status, usage = os.wait4(player.pid, 0)
        player.returncode = os.waitstatus_to_exitcode(status)
        sink.send_signal(signal.SIGINT)
        received = json.loads(sink.communicate(timeout=30)[0].strip().splitlines()[-1])
    finally:
        if sink.poll() is None:
            sink.kill()
    match = REPORT.search(out)
    if player.returncode != 0 or match is None:
        raise RuntimeError(f'bag_player failed (exit {player.returncode}):\n{out}')
    return {'rate': float(match.group(1)), 'late': int(match.group(2)),
            'late_max_ms': float(match.group(3)), 'user_s': usage.ru_utime,
            'sys_s': usage.ru_stime, 'received': sum(received.values())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_bag_arguments(p, frames=450)
    p.add_argument('--rate', type=float, default=10.0)
    p.add_argument('--runs', type=int, default=3)
    p.add_argument('--read_ahead_mb', type=float, default=64.0)
    p.add_argument('--cold', action='store_true',
                   help='drop the bag from the page cache before each play')
    args = p.parse_args(argv)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix='bench_player_'))
    bag = prepare_bag(work, args.frames, args.image_size, args.azimuth_steps)
    with BagSource(bag) as source:
        names = [t for t in SENSOR_TOPICS if t in source.topics]
        types = {t: source.topics[t].msgtype for t in names}
        total = sum(source.topics[t].count for t in names)
    env = {**os.environ, 'ROS_DOMAIN_ID': str(random.randint(50, 99)),
           'ROS_AUTOMATIC_DISCOVERY_RANGE': 'LOCALHOST', 'ROS_LOCALHOST_ONLY': '1',
           'FASTDDS_DEFAULT_PROFILES_FILE': str(DDS_PROFILE)}
    print(f'bag {bag} ({total} messages of {len(names)} topics), rate {args.rate:g}, '
          f'{"cold" if args.cold else "warm"} page cache, {os.cpu_count()} CPUs')
    print(f'{"run":>3} {"read-ahead MB":>13} | {"late > " + f"{LATE_S * 1e3:g} ms":>12} '
          f'{"latest ms":>9} | {"rate":>5} | {"user s":>6} {"sys s":>6} | received')
    variants = (args.read_ahead_mb, 0.0)
    for run in range(1, args.runs + 1):
        for mb in variants if run % 2 else variants[::-1]:
            if args.cold:
                evict(bag)
            r = play(bag, names, types, args.rate, mb, env)
            print(f'{run:>3} {mb:>13g} | {r["late"]:>12d} {r["late_max_ms"]:>9.1f} | '
                  f'{r["rate"]:>5.2f} | {r["user_s"]:>6.2f} {r["sys_s"]:>6.2f} | '
                  f'{r["received"]}/{total}', flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
