"""The pure part of bag playback (rosbags only): what a bag offers, which messages of a time
window to play in which order, when (wall clock) each one is due, when the subscribers are there,
and the report of a replay.

ros/bag_player.py wires this to rclpy publishers.
"""
import argparse
import collections
import contextlib
from dataclasses import dataclass, field
import math
from pathlib import Path
import threading

from rosbags.highlevel import AnyReader, AnyReaderError
from rosbags.interfaces import QosDurability, QosReliability
from rosbags.rosbag2 import ReaderError

from mm_fusion_ros.bag.topics import CLOUD_TOPIC, REPLAY_TOPICS
from mm_fusion_ros.stamps import NS_PER_S

# bag_player --read_ahead_mb: at 10x a full-size KITTI bag is read at ~340 MB/s, so 64 MB hold
# ~0.2 s of it (~2 s at 1x).
READ_AHEAD_MB = 64.0
LATE_S = 0.01    # PlayReport counts the messages published later than this after they were due


@dataclass(frozen=True)
class TopicPlan:
    topic: str
    msgtype: str
    count: int                 # messages of this topic in the whole bag
    recorded_qos: tuple        # rosbags Qos profiles offered when it was recorded
    latched: bool              # every recorded offer was TRANSIENT_LOCAL (e.g. /tf_static)
    recorded_depth: int        # largest KEEP_LAST depth recorded (0 when unknown)
    best_effort: bool          # some recorded offer was BEST_EFFORT


def _topic_plan(topic, conns) -> TopicPlan:
    types = sorted({c.msgtype for c in conns})
    if len(types) > 1:
        raise ValueError(f'topic {topic} has several message types in the bag: {types}')
    qos = tuple(q for c in conns for q in getattr(c.ext, 'offered_qos_profiles', ()))
    latched = bool(qos) and all(q.durability == QosDurability.TRANSIENT_LOCAL for q in qos)
    return TopicPlan(topic=topic, msgtype=types[0], count=sum(c.msgcount for c in conns),
                     recorded_qos=qos, latched=latched,
                     recorded_depth=max((q.depth for q in qos), default=0),
                     best_effort=any(q.reliability == QosReliability.BEST_EFFORT for q in qos))


class BagSource:
    """An open rosbag2 folder: topic plans and raw (CDR) messages by record time."""

    def __init__(self, path):
        self.path = Path(path)
        if not (self.path / 'metadata.yaml').is_file():
            raise FileNotFoundError(f'{self.path}: not a rosbag2 folder (no metadata.yaml)')
        self.reader = AnyReader([self.path])
        try:
            self.reader.open()
        except (AnyReaderError, ReaderError) as e:
            raise ValueError(f'{self.path}: cannot open bag: {e}') from e
        by_topic = {}
        for conn in self.reader.connections:
            by_topic.setdefault(conn.topic, []).append(conn)
        self.topics = {t: _topic_plan(t, conns) for t, conns in sorted(by_topic.items())}
        self.start_ns = self.reader.start_time
        self.end_ns = self.reader.end_time     # rosbags: one past the last message

    def close(self):
        self.reader.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def select(self, names=None) -> list:
        """Topic names to play: `names` (each must exist) or all."""
        if not names:
            return list(self.topics)
        missing = [n for n in names if n not in self.topics]
        if missing:
            raise ValueError(f'{self.path}: topic(s) {missing} not in the bag; it has '
                             f'{list(self.topics)}')
        return list(dict.fromkeys(names))

    def window(self, start_offset_s=0.0, duration_s=None):
        """(start_ns, stop_ns) of the bag time to play; stop is exclusive."""
        if start_offset_s < 0 or (duration_s is not None and duration_s <= 0):
            raise ValueError(f'start_offset {start_offset_s} must be >= 0 and duration '
                             f'{duration_s} > 0')
        start = self.start_ns + round(start_offset_s * NS_PER_S)
        if start >= self.end_ns:
            raise ValueError(f"start_offset {start_offset_s} s is past the bag's end "
                             f'({(self.end_ns - self.start_ns) / NS_PER_S:.3f} s)')
        stop = self.end_ns if duration_s is None else \
            min(self.end_ns, start + round(duration_s * NS_PER_S))
        return start, stop

    def messages(self, names, start_ns, stop_ns):
        """Yield (topic, time_ns, raw CDR bytes) in record-time order.

        Latched topics' messages recorded before start_ns come first (at start_ns), so a late
        start still delivers /tf_static.
        """
        conns = [c for c in self.reader.connections if c.topic in set(names)]
        latched = [c for c in conns if self.topics[c.topic].latched]
        if latched and start_ns > self.start_ns:
            for conn, _, raw in self.reader.messages(connections=latched, stop=start_ns):
                yield conn.topic, start_ns, bytes(raw)
        for conn, stamp, raw in self.reader.messages(connections=conns, start=start_ns,
                                                     stop=stop_ns):
            yield conn.topic, stamp, bytes(raw)


class ReadAhead:
    """The messages of an iterator of (topic, time_ns, raw bytes), read by a thread of its own up
    to `max_bytes` ahead of the consumer (one message always, however large), in order.

    Why: reads of a bag that is not in the page cache stall now and then, and a player that
    reads in its publishing loop publishes the messages behind a stall late, then in a burst
    (docs/online_runtime.md, "Session 37"). rosbag2's player reads ahead in the same way
    (--read-ahead-queue-size). An error of the reader is raised to the consumer after the
    messages read before it. close() (or leaving a `with`) stops the thread and closes the
    iterator, before the caller closes the bag under it.
    """

    def __init__(self, messages, max_bytes: int):
        self._source, self._max = messages, max(int(max_bytes), 0)
        self._items, self._bytes = collections.deque(), 0
        self._done = self._closed = False
        self._error = None
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._fill, name='bag read-ahead', daemon=True)
        self._thread.start()

    def _fill(self):
        try:
            for item in self._source:
                size = len(item[2])
                with self._cond:
                    while self._items and self._bytes + size > self._max and not self._closed:
                        self._cond.wait()
                    if self._closed:
                        return
                    self._items.append(item)
                    self._bytes += size
                    self._cond.notify_all()
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            with self._cond:
                self._error = e
        finally:
            with self._cond:
                self._done = True
                self._cond.notify_all()
            close = getattr(self._source, 'close', None)
            if close is not None:      # a generator's cleanup runs in the thread that ran it
                close()

    def __iter__(self):
        return self

    def __next__(self):
        with self._cond:
            while not self._items and not self._done:
                self._cond.wait()
            if self._items:
                item = self._items.popleft()
                self._bytes -= len(item[2])
                self._cond.notify_all()
                return item
            if self._error is not None:
                error, self._error = self._error, None
                raise error
            raise StopIteration

    @property
    def buffered_bytes(self) -> int:
        with self._cond:
            return self._bytes

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def read_ahead(messages, read_ahead_mb: float):
    """`messages` read ahead by up to read_ahead_mb MB (ReadAhead), or as they are for 0."""
    if read_ahead_mb > 0:
        return ReadAhead(messages, int(read_ahead_mb * 1e6))
    return contextlib.closing(iter(messages)) if hasattr(messages, 'close') else \
        contextlib.nullcontext(iter(messages))


def replay_topics(bag, available, wanted=REPLAY_TOPICS, required=(CLOUD_TOPIC,)) -> list:
    """The `wanted` topics that the bag (`available`: its topic names) has, in that order: a
    bag without ground truth (kitti_to_bag --no_ground_truth, a robot's recording) or without
    a camera still plays. ValueError naming the bag when a `required` topic is missing."""
    missing = [t for t in required if t not in available]
    if missing:
        raise ValueError(f'{bag}: topic(s) {missing} not in the bag; it has {sorted(available)}')
    return [t for t in wanted if t in available]


def open_window(bag, topics=None, start_offset_s=0.0, duration_s=None):
    """(BagSource, topic names, start_ns, stop_ns) to play; the bag is closed on a bad choice."""
    source = BagSource(bag)
    try:
        return (source, source.select(topics), *source.window(start_offset_s, duration_s))
    except ValueError:
        source.close()
        raise


class Pacer:
    """Wall-clock target of each bag time: start_wall + (t - t_first) / rate."""

    def __init__(self, rate: float):
        if not rate > 0:
            raise ValueError(f'rate must be > 0, got {rate}')
        self.rate = rate
        self.t_first_ns = None
        self.start_wall = None

    def start(self, t_first_ns: int, wall_now: float) -> None:
        self.t_first_ns, self.start_wall = int(t_first_ns), float(wall_now)

    def due(self, t_ns: int) -> float:
        """Wall time (same clock as start's wall_now) when bag time t_ns is due."""
        return self.start_wall + (int(t_ns) - self.t_first_ns) / NS_PER_S / self.rate


class MatchWait:
    """When a player may start: every played topic that has a subscriber in the graph is
    matched by the player's publisher, at least one is, and that has held for `settle_s` (a
    node's endpoints are discovered one after the other). The clock is the caller's."""

    def __init__(self, settle_s: float = 0.3):
        self.settle_s = settle_s
        self._since = None

    def ready(self, now: float, matched: dict, in_graph: dict) -> bool:
        """matched / in_graph: topic -> subscribers matched by our publisher / in the graph."""
        ok = any(matched.values()) and all(matched[t] for t, n in in_graph.items() if n)
        if not ok:
            self._since = None
            return False
        if self._since is None:
            self._since = now
        return now - self._since >= self.settle_s


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
    late_max_s: float = 0.0    # the latest a message went out after it was due
    late_count: int = 0        # messages that went out more than LATE_S after they were due

    def note_lateness(self, late_s: float) -> None:
        self.late_max_s = max(self.late_max_s, late_s)
        self.late_count += late_s > LATE_S

    @property
    def effective_rate(self) -> float:
        return self.bag_s / self.wall_s if self.wall_s > 0 else 0.0

    def format(self) -> str:
        total = sum(self.published.values())
        lines = [f'bag_player: published {total} messages, {self.bag_s:.3f} s of bag time in '
                 f'{self.wall_s:.3f} s wall (effective rate {self.effective_rate:.2f}x), '
                 f'{self.loops} loop(s){" (interrupted)" if self.interrupted else ""}; '
                 f'{self.late_count} message(s) more than {LATE_S * 1e3:g} ms behind schedule '
                 f'(at most {self.late_max_s * 1e3:.1f} ms)']
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


def _number(minimum, strict):
    def parse(text):
        value = float(text)
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f'must be a finite number, got {text}')
        if value < minimum or (strict and value == minimum):
            raise argparse.ArgumentTypeError(f'must be {">" if strict else ">="} {minimum}, '
                                             f'got {text}')
        return value
    return parse


def _count(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f'must be an integer >= 0, got {text}')
    return value


def build_parser(description: str = '') -> argparse.ArgumentParser:
    """bag_player's command line (ros/bag_player.py)."""
    p = argparse.ArgumentParser(prog='bag_player', description=description)
    p.add_argument('bag', type=Path, help='rosbag2 folder (with metadata.yaml)')
    p.add_argument('--rate', type=_number(0, True), default=1.0,
                   help='playback speed factor (default 1.0 = recorded speed)')
    p.add_argument('--loop', action='store_true', help='play again from the start until stopped')
    p.add_argument('--loops', type=_count, default=0,
                   help='with --loop: stop after this many passes (default 0: never)')
    p.add_argument('--clock', action='store_true',
                   help='publish /clock with the bag time (for use_sim_time nodes)')
    p.add_argument('--start_offset', type=_number(0, False), default=0.0,
                   help='seconds of bag time to skip at the start (latched topics still sent)')
    p.add_argument('--duration', type=_number(0, True), default=None,
                   help='seconds of bag time to play (default: to the end)')
    p.add_argument('--topics', nargs='+', default=None,
                   help='topics to play (default: all in the bag)')
    p.add_argument('--read_ahead_mb', type=_number(0, False), default=READ_AHEAD_MB,
                   help='MB of messages read from the bag ahead of their time by a thread of '
                        f'their own, so a slow read does not delay publishing (default '
                        f'{READ_AHEAD_MB:g}; 0: read in the publishing loop)')
    p.add_argument('--no_wait', action='store_true',
                   help='play at once, without waiting for matched subscribers')
    p.add_argument('--wait_for_subscribers', action='store_true',
                   help='wait for matched subscribers before playing (the default)')
    p.add_argument('--wait_timeout', type=_number(0, True), default=30.0,
                   help='longest wait for subscribers in seconds (default 30); playback starts '
                        'anyway after it, with a warning')
    return p
