"""Context windows: max_tokens fitted to the window, prompt-too-long answered without calling the upstream,
and a local server's window read from the server itself."""

from __future__ import annotations

import logging

import anthropic
import orjson
import pytest
import trio

from relay.context import MIN_OUTPUT, fit_max_tokens, window_from_server
from relay.errors import RelayError
from tests.client import ask
from tests.conftest import RELAY_KEY, relay_config, start_relay
from tests.mock_upstream import MockUpstream, Recorded, Reply, json_reply, text_stream


@pytest.mark.parametrize(("estimate", "requested", "window", "cap", "expect"), [
    (1000, 4000, 8000, None, 4000),       # fits: untouched
    (1000, 8000, 8000, None, 7000),       # lowered to the room left
    (1000, 7000, 8000, None, 7000),       # exactly at the boundary
    (1000, 7001, 8000, None, 7000),
    (6976, 32000, 8000, None, 1024),      # room == floor: still allowed
    (1000, 32000, None, 8192, 8192),      # no window: only the output cap
    (1000, 32000, 200000, 16384, 16384),
    (7500, 300, 8000, None, 300),         # small requests keep a small floor
])
def test_fit_max_tokens(estimate: int, requested: int, window: int | None, cap: int | None, expect: int) -> None:
    assert fit_max_tokens(estimate, requested, window, cap) == expect


@pytest.mark.parametrize(("estimate", "window", "message"), [
    (6977, 8000, f"prompt is too long: 6977 tokens > {8000 - MIN_OUTPUT} maximum"),  # one token past the floor
    (9000, 8000, "prompt is too long: 9000 tokens > 8000 maximum"),
])
def test_nothing_fits(estimate: int, window: int, message: str) -> None:
    with pytest.raises(RelayError) as info:
        fit_max_tokens(estimate, 32000, window, None)
    assert info.value.status == 400 and info.value.error_type == "invalid_request_error"
    assert info.value.message == message


def test_window_from_server_shapes() -> None:
    assert window_from_server("models", {"data": [{"id": "q", "max_model_len": 32768}]}, "q") == 32768  # vLLM
    assert window_from_server("props", {"default_generation_settings": {"n_ctx": 8192}}, "q") == 8192  # llama.cpp
    assert window_from_server("lmstudio", {"loaded_context_length": 4096, "max_context_length": 32768}, "q") == 4096
    assert window_from_server("ollama", {"parameters": "num_ctx 16384\nstop x", "model_info": {"qwen2.context_length": 32768}}, "q") == 16384
    assert window_from_server("ollama", {"model_info": {"llama.context_length": 131072}}, "q") == 131072
    assert window_from_server("models", {"data": [{"id": "other"}, {"id": "q"}]}, "q") is None


async def test_max_tokens_lowered_and_overlong_refused(nursery: trio.Nursery, upstream: MockUpstream) -> None:
    upstream.handler = lambda r: text_stream("ok")
    relay = await start_relay(nursery, relay_config(upstream.base_url, "context_window = 4000"))
    assert await trio.to_thread.run_sync(lambda: ask(relay.port, text="word " * 400, max_tokens=32000)) == "ok"
    sent = upstream.requests[0].json["max_tokens"]
    assert 3400 < sent < 3700  # 4000 minus relay's estimate of ~400 words
    with pytest.raises(anthropic.BadRequestError) as info:
        await trio.to_thread.run_sync(lambda: ask(relay.port, text="word " * 20000, max_tokens=32000))
    assert info.value.body["error"]["message"].startswith("prompt is too long: ")
    assert info.value.body["error"]["message"].endswith(" tokens > 4000 maximum")
    assert len(upstream.requests) == 1  # the upstream never saw the request that could not fit


async def test_window_discovered_from_local_server(nursery: trio.Nursery, upstream: MockUpstream) -> None:
    def handler(r: Recorded) -> Reply:
        if r.method == "GET" and r.path == "/v1/models":
            return json_reply({"object": "list", "data": [{"id": "mock-model", "max_model_len": 3000}]})
        return text_stream("ok")

    upstream.handler = handler
    relay = await start_relay(nursery, relay_config(upstream.base_url, "discover_context = true"))
    assert await trio.to_thread.run_sync(lambda: ask(relay.port, text="hello", max_tokens=32000)) == "ok"
    assert 2900 < upstream.requests[-1].json["max_tokens"] <= 3000
    gets = [r for r in upstream.requests if r.method == "GET"]
    assert len(gets) == 1
    await trio.to_thread.run_sync(lambda: ask(relay.port, text="again", max_tokens=32000))
    assert len([r for r in upstream.requests if r.method == "GET"]) == 1  # asked once, then cached

    def model_entry() -> dict:  # type: ignore[type-arg]
        import urllib.request
        req = urllib.request.Request(f"http://127.0.0.1:{relay.port}/v1/models/mock-model", headers={"x-api-key": RELAY_KEY})
        return orjson.loads(urllib.request.urlopen(req).read())

    entry = await trio.to_thread.run_sync(model_entry)
    assert entry["id"] == "mock-model" and entry["context_window"] == 3000


async def test_upstream_overflow_errors_become_anthropic_wording(nursery: trio.Nursery, upstream: MockUpstream,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    from tests.mock_upstream import chunk, sse
    replies = {
        # llama.cpp: numbers only in fields (ggml-org/llama.cpp#15780)
        "llama": json_reply({"error": {"code": 400, "message": "the request exceeds the available context size, try increasing it",
                                       "type": "exceed_context_size_error", "n_prompt_tokens": 9000, "n_ctx": 8192}}, 400),
        # DeepSeek: prompt fits, prompt + max_tokens does not -> Anthropic's max_tokens wording
        "deepseek": json_reply({"error": {"message": "This model's maximum context length is 65536 tokens. However, you requested "
                                          "70000 tokens (60000 in the messages, 10000 in the completion). Please reduce the length "
                                          "of the messages or completion.", "type": "invalid_request_error"}}, 400),
        # an overflow reported inside the stream, before any content
        "stream": Reply(pieces=sse({"error": {"message": "This model's maximum context length is 4096 tokens. However, your "
                                              "messages resulted in 5000 tokens.", "code": 400}})),
        # ... and after content: an event: error with the same wording
        "late": Reply(pieces=sse(chunk({"content": "par"}), {"error": {"message": "This model's maximum context length is 4096 "
                                                                       "tokens. However, your messages resulted in 5000 tokens."}}, done=False)),
    }
    upstream.handler = lambda r: replies[r.json["messages"][-1]["content"]]
    relay = await start_relay(nursery, relay_config(upstream.base_url))
    expected = {
        "llama": "prompt is too long: 9000 tokens > 8192 maximum",
        "deepseek": "input length and `max_tokens` exceed context limit: 60000 + 10000 > 65536, decrease input length or `max_tokens` and try again",
        "stream": "prompt is too long: 5000 tokens > 4096 maximum",
        "late": "prompt is too long: 5000 tokens > 4096 maximum",
    }
    caplog.set_level(logging.INFO, logger="relay.overflow")
    for name, message in expected.items():
        caplog.clear()
        with pytest.raises(anthropic.APIStatusError) as info:
            await trio.to_thread.run_sync(lambda: ask(relay.port, text=name, max_tokens=32000))
        overflows = [r for r in caplog.records if r.getMessage().startswith("upstream context overflow")]
        assert len(overflows) == 1, (name, [r.getMessage() for r in overflows])  # reworded once, logged once
        if name == "late":
            assert message in str(info.value)
        else:
            assert info.value.status_code == 400
            assert info.value.body["error"] == {"type": "invalid_request_error", "message": message}
