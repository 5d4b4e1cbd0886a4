"""Helpers for the chart tests: paths, a real `helm` (installed by scripts/install-tools.sh), parsing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "bastion"
TOOLS = ROOT / ".tools"
HELM = TOOLS / "bin" / "helm"
KUBERNETES_VALIDATE = TOOLS / "venv" / "bin" / "kubernetes-validate"
CHECKOV = TOOLS / "venv" / "bin" / "checkov"
BASTION = Path(sys.executable).parent / "bastion"
MIXED_POOL = ROOT / "deploy" / "examples" / "mixed-pool.yaml"
PRODUCTION = ROOT / "deploy" / "examples" / "production.yaml"
NAMESPACE = "bastion"
RELEASE = "bastion"

Manifest = dict[str, Any]


def _require(tool: Path) -> Path:
    # A missing tool is a failure, not a skip: `make test` installs them (scripts/install-tools.sh).
    assert tool.exists(), f"{tool} is missing: run `bash scripts/install-tools.sh`"
    return tool


def run_helm(*args: str, values: list[Path] | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = [str(_require(HELM)), *args]
    for file in values or []:
        cmd += ["-f", str(file)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False, cwd=ROOT)
    if check:
        assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stderr}"
    return result


def chart_values(platform_file: Path, out: Path) -> Path:
    """`bastion helm values` for this chart, as an operator runs it; the values file it wrote."""
    cmd = [str(BASTION), "helm", "values", "--config", str(platform_file), "--chart", str(CHART), "--out", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    return out


def template(values: list[Path] | None = None, *extra: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run_helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, *extra, values=values, check=check)


def parse(text: str) -> list[Manifest]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def find(manifests: list[Manifest], kind: str, name: str | None = None) -> list[Manifest]:
    return [m for m in manifests if m["kind"] == kind and (name is None or m["metadata"]["name"] == name)]


def one(manifests: list[Manifest], kind: str, name: str | None = None) -> Manifest:
    found = find(manifests, kind, name)
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]
