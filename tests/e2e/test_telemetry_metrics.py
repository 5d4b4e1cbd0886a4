"""Metrics end to end with the real vLLM CPU engines: the gateway's speculation counters per profile move by
exactly what vLLM's own counters moved over this test's requests, token counters equal the usage returned,
and every dashboard metric is in the live `/metrics` outputs. Read through Serve's proxy, like Prometheus."""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
MODEL = "smollm2-135m"
DASHBOARDS = Path(__file__).resolve().parents[2] / "deploy" / "grafana"
SPEC = {
    "steps": "bastion_speculation_steps_total",
    "draft_tokens": "bastion_speculation_draft_tokens_total",
    "accepted_tokens": "bastion_speculation_accepted_tokens_total",
}
TOKENS = {"prompt": "bastion_prompt_tokens_total", "completion": "bastion_completion_tokens_total"}


def root_url(stack) -> str:
    return stack.base_url.removesuffix("/v1")


def scrape(stack, path: str = "/metrics") -> str:
    from testbed import metrics_headers

    response = httpx.get(f"{root_url(stack)}{path}", headers=metrics_headers(stack.config.data_dir), timeout=60)
    assert response.status_code == 200, response.text[:200]
    assert response.headers["content-type"].startswith("text/plain")
    return response.text


def by_profile(text: str) -> dict[tuple[str, str], float]:
    """(metric, profile) → value summed over tenants and models, for the counters this test follows."""
    wanted = {*SPEC.values(), *TOKENS.values()}
    out: dict[tuple[str, str], float] = defaultdict(float)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name in wanted and s.labels.get("model") == MODEL:
                out[(s.name, s.labels["profile"])] += s.value
    return out


def engine_spec(engine_handles, profile: str) -> dict[str, int]:
    spec = engine_handles[profile].stats.remote().result(timeout_s=60)["speculation"]
    return {"steps": spec["drafts"], "draft_tokens": spec["draft_tokens"], "accepted_tokens": spec["accepted_tokens"]}


def delta(after: dict, before: dict, name: str, profile: str) -> float:
    return after.get((name, profile), 0.0) - before.get((name, profile), 0.0)


def test_speculation_and_token_counters_match_vllm_and_usage(platform_stack, engine_handles) -> None:
    auth = {"Authorization": f"Bearer {platform_stack.token}"}
    gateway_before = by_profile(scrape(platform_stack))
    engine_before = {p: engine_spec(engine_handles, p) for p in ("fast-agentic", "deep-context")}

    sent: dict[str, dict[str, int]] = {p: {"prompt": 0, "completion": 0} for p in ("fast-agentic", "deep-context")}
    prompts = ["List the numbers from 1 to 30, separated by commas.", "a b c d e f g a b c d e f g a b c"]
    with httpx.Client(base_url=platform_stack.base_url, headers=auth, timeout=120) as http:
        for profile in ("fast-agentic", "deep-context"):
            for prompt in prompts:
                body = {
                    "model": f"{MODEL}@{profile}",
                    "messages": [{"role": "user", "content": prompt}],
                    "max_tokens": 24,
                    "temperature": 0,
                }
                answer = http.post("/chat/completions", json=body)
                assert answer.status_code == 200
                usage = answer.json()["usage"]
                sent[profile]["prompt"] += usage["prompt_tokens"]
                sent[profile]["completion"] += usage["completion_tokens"]

                stream_body = {**body, "stream": True, "stream_options": {"include_usage": True}}
                with http.stream("POST", "/chat/completions", json=stream_body) as streamed:
                    assert streamed.status_code == 200
                    events = [line[5:].strip() for line in streamed.iter_lines() if line.startswith("data:")]
                final = json.loads(next(e for e in reversed(events) if e != "[DONE]"))
                sent[profile]["prompt"] += final["usage"]["prompt_tokens"]
                sent[profile]["completion"] += final["usage"]["completion_tokens"]

    # A stream is recorded once its last chunk is relayed, and vLLM logs a step's stats just after it: wait.
    deadline = time.monotonic() + 30
    while True:
        after = by_profile(scrape(platform_stack))
        engine_after = {p: engine_spec(engine_handles, p) for p in ("fast-agentic", "deep-context")}
        tokens_ok = all(delta(after, gateway_before, TOKENS[kind], p) == sent[p][kind] for p in sent for kind in TOKENS)
        spec_ok = all(
            delta(after, gateway_before, SPEC[k], "fast-agentic")
            == engine_after["fast-agentic"][k] - engine_before["fast-agentic"][k]
            for k in SPEC
        )
        if (tokens_ok and spec_ok) or time.monotonic() > deadline:
            break
        time.sleep(0.5)

    for profile in sent:
        for kind in TOKENS:
            assert delta(after, gateway_before, TOKENS[kind], profile) == sent[profile][kind], (profile, kind)
    moved = {k: engine_after["fast-agentic"][k] - engine_before["fast-agentic"][k] for k in SPEC}
    assert moved["draft_tokens"] > 0 and moved["steps"] > 0, moved
    for k in SPEC:
        assert delta(after, gateway_before, SPEC[k], "fast-agentic") == moved[k], (k, moved)
    assert engine_after["deep-context"] == engine_before["deep-context"]  # no speculation on deep-context
    for k in SPEC:
        assert delta(after, gateway_before, SPEC[k], "deep-context") == 0


def _names(text: str) -> set[str]:
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            names.add(line.split()[2])
        elif line and not line.startswith("#"):
            names.add(line.split("{")[0].split(" ")[0])
    return names


def test_engine_metrics_and_dashboards_against_live_outputs(platform_stack) -> None:
    import re

    gateway, engines = scrape(platform_stack), scrape(platform_stack, "/metrics/engines")
    kv = [s for f in text_string_to_metric_families(engines) if f.name == "vllm:kv_cache_usage_perc" for s in f.samples]
    assert {s.labels["upstream"] for s in kv} == {a.name for a in platform_stack.apps}
    # Acceptance drift (engine/mtp/drift.py): speculative replicas only; no baseline stored, so never alerting.
    alerts = [
        s
        for f in text_string_to_metric_families(engines)
        if f.name == "bastion_mtp_acceptance_drift_alert"
        for s in f.samples
    ]
    assert alerts and {s.labels["profile"] for s in alerts} == {"fast-agentic"}
    assert all(s.value == 0 for s in alerts)
    assert "bastion_audit_queue_depth" in gateway and "bastion_upstream_in_flight" in gateway

    live = _names(gateway) | _names(engines)
    suffixes = ("_total", "_bucket", "_sum", "_count", "_created")
    for path in sorted(DASHBOARDS.glob("*.json")):
        board = json.loads(path.read_text())
        exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
        used = {
            n for e in exprs for n in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", e) if n.startswith(("bastion_", "vllm:"))
        }
        missing = []
        for name in used:
            stem = next((name[: -len(s)] for s in suffixes if name.endswith(s)), name)
            if name not in live and stem not in live:
                missing.append(name)
        assert not missing, f"{path.name}: {sorted(missing)}"
