"""Prompt tokens counted in the gateway replica, without a round trip to an engine replica.

The gateway charges prompt tokens at admission (limits, budgets, routing by context), and asking an engine replica
costs a handle call per request through Serve's router, on the replica's event loop, which also carries vLLM's
output. For a chat whose messages are plain text and that has no tools, the count is what vLLM's `/tokenize`
computes: the model's chat template rendered with a generation prompt, then encoded without special tokens
(vLLM's chat default); a string completion prompt is encoded with them. Other prompt shapes (token ids, lists) are
the engine's to judge. The tokenizer comes from the model's folder
in the model store, loaded in the background when the replica starts. Anything else (content parts, tool
definitions or tool calls, an unloaded or missing tokenizer, an error) returns None: the engine counts it, as before,
so its errors (a 400 for a prompt it cannot tokenize) stay the engine's.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
_PLAIN_ROLES = {"system", "user", "assistant", "developer"}

Counter = Callable[[str, dict[str, Any]], "int | None"]


def plain_chat(body: dict[str, Any]) -> list[dict[str, str]] | None:
    """The messages as the template sees them when every message is role + text; else None."""
    if body.get("tools") or body.get("chat_template") or body.get("chat_template_kwargs"):
        return None
    if body.get("add_generation_prompt") is False or body.get("continue_final_message"):
        return None
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return None
    out = []
    for m in messages:
        if not isinstance(m, dict) or set(m) - {"role", "content"}:
            return None
        if m.get("role") not in _PLAIN_ROLES or not isinstance(m.get("content"), str):
            return None
        out.append({"role": m["role"], "content": m["content"]})
    return out


class TokenizerCounter:
    """The model's own tokenizer and chat template, loaded once off the event loop."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.tokenizer: Any = None
        self._loading: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Begin loading in a thread; until it is loaded, `count` says None (the engine counts)."""
        if self._loading is None and self.folder.is_dir():
            self._loading = asyncio.get_running_loop().create_task(self._load())

    async def _load(self) -> None:
        try:
            self.tokenizer = await asyncio.to_thread(self._from_pretrained)
        except Exception as exc:  # no transformers here, no tokenizer files: the engine keeps counting
            log.warning("prompt tokens of %s are counted by the engine: %s", self.folder.name, type(exc).__name__)

    def _from_pretrained(self) -> Any:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(self.folder))
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("no chat template")
        return tokenizer

    def count(self, endpoint: str, body: dict[str, Any]) -> int | None:
        tokenizer = self.tokenizer
        if tokenizer is None:
            return None
        try:
            if endpoint == "chat":
                messages = plain_chat(body)
                if messages is None:
                    return None
                prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
                return len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
            prompt = body.get("prompt")
            if isinstance(prompt, str):
                return len(tokenizer(prompt, add_special_tokens=True)["input_ids"])
        except Exception as exc:  # the engine says what is wrong with the prompt
            log.debug("local prompt count failed (%s); asking the engine", type(exc).__name__)
        return None


def prompt_counters(config: Any, infos: list[dict[str, Any]]) -> dict[str, Any]:
    """Per engine deployment: its info's `prompt_counter` when it brings one (a callable: the scripted engines'
    rule), else the model's tokenizer from the model store (one per model, loading starts now)."""
    from bastion.engine.model_store import model_path

    by_model: dict[str, TokenizerCounter] = {}
    out: dict[str, Any] = {}
    for info in infos:
        given = info.get("prompt_counter")
        if callable(given):
            out[info["name"]] = given
            continue
        if given == "engine":
            continue
        model = info["model"]
        if model not in by_model:
            try:
                folder = model_path(config.model(model), config.data_dir)
            except Exception as exc:
                log.warning("prompt tokens of %s are counted by the engine: %s", model, type(exc).__name__)
                continue
            by_model[model] = TokenizerCounter(folder)
            by_model[model].start()
        out[info["name"]] = by_model[model].count
    return out
