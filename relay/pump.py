"""The stream pump: upstream reads -> translator -> client, while a watcher notices a client that leaves.

One loop: read the upstream once, translate what that read completed (SSE events, parsed in the same pass as
the chunk framing, or body bytes for a translator that wants them), and write it to the client in one write
just before the next upstream read (``Pump.flush``), so nothing ever waits for a later read.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from relay.errors import RelayError, empty_stream
from relay.formats.base import Translator
from relay.http import ClientGone, EventStream
from relay.metrics import Metrics
from relay.sse import SSEError
from relay.upstream import Deadlines, UpstreamBroke, UpstreamResponse, stalled

log = logging.getLogger("relay.server")

DRAIN_SECONDS = 2.0
DRAIN_BYTES = 1024 * 1024


class Pump:
    """One streamed answer. Made before the upstream request, so its ``flush`` can be that request's hook."""

    __slots__ = ("out", "deadlines", "estimate", "pending", "flushing", "gone")

    def __init__(self, out: EventStream, deadlines: Deadlines, estimate: int) -> None:
        self.out = out
        self.deadlines = deadlines
        self.estimate = estimate  # relay's estimate of the prompt, for the usage of a stream that reports none
        self.pending: list[bytes] = []  # translated events not yet written
        self.flushing = False  # a client write is under way (a client that stops reading stalls it)
        self.gone = False  # the client left (or stopped reading): nothing more can reach it

    async def flush(self) -> None:
        pending = self.pending
        if pending:
            data = pending[0] if len(pending) == 1 else b"".join(pending)
            pending.clear()
            self.flushing = True
            await self.out.write(data)
            self.flushing = False
            self.deadlines.last_read = trio.current_time()  # the idle timer counts upstream silence, not a slow client

    async def run(self, upstream: UpstreamResponse, translator: Translator, metrics: Metrics) -> RelayError | None:
        """Relay the stream to its end. Returns the error to answer with when the upstream failed before
        anything was produced (in the translator's words, already Anthropic's); None once the answer is out."""
        ex = self.out.ex
        error: RelayError | None = None
        reading = trio.CancelScope()
        metrics.open_streams += 1
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_client, nursery.cancel_scope, reading)
                try:
                    self.deadlines.last_read = trio.current_time()
                    error = await self._relay_chunks(upstream, translator, reading)
                    await self.flush()
                except ClientGone:
                    self.gone = True
                if not self.gone and error is None:
                    if not self.out.started:  # nothing came out at all: never leave the client without an answer
                        error = empty_stream(ex.target)
                    else:
                        try:
                            await self.out.end()
                        except ClientGone:
                            self.gone = True
                nursery.cancel_scope.cancel()
            if not self.gone and error is None and translator.error is None:
                # after the watcher: a client that hangs up once it has its answer must not cost the connection
                await upstream.drain(DRAIN_SECONDS, DRAIN_BYTES)
        finally:
            metrics.open_streams -= 1
        if translator.has_usage:
            ex.input_tokens = translator.input_tokens + translator.cache_read
            ex.output_tokens = translator.output_tokens
        elif translator.usage_estimated:
            ex.input_tokens, ex.output_tokens, ex.usage_estimated = self.estimate, translator.output_tokens, True
        if self.gone:
            ex.note = ex.note or "client disconnected"
        elif translator.error is not None and translator.started:
            ex.note = f"midstream error={translator.error.error_type}"
        return error

    async def _watch_client(self, cancel: trio.CancelScope, reading: trio.CancelScope) -> None:
        """Cancels everything when the client goes away. Also the idle-gap timer: cheaper here, waking once
        per read_timeout, than a cancel scope around every upstream read."""
        conn, deadlines = self.out.conn, self.deadlines
        idle = deadlines.idle
        while True:
            with trio.move_on_at(deadlines.last_read + idle) as waiting:
                data = await conn.receive()  # a pipelined next request: h11 keeps it for later
            if waiting.cancelled_caught:
                if trio.current_time() < deadlines.last_read + idle:
                    continue
                if self.flushing:  # the client took nothing for read_timeout: a write cut midway cannot be
                    self.gone = True  # finished with an error event, so the connection is simply closed
                    self.out.ex.note = "client stopped reading"
                    cancel.cancel()
                else:
                    reading.cancel()
                return
            if not data:
                self.gone = True
                cancel.cancel()
                return

    async def _relay_chunks(self, upstream: UpstreamResponse, translator: Translator,
                            reading: trio.CancelScope) -> RelayError | None:
        """Feeds the translator; returns the error to answer with when the upstream failed before anything
        was produced. ``reading`` is cancelled by the idle-gap timer."""
        ex, pending, deadlines = self.out.ex, self.pending, self.deadlines
        feed_events = getattr(translator, "feed_events", None)
        read: Callable[[], Awaitable[Any]] = upstream.events if feed_events is not None else upstream.chunk
        feed: Callable[[Any], bytes] = feed_events if feed_events is not None else translator.feed
        try:
            with reading:
                while not upstream.done:
                    await self.flush()
                    got = await read()
                    deadlines.heard()
                    if got:
                        out = feed(got)
                        if out:
                            pending.append(out)
                        if translator.done:
                            break
                else:
                    pending.append(translator.finish())
            if reading.cancelled_caught:
                pending.append(translator.abort(stalled(ex.target)))
        except ClientGone:
            raise
        except UpstreamBroke as exc:
            pending.append(translator.abort(exc))
        except SSEError as exc:
            pending.append(translator.bad_sse(exc))  # type: ignore[attr-defined]  # only event translators meet it
        except Exception:  # an upstream shape nobody anticipated (or a translator bug): a clean end, never a cut
            log.warning("%s %s: upstream data could not be translated", ex.request_id, ex.target, exc_info=True)
            err = RelayError(502, f"{ex.target}: the upstream sent data relay could not translate", "api_error")
            if translator.started and not translator.done:
                pending.append(err.sse())
            translator.error, translator.done = err, True
        if translator.error is not None and not translator.started:
            return translator.error
        return None
