"""Under use_sim_time, a node's clock follows the bag's /clock, which jumps back when a bag
loops or a player restarts."""
from rclpy.clock import JumpThreshold
from rclpy.duration import Duration


class ClockJumpsBack:
    """Counts (and logs) jumps of the node's clock back by more than `min_back_s`, under
    use_sim_time only. Counted and reported only: the scans' own stamps start the
    synchronizer's new run when they go back too; starting it here would race the old run's
    messages still queued."""

    def __init__(self, node, min_back_s: float):
        self.count = 0
        self._node = node
        if node.get_parameter('use_sim_time').value:
            self._handle = node.get_clock().create_jump_callback(
                JumpThreshold(min_forward=None, on_clock_change=False,
                              min_backward=Duration(nanoseconds=-int(min_back_s * 1e9))),
                post_callback=self._on_jump)

    def _on_jump(self, jump):
        self.count += 1
        self._node.get_logger().info(
            f'/clock went back by {-jump.delta.nanoseconds / 1e9:.3f} s')
