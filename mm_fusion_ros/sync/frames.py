"""Frame ids of the incoming clouds and IMU samples (DESIGN §3), checked before they are used.

A cloud or IMU message in the configured frame is used as it is. One in another frame is
brought into the configured frame with a static transform when one is known (from the bag's
/tf_static where tf2_msgs can be imported, else from the `frames.static_transforms` parameter),
and otherwise refused with a FrameError naming the frame, which the node counts and logs with the
topic. IMU samples are rotated only (a lever arm between two IMU frames would add centripetal
terms to the acceleration; rigidly mounted IMUs in other frames are not expected).
"""
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from mm_fusion_ros.config import ConfigBase
from mm_fusion_ros.geometry import invert_pose, make_pose, quat_to_rot, rot_to_quat


class FrameError(ValueError):
    """A message in a frame that cannot be brought into the configured one."""


@dataclass(frozen=True)
class FrameConfig(ConfigBase):
    base_frame: str = field(default='base_link', metadata={
        'help': 'the vehicle frame of the predicted poses (REP 105 base_link)'})
    cloud_frame: str = field(default='velodyne', metadata={
        'help': 'frame the synchronizer takes clouds in (KITTI: velodyne = base_link); clouds '
                'in another frame are transformed into it with a known static transform, else '
                'dropped as wrong_frame'})
    imu_frame: str = field(default='imu_link', metadata={
        'help': 'frame the synchronizer takes IMU samples in; others are rotated into it '
                'with a known static transform, else dropped as wrong_frame'})
    camera_frame: str = field(default='camera2', metadata={
        'help': "the camera's optical frame, for the camera <- LiDAR extrinsic of the "
                "self-supervised photometric term; CameraInfo's frame_id wins when it is set"})
    static_transforms: tuple = field(default=('base_link velodyne 0 0 0 0 0 0 1',), metadata={
        'help': "static transforms, each 'parent child x y z qx qy qz qw' (T_parent_child), "
                "used where the bag's /tf_static cannot be read (no tf2_msgs); the default is "
                'DESIGN §3 base_link = velodyne'})

    def __post_init__(self):
        StaticTransforms.parse(self.static_transforms)   # a clear error now, not at first use


class StaticTransforms:
    """A set of static transforms; lookup walks the tree in either direction."""

    def __init__(self):
        self._edges = {}    # frame -> {neighbour: T_frame_neighbour}

    def add(self, parent: str, child: str, pose) -> None:
        pose = np.asarray(pose, dtype=np.float64)
        self._edges.setdefault(parent, {})[child] = pose
        self._edges.setdefault(child, {})[parent] = invert_pose(pose)

    def lookup(self, target: str, source: str):
        """T_target_source (maps points in `source` to `target`), or None if not connected."""
        if target == source:
            return np.eye(4)
        seen, queue = {target}, deque([(target, np.eye(4))])
        while queue:
            frame, pose = queue.popleft()
            for other, step in self._edges.get(frame, {}).items():
                if other == source:
                    return pose @ step
                if other not in seen:
                    seen.add(other)
                    queue.append((other, pose @ step))
        return None

    @classmethod
    def parse(cls, lines) -> 'StaticTransforms':
        out = cls()
        for line in lines:
            fields = str(line).split()
            try:
                if len(fields) != 9:
                    raise ValueError(f'{len(fields)} fields')
                x, y, z, qx, qy, qz, qw = (float(v) for v in fields[2:])
            except ValueError as e:
                raise ValueError(f"frames.static_transforms entry {line!r}: expected 'parent "
                                 f"child x y z qx qy qz qw' ({e})") from e
            out.add(fields[0], fields[1], make_pose(quat_to_rot([qx, qy, qz, qw]), [x, y, z]))
        return out


def transform_line(parent: str, child: str, pose) -> str:
    """T_parent_child as a frames.static_transforms entry ('parent child x y z qx qy qz qw'),
    the inverse of StaticTransforms.parse (full float precision)."""
    pose = np.asarray(pose, dtype=np.float64)
    values = [*pose[:3, 3], *rot_to_quat(pose[:3, :3])]
    return ' '.join([parent, child] + [repr(float(v)) for v in values])


class FrameGuard:
    """Brings clouds and IMU samples into the configured frames, or refuses them."""

    def __init__(self, cfg: FrameConfig = None, transforms: StaticTransforms = None):
        self.cfg = cfg or FrameConfig()
        self.transforms = transforms or StaticTransforms.parse(self.cfg.static_transforms)
        self._cache = {}

    def add_static(self, parent: str, child: str, pose) -> None:
        """A transform from /tf_static."""
        self.transforms.add(parent, child, pose)
        self._cache.clear()

    def _into(self, target: str, frame_id: str, kind: str):
        if not frame_id or frame_id == target:
            return None
        key = (target, frame_id)
        if key not in self._cache:
            self._cache[key] = self.transforms.lookup(target, frame_id)
        pose = self._cache[key]
        if pose is None:
            raise FrameError(f'{kind} in frame {frame_id!r}, expected {target!r}, and no static '
                             f'transform {target} <- {frame_id} is known (frames.static_'
                             'transforms, or /tf_static with tf2_msgs)')
        return pose

    def cloud(self, points: np.ndarray, frame_id: str) -> np.ndarray:
        """(N, 4) x y z intensity in cfg.cloud_frame."""
        pose = self._into(self.cfg.cloud_frame, frame_id, 'cloud')
        if pose is None:
            return points
        out = np.array(points, dtype=np.float32)
        out[:, :3] = points[:, :3] @ pose[:3, :3].T.astype(np.float32) + \
            pose[:3, 3].astype(np.float32)
        return out

    def imu(self, accel, gyro, frame_id: str):
        """(accel, gyro) in cfg.imu_frame: one sample (3,) each or M of them (M, 3)."""
        pose = self._into(self.cfg.imu_frame, frame_id, 'IMU sample')
        if pose is None:
            return accel, gyro
        rot_t = pose[:3, :3].T
        return np.asarray(accel, dtype=np.float64) @ rot_t, np.asarray(gyro, np.float64) @ rot_t

    def rot_base_imu(self):
        """R_base_imu for turning gyro rates into base_link, or None when not known."""
        pose = self.base_imu()
        return None if pose is None else pose[:3, :3]

    def base_imu(self):
        """T_base_imu (4, 4), or None when not known (the online filter's extrinsic)."""
        return self.transforms.lookup(self.cfg.base_frame, self.cfg.imu_frame)
