"""bench/online.py's bookkeeping of what the node publishes, without a node: where a scan's pose
arrives (odom, or at IMU rate the path) and the IMU-rate odometry's rate and latency."""
import importlib.util
from pathlib import Path
import sys
import threading

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / 'bench' / 'online.py'


@pytest.fixture(scope='module')
def bench():
    sys.path.insert(0, str(BENCH.parent))   # as when run as a script: bag_args beside it
    spec = importlib.util.spec_from_file_location('bench_online', BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def probe(bench, odom, path):
    """A Probe's arrival tables without its ROS node."""
    p = bench.Probe.__new__(bench.Probe)
    p.lock, p.odom_arrival, p.path_arrival = threading.Lock(), dict(odom), dict(path)
    return p


SCANS = {1000, 1100, 1200}


def test_scan_rate_poses_come_from_odom(bench):
    p = probe(bench, odom={1000: 5.0, 1100: 5.2, 1200: 5.3}, path={1000: 6.0, 1100: 6.0})
    assert not p.imu_rate(SCANS)
    assert p.scan_arrival(SCANS) == {1000: 5.0, 1100: 5.2, 1200: 5.3}
    assert p.last_pose(SCANS) == 5.3     # the throttled path does not end the replay
    assert bench.imu_odom_summary(p.odom_arrival, SCANS, {})[0] == 0


def test_imu_rate_poses_come_from_the_path(bench):
    # Odometry at IMU stamps (and one early scan pose, before the filter's poses began).
    odom = {1000: 5.0, 1110: 5.21, 1120: 5.22, 1130: 5.23}
    path = {1000: 5.5, 1100: 5.5, 1200: 6.0}
    p = probe(bench, odom, path)
    assert p.imu_rate(SCANS)
    assert p.scan_arrival(SCANS) == path
    assert p.last_pose(SCANS) == 6.0
    n, rate, latency = bench.imu_odom_summary(odom, SCANS, {1110: 5.2, 1120: 5.2})
    assert n == 3 and rate == pytest.approx(2 / 0.02)
    assert np.allclose(np.sort(latency), [10.0, 20.0])   # 1130 was not published: left out
    # A filter with imu_time_offset_s -0.06 stamps the pose of IMU message t at t - 60 ms.
    late = {s - 60: t for s, t in odom.items() if s != 1000}
    _, _, shifted = bench.imu_odom_summary(late, SCANS, {1110: 5.2, 1120: 5.2}, offset_ns=-60)
    assert np.allclose(np.sort(shifted), [10.0, 20.0])
    assert len(bench.imu_odom_summary(late, SCANS, {1110: 5.2, 1120: 5.2})[2]) == 0


def test_the_filter_offset_comes_from_the_filter_checkpoint_given(bench, tmp_path):
    from mm_fusion_ros.filter.checkpoint import filter_payload, save_filter_checkpoint
    from mm_fusion_ros.filter.config import FilterConfig
    path = save_filter_checkpoint(tmp_path / 'f.pth',
                                  filter_payload(FilterConfig(imu_time_offset_s=-0.0609)))
    assert bench.filter_offset_ns(['training_enabled:=true']) == 0
    assert bench.filter_offset_ns([f'filter.checkpoint:={path}']) == -60_900_000


def diagnostics(name, **values):
    from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
    msg = DiagnosticArray()
    msg.status = [DiagnosticStatus(name=name, values=[KeyValue(key=k, value=str(v))
                                                      for k, v in values.items()])]
    return msg


def test_the_buffer_is_full_when_the_trainer_reports_it_full(bench):
    # With the guard's admission the buffer fills with scored samples only, long after
    # `capacity` samples were emitted: the fill comes from the trainer's status.
    p = probe(bench, odom={}, path={})
    p.diag, p.buffer_sizes = {}, []
    p._on_diag(diagnostics('online_finetune: synchronizer', emitted=120))
    for size in (3, 9, 16, 16):
        p._on_diag(diagnostics('online_finetune: trainer', buffer_size=size))
    assert p.diag == {'emitted': '120'}
    assert [s for _, s in p.buffer_sizes] == [3, 9, 16, 16]
    assert p.buffer_full_at(16) == p.buffer_sizes[2][0]
    assert p.buffer_full_at(40) is None and p.buffer_size() == 16


def test_the_machine_reference_times_the_bench_model_in_a_process_of_its_own(bench):
    ms = bench.machine_reference()
    assert ms is not None and 0.1 < ms < 1000.0
