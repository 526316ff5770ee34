"""The project's import graph, read statically: no cycles, and dependencies point one way.

Every module of node/, console/ and protos/ is parsed with `ast` (nothing is imported), and
every import statement counts, including those inside functions: a function-level import
is still a dependency, and a cycle hidden in one is still a cycle. `from X import Y` where
`X.Y` is a project module is an import of that submodule.

The rules:
- no import cycles among project modules (imports under `if TYPE_CHECKING:` excepted: they
  never run);
- `node` never imports `console`, and the generated `protos` import neither;
- only modules under console/tui/ import Textual or plotext (textual, plotext,
  textual_plotext);
- `console` imports only the public node modules in CONSOLE_MAY_IMPORT, never the engine's,
  the pipeline's or the service's internals.

tests/test_imports.py checks something different and stays: which modules actually get
loaded at run time (a one-shot CLI command must not load Textual through any chain of
module-level imports, third-party ones included).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("node", "console", "protos")
UI_LIBRARIES = ("textual", "plotext", "textual_plotext")

# The node modules console may import: the node's public API. Each is pure or
# self-contained and means the same on both sides of the wire; everything else in node/
# runs inside a node process (engine, pipeline, service, coordinator, the ring backend and
# its worker, the shard runner, the wire codec) and the console only reaches it over gRPC.
CONSOLE_MAY_IMPORT = {
    "node": "the package itself: __version__ and PROTOCOL_VERSION",
    "node.plan": "pure planning arithmetic: layer ranges, byte estimates, GIB, strategy and "
                 "backend names",
    "node.placement": "building a checked plan from node infos and its protobuf form, "
                      "shared with the coordinator's recovery",
    "node.models": "model specs: resolving a spec, its shape, what it supports",
    "node.synthetic": "the configs of the synthetic:<name> models",
    "node.tokenizers": "prompt tokenizers the benchmarks encode with",
    "node.resume": "the one entry-node rule and resuming a request on a new entry node",
    "node.api": "the OpenAI-compatible HTTP API, which serve-api runs on its own",
    "node.jsonform": "protobuf messages as JSON data, the one form of every --json output",
    "node.errors": "the errors a node raises for a user's mistake, to catch and show",
    "node.faults": "the fault kinds the CLI and the dashboard offer",
    "node.auth": "the cluster token, TLS and the authenticated channel",
    "node.peers": "gRPC channel options and the peer-channel cache",
    "node.histogram": "the shared latency-histogram bucket layout, to merge node metrics",
    "node.membership": "joining a plan: the default settle time a load gives its plan",
}

# Named explicitly so a failure says "internal", not merely "not on the list".
NODE_INTERNALS = ("node.engine", "node.pipeline", "node.shardrun", "node.ring",
                  "node.ring_worker", "node.service", "node.coordinator", "node.wire",
                  "node.cli")


@dataclass(frozen=True)
class Import:
    source: str          # importing project module
    target: str          # imported module, as specific as it resolves (may be third-party)
    path: str            # file:line of the statement
    type_only: bool      # under `if TYPE_CHECKING:`


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@cache
def project_modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            mods[_module_name(path)] = path
    return mods


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _walk(node: ast.AST, type_only: bool = False):
    """Every import node under `node`, with whether it only runs for a type checker."""
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        yield node, type_only
        return
    if isinstance(node, ast.If) and _is_type_checking(node.test):
        for child in node.body:
            yield from _walk(child, True)
        for child in node.orelse:
            yield from _walk(child, type_only)
        return
    for child in ast.iter_child_nodes(node):
        yield from _walk(child, type_only)


def imports_of(tree: ast.AST, name: str, is_pkg: bool, rel: str) -> list[Import]:
    """The imports of one parsed module `name` (`is_pkg`: it is a package's __init__)."""
    mods = project_modules()
    found = []
    for stmt, type_only in _walk(tree):
        where = f"{rel}:{stmt.lineno}"
        if isinstance(stmt, ast.Import):
            found += [Import(name, alias.name, where, type_only) for alias in stmt.names]
            continue
        base = stmt.module or ""
        if stmt.level:
            # relative: the importing package, less (level - 1) trailing parts
            package = name.split(".") if is_pkg else name.split(".")[:-1]
            keep = len(package) - (stmt.level - 1)
            base = ".".join(package[:keep] + ([base] if base else []))
        for alias in stmt.names:
            sub = f"{base}.{alias.name}"
            found.append(Import(name, sub if sub in mods else base, where, type_only))
    return found


@cache
def imports() -> tuple[Import, ...]:
    found = []
    for name, path in project_modules().items():
        tree = ast.parse(path.read_text(), filename=str(path))
        found += imports_of(tree, name, path.name == "__init__.py", str(path.relative_to(ROOT)))
    return tuple(found)


def _project_target(target: str) -> str | None:
    """The project module an import refers to (its longest project prefix), if any."""
    mods = project_modules()
    parts = target.split(".")
    for n in range(len(parts), 0, -1):
        cand = ".".join(parts[:n])
        if cand in mods:
            return cand
    return None


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def _shortest_cycle(graph: dict[str, set[str]], comp: list[str]) -> list[str]:
    """One shortest cycle through the component's first module (breadth-first)."""
    start, members = comp[0], set(comp)
    prev: dict[str, str | None] = {start: None}
    queue = [start]
    for v in queue:
        for w in sorted(graph[v] & members):
            if w == start:
                path = [v]
                while prev[path[-1]] is not None:
                    path.append(prev[path[-1]])
                return [*reversed(path), start]
            if w not in prev:
                prev[w] = v
                queue.append(w)
    return comp


def test_every_project_module_parses_and_is_found():
    mods = project_modules()
    for pkg in PACKAGES:
        assert pkg in mods, f"{pkg}/__init__.py not found"
    assert "console.tui.app" in mods and "node.service" in mods
    assert imports(), "no imports found: the parser is broken"


def test_no_import_cycles():
    graph: dict[str, set[str]] = {m: set() for m in project_modules()}
    where: dict[tuple[str, str], str] = {}
    for imp in imports():
        target = _project_target(imp.target)
        if imp.type_only or target is None or target == imp.source:
            continue
        graph[imp.source].add(target)
        where.setdefault((imp.source, target), imp.path)
    cycles = _cycles(graph)
    lines = []
    for comp in cycles:
        cycle = _shortest_cycle(graph, comp)
        steps = ", ".join(f"{a} -> {b} ({where[a, b]})" for a, b in zip(cycle, cycle[1:]))
        inside = sorted(e for e in where if e[0] in comp and e[1] in comp)
        lines.append(f"cycle among {comp}\n  e.g. {steps}\n  every import inside it:\n"
                     + "\n".join(f"    {a} -> {b} ({where[a, b]})" for a, b in inside))
    assert not cycles, "import cycles:\n" + "\n".join(lines)


def test_node_never_imports_console_and_protos_import_neither():
    bad = [f"{i.path}: {i.source} imports {i.target}" for i in imports()
           if (_within(i.source, "node") and _within(i.target, "console"))
           or (_within(i.source, "protos") and (_within(i.target, "node")
                                                 or _within(i.target, "console")))]
    assert not bad, "wrong-way imports:\n" + "\n".join(bad)


def test_only_the_dashboard_imports_textual_or_plotext():
    bad = [f"{i.path}: {i.source} imports {i.target}" for i in imports()
           if i.target.split(".")[0] in UI_LIBRARIES and not _within(i.source, "console.tui")]
    assert not bad, "UI libraries imported outside console/tui/:\n" + "\n".join(bad)


def test_console_uses_only_public_node_modules():
    assert not set(NODE_INTERNALS) & set(CONSOLE_MAY_IMPORT)
    bad = []
    for i in imports():
        target = _project_target(i.target)
        if not _within(i.source, "console") or target is None or not _within(target, "node"):
            continue
        if target not in CONSOLE_MAY_IMPORT:
            kind = "a node internal" if target in NODE_INTERNALS else "not in CONSOLE_MAY_IMPORT"
            bad.append(f"{i.path}: {i.source} imports {target} ({kind})")
    assert not bad, "console reaches into node internals:\n" + "\n".join(bad)


def test_the_allow_list_names_real_modules():
    """Catches a renamed or removed public module."""
    missing = sorted(set(CONSOLE_MAY_IMPORT) - set(project_modules()))
    assert not missing, f"CONSOLE_MAY_IMPORT names modules that do not exist: {missing}"


def test_the_parser_resolves_relative_and_submodule_imports():
    """The resolution rules on a made-up module, so the graph tests can be trusted."""
    src = ("from . import plan\nfrom .plan import GIB\nfrom node import models as m\n"
           "import node.engine\nfrom typing import TYPE_CHECKING\n"
           "def f():\n    from node.pipeline import CHANNEL_OPTIONS\n"
           "if TYPE_CHECKING:\n    from console import cli\n")
    got = [(i.target, i.type_only) for i in imports_of(ast.parse(src), "node.x", False, "x")]
    assert got == [("node.plan", False), ("node.plan", False), ("node.models", False),
                   ("node.engine", False), ("typing", False), ("node.pipeline", False),
                   ("console.cli", True)]
