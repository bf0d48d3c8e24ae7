"""Scoped client keys and the per-key usage book (`relay usage`)."""

from __future__ import annotations

import logging
import sqlite3
import subprocess
import sys
from contextlib import closing
from pathlib import Path

import anthropic
import pytest
import trio

from relay.store import Batch, UsageRow, connected, summarize
from relay.store.sqlite import read_files
from tests.client import ask, final_message
from tests.conftest import RELAY_KEY, relay_config, start_relay
from tests.mock_upstream import MockUpstream, text_stream


def report(paths: list[str]) -> list[tuple[str, str, int, int, int, int, int]]:
    """(key, model, requests, input, output, estimated input, estimated output) summed over files and days."""
    return [(r.key, r.model, r.requests, r.input_tokens, r.output_tokens, r.estimated_input_tokens,
             r.estimated_output_tokens) for r in summarize(read_files([p for p in paths if Path(p).exists()], None))]


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
    assert await trio.to_thread.run_sync(lambda: ask(relay.port, key="alice-key", model="mock-model")) == "ok"
    assert await trio.to_thread.run_sync(lambda: ask(relay.port, key="alice-key", model="mock-model")) == "ok"
    with pytest.raises(anthropic.PermissionDeniedError):
        await trio.to_thread.run_sync(lambda: ask(relay.port, key="alice-key", model="alias-model"))
    assert await trio.to_thread.run_sync(lambda: ask(relay.port, key=RELAY_KEY, model="alias-model")) == "ok"
    expected = [("alice", "mock-model", 2, 14, 6, 0, 0), ("key1", "alias-model", 1, 7, 3, 0, 0)]
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
    # two files, summed: requests, refused, input, output, est. input, est. output, cost
    assert out.stdout.split("\n")[1].split() == ["alice", "mock-model", "4", "0", "28", "12", "0", "0", "0.0000"]


async def test_usage_without_upstream_figures_is_booked_and_logged_as_an_estimate(
        nursery: trio.Nursery, upstream: MockUpstream, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """An upstream that sends no usage in its stream (llama-cpp-python ignores include_usage): relay estimates the
    output from what was streamed, says so in message_delta's figures, the access log and the book's own columns."""
    text = "The quick brown fox jumps over the lazy dog. " * 20  # 900 characters: ~225 tokens by relay's rule
    upstream.handler = lambda r: text_stream(text, usage=None)
    db = tmp_path / "usage.sqlite3"
    relay = await start_relay(nursery, relay_config(upstream.base_url).replace("[server]", f'[server]\nusage_db = "{db}"'))
    caplog.set_level(logging.INFO, logger="relay.access")
    final = await trio.to_thread.run_sync(lambda: final_message(relay.port, max_tokens=500))
    assert final.usage.output_tokens == 225, final.usage
    with trio.move_on_after(5):  # the line is written once the upstream's tail is drained, just after the answer
        while not any("POST /v1/messages 200" in r.getMessage() for r in caplog.records):
            await trio.sleep(0.01)
    line = next(r.getMessage() for r in caplog.records if "POST /v1/messages 200" in r.getMessage())
    assert "out=225 (estimated: no usage from upstream)" in line, line
    with trio.move_on_after(5):
        while not report([str(db)]):
            await relay.server.flush_usage()
            await trio.sleep(0.05)
    ((key, model, requests, tin, tout, est_in, est_out),) = report([str(db)])
    assert (requests, tin, tout, est_out) == (1, 0, 0, 225) and est_in > 0


async def test_an_old_usage_book_stays_readable_and_becomes_a_store(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    with closing(sqlite3.connect(path)) as db, db:  # the table as relay wrote it before the estimate columns
        db.execute("CREATE TABLE usage (key TEXT NOT NULL, model TEXT NOT NULL, day TEXT NOT NULL, requests INTEGER "
                   "NOT NULL, input_tokens INTEGER NOT NULL, output_tokens INTEGER NOT NULL, PRIMARY KEY (key, model, day))")
        db.execute("INSERT INTO usage VALUES ('k', 'm', '2025-01-01', 2, 10, 4)")
    assert report([str(path)]) == [("k", "m", 2, 10, 4, 0, 0)]
    async with connected(f"sqlite://{path}") as backend:  # [server] usage_db = "old.sqlite3": the store, in place
        await backend.apply(Batch([UsageRow("k", "m", "2025-01-01", requests=1, estimated_input_tokens=5,
                                            estimated_output_tokens=7)], {}))
    assert report([str(path)]) == [("k", "m", 3, 10, 4, 5, 7)]
