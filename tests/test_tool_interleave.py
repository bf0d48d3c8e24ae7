"""Interleaved parallel tool calls (issue 13 item 2): servers that stream the argument fragments of several calls
in turn (``index`` 0, 1, 0, ...) still give each ``tool_use`` block exactly its own call's arguments.

Anthropic's stream has one open block at a time, so a call whose fragments arrive while another call's block is
open (and that call's arguments are not yet whole) waits; nothing else does. Checked the way relay's streams are
checked: any interleaving of any calls (hypothesis), any split of the bytes, the strict grammar, the SDK's own
accumulator and streaming client as judges, and over loopback with the SDK as the client.
"""

from __future__ import annotations

import json
from typing import Any

import anthropic
import orjson
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.formats.openai_chat.stream import StreamTranslator
from tests.anthropic_events import assert_same_message, check_body, parse_sse, sdk_accumulate, sdk_final_message
from tests.format_mocks import client, format_relay, run
from tests.mock_upstream import MockUpstream, Reply, chunk, sse
from tests.test_stream_splits import hot_cuts, splits

MODEL = "claude-sonnet-4-5"
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
USER = [{"role": "user", "content": "weather in Paris and Oslo?"}]
TOOLS = [{"name": "get_weather", "description": "Weather for a city",
          "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]


def call_start(index: int, call_id: str, name: str, args: str = "") -> dict[str, Any]:
    return chunk({"tool_calls": [{"index": index, "id": call_id, "type": "function",
                                  "function": {"name": name, "arguments": args}}]})


def fragment(index: int, args: str) -> dict[str, Any]:
    return chunk({"tool_calls": [{"index": index, "function": {"arguments": args}}]})


def body(*chunks: dict[str, Any], finish: bool = True) -> bytes:
    tail = [chunk({}, "tool_calls"), chunk(choices=False, usage={"prompt_tokens": 30, "completion_tokens": 9})]
    return b"".join(p for p in sse(chunk({"role": "assistant", "content": None}), *chunks,
                                   *(tail if finish else []), done=finish) if isinstance(p, bytes))


# index 0, 1, 0, 1: the shape that used to put Oslo's fragments into Paris's block
INTERLEAVED = body(
    call_start(0, "call_a", "get_weather"), call_start(1, "call_b", "get_weather"),
    fragment(0, '{"ci'), fragment(1, '{"city": '), fragment(0, 'ty": "Par'), fragment(1, '"Oslo"}'),
    fragment(0, 'is"}'),
)
EXPECTED = [("tool_use", "call_a", "get_weather", {"city": "Paris"}),
            ("tool_use", "call_b", "get_weather", {"city": "Oslo"})]


def translate(pieces: list[bytes]) -> tuple[StreamTranslator, bytes, list[bytes]]:
    t = StreamTranslator(MODEL, input_tokens_hint=3, message_id="msg_01fixed")
    outs = [t.feed(piece) for piece in pieces]
    outs.append(t.finish())
    return t, b"".join(outs), outs


def judged(out: bytes) -> dict[str, Any]:
    """The message, after the strict grammar, the SDK's accumulator and its streaming client all read the same."""
    outcome = check_body(out, strict=True, model=MODEL)
    assert outcome.message is not None and outcome.error is None
    assert_same_message(outcome.message, sdk_accumulate(outcome.events))
    assert_same_message(outcome.message, sdk_final_message(out).to_dict())
    return outcome.message


def tools_of(message: dict[str, Any]) -> list[tuple[str, str, str, Any]]:
    return [(b["type"], b["id"], b["name"], b["input"]) for b in message["content"]]


def test_interleaved_calls_keep_their_own_arguments() -> None:
    _, out, _ = translate([INTERLEAVED])
    message = judged(out)
    assert tools_of(message) == EXPECTED and message["stop_reason"] == "tool_use"


def test_only_the_waiting_call_is_held() -> None:
    """The open call's fragments go out in the read they arrive in; the other call's block opens (with what it
    gathered) the moment the open call's arguments are whole, then streams live."""
    chunks = [call_start(0, "call_a", "get_weather"), call_start(1, "call_b", "get_weather"),
              fragment(0, '{"ci'), fragment(1, '{"city": '), fragment(0, 'ty": "Paris"}'), fragment(1, '"Oslo"}')]
    pieces = [b"data: " + orjson.dumps(c) + b"\n\n" for c in [chunk({"role": "assistant"}), *chunks]]
    _, _, outs = translate([*pieces, b"data: [DONE]\n\n"])
    deltas = [[(d.get("index"), d["delta"]["partial_json"]) for n, d in parse_sse(o) if n == "content_block_delta"]
              for o in outs]
    assert deltas[3] == [(0, '{"ci')]  # call 0's fragment: at once
    assert deltas[4] == []  # call 1's fragment while call 0 is open and unfinished: waits
    assert deltas[5] == [(0, 'ty": "Paris"}'), (1, '{"city": ')]  # call 0 whole: call 1 opens with what it had
    assert deltas[6] == [(1, '"Oslo"}')]  # and streams live from then on


def test_sequential_calls_are_never_held() -> None:
    """The usual shape (each call whole before the next starts) streams every call as it comes."""
    chunks = [call_start(0, "call_a", "get_weather", '{"city": "Paris"}'), call_start(1, "call_b", "get_weather"),
              fragment(1, '{"city": '), fragment(1, '"Oslo"}')]
    pieces = [b"data: " + orjson.dumps(c) + b"\n\n" for c in chunks]
    _, _, outs = translate([*pieces, b"data: [DONE]\n\n"])
    started = [[d["content_block"]["id"] for n, d in parse_sse(o) if n == "content_block_start"] for o in outs]
    assert started[:2] == [["call_a"], ["call_b"]]
    assert [len(parse_sse(o)) for o in outs[2:4]] == [1, 1]  # one delta per read


def test_ollama_same_index_different_ids() -> None:
    """Ollama gives every call of a batch index 0; the ids tell them apart."""
    _, out, _ = translate([body(call_start(0, "call_a", "get_weather", '{"city": "Paris"}'),
                                call_start(0, "call_b", "get_weather", '{"city": "Oslo"}'))])
    assert tools_of(judged(out)) == EXPECTED


def test_held_call_with_unfinished_open_call_closes_at_the_end() -> None:
    """An open call whose arguments never become whole JSON: the held call still gets its block, at the finish."""
    _, out, _ = translate([body(call_start(0, "call_a", "get_weather", '{"city": "Paris"'),
                                call_start(1, "call_b", "get_weather", '{"city": "Oslo"}'))])
    events = parse_sse(out)
    inputs = [d["delta"]["partial_json"] for n, d in events if n == "content_block_delta"]
    starts = [d["content_block"]["id"] for n, d in events if n == "content_block_start"]
    assert starts == ["call_a", "call_b"] and inputs == ['{"city": "Paris"', '{"city": "Oslo"}']


def test_text_after_held_calls() -> None:
    _, out, _ = translate([body(call_start(0, "call_a", "get_weather", '{"city": '),
                                call_start(1, "call_b", "get_weather", '{"city": "Oslo"}'),
                                fragment(0, '"Paris"}'), chunk({"content": "Checking both."}))])
    message = judged(out)
    assert tools_of({"content": message["content"][:2]}) == EXPECTED
    assert message["content"][2] == {"type": "text", "text": "Checking both."}


def test_error_drops_held_calls() -> None:
    """A stream that fails while a call waits: that call is never shown (its arguments may be partial)."""
    _, out, _ = translate([body(call_start(0, "call_a", "get_weather", '{"ci'),
                                call_start(1, "call_b", "get_weather", '{"city": "Oslo"}'), finish=False)])
    events = parse_sse(out)
    assert [d["content_block"]["id"] for n, d in events if n == "content_block_start"] == ["call_a"]
    assert events[-1][0] == "error" and "before finishing" in events[-1][1]["error"]["message"]


# ---- the property: any calls, any interleaving, any split ------------------------------------------------

JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-999, 999) | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                       max_size=3), max_leaves=6)


@st.composite
def interleaved_stream(draw: Any) -> tuple[bytes, list[tuple[str, str, str, Any]]]:
    """Up to four calls, each one's arguments cut into fragments, the fragments of all calls shuffled together
    (each call's own order kept; its first fragment carries id and name, as OpenAI sends it)."""
    count = draw(st.integers(1, 4))
    calls = []
    for n in range(count):
        args = draw(st.dictionaries(st.text(max_size=6), JSON_VALUES, max_size=3))
        text = json.dumps(args, ensure_ascii=draw(st.booleans()))
        cuts = sorted(set(draw(st.lists(st.integers(1, max(1, len(text) - 1)), max_size=5))))
        edges = [0, *cuts, len(text)]
        frags = [text[a:b] for a, b in zip(edges, edges[1:]) if b > a]
        calls.append((f"call_{n}", f"tool_{n}", args, frags))
    queues = [[(n, i) for i in range(len(c[3]))] for n, c in enumerate(calls)]
    order: list[tuple[int, int]] = []
    first_seen: list[int] = []
    while any(queues):
        n = draw(st.sampled_from([k for k, q in enumerate(queues) if q]))
        order.append(queues[n].pop(0))
        if n not in first_seen:
            first_seen.append(n)
    chunks = []
    for n, i in order:
        call_id, name, _, frags = calls[n]
        chunks.append(call_start(n, call_id, name, frags[i]) if i == 0 else fragment(n, frags[i]))
    expected = [("tool_use", calls[n][0], calls[n][1], calls[n][2]) for n in first_seen]
    return body(*chunks), expected


@SETTINGS
@given(case=interleaved_stream(), data=st.data())
def test_any_interleaving_any_split(case: tuple[bytes, list[Any]], data: st.DataObject) -> None:
    source, expected = case
    pieces = data.draw(splits(source, hot_cuts(source)))
    _, out, _ = translate(pieces)
    message = judged(out)
    assert tools_of(message) == expected
    assert message["stop_reason"] == "tool_use"
    assert translate([source])[1] == out  # the same events however the bytes were cut


# ---- over loopback, the SDK as the client --------------------------------------------------------------

async def test_sdk_streams_interleaved_calls(nursery: trio.Nursery) -> None:
    upstream = MockUpstream(lambda r: Reply(pieces=[INTERLEAVED]))
    await nursery.start(upstream.serve)
    relay = await format_relay(nursery, upstream, "openai")

    def go() -> tuple[anthropic.types.Message, list[str]]:
        partials: list[str] = []
        with client(relay).messages.stream(model="up-model", max_tokens=50, messages=USER, tools=TOOLS) as stream:
            for event in stream:
                if event.type == "input_json":
                    partials.append(event.partial_json)
            return stream.get_final_message(), partials

    message, partials = await run(go)
    assert [(b.type, b.id, b.name, b.input) for b in message.content] == EXPECTED  # type: ignore[union-attr]
    assert message.stop_reason == "tool_use"
    assert "".join(partials) == '{"city": "Paris"}{"city": "Oslo"}'
