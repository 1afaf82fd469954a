"""Frozen dataclass configs, stored in checkpoints as plain dicts (STYLE §9).

Every config derives from ConfigBase: `to_dict()` gives a dict of plain Python values that
`torch.load(weights_only=True)` accepts, and `from_dict()` refuses unknown or missing keys with a
message that names them, so an incompatible checkpoint fails loudly instead of half-loading.
`ConfigFlags` makes command-line flags from the same fields (ros/params.py makes ROS
parameters), so each default and each help text is written once, in the dataclass.
"""
import argparse
import dataclasses
from dataclasses import dataclass, field
import types
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


class ConfigFlags:
    """argparse flags generated from the fields of a frozen dataclass config, and the config
    built back from the parsed arguments (range checks stay in the class's __post_init__).

    Each field becomes `--<prefix><name>` with the field's help and default:
    int / float / str take a value of that type; a bool that defaults to False is a switch
    (`--freeze_visual`), one that defaults to True takes on|off (`--shift_prior off`);
    a tuple takes a comma list (`--visual_channels 16,32,64`).

    exclude: fields without a flag (set by the caller from elsewhere);
    aliases: {field: other flag name(s)}, e.g. names a published command already uses;
    types: {field: callable} parsing the text instead of the field's type;
    unset: True, or the fields, whose flags default to None = not given: `values()` leaves
      them out, so a config loaded from a checkpoint keeps its own; bools there take on|off.
      unset_help says what happens then ('{default}' = the field's default).
    repeat: tuple fields whose flag takes one item and may be given again
      (`--outage 30:20 --outage 90:5`); not given, the field keeps its default.
    """

    def __init__(self, cls, *, prefix='', exclude=(), aliases=None, types=None, unset=(),
                 unset_help='default: {default}', repeat=()):
        self.cls, self.prefix = cls, prefix
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted((set(exclude) | set(aliases or {}) | set(types or {}) | set(repeat) |
                          (set() if unset is True else set(unset))) - set(names))
        if unknown:
            raise ValueError(f'{cls.__name__} has no fields {unknown}')
        self.fields = [f for f in dataclasses.fields(cls) if f.name not in exclude]
        self.aliases = {k: (v,) if isinstance(v, str) else tuple(v)
                        for k, v in (aliases or {}).items()}
        self.types = dict(types or {})
        self.unset = set(names) if unset is True else set(unset)
        self.unset_help = unset_help
        self.repeat = set(repeat)
        self._hints = typing.get_type_hints(cls)
        for f in self.fields:
            if f.name in self.repeat and self._kind(f, _field_default(cls, f)) is not tuple:
                raise ValueError(f'{cls.__name__}.{f.name}: only a tuple field can repeat')

    def dest(self, name: str) -> str:
        return self.prefix + name

    def flag(self, name: str) -> str:
        return '--' + self.prefix + name

    def add(self, parser) -> None:
        """Add one flag per field to `parser` (an ArgumentParser or an argument group)."""
        for f in self.fields:
            default = _field_default(self.cls, f)
            flags = [self.flag(f.name)] + ['--' + self.prefix + a
                                           for a in self.aliases.get(f.name, ())]
            shown = _show(default)
            note = (self.unset_help.format(default=shown) if f.name in self.unset
                    else f'default: {shown}')
            kwargs = {'dest': self.dest(f.name), 'help': f"{f.metadata.get('help', '')} ({note})",
                      'default': None if f.name in self.unset else default}
            kind = self._kind(f, default)
            if f.name in self.repeat:
                elem = self.types.get(f.name) or (type(default[0]) if default else str)
                kwargs.update(action='append', type=elem, metavar=f.name.upper(), default=None,
                              help=kwargs['help'][:-1] + '; repeatable)')
            elif f.name in self.types:
                kwargs.update(type=self.types[f.name], metavar=f.name.upper())
            elif kind is bool and default is False and f.name not in self.unset:
                kwargs.update(action='store_true')
            elif kind is bool:
                kwargs.update(type=_on_off, metavar='on|off')
            elif kind is tuple:
                elem = type(default[0]) if default else str
                kwargs.update(type=_comma_list(elem),
                              metavar='A,B,...' if elem is str else 'N,N,...')
            else:
                kwargs.update(type=kind, metavar=f.name.upper())
            parser.add_argument(*flags, **kwargs)

    def values(self, args) -> dict:
        """{field: value} of the parsed flags, leaving out the unset ones not given."""
        out = {}
        for f in self.fields:
            value = getattr(args, self.dest(f.name))
            if value is None and f.name in self.unset:
                continue
            if f.name in self.repeat:
                value = _field_default(self.cls, f) if value is None else tuple(value)
            out[f.name] = value
        return out

    def build(self, args, **fixed):
        """The config from the parsed flags; `fixed` sets the excluded (or any) fields."""
        return self.cls(**{**self.values(args), **fixed})

    def _kind(self, f, default):
        hint = self._hints.get(f.name)
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(inner) == 1:
            hint = inner[0]                      # Optional[X]
        hint = typing.get_origin(hint) or hint   # tuple[int, ...] -> tuple
        if hint in (bool, int, float, str, tuple):
            return hint
        if default is not None and type(default) in (bool, int, float, str, tuple):
            return type(default)
        raise ValueError(f'{self.cls.__name__}.{f.name}: no flag for type {hint!r}; pass '
                         'types={name: parser}')


def _field_default(cls, f):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    raise ValueError(f'{cls.__name__}.{f.name} has no default: cannot be a flag')


def _show(value) -> str:
    if isinstance(value, bool):
        return 'on' if value else 'off'
    if isinstance(value, tuple):
        return ','.join(str(v) for v in value) or 'none'
    return repr(value) if value == '' else str(value)


def parameter_help(sections) -> str:
    """One line per ROS parameter of the sections, with its default and the field's help: what a
    node executable's --help prints. A section is (config class, prefix) or (config class,
    prefix, {field: default}) for a node that declares some fields with other defaults."""
    lines = []
    for cls, prefix, *defaults in sections:
        overrides = defaults[0] if defaults else {}
        for f in dataclasses.fields(cls):
            default = overrides.get(f.name, _field_default(cls, f))
            shown = str(default).lower() if isinstance(default, bool) else _show(default)
            lines.append(f'  {prefix}{f.name} ({shown}): {f.metadata.get("help", "")}')
    return '\n'.join(lines)


def _on_off(text: str) -> bool:
    if text not in ('on', 'off'):
        raise argparse.ArgumentTypeError(f'expected on or off, got {text!r}')
    return text == 'on'


def _comma_list(elem):
    def parse(text):
        return tuple(elem(t.strip()) for t in text.split(',') if t.strip())
    parse.__name__ = f'comma-separated {elem.__name__}'
    return parse


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
