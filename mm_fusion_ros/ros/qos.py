"""QoS profiles, chosen on purpose and named once (STYLE §4).

Replay feeds training, so replayed sensor topics are RELIABLE with deep queues: best effort
loses MB-sized clouds over localhost, and a 100 Hz IMU beside image and cloud subscriptions
needs a deep queue (docs/measured_figures.md has both figures). A RELIABLE publisher
also matches best-effort subscribers, so the replay side loses no compatibility by it.
Sensor-data QoS is for live drivers only.
"""
from rclpy.qos import (
    DurabilityPolicy,
    HistoryPolicy,
    qos_profile_sensor_data,
    QoSProfile,
    ReliabilityPolicy,
)

from mm_fusion_ros.bag.topics import IMU_QUEUE_DEPTH, SENSOR_QUEUE_DEPTH

REPLAY_SENSOR_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=SENSOR_QUEUE_DEPTH,
                               reliability=ReliabilityPolicy.RELIABLE,
                               durability=DurabilityPolicy.VOLATILE)
LIVE_SENSOR_QOS = qos_profile_sensor_data
PATH_QOS = QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL)  # late RViz sees it
# Reading /tf_static: every broadcaster's latched message, also those sent before we started.
TF_STATIC_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=100,
                           reliability=ReliabilityPolicy.RELIABLE,
                           durability=DurabilityPolicy.TRANSIENT_LOCAL)
# /clock: only the newest time matters; RELIABLE still matches rclpy's best-effort clock reader.
CLOCK_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1,
                       reliability=ReliabilityPolicy.RELIABLE,
                       durability=DurabilityPolicy.VOLATILE)

MAX_LATCHED_DEPTH = 1000


def input_qos(mode: str):
    """(QoS of images and clouds, QoS of the small messages: IMU, ground truth, camera_info)
    of a synchronizer with InputConfig.sensor_qos `mode`. On replay the small ones get a deeper
    queue: the IMU comes at 10x the scan rate, and the depth rides out a moment when the
    callback thread is busy (bag/topics.py has the measurement)."""
    if mode != 'replay':
        return LIVE_SENSOR_QOS, LIVE_SENSOR_QOS
    return REPLAY_SENSOR_QOS, QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=IMU_QUEUE_DEPTH,
                                         reliability=ReliabilityPolicy.RELIABLE,
                                         durability=DurabilityPolicy.VOLATILE)


def replay_qos(plan) -> QoSProfile:
    """Publisher QoS to replay one bag topic (a bag.playback.TopicPlan).

    Latched (all recorded offers TRANSIENT_LOCAL) -> TRANSIENT_LOCAL, keeping every latched
    message of the bag (a bag may hold several /tf_static messages from different
    broadcasters); otherwise REPLAY_SENSOR_QOS, deepened to the recorded depth if larger (bags
    from kitti_to_bag record IMU_QUEUE_DEPTH for the IMU).
    Always RELIABLE, even for a topic recorded best effort.
    """
    if plan.latched:
        depth = min(max(plan.recorded_depth, plan.count, 1), MAX_LATCHED_DEPTH)
        return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=depth,
                          reliability=ReliabilityPolicy.RELIABLE,
                          durability=DurabilityPolicy.TRANSIENT_LOCAL)
    return QoSProfile(history=HistoryPolicy.KEEP_LAST,
                      depth=max(SENSOR_QUEUE_DEPTH, plan.recorded_depth),
                      reliability=ReliabilityPolicy.RELIABLE,
                      durability=DurabilityPolicy.VOLATILE)
