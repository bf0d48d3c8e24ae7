"""Merges the HTTP/1.1 chunks that one socket read delivered into one chunk, before h11 parses them.

A model server writes every SSE event as its own HTTP chunk, so one upstream read often holds dozens of
them, and h11 plus httpcore spend ~20 µs per chunk turning each into an event, more than relay spends
translating it. Chunk boundaries mean nothing in HTTP/1.1 (RFC 9112 §7.1), so this rewrites a run of
complete chunks inside one read as one chunk: the same body bytes, one parse. Nothing is held back: a
chunk cut by the end of a read passes through as it came, and so does anything this parser does not
fully understand (h11 then judges it as usual). Sans-I/O: bytes in, bytes out.
"""

from __future__ import annotations

import re

HEAD_LIMIT = 64 * 1024  # a response head longer than this is left to h11 (which refuses it)

# states
_HEAD = 0  # reading a response head
_SIZE = 1  # at the start of a chunk-size line
_DATA = 2  # inside a chunk's data (self._left bytes, then CRLF) that started in an earlier read
_PASS = 3  # the rest of this response passes untouched (not chunked, an end, or something odd)


class ChunkMerger:
    __slots__ = ("_state", "_head", "_left", "_line", "_no_body")

    def __init__(self) -> None:
        self._state = _PASS
        self._head = b""
        self._left = 0  # bytes of the current chunk, including its closing CRLF, still to come
        self._line = b""  # a chunk-size line cut by the end of a read
        self._no_body = False

    def expect_response(self, head_request: bool = False) -> None:
        """A request went out: what comes next starts with a response head."""
        self._state = _HEAD
        self._head = b""
        self._line = b""
        self._no_body = head_request

    def feed(self, data: bytes) -> bytes:
        state = self._state
        if state == _PASS or not data:
            return data
        if state == _HEAD:
            return self._on_head(data)
        pos = 0
        if self._line:  # a chunk-size line that began in the last read (and went out raw)
            joined = self._line + data
            eol = joined.find(b"\r\n")
            if eol < 0:
                self._line = joined
                if len(joined) > 1024:  # no size line is this long: leave it to h11
                    self._state, self._line = _PASS, b""
                return data
            size = _chunk_size(joined, 0, eol)
            pos = eol + 2 - len(self._line)
            self._line = b""
            if size <= 0:
                self._state = _PASS
                return data
            state, self._left = _DATA, size + 2  # its size line went out raw, so its data does too
        if state == _DATA:
            left, rest = self._left, len(data) - pos
            if rest <= left:
                self._left = left - rest
                self._state = _DATA if self._left else _SIZE
                return data
            pos += left
            self._state = _SIZE
        return self._chunks(data, pos)

    def _on_head(self, data: bytes) -> bytes:
        start = len(self._head)  # where this read's bytes begin in buf
        buf = self._head + data if start else data
        end = _BLANK_LINE.search(buf)  # where h11 ends a head (it takes bare LF line ends too)
        if end is None:
            if len(buf) > HEAD_LIMIT:
                self._state, self._head = _PASS, b""
            else:
                self._head = buf
            return data
        self._head = b""
        cut = end.end()
        status, chunked = _parse_head(buf[:cut])
        rest = buf[cut:]
        if 100 <= status < 200 and status != 101:  # an interim response: the real head follows
            return buf[start:cut] + self._on_head(rest) if rest else data
        if chunked and not self._no_body and status not in (204, 304):
            self._state = _SIZE
            return buf[start:cut] + self._chunks(rest, 0) if rest else data
        self._state = _PASS
        return data

    def _chunks(self, data: bytes, start: int) -> bytes:
        """From a chunk boundary at ``start`` to the end of ``data``: a run of complete chunks merged into
        one, everything after it as is (and the parser's state left where ``data`` ends)."""
        n = len(data)
        pos = start
        parts: list[bytes] = []
        total = 0
        bare = _BARE_SIZE_LINE.match
        while pos < n:
            line = bare(data, pos)
            if line is not None:  # the usual size line: hex digits and CRLF
                eol = line.end() - 2
                size = int(line.group(1), 16)
            else:  # extensions, whitespace, a line cut by the end of the read, or garbage
                eol = data.find(b"\r\n", pos)
                if eol < 0:
                    if n - pos > 1024:
                        self._state = _PASS
                    else:
                        self._line = data[pos:]
                    break
                size = _chunk_size(data, pos, eol)  # h11's whole grammar decides
            if size <= 0:  # the last chunk, or a size line for h11 to judge: the rest passes as is
                self._state = _PASS
                break
            end = eol + 2 + size
            if end + 2 > n:  # cut by the end of this read: it passes as is, the parser follows along
                self._state = _DATA
                self._left = end + 2 - n
                break
            if not data.startswith(b"\r\n", end):
                self._state = _PASS
                break
            parts.append(data[eol + 2:end])
            total += size
            pos = end + 2
        if len(parts) < 2:
            return data
        merged = b"%x\r\n%b\r\n" % (total, b"".join(parts))
        return data[:start] + merged + data[pos:] if start else merged + data[pos:] if pos < n else merged


_BARE_SIZE_LINE = re.compile(b"([0-9A-Fa-f]{1,16})\r\n")
_BLANK_LINE = re.compile(b"\n\r?\n")  # h11's end of a head
_CHUNK_SIZE = re.compile(b"([0-9A-Fa-f]{1,20})(?:;[^\n]*)?[ \t]*")  # h11's chunk-size line, without its CRLF


def _parse_head(head: bytes) -> tuple[int, bool]:
    """Status code and whether the body is chunked; (0, False) when the head is not one we understand
    (then nothing is rewritten: h11 reads it as it came)."""
    lines = head.replace(b"\r\n", b"\n").split(b"\n")
    status_line = lines[0].split(b" ", 2)
    if len(status_line) < 2 or not status_line[0].startswith(b"HTTP/1.") or not status_line[1].isdigit():
        return 0, False
    status = int(status_line[1])
    chunked = False
    for line in lines[1:]:
        if line[:1] in (b" ", b"\t"):  # an obsolete folded line: h11 joins it to the header before
            return 0, False
        name, sep, value = line.partition(b":")
        if sep and name.strip().lower() == b"transfer-encoding":
            chunked = value.strip().lower() == b"chunked"
    return status, chunked


def _chunk_size(data: bytes, pos: int, eol: int) -> int:
    """The size in a chunk-size line, or -1 when h11 would not read the line as one."""
    match = _CHUNK_SIZE.fullmatch(data, pos, eol)
    return int(match.group(1), 16) if match is not None else -1
