"""Property: however the upstream's bytes are cut into reads, relay produces the same events.

For every corpus stream, any split of the byte stream (random cut points, and cuts chosen where parsers break:
between CR and LF, inside multi-byte UTF-8 characters, inside ``data:``, between the two line ends of a blank
line) gives, concatenated, the events of feeding it whole, except for what relay generates (tool ids, thinking
signatures, message ids). The same streams rewritten with CRLF or CR line ends, or ``data:`` without the space,
give the same events too.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.formats.openai_chat.stream import StreamTranslator
from tests.anthropic_events import Event, parse_sse
from tests.test_corpus import CORPUS, STREAMS, is_anthropic_stream

SETTINGS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])

OPENAI_STREAMS = sorted(STREAMS)
TARGET_STREAMS = sorted(p.name for p in CORPUS.glob("*.sse") if is_anthropic_stream(p.read_bytes()))
ALL_STREAMS = sorted(p.name for p in CORPUS.glob("*.sse"))


def variants(data: bytes) -> dict[str, bytes]:
    """The same stream in the line-end and field spellings SSE allows."""
    assert b"\r" not in data
    return {
        "lf": data,
        "crlf": data.replace(b"\n", b"\r\n"),
        "cr": data.replace(b"\n", b"\r"),
        "nospace": re.sub(rb"(?m)^(data|event): ", rb"\1:", data),
    }


@lru_cache(maxsize=None)
def hot_cuts(data: bytes) -> list[int]:
    """Cut points where a parser is most likely to go wrong."""
    hot: set[int] = set()
    for i in range(1, len(data)):
        if data[i - 1] == 0x0D and data[i] == 0x0A:  # between CR and LF
            hot.add(i)
        if 0x80 <= data[i] <= 0xBF:  # inside a multi-byte UTF-8 character
            hot.add(i)
        if data[i - 1] in b"\r\n" and data[i] in b"\r\n":  # inside the blank line that ends an event
            hot.add(i)
    for m in re.finditer(rb"data:|event:|\[DONE\]", data):  # inside a field name or the sentinel
        hot.update(range(m.start() + 1, m.end()))
    return sorted(hot)


@st.composite
def splits(draw: Any, data: bytes, hot: list[int]) -> list[bytes]:
    """``data`` cut into non-empty pieces: at random and hot cut points, or in fixed-size reads."""
    n = len(data)
    if n < 2:
        return [data]
    if draw(st.booleans()):
        smallest = max(1, n // 2000)  # byte-by-byte reads of the 300 KB capture would only cost time
        size = draw(st.integers(smallest, max(smallest, 512)))
        first = draw(st.integers(1, size))
        cuts = list(range(first, n, size))
    else:
        point = st.integers(1, n - 1)
        if hot:
            point = st.one_of(point, st.sampled_from(hot))
        cuts = sorted(set(draw(st.lists(point, min_size=1, max_size=80))))
    edges = [0, *cuts, n]
    return [data[a:b] for a, b in zip(edges, edges[1:]) if b > a]


@st.composite
def respelled_splits(draw: Any, source: bytes) -> list[bytes]:
    """``source`` in one of its spellings, then split."""
    spelled = variants(source)[draw(st.sampled_from(sorted(variants(b""))), label="spelling")]
    pieces = draw(splits(spelled, hot_cuts(spelled)), label="pieces")
    assert b"".join(pieces) == spelled
    return pieces


# ---- the translator -----------------------------------------------------------------------------

Outcome = tuple[list[Event], bool, tuple[int, str, str] | None]


def translate(pieces: list[bytes], name: str, source: bytes) -> Outcome:
    """The normalized events, whether the message started, and the upstream error (status, type, message)."""
    case = STREAMS[name]
    translator = StreamTranslator("claude-sonnet-4-5", input_tokens_hint=3, think_tags=case.think_tags,
                                  message_id="msg_01fixed")
    out = b"".join(translator.feed(piece) for piece in pieces) + translator.finish()
    err = translator.error
    return normalized(out, source), translator.started, err and (err.status, err.error_type, err.message)


def normalized(out: bytes, source: bytes) -> list[Event]:
    """The events, with what relay generated (not found in the upstream's bytes) replaced by placeholders.
    (A light parse of relay's own two-line events: test_corpus holds the same output to the strict parser.)"""
    events: list[Event] = []
    if not out:
        return events
    assert out.endswith(b"\n\n")
    for block in out[:-2].split(b"\n\n"):
        head, body = block.split(b"\n")
        assert head.startswith(b"event: ") and body.startswith(b"data: "), block
        events.append((head[7:].decode(), json.loads(body[6:])))
    for name, data in events:
        if name == "message_start":
            data["message"]["id"] = "msg_<id>"
        block = data.get("content_block") or {}
        if block.get("type") == "tool_use" and block["id"].encode() not in source:
            block["id"] = "toolu_<generated>"
        delta = data.get("delta") or {}
        if delta.get("type") == "signature_delta" and delta["signature"].encode() not in source:
            delta["signature"] = "<generated signature>"
    return events


_WHOLE: dict[str, Outcome] = {}


def whole(name: str) -> Outcome:
    if name not in _WHOLE:
        data = (CORPUS / name).read_bytes()
        _WHOLE[name] = translate([data], name, data)
    return _WHOLE[name]


@pytest.mark.parametrize("variant", ["crlf", "cr", "nospace"])
@pytest.mark.parametrize("name", OPENAI_STREAMS)
def test_line_end_and_field_spellings(name: str, variant: str) -> None:
    data = (CORPUS / name).read_bytes()
    assert translate([variants(data)[variant]], name, data) == whole(name)


@pytest.mark.parametrize("name", OPENAI_STREAMS)
def test_byte_at_a_time(name: str) -> None:
    data = (CORPUS / name).read_bytes()
    if len(data) > 20_000:
        pytest.skip("covered by the split property; a byte at a time is slow on the big captures")
    for variant in ("lf", "crlf"):
        spelled = variants(data)[variant]
        assert translate([bytes([b]) for b in spelled], name, data) == whole(name), variant


@pytest.mark.parametrize("name", OPENAI_STREAMS)
@SETTINGS
@given(data=st.data())
def test_any_split_gives_the_same_events(name: str, data: st.DataObject) -> None:
    source = (CORPUS / name).read_bytes()
    assert translate(data.draw(respelled_splits(source)), name, source) == whole(name)


# ---- a read that brings nothing ----------------------------------------------------------------------

def test_empty_read_between_cr_and_lf_in_a_chunk() -> None:
    data = b'data: {"choices":[{"index":0,"delta":\r\ndata: {"content":"Hi"}}]}\r\n\r\ndata: [DONE]\r\n\r\n'
    cut = data.index(b"\r") + 1
    translator = StreamTranslator("m")
    out = b"".join(translator.feed(piece) for piece in (data[:cut], b"", data[cut:])) + translator.finish()
    message = [e for e in parse_sse(out) if e[0] == "content_block_delta"]
    assert [d["delta"]["text"] for _, d in message] == ["Hi"]
