"""online_finetune: synchronizer + trainer in one process, sharing the replay buffer in memory.

The default of finetune.launch.py. Threads: each node spins in a single-threaded executor of its
own (the synchronizer's callbacks only convert and enqueue, and a checkpoint written by a trainer
service never holds the sensors back); the synchronizer's dispatch worker predicts and publishes
each sample; the trainer's worker runs the gradient steps at idle priority and starts none while
samples wait for their prediction (OnlineTrainer.set_backlog); with the inertial filter at IMU
rate the trainer's imu_odometry worker polls the filter and publishes its poses. rclpy's
MultiThreadedExecutor took fewer IMU messages per second than this (docs/online_runtime.md).

With `intake: process` the synchronizer node runs in a child process instead (ros/
intake_process.py): its samples reach this process through shared memory, with the IMU, T_base_imu
and the ground truth on one ordered queue (runtime/intake_link.py), never through DDS a second
time; intake and prediction then each have a core and a GIL (docs/online_runtime.md). Two
separately launched nodes are not supported: samples are ~0.5-1 MB each and would cross DDS
again; run `synchronizer` alone only to collect a buffer file (buffer_path) for later training.

Construction order (ros/spin.py): the trainer node (checkpoint, sample shape, buffer,
trajectory), then the synchronizer node fed by it, then the IMU for bridging and for the
inertial filter wired from one to the other; only then do threads start and the nodes spin.
SIGINT (Ctrl-C, `ros2 launch` shutdown) ends it cleanly: training stops, then the final
checkpoint (save_on_shutdown), the buffer (buffer_path) and the trajectories (trajectory_dir)
are written atomically.
"""
import os
import sys

import torch.multiprocessing as tmp

from mm_fusion_ros.config import parameter_help
from mm_fusion_ros.ros.intake_process import intake_main, IntakeSpec
from mm_fusion_ros.ros.spin import spin_nodes
from mm_fusion_ros.ros.synchronizer_node import SynchronizerNode
from mm_fusion_ros.ros.trainer_node import TrainerNode
from mm_fusion_ros.runtime.intake_link import ImuMirror, IntakeChannels, IntakeLink, RING_SLOTS
from mm_fusion_ros.sync.config import SyncConfig
from mm_fusion_ros.training.learner import SampleRing


def build_online_nodes(args=None):
    """In creation order, so spin_nodes shuts the synchronizer down first: its last samples
    reach the trainer before the trainer writes its final files. With intake: process the
    synchronizer runs in a child process (the trainer node starts it and, at shutdown, handles
    its last samples before writing)."""
    trainer = TrainerNode()
    if trainer.online_cfg.intake == 'process':
        trainer.use_intake(intake_link(trainer, sys.argv if args is None else args))
        return [trainer]
    sync = SynchronizerNode(sample_cfg=trainer.sample_cfg, buffer=trainer.buffer, sink=trainer)
    trainer.trainer.use_imu(sync.sync.imu_between, sync.frames.rot_base_imu,
                            imu_after=sync.sync.imu_after, base_imu=sync.frames.base_imu)
    return [trainer, sync]


def intake_link(trainer: TrainerNode, ros_args) -> IntakeLink:
    """The link to an intake process that runs this process's synchronizer node."""
    ctx = tmp.get_context('spawn')   # DDS threads run here already: fork is unsafe
    channels = IntakeChannels(ring=SampleRing(ctx, trainer.sample_cfg, RING_SLOTS),
                              queue=ctx.Queue(), written=ctx.Value('q', 0, lock=False),
                              parent_pid=os.getpid())
    imu = ImuMirror(SyncConfig(), trainer.sample_cfg.imu_window_s,
                    min_keep_s=trainer.trainer.trajectory.cfg.max_bridge_s)
    return IntakeLink(ctx, channels, imu, intake_main,
                      IntakeSpec(list(ros_args), trainer.sample_cfg, trainer.supervision),
                      on_sample=trainer.on_sample, on_backlog=trainer.on_backlog,
                      on_ground_truth=trainer.on_ground_truth, faults=trainer.faults)


def usage(program: str, what: str, sections) -> str:
    return (f'usage: {program} [--ros-args -p NAME:=VALUE ... --params-file FILE]\n\n{what}\n\n'
            f'ROS parameters (default): config/finetune.yaml sets them for the launch files\n'
            f'{parameter_help(sections)}')


def main(args=None) -> int:
    sync = SynchronizerNode.PARAMETERS
    sections = [*TrainerNode.PARAMETERS.values(), sync['inputs'], sync['frames'], sync['sync']]
    return spin_nodes(lambda: build_online_nodes(args), args, usage(
        'online_finetune', 'Synchronizer and trainer in one process: fine-tunes the fusion '
        'model on live or replayed camera, LiDAR and IMU topics, publishes its poses.', sections))


def synchronizer_main(args=None) -> int:
    """The `synchronizer` executable: the synchronizer node alone, filling its buffer."""
    return spin_nodes(lambda: [SynchronizerNode()], args, usage(
        'synchronizer', 'The synchronizer alone: aligns camera, LiDAR and IMU topics into '
        'samples and keeps them in a replay buffer file (buffer_path).',
        SynchronizerNode.PARAMETERS.values()))


if __name__ == '__main__':
    raise SystemExit(main())
