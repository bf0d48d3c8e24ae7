"""The stream pump: upstream reads -> translator -> client, while a watcher notices a client that leaves
and fills the upstream's silences.

One loop: read the upstream once, translate what that read completed (SSE events, parsed in the same pass as
the chunk framing, or body bytes for a translator that wants them), and write it to the client in one write
just before the next upstream read (``Pump.flush``), so nothing ever waits for a later read.

Keep-alive (proxies cut connections idle for 30-60 s): whenever nothing was written for ``keepalive`` seconds,
Anthropic's ``ping`` event, never before message_start. The stream's watcher times it, as it times the idle
gap: the server's one watcher for all streams (``relay.watch``), or, where it has none, a task of the stream's
own; either asks the pump what is due (``wake_at``, ``timer``). Before the upstream's head there is no watcher
(a fast upstream never needs one): one task per server (``HeadWaits``) starts one for a stream still waiting at
its ``start_at``. A stream whose upstream has sent nothing by then gets its message_start early, and from then
on a failure is an ``event: error`` rather than an HTTP status (so not before a long wait: fast failures keep
their status, their retries and their fallbacks).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import trio

from relay.errors import RelayError, empty_stream
from relay.formats.anthropic import PING
from relay.formats.base import Translator
from relay.http import ClientGone, EventStream
from relay.metrics import Metrics
from relay.sse import SSEError
from relay.upstream import Deadlines, UpstreamBroke, UpstreamResponse, stalled

if TYPE_CHECKING:
    from relay.watch import StreamWatch

log = logging.getLogger("relay.server")

DRAIN_SECONDS = 2.0
DRAIN_BYTES = 1024 * 1024


class Pump:
    """One streamed answer, made before the upstream request. ``keepalive``: seconds without a write before a
    ping (0: none, nor an early start); ``start_at``: the time (trio's clock) at which message_start goes out
    if the upstream has not started by then."""

    __slots__ = ("out", "deadlines", "estimate", "translator", "keepalive", "start_at", "watch", "pending",
                 "flushing", "gone", "last_write", "aside", "head_over", "waits", "scope", "entry", "watched_fd",
                 "unsent", "upstream", "events", "_head_scope", "_head_done")
    scope: trio.CancelScope  # once watched (``_watched``): cancelled when the client leaves (or stops reading),
    # or by the idle-gap timer (``gone`` tells which)

    def __init__(self, out: EventStream, deadlines: Deadlines, estimate: int, translator: Translator,
                 keepalive: float = 0.0, start_at: float = math.inf, watch: StreamWatch | None = None) -> None:
        self.out = out
        self.deadlines = deadlines
        self.estimate = estimate  # relay's estimate of the prompt, for the usage of a stream that reports none
        self.translator = translator
        self.keepalive = keepalive
        self.start_at = start_at
        self.watch = watch  # the server's watcher of streams (None: the stream watches its client itself)
        self.pending: list[bytes] = []  # translated events not yet written
        self.flushing = False  # a client write is under way (a client that stops reading stalls it)
        self.gone = False  # the client left (or stopped reading): nothing more can reach it
        self.last_write = 0.0  # when the last client write ended
        self.aside: trio.Event | None = None  # set when the watcher's own write (a ping) is done
        self.head_over = False  # the upstream's head came (or the request failed): no head watch from now
        self.waits: dict[Pump, None] | None = None  # where ``HeadWaits`` keeps it until its head comes
        self.entry: list[Any] | None = None  # the stream's place in its watcher's timers
        self.watched_fd = -1  # the client socket's descriptor, in the watcher's epoll set while watched
        self.unsent = b""  # what the watcher's write of a chunk (``pull``) left for the stream's task to send
        self.upstream: UpstreamResponse | None = None  # while the chunks are relayed
        self.events = True  # the translator reads parsed SSE events (else bytes)
        self._head_scope: trio.CancelScope | None = None  # a head watch (``HeadWaits``), once started
        self._head_done: trio.Event | None = None

    async def flush(self) -> None:
        """Write what is pending. Called right after an upstream read (or the head) set ``deadlines.last_read``:
        a write the socket takes at once (nearly every one) ends at that time as far as the stream's timers can
        tell, so it costs no coroutine and no clock read; one that has to wait moves both clocks past it (the idle
        timer counts upstream silence, not a slow client)."""
        pending = self.pending
        if pending:
            data = pending[0] if len(pending) == 1 else b"".join(pending)
            pending.clear()
            while self.aside is not None:  # a ping is being written: the stream's bytes follow it, never inside it
                await self.aside.wait()
            rest = self.out.write_now(data)
            if rest == b"":
                self.last_write = self.deadlines.last_read
                return
            self.flushing = True
            if rest is None:
                await self.out.write(data)
            else:
                await self.out.conn.send_bytes(rest)
            self.flushing = False
            self.last_write = self.deadlines.last_read = trio.current_time()

    async def end_head_watch(self) -> None:
        """The upstream answered its head, or the request failed: a head watch (if one was started) ends
        here, after any write of its own, before the stream's own writes or watcher begin."""
        self.head_over = True
        if self.waits is not None:
            self.waits.pop(self, None)
            self.waits = None
        if self._head_done is not None:
            while self.aside is not None:
                await self.aside.wait()
            self._head_scope.cancel()  # type: ignore[union-attr]
            await self._head_done.wait()
            self._head_done = None

    async def watch_head(self) -> None:
        """The upstream has not answered its head by ``start_at`` (run by ``HeadWaits``, not by this stream's
        task): message_start now, then pings, until the head comes; a client that leaves cancels the request."""
        if self.head_over or self.translator.started:  # the head came while this task was being started
            return
        done = self._head_done = trio.Event()
        self._head_scope = trio.CancelScope()
        try:
            with self._head_scope:
                conn = self.out.conn
                ok = await self._aside(self.translator.start_now())
                while ok and not self.head_over:
                    with trio.move_on_at(self.last_write + self.keepalive) as waiting:
                        data = await conn.receive()
                    if not waiting.cancelled_caught:
                        ok = bool(data)  # b"": the client left; else a pipelined request, kept for later
                        self.gone = self.gone or not ok
                    elif not self.head_over:
                        ok = await self._aside(PING)
                if not ok:
                    self.deadlines.first_byte.cancel()  # the server sees ``gone`` and answers nobody
        finally:
            done.set()

    async def run(self, upstream: UpstreamResponse, metrics: Metrics) -> RelayError | None:
        """Relay the stream to its end. Returns the error to answer with when the upstream failed before
        anything was produced (in the translator's words, already Anthropic's); None once the answer is out.

        What came with the upstream's head is translated first, with no task and no cancel scope: when that
        holds the whole answer (a fast upstream) and the client's socket takes it in one write, the stream is
        over before anything had to wait, and the client watcher is never started. Otherwise the rest runs
        watched: the watcher notices a client that leaves, and times the upstream's silences."""
        translator = self.translator
        error: RelayError | None = None
        metrics.open_streams += 1
        try:
            if self.waits is not None or self._head_done is not None:
                await self.end_head_watch()
            self.head_over = True
            self.deadlines.last_read = trio.current_time()  # one clock read for the head, what came with it and
            over = self._arrived(upstream, translator)  # a first write made without waiting
            rest = b""
            if over and self.out.started:  # message_start went out early: the rest is ordinary writes
                self.deadlines.lift()
                try:
                    await self.flush()
                    await self._end()
                except ClientGone:
                    self.gone = True
            elif over:
                error = self._answer_error(translator)
                if error is None:
                    try:
                        rest = self.out.finish_now(self._take_pending())
                        self.last_write = self.deadlines.last_read
                    except ClientGone:
                        self.gone = True
            if not over or rest:
                self.deadlines.lift()
                error = await self._watched(upstream, translator, rest)
            if not self.gone and error is None and translator.error is None:
                # after the watcher: a client that hangs up once it has its answer must not cost the connection
                if not upstream.done:  # (drain returns at once when it is)
                    self.deadlines.lift()
                await upstream.drain(DRAIN_SECONDS, DRAIN_BYTES)
        finally:
            metrics.open_streams -= 1
        self._account()
        return error

    async def fail(self, error: RelayError) -> None:
        """The request failed after message_start went out early (and after ``end_head_watch``): an event
        ends the stream."""
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
        """The stream from here on, watched: ``rest`` is the unsent end of an answer already complete (a client
        slow to take it), else the stream is still coming."""
        watch = self.watch
        if watch is not None:
            watch.add(self)
            try:
                return await self._to_end(upstream, translator, rest)
            finally:
                watch.discard(self)
        async with trio.open_nursery() as nursery:  # no watcher for the server's streams: one of the stream's own
            nursery.start_soon(self._watch_client)
            error = await self._to_end(upstream, translator, rest)
            nursery.cancel_scope.cancel()
        return error

    async def _to_end(self, upstream: UpstreamResponse, translator: Translator, rest: bytes) -> RelayError | None:
        """One cancel scope (each costs ~40k instructions) for both ways a watcher cuts a stream: the client
        gone, or the upstream silent for read_timeout (then the error event that ends the stream is written in
        a scope of its own)."""
        error: RelayError | None = None
        with trio.CancelScope() as self.scope:
            try:
                if rest:
                    self.flushing = True
                    await self.out.send_rest(rest)
                    self.flushing = False
                    return None
                error = await self._relay_chunks(upstream, translator)
                return await self._finish(error)
            except ClientGone:
                self.gone = True
                return None
        if self.gone:
            return None
        with trio.CancelScope() as self.scope:  # the idle-gap timer cut the reads
            try:
                self.pending.append(translator.abort(stalled(self.out.ex.target)))
                if translator.error is not None and not translator.started:
                    error = translator.error
                return await self._finish(error)
            except ClientGone:
                self.gone = True
        return None

    async def _finish(self, error: RelayError | None) -> RelayError | None:
        """What is pending, then the terminator; ``error``: the error to answer with instead, if any."""
        await self.flush()
        while self.aside is not None:  # a watcher's write (an early message_start) decides what the answer is
            await self.aside.wait()
        if self.gone or error is not None:
            return error
        if not self.out.started:  # nothing came out at all: never leave the client without an answer
            return empty_stream(self.out.ex.target)
        try:
            await self._end()
        except ClientGone:
            self.gone = True
        return None

    def left(self) -> None:
        """The client hung up (or sent more than relay keeps while it answers): the stream is cancelled."""
        self.gone = True
        self.scope.cancel()

    def wake_at(self, now: float) -> float:
        """When the stream's timer looks next: the first of the idle gap, a ping due (after message_start), the
        early start (before it). One timer per stream, waking once per keepalive at most: far cheaper than a
        cancel scope around every upstream read."""
        deadlines, keepalive = self.deadlines, self.keepalive
        wake = deadlines.last_read + deadlines.idle
        if keepalive:
            if self.out.started and not self.flushing:
                wake = min(wake, self.last_write + keepalive)
            else:  # before the first write, or during one: the stream's task may change that at any moment, so
                wake = min(wake, now + keepalive)  # look again within keepalive
                if not self.translator.started:
                    wake = min(wake, self.start_at)
        return wake

    def timer(self, now: float) -> bytes | None:
        """The stream's timer went off at ``now``: a silence of read_timeout cancels the reads (the stream ends with
        an error event), or the stream when the client is what took nothing for that long; returns what to write
        aside of the stream's writes (``aside_write``), if anything: a ping, or an early message_start."""
        deadlines, keepalive = self.deadlines, self.keepalive
        if now >= deadlines.last_read + deadlines.idle:
            if self.flushing:  # the client took nothing for read_timeout: a write cut midway cannot be finished
                self.gone = True  # with an error event, so the connection is simply closed
                self.out.ex.note = "client stopped reading"
            self.scope.cancel()  # (the idle-gap timer's, when the client is not gone: the reads)
            deadlines.last_read = now  # the clock starts again: the error event then has read_timeout to go out
            return None
        if not keepalive or self.flushing:
            return None
        if self.out.started:
            if now >= self.last_write + keepalive:
                return PING
        elif now >= self.start_at and not self.translator.started:
            log.debug("%s %s: no event from the upstream yet; message_start goes out now", self.out.ex.request_id,
                      self.out.ex.target)
            return self.translator.start_now()
        return None

    async def _watch_client(self) -> None:
        """The stream's own watcher (where the server has none): notices the client leaving, and runs the timer."""
        conn = self.out.conn
        while True:
            with trio.move_on_at(self.wake_at(trio.current_time())) as waiting:
                data = await conn.receive()  # a pipelined next request: h11 keeps it for later
            if not waiting.cancelled_caught:
                if not data:
                    self.left()
                    return
                continue
            aside = self.timer(trio.current_time())
            if aside is not None:
                self.aside_begin()
                await self.watched_aside(aside)

    def aside_begin(self) -> None:
        """A write of a watcher's own is coming: the stream's writes wait for it from now (``aside_write``)."""
        self.aside = trio.Event()
        self.flushing = True

    async def watched_aside(self, data: bytes) -> None:
        """A watched stream's ``aside_write``: a client gone cancels the stream (so does a failure: it is this
        stream's, not its watcher's, which may watch every stream of the server)."""
        try:
            ok = await self.aside_write(data)
        except Exception:
            log.exception("%s: a write of the stream's watcher failed", self.out.ex.request_id)
            ok = False
        if not ok:
            self.left()

    async def aside_write(self, data: bytes) -> bool:
        """The watcher's write (after ``aside_begin``); False when the client is gone (or took nothing for
        read_timeout: a write cut midway leaves nothing to add to)."""
        done = self.aside
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
            if done is not None:
                done.set()
        return not self.gone

    async def _aside(self, data: bytes) -> bool:
        self.aside_begin()
        return await self.aside_write(data)

    def _arrived(self, upstream: UpstreamResponse, translator: Translator) -> bool:
        """Translate what came with the upstream's head (no I/O); True when that ended the stream."""
        try:
            if not upstream.arrived():
                return upstream.done and self._take(None, translator.feed, upstream, translator)
            self.deadlines.heard(self.deadlines.last_read, lift=False)  # ``run`` lifts it before it waits
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

    def pull(self, now: float) -> bool | None:
        """One read of the upstream, made by the watcher (``StreamWatch.follow``) when it found the socket
        readable at ``now``: translate it and write it without waiting. None: the stream goes on, followed; True:
        it is over; False: the stream's task takes it from here (a write that has to wait, a ping being written,
        a broken body). Raises ClientGone."""
        upstream, translator = self.upstream, self.translator
        assert upstream is not None
        try:
            if self.events:
                got: Any = upstream.events_ready()
                feed: Callable[[Any], bytes] = translator.feed_events  # type: ignore[attr-defined]
            else:
                got, feed = upstream.chunk_ready(), translator.feed
            if got is None:
                return None  # woken without data (it happens): no read to count
            self.deadlines.heard(now)
            if self._take(got, feed, upstream, translator):
                return True
        except Exception as exc:
            self._failed(exc, translator)
            return True
        if upstream.settled:  # the next read needs no socket event, and may never get one: the task's to make
            return False
        pending = self.pending
        if pending:
            if self.aside is not None:  # a ping is being written: the stream's bytes follow it (``flush``)
                return False
            data = pending[0] if len(pending) == 1 else b"".join(pending)
            pending.clear()
            rest = self.out.write_now(data)
            if rest:  # the client's buffer is full: the task sends the rest, waiting
                self.unsent = rest
                self.flushing = True
                return False
            if rest is None:  # the head is not out yet: ``flush`` sends it
                pending.append(data)
                return False
            self.last_write = now
        return None

    async def _relay_chunks(self, upstream: UpstreamResponse, translator: Translator) -> RelayError | None:
        """Feeds the translator until the stream is over; returns the error to answer with when the upstream
        failed before anything was produced. With the server's watcher, the reads are made in its task while this
        one sleeps (``StreamWatch.follow``), whenever the upstream's socket can be followed there."""
        events = self.events = translator_reads_events(translator)
        read: Callable[[], Awaitable[Any]] = upstream.events if events else upstream.chunk
        feed: Callable[[Any], bytes] = translator.feed_events if events else translator.feed  # type: ignore[attr-defined]
        watch = self.watch
        self.upstream = upstream
        try:
            while True:
                if self.unsent:
                    rest, self.unsent = self.unsent, b""
                    await self.out.conn.send_bytes(rest)  # (``flushing`` was set when it was left)
                    self.flushing = False
                    self.last_write = self.deadlines.last_read = trio.current_time()
                if self.pending:
                    await self.flush()
                if watch is not None:
                    sock = upstream.followable()
                    if sock is not None:
                        try:
                            over = await watch.follow(self, sock)
                        except (OSError, ValueError):  # the set took no more (ENOSPC), or it is closed: this
                            watch = None  # stream reads in its own task
                            continue
                        if over:
                            break
                        continue
                got = await read()
                self.deadlines.heard()
                if self._take(got, feed, upstream, translator):
                    break
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


class HeadWaits:
    """Streams whose upstream has not answered its head yet, and the one task per server that starts a head
    watch (``Pump.watch_head``) for any still waiting at its ``start_at``. A stream pays a dict entry for the
    wait, and a task only when the wait is long. Streams wait in one dict per keepalive_start (start_at is
    then in arrival order), so the next one due is always a dict's first."""

    def __init__(self) -> None:
        self._waiting: dict[float, dict[Pump, None]] = {}
        self._timer: trio.CancelScope | None = None

    def add(self, pump: Pump, start: float) -> None:
        """``start``: the keepalive_start that gave the pump its start_at."""
        line = self._waiting.get(start)
        if line is None:
            line = self._waiting[start] = {}
        line[pump] = None
        pump.waits = line
        timer = self._timer
        if timer is not None and pump.start_at < timer.deadline:
            timer.deadline = pump.start_at

    def __len__(self) -> int:
        return sum(len(line) for line in self._waiting.values())

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as watches:
            task_status.started()
            while True:
                now = trio.current_time()
                due = math.inf
                for line in self._waiting.values():
                    while line:
                        pump = next(iter(line))
                        if pump.start_at > now:
                            due = min(due, pump.start_at)
                            break
                        del line[pump]
                        if not pump.head_over and not pump.translator.started:
                            watches.start_soon(pump.watch_head)
                with trio.move_on_at(due) as self._timer:
                    await trio.sleep_forever()
                self._timer = None
