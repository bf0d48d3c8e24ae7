"""relay's body reader must read what h11 reads: the same body bytes, the same SSE events as the SSE parser makes
of that body, the same end (complete, or h11's error in h11's words), and the same bytes left after the end,
however the bytes are cut into reads. Heads are judged by h11 in both cases (httpcore reads them)."""

from __future__ import annotations

from pathlib import Path

import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.reader import CHUNKED, LENGTH, UNTIL_CLOSE, BodyReader, framing, keeps_alive
from relay.sse import SSEParser

CORPUS = Path(__file__).parent / "fixtures" / "corpus"
REQUEST = h11.Request(method="POST", target="/v1/chat/completions", headers=[("host", "x"), ("content-length", "0")])
CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"

Outcome = tuple[bytes, str, bytes]  # body, how it ended, bytes after the end


def _h11_client() -> h11.Connection:
    conn = h11.Connection(h11.CLIENT)
    conn.send(REQUEST)
    conn.send(h11.EndOfMessage())
    return conn


def h11_read(reads: list[bytes]) -> Outcome:
    """The body as h11 reads it from ``reads`` (then EOF), how it ended, and what it left unread after the end."""
    conn = _h11_client()
    body = b""
    feed = iter(reads)
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(next(feed, b""))
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return body, "ok", conn.trailing_data[0] + b"".join(feed)
            elif isinstance(event, h11.ConnectionClosed):
                return body, "closed", b""
    except h11.RemoteProtocolError as exc:
        return body, f"error: {exc}", b""


def _head(reads: list[bytes]) -> tuple[h11.Response, bytes, list[bytes]]:
    """What httpcore hands over: the parsed head, the bytes after it, and the reads not yet made."""
    conn = _h11_client()
    feed = iter(reads)
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(next(feed))
        elif isinstance(event, h11.Response):
            return event, conn.trailing_data[0], list(feed)


def our_read(reads: list[bytes]) -> tuple[Outcome, list]:
    """Our reader over the same reads, twice: for the body bytes, and for the SSE events."""
    head, first, rest = _head(reads)
    reader = BodyReader(*framing(head.status_code, head.headers.raw_items()))
    events = BodyReader(*framing(head.status_code, head.headers.raw_items()))
    body, got = b"", []
    for data in ([first] if first else []) + rest + [b""]:  # an empty rest of the head's read is no EOF
        if not data and reader.done:
            break
        body += reader.feed(data)
        got.extend(events.feed_events(data))
        assert (events.done, events.extra, str(events.error)) == (reader.done, reader.extra, str(reader.error))
        if reader.error is not None:
            return (body, f"error: {reader.error}", b""), got
    if not reader.done:
        return (body, "open", b""), got
    return (body, "ok", reader.extra), got


def sse_events(body: bytes, ended: bool) -> list:
    parser = SSEParser()
    out = parser.feed(body)
    return out + parser.close() if ended else out


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:]) if b > a]


def chunked(parts: list[bytes], *, head: bytes = CHUNKED_HEAD, trailer: bytes = b"", ext: bytes = b"") -> bytes:
    return head + b"".join(b"%x%b\r\n%b\r\n" % (len(p), ext, p) for p in parts if p) + b"0\r\n" + trailer + b"\r\n"


def same_as_h11(reads: list[bytes]) -> Outcome:
    ours, _ = our_read(reads)
    theirs = h11_read(reads)
    assert ours == theirs
    return theirs


SSE = [b'data: {"choices":[{"delta":{"content":"hi %d"}}]}\n\n' % i for i in range(50)] + [b"data: [DONE]\n\n"]


def test_one_read_of_many_chunks_gives_every_event():
    raw = chunked(SSE)
    ours, events = our_read([raw])
    assert ours == h11_read([raw]) == (b"".join(SSE), "ok", b"")
    assert events == sse_events(b"".join(SSE), True)
    assert len(events) == 51


@settings(max_examples=300, deadline=None)
@given(parts=st.lists(st.binary(min_size=1, max_size=40), max_size=12), cuts=st.lists(st.integers(0, 2000), max_size=12),
       ext=st.booleans(), trailer=st.sampled_from([b"", b"x-t: 1\r\n", b"x-a: 1\r\n folded\r\n", b"x-b:\r\n"]))
def test_any_cut_gives_what_h11_reads(parts, cuts, ext, trailer):
    reads = split(chunked(parts, trailer=trailer, ext=b";e=1" if ext else b""), cuts)
    assert same_as_h11(reads) == (b"".join(parts), "ok", b"")


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=300), cuts=st.lists(st.integers(0, 400), max_size=8))
def test_garbage_after_a_chunked_head_fails_the_same_way(data, cuts):
    same_as_h11(split(CHUNKED_HEAD + data, cuts))


@settings(max_examples=400, deadline=None)
@given(parts=st.lists(st.binary(min_size=1, max_size=30), min_size=1, max_size=6), at=st.integers(0, 400),
       byte=st.binary(min_size=0, max_size=2), how=st.sampled_from(["replace", "insert", "cut", "append"]),
       cuts=st.lists(st.integers(0, 400), max_size=6))
def test_every_framing_error_is_h11s(parts, at, byte, how, cuts):
    """A valid body with one byte changed, inserted, the connection cut at any point, or bytes after the end."""
    raw = chunked(parts)
    i = len(CHUNKED_HEAD) + at % (len(raw) - len(CHUNKED_HEAD))
    if how == "replace":
        raw = raw[:i] + byte + raw[i + 1:]
    elif how == "insert":
        raw = raw[:i] + byte + raw[i:]
    elif how == "cut":
        raw = raw[:i]
    else:
        raw += byte
    same_as_h11(split(raw, cuts))


@settings(max_examples=200, deadline=None)
@given(body=st.binary(max_size=200), declared=st.integers(0, 250), cuts=st.lists(st.integers(0, 400), max_size=6))
def test_content_length_bodies(body, declared, cuts):
    """Shorter than declared: h11's error; longer: the rest is left after the end (and the pool closes)."""
    raw = b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%b" % (declared, body)
    ours = same_as_h11(split(raw, cuts))
    assert ours[1] != "ok" or ours[0] == body[:declared]


@settings(max_examples=100, deadline=None)
@given(body=st.binary(max_size=200), cuts=st.lists(st.integers(0, 400), max_size=6))
def test_read_until_close(body, cuts):
    raw = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\n" + body
    assert same_as_h11(split(raw, cuts)) == (body, "ok", b"")


@settings(max_examples=300, deadline=None)
@given(events=st.lists(st.tuples(st.sampled_from([b"data: ", b"data:", b"event: x\ndata: ", b": ping\ndata: "]),
                                 st.text(max_size=30).map(lambda t: t.replace("\n", " ").replace("\r", " ").encode()),
                                 st.sampled_from([b"\n\n", b"\r\n\r\n", b"\r\r"])), max_size=10),
       chunking=st.lists(st.integers(1, 60), max_size=10), cuts=st.lists(st.integers(0, 1200), max_size=10),
       final_blank=st.booleans())
def test_events_match_the_sse_parser_for_any_chunking_and_cut(events, chunking, cuts, final_blank):
    """Events cut into chunks anywhere (not only at event ends), chunks cut into reads anywhere."""
    stream = b"".join(a + b + c for a, b, c in events)
    if not final_blank and stream.endswith(b"\n\n"):
        stream = stream[:-2] + b"\n"
    parts = split(stream, [sum(chunking[:i + 1]) for i in range(len(chunking))])
    reads = split(chunked(parts), cuts)
    ours, got = our_read(reads)
    assert ours == h11_read(reads) == (stream, "ok", b"")
    assert got == sse_events(stream, True)


@settings(max_examples=300, deadline=None)
@given(events=st.lists(st.tuples(st.sampled_from([b"data: ", b"data:", b"data:  ", b"event: x\ndata: ", b"data: x\r",
                                                   b"data: y\ndata: "]),
                                 st.text(max_size=30).map(lambda t: t.replace("\n", " ").replace("\r", " ").encode()),
                                 st.sampled_from([b"\n\n", b"\r\n\r\n", b"\n", b"\r", b""])), max_size=10),
       per_event=st.booleans(), chunking=st.lists(st.integers(1, 60), max_size=10), upper=st.booleans())
def test_one_read_per_chunk_gives_the_sse_parsers_events(events, per_event, chunking, upper):
    """The paced shape: every read exactly one chunk (the reader's fast paths), each chunk one event or cut
    anywhere (so an event may be pending when the next chunk comes), size lines in either case of hex."""
    stream = b"".join(a + b + c for a, b, c in events)
    if per_event:
        parts = [a + b + c for a, b, c in events if a + b + c]
    else:
        parts = split(stream, [sum(chunking[:i + 1]) for i in range(len(chunking))])
    size = b"%X\r\n%b\r\n" if upper else b"%x\r\n%b\r\n"
    reads = [CHUNKED_HEAD] + [size % (len(p), p) for p in parts] + [b"0\r\n\r\n"]
    ours, got = our_read(reads)
    assert ours == h11_read(reads) == (stream, "ok", b"")
    assert got == sse_events(stream, True)


@settings(max_examples=400, deadline=None)
@given(events=st.lists(st.tuples(st.sampled_from([b"data: "] * 12 + [b"data:", b"event: x\ndata: ", b"data: x\r",
                                                                 b": ping\ndata: ", b"data: y\ndata: "]),
                                 st.text(max_size=30).map(lambda t: t.replace("\n", " ").replace("\r", " ").encode()),
                                 st.sampled_from([b"\n\n"] * 12 + [b"\r\n\r\n", b"\n", b"\r\n5\r\ndata: \n\n",
                                                                    b"\n\n\r\n7\r\ndata: Q\n\n"])),
                       min_size=1, max_size=12),
       groups=st.lists(st.integers(1, 6), max_size=6), upper=st.booleans(),
       last=st.sampled_from([b"0\r\n\r\n", b"0\r\n\r\n", b"00\r\n\r\n", b"0\r\nx-t: 1\r\n\r\n", b"0;e\r\n\r\n"]),
       apart=st.booleans(), after=st.sampled_from([b"", b"", b"HTTP/1.1 200"]),
       lie=st.one_of(st.none(), st.tuples(st.integers(0, 11), st.sampled_from([-7, -1, 1, 2, 9]))))
def test_reads_of_whole_chunks_give_the_sse_parsers_events(events, groups, upper, last, apart, after, lie):
    """The burst shape: every read a few whole chunks of one event each (the reader's ``_run``), the last chunk in
    the last read or apart, with near misses of the shape (no space after ``data:``, a named event, a CR, a
    comment, two data lines, a CRLF inside a chunk's data that a split on CRLF would cut, odd last chunks)."""
    parts = [a + b + c for a, b, c in events]
    size = b"%X\r\n%b\r\n" if upper else b"%x\r\n%b\r\n"
    frames = [size % (len(p), p) for p in parts]
    if lie is not None and len(parts[lie[0] % len(parts)]) + lie[1] > 0:  # a broken upstream's size
        at = lie[0] % len(parts)
        frames[at] = size % (len(parts[at]) + lie[1], parts[at])
    reads, at = [], 0
    for n in groups + [len(frames)]:
        if at < len(frames):
            reads.append(b"".join(frames[at:at + n]))
            at += n
    if apart:
        reads.append(last + after)
    else:
        reads[-1] += last + after
    ours, got = our_read([CHUNKED_HEAD] + reads)
    theirs = h11_read([CHUNKED_HEAD] + reads)
    assert ours == theirs
    if lie is None:
        stream = b"".join(parts)
        assert theirs == (stream, "ok", after)
        assert got == sse_events(stream, True)
    else:  # the events of what h11 delivered before it stopped (the reader's feed and feed_events agree on the end)
        assert got == sse_events(theirs[0], theirs[1] == "ok")


@pytest.mark.parametrize("read", [b"8\n\n\r\n8\n\n\r\n", b"8\n\n\r\n08\n\n\r\n0\r\n\r\n", b"9\r\ndata: a\n\n\r\n8\n\n\r\n",
                                  b"9\r\ndata: a\n\n\r\n8\n\n\r\n0\r\n\r\n"])
def test_a_burst_read_with_a_chunk_that_is_only_a_size_fails_as_h11_does(read):
    """A read ending like a burst whose pieces include a bare hex "8" before the split's bytes: "8" is no size line
    (no CRLF), yet 8 is the length of an empty payload's "data: \n\n"; h11 refuses the chunk header, so must we."""
    ours, got = our_read([CHUNKED_HEAD, read])
    assert ours == h11_read([CHUNKED_HEAD, read])
    assert ours[1].startswith("error: illegal chunk header")
    assert got == sse_events(ours[0], False)


def test_a_burst_is_read_as_a_run_and_the_run_path_gives_way():
    """Many whole chunks in one read go through ``_run`` (every event, the end seen); a read of chunks that hold
    something else falls back to the general path and ends the tries; a read cut mid-chunk only falls back."""
    frames = [b"%x\r\n%b\r\n" % (len(e), e) for e in SSE]
    reader = BodyReader(CHUNKED)
    assert reader._run(b"".join(frames) + b"0\r\n\r\n") is not None and reader.done
    reader = BodyReader(CHUNKED)
    assert reader.feed_events(b"".join(frames[:10])) == sse_events(b"".join(SSE[:10]), False)
    assert reader._runs
    cut = b"".join(frames[10:20])
    assert reader.feed_events(cut[:-3]) + reader.feed_events(cut[-3:]) == sse_events(b"".join(SSE[10:20]), False)
    assert reader._runs
    named = [b"event: delta\ndata: {}\n\n"] * 3
    assert reader.feed_events(b"".join(b"%x\r\n%b\r\n" % (len(e), e) for e in named)) == [(b"delta", b"{}")] * 3
    assert not reader._runs
    assert reader.feed_events(b"".join(frames[20:]) + b"0\r\n\r\n") == sse_events(b"".join(SSE[20:]), True)
    assert reader.done and reader.clean


@pytest.mark.parametrize("name", sorted(p.name for p in CORPUS.glob("*.sse")))
def test_corpus_one_chunk_per_event_and_cut_reads(name):
    stream = (CORPUS / name).read_bytes()
    blocks = [b for b in stream.replace(b"\r\n", b"\n").split(b"\n\n")]
    parts = [b + b"\n\n" for b in blocks[:-1]] + ([blocks[-1]] if blocks[-1] else [])
    body = b"".join(parts)
    raw = chunked(parts)
    expected = sse_events(body, True)
    for reads in ([raw], split(raw, list(range(7, len(raw), 61))), [raw[i:i + 1] for i in range(len(raw))][:4000]):
        if b"".join(reads) != raw:
            continue
        ours, got = our_read(reads)
        assert ours == (body, "ok", b"")
        assert got == expected


def test_a_cut_body_reports_h11s_words():
    raw = chunked(SSE[:3])[:-10]
    ours, _ = our_read([raw])
    assert ours[1] == "error: peer closed connection without sending complete message body (incomplete chunked read)"
    short = b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc"
    assert our_read([short])[0][1] == ("error: peer closed connection without sending complete message body "
                                       "(received 3 bytes, expected 10)")


def test_data_before_a_framing_error_is_still_delivered():
    raw = CHUNKED_HEAD + b"5\r\nhello\r\nzz\r\n"
    reader = BodyReader(CHUNKED)
    assert reader.feed(raw[len(CHUNKED_HEAD):]) == b"hello"
    assert str(reader.error) == "illegal chunk header: bytearray(b'zz\\r\\n')"
    assert not reader.clean


def test_clean_only_at_a_complete_end_with_nothing_after_it():
    body = chunked(SSE[:2], head=b"")
    reader = BodyReader(CHUNKED)
    reader.feed(body[:-1])
    assert not reader.done and not reader.clean
    reader.feed(body[-1:])
    assert reader.clean
    garbage = BodyReader(CHUNKED)
    garbage.feed(body + b"x")
    assert garbage.done and garbage.extra == b"x" and not garbage.clean
    closed = BodyReader(UNTIL_CLOSE)
    closed.feed(b"abc")
    closed.feed(b"")
    assert closed.done and not closed.clean  # its end was the connection's


def test_framing_and_keep_alive_follow_the_head():
    assert framing(200, [(b"Transfer-Encoding", b"chunked"), (b"content-length", b"5")]) == (CHUNKED, 0)
    assert framing(200, [(b"content-length", b"5")]) == (LENGTH, 5)
    assert framing(204, [(b"transfer-encoding", b"chunked")]) == (LENGTH, 0)
    assert framing(200, [(b"content-length", b"5")], b"HEAD") == (LENGTH, 0)
    assert framing(200, []) == (UNTIL_CLOSE, 0)
    assert keeps_alive(b"HTTP/1.1", [(b"Connection", b"keep-alive")])
    assert not keeps_alive(b"HTTP/1.1", [(b"connection", b"foo, Close")])
    assert not keeps_alive(b"HTTP/1.0", [])


def test_size_lines_h11_refuses_stay_refused():
    for size in (b" 2", b"0x2", b"1_0", b"+2", b"2\x0b", b"2 ;x\nz", b"\n2", b"1" * 21):
        raw = CHUNKED_HEAD + b"2\r\nok\r\n%b\r\nok\r\n2\r\nok\r\n0\r\n\r\n" % size
        assert same_as_h11([raw])[1].startswith("error"), size
