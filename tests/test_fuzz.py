"""Fuzzing the real relay over loopback: no request body, header set or request line gets anything but a valid
answer or a well-formed Anthropic 4xx error. Never a 5xx (the mock upstream always answers 200 with a valid
completion, so a 5xx is relay's own), never a traceback, a hang or a connection dropped without an answer, and
nothing relay logs as an unhandled error.

Three sources of input: (a) requests generated field by field, every known field of a Messages request sometimes
of the right shape and sometimes anything at all; (b) real Claude Code requests (tests/fixtures/reference) with
fields deleted, retyped, duplicated, nested deep, blown up, or the bytes made invalid UTF-8 or cut short; (c)
random header sets and request-line garbage on raw sockets. Each property runs against one relay (and mock
upstream) that lives in a thread of its own for all its examples (``SharedRelay``): it must survive them all.

Bugs met on the way are pinned by the tests at the bottom, each named for what it checks; the properties
tolerate exactly the known crashes still listed (``tests.robustness.KNOWN_CRASHES`` / ``known_answer``) and fail on
anything else.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import orjson
import pytest
import trio
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.conftest import RELAY_KEY, RelayHandle, relay_config, start_relay
from tests.mock_upstream import MockUpstream, Recorded, Reply, json_reply
from tests.client import request_bytes, roundtrip
from tests.robustness import (ANY_JSON, HUGE, WILD, Nest, SharedRelay, answer_ok, assert_clean, check_exchange, encode,
                              f, relay_idle, shared_relays, trap_relay_logs)

__all__ = ["shared_relays"]  # the fixture, imported so pytest finds it

REFERENCE = Path(__file__).parent / "fixtures" / "reference"
FUZZ = settings(max_examples=120, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])


# ---- (a) Messages requests, field by field ------------------------------------------------------

def obj(required: dict[str, Any], optional: dict[str, Any] | None = None) -> st.SearchStrategy[Any]:
    """An object whose every field may be wrong, and whose optional fields may be missing."""
    return f(st.fixed_dictionaries({k: v if isinstance(v, st.SearchStrategy) else st.just(v) for k, v in required.items()},
                                   optional={k: f(v) for k, v in (optional or {}).items()}))


TEXT = st.text(max_size=40)
IDS = st.sampled_from(["toolu_01", "toolu_02", "call_x"]) | TEXT
B64 = st.sampled_from(["iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg==",
                       "R0lGODlhAQABAAAAACw=", "JVBERi0xLjQK", "not base64!"]) | TEXT
TYPE = lambda name: f(st.just(name))  # noqa: E731  the block's type is a field like any other
EPHEMERAL = st.just({"type": "ephemeral"})
TEXT_BLOCK = obj({"type": TYPE("text"), "text": f(TEXT)}, {"cache_control": EPHEMERAL, "citations": ANY_JSON})
SOURCE = st.one_of(
    obj({"type": "base64", "media_type": f(st.sampled_from(["image/png", "image/gif", "application/pdf"])), "data": f(B64)}),
    obj({"type": "url", "url": f(TEXT)}),
    obj({"type": "text", "media_type": "text/plain", "data": f(TEXT)}),
    obj({"type": "content", "content": f(TEXT | st.lists(TEXT_BLOCK, max_size=2))}),
    obj({"type": f(TEXT)}),
)
IMAGE_BLOCK = obj({"type": TYPE("image"), "source": SOURCE})
REFERENCE_BLOCK = obj({"type": TYPE("tool_reference")}, {"tool_name": TEXT})
RESULT_CONTENT = f(TEXT | st.lists(TEXT_BLOCK | IMAGE_BLOCK | REFERENCE_BLOCK, max_size=3))
BLOCK = st.one_of(
    TEXT_BLOCK,
    IMAGE_BLOCK,
    obj({"type": TYPE("document"), "source": SOURCE}, {"title": TEXT, "context": TEXT}),
    obj({"type": TYPE("tool_use"), "id": f(IDS), "name": f(TEXT)}, {"input": st.dictionaries(TEXT, ANY_JSON, max_size=3)}),
    obj({"type": TYPE("tool_result"), "tool_use_id": f(IDS)}, {"content": RESULT_CONTENT, "is_error": st.booleans()}),
    obj({"type": TYPE("thinking"), "thinking": f(TEXT)}, {"signature": TEXT}),
    obj({"type": TYPE("redacted_thinking")}, {"data": TEXT}),
    obj({"type": TYPE("search_result"), "content": f(st.lists(TEXT_BLOCK, max_size=2))}, {"title": TEXT, "source": TEXT}),
    REFERENCE_BLOCK,
    obj({"type": f(st.sampled_from(["server_tool_use", "web_search_tool_result", "container_upload", "mystery"]))},
        {"id": IDS, "name": TEXT, "input": ANY_JSON, "content": ANY_JSON}),
    obj({}, {"text": TEXT}),  # no type at all
)
CONTENT = f(TEXT | st.lists(BLOCK, max_size=4))
MESSAGE = obj({"role": f(st.sampled_from(["user", "assistant", "system"])), "content": CONTENT})
SCHEMA = (st.just({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]})
          | st.dictionaries(TEXT, ANY_JSON, max_size=3))
TOOL = obj({"name": f(st.sampled_from(["get_weather", "Bash", "Read"]) | TEXT)},
           {"description": TEXT, "input_schema": SCHEMA, "defer_loading": st.booleans(), "strict": st.booleans(),
            "cache_control": EPHEMERAL,
            "type": st.sampled_from(["custom", "web_search_20250305", "bash_20250124", "text_editor_20250728", "other"])})
MODELS = st.sampled_from(["mock-model", "alias-model", "mock/other-model", "claude-3-5-haiku-20241022",
                          "claude-sonnet-4-5", "unknown-model", "mock/", "/x", "", "ünï/cøde"]) | TEXT
REQUEST_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "system": f(TEXT | st.lists(TEXT_BLOCK | st.just({"type": "text", "text": "x-anthropic-billing-header: cc=1;"}),
                                max_size=3)),
    "tools": f(st.lists(TOOL, max_size=3)),
    "tool_choice": obj({"type": f(st.sampled_from(["auto", "any", "tool", "none"]))},
                       {"name": TEXT, "disable_parallel_tool_use": st.booleans()}),
    "thinking": obj({"type": f(st.sampled_from(["enabled", "disabled", "adaptive"]))},
                    {"budget_tokens": st.integers(-10, 2**40)}),
    "output_config": obj({}, {"effort": st.sampled_from(["low", "medium", "high", "max", "xhigh", "minimal", "ultra"])}),
    "stop_sequences": f(st.lists(TEXT, max_size=3)),
    "temperature": f(st.floats(0, 2)),
    "top_p": f(st.floats(0, 1)),
    "top_k": f(st.integers(0, 500)),
    "metadata": obj({}, {"user_id": TEXT}),
    "stream": f(st.booleans()),
    "context_management": ANY_JSON,
    "service_tier": ANY_JSON,
}
ABSENT = object()


def required(good: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.integers(0, 19).flatmap(lambda i: st.just(ABSENT) if i == 19 else f(good))


REQUEST = st.fixed_dictionaries(
    {"model": required(MODELS), "max_tokens": required(st.integers(1, 4096) | st.integers(-5, 2**64)),
     "messages": required(st.lists(MESSAGE, min_size=1, max_size=5) | st.lists(MESSAGE, max_size=0))},
    optional={**REQUEST_FIELDS, "x_unknown_field": ANY_JSON},
).map(lambda d: {k: v for k, v in d.items() if v is not ABSENT})


@FUZZ
@given(body=st.integers(0, 9).flatmap(lambda i: WILD if i == 9 else REQUEST))
def test_any_messages_body(shared_relays: Callable[..., SharedRelay], body: Any) -> None:
    model = body.get("model") if isinstance(body, dict) else None
    raw = request_bytes(encode(body), key=RELAY_KEY)
    event(shared_relays().run(lambda relay, _: check_exchange(relay, raw, model=model)))


ANTHROPIC_STREAM = (REFERENCE.parent / "corpus" / "anthropic_real_text.sse").read_bytes()


def answer_anthropic(rec: Recorded) -> Reply:
    """An Anthropic upstream that is always well: a real captured stream, or a whole message."""
    if orjson.loads(rec.body).get("stream") is True:
        return Reply(pieces=[ANTHROPIC_STREAM])
    return json_reply({"id": "msg_01", "type": "message", "role": "assistant", "model": "claude-x", "stop_reason": "end_turn",
                       "stop_sequence": None, "content": [{"type": "text", "text": "ok"}],
                       "usage": {"input_tokens": 3, "output_tokens": 1}})


OTHER_FORMATS = {  # provider blocks for the other upstream formats, and how a well upstream of each answers
    "anthropic": ('[providers.other]\nformat = "anthropic"\nbase_url = "{upstream_url}"', answer_anthropic),
    "gemini": ('[providers.other]\nformat = "gemini"\nbase_url = "{upstream_url}"', answer_ok),
    "openai-responses": ('[providers.other]\nformat = "openai-responses"\nbase_url = "{upstream_url}"', answer_ok),
}


@settings(FUZZ, max_examples=60)
@pytest.mark.parametrize("fmt", list(OTHER_FORMATS))
@given(body=REQUEST)
def test_any_messages_body_for_every_format(shared_relays: Callable[..., SharedRelay], fmt: str, body: Any) -> None:
    """The request builders of the other formats face the same inputs. Only the anthropic mock speaks its
    format's dialect (gemini and openai-responses get OpenAI answers, so a 5xx about the answer is expected
    there): the property is no crash and a cleanly framed answer."""
    if isinstance(body.get("model"), str) and body["model"]:
        body = {**body, "model": f"other/{body['model']}"}  # provider/model: always the provider under test
    raw = request_bytes(encode(body), key=RELAY_KEY)
    shared = shared_relays(provider_config=OTHER_FORMATS[fmt][0], handler=OTHER_FORMATS[fmt][1])
    event(shared.run(lambda relay, _: check_exchange(relay, raw, allow_5xx=fmt != "anthropic", loose=True)))


@FUZZ
@given(body=REQUEST)
def test_any_count_tokens_body(shared_relays: Callable[..., SharedRelay], body: Any) -> None:
    raw = request_bytes(encode(body), path="/v1/messages/count_tokens", key=RELAY_KEY)

    async def exchange(relay: RelayHandle, upstream: MockUpstream) -> str:
        asked = len(upstream.requests)
        label = await check_exchange(relay, raw)
        assert len(upstream.requests) == asked  # counted locally, never asked upstream
        return label

    event(shared_relays().run(exchange))


# ---- (b) real Claude Code requests, mutated ------------------------------------------------------

REFERENCES = [orjson.loads(p.read_bytes()) for p in sorted(REFERENCE.glob("*.json"))]
KEPT_HEADERS = ("anthropic-beta", "anthropic-version", "user-agent", "x-app", "x-stainless-lang", "accept")
BAD_UTF8 = [b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\x80", b"\xe2\x82", b"\x00"]


def _children(node: Any) -> list[Any]:
    if isinstance(node, dict):
        return list(node)
    if isinstance(node, list):
        return list(range(len(node)))
    return []


def draw_path(data: st.DataObject, root: Any) -> list[Any]:
    """A path into the document: walk down, stopping at each level with some chance."""
    path: list[Any] = []
    node = root
    while _children(node) and (not path or data.draw(st.integers(0, 3)) > 0):
        key = data.draw(st.sampled_from(_children(node)))
        path.append(key)
        node = node[key]
    return path


def get_at(root: Any, path: list[Any]) -> Any:
    for key in path:
        root = root[key]
    return root


def mutate(data: st.DataObject, doc: Any) -> Any:
    """One structural mutation in place (the root is replaced through a wrapper so it can change too)."""
    box = {"root": doc}
    path = ["root", *draw_path(data, doc)]
    parent, key = get_at(box, path[:-1]), path[-1]
    kind = data.draw(st.sampled_from(["delete", "retype", "duplicate", "nest", "huge", "empty"]))
    event(f"mutation {kind}")
    if kind == "delete" and parent is not box:
        del parent[key]
    elif kind == "retype":
        parent[key] = data.draw(WILD)
    elif kind == "duplicate":
        value = parent[key]
        if isinstance(parent, list):
            parent.insert(key, value)
        elif isinstance(value, list) and value:
            value.extend(value[: data.draw(st.integers(1, 50))] * data.draw(st.integers(1, 20)))
        else:
            parent[key] = [value, value]
    elif kind == "nest":
        parent[key] = Nest(data.draw(st.integers(1, 1100)), parent[key], data.draw(st.booleans()))
    elif kind == "huge":
        parent[key] = data.draw(HUGE) + (parent[key] if isinstance(parent[key], str) else "")
    elif kind == "empty":
        parent[key] = type(parent[key])() if isinstance(parent[key], (dict, list, str)) else None
    return box["root"]


def corrupt_bytes(data: st.DataObject, raw: bytes) -> bytes:
    """Byte-level damage: a duplicated top-level key, invalid UTF-8 inside a string, or the JSON cut short."""
    kind = data.draw(st.sampled_from(["none", "none", "dup_key", "bad_utf8", "truncate"]))
    event(f"bytes {kind}")
    if kind == "dup_key" and raw.startswith(b"{"):
        key = data.draw(st.sampled_from(["model", "messages", "stream", "max_tokens", "tools", "system"]))
        return b"{" + encode(key) + b":" + encode(data.draw(ANY_JSON)) + b"," + raw[1:]
    if kind == "bad_utf8":
        quotes = [m.end() for m in re.finditer(rb'"', raw)] or [0]
        at = data.draw(st.sampled_from(quotes[:2000]))
        return raw[:at] + data.draw(st.sampled_from(BAD_UTF8)) + raw[at:]
    if kind == "truncate":
        return raw[: data.draw(st.integers(0, max(0, len(raw) - 1)))]
    return raw


@FUZZ
@given(which=st.integers(0, len(REFERENCES) - 1), data=st.data())
def test_mutated_claude_code_requests(shared_relays: Callable[..., SharedRelay], which: int, data: st.DataObject) -> None:
    reference = REFERENCES[which]
    doc = orjson.loads(orjson.dumps(reference["body"]))
    for _ in range(data.draw(st.integers(1, 4))):
        doc = mutate(data, doc)
    raw = corrupt_bytes(data, encode(doc))
    headers = [(k.lower().encode(), v.encode()) for k, v in reference["headers"].items() if k.lower() in KEPT_HEADERS]
    model = doc.get("model") if isinstance(doc, dict) else None
    raw = request_bytes(raw, path=reference["path"], key=RELAY_KEY, extra=headers)
    event(shared_relays().run(lambda relay, _: check_exchange(relay, raw, model=model)))


async def test_unmutated_references_are_served(relay: RelayHandle, upstream: MockUpstream) -> None:
    """The baseline for the mutations: each real request as captured is answered with a valid stream."""
    upstream.handler = answer_ok
    for reference in REFERENCES:
        body = orjson.dumps(reference["body"])
        outcome = assert_clean(await roundtrip(relay.port, request_bytes(body, path=reference["path"], key=RELAY_KEY)))
        assert outcome is not None and not isinstance(outcome, dict) and outcome.error is None


# ---- (c) header sets and request lines, on raw sockets ------------------------------------------

TOKEN_CHARS = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
LATIN1 = st.characters(min_codepoint=0x20, max_codepoint=0xFF)
HEADER_VALUE = st.binary(max_size=40) | st.text(alphabet=LATIN1, max_size=40).map(lambda s: s.encode("latin-1"))
SPECIAL_HEADERS: dict[bytes, st.SearchStrategy[bytes]] = {
    b"content-length": (st.sampled_from([b"0", b"1", b"-1", b"abc", b"99999999999999999999", b"5, 5", b" 7 "])
                        | st.integers(0, 10**6).map(lambda n: b"%d" % n)),
    b"transfer-encoding": st.sampled_from([b"chunked", b"gzip", b"identity", b"chunked, chunked", b"gzip, chunked", b"x"]),
    b"host": st.sampled_from([b"", b"relay", b"a b", b"127.0.0.1:1"]),
    b"connection": st.sampled_from([b"close", b"keep-alive", b"upgrade", b"Upgrade, HTTP2-Settings", b"te"]),
    b"upgrade": st.sampled_from([b"h2c", b"websocket"]),
    b"expect": st.sampled_from([b"100-continue", b"nonsense"]),
    b"x-api-key": st.sampled_from([RELAY_KEY.encode(), b"", b"wrong", RELAY_KEY.encode() + b"\xff"]),
    b"authorization": st.sampled_from([b"Bearer " + RELAY_KEY.encode(), b"Bearer", b"Basic Zm9v",
                                       b"bearer  " + RELAY_KEY.encode()]),
    b"content-type": st.sampled_from([b"application/json", b"text/plain", b"multipart/form-data; boundary=x", b""]),
    b"content-encoding": st.sampled_from([b"gzip", b"br", b"identity"]),
    b"anthropic-version": st.sampled_from([b"2023-06-01", b"", b"1999"]),
    b"anthropic-beta": st.sampled_from([b"claude-code-20250219", b",,,", b"x" * 300]),
}
SPECIAL_HEADER = st.sampled_from(list(SPECIAL_HEADERS)).flatmap(
    lambda name: st.tuples(st.just(name), SPECIAL_HEADERS[name] | HEADER_VALUE))
HEADER = st.integers(0, 9).flatmap(lambda i: (
    st.tuples(st.binary(min_size=0, max_size=12), HEADER_VALUE) if i == 9  # names h11 must refuse
    else st.tuples(st.text(alphabet=TOKEN_CHARS, min_size=1, max_size=20).map(str.encode), HEADER_VALUE) if i >= 6
    else SPECIAL_HEADER))
PATHS = st.sampled_from(["/v1/messages", "/v1/messages?beta=true", "/v1/messages/count_tokens", "/v1/models",
                         "/v1/models/mock-model", "/health", "/", "/v1/", "/v1/messages/", "/v1/models/%00"])
SHORT_TIMEOUTS = "header_timeout = 0.5\nidle_timeout = 1"  # a request framed to want more body gets its 408 soon


@FUZZ
@given(headers=st.lists(HEADER, max_size=10), path=PATHS, stream=st.booleans(), chunked=st.booleans(),
       method=st.sampled_from(["POST", "POST", "GET", "HEAD", "PUT", "DELETE", "OPTIONS"]))
def test_any_header_set(shared_relays: Callable[..., SharedRelay], headers: list[tuple[bytes, bytes]], path: str,
                       stream: bool, chunked: bool, method: str) -> None:
    body = orjson.dumps({"model": "mock-model", "max_tokens": 16, "stream": stream,
                         "messages": [{"role": "user", "content": "hi"}]})
    names = {name.lower() for name, _ in headers}
    framing: list[bytes] = []
    if b"transfer-encoding" in names and chunked:
        body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    elif b"content-length" not in names and b"transfer-encoding" not in names:
        framing.append(b"content-length: %d" % len(body))
    head = [f"{method} {path} HTTP/1.1".encode(), b"host: 127.0.0.1", b"x-api-key: " + RELAY_KEY.encode(), *framing]
    head += [name + b": " + value for name, value in headers]
    raw = b"\r\n".join(head) + b"\r\n\r\n" + body
    event(shared_relays(SHORT_TIMEOUTS).run(lambda relay, _: check_exchange(relay, raw, method=method)))


def part(valid: list[bytes], bad: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    """One piece of a request line: valid three times in four."""
    return st.integers(0, 3).flatmap(lambda i: bad if i == 3 else st.sampled_from(valid))


REQUEST_LINE = st.integers(0, 4).flatmap(lambda i: st.binary(max_size=120) if i == 4 else st.tuples(
    part([b"GET", b"POST", b"HEAD", b"OPTIONS", b"PUT", b"PRI"],
         st.sampled_from([b"get", b"G\x00T", b""]) | st.binary(max_size=8)),
    part([b" "], st.sampled_from([b"  ", b"\t", b""])),
    part([b"/", b"*", b"/health", b"/api/hello?x=1", b"/v1/messages", b"/v1/models", b"/v1/models/claude-x",
          b"http://x/v1/models", b"//v1"], st.sampled_from([b"/\xff", b"/a b", b""]) | st.binary(max_size=30)),
    part([b" "], st.sampled_from([b"  ", b""])),
    part([b"HTTP/1.1", b"HTTP/1.0"], st.sampled_from([b"HTTP/2.0", b"HTTP/9.9", b"http/1.1", b"HTTP/1", b"HTTP/1.1 x", b""])
         | st.binary(max_size=10)),
).map(b"".join))
HEADER_LINES = st.integers(0, 3).flatmap(lambda i: st.binary(max_size=40) if i == 3 else st.sampled_from(
    [b"", b"x-api-key: " + RELAY_KEY.encode() + b"\r\n", b"content-length: 0\r\n", b"connection: close\r\n"]))


@FUZZ
@given(line=REQUEST_LINE, eol=part([b"\r\n"], st.sampled_from([b"\n", b"\r", b"\r\r\n"])), host=st.booleans(),
       rest=HEADER_LINES)
def test_any_request_line(shared_relays: Callable[..., SharedRelay], line: bytes, eol: bytes, host: bool,
                          rest: bytes) -> None:
    raw = line + eol + (b"host: relay" + eol if host else b"") + rest + b"\r\n\r\n"
    method = "HEAD" if raw.startswith(b"HEAD ") else "GET"
    event(shared_relays(SHORT_TIMEOUTS).run(lambda relay, _: check_exchange(relay, raw, method=method)))


# ---- known bugs, each pinned with the answer it should get ---------------------------------------

async def strict_exchange(relay: RelayHandle, raw: bytes, *, method: str = "POST", timeout: float = 10) -> None:
    """The property's contract with no tolerance for known bugs."""
    with trap_relay_logs() as trap:
        answer = await roundtrip(relay.port, raw, method=method, timeout=timeout)
        await relay_idle(relay)
    assert not trap.crashes, trap.describe()
    assert_clean(answer)


async def relay_with_provider(nursery: trio.Nursery, upstream: MockUpstream, name: str, fmt: str) -> RelayHandle:
    """The usual relay, plus provider ``name`` of format ``fmt`` on the same (well) mock upstream."""
    upstream.handler = answer_ok
    extra = f'[providers.{name}]\nformat = "{fmt}"\nbase_url = "{upstream.base_url}"'
    return await start_relay(nursery, relay_config(upstream.base_url, extra=extra))


def user(*blocks: Any) -> dict[str, Any]:
    return {"model": "mock-model", "max_tokens": 16, "messages": [{"role": "user", "content": list(blocks)}]}


def with_assistant(*blocks: Any) -> dict[str, Any]:
    return {"model": "mock-model", "max_tokens": 16, "messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": list(blocks)}, {"role": "user", "content": "go"}]}


def with_tools(*tools: Any) -> dict[str, Any]:
    return {"model": "mock-model", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}], "tools": list(tools)}


@pytest.mark.parametrize("path, body", [
    ("/v1/messages", user({"type": "text", "text": 5})),
    ("/v1/messages", {**user({"type": "text", "text": "hi"}), "system": [{"type": "text", "text": 5}]}),
    ("/v1/messages", user({"type": "document", "source": "https://example.com/a.pdf"})),
    ("/v1/messages", user({"type": "tool_result", "tool_use_id": "t1", "content": [{"type": "text", "text": 5}]})),
    ("/v1/messages", with_assistant({"type": "thinking", "thinking": ["a"], "signature": "s"})),
    ("/v1/messages", with_assistant({"type": "tool_use", "id": "t1", "name": 7, "input": {}})),
    ("/v1/messages", with_tools({"name": 7})),
    ("/v1/messages", with_tools({"name": "t", "description": {"en": "d"}})),
    ("/v1/messages/count_tokens", user({"type": "text", "text": 5})),
], ids=["text", "system-text", "document-source", "tool_result-text", "thinking", "tool_use-name", "tool-name",
        "tool-description", "count_tokens"])
async def test_token_estimate_takes_fields_of_any_type(relay: RelayHandle, upstream: MockUpstream, path: str,
                                                      body: Any) -> None:
    upstream.handler = answer_ok
    await strict_exchange(relay, request_bytes(orjson.dumps(body), path=path, key=RELAY_KEY))


@pytest.mark.parametrize("path, body", [
    ("/v1/messages", with_assistant({"type": "tool_use", "id": "t1", "name": "n", "input": Nest(300, 1, objects=True)})),
    ("/v1/messages", with_tools({"name": "t", "input_schema": Nest(300, {}, objects=True)})),
    ("/v1/messages/count_tokens", with_tools({"name": "t", "input_schema": Nest(300, {}, objects=True)})),
    ("/v1/messages", {"max_tokens": 16, "model": "anth/claude-x", "messages": [{"role": "user", "content": "hi"}],
                      "metadata": Nest(300, {}, objects=True)}),
], ids=["tool_use-input", "input_schema", "count_tokens", "anthropic-format-metadata"])
async def test_nesting_deeper_than_orjson_writes_gets_a_clean_answer(nursery: trio.Nursery, upstream: MockUpstream, path: str,
                                                        body: Any) -> None:
    relay = await relay_with_provider(nursery, upstream, "anth", "anthropic")
    await strict_exchange(relay, request_bytes(encode(body), path=path, key=RELAY_KEY))


@pytest.mark.parametrize("model", ["ünï-code", "x?alt=json#"])
async def test_gemini_model_id_is_escaped_in_the_url(nursery: trio.Nursery, upstream: MockUpstream,
                                                             model: str) -> None:
    relay = await relay_with_provider(nursery, upstream, "gem", "gemini")
    body = {"model": f"gem/{model}", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
    with trap_relay_logs() as trap:
        answer = await roundtrip(relay.port, request_bytes(orjson.dumps(body), key=RELAY_KEY))
        await relay_idle(relay)
    assert not trap.crashes, trap.describe()
    assert_clean(answer, allow_5xx=True, loose=True)  # the mock speaks OpenAI: a 502 about its answer is fine
    assert [r.path for r in upstream.requests] == [f"/v1/models/{quote(model, safe='')}:generateContent"]


@pytest.mark.parametrize("stops", [True, 5], ids=["true", "number"])
async def test_anthropic_format_takes_stop_sequences_that_are_not_a_list(nursery: trio.Nursery, upstream: MockUpstream,
                                                              stops: Any) -> None:
    relay = await relay_with_provider(nursery, upstream, "anth", "anthropic")
    upstream.handler = answer_anthropic
    body = {"model": "anth/claude-x", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}],
            "stop_sequences": stops}
    await strict_exchange(relay, request_bytes(orjson.dumps(body), key=RELAY_KEY))


async def test_unsupported_transfer_encoding_is_a_4xx(relay: RelayHandle) -> None:
    body = orjson.dumps(user({"type": "text", "text": "hi"}))
    raw = (b"POST /v1/messages HTTP/1.1\r\nhost: x\r\nx-api-key: " + RELAY_KEY.encode()
           + b"\r\ntransfer-encoding: gzip, chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
    await strict_exchange(relay, raw)


@pytest.mark.parametrize("head, status", [
    (b"HEAD /v1/messages HTTP/1.1\r\nhost: x\r\nx-api-key: KEY\r\ncontent-length: 10\r\n\r\n{", 408),
    (b"HEAD /v1/messages HTTP/1.1\r\nhost: x\r\nx-api-key: KEY\r\ntransfer-encoding: chunked\r\n\r\n{\"model\"", 408),
    (b"HEAD /v1/messages HTTP/1.1\r\nhost: x\r\nx-api-key: KEY\r\ncontent-length: 999999999999\r\n\r\n", 413),
    (b"HEAD /v1/messages HTTP/1.1\r\nhost: x\r\ncontent-length: 10\r\n\r\n{", 401),  # no key: refused on the head
], ids=["408-content-length", "408-chunked", "413", "401-before-the-body"])
async def test_head_request_errors_with_a_body_get_their_status(nursery: trio.Nursery, upstream: MockUpstream, head: bytes,
                                                          status: int) -> None:
    relay = await start_relay(nursery, relay_config(upstream.base_url).replace("[server]", "[server]\nheader_timeout = 0.3"))
    with trap_relay_logs() as trap:
        answer = await roundtrip(relay.port, head.replace(b"KEY", RELAY_KEY.encode()), method="HEAD", timeout=5)
        await relay_idle(relay)
    assert not trap.crashes, trap.describe()
    assert answer.status == status and answer.body == b""


async def test_unfinished_request_head_gets_a_408(nursery: trio.Nursery, upstream: MockUpstream) -> None:
    config = relay_config(upstream.base_url).replace("[server]", "[server]\nheader_timeout = 0.3\nidle_timeout = 1.5")
    relay = await start_relay(nursery, config)
    answer = await roundtrip(relay.port, b"POST /v1/messages HTTP/1.1\r\nhost: x\r\ncontent-le", timeout=5)
    assert answer.status == 408, f"no 408: {answer.note} after {answer.elapsed:.2f}s"
    assert answer.elapsed < 1.2
    assert_clean(answer)
