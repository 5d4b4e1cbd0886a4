"""The vLLM CPU plugin (engine/vllm_plugin.py): the expansion, its installation and the seeded-prefill rewind."""

from __future__ import annotations

import tomllib
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from bastion.engine import vllm_plugin
from bastion.engine.spec import WORKER_EXTENSION

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
CU = torch.tensor([1, 3, 4], dtype=torch.int32)


@pytest.fixture
def fresh_plugin(monkeypatch: pytest.MonkeyPatch) -> Any:
    """vLLM's own fallback in cpu_triton_utils and a plugin that has not run yet; both restored afterwards."""
    from vllm.utils import cpu_triton_utils as cpu_tl

    original = vllm_plugin._State.original_expand or cpu_tl._expand_kernel_impl
    monkeypatch.setattr(cpu_tl, "_expand_kernel_impl", original)
    monkeypatch.setattr(vllm_plugin._State, "original_expand", None)
    monkeypatch.setattr(vllm_plugin._State, "expand_fix_on", True)
    monkeypatch.delenv(vllm_plugin.DISABLE_ENV, raising=False)
    return cpu_tl


def _expand_with_vllm(values: torch.Tensor, replace_to: int) -> torch.Tensor:
    """vLLM's own expand_batch_to_tokens, with the platform's fallbacks registered as the engine registers them."""
    from vllm.platforms import current_platform
    from vllm.v1.sample import rejection_sampler

    current_platform.import_kernels()
    current_platform.register_triton_kernel_overrides()
    return rejection_sampler.expand_batch_to_tokens(values, CU, 4, replace_from=0, replace_to=replace_to)


def test_the_expansion_keeps_the_callers_dtype_and_values() -> None:
    temps = torch.empty(4, dtype=torch.float32)
    vllm_plugin._expand_kernel_impl(temps, torch.tensor([0.7, 0.0, 1.3]), CU, 0, 1, MAX_NUM_TOKENS=4)
    assert temps.dtype == torch.float32
    assert torch.allclose(temps, torch.tensor([0.7, 1.0, 1.0, 1.3]))
    top_k = torch.empty(4, dtype=torch.int32)
    vllm_plugin._expand_kernel_impl(top_k, torch.tensor([50, 0, 5], dtype=torch.int32), CU, 0, 0, 4)
    assert top_k.dtype == torch.int32 and top_k.tolist() == [50, 0, 0, 5]
    top_p = torch.empty(4, dtype=torch.float32)
    vllm_plugin._expand_kernel_impl(top_p, torch.tensor([0.9, 0.0, 0.5]), CU, 0, 1, 4)
    assert torch.allclose(top_p, torch.tensor([0.9, 1.0, 1.0, 0.5]))


def test_register_replaces_the_broken_fallback_in_vllms_sampler(fresh_plugin: Any) -> None:
    assert not vllm_plugin.expansion_is_correct(fresh_plugin._expand_kernel_impl), "vLLM's fallback is fixed: drop it"
    vllm_plugin.register()
    assert fresh_plugin._expand_kernel_impl is vllm_plugin._expand_kernel_impl
    assert torch.allclose(_expand_with_vllm(torch.tensor([0.7, 0.0, 1.3]), 1), torch.tensor([0.7, 1.0, 1.0, 1.3]))
    assert _expand_with_vllm(torch.tensor([50, 0, 5], dtype=torch.int32), 0).tolist() == [50, 0, 0, 5]
    vllm_plugin.register()  # vLLM may call it again in the same process
    assert vllm_plugin._State.original_expand is not vllm_plugin._expand_kernel_impl


def test_the_worker_toggle_switches_back_to_vllms_fallback(fresh_plugin: Any) -> None:
    vllm_plugin.register()
    control = vllm_plugin.WorkerControl()
    assert control.bastion_set_cpu_fix(False) is False
    assert not vllm_plugin.expansion_is_correct(vllm_plugin._expand_kernel_impl)
    assert control.bastion_set_cpu_fix(True) is True
    assert vllm_plugin.expansion_is_correct(vllm_plugin._expand_kernel_impl)


def test_a_correct_fallback_is_left_alone(fresh_plugin: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    def fixed_release(output: Any, input_val: Any, cu: Any, replace_from: Any, replace_to: Any, n: Any = None) -> None:
        vllm_plugin._expand(output, input_val, cu, replace_from, replace_to)

    monkeypatch.setattr(fresh_plugin, "_expand_kernel_impl", fixed_release)
    vllm_plugin.register()
    assert fresh_plugin._expand_kernel_impl is fixed_release
    assert vllm_plugin.WorkerControl().bastion_set_cpu_fix(True) is False  # nothing of ours in force


def test_the_test_switch_leaves_the_broken_fallback(fresh_plugin: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(vllm_plugin.DISABLE_ENV, "1")
    broken = fresh_plugin._expand_kernel_impl
    vllm_plugin.register()
    assert fresh_plugin._expand_kernel_impl is broken


def test_the_plugin_is_declared_and_every_replica_loads_the_toggle() -> None:
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["vllm.general_plugins"]
    assert declared == {"bastion_cpu_expand_fix": "bastion.engine.vllm_plugin:register"}
    installed = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert installed.get("bastion_cpu_expand_fix") == "bastion.engine.vllm_plugin:register", "reinstall: pip install -e"
    module, cls = WORKER_EXTENSION.rsplit(".", 1)
    assert module == vllm_plugin.__name__ and hasattr(vllm_plugin, cls)


class _Batch:
    def __init__(self, generators: dict[int, torch.Generator], discard: list[bool]) -> None:
        self.generators = generators
        self.num_reqs = len(discard)
        self.mask = np.array(discard)


class _Runner:
    """The two steps of vLLM's GPUModelRunner the rewind spans, as 0.32 writes them."""

    def __init__(self, batch: _Batch) -> None:
        self.input_batch = batch
        self.discard_request_mask = type("Buf", (), {"np": batch.mask})()

    def _sample(self) -> list[float]:
        return [torch.rand(1, generator=g).item() for g in self.input_batch.generators.values()]

    def _bookkeeping_sync(self) -> None:
        for i in np.nonzero(self.discard_request_mask.np[: self.input_batch.num_reqs])[0]:
            gen = self.input_batch.generators.get(int(i))
            if gen is not None:
                gen.set_offset(gen.get_offset() - 4)


def test_a_discarded_seeded_sample_draws_nothing_and_does_not_crash() -> None:
    def batch() -> _Batch:
        return _Batch({0: torch.Generator().manual_seed(1), 1: torch.Generator().manual_seed(2)}, [False, True])

    broken = _Runner(batch())
    broken._sample()
    with pytest.raises(RuntimeError, match="does not use offset"):
        broken._bookkeeping_sync()

    class Fixed(_Runner):
        pass

    vllm_plugin.wrap_runner(Fixed)
    runner = Fixed(batch())
    first = runner._sample()
    runner._bookkeeping_sync()
    second = runner._sample()
    assert set(runner.input_batch.generators) == {0, 1}
    assert second[1] == first[1]  # the partial prefill's draw was given back
    assert second[0] != first[0]  # a sample that counts advances its generator
