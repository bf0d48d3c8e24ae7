"""The team side of one request, between the server and the store's View: who may start a request (virtual
keys' expiry, limits and budgets), and what a finished one cost and goes in the books.

Everything here is synchronous and in memory: the request path never waits on the store (see relay.store).
"""

from __future__ import annotations

import logging
from typing import Any

import trio

from relay.config import ClientKey, Config
from relay.log import printable
from relay.metrics import Metrics
from relay.pricing import cost_micros, lookup
from relay.store import View, VirtualKey, url_for

log = logging.getLogger("relay.gateway")

REFUSALS = {401: "expired_or_revoked", 402: "budget", 429: "rate_limit"}


class Gateway:
    def __init__(self, config: Config, metrics: Metrics) -> None:
        self.config = config
        self.metrics = metrics
        url = url_for(config.store)
        self.view = View.open(url, config.store) if url else None
        self.left_out: dict[str, str] = {}  # stored providers this instance cannot serve, and why (the server's merge)

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        if self.view is None:
            task_status.started()
            return
        await self.view.run(task_status=task_status)

    async def close(self) -> None:
        if self.view is not None:
            await self.view.close()

    async def flush(self) -> None:
        if self.view is not None:
            await self.view.flush()

    def valid(self, client: ClientKey | None) -> None:
        """401 for a virtual key revoked or past its expiry (on every path it could use)."""
        if isinstance(client, VirtualKey) and self.view is not None:
            try:
                self.view.valid(client)
            except Exception:
                self.metrics.refused[("expired_or_revoked",)] += 1
                raise

    def health(self) -> bytes:
        """/health: the store's state without its address (anyone may ask)."""
        if self.view is None:
            return b'{"status":"ok"}'
        return b'{"status":"ok","store":"%s"}' % (b"up" if self.view.up else b"down")

    def admit(self, client: ClientKey | None, model: str) -> None:
        """A virtual key's request starts (raises the refusal: 401, 402 or 429 with retry-after); the server
        calls ``finish`` once it has answered, whatever happened."""
        if not isinstance(client, VirtualKey) or self.view is None:
            return
        try:  # a refused request is booked under a name /metrics knows, or "other": random names add no rows
            self.view.admit(client, self.metrics.model_label(model, served=False))
        except Exception as exc:
            status = getattr(exc, "status", 0)
            self.metrics.refused[(REFUSALS.get(status, "other"),)] += 1
            raise

    def finish(self, client: ClientKey | None, admitted: bool, model: str, target: str, status: int,
               input_tokens: int | None, output_tokens: int | None, estimated: bool, cache_read: int,
               cache_write: int) -> int:
        """Books one answered request; returns its cost in micro-dollars. ``admitted``: ``admit`` let it in (its
        in-flight count is released here, whatever the status)."""
        micros = 0
        tokens_in, tokens_out = input_tokens or 0, output_tokens or 0
        if target and status == 200:
            provider_name, _, upstream_model = target.partition("/")
            provider = self.config.providers.get(provider_name)
            if provider is not None and provider.prices:
                price = lookup(provider.prices, upstream_model)
                uncached = max(0, tokens_in - cache_read)
                micros = cost_micros(price, uncached, tokens_out, cache_read, cache_write)
                if micros:
                    self.metrics.cost[(provider_name,)] += micros
        if self.view is None:
            return micros
        if admitted and isinstance(client, VirtualKey):
            self.view.release(client, tokens_in + tokens_out, micros)
        if client is not None and model and status == 200:
            self.view.record(client.name, printable(model), input_tokens=tokens_in, output_tokens=tokens_out,
                             estimated=estimated, cache_read=cache_read, cache_write=cache_write, cost_micros=micros)
        return micros

    def status(self) -> dict[str, Any]:
        return {"store": self.view.status() if self.view is not None else None}

    def gauges(self) -> None:
        """The store's state, into the metrics before a scrape."""
        if self.view is not None:
            self.metrics.store = {"relay_store_up": int(self.view.up), "relay_store_buffered_rows": self.view.buffered,
                                  "relay_store_instances": self.view.instances}
