"""Scoped client keys and the per-key usage book (`relay usage`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import anthropic
import pytest
import trio

from relay.usage import report
from tests.conftest import RELAY_KEY, relay_config, start_relay
from tests.mock_upstream import MockUpstream, text_stream


def ask(port: int, key: str, model: str) -> str:
    client = anthropic.Anthropic(base_url=f"http://127.0.0.1:{port}", api_key=key, max_retries=0)
    with client.messages.stream(model=model, max_tokens=5, messages=[{"role": "user", "content": "hi"}]) as s:
        return s.get_final_text()


async def test_scoped_keys_and_usage_book(nursery: trio.Nursery, upstream: MockUpstream, tmp_path: Path) -> None:
    upstream.handler = lambda r: text_stream("ok", usage=(7, 3))
    db = tmp_path / "usage.sqlite3"
    config = relay_config(upstream.base_url).replace("[server]", f'[server]\nusage_db = "{db}"') + """
[[keys]]
key = "alice-key"
name = "alice"
models = ["mock-*"]
"""
    relay = await start_relay(nursery, config)
    assert await trio.to_thread.run_sync(ask, relay.port, "alice-key", "mock-model") == "ok"
    assert await trio.to_thread.run_sync(ask, relay.port, "alice-key", "mock-model") == "ok"
    with pytest.raises(anthropic.PermissionDeniedError):
        await trio.to_thread.run_sync(ask, relay.port, "alice-key", "alias-model")
    assert await trio.to_thread.run_sync(ask, relay.port, RELAY_KEY, "alias-model") == "ok"
    expected = [("alice", "mock-model", 2, 14, 6), ("key1", "alias-model", 1, 7, 3)]
    with trio.move_on_after(5):  # relay books a request once its response is finished on its side too
        while True:
            await relay.server.flush_usage()
            if report([str(db)]) == expected:
                break
            await trio.sleep(0.05)
    assert report([str(db)]) == expected
    out = subprocess.run([sys.executable, "-m", "relay", "usage", "--db", str(db), "--db", str(db)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[1].split() == ["alice", "mock-model", "4", "28", "12"]  # two files, summed
