"""bag_player: play a rosbag2 folder (mcap or sqlite3) with rclpy, for installs without `ros2 bag`.

    bag_player BAG [--rate R] [--loop | --loops N] [--clock] [--start_offset S] [--duration D]
               [--topics T ...] [--no_wait] [--wait_timeout S] [--read_ahead_mb MB]
               [--ros-args ...]   (see --help)

The recorded CDR bytes are published as they are, paced by record time (bag.playback.Pacer), with
ros/qos.py `replay_qos` (latched topics stay TRANSIENT_LOCAL, the rest RELIABLE, deep queues); a
topic whose message package does not import (tf2_msgs has no wheel) is skipped and reported. It
waits (at most --wait_timeout) for matched subscribers first (playback.MatchWait; not with
--no_wait); --clock publishes /clock at bag time. A thread reads the bag ahead of the schedule
(playback.ReadAhead), so a slow read does not delay publishing. Then it waits for
acknowledgements, and reports.
"""
import signal
import sys
import threading
import time

import rclpy
from rclpy.duration import Duration
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.impl.implementation_singleton import rclpy_implementation as _rclpy
from rclpy.node import Node
from rclpy.signals import SignalHandlerOptions
from rclpy.utilities import remove_ros_args

from mm_fusion_ros.bag import topics
from mm_fusion_ros.bag.playback import (
    BagSource,
    build_parser,
    MatchWait,
    open_window,
    Pacer,
    PlayReport,
    read_ahead,
    READ_AHEAD_MB,
)
from mm_fusion_ros.ros.conversions import import_message_class
from mm_fusion_ros.ros.qos import CLOCK_QOS, replay_qos
from mm_fusion_ros.stamps import NS_PER_S

# A reliable writer whose history is full of unacked samples refuses a write for a moment.
PUBLISH_RETRIES, PUBLISH_RETRY_PAUSE_S = 50, 0.01
ACK_TIMEOUT_S = 10.0
MAX_SLEEP_S = 0.1             # sleep in slices so a shutdown is noticed promptly


class BagPlayer(Node):
    """Publishers for a bag's topics and the paced play loop; the bag logic is bag.playback."""

    def __init__(self, source: BagSource, topic_names, publish_clock=False, stop=None,
                 read_ahead_mb: float = READ_AHEAD_MB):
        super().__init__('bag_player')
        self.source, self.report, self.stop = source, PlayReport(), stop or threading.Event()
        self.read_ahead_mb = read_ahead_mb
        self.publishers_by_topic = {}
        for topic in topic_names:
            plan = source.topics[topic]
            try:
                msg_class = import_message_class(plan.msgtype)
            except ImportError as e:
                self.get_logger().warning(f'not publishing {topic}: {e}')
                self.report.skipped_topics[topic], self.report.not_published[topic] = str(e), 0
                continue
            if plan.best_effort:
                self.get_logger().info(f'{topic} was recorded best effort; replaying RELIABLE')
            self.publishers_by_topic[topic] = self.create_publisher(
                msg_class, topic, replay_qos(plan))
            self.report.published[topic] = 0
        self.latched = {t for t in self.publishers_by_topic if source.topics[t].latched}
        clock_class = import_message_class(topics.CLOCK_TYPE)
        self.clock_msg, self.last_clock_ns, self._bag_s_done = clock_class(), None, 0.0
        self.clock_pub = self.create_publisher(clock_class, '/clock', CLOCK_QOS) \
            if publish_clock else None

    def wait_for_subscribers(self, timeout_s: float) -> list:
        """Spin until MatchWait is satisfied or the deadline; -> topics left without a reader."""
        pubs = {t: p for t, p in self.publishers_by_topic.items() if t not in self.latched}
        if not pubs:   # only latched topics: transient local, a late reader still gets them
            self.report.unmatched = []
            return []
        executor = SingleThreadedExecutor(context=self.context)
        executor.add_node(self)
        wait, deadline = MatchWait(), time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline and not self.stop.is_set() and not wait.ready(
                    time.monotonic(), {t: p.get_subscription_count() for t, p in pubs.items()},
                    {t: self.count_subscribers(t) for t in pubs}):
                executor.spin_once(timeout_sec=0.05)
        finally:
            executor.remove_node(self)
            executor.shutdown()
        self.report.unmatched = [t for t, p in pubs.items() if p.get_subscription_count() == 0]
        if time.monotonic() >= deadline:
            self.get_logger().warning(f'subscribers not all matched after {timeout_s:.1f} s '
                                      f'(none on: {", ".join(self.report.unmatched)}); playing')
        return self.report.unmatched

    def play(self, start_ns: int, stop_ns: int, rate: float, loop: bool, loops=0) -> PlayReport:
        """Play once, or with `loop` until stopped (`loops` > 0: that many passes)."""
        names = list(self.publishers_by_topic) + list(self.report.skipped_topics)
        began, passes = time.monotonic(), 0
        try:
            while (not passes or (loop and passes != loops)) and not self.stop.is_set():
                self.last_clock_ns = None     # a new pass: /clock goes back with the stamps
                sent = self._play_once(names, start_ns, stop_ns, Pacer(rate))
                passes, self.report.loops = passes + 1, self.report.loops + 1
                if loop and not sent:
                    self.get_logger().warning('no message of the played topics in the window: '
                                              'not looping over nothing')
                    break
        finally:
            self.report.wall_s += time.monotonic() - began
        return self.report

    def _play_once(self, names, start_ns, stop_ns, pacer) -> int:
        """One pass over the window; -> messages taken from the bag."""
        first_ns, taken = None, 0
        with read_ahead(self.source.messages(names, start_ns, stop_ns),
                        self.read_ahead_mb) as messages:
            for topic, stamp_ns, raw in messages:
                if pacer.start_wall is None:
                    # The clock starts with the first message in hand: opening the bag's
                    # indexes must not put the schedule behind and make the first messages go
                    # out at once.
                    pacer.start(start_ns, time.monotonic())
                due = pacer.due(stamp_ns)
                if not self._sleep_until(due):
                    raise ExternalShutdownException()
                first_ns = stamp_ns if first_ns is None else first_ns
                taken += 1
                publisher = self.publishers_by_topic.get(topic)
                if publisher is None:
                    self.report.not_published[topic] += 1
                    continue
                self.report.note_lateness(time.monotonic() - due)
                if self.clock_pub is not None:
                    self._publish_clock(stamp_ns)
                if self._publish(topic, publisher, raw):
                    self.report.published[topic] += 1
                self.report.bag_s = self._bag_s_done + (stamp_ns - first_ns) / NS_PER_S
        self._bag_s_done = self.report.bag_s
        return taken

    def _sleep_until(self, wall_target: float) -> bool:
        """Pace to the recorded time; False when stopped or shut down meanwhile."""
        while rclpy.ok(context=self.context) and time.monotonic() < wall_target:
            if self.stop.wait(min(wall_target - time.monotonic(), MAX_SLEEP_S)):
                return False
        return rclpy.ok(context=self.context) and not self.stop.is_set()

    def _publish(self, topic, publisher, raw: bytes) -> bool:
        for _ in range(PUBLISH_RETRIES):
            try:
                publisher.publish(raw)
                return True
            except _rclpy.RCLError as e:
                error = e
                time.sleep(PUBLISH_RETRY_PAUSE_S)
        self.report.failed[topic] = self.report.failed.get(topic, 0) + 1
        self.get_logger().error(f'publishing on {topic} failed {PUBLISH_RETRIES} times: {error}',
                                throttle_duration_sec=5.0)
        return False

    def _publish_clock(self, stamp_ns: int) -> None:
        if self.last_clock_ns is None or stamp_ns > self.last_clock_ns:
            self.clock_msg.clock.sec, self.clock_msg.clock.nanosec = divmod(stamp_ns, NS_PER_S)
            self.clock_pub.publish(self.clock_msg)
            self.last_clock_ns, self.report.clock_published = stamp_ns, \
                self.report.clock_published + 1

    def wait_for_acks(self, timeout_s: float) -> list:
        """Bounded wait until reliable readers acknowledged every message; -> topics not acked."""
        deadline = time.monotonic() + timeout_s
        publishers = {**self.publishers_by_topic, '/clock': self.clock_pub}
        self.report.unacked = [t for t, p in publishers.items() if p is not None and not
                               p.wait_for_all_acked(Duration(nanoseconds=int(
                                   max(0.0, deadline - time.monotonic()) * NS_PER_S)))]
        if self.report.unacked:
            self.get_logger().warning(f'not acknowledged within {timeout_s:.0f} s: '
                                      f'{", ".join(self.report.unacked)}')
        return self.report.unacked


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(__doc__.splitlines()[0]).parse_args(
        remove_ros_args(['bag_player', *argv])[1:])
    try:
        source, names, start_ns, stop_ns = open_window(args.bag, args.topics, args.start_offset,
                                                       args.duration)
    except (ValueError, FileNotFoundError) as e:
        print(f'bag_player: error: {e}', file=sys.stderr)
        return 1
    # SIGINT (Ctrl-C, `ros2 launch`) sets `stop`: a KeyboardInterrupt inside rclpy hung cleanup.
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    rclpy.init(args=['bag_player', *argv], signal_handler_options=SignalHandlerOptions.NO)
    node = None
    try:
        node = BagPlayer(source, names, publish_clock=args.clock, stop=stop,
                         read_ahead_mb=args.read_ahead_mb)
        if not args.no_wait:
            node.wait_for_subscribers(args.wait_timeout)
        node.play(start_ns, stop_ns, args.rate, args.loop or args.loops > 0, args.loops)
        node.wait_for_acks(ACK_TIMEOUT_S)
    except ExternalShutdownException:
        if node is not None:
            node.report.interrupted = True
    finally:
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()
        source.close()
    if node is not None:
        print(node.report.format(), flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
