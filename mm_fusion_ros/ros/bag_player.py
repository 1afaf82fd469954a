"""bag_player: play a rosbag2 folder (mcap or sqlite3) with rclpy, for installs without `ros2 bag`.

    bag_player BAG [--rate R] [--loop] [--clock] [--start_offset S] [--duration D]
               [--topics T ...] [--wait_for_subscribers] [--ros-args ...]

The bag is read with rosbags and its recorded CDR bytes are published as they are (no decoding).
Messages are paced by record time: message t is due at start_wall + (t - t_first) / rate. QoS per
topic: ros/qos.py `replay_qos` (latched topics such as /tf_static stay TRANSIENT_LOCAL; everything
else RELIABLE with a deep queue, since replay feeds training). A topic whose message package does
not import here (tf2_msgs has no wheel) is skipped with a warning and counted in the report.
--clock publishes /clock (rosgraph_msgs/Clock) with the bag time of each message before it, for
nodes with use_sim_time. At the end it waits (bounded) until reliable readers acknowledged
everything, then prints what it published.
"""
import argparse
from dataclasses import dataclass, field
import importlib
from pathlib import Path
import sys
import time

import rclpy
from rclpy.duration import Duration
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.impl.implementation_singleton import rclpy_implementation as _rclpy
from rclpy.node import Node
from rclpy.signals import SignalHandlerOptions
from rclpy.utilities import remove_ros_args

from mm_fusion_ros.bag.playback import BagSource, Pacer
from mm_fusion_ros.ros.qos import CLOCK_QOS, replay_qos
from mm_fusion_ros.stamps import NS_PER_S

RCLError = _rclpy.RCLError
PUBLISH_RETRIES = 50          # a reliable writer whose history is full of unacked samples
PUBLISH_RETRY_PAUSE_S = 0.01  # refuses a write for a moment: retry for up to ~0.5 s
ACK_TIMEOUT_S = 10.0
MAX_SLEEP_S = 0.1             # sleep in slices so a shutdown is noticed promptly


def import_message_class(msgtype: str):
    """'sensor_msgs/msg/Image' -> the rosidl Python class; ImportError names the package."""
    parts = msgtype.split('/')
    if len(parts) != 3:
        raise ImportError(f'message type {msgtype!r} is not of the form pkg/msg/Name')
    package, sub, name = parts
    try:
        module = importlib.import_module(f'{package}.{sub}')
    except ImportError as e:
        raise ImportError(f'{msgtype}: package {package!r} is not installed ({e})') from e
    try:
        return getattr(module, name)
    except AttributeError as e:
        raise ImportError(f'{msgtype}: {package}.{sub} has no {name}') from e


@dataclass
class PlayReport:
    published: dict = field(default_factory=dict)      # topic -> messages published
    failed: dict = field(default_factory=dict)         # topic -> publishes that kept failing
    skipped_topics: dict = field(default_factory=dict)  # topic -> reason
    not_published: dict = field(default_factory=dict)  # skipped topic -> messages not sent
    clock_published: int = 0
    bag_s: float = 0.0
    wall_s: float = 0.0
    loops: int = 0
    unacked: list = field(default_factory=list)
    unmatched: list = field(default_factory=list)
    interrupted: bool = False

    @property
    def effective_rate(self) -> float:
        return self.bag_s / self.wall_s if self.wall_s > 0 else 0.0

    def format(self) -> str:
        total = sum(self.published.values())
        lines = [f'bag_player: published {total} messages, {self.bag_s:.3f} s of bag time in '
                 f'{self.wall_s:.3f} s wall (effective rate {self.effective_rate:.2f}x), '
                 f'{self.loops} loop(s){" (interrupted)" if self.interrupted else ""}']
        width = max((len(t) for t in {**self.published, **self.skipped_topics}), default=0)
        for topic, count in self.published.items():
            failed = f'  ({self.failed[topic]} failed)' if self.failed.get(topic) else ''
            lines.append(f'  {topic:<{width}}  {count:>7d}{failed}')
        if self.clock_published:
            lines.append(f'  {"/clock":<{width}}  {self.clock_published:>7d}')
        for topic, reason in self.skipped_topics.items():
            lines.append(f'  {topic:<{width}}  skipped ({self.not_published.get(topic, 0)} '
                         f'messages): {reason}')
        if self.unmatched:
            lines.append(f'  no subscriber matched before playing: {", ".join(self.unmatched)}')
        if self.unacked:
            lines.append(f'  not acknowledged by every reader: {", ".join(self.unacked)}')
        return '\n'.join(lines)


class BagPlayer(Node):
    """Publishers for a bag's topics and the paced play loop; the bag logic is bag.playback."""

    def __init__(self, source: BagSource, topic_names, publish_clock=False):
        super().__init__('bag_player')
        self.source = source
        self.report = PlayReport()
        self.publishers_by_topic = {}
        for topic in topic_names:
            plan = source.topics[topic]
            try:
                msg_class = import_message_class(plan.msgtype)
            except ImportError as e:
                self.get_logger().warning(f'not publishing {topic}: {e}')
                self.report.skipped_topics[topic] = str(e)
                self.report.not_published[topic] = 0
                continue
            if plan.best_effort:
                self.get_logger().info(f'{topic} was recorded best effort; replaying RELIABLE')
            self.publishers_by_topic[topic] = self.create_publisher(
                msg_class, topic, replay_qos(plan))
            self.report.published[topic] = 0
        self.latched = {t for t in self.publishers_by_topic if source.topics[t].latched}
        self.clock_pub = None
        if publish_clock:
            clock_class = import_message_class('rosgraph_msgs/msg/Clock')
            self.clock_pub = self.create_publisher(clock_class, '/clock', CLOCK_QOS)
            self.clock_msg = clock_class()
        self.last_clock_ns = None
        self._bag_s_done = 0.0   # bag seconds of the loops already finished

    def wait_for_subscribers(self, timeout_s: float) -> list:
        """Spin until every non-latched publisher matched a subscriber, or the deadline.

        Returns the topics still without a subscriber (also logged and reported).
        """
        executor = SingleThreadedExecutor(context=self.context)
        executor.add_node(self)
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                waiting = [t for t, p in self.publishers_by_topic.items()
                           if t not in self.latched and p.get_subscription_count() == 0]
                if not waiting or time.monotonic() >= deadline:
                    break
                executor.spin_once(timeout_sec=0.05)
        finally:
            executor.remove_node(self)
            executor.shutdown()
        if waiting:
            self.get_logger().warning(f'no subscriber after {timeout_s:.1f} s on: '
                                      f'{", ".join(waiting)}; playing anyway')
        self.report.unmatched = waiting
        return waiting

    def play(self, start_ns: int, stop_ns: int, rate: float, loop: bool) -> PlayReport:
        names = list(self.publishers_by_topic) + list(self.report.skipped_topics)
        began = time.monotonic()
        try:
            while True:
                self._play_once(names, start_ns, stop_ns, Pacer(rate))
                self.report.loops += 1
                if not loop:
                    break
        finally:
            self.report.wall_s = time.monotonic() - began
        return self.report

    def _play_once(self, names, start_ns, stop_ns, pacer):
        first_ns = last_ns = None
        for topic, stamp_ns, raw in self.source.messages(names, start_ns, stop_ns):
            if pacer.start_wall is None:
                # The clock starts with the first message in hand: opening the bag's indexes
                # must not put the schedule behind and make the first messages go out at once.
                pacer.start(start_ns, time.monotonic())
            if not self._sleep_until(pacer.due(stamp_ns)):
                raise ExternalShutdownException()
            first_ns = stamp_ns if first_ns is None else first_ns
            last_ns = stamp_ns
            publisher = self.publishers_by_topic.get(topic)
            if publisher is None:
                self.report.not_published[topic] += 1
                continue
            if self.clock_pub is not None:
                self._publish_clock(stamp_ns)
            if self._publish(topic, publisher, raw):
                self.report.published[topic] += 1
            self.report.bag_s = self._bag_s_done + (last_ns - first_ns) / NS_PER_S
        self._bag_s_done = self.report.bag_s

    def _sleep_until(self, wall_target: float) -> bool:
        """Pace to the recorded time; False when the context was shut down meanwhile."""
        while rclpy.ok(context=self.context):
            remaining = wall_target - time.monotonic()
            if remaining <= 0:
                return True
            time.sleep(min(remaining, MAX_SLEEP_S))
        return False

    def _publish(self, topic, publisher, raw: bytes) -> bool:
        for _ in range(PUBLISH_RETRIES):
            try:
                publisher.publish(raw)
                return True
            except RCLError as e:
                error = e
                time.sleep(PUBLISH_RETRY_PAUSE_S)
        self.report.failed[topic] = self.report.failed.get(topic, 0) + 1
        self.get_logger().error(f'publishing on {topic} failed {PUBLISH_RETRIES} times: {error}',
                                throttle_duration_sec=5.0)
        return False

    def _publish_clock(self, stamp_ns: int) -> None:
        if self.last_clock_ns is not None and stamp_ns <= self.last_clock_ns:
            return
        self.clock_msg.clock.sec, self.clock_msg.clock.nanosec = divmod(stamp_ns, NS_PER_S)
        self.clock_pub.publish(self.clock_msg)
        self.last_clock_ns = stamp_ns
        self.report.clock_published += 1

    def wait_for_acks(self, timeout_s: float) -> list:
        """Bounded wait until reliable readers acknowledged every message; -> topics not acked."""
        deadline = time.monotonic() + timeout_s
        unacked = []
        publishers = dict(self.publishers_by_topic)
        if self.clock_pub is not None:
            publishers['/clock'] = self.clock_pub
        for topic, publisher in publishers.items():
            left = max(0.0, deadline - time.monotonic())
            if not publisher.wait_for_all_acked(Duration(nanoseconds=int(left * NS_PER_S))):
                unacked.append(topic)
        if unacked:
            self.get_logger().warning(f'not acknowledged within {timeout_s:.0f} s: '
                                      f'{", ".join(unacked)}')
        self.report.unacked = unacked
        return unacked


def _positive(text):
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f'must be > 0, got {text}')
    return value


def _non_negative(text):
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f'must be >= 0, got {text}')
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='bag_player', description=__doc__.splitlines()[0])
    p.add_argument('bag', type=Path, help='rosbag2 folder (with metadata.yaml)')
    p.add_argument('--rate', type=_positive, default=1.0,
                   help='playback speed factor (default 1.0 = recorded speed)')
    p.add_argument('--loop', action='store_true', help='play again from the start until stopped')
    p.add_argument('--clock', action='store_true',
                   help='publish /clock with the bag time (for use_sim_time nodes)')
    p.add_argument('--start_offset', type=_non_negative, default=0.0,
                   help='seconds of bag time to skip at the start (latched topics still sent)')
    p.add_argument('--duration', type=_positive, default=None,
                   help='seconds of bag time to play (default: to the end)')
    p.add_argument('--topics', nargs='+', default=None,
                   help='topics to play (default: all in the bag)')
    p.add_argument('--wait_for_subscribers', action='store_true',
                   help='before playing, wait until every non-latched topic has a subscriber')
    p.add_argument('--wait_timeout', type=_positive, default=30.0,
                   help='deadline for --wait_for_subscribers in seconds (default 30); '
                        'playback starts anyway after it, with a warning')
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(remove_ros_args(['bag_player', *argv])[1:])
    try:
        source = BagSource(args.bag)
    except (ValueError, FileNotFoundError) as e:
        print(f'bag_player: error: {e}', file=sys.stderr)
        return 1
    try:
        names = source.select(args.topics)
        start_ns, stop_ns = source.window(args.start_offset, args.duration)
    except ValueError as e:
        source.close()
        print(f'bag_player: error: {e}', file=sys.stderr)
        return 1
    # Ctrl-C / `ros2 launch` shutdown: only Python's KeyboardInterrupt, raised once where the
    # player is. rclpy's own handler also shut the context down at once, and the interrupt then
    # landed in the cleanup below (a traceback and exit code -2 under `ros2 launch`).
    rclpy.init(args=['bag_player', *argv], signal_handler_options=SignalHandlerOptions.NO)
    node = None
    try:
        node = BagPlayer(source, names, publish_clock=args.clock)
        if args.wait_for_subscribers:
            node.wait_for_subscribers(args.wait_timeout)
        node.play(start_ns, stop_ns, args.rate, args.loop)
        node.wait_for_acks(ACK_TIMEOUT_S)
    except (KeyboardInterrupt, ExternalShutdownException):
        if node is not None:
            node.report.interrupted = True
    finally:
        report = node.report if node is not None else None
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()
        source.close()
    if report is not None:
        print(report.format(), flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
