"""Claude Code (the real, pinned CLI) -> relay -> a scripted OpenAI-compatible model, in two upstream dialects.

Each test asserts what Claude Code did (its stream-json result, files on disk) and what the model received.
Assertions marked RELAY-BEHAVIOUR check relay choices from issue 3 (deferred tools, tool_reference as text,
reasoning as thinking blocks, thinking not sent back upstream), not something any OpenAI-compatible translation
would do.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from .conftest import CLIENT_KEY, MODEL, UPSTREAM_KEY, Claude, http_status
from .upstream import ScriptedModel, Turn, assistant_tool_calls, call, text_of, tool_names, tool_results, tools_turn

JSON = dict[str, Any]


@pytest.fixture(params=["openai", "gemini"])
def dialect(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def conversation(upstream: ScriptedModel, turns: int) -> list[JSON]:
    """The bodies of the `turns` conversation requests, checking each turn came once and streamed: Claude Code
    retries a failed request and falls back to a non-streaming one when it cannot read a stream, which would
    otherwise hide a broken relay stream."""
    main = upstream.main
    summary = [(r.turn, r.body.get("stream"), r.path) for r in main]
    assert summary == [(i, True, "/v1/chat/completions") for i in range(turns)], summary
    return [r.body for r in main]


def exchanges(body: JSON) -> list[tuple[JSON, str]]:
    """(tool call, its tool message text) for every assistant tool call in `body`, checking that the
    `role: "tool"` messages come right after the assistant message that made the calls."""
    messages = body["messages"]
    for i, message in enumerate(messages):
        ids = [tc["id"] for tc in message.get("tool_calls") or []] if message["role"] == "assistant" else []
        following = messages[i + 1 : i + 1 + len(ids)]
        shape = [(m["role"], m.get("tool_call_id"), [tc["id"] for tc in m.get("tool_calls") or []]) for m in messages]
        assert sorted(ids) == sorted(m.get("tool_call_id") for m in following if m["role"] == "tool"), shape
        assert all(ids), f"empty tool call id: {message}"
    results = tool_results(body)
    return [(tc, results[tc["id"]]) for tc in assistant_tool_calls(body)]


def system_text(body: JSON) -> str:
    return "\n".join(text_of(m.get("content")) for m in body["messages"] if m["role"] == "system")


async def test_plain_text(claude: Claude, upstream: ScriptedModel, relay: str) -> None:
    upstream.script = [Turn(text="Hello from the mock model.")]
    run = await claude.run("say hello", relay)
    assert run.result_text == "Hello from the mock model."
    (body,) = conversation(upstream, 1)
    (request,) = upstream.main
    assert request.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert not any(CLIENT_KEY in v for v in request.headers.values())
    assert body["model"] == MODEL
    assert body["messages"][0]["role"] == "system" and "Claude" in text_of(body["messages"][0]["content"])
    assert "# Environment" in system_text(body)  # Claude Code's mid-conversation system turn, kept or merged
    assert any(m["role"] == "user" and "say hello" in text_of(m["content"]) for m in body["messages"])
    assert {"Bash", "Write", "Edit", "Read", "ToolSearch"} <= set(tool_names(body))
    assert "DeferredToolPlaceholder" not in tool_names(body)  # RELAY-BEHAVIOUR: never-referenced deferred tool
    assert upstream.side == []  # Claude Code 2.1.332 -p makes no side requests


async def test_write_tool(claude: Claude, upstream: ScriptedModel, relay: str) -> None:
    target = claude.project / "hello.txt"
    content = 'line one\nline "two" \\ é 🙂 你好\n\ttabbed\n'
    upstream.script = [tools_turn(call("Write", file_path=str(target), content=content)), Turn(text="Wrote hello.txt")]
    run = await claude.run("write hello.txt", relay)
    assert run.result_text == "Wrote hello.txt"
    assert target.read_bytes() == content.encode()
    (tool_use,) = run.blocks("tool_use")
    assert tool_use["name"] == "Write" and tool_use["input"] == {"file_path": str(target), "content": content}
    _, second = conversation(upstream, 2)
    ((tc, result),) = exchanges(second)
    assert tc["function"]["name"] == "Write"
    assert orjson.loads(tc["function"]["arguments"]) == {"file_path": str(target), "content": content}
    assert "File created successfully" in result


async def test_bash_tool(claude: Claude, upstream: ScriptedModel, relay: str) -> None:
    command = "echo bash-says-hi > from_bash.txt && cat from_bash.txt && echo second-line"
    upstream.script = [tools_turn(call("Bash", command=command, description="Write a file")), Turn(text="Ran it")]
    run = await claude.run("run a command", relay)
    assert run.result_text == "Ran it"
    assert (claude.project / "from_bash.txt").read_text() == "bash-says-hi\n"
    _, second = conversation(upstream, 2)
    ((tc, result),) = exchanges(second)
    assert tc["function"]["name"] == "Bash" and orjson.loads(tc["function"]["arguments"])["command"] == command
    assert "bash-says-hi\nsecond-line" in result


async def test_two_parallel_tool_calls(claude: Claude, upstream: ScriptedModel, relay: str) -> None:
    a, b = claude.project / "a.txt", claude.project / "b.txt"
    upstream.script = [
        tools_turn(call("Write", file_path=str(a), content="A\n"), call("Bash", command=f"printf B > {b} && echo made-b")),
        Turn(text="Both done"),
    ]
    run = await claude.run("make a and b", relay)
    assert run.result_text == "Both done"
    assert (a.read_text(), b.read_text()) == ("A\n", "B")
    uses = run.blocks("tool_use")
    assert [u["name"] for u in uses] == ["Write", "Bash"] and len({u["id"] for u in uses}) == 2
    _, second = conversation(upstream, 2)
    (assistant,) = [m for m in second["messages"] if m["role"] == "assistant"]
    assert [tc["function"]["name"] for tc in assistant["tool_calls"]] == ["Write", "Bash"]  # one turn, both calls
    results = dict((tc["function"]["name"], text) for tc, text in exchanges(second))
    assert "File created successfully" in results["Write"] and "made-b" in results["Bash"]


async def test_reasoning_model(claude: Claude, upstream: ScriptedModel, relay: str) -> None:
    upstream.script = [
        tools_turn(call("Bash", command="echo 4", description="Add"), reasoning="Let me think about 2+2 with a tool."),
        Turn(text="The answer is 4.", reasoning="The tool printed 4."),
        Turn(text="Six."),
    ]
    run = await claude.run("what is 2+2?", relay)
    assert run.result_text == "The answer is 4."
    thinking = [b["thinking"] for b in run.blocks("thinking")]
    # RELAY-BEHAVIOUR: reasoning_content becomes thinking blocks.
    assert thinking == ["Let me think about 2+2 with a tool.", "The tool printed 4."]
    # The next user turn, with the thinking blocks in the history Claude Code sends back.
    follow_up = await claude.run("and 3+3?", relay, "--continue")
    assert follow_up.result_text == "Six."
    _, after_tool, next_turn = conversation(upstream, 3)
    assert any("and 3+3?" in text_of(m["content"]) for m in next_turn["messages"] if m["role"] == "user")
    for body in (after_tool, next_turn):
        assert exchanges(body)[0][1].strip() == "4"
        # RELAY-BEHAVIOUR: thinking that Claude Code sends back is dropped for a plain OpenAI provider.
        assert "Let me think" not in orjson.dumps(body["messages"]).decode()


UNICODE = (
    "Emoji 🙂👍🏽👨‍👩‍👧 flags 🇯🇵, CJK 你好世界 日本語 한국어, RTL עברית مرحبا, combining e\u0301\n"
    "quotes \"double\" 'single' `back` «guillemets», backslashes \\ \\\\ \\n \\u00e9 (literal)\n"
    "tab\there, CRLF\r\n, JS line separators \u2028 \u2029, zero-width \u200b|\ufeff|\n"
    "</think> <think>not reasoning</think> <|im_end|> {\"json\": \"in \\\"text\\\"\"}\n"
    "data: [DONE]\n\nevent: message_stop\ndata: {}\n\n"
    "trailing spaces and newline   \n"
)


async def test_unicode_and_escapes_arrive_byte_exact(claude: Claude, upstream: ScriptedModel, relay: str) -> None:
    upstream.script = [Turn(text=UNICODE)]
    run = await claude.run("say something tricky", relay)
    assert run.result_text == UNICODE
    assert "".join(b["text"] for b in run.blocks("text")) == UNICODE
    conversation(upstream, 1)


async def test_tool_search_loads_deferred_tool(claude: Claude, upstream: ScriptedModel, relay: str) -> None:
    upstream.script = [tools_turn(call("ToolSearch", query="select:WebFetch", max_results=5)), Turn(text="WebFetch is ready.")]
    run = await claude.run("find webfetch", relay)
    assert run.result_text == "WebFetch is ready."
    (result,) = run.blocks("tool_result")
    assert result["content"] == [{"type": "tool_reference", "tool_name": "WebFetch"}]  # what relay has to translate
    before, after = conversation(upstream, 2)
    assert "ToolSearch" in tool_names(before)
    # RELAY-BEHAVIOUR: a deferred tool reaches the model only once a tool_reference names it ...
    assert "WebFetch" not in tool_names(before)
    assert "WebFetch" in tool_names(after)
    assert "DeferredToolPlaceholder" not in tool_names(before) + tool_names(after)
    # ... and the tool_reference itself reaches the model as text saying the tool is loaded.
    ((tc, text),) = exchanges(after)
    assert tc["function"]["name"] == "ToolSearch"
    assert "WebFetch" in text and "loaded" in text.lower(), text


@pytest.mark.parametrize("dialect", ["openai"])
async def test_head_api_hello_probe(upstream: ScriptedModel, relay: str) -> None:
    """Claude Code's preconnect (`HEAD {ANTHROPIC_BASE_URL}/api/hello`, sent unless nonessential traffic is
    disabled; it ignores the answer) gets a prompt answer and is not forwarded."""
    port = int(relay.rsplit(":", 1)[1])
    status = await http_status("127.0.0.1", port, "HEAD", "/api/hello")
    assert status is not None and status < 500
    assert await http_status("127.0.0.1", port, "GET", "/health") == 200
    assert upstream.requests == []
