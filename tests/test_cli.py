"""The installed commands as a user runs them: a real relay process in front of a mock upstream."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import anthropic
import pytest
import trio

from relay import __version__
from tests.conftest import RELAY_KEY, UPSTREAM_KEY, relay_config
from tests.mock_upstream import MockUpstream, text_stream


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "relay", *args], capture_output=True, text=True, timeout=60, env=env)


def test_version() -> None:
    out = run_cli("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"relay {__version__}"


def test_check_prints_resolution(tmp_path: Path) -> None:
    cfg = tmp_path / "relay.toml"
    cfg.write_text(relay_config("http://127.0.0.1:1/v1"))
    out = run_cli("check", "-c", str(cfg), "claude-3-5-haiku", "alias-model")
    assert out.returncode == 0, out.stderr
    assert "provider mock: format=openai base_url=http://127.0.0.1:1/v1 1 key(s)" in out.stdout
    assert "resolve claude-3-5-haiku -> mock/small-model" in out.stdout
    assert "resolve alias-model -> mock/aliased-upstream-model" in out.stdout
    assert UPSTREAM_KEY not in out.stdout


def test_check_reports_config_error_with_line(tmp_path: Path) -> None:
    cfg = tmp_path / "relay.toml"
    cfg.write_text(relay_config("http://x/v1").replace("read_timeout = 5", "read_timout = 5"))
    out = run_cli("check", "-c", str(cfg))
    assert out.returncode == 2
    assert re.search(r"relay\.toml:\d+: providers\.mock\.read_timout: unknown key", out.stderr)
    assert "Traceback" not in out.stderr


async def test_serve_process_end_to_end(nursery: trio.Nursery, upstream: MockUpstream, tmp_path: Path) -> None:
    upstream.handler = lambda r: text_stream("from ", "a real process")
    cfg = tmp_path / "relay.toml"
    cfg.write_text(relay_config(upstream.base_url))
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "relay", "serve", "-c", str(cfg), "--port", "0"], stderr=subprocess.PIPE)
    try:
        assert proc.stderr is not None
        log = b""
        with trio.fail_after(20):
            while b"listening on" not in log:
                log += await proc.stderr.receive_some(4096)
        port = int(re.search(rb"listening on http://127\.0\.0\.1:(\d+)", log).group(1))  # type: ignore[union-attr]

        def call() -> str:
            client = anthropic.Anthropic(base_url=f"http://127.0.0.1:{port}", api_key=RELAY_KEY, max_retries=0)
            with client.messages.stream(model="claude-sonnet-test", max_tokens=20,
                                        messages=[{"role": "user", "content": "secret prompt text"}]) as s:
                return s.get_final_text()

        assert await trio.to_thread.run_sync(call) == "from a real process"
        with trio.fail_after(10):
            while b"POST /v1/messages" not in log:
                log += await proc.stderr.receive_some(4096)
        access = log.decode()
        assert re.search(r"POST /v1/messages 200 model=claude-sonnet-test -> mock/mock-model stream ttfb=[\d.]+ms dur=[\d.]+ms in=10 out=5", access), access
        assert "secret prompt text" not in access and UPSTREAM_KEY not in access and RELAY_KEY not in access
    finally:
        proc.terminate()
        with trio.move_on_after(10):
            await proc.wait()


def test_claude_settings(tmp_path: Path) -> None:
    cfg = tmp_path / "relay.toml"
    cfg.write_text(relay_config("http://127.0.0.1:1/v1").replace("[server]", "[server]\nport = 9911"))
    out = run_cli("claude-settings", "-c", str(cfg))
    assert out.returncode == 0, out.stderr
    import json
    assert json.loads(out.stdout) == {"env": {"ANTHROPIC_BASE_URL": "http://127.0.0.1:9911", "ANTHROPIC_AUTH_TOKEN": RELAY_KEY}}


def test_claude_settings_size_compaction_for_the_model_claude_code_asks_for_by_default(tmp_path: Path) -> None:
    """With ANTHROPIC_MODEL unset Claude Code 2.1.332 asks for claude-opus-…: the opus route's window counts."""
    cfg = tmp_path / "relay.toml"
    cfg.write_text('''
[providers.local]
base_url = "http://127.0.0.1:1/v1"
auth = "none"
models = ["small", "big"]
[providers.local.limits]
small = { context_window = 32000 }
big = { context_window = 64000 }
[routes]
sonnet = "local/small"
opus = "local/big"
''')
    import json
    import os
    env = {k: v for k, v in os.environ.items() if k != "ANTHROPIC_MODEL"}
    out = run_cli("claude-settings", "-c", str(cfg), env=env)
    assert out.returncode == 0, out.stderr
    settings = json.loads(out.stdout)["env"]
    from relay.launcher import compaction_env
    assert compaction_env(64000) != compaction_env(32000)
    assert {k: settings[k] for k in compaction_env(64000)} == compaction_env(64000)


def test_relay_claude_starts_a_relay_and_runs_claude(tmp_path: Path) -> None:
    """`relay claude` with a stand-in `claude` on PATH: it must see relay's URL and key, and relay must answer."""
    import os
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = tmp_path / "relay.toml"
    cfg.write_text(relay_config("http://127.0.0.1:1/v1", "context_window = 65536").replace("[server]", f"[server]\nport = {port}"))
    fake = tmp_path / "bin" / "claude"
    fake.parent.mkdir()
    fake.write_text(f"#!{sys.executable}\nimport os, sys, urllib.request\n"
                    "print(os.environ['ANTHROPIC_BASE_URL'], os.environ['ANTHROPIC_AUTH_TOKEN'], *sys.argv[1:])\n"
                    "print(os.environ.get('CLAUDE_CODE_AUTO_COMPACT_WINDOW'))\n"
                    "print(urllib.request.urlopen(os.environ['ANTHROPIC_BASE_URL'] + '/health').status)\n")
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "CLAUDE_CODE_"))}
    env["PATH"] = f"{fake.parent}:{os.environ['PATH']}"
    out = run_cli("claude", "-c", str(cfg), "-p", "hello", env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [f"http://127.0.0.1:{port}", RELAY_KEY, "-p", "hello", "100000", "200"]


def test_relay_claude_port_finds_or_starts_a_relay_there_with_no_config(tmp_path: Path) -> None:
    """README: `make run ARGS="--port 9000"`, then `relay claude --port 9000`; with no config file relay claude once
    looked only at 8787 (and started a second relay there)."""
    import os
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    fake = tmp_path / "bin" / "claude"
    fake.parent.mkdir()
    fake.write_text(f"#!{sys.executable}\nimport os, sys, urllib.request\n"
                    "print(os.environ['ANTHROPIC_BASE_URL'], *sys.argv[1:])\n"
                    "print(urllib.request.urlopen(os.environ['ANTHROPIC_BASE_URL'] + '/health').status)\n")
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "CLAUDE_CODE_", "RELAY_", "OPENAI_"))}
    env.update(PATH=f"{fake.parent}:{os.environ['PATH']}", OPENAI_BASE_URL="http://127.0.0.1:1/v1")
    out = run_cli("claude", "--port", str(port), "-p", "hello", "--port", "x", env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [f"http://127.0.0.1:{port}", "-p", "hello", "--port", "x", "200"]
    # it started one (nothing listened there) and said from what
    assert f"nothing listens on 127.0.0.1:{port}" in out.stderr and "OPENAI_API_KEY NOT SET" in out.stderr


def test_refuses_open_relay_on_public_address(tmp_path: Path) -> None:
    cfg = tmp_path / "relay.toml"
    cfg.write_text('[providers.p]\nbase_url = "http://127.0.0.1:1/v1"\n')
    out = run_cli("serve", "-c", str(cfg), "--host", "0.0.0.0", "--port", "0")
    assert out.returncode == 2 and "--allow-open" in out.stderr


async def start_process(cfg: Path) -> tuple[trio.Process, int, list[bytes]]:
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "relay", "serve", "-c", str(cfg), "--port", "0"], stderr=subprocess.PIPE)
    assert proc.stderr is not None
    log = [b""]
    with trio.fail_after(20):
        while b"listening on" not in log[0]:
            log[0] += await proc.stderr.receive_some(4096)
    port = int(re.search(rb"listening on http://127\.0\.0\.1:(\d+)", log[0]).group(1))  # type: ignore[union-attr]
    return proc, port, log


async def test_sigterm_lets_open_stream_finish_and_sighup_reloads(nursery: trio.Nursery, upstream: MockUpstream, tmp_path: Path) -> None:
    import signal
    from tests.mock_upstream import Reply, chunk, sse
    upstream.handler = lambda r: Reply(pieces=[*sse(chunk({"content": "first "}), done=False), 1.0,
                                               *sse(chunk({"content": "second"}), chunk({}, "stop"))])
    cfg = tmp_path / "relay.toml"
    cfg.write_text(relay_config(upstream.base_url))
    proc, port, log = await start_process(cfg)
    try:
        # SIGHUP with a broken file: refused, old config kept; then a good one: taken
        cfg.write_text("[broken")
        proc.send_signal(signal.SIGHUP)
        assert proc.stderr is not None
        with trio.fail_after(10):
            while b"reload refused" not in log[0]:
                log[0] += await proc.stderr.receive_some(4096)
        cfg.write_text(relay_config(upstream.base_url).replace('default = "mock/mock-model"', 'default = "mock/reloaded-model"'))
        proc.send_signal(signal.SIGHUP)
        with trio.fail_after(10):
            while b"reloaded config" not in log[0]:
                log[0] += await proc.stderr.receive_some(4096)

        result: list[str] = []

        def call() -> None:
            client = anthropic.Anthropic(base_url=f"http://127.0.0.1:{port}", api_key=RELAY_KEY, max_retries=0)
            with client.messages.stream(model="anything", max_tokens=20, messages=[{"role": "user", "content": "x"}]) as s:
                result.append(s.get_final_text())

        async with trio.open_nursery() as inner:
            inner.start_soon(trio.to_thread.run_sync, call)
            with trio.fail_after(10):
                while not upstream.requests:
                    await trio.sleep(0.02)
            proc.send_signal(signal.SIGTERM)  # mid-stream: the stream must still complete
        assert result == ["first second"]
        assert upstream.requests[-1].json["model"] == "reloaded-model"
        with trio.fail_after(10):
            assert await proc.wait() == 0
        with pytest.raises(OSError):
            await trio.open_tcp_stream("127.0.0.1", port)  # no longer accepting
    finally:
        if proc.returncode is None:
            proc.kill()


def test_json_log_format() -> None:
    import json
    import logging

    from relay.log import JSONFormatter
    record = logging.LogRecord("relay.access", logging.INFO, __file__, 1, "POST /v1/messages 200", None, None)
    record.fields = {"status": 200, "request_id": "req_x", "ttfb_ms": 1.5}
    doc = json.loads(JSONFormatter().format(record))
    assert doc["level"] == "info" and doc["msg"] == "POST /v1/messages 200"
    assert doc["status"] == 200 and doc["request_id"] == "req_x" and doc["ttfb_ms"] == 1.5


async def test_workers_share_the_port_and_are_replaced(nursery: trio.Nursery, upstream: MockUpstream, tmp_path: Path) -> None:
    import os
    import signal
    upstream.handler = lambda r: text_stream("hi")
    cfg = tmp_path / "relay.toml"
    cfg.write_text(relay_config(upstream.base_url))
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "relay", "serve", "-c", str(cfg), "--port", "0", "--workers", "2"], stderr=subprocess.PIPE)
    assert proc.stderr is not None
    log = b""
    try:
        with trio.fail_after(30):
            while log.count(b"listening on http://127.0.0.1:") < 3:  # the supervisor and two workers
                log += await proc.stderr.receive_some(4096)
        port = int(re.search(rb"listening on http://127\.0\.0\.1:(\d+) with 2 workers", log).group(1))  # type: ignore[union-attr]

        def call() -> str:
            client = anthropic.Anthropic(base_url=f"http://127.0.0.1:{port}", api_key=RELAY_KEY, max_retries=0)
            return client.messages.create(model="mock-model", max_tokens=5, messages=[{"role": "user", "content": "x"}],
                                          stream=False).content[0].text  # type: ignore[union-attr]

        from tests.mock_upstream import completion
        upstream.handler = lambda r: completion({"content": "hi"})
        for _ in range(4):
            assert await trio.to_thread.run_sync(call) == "hi"
        children = [int(p) for p in open(f"/proc/{proc.pid}/task/{proc.pid}/children").read().split()]
        assert len(children) == 2
        os.kill(children[0], signal.SIGKILL)  # a crashed worker is replaced
        with trio.fail_after(20):
            while b"starting another" not in log:
                log += await proc.stderr.receive_some(4096)
            while log.count(b"listening on http://127.0.0.1:") < 4:
                log += await proc.stderr.receive_some(4096)
        assert await trio.to_thread.run_sync(call) == "hi"
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(20):
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()


def test_compaction_env_for_small_windows() -> None:
    from relay.launcher import compaction_env
    assert compaction_env(200_000) == {"CLAUDE_CODE_AUTO_COMPACT_WINDOW": "200000"}
    assert compaction_env(40_000) == {"CLAUDE_CODE_AUTO_COMPACT_WINDOW": "100000", "CLAUDE_AUTOCOMPACT_PCT_OVERRIDE": "42"}
    assert compaction_env(64_000)["CLAUDE_AUTOCOMPACT_PCT_OVERRIDE"] == "68"  # compact at 54.4k of 64k


def test_client_text_cannot_forge_log_lines() -> None:
    from relay.log import printable
    assert printable("claude-sonnet-4-5") == "claude-sonnet-4-5"
    forged = printable("x\n2026-01-01 INFO relay.access POST /v1/messages 200 \x1b[2J")
    assert "\n" not in forged and "\x1b" not in forged and forged.startswith("x\\n2026")
    assert len(printable("a" * 5000)) == 201


def test_workers_count_takes_numbers_and_auto() -> None:
    import argparse

    from relay.cli import build_parser, workers_count

    assert workers_count("3") == 3
    assert workers_count("auto") == len(os.sched_getaffinity(0))
    for bad in ("0", "-2", "many"):
        with pytest.raises(argparse.ArgumentTypeError):
            workers_count(bad)
    assert build_parser().parse_args(["serve", "--workers", "auto"]).workers >= 1


@pytest.mark.parametrize("base_url", ["127.0.0.1:8080/v1", "localhost:8080", "api.example.com/v1"])
def test_a_base_url_without_a_scheme_is_refused_at_load(tmp_path: Path, base_url: str) -> None:
    """It used to pass `relay check`, then every request failed with a 500 and a retry (issue 18, item 5)."""
    cfg = tmp_path / "relay.toml"
    cfg.write_text(relay_config(base_url))
    out = run_cli("check", "-c", str(cfg))
    assert out.returncode == 2, out.stdout
    assert re.search(rf"relay\.toml:\d+: providers\.mock\.base_url: '{re.escape(base_url)}' needs to start with "
                     rf"http:// or https:// \(e\.g\. http://{re.escape(base_url)}\)", out.stderr), out.stderr
    env = {k: v for k, v in os.environ.items() if k != "RELAY_CONFIG"}
    out = run_cli("check", env={**env, "OPENAI_BASE_URL": base_url})
    assert out.returncode == 2 and f"OPENAI_BASE_URL: '{base_url}' needs to start with http://" in out.stderr
    assert "Traceback" not in out.stderr


def test_check_suggests_the_ids_claude_code_asks_for() -> None:
    env = {k: v for k, v in os.environ.items() if k != "RELAY_CONFIG"}
    out = run_cli("check", env={**env, "RELAY_DEFAULT_MODEL": "gpt-4.1"})
    assert out.returncode == 0, out.stderr
    for model in ("claude-opus-5-5", "claude-sonnet-5-5", "claude-haiku-5-5"):  # what 2.1.331 sends (launcher.py)
        assert f"resolve {model} -> openai/gpt-4.1" in out.stdout, out.stdout


def test_relay_claude_help_is_relays_own() -> None:
    out = run_cli("claude", "--help", env={**os.environ, "PATH": "/nonexistent"})  # no claude on PATH: never run
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: relay claude") and "relay claude -- --help" in out.stdout


def test_relay_usage_into_a_closed_pipe_is_quiet(tmp_path: Path) -> None:
    """`relay usage | head -1`: the reader stops early; relay must not print a BrokenPipeError traceback."""
    import trio

    from relay.store import Batch, UsageRow, connected

    db = tmp_path / "usage.sqlite3"

    async def write() -> None:
        async with connected(f"sqlite://{db}") as backend:  # more lines than a pipe buffer holds
            await backend.apply(Batch([UsageRow(f"key{n}", "model", "2025-01-01", 1, 0, 1, 1) for n in range(3000)], {}))

    trio.run(write)
    out = subprocess.run(f"{sys.executable} -m relay usage --db {db} | head -1", shell=True, capture_output=True,
                         text=True, timeout=60)
    assert out.stdout.startswith("key ") and out.stderr == "", out.stderr


def _fresh_connection(port: int, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
    """One request on a connection of its own, so the kernel may hand each to either worker."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        conn.request(method, path, body=body or None, headers={"x-api-key": RELAY_KEY, "content-type": "application/json"})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _counters(text: str) -> dict[str, float]:
    """Every counter-like sample of a scrape (counters, histogram buckets, sums and counts), by series."""
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and not line.startswith(("relay_open_streams", "relay_store_")):
            series, _, value = line.rpartition(" ")
            samples[series] = float(value)
    return samples


async def test_workers_metrics_count_the_whole_instance(nursery: trio.Nursery, upstream: MockUpstream, tmp_path: Path) -> None:
    """A scrape lands on one worker but reports every worker's requests; its counters never go back, not
    even when a worker dies and is replaced."""
    import json
    import os
    import signal

    from tests.mock_upstream import completion
    upstream.handler = lambda r: completion({"content": "hi"})
    cfg = tmp_path / "relay.toml"
    cfg.write_text(relay_config(upstream.base_url))
    run_root = tmp_path / "run"
    run_root.mkdir()
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "relay", "serve", "-c", str(cfg), "--port", "0", "--workers", "2"], stderr=subprocess.PIPE,
        env={**os.environ, "TMPDIR": str(run_root)})  # the supervisor's run directory lands where the test can look
    assert proc.stderr is not None
    log = b""
    body = json.dumps({"model": "mock-model", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}).encode()
    messages = 'relay_requests_total{path="/v1/messages",provider="mock",model="mock-model",status="200"}'
    last: dict[str, float] = {}

    def send(n: int) -> None:
        for _ in range(n):
            status, answer = _fresh_connection(port, "POST", "/v1/messages", body)
            assert status == 200, answer

    async def scrape() -> float:
        nonlocal last
        status, text = await trio.to_thread.run_sync(_fresh_connection, port, "GET", "/metrics")
        assert status == 200
        now = _counters(text.decode())
        went_back = {series: (value, now.get(series)) for series, value in last.items() if now.get(series, -1) < value}
        assert not went_back, went_back
        last = now
        return now.get(messages, 0)

    async def scrapes_reach(total: int) -> None:
        with trio.fail_after(20):
            while await scrape() != total:
                await trio.sleep(0.2)
        for _ in range(6):  # and stay there, whichever worker answers
            assert await scrape() == total

    try:
        with trio.fail_after(30):
            while log.count(b"listening on http://127.0.0.1:") < 3:  # the supervisor and two workers
                log += await proc.stderr.receive_some(4096)
        port = int(re.search(rb"listening on http://127\.0\.0\.1:(\d+) with 2 workers", log).group(1))  # type: ignore[union-attr]
        await trio.to_thread.run_sync(send, 20)
        await scrapes_reach(20)
        [run_dir] = run_root.iterdir()
        per_worker = {path.name: json.loads(path.read_bytes()) for path in run_dir.glob("*.json")}
        served = {name: sum(v for k, v in snap["requests"] if k[0] == "/v1/messages") for name, snap in per_worker.items()}
        assert len(served) == 2 and all(served.values()), served  # both workers served some: the sum is not one worker's

        children = [int(p) for p in open(f"/proc/{proc.pid}/task/{proc.pid}/children").read().split()]
        os.kill(children[0], signal.SIGKILL)  # its last totals stay in the instance's
        with trio.fail_after(20):
            while log.count(b"listening on http://127.0.0.1:") < 4:
                log += await proc.stderr.receive_some(4096)
        assert (run_dir / "retired.json").exists() and not (run_dir / f"{children[0]}.json").exists()
        await scrapes_reach(20)
        await trio.to_thread.run_sync(send, 6)
        await scrapes_reach(26)
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(20):
            assert await proc.wait() == 0
        assert not run_dir.exists()
    finally:
        if proc.returncode is None:
            proc.kill()


def test_a_worker_whose_run_directory_is_gone_still_answers_metrics(tmp_path: Path) -> None:
    """Metrics are never worth a worker: a run directory that cannot be written leaves /metrics to this worker's
    own counters (logged once) instead of an error, and a dead worker's totals fold into the retired file once."""
    import os

    from relay.instance_metrics import RETIRED, Board, retire
    from relay.metrics import Metrics
    metrics = Metrics(["m"])
    metrics.request_done("/v1/messages", "p", "m", 200, 0.1, 0.01, 5, 6)
    line = 'relay_requests_total{path="/v1/messages",provider="p",model="m",status="200"} 1'
    assert line in Board(tmp_path / "gone", metrics).render().decode()
    board = Board(tmp_path, metrics)
    assert line in board.render().decode()
    retire(tmp_path, os.getpid())  # as the supervisor does when this worker has exited
    assert sorted(p.name for p in tmp_path.glob("*.json")) == [RETIRED]
    assert line in Board(tmp_path, Metrics(["m"])).render().decode()  # a fresh worker: the retired totals stay
