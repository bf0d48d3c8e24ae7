"""Context windows with the real Claude Code CLI (issue 8): relay in front of a scripted model with a small window.

What Claude Code 2.1.332 (as 2.1.331) does, found by experiment (see also the README's "Context windows and compaction"):
- A prompt-too-long 400 on the first exchange ends the run: stream-json `result` with `is_error: true`,
  `terminal_reason: "prompt_too_long"`, `api_error_status: 400` and the text "Prompt is too long · the request is
  ~N tokens (limit M) ...", N and M parsed from the error message. Nothing is retried (nothing to compact yet).
- Later in a session the same 400 makes it compact ("reactive" compaction) and send the request again.
- It compacts on its own once its count of the context reaches (auto-compact window - 20000 - 13000) for a model
  with a large output cap; the 20000 is kept for output and the 13000 is its summary buffer. The window is
  CLAUDE_CODE_AUTO_COMPACT_WINDOW (default for an unknown model such as ours: the 1M it assumes), BUT values
  under 100000 count as 100000 ("... so Claude Code treats it as the 100k minimum"), so the variable can make it
  compact no earlier than at 67000 tokens. Below that only CLAUDE_CODE_MAX_CONTEXT_TOKENS (the window it assumes
  for an unknown model) lowers the point.
- Compacting is one more request to the same model, with the same tools, whose last user message asks for "a
  detailed summary of the conversation so far"; the next request starts with "This session is being continued
  from a previous conversation that ran out of context." and the summary. stream-json shows a
  `compact_boundary` system event per compaction.

How sizes are measured: relay's own estimator (`relay.tokens.estimate`) over the Anthropic request Claude Code
sent, which a byte-copying proxy between the two (`Tap`) records; that is the number relay compares with the
window. The scripted model measures what reaches it (OpenAI format) with the same estimator's rules ported to
that format (`upstream_tokens`), reports that count as usage (a real upstream reports its tokenizer's count,
which is what Claude Code uses to decide when to compact), and refuses, the way llama.cpp does, any request
over its window: the tests assert it never had to.
"""

from __future__ import annotations

import gzip
import itertools
import random
import re
import sys
import zlib
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h11
import orjson
import pytest
import trio

from relay.tokens import PER_MESSAGE, PER_TOOL, estimate, text_tokens

from ..mock_upstream import Reply, json_reply
from .conftest import Claude, ClaudeRun
from .upstream import ScriptedModel, Seen, Turn, call, text_of, tools_turn

JSON = dict[str, Any]

SUMMARY_ASK = "Your task is to create a detailed summary of the conversation so far"
CONTINUED = "This session is being continued from a previous conversation that ran out of context."
SUMMARY = "<summary>The user asked to read the part files one by one; the earlier parts were read.</summary>"
AUTO_COMPACT_FLOOR = 100_000  # Claude Code 2.1.332 reads any smaller CLAUDE_CODE_AUTO_COMPACT_WINDOW as this


@pytest.fixture
def dialect() -> str:
    return "openai"


# ---- a recording proxy between Claude Code and relay -------------------------------------------------------------


@dataclass
class HTTPExchange:
    at: int  # when the request arrived, in the order of everything the tap forwarded
    method: str
    target: str
    headers: dict[str, str]
    body: bytes
    status: int
    response: bytes

    @property
    def json(self) -> Any:
        return orjson.loads(self.body)

    @property
    def is_messages(self) -> bool:
        return self.method == "POST" and self.target.split("?", 1)[0] == "/v1/messages"


Chunks = list[tuple[int, bytes]]  # (sequence number among all forwarded chunks, bytes)


def _decoded(body: bytes, encoding: str) -> bytes:
    if encoding == "gzip":
        return gzip.decompress(body)
    if encoding == "deflate":
        return zlib.decompress(body)
    assert encoding in ("", "identity"), f"request body in {encoding!r}"
    return body


def _requests(chunks: Chunks) -> list[tuple[int, h11.Request, bytes]]:
    """Complete requests from a client's bytes, each with the number of the chunk that began it."""
    conn = h11.Connection(h11.SERVER)
    out: list[tuple[int, h11.Request, bytes]] = []
    head: tuple[int, h11.Request] | None = None
    body: list[bytes] = []
    for at, data in [*chunks, (-1, b"")]:  # b"": the end of the stream
        conn.receive_data(data)
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError:  # cut in the middle of a request
                return out
            if event is h11.NEED_DATA or event is h11.PAUSED or isinstance(event, h11.ConnectionClosed):
                break
            if isinstance(event, h11.Request):
                head, body = (at, event), []
            elif isinstance(event, h11.Data):
                body.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage) and head is not None:
                out.append((head[0], head[1], b"".join(body)))
                conn.send(h11.Response(status_code=204, headers=[]))  # h11 wants an answer before the next request
                conn.send(h11.EndOfMessage())
                if conn.our_state is h11.MUST_CLOSE:
                    return out
                conn.start_next_cycle()
    return out


def _parse(sent: Chunks, received: bytes) -> list[HTTPExchange]:
    """The HTTP exchanges of one connection, from the bytes each side sent."""
    client = h11.Connection(h11.CLIENT)
    client.receive_data(received)
    out = []
    for at, request, body in _requests(sent):
        client.send(h11.Request(method=request.method, target=request.target, headers=[("host", "relay"), ("content-length", "0")]))
        client.send(h11.EndOfMessage())
        status, data = None, []
        while (event := client.next_event()) is not h11.NEED_DATA:
            if isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                data.append(bytes(event.data))
            elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                break
        if status is None:  # cut before an answer
            return out
        headers = {k.decode().lower(): v.decode() for k, v in request.headers}
        out.append(HTTPExchange(at, request.method.decode(), request.target.decode(), headers,
                                _decoded(body, headers.get("content-encoding", "")), status, b"".join(data)))
        if client.our_state is h11.MUST_CLOSE or client.their_state is h11.MUST_CLOSE:
            return out
        client.start_next_cycle()
    return out


class Tap:
    """Forwards TCP connections to relay unchanged, keeping a copy of the bytes both ways."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.connections: list[tuple[Chunks, bytearray]] = []
        self._seq = itertools.count()

    async def serve(self, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self.port)
        await trio.serve_listeners(self._forward, listeners)

    async def _forward(self, client: trio.SocketStream) -> None:
        sent: Chunks = []
        received = bytearray()
        self.connections.append((sent, received))

        async def pump(src: trio.SocketStream, dst: trio.SocketStream, keep: Callable[[bytes], None]) -> None:
            with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                while data := await src.receive_some(65536):
                    keep(data)
                    await dst.send_all(data)
                await dst.send_eof()

        async with client, await trio.open_tcp_stream("127.0.0.1", self.target_port) as server:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pump, client, server, lambda data: sent.append((next(self._seq), data)))
                nursery.start_soon(pump, server, client, received.extend)

    def messages(self) -> list[HTTPExchange]:
        """The POST /v1/messages exchanges (not count_tokens), in the order they were sent."""
        exchanges = [x for sent, received in self.connections for x in _parse(sent, bytes(received))]
        return sorted((x for x in exchanges if x.is_messages), key=lambda x: x.at)


@pytest.fixture
async def tap(nursery: trio.Nursery, relay: str) -> Tap:
    proxy = Tap(int(relay.rsplit(":", 1)[1]))
    await nursery.start(proxy.serve)
    return proxy


def launcher_via(tap: Tap, tmp_path: Path) -> list[str]:
    """`relay claude`, as a user runs it, with a config whose [server] is the tap in front of the running relay:
    it finds that relay listening, asks it for the main model's window (GET /v1/models/{model}) and starts
    `claude` with ANTHROPIC_BASE_URL and CLAUDE_CODE_AUTO_COMPACT_WINDOW set from it."""
    text = (tmp_path / "relay.toml").read_text()
    config = tmp_path / "launcher.toml"
    config.write_text(re.sub(r"(?m)^port = \d+$", f"port = {tap.port}", text, count=1))
    return [sys.executable, "-m", "relay", "claude", "-c", str(config), "--"]


# ---- sizes -------------------------------------------------------------------------------------------------------


def upstream_tokens(body: JSON) -> int:
    """relay.tokens.estimate's rules applied to an OpenAI Chat Completions body: text at ~4 characters a token,
    a few tokens of framing per message and tool, tool calls by their name and JSON arguments, tools by name,
    description and JSON schema."""
    total = 0
    for message in body.get("messages", []):
        total += PER_MESSAGE + text_tokens(text_of(message.get("content")))
        for tc in message.get("tool_calls") or []:
            total += 4 + text_tokens(tc["function"]["name"]) + text_tokens(tc["function"]["arguments"])
    for tool in body.get("tools", []):
        fn = tool["function"]
        total += PER_TOOL + text_tokens(fn["name"]) + text_tokens(fn.get("description") or "")
        total += text_tokens(orjson.dumps(fn.get("parameters")).decode())
    return total


def write_parts(project: Path, count: int, lines: int) -> list[Path]:
    """Files of varied words (14 a line, ~85 characters): about `lines` * 22 tokens each once Read numbers them."""
    rng = random.Random(8)
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "lambda"]
    paths = []
    for i in range(count):
        path = project / f"part{i:02d}.txt"
        path.write_text("".join(" ".join(rng.choice(words) for _ in range(14)) + "\n" for _ in range(lines)))
        paths.append(path)
    return paths


def estimate_read(path: Path) -> int:
    """Tokens a Read of `path` adds: its lines, each with a line number and a tab."""
    lines = path.read_text().splitlines()
    return text_tokens("".join(f"{i + 1}\t{line}\n" for i, line in enumerate(lines)))


@dataclass
class Window:
    """The scripted model's side of a session that reads `parts` one per turn: it answers summary requests with
    SUMMARY, reports its own count as usage, and refuses what does not fit its window."""

    size: int
    parts: list[Path]
    done_text: str = "Read every part."

    def __post_init__(self) -> None:
        self.seen: list[tuple[int, bool]] = []  # (upstream_tokens, is a summary request) per conversation request
        self.refused: list[int] = []
        self.turns: dict[int, Turn] = {}

    def install(self, upstream: ScriptedModel) -> None:
        upstream.script, upstream.usage, upstream.gate = self.script, self.usage, self.gate

    def usage(self, seen: Seen) -> dict[str, int]:
        n = upstream_tokens(seen.body)
        return {"prompt_tokens": n, "completion_tokens": 40, "total_tokens": n + 40}

    def gate(self, seen: Seen) -> Reply | None:
        n = upstream_tokens(seen.body)
        if seen.turn is not None:
            self.seen.append((n, is_summary_request(seen.body)))
        if n <= self.size:
            return None
        self.refused.append(n)
        message = f"request ({n} tokens) exceeds the available context size ({self.size} tokens), try increasing it"
        error = {"code": 400, "message": message, "type": "exceed_context_size_error", "n_prompt_tokens": n, "n_ctx": self.size}
        return json_reply({"error": error}, 400)

    def script(self, seen: Seen) -> Turn:
        assert seen.turn is not None
        if is_summary_request(seen.body):
            return Turn(text=SUMMARY)
        if seen.turn not in self.turns:  # a retry of the same request gets the same answer
            read = sum(1 for t in self.turns.values() if t.tool_calls)
            self.turns[seen.turn] = (
                tools_turn(call("Read", file_path=str(self.parts[read]))) if read < len(self.parts) else Turn(text=self.done_text)
            )
        return self.turns[seen.turn]


def last_user_text(body: JSON) -> str:
    users = [m for m in body.get("messages", []) if m.get("role") == "user"]
    return text_of(users[-1].get("content")) if users else ""


def is_summary_request(body: JSON) -> bool:
    return SUMMARY_ASK in last_user_text(body)


def compactions(run: ClaudeRun) -> list[JSON]:
    return [e["compact_metadata"] for e in run.events if e.get("type") == "system" and e.get("subtype") == "compact_boundary"]


def assert_compacted_properly(upstream: ScriptedModel, run: ClaudeRun) -> None:
    """Each summary request was answered with SUMMARY and the conversation went on from that summary."""
    main = [r.body for r in upstream.main]
    asks = [i for i, body in enumerate(main) if is_summary_request(body)]
    assert asks and len(compactions(run)) == len(asks), (len(asks), compactions(run))
    for i in asks:
        after = main[i + 1]
        continued = [text_of(m.get("content")) for m in after["messages"] if m["role"] == "user"]
        assert any(CONTINUED in t and "the earlier parts were read" in t for t in continued), continued[:2]
        assert upstream_tokens(after) < upstream_tokens(main[i])  # compacting made room


# ---- 1. an over-long first request -------------------------------------------------------------------------------


class TestPromptTooLong:
    @pytest.fixture
    def provider_extra(self) -> str:
        return "context_window = 8000"  # Claude Code's system prompt and tools alone are ~12k tokens

    async def test_reported_with_relays_figures(self, claude: Claude, upstream: ScriptedModel, tap: Tap) -> None:
        upstream.script = [Turn(text="never sent")]
        run = await claude.run("say hello", f"http://127.0.0.1:{tap.port}")

        (ex,) = tap.messages()  # one request, no retry: a 400 is final
        n = estimate(ex.json)
        assert n > 8000
        assert ex.status == 400, ex.response
        assert orjson.loads(ex.response)["error"] == {
            "type": "invalid_request_error",
            "message": f"prompt is too long: {n} tokens > 8000 maximum",
        }
        assert upstream.requests == []  # refused without calling the model

        # How Claude Code 2.1.332 reports it: an API-error assistant message, then a result with is_error and
        # terminal_reason "prompt_too_long" (its subtype stays "success"), exit status 1.
        result = run.result
        assert (result["is_error"], result["terminal_reason"], result["api_error_status"]) == (True, "prompt_too_long", 400), run.debug()
        assert result["api_error_type"] == "invalid_request_error"
        assert result["result"].startswith(f"Prompt is too long · the request is ~{n} tokens (limit 8000)"), result["result"]
        (message,) = [e for e in run.events if e.get("type") == "assistant"]
        assert message["is_api_error_message"] and message["error"] == "invalid_request"
        assert message["message"]["content"][0]["text"] == result["result"]
        assert run.returncode == 1


# ---- 2. a long session compacts before the window is full --------------------------------------------------------


class LongSession:
    """A session that reads parts one per turn, more than the window `W` holds, launched by `relay claude`."""

    W: int

    @pytest.fixture
    def provider_extra(self) -> str:
        return f"context_window = {self.W}"

    async def run(self, claude: Claude, upstream: ScriptedModel, tap: Tap, tmp_path: Path, parts: list[Path]) -> Window:
        """Checks that the session finished, needed compacting, compacted properly, and that the model refused nothing."""
        window = Window(self.W, parts)
        window.install(upstream)
        run = await claude.run("Read the part files one by one.", f"http://127.0.0.1:{tap.port}",
                               launcher=launcher_via(tap, tmp_path), timeout=80)
        assert run.result_text == window.done_text
        assert window.seen[0][0] + sum(estimate_read(p) for p in parts) > self.W  # too much for one window
        assert_compacted_properly(upstream, run)
        assert window.refused == []
        assert max(n for n, _ in window.seen) <= self.W
        return window


class TestCompactsBeforeTheWindow(LongSession):
    """A window at Claude Code's floor for CLAUDE_CODE_AUTO_COMPACT_WINDOW (100k): launched by `relay claude`, it
    compacts by itself at ~67k tokens, long before relay would refuse, so neither relay nor the model refuses."""

    W = AUTO_COMPACT_FLOOR

    async def test_session_compacts_without_a_refusal(self, claude: Claude, upstream: ScriptedModel, tap: Tap,
                                                      tmp_path: Path) -> None:
        window = await self.run(claude, upstream, tap, tmp_path, write_parts(claude.project, 10, 450))  # ~10k tokens a part
        # Claude Code compacted by itself: nothing was ever refused. Every request fit relay's window by relay's own
        # count and relay answered no error (no prompt-too-long). (The compact_boundary's trigger is "auto" after a
        # prompt-too-long too, so that alone would not tell.) Without the launcher's CLAUDE_CODE_AUTO_COMPACT_WINDOW,
        # Claude Code goes on to ~101k and relay refuses.
        messages = tap.messages()
        assert [x.status for x in messages] == [200] * len(messages)
        assert max(estimate(x.json) for x in messages) < self.W - 1024
        # It compacted early, not at the edge: no request came within 20k tokens of the window.
        assert max(n for n, _ in window.seen) < self.W - 20_000


# ---- 3. a window under Claude Code's floor ---------------------------------------------------------------------


class TestSmallWindow(LongSession):
    """A 40k window, under Claude Code's 100k floor for CLAUDE_CODE_AUTO_COMPACT_WINDOW: `relay claude` also sets
    CLAUDE_AUTOCOMPACT_PCT_OVERRIDE so Claude Code compacts at ~34k by itself. Nothing is refused, the model never
    sees a request over its window, and the session completes. (Without the override Claude Code reads the window
    as 100k and only relay's prompt-too-long, sent without calling the model, makes it compact.)"""

    W = 40_000

    async def test_session_compacts_in_time_under_the_floor(self, claude: Claude, upstream: ScriptedModel, tap: Tap,
                                                            tmp_path: Path) -> None:
        await self.run(claude, upstream, tap, tmp_path, write_parts(claude.project, 14, 110))  # ~2.4k tokens a part
        messages = tap.messages()
        assert [x.status for x in messages] == [200] * len(messages)  # compacted before relay had to refuse
        assert max(estimate(x.json) for x in messages) < self.W - 1024
