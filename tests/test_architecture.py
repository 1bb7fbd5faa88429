"""The package's layering: moe_jax's own imports (module level and inside functions) form no cycle,
and no module imports from a higher layer than its own."""
from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / 'moe_jax'
# Lowest first: a module may import from its own layer or lower ones. A layer is the first name
# under moe_jax/ (a subpackage or a top-level module); the package's __init__ counts as 'cli'.
LAYERS = [('validate', 'reproducibility', 'interrupt'), ('routing',), ('routers',), ('moe',), ('data',), ('parallel',),
          ('models',), ('run',), ('cli',)]


def module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def is_module(name: str) -> bool:
  path = ROOT.joinpath(*name.split('.'))
  return path.with_suffix('.py').is_file() or (path / '__init__.py').is_file()


def imports(path: pathlib.Path) -> set[str]:
  """The moe_jax modules `path` imports: `from moe_jax.a import b` is module moe_jax.a.b when that
  is a module (or subpackage), else moe_jax.a."""
  package = module_name(path).split('.') if path.name == '__init__.py' else (
      module_name(path).split('.')[:-1])
  found = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      found.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:  # relative: from .x import y
        base = '.'.join(package[:len(package) - node.level + 1] + ([base] if base else []))
      for alias in node.names:
        found.add(f'{base}.{alias.name}' if is_module(f'{base}.{alias.name}') else base)
  return {name for name in found if name == 'moe_jax' or name.startswith('moe_jax.')}


GRAPH = {module_name(path): imports(path) for path in PACKAGE.rglob('*.py')}


def layer(module: str) -> int:
  top = module.split('.')[1] if '.' in module else 'cli'
  (index,) = [i for i, names in enumerate(LAYERS) if top in names]
  return index


def test_every_module_has_a_layer():
  for module in GRAPH:
    layer(module)


def test_no_import_from_a_higher_layer():
  upward = [f'{module} -> {name}' for module, names in GRAPH.items() for name in names
            if layer(name) > layer(module)]
  assert not upward, upward


def test_no_import_cycles():
  done, active = set(), []

  def visit(module):
    if module in active:
      raise AssertionError('import cycle: ' + ' -> '.join(active[active.index(module):] + [module]))
    if module not in done:
      active.append(module)
      for name in sorted(GRAPH.get(module, ())):
        visit(name)
      active.pop()
      done.add(module)

  for module in sorted(GRAPH):
    visit(module)
