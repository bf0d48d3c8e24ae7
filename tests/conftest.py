"""Shared fixtures: a scripted mock upstream and the real relay server in front of it, both on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator
import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import trio

from relay.config import parse
from relay.server import Server
from tests.local_llm import llama_server, llama_server_quickstart
from tests.mock_upstream import MockUpstream

__all__ = ["llama_server", "llama_server_quickstart"]  # the session fixtures, imported so pytest finds it here and under tests/e2e

# relay keeps a usage book under XDG_STATE_HOME: tests (and relays they start) write it in a temp folder
os.environ["XDG_STATE_HOME"] = _STATE = tempfile.mkdtemp(prefix="relay-test-state-")
atexit.register(shutil.rmtree, _STATE, True)
SHARED = Path(__file__).resolve().parent.parent.parent / "shared"
RELAY_KEY = "relay-test-key"
UPSTREAM_KEY = "sk-upstream-secret-0123456789"


def relay_config(upstream_url: str, extra_provider: str = "", extra: str = "") -> str:
    return f"""
[server]
api_keys = ["{RELAY_KEY}"]

[providers.mock]
format = "openai"
base_url = "{upstream_url}"
api_key = "{UPSTREAM_KEY}"
models = ["mock-model"]
read_timeout = 5
{extra_provider}

[models]
"alias-model" = "mock/aliased-upstream-model"

[routes]
default = "mock/mock-model"
haiku = "mock/small-model"
{extra}
"""


@pytest.fixture
async def upstream(nursery: trio.Nursery) -> AsyncIterator[MockUpstream]:
    mock = MockUpstream()
    await nursery.start(mock.serve)
    yield mock


class RelayHandle:
    def __init__(self, server: Server, port: int) -> None:
        self.server = server
        self.port = port
        self.url = f"http://127.0.0.1:{port}"


async def start_relay(nursery: trio.Nursery, config_text: str) -> RelayHandle:
    server = Server(parse(config_text, "test.toml", env={}))
    port = await nursery.start(server.serve, "127.0.0.1", 0)
    return RelayHandle(server, port)


@pytest.fixture
async def relay(nursery: trio.Nursery, upstream: MockUpstream) -> RelayHandle:
    return await start_relay(nursery, relay_config(upstream.base_url))
