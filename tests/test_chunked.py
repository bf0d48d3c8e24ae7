"""The chunk merger must never change what h11 makes of a response: same body bytes, same errors, same end,
however the bytes are cut into reads. It must also actually merge (else it is only overhead)."""

from __future__ import annotations

import h11
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.chunked import ChunkMerger

REQUEST = h11.Request(method="POST", target="/v1/chat/completions", headers=[("host", "x"), ("content-length", "0")])


def h11_read(reads: list[bytes], *, responses: int = 1) -> tuple[list[bytes], str]:
    """Body bytes of each response as h11 sees them, and how it ended ("ok" or the error)."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(REQUEST)
    conn.send(h11.EndOfMessage())
    bodies: list[bytes] = []
    body = b""
    done = 0
    feed = iter(reads)
    try:
        while done < responses:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(next(feed, b""))
                continue
            if isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                bodies.append(body)
                body = b""
                done += 1
                if done < responses:
                    conn.start_next_cycle()
                    conn.send(REQUEST)
                    conn.send(h11.EndOfMessage())
            elif isinstance(event, h11.ConnectionClosed):
                return bodies, "closed"
    except h11.RemoteProtocolError as exc:
        return bodies, f"error: {exc}"
    return bodies, "ok"


def merged(reads: list[bytes], boundaries: tuple[int, ...] = (0,)) -> list[bytes]:
    """``reads`` through a merger; ``boundaries`` are the read indexes where a new request went out."""
    merger = ChunkMerger()
    out = []
    for i, data in enumerate(reads):
        if i in boundaries:
            merger.expect_response()
        out.append(merger.feed(data))
    return out


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:]) if b > a]


def chunked(parts: list[bytes], *, head: bytes = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
            trailer: bytes = b"", ext: bytes = b"") -> bytes:
    return head + b"".join(b"%x%b\r\n%b\r\n" % (len(p), ext, p) for p in parts if p) + b"0\r\n" + trailer + b"\r\n"


SSE = [b'data: {"choices":[{"delta":{"content":"hi %d"}}]}\n\n' % i for i in range(50)] + [b"data: [DONE]\n\n"]


def test_one_read_of_many_chunks_becomes_one_chunk_and_the_same_body():
    raw = chunked(SSE)
    out = merged([raw])
    assert h11_read(out) == h11_read([raw]) == ([b"".join(SSE)], "ok")
    head_end = out[0].index(b"\r\n\r\n") + 4
    assert out[0][head_end:].count(b"\r\n") == 4  # one data chunk (size line, data), the last chunk and its blank line


def test_a_chunk_cut_by_the_end_of_a_read_goes_out_at_once():
    raw = chunked(SSE[:3])
    cut = raw.index(b"hi 1") + 2
    out = merged([raw[:cut], raw[cut:]])
    assert out[0].endswith(b"hi")  # nothing held back
    assert h11_read(out) == ([b"".join(SSE[:3])], "ok")


@settings(max_examples=300, deadline=None)
@given(parts=st.lists(st.binary(min_size=1, max_size=40), max_size=12), cuts=st.lists(st.integers(0, 2000), max_size=12),
       ext=st.booleans(), trailer=st.booleans())
def test_any_cut_gives_what_h11_reads_from_the_original(parts, cuts, ext, trailer):
    raw = chunked(parts, trailer=b"x-t: 1\r\n" if trailer else b"", ext=b";e=1" if ext else b"")
    reads = split(raw, cuts)
    out = merged(reads)
    assert h11_read(out) == h11_read(reads) == ([b"".join(parts)], "ok")
    assert sum(map(len, out)) <= sum(map(len, reads))  # merging only ever drops framing


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=300), cuts=st.lists(st.integers(0, 400), max_size=8))
def test_garbage_after_a_chunked_head_fails_the_same_way(data, cuts):
    raw = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + data
    reads = split(raw, cuts)
    assert h11_read(merged(reads)) == h11_read(reads)


@settings(max_examples=200, deadline=None)
@given(first=st.lists(st.binary(min_size=1, max_size=20), max_size=6), second=st.lists(st.binary(min_size=1, max_size=20), max_size=6),
       cuts=st.lists(st.integers(0, 600), max_size=8), interim=st.booleans(), sized=st.booleans())
def test_two_responses_on_one_connection(first, second, cuts, interim, sized):
    one = chunked(first, head=(b"HTTP/1.1 103 Early Hints\r\nlink: x\r\n\r\n" if interim else b"")
                  + b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
    if sized:
        body = b"".join(first)
        one = b"HTTP/1.1 400 Bad\r\ncontent-length: %d\r\n\r\n%b" % (len(body), body)
    two = chunked(second)
    reads = split(one, cuts) + split(two, cuts)
    boundary = len(split(one, cuts))
    out = merged(reads, (0, boundary))
    assert h11_read(out, responses=2) == h11_read(reads, responses=2)


def test_chunk_extensions_and_odd_sizes_are_read_alike():
    body = b"HTTP/1.1 200 OK\r\nTransfer-Encoding:  Chunked \r\n\r\n" \
           b"5;name=value\r\nhello\r\n0005\r\nworld\r\n3 \r\nabc\r\n0\r\n\r\n"
    for reads in ([body], split(body, [60, 61, 70])):
        assert h11_read(merged(reads)) == h11_read(reads) == ([b"helloworldabc"], "ok")


def test_bad_framing_is_left_for_h11_to_refuse():
    for tail in (b"5\r\nhelloXX3\r\nabc\r\n0\r\n\r\n", b"zz\r\nhello\r\n0\r\n\r\n", b"3\r\nabc\r\n-1\r\nx\r\n"):
        raw = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n2\r\nok\r\n" + tail
        ours, theirs = h11_read(merged([raw])), h11_read([raw])
        assert ours == theirs and theirs[1].startswith("error")


def test_not_chunked_and_no_body_responses_pass_untouched():
    for raw in (b"HTTP/1.1 200 OK\r\ncontent-length: 12\r\n\r\n5\r\nhello\r\n\r\n",
                b"HTTP/1.1 204 No Content\r\ntransfer-encoding: chunked\r\n\r\n"):
        assert merged([raw]) == [raw]
    merger = ChunkMerger()
    raw = chunked(SSE[:4])
    assert merger.feed(raw) == raw  # no request announced: nothing is touched


def test_size_lines_h11_refuses_stay_refused():
    """int(x, 16) takes more than h11 does (found in review): the merger must not turn them into valid chunks."""
    for size in (b" 2", b"0x2", b"1_0", b"+2", b"2\x0b", b"2 ;x\nz", b"\n2"):
        raw = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n%b\r\nok\r\n2\r\nok\r\n0\r\n\r\n" % size
        assert h11_read(merged([raw])) == h11_read([raw]), size


def test_heads_h11_reads_differently_pass_untouched():
    folded = b"HTTP/1.1 200 OK\r\nx-a: 1\r\n transfer-encoding: chunked\r\n\r\n2\r\nok\r\n2\r\nok\r\n0\r\n\r\n"
    bare_lf = b"HTTP/1.1 200 OK\ntransfer-encoding: chunked\n\n2\r\nok\r\n2\r\nok\r\n0\r\n\r\n"
    for raw in (folded, bare_lf):
        assert h11_read(merged([raw])) == h11_read([raw])
    assert merged([folded]) == [folded]
