"""online_finetune's intake process (OnlineConfig.intake = 'process'; runtime/intake_link.py).

The synchronizer node, as in one process, but spun in a child process whose sink writes to the
link: samples through shared memory, IMU batches, T_base_imu and ground truth on its queue.
The child takes the parent's ROS arguments, so the node has the same name, parameters and
topics as in one process (`ros2 param` reaches it there). It stops on SIGINT or SIGTERM (from
the parent), or by itself when the parent is gone.
"""
from dataclasses import dataclass
import os
import signal
import threading

from mm_fusion_ros.config import SampleConfig
from mm_fusion_ros.ros.spin import spin_nodes
from mm_fusion_ros.ros.synchronizer_node import SynchronizerNode
from mm_fusion_ros.runtime.intake_link import IntakeChannels, RingSink
from mm_fusion_ros.runtime.process import name_os_thread

PARENT_CHECK_S = 1.0


@dataclass
class IntakeSpec:
    """What the intake process builds its node from (picklable)."""
    ros_args: list
    sample_cfg: SampleConfig
    supervision: str


def intake_main(spec: IntakeSpec, channels: IntakeChannels) -> None:
    name_os_thread('intake')
    sink = RingSink(channels, spec.supervision)
    threading.Thread(target=_stop_when_orphaned, args=(channels.parent_pid,), daemon=True,
                     name='orphan_check').start()

    def make_nodes():
        node = SynchronizerNode(sample_cfg=spec.sample_cfg, sink=sink)
        sink.configure(node.sync.cfg)
        return [node]

    code = spin_nodes(make_nodes, spec.ros_args)
    for sig in (signal.SIGINT, signal.SIGTERM):   # a second stop must not cut the last words
        signal.signal(sig, signal.SIG_IGN)
    sink.end()
    raise SystemExit(code)


def _stop_when_orphaned(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        threading.Event().wait(PARENT_CHECK_S)
    os.kill(os.getpid(), signal.SIGTERM)
