"""From the platform file to vLLM engine arguments: speculation per profile, and MTP misuse fails loudly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from bastion.config import Settings, load_config
from bastion.engine.replica import EngineReplica
from bastion.engine.spec import WORKER_EXTENSION, engine_spec, mtp_layers
from bastion.engine.speculation import SpeculationStats, engine_totals
from bastion.errors import EngineConfigError

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]


def _config(tmp_path: Path, **profile_changes: dict):
    data = yaml.safe_load((ROOT / "deploy/local/bastion.yaml").read_text())
    data["data_dir"] = str(tmp_path)
    for name, change in profile_changes.items():
        data["profiles"][name.replace("_", "-")].update(change)
    path = tmp_path / "platform.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_config(path, Settings())


def _fake_model(tmp_path: Path, **config: object) -> Path:
    folder = tmp_path / "models" / "smollm2-135m"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], **config}))
    return folder


def test_profiles_map_to_vllm_speculative_config(tmp_path: Path) -> None:
    _fake_model(tmp_path, num_nextn_predict_layers=1)  # what `models prepare` builds: the shipped head grafted
    config = _config(tmp_path)
    fast, deep = (engine_spec(config, d) for d in sorted(config.deployments, key=lambda d: d.profile != "fast-agentic"))
    assert fast.engine_kwargs["speculative_config"] == {"method": "mtp", "num_speculative_tokens": 1}
    assert fast.engine_kwargs["per_request_spec_decode_metrics"] == "summary"
    assert fast.max_model_len == 2048  # the profile's max_context caps the model's 8192
    assert "speculative_config" not in deep.engine_kwargs
    assert deep.max_model_len == 8192  # SmolLM2-135M's whole context
    assert fast.engine_kwargs["worker_extension_cls"] == deep.engine_kwargs["worker_extension_cls"] == WORKER_EXTENSION
    assert deep.engine_kwargs["model"] == str(tmp_path / "models" / "smollm2-135m")
    assert deep.engine_kwargs["enforce_eager"] is True


def test_mtp_on_a_model_without_mtp_layers_names_model_and_profile(tmp_path: Path) -> None:
    _fake_model(tmp_path)
    config = _config(tmp_path, fast_agentic={"speculative": {"method": "mtp", "num_speculative_tokens": 1}})
    dep = next(d for d in config.deployments if d.profile == "fast-agentic")
    with pytest.raises(EngineConfigError) as err:
        engine_spec(config, dep)
    message = str(err.value)
    assert "profile fast-agentic" in message and "model smollm2-135m" in message and "no MTP layers" in message


def test_mtp_on_a_grafted_checkpoint_is_accepted(tmp_path: Path) -> None:
    folder = _fake_model(tmp_path, num_nextn_predict_layers=1)
    assert mtp_layers(folder) == 1
    config = _config(tmp_path, fast_agentic={"speculative": {"method": "mtp", "num_speculative_tokens": 2}})
    dep = next(d for d in config.deployments if d.profile == "fast-agentic")
    assert engine_spec(config, dep).engine_kwargs["speculative_config"] == {
        "method": "mtp",
        "num_speculative_tokens": 2,
    }


def test_replica_preflight_refuses_mtp_without_layers(tmp_path: Path) -> None:
    folder = _fake_model(tmp_path, num_nextn_predict_layers=1)
    config = _config(tmp_path, fast_agentic={"speculative": {"method": "mtp", "num_speculative_tokens": 1}})
    dep = next(d for d in config.deployments if d.profile == "fast-agentic")
    spec = engine_spec(config, dep)
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))  # head removed since
    replica = EngineReplica(spec.__class__(**{**spec.__dict__, "verify_manifest": False}))
    with pytest.raises(EngineConfigError, match="no MTP layers"):
        replica.preflight()


def test_engine_args_from_profile_override_defaults(tmp_path: Path) -> None:
    config = _config(tmp_path, deep_context={"engine_args": {"enforce_eager": False, "max_num_seqs": 8}})
    dep = next(d for d in config.deployments if d.profile == "deep-context")
    kwargs = engine_spec(config, dep).engine_kwargs
    assert kwargs["enforce_eager"] is False and kwargs["max_num_seqs"] == 8


def test_per_request_stats_from_histogram() -> None:
    stats = SpeculationStats.from_response_metrics(
        {
            "acceptance_histogram": [32, 3, 6, 0],
            "num_spec_steps": 41,
            "num_accepted_draft_tokens": 15,
            "num_draft_tokens": 123,
        }
    )
    # position 0 accepted whenever a step accepted >= 1 draft (3 + 6), position 1 when >= 2 (6), position 2 never
    assert stats.accepted_per_position == [9, 6, 0]
    assert stats.acceptance_rate == pytest.approx(15 / 123)
    assert stats.mean_acceptance_length == pytest.approx(1 + 15 / 41)
    assert SpeculationStats.from_response_metrics(None) is None


def test_engine_totals_sum_vllm_counters() -> None:
    from vllm.v1.metrics.reader import Counter, Vector

    snapshot = [
        Counter(name="vllm:spec_decode_num_drafts", labels={}, value=10),
        Counter(name="vllm:spec_decode_num_draft_tokens", labels={}, value=30),
        Counter(name="vllm:spec_decode_num_accepted_tokens", labels={}, value=12),
        Vector(name="vllm:spec_decode_num_accepted_tokens_per_pos", labels={}, values=[8, 3, 1]),
        Counter(name="vllm:prompt_tokens", labels={}, value=999),
    ]
    totals = engine_totals(snapshot)
    assert (totals.drafts, totals.draft_tokens, totals.accepted_tokens) == (10, 30, 12)
    assert totals.accepted_per_position == [8, 3, 1]
    assert totals.per_position_rates() == [0.8, 0.3, 0.1]
