"""CalibrationTracker: the DESIGN §5 `calib` of the online samples, from what a robot publishes.

Pure Python + numpy (no rclpy). The synchronizer node hands it each CameraInfo (K, image size,
frame id) and shares with it the static transforms of its FrameGuard (the bag's /tf_static where
tf2_msgs imports, and always `frames.static_transforms`). It yields a kitti.sample.Calibration:
- intrinsics: CameraInfo's K for images of CameraInfo's width x height (calibration_arrays
  scales it to the sample's image size);
- t_cam_lidar: camera <- frames.cloud_frame, the camera being CameraInfo's frame_id
  (frames.camera_frame while none arrived or when it is empty);
- t_imu_lidar: frames.imu_frame <- frames.cloud_frame.
A part not known yet stays None: its calib_valid flag is off and the self-supervised term that
needs it adds nothing (the photometric term needs K and t_cam_lidar, the inertial term
t_imu_lidar; the geometric term needs none). Every change gives a new Calibration for
Synchronizer.set_calibration; the samples emitted from then on carry it.
"""
import numpy as np

from mm_fusion_ros.kitti.sample import Calibration, CALIBRATIONS
from mm_fusion_ros.sync.frames import FrameConfig, StaticTransforms


class CalibrationTracker:
    def __init__(self, frames: FrameConfig = None, transforms: StaticTransforms = None):
        self.frames = frames or FrameConfig()
        self.transforms = transforms or StaticTransforms.parse(self.frames.static_transforms)
        self.camera = None          # (K (3, 3), (width, height), frame id) of the last CameraInfo
        self.camera_infos = 0
        self.updates = 0
        self.current = self._build()

    def add_camera_info(self, K, width: int, height: int, frame_id: str = ''):
        """One CameraInfo (messages.camera_info_to_arrays); the new Calibration when it changed
        anything, else None."""
        K = np.asarray(K, dtype=np.float64)
        if K.shape != (3, 3) or not np.isfinite(K).all():
            raise ValueError(f'camera_info: K must be a finite 3x3 matrix, got shape {K.shape}')
        camera = (K, (int(width), int(height)), frame_id or self.frames.camera_frame)
        self.camera_infos += 1
        if self.camera is not None and np.array_equal(camera[0], self.camera[0]) and \
                camera[1:] == self.camera[1:]:
            return None
        self.camera = camera
        return self.refresh()

    def refresh(self):
        """Rebuild after the static transforms changed; the new Calibration, or None."""
        new = self._build()
        if same_calibration(new, self.current):
            return None
        self.current = new
        self.updates += 1
        return new

    def _build(self) -> Calibration:
        lidar = self.frames.cloud_frame
        K, size, camera_frame = self.camera or (None, None, self.frames.camera_frame)
        return Calibration(intrinsics=K, image_size=size,
                           t_cam_lidar=self.transforms.lookup(camera_frame, lidar),
                           t_imu_lidar=self.transforms.lookup(self.frames.imu_frame, lidar))

    def known(self) -> dict:
        """{'intrinsics' | 't_cam_lidar' | 't_imu_lidar': known?} (calib_valid's order)."""
        c = self.current
        return dict(zip(CALIBRATIONS, (c.intrinsics is not None, c.t_cam_lidar is not None,
                                       c.t_imu_lidar is not None)))

    def status(self) -> dict:
        """/diagnostics values (strings)."""
        out = {f'calib_{k}': 'known' if v else 'unknown' for k, v in self.known().items()}
        out.update(calib_updates=str(self.updates), camera_info_received=str(self.camera_infos))
        return out


def same_calibration(a: Calibration, b: Calibration) -> bool:
    for name in ('intrinsics', 't_cam_lidar', 't_imu_lidar'):
        x, y = getattr(a, name), getattr(b, name)
        if (x is None) != (y is None) or (x is not None and not np.array_equal(x, y)):
            return False
    return a.image_size == b.image_size
