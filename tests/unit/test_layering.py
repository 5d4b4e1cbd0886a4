"""The dependency rule from ARCHITECTURE.md, checked on the source: no upward import, no import cycle.

What counts as an import: every `import` statement in a module, wherever it is written: at module level,
inside a function (a lazy import still couples the two modules, and a function-local import is the usual way a
cycle is hidden), and under `if TYPE_CHECKING:` (type-only, but the modules still depend on each other: the fix
is a shared lower module, not a hidden import). Absolute and relative imports both count; `from bastion.x import
y` is an edge to module `bastion.x.y` when y is a module, else to `bastion.x`. Not counted: the implicit import
of a package's `__init__` when one of its modules is imported, and dotted paths in strings (Ray's setup hook).

The rule as written (ARCHITECTURE.md, "Dependency rule"): `cli` and `serve` compose everything; `gateway` and
`control` use the domain packages (`tenancy`, `audit`, `routing`, `pool`) and `telemetry`; domain packages use
`db` and `config`, never `gateway`, `control` or `serve`; `engine` knows nothing of tenants, HTTP auth or the
database; benchmarks and test doubles (`bench`) are imported by no domain; no import cycles. `ALLOWED` is that
rule per top-level part; `test_allowed_table_follows_the_written_rule` checks the table against the prose, so
widening it to let an import through fails too.
"""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit
PACKAGE = Path(__file__).resolve().parents[2] / "platform" / "bastion"

# Any part may import these: the request record every layer reads, and stopping background tasks (a Python 3.11
# cancellation pitfall, background.py). They import nothing of Bastion's.
ANYONE = {"records", "background"}
BOTTOM = {"errors", "config", "db", "commandline"} | ANYONE  # commandline: the --config option and console
DOMAIN = {"tenancy", "audit", "routing", "pool"}
COMPOSERS = {"cli", "serve"}

# What each part may import from Bastion (besides itself). Anything not listed is forbidden.
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "records": set(),
    "background": set(),
    "commandline": set(),
    "config": {"errors"},
    "db": {"config", "errors"},
    "engine": {"config", "errors", "commandline"},
    "pool": {"config", "errors", "db", "commandline"},
    "tenancy": {"config", "errors", "db", "commandline"},
    "audit": {"config", "errors", "db", "commandline"},
    "routing": {"config", "errors", "db", "pool"},
    "telemetry": {"config", "errors"},
    "gateway": {"config", "errors", "db", "tenancy", "audit", "routing", "pool", "telemetry"},
    "control": {"config", "errors", "db", "tenancy", "audit", "routing", "pool", "telemetry", "commandline"},
    "serve": {
        "config",
        "errors",
        "db",
        "engine",
        "tenancy",
        "audit",
        "routing",
        "pool",
        "telemetry",
        "gateway",
    },
    "bench": {
        "commandline",
        "config",
        "errors",
        "db",
        "engine",
        "tenancy",
        "audit",
        "routing",
        "pool",
        "telemetry",
        "gateway",
        "serve",
    },
    "cli": {"*"},
    "__init__": set(),
}


# --- the import graph -------------------------------------------------------------------------------


def module_names(root: Path) -> dict[str, Path]:
    """Every module of the package at `root` by dotted name (a package by its own name, for its `__init__`)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = [root.name, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _nearest(name: str, modules: dict[str, Path]) -> str | None:
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that `module` imports, from every import statement in it (see the docstring)."""
    root = next(iter(modules)).split(".")[0]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            if target == root or target.startswith(root + "."):
                resolved = _nearest(target, modules)
                if resolved is not None and resolved != module:
                    found.add(resolved)
    return found


def import_graph(root: Path) -> dict[str, set[str]]:
    modules = module_names(root)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each group of modules that import each other, directly or around a loop (Tarjan's strongly connected
    components, iterative), as one cycle path through the group, sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.add(member)
                    if member == node:
                        break
                if len(group) > 1:
                    groups.append(group)
    return sorted(_cycle_path(graph, group) for group in groups)


def _cycle_path(graph: dict[str, set[str]], group: set[str]) -> list[str]:
    """One loop through a strongly connected group, from its first module back to it (breadth-first, shortest)."""
    first = min(group)
    previous: dict[str, str] = {}
    frontier = [first]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(graph[node] & group):
                if child == first:
                    path = [node]
                    while path[-1] != first:
                        path.append(previous[path[-1]])
                    return [first, *reversed(path[:-1]), first]
                if child not in previous:
                    previous[child] = node
                    following.append(child)
        frontier = following
    raise AssertionError(f"no loop through {sorted(group)}")


def rule_violations(graph: dict[str, set[str]], allowed: dict[str, set[str]]) -> list[str]:
    out = []
    for module, imported in sorted(graph.items()):
        parts = module.split(".")
        part = parts[1] if len(parts) > 1 else "__init__"
        permitted = allowed.get(part)
        if permitted is None:
            out.append(f"{module}: new top-level part {part!r}; add it to ALLOWED")
            continue
        if "*" in permitted:
            continue
        for target in sorted(imported):
            target_part = target.split(".")[1] if "." in target else "__init__"
            if target_part != part and target_part not in permitted | ANYONE:
                out.append(f"{module} imports {target}")
    return out


# --- the tree -------------------------------------------------------------------------------------------


def test_dependency_rule() -> None:
    violations = rule_violations(import_graph(PACKAGE), ALLOWED)
    assert not violations, "\n".join(violations)


def test_no_import_cycles() -> None:
    cycles = find_cycles(import_graph(PACKAGE))
    assert not cycles, "import cycles:\n" + "\n".join(" → ".join(c) for c in cycles)


def test_allowed_table_follows_the_written_rule() -> None:
    parts = {p.name.removesuffix(".py") for p in PACKAGE.iterdir() if p.suffix == ".py" or (p / "__init__.py").exists()}
    assert parts == set(ALLOWED), f"parts without a rule or rules without a part: {parts ^ set(ALLOWED)}"
    for part, permitted in ALLOWED.items():
        if part in COMPOSERS or part == "bench":
            continue
        assert "bench" not in permitted and "cli" not in permitted, f"{part} may import a benchmark or the CLI"
    for part in DOMAIN | {"telemetry"}:
        assert not ALLOWED[part] & {"gateway", "control", "serve", "engine"}, f"domain {part} reaches up"
        assert ALLOWED[part] <= BOTTOM | DOMAIN, f"{part} uses more than db, config and the domains"
    for part in ("gateway", "control"):
        assert ALLOWED[part] <= BOTTOM | DOMAIN | {"telemetry"}, f"{part} uses more than the domains and telemetry"
    assert not ALLOWED["engine"] & ({"db", "gateway", "control", "serve"} | DOMAIN), "engine knows of tenants or DB"
    assert not ALLOWED["gateway"] & {"control", "serve", "engine"}, "the gateway's only seam to engines is its client"
    for part in BOTTOM:
        assert ALLOWED[part] <= BOTTOM, f"bottom part {part} reaches up"
    for part in ANYONE:
        assert not ALLOWED[part], f"{part} is imported by every part: it may import nothing of Bastion's"
    composers_only = {p for p, permitted in ALLOWED.items() if "serve" in permitted or "*" in permitted}
    assert composers_only <= COMPOSERS | {"bench"}, f"only cli and bench may use serve: {composers_only}"


# Query builders: a module importing one writes SQL. The front ends (gateway, control) read and change data
# through the domain services (tenancy, audit), which own the queries.
SQL_BUILDERS = {"select", "insert", "update", "delete", "func", "text", "and_", "or_"}


def sql_in(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "sqlalchemy":
            if node.module.startswith("sqlalchemy.dialects"):
                found.add(node.module)
            found |= {alias.name for alias in node.names} & SQL_BUILDERS
    return found


def test_front_ends_write_no_sql() -> None:
    offenders = [
        f"{path.relative_to(PACKAGE)}: {sorted(found)}"
        for part in ("gateway", "control")
        for path in sorted((PACKAGE / part).rglob("*.py"))
        if (found := sql_in(path))
    ]
    assert not offenders, "SQL outside the domain services:\n" + "\n".join(offenders)


# --- the test of the test: a small synthetic package ------------------------------------------------------


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "bastion"
    for rel, text in {"__init__.py": "", **files}.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


@pytest.mark.parametrize(
    "b_text",
    [
        "from bastion.low.a import thing\n",  # module level
        "def later():\n    from bastion.low import a\n",  # function-local
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from bastion.low.a import Thing\n",  # type-only
        "from . import a\n",  # relative
        "import bastion.low.a as a\n",
    ],
    ids=["module-level", "function-local", "type-checking", "relative", "import-as"],
)
def test_a_cycle_is_found_however_it_is_written(tmp_path: Path, b_text: str) -> None:
    root = _package(
        tmp_path,
        {"low/__init__.py": "", "low/a.py": "from bastion.low.b import other\n", "low/b.py": b_text, "low/c.py": ""},
    )
    assert find_cycles(import_graph(root)) == [["bastion.low.a", "bastion.low.b", "bastion.low.a"]]


def test_a_longer_cycle_and_an_acyclic_package(tmp_path: Path) -> None:
    looped = _package(
        tmp_path / "one",
        {
            "x.py": "import bastion.y\n",
            "y.py": "from bastion import z\n",
            "z.py": "def f():\n    import bastion.x\n",
            "w.py": "import bastion.x\n",
        },
    )
    assert find_cycles(import_graph(looped)) == [["bastion.x", "bastion.y", "bastion.z", "bastion.x"]]
    acyclic = _package(tmp_path / "two", {"x.py": "import bastion.y\n", "y.py": "import bastion.z\n", "z.py": ""})
    assert find_cycles(import_graph(acyclic)) == []


def test_a_query_is_found(tmp_path: Path) -> None:
    module = tmp_path / "view.py"
    module.write_text("from sqlalchemy import func, select\nfrom sqlalchemy.ext.asyncio import AsyncEngine\n")
    assert sql_in(module) == {"func", "select"}


def test_an_upward_import_is_a_violation(tmp_path: Path) -> None:
    root = _package(
        tmp_path,
        {
            "tenancy/__init__.py": "",
            "tenancy/key_material.py": "def f():\n    from bastion.gateway import app\n",
            "gateway/__init__.py": "",
            "gateway/app.py": "from bastion.tenancy import keys\n",
            "audit/__init__.py": "",
            "audit/x.py": "from bastion import bench\n",
            "bench/__init__.py": "",
        },
    )
    assert rule_violations(import_graph(root), ALLOWED) == [
        "bastion.audit.x imports bastion.bench",
        "bastion.tenancy.key_material imports bastion.gateway.app",
    ]
