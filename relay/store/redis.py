"""The shared store: Redis 7 or Valkey (``redis://`` or ``rediss://`` for TLS), through coredis.

coredis runs on trio natively (through anyio), so no asyncio loop sits beside relay's; and the request path
never calls it anyway (see ``relay.store.View``). A batch of usage rows and counter deltas is applied by one
Lua script, atomically and once: the script first claims the batch id with ``SET NX``, so a batch retried
after a lost reply adds nothing twice.

Layout (all under ``relay:``): ``keys`` and ``providers`` (hashes: name -> JSON), each with ``<kind>:version``
(bumped by every change);
``usage:days`` (set) and ``usage:<day>`` (hash: ``key\\tmodel\\tmetric`` -> count); ``c:<key>:<counter>``
(limit counters, expiring with their window); ``streams:<instance>`` (hash: key -> requests in flight) and
``instances`` (sorted set by last report); ``live:<instance>`` (the console's figures of one instance, expiring).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import coredis
import orjson
import trio

from relay.store import (METRICS, RECORDS, STREAMS_TTL, Batch, Changed, Records, StoreError, Synced, UsageRow, exists,
                         masked, missing)

logging.getLogger("coredis").setLevel(logging.CRITICAL)  # relay says once, itself, that the store is away
P = "relay:"
BATCH_TTL = 86400  # seconds a batch id is remembered
APPLY = """
if not redis.call('SET', KEYS[1] .. 'batch:' .. ARGV[1], '1', 'NX', 'EX', ARGV[2]) then return 0 end
local batch = cjson.decode(ARGV[3])
local metrics = batch.metrics
for _, row in ipairs(batch.rows) do
  redis.call('SADD', KEYS[1] .. 'usage:days', row[1])
  for i, metric in ipairs(metrics) do
    if row[i + 2] ~= '0' then
      redis.call('HINCRBY', KEYS[1] .. 'usage:' .. row[1], row[2] .. '\\t' .. metric, row[i + 2])
    end
  end
end
for _, c in ipairs(batch.counters) do
  redis.call('INCRBY', KEYS[1] .. 'c:' .. c[1], c[2])
  redis.call('EXPIRE', KEYS[1] .. 'c:' .. c[1], c[3])
end
return 1
"""
PUT = """
local exists = redis.call('HEXISTS', KEYS[1], ARGV[1])
if ARGV[3] == '1' and exists == 1 then return 'exists' end
if ARGV[3] == '0' and exists == 0 then return 'missing' end
if ARGV[5] == '1' and redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[6] then return 'changed' end
if ARGV[4] == '1' then redis.call('HDEL', KEYS[1], ARGV[1]) else redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
redis.call('INCR', KEYS[1] .. ':version')
return 'ok'
"""


class RedisBackend(Records):
    def __init__(self, url: str, timeout: float = 5.0) -> None:
        self.url = masked(url)
        self.timeout = timeout
        self._client: Any = coredis.Redis.from_url(url, decode_responses=False, connect_timeout=5,
                                                   stream_timeout=10, retry_policy=coredis.retry.NoRetryPolicy())
        self._apply = self._client.register_script(APPLY)
        self._put = self._client.register_script(PUT)

    async def __aenter__(self) -> "RedisBackend":
        await self._client.__aenter__()
        scope = trio.CancelScope(deadline=trio.current_time() + self.timeout)
        try:
            with scope:
                await self._client.ping()
        except BaseException:
            await self._client.__aexit__(None, None, None)
            if scope.cancel_called:  # coredis may turn the cancellation into a ConnectionError of its own
                raise StoreError(f"store {self.url} did not answer within {self.timeout:g}s") from None
            raise
        if scope.cancelled_caught:
            await self._client.__aexit__(None, None, None)
            raise StoreError(f"store {self.url} did not answer within {self.timeout:g}s")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._client.__aexit__(None, None, None)

    async def ping(self) -> None:
        await self._client.ping()

    async def version(self, kind: str) -> int:
        value = await self._client.get(P + kind + ":version")
        return int(value) if value else 0

    async def load(self, kind: str) -> dict[str, bytes]:
        assert kind in RECORDS
        return {name.decode(): doc for name, doc in (await self._client.hgetall(P + kind)).items()}

    async def put(self, kind: str, name: str, doc: bytes | None, *, create: bool,
                  expect: bytes | None = None) -> None:
        assert kind in RECORDS
        answer: Any = await self._put(keys=[P + kind], args=[name, doc or b"", "1" if create else "0",
                                                             "1" if doc is None else "0",
                                                             "0" if expect is None else "1", expect or b""])
        if answer == b"exists":
            raise exists(kind, name)
        if answer == b"missing":
            raise missing(kind, name)
        if answer == b"changed":
            raise Changed(f"{RECORDS[kind]} {name!r} changed meanwhile")

    async def apply(self, batch: Batch) -> None:
        payload = orjson.dumps({
            "metrics": METRICS,
            "rows": [[r.day, f"{r.key}\t{r.model}", *(str(v) for v in r.values())] for r in batch.rows],
            # a TTL, not a time: the instance's clock and the store's need not agree
            "counters": [[f"{key}:{name}", str(delta), str(max(1, int(expires - batch.made) + 60))]
                         for key, counters in batch.counters.items() for name, (delta, expires) in counters.items()],
        })
        await self._apply(keys=[P], args=[batch.id, str(BATCH_TTL), payload])

    async def sync(self, instance: str, reads: Mapping[str, list[str]], streams: Mapping[str, int],
                   now: float) -> Synced:
        mine = P + "streams:" + instance
        flat = [(key, name) for key, names in reads.items() for name in names]
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.delete([mine])
            if any(streams.values()):
                pipe.hset(mine, {key: str(n) for key, n in streams.items() if n})
                pipe.expire(mine, int(STREAMS_TTL))
            pipe.zadd(P + "instances", {instance: now})
            pipe.zremrangebyscore(P + "instances", "-inf", now - STREAMS_TTL)
            alive = pipe.zrange(P + "instances", 0, -1)
            values = pipe.mget([f"{P}c:{key}:{name}" for key, name in flat]) if flat else None
        instances = [i.decode() for i in await alive]
        totals: dict[str, dict[str, int]] = {key: {} for key in reads}
        for (key, name), value in zip(flat, await values if values is not None else []):
            totals[key][name] = int(value or 0)
        elsewhere: dict[str, int] = {}
        others = [i for i in instances if i != instance]
        if others:
            async with self._client.pipeline(transaction=False) as pipe:
                open_there = [pipe.hgetall(P + "streams:" + other) for other in others]
            for found in open_there:
                for key, n in (await found).items():
                    elsewhere[key.decode()] = elsewhere.get(key.decode(), 0) + int(n)
        return Synced(totals, elsewhere, len(instances))

    async def usage(self, since: str | None = None) -> list[UsageRow]:
        days = sorted(d.decode() for d in await self._client.smembers(P + "usage:days"))
        rows: dict[tuple[str, str, str], UsageRow] = {}
        for day in days:
            if since and day < since:
                continue
            for field, value in (await self._client.hgetall(P + "usage:" + day)).items():
                parts = field.decode().split("\t")
                if len(parts) != 3 or parts[2] not in METRICS:
                    raise StoreError(f"{self.url}: unexpected usage field {field!r}")
                key, model, metric = parts
                row = rows.setdefault((key, model, day), UsageRow(key, model, day))
                setattr(row, metric, int(value))
        return list(rows.values())

    async def publish(self, instance: str, doc: bytes, now: float) -> None:
        await self._client.set(P + "live:" + instance, doc, ex=int(STREAMS_TTL))

    async def published(self, now: float) -> dict[str, bytes]:
        instances = [i.decode() for i in await self._client.zrangebyscore(P + "instances", now - STREAMS_TTL, "+inf")]
        if not instances:
            return {}
        docs = await self._client.mget([P + "live:" + i for i in instances])
        return {i: doc for i, doc in zip(instances, docs) if doc is not None}

    async def leave(self, instance: str) -> None:
        await self._client.delete([P + "live:" + instance, P + "streams:" + instance])
        await self._client.zrem(P + "instances", [instance])
