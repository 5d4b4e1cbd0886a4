"""`bastion bench e2e` with tiny numbers in the session's Ray Serve: every path answers without errors, the
report has its shape (figures, ratios, CPU per process group), and Bastion wrote one audit row per request.
The figures themselves go to docs/benchmarks.md from a full run."""

from __future__ import annotations

from pathlib import Path

import pytest

from bastion.bench.gateway_http import find_litellm

pytestmark = [pytest.mark.integration, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]


def _check_phase(phase: dict, levels: list[int], paths: set[str], reference: str) -> None:
    assert [level["concurrency"] for level in phase["levels"]] == levels
    for level in phase["levels"]:
        assert set(level["paths"]) == paths
        for name, f in level["paths"].items():
            assert f["requests"] > 0 and f["errors"] == 0, (name, f["error_kinds"])
            assert 0 < f["ttft_ms"]["p50"] <= f["ttft_ms"]["p99"] <= f["stream_ms"]["p99"], name
            assert f["requests_per_s"] > 0 and f["tokens_per_s"] > 0 and f["decode_tok_s_p50"] > 0, name
            assert f["cpu_ms_per_request"].get("client", 0) > 0, name  # the client always spends CPU
            assert "request_ids" not in f
        assert set(level["ratios"]) == paths - {reference}
        assert level["ratios"]["bastion"][f"req_s_vs_{reference}"] > 0
    assert phase["audit"]["rows"] == phase["audit"]["requests"] > 0


@pytest.mark.timeout(600)
def test_bench_e2e_every_path_answers(ray_cluster: None, bundled_model: Path, tmp_path: Path) -> None:
    from bastion.bench.e2e import E2eOptions, run_e2e
    from bastion.bench.e2e_report import markdown
    from testbed import SERVE_PORT

    opts = E2eOptions(
        concurrency=(1, 4),
        requests=8,
        seconds=3,
        rounds=2,
        tokens=4,
        real_concurrency=(2,),
        real_requests=2,
        real_seconds=20,
        real_tokens=8,
    )
    config = REPO / "deploy" / "local" / "bastion.yaml"
    result = run_e2e(tmp_path, config, opts, port=SERVE_PORT, start=False, route_prefix="/bench-e2e")

    scripted, real = result["scripted"], result["real"]
    with_litellm = find_litellm() is not None
    paths = {"direct", "bastion"} | ({"litellm"} if with_litellm else set())
    _check_phase(scripted, [1, 4], paths, "direct")
    bastion_cpu = scripted["levels"][-1]["paths"]["bastion"]["cpu_ms_per_request"]
    assert bastion_cpu.get("gateway replica", 0) > 0 and bastion_cpu.get("serve proxy", 0) > 0, bastion_cpu
    direct_cpu = scripted["levels"][-1]["paths"]["direct"]["cpu_ms_per_request"]
    assert direct_cpu.get("scripted engine server", 0) > 0, direct_cpu
    _check_phase(real, [2], {"vllm", "bastion"}, "vllm")
    assert real["levels"][0]["paths"]["vllm"]["tokens_per_request"] == 8  # ignore_eos: every answer is full
    assert real["levels"][0]["paths"]["bastion"]["tokens_per_request"] == 8
    assert real["engine_args"]["enforce_eager"] is True and real["env"]["VLLM_CPU_OMP_THREADS_BIND"]

    table = markdown(result)
    assert "### scripted" in table and "### real" in table and "| 4 | bastion |" in table
    if with_litellm:
        assert "| 4 | litellm |" in table and scripted["levels"][0]["ratios"]["bastion"]["req_s_vs_litellm"] > 0
    else:
        assert scripted["litellm"].startswith("not installed")
