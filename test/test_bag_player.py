"""bag_player (issue 4): pacing and window logic, and a real two-process replay: the player in a
subprocess, an rclpy subscriber here, on a private localhost-only DDS domain."""
import importlib.util
import re
import subprocess
import sys
import threading
import time

from conftest import make_tiny_kitti
import numpy as np
import pytest
import rclpy
from rclpy.executors import SingleThreadedExecutor
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from rosbags.interfaces import QosDurability

from mm_fusion_ros.bag import topics
from mm_fusion_ros.bag.playback import BagSource, MatchWait, Pacer, ReadAhead
from mm_fusion_ros.bag.writer import convert_sequence, ConvertOptions
from mm_fusion_ros.ros import bag_player
from mm_fusion_ros.ros.qos import replay_qos, REPLAY_SENSOR_QOS

FRAMES = 20
RATE = 4.0
HAVE_TF2 = importlib.util.find_spec('tf2_msgs') is not None


@pytest.fixture(scope='module')
def bag(tmp_path_factory):
    root = make_tiny_kitti(tmp_path_factory.mktemp('kitti') / 'data', frames=FRAMES)
    out = tmp_path_factory.mktemp('bags') / 'kitti_00'
    convert_sequence(ConvertOptions(data_path=root, sequence='00', output=out))
    return out


def _recorded(bag_path):
    """{topic: [(time_ns, raw bytes)]} straight from the bag."""
    with BagSource(bag_path) as src:
        out = {}
        for topic, stamp, raw in src.messages(list(src.topics), src.start_ns, src.end_ns):
            out.setdefault(topic, []).append((stamp, raw))
        return out


def test_pacer_targets_recorded_time_over_rate():
    pacer = Pacer(4.0)
    pacer.start(10_000_000_000, wall_now=100.0)
    assert pacer.due(10_000_000_000) == 100.0
    assert pacer.due(12_000_000_000) == pytest.approx(100.5)
    with pytest.raises(ValueError, match='rate must be > 0'):
        Pacer(0.0)


def test_bag_source_plans_windows_and_latched_topics(bag):
    with BagSource(bag) as src:
        assert src.topics[topics.TF_STATIC_TOPIC].latched
        assert not src.topics[topics.CLOUD_TOPIC].latched
        assert src.topics[topics.IMU_TOPIC].msgtype == 'sensor_msgs/msg/Imu'
        start, stop = src.window(1.0, 0.5)
        assert (start - src.start_ns, stop - start) == (1_000_000_000, 500_000_000)
        played = list(src.messages(src.select(None), start, stop))
        # /tf_static was recorded at the bag start; a late start still sends it first
        assert played[0][0] == topics.TF_STATIC_TOPIC and played[0][1] == start
        assert all(start <= t < stop for _, t, _ in played)
        clouds = [t for topic, t, _ in played if topic == topics.CLOUD_TOPIC]
        assert len(clouds) == 5
        with pytest.raises(ValueError, match=r"topic\(s\) \['/nope'\] not in the bag"):
            src.select(['/nope'])
        with pytest.raises(ValueError, match='past the bag'):
            src.window(100.0)
    with pytest.raises(FileNotFoundError, match='no metadata.yaml'):
        BagSource(bag.parent)


def test_read_ahead_keeps_order_and_its_bound_and_hands_on_errors(bag):
    with BagSource(bag) as src:
        window = (src.select(None), src.start_ns, src.end_ns)
        expected = list(src.messages(*window))
        with ReadAhead(src.messages(*window), max_bytes=50_000_000) as messages:
            assert list(messages) == expected
        assert len(expected) > 200

    read = []

    def source():
        try:
            for i in range(40):
                read.append(i)
                yield '/t', i, bytes(1000)
            raise OSError('disk gone at message 40')
        finally:
            read.append('closed')

    ahead = ReadAhead(source(), max_bytes=5000)
    taken = [next(ahead)[1] for _ in range(3)]
    deadline = time.monotonic() + 10.0     # the reader fills up to the bound and waits there
    while ahead.buffered_bytes < 5000 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)
    assert taken == [0, 1, 2] and ahead.buffered_bytes == 5000 and len(read) <= 3 + 5 + 1
    rest = []
    with pytest.raises(OSError, match='at message 40'):
        for item in ahead:
            rest.append(item[1])
    assert taken + rest == list(range(40)) and read[-1] == 'closed'
    ahead.close()

    # Left early (the player stopped): the thread ends and the source is closed.
    read.clear()
    big = ReadAhead(source(), max_bytes=1)    # one message always passes, however large
    assert next(big)[1] == 0
    big.close()
    assert not big._thread.is_alive() and read[-1] == 'closed' and len(read) <= 4


def test_replay_qos_keeps_latching_and_is_reliable(bag):
    with BagSource(bag) as src:
        tf_qos = replay_qos(src.topics[topics.TF_STATIC_TOPIC])
        cloud_qos = replay_qos(src.topics[topics.CLOUD_TOPIC])
        imu_qos = replay_qos(src.topics[topics.IMU_TOPIC])
        assert src.topics[topics.TF_STATIC_TOPIC].recorded_qos[0].durability == \
            QosDurability.TRANSIENT_LOCAL
    assert tf_qos.durability == DurabilityPolicy.TRANSIENT_LOCAL
    assert tf_qos.reliability == ReliabilityPolicy.RELIABLE
    assert cloud_qos.durability == DurabilityPolicy.VOLATILE
    assert cloud_qos.reliability == ReliabilityPolicy.RELIABLE
    assert cloud_qos.depth == REPLAY_SENSOR_QOS.depth >= 100
    # the bag records a 100 Hz-sized queue for the IMU, and the player honours it
    assert imu_qos.depth == topics.IMU_QUEUE_DEPTH >= 1000
    assert imu_qos.reliability == ReliabilityPolicy.RELIABLE


def test_message_classes_import_or_fail_clearly():
    assert bag_player.import_message_class('sensor_msgs/msg/PointCloud2').__name__ == \
        'PointCloud2'
    with pytest.raises(ImportError, match="package 'no_such_msgs' is not installed"):
        bag_player.import_message_class('no_such_msgs/msg/Thing')
    with pytest.raises(ImportError, match='has no Nothing'):
        bag_player.import_message_class('sensor_msgs/msg/Nothing')


def test_match_wait_needs_every_subscribed_topic_matched_for_a_while():
    wait = MatchWait(settle_s=0.3)
    graph = {'/a': 1, '/b': 1, '/info': 0}            # nobody subscribes to /info
    assert not wait.ready(0.0, {'/a': 0, '/b': 0, '/info': 0}, {t: 0 for t in graph})
    assert not wait.ready(0.1, {'/a': 1, '/b': 0, '/info': 0}, graph)   # /b not matched yet
    assert not wait.ready(0.2, {'/a': 1, '/b': 1, '/info': 0}, graph)   # settling
    assert wait.ready(0.5, {'/a': 1, '/b': 1, '/info': 0}, graph)
    assert not wait.ready(0.6, {'/a': 1, '/b': 0, '/info': 0}, graph)   # one went away


def test_cli_errors_name_the_problem(bag, tmp_path, capsys):
    assert bag_player.main([str(tmp_path / 'missing')]) == 1
    assert 'no metadata.yaml' in capsys.readouterr().err
    assert bag_player.main([str(bag), '--topics', '/kitti/nope']) == 1
    assert '/kitti/nope' in capsys.readouterr().err


@pytest.mark.parametrize('args, option, message', [
    (['--rate', 'nan'], '--rate', 'finite'), (['--duration', 'inf'], '--duration', 'finite'),
    (['--start_offset', 'inf'], '--start_offset', 'finite'),
    (['--loop', '--loops', '-3'], '--loops', '>= 0'),
    (['--read_ahead_mb', '-1'], '--read_ahead_mb', '>= 0')])
def test_cli_refuses_options_out_of_range_naming_them(bag, capsys, args, option, message):
    with pytest.raises(SystemExit):
        bag_player.main([str(bag), *args])
    err = capsys.readouterr().err
    assert option in err and message in err, err


def test_a_loop_over_an_empty_window_ends_and_latched_topics_need_no_wait(bag, ros_env,
                                                                          monkeypatch):
    """--loop over a window without a message of the played topics ends after one pass
    (it spun forever, deaf to Ctrl-C); playing only latched topics does not wait for
    subscribers that transient-local delivery does not need."""
    for key in ('ROS_DOMAIN_ID', 'ROS_AUTOMATIC_DISCOVERY_RANGE', 'ROS_LOCALHOST_ONLY'):
        monkeypatch.setenv(key, ros_env[key])
    rclpy.init()
    try:
        with BagSource(bag) as src:
            player = bag_player.BagPlayer(src, [topics.CLOUD_TOPIC])
            start = src.start_ns + 10_000_000          # between two scans 0.1 s apart
            done = []
            # In a thread: a regression spins forever instead of hanging the suite.
            playing = threading.Thread(target=lambda: done.append(player.play(
                start, start + 50_000_000, rate=1.0, loop=True)), daemon=True)
            playing.start()
            playing.join(10.0)
            assert done, 'the loop over an empty window did not end'
            assert done[0].loops == 1 and done[0].published == {topics.CLOUD_TOPIC: 0}
            player.destroy_node()
            latched = bag_player.BagPlayer(src, [topics.TF_STATIC_TOPIC])
            began = time.monotonic()
            assert latched.wait_for_subscribers(5.0) == []
            assert time.monotonic() - began < 1.0
            latched.destroy_node()
    finally:
        rclpy.shutdown()


def test_player_plays_the_requested_window_and_topics(bag, ros_env, monkeypatch, capsys):
    for key in ('ROS_DOMAIN_ID', 'ROS_AUTOMATIC_DISCOVERY_RANGE', 'ROS_LOCALHOST_ONLY'):
        monkeypatch.setenv(key, ros_env[key])
    chosen = [topics.CLOUD_TOPIC, topics.IMU_TOPIC]
    with BagSource(bag) as src:
        start, stop = src.start_ns + 1_000_000_000, src.start_ns + 1_500_000_000
    expected = {t: sum(start <= stamp < stop for stamp, _ in msgs)
                for t, msgs in _recorded(bag).items() if t in chosen}
    assert expected == {topics.CLOUD_TOPIC: 5, topics.IMU_TOPIC: 50}
    began = time.monotonic()
    assert bag_player.main([str(bag), '--topics', *chosen, '--start_offset', '1.0',
                            '--duration', '0.5', '--rate', '2', '--no_wait']) == 0
    elapsed = time.monotonic() - began
    out = capsys.readouterr().out
    published = {t: int(n) for t, n in re.findall(r'^  (/\S+)\s+(\d+)$', out, re.M)}
    assert published == expected, out
    assert elapsed >= 0.9 * 0.49 / 2, 'paced: 0.49 s of bag time at rate 2'


def _publish_times(source, duration_ns, reports=None, **player_options) -> list:
    """When each scan of the source's first duration_ns was published, played at rate 2
    (the player's report appended to `reports`)."""
    sent = []

    class Recording(bag_player.BagPlayer):
        def _publish(self, topic, publisher, raw):
            sent.append(time.monotonic())
            return super()._publish(topic, publisher, raw)

    rclpy.init()
    try:
        with source as src:
            player = Recording(src, [topics.CLOUD_TOPIC], **player_options)
            report = player.play(src.start_ns, src.start_ns + duration_ns, rate=2.0, loop=False)
            player.destroy_node()
            if reports is not None:
                reports.append(report)
    finally:
        rclpy.shutdown()
    return sent


def test_a_slow_first_read_does_not_send_the_first_messages_at_once(bag, ros_env, monkeypatch):
    """The schedule starts with the first message in hand: had it started before a slow
    first read, every message due meanwhile would go out in one burst."""
    for key in ('ROS_DOMAIN_ID', 'ROS_AUTOMATIC_DISCOVERY_RANGE', 'ROS_LOCALHOST_ONLY'):
        monkeypatch.setenv(key, ros_env[key])

    class SlowFirstRead(BagSource):
        def messages(self, names, start_ns, stop_ns):
            time.sleep(0.4)   # e.g. reading a large bag's chunk indexes
            yield from super().messages(names, start_ns, stop_ns)

    sent = _publish_times(SlowFirstRead(bag), 600_000_000)
    # scans 0.1 s apart at rate 2: 50 ms apart on the wall clock, from the first one on
    gaps = np.diff(sent)
    assert len(sent) == 6 and gaps.min() > 0.035, gaps


@pytest.mark.parametrize('read_ahead_mb', [64.0, 0.0])
def test_a_slow_read_mid_replay_does_not_delay_publishing(bag, ros_env, monkeypatch,
                                                           read_ahead_mb):
    """A read that stalls (a bag not in the page cache) is absorbed by the read-ahead thread:
    the scans still go out on their schedule. Read in the publishing loop (0), they go out
    late and then in a burst."""
    for key in ('ROS_DOMAIN_ID', 'ROS_AUTOMATIC_DISCOVERY_RANGE', 'ROS_LOCALHOST_ONLY'):
        monkeypatch.setenv(key, ros_env[key])

    class StallingRead(BagSource):
        def messages(self, names, start_ns, stop_ns):
            for i, item in enumerate(super().messages(names, start_ns, stop_ns)):
                if i == 12:    # due 0.6 s after the first; read ahead at once, before
                    time.sleep(0.4)
                yield item

    reports = []
    sent = _publish_times(StallingRead(bag), 2_000_000_000, reports, read_ahead_mb=read_ahead_mb)
    # 20 scans 0.1 s apart at rate 2: due 50 ms apart from the first one on
    late = np.asarray(sent) - sent[0] - 0.05 * np.arange(len(sent))
    assert len(sent) == FRAMES == 20
    if read_ahead_mb:
        assert late.max() < 0.15, late
    else:      # scan 12 read after scan 11 went out (0.55 s), 0.4 s later: ~0.35 s late
        assert late.max() > 0.25, late
    # The player's report says how far behind it fell (more than 10 ms: counted).
    report = reports[0]
    assert report.late_max_s == pytest.approx(late.max(), abs=0.02)
    assert (report.late_count > 0) == (late.max() > 0.01), (report.late_count, late)
    assert 'behind schedule' in report.format()


def test_sigint_while_playing_ends_the_player_cleanly(bag, ros_env):
    """As `ros2 launch` stops it: one SIGINT mid-replay -> the report, exit 0, no traceback."""
    import signal
    proc = subprocess.Popen([sys.executable, '-m', 'mm_fusion_ros.ros.bag_player', str(bag),
                             '--loop', '--topics', topics.IMU_TOPIC, '--no_wait'],
                            env=ros_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(4.0)   # imports and the first loops; it plays until told to stop
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out + err
    assert 'Traceback' not in err, err
    assert '(interrupted)' in out, out


def test_player_in_one_process_feeds_a_subscriber_in_another(bag, ros_env, monkeypatch):
    for key in ('ROS_DOMAIN_ID', 'ROS_AUTOMATIC_DISCOVERY_RANGE', 'ROS_LOCALHOST_ONLY'):
        monkeypatch.setenv(key, ros_env[key])
    recorded = _recorded(bag)
    expected = {t: msgs for t, msgs in recorded.items()
                if t != topics.TF_STATIC_TOPIC or HAVE_TF2}
    received = {t: [] for t in expected}
    clock_ns = []

    ctx = rclpy.Context()
    rclpy.init(context=ctx, domain_id=int(ros_env['ROS_DOMAIN_ID']))
    proc = None
    try:
        node = rclpy.create_node('bag_player_probe', context=ctx)
        with BagSource(bag) as src:
            types = {t: src.topics[t].msgtype for t in expected}
        for topic in expected:
            qos = QoSProfile(depth=1000, reliability=ReliabilityPolicy.RELIABLE)
            if topic == topics.TF_STATIC_TOPIC:
                qos.durability = DurabilityPolicy.TRANSIENT_LOCAL
            node.create_subscription(
                bag_player.import_message_class(types[topic]), topic,
                lambda raw, t=topic: received[t].append((time.monotonic(), raw)), qos, raw=True)
        clock_class = bag_player.import_message_class('rosgraph_msgs/msg/Clock')
        node.create_subscription(clock_class, '/clock', lambda m: clock_ns.append(
            m.clock.sec * 1_000_000_000 + m.clock.nanosec), QoSProfile(depth=1000))
        executor = SingleThreadedExecutor(context=ctx)
        executor.add_node(node)

        proc = subprocess.Popen(
            [sys.executable, '-m', 'mm_fusion_ros.ros.bag_player', str(bag), '--rate', str(RATE),
             '--wait_timeout', '20', '--clock', '--loops', '2'],
            env=ros_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline and proc.poll() is None:
            executor.spin_once(timeout_sec=0.1)
        # the player exits once every reader acknowledged: take what is still queued here
        for _ in range(20):
            executor.spin_once(timeout_sec=0.05)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        rclpy.try_shutdown(context=ctx)

    assert proc.returncode == 0, out
    for topic in expected:
        # two passes (--loops 2); the latched /tf_static goes out once per publisher
        got = [raw for _, raw in received[topic]]
        want = [raw for _, raw in expected[topic]] * (1 if topic == topics.TF_STATIC_TOPIC else 2)
        assert len(got) == len(want), f'{topic}: {len(got)} of {len(want)} received\n{out}'
        # DDS pads a serialized payload with zeros to a multiple of 4 bytes; nothing else changes
        for i, (g, w) in enumerate(zip(got, want)):
            assert g[:len(w)] == w and set(g[len(w):]) <= {0} and len(g) - len(w) < 4, \
                f'{topic} message {i}: payload differs from the recorded CDR bytes'
    if not HAVE_TF2:
        assert 'skipped (2 messages)' in out and 'tf2_msgs' in out   # once per pass
    assert 'no subscriber matched' not in out

    stamps = [t for topic in expected if topic != topics.TF_STATIC_TOPIC
              for t, _ in expected[topic]]
    arrivals = [w for topic in expected if topic != topics.TF_STATIC_TOPIC
                for w, _ in received[topic]]
    bag_span = (max(stamps) - min(stamps)) / 1e9
    wall_span = max(arrivals) - min(arrivals)
    assert bag_span == pytest.approx((FRAMES - 1) * 0.1 + 0.09, abs=0.02)
    # two passes played ~4x faster than recorded: never faster, and not much slower
    assert 0.9 * 2 * bag_span / RATE <= wall_span <= 2 * bag_span / RATE + 1.5, (wall_span, out)
    # /clock carried the bag time of the messages, in order, and went back once for pass two
    back = np.flatnonzero(np.diff(clock_ns) <= 0)
    assert len(back) == 1 and clock_ns[back[0] + 1] == min(stamps), back
    for part in (clock_ns[:back[0] + 1], clock_ns[back[0] + 1:]):
        assert min(part) == min(stamps) and max(part) == max(stamps)
    assert '2 loop(s)' in out
