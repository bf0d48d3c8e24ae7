"""The start gate (``relay.gate``): new requests' first steps, at most ``per_round`` to a trio scheduler round, in
arrival order, none lost; then end to end, a burst of streaming requests through relay while streams run."""

from __future__ import annotations

import time
from collections import Counter

import trio

from relay.gate import StartGate
from tests.client import messages_body, post, roundtrips
from tests.conftest import RelayHandle, relay_config, start_relay
from tests.mock_upstream import MockUpstream, Reply, chunk, sse


class Rounds(trio.abc.Instrument):
    """Numbers trio's scheduler rounds (the gate's own instrument hook, counted independently here)."""

    def __init__(self) -> None:
        self.n = 0

    def after_io_wait(self, timeout: float) -> None:
        self.n += 1


async def through(gate: StartGate, tasks: int, cancel: set[int] = frozenset()) -> tuple[list[int], list[tuple[int, int]]]:
    """``tasks`` requests made ready in one round; returns the order they came and (who, round) as each passed.
    Those that come ``cancel``-th (0: first) give up while they wait."""
    rounds = Rounds()
    trio.lowlevel.add_instrument(rounds)
    came: list[int] = []
    passed: list[tuple[int, int]] = []

    async def request(i: int) -> None:
        came.append(i)
        with trio.CancelScope() as scope:
            if len(came) - 1 in cancel:
                scope.deadline = trio.current_time()  # cancelled at its first wait
            if not gate.passes():
                await gate.wait()
            passed.append((i, rounds.n))

    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(gate.run)
            async with trio.open_nursery() as requests:
                for i in range(tasks):
                    requests.start_soon(request, i)
            nursery.cancel_scope.cancel()
    finally:
        trio.lowlevel.remove_instrument(rounds)
    return came, passed


def in_turns(came: list[int], passed: list[tuple[int, int]]) -> list[int]:
    """The rounds, checking that each let in the next of those that came, in order (within a round trio runs its
    tasks in an order of its own)."""
    rounds = sorted({r for _, r in passed})
    at = 0
    for r in rounds:
        these = {i for i, rr in passed if rr == r}
        assert these == set(came[at:at + len(these)]), (r, these, came)
        at += len(these)
    return rounds


async def test_a_burst_passes_per_round_at_a_time_in_arrival_order() -> None:
    gate = StartGate(per_round=3)
    came, passed = await through(gate, 20)
    per_round = Counter(r for _, r in passed)
    assert in_turns(came, passed) == sorted(per_round)  # first come, first served: by rounds, as they came
    assert max(per_round.values()) == 3 and sum(per_round.values()) == 20
    assert len(per_round) == 7  # ceil(20 / 3) rounds, one after another once the line formed: none left idle
    first, *rest = sorted(per_round)
    assert rest == list(range(rest[0], rest[0] + 6)) and rest[0] <= first + 2
    assert gate.waited == 17 and len(gate) == 0


async def test_a_request_that_gives_up_waiting_leaves_the_line() -> None:
    gate = StartGate(per_round=2)
    came, passed = await through(gate, 10, cancel={5, 6})
    kept = [i for at, i in enumerate(came) if at not in (5, 6)]
    assert in_turns(kept, passed) == sorted({r for _, r in passed}) and len(passed) == 8
    assert len(gate) == 0


async def test_nobody_waits_much_longer_than_max_wait_when_rounds_are_long() -> None:
    """Rounds made long (each first step holds the scheduler 3 ms): one to a round would keep the last of 20 waiting
    ~60 ms; those that have waited max_wait (15 ms) go in together instead."""
    gate = StartGate(per_round=1, max_wait=0.015)
    rounds = Rounds()
    trio.lowlevel.add_instrument(rounds)
    waits: list[float] = []
    passed: list[int] = []

    async def request() -> None:
        came = time.perf_counter()
        if not gate.passes():
            await gate.wait()
        waits.append(time.perf_counter() - came)
        passed.append(rounds.n)
        time.sleep(0.003)  # a long first step: the whole round waits for it

    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(gate.run)
            async with trio.open_nursery() as requests:
                for _ in range(20):
                    requests.start_soon(request)
            nursery.cancel_scope.cancel()
    finally:
        trio.lowlevel.remove_instrument(rounds)
    assert len(waits) == 20
    assert max(Counter(passed).values()) > 1  # the late ones together
    assert max(waits) < 0.5, waits  # (one at a time would be ~60 ms for the last; this only says none hung)
    assert len(set(passed)) < 20


async def test_requests_that_come_one_at_a_time_never_wait() -> None:
    gate = StartGate(per_round=1)
    async with trio.open_nursery() as nursery:
        await nursery.start(gate.run)
        for _ in range(50):
            assert gate.passes()
            await trio.sleep(0.001)  # a later round (the gate's task has run since)
        nursery.cancel_scope.cancel()
    assert gate.waited == 0


async def test_a_burst_of_streams_through_relay_all_complete(nursery: trio.Nursery) -> None:
    """60 streaming requests at once, while their upstream answers each over ~0.1 s: every answer whole and in
    order, and the gate made some of them take turns."""
    pieces = [*sse(chunk({"role": "assistant", "content": ""}), done=False)]
    for i in range(5):
        pieces += [0.02, *sse(chunk({"content": f"{i}"}), done=False)]
    upstream = MockUpstream(lambda r: Reply(pieces=[*pieces, *sse(chunk({}, "stop"))]))
    await nursery.start(upstream.serve)
    relay: RelayHandle = await start_relay(nursery, relay_config(upstream.base_url))
    relay.server.gate.per_round = 1  # (the clients share relay's scheduler here: few requests reach it per round)
    answers = await roundtrips(relay.port, post("/v1/messages", messages_body(stream=True)), 60, timeout=30)
    assert len(answers) == 60
    for answer in answers:
        assert answer.status == 200 and answer.complete
        body = answer.body.decode()
        assert [body.index(f'"text":"{i}"') for i in range(5)] == sorted(body.index(f'"text":"{i}"') for i in range(5))
    assert relay.server.gate.waited > 0 and len(relay.server.gate) == 0


async def test_requests_after_the_gate_stopped_do_not_wake_it() -> None:
    """The server stopping: the gate's task is cancelled while asleep; a request that then fills a round must
    not reschedule a task that is gone (trio would fail on it)."""
    gate = StartGate(per_round=2)
    async with trio.open_nursery() as nursery:
        await nursery.start(gate.run)
        await trio.sleep(0.001)
        nursery.cancel_scope.cancel()
    assert [gate.passes() for _ in range(4)] == [True, True, False, False]
