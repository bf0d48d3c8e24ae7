"""The stream translators' hot paths (issue 17) say exactly what their general paths say.

``StreamTranslator._delta_only`` (OpenAI Chat) and ``GeminiStreamTranslator._one_text`` take the chunks nearly
every read carries by a shorter road than the general ``_on_event``; each must either decline a chunk or do with
it precisely what the general path would. Checked by difference: any sequence of chunks drawn from the shapes
real servers send (and near misses of the hot shape), translated once as relay does and once with the hot path
switched off, gives the same bytes, event for event. The OpenAI hot path has a shorter road still (a chunk made of
the same bytes as the last one around a new string: ``_learn``), so the chunks share their bytes, and some put a
literal there that is no good JSON string.
"""

from __future__ import annotations

import re
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.formats import anthropic as A
from relay.formats.gemini.stream import GeminiStreamTranslator
from relay.formats.openai_chat import stream
from relay.formats.openai_chat.stream import StreamTranslator
from relay.formats.writer import BlockWriter

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ids and signatures relay makes up are random: the two runs are compared with them masked
_MADE_UP = re.compile(rb'"(toolu_01|relay-)[A-Za-z0-9]{22,43}"')

texts = st.sampled_from(["", "Hi", "two words", " ", "é", "日本語", "emoji \U0001f600", 'quote " and \\ and \n'])


def translate(cls: type[BlockWriter], events: list[bytes], hot: bool, finish: bool,
              reads: list[int] | None = None) -> bytes:
    """``reads``: how many events each upstream read holds (a burst), else one each."""
    if not hot:  # the general path alone (a subclass: the writers have slots, no instance dict to patch)
        hot_path = "_delta_only" if cls is StreamTranslator else "_one_text"
        cls = type("General" + cls.__name__, (cls,), {hot_path: lambda self, *args: False})
    translator = cls("claude-x", message_id="msg_fixed")
    feeds, at = [], 0
    for n in (reads or []) + [1] * len(events):
        if at < len(events):
            feeds.append(b"".join(events[at:at + n]))
            at += n
    out = b"".join(translator.feed(e) for e in feeds)
    if finish:
        out += translator.finish()
    return _MADE_UP.sub(rb'"\1<made-up>"', out)


def assert_same(cls: type[BlockWriter], events: list[bytes], finish: bool, reads: list[int] | None = None) -> None:
    hot = translate(cls, events, True, finish, reads)
    general = translate(cls, events, False, finish)
    assert hot.split(b"\n\n") == general.split(b"\n\n")


# ---- the Anthropic side ---------------------------------------------------------------------------------

@SETTINGS
@given(st.from_regex(r"msg_[0-9A-Za-z_]{1,40}", fullmatch=True), st.text(), st.integers(0, 2 ** 62), st.integers(0, 2 ** 62), st.integers(0, 2 ** 62),
       st.sampled_from(["end_turn", "max_tokens", "tool_use", "stop_sequence", "refusal", None]),
       st.one_of(st.none(), st.text()))
def test_the_start_and_end_templates_are_the_encoded_events(msg_id: str, model: str, a: int, b: int, c: int,
                                                            reason: str | None, sequence: str | None) -> None:
    """message_start and message_end are byte templates: the same bytes as the events' objects encoded (an id
    is written as it is: relay's own, or an upstream's ``msg_`` id, need no escaping)."""
    start = {"type": "message_start", "message": A.message(msg_id, model, [], None, None, A.usage_dict(a, 0))}
    assert A.message_start(msg_id, model, a) == b"event: message_start\ndata: " + orjson.dumps(start) + b"\n\n"
    assert A.message_end(reason, sequence, a, b, c) == A.message_delta(reason, sequence, A.usage_dict(a, b, c)) \
        + A.MESSAGE_STOP


def test_ids_are_anthropic_shaped_and_distinct() -> None:
    ids = [A.message_id() for _ in range(1000)]
    assert len(set(ids)) == 1000
    assert all(re.fullmatch(r"msg_01[0-9A-Za-z]{22}", i) for i in ids)
    assert re.fullmatch(r"toolu_01[0-9A-Za-z]{22}", A.tool_use_id())
    assert re.fullmatch(r"relay-[0-9A-Za-z]{43}", A.thinking_signature())


# ---- OpenAI Chat ------------------------------------------------------------------------------------------

def openai_chunk(delta: Any, *, finish: Any = None, extra: dict[str, Any] | None = None,
                 choice_extra: dict[str, Any] | None = None, drop_finish: bool = False) -> bytes:
    choice: dict[str, Any] = {"index": 0, "delta": delta, **(choice_extra or {})}
    if not drop_finish:
        choice["finish_reason"] = finish
    doc = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [choice],
           **(extra or {})}
    return b"data: " + orjson.dumps(doc) + b"\n\n"


# the usual chunks of each kind (the hot shape): the delta around its one string, and the string of the i-th
USUAL = {"text": (lambda t: {"content": t}, lambda i: f"w{i} "),
         "reasoning": (lambda t: {"reasoning_content": t}, lambda i: "é" * (i % 3)),
         "args": (lambda t: {"tool_calls": [{"index": 0, "function": {"arguments": t}}]}, lambda i: f'"{i}')}
CALL = openai_chunk({"tool_calls": [{"index": 0, "id": "call_a", "type": "function",
                                     "function": {"name": "f", "arguments": ""}}]})  # what "args" chunks follow


def usual(kind: str, i: int) -> bytes:
    delta, text = USUAL[kind]
    return openai_chunk(delta(text(i)))


def near_miss(kind: str, literal: bytes) -> bytes:
    """The usual chunk's bytes around ``literal`` in its string's place."""
    return openai_chunk(USUAL[kind][0]("@@")).replace(b'"@@"', literal)


indexes = st.sampled_from([0, 1, None])
# literals in the usual chunk's place that are no good as one JSON string (or are, written otherwise than orjson would)
NEAR_MISSES = [b'"a\x01"', b'"\xff"', b'"a", "b"', b"1", b'"\\ud800"', b'"x"}, "y": {"z"', b'"unterminated', b'""',
               b'"\\u00e9t\\u00e9"', b'"a\\/b"', b'"a",\n"b"', b'"a\n"', b' "padded" ', b"", b'"a"]', b'null',
               # a chunk that ends the stream: a top-level error, the choices emptied by a later key (text, reasoning)
               b'null}}], "choices": [], "error": {"message": "boom"}, "w": [{"d": {"e": null']
call_ids = st.sampled_from(["call_a", "call_b", "", None])
args = st.sampled_from(["", "{", '{"city": ', '"Paris"}', "}", '{"a": 1}', " "])


@st.composite
def openai_deltas(draw: st.DrawFn) -> bytes:
    kind = draw(st.integers(0, 17))
    text = draw(texts)
    if kind >= 16:  # the usual chunk's bytes around a literal that is not one good JSON string
        literal = draw(st.sampled_from(NEAR_MISSES))
        return near_miss(draw(st.sampled_from(sorted(USUAL))), literal)
    if kind == 0:
        return openai_chunk({"content": text})
    if kind == 1:
        return openai_chunk({"role": "assistant", "content": text})
    if kind == 2:
        return openai_chunk({"content": None, "reasoning_content": text})
    if kind == 3:
        return openai_chunk({"reasoning": text})
    if kind == 4:
        return openai_chunk({"reasoning_content": draw(st.sampled_from([None, 3, text]))})
    if kind == 5:  # a call's first fragment: id and name
        call: dict[str, Any] = {"index": draw(indexes), "id": draw(call_ids), "type": "function",
                                "function": {"name": draw(st.sampled_from(["get_weather", "Bash", ""])),
                                             "arguments": draw(args)}}
        return openai_chunk({"tool_calls": [call]})
    if kind in (6, 7, 8):  # the next fragment of a call (the hot shape), or a near miss of it
        fragment: dict[str, Any] = {"index": draw(indexes), "function": {"arguments": draw(args)}}
        if kind == 7:
            fragment[draw(st.sampled_from(["id", "type"]))] = draw(call_ids)
        if kind == 8:
            fragment["function"] = draw(st.sampled_from([{"arguments": None}, {"name": "x", "arguments": "{}"}, {},
                                                         "text", {"arguments": {"a": 1}}]))
        delta: dict[str, Any] = {"tool_calls": [fragment]}
        if draw(st.booleans()):
            delta["content"] = draw(st.sampled_from([None, "", "x"]))
        return openai_chunk(delta)
    if kind == 9:
        return openai_chunk({"tool_calls": draw(st.sampled_from([None, [], "x", [1]]))})
    if kind == 10:
        return openai_chunk({"content": draw(st.sampled_from([[{"type": "text", "text": "part"}], 5, {"a": 1}]))})
    if kind == 11:
        return openai_chunk({"refusal": text, **draw(st.sampled_from([{}, {"content": None}]))})
    if kind == 12:  # the hot shape inside a chunk that carries something more
        extra = draw(st.sampled_from([{"usage": None}, {"usage": {"prompt_tokens": 3, "completion_tokens": 2}},
                                      {"x_groq": {"id": "q"}}, {"system_fingerprint": "fp"}, {"error": None}]))
        return openai_chunk({"content": text}, extra=extra)
    if kind == 13:
        choice_extra = draw(st.sampled_from([{"index": 1}, {"logprobs": None}, {"usage": {"completion_tokens": 1}}]))
        return openai_chunk({"content": text}, choice_extra=choice_extra, drop_finish=draw(st.booleans()))
    if kind == 14:
        return openai_chunk(draw(st.sampled_from([{}, None, "text", []])))
    return b'data: {"id":"c","choices":' + draw(st.sampled_from([b"[]", b"null", b"[1]", b"[{},{}]", b"{}"])) + b"}\n\n"


@SETTINGS
@given(st.lists(openai_deltas(), max_size=30), st.sampled_from(["end", "finish", "none"]))
def test_openai_hot_path_matches_the_general_path(deltas: list[bytes], end: str) -> None:
    events = [openai_chunk({"role": "assistant", "content": ""}), *deltas]
    if end == "end":
        events += [openai_chunk({}, finish="stop"), b"data: [DONE]\n\n"]
    assert_same(StreamTranslator, events, finish=end != "none")


@SETTINGS
@given(st.lists(st.one_of(st.tuples(st.sampled_from(sorted(USUAL)), st.integers(1, 12)), openai_deltas()),
                max_size=12),
       st.lists(st.integers(1, 40), max_size=8), st.sampled_from(["end", "finish", "none"]))
def test_openai_runs_of_a_burst_match_the_general_path(segments: list[Any], reads: list[int], end: str) -> None:
    """Reads of many chunks (a burst): runs of the learnt shape go through ``_run`` at once. Runs of the usual
    chunks of one kind (a call's arguments after the call's start) among every other shape, near misses of the
    usual one included (literals that are no good as one JSON string, in the same bytes around them)."""
    events = [openai_chunk({"role": "assistant", "content": ""})]
    for segment in segments:
        if isinstance(segment, bytes):
            events.append(segment)
            continue
        kind, count = segment
        if kind == "args":
            events.append(CALL)
        events += [usual(kind, len(events) + i) for i in range(count)]
    if end == "end":
        events += [openai_chunk({}, finish="stop"), b"data: [DONE]\n\n"]
    assert_same(StreamTranslator, events, finish=end != "none", reads=reads)


@pytest.mark.parametrize("literal", NEAR_MISSES)
@pytest.mark.parametrize("kind", sorted(USUAL))
def test_a_near_miss_inside_a_run(kind: str, literal: bytes) -> None:
    """One chunk of the usual bytes around a literal that is no good as one string, amid a run in one read."""
    events = [openai_chunk({"role": "assistant", "content": ""})] + ([CALL] if kind == "args" else [])
    events += [usual(kind, i) for i in range(1, 6)] + [near_miss(kind, literal)] + [usual(kind, i) for i in range(8, 14)]
    assert_same(StreamTranslator, events, finish=True, reads=[len(events)])


def test_two_literals_that_make_strings_only_together() -> None:
    """Neither literal is one string, but joined by a bare comma they would make two: the run's parse must not
    accept them (a newline after each comma keeps a string from spanning two literals)."""
    events = [openai_chunk({"role": "assistant", "content": ""})] + [usual("text", i) for i in range(1, 6)]
    events += [near_miss("text", b'"a'), near_miss("text", b'b", "c"')] + [usual("text", i) for i in range(8, 12)]
    assert_same(StreamTranslator, events, finish=True, reads=[len(events)])


@pytest.mark.parametrize("name", [b"error", b"delta", b""])
def test_a_named_event_inside_a_run(name: bytes) -> None:
    """The usual chunk's bytes under an event name (``event: error`` ends the stream) amid a run in one read."""
    events = [openai_chunk({"role": "assistant", "content": ""})] + [usual("text", i) for i in range(1, 6)]
    events += [b"event: " + name + b"\n" + usual("text", 6)] + [usual("text", i) for i in range(7, 12)]
    assert_same(StreamTranslator, events, finish=True, reads=[len(events)])


def _call(index: int, call_id: str, name: str) -> bytes:
    return openai_chunk({"tool_calls": [{"index": index, "id": call_id, "type": "function",
                                         "function": {"name": name, "arguments": ""}}]})


def _args(index: int, *fragments: str) -> list[bytes]:
    return [openai_chunk({"tool_calls": [{"index": index, "function": {"arguments": f}}]}) for f in fragments]


def test_runs_of_arguments_around_a_held_call() -> None:
    """A second call starts while the first's arguments are not whole (it is held); the first's next fragments,
    shaped as the run's, must still go one by one (the one that makes it whole opens the held call's block, whose
    later fragments then stream live), and the run's fragments count towards the first call's arguments."""
    events = [openai_chunk({"role": "assistant", "content": ""}), _call(0, "call_a", "f"),
              *_args(0, '{"k":', ' "', "v", "w", "x", "y"), _call(1, "call_b", "g"), *_args(1, "{", '"z"'),
              *_args(0, "1", "2", "3", '"}'), *_args(1, ": 1", "}"),
              openai_chunk({}, finish="tool_calls"), b"data: [DONE]\n\n"]
    assert_same(StreamTranslator, events, finish=True, reads=[len(events)])
    translator = StreamTranslator("claude-x")
    translator.feed(b"".join(events))
    assert [("".join(c.args), c.name) for c in translator._closed] == [('{"k": "vwxy123"}', "f"), ('{"z": 1}', "g")]


def test_a_burst_takes_the_run_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """50 text chunks in one read: one parse of the literals, every delta as the one-by-one path writes it."""
    events = [openai_chunk({"role": "assistant", "content": ""})] + [usual("text", i) for i in range(50)]
    translator = StreamTranslator("claude-x", message_id="msg_fixed")
    calls = []
    run = StreamTranslator._run
    monkeypatch.setattr(StreamTranslator, "_run",
                        lambda self, payloads, like: (calls.append(len(payloads)), run(self, payloads, like)))
    out = translator.feed(b"".join(events))
    assert calls == [49]  # the first text chunk teaches the shape, the 49 after it go at once
    assert out.count(b"text_delta") == 50 and b'"text":"w49 "' in out
    assert out == translate(StreamTranslator, events, False, False)


def test_the_smallest_answer_parses_each_chunk_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The role chunk, one text chunk, the finish: each chunk is parsed once, and neither delta takes the general
    path (the role chunk took it while no message_start was out). The shape the text chunk teaches is proven only
    when a chunk of it comes (the proof parses a whole chunk again), and here none does."""
    events = [openai_chunk({"role": "assistant", "content": ""}), usual("text", 0), openai_chunk({}, finish="stop"),
              b"data: [DONE]\n\n"]
    expected = translate(StreamTranslator, events, False, True)
    parsed: list[bytes] = []
    general: list[Any] = []
    loads = stream.loads
    monkeypatch.setattr(stream, "loads", lambda data: (parsed.append(data), loads(data))[1])
    monkeypatch.setattr(StreamTranslator, "_on_delta", lambda self, delta: general.append(delta))
    translator = StreamTranslator("claude-x", message_id="msg_fixed")
    out = b"".join(translator.feed(e) for e in events) + translator.finish()
    assert out == expected
    assert len(parsed) == 3 and general == []


def test_a_shape_learnt_from_the_wrong_place_fails_its_proof() -> None:
    """The text's literal found last where it is not the text (a later key): the proof, made when the next chunk
    of those bytes comes, rejects the shape, and that chunk is read whole (its text is the first chunk's, not
    the literal that differs)."""
    first = openai_chunk({"content": "k"}, extra={"x": {"k": 1}})
    second = openai_chunk({"content": "k"}, extra={"x": {"j": 1}})
    events = [openai_chunk({"role": "assistant", "content": ""}), first, second, openai_chunk({}, finish="stop"),
              b"data: [DONE]\n\n"]
    out = translate(StreamTranslator, events, True, True)
    assert out.count(b'"text":"k"') == 2 and b'"text":"j"' not in out
    assert out == translate(StreamTranslator, events, False, True)


def test_a_read_of_short_runs_looks_at_each_chunk_a_few_times(monkeypatch: pytest.MonkeyPatch) -> None:
    """Shaped chunks one at a time among others (a stray keep-alive after each delta), thousands in one read:
    finding the runs must look at each chunk a bounded number of times. Counting each look from the reading
    position to the read's end made such a read quadratic (8000 events: ~280 ms against ~20 ms one by one)."""
    looked = [0]

    class Counting(list):  # type: ignore[type-arg]
        def __getitem__(self, key: Any) -> Any:
            got = super().__getitem__(key)
            if isinstance(key, slice):
                looked[0] += len(got)
            return got

    real = stream.fitting
    monkeypatch.setattr(stream, "fitting", lambda payloads, names, at, like: real(Counting(payloads), names, at, like))
    events = [openai_chunk({"role": "assistant", "content": ""})]
    for i in range(2000):
        events += [usual("text", i), b"data: x\n\n"]
    translator = StreamTranslator("claude-x", message_id="msg_fixed")
    assert translator.feed(b"".join(events)) == translate(StreamTranslator, events, False, False)
    assert 0 < looked[0] <= stream.WINDOW * len(events)  # (one look from each event on: ~len(events) ** 2 / 2)


# ---- Gemini ----------------------------------------------------------------------------------------------

@st.composite
def gemini_chunks(draw: st.DrawFn) -> bytes:
    part: dict[str, Any] = {"text": draw(texts)}
    kind = draw(st.integers(0, 7))
    if kind == 1:
        part["thought"] = True
    elif kind == 2:
        part["thought"] = draw(st.sampled_from([False, "yes", None]))
    elif kind == 3:
        part["thoughtSignature"] = draw(st.sampled_from(["SIG", ""]))
        if draw(st.booleans()):
            part["thought"] = True
    elif kind == 4:
        part = {"functionCall": {"name": "f", "args": {"a": 1}}}
    elif kind == 5:
        part = draw(st.sampled_from([{"text": 3}, {}, {"inlineData": {}}]))
    parts: Any = [part]
    if kind == 6:
        parts = draw(st.sampled_from([[part, {"text": "more"}], [], None, "x", [1]]))
    candidate: dict[str, Any] = {"content": {"parts": parts, "role": "model"}}
    if draw(st.booleans()):
        candidate["index"] = draw(st.sampled_from([0, 0, 1]))
    if kind == 7:
        candidate["content"] = draw(st.sampled_from([None, "x", [], {"role": "model"}]))
    if draw(st.integers(0, 9)) == 0:
        candidate["finishReason"] = draw(st.sampled_from(["STOP", "", "MAX_TOKENS"]))
    doc: dict[str, Any] = {"candidates": [candidate], "modelVersion": "g"}
    if draw(st.booleans()):
        doc["responseId"] = draw(st.sampled_from(["r1", "r2", 7]))
    if draw(st.booleans()):
        doc["usageMetadata"] = {"promptTokenCount": 9, "candidatesTokenCount": draw(st.integers(0, 50))}
    if draw(st.integers(0, 9)) == 0:
        doc = draw(st.sampled_from([{**doc, "candidates": [candidate, candidate]}, {**doc, "candidates": []},
                                    {**doc, "error": {"code": 500, "message": "boom"}}]))
    return b"data: " + orjson.dumps(doc) + draw(st.sampled_from([b"\r\n\r\n", b"\n\n"]))


@SETTINGS
@given(st.lists(gemini_chunks(), min_size=1, max_size=30), st.booleans())
def test_gemini_hot_path_matches_the_general_path(chunks: list[bytes], finish: bool) -> None:
    assert_same(GeminiStreamTranslator, chunks, finish=finish)
