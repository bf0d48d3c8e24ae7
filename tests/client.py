"""The tests' clients for relay: one raw-HTTP client (raw bytes out, and either the raw answer or an h11-parsed
one back), the request builders, and the anthropic SDK asking the way most tests do."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anthropic
import h11
import orjson
import trio

from tests.conftest import RELAY_KEY

EXCHANGE_TIMEOUT = 10.0  # no single exchange in the fuzz and fault suites may take longer: past it, relay hung


# ---- requests ---------------------------------------------------------------------------------------------

def messages_body(model: str = "mock-model", stream: bool = False, text: str = "hi", max_tokens: int = 5) -> bytes:
    """A minimal /v1/messages body."""
    return orjson.dumps({"model": model, "max_tokens": max_tokens, "stream": stream,
                         "messages": [{"role": "user", "content": text}]})


def request_bytes(body: bytes, *, path: str = "/v1/messages", key: str, extra: list[tuple[bytes, bytes]] = ()) -> bytes:
    """A POST as the anthropic SDK sends it (with anthropic-version)."""
    head = [b"POST " + path.encode() + b" HTTP/1.1", b"host: 127.0.0.1", b"x-api-key: " + key.encode(),
            b"content-type: application/json", b"anthropic-version: 2023-06-01", b"content-length: %d" % len(body)]
    head += [k + b": " + v for k, v in extra]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


def post(path: str, body: bytes, *, key: str = RELAY_KEY, extra: bytes = b"") -> bytes:
    return (b"POST " + path.encode() + b" HTTP/1.1\r\nhost: relay\r\nx-api-key: " + key.encode()
            + b"\r\ncontent-type: application/json\r\ncontent-length: %d\r\n" % len(body) + extra + b"\r\n" + body)


def get(path: str, key: str | None = None) -> bytes:
    auth = b"" if key is None else b"x-api-key: " + key.encode() + b"\r\n"
    return b"GET " + path.encode() + b" HTTP/1.1\r\nhost: x\r\n" + auth + b"\r\n"



# ---- the raw answer -------------------------------------------------------------------------------------------

async def exchange(port: int, raw: bytes, *, read_until_close: bool = False, head: bool = False) -> bytes:
    """Send raw bytes, return the raw response (one response, framed by content-length, or until close)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(raw)
    data = b""
    with trio.fail_after(10):
        while True:
            chunk = await stream.receive_some(65536)
            if not chunk:
                break
            data += chunk
            if head and b"\r\n\r\n" in data:
                break
            if not read_until_close and b"\r\n\r\n" in data:
                head_, _, body = data.partition(b"\r\n\r\n")
                length = next((int(l.split(b":")[1]) for l in head_.split(b"\r\n") if l.lower().startswith(b"content-length:")), None)
                if length is not None and len(body) >= length:
                    break
    await stream.aclose()
    return data


def split(resp: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = resp.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    headers = {l.split(":", 1)[0].lower(): l.split(":", 1)[1].strip() for l in lines[1:]}
    return status, headers, body



# ---- the parsed answer ----------------------------------------------------------------------------------------

@dataclass
class Answer:
    """What came back on one connection for one request."""

    status: int | None  # None: the connection ended (or broke) before a response head
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    complete: bool = False  # the response was framed to its end (EndOfMessage)
    elapsed: float = 0.0
    note: str = ""  # how the connection ended when it ended early

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "")


async def roundtrips(port: int, raw: bytes, count: int, *, timeout: float = EXCHANGE_TIMEOUT) -> list[Answer]:
    """``count`` clients sending ``raw`` at once, each on a connection of its own; their answers as they end."""
    answers: list[Answer] = []

    async def one() -> None:
        answers.append(await roundtrip(port, raw, timeout=timeout))

    async with trio.open_nursery() as clients:
        for _ in range(count):
            clients.start_soon(one)
    return answers


async def roundtrip(port: int, raw: bytes, *, method: str = "POST", timeout: float = EXCHANGE_TIMEOUT,
                    stop_after_first_data: bool = False) -> Answer:
    """Send ``raw`` bytes to 127.0.0.1:port and read one response with an h11 client (primed with a request of
    ``method`` so it frames HEAD answers right). Raises trio.TooSlowError when relay takes longer than
    ``timeout``. ``stop_after_first_data`` hangs up as soon as the first body bytes arrive."""
    started = time.perf_counter()
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method="HEAD" if method == "HEAD" else "GET", target="/", headers=[("host", "relay")]))
    client.send(h11.EndOfMessage())
    answer = Answer(status=None)
    with trio.fail_after(timeout):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        try:
            try:
                await stream.send_all(raw)
            except trio.BrokenResourceError:
                pass  # relay answered and closed before taking all of it: read what it said
            parts: list[bytes] = []
            while True:
                event = client.next_event()
                if event is h11.NEED_DATA:
                    try:
                        data = await stream.receive_some(65536)
                    except trio.BrokenResourceError as exc:
                        answer.note = f"reset: {exc!r}"
                        data = b""
                    client.receive_data(data)
                    continue
                if isinstance(event, h11.Response):
                    answer.status = event.status_code
                    answer.headers = {k.decode().lower(): v.decode("latin-1") for k, v in event.headers}
                elif isinstance(event, h11.Data):
                    parts.append(bytes(event.data))
                    if stop_after_first_data:
                        break
                elif isinstance(event, h11.EndOfMessage):
                    answer.complete = True
                    break
                elif isinstance(event, h11.ConnectionClosed):
                    answer.note = answer.note or "closed"
                    break
                elif isinstance(event, h11.InformationalResponse):
                    continue
        except h11.RemoteProtocolError as exc:  # includes a close before any response
            answer.note = f"no parsable response: {exc}"
        finally:
            await stream.aclose()
    answer.body = b"".join(parts)
    answer.elapsed = time.perf_counter() - started
    return answer



# ---- the SDK ----------------------------------------------------------------------------------------------------

def sdk(port: int, key: str = RELAY_KEY) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=f"http://127.0.0.1:{port}", api_key=key, max_retries=0)


def final_message(port: int, *, model: str = "mock-model", text: str = "hi", max_tokens: int = 5,
                  key: str = RELAY_KEY) -> Any:
    """Streams one request with the SDK and returns its final Message."""
    with sdk(port, key).messages.stream(model=model, max_tokens=max_tokens,
                                        messages=[{"role": "user", "content": text}]) as s:
        return s.get_final_message()


def ask(port: int, *, model: str = "mock-model", text: str = "hi", max_tokens: int = 5, key: str = RELAY_KEY,
        stream: bool = True) -> str:
    """One request with the SDK (streamed, or not); the answer's text."""
    if stream:
        with sdk(port, key).messages.stream(model=model, max_tokens=max_tokens,
                                            messages=[{"role": "user", "content": text}]) as s:
            return s.get_final_text()
    msg = sdk(port, key).messages.create(model=model, max_tokens=max_tokens, messages=[{"role": "user", "content": text}])
    return msg.content[0].text  # type: ignore[union-attr]


# ---- relay in a process of its own --------------------------------------------------------------------------------

class RelayProcess:
    """``relay serve -c CONFIG --port 0`` in its own process, logging to ``log``: for what is per process (its log
    handler, its memory, its open-file limit) or for several instances on one store."""

    def __init__(self, config: Path, log: Path, *args: str, preexec: Callable[[], None] | None = None) -> None:
        self.log = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "relay", "serve", "-c", str(config), "--port", "0", *args],
                                         stderr=out, preexec_fn=preexec)
        self.url = ""
        self.port = 0

    async def ready(self, timeout: float = 30) -> None:
        with trio.fail_after(timeout):
            while not (m := re.search(rb"listening on (http://127\.0\.0\.1:(\d+))", self.log.read_bytes())):
                if self.proc.poll() is not None:
                    raise AssertionError(self.log.read_text())
                await trio.sleep(0.05)
        self.url, self.port = m.group(1).decode(), int(m.group(2))

    def stop(self) -> str:
        self.proc.terminate()
        self.proc.wait(20)
        return self.log.read_text()
