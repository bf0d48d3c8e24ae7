"""Keep-alive while the upstream is silent (issue 13 item 4): relay writes Anthropic's ``ping`` whenever a stream has
had nothing written for ``keepalive`` seconds, never before message_start; a stream whose upstream has sent nothing
by ``keepalive_start`` gets its message_start early (from then on a failure is an ``event: error``). Over loopback,
against a mock upstream that goes silent before its head, before its first chunk and mid-stream, with the raw bytes
and the real anthropic SDK as judges."""

from __future__ import annotations

from typing import Any

import anthropic
import pytest
import trio

from relay.config import ConfigError, parse
from tests.anthropic_events import check_stream, parse_sse
from tests.client import messages_body, post, roundtrip
from tests.conftest import RELAY_KEY, UPSTREAM_KEY, RelayHandle, start_relay
from tests.format_mocks import anthropic_sse, anthropic_text_events, run
from tests.mock_upstream import MockUpstream, Reply, chunk, json_reply, sse, text_stream

KEEPALIVE = 0.4
FAST = 0.02  # a pause between chunks far below KEEPALIVE: data flowing


def config(upstream: MockUpstream, *, keepalive: float = KEEPALIVE, start: float = 0.6, fmt: str = "openai",
           provider: str = "", routes: str = 'default = "up/up-model"', read_timeout: float = 5) -> str:
    prefix = "/v1" if fmt == "openai" else ""
    return f"""
[server]
api_keys = ["{RELAY_KEY}"]
keepalive = {keepalive}
keepalive_start = {start}

[providers.up]
format = "{fmt}"
base_url = "http://127.0.0.1:{upstream.port}{prefix}"
api_key = "{UPSTREAM_KEY}"
models = ["up-model"]
read_timeout = {read_timeout}
retries = 0
{provider}

[routes]
{routes}
"""


async def setup(nursery: trio.Nursery, reply: Any, **kwargs: Any) -> tuple[MockUpstream, RelayHandle]:
    upstream = MockUpstream(reply if callable(reply) else (lambda r: reply))
    await nursery.start(upstream.serve)
    return upstream, await start_relay(nursery, config(upstream, **kwargs))


async def stream_events(relay: RelayHandle, model: str = "up-model") -> list[tuple[str, dict[str, Any]]]:
    answer = await roundtrip(relay.port, post("/v1/messages", messages_body(model, stream=True)))
    assert answer.status == 200 and answer.complete, (answer.status, answer.body[:300])
    return parse_sse(answer.body)


def names(events: list[tuple[str, dict[str, Any]]]) -> list[str]:
    return [name for name, _ in events]


def texts(events: list[tuple[str, dict[str, Any]]]) -> str:
    return "".join(d["delta"].get("text", "") for n, d in events if n == "content_block_delta")


def sdk_text(relay: RelayHandle, model: str = "up-model") -> str:
    client = anthropic.Anthropic(base_url=relay.url, api_key=RELAY_KEY, max_retries=0, timeout=20)
    seen: list[str] = []
    with client.messages.stream(model=model, max_tokens=20, messages=[{"role": "user", "content": "hi"}]) as s:
        for event in s:
            seen.append(event.type)
        text = s.get_final_text()
    assert "text" in seen
    return text


def flowing(*words: str) -> list[bytes | float]:
    """Chunks of text with short pauses between them: data that flows."""
    pieces: list[bytes | float] = []
    for piece in sse(*(chunk({"content": w}) for w in words), done=False):
        pieces += [piece, FAST]
    return pieces


def silent_mid_stream() -> Reply:
    """Data, a silence of four keep-alive intervals, data again (flowing), and a proper end."""
    start = sse(chunk({"role": "assistant", "content": ""}), chunk({"content": "a"}), done=False)
    end = sse(chunk({}, "stop"), chunk(choices=False, usage={"prompt_tokens": 3, "completion_tokens": 9}))
    return Reply(pieces=[*flowing("0", "1", "2"), *start, 4 * KEEPALIVE, *flowing("b", "c", "d", "e", "f"), *end])


async def test_pings_fill_a_silence_mid_stream_and_stop_when_data_flows(nursery: trio.Nursery) -> None:
    _, relay = await setup(nursery, silent_mid_stream())
    events = await stream_events(relay)
    check_stream(events)  # the grammar, with no ping before message_start
    order = names(events)
    assert order[0] == "message_start" and order[-1] == "message_stop"
    # the pings sit in the silence after "a" (never more often than every KEEPALIVE: at most 4 in it), none
    # between chunks that flow, none after the end
    pings = [i for i, n in enumerate(order) if n == "ping"]
    after_a = next(i for i, (n, d) in enumerate(events) if n == "content_block_delta" and d["delta"]["text"] == "a")
    assert pings and all(after_a < i < after_a + len(pings) + 1 for i in pings), order
    assert 1 <= len(pings) <= 4, order
    assert texts(events) == "012abcdef"
    assert await run(lambda: sdk_text(relay)) == "012abcdef"


@pytest.mark.parametrize("where", ["before the head", "before the first chunk"])
async def test_a_long_silence_before_any_byte_starts_the_message_early(nursery: trio.Nursery, where: str) -> None:
    reply = text_stream("late", " answer")
    if where == "before the head":
        reply.delay = 5 * KEEPALIVE
    else:
        reply.pieces = [5 * KEEPALIVE, *reply.pieces]
    upstream, relay = await setup(nursery, reply)
    events = await stream_events(relay)
    check_stream(events)
    order = names(events)
    assert order.count("message_start") == 1 and order[0] == "message_start"
    first_block = order.index("content_block_start")
    assert "ping" in order[1:first_block], order  # message_start went out early, then pings until the upstream spoke
    assert "ping" not in order[first_block:], order
    assert texts(events) == "late answer"
    assert await run(lambda: sdk_text(relay)) == "late answer"
    assert len(upstream.requests) == 2


async def test_after_an_early_start_a_failure_is_an_error_event(nursery: trio.Nursery) -> None:
    reply = json_reply({"error": {"message": "upstream overloaded", "type": "server_error"}}, 503)
    reply.delay = 4 * KEEPALIVE
    _, relay = await setup(nursery, reply)
    events = await stream_events(relay)
    check_stream(events)
    order = names(events)
    assert order[0] == "message_start" and "ping" in order and order[-1] == "error", order
    assert "upstream overloaded" in events[-1][1]["error"]["message"]

    def sdk() -> Exception:
        client = anthropic.Anthropic(base_url=relay.url, api_key=RELAY_KEY, max_retries=0, timeout=20)
        try:
            with client.messages.stream(model="up-model", max_tokens=5, messages=[{"role": "user", "content": "x"}]) as s:
                s.get_final_message()
        except anthropic.APIStatusError as exc:
            return exc
        raise AssertionError("the SDK took a failed stream for a whole one")

    assert "upstream overloaded" in str(await run(sdk))


async def test_a_missed_first_byte_after_an_early_start_is_an_error_event(nursery: trio.Nursery) -> None:
    reply = text_stream("never")
    reply.delay = 10.0
    _, relay = await setup(nursery, reply, provider="first_byte_timeout = 1.2")
    events = await stream_events(relay)
    check_stream(events)
    assert names(events)[0] == "message_start" and names(events)[-1] == "error"
    assert "no first byte within 1.2s" in events[-1][1]["error"]["message"]


async def test_a_first_chunk_that_came_with_the_head_lifts_the_first_byte_deadline(nursery: trio.Nursery) -> None:
    """The first-byte deadline is met by a chunk that came with the upstream's head (the pump moves it off the
    scope only before it first waits): a pause longer than first_byte_timeout after it does not cut the stream."""
    reply = text_stream("a", "b")
    reply.pieces = [reply.pieces[0], reply.pieces[1], 1.5, *reply.pieces[2:]]
    reply.first_with_head = True
    _, relay = await setup(nursery, reply, provider="first_byte_timeout = 0.5")
    events = await stream_events(relay)
    check_stream(events)
    assert names(events)[-1] == "message_stop" and texts(events) == "ab"


async def test_a_fast_failure_keeps_its_status_and_its_fallback(nursery: trio.Nursery) -> None:
    """Before keepalive_start nothing is committed: a 503 is still an HTTP status, and the route's next target
    still serves (its own silence then starts the message early)."""
    slow = text_stream("from", " b")
    slow.delay = 4 * KEEPALIVE

    def handler(r: Any) -> Reply:
        if r.json["model"] == "a-model":
            return json_reply({"error": {"message": "down", "type": "server_error"}}, 503)
        return slow

    _, relay = await setup(nursery, handler, routes='default = ["up/a-model", "up/b-model"]')
    events = await stream_events(relay, "claude-sonnet-4-5")
    check_stream(events)
    assert texts(events) == "from b" and "ping" in names(events)
    answer = await roundtrip(relay.port, post("/v1/messages", messages_body("up/a-model", stream=True)))
    assert answer.status == 503 and b"down" in answer.body


async def test_keepalive_zero_sends_no_pings_and_never_starts_early(nursery: trio.Nursery) -> None:
    reply = silent_mid_stream()
    _, relay = await setup(nursery, lambda r: reply, keepalive=0, start=0)
    events = await stream_events(relay)
    check_stream(events)
    assert "ping" not in names(events) and texts(events) == "012abcdef"
    failing = json_reply({"error": {"message": "late failure", "type": "server_error"}}, 503)
    failing.delay = 3 * KEEPALIVE
    reply = failing
    answer = await roundtrip(relay.port, post("/v1/messages", messages_body("up-model", stream=True)))
    assert answer.status == 503 and b"late failure" in answer.body  # nothing was committed: still a status


async def test_provider_keepalive_start_overrides_the_server(nursery: trio.Nursery) -> None:
    """keepalive_start on the provider: far past the silence, so this stream is not started early."""
    failing = json_reply({"error": {"message": "late failure", "type": "server_error"}}, 503)
    failing.delay = 3 * KEEPALIVE
    _, relay = await setup(nursery, failing, provider="keepalive_start = 60")
    answer = await roundtrip(relay.port, post("/v1/messages", messages_body("up-model", stream=True)))
    assert answer.status == 503 and b"late failure" in answer.body


async def test_passthrough_stream_started_early_has_one_message_start(nursery: trio.Nursery) -> None:
    """An Anthropic upstream that is slow to start: relay's message_start goes first, the upstream's own is read
    for its usage and not sent again; the rest passes through."""
    reply = anthropic_sse(*anthropic_text_events("passed through", usage=(12, 4)))
    reply.delay = 4 * KEEPALIVE
    _, relay = await setup(nursery, reply, fmt="anthropic")
    events = await stream_events(relay)
    check_stream(events, strict=False)  # the upstream's own events, as it wrote them
    order = names(events)
    assert order.count("message_start") == 1 and order.index("ping") < order.index("content_block_start")
    assert events[0][1]["message"]["model"] == "up-model" and texts(events) == "passed through"

    def sdk() -> Any:
        client = anthropic.Anthropic(base_url=relay.url, api_key=RELAY_KEY, max_retries=0, timeout=20)
        with client.messages.stream(model="up-model", max_tokens=20, messages=[{"role": "user", "content": "x"}]) as s:
            return s.get_final_message()

    message = await run(sdk)
    assert message.content[0].text == "passed through" and message.usage.output_tokens == 4


async def test_a_client_that_leaves_during_a_long_wait_cancels_the_upstream_request(nursery: trio.Nursery) -> None:
    reply = text_stream("too late")
    reply.delay = 30.0
    upstream, relay = await setup(nursery, reply)
    stream = await trio.open_tcp_stream("127.0.0.1", relay.port)
    await stream.send_all(post("/v1/messages", messages_body("up-model", stream=True)))
    with trio.fail_after(5):  # message_start, sent early: relay is watching this client now
        assert b"message_start" in await stream.receive_some(65536)
    await stream.aclose()
    with trio.fail_after(5):  # relay hung up on the upstream: it did not wait out the 30 s
        await upstream.cancelled.wait()


@pytest.mark.parametrize("line", ["keepalive = -1", "keepalive_start = -0.5"])
def test_negative_settings_are_refused(line: str) -> None:
    with pytest.raises(ConfigError, match=line.split()[0]):
        parse(f"[server]\n{line}\n", "t.toml", env={})
    if line.startswith("keepalive_start"):
        with pytest.raises(ConfigError, match="providers.p.keepalive_start"):
            parse(f'[providers.p]\nbase_url = "http://x"\n{line}\n', "t.toml", env={})
