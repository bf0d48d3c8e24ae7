"""Who is asking: client keys, admin keys and metrics keys, read from a request head.

Pure (no I/O): the server asks with the head's headers and the peer's address. Every comparison is made
against every configured key in constant time, so timing tells nothing about which key nearly matched.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Iterable, Sequence
from fnmatch import fnmatchcase
from typing import Any, Protocol

from relay.config import ClientKey, Config
from relay.errors import RelayError
from relay.routing import Target

OPEN = ClientKey("", "open")  # who a request is when relay has no client keys configured
Headers = Iterable[tuple[bytes, bytes]]


def presented(headers: Headers) -> bytes:
    """The key a request presents: ``x-api-key``, else ``Authorization: Bearer``. An empty header counts as
    absent, so an empty ``x-api-key`` beside a real bearer token does not hide it."""
    api_key = bearer = b""
    for name, value in headers:
        if name == b"x-api-key" and not api_key:
            api_key = value.strip()
        elif name == b"authorization" and value[:7].lower() == b"bearer " and not bearer:
            bearer = value[7:].strip()
    return api_key or bearer


def _match(secret: bytes, keys: Sequence[tuple[bytes, object]]) -> object | None:
    found = None
    for raw, value in keys:
        if hmac.compare_digest(secret, raw):
            found = value
    return found


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


class VirtualKeys(Protocol):
    """Where virtual keys are found (relay.store.View): in memory, by the digest of the secret."""

    keys: dict[str, Any]

    def find(self, secret: bytes) -> ClientKey | None: ...


class Keys:
    """The keys of one config, encoded once, and the store's virtual keys beside them."""

    def __init__(self, config: Config, virtual: VirtualKeys | None = None) -> None:
        self._clients = [(k.key.encode(), k) for k in config.keys]
        server = config.server
        self._metrics = [(k.encode(), True) for k in (*server.admin_keys, *server.metrics_keys)]
        self._admin = [(k.encode(), True) for k in server.admin_keys]
        self._virtual = virtual

    def _open(self) -> bool:
        """No key of any kind to check against: a single user's relay. A virtual key, once one exists, closes
        it (its holder must not be the only one kept out)."""
        return not self._clients and (self._virtual is None or not self._virtual.keys)

    def _find(self, secret: bytes) -> ClientKey | None:
        found = _match(secret, self._clients) if self._clients else None
        if isinstance(found, ClientKey):
            return found
        if secret and self._virtual is not None:
            return self._virtual.find(secret)  # a dict lookup by SHA-256 digest: its timing tells nothing
        return None

    def client(self, headers: Headers) -> ClientKey:
        """The client key presented (config or virtual), ``OPEN`` when relay has none; else 401."""
        if self._open():
            return OPEN
        secret = presented(headers)
        found = self._find(secret)
        if found is None:
            if secret and _match(secret, self._admin) is not None:  # checked only once the key has failed
                raise RelayError(401, "this is an admin key: it opens the admin API and /metrics, not /v1 "
                                      "(send a client key)", "authentication_error")
            raise RelayError(401, "invalid x-api-key (send the relay key as x-api-key or Authorization: Bearer)",
                             "authentication_error")
        return found

    def check_admin(self, headers: Headers) -> None:
        """The admin API: an admin key only, never a client key; none configured = no admin API."""
        if not self._admin:
            raise RelayError(404, "the admin API is off: set [server] admin_keys to turn it on", "not_found_error")
        self._operator(headers, self._admin, "an admin key", "use the admin API")

    def _operator(self, headers: Headers, keys: Sequence[tuple[bytes, object]], needed: str, doing: str) -> None:
        """One of ``keys`` is presented, else 403 for a client key (it is known, just not enough) or 401."""
        secret = presented(headers)
        if _match(secret, keys) is None:
            if secret and self._find(secret) is not None:
                raise RelayError(403, f"a client key cannot {doing}; use {needed}", "permission_error")
            raise RelayError(401, f"{needed} is needed to {doing} (x-api-key or Authorization: Bearer)",
                             "authentication_error")

    def check_metrics(self, headers: Headers, peer_loopback: bool) -> None:
        """``/metrics`` shows every key's models and traffic, so a client key never reads it: an admin or
        metrics key does, and with neither configured, any caller on the loopback interface."""
        if not self._metrics:
            if not peer_loopback:
                raise RelayError(403, "metrics are served on loopback only; set [server] metrics_keys (or admin_keys)"
                                      " to read them from elsewhere", "permission_error")
            return
        self._operator(headers, self._metrics, "a metrics or admin key", "read metrics")


def permitted(client: ClientKey, model: str, targets: list[Target]) -> list[Target]:
    """The targets of a resolved route this key may call, in order; 403 when none. A scope is checked against
    what will actually be called (each target's ``provider/model`` or its upstream model name), after
    aliases, tiers, scenarios and ``<relay-model>`` tags have had their say, never against the name the
    client chose, which any of those can point elsewhere."""
    if not client.models:
        return targets
    allowed = [t for t in targets if may_call(client, t)]
    if not allowed:
        raise RelayError(403, f"this key may not use model {model!r}", "permission_error")
    return allowed


def may_call(client: ClientKey, target: Target) -> bool:
    return not client.models or any(fnmatchcase(target.label, p) or fnmatchcase(target.model, p) for p in client.models)
