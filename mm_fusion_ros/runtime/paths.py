"""The published paths: bounded, one per trajectory segment, and throttled.

A nav_msgs/Path of the whole run grows with it, and so does the time to publish it
(docs/online_runtime.md), so the node keeps the newest `max_poses` of the current segment and
publishes at most every `period_s` (a timer publishes what came after the last publication, e.g.
the end of a bag).
"""
from collections import deque
from dataclasses import dataclass, field
import time

from mm_fusion_ros.config import ConfigBase


@dataclass(frozen=True)
class PublishConfig(ConfigBase):
    """What the trainer node publishes besides /mm_fusion/odom."""

    path_publish_period_s: float = field(default=0.5, metadata={
        'help': 'publish /mm_fusion/path and /mm_fusion/gt_path at most this often [s]'})
    path_max_poses: int = field(default=10000, metadata={
        'help': 'the paths hold the newest this many poses of the current segment'})
    publish_gt_tf: bool = field(default=True, metadata={
        'help': 'publish odom -> base_link from ground truth on /tf (with tf2_msgs), so RViz '
                "places the bag's clouds"})

    def __post_init__(self):
        if not self.path_publish_period_s > 0 or self.path_max_poses < 1:
            raise ValueError('PublishConfig needs path_publish_period_s > 0 and '
                             'path_max_poses >= 1')


class PathThrottle:
    def __init__(self, period_s: float, clock=time.monotonic):
        self.period_s = period_s
        self.clock = clock
        self._last = None
        self.pending = False

    def added(self) -> bool:
        """A pose was appended; -> publish now?"""
        self.pending = True
        return self._last is None or self.clock() - self._last >= self.period_s

    def published(self) -> None:
        self._last = self.clock()
        self.pending = False


class PoseTrail:
    """The poses of the current segment (any items), newest `max_poses`."""

    def __init__(self, max_poses: int):
        if max_poses < 1:
            raise ValueError(f'path max_poses must be >= 1, got {max_poses}')
        self.items = deque(maxlen=max_poses)
        self.segment = None

    def add(self, segment: int, item) -> None:
        self.start(segment)
        self.items.append(item)

    def start(self, segment: int) -> None:
        """A pose of `segment` came (on this path or a sibling): the older segment's go."""
        if segment != self.segment:
            self.items.clear()
            self.segment = segment


class OdomOrder:
    """/mm_fusion/odom and /tf go forward in time within a trajectory segment: a pose older
    than the newest one published is left out (the paths still get it). With the filter at IMU
    rate a scan's pose comes after the IMU poses that passed it; without it nothing is left
    out (a segment's poses come in stamp order)."""

    def __init__(self):
        self.segment, self.stamp_ns = None, None

    def admit(self, segment: int, stamp_ns: int) -> bool:
        """Whether to publish this pose. A pose of an older segment never is: after a rewind
        its stamps lie ahead of the new segment's, and IMU-rate poses of the old one may still
        be on their way."""
        if self.segment is None or segment > self.segment or \
                (segment == self.segment and stamp_ns > self.stamp_ns):
            self.segment, self.stamp_ns = segment, stamp_ns
            return True
        return False
