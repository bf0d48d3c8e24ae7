"""The embedded store: one SQLite file (WAL), shared by the processes of one host (``--workers N`` included).

Every call runs in a worker thread with a connection of its own, so the event loop never waits on the disk.
The usage table is the old usage book's, with columns added in place: a book written by an older relay is a
valid store, and the default store imports the old default book (``usage.sqlite3`` beside it) once.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable, Mapping
from contextlib import closing
from pathlib import Path
from typing import TypeVar

import trio

from relay.store import (METRICS, RECORDS, STREAMS_TTL, Batch, Changed, Records, StoreError, Synced, UsageRow,
                         exists, missing)

T = TypeVar("T")
LEGACY_NAME = "usage.sqlite3"  # the usage book's default file before the store
BATCHES_KEPT = 86400.0  # seconds a batch id is remembered (a retry comes long before)

SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    key TEXT NOT NULL, model TEXT NOT NULL, day TEXT NOT NULL,
    requests INTEGER NOT NULL, input_tokens INTEGER NOT NULL, output_tokens INTEGER NOT NULL,
    PRIMARY KEY (key, model, day)
);
CREATE TABLE IF NOT EXISTS keys (name TEXT PRIMARY KEY, doc BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS providers (name TEXT PRIMARY KEY, doc BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS counters (
    key TEXT NOT NULL, name TEXT NOT NULL, value INTEGER NOT NULL, expires REAL NOT NULL, PRIMARY KEY (key, name)
);
CREATE TABLE IF NOT EXISTS streams (
    instance TEXT NOT NULL, key TEXT NOT NULL, open INTEGER NOT NULL, seen REAL NOT NULL, PRIMARY KEY (instance, key)
);
CREATE TABLE IF NOT EXISTS instances (instance TEXT PRIMARY KEY, seen REAL NOT NULL);
CREATE TABLE IF NOT EXISTS batches (id TEXT PRIMARY KEY, at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS live (instance TEXT PRIMARY KEY, doc BLOB NOT NULL, seen REAL NOT NULL);
"""
ADDED = ("refused", "estimated_input_tokens", "estimated_output_tokens", "cache_read", "cache_write", "cost_micros")  # usage columns newer than the usage book


def _upsert() -> str:
    cols = ", ".join(METRICS)
    marks = ", ".join("?" * (3 + len(METRICS)))
    adds = ", ".join(f"{m} = {m} + excluded.{m}" for m in METRICS)
    return f"INSERT INTO usage (key, model, day, {cols}) VALUES ({marks}) ON CONFLICT (key, model, day) DO UPDATE SET {adds}"


UPSERT = _upsert()


def prepare(db: sqlite3.Connection) -> None:
    """Tables, and the usage book's missing columns."""
    for statement in SCHEMA.split(";"):  # not executescript: it would commit the caller's transaction
        if statement.strip():
            db.execute(statement)
    have = {row[1] for row in db.execute("PRAGMA table_info(usage)")}
    for column in ADDED:
        if column not in have:
            db.execute(f"ALTER TABLE usage ADD COLUMN {column} INTEGER NOT NULL DEFAULT 0")


def read_usage(db: sqlite3.Connection, since: str | None) -> list[UsageRow]:
    have = {row[1] for row in db.execute("PRAGMA table_info(usage)")}
    if not have:
        return []
    cols = ", ".join(m if m in have else "0" for m in METRICS)
    query = f"SELECT key, model, day, {cols} FROM usage" + (" WHERE day >= ?" if since else "")
    return [UsageRow(*row) for row in db.execute(query, (since,) if since else ())]


def read_files(paths: list[str], since: str | None) -> list[UsageRow]:
    """Usage rows of SQLite files opened read-only: stores, or usage books of any relay version."""
    rows: list[UsageRow] = []
    for path in paths:
        if not os.path.exists(path):
            raise StoreError(f"{path}: no such file")
        try:
            with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
                rows += read_usage(db, since)
        except sqlite3.Error as exc:
            raise StoreError(f"{path}: {exc}") from None
    return rows


class SQLiteBackend(Records):
    def __init__(self, path: str) -> None:
        self.path = path
        self.url = f"sqlite://{path}"
        self._ready = False

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=10, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        return db

    async def _run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        def call() -> T:
            try:
                with closing(self._connect()) as db:
                    db.execute("BEGIN IMMEDIATE")
                    try:
                        result = work(db)
                    except BaseException:
                        db.execute("ROLLBACK")
                        raise
                    db.execute("COMMIT")
                    return result
            except sqlite3.Error as exc:
                raise StoreError(f"{self.url}: {exc}") from None

        return await trio.to_thread.run_sync(call, abandon_on_cancel=True)

    async def __aenter__(self) -> "SQLiteBackend":
        if not self._ready:
            try:
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreError(f"{self.url}: cannot create its folder ({exc.strerror})") from None
            await self._run(self._migrate)
            self._ready = True
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    def _migrate(self, db: sqlite3.Connection) -> None:
        prepare(db)
        legacy = os.path.join(os.path.dirname(self.path), LEGACY_NAME)
        done = db.execute("SELECT value FROM meta WHERE name = 'legacy_imported'").fetchone()
        if done or not os.path.exists(legacy) or os.path.abspath(legacy) == os.path.abspath(self.path):
            return
        with closing(sqlite3.connect(f"file:{legacy}?mode=ro", uri=True)) as old:
            rows = read_usage(old, None)
        db.executemany(UPSERT, [(r.key, r.model, r.day, *r.values()) for r in rows])
        db.execute("INSERT INTO meta (name, value) VALUES ('legacy_imported', ?)", (len(rows),))

    async def ping(self) -> None:
        await self._run(lambda db: db.execute("SELECT 1").fetchone())

    async def version(self, kind: str) -> int:
        assert kind in RECORDS  # the table's name comes from this list only
        row = await self._run(lambda db: db.execute("SELECT value FROM meta WHERE name = ?",
                                                    (f"{kind}_version",)).fetchone())
        return int(row[0]) if row else 0

    async def load(self, kind: str) -> dict[str, bytes]:
        assert kind in RECORDS
        rows = await self._run(lambda db: db.execute(f"SELECT name, doc FROM {kind}").fetchall())
        return {name: bytes(doc) if not isinstance(doc, bytes) else doc for name, doc in rows}

    async def put(self, kind: str, name: str, doc: bytes | None, *, create: bool,
                  expect: bytes | None = None) -> None:
        assert kind in RECORDS

        def work(db: sqlite3.Connection) -> None:  # in one BEGIN IMMEDIATE transaction: the check and the write
            found = db.execute(f"SELECT doc FROM {kind} WHERE name = ?", (name,)).fetchone()
            if create and found:
                raise exists(kind, name)
            if not create and not found:
                raise missing(kind, name)
            if expect is not None and bytes(found[0]) != expect:
                raise Changed(f"{RECORDS[kind]} {name!r} changed meanwhile")
            if doc is None:
                db.execute(f"DELETE FROM {kind} WHERE name = ?", (name,))
            else:
                db.execute(f"INSERT OR REPLACE INTO {kind} (name, doc) VALUES (?, ?)", (name, doc))
            db.execute("INSERT INTO meta (name, value) VALUES (?, 1) ON CONFLICT (name) DO UPDATE SET value = value + 1",
                       (f"{kind}_version",))

        await self._run(work)

    async def apply(self, batch: Batch) -> None:
        def work(db: sqlite3.Connection) -> None:
            now = time.time()
            if db.execute("SELECT 1 FROM batches WHERE id = ?", (batch.id,)).fetchone():
                return
            db.execute("INSERT INTO batches (id, at) VALUES (?, ?)", (batch.id, now))
            db.execute("DELETE FROM batches WHERE at < ?", (now - BATCHES_KEPT,))
            db.executemany(UPSERT, [(r.key, r.model, r.day, *r.values()) for r in batch.rows])
            db.executemany(
                "INSERT INTO counters (key, name, value, expires) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (key, name) DO UPDATE SET value = value + excluded.value",
                [(key, name, delta, expires) for key, counters in batch.counters.items()
                 for name, (delta, expires) in counters.items()])

        await self._run(work)

    async def sync(self, instance: str, reads: Mapping[str, list[str]], streams: Mapping[str, int],
                   now: float) -> Synced:
        def work(db: sqlite3.Connection) -> Synced:
            db.execute("DELETE FROM counters WHERE expires <= ?", (now,))
            db.execute("DELETE FROM streams WHERE instance = ? OR seen < ?", (instance, now - STREAMS_TTL))
            db.executemany("INSERT INTO streams (instance, key, open, seen) VALUES (?, ?, ?, ?)",
                           [(instance, key, n, now) for key, n in streams.items() if n])
            db.execute("INSERT OR REPLACE INTO instances (instance, seen) VALUES (?, ?)", (instance, now))
            db.execute("DELETE FROM instances WHERE seen < ?", (now - STREAMS_TTL,))
            totals: dict[str, dict[str, int]] = {}
            for key, names in reads.items():
                marks = ", ".join("?" * len(names))
                found = dict(db.execute(f"SELECT name, value FROM counters WHERE key = ? AND name IN ({marks})",
                                        (key, *names)).fetchall())
                totals[key] = {n: int(found.get(n, 0)) for n in names}
            elsewhere = dict(db.execute("SELECT key, SUM(open) FROM streams WHERE instance != ? GROUP BY key",
                                        (instance,)).fetchall())
            seen = db.execute("SELECT COUNT(*) FROM instances").fetchone()[0]
            return Synced(totals, {k: int(v) for k, v in elsewhere.items()}, int(seen))

        return await self._run(work)

    async def usage(self, since: str | None = None) -> list[UsageRow]:
        return await self._run(lambda db: read_usage(db, since))

    async def publish(self, instance: str, doc: bytes, now: float) -> None:
        def work(db: sqlite3.Connection) -> None:
            db.execute("INSERT OR REPLACE INTO live (instance, doc, seen) VALUES (?, ?, ?)", (instance, doc, now))
            db.execute("DELETE FROM live WHERE seen < ?", (now - STREAMS_TTL,))

        await self._run(work)

    async def published(self, now: float) -> dict[str, bytes]:
        rows = await self._run(lambda db: db.execute("SELECT instance, doc FROM live WHERE seen >= ?",
                                                     (now - STREAMS_TTL,)).fetchall())
        return {instance: bytes(doc) for instance, doc in rows}

    async def leave(self, instance: str) -> None:
        def work(db: sqlite3.Connection) -> None:
            for table in ("live", "streams", "instances"):
                db.execute(f"DELETE FROM {table} WHERE instance = ?", (instance,))

        await self._run(work)
