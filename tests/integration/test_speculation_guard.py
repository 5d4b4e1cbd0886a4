"""The speculation correctness guard on the real vLLM CPU engine: it catches vLLM's CPU rejection-sampler bug
(vllm#55005) that Bastion's plugin (engine/vllm_plugin.py) fixes.

- plugin switched off (test-only BASTION_TEST_DISABLE_VLLM_CPU_FIX): config refuses the known-bad row; accepted
  anyway, the replica fails its pre-ready canary round and refuses every request;
- plugin on: the replica passes and serves; the fix switched off in the running worker
  (`bastion_set_cpu_fix(False)`), it leaves routing within one canary round.

The shipped fast-agentic profile (MTP k = 1 since the plugin; ngram is caught the same way, docs/engine.md) on
the bundled SmolLM2 in float32; canaries of 32 tokens.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from testbed import engine_test_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]
INTERVAL_S = 3.0
DISABLE = "BASTION_TEST_DISABLE_VLLM_CPU_FIX"
CHAT = {"messages": [{"role": "user", "content": "Name three colors."}], "max_tokens": 8, "temperature": 0.7}


def _config(tmp: Path, engine: dict[str, Any]):
    from bastion.config import Settings, load_config

    path = engine_test_config(tmp)
    data = yaml.safe_load(path.read_text())
    data["engine"] = {"guard_interval_s": INTERVAL_S, **engine}
    path.write_text(yaml.safe_dump(data))
    return load_config(path, Settings())


def _fast(config) -> Any:
    return next(d for d in config.deployments if d.profile == "fast-agentic")


@pytest.fixture(scope="module")
def golden(bundled_model: Path, tmp_path_factory: pytest.TempPathFactory):
    """The float32 golden record (shared with the platform tests: same model, dtype, canaries and build)."""
    from testbed import guard_golden

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    config = _config(tmp_path_factory.mktemp("guard-golden"), {})
    guard_golden(config)
    return config


def test_known_bad_refused_while_the_fix_is_off(golden, monkeypatch: pytest.MonkeyPatch) -> None:
    from bastion.engine.engine_args import engine_spec
    from bastion.errors import EngineConfigError

    monkeypatch.setenv(DISABLE, "1")
    with pytest.raises(EngineConfigError, match=r"cpu-expand-kernel.*vllm#55005"):
        engine_spec(golden, _fast(golden))


@pytest.mark.timeout(240)
async def test_without_the_fix_the_replica_fails_its_self_check_and_takes_no_traffic(
    golden, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bastion.engine.engine_args import engine_spec
    from bastion.engine.replica import EngineReplica, SpeculationGuardFailed

    monkeypatch.setenv(DISABLE, "1")  # read by the spawned EngineCore and worker at start
    config = _config(tmp_path, {"allow_known_bad": ["cpu-expand-kernel"]})
    replica = await EngineReplica.create(engine_spec(config, _fast(config)))
    try:
        verdict = replica.guard.last
        assert verdict is not None and not verdict.ok, verdict
        assert verdict.trigger == "start"
        assert not replica.routable and replica.stats()["routable"] is False
        assert replica.stats()["guard"]["state"] == "failed"
        with pytest.raises(SpeculationGuardFailed):
            await replica.complete("chat", CHAT)
        with pytest.raises(SpeculationGuardFailed):
            async for _ in replica.stream("chat", CHAT):
                pass
        assert 'bastion_speculation_guard_ok{model="smollm2-135m",profile="fast-agentic"} 0' in replica.metrics()
        print("without the fix:", verdict.line())
    finally:
        await replica.drain(5)


@pytest.mark.timeout(240)
async def test_with_the_fix_it_serves_and_leaves_routing_within_one_round_when_switched_off(
    golden, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bastion.engine.engine_args import engine_spec
    from bastion.engine.replica import EngineReplica, SpeculationGuardFailed

    monkeypatch.delenv(DISABLE, raising=False)
    config = _config(tmp_path, {})
    replica = await EngineReplica.create(engine_spec(config, _fast(config)))
    try:
        verdict = replica.guard.last
        assert verdict is not None and verdict.ok, verdict.line()
        assert replica.routable
        status, body = await replica.complete("chat", CHAT)
        assert status == 200 and body["choices"][0]["message"]["content"]
        print("with the fix:", verdict.line())

        switched = await replica.engine.collective_rpc("bastion_set_cpu_fix", args=(False,))
        assert switched == [False]  # the worker now runs vLLM's own (broken) fallback
        off_at = time.monotonic()
        round_s = verdict.seconds
        # the next round starts within the interval; a failed round is confirmed by one more
        deadline = off_at + INTERVAL_S + 2 + 4 * max(round_s, 5)
        while replica.routable and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        left_after = time.monotonic() - off_at
        assert not replica.routable, f"still routable {left_after:.1f} s after the fix was switched off"
        failed = replica.guard_failed
        assert failed is not None and failed.trigger == "interval"
        print(f"switched off: left routing after {left_after:.1f} s:", failed.line())
        with pytest.raises(SpeculationGuardFailed):
            await replica.complete("chat", CHAT)
    finally:
        await replica.drain(5)
