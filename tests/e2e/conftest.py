"""Fixtures for end-to-end tests with the real Claude Code CLI.

claude_bin   the pinned CLI, npm-installed once into a cache outside the repo (skips when npm is missing or fails)
upstream     a ScriptedModel (see upstream.py) serving on 127.0.0.1; tests pick the wire format with a `dialect` fixture
relay        `python -m relay serve` in front of `upstream`; yields its base URL (log: tmp_path / "relay.log")
provider_extra  extra TOML lines for relay's `[providers.mock]` table (default none); override it in a test module
claude       runs `claude -p ... --output-format stream-json` with a temp HOME and project dir (or through a launcher
             such as `relay claude`, which then finds `claude` on PATH)
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio

from ..mock_upstream import MockUpstream
from .upstream import ScriptedModel

CLAUDE_VERSION = "2.1.332"
CLAUDE_PACKAGE = f"@anthropic-ai/claude-code@{CLAUDE_VERSION}"
INSTALL_TIMEOUT = 300
RELAY_START_TIMEOUT = 15
CLAUDE_TIMEOUT = 45
REPO = Path(__file__).resolve().parents[2]
CLIENT_KEY = "test-key"
UPSTREAM_KEY = "upstream-secret"
MODEL = "mock-model"


def _cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "relay-tests" / f"claude-code-{CLAUDE_VERSION}"


def _runs(exe: Path) -> bool:
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and CLAUDE_VERSION in out.stdout


def _find_claude(prefix: Path) -> Path | None:
    """The package's postinstall copies the platform package's native binary over `bin/claude.exe` (which
    `.bin/claude` links to); when install scripts did not run, that is a stub, so fall back to the platform
    package's binary itself (`@anthropic-ai/claude-code-<os>-<arch>[-musl]/claude`)."""
    modules = prefix / "node_modules"
    candidates = [modules / ".bin" / "claude", *sorted((modules / "@anthropic-ai").glob("claude-code-*/claude*"))]
    return next((c for c in candidates if c.is_file() and _runs(c)), None)


@pytest.fixture(scope="session")
def claude_bin(request: pytest.FixtureRequest) -> Path:
    prefix = _cache_dir()
    prefix.mkdir(parents=True, exist_ok=True)
    with (prefix.parent / f"{prefix.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one install at a time (parallel workers, CI jobs sharing a cache)
        return _install_claude(prefix, request.config)


def say(config: pytest.Config, line: str) -> None:
    """A line on the terminal now, past pytest's output capture: for waits a person should know about."""
    capture = config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        print(f"\n{line}", file=sys.stderr, flush=True)


def _install_claude(prefix: Path, config: pytest.Config) -> Path:
    if found := _find_claude(prefix):
        return found
    npm = shutil.which("npm")
    if npm is None:
        pytest.fail("Claude Code e2e: npm is not on PATH, cannot install " + CLAUDE_PACKAGE
                    + " (make test installs Debian's npm when run as root; otherwise install Node.js and npm)")
    say(config, f"relay tests: installing {CLAUDE_PACKAGE} (about 380 MB, once) into {prefix} for the end-to-end tests")
    cmd = [npm, "install", "--prefix", str(prefix), "--no-audit", "--no-fund", "--loglevel=error", CLAUDE_PACKAGE]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=INSTALL_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"Claude Code e2e: `npm install {CLAUDE_PACKAGE}` took over {INSTALL_TIMEOUT}s")
    if done.returncode != 0:
        pytest.fail(f"Claude Code e2e: `npm install {CLAUDE_PACKAGE}` failed: {(done.stderr or done.stdout)[-800:]}")
    if found := _find_claude(prefix):
        return found
    pytest.fail(f"Claude Code e2e: installed {CLAUDE_PACKAGE} into {prefix} but found no runnable `claude`")


@pytest.fixture
async def upstream(nursery: trio.Nursery, dialect: str) -> ScriptedModel:
    model = ScriptedModel(dialect)  # type: ignore[arg-type]
    port = await nursery.start(MockUpstream(model.handle).serve)
    model.url = f"http://127.0.0.1:{port}"
    return model


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def http_status(host: str, port: int, method: str, path: str) -> int | None:
    """Status of a bodiless request, or None when nothing answers."""
    try:
        with trio.fail_after(5):
            stream = await trio.open_tcp_stream(host, port)
            async with stream:
                await stream.send_all(f"{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode())
                head = await stream.receive_some(4096)
    except (OSError, trio.TooSlowError, trio.BrokenResourceError):
        return None
    parts = head.split(b" ", 2)
    return int(parts[1]) if len(parts) > 1 and parts[0].startswith(b"HTTP/") and parts[1].isdigit() else None


def _tail(path: Path, lines: int = 60) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


@pytest.fixture
def provider_extra() -> str:
    """Extra lines for relay's `[providers.mock]` table, e.g. `context_window = 20000`."""
    return ""


@pytest.fixture
async def relay(upstream: ScriptedModel, tmp_path: Path, provider_extra: str) -> AsyncIterator[str]:
    port = _free_port()
    config = tmp_path / "relay.toml"
    config.write_text(
        f"""[server]
api_keys = ["{CLIENT_KEY}"]
host = "127.0.0.1"
port = {port}
[providers.mock]
format = "openai"
base_url = "{upstream.url}/v1"
api_key = "{UPSTREAM_KEY}"
models = ["{MODEL}"]
{provider_extra}
[routes]
default = "mock/{MODEL}"
"""
    )
    async with relay_process(["-c", str(config)], port, tmp_path / "relay.log") as url:
        yield url


@contextlib.asynccontextmanager
async def relay_process(args: Sequence[str], port: int, log: Path, env: Mapping[str, str] | None = None,
                        level: str = "debug") -> AsyncIterator[str]:
    """`python -m relay serve ARGS` on 127.0.0.1:port, its output in `log`; yields its base URL once /health
    answers, and stops it afterwards (printing the log's tail, which pytest shows for failing tests)."""
    cmd = [sys.executable, "-m", "relay", "serve", *args, "--host", "127.0.0.1", "--port", str(port), "--log-level", level]
    with log.open("wb") as out:
        proc = await trio.lowlevel.open_process(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
                                                env=None if env is None else dict(env))
    try:
        with trio.move_on_after(RELAY_START_TIMEOUT):
            while await http_status("127.0.0.1", port, "GET", "/health") != 200:
                if proc.poll() is not None:
                    pytest.fail(f"relay exited with {proc.returncode} before /health answered:\n{_tail(log)}")
                await trio.sleep(0.05)
        if proc.poll() is not None or await http_status("127.0.0.1", port, "GET", "/health") != 200:
            pytest.fail(f"relay /health not 200 within {RELAY_START_TIMEOUT}s:\n{_tail(log)}")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        with trio.move_on_after(5):
            await proc.wait()
        if proc.poll() is None:
            proc.kill()
            await proc.wait()
        print(f"--- relay log (tail) ---\n{_tail(log)}")


@dataclass
class ClaudeRun:
    returncode: int | None  # None: killed at the timeout
    events: list[dict[str, Any]]
    stderr: str

    @property
    def result(self) -> dict[str, Any]:
        results = [e for e in self.events if e.get("type") == "result"]
        assert results, f"no result line from claude\n{self.debug()}"
        return results[-1]

    @property
    def result_text(self) -> str:
        result = self.result
        assert result.get("subtype") == "success" and not result.get("is_error"), self.debug()
        return str(result["result"])

    def blocks(self, kind: str) -> list[dict[str, Any]]:
        """Content blocks of one type from the assistant and user messages Claude Code reported."""
        return [
            b
            for e in self.events
            if e.get("type") in ("assistant", "user") and isinstance(e.get("message", {}).get("content"), list)
            for b in e["message"]["content"]
            if b.get("type") == kind
        ]

    def debug(self) -> str:
        lines = "\n".join(orjson.dumps(e).decode()[:600] for e in self.events if e.get("type") != "system")
        return f"returncode={self.returncode}\nstream-json:\n{lines}\nstderr:\n{self.stderr[-3000:]}"


@dataclass
class Claude:
    exe: Path
    home: Path
    project: Path

    def env(self, base_url: str) -> dict[str, str]:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.home),
            "SHELL": shutil.which("bash") or "/bin/bash",
            "LANG": "C.UTF-8",
            "TERM": "dumb",
            "ANTHROPIC_BASE_URL": base_url,
            "ANTHROPIC_AUTH_TOKEN": CLIENT_KEY,
            "ANTHROPIC_MODEL": MODEL,
            # Offline: no update checks, telemetry, error reports, or the HEAD /api/hello preconnect and the
            # api.anthropic.com DNS lookups of its connectivity check.
            "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
            "DISABLE_AUTOUPDATER": "1",
            "DISABLE_TELEMETRY": "1",
            "DISABLE_ERROR_REPORTING": "1",
        }
        if os.geteuid() == 0:
            env["IS_SANDBOX"] = "1"  # else --dangerously-skip-permissions refuses to run as root
        return env

    async def run(self, prompt: str, base_url: str, *args: str, timeout: float = CLAUDE_TIMEOUT,
                  env: Mapping[str, str] | None = None, launcher: Sequence[str] = (),
                  model: str | None = MODEL) -> ClaudeRun:
        """`env`: extra variables for this run, over the harness's own. `launcher`: a command that runs `claude`
        from PATH with the arguments that follow it (e.g. `python -m relay claude -c relay.toml --`); this CLI is
        then the `claude` on PATH. `model=None`: no model chosen, as a new user runs it (Claude Code then asks for
        its own Claude ids)."""
        exe: list[str] = [str(self.exe)]
        run_env = {**self.env(base_url), **(env or {})}
        if model is None:
            run_env.pop("ANTHROPIC_MODEL", None)
        if launcher:
            bin_dir = self.home / "bin"
            bin_dir.mkdir(exist_ok=True)
            if not (bin_dir / "claude").exists():
                (bin_dir / "claude").symlink_to(self.exe)
            exe, run_env["PATH"] = list(launcher), f"{bin_dir}{os.pathsep}{run_env['PATH']}"
        cmd = [*exe, "-p", prompt, "--output-format", "stream-json", "--verbose", *(["--model", model] if model else [])]
        cmd += ["--dangerously-skip-permissions", *args]
        out, err = self.home / "claude.stdout", self.home / "claude.stderr"
        # Files, not pipes: a shell the Bash tool left behind cannot hold the run open.
        with out.open("wb") as stdout, err.open("wb") as stderr:
            proc = await trio.lowlevel.open_process(
                cmd, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, cwd=self.project, env=run_env,
                start_new_session=True,
            )
        try:
            with trio.move_on_after(timeout):
                await proc.wait()
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            with trio.CancelScope(shield=True):
                await proc.wait()
        timed_out = proc.returncode == -signal.SIGKILL
        events = []
        for line in out.read_bytes().splitlines():
            try:
                events.append(orjson.loads(line))
            except orjson.JSONDecodeError:
                pass
        return ClaudeRun(None if timed_out else proc.returncode, events, err.read_text(errors="replace"))


@pytest.fixture
def claude(claude_bin: Path, tmp_path: Path) -> Claude:
    home, project = tmp_path / "home", tmp_path / "project"
    home.mkdir()
    project.mkdir()
    return Claude(claude_bin, home, project)
