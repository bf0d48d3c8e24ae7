"""A conversation's translation carried to its next request (relay.formats.resume): the body a request's build
sends upstream is, byte for byte, the body a fresh build of the whole request makes, whatever the messages
(system turns in every mode, calls left unanswered, results for unknown calls, images, thinking, things dropped),
and the messages translated before are not translated again."""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Any

import orjson
import pytest

from relay.config import Provider
from relay.formats import registry
from relay.formats.base import ClientRequest
from relay.history import Histories

PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="


def _turns(rng: random.Random, n: int) -> list[dict[str, Any]]:
    """A few messages of one of the shapes Claude Code and other clients send."""
    call = f"toolu_{n:04d}"
    text = "word " * rng.randint(5, 400)
    kind = rng.randrange(8)
    if kind == 0:  # a mid-conversation system turn (Claude Code 2.1)
        return [{"role": "system", "content": [{"type": "text", "text": "reminder " + text}]}]
    if kind == 1:  # a call the user interrupted: no result, the conversation goes on
        return [{"role": "assistant", "content": [{"type": "tool_use", "id": call, "name": "Bash", "input": {}}]},
                {"role": "user", "content": "stop, do something else " + text}]
    if kind == 2:  # a result for a call the upstream never saw, and an image returned by a tool
        return [{"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_elsewhere", "content": text},
            {"type": "tool_result", "tool_use_id": "toolu_img", "content": [
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}}]}]}]
    if kind == 3:  # thinking, redacted thinking, and a block type dropped on purpose
        return [{"role": "assistant", "content": [
            {"type": "thinking", "thinking": "hmm " + text, "signature": "sig"},
            {"type": "redacted_thinking", "data": "xyz"}, {"type": "text", "text": "ok"},
            {"type": "tool_use", "id": call, "name": "Read", "input": {"path": "/a", "n": rng.choice([1, 1.0, True])}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call, "content": text,
                                          "is_error": rng.random() < 0.3}]}]
    if kind == 4:  # two calls at once, answered in the other order
        return [{"role": "assistant", "content": [
            {"type": "tool_use", "id": call + "a", "name": "A", "input": {"x": text[:50]}},
            {"type": "tool_use", "id": call + "b", "name": "B", "input": {}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call + "b", "content": "b"},
                                         {"type": "tool_result", "tool_use_id": call + "a", "content": "a"},
                                         {"type": "text", "text": "and then " + text}]}]
    return [{"role": "assistant", "content": [{"type": "text", "text": text},
                                              {"type": "tool_use", "id": call, "name": "Bash", "input": {"c": text}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call, "content": text * 3}]}]


def _conversation(seed: int, steps: int = 14) -> list[bytes]:
    """The bodies of one conversation, each the one before plus a few messages; now and then an earlier message
    rewritten, as after a compaction or a rewind. The last message carries the prompt-cache mark."""
    rng = random.Random(seed)
    messages: list[dict[str, Any]] = [{"role": "system", "content": "opening system turn"},
                                      {"role": "user", "content": [{"type": "text", "text": "start " * 7000}]}]
    bodies = []
    for n in range(steps):
        if rng.random() < 0.15 and len(messages) > 4:
            at = rng.randrange(2, len(messages) - 1)
            messages = messages[:at] + _turns(rng, 500 + n) + messages[at + 1:]
        messages = messages + _turns(rng, n)
        last = messages[-1]
        content = last["content"] if isinstance(last["content"], list) else [{"type": "text", "text": last["content"]}]
        marked = {**last, "content": [*content[:-1], {**content[-1], "cache_control": {"type": "ephemeral"}}]}
        bodies.append(orjson.dumps({"model": "m", "messages": [*messages[:-1], marked],
                                    "system": [{"type": "text", "text": "You are Claude Code."}],
                                    "tools": [{"name": "Bash", "input_schema": {"type": "object"}}],
                                    "max_tokens": 1000, "stream": True}))
    return bodies


PROVIDERS = [Provider(name="p", base_url="http://x"),
             Provider(name="p", base_url="http://x", system_turns="user"),
             Provider(name="p", base_url="http://x", system_turns="merge", tool_call_content="null"),
             Provider(name="p", base_url="http://x", reasoning_return=True)]


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("provider", PROVIDERS, ids=["system", "user", "merge-null", "reasoning"])
def test_a_carried_translation_sends_the_bytes_a_fresh_one_does(seed: int, provider: Provider) -> None:
    fmt = registry.get("openai")
    histories = Histories(1 << 26)
    carried = 0
    for body in _conversation(seed):
        req, reuse = histories.parse("k", body)
        call = fmt.build(req, provider, "up", True, ClientRequest(body, req, (), reuse))
        fresh_req = orjson.loads(body)
        fresh = fmt.build(fresh_req, provider, "up", True, ClientRequest(body, fresh_req, ()))
        assert call.body == fresh.body
        assert call.dropped == fresh.dropped
        if reuse is not None and reuse.kept.translation is not None:
            carried += reuse.kept.translation.covers(req["messages"], provider)
        histories.learn("k", body, req, reuse)
    assert carried > 100  # most messages of most requests were not translated again


def test_the_messages_translated_before_are_not_translated_again() -> None:
    fmt = registry.get("openai")
    provider = PROVIDERS[0]
    histories = Histories(1 << 26)
    bodies = _conversation(3, steps=4)
    for body in bodies[:3]:
        req, reuse = histories.parse("k", body)
        fmt.build(req, provider, "up", True, ClientRequest(body, req, (), reuse))
        histories.learn("k", body, req, reuse)
    req, reuse = histories.parse("k", bodies[3])
    assert reuse is not None and reuse.count and reuse.kept.translation is not None
    before = reuse.kept.translation
    fmt.build(req, provider, "up", True, ClientRequest(bodies[3], req, (), reuse))
    now = reuse.translation
    assert now is not None and now is not before
    carried = before.covers(req["messages"], provider)
    assert carried == reuse.count
    made = before.marks[carried - 1][0]
    assert all(a is b for a, b in zip(now.out[:made], before.out[:made], strict=True))  # the same objects
    assert now.chunks[-1][0] == made  # their JSON made (for this body), and kept for the next
    assert now.chunks[:-1] == [c for c in before.chunks if c[0] <= made]  # what was made before, not made again
    assert len(now.marks) == len(req["messages"])


def test_another_provider_or_another_message_object_starts_afresh() -> None:
    fmt = registry.get("openai")
    histories = Histories(1 << 26)
    bodies = _conversation(5, steps=4)
    for body in bodies[:3]:
        req, reuse = histories.parse("k", body)
        fmt.build(req, PROVIDERS[0], "up", True, ClientRequest(body, req, (), reuse))
        histories.learn("k", body, req, reuse)
    req, reuse = histories.parse("k", bodies[3])
    assert reuse is not None and reuse.kept.translation is not None
    other = replace(PROVIDERS[0], name="q")
    assert reuse.kept.translation.covers(req["messages"], other) == 0
    fresh_req = orjson.loads(bodies[3])
    assert fmt.build(req, other, "up", True, ClientRequest(bodies[3], req, (), reuse)).body == \
        fmt.build(fresh_req, other, "up", True).body
    copied = [dict(m) for m in req["messages"]]  # equal values, other objects
    assert reuse.kept.translation.covers(copied, PROVIDERS[0]) == 0
    changed = [*req["messages"][:2], dict(req["messages"][2]), *req["messages"][3:]]
    assert reuse.kept.translation.covers(changed, PROVIDERS[0]) == 2
    assert reuse.kept.translation.covers(req["messages"][:3], PROVIDERS[0]) == 3  # a conversation rewound
