"""The package's layout rules, read from the source with ``ast`` (nothing is imported).

- No import cycle between aiba's modules (``src/aiba`` and ``backends/`` as ``aiba.backends``).
  Rule: an edge ``a -> b`` is any ``import``/``from ... import`` in ``a`` that names module
  ``b`` (``from .x import y`` names ``aiba.x``, or only ``aiba.x.y`` when that is a module),
  at module level *or inside a function*. Imports inside functions run later than import
  time, so they do not break ``import aiba``; they still count, because a pair of modules
  that reach for each other lazily is the same tangle (``evaluate.report`` <->
  ``report.build_report``) and the layers must point one way. Not counted: imports under
  ``if TYPE_CHECKING:``, and the implicit import of a parent package (``aiba`` when
  ``aiba.capture.tap`` is imported), which every submodule has and Python resolves by design.
- No module uses another module's private name: ``from .foo import _bar``; ``foo._bar`` with
  ``foo`` an imported aiba module; ``obj._bar`` (``obj`` not ``self``/``cls``) where
  ``_bar`` is a private function, method or attribute defined only in other aiba modules.
  A private *module* (``backends/_tokenizers.py``) may be imported from its own package.
  ``benchmarks/`` is held to the same rule against aiba.
- No function longer than ``MAX_LINES`` lines (``end_lineno - lineno + 1``, decorators not
  counted; nested functions and methods are measured on their own too).

Each checker is a plain function of source texts; the ``*_catches_*`` tests feed it a bad
example so a checker that cannot fail is noticed.
"""

from __future__ import annotations

import ast
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 60


# --------------------------------------------------------------------------- sources
def package_sources(root: Path = ROOT) -> dict[str, tuple[str, bool]]:
    """``{module name: (source, is_package)}`` for aiba (``src/aiba``) and aiba.backends (``backends``)."""
    out: dict[str, tuple[str, bool]] = {}
    for base, prefix in ((root / "src" / "aiba", "aiba"), (root / "backends", "aiba.backends")):
        for path in sorted(base.rglob("*.py")):
            rel = path.relative_to(base).with_suffix("").parts
            is_pkg = rel[-1] == "__init__"
            parts = rel[:-1] if is_pkg else rel
            out[".".join((prefix, *parts))] = (path.read_text(), is_pkg)
    return out


def script_sources(root: Path = ROOT) -> dict[str, str]:
    """``{display name: source}`` of the benchmark scripts."""
    return {f"benchmarks/{p.name}": p.read_text() for p in sorted((root / "benchmarks").glob("*.py"))}


def _resolve(name: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    """Absolute module named by ``from <node.module> import ...`` in module ``name``."""
    if not node.level:
        return node.module or ""
    base = name.split(".")
    base = base if is_pkg else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _type_checking(node: ast.AST) -> bool:
    t = node.test if isinstance(node, ast.If) else None
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST):
    """Every import statement, skipping ``if TYPE_CHECKING:`` blocks."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if _type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def imported_modules(name: str, source: str, is_pkg: bool, known) -> list[tuple[str, int, list[str]]]:
    """``(module, line, imported names)`` for every aiba module ``name``'s source names."""
    out = []
    for node in _import_nodes(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno, []) for a in node.names if a.name in known]
            continue
        mod = _resolve(name, is_pkg, node)
        subs = [a.name for a in node.names if f"{mod}.{a.name}" in known]
        names = [a.name for a in node.names if a.name not in subs]
        if mod in known and names:  # `from pkg import submodule` alone names only the submodule
            out.append((mod, node.lineno, names))
        out += [(f"{mod}.{n}", node.lineno, []) for n in subs]
    return out


# --------------------------------------------------------------------------- cycles
def import_graph(sources: dict[str, tuple[str, bool]]) -> dict[str, set[str]]:
    return {name: {m for m, _, _ in imported_modules(name, src, pkg, sources) if m != name}
            for name, (src, pkg) in sources.items()}


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


# --------------------------------------------------------------------------- private names
def _private(n: str) -> bool:
    return n.startswith("_") and not (n.startswith("__") and n.endswith("__"))


def private_definitions(source: str) -> set[str]:
    """Private names a module defines: functions, classes, methods, module globals and
    attributes assigned on any object (``self._x = ...``)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            out.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            out.add(node.attr)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            out.add(node.target.id)
    return {n for n in out if _private(n)}


def _module_aliases(name: str, tree: ast.AST, is_pkg: bool, known) -> dict[str, str]:
    """Local names bound to aiba modules: ``import aiba.capture.tap as t``, ``from . import tap``."""
    out = {}
    for node in _import_nodes(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in known:
                    out[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        else:
            mod = _resolve(name, is_pkg, node)
            for a in node.names:
                if f"{mod}.{a.name}" in known:
                    out[a.asname or a.name] = f"{mod}.{a.name}"
    return out


def _dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        head = _dotted(node.value)
        return f"{head}.{node.attr}" if head else None
    return None


def private_uses(sources: dict[str, tuple[str, bool]], scripts: dict[str, str] | None = None) -> list[str]:
    """``"module:line: what"`` for every use of another module's private name."""
    known = set(sources)
    defs = {name: private_definitions(src) for name, (src, _) in sources.items()}
    everyone = {n for d in defs.values() for n in d}
    items = [(name, src, pkg, defs[name]) for name, (src, pkg) in sources.items()]
    items += [(name, src, False, private_definitions(src)) for name, src in (scripts or {}).items()]
    out = []
    for name, src, pkg, own in items:
        tree = ast.parse(src)
        in_aiba = name in known
        for node in _import_nodes(tree):
            if isinstance(node, ast.ImportFrom):
                mod = _resolve(name, pkg, node) if in_aiba else (node.module or "")
                if mod != "aiba" and not mod.startswith("aiba."):
                    continue
                for a in node.names:
                    sub = f"{mod}.{a.name}"
                    same_pkg = in_aiba and sub in known and sub.rsplit(".", 1)[0] == (name if pkg else name.rsplit(".", 1)[0])
                    if _private(a.name) and mod != name and not same_pkg:
                        out.append(f"{name}:{node.lineno}: imports {a.name} from {mod}")
            else:
                for a in node.names:
                    parts = a.name.split(".")
                    if any(_private(p) for p in parts[1:]) and parts[0] == "aiba":
                        out.append(f"{name}:{node.lineno}: imports {a.name}")
        aliases = _module_aliases(name, tree, pkg, known) if in_aiba else {
            (a.asname or a.name.split(".")[0]): (a.name if a.asname else "aiba")
            for node in _import_nodes(tree) if isinstance(node, ast.Import)
            for a in node.names if a.name.split(".")[0] == "aiba"}
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Attribute) and _private(node.attr)):
                continue
            head = _dotted(node.value)
            root = head.split(".")[0] if head else None
            if head in ("self", "cls") or (isinstance(node.value, ast.Call) and _dotted(node.value.func) == "super"):
                continue
            if root in aliases:
                target = aliases[root] + head[len(root):]
                if target != name:
                    out.append(f"{name}:{node.lineno}: uses {target}.{node.attr}")
            elif node.attr in everyone and node.attr not in own:
                where = sorted(m for m, d in defs.items() if node.attr in d)
                out.append(f"{name}:{node.lineno}: uses {head or '<expr>'}.{node.attr} (private to {', '.join(where)})")
    return sorted(set(out))


# --------------------------------------------------------------------------- long functions
def long_functions(sources: dict[str, str], limit: int = MAX_LINES) -> list[str]:
    """``"file:line name (n lines)"`` for every function longer than ``limit`` lines."""
    out = []
    for where, src in sources.items():
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > limit:
                    out.append(f"{where}:{node.lineno} {node.name} ({n} lines)")
    return sorted(out)


def _code_files(root: Path = ROOT) -> dict[str, str]:
    files = sorted((root / "src" / "aiba").rglob("*.py")) + sorted((root / "backends").rglob("*.py"))
    return {str(p.relative_to(root)): p.read_text() for p in files}


# --------------------------------------------------------------------------- the repository
def test_sources_found():
    src = package_sources()
    assert {"aiba", "aiba.backends", "aiba.data"} <= set(src)
    assert len(src) > 10
    assert any(imported_modules(n, s, p, src) for n, (s, p) in src.items())


def test_no_import_cycle():
    cycles = import_cycles(import_graph(package_sources()))
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_no_private_name_across_modules():
    uses = private_uses(package_sources(), script_sources())
    assert not uses, "private names used across modules:\n" + "\n".join(uses)


def test_functions_at_most_60_lines():
    long = long_functions(_code_files())
    assert not long, f"functions longer than {MAX_LINES} lines:\n" + "\n".join(long)


# --------------------------------------------------------------------------- the checkers fail
def test_cycle_checker_catches_a_cycle():
    src = {
        "aiba": ("from .a import f\n", True),
        "aiba.a": ("def f():\n    from .b import g\n    return g()\n", False),
        "aiba.b": ("from aiba import a\n", False),
        "aiba.c": ("import aiba.b\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import a\n", False),
    }
    assert import_graph(src)["aiba.c"] == {"aiba.b"}
    assert import_cycles(import_graph(src)) == [["aiba.a", "aiba.b"]]
    src["aiba.b"] = ("x = 1\n", False)
    assert import_cycles(import_graph(src)) == []


def test_cycle_checker_resolves_relative_imports_in_subpackages():
    src = {
        "aiba": ("", True),
        "aiba.backends": ("from .base import B\n", True),
        "aiba.backends.base": ("from ..core import T\n", False),
        "aiba.core": ("from .backends import base\n", False),
    }
    g = import_graph(src)
    assert g["aiba.backends.base"] == {"aiba.core"}
    assert g["aiba.core"] == {"aiba.backends.base"}
    assert import_cycles(g) == [["aiba.backends.base", "aiba.core"]]


def test_private_checker_catches_each_form():
    src = {
        "aiba": ("", True),
        "aiba.sink": ("class T:\n    def _on_call(self):\n        self._acc = 1\n", False),
        "aiba.conf": ("def _config():\n    pass\n", False),
        "aiba.rep": ("from .conf import _config\n", False),
        "aiba.shim": ("def f(tap):\n    tap._on_call()\n    return tap.public\n", False),
        "aiba.user": ("from . import conf\nimport aiba.sink\nconf._config()\nx = aiba.sink.T\n", False),
        "aiba.ok": ("class U:\n    def _own(self):\n        return other._own, self._acc\n", False),
    }
    scripts = {"benchmarks/p.py": "from aiba.conf import _config\nimport aiba.sink as t\nt._x\n"}
    uses = private_uses(src, scripts)
    assert uses == sorted([
        "aiba.user:3: uses aiba.conf._config",
        "aiba.shim:2: uses tap._on_call (private to aiba.sink)",
        "aiba.rep:1: imports _config from aiba.conf",
        "benchmarks/p.py:1: imports _config from aiba.conf",
        "benchmarks/p.py:3: uses aiba.sink._x",
    ]), uses


def test_private_checker_allows_a_private_module_in_its_own_package():
    src = {
        "aiba": ("", True),
        "aiba.backends": ("", True),
        "aiba.backends._tok": ("def load():\n    pass\n", False),
        "aiba.backends.a": ("from ._tok import load\nfrom . import _tok\n", False),
        "aiba.b": ("from .backends import _tok\n", False),
    }
    assert private_uses(src) == ["aiba.b:1: imports _tok from aiba.backends"]


def test_length_checker_catches_a_long_function():
    body = "".join(f"    x{i} = {i}\n" for i in range(60))
    method = "".join("    " + line + "\n" for line in body.splitlines())
    src = {"m.py": f"@dec\ndef long():\n{body}\n\ndef short():\n    pass\n\nclass C:\n    def meth(self):\n{method}"}
    assert long_functions(src) == ["m.py:2 long (61 lines)", "m.py:69 meth (61 lines)"]
    assert long_functions(src, limit=61) == []


def test_pyproject_lists_every_package():
    """``pip install .`` ships only the packages pyproject lists: every folder with an
    ``__init__.py`` under src/aiba (and backends/) must be there."""
    import re

    text = (ROOT / "pyproject.toml").read_text()
    m = re.search(r"^packages\s*=\s*\[([^\]]*)\]", text, flags=re.M)
    assert m, "pyproject.toml: no [tool.setuptools] packages list"
    listed = set(re.findall(r'"([\w.]+)"', m.group(1)))
    on_disk = {".".join(("aiba", *p.parent.relative_to(ROOT / "src" / "aiba").parts))
               for p in (ROOT / "src" / "aiba").rglob("__init__.py")} | {"aiba.backends"}
    assert listed == on_disk, f"pyproject packages {sorted(listed)} != folders {sorted(on_disk)}"
