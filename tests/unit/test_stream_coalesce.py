"""The engine replica's stream coalescing (engine/replica.py `coalesce`): the first message never waits, messages
closer than the window go together, the end of the stream or an error ends the wait, and wide-spaced messages go
one by one."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from bastion.engine.replica import coalesce


async def _source(gaps_s: list[float], fail: bool = False) -> AsyncIterator[str]:
    for i, gap in enumerate(gaps_s):
        await asyncio.sleep(gap)
        yield f"t{i};"
    if fail:
        raise RuntimeError("engine died")


async def _collect(source: AsyncIterator[str], window_s: float) -> list[tuple[float, str]]:
    start = time.monotonic()
    return [(time.monotonic() - start, batch) async for batch in coalesce(source, window_s)]


def test_first_message_goes_at_once_and_close_ones_go_together() -> None:
    batches = asyncio.run(_collect(_source([0.0] + [0.01] * 8), 0.2))
    assert batches[0][1] == "t0;" and batches[0][0] < 0.05
    assert "".join(b for _, b in batches) == "".join(f"t{i};" for i in range(9))
    assert len(batches) <= 3  # eight messages 10 ms apart inside a 200 ms window


def test_the_end_of_the_stream_ends_the_wait() -> None:
    batches = asyncio.run(_collect(_source([0.0, 0.0, 0.0]), 5.0))
    assert "".join(b for _, b in batches) == "t0;t1;t2;" and batches[-1][0] < 1.0


def test_wide_spaced_messages_go_one_by_one() -> None:
    batches = asyncio.run(_collect(_source([0.0, 0.06, 0.06, 0.06]), 0.02))
    assert [b for _, b in batches] == ["t0;", "t1;", "t2;", "t3;"]


def test_an_error_mid_stream_is_an_error_event_without_waiting() -> None:
    batches = asyncio.run(_collect(_source([0.0, 0.0], fail=True), 5.0))
    text = "".join(b for _, b in batches)
    assert text.startswith("t0;t1;") and '"code":500' in text and batches[-1][0] < 1.0


def test_no_window_sends_what_is_ready() -> None:
    batches = asyncio.run(_collect(_source([0.0, 0.02, 0.02]), 0.0))
    assert [b for _, b in batches] == ["t0;", "t1;", "t2;"]
