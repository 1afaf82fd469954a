"""Soak: a looped replay into online_finetune with training on, for as long as asked.

    python bench/soak.py [--duration_s 1200] [--rate 1] [--frames 150] [--buffer 1000]
                         [--window_s 60] [--image_size W H] [--azimuth_steps N]
                         [--work_dir DIR] [--set key:=value ...]

The synthetic sequence of bench/online.py (by default full KITTI size: 1241x376 images, ~128k-point
scans, 100 Hz IMU; built once into --work_dir) is played in a loop by the player inside this
process (bag_player's node) into `online_finetune` (config/finetune.yaml, Dummy visual encoder,
a fresh model) running in a process of its own, until --duration_s of wall time have passed.
Each pass of the bag is a new synchronizer run and trajectory segment; the model, optimiser and
replay buffer carry on.

Every --window_s it reports, for that window: the node's RSS (median of samples every 0.25 s),
poses/s, gradient steps/s (the trainer's /diagnostics), the p50/p95 latency from publishing a
scan to receiving its pose, and the drops so far (synchronizer drop counters; messages published
minus received; scans without a pose). At the end: whether RSS is flat once the buffer is full
(median over the second half of the time after the fill within 2% of the first half's), the
total drops, steps/s over the windows and the p95 latency of the whole run.
Targets: RSS flat after the fill, zero drops, steady steps/s (figures: docs/online_runtime.md).
"""
import argparse
from collections import defaultdict
import os
from pathlib import Path
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bag_args import add_bag_arguments  # noqa: E402  (beside this file)
import numpy as np  # noqa: E402
from online import (  # noqa: E402  (bench/online.py, beside this file)
    cloud_stamp,
    prepare_bag,
    ProcSampler,
    wait_for,
)
import rclpy  # noqa: E402
from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from rclpy.qos import QoSProfile, ReliabilityPolicy  # noqa: E402

from mm_fusion_ros.bag import topics  # noqa: E402
from mm_fusion_ros.bag.playback import BagSource  # noqa: E402
from mm_fusion_ros.ros.bag_player import BagPlayer  # noqa: E402
from mm_fusion_ros.ros.runner import DDS_PROFILE, DEFAULT_CONFIG  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TARGET_RSS_GROWTH = 0.02
DIAG_KEY = {topics.IMAGE_TOPIC: 'received_image', topics.CLOUD_TOPIC: 'received_cloud',
            topics.IMU_TOPIC: 'received_imu', topics.GT_ODOM_TOPIC: 'received_ground_truth'}


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--duration_s', type=float, default=1200.0, help='wall time of the soak')
    p.add_argument('--rate', type=float, default=1.0, help='replay rate')
    add_bag_arguments(p)     # --frames (the looped sequence), --image_size, --azimuth_steps, ...
    p.add_argument('--buffer', type=int, default=1000, help='replay buffer capacity [samples]')
    p.add_argument('--window_s', type=float, default=60.0, help='report every this long')
    p.add_argument('--set', action='append', default=[], metavar='KEY:=VALUE',
                   help='extra node parameter, e.g. --set updates_per_sample:=1.0')
    return p


class SoakPlayer(BagPlayer):
    """bag_player's node, noting when each scan was published, pass after pass."""

    def __init__(self, source, names):
        super().__init__(source, names)
        self.published_at = defaultdict(list)    # scan stamp -> publish times, one per pass

    def _publish(self, topic, publisher, raw):
        ok = super()._publish(topic, publisher, raw)
        if ok and topic == topics.CLOUD_TOPIC:
            self.published_at[cloud_stamp(raw)].append(time.monotonic())
        return ok


class Listener:
    """Odometry arrivals (per stamp, one per pass) and the latest status of each node."""

    def __init__(self):
        from diagnostic_msgs.msg import DiagnosticArray
        from nav_msgs.msg import Odometry
        self.node = rclpy.create_node('bench_soak_listener')
        self.lock = threading.Lock()
        self.arrivals = defaultdict(list)
        self.statuses = {}
        self.odom_sub = self.node.create_subscription(
            Odometry, topics.ODOM_OUT_TOPIC, self._on_odom,
            QoSProfile(depth=1000, reliability=ReliabilityPolicy.RELIABLE))
        self.node.create_subscription(DiagnosticArray, '/diagnostics', self._on_diag, 50)
        self.executor = SingleThreadedExecutor()
        self.executor.add_node(self.node)
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)
        self.thread.start()

    def _on_odom(self, msg):
        now = time.monotonic()
        with self.lock:
            self.arrivals[msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec] \
                .append(now)

    def _on_diag(self, msg):
        with self.lock:
            for status in msg.status:
                self.statuses[status.name.split(': ')[-1]] = \
                    {kv.key: kv.value for kv in status.values}

    def status(self, name) -> dict:
        with self.lock:
            return dict(self.statuses.get(name, {}))

    def poses(self) -> int:
        with self.lock:
            return sum(len(v) for v in self.arrivals.values())

    def close(self):
        self.executor.shutdown(timeout_sec=5.0)
        self.node.destroy_node()


def latencies(published_at, arrivals, t0, t1) -> np.ndarray:
    """Publish-to-pose latency [ms] of the poses that arrived in [t0, t1): a pose belongs to
    the last publication of its scan before it arrived (a pass earlier is a bag length ago)."""
    out = []
    for stamp, arrived in list(arrivals.items()):
        sent = np.array(published_at.get(stamp, []))
        for a in arrived:
            before = sent[sent <= a]
            if t0 <= a < t1 and len(before):
                out.append((a - before[-1]) * 1e3)
    return np.array(out)


def node_command(args, out: Path):
    cmd = [sys.executable, '-m', 'mm_fusion_ros.ros.online', '--ros-args',
           '--params-file', str(DEFAULT_CONFIG)]
    params = {'model.visual_encoder': 'dummy', 'buffer.capacity': args.buffer,
              'checkpoint_dir': out / 'ckpt', 'save_on_shutdown': 'false',
              'trajectory_dir': out / 'trajectory'}
    cmd += [a for k, v in params.items() for a in ('-p', f'{k}:={v}')]
    return cmd + [a for item in args.set for a in ('-p', item)]


def play_until(player, source, rate, end_wall):
    """Passes of the bag until end_wall (the pass under way is finished)."""
    start_ns, stop_ns = source.window(0.0, None)
    while time.monotonic() < end_wall:
        player.play(start_ns, stop_ns, rate, loop=False)


def report_window(k, t0, t1, rss, player, listener, prev):
    samples = [mb for t, mb, _ in rss.samples if t0 <= t < t1]
    trainer, sync = listener.status('trainer'), listener.status('synchronizer')
    steps = int(trainer.get('online_steps', 0))
    poses = listener.poses()
    lat = latencies(player.published_at, listener.arrivals, t0, t1)
    drops = sum(int(v) for key, v in sync.items() if key.startswith('dropped_'))
    row = {'window': k, 't1': t1, 'rss_mb': float(np.median(samples)) if samples else float('nan'),
           'poses_per_s': (poses - prev['poses']) / (t1 - t0),
           'steps_per_s': (steps - prev['steps']) / (t1 - t0),
           'p50_ms': float(np.percentile(lat, 50)) if len(lat) else float('nan'),
           'p95_ms': float(np.percentile(lat, 95)) if len(lat) else float('nan'),
           # the trainer's buffer (with intake: process the synchronizer holds none)
           'sync_drops': drops,
           'buffer': int(trainer.get('buffer_size', sync.get('buffer_size', 0))),
           'segments': int(trainer.get('trajectory_segments', 0))}
    print(f'{k:>4d} {row["rss_mb"]:>8.0f} {row["poses_per_s"]:>7.2f} {row["steps_per_s"]:>7.2f} '
          f'{row["p50_ms"]:>7.1f} {row["p95_ms"]:>7.1f} {drops:>6d} {row["buffer"]:>7d} '
          f'{row["segments"]:>5d}', flush=True)
    prev.update(poses=poses, steps=steps)
    return row


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix='bench_soak_'))
    work.mkdir(parents=True, exist_ok=True)
    bag = prepare_bag(work, args.frames, args.image_size, args.azimuth_steps)
    env = dict(os.environ, ROS_AUTOMATIC_DISCOVERY_RANGE='LOCALHOST', ROS_LOCALHOST_ONLY='1',
               PYTHONUNBUFFERED='1', ROS_DOMAIN_ID=str(random.SystemRandom().randint(1, 101)))
    env.setdefault('FASTDDS_DEFAULT_PROFILES_FILE', str(DDS_PROFILE))
    os.environ.update(env)       # this process plays and listens on the same domain
    out = work / f'soak_{int(time.time())}'
    out.mkdir()
    print(f'bag {bag} ({args.frames} scans) looped at {args.rate:g}x for {args.duration_s:.0f} s, '
          f'buffer {args.buffer}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; '
          f'node log {out / "node.log"}', flush=True)
    rclpy.init(domain_id=int(env['ROS_DOMAIN_ID']))
    with open(out / 'node.log', 'w') as log:
        proc = subprocess.Popen(node_command(args, out), env=env, stdout=log,
                                stderr=subprocess.STDOUT, cwd=REPO)
    rss = ProcSampler(proc.pid)
    rss.start()
    listener = Listener()
    rows, stop = [], threading.Event()
    try:
        wait_for(lambda: listener.odom_sub.get_publisher_count() > 0, 'ready online node', proc,
                 out / 'node.log')
        with BagSource(bag) as source:
            player = SoakPlayer(source, list(topics.SYNC_TOPICS))
            player.wait_for_subscribers(30.0)
            began = time.monotonic()
            playing = threading.Thread(target=play_until, daemon=True,
                                       args=(player, source, args.rate, began + args.duration_s))
            playing.start()
            print(f'{"win":>4} {"RSS MB":>8} {"poses/s":>7} {"steps/s":>7} {"p50 ms":>7} '
                  f'{"p95 ms":>7} {"drops":>6} {"buffer":>7} {"segs":>5}')
            prev, k = {'poses': 0, 'steps': 0}, 0
            while playing.is_alive() and proc.poll() is None:
                t0 = began + k * args.window_s
                stop.wait(max(0.0, t0 + args.window_s - time.monotonic()))
                rows.append(report_window(k, t0, time.monotonic(), rss, player, listener, prev))
                k += 1
            playing.join()
            player.wait_for_acks(10.0)
            ended = time.monotonic()
            published = dict(player.report.published)
            time.sleep(3.0)   # the last poses and a diagnostics round
            total_lat = latencies(player.published_at, listener.arrivals, began, ended + 3.0)
            expected = sum(len(v) for s, v in player.published_at.items()) - player.report.loops
            player.destroy_node()
        sync = listener.status('synchronizer')
        poses = listener.poses()
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=120)
    finally:
        listener.close()
        rss.stop.set()
        rss.join(timeout=5.0)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        rclpy.try_shutdown()
    summarize(rows, rss, sync, published, poses, expected, total_lat, code, began, ended,
              args.buffer)
    return 0


def summarize(rows, rss, sync, published, poses, expected, lat, code, began, ended, capacity):
    lost = {t.split('/')[2]: published.get(t, 0) - int(sync.get(DIAG_KEY[t], 0))
            for t in topics.SYNC_TOPICS}
    sync_drops = {k[len('dropped_'):]: int(v) for k, v in sync.items()
                  if k.startswith('dropped_') and int(v)}
    full = [r for r in rows if r['buffer'] >= capacity]
    # RSS samples from the end of the first window that reported a full buffer
    after = [mb for t, mb, _ in rss.samples if full and full[0]['t1'] <= t <= ended]
    fill = full[0]['window'] if full else None
    print()
    print(f'drops: transport {lost}, synchronizer {sync_drops or "none"}, scans without a pose '
          f'{expected - poses} ({poses} poses for {expected} scans after the first of a pass)')
    if len(after) >= 8:
        half = len(after) // 2
        first, second = float(np.median(after[:half])), float(np.median(after[half:]))
        growth = (second - first) / first
        print(f'RSS after the buffer filled (after window {fill}): median {first:.0f} MB over the '
              f'first half, {second:.0f} MB over the second ({growth * 100:+.1f}%: '
              f'{"flat" if abs(growth) < TARGET_RSS_GROWTH else "NOT flat"})')
    else:
        print('RSS: the buffer did not fill early enough to judge (use a longer --duration_s '
              'or a smaller --buffer)')
    steps = [r['steps_per_s'] for r in rows]
    print(f'steps/s per window: {", ".join(f"{s:.2f}" for s in steps)}')
    if len(lat):
        print(f'latency over the run: p50 {np.percentile(lat, 50):.1f} ms, p95 '
              f'{np.percentile(lat, 95):.1f} ms, max {lat.max():.1f} ms ({len(lat)} poses)')
    print(f'node exit code {code}')


if __name__ == '__main__':
    sys.exit(main())
