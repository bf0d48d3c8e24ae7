"""An upstream response's body, from raw bytes to body bytes or SSE events in one pass. Sans-I/O.

httpcore sends the request and reads the response head (h11 judges the head); from there on relay reads the
body itself: the chunk framing (or a Content-Length, or everything until the connection closes) is taken apart
here, and each chunk's data goes straight to the SSE parser. Before, h11 parsed every body byte again after a
merger had already parsed the same framing, and httpcore wrapped every piece in an event and a generator step:
per upstream read that cost more than translating what it held. The grammar and the error messages are h11's
(tests/test_reader.py holds the two side by side for any split of the bytes), so a malformed body fails as it
did, and the pool still knows whether the connection may be reused: only a body read to its clean end, with
nothing after it, on a keep-alive response.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from itertools import repeat
from operator import add, itemgetter

from relay.sse import Event, SSEParser

# framings (RFC 9112 §6.3, as h11 decides them)
CHUNKED, LENGTH, UNTIL_CLOSE = 0, 1, 2

# chunked states
_SIZE = 0  # at (or inside, self._line) a chunk-size line
_DATA = 1  # inside a chunk's data: self._left bytes to come
_CRLF = 2  # after a chunk's data: the last self._left bytes of its CRLF to come
_TRAILER = 3  # after the last chunk: trailer lines up to a blank line (self._line holds them)
_END = 4

LINE_LIMIT = 100 * 1024  # httpcore's h11 limit on an incomplete event (a size line or the trailer)


class BodyError(Exception):
    """The body broke its framing, or the connection closed before its end (h11's words)."""


def framing(status: int, headers: Iterable[tuple[bytes, bytes]], method: bytes = b"POST") -> tuple[int, int]:
    """The body framing of a response whose head h11 has accepted (so its framing headers are valid):
    (CHUNKED, 0), (LENGTH, n) or (UNTIL_CLOSE, 0)."""
    if status in (204, 304) or method == b"HEAD" or (method == b"CONNECT" and 200 <= status < 300):
        return LENGTH, 0
    length = None
    for name, value in headers:
        name = name.lower()
        if name == b"transfer-encoding":
            return CHUNKED, 0
        if name == b"content-length" and length is None:
            length = int(value.split(b",", 1)[0].strip())
    return (UNTIL_CLOSE, 0) if length is None else (LENGTH, length)


def keeps_alive(http_version: bytes, headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """Whether the connection may carry another request after this response (h11's rule)."""
    if http_version < b"HTTP/1.1":
        return False
    for name, value in headers:
        if name.lower() == b"connection" and b"close" in (v.strip().lower() for v in value.split(b",")):
            return False
    return True


class BodyReader:
    """Feed it each read of the connection (b"" when the peer closed it); it returns the body bytes (``feed``) or
    the SSE events (``feed_events``) that read completed. ``done``: the body ended; ``extra``: bytes that came
    after its end (a connection carrying them is not reused); ``error``: the framing broke, raised by the caller
    after it has used what came before the break (h11 too delivered the data before a bad byte)."""

    __slots__ = ("_kind", "_state", "_left", "_line", "_runs", "done", "extra", "error", "sse", "received")

    def __init__(self, kind: int = CHUNKED, length: int = 0) -> None:
        self._kind = kind
        self._state = _SIZE
        self._left = length  # LENGTH: bytes still to come
        self._line = b""  # a size line or trailer cut by the end of a read
        self._runs = True  # reads of many whole one-event chunks may take ``_run``, until one is not so shaped
        self.done = kind == LENGTH and length == 0
        self.extra = b""
        self.error: BodyError | None = None
        self.sse = SSEParser()
        self.received = 0  # LENGTH: body bytes so far (for the error's words)

    @property
    def clean(self) -> bool:
        """Ended as its framing says, with nothing after it: the connection can serve another request."""
        return self.done and not self.extra and self.error is None and self._kind != UNTIL_CLOSE

    def feed(self, data: bytes) -> bytes:
        pieces = self._pieces(data)
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def feed_events(self, data: bytes) -> list[Event]:
        """The events this read completed; at the body's end also a last event that had no blank line after it.
        Raises SSEError for an event over the parser's limit."""
        parser = self.sse
        if self._state == _SIZE and self._kind == CHUNKED and not self._line and self.error is None:
            # what a paced upstream's every read holds: exactly one whole chunk (no state machine, no lists),
            # usually of one `data:` line and a blank line: its payload is taken with byte searches alone
            eol = data.find(b"\r\ndata: ", 0, 30)
            if 0 < eol <= 20 and not data[:eol].strip(_HEX) and parser.at_rest():
                end = eol + 2 + int(data[:eol], 16)  # the chunk's data ends here
                if end + 2 == len(data) and data.endswith(b"\n\n\r\n"):  # ...with the blank line, then the CRLF
                    value = data[eol + 8:end - 2]
                    if value.find(b"\n") < 0 and value.find(b"\r") < 0:
                        return [(None, value)]
            line = _BARE_SIZE_LINE.match(data)
            if line is not None:
                start = line.end()
                end = start + int(line.group(1), 16)
                if end + 2 == len(data) and end > start and data[end] == 13 and data[end + 1] == 10:
                    piece = data[start:end]
                    payload = parser.single(piece)
                    return [(None, payload)] if payload is not None else parser.feed(piece)
            if self._runs and parser.at_rest():
                events = self._run(data)
                if events is not None:
                    return events
        single = parser.single
        out: list[Event] = []
        for piece in self._pieces(data):
            payload = single(piece)  # a chunk holding one whole `data:` event: what model servers send
            if payload is not None:
                out.append((None, payload))
            else:
                out.extend(parser.feed(piece))
        if self.done:
            out.extend(parser.close())
        return out

    def _run(self, data: bytes) -> list[Event] | None:
        """A read of two or more whole chunks, each exactly one ``data:`` line and its blank line, ending at a
        chunk's end (or with the last chunk and no trailer): a burst, from a fast model or a read that fell behind.
        Taken apart by operations on the whole read (one split at the chunks' ends, then maps that run in C),
        none per chunk in Python. None when the read is not so; a read whose chunks hold anything else also stops
        the tries for this body (its upstream does not send that shape).

        Why the split cannot be fooled: the first chunk whose data held the split's bytes would be cut short by
        them, so its declared size would not be its length; and no payload may hold a CR or LF."""
        ended = data.endswith(b"\r\n0\r\n\r\n")
        if not data.endswith(b"\n\n\r\n", 0, len(data) - 5 if ended else None):
            return None  # a read that does not end at a chunk's end
        pieces = (data[:-5] if ended else data).split(b"\n\n\r\n")  # each chunk: size CRLF "data: " payload
        pieces.pop()  # the empty piece after the last chunk
        count = len(pieces)
        if count < 2:
            return None
        cut = list(map(bytes.partition, pieces, repeat(b"\r\ndata: ")))
        if not all(map(_SEP_PART, cut)):  # a chunk that is not one `data:` line: the upstream's shape
            self._runs = False  # (and a piece without the line, "8" of "8\n\n\r\n", is no chunk h11 takes)
            return None
        sizes, payloads = list(map(_SIZE_PART, cut)), list(map(_PAYLOAD_PART, cut))
        if b"".join(sizes).translate(None, _HEX) or max(map(len, sizes)) > 20 or not all(sizes) \
                or list(map(int, sizes, repeat(16))) != list(map(add, map(len, payloads), repeat(8))):
            return None
        joined = b"".join(payloads)
        if joined.find(b"\n") >= 0 or joined.find(b"\r") >= 0:
            self._runs = False
            return None
        if ended:
            self._state, self.done = _END, True
        return list(zip(repeat(None), payloads))

    # ---- framing --------------------------------------------------------------------------------

    def _pieces(self, data: bytes) -> list[bytes]:
        if self.done or self.error is not None:
            self.extra += data
            return []
        if not data:
            return self._eof()
        kind = self._kind
        if kind == CHUNKED:
            return self._chunks(data)
        if kind == LENGTH:
            left = self._left
            if len(data) >= left:
                self.done = True
                self.extra = data[left:]
                data = data[:left]
            self._left = left - len(data)
        self.received += len(data)
        return [data]

    def _eof(self) -> list[bytes]:
        if self._kind == UNTIL_CLOSE:
            self.done = True
        elif self._kind == LENGTH:
            self.error = BodyError("peer closed connection without sending complete message body "
                                   f"(received {self.received} bytes, expected {self.received + self._left})")
        elif self._line:  # h11 words it so when it still holds part of a line
            self.error = BodyError("peer unexpectedly closed connection")
        else:
            self.error = BodyError("peer closed connection without sending complete message body "
                                   "(incomplete chunked read)")
        return []

    def _chunks(self, data: bytes) -> list[bytes]:
        out: list[bytes] = []
        n = len(data)
        pos = 0
        state = self._state
        bare = _BARE_SIZE_LINE.match
        while pos < n:
            if state == _SIZE:
                if self._line:  # a size line that began in an earlier read
                    data, n, pos = self._line + data[pos:], n - pos + len(self._line), 0
                    self._line = b""
                line = bare(data, pos)
                if line is not None:  # the usual size line: hex digits and CRLF
                    size = int(line.group(1), 16)
                    pos = line.end()
                else:
                    eol = data.find(b"\r\n", pos)
                    if eol < 0:
                        if n - pos > LINE_LIMIT:
                            return self._fail(out, "Receive buffer too long")
                        self._line = data[pos:]
                        break
                    match = _CHUNK_SIZE.fullmatch(data, pos, eol)
                    if match is None:
                        return self._fail(out, f"illegal chunk header: {bytearray(data[pos:eol + 2])!r}")
                    size = int(match.group(1), 16)
                    pos = eol + 2
                if size == 0:
                    state = _TRAILER
                    continue
                end = pos + size
                if end + 2 <= n and data[end] == 13 and data[end + 1] == 10:  # the whole chunk is here
                    out.append(data[pos:end])
                    pos = end + 2
                    continue
                state, self._left = _DATA, size
            elif state == _DATA:
                end = pos + self._left
                if end > n:
                    out.append(data[pos:])
                    self._left = end - n
                    break
                out.append(data[pos:end])
                pos = end
                state, self._left = _CRLF, 2
            elif state == _CRLF:
                want = b"\r\n"[2 - self._left:]
                got = data[pos:pos + len(want)]
                if got != want[:len(got)]:
                    return self._fail(out, f"malformed chunk footer: {bytearray(got)!r} (expected {want!r})")
                pos += len(got)
                self._left -= len(got)
                if self._left == 0:
                    state = _SIZE
            else:  # _TRAILER
                return self._trailer(out, data[pos:])
        self._state = state
        return out

    def _trailer(self, out: list[bytes], data: bytes) -> list[bytes]:
        self._state = _TRAILER
        buf = self._line + data if self._line else data
        lines: list[bytes]
        if buf[:1] == b"\n":
            cut, lines = 1, []
        elif buf[:2] == b"\r\n":
            cut, lines = 2, []
        else:
            blank = _BLANK_LINE.search(buf)
            if blank is None:
                if len(buf) > LINE_LIMIT:
                    return self._fail(out, "Receive buffer too long")
                self._line = buf
                return out
            cut = blank.end()
            lines = [line[:-1] if line[-1:] == b"\r" else line for line in buf[:cut].split(b"\n")[:-2]]
        problem = _bad_field_lines(lines)
        if problem is not None:
            return self._fail(out, problem)
        self._line = b""
        self._state = _END
        self.done = True
        self.extra = buf[cut:]
        return out

    def _fail(self, out: list[bytes], message: str) -> list[bytes]:
        self.error = BodyError(message)
        return out


_BARE_SIZE_LINE = re.compile(rb"([0-9A-Fa-f]{1,20})\r\n")
_SIZE_PART, _SEP_PART, _PAYLOAD_PART = itemgetter(0), itemgetter(1), itemgetter(2)  # of a chunk's partition
_HEX = b"0123456789abcdefABCDEF"  # a size line of these alone (stripped of them, nothing is left) is bare
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,20})(?:;[^\n]*)?[ \t]*")  # h11's chunk-size line, without its CRLF
_BLANK_LINE = re.compile(rb"\n\r?\n")  # where h11 ends a block of header lines
_FOLD = re.compile(rb"[ \t]+")
# RFC 9110 field-line as h11 reads it: token ":" OWS [ field-content ] OWS, field-content allowing obs-text
_FIELD_LINE = re.compile(rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+:[ \t]*(?:[^\x00\s]+(?:[ \t]+[^\x00\s]+)*)?[ \t]*")


def _bad_field_lines(lines: list[bytes]) -> str | None:
    """None when h11 accepts these trailer lines, else its error (obsolete folding joins a line to the last)."""
    joined: list[bytes] = []
    for line in lines:
        fold = _FOLD.match(line)
        if fold is not None:
            if not joined:
                return "continuation line at start of headers"
            joined[-1] += b" " + line[fold.end():]
        else:
            joined.append(line)
    for line in joined:
        if _FIELD_LINE.fullmatch(line) is None:
            return f"illegal header line: {bytearray(line)!r}"
    return None
