"""The pure part of bag playback (rosbags only): what a bag offers, which messages of a time
window to play in which order, and when (wall clock) each one is due.

ros/bag_player.py wires this to rclpy publishers.
"""
from dataclasses import dataclass
from pathlib import Path

from rosbags.highlevel import AnyReader, AnyReaderError
from rosbags.interfaces import QosDurability, QosReliability
from rosbags.rosbag2 import ReaderError

from mm_fusion_ros.stamps import NS_PER_S


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
