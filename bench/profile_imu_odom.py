"""CPU per IMU-rate odometry message of the trainer node (filter.publish_rate imu), stage by
stage: the filter's poll and its read-outs, and the Odometry message published.

    OMP_NUM_THREADS=1 .venv/bin/python bench/profile_imu_odom.py [--duration 60] [--src DIR]

The drive of bench/filter_online.py (synthetic, 100 Hz IMU into a Synchronizer, 10 Hz scans,
each step handed over 50 ms after its scan, no noise network) through FilterPoseSource at IMU
rate, polled at every IMU sample as the node's timer does, and every record it returns handed
to ros/pose_output.PoseOutput on a real rclpy node (odometry on a real publisher, no
subscriber; no tf2_msgs in this install: no /tf). Each stage is the CPU time of this thread
(bench/profile_stages.Stages: functions wrapped in place, nested stages subtracted) over the
IMU samples fed after the filter's poses began, per IMU-rate odometry message. The steps
(scan, relative pose, scan read-out) are counted apart. --src DIR profiles the package in DIR
(e.g. a worktree of main, for a before measurement).

What paces the poll is measured apart (--wake_s seconds each, 0: skip): the CPU per second of
a thread spinning an rclpy SingleThreadedExecutor over a node with the trainer node's other
timers (1 s, 0.05 s) with and without a 10 ms timer, and of a thread waiting on
runtime.workers.Pacer(0.01) (empty callbacks; the difference is the pacing's own cost).
"""
import argparse
import importlib
from pathlib import Path
import sys
import time

HERE = Path(__file__).resolve().parent


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--duration', type=float, default=60.0, help='drive length [s]')
    p.add_argument('--src', type=Path, default=None,
                   help='profile the mm_fusion_ros package in this folder')
    p.add_argument('--wake_s', type=float, default=5.0,
                   help='seconds per pacing measurement (0: skip)')
    return p


def wake_cost(seconds: float) -> None:
    """CPU ms per second of pacing a 10 ms poll: an rclpy timer vs a Pacer thread."""
    import rclpy
    from rclpy.clock import Clock, ClockType
    from rclpy.executors import SingleThreadedExecutor

    from mm_fusion_ros.runtime.workers import Pacer

    def spin(period):
        node = rclpy.create_node('wake_cost')
        steady = Clock(clock_type=ClockType.STEADY_TIME)
        for p in (1.0, 0.05) + ((period,) if period else ()):
            node.create_timer(p, lambda: None, clock=steady)
        executor = SingleThreadedExecutor()
        executor.add_node(node)
        t0, c0 = time.monotonic(), time.thread_time()
        while time.monotonic() - t0 < seconds:
            executor.spin_once(timeout_sec=0.5)
        cpu = (time.thread_time() - c0) / seconds * 1e3
        executor.remove_node(node)
        node.destroy_node()
        return cpu

    base, timer = spin(None), spin(0.01)
    pace, t0, c0 = Pacer(0.01), time.monotonic(), time.thread_time()
    while time.monotonic() - t0 < seconds:
        pace.wait()
    thread = (time.thread_time() - c0) / seconds * 1e3
    print(f'pacing a 10 ms poll, CPU ms/s: executor with the other timers {base:.1f}, plus a '
          f'10 ms timer {timer:.1f} (+{timer - base:.1f}); a Pacer thread {thread:.1f}')


# (owner, attribute, stage); owners are module paths or (module path, class name).
WRAPPED = [
    (('mm_fusion_ros.filter.odometry', 'InertialOdometry'), 'add_imu',
     'filter: IMU sample (propagate, pseudo-measurements)'),
    (('mm_fusion_ros.filter.ekf', 'InvariantEKF'), 'flush', 'filter: covariance propagation'),
    (('mm_fusion_ros.filter.odometry', 'InertialOdometry'), 'pose',
     'read-out: pose and pose covariance'),
    (('mm_fusion_ros.filter.online', 'FilterPoseSource'), '_twist', 'read-out: twist'),
    (('mm_fusion_ros.filter.online', 'FilterPoseSource'), '_imu_record',
     'record: anchor, covariance to odom'),
    (('mm_fusion_ros.filter.online', 'FilterPoseSource'), 'poll', 'poll: IMU store, rest'),
    ('mm_fusion_ros.ros.conversions', 'fill_odometry', 'message: fill Odometry'),
    (('mm_fusion_ros.ros.pose_output', 'PoseOutput'), '_publish_odom', 'message: publish'),
    (('mm_fusion_ros.ros.pose_output', 'PoseOutput'), 'publish',
     'message: allocate, order, rest'),
]


def owner_of(spec):
    if isinstance(spec, str):
        return importlib.import_module(spec)
    module, cls = spec
    return getattr(importlib.import_module(module), cls)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.src is not None:
        sys.path.insert(0, str(args.src.resolve()))
    sys.path.insert(1, str(HERE))
    import mm_fusion_ros
    print(f'package: {Path(mm_fusion_ros.__file__).parent}')
    from filter_online import data, LATENCY, LOGVAR
    from profile_stages import Stages
    import rclpy
    import torch

    from mm_fusion_ros.filter.config import FilterConfig
    from mm_fusion_ros.filter.online import FilterPoseSource, OnlineFilterConfig
    from mm_fusion_ros.ros.pose_output import PoseOutput
    from mm_fusion_ros.runtime.paths import PublishConfig
    from mm_fusion_ros.sync.config import SyncConfig
    from mm_fusion_ros.sync.synchronizer import Synchronizer
    from mm_fusion_ros.trajectory.chain import OnlineTrajectory
    from mm_fusion_ros.trajectory.covariance import diag_covariance

    torch.set_num_threads(1)
    rclpy.init()
    node = rclpy.create_node('profile_imu_odom')
    out = PoseOutput(node, PublishConfig())
    stamps, acc, gyr, scans, rel = data(args.duration)
    src = FilterPoseSource(OnlineFilterConfig(publish_rate='imu'), FilterConfig(), None, {})
    sync = Synchronizer(sync_cfg=SyncConfig(imu_keep_s=5.0))
    src.connect(sync.imu_after)
    traj = OnlineTrajectory(bridge=src, source=src)
    due = {int(scans[k]) + LATENCY: k for k in range(1, len(scans))}
    cov = diag_covariance(LOGVAR)
    st = Stages()
    for spec, attr, name in WRAPPED:
        st.wrap(owner_of(spec), attr, name)
    step_st = Stages()
    n = 0
    total = 0.0
    wall0 = None
    for i in range(len(stamps)):
        sync.add_imu(int(stamps[i]), acc[i], gyr[i])
        t0 = time.thread_time()
        records = src.poll()
        for record in records:
            out.publish(record, path=False)
        if wall0 is not None:
            total += time.thread_time() - t0
            n += len(records)
        elif records:      # the filter's poses began: count from the next sample on
            st.reset()
            wall0 = time.perf_counter()
        if i in due:
            k = due[i]
            kept = dict(st.time), dict(st.calls)   # the step's own stages are not counted
            with step_st('step: scan, relative pose, scan pose'):
                for record in traj.add_step(int(stamps[scans[k - 1]]), int(stamps[scans[k]]),
                                            rel[k - 1], cov):
                    out.publish(record, path=True)
            st.reset()
            st.time.update(kept[0])
            st.calls.update(kept[1])
    st.restore()
    wall = time.perf_counter() - wall0
    print(f"{n} IMU-rate odometry messages after the filter's poses began; "
          f'{len(due)} steps')
    print('| stage | us per IMU odometry message | share |')
    print('| --- | ---: | ---: |')
    for name, t in sorted(st.time.items(), key=lambda kv: -kv[1]):
        print(f'| {name} | {t / n * 1e6:.0f} | {t / total * 100:.0f} % |')
    rest = total - sum(st.time.values())
    print(f'| timer loop rest | {rest / n * 1e6:.0f} | {rest / total * 100:.0f} % |')
    print(f'| total (CPU of this thread) | {total / n * 1e6:.0f} | 100 % |')
    (_, t_step), = step_st.time.items()
    print(f'wall {wall / n * 1e6:.0f} us per message; step (not in the table): '
          f'{t_step / len(due) * 1e6:.0f} us each; counts {src.stats()}')
    node.destroy_node()
    if args.wake_s > 0 and hasattr(importlib.import_module('mm_fusion_ros.runtime.workers'),
                                   'Pacer'):
        wake_cost(args.wake_s)
    rclpy.try_shutdown()
    return 0


if __name__ == '__main__':
    sys.exit(main())
