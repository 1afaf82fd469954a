"""online_finetune: synchronizer + trainer in one process, sharing the replay buffer in memory.

The default of finetune.launch.py. Both nodes spin in one MultiThreadedExecutor: sensor callbacks,
the IMU, services and timers in separate callback groups, gradient steps in the trainer's own
thread. The two-process form (synchronizer and trainer in separate processes) is not supported:
samples are ~0.5-1 MB each and would have to cross DDS a second time; run `synchronizer` alone
only to collect a buffer file (buffer_path) for later training.

SIGINT (Ctrl-C, `ros2 launch` shutdown) ends it cleanly: training stops, then the final
checkpoint (save_on_shutdown), the buffer (buffer_path) and the trajectories (trajectory_dir)
are written atomically.
"""
import logging

import rclpy
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor

from mm_fusion_ros.config import SampleConfig
from mm_fusion_ros.ros.params import declare_config
from mm_fusion_ros.ros.synchronizer_node import SynchronizerNode
from mm_fusion_ros.ros.trainer_node import TrainerNode
from mm_fusion_ros.sync.config import BufferConfig
from mm_fusion_ros.sync.replay_buffer import ReplayBuffer
from mm_fusion_ros.training.online import sample_config_for

log = logging.getLogger(__name__)


def spin_nodes(make_nodes, args=None, num_threads=4) -> int:
    """STYLE §5: init, spin in try, catch KeyboardInterrupt/ExternalShutdownException, then
    shut the nodes down (their `shutdown()` writes files) and rclpy last."""
    rclpy.init(args=args)
    nodes = []
    try:
        nodes = make_nodes()
        executor = MultiThreadedExecutor(num_threads=num_threads)
        for node in nodes:
            executor.add_node(node)
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        for node in reversed(nodes):
            if hasattr(node, 'shutdown'):
                node.shutdown()
            node.destroy_node()
        rclpy.try_shutdown()
    return 0


def build_online_nodes():
    """Trainer first (its checkpoint fixes the sample shape), then the synchronizer feeding it."""
    holder = rclpy.create_node('mm_fusion_online_config')
    try:
        buffer_cfg = declare_config(holder, BufferConfig, prefix='buffer.')
        base_sample = declare_config(holder, SampleConfig, prefix='sample.')
        buffer_path = holder.declare_parameter('buffer_path', '').value
    finally:
        holder.destroy_node()
    trainer = TrainerNode(buffer=None)
    sample_cfg = sample_config_for(trainer.model_cfg, base_sample)
    if buffer_path and _exists(buffer_path):
        buffer = ReplayBuffer.load(buffer_path, buffer_cfg, sample_cfg=sample_cfg)
        trainer.get_logger().info(f'resumed {len(buffer)} samples from {buffer_path}')
    else:
        buffer = ReplayBuffer(buffer_cfg)
    trainer.trainer.buffer = buffer
    sync = SynchronizerNode(sample_cfg=sample_cfg, buffer=buffer, on_sample=trainer.on_sample)
    return [sync, trainer]


def _exists(path):
    from pathlib import Path
    return Path(path).is_file()


def main(args=None) -> int:
    return spin_nodes(build_online_nodes, args)


if __name__ == '__main__':
    raise SystemExit(main())
