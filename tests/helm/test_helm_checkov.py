"""checkov on the rendered chart: nothing fails; every suppression is one that docs/operations.md justifies.

checkov does not look inside a RayService (a custom resource), so its head and worker pod templates are
scanned as Pods of their own. checkov runs once per session (it takes several seconds).
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from helm_support import CHECKOV, ROOT, Manifest, one

pytestmark = pytest.mark.integration

Render = Callable[..., list[Manifest]]


def _ray_pods(manifests: list[Manifest]) -> list[Manifest]:
    service = one(manifests, "RayService")
    cluster = service["spec"]["rayClusterConfig"]
    groups = [("head", cluster["headGroupSpec"]["template"])]
    groups += [(g["groupName"], g["template"]) for g in cluster["workerGroupSpecs"]]
    return [
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": f"{service['metadata']['name']}-{name}",
                "namespace": service["metadata"]["namespace"],
                **template["metadata"],
            },
            "spec": template["spec"],
        }
        for name, template in groups
    ]


@pytest.fixture(scope="session")
def checkov_report(
    render: Render, mixed_values: Path, full_values: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("checkov")
    variants = {"default": render(), "mixed": render(mixed_values), "full": render(mixed_values, full_values)}
    for name, manifests in variants.items():
        (folder / f"{name}.yaml").write_text(yaml.safe_dump_all(manifests))
        (folder / f"{name}-ray-pods.yaml").write_text(yaml.safe_dump_all(_ray_pods(manifests)))
    assert CHECKOV.exists(), f"{CHECKOV} is missing: run `bash scripts/install-tools.sh`"
    result = subprocess.run(
        [str(CHECKOV), "-d", str(folder), "--framework", "kubernetes", "--skip-download", "--compact", "-o", "json"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    report = json.loads(result.stdout)
    report = report[0] if isinstance(report, list) else report
    report["returncode"] = result.returncode
    return report


def _documented_skips() -> dict[str, str]:
    text = (ROOT / "docs" / "operations.md").read_text()
    section = text.split("## Security scan: justified skips", 1)[1].split("\n## ", 1)[0]
    return dict(re.findall(r"^\| `(CKV2?_K8S_\d+)` \| (.+?) \|", section, flags=re.M))


def test_checkov_finds_nothing(checkov_report: dict[str, Any]) -> None:
    failed = checkov_report["results"]["failed_checks"]
    assert failed == [], "\n".join(f"{f['check_id']} {f['check_name']}: {f['resource']}" for f in failed)
    assert checkov_report["returncode"] == 0
    summary = checkov_report["summary"]
    assert summary["parsing_errors"] == 0
    assert summary["passed"] > 300 and summary["resource_count"] >= 40


def test_checkov_scanned_the_ray_pods(checkov_report: dict[str, Any]) -> None:
    resources = {c["resource"] for c in checkov_report["results"]["passed_checks"]}
    assert {"Pod.bastion.bastion-gpu-rtx3090", "Pod.bastion.bastion-gpu-h100", "Pod.bastion.bastion-head"} <= resources


def test_every_suppression_is_documented_and_justified(checkov_report: dict[str, Any]) -> None:
    documented = _documented_skips()
    assert documented, "docs/operations.md has no table of justified checkov skips"
    skipped = checkov_report["results"]["skipped_checks"]
    used = {s["check_id"] for s in skipped}
    assert used <= set(documented), f"undocumented suppressions: {used - set(documented)}"
    assert set(documented) <= used, f"documented but unused (remove them): {set(documented) - used}"
    for s in skipped:
        assert len(s["check_result"].get("suppress_comment") or "") > 20, s["check_id"]
    # The digest suppression goes away once images are pinned by digest (the `full` variant).
    digest_skips = {s["resource"] for s in skipped if s["check_id"] == "CKV_K8S_43"}
    assert digest_skips and all(
        "bastion-migrate" in r or "control" in r or "bastion-retention" in r or "Pod." in r for r in digest_skips
    )
    pinned = [c for c in checkov_report["results"]["passed_checks"] if c["check_id"] == "CKV_K8S_43"]
    assert pinned, "with images.*.digest set, CKV_K8S_43 passes"
