"""Request heads h11 has parsed, remembered: a client sends the same head request after request. Sans-I/O.

h11 parses a request head in Python: a regex and a normalisation per header line, then its state machine. That
costs ~200k instructions for a 4-header head and ~500k for Claude Code's 20 headers (callgrind; bench/README.md,
session 13): more than all of relay's own work on a small request. Yet a client's heads are the same bytes
request after request but for the Content-Length value (Claude Code's differ in nothing else). So relay keeps
h11's result for each head it parsed, keyed by the head's bytes with that value cut out, and a head with the
same key is answered from here: h11's parse of the same bytes, with this head's length (digits only, as h11
requires). h11 remains the parser of record: nothing it did not accept is remembered, and a head is only
remembered when a changed length cannot change what h11 makes of it (one Content-Length line; no
Transfer-Encoding, Expect or Upgrade, nor CONNECT; CRLF line ends throughout, so the head ends where h11 says it
does). ``tests/test_headmemo.py`` holds the memo's answers against h11's, head by head.
"""

from __future__ import annotations

import h11

Headers = list[tuple[bytes, bytes]]

_MARK = b"\r\ncontent-length:"  # a header line's start: a value holds no CR or LF, nor does a request line
MAX_DIGITS = 18  # the longest length answered from here (h11 takes 20): within it, h11 accepts every digit string
LONGEST = 4096  # heads longer than this are not remembered (Claude Code's is ~900 bytes)
MOST_HEADERS = 64  # nor heads of more headers (Claude Code sends 20): what one entry holds stays ~3x its bytes
HEADS = 256  # heads kept (one per client and path, near enough); the oldest is forgotten first. Remembered
# before a key is checked, so anyone can fill it: at most ~3 MB, and a head pushed out costs a parse, no more
_DECLINE = (b"transfer-encoding", b"expect", b"upgrade")  # headers that make a head's framing more than its length


class RequestHead:
    """A request's head as relay reads it: h11's event, its headers listed once (h11's ``Headers`` is walked item
    by item in Python)."""

    __slots__ = ("method", "target", "http_version", "headers")

    def __init__(self, method: bytes, target: bytes, http_version: bytes, headers: Headers) -> None:
        self.method = method
        self.target = target
        self.http_version = http_version
        self.headers = headers

    @classmethod
    def of(cls, event: h11.Request) -> RequestHead:
        return cls(event.method, event.target, event.http_version, list(event.headers))


def _key(head: bytes) -> tuple[bytes, bytes] | None:
    """(key, length digits; b"": no Content-Length) of a head ending in CRLF CRLF, or None: not one to answer
    from the memo (two Content-Length lines, or a value that is not a digit string h11 accepts)."""
    lowered = head.lower()
    at = lowered.find(_MARK)
    if at < 0:
        return head, b""
    start = at + len(_MARK)
    if lowered.find(_MARK, start) >= 0:
        return None
    end = head.find(b"\r\n", start)
    digits = head[start:end].strip(b" \t")  # h11 drops the whitespace around a value (OWS: space, tab)
    if not digits.isdigit() or len(digits) > MAX_DIGITS:  # (bytes.isdigit: ASCII digits only)
        return None
    return head[:start] + head[end:], digits


class HeadMemo:
    """Heads h11 parsed, by their bytes with the Content-Length value cut out."""

    def __init__(self, size: int = HEADS) -> None:
        self.size = size
        self._heads: dict[bytes, tuple[RequestHead, int]] = {}  # key -> (h11's head, where its length is; -1: none)

    def find(self, head: bytes) -> RequestHead | None:
        """h11's parse of ``head`` (a whole head, through its blank line), if it holds one with the same key."""
        keyed = _key(head) if len(head) <= LONGEST else None
        if keyed is None:
            return None
        found = self._heads.get(keyed[0])
        if found is None:
            return None
        parsed, at = found
        headers = parsed.headers.copy()  # each request its own list: none can change another's (or the memo's)
        if at >= 0:
            headers[at] = (b"content-length", keyed[1])
        return RequestHead(parsed.method, parsed.target, parsed.http_version, headers)

    def remember(self, head: bytes, parsed: RequestHead) -> None:
        """``parsed`` is h11's parse of ``head`` (a whole head, through its blank line, from a fresh parser):
        kept, unless a different length could make h11 read the head otherwise."""
        if len(head) > LONGEST or len(parsed.headers) > MOST_HEADERS or head.count(b"\n") != head.count(b"\r\n"):
            return  # a bare LF may end a line, or the head, for h11: it might have ended elsewhere
        keyed = _key(head)
        if keyed is None:
            return
        at = -1
        for i, (name, _) in enumerate(parsed.headers):
            if name in _DECLINE:
                return
            if name == b"content-length":
                at = i
        if parsed.method == b"CONNECT":
            return
        heads = self._heads
        if len(heads) >= self.size:
            del heads[next(iter(heads))]
        heads[keyed[0]] = (parsed, at)
