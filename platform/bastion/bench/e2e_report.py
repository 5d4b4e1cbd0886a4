"""The Markdown tables of `bastion bench e2e` (bench/e2e.py): per phase, every path's figures at every level,
the ratios the issue's goals are read on, and where each path's CPU goes."""

from __future__ import annotations

from typing import Any


def _v(value: Any) -> str:
    return "-" if value is None else str(value)


def _phase(name: str, phase: dict[str, Any]) -> list[str]:
    lines = [
        f"### {name}: {phase['engine']}",
        "",
        "| concurrency | path | requests | errors | TTFT p50 ms | TTFT p99 ms | stream p50 ms | stream p99 ms "
        "| req/s | tok/s | decode tok/s p50 | path CPU ms/req |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for level in phase["levels"]:
        for path, f in level["paths"].items():
            lines.append(
                f"| {level['concurrency']} | {path} | {f['requests']} | {f['errors']} | {_v(f['ttft_ms']['p50'])} "
                f"| {_v(f['ttft_ms']['p99'])} | {_v(f['stream_ms']['p50'])} | {_v(f['stream_ms']['p99'])} "
                f"| {f['requests_per_s']} | {f['tokens_per_s']} | {_v(f['decode_tok_s_p50'])} "
                f"| {f['path_cpu_ms_per_request']} |"
            )
    lines += ["", "Ratios (each path against the first; Bastion against LiteLLM where it ran):", ""]
    for level in phase["levels"]:
        for path, r in level["ratios"].items():
            parts = ", ".join(f"{k} {_v(v)}" for k, v in r.items())
            lines.append(f"- concurrency {level['concurrency']}, {path}: {parts}")
    lines += ["", "CPU ms per request by process group (during each path's own rounds):", ""]
    for level in phase["levels"]:
        for path, f in level["paths"].items():
            parts = ", ".join(f"{g} {ms}" for g, ms in f["cpu_ms_per_request"].items())
            lines.append(f"- concurrency {level['concurrency']}, {path}: {parts}")
    audit = phase.get("audit") or {}
    lines += ["", f"Audit rows / Bastion requests: {audit.get('rows')} / {audit.get('requests')}."]
    if "litellm" in phase:
        lines.append(f"LiteLLM: {phase['litellm']}.")
    return lines


def markdown(result: dict[str, Any]) -> str:
    lines = _phase("scripted", result["scripted"])
    real = result["real"]
    lines.append("")
    lines += _phase("real", real) if isinstance(real, dict) else [f"### real: {real}"]
    lines += [
        "",
        f"{result['cpus']} CPUs; load average (1 min) {result['load_average_1m']['start']} at the start, "
        f"{result['load_average_1m']['end']} at the end; {result['seconds']} s; Serve settings: "
        f"{result['serve_env'] or 'defaults'}.",
    ]
    return "\n".join(lines)
