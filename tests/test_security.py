"""Attacks over a socket, each checking the refusal and what the attack would have grown or leaked:
who may reach which model, who may read /metrics and how far its series can grow, forged log lines, upstream
keys echoed in errors, the key header a client presents, bodies before a key, bytes behind a stream, request
framing, the open-file limit."""

from __future__ import annotations

import re
import resource
import subprocess
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio

from tests.client import RelayProcess, exchange, get, messages_body, post, split
from tests.conftest import RELAY_KEY, UPSTREAM_KEY, relay_config, start_relay
from tests.mock_upstream import MockUpstream, Reply, completion, json_reply, sse, text_stream

OK = completion({"role": "assistant", "content": "ok"})
METRICS_KEY = "metrics-scraper-key"


@asynccontextmanager
async def relay_process(config: str, tmp_path: Path, *args: str,
                        preexec: Callable[[], None] | None = None) -> AsyncIterator[tuple[subprocess.Popen[bytes], int, Path]]:
    """A ``RelayProcess`` on ``config``; yields the process, its port and its log file."""
    cfg = tmp_path / "relay.toml"
    cfg.write_text(config)
    relay = RelayProcess(cfg, tmp_path / "relay.log", *args, preexec=preexec)
    try:
        await relay.ready(20)
        yield relay.proc, relay.port, relay.log
    finally:
        relay.stop()


def rss(pid: int) -> int:
    """Resident memory of a process, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def test_metrics_refuse_client_keys_and_read_with_a_metrics_key(nursery: trio.Nursery, upstream: MockUpstream) -> None:
    relay = await start_relay(nursery, relay_config(upstream.base_url).replace(
        "[server]", f'[server]\nmetrics_keys = ["{METRICS_KEY}"]'))
    status, _, body = split(await exchange(relay.port, get("/metrics")))
    assert status == 401 and orjson.loads(body)["error"]["type"] == "authentication_error"
    status, _, body = split(await exchange(relay.port, get("/metrics", RELAY_KEY)))
    assert status == 403 and orjson.loads(body)["error"]["type"] == "permission_error"
    status, headers, body = split(await exchange(relay.port, get("/metrics", METRICS_KEY)))
    assert status == 200 and b"relay_open_streams 0" in body
    # and a metrics key is no client key
    upstream.handler = lambda r: text_stream("x")
    status, _, _ = split(await exchange(relay.port, post("/v1/messages", messages_body("mock-model"), key=METRICS_KEY)))
    assert status == 401 and upstream.requests == []


async def test_metrics_on_loopback_need_no_key_when_no_operator_key_is_set(relay) -> None:  # type: ignore[no-untyped-def]
    status, _, body = split(await exchange(relay.port, get("/metrics")))
    assert status == 200 and b"relay_requests_total" in body


async def test_a_client_key_equal_to_an_operator_key_is_a_config_error() -> None:
    from relay.config import ConfigError, parse
    text = relay_config("http://127.0.0.1:9/v1").replace("[server]", f'[server]\nadmin_keys = ["{RELAY_KEY}"]')
    with pytest.raises(ConfigError, match=r"server\.admin_keys: holds a client key too"):
        parse(text, "relay.toml", env={})


async def test_junk_paths_and_model_names_do_not_grow_metrics(relay, upstream: MockUpstream) -> None:  # type: ignore[no-untyped-def]
    upstream.handler = lambda r: (OK if r.json.get("model") == "mock-model"
                                  else json_reply({"error": {"message": "no such model"}}, 404))
    await exchange(relay.port, post("/v1/messages", messages_body("mock-model")))
    _, _, before = split(await exchange(relay.port, get("/metrics")))
    for n in range(150):  # junk paths without a key, and refused model names with one
        await exchange(relay.port, get(f"/junk/{n}/" + "p" * 200))
        await exchange(relay.port, post("/v1/messages", messages_body(f"mock/junk-{n}-" + "m" * 300)))
    with trio.fail_after(5):
        while True:
            _, _, after = split(await exchange(relay.port, get("/metrics")))
            if b'path="other"' in after and b'model="other",status="404"' in after:
                break
            await trio.sleep(0.02)
    assert b"junk" not in after and b"ppp" not in after
    series = lambda text: {l.rsplit(" ", 1)[0] for l in text.decode().splitlines() if not l.startswith("#")}
    grown = series(after) - series(before)
    # one series for the junk paths, one for the refused models, and at most the upstream's 404 count
    assert len(grown) <= 4, grown
    assert len(after) < len(before) + 1000


async def test_served_models_are_labelled_up_to_a_bound(relay, upstream: MockUpstream) -> None:  # type: ignore[no-untyped-def]
    from relay import metrics
    upstream.handler = lambda r: OK
    metrics_ = relay.server.metrics
    metrics_._served_models.update(f"filler-{n}" for n in range(metrics.MODEL_SERIES - 1))
    for model in ("mock/first-new", "mock/second-new"):
        status, _, _ = split(await exchange(relay.port, post("/v1/messages", messages_body(model))))
        assert status == 200
    with trio.fail_after(5):
        while True:
            _, _, text = split(await exchange(relay.port, get("/metrics")))
            if b'model="other",status="200"' in text:
                break
            await trio.sleep(0.02)
    assert b'model="mock/first-new",status="200"' in text and b"second-new" not in text


async def test_an_empty_x_api_key_does_not_hide_a_bearer_token(relay, upstream: MockUpstream) -> None:  # type: ignore[no-untyped-def]
    upstream.handler = lambda r: OK
    body = messages_body("mock-model")
    raw = (b"POST /v1/messages HTTP/1.1\r\nhost: x\r\nx-api-key: \r\nauthorization: Bearer " + RELAY_KEY.encode()
           + b"\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(body) + body)
    status, _, out = split(await exchange(relay.port, raw))
    assert status == 200, out
    wrong = raw.replace(b"x-api-key: \r\n", b"x-api-key: wrong\r\n")
    status, _, _ = split(await exchange(relay.port, wrong))
    assert status == 401


@pytest.mark.parametrize("where", [1990, 2000 - len(UPSTREAM_KEY) // 2, 1995])
async def test_an_upstream_key_echoed_across_the_message_cut_is_redacted(relay, upstream: MockUpstream, where: int) -> None:  # type: ignore[no-untyped-def]
    text = ("x" * where + UPSTREAM_KEY + " trailing words").encode()
    upstream.handler = lambda r: Reply(status=400, headers=[("content-type", "text/plain")], pieces=[text], chunked=False)
    status, _, body = split(await exchange(relay.port, post("/v1/messages", messages_body("mock-model"))))
    message = orjson.loads(body)["error"]["message"]
    assert status == 400
    assert not any(UPSTREAM_KEY[:n] in message for n in range(5, len(UPSTREAM_KEY) + 1)), message[-60:]
    assert "[redacted]" in message, message[-30:]
    assert not any(message.endswith("[redacted]"[:n]) for n in range(1, 10)), message[-30:]  # never half a marker


async def test_a_body_cut_inside_a_key_by_the_upstream_is_redacted(relay, upstream: MockUpstream) -> None:  # type: ignore[no-untyped-def]
    text = ("upstream says: your key " + UPSTREAM_KEY[:14]).encode()
    upstream.handler = lambda r: Reply(status=401, headers=[("content-type", "text/plain")], pieces=[text], chunked=False)
    _, _, body = split(await exchange(relay.port, post("/v1/messages", messages_body("mock-model"))))
    message = orjson.loads(body)["error"]["message"]
    assert UPSTREAM_KEY[:6] not in message and message.endswith("your key [redacted]"), message


FORGED = "x\n2026-01-01 00:00:00,000 INFO relay.access POST /v1/forged 200\x1b[31m"


@pytest.mark.parametrize("fmt", ["text", "json"])
async def test_client_and_upstream_words_cannot_forge_log_lines(nursery: trio.Nursery, upstream: MockUpstream,
                                                                 tmp_path: Path, fmt: str) -> None:
    """A model name (in the target, the failure note and the retry line) and an upstream error message (in
    the warning) carry a newline, a forged access line and an ANSI escape: each log line stays one line."""
    upstream.handler = lambda r: json_reply({"error": {"message": "upstream broke " + FORGED}}, 500)
    config = relay_config(upstream.base_url).replace("read_timeout = 5", "read_timeout = 5\nretries = 1\nmax_retry_wait = 0.01")
    async with relay_process(config, tmp_path, "--log-format", fmt) as (_, port, log_path):
        status, _, _ = split(await exchange(port, post("/v1/messages", messages_body("mock/" + FORGED))))
        assert status == 500
        with trio.fail_after(10):
            while log_path.read_bytes().count(b"/v1/messages") < 1:
                await trio.sleep(0.05)
    raw = log_path.read_bytes()
    assert b"\x1b" not in raw
    lines = raw.decode().splitlines()
    assert sum("upstream broke" in line for line in lines) >= 1  # the warning was logged, escaped
    if fmt == "json":
        docs = [orjson.loads(line) for line in lines]  # every line is one whole JSON object
        assert not any("forged" in d["msg"] and d["msg"].startswith("POST /v1/forged") for d in docs)
    else:
        starts = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) relay")
        assert all(starts.match(line) for line in lines), [l for l in lines if not starts.match(l)]
        assert not any(line.startswith("2026-01-01 00:00:00,000") for line in lines)
        assert any("\\n2026-01-01 00:00:00,000 INFO relay.access POST /v1/forged" in line for line in lines)


SCOPED = "scoped-key"


def scoped_config(upstream_url: str, patterns: str) -> str:
    """The test config plus a second provider on the same mock (so a request that escapes its scope is seen
    there), an alias that falls back across both, and a key limited to ``patterns``."""
    return relay_config(upstream_url, extra=f'''
[providers.other]
format = "anthropic"
base_url = "{upstream_url.removesuffix('/v1')}"
api_key = "other-upstream-key"
models = ["secret-model"]

[[keys]]
key = "{SCOPED}"
name = "scoped"
models = [{patterns}]
''').replace('"alias-model" = "mock/aliased-upstream-model"',
             '"alias-model" = "mock/aliased-upstream-model"\n"mixed" = ["other/secret-model", "mock/mock-model"]\n"mock-alias" = "other/secret-model"')


@pytest.mark.parametrize("name,system", [
    ("mock-model", "<relay-model>other/secret-model</relay-model> you are helpful"),  # (a) a tag
    ("mock-claude-opus", None),  # (b) a permitted-looking Claude id, routed by tier
    ("mock-alias", None),  # (c) an alias whose name matches the scope but points elsewhere
])
async def test_a_scoped_key_cannot_escape_its_models(nursery: trio.Nursery, upstream: MockUpstream, name: str,
                                                     system: str | None) -> None:
    relay = await start_relay(nursery, scoped_config(upstream.base_url, '"mock-*"').replace(
        'haiku = "mock/small-model"', 'haiku = "mock/small-model"\nopus = "other/secret-model"'))
    upstream.handler = lambda r: OK
    doc = orjson.loads(messages_body(name))
    if system:
        doc["system"] = system
    status, _, body = split(await exchange(relay.port, post("/v1/messages", orjson.dumps(doc), key=SCOPED)))
    assert status == 403 and orjson.loads(body)["error"]["type"] == "permission_error", body
    assert upstream.requests == []
    status, _, _ = split(await exchange(relay.port, post("/v1/messages", messages_body("mock-model"), key=SCOPED)))
    assert status == 200 and [r.json["model"] for r in upstream.requests] == ["mock-model"]


async def test_a_fallback_list_calls_only_the_targets_in_scope(nursery: trio.Nursery, upstream: MockUpstream) -> None:
    relay = await start_relay(nursery, scoped_config(upstream.base_url, '"mock/*"'))
    upstream.handler = lambda r: json_reply({"error": {"message": "down"}}, 503)
    status, _, _ = split(await exchange(relay.port, post("/v1/messages", messages_body("mixed"), key=SCOPED)))
    assert status == 503  # the allowed target failed; the out-of-scope fallback was never tried
    assert {r.path for r in upstream.requests} == {"/v1/chat/completions"}
    assert all(r.json["model"] == "mock-model" for r in upstream.requests)


async def test_count_tokens_and_models_show_only_what_the_key_may_use(nursery: trio.Nursery, upstream: MockUpstream) -> None:
    relay = await start_relay(nursery, scoped_config(upstream.base_url, '"mock/*"'))
    upstream.handler = lambda r: json_reply({"input_tokens": 42})
    count = orjson.dumps({"model": "other/secret-model", "messages": [{"role": "user", "content": "hi"}]})
    status, _, body = split(await exchange(relay.port, post("/v1/messages/count_tokens", count, key=SCOPED)))
    assert status == 403 and upstream.requests == [], body
    status, _, body = split(await exchange(relay.port, post("/v1/messages/count_tokens", count)))
    assert status == 200 and orjson.loads(body) == {"input_tokens": 42}  # an unscoped key is counted upstream
    status, _, body = split(await exchange(relay.port, get("/v1/models", SCOPED)))
    ids = [m["id"] for m in orjson.loads(body)["data"]]
    assert status == 200 and "mock/mock-model" in ids and not any("secret" in i or i in ("mixed", "mock-alias") for i in ids), ids
    status, _, body = split(await exchange(relay.port, get("/v1/models", RELAY_KEY)))
    assert "other/secret-model" in [m["id"] for m in orjson.loads(body)["data"]]
    status, _, _ = split(await exchange(relay.port, get("/v1/models/other/secret-model", SCOPED)))
    assert status == 404
    status, _, _ = split(await exchange(relay.port, get("/v1/models/mock/mock-model", SCOPED)))
    assert status == 200


@pytest.mark.parametrize("hard", [256, 4096], ids=["hard-limit-256", "raisable-to-4096"])
async def test_idle_sockets_past_the_open_file_limit_get_529_not_a_stall(upstream: MockUpstream, tmp_path: Path,
                                                                         hard: int) -> None:
    """Under a 256-file soft limit, 300 idle connections: relay raises the limit where the hard limit lets it
    (all are held and /health answers 200), else its guard, sized from the limit, answers 529 past it; either
    way /health gets an answer at once and nothing is logged as a traceback."""
    soft, own_hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1024 <= own_hard or own_hard == resource.RLIM_INFINITY:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, own_hard))  # the test itself holds 300+ sockets
    limit = lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    held: list[trio.SocketStream] = []
    async with relay_process(relay_config(upstream.base_url), tmp_path, preexec=limit) as (_, port, log_path):
        try:
            for _ in range(300):
                held.append(await trio.open_tcp_stream("127.0.0.1", port))
            with trio.fail_after(5):
                status, _, body = split(await exchange(port, get("/health")))
            refused = 0
            for stream in held:  # a refused connection has its 529 waiting; a held one has nothing to read
                with trio.move_on_after(0.01):
                    refused += b" 529 " in await stream.receive_some(4096)
        finally:
            for stream in held:
                await stream.aclose()
    log = log_path.read_text()
    assert "Traceback" not in log and "Too many open files" not in log, log[-2000:]
    if hard == 256:
        assert status == 529 and orjson.loads(body)["error"]["type"] == "overloaded_error"
        assert refused >= 300 - (256 - 64) // 2 and "max_connections 4096 lowered to 96" in log
    else:
        assert status == 200 and refused == 0 and "open-file limit raised from 256 to 4096" in log


# ---- bodies before a key, bytes behind a stream, framing --------------------------------------------------------

BIG = 30 * 1024 * 1024


def big_head(key: str | None, length: int = BIG, extra: bytes = b"") -> bytes:
    auth = b"" if key is None else b"x-api-key: " + key.encode() + b"\r\n"
    return (b"POST /v1/messages HTTP/1.1\r\nhost: x\r\n" + auth + b"content-type: application/json\r\n"
            b"content-length: %d\r\n" % length + extra + b"\r\n")


async def read_answer(stream: trio.SocketStream, seconds: float = 5) -> bytes:
    """Whatever relay answers until it closes (or ``seconds`` pass)."""
    out = b""
    with trio.move_on_after(seconds):
        while chunk := await stream.receive_some(65536):
            out += chunk
    return out


async def test_no_key_no_body_read(upstream: MockUpstream, tmp_path: Path) -> None:
    """60 connections without a key announce 30 MB bodies and send the first MB: each is refused with 401 as
    soon as its head is in (without waiting for the body), the connection closes, and relay holds nothing."""
    async with relay_process(relay_config(upstream.base_url), tmp_path) as (proc, port, _):
        before = rss(proc.pid)
        streams = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(60)]
        answers: list[bytes] = []

        async def attack(stream: trio.SocketStream) -> None:
            await stream.send_all(big_head(None))
            with trio.move_on_after(1):  # relay may close before all of it is taken
                try:
                    await stream.send_all(b"x" * (1024 * 1024))
                except trio.BrokenResourceError:
                    pass
            answers.append(await read_answer(stream))

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for stream in streams:
                    nursery.start_soon(attack, stream)
        grown = rss(proc.pid) - before
        for stream in streams:
            await stream.aclose()
    assert len(answers) == 60 and all(a.startswith(b"HTTP/1.1 401 ") and b"connection: close" in a for a in answers)
    assert grown < 20 * 1024 * 1024, f"relay grew {grown / 1e6:.0f} MB"
    assert upstream.requests == []


async def test_bodies_share_one_memory_budget(nursery: trio.Nursery, upstream: MockUpstream) -> None:
    """With keys, each body is bounded by body_limit and all of them together by body_memory: a body that would
    take the total past it gets 529 with retry-after, and once the first is answered, room is back."""
    upstream.handler = lambda r: OK
    relay = await start_relay(nursery, relay_config(upstream.base_url).replace(
        "[server]", "[server]\nbody_limit = 3000000\nbody_memory = 4000000"))
    body = orjson.dumps({"model": "mock-model", "max_tokens": 5, "messages": [
        {"role": "user", "content": "x" * 2_500_000}]})
    holder = await trio.open_tcp_stream("127.0.0.1", relay.port)
    await holder.send_all(big_head(RELAY_KEY, len(body)) + body[:-10])  # 2.5 MB held, the last bytes not sent
    await trio.sleep(0.3)
    assert relay.server.bodies.held >= 2_000_000
    second = await trio.open_tcp_stream("127.0.0.1", relay.port)
    await second.send_all(big_head(RELAY_KEY, len(body)))
    with trio.move_on_after(2):
        try:
            await second.send_all(body)
        except trio.BrokenResourceError:
            pass
    answer = await read_answer(second)
    assert answer.startswith(b"HTTP/1.1 529 ") and b"retry-after: 1" in answer, answer[:300]
    await holder.send_all(body[-10:])
    status, _, _ = split(await read_answer(holder, 2))
    assert status == 200
    assert relay.server.bodies.held == 0
    status, _, _ = split(await exchange(relay.port, post("/v1/messages", body)))
    assert status == 200  # room is back


async def test_a_body_read_never_asks_past_the_budgets_room() -> None:
    """A body's reads ask for at most what the global budget has left (reads of up to 1 MiB would otherwise let
    many connections together hold up to 1 MiB each past it before the count refuses them)."""
    from relay.errors import RelayError
    from relay.http import BodyBudget, Connection, read_body

    ours, theirs = trio.socket.socketpair()
    conn = Connection(trio.SocketStream(ours), 65536)
    asked: list[tuple[int, int]] = []  # (bytes a read asked for, the budget's room then)

    class Recording:
        def __init__(self, inner: Any) -> None:
            self.inner = inner

        async def receive_some(self, max_bytes: int) -> bytes:
            asked.append((max_bytes, budget.room()))
            return await self.inner.receive_some(max_bytes)

        def __getattr__(self, name: str) -> Any:
            return getattr(self.inner, name)

    conn.stream = Recording(conn.stream)  # type: ignore[assignment]
    budget = BodyBudget(400_000)
    budget.take(250_000)  # other connections' bodies
    body = b"x" * 300_000
    head = b"POST /v1/messages HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n" % len(body)
    peer = trio.SocketStream(theirs)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(peer.send_all, head + body)
        request = await conn.next_event()
        del asked[:]  # the head's read (h11's, a fixed size): what follows is the body's
        with pytest.raises(RelayError) as refused:
            await read_body(conn, list(request.headers), 10_000_000, budget, 5)
        nursery.cancel_scope.cancel()
    assert refused.value.status == 529
    assert asked and all(size <= max(room, 1) for size, room in asked), asked
    assert budget.held == 250_000  # what this body took was given back


async def test_expect_100_continue_only_after_the_key(relay, upstream: MockUpstream) -> None:  # type: ignore[no-untyped-def]
    upstream.handler = lambda r: OK
    body = messages_body()
    for key, first in ((RELAY_KEY, b"HTTP/1.1 100 "), ("wrong-key", b"HTTP/1.1 401 ")):
        stream = await trio.open_tcp_stream("127.0.0.1", relay.port)
        await stream.send_all(big_head(key, len(body), b"expect: 100-continue\r\n"))
        with trio.fail_after(5):
            interim = await stream.receive_some(65536)
        assert interim.startswith(first), interim
        if key == RELAY_KEY:
            await stream.send_all(body)
            with trio.fail_after(5):
                rest = b""
                while b'"ok"' not in rest:
                    rest += await stream.receive_some(65536)
            assert b"HTTP/1.1 200 " in interim + rest
        await stream.aclose()
    assert len(upstream.requests) == 1


async def test_memory_is_given_back_after_large_bodies(upstream: MockUpstream, tmp_path: Path) -> None:
    """Eight 20 MB bodies at once, then nothing: relay's resident memory comes back near where it was."""
    upstream.handler = lambda r: OK
    body = orjson.dumps({"model": "mock-model", "messages": [{"role": "user", "content": "word " * 4_000_000}]})
    async with relay_process(relay_config(upstream.base_url), tmp_path) as (proc, port, _):
        await exchange(port, post("/v1/messages/count_tokens", messages_body()))
        before = rss(proc.pid)

        async def one() -> None:
            status, _, _ = split(await exchange(port, post("/v1/messages/count_tokens", body)))
            assert status == 200

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for _ in range(8):
                    nursery.start_soon(one)
        await trio.sleep(0.5)
        await exchange(port, get("/health"))
        kept = rss(proc.pid) - before
    assert kept < 40 * 1024 * 1024, f"{kept / 1e6:.0f} MB still resident after the bodies were answered"


async def test_heap_is_trimmed_after_bodies_stop_not_between_them(monkeypatch: pytest.MonkeyPatch,
                                                                    autojump_clock: trio.testing.MockClock) -> None:
    """1 MiB bodies one after another are not interrupted by a trim (each would fault the next body's pages back
    in) until TRIM_LATEST; once TRIM_AFTER was answered and the large bodies stop, the heap is trimmed once, small
    bodies going on or not."""
    from relay import http

    trims: list[float] = []
    monkeypatch.setattr(http, "trim_heap", lambda: trims.append(trio.current_time()))
    budget = http.BodyBudget(1 << 30)
    mib = 1 << 20

    async def bodies(size: int, count: int, every: float) -> float:
        for _ in range(count):
            budget.take(size)
            await trio.sleep(every / 2)
            budget.give(size)
            await trio.sleep(every / 2)
        return trio.current_time()

    async with trio.open_nursery() as nursery:
        await nursery.start(budget.run)
        last = await bodies(mib, 60, 0.02)  # 60 MiB in 1.2 s: never a quiet spell, and not yet TRIM_LATEST
        assert trims == []
        await trio.sleep(1)
        assert len(trims) == 1
        assert last + http.TRIM_QUIET <= trims[0] <= last + 2 * http.TRIM_QUIET + 0.01
        await bodies(mib, 1, 0.02)  # less than TRIM_AFTER since: no second trim
        await trio.sleep(1)
        assert len(trims) == 1

        last = await bodies(mib, 10, 0.02)  # due again; then small bodies, 20 a second, go on: quiet all the same
        await bodies(2000, 20, 0.05)
        assert len(trims) == 2 and last + http.TRIM_QUIET <= trims[1] <= last + 2 * http.TRIM_QUIET + 0.01

        start = trio.current_time()  # large bodies without end: a trim at the latest TRIM_LATEST after it is due
        await bodies(mib, 300, 0.02)
        spans = [b - a for a, b in zip(trims[2:], trims[3:])]
        assert len(trims) - 2 >= (trio.current_time() - start) // (http.TRIM_LATEST + 0.2) - 1
        assert spans and all(http.TRIM_LATEST <= d <= http.TRIM_LATEST + 0.3 for d in spans), spans
        nursery.cancel_scope.cancel()


async def test_bytes_sent_behind_a_stream_are_bounded(relay, upstream: MockUpstream) -> None:  # type: ignore[no-untyped-def]
    """A client (with a key) writes junk while its stream runs: relay holds at most a request head's worth of
    it, then closes the connection (and the upstream stream), instead of buffering without end."""
    chunks = [{"choices": [{"index": 0, "delta": {"content": f"w{n} "}}]} for n in range(40)]
    pieces: list[bytes | float] = []
    for piece in sse(*chunks):
        pieces += [piece, 0.1]
    upstream.handler = lambda r: Reply(pieces=pieces)
    stream = await trio.open_tcp_stream("127.0.0.1", relay.port)
    await stream.send_all(post("/v1/messages", messages_body(stream=True)))
    with trio.fail_after(5):
        first = await stream.receive_some(65536)
    assert first.startswith(b"HTTP/1.1 200 ")
    sent = 0
    with trio.move_on_after(3):
        try:
            while sent < 8 * 1024 * 1024:
                await stream.send_all(b"J" * 65536)
                sent += 65536
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
    rest = await read_answer(stream, 5)
    assert b"w39" not in rest  # cut off, not served to the end
    assert sent < 4 * 1024 * 1024, f"relay took {sent} bytes"
    with trio.fail_after(5):
        await upstream.cancelled.wait()  # the upstream stream was closed too
    await stream.aclose()


@pytest.mark.parametrize("head", [
    b"POST /v1/messages HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n",
    b"POST /v1/messages HTTP/1.1\r\nhost: x\r\ntransfer-encoding:\r\n chunked\r\n",
    b"POST /v1/messages HTTP/1.1\r\nhost: x\r\nx-note: a\r\n\tb\r\ncontent-length: 5\r\n",
], ids=["content-length-and-transfer-encoding", "folded-transfer-encoding", "folded-header"])
@pytest.mark.parametrize("split_at", [None, -3])
async def test_ambiguous_framing_is_refused_and_closed(relay, head: bytes, split_at: int | None) -> None:  # type: ignore[no-untyped-def]
    raw = head.replace(b"host: x\r\n", b"host: x\r\nx-api-key: " + RELAY_KEY.encode() + b"\r\n") + b"\r\n5\r\nhello\r\n0\r\n\r\n"
    stream = await trio.open_tcp_stream("127.0.0.1", relay.port)
    cut = len(head) + (split_at or 0) if split_at else len(raw)
    await stream.send_all(raw[:cut])  # a fold split across two reads is seen too
    await trio.sleep(0.05)
    await stream.send_all(raw[cut:])
    answer = await read_answer(stream)
    assert answer.startswith(b"HTTP/1.1 400 ") and b"connection: close" in answer, answer
    await stream.aclose()


async def test_a_pipelined_folded_request_is_refused(relay, upstream: MockUpstream) -> None:  # type: ignore[no-untyped-def]
    upstream.handler = lambda r: OK
    good = post("/v1/messages", messages_body())
    folded = post("/v1/messages", messages_body()).replace(b"host: relay\r\n", b"host: relay\r\nx-a: 1\r\n 2\r\n")
    stream = await trio.open_tcp_stream("127.0.0.1", relay.port)
    await stream.send_all(good + folded)
    answer = await read_answer(stream)
    assert answer.startswith(b"HTTP/1.1 200 ") and b"HTTP/1.1 400 " in answer and len(upstream.requests) == 1


def window_probing_upstream(upstream: MockUpstream) -> None:
    """A local server (LM Studio's shape) that lists one model and describes it by name; chat answers `ok`."""
    def handle(r):  # type: ignore[no-untyped-def]
        if r.path == "/v1/models":
            return json_reply({"object": "list", "data": [{"id": "listed-model", "object": "model"}]})
        if r.path == "/api/v0/models/org%2Fnamed%20model":
            return json_reply({"id": "org/named model", "max_context_length": 40960})
        if r.path.startswith("/v1/chat/completions"):
            return OK
        return json_reply({"error": {"message": "not found"}}, 404)
    upstream.handler = handle


async def test_window_discovery_sends_no_client_chosen_path_and_keeps_no_entry_per_name(
        nursery: trio.Nursery, upstream: MockUpstream) -> None:
    """Issue 19 item 7: a model name once became the probe URL's path, sent with the provider's key, and every new
    name cost four probes and a cache entry forever."""
    window_probing_upstream(upstream)
    relay = await start_relay(nursery, f"""
[server]
api_keys = ["{RELAY_KEY}"]
[providers.loc]
preset = "lmstudio"
base_url = "{upstream.base_url}"
api_key = "{UPSTREAM_KEY}"
auth = "bearer"
[routes]
default = "loc/org/named model"
""")
    attacks = ["loc/../../internal?a=1", "loc/..", "loc/%2e%2e/%2e%2e/internal", "loc/a#frag", "loc/x/../../../etc",
               *(f"loc/junk-{i}" for i in range(40))]
    for name in [*attacks, "loc/listed-model", "claude-sonnet-4-5", "loc/listed-model"]:
        status, _, _ = split(await exchange(relay.port, post("/v1/messages", messages_body(name), key=RELAY_KEY)))
        assert status == 200, name
    paths = [r.path for r in upstream.requests if not r.path.startswith("/v1/chat/completions")]
    # the name-free description once, then one model named by the config and one the server lists, each once
    assert sorted(paths) == sorted(["/v1/models", "/props", "/api/v0/models/org%2Fnamed%20model",
                                    "/api/v0/models/listed-model", "/api/show"]), paths
    shows = [r.json["model"] for r in upstream.requests if r.path == "/api/show"]
    assert shows == ["listed-model"]  # the named model was found on LM Studio's path; ollama's is a body, not a path
    assert not [p for p in paths if "internal" in p or ".." in p or "etc" in p or "junk" in p]
    for r in upstream.requests:
        if "/api/" in r.path or r.path in ("/v1/models", "/props"):
            assert r.headers.get("authorization") == f"Bearer {UPSTREAM_KEY}"  # the key went only to these
    kept = relay.server.known._found
    assert set(kept) == {("loc", "org/named model"), ("loc", "listed-model")}, kept
    assert kept[("loc", "org/named model")] == 40960


def test_the_discovered_windows_table_is_bounded() -> None:
    from relay.config import Config, Provider
    from relay.context import WINDOWS_KEPT, Limits
    from relay.routing import named_targets

    provider = Provider("loc", "http://127.0.0.1:9/v1", models=tuple(f"m{i}" for i in range(WINDOWS_KEPT + 50)),
                        discover_context=True)
    asked: list[str] = []

    async def fetch(provider: Provider, url: str, body: bytes | None) -> None:
        asked.append(url)

    limits = Limits(fetch, named_targets(Config(providers={"loc": provider})))
    for model in provider.models:
        trio.run(limits.window_of, provider, model)
    assert len(limits._found) == WINDOWS_KEPT
    assert asked.count("http://127.0.0.1:9/v1/models") == 1  # the name-free description: once per provider
