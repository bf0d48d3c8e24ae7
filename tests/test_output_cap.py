"""An upstream that refuses max_tokens and states its cap: each provider's real wording is read, relay retries at
once with the cap, remembers it per provider and model, and says so once in the log (issue 18, item 1)."""

from __future__ import annotations

import logging
from typing import Any

import anthropic
import orjson
import pytest
import trio

from relay.config import default_config
from relay.errors import from_upstream
from relay.output_cap import detect
from relay.server import Server
from tests.client import ask
from tests.conftest import RELAY_KEY, relay_config, start_relay
from tests.mock_upstream import MockUpstream, Recorded, Reply, json_reply, sse, text_stream

# (id, status, error body as the provider sends it, the cap it states). Sources are in relay/output_cap.py.
WORDINGS: list[tuple[str, int, Any, int]] = [
    ("openai", 400, {"error": {"message": "max_tokens is too large: 128000. This model supports at most 32768 "
                               "completion tokens, whereas you provided 128000.", "type": "invalid_request_error",
                               "param": "max_tokens", "code": "invalid_value"}}, 32768),
    ("openai-completion-field", 400, {"error": {"message": "max_completion_tokens is too large: 64000. This model "
                                                "supports at most 16384 completion tokens, whereas you provided 64000.",
                                                "type": "invalid_request_error", "param": "max_completion_tokens",
                                                "code": "invalid_value"}}, 16384),
    ("proxy-in-param", 400, {"error": {"message": "Param Incorrect", "type": "upstream_error", "param": "max_tokens is "
                                       "too large: 1048576. This model supports at most 131072 completion tokens, "
                                       "whereas you provided 1048576.", "code": "400"}}, 131072),
    ("anthropic", 400, {"type": "error", "error": {"type": "invalid_request_error", "message": "max_tokens: 128000 > "
                        "64000, which is the maximum allowed number of output tokens for claude-3-7-sonnet-20250219"}},
     64000),
    ("deepseek", 400, {"error": {"message": "Invalid max_tokens value, the valid range of max_tokens is [1, 8192]",
                                 "type": "invalid_request_error", "param": None, "code": "invalid_request_error"}}, 8192),
    ("dashscope", 400, {"error": {"code": "invalid_parameter_error", "param": None, "message": "Range of max_tokens "
                                  "should be [1, 131072]", "type": "invalid_request_error"}}, 131072),
    ("dashscope-native", 400, {"message": "<400> InternalError.Algo.InvalidParameter: Range of max_tokens should be "
                                          "[1, 8192]"}, 8192),
    ("groq", 400, {"error": {"message": "`max_completion_tokens` must be less than or equal to `16384`, the maximum "
                                        "value for `max_completion_tokens` is less than the `context_window` for this "
                                        "model", "type": "invalid_request_error", "param": "max_completion_tokens"}},
     16384),
    ("groq-older", 400, {"error": {"message": "max_tokens for `llama-3.1-8b-instant` must be less than or equal to 8000",
                                   "type": "invalid_request_error"}}, 8000),
    ("volcengine-ark", 400, {"error": {"code": "InvalidParameter", "message": "The parameter `max_completion_tokens` "
                                       "specified in the request are not valid: integer above maximum value, expected "
                                       "a value <= 12288, but got 32000 instead. Request id: 0217", "param":
                                       "max_completion_tokens", "type": "BadRequest"}}, 12288),
    ("vertex-gemini", 400, {"error": {"code": 400, "message": "Unable to submit request because it has a "
                                      "maxOutputTokens value of 655360 but the supported range is from 1 (inclusive) "
                                      "to 8193 (exclusive). Update the value and try again.",
                                      "status": "INVALID_ARGUMENT"}}, 8192),
    ("ollama-cloud", 400, {"error": {"message": "max_tokens (384000) exceeds model's maximum output tokens (65536) for "
                                     "model deepseek-v4-flash:0731", "type": "invalid_request_error"}}, 65536),
    ("between", 400, {"code": 400, "reason": "INVALID_REQUEST_BODY", "message": "max_tokens (current value: 4096) must "
                      "be between 0 and 4000 ", "metadata": {}}, 4000),
]

NOT_CAPS: list[tuple[str, int, Any]] = [
    # a window refusal (vLLM): compacting or a smaller max_tokens beside this prompt fixes it, not a fixed cap
    ("vllm-window", 400, {"error": {"message": "'max_tokens' or 'max_completion_tokens' is too large: 64000. This "
                                               "model's maximum context length is 64001 tokens and your request has "
                                               "24235 input tokens (64000 > 64001 - 24235). None"}}),
    ("openai-window", 400, {"error": {"message": "This model's maximum context length is 8192 tokens. However, you "
                                                 "requested 8256 tokens (64 in the messages, 8192 in the completion).",
                                      "code": "context_length_exceeded"}}),
    ("openrouter-credits", 402, {"error": {"message": "This request requires more credits, or fewer max_tokens. You "
                                                      "requested up to 65536 tokens, but can only afford 1000."}}),
    ("rate-limit", 429, {"error": {"message": "Rate limit reached: max_tokens must be less than or equal to 1000 per "
                                              "minute", "type": "rate_limit_error"}}),
    ("other-400", 400, {"error": {"message": "Unsupported parameter: 'max_tokens'", "type": "invalid_request_error"}}),
]


@pytest.mark.parametrize("status,body,cap", [w[1:] for w in WORDINGS], ids=[w[0] for w in WORDINGS])
def test_each_providers_refusal_states_its_cap(status: int, body: Any, cap: int) -> None:
    err = from_upstream(status, orjson.dumps(body), provider="p")
    assert err.output_cap == cap and err.overflow is None


@pytest.mark.parametrize("status,body", [w[1:] for w in NOT_CAPS], ids=[w[0] for w in NOT_CAPS])
def test_other_refusals_state_no_cap(status: int, body: Any) -> None:
    assert from_upstream(status, orjson.dumps(body), provider="p").output_cap is None


def test_detect_reads_numbers_with_separators() -> None:
    assert detect("max_tokens is too large: 200,000. This model supports at most 100,000 completion tokens") == 100_000


OPENAI_CAP = 32768


def refuses_like_openai(request: Recorded) -> Reply:
    """What OpenAI answers gpt-4.1 when max_tokens passes its cap (the wording users report), else a short stream.
    (A mock on loopback is taken for a local server: relay asks it for its window first, which it does not know.)"""
    if not request.path.endswith("/chat/completions"):
        return json_reply({"error": "not found"}, 404)
    asked = request.json.get("max_tokens") or request.json.get("max_completion_tokens")
    if asked > OPENAI_CAP:
        return json_reply({"error": {
            "message": f"max_tokens is too large: {asked}. This model supports at most {OPENAI_CAP} completion "
                       f"tokens, whereas you provided {asked}.",
            "type": "invalid_request_error", "param": "max_tokens", "code": "invalid_value"}}, 400)
    return text_stream("hello")


async def test_no_config_relay_learns_openais_cap_from_its_refusal(
        nursery: trio.Nursery, upstream: MockUpstream, caplog: pytest.LogCaptureFixture) -> None:
    """The README's quickstart: no config file, Claude Code's max_tokens 128000 against a model capped at 32768."""
    upstream.handler = refuses_like_openai
    config = default_config({"OPENAI_BASE_URL": upstream.base_url, "OPENAI_API_KEY": "sk-test",
                             "RELAY_DEFAULT_MODEL": "gpt-4.1"})
    server = Server(config)
    port = await nursery.start(server.serve, "127.0.0.1", 0)
    caplog.set_level(logging.INFO, logger="relay")
    for _ in range(3):
        assert await trio.to_thread.run_sync(lambda: ask(port, max_tokens=128000, model="claude-opus-5-5")) == "hello"
    sent = [r.json["max_tokens"] for r in upstream.requests if r.path.endswith("/chat/completions")]
    assert sent == [128000, OPENAI_CAP, OPENAI_CAP, OPENAI_CAP], "one refusal, then the cap at once, then remembered"
    learned = [r.getMessage() for r in caplog.records if "accepts at most" in r.getMessage()]
    assert len(learned) == 1 and "openai/gpt-4.1" in learned[0] and str(OPENAI_CAP) in learned[0], learned
    assert [r.levelno for r in caplog.records if "accepts at most" in r.getMessage()] == [logging.INFO]
    capped = [r.getMessage() for r in caplog.records if "max_tokens 128000 -> 32768" in r.getMessage()]
    assert capped and all(f"the output cap {OPENAI_CAP}" in m and "window" not in m for m in capped), capped


async def test_a_cap_stated_inside_a_stream_is_learned_too(nursery: trio.Nursery, upstream: MockUpstream) -> None:
    """DashScope sends the refusal as an error event in a 200 stream, before any content."""
    def handler(request: Recorded) -> Reply:
        if request.json["max_tokens"] > 8192:
            return Reply(pieces=sse({"error": {"code": "invalid_parameter_error", "param": None, "message":
                                               "Range of max_tokens should be [1, 8192]",
                                               "type": "invalid_request_error"}}, done=False))
        return text_stream("hello")

    upstream.handler = handler
    relay = await start_relay(nursery, relay_config(upstream.base_url))
    assert await trio.to_thread.run_sync(lambda: ask(relay.port, max_tokens=20000, model="mock-model")) == "hello"
    assert [r.json["max_tokens"] for r in upstream.requests] == [20000, 8192]


async def test_a_refusal_that_repeats_is_answered_not_retried_forever(nursery: trio.Nursery,
                                                                       upstream: MockUpstream) -> None:
    """An upstream that refuses even its own stated cap: one retry at once, then the client gets the 400."""
    upstream.handler = lambda r: json_reply({"error": {"message": "Invalid max_tokens value, the valid range of "
                                                                  "max_tokens is [1, 8192]"}}, 400)
    relay = await start_relay(nursery, relay_config(upstream.base_url, "retries = 3"))
    with pytest.raises(anthropic.BadRequestError, match="valid range of max_tokens"):
        await trio.to_thread.run_sync(lambda: ask(relay.port, max_tokens=20000, model="mock-model"))
    assert [r.json["max_tokens"] for r in upstream.requests] == [20000, 8192]
    metrics = relay.server.metrics.render().decode()
    assert 'relay_upstream_errors_total{provider="mock",status="400"} 2' in metrics


async def test_relay_max_output_tokens_caps_without_a_config_file(nursery: trio.Nursery, upstream: MockUpstream,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    upstream.handler = refuses_like_openai
    server = Server(default_config({"OPENAI_BASE_URL": upstream.base_url, "RELAY_MAX_OUTPUT_TOKENS": "4096"}))
    port = await nursery.start(server.serve, "127.0.0.1", 0)
    caplog.set_level(logging.INFO, logger="relay")
    assert await trio.to_thread.run_sync(lambda: ask(port, max_tokens=128000, model="gpt-4o")) == "hello"
    assert [r.json["max_tokens"] for r in upstream.requests if r.path.endswith("/chat/completions")] == [4096]
    assert any("max_tokens 128000 -> 4096 for openai/gpt-4o: the output cap 4096" == r.getMessage().split(" ", 1)[1]
               for r in caplog.records), [r.getMessage() for r in caplog.records]


async def test_relays_own_refusals_are_not_upstream_errors(nursery: trio.Nursery, upstream: MockUpstream) -> None:
    """A prompt relay refuses as too long for the window never reached the upstream: it is no upstream error."""
    upstream.handler = lambda r: text_stream("hello")
    relay = await start_relay(nursery, relay_config(upstream.base_url, "context_window = 2000"))
    client = anthropic.Anthropic(base_url=relay.url, api_key=RELAY_KEY, max_retries=0)
    with pytest.raises(anthropic.BadRequestError, match="prompt is too long"):
        await trio.to_thread.run_sync(lambda: client.messages.create(
            model="mock-model", max_tokens=100, messages=[{"role": "user", "content": "word " * 4000}]))
    assert upstream.requests == []
    metrics = relay.server.metrics.render().decode()
    assert "relay_upstream_errors_total{" not in metrics, metrics
    assert 'relay_requests_total{path="/v1/messages",provider="mock",model="mock-model",status="400"} 1' in metrics
