"""The synthetic world's domain: scene style, LiDAR mounting and camera exposure.

A model pretrained on the default world (a street, the KITTI car's sensor rig, a clean camera)
adapts online to a world that differs in these settings, so each one is a plausible change a
deployment could bring. The defaults reproduce the default world byte for byte.

Mounting (DESIGN §3: base_link = the LiDAR frame). Trajectories describe the vehicle reference
frame, which sits where the KITTI car's Velodyne sits (1.73 m above the road, level, axes of the
car). The camera and the OXTS unit stay on the vehicle; only the LiDAR moves, by
T_vehicle_lidar (raised or lowered, pitched about its y axis). So the images, the IMU and the
ground-truth poses in cam0 (the camera's own motion) are those of the default mount, while the
scans, base_link's poses, calib.txt Tr (= Tr_KITTI · T_vehicle_lidar) and calib_imu_to_velo
(= T_vehicle_lidar⁻¹ · T_vehicle_imu) change with it.
"""
from dataclasses import dataclass, field

import numpy as np

from mm_fusion_ros.config import ConfigBase
from mm_fusion_ros.geometry import make_pose, rpy_to_rot
from mm_fusion_ros.synthetic.lidar import LidarConfig
from mm_fusion_ros.synthetic.trajectory import VELODYNE_HEIGHT
from mm_fusion_ros.synthetic.world import SCENES


@dataclass(frozen=True)
class DomainConfig(ConfigBase):
    """Settings that shift the synthetic world's domain (defaults: the pretraining world)."""

    scene: str = field(default='street', metadata={
        'help': 'scene style: street (city blocks, facades at the sidewalk, parked cars) | '
                'suburban (detached houses with pitched roofs set back behind hedges and front '
                'gardens, trees, few parked cars, no road markings)'})
    lidar_height: float = field(default=VELODYNE_HEIGHT, metadata={
        'help': 'LiDAR (= base_link) height above the road [m]; the KITTI car: 1.73. Camera '
                'and IMU stay on the vehicle: calib.txt Tr and calib_imu_to_velo follow'})
    lidar_pitch_deg: float = field(default=0.0, metadata={
        'help': 'LiDAR pitch on its mount [deg], about its y axis (REP 103): positive tilts '
                'the front of the scan down toward the road'})
    lidar_top_deg: float = field(default=LidarConfig.top_deg, metadata={
        'help': "elevation of the LiDAR's top beam [deg] (HDL-64E: 2.0; HDL-32E: 10.67)"})
    lidar_bottom_deg: float = field(default=LidarConfig.bottom_deg, metadata={
        'help': "elevation of the LiDAR's bottom beam [deg] (HDL-64E: -24.9; HDL-32E: -30.67)"})
    camera_exposure_ev: float = field(default=0.0, metadata={
        'help': 'camera exposure change in stops: the linear image is scaled by 2**EV before '
                'it saturates (+1: twice as bright, -1: half)'})
    camera_gamma: float = field(default=1.0, metadata={
        'help': 'camera tone curve: pixel = linear**(1/gamma) after exposure; > 1 lifts the '
                'shadows and midtones, < 1 darkens them'})
    camera_noise: float = field(default=0.0, metadata={
        'help': 'camera sensor noise [8-bit DN, sigma at mid-grey], signal dependent '
                '(variance ~ 0.5 + signal, read plus shot noise), added before the tone curve; '
                'seeded per frame, so the same seed gives the same bytes'})

    def __post_init__(self):
        checks = [
            ('scene', self.scene in SCENES, f'one of {", ".join(SCENES)}'),
            ('lidar_height', 0.3 <= self.lidar_height <= 5.0, 'in [0.3, 5] m'),
            ('lidar_pitch_deg', abs(self.lidar_pitch_deg) <= 30.0, 'in [-30, 30] deg'),
            ('lidar_top_deg', -60.0 <= self.lidar_top_deg <= 60.0, 'in [-60, 60] deg'),
            ('lidar_bottom_deg', -60.0 <= self.lidar_bottom_deg < self.lidar_top_deg,
             'in [-60, lidar_top_deg) deg'),
            ('camera_exposure_ev', abs(self.camera_exposure_ev) <= 6.0, 'in [-6, 6] stops'),
            ('camera_gamma', 0.2 <= self.camera_gamma <= 5.0, 'in [0.2, 5]'),
            ('camera_noise', 0.0 <= self.camera_noise <= 64.0, 'in [0, 64] DN'),
        ]
        for name, ok, need in checks:
            if not ok:
                raise ValueError(f'{name}={getattr(self, name)!r} must be {need}')

    def T_vehicle_lidar(self) -> np.ndarray:
        """(4, 4) LiDAR mount in the vehicle reference frame (identity for the KITTI car)."""
        rot = rpy_to_rot(0.0, np.radians(self.lidar_pitch_deg), 0.0)
        return make_pose(rot, [0.0, 0.0, self.lidar_height - VELODYNE_HEIGHT])

    def changes(self) -> dict:
        """The fields that differ from the defaults (for summaries)."""
        default = DomainConfig()
        return {k: v for k, v in self.to_dict().items() if getattr(default, k) != v}
