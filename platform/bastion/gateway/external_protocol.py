"""What differs between OpenAI-compatible servers, kept out of the client: speculation statistics per server kind,
upstream errors mapped onto the OpenAI error format (with nothing internal left in), and prompt-token counting.

Speculation statistics are reported in vLLM's shape (`metrics.speculative_decoding`), which the relay already
reads. They come only from what the upstream says: vLLM's per-request metrics, llama-server's `timings`
(`draft_n`, `draft_n_accepted`); Ollama reports none. Absent means unknown (None), never zero.
"""

from __future__ import annotations

import json
import re
from typing import Any

from bastion.gateway.errors import error_body

_URL = re.compile(r"\b[a-z][a-z0-9+.-]*://\S+", re.IGNORECASE)
_SECRETISH = re.compile(r"\b(?:sk|bst|key|token)[-_][A-Za-z0-9_\-]{8,}\b|\bBearer\s+\S+", re.IGNORECASE)
_INTERNAL = ("Traceback", 'File "', "/site-packages/", "Exception:", "Error:", "\n  at ")
_PASSED_STATUSES = {400, 413, 422}  # the tenant's own request was wrong: the upstream's reason helps them
MAX_MESSAGE = 300


def speculation_of(body: dict[str, Any], source: str) -> dict[str, Any] | None:
    """vLLM-format per-request speculation statistics from a response body or final chunk, or None (unknown)."""
    if source in ("vllm", "auto"):
        metrics = body.get("metrics")
        spec = metrics.get("speculative_decoding") if isinstance(metrics, dict) else None
        if isinstance(spec, dict):
            return spec
    if source in ("llama_cpp", "auto"):
        return _from_timings(body.get("timings"))
    return None


def _from_timings(timings: Any) -> dict[str, Any] | None:
    """llama-server adds `draft_n` / `draft_n_accepted` to `timings` when the request speculated."""
    if not isinstance(timings, dict):
        return None
    drafted, accepted = timings.get("draft_n"), timings.get("draft_n_accepted")
    if not isinstance(drafted, int) or isinstance(drafted, bool) or not isinstance(accepted, int):
        return None
    return {
        "num_draft_tokens": drafted,
        "num_accepted_draft_tokens": accepted,
        "draft_acceptance_rate": accepted / drafted if drafted else None,
    }


def with_speculation(body: dict[str, Any], spec: dict[str, Any] | None) -> dict[str, Any]:
    """The body with `metrics.speculative_decoding` set (unchanged when spec is None or it is already there)."""
    if spec is None:
        return body
    metrics = body.get("metrics") if isinstance(body.get("metrics"), dict) else {}
    if isinstance(metrics.get("speculative_decoding"), dict):
        return body
    return {**body, "metrics": {**metrics, "speculative_decoding": spec}}


def scrub(message: str, secrets: tuple[str, ...] = ()) -> str | None:
    """An upstream's error message fit for the tenant, or None when it carries internals (a stack trace)."""
    if any(marker in message for marker in _INTERNAL):
        return None
    for secret in secrets:
        if secret:
            message = message.replace(secret, "[redacted]")
    message = _SECRETISH.sub("[redacted]", _URL.sub("[upstream]", message))
    message = " ".join(message.split())
    return message[:MAX_MESSAGE] if message else None


def upstream_message(raw: bytes | str) -> str | None:
    """The `error.message` (or `detail`/`error` string) an OpenAI-compatible server sent, if any."""
    try:
        data = json.loads(raw)
    except (ValueError, TypeError):
        return None
    if not isinstance(data, dict):
        return None
    error = data.get("error")
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return error["message"]
    for key in ("error", "detail", "message"):
        if isinstance(data.get(key), str):
            return data[key]
    return None


def map_error(status: int, raw: bytes | str, secrets: tuple[str, ...] = ()) -> tuple[int, dict[str, Any]]:
    """An upstream's non-2xx answer as (status, OpenAI error body) for the tenant.

    Bad requests keep their (scrubbed) reason; the upstream refusing our own credentials or not knowing the model
    is Bastion's misconfiguration (502); everything else is a generic server error. Busy or dead upstreams
    (429, 502-504) are not mapped here: the client raises UpstreamUnavailable so the request can go elsewhere.
    """
    if status in _PASSED_STATUSES:
        message = scrub(upstream_message(raw) or "", secrets) or "The upstream rejected the request"
        return 400, error_body(400, message, code="invalid_request")
    if status in (401, 403, 404):
        return 502, error_body(502, "The upstream replica is misconfigured; tell the administrator", "upstream_error")
    if status == 408:
        return 504, error_body(504, "The upstream replica did not answer in time", "upstream_timeout")
    return 502, error_body(502, "The upstream replica failed to complete the request", "upstream_error")


def estimate_tokens(endpoint: str, body: dict[str, Any]) -> int:
    """An upper-bound prompt size for servers without a tokenizer endpoint (Ollama, generic OpenAI servers):
    UTF-8 bytes ÷ 3 (BPE vocabularies average 3.5–4.5 bytes per token on text) plus 8 per chat message for the
    template. Charged at admission; the usage the upstream reports replaces it when the request ends."""
    if endpoint == "chat":
        messages = body.get("messages") or []
        text = json.dumps([m.get("content") if isinstance(m, dict) else m for m in messages], ensure_ascii=False)
        extra = json.dumps(body.get("tools"), ensure_ascii=False) if body.get("tools") else ""
        return (len(text.encode()) + len(extra.encode())) // 3 + 8 * len(messages) + 1
    prompt = body.get("prompt")
    text = prompt if isinstance(prompt, str) else json.dumps(prompt, ensure_ascii=False)
    return len(text.encode()) // 3 + 1
