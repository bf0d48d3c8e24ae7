"""Session affinity: the turns of one Claude Code session go to the upstream key and the route target that
served it last, while they are healthy, so the upstream's prefix cache for that conversation stays warm
(providers cache per account and per server: a new key or target starts the session's cache cold).

Only a preference: a resting key (401/403/429) or an open circuit is passed over as for any request, and
whatever then serves the session becomes its new place. The map is bounded: the ``size`` sessions used most
recently, each holding at most one key per provider and one target per route (both bounded by the config).
"""

from __future__ import annotations

from collections import OrderedDict

from relay.routing import Target

Route = tuple[str, ...]  # a route's target labels in its own order: which choice a remembered target was


class Place:
    """Where one session was served last: per provider its key, per route its target."""

    __slots__ = ("keys", "targets")

    def __init__(self) -> None:
        self.keys: dict[str, str] = {}
        self.targets: dict[Route, str] = {}

    def order(self, targets: list[Target]) -> list[Target]:
        """The route's targets with the session's own first (the rest keep their fallback order)."""
        if len(targets) < 2:
            return targets
        label = self.targets.get(tuple(t.label for t in targets))
        if label is None or label == targets[0].label:
            return targets
        own = [t for t in targets if t.label == label]
        return own + [t for t in targets if t.label != label]


class Sessions:
    """The places of the sessions seen most recently (least recently used evicted past ``size``; 0: off)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._places: OrderedDict[tuple[str, str], Place] = OrderedDict()

    def __len__(self) -> int:
        return len(self._places)

    def place(self, client: str, session: str | None) -> Place | None:
        """The session's place (a new one for a session not seen yet); None without a session id or when off.
        ``client``: the relay key's name, so two clients never share a place by sending the same id."""
        if session is None or self.size <= 0:
            return None
        name = (client, session)
        place = self._places.get(name)
        if place is None:
            place = self._places[name] = Place()
            while len(self._places) > self.size:
                self._places.popitem(last=False)
        else:
            self._places.move_to_end(name)
        return place

    @staticmethod
    def served(place: Place | None, route: Route, target: Target, key: str) -> None:
        """The session was just served by ``target`` with ``key``: its next turn goes there first."""
        if place is None:
            return
        if len(route) > 1:
            place.targets[route] = target.label
        if key:
            place.keys[target.provider.name] = key
