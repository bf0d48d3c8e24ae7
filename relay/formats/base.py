"""What every wire format provides, so the server can drive any of them the same way.

A format is a module (registered in ``relay.formats.registry``) with three pure functions:
``build(req, provider, model, stream) -> UpstreamCall``, ``stream_translator(opts) -> Translator`` and
``translate_response(doc, opts) -> dict`` (an Anthropic Message). No I/O anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from relay.config import Provider
from relay.errors import RelayError


@dataclass
class UpstreamCall:
    path: str  # appended to the provider's base_url (may carry a query string)
    body: bytes
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)  # format-specific extra headers
    dropped: set[str] = field(default_factory=set)  # request fields left out on purpose (debug log)


@dataclass(frozen=True)
class Options:
    """What a response translator needs to know about the request it answers."""

    model: str  # the model name the client asked for (responses carry it)
    provider: Provider
    stop_sequences: tuple[str, ...] = ()
    input_tokens_hint: int = 0


class Translator(Protocol):
    """An incremental stream translator: upstream bytes in, Anthropic SSE bytes out."""

    started: bool  # message_start has been produced
    done: bool  # message_stop or an error event has been produced
    error: RelayError | None  # set when the upstream failed; if not started, answer with an HTTP error
    has_usage: bool
    input_tokens: int
    output_tokens: int
    cache_read: int

    def feed(self, data: bytes) -> bytes: ...

    def finish(self) -> bytes: ...

    def abort(self, error: RelayError) -> bytes: ...


class Format(Protocol):
    def build(self, req: dict[str, Any], provider: Provider, model: str, stream: bool) -> UpstreamCall: ...

    def stream_translator(self, opts: Options) -> Translator: ...

    def translate_response(self, doc: Any, opts: Options) -> dict[str, Any]: ...
