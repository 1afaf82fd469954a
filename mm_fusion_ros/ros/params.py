"""ROS parameters generated from dataclass configs (STYLE §3): each default is written once."""
import dataclasses

from rcl_interfaces.msg import ParameterDescriptor
from rclpy.parameter import Parameter

from mm_fusion_ros.runtime.params import as_number


def _ros_default(value):
    # ROS parameters have no tuple type and no None: tuples become lists, None an empty string.
    if isinstance(value, tuple):
        return list(value)
    return '' if value is None else value


def declare_config(node, cls, prefix='', read_only=True, overrides=None):
    """Declare one parameter per field of the frozen dataclass `cls` and build it from them.

    prefix: parameter namespace ('sync.' -> sync.slop_s); overrides: defaults to use instead of
    the dataclass's (e.g. the launch file's config). Range checks live in the class's
    __post_init__, so a bad value fails with the class's message naming the field.
    """
    overrides = overrides or {}
    values = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            raise ValueError(f'{cls.__name__}.{f.name} has no default: cannot be a parameter')
        default = _ros_default(overrides.get(f.name, default))
        # A text parameter is typed dynamically: YAML 1.1 reads on / off / yes / no as booleans
        # (filter.mode:=on), and the class's __post_init__ judges the value, naming the field.
        desc = ParameterDescriptor(description=f.metadata.get('help', ''), read_only=read_only,
                                   dynamic_typing=isinstance(default, str))
        if isinstance(default, float):
            _double_override(node, prefix + f.name)
        value = node.declare_parameter(prefix + f.name, default, desc).value
        if isinstance(f.default, tuple) or isinstance(default, list):
            value = tuple(value)
        if value == '' and f.default is None:
            value = None
        values[f.name] = value
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise ValueError(f'node {node.get_name()}: bad parameters for {cls.__name__}: {e}') from e


def _double_override(node, name):
    """A start-up value of a double parameter given as `name:=300` (an integer) or `1e-5` (text
    to YAML 1.1) is taken as the double it means, as as_doubles does for `ros2 param set`;
    rclpy would refuse it for its type. rclpy keeps the start-up values in
    Node._parameter_overrides and has no public accessor for them; without that attribute the
    value goes on as given, to rclpy's own error naming the parameter."""
    given = getattr(node, '_parameter_overrides', None)
    param = given.get(name) if isinstance(given, dict) else None
    if param is None or param.type_ not in (Parameter.Type.INTEGER, Parameter.Type.STRING):
        return
    value = as_number(param.value)
    if isinstance(value, float):
        given[name] = Parameter(name, Parameter.Type.DOUBLE, value)


def as_doubles(*names):
    """A pre-set-parameters callback for double parameters `names`: `ros2 param set NODE NAME
    1e-5` sends a string (YAML reads 1e-5 without a dot as text) and `... 1` an integer; both
    go on as doubles. Anything else is left for the declared type to refuse."""
    def coerce(params):
        out = []
        for param in params:
            value = as_number(param.value)
            if param.name in names and isinstance(value, float) and \
                    param.type_ != Parameter.Type.DOUBLE:
                param = Parameter(param.name, Parameter.Type.DOUBLE, value)
            out.append(param)
        return out
    return coerce
