"""`relay claude`: run the Claude Code CLI against relay, starting a relay for the session if none listens."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time

from relay.config import Config


def client_env(config: Config, host: str | None = None, port: int | None = None) -> dict[str, str]:
    """The variables that point Claude Code at relay."""
    host = host or config.server.host
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    port = config.server.port if port is None else port
    token = config.server.api_keys[0] if config.server.api_keys else "relay"
    return {"ANTHROPIC_BASE_URL": f"http://{host}:{port}", "ANTHROPIC_AUTH_TOKEN": token}


# The ids Claude Code 2.1.331 and 2.1.332 ask for when no model variable is set: the main conversation, then its `sonnet` and
# `haiku` choices (measured: `claude -p` against a stub that logs the model of each request).
CLAUDE_CODE_MODELS = ("claude-opus-5-5", "claude-sonnet-5-5", "claude-haiku-5-5")
MAIN_MODEL_FALLBACK = CLAUDE_CODE_MODELS[0]
# Claude Code 2.1.331's first request, before any conversation, is its system prompt and 12 tools: ~49 kB, which
# relay estimates at ~12k tokens (tests/e2e measure it). A model needs room for that and a reply.
CLAUDE_CODE_FIRST_REQUEST = 12_000
CLAUDE_CODE_MIN_WINDOW = 16_000


def static_window(config: Config, model: str) -> int | None:
    """The configured window of the model the main conversation routes to (no server is asked)."""
    from relay.errors import RelayError
    from relay.routing import resolve

    try:
        target = resolve(config, model)[0]
    except RelayError:
        return None
    return target.provider.limits_for(target.model).context_window


CLAUDE_MIN_COMPACT_WINDOW = 100_000  # Claude Code 2.1.331/2.1.332 read a smaller CLAUDE_CODE_AUTO_COMPACT_WINDOW as 100k
CLAUDE_OUTPUT_RESERVE = 20_000  # it keeps this much of the window for output
MIN_RESERVE = 6_000  # room left at the compaction point: the next turn's input and a reply


def compaction_env(window: int) -> dict[str, str]:
    """Variables that make Claude Code compact before the real window fills.

    Claude Code compacts near (window - 20k output reserve - 13k), but floors the window at 100k; for a
    smaller model the percentage override moves the point down to the real window less a reserve (15%, at
    least 6k). Not lower: Claude Code's own prompt and tools are ~12k, and a compaction point close to that
    makes it compact again after every turn.
    """
    env = {"CLAUDE_CODE_AUTO_COMPACT_WINDOW": str(max(window, CLAUDE_MIN_COMPACT_WINDOW))}  # lower values draw a warning
    if window < CLAUDE_MIN_COMPACT_WINDOW:
        effective = CLAUDE_MIN_COMPACT_WINDOW - CLAUDE_OUTPUT_RESERVE
        compact_at = window - max(MIN_RESERVE, window * 15 // 100)
        pct = compact_at * 100 // effective
        env["CLAUDE_AUTOCOMPACT_PCT_OVERRIDE"] = str(max(10, min(95, pct)))
    return env


def settings_json(config: Config, model: str | None = None) -> str:
    env = client_env(config)
    window = static_window(config, model or os.environ.get("ANTHROPIC_MODEL") or MAIN_MODEL_FALLBACK)
    if window:
        env.update(compaction_env(window))
    return json.dumps({"env": env}, indent=2)


def served_window(base_url: str, token: str, model: str) -> int | None:
    """Ask the running relay, which may learn the window from a local server."""
    import urllib.request

    request = urllib.request.Request(f"{base_url}/v1/models/{model}", headers={"x-api-key": token})
    try:
        with urllib.request.urlopen(request, timeout=15) as response:
            value = json.loads(response.read()).get("context_window")
    except (OSError, ValueError):
        return None
    return value if isinstance(value, int) else None


def small_window_warning(model: str, window: int) -> str:
    return (f"relay: warning: {model} is served with a {window}-token context window, but Claude Code's first request "
            f"alone is ~{CLAUDE_CODE_FIRST_REQUEST // 1000}k tokens (its system prompt and tools): every request will "
            f"be refused as too long. Give the model at least {CLAUDE_CODE_MIN_WINDOW // 1000}k (32k or more for real "
            "work; llama.cpp: -c 32768, llama-cpp-python: --n_ctx 32768) or route Claude Code to another model.")


def listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nhost: relay\r\nconnection: close\r\n\r\n")
            return sock.recv(16).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


def run_claude(config: Config, config_path: str | None, args: list[str], port: int | None = None) -> int:
    claude = shutil.which("claude")
    if claude is None:
        print("relay: the `claude` command is not on PATH (npm install -g @anthropic-ai/claude-code)", file=sys.stderr)
        return 127
    env = {**os.environ, **client_env(config, port=port)}
    url = env["ANTHROPIC_BASE_URL"].removeprefix("http://")
    host, _, listen = url.rpartition(":")
    started: subprocess.Popen[bytes] | None = None
    if not listening(host, int(listen)):
        # Said, because a relay already running elsewhere (`make run ARGS="--port 9000"`, another terminal's
        # variables) is easy to miss: this one serves from what this shell has.
        print(f"relay: nothing listens on {host}:{listen}; starting a relay for this session from {config.source} "
              "(a relay started on another port: relay claude --port N)", file=sys.stderr)
        cmd = [sys.executable, "-m", "relay", "serve", "--log-level", "warning", "--port", listen]
        if config_path:
            cmd += ["-c", config_path]
        started = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        while not listening(host, int(listen)):
            if started.poll() is not None or time.monotonic() > deadline:
                print("relay: could not start a relay for this session", file=sys.stderr)
                started.kill()
                return 1
            time.sleep(0.1)
    model = env.get("ANTHROPIC_MODEL") or MAIN_MODEL_FALLBACK
    window = served_window(env["ANTHROPIC_BASE_URL"], env["ANTHROPIC_AUTH_TOKEN"], model)
    if window and window < CLAUDE_CODE_MIN_WINDOW:
        print(small_window_warning(model, window), file=sys.stderr)
    if window and not {"CLAUDE_CODE_AUTO_COMPACT_WINDOW", "CLAUDE_AUTOCOMPACT_PCT_OVERRIDE"} & env.keys():
        env.update(compaction_env(window))  # compact at the real window, not Claude Code's guess for a model it does not know
    try:
        return subprocess.call([claude, *args], env=env)
    except KeyboardInterrupt:
        return 130
    finally:
        if started is not None:
            started.terminate()
            try:
                started.wait(10)
            except subprocess.TimeoutExpired:
                started.kill()
