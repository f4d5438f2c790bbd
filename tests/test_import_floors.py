"""The floors of docs/ARCHITECTURE.md: every import of jaxlisa/ (and of main.py, tools/, bench/ on the
top floor), read with `ast` at module level and inside functions, points down or sideways as
allowed, and no circle joins two packages or two files.

The floors (lowest first) and the sideways imports allowed on a shared floor are FLOORS / SIDEWAYS
below; docs/ARCHITECTURE.md lists the same ones (test_floors_match_architecture_md checks it).
"""

from __future__ import annotations

import ast
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Lowest first. A unit is a package under jaxlisa/ ("models") or a top-level file ("jaxlisa/cli.py").
FLOORS = (
    ("ground", ("jaxlisa/constants.py", "jaxlisa/config.py")),
    ("models", ("models",)),
    ("parallel", ("parallel",)),
    ("data+conversion", ("data", "conversion")),
    ("evaluation", ("evaluation",)),
    ("inference+training", ("inference", "training")),
    ("tasks", ("tasks",)),
    ("serving", ("serving",)),
    ("entry", ("jaxlisa/__init__.py", "jaxlisa/zoo.py", "jaxlisa/cli.py", "jaxlisa/__main__.py")),
    ("top", ("main.py", "tools", "bench")),
)
# Imports between two units of one floor: only these directions.
SIDEWAYS = {("conversion", "data"), ("jaxlisa/__init__.py", "jaxlisa/zoo.py"), ("jaxlisa/__main__.py", "jaxlisa/cli.py")}

FLOOR_OF = {unit: i for i, (_, units) in enumerate(FLOORS) for unit in units}


def _sources() -> list[str]:
  """Repository-relative paths of every .py file the floors cover."""
  out = ["main.py"]
  for top in ("jaxlisa", "tools", "bench"):
    for dirpath, _, files in os.walk(os.path.join(ROOT, top)):
      out += [os.path.relpath(os.path.join(dirpath, f), ROOT) for f in files if f.endswith(".py")]
  return sorted(out)


def _module_of(path: str) -> str:
  mod = path[:-3].replace(os.sep, ".")
  return mod[:-len(".__init__")] if mod.endswith(".__init__") else mod


def _unit(path: str) -> str:
  """The floor unit a file belongs to."""
  parts = path.split(os.sep)
  if parts[0] == "jaxlisa":
    return parts[1] if len(parts) > 2 else path
  return parts[0] if len(parts) > 1 else path


def _imports(path: str, modules: dict[str, str]):
  """(line, imported file) for every import of a project module in `path` (nested ones too);
  `from pkg import name` counts as importing pkg/name.py when that is a module."""
  tree = ast.parse(open(os.path.join(ROOT, path)).read(), path)
  here = _module_of(path)
  package = here if path.endswith("__init__.py") else here.rpartition(".")[0]
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [(a.name, None) for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        anchor = package.split(".")
        anchor = anchor[:len(anchor) - node.level + 1]
        base = ".".join(anchor + ([base] if base else []))
      names = [(base, a.name) for a in node.names]
    else:
      continue
    for mod, name in names:
      if name and f"{mod}.{name}" in modules:
        mod = f"{mod}.{name}"
      while mod and mod not in modules:  # `import jaxlisa.x.y` of a module x/y.py, or a name in one
        mod = mod.rpartition(".")[0]
      if mod and modules[mod] != path:
        yield node.lineno, modules[mod]


def _graph():
  files = _sources()
  modules = {_module_of(f): f for f in files}
  return files, {f: sorted(set(_imports(f, modules))) for f in files}


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components with more than one node (Tarjan), each sorted."""
  index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

  def visit(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on.add(v)
    for w in sorted(edges.get(v, ())):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        out.append(sorted(comp))

  for v in sorted(edges):
    if v not in index:
      visit(v)
  return out


def violations() -> list[str]:
  """Every import that points up or sideways where not allowed, and every circle between packages
  or files, as 'file:line: ...' lines."""
  files, graph = _graph()
  out = []
  for f in files:
    src = _unit(f)
    for line, target in graph[f]:
      dst = _unit(target)
      if src == dst:
        continue
      a, b = FLOOR_OF[src], FLOOR_OF[dst]
      if b > a:
        out.append(f"{f}:{line}: imports {target}: {dst} ({FLOORS[b][0]}) is above {src} ({FLOORS[a][0]})")
      elif a == b and (src, dst) not in SIDEWAYS:
        out.append(f"{f}:{line}: imports {target}: {src} -> {dst} on one floor ({FLOORS[a][0]}) is not allowed")
  unit_edges: dict[str, set[str]] = {}
  for f in files:
    for _, target in graph[f]:
      if _unit(target) != _unit(f):
        unit_edges.setdefault(_unit(f), set()).add(_unit(target))
  for comp in _cycles(unit_edges):
    # the imports that close the circle: those not pointing down
    where = [f"{f}:{line} -> {t}" for f in files if _unit(f) in comp for line, t in graph[f]
             if _unit(t) in comp and _unit(t) != _unit(f) and FLOOR_OF[_unit(t)] >= FLOOR_OF[_unit(f)]]
    out.append(f"circle between packages {' <-> '.join(comp)}, closed by: " + "; ".join(where))
  file_edges = {f: {t for _, t in graph[f]} for f in files}
  for comp in _cycles(file_edges):
    where = [f"{f}:{line} -> {t}" for f in comp for line, t in graph[f] if t in comp]
    out.append(f"circle between files {' <-> '.join(comp)}: " + "; ".join(where))
  return out


def test_every_file_is_on_a_floor():
  assert not [f for f in _sources() if _unit(f) not in FLOOR_OF]


def test_imports_point_down_and_make_no_circle():
  found = violations()
  assert not found, f"{len(found)} import(s) against the floors of docs/ARCHITECTURE.md:\n" + "\n".join(found)


def test_checker_catches_up_imports_nested_imports_and_circles(tmp_path, monkeypatch):
  """The checker on a made-up tree: an up import inside a function, a sideways one, two circles."""
  for path, text in {
      "main.py": "",
      "jaxlisa/__init__.py": "",
      "jaxlisa/models/__init__.py": "",
      "jaxlisa/models/a.py": "def f():\n  from jaxlisa.training import t\n",
      "jaxlisa/models/b.py": "from jaxlisa.models import c\n",
      "jaxlisa/models/c.py": "from . import b\n",
      "jaxlisa/data/__init__.py": "",
      "jaxlisa/data/d.py": "import jaxlisa.conversion.e\n",
      "jaxlisa/conversion/__init__.py": "",
      "jaxlisa/conversion/e.py": "from jaxlisa.data import d\n",
      "jaxlisa/training/__init__.py": "",
      "jaxlisa/training/t.py": "from jaxlisa.models.a import f\n",
  }.items():
    os.makedirs(tmp_path / os.path.dirname(path), exist_ok=True)
    (tmp_path / path).write_text(text)
  monkeypatch.setitem(globals(), "ROOT", str(tmp_path))
  found = "\n".join(violations())
  assert "jaxlisa/models/a.py:2: imports jaxlisa/training/t.py" in found
  assert "jaxlisa/data/d.py:1: imports jaxlisa/conversion/e.py: data -> conversion on one floor" in found
  assert "jaxlisa/conversion/e.py:1" not in found.split("circle")[0]  # conversion -> data is allowed
  assert "circle between packages models <-> training" in found
  assert "circle between packages conversion <-> data" in found
  assert "circle between files jaxlisa/models/b.py <-> jaxlisa/models/c.py" in found


def test_floors_match_architecture_md():
  text = open(os.path.join(ROOT, "docs", "ARCHITECTURE.md")).read()
  block = text.split("## Floors", 1)[1].split("\n## ", 1)[0]
  names = re.findall(r"^\d+\. \*\*([\w+]+)\*\*", block, re.M)
  assert names == [name for name, _ in FLOORS]
