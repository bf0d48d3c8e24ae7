"""orjson reads 1024 levels of nesting but writes only 255: a request deeper than that is refused with a 400 where
relay writes it again for the upstream, and only there; an encode error anywhere else is relay's bug, not the
client's nesting."""

from __future__ import annotations

import http.client
import json
from typing import Any
from urllib.parse import urlsplit

import orjson
import pytest
import trio

from relay.server import Server
from tests.conftest import RELAY_KEY, RelayHandle
from tests.mock_upstream import MockUpstream, text_stream
from tests.test_gateway import Answer, call, run


def post(url: str, body: Any) -> Answer:
    """The body written by the json module: orjson (as the test client's own helper uses) writes only 255 levels."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=10)
    try:
        conn.request("POST", "/v1/messages", body=json.dumps(body).encode(),
                     headers={"x-api-key": RELAY_KEY, "content-type": "application/json"})
        answer = conn.getresponse()
        return Answer(answer.status, answer.read())
    finally:
        conn.close()


def deep(levels: int) -> Any:
    value: Any = "x"
    for _ in range(levels):
        value = {"a": value}
    return value


async def test_a_request_too_deep_to_write_again_is_the_clients_400(relay: RelayHandle, upstream: MockUpstream) -> None:
    upstream.handler = lambda r: text_stream("ok")
    body = {"model": "mock-model", "max_tokens": 10, "stream": True,
            "messages": [{"role": "user", "content": "hi"},
                         {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "f",
                                                            "input": deep(300)}]},
                         {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "r"}]}]}
    answer = await run(post, relay.url, body)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"] == {"type": "invalid_request_error",
                                      "message": "request JSON nests too deeply (at most 255 levels)"}
    assert upstream.requests == []
    body["messages"][1]["content"][0]["input"] = deep(200)  # within what orjson writes: served
    assert (await run(post, relay.url, body)).status_code == 200


async def test_an_encode_error_elsewhere_is_not_called_the_clients_nesting(
        relay: RelayHandle, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    def broken(self: Server, client: Any) -> Any:  # a bug in relay: a dict orjson cannot write
        return orjson.dumps({1: "not a str key"})

    monkeypatch.setattr(Server, "_models", broken)
    try:
        answer = await run(call, relay.url, "GET", "/v1/models", RELAY_KEY)
    except (http.client.RemoteDisconnected, ConnectionError):
        answer = None  # a bug costs its connection (and is logged), as any other bug does
    assert answer is None or (answer.status_code != 400 and "nests" not in answer.text), answer and answer.text
    with trio.fail_after(5):
        while "unhandled error on a connection" not in caplog.text:
            await trio.sleep(0.01)
    assert "Dict key must be str" in caplog.text


async def test_an_upstream_answer_too_deep_to_write_again_is_a_502(relay: RelayHandle, upstream: MockUpstream) -> None:
    """A tool call's input nested 300 levels in a one-piece answer: relay reads it (orjson: 1024 levels) but cannot
    write it (255), so the client gets a clear 502 in Anthropic's shape, not a dropped connection."""
    from tests.mock_upstream import completion

    arguments = json.dumps(deep(300))
    upstream.handler = lambda r: completion({"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": arguments}}]})
    for streamed in (False, True):
        answer = await run(post, relay.url, {"model": "mock-model", "max_tokens": 5, "stream": streamed,
                                             "messages": [{"role": "user", "content": "hi"}]})
        assert answer.status_code == 502, answer.text
        error = answer.json()["error"]
        assert error["type"] == "api_error" and "nests too deeply" in error["message"]
