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
        anything was produced (in the translator's words, already Anthropic's); None once the answer is out.

        What came with the upstream's head is translated first, with no task and no cancel scope: when that
        holds the whole answer (a fast upstream) and the client's socket takes it in one write, the stream is
        over before anything had to wait, and the client watcher is never started. Otherwise the rest runs
        watched: the watcher notices a client that leaves, and times the upstream's silences."""
        ex = self.out.ex
        error: RelayError | None = None
        metrics.open_streams += 1
        try:
            self.deadlines.last_read = trio.current_time()
            over = self._arrived(upstream, translator)
            rest = b""
            if over:
                error = self._answer_error(translator)
                if error is None:
                    try:
                        rest = self.out.finish_now(self._take_pending())
                    except ClientGone:
                        self.gone = True
            if not over or rest:
                error = await self._watched(upstream, translator, rest)
            if not self.gone and error is None and translator.error is None:
                # after the watcher: a client that hangs up once it has its answer must not cost the connection
                await upstream.drain(DRAIN_SECONDS, DRAIN_BYTES)
        finally:
            metrics.open_streams -= 1
        if translator.has_usage:
            ex.input_tokens = translator.input_tokens + translator.cache_read
            ex.cache_read = translator.cache_read
            ex.output_tokens = translator.output_tokens
        elif translator.usage_estimated:
            ex.input_tokens, ex.output_tokens, ex.usage_estimated = self.estimate, translator.output_tokens, True
        if self.gone:
            ex.note = ex.note or "client disconnected"
        elif translator.error is not None and translator.started:
            ex.note = f"midstream error={translator.error.error_type}"
        return error

    def _take_pending(self) -> bytes:
        pending = self.pending
        data = pending[0] if len(pending) == 1 else b"".join(pending)
        pending.clear()
        return data

    def _answer_error(self, translator: Translator) -> RelayError | None:
        """For a stream over before anything was written: the error to answer with instead, if any."""
        if translator.error is not None and not translator.started:
            return translator.error
        if not any(self.pending):  # nothing came out at all: never leave the client without an answer
            return empty_stream(self.out.ex.target)
        return None

    async def _watched(self, upstream: UpstreamResponse, translator: Translator, rest: bytes) -> RelayError | None:
        """The stream from here on, with the client watcher: ``rest`` is the unsent end of an answer already
        complete (a client slow to take it), else the stream is still coming."""
        ex = self.out.ex
        error: RelayError | None = None
        reading = trio.CancelScope()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch_client, nursery.cancel_scope, reading)
            try:
                if rest:
                    self.flushing = True
                    await self.out.conn.send_bytes(rest)
                    self.flushing = False
                    nursery.cancel_scope.cancel()
                    return None
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

    def _arrived(self, upstream: UpstreamResponse, translator: Translator) -> bool:
        """Translate what came with the upstream's head (no I/O); True when that ended the stream."""
        try:
            if not upstream.arrived():
                return upstream.done and self._take(None, translator.feed, upstream, translator)
            self.deadlines.heard()
            if translator_reads_events(translator):
                got: Any = upstream.arrived_events()
                return self._take(got, translator.feed_events, upstream, translator)  # type: ignore[attr-defined]
            return self._take(upstream.arrived_chunk(), translator.feed, upstream, translator)
        except Exception as exc:
            self._failed(exc, translator)
            return True

    def _take(self, got: Any, feed: Callable[[Any], bytes], upstream: UpstreamResponse, translator: Translator) -> bool:
        """Translate what one read completed; True when the stream is over."""
        if got:
            out = feed(got)
            if out:
                self.pending.append(out)
            if translator.done:
                return True
        if upstream.done:
            self.pending.append(translator.finish())
            return True
        return False

    def _failed(self, exc: Exception, translator: Translator) -> None:
        """End the translation after ``exc``: an upstream that broke, or data that could not be translated."""
        pending, ex = self.pending, self.out.ex
        if isinstance(exc, UpstreamBroke):
            pending.append(translator.abort(exc))
        elif isinstance(exc, SSEError):
            pending.append(translator.bad_sse(exc))  # type: ignore[attr-defined]  # only event translators meet it
        else:  # an upstream shape nobody anticipated (or a translator bug): a clean end, never a cut
            log.warning("%s %s: upstream data could not be translated", ex.request_id, ex.target, exc_info=exc)
            err = RelayError(502, f"{ex.target}: the upstream sent data relay could not translate", "api_error")
            if translator.started and not translator.done:
                pending.append(err.sse())
            translator.error, translator.done = err, True

    async def _relay_chunks(self, upstream: UpstreamResponse, translator: Translator,
                            reading: trio.CancelScope) -> RelayError | None:
        """Feeds the translator until the stream is over; returns the error to answer with when the upstream
        failed before anything was produced. ``reading`` is cancelled by the idle-gap timer."""
        events = translator_reads_events(translator)
        read: Callable[[], Awaitable[Any]] = upstream.events if events else upstream.chunk
        feed: Callable[[Any], bytes] = translator.feed_events if events else translator.feed  # type: ignore[attr-defined]
        try:
            with reading:
                while True:
                    await self.flush()
                    got = await read()
                    self.deadlines.heard()
                    if self._take(got, feed, upstream, translator):
                        break
            if reading.cancelled_caught:
                self.pending.append(translator.abort(stalled(self.out.ex.target)))
        except ClientGone:
            raise
        except Exception as exc:
            self._failed(exc, translator)
        if translator.error is not None and not translator.started:
            return translator.error
        return None


def translator_reads_events(translator: Translator) -> bool:
    """Translators that take parsed SSE events (every translated format); the passthrough takes bytes."""
    return hasattr(translator, "feed_events")
