"""New requests take turns with the streams already running.

trio runs every task that is ready once per scheduler round, in no set order. A new request's first step (parse,
translate, send upstream) is one long step, ~0.3 ms on a small body; a running stream's step (one chunk) is a tenth
of that. When hundreds of requests arrive together, one round holds hundreds of first steps, and every running stream's
next chunk waits for all of them: tens of ms, a stall its client sees (bench/README.md, session 11). The gate lets
at most ``per_round`` first steps into a round; the rest wait, in arrival order, for the next rounds, and the
gate's task keeps rounds coming while anyone waits (no round is left idle). A request never waits more than
``max_wait`` (0.05 s): when relay has more work than it can do, new requests must not starve behind streams that
are late anyway (then they all go in, as without the gate).

Rounds are told apart by the gate's own task, woken by the request that fills a round: it runs once in the round
after, and the count starts again (no trio instrument: one would cost every round, each stream's chunks
included, ~5k instructions).
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

import trio

MAX_WAIT = 0.05  # seconds: a request that has waited this long goes in the next round, whatever it holds
_clock = time.perf_counter


class StartGate:
    """The turns of new requests' first steps (``Server._messages``: ``passes``, else ``wait``)."""

    def __init__(self, per_round: int = 6, max_wait: float = MAX_WAIT) -> None:
        self.per_round = per_round
        self.max_wait = max_wait
        self._used = 0  # first steps let into this round
        self._waiting: deque[tuple[trio.lowlevel.Task, float]] = deque()  # (task, since when)
        self._task: trio.lowlevel.Task | None = None  # the gate's own
        self._parked = False  # ... asleep until a round fills up or a request waits
        self.waited = 0  # requests that ever had to wait for their turn

    def __len__(self) -> int:
        return len(self._waiting)

    def passes(self) -> bool:
        """Whether a request may take its first step in this round (else: ``await wait()``). Not a coroutine:
        the common case costs no await."""
        used = self._used
        if used >= self.per_round or self._waiting:
            return False
        self._used = used + 1
        if used + 1 == self.per_round and self._parked:  # the round is full: the gate's task starts the next
            self._wake()
        return True

    async def wait(self) -> None:
        """Returns in the round this request's turn comes: in arrival order, ``per_round`` to a round, and never
        after more than ``max_wait`` (when relay is behind its streams, their chunks cannot have all of it)."""
        entry = (trio.lowlevel.current_task(), _clock())
        self._waiting.append(entry)
        self.waited += 1
        if self._parked:
            self._wake()

        def abort(_: Any) -> trio.lowlevel.Abort:
            self._waiting.remove(entry)
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    def _wake(self) -> None:
        self._parked = False
        if self._task is not None:  # (None: the gate's task has ended, the server stopping)
            trio.lowlevel.reschedule(self._task)

    def _unpark(self, _: Any) -> trio.lowlevel.Abort:
        self._parked = False  # cancelled while asleep: nobody may reschedule it now
        return trio.lowlevel.Abort.SUCCEEDED

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Marks the rounds: it runs once in each round after one that filled up (or had requests waiting), and
        lets the next in line go: ``per_round`` of them, and any that waited ``max_wait``. Asleep while requests
        come a few at a time: it runs once per ``per_round`` of them, and never for a stream's chunk."""
        self._task = trio.lowlevel.current_task()
        try:
            task_status.started()
            await self._turn()
        finally:
            self._task, self._parked = None, False

    async def _turn(self) -> None:
        waiting = self._waiting
        while True:
            if self._used or waiting:
                await trio.lowlevel.cancel_shielded_checkpoint()  # the next round
            else:
                self._parked = True
                await trio.lowlevel.wait_task_rescheduled(self._unpark)
            used = 0
            if waiting:  # (they run in the round after this one)
                while waiting and used < self.per_round:
                    used += 1
                    trio.lowlevel.reschedule(waiting.popleft()[0])
                late = _clock() - self.max_wait
                while waiting and waiting[0][1] <= late:
                    used += 1
                    trio.lowlevel.reschedule(waiting.popleft()[0])
            self._used = used
