"""Shared fixtures: a hand-made tiny KITTI tree (for reader tests, independent of the synthetic
world), the real KITTI sample, and isolated ROS 2 environments for multi-process tests."""
import os
from pathlib import Path
import random

import numpy as np
from PIL import Image
import pytest

from mm_fusion_ros.geometry import base_link_to_cam0, make_pose, rpy_to_rot
from mm_fusion_ros.kitti.odometry import (
    Calib,
    NOMINAL_TR,
    write_calib,
    write_poses,
    write_times,
    write_velodyne,
)
from mm_fusion_ros.kitti.raw import (
    OXTS_INDEX,
    OXTS_NAMES,
    write_calib_imu_to_velo,
    write_oxts_folder,
)

REPO = Path(__file__).resolve().parents[1]
KITTI_SAMPLE = REPO.parent / 'shared' / 'kitti_sample'
if not KITTI_SAMPLE.is_dir():  # CI lays shared/ beside the clone
    KITTI_SAMPLE = Path(os.environ.get('MMF_KITTI_SAMPLE', '/work/shared/kitti_sample'))

T0_NS = 1_317_384_000_000_000_000  # 2011-09-30 12:00:00 UTC


def tiny_calib():
    K = np.array([[718.856, 0.0, 607.1928], [0.0, 718.856, 185.2157], [0.0, 0.0, 1.0]])
    P = np.stack([np.hstack([K, np.zeros((3, 1))]) for _ in range(4)])
    P[2][:, 3] = [44.857, 0.2163, 0.0027]
    return Calib(P=P, Tr=NOMINAL_TR.copy())


def make_tiny_kitti(root, sequence='00', frames=6, speed=10.0, yaw_rate=0.1, seed=0):
    """A small but consistent KITTI tree: constant speed/yaw-rate motion, random PNGs and scans,
    and a 100 Hz OXTS folder whose first stamp is times.txt's zero."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    seq_dir = root / 'sequences' / sequence
    times = np.arange(frames) * 0.1
    write_times(seq_dir / 'times.txt', times)
    calib = tiny_calib()
    write_calib(seq_dir / 'calib.txt', calib)
    yaw = yaw_rate * times
    pos = np.stack([speed / yaw_rate * np.sin(yaw), speed / yaw_rate * (1 - np.cos(yaw)),
                    np.zeros(frames)], axis=1)
    poses_base = make_pose(rpy_to_rot(0 * yaw, 0 * yaw, yaw), pos)
    write_poses(root / 'poses' / f'{sequence}.txt', base_link_to_cam0(poses_base, calib.Tr))
    for k in range(frames):
        img = rng.integers(0, 255, size=(40, 120, 3), dtype=np.uint8)
        (seq_dir / 'image_2').mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(seq_dir / 'image_2' / f'{k:06d}.png')
        scan = rng.normal(0, 10, size=(500 + 37 * k, 4)).astype(np.float32)
        write_velodyne(root / 'pointclouds' / 'sequences' / sequence / 'velodyne' / f'{k:06d}.bin',
                       scan)
    imu_t = np.arange(0.0, times[-1] + 0.1, 0.01)
    fields = np.zeros((len(imu_t), len(OXTS_NAMES)))
    fields[:, OXTS_INDEX['yaw']] = yaw_rate * imu_t
    fields[:, OXTS_INDEX['ay']] = speed * yaw_rate  # centripetal
    fields[:, OXTS_INDEX['az']] = 9.81
    fields[:, OXTS_INDEX['wz']] = yaw_rate
    fields[:, OXTS_INDEX['vf']] = speed
    write_oxts_folder(seq_dir / 'oxts', T0_NS + np.round(imu_t * 1e9).astype(np.int64), fields)
    write_calib_imu_to_velo(seq_dir / 'calib_imu_to_velo.txt',
                            make_pose(np.eye(3), [-0.81, 0.32, -0.8]))
    return root


@pytest.fixture
def tiny_kitti(tmp_path):
    return make_tiny_kitti(tmp_path / 'kitti')


@pytest.fixture
def kitti_sample():
    if not (KITTI_SAMPLE / 'poses').is_dir():
        raise FileNotFoundError(f'{KITTI_SAMPLE}: the shared real KITTI sample is required')
    return KITTI_SAMPLE


@pytest.fixture
def ros_env():
    """Environment for ROS 2 subprocesses: localhost-only DDS and a private domain id."""
    env = dict(os.environ)
    env.update(ROS_AUTOMATIC_DISCOVERY_RANGE='LOCALHOST', ROS_LOCALHOST_ONLY='1',
               ROS_DOMAIN_ID=str(random.SystemRandom().randint(1, 101)),
               PYTHONUNBUFFERED='1')
    env['PYTHONPATH'] = os.pathsep.join(filter(None, [str(REPO), env.get('PYTHONPATH')]))
    return env


@pytest.fixture(scope='session')
def online_world(tmp_path_factory):
    """The synthetic world of the multi-process online tests, built once (online_harness.py)."""
    from online_harness import build_world  # torch and rclpy: only for the tests that use it
    return build_world(tmp_path_factory.mktemp('online_world'))


@pytest.fixture
def one_torch_thread():
    """2-core machines: one intra-op thread avoids OpenMP oversubscription stalls."""
    import torch  # only the tests that use it pay for importing torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
