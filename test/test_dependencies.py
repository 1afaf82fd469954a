"""One declaration per dependency: every third-party import is declared in setup.py (read back
from the installed distribution's metadata), pinned in requirements.txt, and named in
package.xml for colcon users; and nothing is declared that nothing uses."""
import ast
import importlib.metadata as md
from pathlib import Path
import sys
import xml.etree.ElementTree as ET

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
import pytest

REPO = Path(__file__).resolve().parents[1]
DIST = 'mm_fusion_ros'

# Imported, but no wheel provides them: only a ROS 2 install does (package.xml), and the code
# that imports them runs there only (tf2_msgs is guarded: the trainer publishes /tf if it
# imports) or is a launch file; ros2bag and rviz2 are what finetune.launch.py starts.
ROS_INSTALL_ONLY = {'tf2_msgs', 'launch', 'launch_ros', 'ros2bag', 'rviz2'}
# Declared, and used without an import of that name.
INDIRECT = {
    'tensorboard': 'torch.utils.tensorboard writes the event files',
    'ros-rmw-fastrtps-cpp': 'the middleware rclpy loads (RMW_IMPLEMENTATION=rmw_fastrtps_cpp)',
    'ros-rosgraph-msgs': 'bag_player --clock loads rosgraph_msgs/msg/Clock by name',
    'ruff': 'dev.sh test runs the linter',
    'colcon-common-extensions': 'test_install.py builds the package with colcon',
}
# package.xml (rosdep) names of the pip requirements; ros-* wheels map to their ROS package.
ROSDEP_KEYS = {
    'matplotlib': 'python3-matplotlib', 'numpy': 'python3-numpy', 'pillow': 'python3-pil',
    'rosbags': 'python3-rosbags-pip', 'scipy': 'python3-scipy',
    'tensorboard': 'python3-tensorboard-pip', 'torch': 'python3-torch', 'tqdm': 'python3-tqdm',
    'pytest': 'python3-pytest', 'pyyaml': 'python3-yaml',
}
# Requirements without a package.xml entry: pip-only tools and optional parts, and the
# middleware, which a ROS 2 install chooses itself.
PIP_ONLY = {'kiss-icp', 'ros-rmw-fastrtps-cpp', 'ruff', 'evo', 'mcap', 'mcap-ros2-support',
            'colcon-common-extensions', 'packaging'}


def declared():
    """{canonical name: (Requirement, extra)} of the installed distribution ('' = core)."""
    extras = md.metadata(DIST).get_all('Provides-Extra') or []
    out = {}
    for text in md.requires(DIST) or []:
        req = Requirement(text)
        if req.marker is None or req.marker.evaluate({'extra': ''}):
            extra = ''
        else:
            extra = next(e for e in extras if req.marker.evaluate({'extra': e}))
        out[canonicalize_name(req.name)] = (req, extra)
    return out


def _optional(tree):
    """ids of imports inside a function (lazy) or a try that catches ImportError."""
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            ids |= {id(n) for n in ast.walk(node)}
        elif isinstance(node, ast.Try) and any(
                isinstance(h.type, ast.Name) and h.type.id in ('ImportError',
                                                               'ModuleNotFoundError')
                for h in node.handlers):
            ids |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return ids


def third_party_imports(folder):
    """(top-level module, file, line, optional) for each import that is neither the standard
    library, this package, nor a sibling file (conftest)."""
    for path in sorted((REPO / folder).rglob('*.py')):
        tree = ast.parse(path.read_text(), filename=str(path))
        optional = _optional(tree)
        siblings = {p.stem for p in path.parent.glob('*.py')}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split('.')[0]
                if top not in sys.stdlib_module_names and top != DIST and top not in siblings:
                    yield top, path.relative_to(REPO), node.lineno, id(node) in optional


def _providers():
    return {module: {canonicalize_name(d) for d in dists}
            for module, dists in md.packages_distributions().items()}


def _check_imports(folder, allowed_for):
    reqs, providers, problems = declared(), _providers(), []
    for module, path, line, optional in third_party_imports(folder):
        if module in ROS_INSTALL_ONLY:
            continue
        if module not in providers:
            problems.append(f'{path}:{line}: {module} comes from no installed distribution')
            continue
        allowed = allowed_for(path, optional)
        if not any(d in reqs and reqs[d][1] in allowed for d in providers[module]):
            where = ', '.join(sorted(f'[{e}]' if e else 'install_requires' for e in allowed))
            problems.append(f'{path}:{line}: {module} (from {sorted(providers[module])}) is '
                            f'declared in none of {where}')
    return problems


def test_package_imports_are_declared():
    """Outside ros/ an unguarded import must be a core requirement; a lazy or guarded one may
    come from an extra; ros/ may use the ros extra."""
    def allowed(path, optional):
        if path.parts[1] == 'ros':
            return {'', 'ros'}
        return {'', 'ros', 'kiss', 'test'} if optional else {''}
    assert not _check_imports('mm_fusion_ros', allowed)


def test_launch_test_and_bench_imports_are_declared():
    everything = {'', 'ros', 'kiss', 'test'}
    for folder, extras in (('launch', {'', 'ros'}), ('test', everything),
                           ('bench', everything)):
        assert not _check_imports(folder, lambda path, optional, e=extras: e), folder


def test_every_declared_requirement_is_used():
    providers = _providers()
    imported = {d for folder in ('mm_fusion_ros', 'launch', 'test', 'bench')
                for module, *_ in third_party_imports(folder) for d in providers.get(module, ())}
    unused = sorted(name for name in declared() if name not in imported and name not in INDIRECT)
    assert not unused, f'declared in setup.py but never imported: {unused}'


def test_requirements_txt_pins_every_declared_requirement_within_its_range():
    pins = {}
    for line in (REPO / 'requirements.txt').read_text().splitlines():
        if line.strip() and not line.startswith('#'):
            req = Requirement(line)
            pins[canonicalize_name(req.name)] = req.specifier
    for name, (req, extra) in declared().items():
        assert name in pins, f'{name} ({extra or "core"}) is not pinned in requirements.txt'
        pinned = [s.version for s in pins[name] if s.operator == '==']
        assert pinned, f'requirements.txt must pin {name} with =='
        assert req.specifier.contains(pinned[0], prereleases=True), \
            f"requirements.txt pins {name}=={pinned[0]}, outside setup.py's {req.specifier}"
        installed = md.version(name)
        assert req.specifier.contains(installed, prereleases=True), (name, installed)


def test_package_xml_is_in_step_with_setup_py():
    root = ET.parse(REPO / 'package.xml').getroot()
    exec_deps = {e.text for e in root.iter('exec_depend')}
    test_deps = {e.text for e in root.iter('test_depend')}
    expected_exec, expected_test = set(), set()
    for name, (_, extra) in declared().items():
        if name in PIP_ONLY:
            continue
        key = name[4:].replace('-', '_') if name.startswith('ros-') else ROSDEP_KEYS[name]
        (expected_test if extra == 'test' else expected_exec).add(key)
    assert exec_deps - ROS_INSTALL_ONLY == expected_exec
    assert ROS_INSTALL_ONLY <= exec_deps
    assert test_deps == expected_test


@pytest.mark.parametrize('source, expected', [
    ('import numpy\ntry:\n    import tf2_msgs\nexcept ImportError:\n    pass\n'
     'def f():\n    import kiss_icp\n', [('numpy', False), ('tf2_msgs', True),
                                         ('kiss_icp', True)]),
])
def test_import_scan_sees_optional_imports(tmp_path, monkeypatch, source, expected):
    (tmp_path / 'pkg').mkdir()
    (tmp_path / 'pkg' / 'm.py').write_text(source)
    monkeypatch.setattr(sys.modules[__name__], 'REPO', tmp_path)
    assert [(m, opt) for m, _, _, opt in third_party_imports('pkg')] == expected
