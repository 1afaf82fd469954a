"""DESIGN §1 layering, checked on every module of the package (ast, imports inside functions
included): ROS stays in mm_fusion_ros/ros, layers import only layers below, no import cycles."""
import ast
from pathlib import Path
import re
import subprocess
import sys

PKG = Path(__file__).resolve().parents[1] / 'mm_fusion_ros'
# Top-level names of the ROS 2 client library, interfaces and tools.
ROS_NAME = re.compile(r'^(rclpy|rcl_\w+|\w+_(msgs|srvs|interfaces)|rosidl_\w+|rmw\w*|'
                      r'launch|launch_ros|tf2_\w+|message_filters|ament_index_python)$')
# DESIGN §1, from the ground up: a module imports modules of its own layer or below.
LAYERS = {
    'mm_fusion_ros': 0, 'mm_fusion_ros.config': 0, 'mm_fusion_ros.geometry': 0,
    'mm_fusion_ros.stamps': 0, 'mm_fusion_ros.fileio': 0,
    'mm_fusion_ros.kitti': 1, 'mm_fusion_ros.synthetic': 1, 'mm_fusion_ros.messages': 1,
    'mm_fusion_ros.bag': 2, 'mm_fusion_ros.sync': 2, 'mm_fusion_ros.model': 2,
    'mm_fusion_ros.eval': 2, 'mm_fusion_ros.trajectory': 2, 'mm_fusion_ros.runtime': 2,
    'mm_fusion_ros.training': 3, 'mm_fusion_ros.filter': 3,
    'mm_fusion_ros.ros': 4,
    'mm_fusion_ros.cli': 5, 'mm_fusion_ros.prefix_install': 5,
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix('').parts
    return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


MODULES = {_module_name(p): p for p in sorted(PKG.rglob('*.py'))}


def _imports(name):
    """(imported module, line, inside a function or class?) for every import of `name`."""
    path = MODULES[name]
    package = name if path.name == '__init__.py' else name.rpartition('.')[0]
    tree = ast.parse(path.read_text(), filename=str(path))
    nested = {id(n) for scope in ast.walk(tree)
              if isinstance(scope, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
              for n in ast.walk(scope) if n is not scope}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ''
            if node.level:
                anchor = package.split('.')[:len(package.split('.')) - node.level + 1]
                base = '.'.join(anchor + ([base] if base else []))
            # `from pkg import mod` imports the submodule pkg.mod when there is one.
            targets = [f'{base}.{a.name}' if f'{base}.{a.name}' in MODULES else base
                       for a in node.names]
        else:
            continue
        for target in targets:
            yield target, node.lineno, id(node) in nested


def _layer(name):
    for prefix in sorted(LAYERS, key=len, reverse=True):
        if name == prefix or name.startswith(prefix + '.'):
            return LAYERS[prefix]
    raise AssertionError(f'{name} is in no layer of DESIGN §1: add its package to LAYERS '
                         'in test/test_layering.py')


def _internal_graph():
    return {name: sorted({t for t, _, _ in _imports(name) if t in MODULES and t != name})
            for name in MODULES}


def _cycles(graph):
    """One cycle (as a module list) per strongly connected component with more than one
    module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(_cycle_in(graph, component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def _cycle_in(graph, component):
    """The shortest cycle through the component's first module (breadth-first)."""
    start = min(component)
    parent, queue = {}, [start]
    while queue:
        v = queue.pop(0)
        for w in graph[v]:
            if w == start:
                path = [v]
                while path[-1] != start:
                    path.append(parent[path[-1]])
                return path[::-1] + [start]
            if w in component and w not in parent:
                parent[w] = v
                queue.append(w)
    raise AssertionError(f'{sorted(component)} is not strongly connected')


def test_ros_imports_only_in_the_ros_layer():
    offenders = [f'{MODULES[n].relative_to(PKG.parent)}:{line} imports {target}'
                 for n in MODULES if not n.startswith('mm_fusion_ros.ros')
                 for target, line, _ in _imports(n)
                 if ROS_NAME.match(target.split('.')[0])
                 or target == 'mm_fusion_ros.ros' or target.startswith('mm_fusion_ros.ros.')]
    assert not offenders, offenders


def test_layers_import_only_layers_below():
    offenders = [f'{MODULES[n].relative_to(PKG.parent)}:{line} imports {target} '
                 f'(layer {_layer(target)} above {_layer(n)})'
                 for n in MODULES for target, line, _ in _imports(n)
                 if target in MODULES and _layer(target) > _layer(n)]
    assert not offenders, offenders


def test_no_import_cycles():
    cycles = _cycles(_internal_graph())
    assert not cycles, 'import cycles: ' + '; '.join(' -> '.join(c) for c in cycles)


def test_no_lazy_imports_of_our_own_modules():
    """An import inside a function hides a cycle or a layering problem (STYLE); optional or
    heavy third-party imports may be lazy, our modules may not."""
    offenders = [f'{MODULES[n].relative_to(PKG.parent)}:{line} imports {target} in a function'
                 for n in MODULES for target, line, nested in _imports(n)
                 if nested and target.split('.')[0] == 'mm_fusion_ros']
    assert not offenders, offenders


def test_the_cycle_check_finds_a_cycle():
    graph = {'a': ['b'], 'b': ['c'], 'c': ['a', 'd'], 'd': [], 'e': ['e2'], 'e2': []}
    assert _cycles(graph) == [['a', 'b', 'c', 'a']]
    assert _cycles(_internal_graph() | {'mm_fusion_ros.geometry': ['mm_fusion_ros.kitti.raw']})


def test_modules_outside_ros_import_without_ros():
    """STYLE: everything outside ros/ (the CLIs included) imports on a machine without ROS."""
    modules = sorted(n for n in MODULES if not n.startswith('mm_fusion_ros.ros'))
    code = ('import importlib, re, sys\n'
            f'ros = re.compile({ROS_NAME.pattern!r})\n'
            'class Block:\n'
            '    def find_spec(self, name, path=None, target=None):\n'
            '        if ros.match(name.split(".")[0]):\n'
            '            raise ImportError(f"{name} is blocked: no ROS here")\n'
            'sys.meta_path.insert(0, Block())\n'
            f'for m in {modules!r}:\n    importlib.import_module(m)\n'
            'print(sorted(m for m in sys.modules if ros.match(m.split(".")[0])))\n')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                         cwd=PKG.parent, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == '[]'
    assert len(modules) > 40
