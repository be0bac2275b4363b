"""The package's import structure: no import cycles, no layer importing a
layer above it, and a core and a top-level package that import without the
OpenMMLab stack.

The graph is read from the source with ``ast``, function-level imports
included (a cycle hidden inside a function still ties two modules together).
An edge goes to the module an import names: ``from .x import f`` to ``x``,
``from . import x`` to ``x`` when it is a module; the ``__init__`` files of
parent packages, which Python also runs, are not edges (every module would
otherwise depend on ``mesa_seg/__init__.py``).
"""
import ast
import os
import os.path as osp
import subprocess
import sys
import textwrap
from typing import Dict, List, Optional, Set

import pytest

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
PACKAGE = 'mesa_seg'
OPENMMLAB = ('mmseg', 'mmengine', 'mmcv')

# module (and its submodules) -> modules (and their submodules) it must not
# reach, directly or through other modules
FORBIDDEN = {
    'mesa_seg.compat': ['mesa_seg.cli', 'mesa_seg.preflight', 'mesa_seg.runner',
                        'mesa_seg.setup_env', 'mesa_seg.register'],
    'mesa_seg.fileio': ['mesa_seg.cli', 'mesa_seg.preflight', 'mesa_seg.runner',
                        'mesa_seg.setup_env', 'mesa_seg.register'],
    'mesa_seg.models': ['mesa_seg.cli', 'mesa_seg.preflight', 'mesa_seg.runner',
                        'mesa_seg.setup_env', 'mesa_seg.register',
                        'mesa_seg.hooks'],
    'mesa_seg.hooks': ['mesa_seg.cli', 'mesa_seg.preflight', 'mesa_seg.runner',
                       'mesa_seg.setup_env', 'mesa_seg.register'],
    'mesa_seg.runner': ['mesa_seg.cli', 'mesa_seg.preflight'],
    'mesa_seg.preflight': ['mesa_seg.cli', 'mesa_seg.runner'],
}


# ------------------------------------------------------------ graph builder
def find_modules(root: str, package: str) -> Dict[str, str]:
    """Dotted module name -> file, for every ``.py`` file under ``root`` (the
    folder of ``package``)."""
    modules = {}
    for dirpath, dirnames, files in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d != '__pycache__')
        rel = osp.relpath(dirpath, root)
        parts = [package] + ([] if rel == '.' else rel.split(os.sep))
        for f in files:
            if not f.endswith('.py'):
                continue
            name = parts if f == '__init__.py' else parts + [f[:-3]]
            modules['.'.join(name)] = osp.join(dirpath, f)
    return modules


def _known(name: str, modules) -> Optional[str]:
    """``name`` or its longest prefix that is a module of the package."""
    parts = name.split('.')
    for end in range(len(parts), 0, -1):
        candidate = '.'.join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def imports_of(module: str, path: str, modules) -> Set[str]:
    """The package modules that ``module`` imports, anywhere in its body."""
    with open(path, encoding='utf-8') as f:
        tree = ast.parse(f.read(), path)
    is_package = osp.basename(path) == '__init__.py'
    here = module.split('.') if is_package else module.split('.')[:-1]
    targets = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[:len(here) - (node.level - 1)]
                base = '.'.join(base + ([node.module] if node.module else []))
            else:
                base = node.module or ''
            names = [f'{base}.{alias.name}'
                     if f'{base}.{alias.name}' in modules else base
                     for alias in node.names]
        else:
            continue
        for name in names:
            target = _known(name, modules)
            if target is not None and target != module:
                targets.add(target)
    return targets


def import_graph(root: str, package: str) -> Dict[str, Set[str]]:
    modules = find_modules(root, package)
    return {m: imports_of(m, p, modules) for m, p in sorted(modules.items())}


def find_cycle(graph: Dict[str, Set[str]]) -> Optional[List[str]]:
    """One cycle as ``[a, b, ..., a]``, or None."""
    state: Dict[str, int] = {}  # 1: on the current path, 2: done
    path: List[str] = []

    def visit(node: str) -> Optional[List[str]]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + '.')


def path_to(graph, start: str, prefix: str) -> Optional[List[str]]:
    """An import chain from ``start`` to a module under ``prefix``, or None."""
    seen, stack = {start}, [[start]]
    while stack:
        chain = stack.pop()
        for nxt in sorted(graph.get(chain[-1], ())):
            if _within(nxt, prefix):
                return chain + [nxt]
            if nxt not in seen:
                seen.add(nxt)
                stack.append(chain + [nxt])
    return None


@pytest.fixture(scope='module')
def graph():
    return import_graph(osp.join(REPO, PACKAGE), PACKAGE)


# ------------------------------------------------ the builder can fail
def _write(root, files: Dict[str, str]):
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


def test_builder_finds_a_cycle_through_a_function_level_import(tmp_path):
    _write(tmp_path / 'pkg', {
        '__init__.py': '',
        'a.py': 'from . import b\n',
        'sub/__init__.py': 'from .c import f\n',
        'sub/c.py': 'from ..b import g\n\ndef f():\n    pass\n',
        'b.py': 'import os\n\ndef g():\n    from .sub import c  # lazy\n',
        'd.py': 'from .a import b\nfrom pkg.sub.c import f\n',
    })
    graph = import_graph(str(tmp_path / 'pkg'), 'pkg')
    assert graph['pkg'] == set()
    assert graph['pkg.a'] == {'pkg.b'}
    assert graph['pkg.sub'] == {'pkg.sub.c'}
    assert graph['pkg.sub.c'] == {'pkg.b'}
    assert graph['pkg.b'] == {'pkg.sub.c'}
    assert graph['pkg.d'] == {'pkg.a', 'pkg.sub.c'}
    assert find_cycle(graph) == ['pkg.b', 'pkg.sub.c', 'pkg.b']
    assert path_to(graph, 'pkg.d', 'pkg.sub') == ['pkg.d', 'pkg.sub.c']
    del graph['pkg.b']
    assert find_cycle(graph) is None


# ------------------------------------------------------- the real package
def test_graph_covers_the_package(graph):
    for module in ('mesa_seg', 'mesa_seg.errors', 'mesa_seg.cli',
                   'mesa_seg.runner', 'mesa_seg.preflight', 'mesa_seg.hooks',
                   'mesa_seg.models.segmentors', 'mesa_seg.mesa.policy'):
        assert module in graph
    assert 'mesa_seg.errors' in graph['mesa_seg.preflight']
    assert 'mesa_seg.mesa' in graph['mesa_seg.models.segmentors']


def test_no_import_cycle(graph):
    assert find_cycle(graph) is None


def test_core_imports_nothing_else_of_the_package(graph):
    bad = {m: sorted(t for t in targets if not _within(t, 'mesa_seg.mesa'))
           for m, targets in graph.items() if _within(m, 'mesa_seg.mesa')}
    assert not any(bad.values()), bad


def test_no_layer_imports_a_layer_above_it(graph):
    chains = []
    for low, highs in FORBIDDEN.items():
        for module in graph:
            if not _within(module, low):
                continue
            for high in highs:
                chain = path_to(graph, module, high)
                if chain and not _within(module, high):
                    chains.append(' -> '.join(chain))
    assert not chains, chains


def test_only_the_tools_import_the_cli(graph):
    users = sorted(m for m, targets in graph.items() if 'mesa_seg.cli' in targets)
    assert users == []


def test_errors_module_imports_nothing():
    with open(osp.join(REPO, PACKAGE, 'errors.py'), encoding='utf-8') as f:
        tree = ast.parse(f.read())
    assert not [n for n in ast.walk(tree)
                if isinstance(n, (ast.Import, ast.ImportFrom))]


# ------------------------------------------------ what an import loads
def _python(code: str) -> str:
    done = subprocess.run([sys.executable, '-c', code], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip()


LOADED = ('import sys; print(sorted({{m.split(".")[0] for m in sys.modules}} '
          '& {openmmlab!r}))')


@pytest.mark.parametrize('statement', ['import mesa_seg.mesa', 'import mesa_seg',
                                       'import mesa_seg.errors'])
def test_core_and_package_import_without_openmmlab(statement):
    loaded = _python(f'{statement}; ' + LOADED.format(openmmlab=set(OPENMMLAB)))
    assert loaded == '[]', f'{statement} loaded {loaded}'


def test_models_import_alone():
    """compat's mmcv.ops stand-in is in place before mmseg is imported."""
    assert _python('import mesa_seg.models; import sys; '
                   'print(type(sys.modules["mmcv.ops"]).__name__)') == 'module'


def test_register_module_registers_everything():
    """What ``custom_imports=dict(imports=['mesa_seg.register'])`` does."""
    out = _python(textwrap.dedent('''
        import mesa_seg.register
        from mmengine.fileio import get_file_backend
        from mmengine.registry import HOOKS, OPTIM_WRAPPERS, DefaultScope
        from mmseg.registry import MODELS
        names = ['RandomStateHook', 'CheckpointCompatHook', 'LabelRangeHook',
                 'PeakMemoryHook']
        assert all(HOOKS.get(n) is not None for n in names)
        assert MODELS.get('MesaEncoderDecoder') is not None
        assert MODELS.get('MesaSwinTransformer') is not None
        assert 'CPUAmpOptimWrapper' in OPTIM_WRAPPERS.module_dict
        assert DefaultScope.get_current_instance() is None
        print(type(get_file_backend('x.pth')).__name__)
    '''))
    assert out == 'AtomicLocalBackend'
