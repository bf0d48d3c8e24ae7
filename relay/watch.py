"""One watcher for all of a server's streams: it notices a client that hangs up while its answer streams, and runs
every stream's timer (the idle gap, pings, the early start: ``Pump.wake_at`` and ``Pump.timer`` say what is due).

A task per stream did this before, with a nursery and a cancel scope per wait: ~0.4M instructions per stream,
paid by every stream that outlives its upstream's head, in the moments when many start at once (bench/README.md,
session 11). Here a stream costs two epoll calls and a heap entry. The clients' sockets sit in an epoll set of
the watcher's own, itself one descriptor that trio waits on; the timers are one heap, looked at lazily (a stream's
entry is moved on when it comes due, not at every chunk). Where there is no epoll (not Linux), ``create`` gives
None and each stream watches itself (``Pump._watch_client``).

It also reads the streams' upstreams (``follow``): a plain TCP upstream's socket joins the same set, and every
chunk that a round of the scheduler finds ready is read, translated and written in this one task's step, while
the streams' own tasks sleep. A paced chunk then costs no task switch of its own (session 12: 70 -> 45 us of CPU per
chunk at 256 paced streams).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import select
from typing import TYPE_CHECKING, Any

import outcome
import trio

if TYPE_CHECKING:
    from relay.pump import Pump

log = logging.getLogger("relay.server")


class StreamWatch:
    """The streams being relayed, by their client's socket, and their timers."""

    def __init__(self, poller: Any) -> None:
        self._poller = poller  # select.epoll: level-triggered, so nothing read is ever missed
        self._streams: dict[int, Pump] = {}  # by the client socket's descriptor
        self._followed: dict[int, tuple[Pump, Any]] = {}  # by the upstream socket's descriptor: (pump, its task)
        self._timers: list[list[Any]] = []  # a heap of [due, order, pump]; pump None: that stream is over
        self._order = itertools.count()
        self._dead = 0  # entries in the heap whose stream is over
        self._wait: trio.CancelScope | None = None  # the watcher's wait, until the first timer due
        self._asides: trio.Nursery | None = None  # the watcher's own writes (pings), each in a task

    @classmethod
    def create(cls) -> StreamWatch | None:
        epoll = getattr(select, "epoll", None)
        return None if epoll is None else cls(epoll())

    def __len__(self) -> int:
        return len(self._streams)

    def add(self, pump: Pump) -> None:
        """``pump`` is watched from now until ``discard``."""
        fd = pump.watched_fd = pump.out.conn.stream.socket.fileno()
        self._poller.register(fd, select.EPOLLIN)
        self._streams[fd] = pump
        self._schedule(pump, pump.wake_at(pump.deadlines.last_read))

    def discard(self, pump: Pump) -> None:
        entry = pump.entry
        if entry is not None:
            entry[2] = pump.entry = None  # the heap keeps the entry, and drops it when it comes due; but the first
            self._dead += 1  # one is dropped now, with any dead ones behind it: the watcher's wait need not end
            timers = self._timers  # for a stream that is over (a wake is ~0.1M instructions)
            if entry is timers[0]:
                while timers and timers[0][2] is None:
                    heapq.heappop(timers)
                    self._dead -= 1
                wait, due = self._wait, timers[0][0] if timers else math.inf
                if wait is not None and wait.deadline < due:
                    wait.deadline = due
            elif self._dead > 1024 and 2 * self._dead > len(timers):  # (with keepalive = 0 an entry lives
                timers[:] = [e for e in timers if e[2] is not None]  # read_timeout: the dead would pile up)
                heapq.heapify(timers)
                self._dead = 0
        fd, pump.watched_fd = pump.watched_fd, -1  # (the one it was added with: the socket may be closed by now)
        if self._streams.get(fd) is pump:
            del self._streams[fd]
            try:
                self._poller.unregister(fd)
            except (OSError, ValueError):  # the socket closed already (so out of the set); the set itself closed
                pass  # (the server stopping hard: its watcher ended before this stream)

    async def follow(self, pump: Pump, sock: Any) -> bool:
        """Read the stream's upstream socket in the watcher's task, not the stream's: each chunk is read,
        translated and written (``Pump.pull``) in the watcher's step for every socket that round found readable,
        so a chunk costs no task switch, no epoll_ctl and no coroutine chain (the stream's task waking for each
        chunk was most of a paced chunk's cost: bench/README.md, session 12). The stream's task sleeps until the
        watcher hands it back: True when the stream is over, False when it has to wait for something (a client
        slow to take a write, a ping being written, a broken read) and will follow again after. Cancelling the
        task (the client gone, the idle gap) takes the socket out of the set."""
        fd = sock.fileno()
        self._poller.register(fd, select.EPOLLIN)
        self._followed[fd] = (pump, trio.lowlevel.current_task())

        def abort(_: Any) -> Any:
            self._unfollow(fd)
            return trio.lowlevel.Abort.SUCCEEDED

        return await trio.lowlevel.wait_task_rescheduled(abort)  # type: ignore[no-any-return]

    def _unfollow(self, fd: int) -> None:
        del self._followed[fd]
        try:
            self._poller.unregister(fd)
        except (OSError, ValueError):  # the set itself closed (the server stopping hard)
            pass

    def _pull(self, fd: int, now: float) -> None:
        pump, task = self._followed[fd]
        result: outcome.Outcome[bool]
        try:
            over = pump.pull(now)
            if over is None:
                return  # the stream goes on, followed here
            result = outcome.Value(over)
        except Exception as exc:  # (ClientGone, mostly) the stream's task raises it where it waits
            result = outcome.Error(exc)
        self._unfollow(fd)
        trio.lowlevel.reschedule(task, result)

    def _schedule(self, pump: Pump, due: float) -> None:
        entry = pump.entry = [due, next(self._order), pump]
        heapq.heappush(self._timers, entry)
        wait = self._wait
        if wait is not None and due < wait.deadline:
            wait.deadline = due

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Two tasks: the sockets, woken by the epoll set alone (no cancel scope per wake: with followed
        upstreams it wakes for every round of chunks), and the timers, woken when the first comes due."""
        poller = self._poller
        try:
            async with trio.open_nursery() as asides:
                self._asides = asides
                asides.start_soon(self._run_timers)
                task_status.started()
                followed, streams = self._followed, self._streams
                while True:
                    await trio.lowlevel.wait_readable(poller)
                    now = trio.current_time()
                    for fd, _ in poller.poll(0):
                        if fd in followed:
                            self._pull(fd, now)
                        else:
                            pump = streams.get(fd)
                            if pump is not None:
                                self._readable(pump)
        finally:
            trio.lowlevel.notify_closing(poller)
            poller.close()

    async def _run_timers(self) -> None:
        timers = self._timers
        while True:
            with trio.move_on_at(timers[0][0] if timers else math.inf) as self._wait:
                await trio.sleep_forever()
            self._wait = None
            now = trio.current_time()
            due: list[Pump] = []
            while timers and timers[0][0] <= now:
                pump = heapq.heappop(timers)[2]
                if pump is None:
                    self._dead -= 1
                else:
                    pump.entry = None
                    due.append(pump)
            for pump in due:  # (after the pops: a timer that comes due again waits for the next round)
                self._due(pump, now)

    def _readable(self, pump: Pump) -> None:
        """The client sent something while its answer streams: a hang-up (the stream is cancelled), or a
        pipelined next request, which h11 keeps for later."""
        try:
            data = pump.out.conn.receive_now()
        except Exception:  # never leave a socket in the set that nothing reads: that would wake the watcher forever
            log.exception("%s: reading a streaming client's socket failed", pump.out.ex.request_id)
            data = b""
        if data is None:
            return
        if not data:
            pump.left()
            self.discard(pump)

    def _due(self, pump: Pump, now: float) -> None:
        try:
            data = pump.timer(now)
            if data is not None:
                pump.aside_begin()  # now: the stream's writes wait from here, not from when the task starts
                assert self._asides is not None
                self._asides.start_soon(pump.watched_aside, data)
        except Exception:  # one stream's failure is not the watcher's: that stream ends
            log.exception("%s: a stream's timer failed", pump.out.ex.request_id)
            pump.left()
            self.discard(pump)
            return
        self._schedule(pump, pump.wake_at(now))
