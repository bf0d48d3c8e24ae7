"""HTTP/1.1 heads as relay writes them: one format and one validating match per head, no state machine. Sans-I/O.

relay builds every head it sends from parts it already holds: its own header names, config values, and header
values h11 already accepted from the client. Sending them through h11 (and, upstream, through httpcore's
request model first) built an event object per head, normalised and validated every header name and value with
a regex each, and ran h11's state machine, which relay then did not need: the connection's state is relay's own
(the body reader knows when an upstream answer ended, the server loop when a client's did). Here a head is
written in one pass and checked with one regex over the whole of it. The bytes are h11's bytes for the same head,
and a head h11 would refuse to write is refused (``tests/test_heads.py`` holds the two side by side). Each part is
checked where it stands in the whole: the regex sees the head's grammar, and the count of line ends says that no
part brought a line end of its own (a value holding ``\r\nname: value`` is grammatical, yet an injected header).
"""

from __future__ import annotations

import re
from collections.abc import Iterable


class HeadError(ValueError):
    """A head h11 would refuse to write: a bad method, target, header name or value, or no (or two) Host."""


_TOKEN = rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+"
_FIELD = rb"(?:" + _TOKEN + rb": (?:[^\x00\s]+(?:[ \t]+[^\x00\s]+)*)?\r\n)*\r\n"  # h11's field-name and field-value
_REQUEST = re.compile(_TOKEN + rb" [\x21-\x7e]+ HTTP/1\.1\r\n" + _FIELD)
_RESPONSE = re.compile(rb"HTTP/1\.1 [0-9]{3} (?:[ \t]|[^\x00\s])*\r\n" + _FIELD)
_FRAMING = (b"content-length", b"transfer-encoding")
_CONNECTION = (*_FRAMING, b"connection")
_NAME = re.compile(_TOKEN)


def is_header_name(name: str) -> bool:
    """An HTTP header name (RFC 9110's token): what a config's ``headers`` may use (h11 sends nothing else)."""
    return _NAME.fullmatch(name.encode()) is not None


def request_head(method: bytes, target: bytes, headers: Iterable[tuple[bytes, bytes]],
                 content_length: int | None) -> bytes:
    """A request head with exactly one Host (written first, as h11 does) and, when there is a body, its
    Content-Length (the caller's headers carry no framing of their own: relay frames its bodies itself)."""
    host = b""
    lines = [b"%b %b HTTP/1.1\r\n" % (method, target)]
    for name, value in headers:
        lower = name.lower()
        if lower == b"host":
            if host:
                raise HeadError("two Host headers")
            host = b"%b: %b\r\n" % (name, value)
            continue
        if lower in _FRAMING:
            raise HeadError(f"{name.decode('latin-1')} is relay's to set")
        lines.append(b"%b: %b\r\n" % (name, value))
    if not host:
        raise HeadError("no Host header")
    lines.insert(1, host)
    if content_length is not None:
        lines.append(b"content-length: %d\r\n" % content_length)
    lines.append(b"\r\n")
    head = b"".join(lines)
    if head.count(b"\n") != len(lines) or _REQUEST.fullmatch(head) is None:  # a line end inside a part: refused
        raise HeadError(f"not a valid request head: {head[:200]!r}")
    return head


def response_head(status: int, reason: bytes, headers: Iterable[tuple[bytes, bytes]], content_length: int | None,
                  *, http11: bool = True, keep_alive: bool = True, close: bool = False) -> bytes:
    """A response head as h11 frames it. ``content_length`` None: a body of unknown length (chunked for an HTTP/1.1
    client; for HTTP/1.0 unframed, ended by closing the connection). ``keep_alive``: the request allows the
    connection to stay open (h11's rule: HTTP/1.1 without ``Connection: close``); when it does not, h11 adds its
    ``Connection: close``. ``close``: relay's own wish to close (its ``connection: close``, where relay put it)."""
    if not 200 <= status <= 999:
        raise HeadError(f"status {status} is not a final answer's")
    lines = [b"HTTP/1.1 %d %b\r\n" % (status, reason)]
    for name, value in headers:
        if name.lower() in _CONNECTION:
            raise HeadError(f"{name.decode('latin-1')} is relay's to set")
        lines.append(b"%b: %b\r\n" % (name, value))
    if content_length is not None:
        lines.append(b"content-length: %d\r\n" % content_length)
    if close and keep_alive:
        lines.append(b"connection: close\r\n")
    if content_length is None and http11 and status not in (204, 304):  # those two never have a body to frame
        lines.append(b"Transfer-Encoding: chunked\r\n")
    if not keep_alive or not http11:  # h11 keeps no HTTP/1.0 connection open
        lines.append(b"Connection: close\r\n")
    lines.append(b"\r\n")
    head = b"".join(lines)
    if head.count(b"\n") != len(lines) or _RESPONSE.fullmatch(head) is None:
        raise HeadError(f"not a valid response head: {head[:200]!r}")
    return head
