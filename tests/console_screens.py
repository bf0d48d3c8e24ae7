"""``make screenshots``: a PNG of each console page, from a real relay in front of the mock upstream, after a minute
of real traffic through it (some streams slow, some failing, a few keys). Run as ``python -m tests.console_screens DIR``."""

from __future__ import annotations

import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anthropic
import trio

from tests.browser import browser_page
from tests.conftest import RELAY_KEY, start_relay
from tests.mock_upstream import MockUpstream, Reply, json_reply, text_stream
from tests.test_gateway import ADMIN, call, gateway_config

PAGES = ("overview", "keys", "providers", "models", "routes", "usage")
TRAFFIC_SECONDS = 60
MODELS = ("mock-model", "claude-sonnet-4-5", "claude-haiku-4-5", "alias-model", "qwen3-coder-30b")


def reply(_: Any) -> Reply:
    if random.random() < 0.04:
        return json_reply({"error": {"message": "upstream overloaded"}}, 503)
    words = random.randint(3, 40)
    answer = text_stream(*(["word "] * words), usage=(random.randint(200, 4000), words * 3))
    answer.pieces.insert(0, random.uniform(0.02, 0.4))  # a first byte that takes a while, as models do
    return answer


def traffic(url: str, secrets: list[str], until: float) -> None:
    while time.monotonic() < until:
        client = anthropic.Anthropic(base_url=url, api_key=random.choice(secrets), max_retries=0)
        try:
            with client.messages.stream(model=random.choice(MODELS), max_tokens=200,
                                        messages=[{"role": "user", "content": "hi"}]) as s:
                s.get_final_text()
        except anthropic.APIError:
            pass
        time.sleep(random.uniform(0.05, 0.6))


def shoot(url: str, folder: Path) -> None:
    with browser_page(url, 1200, 760) as (page, watch):
        page.goto(url + "/ui")
        page.fill("#admin-key", ADMIN)
        page.click("#login-form button")
        page.wait_for_selector("#recent tr")
        for name in PAGES:
            page.click(f"nav a[data-page={name}]")
            page.wait_for_selector(f"#page[data-page={name}] table")
            page.wait_for_timeout(800)
            page.screenshot(path=str(folder / f"console-{name}.png"))
            print(f"wrote {folder / f'console-{name}.png'}")
        watch.clean()


async def main(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as state:
        async with trio.open_nursery() as nursery:
            upstream = MockUpstream(reply)
            await nursery.start(upstream.serve)
            prices = 'prices = { "*" = { input = 3, output = 15 } }'
            text = gateway_config(upstream, f"sqlite://{state}/relay.sqlite3").replace(
                'prices = { "mock-model" = { input = 1000, output = 2000 } }', prices) + 'provider_env = ["LAB_*"]\n'
            os.environ["LAB_KEY"] = "sk-lab-demo"  # the stored provider names it; relay reads it from here
            relay = await start_relay(nursery, text)
            secrets = [RELAY_KEY]
            for name, fields in (("ci-bot", {"rpm": 600, "budget": 5, "budget_period": "day"}),
                                 ("alice", {"models": ["mock/*"], "budget": 50}), ("bob", {"tpm": 200000})):
                made = await trio.to_thread.run_sync(call, relay.url, "POST", "/admin/keys", ADMIN, {"name": name, **fields})
                secrets.append(made.json()["secret"])
            lab = await trio.to_thread.run_sync(call, relay.url, "POST", "/admin/providers", ADMIN, {
                "name": "lab-gpu", "format": "openai", "base_url": upstream.base_url, "api_key": "${LAB_KEY}",
                "models": ["qwen3-coder-30b"], "tool_call_content": "empty", "context_window": 65536})
            assert lab.status_code == 201 and "left_out" not in lab.json(), lab.text
            await trio.to_thread.run_sync(call, relay.url, "POST", "/admin/keys", ADMIN, {"name": "old-laptop"})
            await trio.to_thread.run_sync(call, relay.url, "DELETE", "/admin/keys/old-laptop", ADMIN)
            until = time.monotonic() + TRAFFIC_SECONDS
            print(f"make screenshots: {TRAFFIC_SECONDS} s of traffic through relay first")
            async with trio.open_nursery() as clients:
                for _ in range(4):
                    clients.start_soon(trio.to_thread.run_sync, traffic, relay.url, secrets, until)
            await relay.server.flush_usage()
            await trio.to_thread.run_sync(shoot, relay.url, folder)
            nursery.cancel_scope.cancel()


if __name__ == "__main__":
    trio.run(main, Path(sys.argv[1] if len(sys.argv) > 1 else "docs"))
