"""Online fine-tuning under replay: drops, training throughput, pose latency, memory and CPU.

    python bench/online.py [--frames 150] [--rates 1 5 10] [--off_rates 5 10] [--work_dir DIR]
                           [--buffer 40]
                           [--image_size W H] [--azimuth_steps N] [--num_threads T]
                           [--set key:=value ...] [--no_dds_profile] [--domain_id N]

A synthetic sequence (by default full size: 1241x376 images, 64-beam ~128k-point scans,
100 Hz IMU; built once into --work_dir) is replayed into `online_finetune` (config/finetune.yaml
and a fresh model with the Dummy visual encoder) at each rate with training on, and at each of
--off_rates with training off, the baseline of the same run. The player runs inside this process
(bag.playback and the bag_player node), so the wall time at which each scan was published and
the wall time at which its pose arrived on /mm_fusion/odom come from one clock: latency = odom
arrival - publication of the scan whose stamp the odom carries. The node runs in a process of
its own, as in use; its RSS and CPU time (with its children: the learner process) are read from
/proc every 0.25 s (the RSS series
is written to WORK_DIR/run_<rate>x_<training>/rss.csv).

With the inertial filter at IMU rate (--set filter.mode:=on --set filter.publish_rate:=imu) the
node publishes /mm_fusion/odom at every IMU sample, stamped with the sample, and a scan's pose
goes to odom only when it is newer than the IMU poses, which it seldom is. The bench tells the
two cases apart by what it receives: odometry at stamps that are not scan stamps. Then a scan's
pose is out when the first /mm_fusion/path that carries it arrives (the paths hold the scan poses;
they are throttled by the node's path_publish_period_s), and latency = that arrival -
publication of the scan; samples' poses are counted on the path. The IMU-rate odometry is
reported besides: messages per second received (first to last) and latency = arrival -
publication of the IMU message whose stamp the odom carries (the player publishes the IMU too).

Drops: messages published by the player vs received by the synchronizer (its /diagnostics),
the synchronizer's own drop and mask counts, and samples expected (scans - 1) vs poses received.
Trained samples/s: gradient steps between two ~/save_checkpoint calls (before the replay, after
the last pose) times the batch size, over that time. Node CPU: utime + stime of the node process
from the first scan published to the last pose, as cores and per pose. Player CPU: this
process (bag reading, publishing, the probe) while the player ran, in cores.
Before each replay the bag's files are read once (unless --no_page_in), so that the player reads
it from the page cache in every case, as a second replay of a bag would: played from disk, it took
~0.4 cores more, and the machine drops the cache between cases at will.
Machine reference: bench/machine_reference.py's fixed model forward, timed before every case and
after the last, in the verdict line: the shared machine's speed moves by up to ~50 % within a
session, and this tells a slower machine from a slower pipeline.
Targets on 2 CPU cores: zero drops at 5x, p95 latency < 100 ms, RSS flat once the buffer is
full: the median RSS over the second half of the time after the fill within 2% of the median
over the first half (use a long --frames at 1x to judge it; a short replay says little). The
fill is when the trainer's status on /diagnostics first reports a full buffer: with the guard's
admission a 5x replay admits only the samples the learner scored, so judge 5x with a small
--buffer (e.g. 16).
"""
import argparse
from dataclasses import dataclass, field
import json
import os
from pathlib import Path
import random
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bag_args import add_bag_arguments  # noqa: E402  (beside this file)
import numpy as np  # noqa: E402
import rclpy  # noqa: E402
from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from rclpy.qos import QoSProfile, ReliabilityPolicy  # noqa: E402

from mm_fusion_ros.bag import topics  # noqa: E402
from mm_fusion_ros.bag.playback import BagSource, LATE_S  # noqa: E402
from mm_fusion_ros.bag.writer import convert_sequence, ConvertOptions  # noqa: E402
from mm_fusion_ros.ros.bag_player import BagPlayer  # noqa: E402
from mm_fusion_ros.ros.runner import DDS_PROFILE, DEFAULT_CONFIG  # noqa: E402
from mm_fusion_ros.synthetic.writer import generate_sequence  # noqa: E402
from mm_fusion_ros.training.checkpoint import load_checkpoint  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SENSOR_TOPICS = topics.SYNC_TOPICS
DIAG_KEY = {topics.IMAGE_TOPIC: 'received_image', topics.CLOUD_TOPIC: 'received_cloud',
            topics.IMU_TOPIC: 'received_imu', topics.GT_ODOM_TOPIC: 'received_ground_truth'}
TARGET_P95_MS = 100.0
TARGET_RSS_GROWTH = 0.02
RSS_PERIOD_S = 0.25
IDLE_END_S = 3.0        # the replay is over when no pose came for this long after the bag
DEADLINE_S = 300.0
PAGE_IN_CHUNK = 8 << 20


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_bag_arguments(p)
    p.add_argument('--rates', type=float, nargs='*', default=[1.0, 5.0, 10.0],
                   help='replay rates to measure with training on')
    p.add_argument('--off_rates', type=float, nargs='*', default=[5.0, 10.0],
                   help='replay rates to measure with training off (the baseline of the run; '
                        'the issue 16 target: 10x)')
    p.add_argument('--buffer', type=int, default=40,
                   help='replay buffer capacity, small so that it fills early in the replay')
    p.add_argument('--num_threads', type=int, default=None,
                   help='torch threads of the node (default: config/finetune.yaml)')
    p.add_argument('--set', action='append', default=[], metavar='KEY:=VALUE',
                   help='extra node parameter, e.g. --set updates_per_sample:=1.0')
    p.add_argument('--no_dds_profile', action='store_true',
                   help="use Fast DDS's defaults instead of config/fastdds_replay.xml")
    p.add_argument('--no_page_in', action='store_true',
                   help='replay the bag as the page cache has it (default: read it into the '
                        'cache before each case, so that no case plays it from disk)')
    p.add_argument('--domain_id', type=int, default=None,
                   help='ROS_DOMAIN_ID of the player, the probe and the node (default: random)')
    return p


# --- data ------------------------------------------------------------------------------------
def prepare_bag(work: Path, frames: int, image_size, azimuth_steps: int) -> Path:
    name = f'{frames}f_{image_size[0]}x{image_size[1]}_{azimuth_steps}az'
    bag = work / f'bag_{name}'
    if (bag / 'metadata.yaml').is_file():
        return bag
    data = work / f'data_{name}'
    print(f'generating {frames} synthetic frames in {data} ...', flush=True)
    generate_sequence(data, '00', frames, 0, image_size=tuple(image_size),
                      azimuth_steps=azimuth_steps, overwrite=True)
    convert_sequence(ConvertOptions(data_path=data, sequence='00', output=bag, overwrite=True))
    return bag


# --- the player, in this process -------------------------------------------------------------
def cloud_stamp(raw: bytes) -> int:
    """Header stamp of a CDR-serialised PointCloud2 or Imu (4-byte encapsulation, then int32
    sec, uint32 nanosec), read without deserialising the message."""
    little = raw[1] == 1
    sec, nsec = struct.unpack('<iI' if little else '>iI', raw[4:12])
    return sec * 1_000_000_000 + nsec


class TimedPlayer(BagPlayer):
    """bag_player's node, also noting when each scan and IMU message was published
    (time.monotonic)."""

    def __init__(self, source, names):
        super().__init__(source, names)
        self.cloud_published, self.imu_published = {}, {}

    def _publish(self, topic, publisher, raw):
        ok = super()._publish(topic, publisher, raw)
        if ok and topic == topics.CLOUD_TOPIC:
            self.cloud_published[cloud_stamp(raw)] = time.monotonic()
        elif ok and topic == topics.IMU_TOPIC:
            self.imu_published[cloud_stamp(raw)] = time.monotonic()
        return ok


# --- the node under test ---------------------------------------------------------------------
class ProcSampler(threading.Thread):
    """RSS (VmRSS of /proc/<pid>/status) and CPU seconds (utime + stime of /proc/<pid>/stat)
    of the node process and its child processes (with learner:=process the learner and
    multiprocessing's resource tracker) every RSS_PERIOD_S."""

    def __init__(self, pid):
        super().__init__(daemon=True)
        self.pid = pid
        self.samples = []      # (monotonic, RSS MB, CPU s)
        self.threads = []      # per sample: {thread name: CPU ticks} (_thread_ticks)
        self.stop = threading.Event()
        self.tick = os.sysconf('SC_CLK_TCK')

    def run(self):
        while not self.stop.is_set():
            node = _proc_usage(self.pid)
            if node is None:
                return
            if node[0] is not None:   # a zombie has no VmRSS line
                usage = [node] + [u for u in map(_proc_usage, _children(self.pid))
                                  if u is not None and u[0] is not None]
                self.samples.append((time.monotonic(), sum(u[0] for u in usage) / 1024.0,
                                     sum(u[1] for u in usage) / self.tick))
                self.threads.append(_thread_ticks(self.pid))
            self.stop.wait(RSS_PERIOD_S)

    def cpu_between(self, t0, t1) -> float:
        """CPU seconds the node used between two monotonic times (nearest samples)."""
        inside = [(t, c) for t, _, c in self.samples if t0 <= t <= t1]
        return inside[-1][1] - inside[0][1] if len(inside) > 1 else float('nan')

    def threads_between(self, t0, t1) -> dict:
        """{thread name: CPU seconds} between two monotonic times (nearest samples), threads of
        the same name summed; named by the node (runtime/process.py name_os_thread)."""
        inside = [i for i, (t, _, _) in enumerate(self.samples) if t0 <= t <= t1]
        if len(inside) < 2:
            return {}
        first, last = self.threads[inside[0]], self.threads[inside[-1]]
        return {name: (ticks - first.get(name, 0)) / self.tick for name, ticks in last.items()
                if ticks > first.get(name, 0)}


def _proc_usage(pid):
    """(VmRSS kB or None for a zombie, utime + stime ticks) of a process, None if gone."""
    proc = Path(f'/proc/{pid}')
    try:
        status, stat = (proc / 'status').read_text(), (proc / 'stat').read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    rss = [int(line.split()[1]) for line in status.splitlines() if line.startswith('VmRSS:')]
    fields = stat.rsplit(')', 1)[1].split()
    return (rss[0] if rss else None), int(fields[11]) + int(fields[12])


def _thread_ticks(pid) -> dict:
    """{name: utime + stime ticks} over the threads of the node and of its child processes
    (their names prefixed 'child '); threads the node did not name (the main thread, DDS's,
    torch's) keep the process's name and are reported as 'unnamed'."""
    out = {}
    for proc, prefix in [(pid, '')] + [(c, 'child ') for c in _children(pid)]:
        try:
            own = Path(f'/proc/{proc}/comm').read_text().strip()
        except (FileNotFoundError, ProcessLookupError):
            continue
        for task in Path(f'/proc/{proc}/task').glob('*'):
            try:
                name = (task / 'comm').read_text().strip()
                fields = (task / 'stat').read_text().rsplit(')', 1)[1].split()
            except (FileNotFoundError, ProcessLookupError):
                continue
            key = prefix + ('unnamed' if name == own and task.name != str(proc) or
                            name in ('python', 'python3') else name)
            out[key] = out.get(key, 0) + int(fields[11]) + int(fields[12])
    return out


def _children(pid) -> list:
    """Child process ids of all of a process's threads (/proc/<pid>/task/*/children)."""
    out = []
    for task in Path(f'/proc/{pid}/task').glob('*'):
        try:
            out += [int(c) for c in (task / 'children').read_text().split()]
        except (FileNotFoundError, ProcessLookupError, ValueError):
            continue
    return out


class Probe:
    """Client side: odom arrival times by stamp, the first arrival of each pose on
    /mm_fusion/path by stamp, the synchronizer's diagnostics, services."""

    def __init__(self):
        from diagnostic_msgs.msg import DiagnosticArray
        from nav_msgs.msg import Odometry
        from nav_msgs.msg import Path as PathMsg
        from std_srvs.srv import Trigger
        self.Trigger = Trigger
        self.node = rclpy.create_node('bench_online_probe')
        self.lock = threading.Lock()
        self.odom_arrival = {}
        self.path_arrival = {}
        self.diag = {}
        self.buffer_sizes = []   # (arrival, the trainer's replay buffer size) from /diagnostics
        self.odom_sub = self.node.create_subscription(
            Odometry, topics.ODOM_OUT_TOPIC, self._on_odom,
            QoSProfile(depth=1000, reliability=ReliabilityPolicy.RELIABLE))
        self.node.create_subscription(PathMsg, topics.PATH_TOPIC, self._on_path,
                                      QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE))
        self.node.create_subscription(DiagnosticArray, '/diagnostics', self._on_diag, 10)
        self.save = self.node.create_client(Trigger, topics.SAVE_SERVICE)
        self.executor = SingleThreadedExecutor()
        self.executor.add_node(self.node)
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)
        self.thread.start()

    def _on_odom(self, msg):
        now = time.monotonic()
        stamp = msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec
        with self.lock:
            self.odom_arrival[stamp] = now

    def _on_path(self, msg):
        now = time.monotonic()
        stamps = [p.header.stamp.sec * 1_000_000_000 + p.header.stamp.nanosec
                  for p in msg.poses]
        with self.lock:
            for stamp in stamps:
                self.path_arrival.setdefault(stamp, now)

    def _on_diag(self, msg):
        now = time.monotonic()
        for status in msg.status:
            values = {kv.key: kv.value for kv in status.values}
            with self.lock:
                if 'synchronizer' in status.name:
                    self.diag = values
                elif 'trainer' in status.name and 'buffer_size' in values:
                    self.buffer_sizes.append((now, int(values['buffer_size'])))

    def buffer_full_at(self, capacity: int):
        """Arrival of the first trainer status that reported a full replay buffer, or None."""
        with self.lock:
            return next((t for t, size in self.buffer_sizes if size >= capacity), None)

    def buffer_size(self) -> int:
        with self.lock:
            return self.buffer_sizes[-1][1] if self.buffer_sizes else 0

    def imu_rate(self, scan_stamps) -> bool:
        """Odometry came at stamps that are not scans' (the filter at IMU rate)?"""
        with self.lock:
            return any(s not in scan_stamps for s in self.odom_arrival)

    def scan_arrival(self, scan_stamps) -> dict:
        """Stamp -> arrival of the scans' poses: on odom, or at IMU rate on the path."""
        imu_rate = self.imu_rate(scan_stamps)
        with self.lock:
            arrival = self.path_arrival if imu_rate else self.odom_arrival
            return {s: t for s, t in arrival.items() if s in scan_stamps}

    def last_pose(self, scan_stamps):
        """Arrival of the newest odometry message, or at IMU rate of odometry or path."""
        imu_rate = self.imu_rate(scan_stamps)
        with self.lock:
            path = list(self.path_arrival.values()) if imu_rate else []
            return max([*self.odom_arrival.values(), *path], default=None)

    def checkpoint(self):
        done = threading.Event()
        future = self.save.call_async(self.Trigger.Request())
        future.add_done_callback(lambda _: done.set())
        if not done.wait(60.0):
            raise RuntimeError('save_checkpoint did not answer within 60 s')
        response = future.result()
        if not response.success:
            raise RuntimeError(f'save_checkpoint failed: {response.message}')
        return load_checkpoint(response.message), time.monotonic()

    def close(self):
        self.executor.shutdown(timeout_sec=5.0)
        self.node.destroy_node()


def wait_for(condition, what, proc, log_path, timeout=DEADLINE_S):
    end = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise RuntimeError(f'online node exited ({proc.returncode}) while waiting for '
                               f'{what}; see {log_path}')
        if time.monotonic() > end:
            raise RuntimeError(f'no {what} within {timeout:.0f} s; see {log_path}')
        time.sleep(0.02)


@dataclass
class Case:
    rate: float
    training: bool
    published: dict = field(default_factory=dict)
    diag: dict = field(default_factory=dict)
    expected: int = 0
    poses: int = 0
    steps: int = 0
    train_s: float = 0.0
    batch: int = 0
    latency_ms: np.ndarray = None
    rss: list = None
    fill_time: float = None
    exit_code: int = None
    player_wall_s: float = 0.0
    player_cpu_s: float = 0.0  # CPU of this process (the player) while it played
    player_late: tuple = (0, 0.0)  # messages the player sent > LATE_S late, the latest [s]
    cpu_s: float = 0.0         # node CPU seconds from the first scan to the last pose
    cpu_wall_s: float = 0.0
    threads_s: dict = None     # node CPU seconds by thread over the same span
    imu_rate: bool = False     # odometry at IMU rate: the scans' poses came on the path
    imu_odom: tuple = None     # imu_odom_summary
    guard: dict = None         # the deployment guard's scored / skipped samples in the replay
    buffer_end: int = 0        # the trainer's replay buffer size last reported
    capacity: int = 0          # its capacity (--buffer)
    reference_ms: list = field(default_factory=list)   # machine_reference before and after
    page_in_s: float = None    # reading the bag into the page cache before the replay


def imu_odom_summary(odom_arrival: dict, scan_stamps, imu_published: dict, offset_ns=0):
    """(messages, messages per second, latencies [ms]) of the odometry at stamps other than
    the scans': rate over first to last arrival; latency = arrival - publication of the IMU
    message of that stamp (stamps the player did not publish are left out). offset_ns: the
    filter's imu_time_offset_s; its IMU-rate poses carry the IMU stamp plus it (the scans'
    clock)."""
    arrivals = {s: t for s, t in odom_arrival.items() if s not in scan_stamps}
    if not arrivals:
        return 0, float('nan'), np.array([])
    span = max(arrivals.values()) - min(arrivals.values())
    rate = (len(arrivals) - 1) / span if span > 0 else float('nan')
    latency = np.array([(t - imu_published[s - offset_ns]) * 1e3 for s, t in arrivals.items()
                        if s - offset_ns in imu_published])
    return len(arrivals), rate, latency


def filter_offset_ns(settings) -> int:
    """imu_time_offset_s [ns] of the filter checkpoint given as --set filter.checkpoint:=PATH
    (0 without one): a filter fitted to a late-stamped IMU stamps its IMU-rate poses on the
    scans' clock."""
    paths = [item.split(':=', 1)[1] for item in settings
             if item.split(':=', 1)[0] == 'filter.checkpoint' and ':=' in item]
    if not paths or not paths[-1]:
        return 0
    from mm_fusion_ros.filter.checkpoint import load_filter
    return round(load_filter(paths[-1])[0].imu_time_offset_s * 1e9)


def write_latencies(path: Path, published: dict, arrival: dict) -> None:
    """Per scan: its stamp, when it was published (s after the first), and its pose's latency
    (ms; empty without a pose), to see where in a replay the latency grew."""
    first = min(published.values())
    with open(path, 'w') as f:
        f.write('scan_stamp_ns,published_s,latency_ms\n')
        for stamp in sorted(published):
            lat = f'{(arrival[stamp] - published[stamp]) * 1e3:.1f}' if stamp in arrival else ''
            f.write(f'{stamp},{published[stamp] - first:.4f},{lat}\n')


def node_command(args, case, out: Path):
    cmd = [sys.executable, '-m', 'mm_fusion_ros.ros.online', '--ros-args',
           '--params-file', str(DEFAULT_CONFIG)]
    params = {'model.visual_encoder': 'dummy', 'buffer.capacity': args.buffer,
              'training_enabled': str(case.training).lower(), 'checkpoint_dir': out / 'ckpt',
              'save_on_shutdown': 'false'}
    if args.num_threads is not None:
        params['num_threads'] = args.num_threads
    for key, value in params.items():
        cmd += ['-p', f'{key}:={value}']
    for item in args.set:
        cmd += ['-p', item]
    return cmd


def run_case(args, bag: Path, case: Case, out: Path, env: dict) -> Case:
    out.mkdir(parents=True, exist_ok=True)
    offset_ns = filter_offset_ns(args.set)   # read before the replay, not under the probe's lock
    log_path = out / 'node.log'
    with open(log_path, 'w') as log:
        proc = subprocess.Popen(node_command(args, case, out), env=env, stdout=log,
                                stderr=subprocess.STDOUT, cwd=REPO)
    rss = ProcSampler(proc.pid)
    rss.start()
    probe = Probe()
    try:
        wait_for(lambda: probe.odom_sub.get_publisher_count() > 0 and
                 probe.save.service_is_ready(), 'ready online node', proc, log_path)
        ckpt0, t0 = probe.checkpoint()
        if not args.no_page_in:
            case.page_in_s = page_in(bag)
        with BagSource(bag) as source:
            player = TimedPlayer(source, list(SENSOR_TOPICS))
            try:
                player.wait_for_subscribers(30.0)
                start_ns, stop_ns = source.window(0.0, None)
                cpu0 = time.process_time()
                report = player.play(start_ns, stop_ns, case.rate, loop=False)
                case.player_cpu_s = time.process_time() - cpu0
                player.wait_for_acks(10.0)
                published = dict(player.cloud_published)
                imu_published = dict(player.imu_published)
            finally:
                player.destroy_node()
        case.published = dict(report.published)
        case.player_wall_s = report.wall_s
        case.player_late = (report.late_count, report.late_max_s)
        case.expected = case.published[topics.CLOUD_TOPIC] - 1

        scans = set(published)
        later_scans = set(sorted(published)[1:])   # the first scan starts the first sample

        def scan_poses():
            # One pose per sample: on odom at the scan stamps, or at IMU rate on the path
            # (odom then carries the IMU stamps).
            return len(probe.scan_arrival(scans).keys() & later_scans)

        def settled():
            last = probe.last_pose(scans)
            return scan_poses() >= case.expected or \
                (last is not None and time.monotonic() - last > IDLE_END_S)

        wait_for(settled, 'end of the poses', proc, log_path)
        ckpt1, t1 = probe.checkpoint()
        metrics0, metrics1 = ckpt0['metrics'], ckpt1['metrics']
        case.batch = int(ckpt1['config']['train']['batch_size'])
        wait_for(lambda: probe.diag.get('emitted') == str(metrics1['online_samples']),
                 'final diagnostics', proc, log_path)
        case.diag = dict(probe.diag)
        case.poses = scan_poses()
        probe_end = probe.last_pose(scans)
        case.steps = metrics1['online_steps'] - metrics0['online_steps']
        case.guard = {k: metrics1[f'guard_{k}_samples'] - metrics0.get(f'guard_{k}_samples', 0)
                      for k in ('scored', 'skipped') if f'guard_{k}_samples' in metrics1}
        case.train_s = (probe_end or t1) - t0
        arrival = probe.scan_arrival(scans)
        case.latency_ms = np.array([(arrival[s] - published[s]) * 1e3 for s in arrival])
        write_latencies(out / 'latency.csv', published, arrival)
        case.imu_rate = probe.imu_rate(scans)
        with probe.lock:
            case.imu_odom = imu_odom_summary(probe.odom_arrival, scans, imu_published,
                                             offset_ns)
        first_pub = min(published.values())
        # The buffer is full when the trainer says so (its status, once a second), not after
        # `buffer` samples: with the guard's admission (training on) a sample enters it only
        # once scored, and at 5x the learner scores about one in twelve.
        full_at = probe.buffer_full_at(args.buffer)
        case.fill_time = None if full_at is None else full_at - first_pub
        case.buffer_end, case.capacity = probe.buffer_size(), args.buffer
        proc.send_signal(signal.SIGINT)
        case.exit_code = proc.wait(timeout=120)
    finally:
        probe.close()
        rss.stop.set()
        rss.join(timeout=5.0)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    case.rss = [(t - first_pub, mb) for t, mb, _ in rss.samples]
    (out / 'rss.csv').write_text('t_s,rss_mb\n' + ''.join(f'{t:.2f},{mb:.1f}\n'
                                                           for t, mb in case.rss))
    end = probe_end if probe_end is not None else first_pub
    case.cpu_s = rss.cpu_between(first_pub, end)
    case.threads_s = rss.threads_between(first_pub, end)
    case.cpu_wall_s = end - first_pub
    return case


# --- report ----------------------------------------------------------------------------------
def rss_summary(case):
    """RSS [MB] when the replay began, when the buffer became full, at the last pose; and the
    medians over the first and the second half of the time after the fill."""
    nan = float('nan')
    during = [mb for t, mb in case.rss if 0 <= t <= case.cpu_wall_s]
    if not during:
        return nan, nan, nan, nan, nan
    after = [mb for t, mb in case.rss
             if case.fill_time is not None and case.fill_time <= t <= case.cpu_wall_s]
    if len(after) < 4:
        return during[0], nan, during[-1], nan, nan
    half = len(after) // 2
    return (during[0], after[0], during[-1], float(np.median(after[:half])),
            float(np.median(after[half:])))


def drop_summary(case):
    lost = {t.split('/')[2]: case.published.get(t, 0) - int(case.diag.get(DIAG_KEY[t], 0))
            for t in SENSOR_TOPICS}
    sync = {k[len('dropped_'):]: int(v) for k, v in case.diag.items()
            if k.startswith('dropped_') and int(v)}
    masked = {k[len('masked_'):]: int(v) for k, v in case.diag.items()
              if k.startswith('masked_') and int(v)}
    return lost, sync, masked


def print_table(cases):
    header = (f'{"rate":>5} {"train":>5} | {"lost in transport (pub-recv)":<36} | '
              f'{"sync drops":<14} {"masked":<12} | {"samples exp/emit/poses":>22} | '
              f'{"steps/s":>7} {"smp/s":>6} | {"lat p50":>7} {"p95":>6} {"max":>6} ms | '
              f'{"RSS start/fill/end MB":>22} | {"node CPU: cores, ms/sample":>26} | '
              f'{"player CPU":>10}')
    print(header)
    print('-' * len(header))
    for c in cases:
        lost, sync, masked = drop_summary(c)
        lost_s = ' '.join(f'{k}:{v}' for k, v in lost.items())
        start, fill, end, _, _ = rss_summary(c)
        lat = c.latency_ms
        steps_s = c.steps / c.train_s if c.train_s > 0 else float('nan')
        print(f'{c.rate:>5g} {("on" if c.training else "off"):>5} | {lost_s:<36} | '
              f'{json.dumps(sync) if sync else "none":<14} '
              f'{json.dumps(masked) if masked else "none":<12} | '
              f'{c.expected:>6d}/{c.diag.get("emitted", "?"):>5}/{c.poses:<5d}     | '
              f'{steps_s:>7.1f} {steps_s * c.batch:>6.1f} | '
              f'{np.percentile(lat, 50):>7.1f} {np.percentile(lat, 95):>6.1f} '
              f'{lat.max():>6.1f}    | {start:>6.0f}/{fill:>6.0f}/{end:>6.0f}       | '
              f'{c.cpu_s / c.cpu_wall_s:>5.2f}, {c.cpu_s / max(c.poses, 1) * 1e3:>6.1f}'
              f'{"":>14} | {c.player_cpu_s / max(c.player_wall_s, 1e-9):>5.2f} cores')
    print('\nnode CPU by thread, cores over the same span (with its child processes):')
    for c in cases:
        busy = sorted((c.threads_s or {}).items(), key=lambda kv: -kv[1])
        print(f'{c.rate:>5g} {("on" if c.training else "off"):>5} | ' + ', '.join(
            f'{name} {s / c.cpu_wall_s:.2f}' for name, s in busy if s / c.cpu_wall_s >= 0.005))
    imu = [c for c in cases if c.imu_rate]
    if imu:
        print('\nodometry at IMU rate (the rows above: latency and poses of the scans on '
              f'{topics.PATH_TOPIC}):')
        for c in imu:
            n, rate, lat = c.imu_odom
            pct = np.percentile(lat, [50, 95]) if len(lat) else [float('nan')] * 2
            print(f'{c.rate:>5g} {("on" if c.training else "off"):>5} | {n} messages, '
                  f'{rate:.1f}/s | latency p50 {pct[0]:.1f} p95 {pct[1]:.1f} max '
                  f'{lat.max() if len(lat) else float("nan"):.1f} ms (arrival - IMU publication)'
                  f' | node CPU {c.cpu_s / c.cpu_wall_s * 1e3:.0f} ms/s')


def print_verdict(cases):
    for c in cases:
        lost, sync, masked = drop_summary(c)
        drops = sum(lost.values()) + sum(sync.values()) + (c.expected - c.poses)
        p95 = float(np.percentile(c.latency_ms, 95))
        _, _, _, first, second = rss_summary(c)
        growth = (second - first) / first
        notes = [f'drops {drops}' + (' (target 0)' if c.rate >= 5 else ''),
                 f'p95 {p95:.0f} ms ({"meets" if p95 < TARGET_P95_MS else "misses"} '
                 f'< {TARGET_P95_MS:.0f} ms)',
                 f'RSS after the fill: median {first:.0f} MB over its first half, '
                 f'{second:.0f} MB ({growth * 100:+.1f}%) over its second '
                 f'({"flat" if growth < TARGET_RSS_GROWTH else "NOT flat"})'
                 if growth == growth else
                 f'RSS not judged: the buffer ({c.buffer_end} of {c.capacity} samples last '
                 'reported) was not full long enough before the last pose (a smaller --buffer '
                 'or more --frames)']
        if masked:
            notes.append(f'masked {masked}')
        notes.append(f'player: {c.player_late[0]} message(s) more than {LATE_S * 1e3:g} ms '
                     f'behind schedule (at most {c.player_late[1] * 1e3:.0f} ms)')
        if c.training and c.guard:
            notes.append('guard ' + ', '.join(f'{k} {v}' for k, v in c.guard.items()))
        if c.imu_rate:
            notes.append(f'odometry at IMU rate, scan poses from {topics.PATH_TOPIC}')
        if c.page_in_s is not None:
            notes.append(f'bag read into the page cache first ({c.page_in_s:.1f} s)')
        notes.append('machine reference ' + ' / '.join(
            'n/a' if ms is None else f'{ms:.2f}' for ms in c.reference_ms) +
            ' ms before / after (bench/machine_reference.py)')
        print(f'{c.rate:g}x training {"on" if c.training else "off"}: ' + '; '.join(notes) +
              f'; node exit {c.exit_code}')


def page_in(bag: Path) -> float:
    """Read every file of the bag once, so that the replay finds it in the page cache; ->
    seconds taken. Between cases the machine dropped much of a 1.5 GB bag from its cache, and
    a player reading from disk took ~0.4 cores more from the node's two (docs/
    online_runtime.md, "Session 37"): the cases would measure the disk, not the node."""
    t0 = time.monotonic()
    for path in sorted(p for p in Path(bag).rglob('*') if p.is_file()):
        with open(path, 'rb', buffering=0) as f:
            while f.read(PAGE_IN_CHUNK):
                pass
    return time.monotonic() - t0


def machine_reference():
    """bench/machine_reference.py's model forward [ms CPU], in a process of its own, or None
    (said why) when it failed: how fast the machine is just now, next to each case."""
    stderr = ''
    try:
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve().parent /
                                                   'machine_reference.py'), '--json'],
                              capture_output=True, text=True, timeout=300)
        stderr = proc.stderr
        return float(json.loads(proc.stdout.strip().splitlines()[-1])['forward_ms'])
    except (IndexError, KeyError, ValueError, subprocess.TimeoutExpired) as e:
        print(f'  machine reference failed ({type(e).__name__}: {e}): {stderr.strip()[-500:]}',
              flush=True)
        return None


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix='bench_online_'))
    work.mkdir(parents=True, exist_ok=True)
    bag = prepare_bag(work, args.frames, args.image_size, args.azimuth_steps)
    env = dict(os.environ)
    env.update(ROS_AUTOMATIC_DISCOVERY_RANGE='LOCALHOST', ROS_LOCALHOST_ONLY='1',
               PYTHONUNBUFFERED='1')
    if args.no_dds_profile:
        env.pop('FASTDDS_DEFAULT_PROFILES_FILE', None)
    else:
        env.setdefault('FASTDDS_DEFAULT_PROFILES_FILE', str(DDS_PROFILE))
    env['ROS_DOMAIN_ID'] = str(args.domain_id if args.domain_id is not None
                               else random.SystemRandom().randint(1, 101))
    os.environ.update(env)       # this process plays and listens on the same domain
    if args.no_dds_profile:
        os.environ.pop('FASTDDS_DEFAULT_PROFILES_FILE', None)
    rclpy.init(args=[], domain_id=int(env['ROS_DOMAIN_ID']))
    cases = [Case(rate, True) for rate in args.rates] + \
        [Case(rate, False) for rate in args.off_rates]
    print(f'bag {bag} ({args.frames} scans), buffer capacity {args.buffer}, DDS profile '
          f'{env.get("FASTDDS_DEFAULT_PROFILES_FILE", "Fast DDS defaults")}, '
          f'{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}', flush=True)
    reference = machine_reference()
    for case in cases:
        case.reference_ms.append(reference)
        run_case(args, bag, case, work / f'run_{case.rate:g}x_{int(case.training)}', env)
        reference = machine_reference()
        case.reference_ms.append(reference)
        print(f'  {case.rate:g}x training {"on" if case.training else "off"}: done, load '
              f'average {os.getloadavg()[0]:.2f}', flush=True)
    rclpy.try_shutdown()
    print()
    print_table(cases)
    print()
    print_verdict(cases)
    return 0


if __name__ == '__main__':
    sys.exit(main())
