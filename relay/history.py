"""A conversation's unchanged history, read once: Claude Code sends the whole conversation on every request.

In an agent loop each request is the last one plus a turn or two (and the last message changed: its
``cache_control`` moves on). At 1 MiB of history relay spent ~1 ms parsing and ~0.3 ms estimating the same
messages again on every request, before the upstream saw a byte. ``Histories`` keeps the last requests of each
client (their bytes, the message boundaries in them, the parsed messages, their token counts) and reads a new
request as the bytes that are new only:

- a kept message is reused only where the new body has *the same bytes* as the kept one, from the start of its
  messages array to the message's end (what comes before, the model say, may differ). The same bytes make
  the same values, so the reused messages are exactly what parsing the whole body gives (no ``==`` on values:
  it takes ``1`` for ``True``);
- the rest of the body is parsed with the reused messages replaced by a sentinel the client cannot write (a
  random string made per process). Finding it first in the top-level ``messages`` proves the array cut is the
  one that counts (not a nested one, not one a later duplicate key replaces); otherwise the whole body is
  parsed as usual;
- a kept message's end is found by serialising the parsed message and finding those very bytes in place: so the
  bytes between two ends are one complete value, the message kept. A client that writes JSON another way
  (spaces, escapes orjson does not make) is simply never reused. Ends are found only when a request shares
  the bytes, and only as far as it does: keeping a request costs nothing but its memory, so a client whose
  large requests never repeat (a one-shot prompt each time) pays only a comparison that fails early.

Pure: bytes and dicts in, values out. Reuse is per client identity, so one key's history never speeds up (or
times) another's. Bounded by ``memory`` (the memory kept requests hold, reckoned by ``weight``), least recently
used forgotten first.
"""

from __future__ import annotations

import secrets
from bisect import bisect_right
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import orjson

from relay import tokens
from relay.formats.resume import Translation

# Below this a request is parsed whole: the reuse would save microseconds and the memory is better spent.
REUSE_FROM = 32 * 1024
PER_CLIENT = 4  # requests kept per client: a session and its sub-agents, or a few sessions, each its own prefix
KEY = b'"messages":'


@dataclass(eq=False)  # kept requests are told apart by identity
class Kept:
    """One request as kept: its body, where its messages array starts, where each message found so far ends."""

    body: bytes
    start: int  # the offset of the first message's first byte (just past ``"messages":[``)
    messages: list[Any] | None  # the request's parsed messages; None: kept as its first messages' bytes only
    # (``REUSE_FROM`` of them, from ``start``: see ``Histories.learn``)
    ends: list[int] = field(default_factory=list)  # ends[i]: the offset just past message i, as far as found
    counts: list[int] = field(default_factory=list)  # counts[i]: relay's estimate of messages 0..i (summed
    # ``tokens.message_tokens``)
    weights: list[int] = field(default_factory=list)  # weights[i]: the memory messages 0..i hold, reckoned
    # (``weight``)
    stuck: bool = False  # a message's bytes are not orjson's (or deeper than it writes): no more ends to find
    held: int = 0  # the memory reckoned for it (``Histories.memory`` bounds the sum)
    translation: Translation | None = None  # its messages as translated (relay.formats.resume), when they were

    def find_ends(self, limit: int) -> None:
        """Find message ends until one reaches ``limit`` (or the messages, or the bytes that are orjson's, end)."""
        ends, counts, body = self.ends, self.counts, self.body
        at = ends[-1] + 1 if ends else self.start
        total = counts[-1] if counts else 0
        messages = self.messages
        if messages is None:
            return
        while not self.stuck and len(ends) < len(messages) and (not ends or ends[-1] < limit):
            if ends and body[ends[-1]] != 0x2C:  # the last one found closed the array
                self.stuck = True
                return
            message = messages[len(ends)]
            try:
                data = orjson.dumps(message)
            except (orjson.JSONEncodeError, TypeError):  # deeper than orjson writes (it reads deeper)
                self.stuck = True
                return
            end = at + len(data)
            if not body.startswith(data, at) or body[end:end + 1] not in (b",", b"]"):
                self.stuck = True
                return
            ends.append(end)
            total += tokens.message_tokens(message)
            counts.append(total)
            self.weights.append((self.weights[-1] if self.weights else 0) + weight(data, 0, len(data)))
            at = end + 1


@dataclass
class Reuse:
    """What a request took from a kept one: its first ``count`` messages, worth ``tokens`` in the estimate; none
    when it shares bytes with one kept as bytes only (it is a conversation going on: its own messages are kept).
    ``start``: where the request's own messages start (what comes before them may differ from the kept one's:
    another model, other tools)."""

    kept: Kept
    count: int
    tokens: int
    start: int
    translation: Translation | None = None  # this request's messages as translated (kept with it)

    def ends(self) -> list[int]:
        """The reused messages' ends, in the request's body."""
        shift = self.start - self.kept.start
        return [end + shift for end in self.kept.ends[:self.count]] if shift else self.kept.ends[:self.count]


class Histories:
    """The kept requests of each client, and the parse that reuses them."""

    def __init__(self, memory: int) -> None:
        self._memory = memory  # the memory kept requests may hold, reckoned (``weight``); 0: no reuse
        self._clients: dict[str, list[Kept]] = {}  # each client's kept requests, the most recent last
        self._order: OrderedDict[int, tuple[str, Kept]] = OrderedDict()  # by id(kept): least recently used first
        self._held = 0
        self._mark = "relay-" + secrets.token_hex(16)  # the sentinel: unknown to clients, so never in a body
        self._sentinel = orjson.dumps(self._mark)

    @property
    def held(self) -> int:
        """The memory kept requests hold, reckoned (``weight``)."""
        return self._held

    @property
    def memory(self) -> int:
        return self._memory

    @memory.setter
    def memory(self, memory: int) -> None:
        """A new bound (a config reload), met at once: 0 forgets everything."""
        self._memory = memory
        self._shrink()

    def parse(self, client: str, body: bytes) -> tuple[Any, Reuse | None]:
        """``body`` parsed, as ``orjson.loads`` parses it, with the messages it shares with a kept request reused.
        Raises ``orjson.JSONDecodeError`` as ``orjson.loads(body)`` would (the whole body is parsed then)."""
        if len(body) >= REUSE_FROM and self._memory > 0:
            kept = self._clients.get(client)
            start = _messages_start(body) if kept else None
            if kept and start is not None:
                reuse = _best(kept, body, start)
                if reuse is not None and not reuse.count:
                    return orjson.loads(body), reuse
                if reuse is not None:
                    req = self._parse_rest(body, reuse)
                    if req is not None:
                        self._order.move_to_end(id(reuse.kept))
                        return req, reuse
                    self._forget(reuse.kept)  # its array is not the one that counts: no use keeping it
        return orjson.loads(body), None

    def _parse_rest(self, body: bytes, reuse: Reuse) -> Any:
        """The body with the reused messages cut to the sentinel, parsed; the messages put back in its place.
        None when the sentinel is not first in the top-level messages (the whole body is parsed instead)."""
        kept, count = reuse.kept, reuse.count
        # The reused messages' bytes (whole values, a "," between two) give way to the sentinel, one value: the
        # document around them reads as before, whatever follows them ("," and more messages, "]", or bytes that
        # make the body invalid, and then the whole body's error is reported).
        end = kept.ends[count - 1] + reuse.start - kept.start
        rest = (b",", body[end + 1:]) if body[end:end + 1] == b"," else (body[end:],)
        try:
            req = orjson.loads(b"".join((body[:reuse.start], self._sentinel, *rest)))
        except orjson.JSONDecodeError:
            return None  # the error is the whole body's to report, with its own offsets
        messages = req.get("messages") if type(req) is dict else None
        if type(messages) is not list or not messages or messages[0] != self._mark:
            return None  # a nested array, or one a later duplicate key replaced
        assert kept.messages is not None  # (only a request kept with its messages has their ends)
        messages[0:1] = kept.messages[:count]
        return req

    def learn(self, client: str, body: bytes, req: Any, reuse: Reuse | None) -> None:
        """Keep ``body`` (answered, parsed to ``req``) for the requests that will extend it.

        A request that shared bytes with a kept one is kept with its parsed messages (and the ends and counts of
        those it reused; the others are found if a request shares them). One that shared nothing is kept as the
        first ``REUSE_FROM`` bytes of its messages only, until a request shares them: a client whose large
        requests never repeat would never gain from more, and holding more cost it. Its parsed objects, then its
        whole bodies, held for the next requests, slowed it by ~0.7 and ~0.4 ms a 1 MiB request: the memory was
        no longer reused while still in cache, and the next parse and build ran slower."""
        if self._memory <= 0 or len(body) < REUSE_FROM or type(req) is not dict:
            return
        messages = req.get("messages")
        if type(messages) is not list or not messages:
            return
        if reuse is not None:
            ends = reuse.ends()
            kept = Kept(body, reuse.start, messages, ends, reuse.kept.counts[:reuse.count],
                        weights=reuse.kept.weights[:reuse.count], translation=reuse.translation)
            cut = ends[-1] + 1 if ends else reuse.start  # the reused messages' bytes: reckoned already
            kept.held = (kept.weights[-1] if ends else 0) + weight(body, 0, reuse.start) + \
                weight(body, cut, len(body))
            self._forget(reuse.kept)  # this request extends it: the new one replaces it
        else:
            start = _messages_start(body)
            if start is None or len(body) - start < REUSE_FROM:  # (little to reuse: the bulk is elsewhere)
                return
            kept = Kept(body[start:start + REUSE_FROM], 0, None)
            kept.held = REUSE_FROM
        if kept.held > self._memory:
            return
        mine = self._clients.get(client)
        if mine is not None and len(mine) >= PER_CLIENT:
            self._forget(mine[0])
        self._clients.setdefault(client, []).append(kept)
        self._order[id(kept)] = (client, kept)
        self._held += kept.held
        self._shrink()

    def _shrink(self) -> None:
        """The least recently used forgotten until what is held is within the bound."""
        while self._held > self._memory and self._order:
            self._forget(next(iter(self._order.values()))[1])

    def _forget(self, kept: Kept) -> None:
        entry = self._order.pop(id(kept), None)
        if entry is None:
            return  # already replaced (two requests extended it at once)
        mine = self._clients[entry[0]]
        mine.remove(kept)
        if not mine:
            del self._clients[entry[0]]
        self._held -= kept.held


def weight(data: bytes, start: int, end: int) -> int:
    """The memory ``data[start:end]`` holds once kept, reckoned: its bytes (and their parsed strings, translation
    and JSON: ~3.6 times the bytes for Claude Code's requests, measured) at 4 a byte, and 64 for each value a
    ``,``, ``{`` or ``[`` may start (a body of tiny values holds ~25 times its bytes in objects). Over, never
    under, for the bodies measured; three counts at memchr speed."""
    return 4 * (end - start) + 64 * (data.count(b",", start, end) + data.count(b"{", start, end)
                                     + data.count(b"[", start, end))


def _messages_start(body: bytes) -> int | None:
    """The offset just past the first ``"messages":[``: the top-level one, unless the sentinel's parse finds
    otherwise (``Histories._parse_rest``)."""
    at = body.find(KEY)
    if at < 0:
        return None
    at += len(KEY)
    if body[at:at + 1] != b"[":
        return None
    return at + 1


def _best(candidates: list[Kept], body: bytes, start: int) -> Reuse | None:
    """The kept request ``body`` shares the most messages with; or one it shares ``REUSE_FROM`` bytes of
    messages with (``Reuse.count`` 0: kept as bytes only); or None."""
    best: Reuse | None = None
    for kept in reversed(candidates):
        shared = _common(memoryview(kept.body)[kept.start:], body, start)
        if shared < 2:
            continue
        limit = kept.start + shared  # kept's bytes before it are body's
        kept.find_ends(limit)
        count = bisect_right(kept.ends, limit)  # the messages whose bytes all lie before the limit
        if count and (best is None or count > best.count):
            best = Reuse(kept, count, kept.counts[count - 1], start)
        elif best is None and shared >= REUSE_FROM:
            best = Reuse(kept, 0, 0, start)
    return best


def _common(kept: memoryview, body: bytes, start: int) -> int:
    """How many bytes ``body`` from ``start`` has in common with ``kept``, from their starts. By halves: each step
    compares only bytes not yet proved equal, so the whole costs about two passes of memcmp over the shared part."""
    low, high = 0, min(len(kept), len(body) - start)
    if body.startswith(kept[:high], start):
        return high
    while high - low > 1:  # bytes [0, low) are equal; [low, high) hold a difference
        mid = (low + high) // 2
        if body.startswith(kept[low:mid], start + low):
            low = mid
        else:
            high = mid
    return low
