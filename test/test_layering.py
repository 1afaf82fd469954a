"""DESIGN §1 layering: nothing outside mm_fusion_ros/ros imports rclpy or *_msgs."""
import ast
from pathlib import Path
import subprocess
import sys

PKG = Path(__file__).resolve().parents[1] / 'mm_fusion_ros'
ROS_MODULES = ('rclpy', 'sensor_msgs', 'nav_msgs', 'geometry_msgs', 'std_msgs', 'std_srvs',
               'tf2_msgs', 'rosgraph_msgs', 'diagnostic_msgs', 'visualization_msgs', 'launch')


def _imports(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name.split('.')[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module.split('.')[0]


def test_no_ros_imports_outside_ros_layer():
    offenders = [f'{p.relative_to(PKG)} imports {m}'
                 for p in PKG.rglob('*.py') if 'ros' not in p.relative_to(PKG).parts[:1]
                 for m in _imports(p) if m in ROS_MODULES]
    assert not offenders, offenders


def test_core_imports_with_rclpy_blocked():
    """STYLE: the cores import with sys.modules['rclpy'] = None (as on a machine without ROS)."""
    modules = sorted('mm_fusion_ros.' + '.'.join(p.relative_to(PKG).with_suffix('').parts)
                     for p in PKG.rglob('*.py')
                     if p.relative_to(PKG).parts[0] not in ('ros', 'cli')
                     and p.name != '__init__.py')
    code = ('import sys, importlib\n'
            + ''.join(f'sys.modules[{m!r}] = None\n' for m in ROS_MODULES)
            + f'for m in {modules!r}:\n    importlib.import_module(m)\nprint(len({modules!r}))\n')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                         cwd=PKG.parent, timeout=120)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.strip()) >= 8
