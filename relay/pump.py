"""The stream pump: upstream chunks -> translator -> client, while a watcher notices a client that leaves
and fills the upstream's silences.

Every upstream chunk is translated the moment it arrives; what one upstream read delivered leaves in one
client write, made when the upstream connection is about to read the network again (``Pump.flush``, passed
to ``Upstreams.request`` as its ``before_read`` hook), so nothing ever waits for a later read.

The watcher is the stream's one timer, from before the upstream is asked until the answer is out: it times
the idle gap, and it keeps the client's connection alive (proxies cut connections idle for 30-60 s) with
Anthropic's ``ping`` events whenever nothing was written for ``keepalive`` seconds. A ping only ever follows
message_start; when the upstream has sent nothing at all by ``start_at``, message_start goes out early, and
from then on a failure is an ``event: error`` rather than an HTTP status (so not before a long wait: fast
failures keep their status, their retries and their fallbacks).
"""

from __future__ import annotations

import logging
import math
from types import TracebackType
from typing import Any

import trio

from relay.errors import RelayError, empty_stream
from relay.formats.anthropic import PING
from relay.formats.base import Translator
from relay.http import ClientGone, EventStream
from relay.metrics import Metrics
from relay.upstream import Deadlines, UpstreamBroke, UpstreamResponse, stalled

log = logging.getLogger("relay.server")

DRAIN_SECONDS = 2.0
DRAIN_BYTES = 1024 * 1024


class Pump:
    """One streamed answer. Made before the upstream request, so its ``flush`` can be that request's hook.
    ``keepalive``: seconds without a write before a ping (0: none, nor an early start); ``start_at``: the
    time (trio's clock) at which message_start goes out if the upstream has not started by then."""

    __slots__ = ("out", "deadlines", "estimate", "translator", "keepalive", "start_at", "pending", "flushing",
                 "gone", "last_write", "aside", "reading", "_watching", "_timer", "_metrics", "_nursery")

    def __init__(self, out: EventStream, deadlines: Deadlines, estimate: int, translator: Translator,
                 keepalive: float = 0.0, start_at: float = math.inf) -> None:
        self.out = out
        self.deadlines = deadlines
        self.estimate = estimate  # relay's estimate of the prompt, for the usage of a stream that reports none
        self.translator = translator
        self.keepalive = keepalive
        self.start_at = start_at
        self.pending: list[bytes] = []  # translated events not yet written
        self.flushing = False  # a client write is under way (a client that stops reading stalls it)
        self.gone = False  # the client left (or stopped reading): nothing more can reach it
        self.last_write = 0.0  # when the last client write ended
        self.aside: trio.Event | None = None  # set when the watcher's own write (a ping) is done
        self.reading: trio.CancelScope | None = None  # the body's reads, once it streams (the idle gap cancels it)
        self._watching = trio.CancelScope()
        self._timer: trio.CancelScope | None = None  # the watcher's present wait
        self._metrics: Metrics
        self._nursery: Any  # trio's nursery manager, entered by ``__aenter__``

    async def flush(self) -> None:
        pending = self.pending
        if pending:
            data = pending[0] if len(pending) == 1 else b"".join(pending)
            pending.clear()
            while self.aside is not None:  # a ping is being written: the stream's bytes follow it, never inside it
                await self.aside.wait()
            self.flushing = True
            await self.out.write(data)
            self.flushing = False
            # the idle timer counts upstream silence, not a slow client
            self.last_write = self.deadlines.last_read = trio.current_time()

    def watching(self, metrics: Metrics) -> Pump:
        """``async with pump.watching(metrics)``: the watcher runs while the body runs, around the upstream
        request, so a client that leaves cancels even the wait for the upstream's head. Whatever the body
        raises comes out as itself, not grouped. (A class of its own, not a generator: one per stream.)"""
        self._metrics = metrics
        return self

    async def __aenter__(self) -> None:
        self._metrics.open_streams += 1
        self._nursery = trio.open_nursery()
        nursery = await self._nursery.__aenter__()
        nursery.start_soon(self._watch_client, nursery.cancel_scope)

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> bool:
        self._watching.cancel()
        try:
            if isinstance(exc, Exception):  # an upstream's error: the server's to handle, not the nursery's
                await self._nursery.__aexit__(None, None, None)
                return False
            return bool(await self._nursery.__aexit__(kind, exc, tb))  # Cancelled stays with the scopes
        finally:
            self._metrics.open_streams -= 1
            self._account()

    async def run(self, upstream: UpstreamResponse) -> RelayError | None:
        """Relay the stream to its end (inside ``watching``). Returns the error to answer with when the upstream
        failed before anything was produced (in the translator's words, already Anthropic's); None once the
        answer is out."""
        ex, translator = self.out.ex, self.translator
        error: RelayError | None = None
        self.reading = reading = trio.CancelScope()
        deadlines = self.deadlines
        deadlines.last_read = trio.current_time()
        if self._timer is not None:  # the idle gap counts from now: the watcher's wait ends by then at the latest
            self._timer.deadline = min(self._timer.deadline, deadlines.last_read + deadlines.idle)
        try:
            error = await self._relay_chunks(upstream, translator, reading)
            await self.flush()
            if error is None:
                if not self.out.started:  # nothing came out at all: never leave the client without an answer
                    error = empty_stream(ex.target)
                else:
                    await self._end()
        except ClientGone:
            self.gone = True
        self._watching.cancel()  # the answer is out: a client that hangs up now must not cost the connection
        if not self.gone and error is None and translator.error is None:
            await upstream.drain(DRAIN_SECONDS, DRAIN_BYTES)
        return error

    async def fail(self, error: RelayError) -> None:
        """The attempt failed after message_start went out early (after ``watching``): an event ends it."""
        try:
            await self.out.write(self.translator.abort(error))
            await self.out.end()
        except ClientGone:
            self.gone = True
        self._account()

    async def _end(self) -> None:
        while self.aside is not None:
            await self.aside.wait()
        self.flushing = True  # for good: no ping may follow the terminator
        await self.out.end()

    def _account(self) -> None:
        """What the stream used and how it ended, for the access log and the usage book."""
        ex, translator = self.out.ex, self.translator
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

    async def _watch_client(self, cancel: trio.CancelScope) -> None:
        """Cancels everything when the client goes away. Also the stream's one timer, waking at the first of:
        the idle gap (once the body streams), a ping due (after message_start), the early start (before it).
        Cheaper here, waking once per keepalive at most, than a cancel scope around every upstream read."""
        conn, deadlines, out, translator = self.out.conn, self.deadlines, self.out, self.translator
        idle, keepalive = deadlines.idle, self.keepalive
        with self._watching:
            while True:
                wake = deadlines.last_read + idle if self.reading is not None else math.inf
                if keepalive:
                    if out.started and not self.flushing:
                        wake = min(wake, self.last_write + keepalive)
                    else:  # before the first write, or during one: the main task may change that at any
                        wake = min(wake, trio.current_time() + keepalive)  # moment, so look again within keepalive
                        if not translator.started:
                            wake = min(wake, self.start_at)
                with trio.move_on_at(wake) as self._timer:
                    data = await conn.receive()  # a pipelined next request: h11 keeps it for later
                waiting, self._timer = self._timer, None
                if not waiting.cancelled_caught:
                    if not data:
                        self.gone = True
                        cancel.cancel()
                        return
                    continue
                now = trio.current_time()
                if self.reading is not None and now >= deadlines.last_read + idle:
                    if self.flushing:  # the client took nothing for read_timeout: a write cut midway cannot be
                        self.gone = True  # finished with an error event, so the connection is simply closed
                        out.ex.note = "client stopped reading"
                        cancel.cancel()
                    else:
                        self.reading.cancel()
                    return
                if not keepalive or self.flushing:
                    continue
                if out.started:
                    if now >= self.last_write + keepalive and not await self._aside(PING):
                        cancel.cancel()
                        return
                elif now >= self.start_at and not translator.started:
                    log.debug("%s %s: nothing from the upstream yet; message_start goes out now", out.ex.request_id,
                              out.ex.target)
                    if not await self._aside(translator.start_now()):
                        cancel.cancel()
                        return

    async def _aside(self, data: bytes) -> bool:
        """A write of the watcher's own, while the stream's writes wait for it; False when the client is gone
        (or took nothing for read_timeout: a write cut midway leaves nothing to add to)."""
        done = self.aside = trio.Event()
        self.flushing = True
        try:
            with trio.move_on_after(self.deadlines.idle) as cut:
                await self.out.write(data)
            if cut.cancelled_caught:
                self.gone = True
                self.out.ex.note = "client stopped reading"
            self.last_write = trio.current_time()
        except ClientGone:
            self.gone = True
        finally:
            self.flushing = False
            self.aside = None
            done.set()
        return not self.gone

    async def _relay_chunks(self, upstream: UpstreamResponse, translator: Translator,
                            reading: trio.CancelScope) -> RelayError | None:
        """Feeds the translator; returns the error to answer with when the upstream failed before anything
        was produced. ``reading`` is cancelled by the idle-gap timer."""
        ex, pending, deadlines = self.out.ex, self.pending, self.deadlines
        try:
            with reading:
                async for chunk in upstream.chunks():
                    deadlines.heard()
                    out = translator.feed(chunk)
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
        except Exception:  # an upstream shape nobody anticipated (or a translator bug): a clean end, never a cut
            log.warning("%s %s: upstream data could not be translated", ex.request_id, ex.target, exc_info=True)
            err = RelayError(502, f"{ex.target}: the upstream sent data relay could not translate", "api_error")
            if translator.started and not translator.done:
                pending.append(err.sse())
            translator.error, translator.done = err, True
        if translator.error is not None and not translator.started:
            return translator.error
        return None
