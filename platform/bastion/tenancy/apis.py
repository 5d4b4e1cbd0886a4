"""The inference APIs a tenant may be allowed (the tenant's `allowed_apis`; empty: every one of them).

Names, not routes: `chat` is `/v1/chat/completions`, `completions` `/v1/completions`, `messages` Anthropic's
`/v1/messages`, `responses` `/v1/responses`, `embeddings` `/v1/embeddings`. Listing models is never refused: it
only shows what the tenant may use.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal, get_args

ApiName = Literal["chat", "completions", "messages", "responses", "embeddings"]
APIS: tuple[str, ...] = get_args(ApiName)


def unknown_apis(names: Iterable[str]) -> list[str]:
    """The names that are not APIs, in the order given (an empty list: all valid)."""
    return [name for name in names if name not in APIS]
