"""A conversation's unchanged history read once (relay.history): whatever the kept requests, a body reads exactly
as ``orjson.loads`` reads it, and the estimate is the estimate of the whole; over a socket, the upstream gets
the same bytes with the reuse as without."""

from __future__ import annotations

import json
import random
from typing import Any

import orjson
import pytest
import trio

from relay import tokens
from relay.history import PER_CLIENT, REUSE_FROM, Histories
from tests.client import request_bytes, roundtrip
from tests.conftest import RELAY_KEY, relay_config, start_relay
from tests.mock_upstream import MockUpstream, text_stream

WORDS = ["alpha", "beta", "naïve", "日本語", "emoji 🎉", 'a "quote"', "back\\slash", "line\nbreak", "tab\t",
         "\u2028", "</script>", "x" * 300]


def _text(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 120)))


def _value(rng: random.Random, depth: int = 0) -> Any:
    """Tool input values, with those ``==`` mixes up: true and 1, 1 and 1.0, 0 and false and -0.0."""
    kind = rng.randrange(8 if depth < 3 else 6)
    if kind == 0:
        return rng.choice([True, False, 1, 0, 1.0, -0.0, 0.0, None])
    if kind == 1:
        return rng.randint(-10**12, 10**12)
    if kind == 2:
        return rng.random() * 1e6
    if kind in (3, 4, 5):
        return _text(rng)[: rng.randint(0, 80)]
    if kind == 6:
        return [_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {f"k{i}": _value(rng, depth + 1) for i in range(rng.randint(0, 4))}


def _turn(rng: random.Random, n: int) -> list[dict[str, Any]]:
    """An assistant turn calling a tool, and the user turn with its result."""
    call = f"toolu_{n:04d}"
    return [
        {"role": "assistant", "content": [{"type": "text", "text": _text(rng)},
                                          {"type": "tool_use", "id": call, "name": "Bash", "input": _value(rng)}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call, "content": _text(rng) * 3}]},
    ]


def _opening(rng: random.Random) -> list[dict[str, Any]]:
    """A long first user message and one tool round trip: the smallest conversation worth keeping."""
    return [{"role": "user", "content": [{"type": "text", "text": _text(rng) * 40}]}] + _turn(rng, 1)


def _body(messages: list[dict[str, Any]], **extra: Any) -> bytes:
    """A Claude Code-shaped body (its key order: model, messages, system, tools, ...), the last message marked
    for the prompt cache as Claude Code marks it."""
    marked = [*messages[:-1], {**messages[-1], "content": [
        *messages[-1]["content"][:-1], {**messages[-1]["content"][-1], "cache_control": {"type": "ephemeral"}}]}]
    return orjson.dumps({"model": "claude-sonnet-4-5", "messages": marked, "system": "You are Claude Code.",
                         "tools": [{"name": "Bash", "input_schema": {"type": "object"}}], "max_tokens": 4096,
                         "stream": True, **extra})


def _session(seed: int) -> list[list[dict[str, Any]]]:
    """The message lists of a session: turns appended, an earlier message edited now and then (compaction, a
    rewound conversation), and a value changed to another ``==`` takes for it."""
    rng = random.Random(seed)
    messages: list[dict[str, Any]] = [{"role": "user", "content": [{"type": "text", "text": "start " * 6000}]}]
    steps = [list(messages)]
    for n in range(24):
        choice = rng.random()
        if choice < 0.7 or len(messages) < 6:
            messages = messages + _turn(rng, n)
        elif choice < 0.85:  # an earlier message rewritten
            at = rng.randrange(1, len(messages) - 1)
            messages = messages[:at] + _turn(rng, 100 + n)[at % 2: at % 2 + 1] + messages[at + 1:]
        else:  # a tool input's true becomes 1 (or 1 becomes 1.0...): equal by ==, not by bytes
            at = rng.randrange(1, len(messages), 2) if len(messages) > 2 else 1
            if messages[at]["role"] == "assistant":
                swapped = {True: 1, 1: 1.0, False: 0, 0: False, None: None}
                block = messages[at]["content"][1]
                value = block["input"]
                new = swapped.get(value, True) if not isinstance(value, (dict, list, str)) else True
                messages = [*messages[:at], {**messages[at], "content": [
                    messages[at]["content"][0], {**block, "input": new}]}, *messages[at + 1:]]
        steps.append(list(messages))
    return steps


def _keep(histories: Histories, client: str, body: bytes) -> None:
    """``body`` kept with its messages: seen once (kept as bytes only), then again (a conversation going on)."""
    histories.learn(client, body, orjson.loads(body), None)
    req, reuse = histories.parse(client, body)
    assert reuse is not None and reuse.count == 0 and reuse.kept.messages is None
    histories.learn(client, body, req, reuse)
    assert histories._clients[client][-1].messages is req["messages"]


def _same(a: Any, b: Any) -> bool:
    """Equal values of the same types all the way down (``orjson.dumps`` writes 1, 1.0 and true apart)."""
    return orjson.dumps(a) == orjson.dumps(b)


@pytest.mark.parametrize("seed", range(6))
def test_a_session_reads_as_the_whole_parse_and_estimate_would(seed: int) -> None:
    histories = Histories(64 * 1024 * 1024)
    reused = 0
    for messages in _session(seed):
        body = _body(messages)
        assert len(body) >= REUSE_FROM
        req, reuse = histories.parse("key-a", body)
        whole = orjson.loads(body)
        assert _same(req, whole)
        if reuse is not None:
            assert tokens.estimate(req, reuse.count, reuse.tokens) == tokens.estimate(whole)
            reused += 1
        histories.learn("key-a", body, req, reuse)
    assert reused >= 12  # most steps extend a kept request


def test_an_appended_turn_reuses_all_but_the_message_that_lost_its_cache_mark() -> None:
    """A conversation's requests as Claude Code sends them: the first is kept as bytes; the second shares them, is
    parsed whole and kept with its messages; from the third on, all but the last message of the one before are
    reused (that one lost its cache mark)."""
    rng = random.Random(7)
    messages = [{"role": "user", "content": [{"type": "text", "text": _text(rng) * 30}]}]
    for n in range(8):
        messages += _turn(rng, n)
    histories = Histories(1 << 26)
    counts = []
    for n in range(4):
        body = _body(messages)
        req, reuse = histories.parse("k", body)
        assert _same(req, orjson.loads(body))
        counts.append(None if reuse is None else reuse.count)
        if reuse is not None and reuse.count:
            assert req["messages"][0] is reuse.kept.messages[0]  # reused, not parsed again
        histories.learn("k", body, req, reuse)
        previous = len(messages)
        messages = messages + _turn(rng, 100 + n)
    assert counts == [None, 0, previous - 2 - 1 - 2, previous - 2 - 1]
    again = histories.parse("k", body)[1]  # the same body once more: every message
    assert again is not None and again.count == previous


def test_a_value_equal_by_eq_but_written_otherwise_is_read_again() -> None:
    messages: list[dict[str, Any]] = [{"role": "user", "content": [{"type": "text", "text": "go " * 20000}]}]
    for n, value in enumerate([True, 1, 0, False]):
        messages += [{"role": "assistant", "content": [{"type": "tool_use", "id": f"t{n}", "name": "Bash",
                                                        "input": {"flag": value}}]},
                     {"role": "user", "content": [{"type": "tool_result", "tool_use_id": f"t{n}", "content": "ok"}]}]
    histories = Histories(1 << 26)
    first = _body(messages)
    _keep(histories, "k", first)
    changed = json.loads(json.dumps(messages))
    changed[1]["content"][0]["input"]["flag"] = 1  # True -> 1: == says equal
    changed[3]["content"][0]["input"]["flag"] = 1.0  # 1 -> 1.0
    body = _body(changed)
    req, reuse = histories.parse("k", body)
    assert reuse is not None and reuse.count == 1
    assert _same(req, orjson.loads(body))
    assert type(req["messages"][1]["content"][0]["input"]["flag"]) is int
    assert type(req["messages"][3]["content"][0]["input"]["flag"]) is float


def test_a_later_duplicate_messages_key_wins_as_in_a_whole_parse() -> None:
    rng = random.Random(3)
    messages = _opening(rng)
    histories = Histories(1 << 26)
    first = _body(messages)
    _keep(histories, "k", first)
    assert histories.held >= 4 * len(first)  # (kept with its messages: their objects reckoned too)
    second = _body(messages + _turn(rng, 2))
    duplicated = second[:-1] + b',"messages":[{"role":"user","content":"the last key wins"}]}'
    req, reuse = histories.parse("k", duplicated)
    assert reuse is None and req == orjson.loads(duplicated)
    assert req["messages"] == [{"role": "user", "content": "the last key wins"}]


def test_a_nested_messages_key_before_the_real_one_is_never_taken_for_it() -> None:
    rng = random.Random(4)
    messages = _opening(rng)
    histories = Histories(1 << 26)
    decoy = {"messages": messages[:1]}  # the first "messages": [...] in the body, and its first element matches
    first = orjson.dumps({"metadata": decoy, "model": "m", "messages": messages})
    _keep(histories, "k", first)
    second = orjson.dumps({"metadata": decoy, "model": "m", "messages": messages + _turn(rng, 2)})
    req, reuse = histories.parse("k", second)
    assert reuse is None and req == orjson.loads(second)
    assert histories.held == 0  # the array found first is not the one that counts: forgotten, not tried again


def test_a_body_written_with_spaces_is_not_kept() -> None:
    rng = random.Random(5)
    messages = _opening(rng)
    body = json.dumps({"model": "m", "messages": messages}).encode()  # ", " and ": " between values
    histories = Histories(1 << 26)
    histories.learn("k", body, orjson.loads(body), None)
    assert histories.held == 0
    assert histories.parse("k", body) == (orjson.loads(body), None)


def test_reuse_is_per_client_and_small_bodies_are_parsed_whole() -> None:
    rng = random.Random(6)
    messages = _opening(rng)
    body = _body(messages)
    histories = Histories(1 << 26)
    histories.learn("a", body, orjson.loads(body), None)
    assert histories.parse("b", body)[1] is None  # another key's history is not this one's to reuse (or time)
    assert histories.parse("a", body)[1] is not None
    assert histories.held == REUSE_FROM  # a first sight: its first messages' bytes only
    small = _body([{"role": "user", "content": [{"type": "text", "text": "hi"}]}])
    histories.learn("a", small, orjson.loads(small), None)
    tools = orjson.dumps({"model": "m", "tools": [{"name": "t" * REUSE_FROM}], "messages": messages[-1:]})
    histories.learn("a", tools, orjson.loads(tools), None)  # large, but not its messages: nothing to reuse
    assert histories.held == REUSE_FROM


def test_bad_json_after_the_shared_messages_is_reported_as_for_the_whole_body() -> None:
    rng = random.Random(8)
    messages = _opening(rng)
    histories = Histories(1 << 26)
    first = _body(messages)
    _keep(histories, "k", first)
    broken = _body(messages + _turn(rng, 2))[:-20] + b"{oops"
    with pytest.raises(orjson.JSONDecodeError) as whole:
        orjson.loads(broken)
    with pytest.raises(orjson.JSONDecodeError) as ours:
        histories.parse("k", broken)
    assert str(ours.value) == str(whole.value)  # the offsets are the whole body's
    cut = _body(messages)[: len(first) // 2]  # a body that stops inside a shared message
    with pytest.raises(orjson.JSONDecodeError):
        histories.parse("k", cut)


def test_memory_is_bounded_and_each_client_keeps_a_few() -> None:
    rng = random.Random(9)
    base = [{"role": "user", "content": [{"type": "text", "text": _text(rng) * 40}]}]
    histories = Histories(12 * REUSE_FROM)
    sizes = []
    for n in range(30):
        body = _body(base + _turn(rng, n))
        sizes.append(len(body))
        histories.learn(f"client-{n % 3}", body, orjson.loads(body), None)
        assert histories.held <= histories.memory
    assert histories.held > 0
    for n in range(20):  # one client: never more than PER_CLIENT of its requests
        body = _body(base + _turn(rng, 200 + n))
        histories.learn("one", body, orjson.loads(body), None)
    assert len(histories._clients["one"]) <= PER_CLIENT
    off = Histories(0)
    off.learn("k", body, orjson.loads(body), None)
    assert off.held == 0


async def _upstream_bodies(nursery: trio.Nursery, memory: int, bodies: list[bytes]) -> tuple[list[bytes], int]:
    upstream = MockUpstream(lambda r: text_stream("ok"))
    await nursery.start(upstream.serve)
    handle = await start_relay(nursery, relay_config(upstream.base_url).replace(
        "[server]\n", f"[server]\nhistory_memory = {memory}\n"))
    for body in bodies:
        answer = await roundtrip(handle.port, request_bytes(body, key=RELAY_KEY))
        assert answer.status == 200, answer
    return [r.body for r in upstream.requests], handle.server.histories.held


async def test_over_a_socket_the_upstream_gets_the_same_bytes_with_the_reuse_as_without(
        nursery: trio.Nursery) -> None:
    steps = _session(11)[::4]
    bodies = [orjson.dumps({**orjson.loads(_body(m)), "model": "mock-model"}) for m in steps]
    reused, held = await _upstream_bodies(nursery, 64 * 1024 * 1024, bodies)
    plain, none = await _upstream_bodies(nursery, 0, bodies)
    assert held > 0 and none == 0
    assert reused == plain and len(reused) == len(bodies)


def test_an_earlier_message_edited_to_the_same_length_is_read_again() -> None:
    """The bytes after the edit sit where they sat: only a comparison of the bytes tells the messages apart."""
    rng = random.Random(12)
    messages = [{"role": "user", "content": [{"type": "text", "text": "go " * 12000}]}]
    for n in range(6):
        messages += _turn(rng, n)
    histories = Histories(1 << 26)
    first = _body(messages)
    _keep(histories, "k", first)
    for at in (1, 4, 9, len(messages) - 2):
        edited = json.loads(json.dumps(messages))
        block = edited[at]["content"][0]  # a text block, or a tool result's
        field = "text" if block["type"] == "text" else "content"
        block[field] = "Z" + block[field][1:]  # one ASCII letter for another
        body = _body(edited)
        assert len(body) == len(first)
        req, reuse = histories.parse("k", body)
        assert reuse is not None and reuse.count == at
        assert _same(req, orjson.loads(body))


def test_message_ends_are_learnt_only_where_the_bytes_are_orjsons() -> None:
    """A message the client wrote otherwise (spaces, an escaped slash, a number in another form) ends the
    messages found, even where the lengths happen to agree."""
    first = orjson.dumps({"role": "user", "content": [{"type": "text", "text": "a" * 40000}]})
    other = b'{"role":"assistant","content":[{"type":"tool_use","id":"t","name":"n","input":{"p":"\\/\\/","n":1e2}}]}'
    assert len(other) == len(orjson.dumps(orjson.loads(other)))  # the same length as orjson's, other bytes
    third = orjson.dumps({"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": "x"}]})
    head = b'{"model":"m","messages":['
    body = head + first + b"," + other + b"," + third + b"]}"
    histories = Histories(1 << 26)
    _keep(histories, "k", body)
    kept = histories._clients["k"][0]
    assert kept.ends == []  # found only when a request shares the bytes
    kept.find_ends(len(body))
    assert kept.ends == [len(head) + len(first)] and kept.stuck
    spaced = head + first + b"," + json.dumps(orjson.loads(third)).encode() + b"]}"
    _keep(histories, "k2", spaced)
    kept = histories._clients["k2"][0]
    kept.find_ends(len(spaced))
    assert kept.ends == [len(head) + len(first)] and kept.stuck


def test_what_comes_before_the_messages_may_change() -> None:
    """Another model (a head of another length), other tools before the messages (the order some clients
    write): the messages are found where they now start and reused all the same."""
    rng = random.Random(13)
    messages = [{"role": "user", "content": [{"type": "text", "text": "go " * 12000}]}] + _turn(rng, 1)
    histories = Histories(1 << 26)
    first = orjson.dumps({"model": "claude-sonnet-4-5", "tools": [{"name": "A"}], "messages": messages})
    _keep(histories, "k", first)
    for head in ({"model": "claude-haiku-4-5-20251001", "tools": [{"name": "A"}]},
                 {"model": "m", "tools": [{"name": "A", "description": "x" * 500}, {"name": "B"}]}):
        more = messages + _turn(rng, 2)
        body = orjson.dumps({**head, "messages": more})
        req, reuse = histories.parse("k", body)
        assert reuse is not None and reuse.count == len(messages) and reuse.start != 0
        assert _same(req, orjson.loads(body))
        histories.learn("k", body, req, reuse)
        assert histories._clients["k"][-1].ends[:reuse.count] == reuse.ends()
        messages = more


def test_whatever_follows_a_shared_message_reads_as_in_the_whole_body() -> None:
    """The shared messages give way to the sentinel and the rest is read as it is: a space, the array's end or
    the body's end right after them, each as a whole parse reads it."""
    rng = random.Random(14)
    messages = [{"role": "user", "content": [{"type": "text", "text": "go " * 12000}]}] + _turn(rng, 1)
    first = orjson.dumps({"model": "m", "messages": messages, "max_tokens": 5})
    end = len(b'{"model":"m","messages":[') + len(orjson.dumps(messages[0]))
    assert first[end:end + 1] == b","
    for body in (first[:end] + b" " + first[end:], first[:end] + b"]}", first[:end] + b"\n,\n" + first[end + 1:]):
        histories = Histories(1 << 26)
        _keep(histories, "k", first)
        req, reuse = histories.parse("k", body)
        assert reuse is not None and reuse.count == 1
        assert _same(req, orjson.loads(body))
    for body in (first[:end], first[:end] + b"}", first[:end] + b",]}"):
        histories = Histories(1 << 26)
        _keep(histories, "k", first)
        with pytest.raises(orjson.JSONDecodeError) as whole:
            orjson.loads(body)
        with pytest.raises(orjson.JSONDecodeError) as ours:
            histories.parse("k", body)
        assert str(ours.value) == str(whole.value)


def test_a_message_that_goes_on_past_the_kept_ones_end_is_read_again() -> None:
    """The same bytes up to the kept message's last byte but one: the new one differs only where the kept one
    closed (a field added at its end)."""
    messages = [{"role": "user", "content": [{"type": "text", "text": "go " * 12000}]},
                {"role": "assistant", "content": [{"type": "text", "text": "ok"}]},
                {"role": "user", "content": [{"type": "text", "text": "more"}]}]
    first = orjson.dumps({"model": "m", "messages": messages})
    grown = [{**messages[0], "extra": 1}, *messages[1:]]
    body = orjson.dumps({"model": "m", "messages": grown})
    histories = Histories(1 << 26)
    _keep(histories, "k", first)
    req, reuse = histories.parse("k", body)
    assert reuse is not None and reuse.count == 0 and req["messages"][0]["extra"] == 1
    histories.learn("k", body, req, reuse)
    shorter = orjson.dumps({"model": "m", "messages": grown[:2] + [{**grown[2], "extra": 2}]})
    req, reuse = histories.parse("k", shorter)
    assert reuse is not None and reuse.count == 2 and req["messages"][2]["extra"] == 2
    assert _same(req, orjson.loads(shorter))


async def test_a_fault_in_the_reuse_reads_the_request_whole_and_answers_it(
        nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    def broken(*args: Any) -> Any:
        raise RuntimeError("a bug in the history")

    monkeypatch.setattr(Histories, "parse", broken)
    monkeypatch.setattr(Histories, "learn", broken)
    bodies = [orjson.dumps({**orjson.loads(_body(m)), "model": "mock-model"}) for m in _session(12)[:3]]
    sent, held = await _upstream_bodies(nursery, 64 * 1024 * 1024, bodies)  # (each answered 200: checked there)
    monkeypatch.undo()
    plain, _ = await _upstream_bodies(nursery, 0, bodies)
    assert sent == plain and held == 0
    said = [r.getMessage() for r in caplog.records if r.name == "relay.server"]
    assert sum("reading it whole" in m for m in said) == 3  # caught where it happened, each time, and said
    assert sum("for the conversation's next turn failed" in m for m in said) == 3
    assert not any("bug" in m for m in said), said


def test_a_smaller_bound_on_reload_is_met_at_once_and_zero_turns_reuse_off() -> None:
    rng = random.Random(15)
    messages = _opening(rng)
    body = _body(messages)
    histories = Histories(1 << 26)
    _keep(histories, "k", body)
    assert histories.parse("k", body)[1] is not None
    histories.memory = histories.held - 1
    assert histories.held == 0 and histories.parse("k", body)[1] is None
    histories.learn("k", body, orjson.loads(body), None)
    histories.memory = 0
    assert histories.held == 0
    histories.learn("k", body, orjson.loads(body), None)
    assert histories.held == 0 and histories.parse("k", body) == (orjson.loads(body), None)


def test_a_message_deeper_than_orjson_writes_stops_the_reuse_there() -> None:
    deep: Any = "x"
    for _ in range(400):  # orjson reads 1,024 levels and writes 255
        deep = [deep]
    messages = [{"role": "user", "content": [{"type": "text", "text": "go " * 12000}]},
                {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "n", "input": {"d": deep}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": "ok"}]}]
    first = orjson.dumps({"model": "m", "messages": messages[:1]})[:-2] + b"," + b",".join(
        [_dumps_deep(m) for m in messages[1:]]) + b"]}"
    histories = Histories(1 << 26)
    histories.learn("k", first, orjson.loads(first), None)
    req, reuse = histories.parse("k", first)
    histories.learn("k", first, req, reuse)
    req, reuse = histories.parse("k", first)  # finds ends: the second message cannot be written
    assert reuse is not None and reuse.count == 1 and histories._clients["k"][-1].stuck
    assert req == orjson.loads(first)


def _dumps_deep(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def test_memory_is_reckoned_by_values_not_only_bytes() -> None:
    """A body of tiny values holds far more in objects than its bytes: reckoned so, the bound holds it."""
    tiny = {"role": "user", "content": [{"type": "text", "text": "t", "x": [{} for _ in range(20000)]}]}
    body = orjson.dumps({"model": "m", "messages": [tiny, tiny]})
    histories = Histories(1 << 28)
    _keep(histories, "k", body)
    assert histories.held >= 25 * len(body)


async def test_two_keys_of_one_name_have_histories_of_their_own(nursery: trio.Nursery) -> None:
    """History is per key, not per name: names are not unique (two [[keys]] may share one)."""
    upstream = MockUpstream(lambda r: text_stream("ok"))
    await nursery.start(upstream.serve)
    config = relay_config(upstream.base_url) + '\n[[keys]]\nkey = "sk-one"\nname = "team"\n' \
        '\n[[keys]]\nkey = "sk-two"\nname = "team"\n'
    handle = await start_relay(nursery, config)
    body = orjson.dumps({**orjson.loads(_body(_session(16)[6])), "model": "mock-model"})
    for key in ("sk-one", "sk-one"):
        assert (await roundtrip(handle.port, request_bytes(body, key=key))).status == 200
    histories = handle.server.histories
    assert len(histories._clients) == 1
    assert (await roundtrip(handle.port, request_bytes(body, key="sk-two"))).status == 200
    assert len(histories._clients) == 2  # sk-two's first sight: not sk-one's history
