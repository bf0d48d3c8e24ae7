"""The server: its lifecycle (listen, drain, reload, the store's background task) and its endpoints.

The HTTP work is ``http.py``'s, streaming is ``pump.py``'s, what to do after a failed attempt is
``retry.py``'s and everything about the upstream connection is ``upstream.py``'s. Nothing format-specific
happens here beyond choosing the translator: bodies are parsed once and handed to ``formats``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import orjson
import trio

from relay import admin, console, routing, tokens, transport
from relay.affinity import Place, Route, Sessions
from relay.auth import OPEN, Keys, may_call, permitted
from relay.config import ClientKey, Config, Provider, ServerConfig, loopback, with_stored
from relay.context import Limits
from relay.errors import RelayError, invalid
from relay.formats import anthropic as A
from relay.formats import registry
from relay.formats.base import ClientRequest, Options, Translator
from relay.gate import StartGate
from relay.gateway import Gateway
from relay.health import Healths, ProviderHealth
from relay.history import REUSE_FROM, Histories, Reuse
from relay.headmemo import HeadMemo, RequestHead
from relay.http import BodyBudget, ClientGone, Connection, EventStream, send_body, send_error, send_raw, serve_connection
from relay.live import Live
from relay.log import Exchange
from relay.instance_metrics import Board
from relay.metrics import Metrics
from relay.pump import HeadWaits, Pump
from relay.resources import connection_budget
from relay.retry import RAISE, Raise, Retry, next_step, retry_after
from relay.store import digest
from relay.upstream import Deadlines, Upstreams
from relay.watch import StreamWatch

log = logging.getLogger("relay.server")

HEALTH_PATHS = {"/", "/health", "/api/hello", "/healthz"}


@dataclass  # not frozen: a frozen dataclass is made field by field through object.__setattr__ (~1 us more)
class Asked:
    """One POST /v1/messages as relay will serve it: the request as sent, what goes on, relay's estimate."""

    incoming: ClientRequest  # as the client sent it (formats that forward bytes compare against it)
    req: dict[str, Any]  # with a <relay-model> tag stripped
    stream: bool
    estimate: int  # input tokens, relay's estimate
    place: Place | None = None  # where this Claude Code session was served last (session affinity)
    route: Route = ()  # the labels of the targets resolved for it, in the route's order


class Server:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.upstreams = Upstreams(config)
        self.healths = Healths()
        self.sessions = Sessions(config.server.affinity_sessions)
        self.histories = Histories(config.server.history_memory)
        self.heads = HeadWaits()  # streams waiting for their upstream's head: the keep-alive's early start
        self.gate = StartGate()  # new requests' first steps, a few to a scheduler round: running streams go on
        self.watch = StreamWatch.create()  # streams being relayed: clients that leave, and the streams' timers
        self.known = Limits(self.upstreams.get_json, routing.named_targets(config))
        self.metrics = Metrics(routing.configured_names(config))
        self._retired: list[Upstreams] = []
        self._retiring = trio.Event()
        self.gateway = Gateway(config, self.metrics)
        self.live = Live(self.gateway.view.instance if self.gateway.view else "local")  # the console's hour
        self.file_config = config  # what the file says; ``config`` adds the providers stored at run time
        if self.gateway.view is not None:
            self.gateway.view.on_providers = self._stored_changed
            self.gateway.view.live_export = lambda: orjson.dumps(
                self.live.export(time.time(), self.metrics.open_streams))
        self.board = Board.from_env(self.metrics)  # a worker of several: /metrics sums them all
        self._auth = Keys(config, self.gateway.view)
        self._accepting = trio.CancelScope()
        self.idle_waits: set[trio.CancelScope] = set()
        self.bodies = BodyBudget(config.server.body_memory)
        self.head_memo = HeadMemo()  # request heads h11 parsed, for the connections' next ones
        self._drain_deadline = float("inf")
        self._open = 0
        self.max_open = connection_budget(config.server.max_connections)
        self.draining = False

    # ---- lifecycle ---------------------------------------------------------------------------

    async def serve(self, host: str | None = None, port: int | None = None, *, reuse_port: bool = False,
                    task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Accept until drained, then let open requests finish (up to the drain deadline) and return."""
        host = host or self.config.server.host
        port = self.config.server.port if port is None else port
        listeners = [_reuse_port_listener(host, port)] if reuse_port else await trio.open_tcp_listeners(port, host=host)
        bound = listeners[0].socket.getsockname()[1]
        log.info("listening on http://%s:%d (config: %s)", host, bound, self.config.source)
        if self.config.server.admin_keys and not loopback(host):
            log.warning("the admin API and the console (/ui) are served over plain HTTP on %s: put TLS in front of"
                        " relay (a reverse proxy) before admin keys cross a network", host)
        if self.max_open < self.config.server.max_connections:
            log.warning("max_connections %d lowered to %d to fit the open-file limit (raise it: ulimit -n, or LimitNOFILE"
                        " in a systemd unit)", self.config.server.max_connections, self.max_open)
        async with trio.open_nursery() as background:
            await background.start(self.gateway.run)  # one round with the store at most: never waits on it
            await background.start(self.heads.run)
            await background.start(self.gate.run)
            await background.start(self.bodies.run)
            if self.watch is not None:
                await background.start(self.watch.run)
            background.start_soon(self._close_retired)
            if self.board is not None:
                background.start_soon(self.board.run)
            try:
                async with trio.open_nursery() as connections:
                    with self._accepting:
                        task_status.started(bound)
                        await trio.serve_listeners(self.handle, listeners, handler_nursery=connections)
                    for listener in listeners:
                        await listener.aclose()
                    connections.cancel_scope.deadline = self._drain_deadline
            finally:
                with trio.CancelScope(shield=True):
                    await self.gateway.close()  # what is held goes to the store (bounded by its timeout)
                    background.cancel_scope.cancel()
                    for upstreams in (self.upstreams, *self._retired):
                        await upstreams.aclose()

    async def _close_retired(self) -> None:
        """The pools a reload left behind: their idle connections close at once, the busy ones when their request
        ends (a provider changed or deleted at run time keeps no socket open)."""
        while True:
            await self._retiring.wait()
            self._retiring = trio.Event()
            while self._retired:
                await self._retired.pop().aclose()

    async def flush_usage(self) -> None:
        """Wait until what this instance booked so far is in the store (tests, the admin API)."""
        await self.gateway.flush()

    def drain(self, grace: float | None = None) -> None:
        """Stop accepting; idle keep-alive connections close now, busy ones when their response is done."""
        grace = self.config.server.shutdown_grace if grace is None else grace
        self.draining = True
        self._drain_deadline = trio.current_time() + grace
        self._accepting.cancel()
        for scope in list(self.idle_waits):
            scope.cancel()
        log.info("draining: no new connections; open requests have %gs to finish", grace)

    def reload(self, config: Config) -> None:
        """The config file read again (SIGHUP), for new requests; the providers stored at run time stay."""
        if (config.server.host, config.server.port) != (self.config.server.host, self.config.server.port):
            log.warning("reload: host/port changes take effect on restart only")
        if config.store != self.config.store:
            log.warning("reload: [store] changes take effect on restart only")
        self.file_config = config
        self._use(self._with_stored(config))
        log.info("reloaded config from %s", config.source)

    def _stored_changed(self) -> None:
        """The store's providers changed (the admin API, on this instance or another): live from the next request."""
        self._use(self._with_stored(self.file_config))
        log.info("providers stored at run time: %s", ", ".join(sorted(self.config.stored)) or "none")

    def _with_stored(self, config: Config) -> Config:
        view = self.gateway.view
        if view is None or not view.providers:
            self.gateway.left_out = {}
            return config
        merged, self.gateway.left_out = with_stored(config, view.providers, dict(os.environ))
        for name, problem in self.gateway.left_out.items():
            log.warning("stored provider %r left out: %s", name, problem)
        return merged

    def _use(self, config: Config) -> None:
        """New config for new requests; requests in flight keep the upstream pools they started with."""
        old, self.upstreams = self.upstreams, Upstreams(config)
        self.upstreams.inherit(old)
        if not old.empty:  # pools of providers removed or changed: closed now, their busy connections as they end
            self._retired.append(old)
            self._retiring.set()
        unchanged = {name for name, p in config.providers.items() if self.config.providers.get(name) == p}
        self.healths.keep(unchanged)  # circuits, cool-downs and learned limits of the others stay
        known = Limits(self.upstreams.get_json, routing.named_targets(config))
        known.carry(self.known, unchanged)
        self.known = known
        self.config = config
        self.sessions.size = config.server.affinity_sessions  # places stay: each is checked against the config in use
        self.histories.memory = config.server.history_memory  # (a smaller bound is met at once)
        self.gateway.config = config
        self._auth = Keys(config, self.gateway.view)
        self.max_open = connection_budget(config.server.max_connections)
        self.metrics.configured = frozenset(routing.configured_names(config))

    async def handle(self, stream: trio.SocketStream) -> None:
        if self._open >= self.max_open:
            await send_raw(stream, RelayError(529, "relay is at its connection limit; retry shortly", "overloaded_error"))
            await stream.aclose()
            return
        self._open += 1
        try:
            await serve_connection(Connection(stream, self.config.server.max_header_bytes, self.head_memo), self)
        except ClientGone:
            pass
        except Exception:  # a bug must cost one connection, never the server
            log.exception("unhandled error on a connection")
        finally:
            self._open -= 1
            with trio.move_on_after(1) as scope:
                scope.shield = True
                try:
                    await stream.aclose()
                except Exception:
                    pass

    @property
    def limits(self) -> ServerConfig:
        return self.config.server

    def done(self, ex: Exchange) -> None:
        """A request is answered: its metrics, its access-log line (its usage and cost are booked by then)."""
        duration = time.perf_counter() - ex.started  # one clock read for the metrics, the console and the log
        ttfb = None if ex.ttfb is None else ex.ttfb - ex.started
        self.metrics.request_done(ex.route, ex.target.split("/", 1)[0], ex.model, ex.status, duration, ttfb,
                                  ex.input_tokens, ex.output_tokens, ex.cache_read)
        if ex.route.startswith("/v1/"):  # what clients asked for; not the console's own polling
            now = time.time()
            self.live.request_done(
                now, key=ex.client.name if ex.client is not None else "", model=ex.model, target=ex.target,
                status=ex.status, stream=ex.stream, ttfb=ttfb, duration=duration, input_tokens=ex.input_tokens,
                output_tokens=ex.output_tokens, cost_micros=round((ex.cost_usd or 0) * 1_000_000),
                open_streams=self.metrics.open_streams)
        ex.write(duration)

    def _book(self, ex: Exchange) -> None:
        """Usage and cost into the store's buffer, and the key's request released: once, however the request
        ended (a client gone mid-stream was still served what it got)."""
        micros = self.gateway.finish(ex.client, ex.admitted, ex.model, ex.target, ex.status, ex.input_tokens,
                                     ex.output_tokens, ex.usage_estimated, ex.cache_read, ex.cache_write)
        ex.admitted = False
        ex.cost_usd = micros / 1_000_000 if micros else None

    # ---- endpoints ---------------------------------------------------------------------------

    def admit(self, conn: Connection, ex: Exchange, request: RequestHead) -> None:
        """The route and the key, from the head alone: nobody without a key gets relay to read, let alone
        hold, a request body."""
        path = ex.path.split("?", 1)[0]
        if path in HEALTH_PATHS:
            ex.route = path
        elif path == "/metrics":
            ex.route = path
            self._auth.check_metrics(conn.headers, conn.peer_loopback)
        elif path.startswith("/admin/"):
            ex.route = "/admin"
            self._auth.check_admin(conn.headers)
        elif path == "/ui" or path.startswith("/ui/"):
            ex.route = "/ui"  # static files, no secret in them: no key asked, but none served without an admin API
            if not self.config.server.admin_keys:
                raise RelayError(404, "the console is off: set [server] admin_keys to turn it on", "not_found_error")
            if ex.method not in ("GET", "HEAD"):  # refused on the head: no body is read for anyone without a key
                raise RelayError(405, f"{ex.method} is not allowed on {path}", "invalid_request_error")
        elif path in ("/v1/messages", "/v1/messages/count_tokens", "/v1/models") or path.startswith("/v1/models/"):
            ex.route = path if not path.startswith("/v1/models/") else "/v1/models/{id}"
            ex.client = self._auth.client(conn.headers)
            self.gateway.valid(ex.client)
        else:
            raise RelayError(404, f"no route for {ex.method} {path}", "not_found_error")

    async def respond(self, conn: Connection, ex: Exchange, request: RequestHead, body: bytes) -> None:
        """A request ``admit`` let in, with its body."""
        try:
            await self._respond(conn, ex, request, body)
        finally:
            self._book(ex)

    async def _respond(self, conn: Connection, ex: Exchange, request: RequestHead, body: bytes) -> None:
        path = ex.path.split("?", 1)[0]
        method = ex.method
        try:
            if ex.route in HEALTH_PATHS:
                if method not in ("GET", "HEAD"):
                    raise RelayError(405, f"{method} is not allowed on {path}", "invalid_request_error")
                await send_body(conn, ex, 200, self.gateway.health(), head_only=method == "HEAD")
                return
            if ex.route == "/metrics":
                _require(method, "GET", path)
                self.gateway.gauges()
                text = self.metrics.render() if self.board is None else self.board.render()
                await send_body(conn, ex, 200, text, content_type=b"text/plain; version=0.0.4")
                return
            if ex.route == "/admin":
                local = await console.answer(self, method, path, ex.path.partition("?")[2], body)
                if local is not None:
                    await send_body(conn, ex, 200, local)
                    return
                status, answer = await admin.handle(self.gateway, method, ex.path, body)
                await send_body(conn, ex, status, answer)
                return
            if ex.route == "/ui":
                page, content_type = console.asset(path)
                await send_body(conn, ex, 200, page, content_type=content_type, extra=console.HEADERS,
                                head_only=method == "HEAD")
                return
            assert ex.client is not None  # admit found the key of every /v1/ route
            if path == "/v1/messages":
                _require(method, "POST", path)
                await self._messages(conn, ex, body, conn.headers)
            elif path == "/v1/messages/count_tokens":
                _require(method, "POST", path)
                req = _parse(body)
                count = await self._count_tokens(req, ClientRequest(body, req, tuple(conn.headers)), ex.client)
                await send_body(conn, ex, 200, orjson.dumps({"input_tokens": count}))
            elif path == "/v1/models":
                _require(method, "GET", path)
                await send_body(conn, ex, 200, orjson.dumps(self._models(ex.client)))
            else:  # /v1/models/{id}
                _require(method, "GET", path)
                wanted = path[len("/v1/models/"):]
                await send_body(conn, ex, 200, orjson.dumps(await self._model_entry(wanted, ex.client)))
        except RelayError as err:
            await send_error(conn, ex, err, head_only=method == "HEAD")

    def _entry(self, mid: str, target: routing.Target, window: int | None) -> dict[str, Any]:
        entry: dict[str, Any] = {"type": "model", "id": mid, "display_name": mid, "created_at": "2025-01-01T00:00:00Z"}
        limits = target.provider.limits_for(target.model)
        if window:
            entry["context_window"] = window
        if limits.max_output:
            entry["max_output_tokens"] = limits.max_output
        return entry

    def _models(self, client: ClientKey) -> dict[str, Any]:
        """What this key may use: an id whose first target is out of its scope is not listed."""
        data = []
        for mid in routing.listed_models(self.config):
            target = routing.resolve(self.config, mid)[0]
            if not may_call(client, target):
                continue
            data.append(self._entry(mid, target, self.known.window(target.provider, target.model)))
        return {"data": data, "has_more": False, "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None}

    async def _model_entry(self, mid: str, client: ClientKey) -> dict[str, Any]:
        """Any id relay can route for this key, with its window (asking a local server for it, once); one out
        of the key's scope is as unknown to it as one relay cannot route."""
        target = routing.resolve(self.config, mid)[0]
        if not may_call(client, target):
            raise RelayError(404, f"model: {mid!r} is not available to this key", "not_found_error")
        return self._entry(mid, target, await self.known.window_of(target.provider, target.model))

    async def _count_tokens(self, req: dict[str, Any], incoming: ClientRequest, client: ClientKey) -> int:
        """The upstream's own count when its format forwards count_tokens (``anthropic``), else relay's estimate
        (also when the upstream has no counter or fails: a count is advisory, never worth an error). A model
        out of the key's scope is refused before any upstream is asked."""
        model = req.get("model")
        target = None
        if isinstance(model, str) and model:
            try:
                targets = routing.resolve(self.config, model)
            except RelayError:
                targets = []
            target = permitted(client, model, targets)[0] if targets else None
        counter = getattr(registry.get(target.provider.format), "count_tokens", None) if target else None
        if target is not None and counter is not None:
            with _reencoding_request():
                call = counter(req, target.provider, target.model, incoming)
            try:
                async with self.upstreams.request(target.provider, call.path, call.body, stream=False,
                                                  extra_headers=call.headers, model=target.model) as upstream:
                    doc = orjson.loads(await upstream.read(1024 * 1024))
                if isinstance(doc, dict) and isinstance(doc.get("input_tokens"), int):
                    return int(doc["input_tokens"])
            except (RelayError, orjson.JSONDecodeError) as exc:
                log.info("count_tokens via %s failed (%s); answering with the local estimate", target.label, exc)
        return tokens.estimate(req)

    # ---- POST /v1/messages ------------------------------------------------------------------

    async def _messages(self, conn: Connection, ex: Exchange, body: bytes, headers: Any = ()) -> None:
        if not self.gate.passes():  # many requests at once: they take turns with the streams already running
            await self.gate.wait()
        # Whose history: the key itself (two keys may share a name), by its digest; only where a body is large
        # enough to be kept.
        client = digest(ex.client.key) if ex.client and len(body) >= REUSE_FROM else ""
        req, reuse = _parse_reusing(body, self.histories, client)
        parsed = req
        incoming = ClientRequest(body, req, tuple(headers), reuse)
        model = req.get("model")
        if not isinstance(model, str) or not model:
            raise invalid("model: Field required")
        ex.model = model
        self.gateway.admit(ex.client, model)  # a virtual key's limits and budget: 429 / 402 with retry-after
        ex.admitted = True
        limits = self.config.server
        for field_name, limit in (("messages", limits.max_messages), ("tools", limits.max_tools)):
            value = req.get(field_name)
            if isinstance(value, list) and len(value) > limit:
                raise RelayError(413, f"{field_name}: {len(value)} items; relay accepts at most {limit}", "request_too_large")
        stream = req.get("stream") is True
        ex.stream = stream
        override, req = routing.take_model_tag(req)  # a sub-agent's <relay-model> choice
        if reuse is not None and req.get("messages") is parsed.get("messages"):  # (a model tag makes a copy)
            estimate = tokens.estimate(req, reuse.count, reuse.tokens)
        else:
            estimate = tokens.estimate(req)
        targets = permitted(ex.client or OPEN, model, routing.resolve(self.config, override or model, req, estimate))
        session = incoming.session_id if "metadata" in req else None  # (its first read costs ~2 us)
        place = self.sessions.place(ex.client.name if ex.client else "", session)
        if place is None:
            asked = Asked(incoming, req, stream, estimate)
        else:  # the session's own target first, while it is healthy (the loop below passes over it when not)
            asked = Asked(incoming, req, stream, estimate, place, tuple(t.label for t in targets))
            targets = place.order(targets)
        failures: list[str] = []
        try:
            for number, target in enumerate(targets, 1):
                last = number == len(targets)
                health = self.healths.of(target.provider)
                if not last and not health.available(trio.current_time()):
                    failures.append(f"{target.label}:circuit-open")
                    continue
                if await self._try_target(conn, ex, asked, target, health, failures, last):
                    return
        finally:
            if failures:
                ex.note = ("failed=" + ",".join(failures) + " " + ex.note).strip()
            try:  # after the answer: the next turn extends this one
                self.histories.learn(client, body, parsed, reuse)
            except Exception:  # a fault in an optimisation must not fail a request already answered
                log.exception("%s keeping the request for the conversation's next turn failed", ex.request_id)

    async def _try_target(self, conn: Connection, ex: Exchange, asked: Asked, target: routing.Target,
                          health: ProviderHealth, failures: list[str], last: bool) -> bool:
        """Attempts on one target: True when served; False to fall back; raises what the client must see."""
        provider = target.provider
        attempt = 0
        capped = False  # retried once already with the output cap the upstream stated
        while True:
            key = health.pick_key(trio.current_time() if health.resting else 0.0,  # (no clock read when no key rests)
                                  asked.place.keys.get(provider.name) if asked.place else None)
            ex.target = target.label
            try:
                await self._serve_from(conn, ex, asked, target, key)
                health.succeeded()
                Sessions.served(asked.place, asked.route, target, key)
                return True
            except BaseException as exc:
                if not isinstance(exc, RelayError):
                    health.abandoned()  # the client left or a bug: no verdict on the upstream, but free the probe
                    raise
                err = exc
            if err.refusal:  # relay's own answer: no upstream attempt to count, retry or fall back from
                health.abandoned()
                raise err
            now = trio.current_time()
            self.metrics.upstream_failed(provider.name, err.status)
            health.attempt_failed(key, err.status, now, retry_after(err))
            if ex.status != 0:  # bytes reached the client (message_start, early): _serve_from sent the error as
                return True  # an event, and nothing can be retried
            if err.output_cap and not capped and self.known.learn_output_cap(provider, target.model, err.output_cap):
                capped = True  # at once, with the cap it stated: the same request would fail the same way
                failures.append(f"{target.label}:{err.status}")
                continue
            attempt += 1
            step = next_step(err, attempt, provider, health, now, last=last)
            if step is RAISE:
                raise err
            failures.append(f"{target.label}:{err.status}")
            if isinstance(step, Raise):
                raise err
            if isinstance(step, Retry):
                log.info("%s %s failed with %d (%s); retrying in %.2fs", ex.request_id, target.label, err.status,
                         err.error_type, step.wait)
                await trio.sleep(step.wait)
                continue
            log.info("%s %s failed with %d (%s); falling back", ex.request_id, target.label, err.status, err.error_type)
            self.metrics.fell_back(provider.name)
            return False

    def _pump(self, out: EventStream, deadlines: Deadlines, estimate: int, translator: Translator,
              provider: Provider) -> Pump:
        """A stream's pump with its keep-alive: the ping interval, and when (trio's clock) its message_start goes
        out unasked: keepalive_start after the request came in, retries and fallbacks included (a proxy in front
        counts from then); a stream that can reach that time waiting for its head is kept in ``heads``."""
        server = self.config.server
        if not server.keepalive:
            return Pump(out, deadlines, estimate, translator, watch=self.watch)
        start = server.keepalive_start if provider.keepalive_start is None else provider.keepalive_start
        start_at = deadlines.last_read - (time.perf_counter() - out.ex.started) + start  # (made just now)
        pump = Pump(out, deadlines, estimate, translator, server.keepalive, start_at, self.watch)
        if start_at < deadlines.first_byte.deadline:
            self.heads.add(pump, start)
        return pump

    async def _serve_from(self, conn: Connection, ex: Exchange, asked: Asked, target: routing.Target,
                          key: str | None = None) -> None:
        provider = target.provider
        fmt = registry.get(provider.format)
        stream = asked.stream
        try:  # (no ``with _reencoding_request()`` here: a generator context manager costs ~5k instructions)
            req, window = await self.known.fit(asked.req, provider, target.model, asked.estimate, ex.request_id)
            call = fmt.build(req, provider, target.model, stream, asked.incoming)
        except orjson.JSONEncodeError as exc:
            err = _too_deep(exc)
            err.refusal = True
            raise err from None
        except RelayError as err:
            err.refusal = True  # relay's own answer: the upstream never saw this request
            raise
        if call.dropped and log.isEnabledFor(logging.DEBUG):
            log.debug("%s dropped on purpose: %s", ex.request_id, ", ".join(sorted(call.dropped)))
        max_tokens = req.get("max_tokens")
        stops = req.get("stop_sequences")
        stops = tuple(x for x in stops if isinstance(x, str)) if isinstance(stops, list) else ()
        opts = Options(ex.model, provider, stops, asked.estimate, window,
                       max_tokens if isinstance(max_tokens, int) else None)
        deadlines = Deadlines(provider, stream)
        out = EventStream(conn, ex)
        translator = fmt.stream_translator(opts) if stream else None
        pump = self._pump(out, deadlines, asked.estimate, translator, provider) if translator else None
        streamed: RelayError | None = None
        try:
            with deadlines.first_byte:
                async with self.upstreams.request(provider, call.path, call.body, stream=stream, extra_headers=call.headers,
                                                  key=key, model=target.model, timed_reads=not stream) as upstream:
                    if pump is not None and not upstream.content_type.startswith(b"application/json"):
                        streamed = await pump.run(upstream, self.metrics)
                        if streamed is None:
                            return
                    else:
                        if pump is not None:
                            await pump.end_head_watch()
                        data = await upstream.read(64 * 1024 * 1024)
            if pump is not None:
                await pump.end_head_watch()
                if pump.gone:  # the client left while the upstream was still to answer
                    return
            if streamed is None:
                if deadlines.first_byte.cancelled_caught:
                    raise deadlines.missed_first_byte()
                ex.ttfb = time.perf_counter()
                try:
                    doc = orjson.loads(data)
                except orjson.JSONDecodeError:
                    raise RelayError(502, f"{provider.name}: the upstream answered with invalid JSON", "api_error") from None
                message = fmt.translate_response(doc, opts)
        except RelayError as err:  # an upstream's overflow in Anthropic's words
            err = opts.overflow(err)
            if pump is not None:
                await pump.end_head_watch()
                if out.started:  # message_start went out early: the error is an event now
                    await pump.fail(err)
            raise err from None
        if streamed is not None:  # the translator's own error is in Anthropic's words already; an empty stream is not
            raise streamed if translator is not None and streamed is translator.error else opts.overflow(streamed)
        ex.input_tokens = message["usage"]["input_tokens"] + message["usage"].get("cache_read_input_tokens", 0)
        ex.output_tokens = message["usage"]["output_tokens"]
        ex.cache_read = message["usage"].get("cache_read_input_tokens", 0)
        ex.cache_write = message["usage"].get("cache_creation_input_tokens", 0)
        try:
            if stream:  # the upstream ignored stream=true and answered in one piece: replay it as events
                answer = A.events_from_message(message, out.started)
            else:
                answer = orjson.dumps(message)
        except orjson.JSONEncodeError as exc:  # read at 1024 levels, written at 255 at most: the upstream's doing
            _only_nesting(exc)
            raise RelayError(502, f"{provider.name}: the upstream's answer nests too deeply for relay to pass on (at"
                                  " most 255 levels)", "api_error") from None
        if stream:
            await out.write(answer)
            await out.end()
            return
        await send_body(conn, ex, 200, answer)


def _require(method: str, allowed: str, path: str) -> None:
    if method != allowed:
        raise RelayError(405, f"{method} is not allowed on {path}; use {allowed}", "invalid_request_error")


@contextmanager
def _reencoding_request() -> Iterator[None]:
    """Around relay writing the client's request again (for an upstream): see ``_too_deep``."""
    try:
        yield
    except orjson.JSONEncodeError as exc:
        raise _too_deep(exc) from None


def _too_deep(exc: orjson.JSONEncodeError) -> RelayError:
    """orjson reads 1024 levels of nesting but writes only 255, so a request deeper than that fails when relay
    writes it again, and that is the client's to fix."""
    _only_nesting(exc)
    return invalid("request JSON nests too deeply (at most 255 levels)")


def _only_nesting(exc: orjson.JSONEncodeError) -> None:
    """Raises ``exc`` again unless it is orjson's nesting limit: any other encode error, here or anywhere, is
    relay's own bug and is not reported as the client's or the upstream's."""
    if "recursion" not in str(exc).lower():
        raise exc


def _parse(body: bytes) -> dict[str, Any]:
    """A request body as a JSON object, or the Anthropic-format 400."""
    return _parse_reusing(body, None, "")[0]


def _parse_reusing(body: bytes, histories: Histories | None, client: str) -> tuple[dict[str, Any], Reuse | None]:
    """As ``_parse``; with ``histories`` (a /v1/messages body), only what it adds to a kept request of
    ``client``'s is read."""
    if not body:
        raise invalid("request body is empty; expected a JSON object")
    try:
        req, reuse = _read(body, histories, client)
    except orjson.JSONDecodeError as exc:
        raise invalid(f"request body is not valid JSON: {exc}") from None
    if not isinstance(req, dict):
        raise invalid("request body must be a JSON object")
    return req, reuse


def _read(body: bytes, histories: Histories | None, client: str) -> tuple[Any, Reuse | None]:
    if histories is None:
        return orjson.loads(body), None
    try:
        return histories.parse(client, body)
    except orjson.JSONDecodeError:
        raise  # the body's own error
    except Exception:  # a fault in the reuse: the request is read whole, as without it
        log.exception("reading the request with the conversation's history failed; reading it whole")
        return orjson.loads(body), None


def _reuse_port_listener(host: str, port: int) -> trio.SocketListener:
    """A listener that shares its port with the other workers (SO_REUSEPORT): the kernel spreads new
    connections across them."""
    sock = trio.socket.from_stdlib_socket(transport.reuse_port_socket(host, port))
    sock.listen(4096)
    return trio.SocketListener(sock)
