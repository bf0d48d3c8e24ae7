"""A route that lists several targets falls back before any byte reaches the client, and never after."""

from __future__ import annotations

import anthropic
import pytest
import trio

from tests.client import ask
from tests.conftest import RELAY_KEY, start_relay
from tests.mock_upstream import MockUpstream, json_reply, text_stream


async def two_upstreams(nursery: trio.Nursery) -> tuple[MockUpstream, MockUpstream]:
    first, second = MockUpstream(), MockUpstream()
    await nursery.start(first.serve)
    await nursery.start(second.serve)
    return first, second


def config(first: str, second: str, a_extra: str = "") -> str:
    return f"""
[server]
api_keys = ["{RELAY_KEY}"]
[providers.a]
base_url = "{first}"
{a_extra}
[providers.b]
base_url = "{second}"
[routes]
default = ["a/model-a", "b/model-b"]
"""


@pytest.mark.parametrize("status", [429, 500, 503])
async def test_falls_back_on_retryable_status(nursery: trio.Nursery, status: int) -> None:
    first, second = await two_upstreams(nursery)
    first.handler = lambda r: json_reply({"error": {"message": "busy"}}, status)
    second.handler = lambda r: text_stream("from b")
    relay = await start_relay(nursery, config(first.base_url, second.base_url))
    assert await trio.to_thread.run_sync(lambda: ask(relay.port, model="x", stream=True)) == "from b"
    assert [r.json["model"] for r in first.requests] == ["model-a", "model-a"]  # one retry, then fall back
    assert [r.json["model"] for r in second.requests] == ["model-b"]


async def test_falls_back_when_unreachable(nursery: trio.Nursery) -> None:
    _, second = await two_upstreams(nursery)
    second.handler = lambda r: text_stream("from b")
    relay = await start_relay(nursery, config("http://127.0.0.1:9/v1", second.base_url))
    assert await trio.to_thread.run_sync(lambda: ask(relay.port, model="x", stream=True)) == "from b"


async def test_client_errors_do_not_fall_back(nursery: trio.Nursery) -> None:
    first, second = await two_upstreams(nursery)
    first.handler = lambda r: json_reply({"error": {"message": "bad field"}}, 400)
    relay = await start_relay(nursery, config(first.base_url, second.base_url))
    with pytest.raises(anthropic.BadRequestError):
        await trio.to_thread.run_sync(lambda: ask(relay.port, model="x", stream=False))
    assert second.requests == []


async def test_long_retry_after_is_not_waited_out(nursery: trio.Nursery) -> None:
    first, second = await two_upstreams(nursery)
    first.handler = lambda r: json_reply({"error": {"message": "slow down"}}, 429, [("retry-after", "60")])
    second.handler = lambda r: text_stream("from b")
    relay = await start_relay(nursery, config(first.base_url, second.base_url))
    with trio.fail_after(5):
        assert await trio.to_thread.run_sync(lambda: ask(relay.port, model="x", stream=True)) == "from b"
    assert len(first.requests) == 1


async def test_key_rotation_and_cooldown(nursery: trio.Nursery) -> None:
    first, second = await two_upstreams(nursery)
    first.handler = lambda r: (json_reply({"error": {"message": "bad key"}}, 401)
                               if r.headers["authorization"] == "Bearer key-one" else text_stream("ok"))
    relay = await start_relay(nursery, config(first.base_url, second.base_url, 'api_key = ["key-one", "key-two"]'))
    for _ in range(3):
        assert await trio.to_thread.run_sync(lambda: ask(relay.port, model="x", stream=True)) == "ok"
    used = [r.headers["authorization"] for r in first.requests]
    assert used == ["Bearer key-one", "Bearer key-two", "Bearer key-two", "Bearer key-two"]  # key-one rests
    assert second.requests == []


async def test_circuit_opens_then_probes(nursery: trio.Nursery) -> None:
    first, second = await two_upstreams(nursery)
    healthy = {"a": False}
    first.handler = lambda r: text_stream("from a") if healthy["a"] else json_reply({"error": {"message": "down"}}, 500)
    second.handler = lambda r: text_stream("from b")
    relay = await start_relay(nursery, config(first.base_url, second.base_url,
                                              "retries = 0\nfailure_threshold = 2\ncooldown = 0.5"))
    for _ in range(4):
        assert await trio.to_thread.run_sync(lambda: ask(relay.port, model="x", stream=True)) == "from b"
    assert len(first.requests) == 2  # after two failures the circuit opened: a was skipped, not asked
    healthy["a"] = True
    await trio.sleep(0.6)
    assert await trio.to_thread.run_sync(lambda: ask(relay.port, model="x", stream=True)) == "from a"  # the probe succeeds: closed again
    assert await trio.to_thread.run_sync(lambda: ask(relay.port, model="x", stream=True)) == "from a"


async def test_sub_agent_model_tag_routes_and_is_stripped(nursery: trio.Nursery) -> None:
    first, second = await two_upstreams(nursery)
    first.handler = second.handler = lambda r: text_stream("ok")
    relay = await start_relay(nursery, config(first.base_url, second.base_url))

    def go() -> str:
        client = anthropic.Anthropic(base_url=f"http://127.0.0.1:{relay.port}", api_key=RELAY_KEY, max_retries=0)
        with client.messages.stream(model="claude-sonnet-4-5", max_tokens=5, system="<relay-model>b/special</relay-model>Be a reviewer.",
                                    messages=[{"role": "user", "content": "hi"}]) as s:
            return s.get_final_text()

    assert await trio.to_thread.run_sync(go) == "ok"
    assert first.requests == []
    (sent,) = second.requests
    assert sent.json["model"] == "special"
    assert sent.json["messages"][0] == {"role": "system", "content": "Be a reviewer."}


async def test_slow_first_byte_falls_back(nursery: trio.Nursery) -> None:
    from tests.mock_upstream import Reply, chunk, sse
    first, second = await two_upstreams(nursery)
    first.handler = lambda r: Reply(pieces=[3.0, *sse(chunk({"content": "late"}), chunk({}, "stop"))])
    second.handler = lambda r: text_stream("from b")
    relay = await start_relay(nursery, config(first.base_url, second.base_url, "retries = 0\nfirst_byte_timeout = 0.3"))
    with trio.fail_after(2.5):
        assert await trio.to_thread.run_sync(lambda: ask(relay.port, model="x", stream=True)) == "from b"


async def test_upstream_connections_are_reused(nursery: trio.Nursery) -> None:
    first, second = await two_upstreams(nursery)
    first.handler = lambda r: text_stream("ok")
    relay = await start_relay(nursery, config(first.base_url, second.base_url))
    for _ in range(5):
        assert await trio.to_thread.run_sync(lambda: ask(relay.port, model="x", stream=True)) == "ok"
    assert len(first.requests) == 5
    assert first.accepted == 1  # five streams, one keep-alive upstream connection
