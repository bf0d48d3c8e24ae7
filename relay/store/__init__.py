"""What the rest of relay may ask of the store: virtual keys, their limits, usage and spend.

Two backends behind one interface (``Backend``): SQLite, embedded, the default (one host: one process or the
workers of one ``--workers N``), and Redis 7 / Valkey (any number of instances). Only ``sqlite.py`` and
``redis.py`` do I/O with a database.

The request path never waits on either. It asks a ``View``: the keys and counters held in memory, refreshed by a
background task every ``[store] refresh`` seconds. Usage and counter deltas leave through a bounded buffer in
batches that carry an id, so a batch retried after an outage (or a reply lost mid-way) is applied once. A store
that is slow or down costs nothing but freshness: relay keeps serving the keys it has seen, with their last
known limits enforced on this instance's own counts, and writes what it held when the store is back.

Circuit-breaker state and upstream key cooldowns stay per instance (each instance learns an upstream's health
from its own requests within a few of them; sharing that would put the store on the failure path).
"""

from __future__ import annotations

import calendar
import hashlib
import importlib.util
import logging
import os
import re
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

import orjson
import trio

from relay.config import ClientKey, StoreConfig
from relay.errors import RelayError
from relay.limits import (PERIODS, Limits, Meter, Windows, admitted, budget_counter, check, name as counter_name,
                          spent)

log = logging.getLogger("relay.store")

SECRET_PREFIX = "rk-"
KEY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
METRICS = ("requests", "refused", "input_tokens", "output_tokens", "estimated_input_tokens",
           "estimated_output_tokens", "cache_read", "cache_write", "cost_micros")
STREAMS_TTL = 10.0  # an instance that stopped reporting its open streams this long ago is gone
LIVE_EVERY = 2.0  # seconds between two publications of an instance's live figures (the console's whole-gateway view)


class StoreError(Exception):
    """The store could not be reached or refused an operation; the message names the store (never a password)."""


class KeyExists(StoreError):
    pass


class NoSuchKey(StoreError):
    pass


class Changed(StoreError):
    """A record changed between reading and writing it (another admin's change at the same moment)."""


# ---- what is stored ------------------------------------------------------------------------------------


def digest(secret: str | bytes) -> str:
    """How a secret is stored and found. A plain SHA-256 is enough: secrets are 256 random bits (no dictionary
    to slow down), and a fast digest lets the request path find a key with one dict lookup."""
    return hashlib.sha256(secret.encode() if isinstance(secret, str) else secret).hexdigest()


def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class VirtualKey(ClientKey):
    """A client key created at run time: found by the digest of its secret (``key`` stays empty: the secret is
    never held), scoped by ``models`` like a config key, with limits and a budget of its own."""

    digest: str = ""
    hint: str = ""  # the secret's first characters, so people can tell keys apart
    limits: Limits = field(default_factory=Limits)
    expires: str | None = None  # YYYY-MM-DD: the last day (UTC) the key works
    revoked: bool = False
    created: float = 0.0

    def expired(self, now: float) -> bool:
        if not self.expires:
            return False
        y, m, d = (int(x) for x in self.expires.split("-"))
        return now >= calendar.timegm((y, m, d, 0, 0, 0)) + 86400

    def state(self, now: float) -> str:
        """What the CLI and the admin API call it: revoked, expired or active."""
        return "revoked" if self.revoked else "expired" if self.expired(now) else "active"

    def to_json(self) -> bytes:
        doc = asdict(self)
        doc.pop("key")
        return orjson.dumps(doc)

    @classmethod
    def from_json(cls, data: bytes | str) -> "VirtualKey":
        doc = orjson.loads(data)
        doc["models"] = tuple(doc.get("models", ()))
        doc["limits"] = Limits(**doc.get("limits", {}))
        return cls(key="", **doc)

    def public(self) -> dict[str, Any]:
        """What the CLI and the admin API show: everything but the digest."""
        doc = orjson.loads(self.to_json())
        doc.pop("digest")
        return doc


def check_name(name: str) -> str:
    if not KEY_NAME.match(name):
        raise ValueError(f"key name {name[:80]!r}: use 1-64 letters, digits, '_', '.', '@' or '-', starting with a"
                         " letter or digit")
    return name


@dataclass
class UsageRow:
    key: str
    model: str
    day: str  # YYYY-MM-DD (UTC)
    requests: int = 0  # served
    refused: int = 0  # refused by relay's own limits, budgets or expiry: never mixed into requests
    input_tokens: int = 0  # all input the upstream reported, cached or not (as the usage book always counted it)
    output_tokens: int = 0
    estimated_input_tokens: int = 0  # relay's estimates, for answers that came without usage: never mixed in
    estimated_output_tokens: int = 0
    cache_read: int = 0  # of input_tokens, read from the upstream's cache
    cache_write: int = 0  # written to the cache (counted apart from input_tokens, as Anthropic counts them)
    cost_micros: int = 0  # USD x 1e6

    def values(self) -> tuple[int, ...]:
        return tuple(getattr(self, m) for m in METRICS)


@dataclass
class Batch:
    """Usage rows and counter deltas written together, once: the id makes a retried batch a no-op."""

    rows: list[UsageRow]
    counters: dict[str, dict[str, tuple[int, float]]]  # key -> counter -> (delta, expires)
    made: float = 0.0  # the instance's clock when it was made: expiries are kept relative to it
    id: str = field(default_factory=lambda: uuid.uuid4().hex)


@dataclass
class Synced:
    """What one sync brought back."""

    totals: dict[str, dict[str, int]]  # key -> counter -> total over every instance
    streams: dict[str, int]  # key -> requests in flight on the other instances
    instances: int  # instances seen (this one included)


RECORDS = {"keys": "key", "providers": "provider"}  # what the store keeps by name (kind -> what one is called)


class Backend(Protocol):
    """One store. Every method may raise StoreError (or the client's own errors: the View treats any
    exception from a backend as an outage)."""

    url: str  # for messages: the password masked

    async def __aenter__(self) -> "Backend": ...
    async def __aexit__(self, *exc: object) -> None: ...
    async def ping(self) -> None: ...
    async def version(self, kind: str) -> int: ...
    async def load(self, kind: str) -> dict[str, bytes]: ...
    async def put(self, kind: str, name: str, doc: bytes | None, *, create: bool,
                  expect: bytes | None = None) -> None: ...
    async def keys_version(self) -> int: ...
    async def load_keys(self) -> list[VirtualKey]: ...
    async def put_key(self, key: VirtualKey, *, create: bool) -> None: ...
    async def apply(self, batch: Batch) -> None: ...
    async def sync(self, instance: str, reads: Mapping[str, list[str]], streams: Mapping[str, int],
                   now: float) -> Synced: ...
    async def usage(self, since: str | None = None) -> list[UsageRow]: ...
    async def publish(self, instance: str, doc: bytes, now: float) -> None: ...
    async def published(self, now: float) -> dict[str, bytes]: ...
    async def leave(self, instance: str) -> None: ...


class Records:
    """Named records (``RECORDS``) on top of a backend's three record calls: each kind has a version that every
    change bumps, so an instance re-reads a kind only when it changed. ``put`` with ``doc`` None deletes;
    ``create`` refuses a name in use (KeyExists), otherwise the name must exist (NoSuchKey); ``expect``: only if
    the record still holds exactly these bytes (Changed otherwise), atomically."""

    async def version(self, kind: str) -> int:
        raise NotImplementedError

    async def load(self, kind: str) -> dict[str, bytes]:
        raise NotImplementedError

    async def put(self, kind: str, name: str, doc: bytes | None, *, create: bool,
                  expect: bytes | None = None) -> None:
        raise NotImplementedError

    async def keys_version(self) -> int:
        return await self.version("keys")

    async def load_keys(self) -> list[VirtualKey]:
        return [VirtualKey.from_json(doc) for _, doc in sorted((await self.load("keys")).items())]

    async def put_key(self, key: VirtualKey, *, create: bool) -> None:
        await self.put("keys", key.name, key.to_json(), create=create)


async def update(backend: Backend, kind: str, name: str, change: Any, tries: int = 8) -> bytes | None:
    """Read, change and write one record as one step against any other writer: ``change(old bytes)`` gives the
    new bytes (None deletes), written only if nobody wrote the record in between, else read again. Two admins
    changing one key at the same moment both land (a revocation is never undone by a concurrent edit)."""
    for _ in range(tries):
        found = (await backend.load(kind)).get(name)
        if found is None:
            raise missing(kind, name)
        new = change(found)
        try:
            await backend.put(kind, name, new, create=False, expect=found)
        except Changed:
            continue
        return new  # type: ignore[no-any-return]
    raise StoreError(f"{RECORDS[kind]} {name!r} kept changing under {tries} attempts; try again")


async def change_key(backend: Backend, name: str, changes: Mapping[str, Any]) -> VirtualKey:
    """A key with some fields replaced (``revoked`` too), through ``update``: the CLI's and the admin API's."""
    doc = await update(backend, "keys", name, lambda raw: with_changes(VirtualKey.from_json(raw), **changes).to_json())
    assert doc is not None  # a change, never a deletion
    return VirtualKey.from_json(doc)


def provider_record(table: Mapping[str, Any], now: float) -> bytes:
    """How a provider added at run time is stored: its ``[providers.NAME]`` table, and when it was written."""
    return orjson.dumps({"table": table, "updated": now})


def provider_table(doc: bytes) -> dict[str, Any]:
    """The table of a stored provider record; ValueError for anything else."""
    try:
        table = orjson.loads(doc)["table"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        raise ValueError("not a provider record") from None
    if not isinstance(table, dict):
        raise ValueError("not a provider record")
    return table


def exists(kind: str, name: str) -> KeyExists:
    return KeyExists(f"a {RECORDS[kind]} named {name!r} exists")


def missing(kind: str, name: str) -> NoSuchKey:
    return NoSuchKey(f"no {RECORDS[kind]} named {name!r}")


def masked(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username + ':' if parts.username else ':'}***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def redis_url_problem(url: str) -> str | None:
    """Why ``url`` is not a usable Redis URL, or None."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        return "expected redis:// or rediss://"
    if not parts.hostname:
        return "no host (redis://HOST:PORT/DB)"
    try:
        parts.port
    except ValueError:
        return "the port is not a number"
    db = parts.path.strip("/")
    if db and not db.isdigit():
        return f"the database must be a number, not {db!r}"
    if importlib.util.find_spec("coredis") is None:
        return "the Redis store needs coredis: pip install '.[redis]' in relay's checkout (make install has it)"
    return None


def default_path() -> str:
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(state, "relay", "relay.sqlite3")


def url_for(settings: StoreConfig) -> str | None:
    """The store a config names: its ``[store] url``, else the default SQLite file; None when turned off."""
    if not settings.enabled:
        return None
    return settings.url or "sqlite://" + default_path()


def open_backend(url: str, timeout: float = 5.0) -> Backend:
    """The backend for a ``[store] url`` (already checked by the config). Entering it connects, giving up after
    ``timeout`` seconds with a StoreError. (A caller must not put its own cancel scope around entering or
    leaving: the Redis client holds a task group open in between, and scopes must nest.)"""
    if url.startswith("sqlite://"):
        from relay.store.sqlite import SQLiteBackend

        return SQLiteBackend(os.path.expanduser(url[len("sqlite://"):]))
    from relay.store.redis import RedisBackend

    return RedisBackend(url, timeout)


@asynccontextmanager
async def connected(url: str, timeout: float = 5.0) -> AsyncIterator[Backend]:
    """A backend ready for a few calls (the CLI's): a store that does not answer in ``timeout`` is an error."""
    backend = open_backend(url, timeout)
    try:
        await backend.__aenter__()
    except StoreError:
        raise
    except Exception as exc:
        raise StoreError(f"store {masked(url)}: {_describe(exc)}") from None
    try:
        yield backend
    finally:
        await backend.__aexit__(None, None, None)


def _describe(exc: BaseException) -> str:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def summarize(rows: list[UsageRow]) -> list[UsageRow]:
    """Rows summed per key and model over their days (``day`` becomes the first day seen), biggest spenders of
    each key first."""
    totals: dict[tuple[str, str], UsageRow] = {}
    for row in rows:
        total = totals.get((row.key, row.model))
        if total is None:
            totals[(row.key, row.model)] = UsageRow(row.key, row.model, row.day, *row.values())
            continue
        total.day = min(total.day, row.day)
        for metric in METRICS:
            setattr(total, metric, getattr(total, metric) + getattr(row, metric))
    return sorted(totals.values(), key=lambda r: (r.key, -r.cost_micros, -(r.input_tokens + r.output_tokens), r.model))


def today(now: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(now))


# ---- the in-memory view the request path asks --------------------------------------------------------------


class View:
    """Keys, counters and buffered usage of one instance, kept in step with the store by ``run``."""

    def __init__(self, backend: Backend, settings: StoreConfig, clock: Any = time.time) -> None:
        self.backend = backend
        self.settings = settings
        self.windows = Windows(settings.rate_window, settings.day_window, settings.month_window)
        self.clock = clock
        self.instance = uuid.uuid4().hex[:12]
        self.keys: dict[str, VirtualKey] = {}  # digest -> key
        self.by_name: dict[str, VirtualKey] = {}
        self.meter = Meter()
        self.in_flight: dict[str, int] = {}  # key name -> requests in flight here
        self.elsewhere: dict[str, int] = {}  # key name -> requests in flight on the other instances
        self.instances = 1
        self._rows: dict[tuple[str, str, str], list[int]] = {}
        self._batch: Batch | None = None
        self._versions = {kind: -1 for kind in RECORDS}  # each kind's version when this view last read it
        self.providers: dict[str, Any] = {}  # name -> provider table stored at run time (see config.with_stored)
        self.on_providers: Any = None  # called (no arguments) each time ``providers`` changes: the server rebuilds
        self.live_export: Any = None  # () -> bytes: this instance's live figures, published every LIVE_EVERY
        self._published = 0.0
        self.up = False
        self.loaded = False  # keys have been read at least once
        self.last_error = ""
        self.dropped = 0  # usage rows refused by a full buffer (logged; never expected)
        self._wake = trio.Event()
        self._closing = False
        self._running = False
        self._stopped = trio.Event()
        self._cycled = trio.Event()  # set after each round that reached the store
        self._rounds = self._rounds_done = 0  # rounds begun, and the last one that reached the store

    @classmethod
    def open(cls, url: str, settings: StoreConfig, clock: Any = time.time) -> "View":
        return cls(open_backend(url, settings.timeout), settings, clock)

    # -- the request path: memory only --

    def find(self, secret: bytes) -> VirtualKey | None:
        if not secret.startswith(SECRET_PREFIX.encode()):
            return None
        return self.keys.get(digest(secret))

    def valid(self, key: VirtualKey) -> None:
        """401 for a key revoked or past its last day. ``key`` is the one this view holds now: a revocation made
        on any instance reaches it with the next refresh."""
        key = self.by_name.get(key.name, key)
        if key.revoked:
            raise RelayError(401, f"key {key.name!r} has been revoked", "authentication_error")
        if key.expired(self.clock()):
            raise RelayError(401, f"key {key.name!r} expired on {key.expires}", "authentication_error")

    def admit(self, key: VirtualKey, model: str = "") -> None:
        """Count a request against ``key`` or raise the refusal (401 revoked/expired, 402 budget, 429 rate)."""
        now = self.clock()
        self.valid(key)
        if key.limits.any:
            refusal = check(key.name, key.limits, self.meter.counts(key.name),
                            self.in_flight.get(key.name, 0) + self.elsewhere.get(key.name, 0), now, self.windows)
            if refusal is not None:
                self.record(key.name, model, refused=True)
                raise RelayError(refusal.status, refusal.message, refusal.error_type,
                                 [(b"retry-after", refusal.retry_after_header.encode())])
            self.meter.add(key.name, admitted(now, self.windows))
        self.in_flight[key.name] = self.in_flight.get(key.name, 0) + 1

    def release(self, key: VirtualKey, tokens: int = 0, micros: int = 0) -> None:
        """A request admitted by ``admit`` has ended: its tokens and cost count against the key's windows."""
        left = self.in_flight.get(key.name, 1) - 1
        if left:
            self.in_flight[key.name] = left
        else:
            self.in_flight.pop(key.name, None)
        if key.limits.any and (tokens or micros):
            self.meter.add(key.name, spent(key.limits, self.clock(), self.windows, tokens, micros))

    def record(self, key: str, model: str, *, refused: bool = False, input_tokens: int = 0, output_tokens: int = 0,
               estimated: bool = False, cache_read: int = 0, cache_write: int = 0, cost_micros: int = 0) -> None:
        """One request for the usage book (any key, config or virtual); written in the next batch."""
        row_key = (key, model, today(self.clock()))
        row = self._rows.get(row_key)
        if row is None:
            if len(self._rows) >= self.settings.buffer:
                self.dropped += 1
                if self.dropped == 1:
                    log.error("usage buffer full (%d rows held while the store is away); dropping new rows",
                              self.settings.buffer)
                return
            row = self._rows[row_key] = [0] * len(METRICS)
        counted = (0, 0) if estimated else (input_tokens, output_tokens)
        guessed = (input_tokens, output_tokens) if estimated else (0, 0)
        for i, value in enumerate((0 if refused else 1, 1 if refused else 0, *counted, *guessed, cache_read,
                                   cache_write, cost_micros)):
            row[i] += value

    @property
    def buffered(self) -> int:
        return len(self._rows) + (len(self._batch.rows) if self._batch else 0)

    def status(self) -> dict[str, Any]:
        return {"url": self.backend.url, "up": self.up, "keys": len(self.by_name), "buffered_rows": self.buffered,
                "instances": self.instances, **({"error": self.last_error} if self.last_error else {})}

    # -- the background side --

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Connect (and reconnect), then refresh and flush every ``refresh`` seconds until ``close`` (or a
        cancellation). Reports started after the first round, whether the store answered or not: a server never
        waits for it."""
        announce: Any = task_status
        self._running = True
        try:
            while True:
                try:
                    await self.backend.__aenter__()
                except Exception as exc:
                    self._down(exc)
                else:
                    try:
                        while True:
                            await self._timed_cycle()
                            if announce is not None:
                                announce.started()
                                announce = None
                            if self._closing:
                                with trio.move_on_after(self.settings.timeout):
                                    await self.backend.leave(self.instance)  # the others stop counting it now
                                return
                            await self._pause()
                    except Exception as exc:
                        self._down(exc)
                    finally:
                        try:
                            await self.backend.__aexit__(None, None, None)
                        except Exception:
                            pass
                if announce is not None:
                    announce.started()
                    announce = None
                if self._closing:
                    if self.buffered:
                        log.error("store %s: %d usage rows could not be written before exit (%s)", self.backend.url,
                                  self.buffered, self.last_error)
                    return
                await self._pause()
        finally:
            self._running = False
            self._stopped.set()

    async def _timed_cycle(self) -> None:
        with trio.CancelScope(deadline=trio.current_time() + self.settings.timeout) as scope:
            try:
                await self.cycle()
            except Exception:
                if scope.cancel_called:  # a client may turn the cancellation into an error of its own
                    raise trio.TooSlowError() from None
                raise
        if scope.cancelled_caught:
            raise trio.TooSlowError()

    async def flush(self) -> None:
        """Wait (up to the store's timeout, twice) for a round that wrote what is held now."""
        with trio.move_on_after(2 * self.settings.timeout + self.settings.refresh):
            while self._running:
                cycled = self._cycled
                self.poke()
                await cycled.wait()
                if not self.buffered and not self.meter.pending:
                    return

    async def call(self, work: Any) -> Any:
        """An admin operation on the store (never on a client's request path): ``await work(backend)`` within
        the store's timeout, then a refresh, so this instance sees the change at once. StoreError when the store
        is away."""
        if not self.up:
            raise StoreError(f"store {self.backend.url} is unreachable" + (f" ({self.last_error})" if self.last_error else ""))
        try:
            with trio.fail_after(self.settings.timeout):
                result = await work(self.backend)
        except trio.TooSlowError:
            raise StoreError(f"store {self.backend.url} did not answer within {self.settings.timeout:g}s") from None
        except (StoreError, RelayError):  # RelayError: the work refused the change itself (a 4xx for the caller)
            raise
        except Exception as exc:
            raise StoreError(f"store {self.backend.url}: {_describe(exc)}") from None
        self.poke()
        return result

    async def close(self) -> None:
        """At exit (SIGTERM): one last round writes what is held, bounded by the store's timeout (twice: a
        reconnect and a round); what cannot be written is logged."""
        self._closing = True
        self.poke()
        if self._running:
            with trio.move_on_after(2 * self.settings.timeout + self.settings.refresh):
                await self._stopped.wait()

    async def _pause(self) -> None:
        with trio.move_on_after(self.settings.refresh):
            await self._wake.wait()
        self._wake = trio.Event()

    def poke(self) -> None:
        """Refresh now (an admin call changed a key)."""
        self._wake.set()

    async def cycle(self) -> None:
        """One round with the store: keys if they changed, the held batch, counters and streams."""
        self._rounds += 1
        round_ = self._rounds
        for kind, load in (("keys", self._load_keys), ("providers", self._load_providers)):
            version = await self.backend.version(kind)
            if version != self._versions[kind]:
                load(await self.backend.load(kind))
                self._versions[kind] = version
        await self._write()
        now = self.clock()
        synced = await self.backend.sync(self.instance, self._reads(now), self.in_flight, now)
        self.meter.settle(synced.totals, now)
        self.elsewhere, self.instances = synced.streams, synced.instances
        if self.live_export is not None and now - self._published >= LIVE_EVERY:
            await self.backend.publish(self.instance, self.live_export(), now)
            self._published = now
        self._rounds_done = round_
        self._cycled.set()
        self._cycled = trio.Event()
        if not self.up:
            if self.last_error:
                log.warning("store %s is back; %s", self.backend.url, "held usage written")
            self.up, self.last_error = True, ""

    async def _write(self) -> None:
        """The batch a failed round left, if any, then everything held when this round began, as one batch;
        rows that come meanwhile wait for the next round. At close, batches go on until nothing is left. (Writing
        until nothing was left at every round kept the store busy back to back under load: each batch took long
        enough for new rows to come, a hundred batches a second and more at 2,000 requests a second, each a
        transaction or a script.)"""
        left_over = self._batch is not None
        while True:
            if self._batch is None:
                rows = [UsageRow(k, m, d, *v) for (k, m, d), v in self._rows.items()]
                self._rows = {}
                counters = self.meter.take()
                if not rows and not counters:
                    return
                self._batch = Batch(rows, counters, self.clock())
            await self.backend.apply(self._batch)
            self._batch = None
            if not left_over and not self._closing:
                return
            left_over = False

    def _reads(self, now: float) -> dict[str, list[str]]:
        """The counters each limited key's checks look at now."""
        rate, _ = self.windows.span("rate", now)
        reads = {}
        for key in self.by_name.values():
            if key.limits.any:
                budget, _ = self.windows.span(key.limits.budget_period, now)
                reads[key.name] = [counter_name("req", rate), counter_name("tok", rate),
                                   budget_counter(key.limits.budget_period, budget)]
        return reads

    def _load_keys(self, docs: dict[str, bytes]) -> None:
        keys = [VirtualKey.from_json(doc) for doc in docs.values()]
        self.by_name = {k.name: k for k in keys}
        self.keys = {k.digest: k for k in keys}
        self.loaded = True

    def _load_providers(self, docs: dict[str, bytes]) -> None:
        tables: dict[str, Any] = {}
        for name, doc in docs.items():
            try:
                tables[name] = provider_table(doc)
            except ValueError:
                log.error("store %s: provider %r is not a provider record; left out", self.backend.url, name)
        if tables != self.providers:
            self.providers = tables
            if self.on_providers is not None:
                try:
                    self.on_providers()
                except Exception:  # the server's own fault, not the store's: say so, keep the rounds going
                    log.exception("applying the stored providers failed; serving the previous ones")

    async def others_live(self) -> list[bytes]:
        """The live figures the other instances published (none while the store is away, or slower than its
        timeout: the console then shows this instance alone and says so)."""
        if not self.up:
            return []
        now = self.clock()
        with trio.move_on_after(self.settings.timeout):
            try:
                docs = await self.backend.published(now)
            except Exception:
                return []
            return [doc for instance, doc in docs.items() if instance != self.instance]
        return []

    async def refreshed(self) -> None:
        """Wait (up to the store's timeout) for a round that started after now: an admin change is then live
        here before its answer leaves."""
        wanted = self._rounds + 1  # a round in progress may have read before the change: the next one has not
        with trio.move_on_after(self.settings.timeout + self.settings.refresh):
            self.poke()
            while self._rounds_done < wanted:
                await self._cycled.wait()

    def _down(self, exc: BaseException) -> None:
        message = _describe(exc) if not isinstance(exc, trio.TooSlowError) else \
            f"no answer within {self.settings.timeout:g}s"
        if self.up or not self.last_error:
            log.warning("store %s unreachable (%s): serving the %d keys already known with their last limits, "
                        "holding usage (%d rows) until it is back", self.backend.url, message, len(self.by_name),
                        self.buffered)
        self.up, self.last_error = False, message


FIELDS = ("models", "rpm", "tpm", "max_streams", "budget", "budget_period", "expires")


def key_fields(doc: Mapping[str, Any], now: float | None = None) -> dict[str, Any]:
    """The settable fields of a key (from the CLI or the admin API's JSON), checked; ValueError names the
    first wrong one. None clears a limit."""
    out: dict[str, Any] = {}
    for name, value in doc.items():
        if name not in FIELDS:
            raise ValueError(f"unknown field {name!r} (allowed: {', '.join(FIELDS)})")
        if name == "models":
            if value is None:
                value = []
            if not isinstance(value, (list, tuple)) or not all(isinstance(m, str) and m for m in value):
                raise ValueError("models: expected a list of model names or glob patterns")
            out[name] = tuple(value)
        elif name in ("rpm", "tpm", "max_streams"):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name}: expected a whole number >= 1 (or null for no limit)")
            out[name] = value
        elif name == "budget":
            if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0):
                raise ValueError("budget: expected USD >= 0 (or null for no budget)")
            out[name] = None if value is None else float(value)
        elif name == "budget_period":
            if value not in PERIODS:
                raise ValueError(f"budget_period: expected {' or '.join(PERIODS)}")
            out[name] = value
        elif name == "expires":
            if value is not None:
                try:
                    day = time.strftime("%Y-%m-%d", time.strptime(value, "%Y-%m-%d"))
                except (TypeError, ValueError):
                    raise ValueError("expires: expected a date YYYY-MM-DD (or null)") from None
                if day < today(time.time() if now is None else now):
                    raise ValueError(f"expires: {day} has passed (the key works through its expiry day, UTC); "
                                     "to stop a key now, revoke it")
                value = day
            out[name] = value
    return out


def create_key(name: str, fields: Mapping[str, Any], now: float) -> tuple[VirtualKey, str]:
    """A new key and its secret (shown once, never stored)."""
    check_name(name)
    secret = new_secret()
    key = VirtualKey(key="", name=name, digest=digest(secret), hint=secret[:len(SECRET_PREFIX) + 4] + "…",
                     created=now)
    return with_changes(key, **key_fields(fields, now)), secret


def with_changes(key: VirtualKey, **changes: Any) -> VirtualKey:
    """``key`` with some fields (or limits: rpm, tpm, max_streams, budget, budget_period) replaced."""
    limit_fields = {k: changes.pop(k) for k in list(changes) if k in Limits.__dataclass_fields__}
    if limit_fields:
        changes["limits"] = replace(key.limits, **limit_fields)
    return replace(key, **changes)
