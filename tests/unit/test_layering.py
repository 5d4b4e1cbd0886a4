"""The dependency rule from ARCHITECTURE.md, checked on the source: no upward imports, no cycles."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit
PACKAGE = Path(__file__).resolve().parents[2] / "platform" / "bastion"

# What each part may import from Bastion (besides itself). Anything not listed is forbidden.
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "background": set(),  # stopping background tasks (a Python 3.11 cancellation pitfall): any part may use it
    "commandline": set(),  # the --config option, console and progress bar every command module shares
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
    "serve": {"config", "errors", "db", "engine", "tenancy", "audit", "routing", "pool", "telemetry", "gateway"},
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


def _part(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0].removesuffix(".py")


def _bastion_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "bastion" and len(parts) > 1:
                found.add(parts[1])
    return found


def test_dependency_rule() -> None:
    violations = []
    for path in sorted(PACKAGE.rglob("*.py")):
        part = _part(path)
        allowed = ALLOWED.get(part)
        assert allowed is not None, f"{path.relative_to(PACKAGE)}: new top-level part {part!r}; add it to ALLOWED"
        if "*" in allowed:
            continue
        for imported in _bastion_imports(path) - {part, "background"}:
            if imported not in allowed:
                violations.append(f"{path.relative_to(PACKAGE)} imports bastion.{imported}")
    assert not violations, "\n".join(violations)
