"""A route that lists several targets falls back before any byte reaches the client, and never after."""

from __future__ import annotations

import anthropic
import pytest
import trio

from tests.conftest import RELAY_KEY, start_relay
from tests.mock_upstream import MockUpstream, json_reply, text_stream


async def two_upstreams(nursery: trio.Nursery) -> tuple[MockUpstream, MockUpstream]:
    first, second = MockUpstream(), MockUpstream()
    await nursery.start(first.serve)
    await nursery.start(second.serve)
    return first, second


def config(first: str, second: str) -> str:
    return f"""
[server]
api_keys = ["{RELAY_KEY}"]
[providers.a]
base_url = "{first}"
[providers.b]
base_url = "{second}"
[routes]
default = ["a/model-a", "b/model-b"]
"""


def ask(port: int, stream: bool) -> str:
    client = anthropic.Anthropic(base_url=f"http://127.0.0.1:{port}", api_key=RELAY_KEY, max_retries=0)
    if stream:
        with client.messages.stream(model="x", max_tokens=5, messages=[{"role": "user", "content": "hi"}]) as s:
            return s.get_final_text()
    msg = client.messages.create(model="x", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    return msg.content[0].text  # type: ignore[union-attr]


@pytest.mark.parametrize("status", [429, 500, 503])
async def test_falls_back_on_retryable_status(nursery: trio.Nursery, status: int) -> None:
    first, second = await two_upstreams(nursery)
    first.handler = lambda r: json_reply({"error": {"message": "busy"}}, status)
    second.handler = lambda r: text_stream("from b")
    relay = await start_relay(nursery, config(first.base_url, second.base_url))
    assert await trio.to_thread.run_sync(ask, relay.port, True) == "from b"
    assert [r.json["model"] for r in first.requests] == ["model-a"]
    assert [r.json["model"] for r in second.requests] == ["model-b"]


async def test_falls_back_when_unreachable(nursery: trio.Nursery) -> None:
    _, second = await two_upstreams(nursery)
    second.handler = lambda r: text_stream("from b")
    relay = await start_relay(nursery, config("http://127.0.0.1:9/v1", second.base_url))
    assert await trio.to_thread.run_sync(ask, relay.port, True) == "from b"


async def test_client_errors_do_not_fall_back(nursery: trio.Nursery) -> None:
    first, second = await two_upstreams(nursery)
    first.handler = lambda r: json_reply({"error": {"message": "bad field"}}, 400)
    relay = await start_relay(nursery, config(first.base_url, second.base_url))
    with pytest.raises(anthropic.BadRequestError):
        await trio.to_thread.run_sync(ask, relay.port, False)
    assert second.requests == []
