"""ModelConfig: every architecture hyper-parameter, saved in each checkpoint as a plain dict.

A checkpoint rebuilds its own network (STYLE §9):
    build_model(ModelConfig.from_dict(ckpt['config']['model']))
nothing about the architecture is inferred from the weights.
"""
from dataclasses import dataclass, field

from mm_fusion_ros.config import ConfigBase

VISUAL_ENCODERS = ('cnn', 'flow', 'dummy')
POINT_ENCODERS = ('bev', 'pointnet', 'dummy')
IMU_ENCODERS = ('conv', 'dummy')
# What `real` means on the command line for each encoder slot.
REAL_ENCODER = {'visual_encoder': 'flow', 'point_encoder': 'bev', 'imu_encoder': 'conv'}


@dataclass(frozen=True)
class ModelConfig(ConfigBase):
    """Architecture of FusionOdometryNet (DESIGN §6)."""

    image_height: int = field(default=96, metadata={'help': 'input image height [px]'})
    image_width: int = field(default=320, metadata={'help': 'input image width [px]'})
    imu_steps: int = field(default=11, metadata={'help': 'K, IMU samples per window'})
    visual_encoder: str = field(default='flow', metadata={
        'help': 'cnn (the frame pair through a CNN) | flow (measures the motion between the '
                'frames: ground-plane sweep + siamese cost volume) | dummy'})
    point_encoder: str = field(default='bev', metadata={'help': 'bev | pointnet | dummy'})
    imu_encoder: str = field(default='conv', metadata={'help': 'conv | dummy'})
    visual_channels: tuple = field(default=(16, 32, 64, 96), metadata={
        'help': 'conv widths of the visual CNN (each layer halves the resolution)'})
    visual_dim: int = field(default=128, metadata={'help': 'visual feature size'})
    flow_channels: tuple = field(default=(16, 32, 64, 96), metadata={
        'help': 'flow encoder widths: two stride-2 stem layers per frame, then the layers of '
                'the CNN over the ground-plane cost volume (each halves the resolution)'})
    flow_corr_radius: int = field(default=2, metadata={
        'help': 'flow: local cost-volume radius [cells of flow_cell_m]'})
    visual_depth: bool = field(default=True, metadata={
        'help': 'flow: LiDAR inverse depth projected into each frame as extra input channels '
                '(zero where the LiDAR is missing)'})
    camera_prior: bool = field(default=True, metadata={
        'help': "flow: yaw, and forward translation when the LiDAR is missing, = the camera's "
                'ground-sweep estimate + a learned correction'})
    camera_head_hidden: int = field(default=64, metadata={
        'help': "flow: hidden size of the camera's own pose head, trained by an auxiliary loss; "
                'its estimates replace the raw sweep ones (0 = no camera head)'})
    ground_height_m: float = field(default=1.73, metadata={
        'help': 'flow: height of base_link above the road [m] (KITTI: 1.73)'})
    ipm_near_m: float = field(default=6.4, metadata={
        'help': 'flow: nearest road ahead mapped (ground-plane view) [m]'})
    ipm_far_m: float = field(default=19.2, metadata={
        'help': 'flow: farthest road ahead mapped [m]; farther, the road is less plane'})
    ipm_half_width_m: float = field(default=3.2, metadata={
        'help': 'flow: half width of the road strip mapped [m]; wider takes in parked cars'})
    ipm_cell_m: float = field(default=0.1, metadata={
        'help': 'flow: ground-plane cell of the sweep [m]'})
    flow_cell_m: float = field(default=0.4, metadata={
        'help': 'flow: ground-plane cell of the learned cost volume [m]'})
    ipm_max_step_m: float = field(default=2.6, metadata={
        'help': 'flow: largest forward step searched [m]; cover the fastest step'})
    ipm_max_yaw: float = field(default=0.05, metadata={
        'help': 'flow: largest yaw per step searched [rad]'})
    bev_range_m: float = field(default=25.6, metadata={
        'help': 'BEV grid covers x, y in [-range, range] around base_link [m]'})
    bev_cells: int = field(default=128, metadata={'help': 'BEV grid cells per side'})
    bev_z_min: float = field(default=-1.4, metadata={
        'help': 'lowest point height kept [m]; above the road (1.73 m below the LiDAR), whose '
                'ring pattern moves with the sensor and would read as zero motion'})
    bev_z_max: float = field(default=3.0, metadata={'help': 'highest point height kept [m]'})
    bev_channels: tuple = field(default=(16, 32, 64, 96), metadata={
        'help': 'BEV CNN widths: full-res stem, quarter-res stem (two stride-2 convs), then '
                'layers that each halve the resolution'})
    bev_corr_radius: int = field(default=3, metadata={
        'help': 'local cost-volume radius in quarter-resolution BEV cells'})
    bev_max_shift_cells: int = field(default=10, metadata={
        'help': 'largest shift of the global correlation [BEV cells]; cover the fastest step'})
    shift_prior: bool = field(default=True, metadata={
        'help': 'BEV: predict forward translation as the correlation estimate + a correction'})
    pointnet_widths: tuple = field(default=(64, 128, 256), metadata={
        'help': 'shared per-point MLP widths of the PointNet encoder'})
    point_dim: int = field(default=128, metadata={'help': 'point-cloud feature size'})
    imu_channels: int = field(default=64, metadata={'help': 'IMU 1-D conv width'})
    imu_dim: int = field(default=64, metadata={'help': 'IMU feature size'})
    fusion_dim: int = field(default=128, metadata={'help': 'per-modality embedding size'})
    fusion_dropout: float = field(default=0.1, metadata={'help': 'dropout on the fused vector'})
    modality_dropout: float = field(default=0.1, metadata={
        'help': 'probability of masking off a present modality per sample in training'})
    head_hidden: int = field(default=256, metadata={'help': 'pose head hidden size'})
    logvar_min: float = field(default=-8.0, metadata={
        'help': 'lower clamp of the predicted log-variance (normalised units)'})
    logvar_max: float = field(default=6.0, metadata={
        'help': 'upper clamp of the predicted log-variance (normalised units)'})

    def __post_init__(self):
        for name, choices in (('visual_encoder', VISUAL_ENCODERS),
                              ('point_encoder', POINT_ENCODERS), ('imu_encoder', IMU_ENCODERS)):
            if getattr(self, name) not in choices:
                raise ValueError(f'ModelConfig.{name}={getattr(self, name)!r}; choose one of '
                                 f'{", ".join(choices)}')
        if self.image_height < 8 or self.image_width < 8:
            raise ValueError(f'ModelConfig image size {self.image_height}x{self.image_width} '
                             'too small (>= 8)')
        if self.imu_steps < 2:
            raise ValueError(f'ModelConfig.imu_steps must be >= 2, got {self.imu_steps}')
        if self.bev_range_m <= 0 or self.bev_cells < 8 or self.bev_z_max <= self.bev_z_min:
            raise ValueError('ModelConfig BEV grid needs bev_range_m > 0, bev_cells >= 8 and '
                             f'bev_z_max > bev_z_min (got {self.bev_range_m}, {self.bev_cells}, '
                             f'{self.bev_z_min}, {self.bev_z_max})')
        if self.bev_cells % 2 or self.bev_corr_radius < 0 or \
                not 0 < self.bev_max_shift_cells < self.bev_cells // 2:
            raise ValueError('ModelConfig needs an even bev_cells, bev_corr_radius >= 0 and '
                             '0 < bev_max_shift_cells < bev_cells / 2, got '
                             f'{self.bev_cells}, {self.bev_corr_radius}, '
                             f'{self.bev_max_shift_cells}')
        for name in ('fusion_dropout', 'modality_dropout'):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f'ModelConfig.{name} must be in [0, 1), got '
                                 f'{getattr(self, name)}')
        if self.logvar_min >= self.logvar_max:
            raise ValueError('ModelConfig.logvar_min must be < logvar_max')
        if not (0 < self.ipm_near_m < self.ipm_far_m and self.ipm_half_width_m > 0 and
                0 < self.ipm_cell_m <= (self.ipm_far_m - self.ipm_near_m) / 8 and
                0 < self.flow_cell_m <= (self.ipm_far_m - self.ipm_near_m) / 8 and
                self.ipm_max_step_m > 0 and self.ipm_max_yaw > 0 and self.ground_height_m > 0
                and self.flow_corr_radius >= 0 and self.camera_head_hidden >= 0):
            raise ValueError('ModelConfig ground plane needs 0 < ipm_near_m < ipm_far_m, '
                             'ipm_half_width_m > 0, 0 < ipm_cell_m <= (far - near) / 8, '
                             'positive ipm_max_step_m, ipm_max_yaw, ground_height_m and '
                             f'flow_corr_radius >= 0 (got {self.ipm_near_m}, {self.ipm_far_m}, '
                             f'{self.ipm_half_width_m}, {self.ipm_cell_m}, '
                             f'{self.ipm_max_step_m}, {self.ipm_max_yaw}, '
                             f'{self.ground_height_m}, {self.flow_corr_radius})')
        minimum = {'bev_channels': 3, 'flow_channels': 3}
        for name in ('visual_channels', 'bev_channels', 'pointnet_widths', 'flow_channels'):
            widths = tuple(int(w) for w in getattr(self, name))
            if len(widths) < minimum.get(name, 1) or min(widths) < 1:
                raise ValueError(f'ModelConfig.{name} must be positive widths, got {widths}')
            object.__setattr__(self, name, widths)
