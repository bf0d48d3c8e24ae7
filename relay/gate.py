"""New requests take turns with the streams already running.

trio runs every task that is ready once per scheduler round, in no set order. A new request's first step (parse,
translate, send upstream) is one long step, ~0.3 ms on a small body; a running stream's step (one chunk) is ~25
µs. When hundreds of requests arrive together, one round holds hundreds of first steps, and every running stream's
next chunk waits for all of them: tens of ms, a stall its client sees (bench/README.md, session 11). The gate lets
at most ``per_round`` first steps into a round; the rest wait, in arrival order, for the next rounds, and the
gate's task keeps rounds coming while anyone waits (no round is left idle). A request never waits more than
``max_wait`` (0.1 s): when relay has more work than it can do, new requests must not starve behind streams that
are late anyway (then they all go in, as without the gate).

Rounds are told apart by a trio instrument: ``after_io_wait`` runs once per round, before its tasks do.
"""
from __future__ import annotations

import time
from collections import deque
from typing import Any

import trio

MAX_WAIT = 0.1  # seconds: a request that has waited this long goes in the next round, whatever it holds
_clock = time.perf_counter


class StartGate(trio.abc.Instrument):
    def __init__(self, per_round: int = 6, max_wait: float = MAX_WAIT) -> None:
        self.per_round = per_round
        self.max_wait = max_wait
        self._used = 0  # first steps let into this round
        self._waiting: deque[tuple[trio.lowlevel.Task, float]] = deque()  # (task, since when)
        self._wake: trio.Event | None = None  # the gate's task sleeps on it while nobody waits
        self.waited = 0  # requests that ever had to wait for their turn

    def __len__(self) -> int:
        return len(self._waiting)

    def passes(self) -> bool:
        """Whether a request may take its first step in this round (else: ``await wait()``). Not a coroutine:
        the common case costs no await."""
        if self._used < self.per_round and not self._waiting:
            self._used += 1
            return True
        return False

    async def wait(self) -> None:
        """Returns in the round this request's turn comes: in arrival order, ``per_round`` to a round, and never
        after more than ``max_wait`` (when relay is behind its streams, their chunks cannot have all of it)."""
        entry = (trio.lowlevel.current_task(), _clock())
        self._waiting.append(entry)
        self.waited += 1
        if self._wake is not None:
            self._wake.set()

        def abort(_: Any) -> trio.lowlevel.Abort:
            self._waiting.remove(entry)
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    def after_io_wait(self, timeout: float) -> None:
        """A round begins: the next in line run in it, ``per_round`` of them, and any that waited ``max_wait``."""
        waiting = self._waiting
        used = 0
        if waiting:
            while waiting and used < self.per_round:
                used += 1
                trio.lowlevel.reschedule(waiting.popleft()[0])
            late = _clock() - self.max_wait
            while waiting and waiting[0][1] <= late:
                used += 1
                trio.lowlevel.reschedule(waiting.popleft()[0])
        self._used = used

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Counts the rounds (as an instrument) and, while requests wait, keeps them coming: a round with no
        task ready would otherwise sleep until the next I/O."""
        trio.lowlevel.add_instrument(self)
        try:
            task_status.started()
            while True:
                self._wake = trio.Event()
                if not self._waiting:
                    await self._wake.wait()
                self._wake = None
                while self._waiting:
                    await trio.lowlevel.cancel_shielded_checkpoint()
        finally:
            trio.lowlevel.remove_instrument(self)
