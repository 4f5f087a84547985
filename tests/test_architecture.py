"""Structure of the package: no import cycle, no cross-module private name, layers point down.

Static checks over the source (``ast``), so they cover imports inside functions too:

* the import graph of ``pdcnno_jax`` modules has no cycle;
* no module (of the package, the tests or the benchmarks) imports or reaches a module-private
  name (``_name``) of another module;
* the layers only import downward: nothing below the experiment layer imports it, the shared
  loop layer imports no mode, and a mode imports no other mode;
* no function in the package is longer than 120 lines.
"""

import ast
import pathlib

import pytest

_REPO = pathlib.Path(__file__).resolve().parent.parent
_PACKAGE = _REPO / 'pdcnno_jax'
_MAX_FUNCTION_LINES = 120
# Modules of the top layer (they may import everything below) and the training modes.
_TOP = {'pdcnno_jax.experiment', 'pdcnno_jax.stages', 'pdcnno_jax.modes', 'pdcnno_jax.main',
        'pdcnno_jax.config_validation'}
_TOOLS = ('pdcnno_jax.perfmodel',)  # Tools that run whole experiments (above the top layer).
_MODES = {'pdcnno_jax.parallel.sync', 'pdcnno_jax.parallel.mapreduce',
          'pdcnno_jax.parallel.ssp.training'}


def _module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(_REPO).with_suffix('').parts)
  if parts[-1] == '__init__':
    parts = parts[:-1]
  return '.'.join(parts)


def _package_modules() -> dict[str, pathlib.Path]:
  return {_module_name(p): p for p in sorted(_PACKAGE.rglob('*.py'))}


def _imports(tree: ast.AST, modules: dict[str, pathlib.Path]) -> set[str]:
  """Package modules imported anywhere in ``tree`` (``from pkg import mod`` counts as mod)."""
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      found.update(a.name for a in node.names if a.name in modules)
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      for alias in node.names:
        full = f'{node.module}.{alias.name}'
        if full in modules:
          found.add(full)
        elif node.module in modules:
          found.add(node.module)
  return found


def _graph() -> dict[str, set[str]]:
  modules = _package_modules()
  graph = {}
  for name, path in modules.items():
    imported = _imports(ast.parse(path.read_text()), modules)
    # A package's __init__ is not an edge of its own submodules' imports of siblings.
    graph[name] = {m for m in imported if m != name}
  return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components with more than one module (Tarjan)."""
  index, low, stack, on_stack, result = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in graph.get(v, ()):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        result.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return result


def test_no_import_cycle():
  assert _cycles(_graph()) == []


def test_cycle_detector_finds_a_cycle():
  assert _cycles({'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': {'a'}}) == [['a', 'b', 'c']]


def test_layers_point_down():
  graph = _graph()
  for module, imported in graph.items():
    if module not in _TOP and not module.startswith(_TOOLS):
      assert not imported & (_TOP - {'pdcnno_jax.main', 'pdcnno_jax.config_validation'}), (
          module, imported & _TOP)
    if module.startswith('pdcnno_jax.loop') or module.startswith('pdcnno_jax.train'):
      assert not imported & _MODES, (module, imported & _MODES)
    if module in _MODES:
      assert not imported & (_MODES - {module}), (module, imported & _MODES)


def _private_reaches(path: pathlib.Path, modules: dict[str, pathlib.Path]) -> list[str]:
  """``from m import _x`` and ``alias._x`` where ``alias`` names another module."""
  tree = ast.parse(path.read_text())
  own = _module_name(path) if _PACKAGE in path.parents else None
  aliases = {}  # local name -> the module or object it was imported as
  found = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for a in node.names:
        if a.asname:
          aliases[a.asname] = a.name
        elif '.' not in a.name:
          aliases[a.name] = a.name
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      for a in node.names:
        aliases[a.asname or a.name] = f'{node.module}.{a.name}'
        ours = (node.module.split('.')[0] == 'pdcnno_jax'
                or node.module.split('.')[-1] in _LOCAL_HELPERS)
        if (ours and a.name.startswith('_') and not a.name.startswith('__')
            and node.module != own):
          found.append(f'from {node.module} import {a.name}')
  local_modules = {n for n, m in aliases.items()
                   if m in modules or m.split('.')[-1] in _LOCAL_HELPERS}
  for node in ast.walk(tree):
    if (isinstance(node, ast.Attribute) and node.attr.startswith('_')
        and not node.attr.startswith('__') and isinstance(node.value, ast.Name)
        and node.value.id in local_modules):
      found.append(f'{node.value.id}.{node.attr} (line {node.lineno})')
  return found


_LOCAL_HELPERS = {p.stem for d in ('tests', 'benchmarks') for p in (_REPO / d).rglob('*.py')}


def _all_sources() -> list[pathlib.Path]:
  return sorted([*_PACKAGE.rglob('*.py'), *(_REPO / 'tests').rglob('*.py'),
                 *(_REPO / 'benchmarks').rglob('*.py')])


@pytest.mark.parametrize('path', _all_sources(), ids=lambda p: str(p.relative_to(_REPO)))
def test_no_private_name_of_another_module(path):
  assert _private_reaches(path, _package_modules()) == []


def test_private_name_detector(tmp_path):
  source = tmp_path / 'probe.py'
  source.write_text('from pdcnno_jax.parallel import mapreduce\n'
                    'from pdcnno_jax.loop.checks import _hidden\n'
                    'x = mapreduce._warm_up\n')
  assert len(_private_reaches(source, _package_modules())) == 2


def _long_functions(path: pathlib.Path) -> list[str]:
  tree = ast.parse(path.read_text())
  return [f'{node.name} ({node.end_lineno - node.lineno + 1} lines, line {node.lineno})'
          for node in ast.walk(tree)
          if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
          and node.end_lineno - node.lineno + 1 > _MAX_FUNCTION_LINES]


@pytest.mark.parametrize('path', sorted(_PACKAGE.rglob('*.py')),
                         ids=lambda p: str(p.relative_to(_REPO)))
def test_no_function_over_120_lines(path):
  assert _long_functions(path) == []
