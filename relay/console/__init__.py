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
from urllib.parse import parse_qs

import orjson
import trio

from relay import pricing, routing
from relay.config import Provider
from relay.errors import RelayError
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


ROUTES = ("live", "providers", "resolve")


def answer(server: Server, method: str, path: str, query: str) -> bytes | None:
    """The console's own admin routes (``GET /admin/live|providers|resolve``); None for any other path."""
    name = path[len("/admin/"):]
    if name not in ROUTES:
        return None
    if method != "GET":
        raise RelayError(405, f"{method} is not allowed here; use GET", "invalid_request_error")
    args = parse_qs(query)
    now = time.time()
    if name == "live":
        try:
            after = int(args.get("after", ["0"])[0])
        except ValueError:
            raise RelayError(400, "after: expected an integer", "invalid_request_error") from None
        server.live.streams(now, server.metrics.open_streams)
        return orjson.dumps(server.live.snapshot(now, after) | {"streams_open": server.metrics.open_streams})
    if name == "providers":
        return orjson.dumps({"data": [_provider(server, p) for p in server.config.providers.values()]})
    model = args.get("model", [""])[0]
    if model:
        return orjson.dumps(_resolved(server, model))
    from relay.launcher import CLAUDE_CODE_MODELS

    return orjson.dumps({"tiers": [_resolved(server, m) for m in CLAUDE_CODE_MODELS],
                         "aliases": {a: list(t) for a, t in server.config.models.items()},
                         "routes": {r: list(t) for r, t in server.config.routes.items()}})


def _resolved(server: Server, model: str) -> dict[str, Any]:
    """A model id as ``relay check`` resolves it: with an empty request, so scenario routes that depend on the
    request's contents stay off."""
    try:
        targets = routing.resolve(server.config, model, {}, 0)
    except RelayError as exc:
        return {"model": model, "error": exc.message}
    return {"model": model, "targets": [
        {"target": t.label, "context_window": t.provider.limits_for(t.model).context_window} for t in targets]}


def _p50(server: Server, provider: str) -> float | None:
    """The median time to first byte from the /metrics histogram (its bucket's upper bound, in ms)."""
    histogram = server.metrics.ttfb.get((provider,))
    if histogram is None or not histogram.n:
        return None
    running = 0
    for bound, count in zip((*BUCKETS, float("inf")), histogram.counts):
        running += count
        if running * 2 >= histogram.n:
            return None if bound == float("inf") else bound * 1000
    return None


def _provider(server: Server, p: Provider) -> dict[str, Any]:
    """A provider as the page shows it: never a key, only how many there are and how many rest."""
    return {"name": p.name, "format": p.format, "base_url": p.base_url, "preset": p.preset, "keys": len(p.api_keys),
            "passthrough_models": p.passthrough_models, "source": "config",
            "health": server.healths.of(p).state(trio.current_time()),
            "ttfb_p50_ms": _p50(server, p.name),
            "models": [{"id": m, "context_window": p.limits_for(m).context_window,
                        "max_output": p.limits_for(m).max_output, "price": _price(p, m)} for m in p.models]}


def _price(p: Provider, model: str) -> dict[str, Any] | None:
    price = pricing.lookup(p.prices, model)
    return None if price is None else dict(vars(price))
