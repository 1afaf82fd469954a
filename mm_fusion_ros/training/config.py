"""TrainConfig: optimisation and augmentation hyper-parameters (offline and online trainers).

Scalar fields only, so the online node can declare each one as a ROS parameter (STYLE §3).
"""
from dataclasses import dataclass, field
import math

from mm_fusion_ros.config import ConfigBase
from mm_fusion_ros.model.augment import AugmentParams
from mm_fusion_ros.model.losses import LOSSES
from mm_fusion_ros.model.selfsup import TERMS

LR_SCHEDULES = ('constant', 'cosine')
SUPERVISIONS = ('gt', 'self', 'both')


@dataclass(frozen=True)
class TrainConfig(ConfigBase):
    learning_rate: float = field(default=1e-4, metadata={'help': 'AdamW learning rate'})
    weight_decay: float = field(default=1e-4, metadata={'help': 'AdamW weight decay'})
    grad_clip: float = field(default=5.0, metadata={
        'help': 'clip the global gradient norm to this (0 = no clipping)'})
    loss: str = field(default='l1', metadata={'help': 'l1 | l2 | gaussian_nll | laplace_nll'})
    lr_schedule: str = field(default='cosine', metadata={
        'help': 'offline trainer: constant | cosine (decay to lr_min_ratio over the run)'})
    lr_min_ratio: float = field(default=0.05, metadata={
        'help': 'final learning rate of the cosine schedule, as a fraction of learning_rate'})
    rotation_weight: float = field(default=1.0, metadata={
        'help': 'weight of the rotation dims relative to translation (normalised units)'})
    calibrate_logvar: bool = field(default=True, metadata={
        'help': 'for l1/l2: also fit the log-variance to the detached residual'})
    supervision: str = field(default='gt', metadata={
        'help': 'gt: the ground-truth relative pose | self: the self-supervised losses of '
                'model/selfsup.py alone (no ground truth read) | both: their sum'})
    self_geometric_weight: float = field(default=1.0, metadata={
        'help': 'self-supervised LiDAR point-to-plane term weight (0 = off)'})
    self_photometric_weight: float = field(default=1.0, metadata={
        'help': 'self-supervised camera (LiDAR depth) photometric term weight (0 = off)'})
    self_inertial_weight: float = field(default=1.0, metadata={
        'help': 'self-supervised gyro rotation term weight (0 = off)'})
    self_geometric_solve: int = field(default=0, metadata={
        'help': 'Gauss-Newton iterations that solve the geometric term once per sample (from '
                'its first prediction); steps on the sample after that use the quadratic '
                'model of the term at the solution (cheap for replayed samples; 0 = the direct '
                'term, correspondences searched at every step)'})
    self_geometric_solve_points: int = field(default=2048, metadata={
        'help': 'source points of scan k per sample in that solve (the direct term uses 4096): '
                'half the points halve its cost and move its solution by a fraction of a '
                'millimetre (docs/selfsup.md)'})
    batch_size: int = field(default=2, metadata={'help': 'samples per step'})
    num_epochs: int = field(default=3, metadata={'help': 'epochs (offline trainer)'})
    seed: int = field(default=0, metadata={'help': 'seed of init, data order and dropout'})
    amp: bool = field(default=False, metadata={'help': 'mixed precision (CUDA only)'})
    freeze_visual: bool = field(default=False, metadata={'help': 'freeze the visual encoder'})
    freeze_point: bool = field(default=False, metadata={'help': 'freeze the point encoder'})
    freeze_imu: bool = field(default=False, metadata={'help': 'freeze the IMU encoder'})
    feature_cache: int = field(default=1024, metadata={
        'help': 'samples whose frozen camera / LiDAR encoder features are kept, so repeated '
                'steps on them skip those encoders (exact: keyed by the inputs; 0 = off)'})
    aug_point_jitter_m: float = field(default=0.0, metadata={
        'help': 'Gaussian jitter on point xyz [m]'})
    aug_point_dropout: float = field(default=0.0, metadata={
        'help': 'probability of dropping each point'})
    aug_yaw_max_deg: float = field(default=0.0, metadata={
        'help': 'max random yaw of both scans (target conjugated, camera masked) [deg]'})
    aug_yaw_prob: float = field(default=0.5, metadata={
        'help': 'fraction of samples that get the yaw rotation'})
    aug_brightness: float = field(default=0.0, metadata={
        'help': 'max brightness shift (fraction of 255)'})
    aug_contrast: float = field(default=0.0, metadata={'help': 'max contrast change (fraction)'})
    aux_weight: float = field(default=1.0, metadata={
        'help': "weight of the auxiliary losses of the model's per-branch heads (the flow "
                "encoder's camera head)"})
    aug_drop_camera: float = field(default=0.0, metadata={
        'help': 'probability of masking off the camera of a training sample (as a missing '
                'sensor is), on top of ModelConfig.modality_dropout'})
    aug_drop_lidar: float = field(default=0.0, metadata={
        'help': 'probability of masking off the LiDAR of a training sample, so that camera and '
                'IMU learn to carry the estimate without it'})
    aug_drop_imu: float = field(default=0.0, metadata={
        'help': 'probability of masking off the IMU of a training sample'})

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f'TrainConfig.loss={self.loss!r}; choose one of {", ".join(LOSSES)}')
        if self.supervision not in SUPERVISIONS:
            raise ValueError(f'TrainConfig.supervision={self.supervision!r}; choose one of '
                             f'{", ".join(SUPERVISIONS)}')
        if self.supervision != 'gt' and not any(w > 0 for w in self.self_weights.values()):
            raise ValueError(f'TrainConfig.supervision={self.supervision!r} needs a '
                             'self-supervised term with a weight > 0')
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f'TrainConfig.lr_schedule={self.lr_schedule!r}; choose one of '
                             f'{", ".join(LR_SCHEDULES)}')
        if not 0.0 < self.lr_min_ratio <= 1.0:
            raise ValueError(f'TrainConfig.lr_min_ratio must be in (0, 1], got '
                             f'{self.lr_min_ratio}')
        if not self.learning_rate > 0:
            raise ValueError(f'TrainConfig.learning_rate must be > 0, got {self.learning_rate}')
        for name in ('weight_decay', 'grad_clip', 'rotation_weight', 'aux_weight',
                     'self_geometric_weight', 'self_photometric_weight', 'self_inertial_weight',
                     'aug_point_jitter_m', 'aug_yaw_max_deg', 'aug_brightness', 'aug_contrast'):
            if getattr(self, name) < 0:
                raise ValueError(f'TrainConfig.{name} must be >= 0, got {getattr(self, name)}')
        for name in ('aug_point_dropout', 'aug_yaw_prob', 'aug_drop_camera', 'aug_drop_lidar',
                     'aug_drop_imu'):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f'TrainConfig.{name} must be in [0, 1], got '
                                 f'{getattr(self, name)}')
        if self.self_geometric_solve_points < 64:
            raise ValueError(f'TrainConfig.self_geometric_solve_points must be >= 64, got '
                             f'{self.self_geometric_solve_points}')
        for name in ('feature_cache', 'self_geometric_solve'):
            if getattr(self, name) < 0:
                raise ValueError(f'TrainConfig.{name} must be >= 0, got {getattr(self, name)}')
        if self.batch_size < 1 or self.num_epochs < 0:
            raise ValueError('TrainConfig needs batch_size >= 1 and num_epochs >= 0, got '
                             f'{self.batch_size}, {self.num_epochs}')

    def lr_at(self, progress: float) -> float:
        """Learning rate at `progress` in [0, 1] of the whole run."""
        if self.lr_schedule == 'constant':
            return self.learning_rate
        floor = self.learning_rate * self.lr_min_ratio
        return floor + 0.5 * (self.learning_rate - floor) * \
            (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))

    @property
    def self_weights(self) -> dict:
        """Self-supervised term -> weight (model/selfsup.py TERMS)."""
        return {t: getattr(self, f'self_{t}_weight') for t in TERMS}

    @property
    def loss_terms(self) -> tuple:
        """The terms the supervision trains on: 'gt' and the self terms with weight > 0."""
        gt = ('gt',) if self.supervision in ('gt', 'both') else ()
        own = tuple(t for t, w in self.self_weights.items() if w > 0) \
            if self.supervision in ('self', 'both') else ()
        return gt + own

    @property
    def frozen(self) -> tuple:
        return tuple(n for n in ('visual', 'point', 'imu') if getattr(self, f'freeze_{n}'))

    @property
    def augment(self) -> AugmentParams:
        return AugmentParams(point_jitter_m=self.aug_point_jitter_m,
                             point_dropout=self.aug_point_dropout,
                             yaw_max_deg=self.aug_yaw_max_deg, yaw_prob=self.aug_yaw_prob,
                             brightness=self.aug_brightness, contrast=self.aug_contrast,
                             drop=(self.aug_drop_camera, self.aug_drop_lidar, self.aug_drop_imu))
