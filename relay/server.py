"""The trio + h11 server: connection loop, limits, dispatch, and the two data paths.

Nothing format-specific happens here beyond choosing the translator: bodies are parsed once and handed to
``formats``; upstream bytes are fed to a translator and whatever it returns is written at once.
"""

from __future__ import annotations

import logging
import random
import re
import time
from dataclasses import dataclass, field
from typing import Any

import h11
import httpcore
import orjson
import trio

from relay import routing, tokens, transport
from relay.auth import OPEN, Keys, is_loopback, may_call, permitted
from relay.config import ClientKey, Config
from relay.usage import UsageBook, default_path
from relay.context import fit_max_tokens, fit_reason
from relay.errors import RelayError, empty_stream, invalid
from relay.formats import anthropic as A
from relay.formats import registry
from relay.formats.base import ClientRequest, Options, Translator
from relay.log import access_line, printable
from relay.metrics import Metrics
from relay.resources import connection_budget
from relay.upstream import Upstreams

log = logging.getLogger("relay.server")

READ_SIZE = 65536
USAGE_FLUSH_SECONDS = 5.0
DRAIN_SECONDS = 2.0
DRAIN_BYTES = 1024 * 1024
RETRYABLE = {408, 429, 500, 502, 503, 504, 529}
HEALTH_PATHS = {"/", "/health", "/api/hello", "/healthz"}
SERVER_HEADER = (b"server", b"relay")


@dataclass
class Exchange:
    """What the access log needs to know about one request."""

    method: str
    path: str
    route: str = "other"  # the route dispatch matched: what /metrics labels, never the raw path
    started: float = field(default_factory=time.perf_counter)
    status: int = 0
    model: str = ""
    target: str = ""
    stream: bool | None = None
    ttfb: float | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    usage_estimated: bool = False  # the upstream reported no usage: the tokens are relay's estimates
    request_id: str = field(default_factory=A.request_id)
    note: str = ""
    client: ClientKey | None = None
    estimate: int = 0  # relay's estimate of the request's input tokens
    first_byte: trio.CancelScope | None = None  # the first-byte deadline of the current upstream attempt
    last_read: float = 0.0  # trio time of the last upstream chunk (the pump's idle-gap timer reads it)
    incoming: ClientRequest | None = None  # the request as sent, for formats that forward it (anthropic)


class ClientGone(Exception):
    pass


class Connection:
    """One client connection: an h11 state machine and the socket it reads and writes."""

    def __init__(self, stream: trio.SocketStream, max_header_bytes: int) -> None:
        self.stream = transport.ClientSocket(stream)
        try:
            self.peer_loopback = is_loopback(stream.socket.getpeername()[0])
        except (OSError, IndexError, TypeError):  # a peer already gone, or a socket without an address
            self.peer_loopback = False
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=max_header_bytes)
        self.chunked = False  # the response being written uses chunked framing (relay may frame chunks itself)
        self.head_scope: trio.CancelScope | None = None  # the idle wait, until a request's first bytes arrive
        self.head_timeout = 0.0

    async def next_event(self) -> Any:
        while True:
            event = self.h11.next_event()
            if event is h11.NEED_DATA:
                try:
                    data = await self.stream.receive_some(READ_SIZE)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    data = b""
                if data and self.head_scope is not None:
                    self._idle_ended()
                self.h11.receive_data(data)
                continue
            return event

    def _idle_ended(self) -> None:
        """A request has started arriving: it now has header_timeout to finish, not the idle allowance."""
        scope, self.head_scope = self.head_scope, None
        if scope is not None:
            scope.deadline = min(scope.deadline, trio.current_time() + self.head_timeout)

    async def send(self, *events: Any) -> None:
        data = b"".join(self.h11.send(e) or b"" for e in events)
        if data:
            try:
                await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise ClientGone() from exc


def _headers(content_type: bytes, request_id: str, extra: list[tuple[bytes, bytes]] | None = None) -> list[tuple[bytes, bytes]]:
    return [(b"content-type", content_type), (b"request-id", request_id.encode()), SERVER_HEADER, *(extra or [])]


class Server:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.upstreams = Upstreams(config)
        self.metrics = Metrics(routing.configured_names(config))
        self._retired: list[Upstreams] = []
        self._auth = Keys(config)
        path = config.server.usage_db
        self.usage = UsageBook(default_path() if path is None else path) if path != "" else None
        self._accepting = trio.CancelScope()
        self._flushing = trio.CancelScope()
        self._flush_lock = trio.Lock()
        self._idle: set[trio.CancelScope] = set()
        self._drain_deadline = float("inf")
        self._open = 0
        self.max_open = connection_budget(config.server.max_connections)
        self.draining = False

    # ---- listening --------------------------------------------------------------------------

    async def serve(self, host: str | None = None, port: int | None = None, *, reuse_port: bool = False,
                    task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Accept until drained, then let open requests finish (up to the drain deadline) and return."""
        host = host or self.config.server.host
        port = self.config.server.port if port is None else port
        listeners = [await _reuse_port_listener(host, port)] if reuse_port else await trio.open_tcp_listeners(port, host=host)
        bound = listeners[0].socket.getsockname()[1]
        log.info("listening on http://%s:%d (config: %s)", host, bound, self.config.source)
        if self.max_open < self.config.server.max_connections:
            log.warning("max_connections %d lowered to %d to fit the open-file limit (raise it: ulimit -n, or LimitNOFILE"
                        " in a systemd unit)", self.config.server.max_connections, self.max_open)
        try:
            async with trio.open_nursery() as connections:
                if self.usage is not None:
                    connections.start_soon(self._flush_usage_forever)
                with self._accepting:
                    task_status.started(bound)
                    await trio.serve_listeners(self.handle, listeners, handler_nursery=connections)
                for listener in listeners:
                    await listener.aclose()
                connections.cancel_scope.deadline = self._drain_deadline
        finally:
            with trio.CancelScope(shield=True):
                await self.flush_usage()
                for upstreams in (self.upstreams, *self._retired):
                    await upstreams.aclose()

    async def flush_usage(self) -> None:
        if self.usage is None:
            return
        async with self._flush_lock:  # one writer at a time: a flush returns only when everything is on disk
            rows = self.usage.take()
            if rows:
                try:
                    await trio.to_thread.run_sync(self.usage.write, rows)
                except Exception as exc:  # a full disk must not take the gateway down
                    log.warning("could not write usage to %s: %s", self.usage.path, exc)

    async def _flush_usage_forever(self) -> None:
        with self._flushing:  # drain() cancels this, so shutdown never waits out a sleep
            while True:
                await trio.sleep(USAGE_FLUSH_SECONDS)
                await self.flush_usage()

    def drain(self, grace: float | None = None) -> None:
        """Stop accepting; idle keep-alive connections close now, busy ones when their response is done."""
        grace = self.config.server.shutdown_grace if grace is None else grace
        self.draining = True
        self._drain_deadline = trio.current_time() + grace
        self._accepting.cancel()
        self._flushing.cancel()
        for scope in list(self._idle):
            scope.cancel()
        log.info("draining: no new connections; open requests have %gs to finish", grace)

    def reload(self, config: Config) -> None:
        """New config for new requests; requests in flight keep the upstream pools they started with."""
        if (config.server.host, config.server.port) != (self.config.server.host, self.config.server.port):
            log.warning("reload: host/port changes take effect on restart only")
        self._retired.append(self.upstreams)
        self.config = config
        self.upstreams = Upstreams(config)
        self._auth = Keys(config)
        self.max_open = connection_budget(config.server.max_connections)
        self.metrics.configured = frozenset(routing.configured_names(config))
        log.info("reloaded config from %s", config.source)

    async def handle(self, stream: trio.SocketStream) -> None:
        if self._open >= self.max_open:
            await _send_raw(stream, RelayError(529, "relay is at its connection limit; retry shortly", "overloaded_error"))
            await stream.aclose()
            return
        self._open += 1
        conn = Connection(stream, self.config.server.max_header_bytes)
        try:
            await self._connection_loop(conn)
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

    async def _connection_loop(self, conn: Connection) -> None:
        server = self.config.server
        while True:
            # wait for the next request on a keep-alive connection, but not forever
            event: Any = None
            if self.draining:
                return
            with trio.move_on_after(server.idle_timeout) as idle:
                self._idle.add(idle)
                conn.head_scope, conn.head_timeout = idle, server.header_timeout  # first byte: the head's clock starts
                try:
                    event = await conn.next_event()
                except h11.RemoteProtocolError as exc:
                    await self._protocol_error(conn, exc)
                    return
                finally:
                    self._idle.discard(idle)
                    conn.head_scope = None
            if idle.cancelled_caught and conn.h11.trailing_data[0] and not self.draining:
                await _send_raw(conn.stream, RelayError(408, f"request head not received within {server.header_timeout:g}s",
                                                        "invalid_request_error"))
                return
            if not isinstance(event, h11.Request):
                return
            request = event
            if _head_size(request) > server.max_header_bytes:  # h11 checks only heads still incomplete in a read
                await _send_raw(conn.stream, RelayError(431, f"request head larger than {server.max_header_bytes} bytes",
                                                        "invalid_request_error"))
                return
            ex = Exchange(request.method.decode("latin-1"), request.target.decode("latin-1"))
            try:
                with trio.fail_after(server.header_timeout):
                    body = await self._read_body(conn, request)
            except trio.TooSlowError:
                await self._error(conn, ex, RelayError(408, f"request not received within {server.header_timeout:g}s", "invalid_request_error"), close=True)
                return
            except h11.RemoteProtocolError as exc:
                await self._protocol_error(conn, exc)
                return
            except RelayError as err:  # body too large: the rest of it is never read, so close
                await self._error(conn, ex, err, close=True)
                return
            await self._dispatch(conn, ex, request, body)
            now = time.perf_counter()
            self.metrics.request_done(
                ex.route, ex.target.split("/", 1)[0], ex.model, ex.status, now - ex.started,
                None if ex.ttfb is None else ex.ttfb - ex.started, ex.input_tokens, ex.output_tokens)
            if self.usage is not None and ex.client is not None and ex.model and ex.status == 200:
                self.usage.add(ex.client.name, printable(ex.model), ex.input_tokens, ex.output_tokens,
                               ex.usage_estimated)
            access_line(
                ex.method, ex.path, ex.status, model=ex.model, target=ex.target, stream=ex.stream,
                ttfb_ms=None if ex.ttfb is None else (ex.ttfb - ex.started) * 1000,
                duration_ms=(time.perf_counter() - ex.started) * 1000,
                input_tokens=ex.input_tokens, output_tokens=ex.output_tokens, usage_estimated=ex.usage_estimated,
                request_id=ex.request_id, note=ex.note,
            )
            if conn.h11.our_state is h11.MUST_CLOSE or conn.h11.their_state is h11.MUST_CLOSE:
                return
            try:
                conn.h11.start_next_cycle()
            except h11.LocalProtocolError:
                return
            if conn.h11.trailing_data[0]:  # pipelined: answered without a read, so let other connections run first
                await trio.lowlevel.checkpoint()

    async def _read_body(self, conn: Connection, request: h11.Request) -> bytes:
        limit = self.config.server.body_limit
        for name, value in request.headers:
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                raise RelayError(413, f"request body is {int(value)} bytes; the limit is {limit}", "request_too_large")
        parts: list[bytes] = []
        size = 0
        while True:
            event = await conn.next_event()
            if isinstance(event, h11.Data):
                size += len(event.data)
                if size > limit:
                    raise RelayError(413, f"request body exceeds the limit of {limit} bytes", "request_too_large")
                parts.append(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return b"".join(parts)
            elif isinstance(event, h11.ConnectionClosed):
                raise ClientGone()

    # ---- responses --------------------------------------------------------------------------

    async def _protocol_error(self, conn: Connection, exc: h11.RemoteProtocolError) -> None:
        """A request h11 cannot parse: answer with a raw 400/431 (h11's state is spent) and close."""
        status = exc.error_status_hint or 400
        if status >= 500:  # e.g. an unsupported Transfer-Encoding: the client's request is at fault, not relay
            status = 400
        if status == 431:
            message = f"request head larger than {self.config.server.max_header_bytes} bytes"
        else:  # h11 quotes the bytes it refused as Python reprs: bytearray(b'...')
            message = "malformed HTTP request: " + re.sub(r"bytearray\(b(['\"])(.*?)\1\)", r"\2", str(exc))
        await _send_raw(conn.stream, RelayError(status, message,
                                                "request_too_large" if status == 413 else "invalid_request_error"))

    async def _json(self, conn: Connection, ex: Exchange, status: int, body: bytes, *, head_only: bool = False,
                    extra: list[tuple[bytes, bytes]] | None = None, close: bool = False) -> None:
        ex.status = status
        headers = _headers(b"application/json", ex.request_id, extra)
        headers.append((b"content-length", str(len(body)).encode()))
        if close:
            headers.append((b"connection", b"close"))
        events: list[Any] = [h11.Response(status_code=status, headers=headers, reason=_reason(status).encode())]
        if not head_only and ex.method != "HEAD":
            events.append(h11.Data(data=body))
        events.append(h11.EndOfMessage())
        await conn.send(*events)

    async def _error(self, conn: Connection, ex: Exchange, err: RelayError, *, close: bool = False, head_only: bool = False) -> None:
        ex.note = (ex.note + " " if ex.note else "") + f"error={err.error_type}"
        if err.status >= 500:
            log.warning("%s %s -> %d %s: %s", ex.method, ex.path, err.status, err.error_type, err.message)
        await self._json(conn, ex, err.status, err.body(ex.request_id), extra=err.headers, close=close, head_only=head_only)

    # ---- dispatch ---------------------------------------------------------------------------

    async def _dispatch(self, conn: Connection, ex: Exchange, request: h11.Request, body: bytes) -> None:
        path = ex.path.split("?", 1)[0]
        method = ex.method
        try:
            if path in HEALTH_PATHS:
                ex.route = path
                if method not in ("GET", "HEAD"):
                    raise RelayError(405, f"{method} is not allowed on {path}", "invalid_request_error")
                await self._json(conn, ex, 200, b'{"status":"ok"}', head_only=method == "HEAD")
                return
            if path == "/metrics":
                ex.route = path
                self._auth.check_metrics(request.headers, conn.peer_loopback)
                self._require(method, "GET", path)
                await self._metrics(conn, ex)
                return
            if not path.startswith("/v1/"):
                raise RelayError(404, f"no route for {method} {path}", "not_found_error")
            if path in ("/v1/messages", "/v1/messages/count_tokens", "/v1/models"):
                ex.route = path
            elif path.startswith("/v1/models/"):
                ex.route = "/v1/models/{id}"
            ex.client = self._auth.client(request.headers)
            if path == "/v1/messages":
                self._require(method, "POST", path)
                await self._messages(conn, ex, body, request.headers)
            elif path == "/v1/messages/count_tokens":
                self._require(method, "POST", path)
                req = self._parse(body)
                count = await self._count_tokens(req, ClientRequest(body, req, tuple(request.headers)), ex.client)
                await self._json(conn, ex, 200, orjson.dumps({"input_tokens": count}))
            elif path == "/v1/models":
                self._require(method, "GET", path)
                await self._json(conn, ex, 200, orjson.dumps(self._models(ex.client)))
            elif path.startswith("/v1/models/"):
                self._require(method, "GET", path)
                wanted = path[len("/v1/models/"):]
                await self._json(conn, ex, 200, orjson.dumps(await self._model_entry(wanted, ex.client)))
            else:
                raise RelayError(404, f"no route for {method} {path}", "not_found_error")
        except RelayError as err:
            await self._error(conn, ex, err, head_only=method == "HEAD")
        except orjson.JSONEncodeError:  # orjson reads 1024 levels of nesting but writes only 255
            if ex.status == 0:
                await self._error(conn, ex, invalid("request JSON nests too deeply (at most 255 levels)"))

    async def _metrics(self, conn: Connection, ex: Exchange) -> None:
        ex.status = 200
        body = self.metrics.render()
        headers = _headers(b"text/plain; version=0.0.4", ex.request_id, [(b"content-length", str(len(body)).encode())])
        await conn.send(h11.Response(status_code=200, headers=headers), h11.Data(data=body), h11.EndOfMessage())

    @staticmethod
    def _require(method: str, allowed: str, path: str) -> None:
        if method != allowed:
            raise RelayError(405, f"{method} is not allowed on {path}; use {allowed}", "invalid_request_error")

    @staticmethod
    def _parse(body: bytes) -> dict[str, Any]:
        if not body:
            raise invalid("request body is empty; expected a JSON object")
        try:
            req = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise invalid(f"request body is not valid JSON: {exc}") from None
        if not isinstance(req, dict):
            raise invalid("request body must be a JSON object")
        return req

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
            window = target.provider.limits_for(target.model).context_window
            data.append(self._entry(mid, target, window or self.upstreams.known_window(target.provider, target.model)))
        return {"data": data, "has_more": False, "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None}

    async def _model_entry(self, mid: str, client: ClientKey) -> dict[str, Any]:
        """Any id relay can route for this key, with its window (asking a local server for it, once); one out
        of the key's scope is as unknown to it as one relay cannot route."""
        target = routing.resolve(self.config, mid)[0]
        if not may_call(client, target):
            raise RelayError(404, f"model: {mid!r} is not available to this key", "not_found_error")
        return self._entry(mid, target, await self.window_of(target))

    # ---- POST /v1/messages ------------------------------------------------------------------

    async def _messages(self, conn: Connection, ex: Exchange, body: bytes, headers: Any = ()) -> None:
        req = self._parse(body)
        ex.incoming = ClientRequest(body, req, tuple(headers))
        model = req.get("model")
        if not isinstance(model, str) or not model:
            raise invalid("model: Field required")
        ex.model = model
        limits = self.config.server
        for field_name, limit in (("messages", limits.max_messages), ("tools", limits.max_tools)):
            value = req.get(field_name)
            if isinstance(value, list) and len(value) > limit:
                raise RelayError(413, f"{field_name}: {len(value)} items; relay accepts at most {limit}", "request_too_large")
        stream = req.get("stream") is True
        ex.stream = stream
        override, req = routing.take_model_tag(req)  # a sub-agent's <relay-model> choice
        ex.estimate = tokens.estimate(req)
        targets = permitted(ex.client or OPEN, model, routing.resolve(self.config, override or model, req, ex.estimate))
        failures: list[str] = []
        try:
            for number, target in enumerate(targets, 1):
                last = number == len(targets)
                health = self.upstreams.health_of(target.provider)
                if not last and not health.available(trio.current_time()):
                    failures.append(f"{target.label}:circuit-open")
                    continue
                if await self._try_target(conn, ex, req, target, stream, health, failures, last):
                    return
        finally:
            if failures:
                ex.note = ("failed=" + ",".join(failures) + " " + ex.note).strip()

    async def _try_target(self, conn: Connection, ex: Exchange, req: dict[str, Any], target: routing.Target,
                          stream: bool, health: Any, failures: list[str], last: bool) -> bool:
        """Attempts on one target: True when served; False to fall back; raises what the client must see."""
        provider = target.provider
        attempt = 0
        capped = False  # retried once already with the output cap the upstream stated
        while True:
            key = health.pick_key(trio.current_time())
            ex.target = target.label
            try:
                await self._serve_from(conn, ex, req, target, stream, key)
                health.succeeded()
                return True
            except BaseException as exc:
                if not isinstance(exc, RelayError):
                    health.abandoned()  # the client left or a bug: no verdict on the upstream, but free the probe
                    raise
                err = exc
                if err.refusal:  # relay's own answer: no upstream attempt to count, retry or fall back from
                    health.abandoned()
                    raise
                now = trio.current_time()
                retry_after = _retry_after(err)
                self.metrics.upstream_failed(provider.name, err.status)
                if err.status in (401, 403, 429):
                    health.key_refused(key, err.status, now, retry_after)
                    health.abandoned()
                elif err.status >= 500:
                    health.failed(now)
                else:
                    health.abandoned()
                if ex.status != 0:  # bytes reached the client: nothing can be retried
                    raise
                if err.output_cap and not capped and self.upstreams.learn_output_cap(provider, target.model, err.output_cap):
                    capped = True  # at once, with the cap it stated: the same request would fail the same way
                    failures.append(f"{target.label}:{err.status}")
                    continue
                rotated = err.status in (401, 403, 429) and health.has_fresh_key(now)
                if err.status not in RETRYABLE and not rotated:
                    raise
                failures.append(f"{target.label}:{err.status}")
                attempt += 1 if not err.empty else provider.retries + 1  # the same request gets the same empty answer
                wait = 0.0 if rotated else min(retry_after if retry_after is not None else 0.25 * 2 ** attempt * random.uniform(0.5, 1.0), 1e9)
                if attempt <= provider.retries and wait <= provider.max_retry_wait:
                    log.info("%s %s failed with %d (%s); retrying in %.2fs", ex.request_id, target.label, err.status, err.error_type, wait)
                    await trio.sleep(wait)
                    continue
                if last:
                    raise
                log.info("%s %s failed with %d (%s); falling back", ex.request_id, target.label, err.status, err.error_type)
                self.metrics.fell_back(provider.name)
                return False

    async def _serve_from(self, conn: Connection, ex: Exchange, req: dict[str, Any], target: routing.Target, stream: bool,
                          key: str | None = None) -> None:
        provider = target.provider
        fmt = registry.get(provider.format)
        estimate = ex.estimate
        try:
            req, window = await self._fit_context(ex, req, target, estimate)
            call = fmt.build(req, provider, target.model, stream, ex.incoming)
        except RelayError as err:
            err.refusal = True  # relay's own answer: the upstream never saw this request
            raise
        if call.dropped and log.isEnabledFor(logging.DEBUG):
            log.debug("%s dropped on purpose: %s", ex.request_id, ", ".join(sorted(call.dropped)))
        max_tokens = req.get("max_tokens")
        stops = req.get("stop_sequences")
        stops = tuple(x for x in stops if isinstance(x, str)) if isinstance(stops, list) else ()
        opts = Options(ex.model, provider, stops, estimate, window,
                       max_tokens if isinstance(max_tokens, int) else None)
        # A stream must start within first_byte_timeout, and its head within read_timeout (the pump lifts this
        # deadline at the first upstream chunk, then times the gaps between chunks itself).
        first_wait = min(provider.first_byte_timeout, provider.read_timeout)
        first_byte = ex.first_byte = trio.CancelScope(
            deadline=trio.current_time() + first_wait if stream else float("inf"))
        try:
            with first_byte:
                async with self.upstreams.request(provider, call.path, call.body, stream=stream, extra_headers=call.headers,
                                                  key=key, model=target.model, timed_reads=not stream) as upstream:
                    if stream and not upstream.content_type.startswith(b"application/json"):
                        await self._pump(conn, ex, upstream, fmt.stream_translator(opts), provider.read_timeout)
                        return
                    data = await upstream.read(64 * 1024 * 1024)
            if first_byte.cancelled_caught:
                if provider.read_timeout < provider.first_byte_timeout:
                    raise RelayError(504, f"{provider.name}: the upstream sent nothing for {first_wait:g}s", "api_error")
                raise RelayError(504, f"{provider.name}: no first byte within {first_wait:g}s", "api_error")
            ex.ttfb = time.perf_counter()
            try:
                doc = orjson.loads(data)
            except orjson.JSONDecodeError:
                raise RelayError(502, f"{provider.name}: the upstream answered with invalid JSON", "api_error") from None
            message = fmt.translate_response(doc, opts)
        except RelayError as err:
            raise opts.overflow(err) from None
        ex.input_tokens = message["usage"]["input_tokens"] + message["usage"].get("cache_read_input_tokens", 0)
        ex.output_tokens = message["usage"]["output_tokens"]
        if stream:  # the upstream ignored stream=true and answered in one piece: replay it as events
            await self._sse_head(conn, ex, A.events_from_message(message))
            await conn.send(h11.EndOfMessage())
            return
        await self._json(conn, ex, 200, orjson.dumps(message))

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

    async def window_of(self, target: routing.Target) -> int | None:
        window = target.provider.limits_for(target.model).context_window
        if window is None and target.provider.discover_context:
            window = await self.upstreams.discover_window(target.provider, target.model)
        return window

    async def _fit_context(self, ex: Exchange, req: dict[str, Any], target: routing.Target,
                           estimate: int) -> tuple[dict[str, Any], int | None]:
        """Lower max_tokens to what the model's window has room for; refuse, as Anthropic does, what cannot fit."""
        max_tokens = req.get("max_tokens")
        max_output = self.upstreams.max_output(target.provider, target.model)
        window = await self.window_of(target)
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1 or not (window or max_output):
            return req, window
        fitted = fit_max_tokens(estimate, max_tokens, window, max_output)
        if fitted == max_tokens:
            return req, window
        log.info("%s max_tokens %d -> %d for %s: %s", ex.request_id, max_tokens, fitted, target.label,
                 fit_reason(estimate, max_tokens, fitted, window, max_output))
        return {**req, "max_tokens": fitted}, window

    async def _sse_head(self, conn: Connection, ex: Exchange, first: bytes) -> None:
        ex.status = 200
        ex.ttfb = ex.ttfb or time.perf_counter()
        headers = _headers(b"text/event-stream; charset=utf-8", ex.request_id, [(b"cache-control", b"no-cache")])
        await conn.send(h11.Response(status_code=200, headers=headers, reason=b"OK"), h11.Data(data=first))
        conn.chunked = conn.h11.their_http_version == b"1.1"  # h11 chose chunked framing for this response

    async def _pump(self, conn: Connection, ex: Exchange, upstream: Any, translator: Translator, idle: float) -> None:
        """Upstream chunks -> translator -> client, in one task, while a watcher cancels it all when the client
        goes away. Every upstream chunk is translated the moment it arrives; what one upstream read delivered
        leaves in one client write, made when httpcore asks the network for more (the transport's
        ``before_read`` hook), so nothing ever waits for a later read. ``idle``: the provider's read_timeout,
        the longest upstream silence allowed between chunks."""
        gone = False
        flushing = False
        pending: list[bytes] = []

        async def flush() -> None:
            nonlocal flushing
            if pending:
                data = pending[0] if len(pending) == 1 else b"".join(pending)
                pending.clear()
                flushing = True
                await self._write_sse(conn, ex, data)
                flushing = False
                ex.last_read = trio.current_time()  # the idle timer counts upstream silence, not a slow client

        reading = trio.CancelScope()

        async def watch_client(cancel: trio.CancelScope) -> None:
            """Also the idle-gap timer: cheaper here, waking once per read_timeout, than a cancel scope
            around every upstream read."""
            nonlocal gone
            while True:
                with trio.move_on_at(ex.last_read + idle) as waiting:
                    try:
                        data = await conn.stream.receive_some(READ_SIZE)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        data = b""
                if waiting.cancelled_caught:
                    if trio.current_time() < ex.last_read + idle:
                        continue
                    if flushing:  # the client took nothing for read_timeout: a write cut midway cannot be
                        gone = True  # finished with an error event, so the connection is simply closed
                        ex.note = "client stopped reading"
                        cancel.cancel()
                    else:
                        reading.cancel()
                    return
                if not data:
                    gone = True
                    cancel.cancel()
                    return
                conn.h11.receive_data(data)  # a pipelined next request: h11 keeps it for later

        network = upstream.network_stream
        hooked = hasattr(network, "before_read")
        error: RelayError | None = None
        self.metrics.open_streams += 1
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch_client, nursery.cancel_scope)
                if hooked:
                    network.before_read = flush
                try:
                    ex.last_read = trio.current_time()
                    error = await self._relay_chunks(ex, upstream, translator, pending, None if hooked else flush, reading)
                    await flush()
                except ClientGone:
                    gone = True
                finally:
                    if hooked:
                        network.before_read = None  # the connection goes back to the pool
                if not gone and error is None:
                    if ex.status == 0:  # nothing came out at all: never leave the client without an answer
                        error = empty_stream(ex.target)
                    else:
                        try:
                            await conn.send(h11.EndOfMessage())
                        except ClientGone:
                            gone = True
                nursery.cancel_scope.cancel()
            if not gone and error is None and translator.error is None:
                # after the watcher: a client that hangs up once it has its answer must not cost the connection
                await _drain(upstream)
        finally:
            self.metrics.open_streams -= 1
        if translator.has_usage:
            ex.input_tokens = translator.input_tokens + translator.cache_read
            ex.output_tokens = translator.output_tokens
        elif translator.usage_estimated:
            ex.input_tokens, ex.output_tokens, ex.usage_estimated = ex.estimate, translator.output_tokens, True
        if gone:
            ex.note = ex.note or "client disconnected"
        elif translator.error is not None and translator.started:
            ex.note = f"midstream error={translator.error.error_type}"
        if error is not None:
            raise error

    async def _relay_chunks(self, ex: Exchange, upstream: Any, translator: Translator, pending: list[bytes],
                            flush: Any, reading: trio.CancelScope) -> RelayError | None:
        """Feeds the translator; returns the error to answer with when the upstream failed before anything
        was produced. ``flush`` (when the transport has no read hook) writes after every chunk; ``reading``
        is cancelled by the idle-gap timer."""
        try:
            with reading:
                async for chunk in upstream.chunks():
                    ex.last_read = trio.current_time()
                    if ex.first_byte is not None:
                        ex.first_byte.deadline = float("inf")
                        ex.first_byte = None
                    out = translator.feed(chunk)
                    if out:
                        pending.append(out)
                    if translator.done:
                        break
                    if flush is not None:
                        await flush()
                else:
                    pending.append(translator.finish())
            if reading.cancelled_caught:
                raise httpcore.ReadTimeout("idle")
        except ClientGone:
            raise
        except (httpcore.TimeoutException, httpcore.NetworkError, httpcore.RemoteProtocolError) as exc:
            pending.append(translator.abort(_midstream(ex.target, exc)))
        except Exception:  # an upstream shape nobody anticipated (or a translator bug): a clean end, never a cut
            log.warning("%s %s: upstream data could not be translated", ex.request_id, ex.target, exc_info=True)
            err = RelayError(502, f"{ex.target}: the upstream sent data relay could not translate", "api_error")
            if translator.started and not translator.done:
                pending.append(err.sse())
            translator.error, translator.done = err, True
        if translator.error is not None and not translator.started:
            return translator.error
        return None

    async def _write_sse(self, conn: Connection, ex: Exchange, data: bytes) -> None:
        if not data:
            return
        if ex.status == 0:
            await self._sse_head(conn, ex, data)
        elif conn.chunked:  # the hot path: frame the chunk ourselves, one write, no h11 bookkeeping
            try:
                await transport.send_all(conn.stream.socket, b"%x\r\n%b\r\n" % (len(data), data))
            except OSError as exc:
                raise ClientGone() from exc
        else:
            await conn.send(h11.Data(data=data))


async def _drain(upstream: Any) -> None:
    """Read what is left of a finished stream (the [DONE] and the chunked terminator, usually already here),
    so the upstream connection goes back to the pool instead of being closed; give up quickly if it is not."""
    with trio.move_on_after(DRAIN_SECONDS):
        size = 0
        try:
            async for chunk in upstream.chunks():
                size += len(chunk)
                if size > DRAIN_BYTES:
                    return
        except (httpcore.TimeoutException, httpcore.NetworkError, httpcore.RemoteProtocolError):
            return  # the client already has its whole answer; this connection is simply not reused


async def _reuse_port_listener(host: str, port: int) -> trio.SocketListener:
    """A listening socket that shares its port with the other workers (SO_REUSEPORT): the kernel spreads
    new connections across them."""
    import socket as stdlib_socket

    info = await trio.socket.getaddrinfo(host, port, type=stdlib_socket.SOCK_STREAM)
    family, kind, proto, _, address = info[0]
    sock = trio.socket.socket(family, kind, proto)
    sock.setsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_REUSEADDR, 1)
    sock.setsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_REUSEPORT, 1)
    await sock.bind(address)
    sock.listen(4096)
    return trio.SocketListener(sock)


def _retry_after(err: RelayError) -> float | None:
    for name, value in err.headers:
        if name == b"retry-after":
            try:
                return max(0.0, float(value))
            except ValueError:
                return None
    return None


def _head_size(request: h11.Request) -> int:
    """The request head's size as sent, near enough: line, headers, line ends."""
    return len(request.target) + 16 + sum(len(name) + len(value) + 4 for name, value in request.headers)


async def _send_raw(stream: trio.SocketStream | transport.ClientSocket, err: RelayError) -> None:
    """An error response written outside h11 (its state is spent, or no h11 connection exists yet)."""
    body = err.body()
    head = (b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nrequest-id: %b\r\n"
            b"server: relay\r\nconnection: close\r\n\r\n"
            % (err.status, _reason(err.status).encode(), len(body), A.request_id().encode()))
    try:
        await stream.send_all(head + body)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


def _midstream(target: str, exc: Exception) -> RelayError:
    if isinstance(exc, httpcore.ReadTimeout):
        return RelayError(504, f"{target}: the upstream stopped sending mid-stream (read timeout)", "api_error")
    return RelayError(502, f"{target}: the upstream connection broke mid-stream ({type(exc).__name__})", "api_error")


_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 402: "Payment Required", 403: "Forbidden",
            404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout", 409: "Conflict",
            413: "Payload Too Large", 429: "Too Many Requests", 431: "Request Header Fields Too Large",
            500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout",
            529: "Overloaded"}


def _reason(status: int) -> str:
    return _REASONS.get(status, "Error")
