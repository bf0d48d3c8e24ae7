"""relay.store: both backends (a SQLite file and a real redis-server) through the same behaviour tests, then the
in-memory view the request path asks: limits across instances, outages, a store that never answers."""

from __future__ import annotations

import socket
import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
import trio

from relay.config import StoreConfig
from relay.errors import RelayError
from relay.limits import Windows, name
from relay.store import (Batch, Changed, KeyExists, NoSuchKey, StoreError, UsageRow, View, connected, create_key,
                         summarize, update, with_changes)
from relay.store.sqlite import read_files
from tests.redis_server import RedisServer, redis_server  # noqa: F401  (a fixture)

T0 = 1_773_489_630.0  # 2026-03-14T12:00:30Z


@pytest.fixture(params=["sqlite", "redis"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite://{tmp_path / 'state' / 'relay.sqlite3'}"
    server: RedisServer = request.getfixturevalue("redis_server")
    return server.url


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def settings(**kw: Any) -> StoreConfig:
    return StoreConfig(**{"refresh": 0.05, "timeout": 1.0, "rate_window": 10.0, **kw})


async def test_keys_are_created_once_changed_and_listed(store_url: str) -> None:
    key, secret = create_key("alice", {"models": ["mock-*"], "rpm": 5, "budget": 2.5}, T0)
    assert secret.startswith("rk-") and len(secret) > 40 and secret not in key.to_json().decode()
    async with connected(store_url) as backend:
        v0 = await backend.keys_version()
        await backend.put_key(key, create=True)
        with pytest.raises(KeyExists):
            await backend.put_key(key, create=True)
        with pytest.raises(NoSuchKey):
            await backend.put_key(with_changes(key, name="bob"), create=False)
        await backend.put_key(with_changes(key, rpm=None, tpm=100), create=False)
        assert await backend.keys_version() == v0 + 2
        (stored,) = await backend.load_keys()
    assert stored.name == "alice" and stored.models == ("mock-*",) and stored.digest == key.digest
    assert (stored.limits.rpm, stored.limits.tpm, stored.limits.budget) == (None, 100, 2.5)
    assert "digest" not in stored.public() and secret not in str(stored.public())


async def test_records_are_written_only_over_what_was_read(store_url: str) -> None:
    """The compare-and-set under every read-modify-write (the admin API's and the CLI's edits)."""
    async with connected(store_url) as backend:
        await backend.put("providers", "p", b'{"table":{"a":1}}', create=True)
        v0 = await backend.version("providers")
        with pytest.raises(Changed):
            await backend.put("providers", "p", b'{"table":{"a":2}}', create=False, expect=b'{"table":{"a":0}}')
        assert (await backend.load("providers"))["p"] == b'{"table":{"a":1}}' and await backend.version("providers") == v0
        await backend.put("providers", "p", b'{"table":{"a":3}}', create=False, expect=b'{"table":{"a":1}}')
        done = await update(backend, "providers", "p", lambda raw: raw.replace(b"3", b"4"))
        assert done == (await backend.load("providers"))["p"] == b'{"table":{"a":4}}'
        with pytest.raises(NoSuchKey, match="no provider named 'q'"):
            await update(backend, "providers", "q", lambda raw: raw)
        await backend.put("providers", "p", None, create=False)
        assert await backend.load("providers") == {} and await backend.version("providers") == v0 + 3


async def test_a_batch_is_applied_once_even_when_retried(store_url: str) -> None:
    batch = Batch([UsageRow("alice", "m", "2026-03-14", requests=2, input_tokens=10, output_tokens=4, cost_micros=7),
                   UsageRow("alice", "", "2026-03-14", refused=1)],
                  {"alice": {name("req", T0 - 30): (2, 4e9)}})
    async with connected(store_url) as backend:
        await backend.apply(batch)
        await backend.apply(batch)  # a reply lost, the same batch sent again
        await backend.apply(Batch([UsageRow("alice", "m", "2026-03-15", requests=1, output_tokens=1)], {}))
        rows = summarize(await backend.usage())
        later = summarize(await backend.usage(since="2026-03-15"))
        synced = await backend.sync("me", {"alice": [name("req", T0 - 30), name("tok", T0 - 30)]}, {}, T0)
    assert [(r.model, r.requests, r.refused, r.input_tokens, r.output_tokens, r.cost_micros) for r in rows] == \
        [("m", 3, 0, 10, 5, 7), ("", 0, 1, 0, 0, 0)]
    assert [(r.model, r.requests) for r in later] == [("m", 1)]
    assert synced.totals == {"alice": {name("req", T0 - 30): 2, name("tok", T0 - 30): 0}}


async def test_streams_and_instances_are_seen_by_the_others(store_url: str) -> None:
    async with connected(store_url) as backend:
        await backend.sync("one", {}, {"alice": 2}, T0)
        await backend.sync("two", {}, {"alice": 1}, T0)
        seen_by_three = await backend.sync("three", {}, {}, T0)
        await backend.sync("one", {}, {}, T0 + 1)  # one's streams ended
        later = await backend.sync("three", {}, {}, T0 + 1)
    assert seen_by_three.streams == {"alice": 3} and seen_by_three.instances == 3
    assert later.streams == {"alice": 1}


async def test_limits_hold_across_two_views_on_one_store(store_url: str) -> None:
    key, secret = create_key("alice", {"rpm": 3, "budget": 1.0, "budget_period": "day"}, T0)
    clock = Clock()
    async with connected(store_url) as backend:
        await backend.put_key(key, create=True)
    one, two = (View.open(store_url, settings(day_window=1000.0), clock) for _ in range(2))
    async with trio.open_nursery() as nursery:
        for view in (one, two):
            await nursery.start(view.run)
        for view in (one, two):
            await _until(lambda: view.loaded)
        found = one.find(secret.encode())
        assert found is not None and found.name == "alice" and one.find(b"rk-wrong") is None
        one.admit(found)
        one.admit(found)
        one.release(found, tokens=10, micros=400_000)
        one.release(found, tokens=10, micros=400_000)
        one.record("alice", "m", input_tokens=10, output_tokens=10, cost_micros=800_000)
        one.poke()
        await _until(lambda: two.meter.counts("alice").get(name("req", Windows(10.0).span("rate", T0)[0])) == 2)
        two.admit(found)  # the third of 3
        with pytest.raises(RelayError) as refused:
            two.admit(found, "m")
        assert refused.value.status == 429 and (b"retry-after", b"10") in refused.value.headers
        clock.now += 10  # the next rate window: the budget is what is left
        two.release(found, micros=300_000)
        with pytest.raises(RelayError) as billed:
            two.admit(found, "m")
        assert billed.value.status == 402 and billed.value.error_type == "billing_error"
        assert "daily budget of $1.00" in billed.value.message
        two.poke()
        await _until(lambda: two.buffered == 0 and two.up)
        nursery.cancel_scope.cancel()
    async with connected(store_url) as backend:
        rows = summarize(await backend.usage())
    assert [(r.model, r.requests, r.refused) for r in rows] == [("m", 1, 2)]


async def test_revoked_and_expired_keys_get_401(store_url: str) -> None:
    key, secret = create_key("old", {}, T0)
    with pytest.raises(ValueError, match="2026-03-13 has passed"):
        create_key("old", {"expires": "2026-03-13"}, T0)
    key = with_changes(key, expires="2026-03-13")  # a key whose last day has gone by
    view = View.open(store_url, settings(), Clock())
    async with connected(store_url) as backend:
        await backend.put_key(key, create=True)
    async with trio.open_nursery() as nursery:
        await nursery.start(view.run)
        await _until(lambda: view.loaded)
        with pytest.raises(RelayError, match="expired on 2026-03-13") as expired:
            view.admit(view.find(secret.encode()))  # type: ignore[arg-type]
        assert expired.value.status == 401
        async with connected(store_url) as backend:
            await backend.put_key(with_changes(key, expires=None, revoked=True), create=False)
        await _until(lambda: view.by_name["old"].revoked)
        with pytest.raises(RelayError, match="revoked"):
            view.admit(view.find(secret.encode()))  # type: ignore[arg-type]
        nursery.cancel_scope.cancel()


async def test_redis_outage_holds_usage_and_writes_it_back(redis_server: RedisServer) -> None:  # noqa: F811
    key, secret = create_key("alice", {"rpm": 1000}, T0)
    async with connected(redis_server.url) as backend:
        await backend.put_key(key, create=True)
    view = View.open(redis_server.url, settings(timeout=0.5))
    served = 0
    async with trio.open_nursery() as nursery:
        await nursery.start(view.run)
        await _until(lambda: view.loaded and view.up)
        found = view.find(secret.encode())
        assert found is not None

        def serve() -> None:
            nonlocal served
            view.admit(found, "m")
            view.release(found, tokens=3)
            view.record("alice", "m", input_tokens=2, output_tokens=1)
            served += 1

        for _ in range(5):
            serve()
        await _until(lambda: view.buffered == 0)
        redis_server.kill()
        for _ in range(5):
            serve()  # the store is down: known keys keep working
            await trio.sleep(0.02)
        await _until(lambda: not view.up)
        for _ in range(5):
            serve()
        assert view.buffered > 0 and view.find(secret.encode()) is found
        redis_server.start()  # same port, same folder: what was written before is still there
        await _until(lambda: view.up and view.buffered == 0, seconds=15)
        nursery.cancel_scope.cancel()
    async with connected(redis_server.url) as backend:
        (row,) = summarize(await backend.usage())
    assert (row.requests, row.input_tokens, row.output_tokens) == (served, 2 * served, served) == (15, 30, 15)


async def test_a_store_that_never_answers_blocks_nothing(tmp_path: Path) -> None:
    """A listener that accepts and stays silent: the view starts at once, counts as down after its timeout, and
    the request path (find, admit, record) never waits; flush gives up within the timeout."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    url = f"redis://127.0.0.1:{silent.getsockname()[1]}/0"
    view = View.open(url, settings(timeout=0.3))
    try:
        async with trio.open_nursery() as nursery:
            with trio.fail_after(2):
                await nursery.start(view.run)
            await _until(lambda: bool(view.last_error))
            assert not view.up and "0.3s" in view.last_error
            view.record("k", "m", input_tokens=1)
            assert view.find(b"rk-anything") is None
            with trio.fail_after(2):
                await view.close()  # logs that it could not, never hangs
            assert view.buffered == 1 and not view._running
        with pytest.raises(StoreError, match="did not answer within 0.3s"):  # the CLI's way in: the same bound
            async with connected(url, timeout=0.3):
                pass
    finally:
        silent.close()


async def test_the_old_usage_book_is_imported_into_the_default_store_once(tmp_path: Path) -> None:
    folder = tmp_path / "relay"
    folder.mkdir()
    with closing(sqlite3.connect(folder / "usage.sqlite3")) as db, db:  # as relay wrote it before the store
        db.execute("CREATE TABLE usage (key TEXT NOT NULL, model TEXT NOT NULL, day TEXT NOT NULL, requests INTEGER "
                   "NOT NULL, input_tokens INTEGER NOT NULL, output_tokens INTEGER NOT NULL, PRIMARY KEY (key, model, day))")
        db.execute("INSERT INTO usage VALUES ('k', 'm', '2025-01-01', 2, 10, 4)")
    url = f"sqlite://{folder / 'relay.sqlite3'}"
    for _ in range(2):
        async with connected(url) as backend:
            rows = await backend.usage()
    assert [(r.key, r.requests, r.input_tokens, r.output_tokens) for r in rows] == [("k", 2, 10, 4)]
    old = read_files([str(folder / "usage.sqlite3")], None)  # and the old book itself reads as it is
    assert [(r.key, r.requests, r.refused, r.cost_micros) for r in old] == [("k", 2, 0, 0)]


async def _until(condition: Any, seconds: float = 10) -> None:
    with trio.fail_after(seconds):
        while not condition():
            await trio.sleep(0.01)


async def test_the_worst_overshoot_is_n_times_the_limit_within_one_refresh(store_url: str) -> None:
    """Three views admit a burst before any of them has synced: each admits at most the limit (the documented
    worst case, N x limit); after one round each, all three refuse."""
    key, secret = create_key("burst", {"rpm": 4}, T0)
    async with connected(store_url) as backend:
        await backend.put_key(key, create=True)
    clock = Clock()
    views = [View.open(store_url, settings(refresh=3600.0), clock) for _ in range(3)]  # no round unless poked
    async with trio.open_nursery() as nursery:
        for view in views:
            await nursery.start(view.run)
        admitted = 0
        for _ in range(10):
            for view in views:
                try:
                    view.admit(key)
                    admitted += 1
                except RelayError as exc:
                    assert exc.status == 429
        assert admitted == 3 * 4
        for view in views:
            cycled = view._cycled
            view.poke()
            await cycled.wait()
        for view in views:
            with pytest.raises(RelayError):
                view.admit(key)
        nursery.cancel_scope.cancel()


async def test_a_round_writes_what_it_held_and_close_writes_the_rest(store_url: str) -> None:
    """Rows that come while a round is writing wait for the next round (writing until nothing was left kept the
    store busy back to back under load); at close, rounds go on until nothing is left."""
    view = View.open(store_url, settings(refresh=60.0), Clock())
    applied: list[list[str]] = []
    real = view.backend.apply

    async def apply(batch: Batch) -> None:
        applied.append(sorted(row.model for row in batch.rows))
        if len(applied) < 4:
            view.record("k", f"came-during-{len(applied)}", input_tokens=1)
        await real(batch)

    view.backend.apply = apply  # type: ignore[method-assign]
    view.record("k", "held", input_tokens=1)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(5):
            await nursery.start(view.run)  # after its first round
        assert applied == [["held"]] and view.buffered == 1
        with trio.fail_after(5):
            await view.close()
    assert applied == [["held"], ["came-during-1"], ["came-during-2"], ["came-during-3"]] and view.buffered == 0
    async with connected(store_url) as backend:
        rows = summarize(await backend.usage())
    assert sorted(r.model for r in rows) == ["came-during-1", "came-during-2", "came-during-3", "held"]
