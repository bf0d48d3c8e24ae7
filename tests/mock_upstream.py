"""A scriptable OpenAI-compatible upstream on loopback for tests: records every request, answers with
whatever the test scripted (status, headers, body pieces with optional pauses, or a dropped connection)."""

from __future__ import annotations

import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import h11
import orjson
import trio


@dataclass
class Reply:
    status: int = 200
    headers: list[tuple[str, str]] = field(default_factory=lambda: [("content-type", "text/event-stream")])
    pieces: list[bytes | float] = field(default_factory=list)  # bytes are written; a float is a pause (s)
    chunked: bool = True
    cut: bool = False  # drop the connection after the pieces, without ending the body
    delay: float = 0.0  # silence before the head (a server that thinks before it answers at all)
    coalesce: bool = False  # head, pieces (one chunk each) and end in one write: a fast model's whole answer
    first_with_head: bool = False  # the head and the first piece in one write (the rest as usual)


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return orjson.loads(self.body)


def sse(*chunks: Any, done: bool = True) -> list[bytes | float]:
    pieces: list[bytes | float] = [b"data: " + (c if isinstance(c, bytes) else orjson.dumps(c)) + b"\n\n" for c in chunks]
    if done:
        pieces.append(b"data: [DONE]\n\n")
    return pieces


def json_reply(doc: Any, status: int = 200, headers: list[tuple[str, str]] | None = None) -> Reply:
    return Reply(status=status, headers=[("content-type", "application/json"), *(headers or [])],
                 pieces=[orjson.dumps(doc)], chunked=False)


Handler = Callable[[Recorded], Reply]


class MockUpstream:
    def __init__(self, handler: Handler | None = None, tls: ssl.SSLContext | None = None) -> None:
        self.tls = tls  # serve HTTPS with this server context
        self.handler: Handler = handler or (lambda r: json_reply({"error": {"message": "no script"}}, 500))
        self.requests: list[Recorded] = []
        self.port = 0
        self.open_connections = 0
        self.accepted = 0  # connections ever accepted
        self.cancelled = trio.Event()  # set when a client (relay) goes away mid-response

    @property
    def base_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}/v1"

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        if self.tls is not None:
            listeners = [trio.SSLListener(listener, self.tls, https_compatible=True) for listener in listeners]
        task_status.started(self.port)
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: Any) -> None:
        self.open_connections += 1
        self.accepted += 1
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                request = None
                body = b""
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        conn.receive_data(await stream.receive_some(65536))
                        continue
                    if isinstance(event, h11.Request):
                        request = event
                    elif isinstance(event, h11.Data):
                        body += event.data
                    elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                        break
                if request is None:
                    return
                rec = Recorded(request.method.decode(), request.target.decode(),
                               {k.decode().lower(): v.decode() for k, v in request.headers}, body)
                self.requests.append(rec)
                reply = self.handler(rec)
                headers = [(k, v) for k, v in reply.headers]
                if not reply.chunked:
                    size = sum(len(p) for p in reply.pieces if isinstance(p, bytes))
                    headers.append(("content-length", str(size)))
                if reply.delay:
                    with trio.move_on_after(reply.delay):  # as a pause below: notice a client that hangs up
                        if not await stream.receive_some(65536):
                            self.cancelled.set()
                            return
                head = conn.send(h11.Response(status_code=reply.status, headers=headers))
                if reply.coalesce:
                    await stream.send_all(head + b"".join(conn.send(h11.Data(data=p)) for p in reply.pieces
                                                          if isinstance(p, bytes)) + conn.send(h11.EndOfMessage()))
                    conn.start_next_cycle()
                    continue
                pieces = reply.pieces
                if reply.first_with_head and pieces and isinstance(pieces[0], bytes):
                    head += conn.send(h11.Data(data=pieces[0]))
                    pieces = pieces[1:]
                await stream.send_all(head)
                try:
                    for piece in pieces:
                        if isinstance(piece, float):
                            with trio.move_on_after(piece):  # pause, but notice a client that hangs up
                                if not await stream.receive_some(65536):
                                    self.cancelled.set()
                                    return
                        else:
                            await stream.send_all(conn.send(h11.Data(data=piece)))
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    self.cancelled.set()
                    return
                if reply.cut:
                    return
                await stream.send_all(conn.send(h11.EndOfMessage()))
                if conn.our_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            self.cancelled.set()
        finally:
            self.open_connections -= 1
            await stream.aclose()


def chunk(delta: dict[str, Any] | None = None, finish: str | None = None, usage: dict[str, Any] | None = None,
          choices: bool = True) -> dict[str, Any]:
    doc: dict[str, Any] = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    if choices:
        doc["choices"] = [{"index": 0, "delta": delta or {}, "finish_reason": finish}]
    else:
        doc["choices"] = []
    if usage is not None:
        doc["usage"] = usage
    return doc


def text_stream(*texts: str, usage: tuple[int, int] | None = (10, 5)) -> Reply:
    """``usage=None``: no usage chunk at all, as llama-cpp-python's server streams."""
    chunks = [chunk({"role": "assistant", "content": ""})]
    chunks += [chunk({"content": t}) for t in texts]
    chunks.append(chunk({}, "stop"))
    if usage is not None:
        chunks.append(chunk(choices=False, usage={"prompt_tokens": usage[0], "completion_tokens": usage[1],
                                                  "total_tokens": sum(usage)}))
    return Reply(pieces=sse(*chunks))


def completion(message: dict[str, Any], finish: str = "stop", usage: tuple[int, int] = (10, 5)) -> Reply:
    return json_reply({
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", **message}, "finish_reason": finish}],
        "usage": {"prompt_tokens": usage[0], "completion_tokens": usage[1], "total_tokens": sum(usage)},
    })
