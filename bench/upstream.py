"""A mock OpenAI Chat Completions upstream built so that it is never the bottleneck.

Every response is built once per profile as ready-to-write bytes (HTTP head, one HTTP chunk per SSE event),
requests are parsed only as far as framing needs, sockets are raw and written without checkpoints, and paced
streams share one timer task instead of one ``trio.sleep`` per chunk (which would cost more than the relay).

Profiles are chosen by path so that one process serves every scenario and relay's ``base_url`` picks one:
``POST /p/<name>/v1/chat/completions`` uses profile ``name``; any other ``.../chat/completions`` uses
``default``. ``GET /health`` answers 200.

Run: ``python -m bench.upstream --port 0 --profiles '{"burst": {"chunks": 50}}'``; it prints
``READY <port>`` on stdout once listening.
"""

from __future__ import annotations

import argparse
import contextlib
import heapq
import re
import socket
from dataclasses import dataclass, fields
from typing import Any

import orjson
import trio

from bench import _net


@dataclass(frozen=True)
class Profile:
    """The knobs of one upstream behaviour; every field has a cheap, realistic default."""

    chunks: int = 50  #: text (``delta.content``) chunks per stream
    text: str = "Hello, world!   "  #: text carried by each chunk (16 bytes by default)
    reasoning_chunks: int = 0  #: ``delta.reasoning_content`` chunks sent before the text
    tool_calls: int = 0  #: tool calls streamed after the text
    tool_chunks: int = 8  #: argument fragments per tool call
    first_delay: float = 0.0  #: seconds before the head and first chunk are sent
    delay: float = 0.0  #: seconds between chunks
    stream: str = "auto"  #: "auto" follows the request's ``"stream": true``; "always" or "never" force it
    usage: bool = True  #: send the ``stream_options.include_usage`` style final usage chunk
    coalesce: bool = False  #: write a whole unpaced stream in one send instead of one send per event

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Profile:
        """Build from JSON, rejecting unknown keys so a typo in a knob fails loudly."""
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown profile keys: {sorted(unknown)}")
        return cls(**data)


_ID = "chatcmpl-bench"
_MODEL = "mock-model"


def _chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {
        "id": _ID,
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": _MODEL,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


def _usage(profile: Profile) -> dict[str, int]:
    completion = profile.chunks + profile.reasoning_chunks + profile.tool_calls * profile.tool_chunks
    return {"prompt_tokens": 100, "completion_tokens": completion, "total_tokens": 100 + completion}


def _tool_arguments(index: int, pieces: int) -> list[str]:
    """A JSON argument string cut into ``pieces`` fragments at arbitrary (not token-aligned) places."""
    args = orjson.dumps({"command": f"ls -la /tmp/dir{index} && echo done", "description": "List a folder"})
    text = args.decode()
    step = max(1, -(-len(text) // max(1, pieces)))
    return [text[i : i + step] for i in range(0, len(text), step)]


def stream_events(profile: Profile) -> list[bytes]:
    """The SSE events (``data: ...\\n\\n``) of one streamed completion, ending with ``data: [DONE]``.

    Also used by the translator micro-benchmark as its recorded input, so both measure the same streams.
    """
    out: list[dict[str, Any]] = [_chunk({"role": "assistant", "content": ""})]
    out += [_chunk({"reasoning_content": profile.text}) for _ in range(profile.reasoning_chunks)]
    out += [_chunk({"content": profile.text}) for _ in range(profile.chunks)]
    for i in range(profile.tool_calls):
        head = {"index": i, "id": f"call_{i}", "type": "function", "function": {"name": "Bash", "arguments": ""}}
        out.append(_chunk({"tool_calls": [head]}))
        out += [
            _chunk({"tool_calls": [{"index": i, "function": {"arguments": piece}}]})
            for piece in _tool_arguments(i, profile.tool_chunks)
        ]
    out.append(_chunk({}, "tool_calls" if profile.tool_calls else "stop"))
    if profile.usage:
        final = _chunk({})
        final["choices"] = []
        final["usage"] = _usage(profile)
        out.append(final)
    return [b"data: " + orjson.dumps(c) + b"\n\n" for c in out] + [b"data: [DONE]\n\n"]


def completion_body(profile: Profile) -> bytes:
    """The non-streaming ``chat.completion`` JSON equivalent of :func:`stream_events`."""
    message: dict[str, Any] = {"role": "assistant", "content": profile.text * profile.chunks}
    if profile.reasoning_chunks:
        message["reasoning_content"] = profile.text * profile.reasoning_chunks
    if profile.tool_calls:
        message["tool_calls"] = [
            {"id": f"call_{i}", "type": "function",
             "function": {"name": "Bash", "arguments": "".join(_tool_arguments(i, 1))}}
            for i in range(profile.tool_calls)
        ]
    body = {
        "id": _ID,
        "object": "chat.completion",
        "created": 1700000000,
        "model": _MODEL,
        "choices": [{"index": 0, "message": message,
                     "finish_reason": "tool_calls" if profile.tool_calls else "stop"}],
        "usage": _usage(profile),
    }
    return orjson.dumps(body)


_STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
    b"transfer-encoding: chunked\r\n\r\n"
)


def _json_response(status: bytes, body: bytes) -> bytes:
    return (
        b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\ncontent-length: "
        + str(len(body)).encode() + b"\r\n\r\n" + body
    )


@dataclass(frozen=True)
class Prepared:
    """A profile turned into the exact bytes to write; built once at start-up."""

    profile: Profile
    frames: tuple[bytes, ...]  #: streamed response: frames[0] carries the HTTP head, the last one the 0-chunk
    paced: tuple[bytes, ...]  #: the same frames grouped into the writes a paced stream makes
    whole: bytes  #: the same stream as one buffer, for coalesced writes
    plain: bytes  #: the non-streaming response

    @classmethod
    def build(cls, profile: Profile) -> Prepared:
        frames = [b"%x\r\n%s\r\n" % (len(e), e) for e in stream_events(profile)]
        frames[0] = _STREAM_HEAD + frames[0]
        frames[-1] += b"0\r\n\r\n"
        # A real model sends the role chunk with its first token, and the finish chunk, usage and [DONE]
        # back to back one token after the last: pacing those apart would invent gaps no upstream has.
        tail = 2 + profile.usage
        paced = [frames[0] + frames[1], *frames[2:-tail], b"".join(frames[-tail:])]
        return cls(profile, tuple(frames), tuple(paced), b"".join(frames),
                   _json_response(b"200 OK", completion_body(profile)))


class PacedStream:
    """One paced response in flight: the timer task writes its frames; its own task handles back-pressure."""

    __slots__ = ("sock", "frames", "delay", "index", "due", "pending", "wake", "failed")

    def __init__(self, sock: socket.socket, frames: tuple[bytes, ...], first_due: float, delay: float) -> None:
        self.sock = sock
        self.frames = frames
        self.delay = delay
        self.index = 0
        self.due = first_due
        self.pending: memoryview | None = None  #: bytes the kernel would not take; the owner task flushes them
        self.wake = trio.Event()
        self.failed = False

    @property
    def done(self) -> bool:
        return self.index >= len(self.frames)


class Pacer:
    """A single timer task for every paced stream, waking at most once per ``resolution`` seconds.

    One ``trio.sleep`` per chunk per stream costs tens of microseconds; at 1,024 streams sending a chunk every
    20 ms that is a whole core. A heap plus one non-blocking send per chunk costs little more than the syscall.
    """

    def __init__(self, resolution: float = 0.001) -> None:
        self.resolution = resolution
        self._heap: list[tuple[float, int, PacedStream]] = []
        self._seq = 0
        self._idle = trio.Event()

    def add(self, stream: PacedStream) -> None:
        """Schedule ``stream``'s next frame at ``stream.due``."""
        self._seq += 1
        heapq.heappush(self._heap, (stream.due, self._seq, stream))
        self._idle.set()

    async def run(self) -> None:
        heap = self._heap
        while True:
            if not heap:
                self._idle = trio.Event()
                await self._idle.wait()
                continue
            now = trio.current_time()
            if heap[0][0] > now:
                await trio.sleep_until(max(heap[0][0], now + self.resolution))
                continue
            horizon = now + self.resolution / 2
            while heap and heap[0][0] <= horizon:
                self._step(heapq.heappop(heap)[2])

    def _step(self, stream: PacedStream) -> None:
        frame = stream.frames[stream.index]
        stream.index += 1
        try:
            sent = _net.try_send(stream.sock, frame)
        except OSError:
            stream.failed = True
            stream.wake.set()
            return
        if sent < len(frame):
            stream.pending = memoryview(frame)[sent:]
            stream.wake.set()
        elif stream.done:
            stream.wake.set()
        else:
            stream.due += stream.delay
            self.add(stream)


_PROFILE_PATH = re.compile(rb"^/p/([A-Za-z0-9_.-]+)/")


def wants_stream(body: bytes) -> bool:
    """Whether the request has ``"stream": true``, without parsing it: ``bytes.find`` scans 1 MB in
    microseconds, where a regex took 16 ms, enough to skew the body-size figures."""
    i = body.find(b'"stream"')
    while i >= 0:
        if i == 0 or body[i - 1] != 0x5C:  # a backslash before it means a quote inside a string
            rest = body[i + 8 : i + 24].lstrip()
            if rest[:1] == b":" and rest[1:].lstrip().startswith(b"true"):
                return True
        i = body.find(b'"stream"', i + 8)
    return False


class BadRequest(Exception):
    """The peer sent something this minimal parser does not accept; the connection is closed."""


class Server:
    """Accept loop plus one task per keep-alive connection."""

    def __init__(self, profiles: dict[str, Profile]) -> None:
        self.prepared = {name: Prepared.build(p) for name, p in profiles.items()}
        self.prepared.setdefault("default", Prepared.build(Profile()))
        self.pacer = Pacer()

    async def serve(
        self, listener: socket.socket, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve forever on an already-listening socket; ``task_status`` receives the port."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.pacer.run)
            task_status.started(listener.getsockname()[1])
            await _net.accept_forever(listener, nursery, self._connection)

    async def _connection(self, sock: socket.socket) -> None:
        buf = bytearray()
        try:
            while True:
                request = await _read_request(sock, buf)
                if request is None:
                    return
                path, body, keep_alive = request
                if not await self._respond(sock, path, body):
                    return
                if not keep_alive:
                    return
        except (OSError, BadRequest):
            return
        finally:
            _net.close(sock)

    async def _respond(self, sock: socket.socket, path: bytes, body: bytes) -> bool:
        """Write one response; False when the connection must be dropped."""
        if path == b"/health":
            await _net.send_all(sock, _json_response(b"200 OK", b'{"status":"ok"}'))
            return True
        if not path.split(b"?", 1)[0].endswith(b"/chat/completions"):
            await _net.send_all(sock, _json_response(b"404 Not Found", b'{"error":{"message":"not found"}}'))
            return True
        match = _PROFILE_PATH.match(path)
        prepared = self.prepared.get(match.group(1).decode() if match else "default")
        if prepared is None:
            await _net.send_all(sock, _json_response(b"404 Not Found", b'{"error":{"message":"no such profile"}}'))
            return True
        profile = prepared.profile
        streaming = profile.stream == "always" or (profile.stream == "auto" and wants_stream(body))
        if profile.first_delay and not profile.delay:
            await trio.sleep(profile.first_delay)
        if not streaming:
            await _net.send_all(sock, prepared.plain)
        elif profile.delay:
            return await self._paced(sock, prepared)
        elif profile.coalesce:
            await _net.send_all(sock, prepared.whole)
        else:
            for frame in prepared.frames:
                sent = _net.try_send(sock, frame)  # no coroutine per frame unless the buffer is full
                if sent < len(frame):
                    await _net.send_all(sock, memoryview(frame)[sent:])
        return True

    async def _paced(self, sock: socket.socket, prepared: Prepared) -> bool:
        profile = prepared.profile
        stream = PacedStream(sock, prepared.paced, trio.current_time() + profile.first_delay, profile.delay)
        self.pacer.add(stream)
        while True:
            await stream.wake.wait()
            stream.wake = trio.Event()
            if stream.failed:
                return False
            if stream.pending is not None:
                pending, stream.pending = stream.pending, None
                await _net.send_all(sock, pending)
                if not stream.done:
                    stream.due = max(stream.due + stream.delay, trio.current_time())
                    self.pacer.add(stream)
                    continue
            if stream.done:
                return True


async def _read_request(sock: socket.socket, buf: bytearray) -> tuple[bytes, bytes, bool] | None:
    """Read one request (path, body, keep-alive) from ``buf`` + socket; None on a clean EOF between requests."""
    while (end := buf.find(b"\r\n\r\n")) < 0:
        data = await _net.recv(sock)
        if not data:
            if buf:
                raise BadRequest("EOF inside request head")
            return None
        buf += data
        if len(buf) > 65536 and buf.find(b"\r\n\r\n") < 0:
            raise BadRequest("request head too large")
    head = bytes(buf[:end])
    del buf[: end + 4]
    lines = head.split(b"\r\n")
    try:
        _method, path, version = lines[0].split(b" ", 2)
    except ValueError:
        raise BadRequest("bad request line") from None
    length = 0
    chunked = False
    keep_alive = version == b"HTTP/1.1"
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding":
            chunked = b"chunked" in value.lower()
        elif name == b"connection":
            keep_alive = b"close" not in value.lower()
    body = await _read_chunked(sock, buf) if chunked else await _read_exact(sock, buf, length)
    return path, body, keep_alive


async def _read_exact(sock: socket.socket, buf: bytearray, length: int) -> bytes:
    while len(buf) < length:
        data = await _net.recv(sock)
        if not data:
            raise BadRequest("EOF inside body")
        buf += data
    body = bytes(buf[:length])
    del buf[:length]
    return body


async def _read_chunked(sock: socket.socket, buf: bytearray) -> bytes:
    """Decode a chunked request body (rare from HTTP clients with a known body, but legal)."""
    parts: list[bytes] = []
    while True:
        while (eol := buf.find(b"\r\n")) < 0:
            data = await _net.recv(sock)
            if not data:
                raise BadRequest("EOF inside chunked body")
            buf += data
        size = int(bytes(buf[:eol]).split(b";", 1)[0], 16)
        del buf[: eol + 2]
        if size == 0:
            while (end := buf.find(b"\r\n")) != 0:  # skip trailers up to the empty line
                if end > 0:
                    del buf[: end + 2]
                    continue
                data = await _net.recv(sock)
                if not data:
                    raise BadRequest("EOF inside trailers")
                buf += data
            del buf[:2]
            return b"".join(parts)
        parts.append(await _read_exact(sock, buf, size + 2))
        parts[-1] = parts[-1][:-2]


def parse_profiles(text: str) -> dict[str, Profile]:
    """``{"name": {knob: value}}`` JSON to profiles."""
    raw = orjson.loads(text) if text else {}
    return {name: Profile.from_dict(knobs) for name, knobs in raw.items()}


def main(argv: list[str] | None = None) -> None:
    """Command line: listen, print ``READY <port>``, serve until killed."""
    parser = argparse.ArgumentParser(prog="python -m bench.upstream", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--profiles", default="", help='JSON: {"name": {"chunks": 50, "delay": 0.02, ...}}')
    args = parser.parse_args(argv)
    server = Server(parse_profiles(args.profiles))
    listener = _net.listen(args.host, args.port)

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(server.serve, listener)
            print(f"READY {port}", flush=True)

    with contextlib.suppress(KeyboardInterrupt):
        trio.run(run)


if __name__ == "__main__":
    main()
