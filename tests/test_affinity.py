"""Prompt-cache affinity, the server side (issue 13 item 6): the turns of one Claude Code session stay on the upstream
key and the route target that served it last while they are healthy (key rotation and fallback still move it), the
map of sessions is bounded, and /metrics counts cache reads per provider. End to end with the real anthropic SDK
sending Claude Code's ``metadata.user_id``."""

from __future__ import annotations

import json
import trio

from relay.affinity import Sessions
from relay.config import Provider
from relay.health import ProviderHealth
from relay.routing import Target
from tests.client import exchange, get, split
from tests.conftest import RELAY_KEY, RelayHandle, start_relay
from tests.format_mocks import client, run
from tests.mock_upstream import MockUpstream, Recorded, Reply, chunk, json_reply, sse

KEYS = ("sk-key-one-0123456789", "sk-key-two-0123456789")


def user_id(session: str) -> str:
    return json.dumps({"device_id": "d" * 64, "account_uuid": "", "session_id": session})


def answer(cached: int = 0) -> Reply:
    usage = {"prompt_tokens": 20, "completion_tokens": 2, "prompt_tokens_details": {"cached_tokens": cached}}
    return Reply(pieces=sse(chunk({"role": "assistant", "content": "ok"}), chunk({}, "stop"),
                            chunk(choices=False, usage=usage)))


def key_of(r: Recorded) -> str:
    return r.headers["authorization"].removeprefix("Bearer ")


async def turn(relay: RelayHandle, session: str, model: str = "claude-sonnet-4-5") -> None:
    def go() -> None:
        with client(relay).messages.stream(model=model, max_tokens=10, metadata={"user_id": user_id(session)},
                                           messages=[{"role": "user", "content": "hi"}]) as s:
            assert s.get_final_text() == "ok"
    await run(go)


def config(*upstreams: MockUpstream, extra: str = "") -> str:
    providers = "".join(f"""
[providers.{name}]
base_url = "{u.base_url}"
api_key = {json.dumps(list(KEYS))}
models = ["m"]
retries = 1
read_timeout = 5
""" for name, u in zip("ab", upstreams))
    targets = json.dumps([f"{name}/m" for name in "ab"[:len(upstreams)]])
    return f"""
[server]
api_keys = ["{RELAY_KEY}"]
{extra}
{providers}
[routes]
default = {targets}
"""


async def test_a_session_keeps_its_key_and_another_session_gets_the_next(nursery: trio.Nursery) -> None:
    upstream = MockUpstream(lambda r: answer())
    await nursery.start(upstream.serve)
    relay = await start_relay(nursery, config(upstream))
    for session in ("s1", "s1", "s2", "s1", "s2"):
        await turn(relay, session)
    # round robin alone would give one, two, one, two, one: each turn of s1 would meet a cold cache
    assert [key_of(r) for r in upstream.requests] == [KEYS[0], KEYS[0], KEYS[1], KEYS[0], KEYS[1]]


async def test_a_429_on_the_sessions_key_moves_it(nursery: trio.Nursery) -> None:
    limited = {KEYS[0]}

    def handler(r: Recorded) -> Reply:
        if key_of(r) in limited:
            return json_reply({"error": {"message": "rate limited", "type": "rate_limit_error"}}, 429)
        return answer()

    upstream = MockUpstream(handler)
    await nursery.start(upstream.serve)
    relay = await start_relay(nursery, config(upstream))
    limited.clear()
    await turn(relay, "s1")  # served with key one
    limited.add(KEYS[0])
    await turn(relay, "s1")  # key one says 429: rotated at once to key two, which serves
    limited.clear()
    await turn(relay, "s1")  # and the session stays there (key one rests anyway)
    assert [key_of(r) for r in upstream.requests] == [KEYS[0], KEYS[0], KEYS[1], KEYS[1]]


async def test_a_session_stays_on_the_target_that_served_it(nursery: trio.Nursery) -> None:
    a_down = {"yes": True}
    a = MockUpstream(lambda r: json_reply({"error": {"message": "down"}}, 503) if a_down["yes"] else answer())
    b = MockUpstream(lambda r: answer())
    await nursery.start(a.serve)
    await nursery.start(b.serve)
    relay = await start_relay(nursery, config(a, b).replace("retries = 1", "retries = 0"))
    await turn(relay, "s1")  # a fails: the route falls back to b
    a_down["yes"] = False
    await turn(relay, "s1")  # a is healthy again, but s1's cache is on b
    await turn(relay, "s2")  # a new session takes the route's first target
    await turn(relay, "s1")
    assert (len(a.requests), len(b.requests)) == (2, 3)  # a: the failed turn and s2's; b: s1's three

    b_down = {"yes": True}
    b.handler = lambda r: json_reply({"error": {"message": "down"}}, 503) if b_down["yes"] else answer()
    await turn(relay, "s1")  # b fails: affinity yields, the route's other target serves
    assert (len(a.requests), len(b.requests)) == (3, 4)
    b_down["yes"] = False
    await turn(relay, "s1")  # and the session now stays on a
    assert (len(a.requests), len(b.requests)) == (4, 4)


async def test_metrics_count_cache_reads_per_provider(nursery: trio.Nursery) -> None:
    turns = iter([answer(0), answer(16), answer(12)])
    upstream = MockUpstream(lambda r: next(turns))
    await nursery.start(upstream.serve)
    relay = await start_relay(nursery, config(upstream))
    for _ in range(3):
        await turn(relay, "s1")

    def metric(text: str, name: str) -> str:
        return next(line for line in text.splitlines() if line.startswith(name + '{provider="a"}'))

    status, _, body = split(await exchange(relay.port, get("/metrics")))
    text = body.decode()
    assert status == 200
    assert metric(text, "relay_cache_hits_total").endswith(" 2")
    assert metric(text, "relay_cache_read_tokens_total").endswith(" 28")


async def test_affinity_off(nursery: trio.Nursery) -> None:
    upstream = MockUpstream(lambda r: answer())
    await nursery.start(upstream.serve)
    relay = await start_relay(nursery, config(upstream, extra="affinity_sessions = 0"))
    for _ in range(3):
        await turn(relay, "s1")
    assert [key_of(r) for r in upstream.requests] == [KEYS[0], KEYS[1], KEYS[0]]  # plain round robin


def test_the_map_is_bounded_least_recently_used_first() -> None:
    sessions = Sessions(2)
    target = Target(Provider(name="p", base_url="http://x", api_keys=KEYS), "m")
    for name in ("s1", "s2"):
        Sessions.served(sessions.place("c", name), ("p/m",), target, KEYS[1])
    sessions.place("c", "s1")  # s1 used again: s2 is now the oldest
    sessions.place("c", "s3")
    assert len(sessions) == 2
    assert sessions.place("c", "s1").keys == {"p": KEYS[1]}  # type: ignore[union-attr]
    assert sessions.place("c", "s2").keys == {}  # type: ignore[union-attr]  # forgotten: a new place
    assert sessions.place("other-client", "s1").keys == {}  # type: ignore[union-attr]
    assert sessions.place("c", None) is None and Sessions(0).place("c", "s1") is None


def test_a_preferred_key_yields_while_it_rests() -> None:
    health = ProviderHealth(KEYS)
    assert health.pick_key(0.0, KEYS[1]) == KEYS[1]
    health.key_refused(KEYS[1], 429, 0.0)
    assert health.pick_key(1.0, KEYS[1]) == KEYS[0]
    assert health.pick_key(31.0, KEYS[1]) == KEYS[1]  # rested: the session's key again
    assert health.pick_key(31.0, "not-a-key-of-this-provider") in KEYS
