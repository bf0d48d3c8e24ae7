"""The team gateway end to end over sockets: virtual keys beside config keys, the admin API, 429/402/401, cost in
the books, the access log and /metrics; then several relay processes sharing one real redis-server."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import http.client
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

import anthropic
import orjson
import pytest
import trio

from tests.client import RelayProcess
from tests.conftest import RELAY_KEY, relay_config, start_relay
from tests.mock_upstream import MockUpstream, Reply, sse, chunk, text_stream
from tests.redis_server import RedisServer, redis_server  # noqa: F401  (a fixture)

ADMIN = "admin-key-0123456789"
PRICES = 'prices = { "mock-model" = { input = 1000, output = 2000 } }'  # USD per million: 10 in + 5 out = $0.02


def gateway_config(upstream: MockUpstream, store: str, refresh: float = 0.05, rate_window: float = 60) -> str:
    text = relay_config(upstream.base_url, extra_provider=PRICES)
    text = text.replace("[server]", f'[server]\nadmin_keys = ["{ADMIN}"]', 1)
    return text + f'\n[store]\nurl = "{store}"\nrefresh = {refresh}\ntimeout = 1\nrate_window = {rate_window}\n'


async def clear_of_a_window_edge(seconds: float, window: float = 60) -> None:
    """Rate windows are aligned to the wall clock: a test counting requests against an rpm must not straddle an
    edge, or the count starts over half way through. Sleeps past the next edge if fewer than ``seconds`` are left."""
    left = window - time.time() % window
    if left < seconds:
        await trio.sleep(left + 0.05)


class Answer:
    def __init__(self, status: int, body: bytes) -> None:
        self.status_code, self.text = status, body.decode()

    def json(self) -> Any:
        return orjson.loads(self.text)


def call(url: str, method: str, path: str, key: str = ADMIN, body: Any = None) -> Answer:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=10)
    try:
        headers = {"x-api-key": key, "content-type": "application/json"}
        conn.request(method, path, body=None if body is None else orjson.dumps(body), headers=headers)
        answer = conn.getresponse()
        return Answer(answer.status, answer.read())
    finally:
        conn.close()


def ask(url: str, key: str, model: str = "mock-model") -> str:
    client = anthropic.Anthropic(base_url=url, api_key=key, max_retries=0)
    with client.messages.stream(model=model, max_tokens=5, messages=[{"role": "user", "content": "hi"}]) as s:
        return s.get_final_text()


async def run(fn: Any, *args: Any) -> Any:
    return await trio.to_thread.run_sync(fn, *args)


async def until(condition: Any, seconds: float = 10) -> None:
    with trio.fail_after(seconds):
        while not await condition():
            await trio.sleep(0.02)


async def test_virtual_keys_limits_budgets_and_the_admin_api(nursery: trio.Nursery, upstream: MockUpstream,
                                                              tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    upstream.handler = lambda r: text_stream("ok", usage=(10, 5))
    relay = await start_relay(nursery, gateway_config(upstream, f"sqlite://{tmp_path / 'relay.sqlite3'}"))
    url = relay.url
    caplog.set_level(logging.INFO, logger="relay.access")
    # the admin API: admin keys only
    assert (await run(call, url, "GET", "/admin/keys", RELAY_KEY)).status_code == 403
    assert (await run(call, url, "GET", "/admin/keys", "wrong")).status_code == 401
    await clear_of_a_window_edge(15)
    made = await run(call, url, "POST", "/admin/keys", ADMIN, {"name": "alice", "rpm": 3, "models": ["mock-*"]})
    assert made.status_code == 201, made.text
    secret = made.json()["secret"]
    assert made.json()["key"]["limits"]["rpm"] == 3 and "digest" not in made.text
    assert (await run(call, url, "POST", "/admin/keys", ADMIN, {"name": "alice"})).status_code == 409
    bad = await run(call, url, "POST", "/admin/keys", ADMIN, {"name": "bob", "rpm": -1})
    assert bad.status_code == 400 and "rpm" in bad.json()["error"]["message"]
    # the key works at once on the instance that made it, and the config key beside it
    assert await run(ask, url, secret) == "ok"
    assert await run(ask, url, RELAY_KEY) == "ok"
    with pytest.raises(anthropic.PermissionDeniedError):  # scoped like a config key (and counted: it was asked)
        await run(ask, url, secret, "alias-model")
    assert await run(ask, url, secret) == "ok"
    with pytest.raises(anthropic.RateLimitError) as limited:
        await run(ask, url, secret)
    assert limited.value.response.headers["retry-after"].isdigit()
    assert "3 requests per minute" in limited.value.message
    # a budget: $0.02 a request, $0.05 a day: $0.04 spent, so one more is served (it starts under budget), then 402
    changed = await run(call, url, "PATCH", "/admin/keys/alice", ADMIN, {"rpm": None, "budget": 0.05,
                                                                       "budget_period": "day"})
    assert changed.status_code == 200 and changed.json()["limits"]["budget"] == 0.05
    assert changed.json()["spend"]["usd"] == 0.04
    await until(lambda: _limits_seen(relay, "alice", "budget", 0.05))
    assert await run(ask, url, secret) == "ok"
    with pytest.raises(anthropic.APIStatusError) as billed:
        await run(ask, url, secret)
    assert billed.value.status_code == 402 and billed.value.body["error"]["type"] == "billing_error"  # type: ignore[index]
    assert "daily budget of $0.05" in billed.value.message and "resets at" in billed.value.message
    # revoked: 401 everywhere it could be used
    assert (await run(call, url, "DELETE", "/admin/keys/alice")).json()["state"] == "revoked"
    await until(lambda: _limits_seen(relay, "alice", "revoked", True))
    with pytest.raises(anthropic.AuthenticationError, match="revoked"):
        await run(ask, url, secret)
    # the books: served apart from refused, with the cost; the access log and /metrics say the cost too
    await relay.server.flush_usage()
    rows = (await run(call, url, "GET", "/admin/usage")).json()["data"]
    alice = [(r["model"], r["requests"], r["refused"], r["cost_usd"]) for r in rows if r["key"] == "alice"]
    assert sorted(alice) == [("mock-model", 3, 2, 0.06)], rows
    assert any(r["key"] == "key1" and r["requests"] == 1 for r in rows)
    lines = [r.getMessage() for r in caplog.records if "POST /v1/messages 200" in r.getMessage()]
    assert all("cost=$0.020000" in line for line in lines) and any("key=alice" in line for line in lines)
    metrics = (await run(call, url, "GET", "/metrics")).text
    assert 'relay_cost_usd_total{provider="mock"} 0.08' in metrics
    assert 'relay_refused_total{reason="rate_limit"} 1' in metrics and 'relay_refused_total{reason="budget"} 1' in metrics
    assert "relay_store_up 1" in metrics and secret not in metrics
    status = (await run(call, url, "GET", "/admin/status")).json()
    assert status["store"]["up"] and status["store"]["keys"] == 1
    for record in caplog.records:
        assert secret not in record.getMessage()


async def _limits_seen(relay: Any, name: str, field: str, value: Any) -> bool:
    key = relay.server.gateway.view.by_name.get(name)
    return key is not None and (getattr(key.limits, field, None) == value or getattr(key, field, None) == value)


async def test_a_request_in_flight_when_its_budget_runs_out_finishes(nursery: trio.Nursery, upstream: MockUpstream,
                                                                    tmp_path: Path) -> None:
    """A slow stream starts under budget; a quick one spends the budget meanwhile; the slow one still ends whole."""
    slow = Reply(pieces=[sse(chunk({"role": "assistant", "content": ""}), done=False)[0], 0.6,
                         *sse(chunk({"content": "slow"}), chunk({}, "stop"),
                              chunk(choices=False, usage={"prompt_tokens": 10, "completion_tokens": 5})) ])
    upstream.handler = lambda r: slow if r.json["messages"][0]["content"] == "slow" else text_stream("quick")
    relay = await start_relay(nursery, gateway_config(upstream, f"sqlite://{tmp_path / 'relay.sqlite3'}"))
    made = await run(call, relay.url, "POST", "/admin/keys", ADMIN, {"name": "bob", "budget": 0.01})
    secret = made.json()["secret"]

    def stream(content: str) -> str:
        client = anthropic.Anthropic(base_url=relay.url, api_key=secret, max_retries=0)
        with client.messages.stream(model="mock-model", max_tokens=5,
                                    messages=[{"role": "user", "content": content}]) as s:
            return s.get_final_text()

    results: dict[str, str] = {}

    async def slow_one() -> None:
        results["slow"] = await run(stream, "slow")

    async with trio.open_nursery() as inner:
        inner.start_soon(slow_one)
        await trio.sleep(0.2)
        results["quick"] = await run(stream, "quick")  # $0.02 of a $0.01 budget
    assert results == {"slow": "slow", "quick": "quick"}
    with pytest.raises(anthropic.APIStatusError) as billed:
        await run(stream, "after")
    assert billed.value.status_code == 402


async def test_a_store_that_never_answers_blocks_no_request(nursery: trio.Nursery, upstream: MockUpstream) -> None:
    """[store] url points at a listener that never answers: relay starts within the store's timeout and serves
    config keys as if nothing were wrong; /health says the store is down."""
    import socket

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    try:
        upstream.handler = lambda r: text_stream("ok")
        config = gateway_config(upstream, f"redis://127.0.0.1:{silent.getsockname()[1]}/0")
        with trio.fail_after(5):
            relay = await start_relay(nursery, config)
            assert await run(ask, relay.url, RELAY_KEY) == "ok"
        health = (await run(call, relay.url, "GET", "/health")).json()
        assert health == {"status": "ok", "store": "down"}
        refused = await run(call, relay.url, "GET", "/admin/keys")
        assert refused.status_code == 503 and "unreachable" in refused.json()["error"]["message"]
    finally:
        silent.close()


# ---- several relay processes on one redis-server -----------------------------------------------------------------


@asynccontextmanager
async def running(config: Path, *names: str) -> AsyncIterator[list[RelayProcess]]:
    """relay processes on one config, each logging to NAME.log beside it; stopped (if still running) at the end."""
    instances = [RelayProcess(config, config.parent / f"{name}.log") for name in names]
    try:
        for instance in instances:
            await instance.ready()
        yield instances
    finally:
        for instance in instances:
            if instance.proc.poll() is None:
                instance.stop()


async def books(config: Path) -> list[dict[str, Any]]:
    """The usage rows as a fresh instance reads them from the store once the others have stopped."""
    async with running(config, "relay-after") as (after,):
        return (await run(call, after.url, "GET", "/admin/usage")).json()["data"]  # type: ignore[no-any-return]


async def test_three_instances_share_keys_limits_and_books(nursery: trio.Nursery, upstream: MockUpstream,
                                                           redis_server: RedisServer, tmp_path: Path) -> None:  # noqa: F811
    upstream.handler = lambda r: text_stream("ok", usage=(10, 5))
    config = tmp_path / "relay.toml"
    config.write_text(gateway_config(upstream, redis_server.url, refresh=0.1))
    async with running(config, "relay0", "relay1", "relay2") as instances:
        one, two, three = (i.url for i in instances)
        await clear_of_a_window_edge(15)
        made = await run(call, one, "POST", "/admin/keys", ADMIN, {"name": "team", "rpm": 4})
        secret = made.json()["secret"]
        # created on one, working on the others within a second
        started = trio.current_time()
        for url in (two, three):
            await until(lambda: _works(url, secret), seconds=5)
        assert trio.current_time() - started < 1.0
        served = 2  # the two probes above
        # the limit holds across instances: requests spaced by more than a refresh land on all three in turn
        outcomes = []
        for n in range(6):
            await trio.sleep(0.25)
            outcomes.append(await run(_status, (one, two, three)[n % 3], secret))
        assert outcomes == [200, 200, 429, 429, 429, 429], outcomes
        served += 2
        # revoked on three: refused on one and two within a second
        assert (await run(call, three, "DELETE", "/admin/keys/team")).status_code == 200
        started = trio.current_time()
        for url in (one, two):
            await until(lambda: _refused(url, secret), seconds=5)
        assert trio.current_time() - started < 1.0
        # the books add up over the instances (the config key too), whichever instance is asked
        for n in range(6):
            assert await run(_status, (one, two, three)[n % 3], RELAY_KEY) == 200
        logs = [i.stop() for i in instances]  # SIGTERM: each writes what it holds
    assert all("Traceback" not in log for log in logs), logs
    rows = await books(config)
    totals = {(r["key"], r["model"]): (r["requests"], r["refused"]) for r in rows}
    refused = sum(log.count("429 model=mock-model") for log in logs)  # 4 above, and any while revoking
    assert refused >= 4
    assert totals == {("team", "mock-model"): (served, refused), ("key1", "mock-model"): (6, 0)}, rows


async def test_redis_killed_mid_run_loses_nothing_served(nursery: trio.Nursery, upstream: MockUpstream,
                                                         redis_server: RedisServer, tmp_path: Path) -> None:  # noqa: F811
    upstream.handler = lambda r: text_stream("ok", usage=(10, 5))
    config = tmp_path / "relay.toml"
    config.write_text(gateway_config(upstream, redis_server.url, refresh=0.1))
    async with running(config, "relay0", "relay1") as instances:
        made = await run(call, instances[0].url, "POST", "/admin/keys", ADMIN, {"name": "k", "rpm": 1000})
        secret = made.json()["secret"]
        await until(lambda: _works(instances[1].url, secret), seconds=5)
        served = 1
        for n in range(30):
            if n == 10:
                redis_server.kill()
            if n == 20:
                redis_server.start()
            status = await run(_status, instances[n % 2].url, secret)
            assert status == 200, status  # a known key keeps working through the outage
            served += 1
            await trio.sleep(0.03)
        logs = [i.stop() for i in instances]
    assert all("unreachable" in log for log in logs) and all("Traceback" not in log for log in logs), logs
    rows = await books(config)
    assert sum(r["requests"] for r in rows if r["key"] == "k") == served, rows


def _status(url: str, key: str) -> int:
    body = {"model": "mock-model", "max_tokens": 5, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    return call(url, "POST", "/v1/messages", key, body).status_code


async def _works(url: str, key: str) -> bool:
    return await run(_status, url, key) == 200


async def _refused(url: str, key: str) -> bool:
    return await run(_status, url, key) == 401


async def test_refused_requests_add_no_row_per_invented_model_name(nursery: trio.Nursery, upstream: MockUpstream,
                                                                    tmp_path: Path) -> None:
    """A key over its limit asking for ever new model names is booked under "other", not one row per name."""
    upstream.handler = lambda r: text_stream("ok", usage=(1, 1))
    relay = await start_relay(nursery, gateway_config(upstream, f"sqlite://{tmp_path / 'relay.sqlite3'}"))
    await clear_of_a_window_edge(10)
    secret = (await run(call, relay.url, "POST", "/admin/keys", ADMIN, {"name": "tight", "rpm": 1})).json()["secret"]
    assert await run(ask, relay.url, secret) == "ok"
    for n in range(5):
        with pytest.raises(anthropic.RateLimitError):
            await run(ask, relay.url, secret, f"invented-{n}")
    await relay.server.flush_usage()
    rows = [r for r in (await run(call, relay.url, "GET", "/admin/usage")).json()["data"] if r["key"] == "tight"]
    assert sorted((r["model"], r["requests"], r["refused"]) for r in rows) == [("mock-model", 1, 0), ("other", 0, 5)]


async def test_an_admin_key_on_the_client_api_is_told_what_it_is(nursery: trio.Nursery, upstream: MockUpstream,
                                                                  tmp_path: Path) -> None:
    relay = await start_relay(nursery, gateway_config(upstream, f"sqlite://{tmp_path / 'relay.sqlite3'}"))
    body = {"model": "mock-model", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    refused = await run(call, relay.url, "POST", "/v1/messages", ADMIN, body)
    assert refused.status_code == 401 and "this is an admin key" in refused.json()["error"]["message"]
    wrong = await run(call, relay.url, "POST", "/v1/messages", "not-a-key", body)
    assert wrong.status_code == 401 and "admin" not in wrong.json()["error"]["message"]
    long_name = await run(call, relay.url, "POST", "/admin/keys", ADMIN, {"name": "x y" * 2000})
    assert long_name.status_code == 400 and len(long_name.text) < 500  # the name is cut in the message
