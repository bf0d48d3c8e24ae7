"""What every wire format provides, so the server can drive any of them the same way.

A format (registered in ``relay.formats.registry``) offers three pure functions:
``build(req, provider, model, stream, client=None) -> UpstreamCall``, ``stream_translator(opts) -> Translator``
and ``translate_response(doc, opts) -> dict`` (an Anthropic Message). No I/O anywhere. A format may also offer
``count_tokens(req, provider, model, client) -> UpstreamCall`` to have ``/v1/messages/count_tokens`` forwarded.
The translated formats are each one ``Translated`` (their pieces as data); the passthrough is its own module.

``client`` is the request as it arrived (``ClientRequest``). relay never changes a parsed request in place: a
change (a fitted max_tokens, a stripped routing tag) makes a new dict, so ``req is client.json`` tells a format
that forwards bytes whether those bytes still say what ``req`` says.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from relay.config import Provider
from relay.errors import RelayError, as_anthropic_overflow
from relay.formats.inbound import session_id
from relay.formats.resume import Translation

if TYPE_CHECKING:
    from relay.history import Reuse


@dataclass
class UpstreamCall:
    path: str  # appended to the provider's base_url (may carry a query string)
    body: bytes
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)  # format-specific extra headers
    dropped: set[str] = field(default_factory=set)  # request fields left out on purpose (debug log)


@dataclass(frozen=True)
class ClientRequest:
    """The client's request as it arrived, for formats that forward it rather than translate it
    (``anthropic``: the body's bytes re-targeted, ``anthropic-version``/``anthropic-beta`` passed on)."""

    body: bytes  # the raw request body
    json: dict[str, Any]  # ``body`` parsed; a build that receives another dict knows relay changed the request
    headers: tuple[tuple[bytes, bytes], ...] = ()  # the client's request headers (lower-case names)
    reuse: Reuse | None = None  # what its parse took from the conversation's request before (relay.history)

    def header(self, name: bytes) -> bytes | None:
        return next((v for k, v in self.headers if k == name), None)

    @cached_property
    def session_id(self) -> str | None:
        """Claude Code's session id (``metadata.user_id``'s ``session_id``), parsed once: what keeps a session's
        requests on one upstream prefix cache (``prompt_cache_key``, and the server's session affinity)."""
        return session_id(self.json)


@dataclass  # not frozen: a frozen dataclass is made field by field through object.__setattr__ (~1 us more)
class Options:
    """What a response translator needs to know about the request it answers."""

    model: str  # the model name the client asked for (responses carry it)
    provider: Provider
    stop_sequences: tuple[str, ...] = ()
    input_tokens_hint: int = 0  # relay's estimate of the prompt
    context_window: int | None = None  # the serving model's window, when known
    max_tokens: int | None = None  # what relay asked the upstream for

    def overflow(self, error: RelayError) -> RelayError:
        """Put an upstream's context-overflow error in Anthropic's words (other errors pass unchanged)."""
        return as_anthropic_overflow(error, self.input_tokens_hint, self.context_window, self.max_tokens,
                                     local=self.provider.discover_context)


def ended_early(provider: str, missing: str) -> RelayError:
    """An upstream stream that closed cleanly without its format's end marker (``missing``) has cut the answer
    short. Passing that on as a normal end would be a silent truncation the client then acts on (Claude Code
    runs a half-written tool call), so it is an error: HTTP 502 before anything was sent, ``event: error`` after."""
    return RelayError(502, f"{provider}: the upstream ended the stream before finishing ({missing})", "api_error")


class Translator(Protocol):
    """An incremental stream translator: upstream bytes in, Anthropic SSE bytes out."""

    started: bool  # message_start has been produced
    done: bool  # message_stop or an error event has been produced
    error: RelayError | None  # set when the upstream failed; if not started, answer with an HTTP error
    has_usage: bool
    usage_estimated: bool  # the upstream sent no usage: output_tokens is relay's estimate of what was streamed
    input_tokens: int
    output_tokens: int
    cache_read: int

    def feed(self, data: bytes) -> bytes: ...

    def finish(self) -> bytes: ...

    def abort(self, error: RelayError) -> bytes: ...

    def start_now(self) -> bytes:
        """message_start before the upstream has sent anything (a long silence: the stream's keep-alive needs
        it out); b"" once started. Whatever fails after it is an ``event: error``, no longer an HTTP status."""
        ...


class Format(Protocol):
    def build(self, req: dict[str, Any], provider: Provider, model: str, stream: bool,
              client: ClientRequest | None = None) -> UpstreamCall: ...

    def stream_translator(self, opts: Options) -> Translator: ...

    def translate_response(self, doc: Any, opts: Options) -> dict[str, Any]: ...


def _no_extra(opts: Options) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class Translated:
    """A format relay translates (OpenAI Chat, Gemini, OpenAI Responses), as its pieces: the request builder
    (``build_body(req, provider, model, stream) -> (body, dropped)``), the upstream path, the stream translator
    (a ``BlockWriter``) and the whole-response translator. ``extra`` gives the provider quirks a format's
    translators read beyond the common ones (OpenAI Chat: ``think_tags``, the stop sequences)."""

    build_body: Callable[[dict[str, Any], Provider, str, bool], tuple[dict[str, Any], set[str]]]
    path: Callable[[str, bool], str]
    translator: Callable[..., Translator]
    translate: Callable[..., dict[str, Any]]
    extra: Callable[[Options], dict[str, Any]] = _no_extra
    resumes: bool = False  # build_body takes ``history`` (relay.formats.resume)

    def build(self, req: dict[str, Any], provider: Provider, model: str, stream: bool,
              client: ClientRequest | None = None) -> UpstreamCall:
        reuse = client.reuse if client is not None else None
        messages = req.get("messages")
        if self.resumes and reuse is not None and type(messages) is list:  # a conversation going on
            record = reuse.translation = Translation(provider, messages)
            body, dropped = self.build_body(req, provider, model, stream,  # type: ignore[call-arg]
                                            history=(reuse.kept.translation, record))
        else:
            body, dropped = self.build_body(req, provider, model, stream)
        return UpstreamCall(self.path(model, stream), orjson.dumps(body), dropped=dropped)

    def stream_translator(self, opts: Options) -> Translator:
        p = opts.provider
        return self.translator(opts.model, input_tokens_hint=opts.input_tokens_hint, secrets=p.api_keys,
                               provider=p.name, on_error=opts.overflow, **self.extra(opts))

    def translate_response(self, doc: Any, opts: Options) -> dict[str, Any]:
        p = opts.provider
        return self.translate(doc, opts.model, secrets=p.api_keys, provider=p.name, **self.extra(opts))

