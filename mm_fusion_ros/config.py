"""Frozen dataclass configs, stored in checkpoints as plain dicts (STYLE §9).

Every config derives from ConfigBase: `to_dict()` gives a dict of plain Python values that
`torch.load(weights_only=True)` accepts, and `from_dict()` refuses unknown or missing keys with a
message that names them, so an incompatible checkpoint fails loudly instead of half-loading.
"""
import dataclasses
from dataclasses import dataclass, field
import typing

MODALITIES = ('camera', 'lidar', 'imu')


class ConfigBase:
    """Mixin for frozen dataclasses: dict round trip with strict key checks."""

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v)
                for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict, *, allow_missing: bool = False):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        missing = sorted(n for n in names - set(data)
                         if not allow_missing and _has_no_default(cls, n))
        if unknown or missing:
            raise ValueError(f'{cls.__name__}: unknown keys {unknown}, missing keys {missing}')
        hints = typing.get_type_hints(cls)
        values = {}
        for k, v in data.items():
            if isinstance(v, list) and 'tuple' in str(hints.get(k, '')).lower():
                v = tuple(v)
            values[k] = v
        return cls(**values)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


def _has_no_default(cls, name):
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def parse_modalities(text) -> tuple:
    """'camera,imu' -> ('camera', 'imu') in canonical order; clear error on unknown names."""
    items = [t.strip() for t in (text.split(',') if isinstance(text, str) else text) if t.strip()]
    bad = [t for t in items if t not in MODALITIES]
    if bad or not items:
        raise ValueError(f'modalities {bad or items!r} not understood; choose a non-empty subset '
                         f'of {",".join(MODALITIES)}')
    return tuple(m for m in MODALITIES if m in items)


@dataclass(frozen=True)
class SampleConfig(ConfigBase):
    """How one DESIGN §5 sample is built from raw sensor data (offline and online alike)."""

    image_height: int = field(default=96, metadata={'help': 'resized image height [px]'})
    image_width: int = field(default=320, metadata={'help': 'resized image width [px]'})
    max_points: int = field(default=16384, metadata={
        'help': 'points per scan after subsampling/padding; 0 keeps all (batch must be 1)'})
    imu_steps: int = field(default=11, metadata={'help': 'K: IMU window resampled to K steps'})
    imu_window_s: float = field(default=0.0, metadata={
        'help': 'IMU history ending at the current scan [s]; 0 = the interval between scans'})
    modalities: tuple = field(default=MODALITIES, metadata={
        'help': 'inputs used; the others are masked off as a missing sensor is'})
    seed: int = field(default=0, metadata={'help': 'seed of the deterministic point subsampling'})

    def __post_init__(self):
        if self.image_height < 8 or self.image_width < 8:
            raise ValueError(f'image size {self.image_height}x{self.image_width} too small (>= 8)')
        if self.max_points < 0:
            raise ValueError(f'max_points must be >= 0, got {self.max_points}')
        if self.imu_steps < 2:
            raise ValueError(f'imu_steps must be >= 2, got {self.imu_steps}')
        if self.imu_window_s < 0:
            raise ValueError(f'imu_window_s must be >= 0, got {self.imu_window_s}')
        object.__setattr__(self, 'modalities', parse_modalities(self.modalities))
