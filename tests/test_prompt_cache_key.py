"""Prompt-cache affinity, the request side (issue 13 item 6): Claude Code's session id (``metadata.user_id`` is a
JSON string with ``session_id``) goes to providers that route their prefix cache by it as ``prompt_cache_key``
(a provider quirk, on in the ``openai`` presets), never as ``user``; elsewhere metadata is dropped on purpose."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import trio

from relay.config import Provider
from relay.formats.base import ClientRequest
from relay.formats.gemini import request as G
from relay.formats.openai_chat.request import build as openai_build
from relay.formats.openai_responses import request as R
from relay.presets import PRESETS
from tests.format_mocks import client, format_relay, run
from tests.mock_upstream import MockUpstream, completion

REFERENCE = Path(__file__).parent / "fixtures" / "reference"
SESSION = "7f3c2b1a-0d4e-4f5a-9b8c-1a2b3c4d5e6f"
USER_ID = json.dumps({"device_id": "d" * 64, "account_uuid": "", "session_id": SESSION})
REQ = {"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}],
       "metadata": {"user_id": USER_ID}}
ON = Provider(name="o", base_url="http://x", prompt_cache_key=True)


def test_session_id_parsed_once_on_the_request() -> None:
    incoming = ClientRequest(json.dumps(REQ).encode(), REQ)
    assert incoming.session_id == SESSION
    assert incoming.__dict__["session_id"] == SESSION  # cached: the server's affinity reads it for free
    plain = {**REQ, "metadata": {"user_id": "user-42"}}  # other clients: a plain user id, not a session
    assert ClientRequest(b"", plain).session_id is None
    assert ClientRequest(b"", {**REQ, "metadata": {"user_id": "{not json"}}).session_id is None
    assert ClientRequest(b"", {"model": "m"}).session_id is None


@pytest.mark.parametrize("fmt", ["openai", "openai-responses"])
def test_prompt_cache_key_where_the_provider_takes_it(fmt: str) -> None:
    build = openai_build if fmt == "openai" else R.build
    body, dropped = build(REQ, replace(ON, format=fmt), "gpt-x", False)
    assert body["prompt_cache_key"] == SESSION and "user" not in body and "metadata" not in dropped
    body, dropped = build(REQ, replace(ON, format=fmt, prompt_cache_key=False), "gpt-x", False)
    assert "prompt_cache_key" not in body and "user" not in body and "metadata" in dropped
    body, dropped = build({**REQ, "metadata": {"user_id": "user-42"}}, replace(ON, format=fmt), "gpt-x", False)
    assert "prompt_cache_key" not in body and "user" not in body and "metadata" in dropped


def test_gemini_drops_metadata() -> None:
    body, dropped = G.build(REQ, Provider(name="g", base_url="http://x", format="gemini"), "gemini-x", False)
    assert "metadata" in dropped and SESSION not in json.dumps(body)


def test_openai_presets_turn_it_on() -> None:
    assert PRESETS["openai"].values["prompt_cache_key"] is True
    assert PRESETS["openai-responses"].values["prompt_cache_key"] is True


@pytest.mark.parametrize("name", sorted(p.name for p in REFERENCE.glob("*.json")))
def test_real_claude_code_requests(name: str) -> None:
    doc: Any = json.loads((REFERENCE / name).read_text())
    req = doc.get("body", doc)
    session = json.loads(req["metadata"]["user_id"])["session_id"]
    body, _ = openai_build(req, ON, "gpt-x", True)
    assert body["prompt_cache_key"] == session and "user" not in body


async def test_sdk_metadata_becomes_prompt_cache_key(nursery: trio.Nursery) -> None:
    upstream = MockUpstream(lambda r: completion({"content": "ok"}))
    await nursery.start(upstream.serve)
    relay = await format_relay(nursery, upstream, "openai", "prompt_cache_key = true")
    for _ in range(2):  # the same session sends the same key on every turn
        await run(lambda: client(relay).messages.create(model="up-model", max_tokens=10, metadata={"user_id": USER_ID},
                                                        messages=[{"role": "user", "content": "hi"}]))
    assert [r.json.get("prompt_cache_key") for r in upstream.requests] == [SESSION, SESSION]
    assert all("user" not in r.json and "metadata" not in r.json for r in upstream.requests)
