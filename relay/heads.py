"""HTTP/1.1 heads as relay writes them: one format and one validating match per line, no state machine. Sans-I/O.

relay builds every head it sends from parts it already holds: its own header names, config values, and header
values h11 already accepted from the client. Sending them through h11 (and, upstream, through httpcore's
request model first) built an event object per head, normalised and validated every header name and value with
a regex each, and ran h11's state machine, which relay then did not need: the connection's state is relay's own
(the body reader knows when an upstream answer ended, the server loop when a client's did). Here a head is
written in one pass, each line checked against its grammar (a line's grammar holds no CR or LF before its end, so
no part can bring a line end of its own: a value holding ``\r\nname: value`` is refused, not an injected
header). A line checked once is remembered with its grammar (``_GOOD``): a provider's head is the same lines request after request,
and a regex over ~200 bytes cost ~20k instructions per head. The bytes are h11's bytes for the same head, and a
head h11 would refuse to write is refused (``tests/test_heads.py`` holds the two side by side).
"""

from __future__ import annotations

import re
from collections.abc import Iterable


class HeadError(ValueError):
    """A head h11 would refuse to write: a bad method, target, header name or value, or no (or two) Host."""


_TOKEN = rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+"
_VALUE = rb"(?:[^\x00\s]+(?:[ \t]+[^\x00\s]+)*)?"  # h11's field-value
_FIELD_LINE = re.compile(_TOKEN + rb": " + _VALUE + rb"\r\n")  # and field-name
_REQUEST_LINE = re.compile(_TOKEN + rb" [\x21-\x7e]+ HTTP/1\.1\r\n")
_STATUS_LINE = re.compile(rb"HTTP/1\.1 [0-9]{3} (?:[ \t]|[^\x00\s])*\r\n")
_FRAMING = (b"content-length", b"transfer-encoding")
_CONNECTION = (*_FRAMING, b"connection")
_NAME = re.compile(_TOKEN)
GOOD_LINES = 1024  # lines known to be valid, kept (then forgotten all at once): a provider's, relay's own
_GOOD: dict[bytes, re.Pattern[bytes]] = {}  # line -> the grammar it matched: valid as that kind of line only


def _check(line: bytes, grammar: re.Pattern[bytes], what: str) -> None:
    """A line not seen yet: refused unless it matches its grammar, then remembered. A line's grammar excludes
    CR and LF anywhere before its end, so no part can bring a line end of its own (a value holding
    ``\r\nname: value`` would be an injected header), and a head made of valid lines is a valid head."""
    if grammar.fullmatch(line) is None:
        raise HeadError(f"not a valid {what}: {line[:200]!r}")
    if len(_GOOD) >= GOOD_LINES:
        _GOOD.clear()
    _GOOD[line] = grammar


def is_header_name(name: str) -> bool:
    """An HTTP header name (RFC 9110's token): what a config's ``headers`` may use (h11 sends nothing else)."""
    return _NAME.fullmatch(name.encode()) is not None


def request_head(method: bytes, target: bytes, headers: Iterable[tuple[bytes, bytes]],
                 content_length: int | None) -> bytes:
    """A request head with exactly one Host (written first, as h11 does) and, when there is a body, its
    Content-Length (the caller's headers carry no framing of their own: relay frames its bodies itself)."""
    host = b""
    good = _GOOD
    line = b"%b %b HTTP/1.1\r\n" % (method, target)
    if good.get(line) is not _REQUEST_LINE:
        _check(line, _REQUEST_LINE, "request line")
    lines = [line]
    for name, value in headers:
        lower = name.lower()
        if lower == b"host":
            if host:
                raise HeadError("two Host headers")
            host = line = b"%b: %b\r\n" % (name, value)
        elif lower in _FRAMING:
            raise HeadError(f"{name.decode('latin-1')} is relay's to set")
        else:
            line = b"%b: %b\r\n" % (name, value)
            lines.append(line)
        if good.get(line) is not _FIELD_LINE:
            _check(line, _FIELD_LINE, "header line")
    if not host:
        raise HeadError("no Host header")
    lines.insert(1, host)
    if content_length is not None:
        lines.append(b"content-length: %d\r\n" % content_length)
    lines.append(b"\r\n")
    return b"".join(lines)


def response_head(status: int, reason: bytes, headers: Iterable[tuple[bytes, bytes]], content_length: int | None,
                  *, http11: bool = True, keep_alive: bool = True, close: bool = False) -> bytes:
    """A response head as h11 frames it. ``content_length`` None: a body of unknown length (chunked for an HTTP/1.1
    client; for HTTP/1.0 unframed, ended by closing the connection). ``keep_alive``: the request allows the
    connection to stay open (h11's rule: HTTP/1.1 without ``Connection: close``); when it does not, h11 adds its
    ``Connection: close``. ``close``: relay's own wish to close (its ``connection: close``, where relay put it)."""
    if not 200 <= status <= 999:
        raise HeadError(f"status {status} is not a final answer's")
    good = _GOOD
    line = b"HTTP/1.1 %d %b\r\n" % (status, reason)
    if good.get(line) is not _STATUS_LINE:
        _check(line, _STATUS_LINE, "status line")
    lines = [line]
    for name, value in headers:
        if name.lower() in _CONNECTION:
            raise HeadError(f"{name.decode('latin-1')} is relay's to set")
        line = b"%b: %b\r\n" % (name, value)
        if good.get(line) is not _FIELD_LINE:
            _check(line, _FIELD_LINE, "header line")
        lines.append(line)
    if content_length is not None:
        lines.append(b"content-length: %d\r\n" % content_length)
    if close and keep_alive:
        lines.append(b"connection: close\r\n")
    if content_length is None and http11 and status not in (204, 304):  # those two never have a body to frame
        lines.append(b"Transfer-Encoding: chunked\r\n")
    if not keep_alive or not http11:  # h11 keeps no HTTP/1.0 connection open
        lines.append(b"Connection: close\r\n")
    lines.append(b"\r\n")
    return b"".join(lines)
