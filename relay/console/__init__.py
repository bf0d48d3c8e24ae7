"""The console (``/ui``): static files shipped in this package, and the admin routes only it needs.

The page is plain HTML, CSS and JavaScript (no build step, nothing from another origin) and talks to the admin
API alone. Its files are read once, on first use, into memory; a path is looked up by exact name, so nothing
outside ``static/`` can be named. The routes here read what lives in one process's memory (the live series,
provider health, routing), which the store-backed routes in ``admin.py`` do not.
"""

from __future__ import annotations

import time
from importlib import resources
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote

import orjson
import trio

from relay import pricing, routing
from relay.admin import shown_table, shown_url
from relay.formats import registry
from relay.formats.base import ClientRequest, Options
from relay.config import Provider, provider_choices
from relay.errors import RelayError
from relay.live import merged, quantile_bucket
from relay.metrics import BUCKETS

if TYPE_CHECKING:
    from relay.server import Server

TYPES = {".html": b"text/html; charset=utf-8", ".js": b"text/javascript; charset=utf-8",
         ".css": b"text/css; charset=utf-8", ".svg": b"image/svg+xml"}
# Every console answer: nothing runs but the page's own script files, nothing is fetched from elsewhere, no
# page may frame it, and no type is guessed.
HEADERS = [(b"content-security-policy", b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self';"
                                         b" connect-src 'self'; object-src 'none'; base-uri 'none';"
                                         b" form-action 'none'; frame-ancestors 'none'"),
           (b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
           (b"referrer-policy", b"no-referrer"), (b"cache-control", b"no-cache")]
_files: dict[str, tuple[bytes, bytes]] = {}


def _load() -> dict[str, tuple[bytes, bytes]]:
    if not _files:
        for entry in resources.files(__name__).joinpath("static").iterdir():
            suffix = "." + entry.name.rsplit(".", 1)[-1]
            if entry.is_file() and suffix in TYPES:
                _files[entry.name] = (entry.read_bytes(), TYPES[suffix])
    return _files


def asset(path: str) -> tuple[bytes, bytes]:
    """(body, content type) for ``/ui``, ``/ui/`` or ``/ui/NAME``; 404 for anything else."""
    name = path[len("/ui"):].lstrip("/") or "index.html"
    found = _load().get(name)
    if found is None:
        raise RelayError(404, f"no console file {name!r}", "not_found_error")
    return found


ROUTES = ("live", "resolve", "try")
TRY_PROMPT = "Say hello in five words."


async def answer(server: Server, method: str, path: str, query: str, body: bytes) -> bytes | None:
    """The console's own admin routes (``GET /admin/live|providers[/NAME]|resolve``, ``POST /admin/try``); None
    for any other path (writes to the stored providers are ``relay.admin``'s)."""
    name = path[len("/admin/"):]
    if name == "providers" or name.startswith("providers/"):
        if method != "GET" or name.count("/") > 1:
            return None
        return _providers(server, unquote(name.partition("/")[2]))
    if name not in ROUTES:
        return None
    if name == "try":
        if method != "POST":
            raise RelayError(405, f"{method} is not allowed here; use POST", "invalid_request_error")
        return orjson.dumps(await _try(server, body))
    if method != "GET":
        raise RelayError(405, f"{method} is not allowed here; use GET", "invalid_request_error")
    args = parse_qs(query)
    now = time.time()
    if name == "live":
        return orjson.dumps(await _live(server, now))
    model = args.get("model", [""])[0]
    if model:
        return orjson.dumps(_resolved(server, model))
    from relay.launcher import CLAUDE_CODE_MODELS

    return orjson.dumps({"tiers": [_resolved(server, m) for m in CLAUDE_CODE_MODELS],
                         "aliases": {a: list(t) for a, t in server.config.models.items()},
                         "routes": {r: list(t) for r, t in server.config.routes.items()}})


def _providers(server: Server, wanted: str) -> bytes:
    """Every provider (or the one named ``wanted``): the config file's and the stored ones, and the stored ones
    this instance left out, with why."""
    shown = [_provider(server, p) for p in server.config.providers.values() if not wanted or p.name == wanted]
    view = server.gateway.view
    if view is not None:
        shown += [{"name": n, "source": "store", "error": why, "table": shown_table(view.providers.get(n, {}))}
                  for n, why in server.gateway.left_out.items() if not wanted or n == wanted]
    if not wanted:
        return orjson.dumps({"data": shown, "choices": provider_choices()})
    if not shown:
        raise RelayError(404, f"no provider named {wanted!r}", "not_found_error")
    return orjson.dumps(shown[0])


async def _live(server: Server, now: float) -> dict[str, Any]:
    """The overview's figures for the whole gateway: this process's own, fresh, plus what the other instances
    (workers included) published through the store in the last seconds."""
    server.live.streams(now, server.metrics.open_streams)
    view = server.gateway.view
    others = [] if view is None else await view.others_live()
    mine = server.live.export(now, server.metrics.open_streams)
    exports: list[Any] = [mine]
    for doc in others:
        try:
            exports.append(orjson.loads(doc))
        except orjson.JSONDecodeError:
            exports.append(None)  # counted as unreadable
    whole, streams_open, unreadable = merged(now, exports)
    return whole.snapshot(now) | {"streams_open": streams_open, "instances": len(exports) - unreadable,
                                  "unreadable": unreadable,
                                  "store": None if view is None else ("up" if view.up else "down")}


def _resolved(server: Server, model: str) -> dict[str, Any]:
    """A model id as ``relay check`` resolves it: with an empty request, so scenario routes that depend on the
    request's contents stay off."""
    try:
        targets = routing.resolve(server.config, model, {}, 0)
    except RelayError as exc:
        return {"model": model, "error": exc.message}
    return {"model": model, "targets": [
        {"target": t.label, "context_window": t.provider.limits_for(t.model).context_window} for t in targets]}


async def _try(server: Server, body: bytes) -> dict[str, Any]:
    """The providers page's "try it": a tiny request straight to one ``provider/model`` (no route, no fallback, no
    retry), its answer and latency. Not booked as usage: it is the operator's, not a key's."""
    try:
        doc = orjson.loads(body or b"{}")
    except orjson.JSONDecodeError:
        raise RelayError(400, "request body is not valid JSON", "invalid_request_error") from None
    target = doc.get("target") if isinstance(doc, dict) else None
    name, _, model = target.partition("/") if isinstance(target, str) else ("", "", "")
    provider = server.config.providers.get(name)
    if provider is None or not model:
        raise RelayError(400, "target: expected PROVIDER/MODEL naming a configured provider", "invalid_request_error")
    req = {"model": model, "max_tokens": 32, "messages": [{"role": "user", "content": TRY_PROMPT}]}
    fmt = registry.get(provider.format)
    started = time.perf_counter()
    try:
        call = fmt.build(req, provider, model, False, ClientRequest(orjson.dumps(req), req, ()))
        async with server.upstreams.request(provider, call.path, call.body, stream=False, extra_headers=call.headers,
                                            model=model) as upstream:
            data = await upstream.read(1024 * 1024)
        message = fmt.translate_response(orjson.loads(data), Options(model, provider, max_tokens=32))
    except RelayError as exc:
        return {"target": target, "ok": False, "status": exc.status, "error": exc.message,
                "ms": round((time.perf_counter() - started) * 1000, 1)}
    except orjson.JSONDecodeError:
        return {"target": target, "ok": False, "status": 502, "error": "the upstream answered with invalid JSON",
                "ms": round((time.perf_counter() - started) * 1000, 1)}
    text = "".join(b.get("text", "") for b in message.get("content", []) if b.get("type") == "text")
    return {"target": target, "ok": True, "text": text, "usage": message.get("usage"),
            "ms": round((time.perf_counter() - started) * 1000, 1)}


def _p50(server: Server, provider: str) -> float | None:
    """The median time to first byte from the /metrics histogram (its bucket's upper bound, in ms)."""
    histogram = server.metrics.ttfb.get((provider,))
    i = None if histogram is None else quantile_bucket(histogram.counts, 0.5)
    return None if i is None or i >= len(BUCKETS) else BUCKETS[i] * 1000


def _provider(server: Server, p: Provider) -> dict[str, Any]:
    """A provider as the page shows it: never a key, only how many there are and how many rest; a stored one
    with its table (keys masked), for the custom models page to edit."""
    doc = {"name": p.name, "format": p.format, "base_url": shown_url(p.base_url), "preset": p.preset,
           "keys": len(p.api_keys), "passthrough_models": p.passthrough_models, "source": "config",
           "health": server.healths.of(p).state(trio.current_time()), "ttfb_p50_ms": _p50(server, p.name),
           "models": [{"id": m, "context_window": p.limits_for(m).context_window,
                       "max_output": p.limits_for(m).max_output, "price": _price(p, m)} for m in p.models]}
    view = server.gateway.view
    if p.name in server.config.stored and view is not None:
        doc |= {"source": "store", "table": shown_table(view.providers[p.name])}
    return doc


def _price(p: Provider, model: str) -> dict[str, Any] | None:
    price = pricing.lookup(p.prices, model)
    return None if price is None else dict(vars(price))
