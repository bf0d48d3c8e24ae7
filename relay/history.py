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
- a message's end is learnt after the request is answered, by serialising the parsed message and finding those
  very bytes in place: so the bytes between two ends are one complete value, the message kept. A client that
  writes JSON another way (spaces, escapes orjson does not make) is simply never reused.

Pure: bytes and dicts in, values out. Reuse is per client identity, so one key's history never speeds up (or
times) another's. Bounded by ``memory`` (bytes of kept bodies), least recently used forgotten first.
"""

from __future__ import annotations

import secrets
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import orjson

from relay import tokens

# Below this a request is parsed whole: the reuse would save microseconds and the memory is better spent.
REUSE_FROM = 32 * 1024
PER_CLIENT = 4  # requests kept per client: a session and its sub-agents, or a few sessions, each its own prefix
KEY = b'"messages":'


@dataclass(eq=False)  # kept requests are told apart by identity
class Kept:
    """One request as learnt: its body, where its messages array starts, where each known message ends."""

    body: bytes
    start: int  # the offset of the first message's first byte (just past ``"messages":[``)
    ends: list[int]  # ends[i]: the offset just past message i, for the messages whose bytes were found in place
    messages: list[Any]  # the request's parsed messages (all of them; ``ends`` may cover fewer)
    counts: list[int]  # counts[i]: relay's token estimate of messages 0..i (``tokens.message_tokens`` summed)


@dataclass
class Reuse:
    """What a request took from a kept one: its first ``count`` messages, worth ``tokens`` in the estimate.
    ``start``: where the request's own messages start (what comes before them may differ from the kept one's:
    another model, other tools)."""

    kept: Kept
    count: int
    tokens: int
    start: int

    def ends(self) -> list[int]:
        """The reused messages' ends, in the request's body."""
        shift = self.start - self.kept.start
        return [end + shift for end in self.kept.ends[:self.count]] if shift else self.kept.ends[:self.count]


class Histories:
    """The kept requests of each client, and the parse that reuses them."""

    def __init__(self, memory: int) -> None:
        self.memory = memory  # bytes of request bodies kept, all clients together; 0: no reuse
        self._clients: dict[str, list[Kept]] = {}  # each client's kept requests, the most recent last
        self._order: OrderedDict[int, tuple[str, Kept]] = OrderedDict()  # by id(kept): least recently used first
        self._held = 0
        self._mark = "relay-" + secrets.token_hex(16)  # the sentinel: unknown to clients, so never in a body
        self._sentinel = orjson.dumps(self._mark)

    @property
    def held(self) -> int:
        """Bytes of request bodies kept."""
        return self._held

    def parse(self, client: str, body: bytes) -> tuple[Any, Reuse | None]:
        """``body`` parsed, as ``orjson.loads`` parses it, with the messages it shares with a kept request reused.
        Raises ``orjson.JSONDecodeError`` as ``orjson.loads(body)`` would (the whole body is parsed then)."""
        if len(body) >= REUSE_FROM:
            kept = self._clients.get(client)
            start = _messages_start(body) if kept else None
            if kept and start is not None:
                reuse = _best(kept, body, start)
                if reuse is not None:
                    req = self._parse_rest(body, reuse)
                    if req is not None:
                        self._order.move_to_end(id(reuse.kept))
                        return req, reuse
        return orjson.loads(body), None

    def _parse_rest(self, body: bytes, reuse: Reuse) -> Any:
        """The body with the reused messages cut to the sentinel, parsed; the messages put back in its place.
        None when the sentinel is not where it was put (the whole body is parsed instead)."""
        kept, count = reuse.kept, reuse.count
        end = kept.ends[count - 1] + reuse.start - kept.start  # body[end] is "," (new messages follow) or "]"
        rest = (b",", body[end + 1:]) if body[end] == 0x2C else (body[end:],)
        try:
            req = orjson.loads(b"".join((body[:reuse.start], self._sentinel, *rest)))
        except orjson.JSONDecodeError:
            return None  # the error is the whole body's to report, with its own offsets
        messages = req.get("messages") if type(req) is dict else None
        if type(messages) is not list or not messages or messages[0] != self._mark:
            return None  # not the array that counts (a later duplicate key replaced it)
        messages[0:1] = kept.messages[:count]
        return req

    def learn(self, client: str, body: bytes, req: Any, reuse: Reuse | None) -> None:
        """Keep ``body`` (answered, parsed to ``req``) for the requests that will extend it. Runs after the answer:
        finding a message's bytes costs a serialisation of it, for the new messages only."""
        if self.memory <= 0 or len(body) < REUSE_FROM or len(body) > self.memory or type(req) is not dict:
            return
        messages = req.get("messages")
        if type(messages) is not list or not messages:
            return
        if reuse is not None:
            start, ends, counts = reuse.start, reuse.ends(), reuse.kept.counts[:reuse.count]
            self._forget(reuse.kept)  # this request extends it: the new one replaces it
        else:
            found = _messages_start(body)
            if found is None:
                return
            start, ends, counts = found, [], []
        _find_ends(body, messages, start, ends, counts)
        if not ends:
            return
        kept = Kept(body, start, ends, messages, counts)
        if reuse is None and not self._counts(kept):
            return
        mine = self._clients.setdefault(client, [])
        if len(mine) >= PER_CLIENT:
            self._forget(mine[0])
        mine.append(kept)
        self._order[id(kept)] = (client, kept)
        self._held += len(body)
        while self._held > self.memory:
            self._forget(next(iter(self._order.values()))[1])

    def _counts(self, kept: Kept) -> bool:
        """Whether the array found first is the one that counts (on first sight: a reused request's was proved
        when it was parsed). Not needed for exactness, which the sentinel checks on every reuse, but a kept request
        that could never be reused would cost every later request a parse in vain."""
        try:
            cut = orjson.loads(b"".join((kept.body[:kept.start], self._sentinel, kept.body[kept.ends[-1]:])))
        except orjson.JSONDecodeError:
            return False
        messages = cut.get("messages") if type(cut) is dict else None
        return (type(messages) is list and len(messages) == len(kept.messages) - len(kept.ends) + 1
                and messages[0] == self._mark)

    def _forget(self, kept: Kept) -> None:
        entry = self._order.pop(id(kept), None)
        if entry is None:
            return  # already replaced (two requests extended it at once)
        mine = self._clients[entry[0]]
        mine.remove(kept)
        if not mine:
            del self._clients[entry[0]]
        self._held -= len(kept.body)


def _find_ends(body: bytes, messages: list[Any], start: int, ends: list[int], counts: list[int]) -> None:
    """Extend ``ends`` and ``counts`` over the messages whose serialisation is in ``body`` where they must be."""
    at = ends[-1] + 1 if ends else start
    total = counts[-1] if counts else 0
    for message in messages[len(ends):]:
        if ends and body[ends[-1]] != 0x2C:  # the last one found closed the array
            return
        data = orjson.dumps(message)
        if not body.startswith(data, at):
            return
        at += len(data)
        if body[at:at + 1] not in (b",", b"]"):  # a body written with spaces between its values
            return
        ends.append(at)
        total += tokens.message_tokens(message)
        counts.append(total)
        at += 1


def _messages_start(body: bytes) -> int | None:
    """The offset just past the first ``"messages":[``: the top-level one, unless the sentinel's parse finds
    otherwise (``Histories._parse_rest``, ``Histories._counts``)."""
    at = body.find(KEY)
    if at < 0:
        return None
    at += len(KEY)
    if body[at:at + 1] != b"[":
        return None
    return at + 1


def _best(candidates: list[Kept], body: bytes, start: int) -> Reuse | None:
    best: Reuse | None = None
    for kept in reversed(candidates):
        if best is not None and len(kept.ends) <= best.count:
            continue
        count = _shared(kept, body, start)
        if count and (best is None or count > best.count):
            best = Reuse(kept, count, kept.counts[count - 1], start)
    return best


def _shared(kept: Kept, body: bytes, start: int) -> int:
    """How many of ``kept``'s messages ``body``, its messages starting at ``start``, holds byte for byte."""
    shift = start - kept.start
    ends = kept.ends
    view = memoryview(kept.body)
    size = len(body)
    last = ends[-1]
    if last + shift < size and body[last + shift] in (0x2C, 0x5D) and body.startswith(view[kept.start:last], start):
        return len(ends)  # the usual case when nothing changed: all of it, in one comparison
    # the first message that differs, by halves: each step compares only the bytes not yet proved equal
    low, high, proved = 0, len(ends) - 1, kept.start  # messages [0, low) are equal; message high may not be
    while low < high:
        mid = (low + high) // 2
        end = ends[mid]
        if body.startswith(view[proved:end], proved + shift):
            low, proved = mid + 1, end
        else:
            high = mid
    while low > 0 and not (ends[low - 1] + shift < size and body[ends[low - 1] + shift] in (0x2C, 0x5D)):
        low -= 1
    return low
