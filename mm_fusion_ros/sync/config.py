"""Configs of the online pipeline's pure cores: the synchronizer and the replay buffer (STYLE §9).

Every field carries its help text in `metadata['help']`, so the ROS nodes can declare their
parameters straight from these dataclasses; range checks live in __post_init__.
"""
from dataclasses import dataclass, field

from mm_fusion_ros.bag import topics
from mm_fusion_ros.config import ConfigBase

MISSING_POLICIES = ('mask', 'drop')
GROUND_TRUTH_MODES = ('auto', 'require', 'ignore')
BUFFER_POLICIES = ('fifo', 'reservoir')
SENSOR_QOS = ('replay', 'live')


@dataclass(frozen=True)
class SyncConfig(ConfigBase):
    """How the synchronizer turns stamped sensor streams into DESIGN §5 samples.

    All times are sensor time (message stamps); the clock is the newest scan stamp seen.
    """

    sequence: str = field(default='online', metadata={
        'help': "meta['sequence'] of the emitted samples (also seeds point subsampling)"})
    slop_s: float = field(default=0.05, metadata={
        'help': 'max |camera stamp - scan stamp| for a camera frame to pair with a scan [s]'})
    gt_slop_s: float = field(default=0.01, metadata={
        'help': 'max |ground-truth stamp - scan stamp| for a pose to belong to a scan [s]'})
    max_lateness_s: float = field(default=1.0, metadata={
        'help': 'messages older than the newest scan stamp minus this are dropped as late [s]'})
    reorder_window_s: float = field(default=0.0, metadata={
        'help': 'hold each sample until scans this much newer arrived, so scans out of order '
                'by up to this much still chain in order (adds latency) [s]'})
    max_scan_gap_s: float = field(default=0.3, metadata={
        'help': 'a larger gap between consecutive scans restarts the chain (no sample '
                'across it) [s]'})
    camera_timeout_s: float = field(default=0.3, metadata={
        'help': 'sensor time after a scan (newer scans seen) before its camera counts '
                'missing [s]'})
    imu_timeout_s: float = field(default=0.3, metadata={
        'help': 'sensor time after a scan before IMU data up to it counts missing [s]'})
    gt_timeout_s: float = field(default=0.3, metadata={
        'help': 'sensor time after a scan before its ground-truth pose counts missing [s]'})
    missing_policy: str = field(default='mask', metadata={
        'help': "missing camera/IMU: 'mask' emits the sample with the modality off, 'drop' "
                'drops it'})
    ground_truth: str = field(default='auto', metadata={
        'help': "'auto': wait for GT once any GT was received (else target_valid False), "
                "and in the online node under train.supervision self 'ignore'; 'require': "
                "drop samples without GT; 'ignore': never wait for or use GT"})
    max_pending: int = field(default=32, metadata={
        'help': 'bound of each queue (scans, camera frames, GT poses, ready samples); the oldest '
                'entry is dropped when full'})
    max_imu_samples: int = field(default=4000, metadata={
        'help': 'IMU ring buffer size [samples]; must cover the longest IMU window plus lateness'})
    imu_keep_s: float = field(default=2.5, metadata={
        'help': 'IMU kept behind the newest scan, so a hole in the scans can be bridged with '
                'the gyro (see trajectory.max_bridge_s) [s]'})
    rewind_s: float = field(default=1.0, metadata={
        'help': 'a stream whose stamps go back by more than this starts a new run (a looped '
                'bag): pending data is flushed and forgotten, the samples carry a new '
                "meta['run'] [s]"})

    def for_supervision(self, supervision) -> 'SyncConfig':
        """The config for a trainer of `supervision` (TrainConfig.supervision; None: no
        trainer): ground_truth 'auto' becomes 'ignore' under 'self', so no sample ever waits for
        ground truth (DESIGN §9; the trainer still records it for scoring its trajectory).
        An explicit 'require' or 'ignore' stays as set."""
        if supervision == 'self' and self.ground_truth == 'auto':
            return self.replace(ground_truth='ignore')
        return self

    def __post_init__(self):
        for name in ('slop_s', 'gt_slop_s', 'max_lateness_s', 'reorder_window_s',
                     'camera_timeout_s', 'imu_timeout_s', 'gt_timeout_s', 'imu_keep_s'):
            if not getattr(self, name) >= 0:
                raise ValueError(f'SyncConfig.{name} must be >= 0, got {getattr(self, name)}')
        if not self.max_scan_gap_s > 0:
            raise ValueError(f'SyncConfig.max_scan_gap_s must be > 0, got {self.max_scan_gap_s}')
        longest_wait = max(self.camera_timeout_s, self.imu_timeout_s, self.gt_timeout_s,
                           self.reorder_window_s)
        if self.max_lateness_s < longest_wait:
            raise ValueError(f'SyncConfig.max_lateness_s ({self.max_lateness_s}) must be >= '
                             f'every timeout and reorder_window_s ({longest_wait}): a message '
                             'still waited for is not late')
        if not self.rewind_s > self.reorder_window_s:
            raise ValueError(f'SyncConfig.rewind_s ({self.rewind_s}) must be > reorder_window_s '
                             f'({self.reorder_window_s}): reordered scans are not a rewind')
        if self.missing_policy not in MISSING_POLICIES:
            raise ValueError(f'SyncConfig.missing_policy must be one of {MISSING_POLICIES}, got '
                             f'{self.missing_policy!r}')
        if self.ground_truth not in GROUND_TRUTH_MODES:
            raise ValueError(f'SyncConfig.ground_truth must be one of {GROUND_TRUTH_MODES}, got '
                             f'{self.ground_truth!r}')
        if self.max_pending < 2:
            raise ValueError(f'SyncConfig.max_pending must be >= 2, got {self.max_pending}')
        if self.max_imu_samples < 2:
            raise ValueError(f'SyncConfig.max_imu_samples must be >= 2, got '
                             f'{self.max_imu_samples}')


@dataclass(frozen=True)
class InputConfig(ConfigBase):
    """What the synchronizer node subscribes to, and how."""

    image_topic: str = field(default=topics.IMAGE_TOPIC, metadata={'help': 'camera images'})
    compressed_image: bool = field(default=False, metadata={
        'help': 'subscribe to sensor_msgs/CompressedImage (png, jpeg) on image_topic'})
    cloud_topic: str = field(default=topics.CLOUD_TOPIC, metadata={'help': 'LiDAR scans'})
    imu_topic: str = field(default=topics.IMU_TOPIC, metadata={'help': 'IMU samples'})
    ground_truth_topic: str = field(default=topics.GT_ODOM_TOPIC, metadata={
        'help': 'ground-truth nav_msgs/Odometry (bags carry it; robots do not)'})
    camera_info_topic: str = field(default=topics.CAMERA_INFO_TOPIC, metadata={
        'help': "sensor_msgs/CameraInfo of the camera: its K and image size (with the static "
                "transforms) give the samples' calibration for the self-supervised losses"})
    sensor_qos: str = field(default='replay', metadata={
        'help': "'replay': RELIABLE with deep queues; 'live': sensor-data QoS"})
    idle_flush_s: float = field(default=1.0, metadata={
        'help': 'release the scans waiting for a timeout after this long without a sensor '
                'message (the end of a bag) [s]'})
    buffer_path: str = field(default='', metadata={
        'help': 'synchronizer alone: replay buffer file loaded at start and saved at shutdown'})

    def __post_init__(self):
        if self.sensor_qos not in SENSOR_QOS:
            raise ValueError(f'InputConfig.sensor_qos must be one of {SENSOR_QOS}, got '
                             f'{self.sensor_qos!r}')
        if not self.idle_flush_s > 0:
            raise ValueError(f'InputConfig.idle_flush_s must be > 0, got {self.idle_flush_s}')


@dataclass(frozen=True)
class BufferConfig(ConfigBase):
    """Bounds, eviction policy and mini-batch mixing of the replay buffer."""

    capacity: int = field(default=1000, metadata={'help': 'max samples held'})
    max_bytes: int = field(default=1 << 30, metadata={
        'help': "max bytes held (sum of the samples' numpy arrays)"})
    policy: str = field(default='fifo', metadata={
        'help': "'fifo' evicts the oldest; 'reservoir' keeps a uniform sample of all ever added "
                '(Algorithm R)'})
    recent_fraction: float = field(default=0.5, metadata={
        'help': 'share of each mini-batch drawn from the newest recent_window samples'})
    recent_window: int = field(default=64, metadata={
        'help': 'how many of the newest samples count as recent'})
    seed: int = field(default=0, metadata={'help': 'seed of the reservoir replacement draws'})

    def __post_init__(self):
        if self.capacity < 1:
            raise ValueError(f'BufferConfig.capacity must be >= 1, got {self.capacity}')
        if self.max_bytes < 1:
            raise ValueError(f'BufferConfig.max_bytes must be >= 1, got {self.max_bytes}')
        if self.policy not in BUFFER_POLICIES:
            raise ValueError(f'BufferConfig.policy must be one of {BUFFER_POLICIES}, got '
                             f'{self.policy!r}')
        if not 0.0 <= self.recent_fraction <= 1.0:
            raise ValueError(f'BufferConfig.recent_fraction must be in [0, 1], got '
                             f'{self.recent_fraction}')
        if self.recent_window < 1:
            raise ValueError(f'BufferConfig.recent_window must be >= 1, got {self.recent_window}')
