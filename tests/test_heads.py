"""relay writes its request and response heads itself (``relay.heads``); h11 is the independent reference. For any
head, valid or not: relay writes exactly the bytes h11 would write, or refuses what h11 refuses to write; and
h11, reading what relay wrote, gets the same request or response back."""

from __future__ import annotations

import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay import heads
from relay.heads import HeadError, request_head, response_head

TOKEN = b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
VALUE_CHARS = bytes(range(0x21, 0x7F)) + b"\x80\xa0\xe9\xff"  # visible ASCII and obs-text
# what breaks a head: line ends (injection), NUL, other whitespace, and the separators a name may not hold
BAD = [b"\r", b"\n", b"\r\n", b"\x00", b"\x0b", b"\x0c", b" ", b"\t", b":", b"(", b"\x7f", b"\x80",
       b"\r\nx-injected: 1", b" HTTP/1.1\r\nx: y\r\n\r\nGET /", b"\r\n\r\n"]

names = st.one_of(
    st.sampled_from([b"content-type", b"Accept", b"user-agent", b"authorization", b"x-api-key", b"anthropic-beta",
                     b"X-Custom", b"HOST", b"retry-after", b"request-id"]),
    st.binary(min_size=1, max_size=12).map(lambda b: bytes(TOKEN[x % len(TOKEN)] for x in b)),
)
values = st.one_of(
    st.sampled_from([b"", b"application/json", b"Bearer sk-123", b"text/event-stream", b"a  b", b"a\tb", b"\xe9t\xe9"]),
    st.lists(st.one_of(st.sampled_from([b" ", b"\t"]), st.binary(min_size=1, max_size=6).map(
        lambda b: bytes(VALUE_CHARS[x % len(VALUE_CHARS)] for x in b))), max_size=6).map(b"".join),
)


def _maybe_bad(strategy: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    """Mostly valid; sometimes with a byte that must make the head invalid (or, for a value, a space at an end)."""
    spoiled = st.tuples(strategy, st.sampled_from(BAD), st.integers(0, 20)).map(
        lambda t: t[0][:t[2]] + t[1] + t[0][t[2]:])
    return st.one_of(strategy, strategy, strategy, spoiled)


headers = st.lists(st.tuples(_maybe_bad(names), _maybe_bad(values)), max_size=8).map(
    lambda hs: [(n, v) for n, v in hs if n.lower() not in (b"host", b"content-length", b"transfer-encoding",
                                                           b"connection")])


def _h11(send: callable) -> bytes | None:  # type: ignore[valid-type]
    try:
        return send()
    except h11.LocalProtocolError:
        return None


def _ours(write: callable) -> bytes | None:  # type: ignore[valid-type]
    try:
        return write()
    except HeadError:
        return None


@settings(max_examples=600, deadline=None)
@given(method=_maybe_bad(st.sampled_from([b"POST", b"GET", b"HEAD", b"PUT"])),
       target=_maybe_bad(st.sampled_from([b"/v1/chat/completions", b"/p/x/v1/chat/completions?key=a&b=%20c",
                                          b"/models/gemini:streamGenerateContent?alt=sse", b"*", b"/\xe9"])),
       host=st.sampled_from([[], [(b"host", b"example.com:8443")], [(b"Host", b"127.0.0.1")],
                             [(b"host", b"a"), (b"host", b"b")], [(b"host", b"bad host")]]),
       host_at=st.integers(0, 8), hs=headers, length=st.one_of(st.none(), st.integers(0, 10**12)))
def test_a_request_head_is_h11s_or_refused_as_h11_refuses_it(method: bytes, target: bytes, host: list, host_at: int,
                                                             hs: list, length: int | None) -> None:
    given_headers = hs[:host_at] + host + hs[host_at:]
    framing = [] if length is None else [(b"content-length", b"%d" % length)]

    def h11_writes() -> bytes:
        conn = h11.Connection(h11.CLIENT)
        return conn.send(h11.Request(method=method, target=target, headers=given_headers + framing)) or b""

    expected = _h11(h11_writes)
    written = _ours(lambda: request_head(method, target, given_headers, length))
    assert written == expected
    if written is not None:  # and h11 reads it back as the request it was
        server = h11.Connection(h11.SERVER)
        server.receive_data(written)
        event = server.next_event()
        assert isinstance(event, h11.Request)
        assert (event.method, event.target) == (method, target)
        assert [(n.lower(), v) for n, v in event.headers.raw_items()] == [
            (n.lower(), v) for n, v in sorted(given_headers + framing, key=lambda h: h[0].lower() != b"host")]


@pytest.mark.parametrize("name", [b"content-length", b"Transfer-Encoding"])
def test_a_request_carries_no_framing_but_relays_own(name: bytes) -> None:
    with pytest.raises(HeadError):
        request_head(b"POST", b"/", [(b"host", b"x"), (name, b"5")], 5)


RELAY_HEADS = [  # what relay answers with: a stream, a JSON answer, an error with retry-after, the console
    [(b"content-type", b"text/event-stream; charset=utf-8"), (b"request-id", b"req_01"), (b"server", b"relay"),
     (b"cache-control", b"no-cache")],
    [(b"content-type", b"application/json"), (b"request-id", b"req_02"), (b"server", b"relay")],
    [(b"content-type", b"application/json"), (b"request-id", b"req_03"), (b"server", b"relay"), (b"retry-after", b"1")],
]


@settings(max_examples=600, deadline=None)
@given(status=st.one_of(st.sampled_from([200, 204, 304, 400, 404, 413, 429, 500, 529]), st.integers(100, 1100)),
       reason=st.sampled_from([b"OK", b"", b"Not Found", b"Too  Many\tRequests", b"\xe9"]),
       hs=st.one_of(st.sampled_from(RELAY_HEADS), headers),
       length=st.one_of(st.none(), st.integers(0, 10**9)), http11=st.booleans(), client_close=st.booleans(),
       relay_close=st.booleans(), method=st.sampled_from([b"GET", b"POST", b"HEAD"]))
def test_a_response_head_is_h11s_or_refused_as_h11_refuses_it(status: int, reason: bytes, hs: list, length: int | None,
                                                              http11: bool, client_close: bool, relay_close: bool,
                                                              method: bytes) -> None:
    """h11 as the server that read a request (HTTP/1.1 or 1.0, with or without ``Connection: close``) and answers
    with these headers, a Content-Length or a body of unknown length, and relay's own ``connection: close``."""
    server = h11.Connection(h11.SERVER)
    server.receive_data(b"%b / HTTP/%b\r\nhost: x\r\n%b\r\n" % (method, b"1.1" if http11 else b"1.0",
                                                              b"connection: close\r\n" if client_close else b""))
    assert isinstance(server.next_event(), h11.Request)
    framing = [] if length is None else [(b"content-length", b"%d" % length)]

    def h11_writes() -> bytes:
        extra = [(b"connection", b"close")] if relay_close else []
        return server.send(h11.Response(status_code=status, reason=reason, headers=hs + framing + extra)) or b""

    expected = _h11(h11_writes)
    written = _ours(lambda: response_head(status, reason, hs, length, http11=http11,
                                          keep_alive=http11 and not client_close, close=relay_close))
    assert written == expected
    if written is not None:
        client = h11.Connection(h11.CLIENT)
        client.send(h11.Request(method=method, target="/", headers=[("host", "x")]))
        client.send(h11.EndOfMessage())
        client.receive_data(written)
        event = client.next_event()
        assert isinstance(event, h11.Response)
        assert (event.status_code, event.reason) == (status, reason)


def test_h11_writes_a_reason_relay_refuses() -> None:
    """h11 does not check the reason phrase it writes; relay does (its reasons are its own, from a fixed table)."""
    with pytest.raises(HeadError):
        response_head(200, b"OK\r\nx-injected: 1", [], 0)


@pytest.mark.parametrize("part", ["method", "target", "name", "value"])
@pytest.mark.parametrize("injected", [b"\r\nx-injected: 1", b" HTTP/1.1\r\nx: y\r\n\r\nGET /", b"\r\n\r\n"])
def test_a_line_end_smuggled_into_any_part_is_refused_as_h11_refuses_it(part: str, injected: bytes) -> None:
    """Every injected piece here leaves a head that is grammatical as a whole: only the line count gives it away."""
    method, target, name, value = b"POST", b"/v1", b"x-custom", b"a"
    if part == "method":
        method += injected
    elif part == "target":
        target += injected
    elif part == "name":
        name += injected
    else:
        value += injected
    with pytest.raises(h11.LocalProtocolError):
        h11.Connection(h11.CLIENT).send(h11.Request(method=method, target=target, headers=[(b"host", b"x"), (name, value)]))
    with pytest.raises(HeadError):
        request_head(method, target, [(b"host", b"x"), (name, value)], 1)
    if part in ("name", "value"):
        with pytest.raises(HeadError):
            response_head(200, b"OK", [(name, value)], 1)


@pytest.mark.parametrize("name", [b"content-length", b"transfer-encoding", b"Connection"])
def test_a_response_carries_no_framing_or_connection_header_but_relays_own(name: bytes) -> None:
    with pytest.raises(HeadError):
        response_head(200, b"OK", [(name, b"close")], 5)


def test_a_line_checked_once_is_remembered_and_lets_no_other_through() -> None:
    """Lines are checked once and remembered (a provider's head repeats): the same head is written again
    unchanged, a line that differs from a remembered one is checked on its own, and the memory is bounded."""
    head = request_head(b"POST", b"/v1", [(b"host", b"x"), (b"x-custom", b"a")], 1)
    assert request_head(b"POST", b"/v1", [(b"host", b"x"), (b"x-custom", b"a")], 1) == head
    assert b"x-custom: a\r\n" in heads._GOOD
    for spoiled in (b"a\r\nx-injected: 1", b"a\r\n", b"a "):
        with pytest.raises(HeadError):
            request_head(b"POST", b"/v1", [(b"host", b"x"), (b"x-custom", spoiled)], 1)
        with pytest.raises(HeadError):
            response_head(200, b"OK", [(b"x-custom", spoiled)], 1)
    for i in range(heads.GOOD_LINES + 10):
        response_head(200, b"OK", [(b"request-id", b"req_%d" % i)], 0)
    assert len(heads._GOOD) <= heads.GOOD_LINES


def test_a_remembered_line_is_valid_only_as_its_own_kind() -> None:
    """A line remembered as valid is valid as the kind of line it was checked as: a status line whose reason
    holds ``: `` reads like a header line, and must not let that header (its name has spaces) through."""
    response_head(200, b"x: y", [], 0)  # a valid status line, remembered
    with pytest.raises(HeadError):
        request_head(b"POST", b"/v1", [(b"host", b"x"), (b"HTTP/1.1 200 x", b"y")], 1)
    request_head(b"POST", b"/v1", [(b"host", b"x"), (b"x-custom", b"b")], 1)  # a valid header line, remembered
    with pytest.raises(HeadError):
        response_head(200, b"OK", [(b"HTTP/1.1 200 x", b"y")], 0)
