"""The admin HTTP API under ``/admin/`` (admin keys only; the server checks them first): virtual keys, usage and
the store's state, as JSON. The console (``/ui``) is built on it and nothing else.

    GET    /admin/status                 this instance and its store: up, instances seen, rows held
    GET    /admin/keys                   every key (never a secret nor its digest)
    POST   /admin/keys                   {"name", "models", "rpm", "tpm", "max_streams", "budget",
                                          "budget_period", "expires"} -> 201 {"key": ..., "secret": "rk-..."}
    GET    /admin/keys/NAME              one key, with its spend in the current budget period
    PATCH  /admin/keys/NAME              any of the fields above (null clears a limit)
    DELETE /admin/keys/NAME              revokes it (kept, so its usage stays attributed)
    GET    /admin/usage[?since=DAY]      rows per key, model and day: requests, refused, tokens, cost
    POST   /admin/providers              {"name", ...a [providers.NAME] table's keys} -> 201: a provider of any
                                          format, checked as the config file's are, live on every instance
    PATCH  /admin/providers/NAME         keys to change (null removes one; an absent api_key stays)
    DELETE /admin/providers/NAME         removes a stored provider (the config file's are read-only)

``GET /admin/providers[/NAME]`` is the console's (``relay.console``): it shows health beside the stored tables.
"""

from __future__ import annotations

import os
import re
import time
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit, urlunsplit

import orjson

from relay.config import ConfigError, stored_provider
from relay.errors import RelayError, invalid
from relay.gateway import Gateway
from relay.limits import budget_counter
from relay.pricing import usd
from relay.log import printable
from relay.store import (KeyExists, NoSuchKey, StoreError, UsageRow, VirtualKey, change_key, create_key, key_fields,
                         provider_record, provider_table, update)


_VAR_ONLY = re.compile(r"^\$\{[A-Za-z_][A-Za-z0-9_]*\}$")  # a key named by the environment, not held


def _body(raw: bytes) -> dict[str, Any]:
    try:
        doc = orjson.loads(raw or b"{}")
    except orjson.JSONDecodeError as exc:
        raise invalid(f"request body is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise invalid("request body must be a JSON object")
    return doc


def _key_doc(gateway: Gateway, key: VirtualKey) -> dict[str, Any]:
    doc = key.public()
    view = gateway.view
    if view is not None and key.limits.budget_period:
        start, end = view.windows.span(key.limits.budget_period, time.time())
        spent = view.meter.counts(key.name).get(budget_counter(key.limits.budget_period, start), 0)
        doc["spend"] = {"period": key.limits.budget_period, "usd": usd(spent),
                        "resets_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(end))}
    doc["state"] = key.state(time.time())
    return doc


def _row(r: UsageRow) -> dict[str, Any]:
    doc: dict[str, Any] = dict(vars(r))
    doc["cost_usd"] = usd(doc.pop("cost_micros"))
    return doc


async def handle(gateway: Gateway, method: str, target: str, body: bytes) -> tuple[int, bytes]:
    """(status, JSON body) for one admin request; RelayError for the refusals."""
    path, _, query = target.partition("?")
    parts = [unquote(p) for p in path.split("/")[2:] if p]  # after /admin/
    view = gateway.view
    if parts == ["status"] and method == "GET":
        return 200, orjson.dumps(gateway.status())
    if view is None:
        raise RelayError(409, "the store is off ([server] usage_db = \"\"); set [store] url", "invalid_request_error")
    try:
        if parts == ["keys"]:
            if method == "GET":
                keys = await view.call(lambda backend: backend.load_keys())
                return 200, orjson.dumps({"data": [_key_doc(gateway, k) for k in keys]})
            if method == "POST":
                doc = _body(body)
                name = doc.pop("name", None)
                if not isinstance(name, str):
                    raise invalid("name: Field required")
                if any(k.name == name for k in gateway.config.keys):
                    raise RelayError(409, f"{name!r} names a key in the config file", "invalid_request_error")
                key, secret = create_key(name, doc, time.time())
                await view.call(lambda backend: backend.put_key(key, create=True))
                return 201, orjson.dumps({"key": _key_doc(gateway, key), "secret": secret})
            raise _method(method, "GET or POST")
        if len(parts) == 2 and parts[0] == "keys":
            name = parts[1]
            if method not in ("GET", "PATCH", "DELETE"):
                raise _method(method, "GET, PATCH or DELETE")
            changes = {"revoked": True} if method == "DELETE" else key_fields(_body(body)) if method == "PATCH" else {}

            async def change(backend: Any) -> VirtualKey:
                if not changes:
                    for k in await backend.load_keys():
                        if k.name == name:
                            return k
                    raise NoSuchKey(f"no key named {printable(name, 80)!r}")
                return await change_key(backend, name, changes)

            return 200, orjson.dumps(_key_doc(gateway, await view.call(change)))
        if parts and parts[0] == "providers" and len(parts) <= 2:
            return await _providers(gateway, method, parts[1:], body)
        if parts == ["usage"]:
            if method != "GET":
                raise _method(method, "GET")
            since = parse_qs(query).get("since", [None])[0]
            if since is not None:
                try:
                    time.strptime(since, "%Y-%m-%d")
                except ValueError:
                    raise invalid("since: expected YYYY-MM-DD") from None
            rows = await view.call(lambda backend: backend.usage(since))
            rows.sort(key=lambda r: (r.day, r.key, r.model))
            return 200, orjson.dumps({"data": [_row(r) for r in rows]})
    except ValueError as exc:
        raise invalid(str(exc)) from None
    except KeyExists as exc:
        raise RelayError(409, str(exc), "invalid_request_error") from None
    except NoSuchKey as exc:
        raise RelayError(404, str(exc), "not_found_error") from None
    except StoreError as exc:
        raise RelayError(503, str(exc), "api_error") from None
    raise RelayError(404, f"no admin route for {method} {path}", "not_found_error")


async def _providers(gateway: Gateway, method: str, name: list[str], body: bytes) -> tuple[int, bytes]:
    """Writes to the stored providers. Each is one record holding its table, checked by the config file's own
    parser before it is stored, then live here before the answer leaves (and on the other instances with
    their next round with the store)."""
    view = gateway.view
    assert view is not None
    if not name:
        if method != "POST":
            raise _method(method, "POST (GET too, answered with the providers' health)")
        table = _body(body)
        new = table.pop("name", None)
        if not isinstance(new, str):
            raise invalid("name: Field required")
        _not_the_files(gateway, new)
        _checked(gateway, new, table)
        await view.call(lambda backend: backend.put("providers", new, provider_record(table, time.time()), create=True))
        await view.refreshed()
        return 201, orjson.dumps(_answer(gateway, new, table))
    (target,) = name
    if method == "DELETE":
        try:  # a record the config file now shadows can still be removed
            await view.call(lambda backend: backend.put("providers", target, None, create=False))
        except NoSuchKey:
            if target in gateway.config.providers:
                raise _read_only(gateway, target) from None
            raise
        await view.refreshed()
        return 200, orjson.dumps({"name": target, "deleted": True})
    if method != "PATCH":
        raise _method(method, "PATCH or DELETE (GET too, answered with the provider's health)")
    _not_the_files(gateway, target)
    changes = _body(body)
    if changes.get("name", target) != target:
        raise invalid("name: a provider cannot be renamed; add it under the new name and delete this one")
    changes.pop("name", None)

    def change(raw: bytes) -> bytes:
        table = provider_table(raw)
        for key, value in _unmasked(table, changes).items():
            if value is None:
                table.pop(key, None)
            else:
                table[key] = value
        _checked(gateway, target, table)
        return provider_record(table, time.time())

    written = await view.call(lambda backend: update(backend, "providers", target, change))
    await view.refreshed()
    return 200, orjson.dumps(_answer(gateway, target, provider_table(written)))


def _not_the_files(gateway: Gateway, name: str) -> None:
    """409 for a name the config file's providers hold: those are edited in the file."""
    if name in gateway.config.providers and name not in gateway.config.stored:
        raise _read_only(gateway, name)


def _read_only(gateway: Gateway, name: str) -> RelayError:
    return RelayError(409, f"{name!r} is a provider of the config file ({gateway.config.source}); edit it there",
                      "invalid_request_error")


def _checked(gateway: Gateway, name: str, table: dict[str, Any]) -> None:
    """The config file's checks; an allowed ``${VAR}`` unset here passes (the instances that have it serve it)."""
    try:
        stored_provider(name, table, dict(os.environ), gateway.config.store.provider_env, unset_ok=True)
    except ConfigError as exc:
        raise invalid(str(exc)) from None


def _answer(gateway: Gateway, name: str, table: dict[str, Any]) -> dict[str, Any]:
    """A stored provider as written, and why this instance does not serve it, if it does not."""
    doc: dict[str, Any] = {"name": name, "table": shown_table(table)}
    if name in gateway.left_out:
        doc["left_out"] = gateway.left_out[name]
    claude = [m for m in table.get("models") or () if isinstance(m, str) and "claude" in m.lower()]
    if claude:  # a listed name wins over [routes]: say so, it is rarely meant
        doc["note"] = (f"lists Claude ids ({', '.join(claude)}): Claude Code's requests for them now go to "
                       f"{name!r}, not to [routes]")
    return doc


MASK = "(set)"  # what the API shows in place of a value that may be a secret


def shown_url(url: str) -> str:
    """A base URL without what may hold a secret (user:password@, a query string)."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))


def shown_table(table: dict[str, Any]) -> dict[str, Any]:
    """A stored table as the API shows it: an api_key only as a ``${VAR}`` it names, header and query values
    masked, the base URL without credentials or query."""
    shown = dict(table)
    if "api_key" in shown:
        keys = shown["api_key"] if isinstance(shown["api_key"], list) else [shown["api_key"]]
        shown["api_key"] = [k if isinstance(k, str) and _VAR_ONLY.match(k) else MASK for k in keys]
    for key in ("headers", "query"):
        if isinstance(shown.get(key), dict):
            shown[key] = {k: MASK for k in shown[key]}
    if isinstance(shown.get("base_url"), str):
        shown["base_url"] = shown_url(shown["base_url"])
    return shown


def _unmasked(table: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """Changes with what the API showed masked taken as "unchanged": a form sends back what it was shown."""
    out = dict(changes)
    for key in ("headers", "query"):
        new, old = out.get(key), table.get(key)
        if isinstance(new, dict) and isinstance(old, dict):
            out[key] = {k: old[k] if v == MASK and k in old else v for k, v in new.items()}
    if "api_key" in out and isinstance(out["api_key"], list) and out["api_key"] == shown_table(table).get("api_key"):
        del out["api_key"]
    if isinstance(out.get("base_url"), str) and isinstance(table.get("base_url"), str) \
            and out["base_url"] == shown_url(table["base_url"]):
        del out["base_url"]
    return out


def _method(method: str, allowed: str) -> RelayError:
    return RelayError(405, f"{method} is not allowed here; use {allowed}", "invalid_request_error")
