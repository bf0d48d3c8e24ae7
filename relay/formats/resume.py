"""A conversation's translation carried to its next request: the messages translated once.

``relay.history`` reads a request's repeated messages as the very objects of the request before. A format that
translates messages in order (OpenAI Chat) keeps, with each request, what it made of them (``Translation``): the
upstream messages, and its state after each message (``Mark``). The next request's translation starts after the
last message that is the same object as one translated (``is``, so exactly the same value: parsed messages are
never changed in place), from the state it left. The upstream messages' JSON is made once too, when a request
first reuses them, and goes into the next bodies as ``orjson.Fragment``s: bytes orjson copies as they are.
"""

from __future__ import annotations

from typing import Any

import orjson

from relay.config import Provider

# The state after a message: upstream messages made so far, calls waiting for their results (in order), system
# turns merged into the system prompt so far, what was dropped so far.
Mark = tuple[int, tuple[str, ...], int, frozenset[str]]


class Translation:
    """One request's messages as one provider's format translated them."""

    __slots__ = ("provider", "messages", "out", "merged", "marks", "chunks")

    def __init__(self, provider: Provider, messages: list[Any]) -> None:
        self.provider = provider
        self.messages = messages  # the request's parsed messages (kept alive with it: ``is`` means the same)
        self.out: list[Any] = []  # the upstream messages made of them (a system prompt put first is not one)
        self.merged: list[str] = []  # system turns merged into the system prompt, in order
        self.marks: list[Mark] = []  # marks[i]: the state after message i
        # The JSON of the first upstream messages, in chunks (made as they are reused, a chunk a request):
        # (the number of messages up to the chunk's end, their JSON comma-separated).
        self.chunks: list[tuple[int, orjson.Fragment]] = []

    def covers(self, messages: list[Any], provider: Provider) -> int:
        """How many of ``messages``, from the first, are the very messages this translated, for ``provider``."""
        if provider is not self.provider and provider != self.provider:  # (a stored provider may be remade)
            return 0
        mine = self.messages
        count = min(len(self.marks), len(messages))
        for i in range(count):
            if messages[i] is not mine[i]:
                return i
        return count

    def json(self, count: int) -> list[orjson.Fragment]:
        """The first ``count`` upstream messages' JSON, as list items (each message's made once). One chunk for
        those not made yet: ``orjson.dumps`` gives each result at least 16 KiB, so a message apiece would hold
        eight times the JSON (its slice is a copy of the exact size)."""
        chunks = self.chunks
        while chunks and chunks[-1][0] > count:  # (a conversation rewound)
            chunks.pop()
        done = chunks[-1][0] if chunks else 0
        if done < count:
            chunks.append((count, orjson.Fragment(orjson.dumps(self.out[done:count])[1:-1])))
        return [fragment for _, fragment in chunks]

    def carry(self, count: int, into: Translation) -> Mark:
        """Give ``into`` (the next request's) this one's first ``count`` messages; their state after them."""
        mark = self.marks[count - 1]
        into.out = self.out[:mark[0]]
        into.merged = self.merged[:mark[2]]
        into.marks = self.marks[:count]
        into.chunks = [chunk for chunk in self.chunks if chunk[0] <= mark[0]]
        return mark
