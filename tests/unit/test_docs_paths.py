"""The documentation names files and modules that exist: every `gateway/app.py`-style path and every
`bastion.x.y` dotted name in docs/ and README.md resolves in the source tree (renames cannot leave stale docs)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "platform" / "bastion"
PARTS = (
    "cli|commandline|records|errors|config|db|tenancy|audit|engine|pool|routing|gateway|control|serve|telemetry|bench"
)
FILE_PATH = re.compile(rf"(?<![\w./-])(?:platform/bastion/)?((?:{PARTS})(?:/\w+)*\.py)\b")
DOTTED = re.compile(rf"\bbastion(\.(?:{PARTS})(?:\.\w+)*)")


def _documents() -> list[Path]:
    return [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]


def _defines(module: Path, name: str) -> bool:
    text = module.read_text()
    return re.search(rf"^(?:async def|def|class) {name}\b|^{name}\b.*=|import .*\b{name}\b", text, re.M) is not None


def dotted_resolves(dotted: str) -> bool:
    """`bastion.a.b.c`: the longest prefix that is a module or package, then at most one name defined in it."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        base = PACKAGE.joinpath(*parts[:cut])
        module = base.with_suffix(".py") if base.with_suffix(".py").is_file() else base / "__init__.py"
        if module.is_file():
            rest = parts[cut:]
            return not rest or (len(rest) <= 2 and _defines(module, rest[0]))
    return False


def stale_references(documents: list[Path]) -> list[str]:
    out = []
    for doc in documents:
        for number, line in enumerate(doc.read_text().splitlines(), 1):
            for match in FILE_PATH.finditer(line):
                path = match.group(1)
                if "/" in path and not (PACKAGE / path).is_file():
                    out.append(f"{doc.name}:{number}: {path}")
            for match in DOTTED.finditer(line):
                if not dotted_resolves(match.group(1).lstrip(".")):
                    out.append(f"{doc.name}:{number}: bastion{match.group(1)}")
    return out


def test_docs_name_files_and_modules_that_exist() -> None:
    stale = stale_references(_documents())
    assert not stale, "stale references:\n" + "\n".join(stale)


def test_a_renamed_file_is_caught(tmp_path: Path) -> None:
    doc = tmp_path / "old.md"
    doc.write_text(
        "See `gateway/upstream.py` and `bastion.gateway.testing.ScriptedEngine`; `gateway/app.py` is fine.\n"
    )
    assert stale_references([doc]) == [
        "old.md:1: gateway/upstream.py",
        "old.md:1: bastion.gateway.testing.ScriptedEngine",
    ]
