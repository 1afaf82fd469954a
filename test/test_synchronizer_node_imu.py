"""The synchronizer node's batched IMU intake, for real: the node in a process of its own, this
test's publisher in another, on a private localhost domain. Bursts of IMU messages, published
faster than one callback per message could take them, all reach the synchronizer, in fewer
callbacks than messages (its /diagnostics: received_imu, imu_batches)."""
import signal
import subprocess
import sys

from conftest import REPO
from online_harness import fresh_env, Probe, ros_domain
from rclpy.duration import Duration
from rclpy.qos import QoSProfile, ReliabilityPolicy
from rclpy.serialization import serialize_message

from mm_fusion_ros.bag import topics

BURSTS, PER_BURST = 4, 400    # a burst fits the node's IMU queue (ros/qos.py: 1000)


class SynchronizerProcess:
    def __init__(self, env, log_path):
        self.log_path = log_path
        self._log = open(log_path, 'w')
        self.proc = subprocess.Popen(
            [sys.executable, '-m', 'mm_fusion_ros.ros.synchronizer_node', '--ros-args', '-p',
             'sample.image_height:=8', '-p', 'sample.image_width:=8'],
            env=env, stdout=self._log, stderr=subprocess.STDOUT, cwd=REPO)

    def log(self) -> str:
        return self.log_path.read_text()

    def interrupt(self) -> int:
        self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout=30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self._log.close()


def imu_message(k):
    from sensor_msgs.msg import Imu
    msg = Imu()
    msg.header.stamp.sec, msg.header.stamp.nanosec = 100 + k // 100, (k % 100) * 10_000_000
    msg.header.frame_id = 'imu_link'
    msg.linear_acceleration.z = 9.81
    msg.angular_velocity.z = k * 1e-3
    return serialize_message(msg)


def test_bursts_of_imu_reach_the_synchronizer_without_loss_in_batches(tmp_path):
    from sensor_msgs.msg import Imu
    env = fresh_env()
    node = SynchronizerProcess(env, tmp_path / 'synchronizer.log')
    with ros_domain(env):
        probe = Probe(env)
    try:
        pub = probe.node.create_publisher(
            Imu, topics.IMU_TOPIC, QoSProfile(depth=PER_BURST,
                                              reliability=ReliabilityPolicy.RELIABLE))
        probe.wait_until(lambda: pub.get_subscription_count() > 0,
                         f'the synchronizer subscribed to {topics.IMU_TOPIC}', node)
        raws = [imu_message(k) for k in range(BURSTS * PER_BURST)]
        for b in range(BURSTS):
            for raw in raws[b * PER_BURST:(b + 1) * PER_BURST]:
                pub.publish(raw)
            assert pub.wait_for_all_acked(Duration(seconds=30)), 'IMU burst not acknowledged'
            # Acknowledged means in the reader's queue, not taken: the next burst waits until
            # the node took this one, or a node starved by a loaded machine would see more
            # than its queue's depth (1000) at once and lose the oldest (KEEP_LAST).
            done = str((b + 1) * PER_BURST)
            probe.wait_until(lambda n=done: probe.diagnostics.get('received_imu') == n,
                             f'{done} IMU messages in the synchronizer /diagnostics', node,
                             timeout=30.0)
        total = str(BURSTS * PER_BURST)
        diagnostics = dict(probe.diagnostics)
    finally:
        probe.close()
        code = node.interrupt()
    assert code == 0, node.log()[-3000:]
    assert not any(k.startswith('dropped_') for k in diagnostics), diagnostics
    batches = int(diagnostics['imu_batches'])
    assert 1 <= batches < BURSTS * PER_BURST // 2, f'{batches} callbacks took {total} messages'
