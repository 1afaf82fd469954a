"""Online calibration (issue 12): CalibrationTracker from CameraInfo and static transforms, the
replay plan of a bag without ground truth, and sync.ground_truth under self-supervision. Pure
(no ROS graph): real bags written by kitti_to_bag's writer, read back with rosbags."""
import importlib.util
from types import SimpleNamespace

from conftest import T0_NS
import numpy as np
import pytest

from mm_fusion_ros.bag import topics
from mm_fusion_ros.bag.playback import replay_topics
from mm_fusion_ros.bag.reader import read_numpy, static_transforms
from mm_fusion_ros.bag.writer import convert_sequence, ConvertOptions
from mm_fusion_ros.config import SampleConfig
from mm_fusion_ros.geometry import make_pose, rpy_to_rot
from mm_fusion_ros.kitti.dataset import KITTIOdomPointDataset, sequence_calibration
from mm_fusion_ros.kitti.odometry import KittiSequence
from mm_fusion_ros.kitti.sample import calibration_arrays
from mm_fusion_ros.messages import camera_info_to_arrays
from mm_fusion_ros.ros.runner import replay_plan
from mm_fusion_ros.sync.calibration import CalibrationTracker
from mm_fusion_ros.sync.config import SyncConfig
from mm_fusion_ros.sync.frames import FrameConfig, StaticTransforms, transform_line
from mm_fusion_ros.sync.synchronizer import Synchronizer
from mm_fusion_ros.synthetic.writer import generate_sequence

K = np.array([[700.0, 0.0, 600.0], [0.0, 710.0, 180.0], [0.0, 0.0, 1.0]])
T_VELO_CAM = make_pose(rpy_to_rot(-np.pi / 2, 0.0, -np.pi / 2), [0.27, 0.0, -0.08])
T_VELO_IMU = make_pose(rpy_to_rot(0.01, -0.02, 0.005), [-0.81, 0.32, -0.80])
LINES = ('base_link velodyne 0 0 0 0 0 0 1',
         transform_line('velodyne', 'camera2', T_VELO_CAM),
         transform_line('velodyne', 'imu_link', T_VELO_IMU))


def test_transform_line_round_trips_through_the_parameter_parser():
    parsed = StaticTransforms.parse(LINES)
    np.testing.assert_allclose(parsed.lookup('velodyne', 'camera2'), T_VELO_CAM, atol=1e-12)
    np.testing.assert_allclose(parsed.lookup('imu_link', 'velodyne'),
                               np.linalg.inv(T_VELO_IMU), atol=1e-12)


def test_tracker_knows_what_it_was_given_and_reports_only_changes():
    bare = CalibrationTracker(FrameConfig())        # the default: base_link = velodyne only
    assert bare.known() == {'intrinsics': False, 't_cam_lidar': False, 't_imu_lidar': False}

    tracker = CalibrationTracker(FrameConfig(static_transforms=LINES))
    assert tracker.known() == {'intrinsics': False, 't_cam_lidar': True, 't_imu_lidar': True}
    np.testing.assert_allclose(tracker.current.t_cam_lidar, np.linalg.inv(T_VELO_CAM),
                               atol=1e-12)
    calib = tracker.add_camera_info(K, 1242, 375, 'camera2')
    assert calib is tracker.current and tracker.updates == 1
    np.testing.assert_array_equal(calib.intrinsics, K)
    assert calib.image_size == (1242, 375)
    assert tracker.add_camera_info(K, 1242, 375, 'camera2') is None   # 10 Hz, unchanged
    assert tracker.updates == 1 and tracker.camera_infos == 2
    assert tracker.status() == {'calib_intrinsics': 'known', 'calib_t_cam_lidar': 'known',
                                'calib_t_imu_lidar': 'known', 'calib_updates': '1',
                                'camera_info_received': '2'}
    # CameraInfo's frame wins over frames.camera_frame: an unknown one has no extrinsic.
    moved = tracker.add_camera_info(K, 1242, 375, 'camera_left')
    assert moved.intrinsics is not None and moved.t_cam_lidar is None


def test_a_static_transform_that_arrives_later_completes_the_calibration():
    frames = FrameConfig()
    tracker = CalibrationTracker(frames)
    tracker.add_camera_info(K, 620, 188, '')      # no frame id: frames.camera_frame (camera2)
    assert tracker.known()['t_cam_lidar'] is False
    assert tracker.refresh() is None              # nothing new
    tracker.transforms.add('velodyne', 'camera2', T_VELO_CAM)   # as /tf_static delivers it
    calib = tracker.refresh()
    np.testing.assert_allclose(calib.t_cam_lidar, np.linalg.inv(T_VELO_CAM), atol=1e-12)
    assert calib.t_imu_lidar is None


def test_camera_info_without_a_calibration_is_refused_naming_it():
    def info(k, width=620, height=188):
        return SimpleNamespace(k=np.asarray(k, dtype=np.float64).ravel(), width=width,
                               height=height, header=SimpleNamespace(frame_id='camera2'))

    out = camera_info_to_arrays(info(K))
    np.testing.assert_array_equal(out[0], K)
    assert out[1:] == (620, 188, 'camera2')
    with pytest.raises(ValueError, match='camera_info: K is not set'):
        camera_info_to_arrays(info(np.zeros((3, 3))))
    with pytest.raises(ValueError, match='camera_info: K is not a pinhole'):
        camera_info_to_arrays(info(-K))
    with pytest.raises(ValueError, match='camera_info: image size 0x188'):
        camera_info_to_arrays(info(K, width=0))


@pytest.fixture(scope='module')
def bag_without_gt(tmp_path_factory):
    root = tmp_path_factory.mktemp('nogt')
    data = root / 'data'
    generate_sequence(data, '00', 4, 0, image_size=(160, 48), azimuth_steps=200)
    bag = root / 'bag'
    convert_sequence(ConvertOptions(data_path=data, sequence='00', output=bag,
                                    ground_truth=False))
    return data, bag


def test_replay_plan_plays_what_a_bag_without_ground_truth_has(bag_without_gt):
    data, bag = bag_without_gt
    names, params = replay_plan(bag)
    assert names == [topics.IMAGE_TOPIC, topics.CLOUD_TOPIC, topics.IMU_TOPIC,
                     topics.TF_STATIC_TOPIC, topics.CAMERA_INFO_TOPIC]
    if importlib.util.find_spec('tf2_msgs') is None:    # pip installs: no /tf_static reader
        assert len(params['frames.static_transforms']) == 3
    else:
        assert params == {}
    with pytest.raises(ValueError, match=f'{bag}: topic.*velodyne/points.* not in the bag'):
        replay_topics(bag, [topics.IMAGE_TOPIC, topics.IMU_TOPIC])


def test_online_calibration_from_the_bag_equals_the_offline_one(bag_without_gt):
    """CameraInfo and /tf_static of the bag give the Dataset's calibration, and the sample
    arrays (K scaled to the resized image) agree."""
    data, bag = bag_without_gt
    lines = [transform_line(*t) for t in static_transforms(bag)]
    tracker = CalibrationTracker(FrameConfig(static_transforms=tuple(lines)))
    info = next(read_numpy(bag, [topics.CAMERA_INFO_TOPIC]))
    online = tracker.add_camera_info(info.data.K, info.data.width, info.data.height,
                                     info.frame_id)
    offline = sequence_calibration(KittiSequence(data, '00'))
    assert online.image_size == offline.image_size
    for name in ('intrinsics', 't_cam_lidar', 't_imu_lidar'):
        np.testing.assert_allclose(getattr(online, name), getattr(offline, name), atol=1e-9,
                                   err_msg=name)
    cfg = SampleConfig(image_height=24, image_width=80, max_points=64)
    sample = KITTIOdomPointDataset(data, ['00'], sample_cfg=cfg, ground_truth='ignore')[0]
    for key, value in calibration_arrays(cfg, online).items():
        np.testing.assert_allclose(value, sample[key], atol=1e-5, err_msg=key)


# --- ground truth under self-supervision ---------------------------------------------------
def test_auto_ground_truth_is_ignored_only_under_self_supervision():
    auto = SyncConfig()
    assert auto.for_supervision('self').ground_truth == 'ignore'
    assert auto.for_supervision('gt') is auto and auto.for_supervision('both') is auto
    assert auto.for_supervision(None) is auto                 # the synchronizer alone
    explicit = SyncConfig(ground_truth='require')
    assert explicit.for_supervision('self') is explicit       # what the user set stays


def test_self_supervision_never_waits_for_ground_truth():
    """Ground truth seen once makes 'auto' wait for it; under self the samples go on at once."""
    cfg = SampleConfig(image_height=8, image_width=8, max_points=16, imu_steps=5)
    ms = 1_000_000
    emitted = {}
    for supervision in ('gt', 'self'):
        sync = Synchronizer(cfg, SyncConfig(gt_timeout_s=0.3).for_supervision(supervision),
                            origin_ns=T0_NS)
        for t in range(0, 310, 10):
            sync.add_imu(T0_NS + t * ms, [0.0, 0.0, 9.81], [0.0, 0.0, 0.1])
        sync.add_ground_truth(T0_NS, np.eye(4))              # then the GT stream stalls
        for k, t in enumerate((0, 100, 200)):
            sync.add_image(T0_NS + t * ms, np.full((8, 8, 3), k, dtype=np.uint8))
            sync.add_cloud(T0_NS + t * ms, np.random.default_rng(k).normal(
                size=(20, 4)).astype(np.float32))
        emitted[supervision] = sync.pop_ready()
    assert emitted['gt'] == []                 # waiting up to gt_timeout_s for 0.1's pose
    assert len(emitted['self']) == 2
    assert not any(s['target_valid'] for s in emitted['self'])
