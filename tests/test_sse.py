"""relay.sse, the upstream SSE parser, held to the official anthropic SDK's own SSE decoder: the corpus in every
line-end and field spelling, events generated with every field form, and any split of them into reads."""

from __future__ import annotations

import pytest
from anthropic._streaming import SSEDecoder
from hypothesis import given
from hypothesis import strategies as st

from relay.sse import SSEParser
from tests.test_stream_splits import ALL_STREAMS, CORPUS, SETTINGS, TARGET_STREAMS, respelled_splits, variants


def parse(pieces: list[bytes]) -> list[tuple[bytes | None, bytes]]:
    parser = SSEParser()
    events = [event for piece in pieces for event in parser.feed(piece)]
    return events + parser.close()


def sdk_events(data: bytes) -> list[tuple[bytes | None, bytes]]:
    """What the official SDK's SSE decoder reads (events that carry data)."""
    return [(None if e.event is None else e.event.encode(), e.data.encode())
            for e in SSEDecoder().iter_bytes(iter([data])) if e.data]


@pytest.mark.parametrize("variant", ["lf", "crlf", "cr", "nospace"])
@pytest.mark.parametrize("name", ALL_STREAMS)
def test_parser_agrees_with_the_sdk_decoder(name: str, variant: str) -> None:
    data = variants((CORPUS / name).read_bytes())[variant]
    if not data.endswith((b"\n\n", b"\r\r", b"\r\n\r\n")):
        data += data[-1:]  # the SDK's decoder drops a final event with no blank line after it; relay keeps it
    assert parse([data]) == sdk_events(data)


@pytest.mark.parametrize("name", TARGET_STREAMS)
@SETTINGS
@given(data=st.data())
def test_parser_any_split_of_named_events(name: str, data: st.DataObject) -> None:
    """Anthropic-format files have ``event:`` lines, which OpenAI streams lack: names must survive any split."""
    source = (CORPUS / name).read_bytes()
    assert parse(data.draw(respelled_splits(source))) == parse([source])


def test_empty_read_between_cr_and_lf() -> None:
    data = b"event: x\r\ndata: y\r\n\r\n"
    cut = data.index(b"\r") + 1
    assert parse([data[:cut], b"", data[cut:]]) == parse([data]) == [(b"x", b"y")]




# ---- generated events: every field form the SSE grammar allows ---------------------------------------------

_TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n\x00"), max_size=12)


@st.composite
def event_stream(draw: st.DrawFn) -> bytes:
    """Events with a name or none, one to three data lines (with or without the space, empty ones too), comments,
    unknown fields, in one line-end spelling; each ends with a blank line. No id/retry: the SDK keeps an id across
    events and reports data-less events, where relay (which reads only data) has nothing to say. No empty event
    name: the SDK reads ``event:`` alone as no name, relay as the empty name (no upstream relay speaks to sends
    one; the spec's default name applies to both)."""
    end = draw(st.sampled_from(["\n", "\r\n", "\r"]))
    lines: list[str] = []
    for _ in range(draw(st.integers(1, 6))):
        if draw(st.booleans()):
            lines.append(":" + draw(_TEXT))  # a comment (a keep-alive)
        if draw(st.booleans()):
            lines.append("event:" + draw(st.sampled_from(["", " "])) + draw(_TEXT.filter(lambda t: t.strip() != "" and ":" not in t)))
        for _ in range(draw(st.integers(1, 3))):
            lines.append("data" + draw(st.sampled_from([":", ": "])) + draw(_TEXT))
        if draw(st.booleans()):
            lines.append("x-unknown: " + draw(_TEXT))
        lines.append("")
    return (end.join(lines) + end).encode()


@SETTINGS
@given(data=st.data())
def test_generated_events_any_split_agree_with_the_sdk(data: st.DataObject) -> None:
    stream = data.draw(event_stream(), label="stream")
    cuts = sorted(set(data.draw(st.lists(st.integers(1, max(1, len(stream) - 1)), max_size=20), label="cuts")))
    edges = [0, *cuts, len(stream)]
    pieces = [stream[a:b] for a, b in zip(edges, edges[1:]) if b > a]
    every = [(None if e.event is None else e.event.encode(), e.data.encode())  # each event here carries data
             for e in SSEDecoder().iter_bytes(iter([stream]))]
    assert parse(pieces) == every
