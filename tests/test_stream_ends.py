"""Honest stream ends (issue 13 item 3): an upstream stream that closes cleanly without its format's own end
marker (OpenAI Chat: no finish_reason and no [DONE]; Gemini: no finishReason; Responses: no response.completed;
Anthropic: no message_stop) was cut short. After output it ends in ``event: error`` (api_error) behind what was
already sent; with nothing sent it is an HTTP 502. A finish_reason without [DONE] is a whole answer.

Over loopback: a scripted upstream per format, the real relay, and the official SDK as the judge."""

from __future__ import annotations

from typing import Any

import anthropic
import pytest
import trio

from tests.format_mocks import (
    anthropic_sse,
    anthropic_text_events,
    client,
    completed,
    created,
    format_relay,
    gemini_chunk,
    gemini_sse,
    gemini_usage,
    responses_sse,
    run,
    text_events,
)
from tests.mock_upstream import MockUpstream, Reply, chunk, sse

USER = [{"role": "user", "content": "hi"}]
ENDED = "the upstream ended the stream before finishing"


def openai_cut() -> Reply:
    return Reply(pieces=sse(chunk({"role": "assistant", "content": ""}), chunk({"content": "Hello"}), done=False))


def openai_finish_no_done() -> Reply:
    return Reply(pieces=sse(chunk({"role": "assistant", "content": ""}), chunk({"content": "Hello"}),
                            chunk({}, "stop", usage={"prompt_tokens": 3, "completion_tokens": 1}), done=False))


def openai_done_no_finish() -> Reply:
    return Reply(pieces=sse(chunk({"role": "assistant", "content": ""}), chunk({"content": "Hello"})))


# (format, the reply cut short after "Hello", a reply that is cut short before any output)
CUT: dict[str, tuple[Reply, Reply]] = {
    "openai": (openai_cut(), Reply(pieces=[b": PROCESSING\n\n"])),
    "gemini": (gemini_sse(gemini_chunk({"text": "Hello"})), gemini_sse()),
    "openai-responses": (responses_sse(created(), *text_events("Hello")), responses_sse(created())),
    "anthropic": (anthropic_sse(*anthropic_text_events("Hello")[:5]), anthropic_sse({"type": "ping"})),
}
WHOLE: dict[str, Reply] = {
    "openai": openai_finish_no_done(),
    "gemini": gemini_sse(gemini_chunk({"text": "Hello"}, finish="STOP", usage=gemini_usage())),
    "openai-responses": responses_sse(created(), *text_events("Hello"), completed()),
    "anthropic": anthropic_sse(*anthropic_text_events("Hello")),
}


async def relay_for(nursery: trio.Nursery, fmt: str, reply: Reply) -> Any:
    upstream = MockUpstream(lambda r: reply)
    await nursery.start(upstream.serve)
    return await format_relay(nursery, upstream, fmt)


def stream_texts(relay: Any) -> tuple[list[str], anthropic.APIStatusError | None, str | None]:
    """The text deltas the SDK delivered, the error it raised (if any), and the stop reason (if it finished)."""
    texts: list[str] = []
    try:
        with client(relay).messages.stream(model="up-model", max_tokens=50, messages=USER) as stream:
            for event in stream:
                if event.type == "text":
                    texts.append(event.text)
            return texts, None, stream.get_final_message().stop_reason
    except anthropic.APIStatusError as exc:
        return texts, exc, None


@pytest.mark.parametrize("fmt", sorted(CUT))
async def test_cut_after_output_is_an_error_event(nursery: trio.Nursery, fmt: str) -> None:
    relay = await relay_for(nursery, fmt, CUT[fmt][0])
    texts, error, stop = await run(lambda: stream_texts(relay))
    assert texts == ["Hello"], "what came before the cut reaches the client"
    assert error is not None and stop is None, "a cut stream must not end as a whole message"
    assert error.body == {"type": "error", "error": {"type": "api_error", "message": error.body["error"]["message"]}}
    assert ENDED in error.body["error"]["message"]


@pytest.mark.parametrize("fmt", sorted(CUT))
async def test_cut_before_output_is_http_502(nursery: trio.Nursery, fmt: str) -> None:
    relay = await relay_for(nursery, fmt, CUT[fmt][1])
    texts, error, _ = await run(lambda: stream_texts(relay))
    assert texts == [] and error is not None
    assert error.status_code == 502 and error.body["error"]["type"] == "api_error"  # type: ignore[index]
    message = error.body["error"]["message"]  # type: ignore[index]
    # a body with no event at all is the empty-stream 502 (which may mean an overflow); one with events but no
    # output (Responses' response.created, Anthropic's ping) ended before finishing
    assert ENDED in message or "the upstream stream ended without any data" in message


@pytest.mark.parametrize("fmt", sorted(WHOLE))
async def test_finished_streams_stay_whole(nursery: trio.Nursery, fmt: str) -> None:
    """The control: each format's end marker present (OpenAI: finish_reason without [DONE]) is a normal end."""
    relay = await relay_for(nursery, fmt, WHOLE[fmt])
    texts, error, stop = await run(lambda: stream_texts(relay))
    assert (texts, error, stop) == (["Hello"], None, "end_turn")


async def test_done_without_finish_reason_is_whole(nursery: trio.Nursery) -> None:
    """[DONE] is OpenAI's own end marker: with it, a missing finish_reason is no truncation."""
    relay = await relay_for(nursery, "openai", openai_done_no_finish())
    texts, error, stop = await run(lambda: stream_texts(relay))
    assert (texts, error, stop) == (["Hello"], None, "end_turn")


async def test_gemini_blocked_prompt_needs_no_finish_reason(nursery: trio.Nursery) -> None:
    """A prompt Gemini blocks gets no candidates (so no finishReason): that is a finished (refused) answer."""
    blocked = {"promptFeedback": {"blockReason": "SAFETY"}, "usageMetadata": gemini_usage(output=0),
               "modelVersion": "gemini-x", "responseId": "resp-1"}
    relay = await relay_for(nursery, "gemini", gemini_sse(blocked))
    texts, error, stop = await run(lambda: stream_texts(relay))
    assert (texts, error, stop) == ([], None, "refusal")


async def test_openai_tool_call_cut_short_is_not_run(nursery: trio.Nursery) -> None:
    """The case that matters most: half a tool call, then a clean close. Claude Code must not run it."""
    call = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"ci'}}
    reply = Reply(pieces=sse(chunk({"role": "assistant", "tool_calls": [call]}), done=False))
    relay = await relay_for(nursery, "openai", reply)
    texts, error, stop = await run(lambda: stream_texts(relay))
    assert error is not None and stop is None and ENDED in error.body["error"]["message"]  # type: ignore[index]
