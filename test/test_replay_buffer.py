"""ReplayBuffer: count/byte bounds, FIFO and reservoir policies, batch mixing, persistence,
thread safety."""
import json
import threading

import numpy as np
import pytest

from mm_fusion_ros.config import SampleConfig
from mm_fusion_ros.kitti.dataset import collate_samples
from mm_fusion_ros.kitti.sample import build_sample, CALIB_KEYS, Calibration, SAMPLE_KEYS
from mm_fusion_ros.sync.config import BufferConfig
from mm_fusion_ros.sync.replay_buffer import ReplayBuffer, sample_nbytes

CALIB = Calibration(intrinsics=[[100.0, 0, 60], [0, 100.0, 20], [0, 0, 1]], image_size=(120, 40),
                    t_cam_lidar=np.eye(4), t_imu_lidar=np.eye(4))

CFG = SampleConfig(image_height=8, image_width=8, max_points=32, imu_steps=4)


def real_sample(i, cfg=CFG, n_points=40):
    """A build_sample output whose image pixels and frame identify it."""
    rng = np.random.default_rng(i)
    images = [np.full((8, 8, 3), i % 256, dtype=np.uint8)] * 2
    scans = [rng.normal(size=(n_points, 4)).astype(np.float32) for _ in range(2)]
    return build_sample(cfg, stamps=(0.1 * i, 0.1 * i + 0.1), images=images, scans=scans,
                        poses=(np.eye(4), np.eye(4)), sequence='t', frame=i, calibration=CALIB)


def tiny_sample(i):
    """Same keys, tiny arrays: cheap enough for statistics over thousands of adds."""
    s = {k: np.zeros(1, dtype=np.float32) for k in SAMPLE_KEYS if k != 'meta'}
    s['meta'] = {'frame': i}
    return s


def frames(samples):
    return [s['meta']['frame'] for s in samples]


def test_fifo_count_bound_evicts_oldest():
    buf = ReplayBuffer(BufferConfig(capacity=10))
    for i in range(25):
        buf.add(real_sample(i))
        assert len(buf) == min(i + 1, 10)
    assert frames(buf.newest(10)) == list(range(15, 25))
    stats = buf.stats()
    assert (stats['size'], stats['total_added'], stats['evicted']) == (10, 25, 15)
    assert stats['bytes'] == 10 * sample_nbytes(real_sample(0))


@pytest.mark.parametrize('policy', ['fifo', 'reservoir'])
def test_byte_bound_never_exceeded(policy):
    cfg = SampleConfig(image_height=8, image_width=8, max_points=0, imu_steps=4)  # sizes vary
    sizes = [sample_nbytes(real_sample(i, cfg, 20 + 30 * (i % 7))) for i in range(7)]
    limit = int(3.5 * max(sizes))
    buf = ReplayBuffer(BufferConfig(capacity=100, max_bytes=limit, policy=policy))
    for i in range(60):
        buf.add(real_sample(i, cfg, 20 + 30 * (i % 7)))
        assert buf.nbytes <= limit
        assert buf.nbytes == sum(sample_nbytes(s) for s in buf.newest(len(buf)))
    assert len(buf) >= 3
    with pytest.raises(ValueError, match='max_bytes'):
        ReplayBuffer(BufferConfig(max_bytes=100)).add(real_sample(0))


def test_reservoir_keeps_a_uniform_sample_of_the_stream():
    capacity, stream, runs = 10, 100, 300
    counts = np.zeros(stream)
    for seed in range(runs):
        buf = ReplayBuffer(BufferConfig(capacity=capacity, policy='reservoir', seed=seed))
        for i in range(stream):
            buf.add(tiny_sample(i))
        kept = frames(buf.newest(capacity))
        assert len(set(kept)) == capacity
        counts[kept] += 1
    # Each item is kept with probability capacity/stream = 0.1 -> 30 of 300 runs.
    deciles = counts.reshape(10, 10).sum(axis=1)   # expected 300 each
    chi2 = ((deciles - 300) ** 2 / 300).sum()
    assert chi2 < 27.9, deciles  # chi-square, 9 dof, p = 0.001
    assert deciles[0] > 200 and deciles[-1] < 400  # FIFO would give 0 and 3000
    stats = buf.stats()
    assert stats['total_added'] == stream
    assert stats['evicted'] + stats['discarded'] == stream - capacity


def test_recent_fraction_mixes_newest_and_older():
    buf = ReplayBuffer(BufferConfig(capacity=100, recent_window=10, recent_fraction=0.5))
    for i in range(100):
        buf.add(tiny_sample(i))
    rng = np.random.default_rng(0)
    recent_share = []
    for _ in range(400):
        got = frames(buf.sample(8, rng))
        assert len(set(got)) == 8                       # no repeats while the buffer is larger
        assert sum(f >= 90 for f in got) >= 4           # 4 drawn from the newest 10
        recent_share.append(np.mean([f >= 90 for f in got]))
    # 4 recent + 4 uniform over the 96 others, 6 of which are recent.
    assert np.mean(recent_share) == pytest.approx(0.5 + 0.5 * 6 / 96, abs=0.02)
    only_old = ReplayBuffer(BufferConfig(capacity=100, recent_fraction=0.0))
    for i in range(100):
        only_old.add(tiny_sample(i))
    share = np.mean([f >= 90 for _ in range(200) for f in frames(only_old.sample(8, rng))])
    assert share == pytest.approx(0.1, abs=0.03)
    small = ReplayBuffer(BufferConfig(capacity=5))
    small.add(tiny_sample(0))
    assert frames(small.sample(4, rng)) == [0, 0, 0, 0]   # with replacement when too few
    with pytest.raises(ValueError, match='empty'):
        ReplayBuffer().sample(2, rng)


def test_samples_are_private_and_read_only():
    buf = ReplayBuffer()
    s = real_sample(3)
    buf.add(s)
    s['image'][:] = 0
    s['meta']['frame'] = 99
    (got,) = buf.sample(1, np.random.default_rng(0))
    assert got['image'].max() == 3 and got['meta']['frame'] == 3
    with pytest.raises(ValueError):
        got['image'][0, 0, 0, 0] = 1
    batch = collate_samples(buf.sample(2, np.random.default_rng(1)))
    assert tuple(batch['points'].shape) == (2, 2, 32, 4)
    assert batch['meta'][0]['frame'] == 3


@pytest.mark.parametrize('policy', ['fifo', 'reservoir'])
def test_save_load_round_trip_resumes(tmp_path, policy):
    cfg = BufferConfig(capacity=6, policy=policy, seed=5)
    buf = ReplayBuffer(cfg)
    for i in range(15):
        buf.add(real_sample(i))
    path = buf.save(tmp_path / 'sub' / 'buffer.npz')
    assert path.is_file() and not list(path.parent.glob('*.tmp'))
    loaded = ReplayBuffer.load(path, sample_cfg=CFG)
    assert loaded.cfg == cfg
    assert loaded.stats() == buf.stats()
    for a, b in zip(buf.newest(6), loaded.newest(6)):
        for key in SAMPLE_KEYS:
            if key != 'meta':
                np.testing.assert_array_equal(a[key], b[key])
                assert a[key].dtype == b[key].dtype
        assert a['meta'] == b['meta']
    # Continuing both gives the same memory (the reservoir's rng state was saved too).
    for i in range(15, 40):
        assert buf.add(real_sample(i)) == loaded.add(real_sample(i))
    assert sorted(frames(buf.newest(6))) == sorted(frames(loaded.newest(6)))


def test_format_1_file_loads_with_calibration_unknown(tmp_path):
    """A buffer saved before samples carried calibration still resumes, marked unknown."""
    buf = ReplayBuffer()
    for i in range(3):
        buf.add(real_sample(i))
    path = buf.save(tmp_path / 'new.npz')
    with np.load(path) as npz:
        arrays = {k: npz[k] for k in npz.files if k not in CALIB_KEYS}
    meta = json.loads(arrays['__meta__'].tobytes().decode())
    meta['format_version'] = 1
    meta['keys'] = [k for k in meta['keys'] if k not in CALIB_KEYS]
    meta['layout'] = {k: v for k, v in meta['layout'].items() if k not in CALIB_KEYS}
    arrays['__meta__'] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    old = tmp_path / 'old.npz'
    np.savez(old, **arrays)
    loaded = ReplayBuffer.load(old, sample_cfg=CFG)
    assert frames(loaded.newest(3)) == [0, 1, 2]
    assert all(set(s) == set(SAMPLE_KEYS) for s in loaded.newest(3))
    assert [s['calib_valid'].tolist() for s in loaded.newest(3)] == [[False] * 3] * 3
    assert buf.newest(1)[0]['calib_valid'].tolist() == [True] * 3
    np.testing.assert_array_equal(loaded.newest(1)[0]['points'], buf.newest(1)[0]['points'])
    batch = collate_samples(loaded.newest(3) + buf.newest(1))   # old and new mix in a batch
    assert batch['calib_valid'].tolist() == [[False] * 3] * 3 + [[True] * 3]
    assert batch['imu_span'].tolist()[:3] == [0.0] * 3


def test_variable_size_samples_round_trip(tmp_path):
    cfg = SampleConfig(image_height=8, image_width=8, max_points=0, imu_steps=4)
    buf = ReplayBuffer()
    for i in range(4):
        buf.add(real_sample(i, cfg, 10 + 5 * i))
    loaded = ReplayBuffer.load(buf.save(tmp_path / 'b.npz'))
    assert [s['points'].shape for s in loaded.newest(4)] == [(2, 10 + 5 * i, 4) for i in range(4)]
    np.testing.assert_array_equal(loaded.newest(1)[0]['points'], buf.newest(1)[0]['points'])


def test_empty_buffer_round_trip(tmp_path):
    loaded = ReplayBuffer.load(ReplayBuffer().save(tmp_path / 'empty.npz'))
    assert len(loaded) == 0 and loaded.stats()['total_added'] == 0
    loaded.add(real_sample(1))
    assert frames(loaded.newest(1)) == [1]


def test_load_smaller_capacity_keeps_newest(tmp_path):
    buf = ReplayBuffer(BufferConfig(capacity=10))
    for i in range(10):
        buf.add(real_sample(i))
    loaded = ReplayBuffer.load(buf.save(tmp_path / 'b.npz'), BufferConfig(capacity=4))
    assert frames(loaded.newest(4)) == [6, 7, 8, 9]


def test_bad_files_are_refused_naming_the_file(tmp_path):
    buf = ReplayBuffer()
    for i in range(3):
        buf.add(real_sample(i))
    good = buf.save(tmp_path / 'good.npz')
    with pytest.raises(FileNotFoundError, match='missing.npz'):
        ReplayBuffer.load(tmp_path / 'missing.npz')
    garbage = tmp_path / 'garbage.npz'
    garbage.write_bytes(b'not a zip file at all')
    with pytest.raises(ValueError, match='garbage.npz'):
        ReplayBuffer.load(garbage)
    truncated = tmp_path / 'truncated.npz'
    truncated.write_bytes(good.read_bytes()[:len(good.read_bytes()) // 2])
    with pytest.raises(ValueError, match='truncated.npz'):
        ReplayBuffer.load(truncated)
    with np.load(good) as npz:
        arrays = {k: npz[k] for k in npz.files}
    no_key = tmp_path / 'no_key.npz'
    np.savez(no_key, **{k: v for k, v in arrays.items() if k != 'target'})
    with pytest.raises(ValueError, match=r"no_key.npz: array 'target' missing"):
        ReplayBuffer.load(no_key)
    short = tmp_path / 'short.npz'
    np.savez(short, **{**arrays, 'imu': arrays['imu'][:2]})
    with pytest.raises(ValueError, match=r"short.npz: array 'imu' holds 2 samples"):
        ReplayBuffer.load(short)
    other = SampleConfig(image_height=16, image_width=8, max_points=32, imu_steps=4)
    with pytest.raises(ValueError, match=r"good.npz: sample 0 'image' has shape"):
        ReplayBuffer.load(good, sample_cfg=other)
    meta = json.loads(arrays['__meta__'].tobytes())
    meta['config']['capacity'] = -1
    bad_cfg = tmp_path / 'bad_cfg.npz'
    np.savez(bad_cfg, **{**arrays, '__meta__': np.frombuffer(json.dumps(meta).encode(), np.uint8)})
    with pytest.raises(ValueError, match='bad_cfg.npz: bad buffer config'):
        ReplayBuffer.load(bad_cfg)
    no_meta = tmp_path / 'no_meta.npz'
    np.savez(no_meta, **{k: v for k, v in arrays.items() if k != '__meta__'})
    with pytest.raises(ValueError, match='no_meta.npz'):
        ReplayBuffer.load(no_meta)
    for name, foreign in (('list_meta', [1, 2]), ('str_sample_meta', {**meta, 'meta': ['x'] * 3})):
        path = tmp_path / f'{name}.npz'
        np.savez(path, **{**arrays, '__meta__': np.frombuffer(json.dumps(foreign).encode(),
                                                               np.uint8)})
        with pytest.raises(ValueError, match=f'{name}.npz: '):
            ReplayBuffer.load(path)


def test_writer_and_sampler_threads(tmp_path):
    buf = ReplayBuffer(BufferConfig(capacity=50, recent_window=8))
    errors, sizes = [], []
    n_adds = 400
    buf.add(real_sample(0))
    start = threading.Barrier(2)

    def writer():
        start.wait()
        try:
            for i in range(1, n_adds):
                buf.add(real_sample(i))
                if i % 100 == 0:
                    buf.save(tmp_path / 'live.npz')
        except Exception as e:  # noqa: BLE001 - reported to the main thread
            errors.append(e)

    def sampler():
        rng = np.random.default_rng(0)
        start.wait()
        try:
            for _ in range(400):
                batch = buf.sample(4, rng)
                sizes.append(buf.stats()['size'])
                assert all(s['image'].shape == (2, 3, 8, 8) for s in batch)
                collate_samples(batch)
        except Exception as e:  # noqa: BLE001 - reported to the main thread
            errors.append(e)

    threads = [threading.Thread(target=writer), threading.Thread(target=sampler)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert max(sizes) <= 50
    stats = buf.stats()
    assert (stats['size'], stats['total_added'], stats['evicted']) == (50, n_adds, n_adds - 50)
    assert len(ReplayBuffer.load(tmp_path / 'live.npz')) == 50


def test_buffer_config_validation():
    with pytest.raises(ValueError, match='policy'):
        BufferConfig(policy='lifo')
    with pytest.raises(ValueError, match='recent_fraction'):
        BufferConfig(recent_fraction=1.5)
    with pytest.raises(ValueError, match='capacity'):
        BufferConfig(capacity=0)
    cfg = BufferConfig(capacity=7, policy='reservoir')
    assert BufferConfig.from_dict(cfg.to_dict()) == cfg
