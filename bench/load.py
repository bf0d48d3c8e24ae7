"""Load generator: N keep-alive clients, each reading every response stream to its end.

Each client sends a prebuilt request, decodes the HTTP framing (Content-Length or chunked), counts SSE events,
checks the stream ended with its marker (``event: message_stop`` for relay, ``data: [DONE]`` directly), and
records time to first body byte, total time and the longest silence between two reads of the body.

A Python client can be slower than the server it measures, so the work can be spread over worker processes
(:class:`LoadPool`); each runs its share of the clients and all start on one signal, so connection set-up
and interpreter start-up stay out of the figures. ``python -m bench.load --worker`` is that worker: it reads
one JSON :class:`LoadSpec` per line on stdin, connects, prints ``READY``, waits for ``GO``, runs, and prints
one JSON result line.
"""

from __future__ import annotations

import heapq
import math
import select
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO

import orjson

from bench import _net


@dataclass(frozen=True)
class LoadSpec:
    """One phase of load: what to send, to whom, how many at once, and when to stop."""

    port: int
    path: str
    body_file: str  #: request body, read from a file so 1 MB bodies don't travel through pipes per phase
    headers: dict[str, str] = field(default_factory=dict)
    host: str = "127.0.0.1"
    concurrency: int = 1
    requests: int = 0  #: total across all clients; 0 = bounded by ``duration`` only
    duration: float = 0.0  #: seconds after which no new request starts; 0 = bounded by ``requests`` only
    marker: str = ""  #: text the body must contain (at its end, for SSE) for the request to count as good
    stagger: float = 0.0  #: clients start spread evenly over this many seconds (desynchronises paced streams)
    timeout: float = 60.0  #: per request
    #: a text in the body rewritten for every request, to the same length (``bench.bodies.VARY``): no two requests
    #: of the phase are the same bytes
    vary: str = ""
    # Set by LoadPool when it splits a spec over processes:
    share_index: int = 0
    share_count: int = 1


@dataclass
class Tally:
    """What one process measured; merged across processes by :func:`merge`. Times are in seconds."""

    ok: int = 0
    errors: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)
    events: int = 0
    body_bytes: int = 0
    ttfb: list[float] = field(default_factory=list)
    total: list[float] = field(default_factory=list)
    max_gap: list[float] = field(default_factory=list)
    started: float = 0.0  #: time.monotonic(), comparable across processes on one machine
    finished: float = 0.0

    def error(self, kind: str) -> None:
        self.errors += 1
        self.error_kinds[kind] = self.error_kinds.get(kind, 0) + 1


class ProtocolError(Exception):
    """The server's reply could not be read as HTTP/1.1."""


class _Budget:
    """Shared stop rule for all clients in a process: a request count, a deadline, or both."""

    def __init__(self, requests: int, duration: float) -> None:
        self.left = requests if requests > 0 else math.inf
        self.deadline = time.perf_counter() + duration if duration > 0 else math.inf

    def take(self) -> bool:
        if self.left <= 0 or time.perf_counter() >= self.deadline:
            return False
        self.left -= 1
        return True


class ResponseReader:
    """Sans-I/O reader of one HTTP/1.1 response: bytes in, "done?" out, plus what it measured.

    Body timing starts with the first read that carries body bytes (time to first byte); every later read
    updates the longest gap. Data of complete chunks is scanned once per read, not once per chunk.
    """

    __slots__ = (
        "marker", "t0", "buf", "head_done", "status", "keep_alive", "chunked", "length",
        "first", "last", "max_gap", "events", "size", "seen", "tail", "last_nl",
    )

    def __init__(self, marker: bytes, t0: float) -> None:
        self.marker = marker
        self.t0 = t0
        self.buf = bytearray()
        self.head_done = False
        self.status = 0
        self.keep_alive = True
        self.chunked = False
        self.length = -1
        self.first = 0.0
        self.last = 0.0
        self.max_gap = 0.0
        self.events = 0
        self.size = 0
        self.seen = not marker
        self.tail = b""
        self.last_nl = False

    @property
    def ttfb(self) -> float:
        return self.first - self.t0

    def feed(self, data: bytes, now: float) -> bool:
        """Take one read's bytes; True once the response is complete."""
        buf = self.buf
        buf += data
        if not self.head_done:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > 65536:
                    raise ProtocolError("response head too large")
                return False
            self._head(bytes(buf[:end]))
            del buf[: end + 4]
            if not buf and (self.chunked or self.length != 0):
                return False
        if self.first:
            self.max_gap = max(self.max_gap, now - self.last)
        else:
            self.first = now
        self.last = now
        if self.chunked:
            return self._chunks()
        if self.length >= 0:
            if len(buf) < self.length:
                return False
            self._scan(bytes(buf[: self.length]))
            del buf[: self.length]
            return True
        return False  # close-delimited: ends at EOF

    def eof(self) -> bool:
        """The peer closed; True when that legitimately ends a close-delimited body."""
        if self.head_done and not self.chunked and self.length < 0:
            self._scan(bytes(self.buf))
            self.buf.clear()
            self.keep_alive = False
            if not self.first:
                self.first = time.perf_counter()
            return True
        return False

    def _head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        try:
            self.status = int(lines[0].split(b" ", 2)[1])
        except (IndexError, ValueError):
            raise ProtocolError(f"bad status line {lines[0][:80]!r}") from None
        self.keep_alive = lines[0].startswith(b"HTTP/1.1")
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                self.length = int(value)
            elif name == b"transfer-encoding":
                self.chunked = b"chunked" in value.lower()
            elif name == b"connection":
                self.keep_alive = b"close" not in value.lower()
        self.head_done = True

    def _chunks(self) -> bool:
        buf = self.buf
        pos = 0
        pieces: list[bytearray] = []
        done = False
        while True:
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                break
            size = int(buf[pos:eol].split(b";", 1)[0], 16)
            if size == 0:
                if len(buf) >= eol + 4:  # no trailers expected from these servers
                    pos = eol + 4
                    done = True
                break
            stop = eol + 2 + size + 2
            if len(buf) < stop:
                break
            pieces.append(buf[eol + 2 : stop - 2])
            pos = stop
        if pieces:
            self._scan(b"".join(pieces))
        del buf[:pos]
        return done

    def _scan(self, data: bytes) -> None:
        """Count SSE events (blank lines) and look for the end marker, across arbitrary splits."""
        if not data:
            return
        self.size += len(data)
        self.events += data.count(b"\n\n") + (self.last_nl and data[0] == 10)
        self.last_nl = data[-1] == 10
        if not self.seen:
            self.seen = self.marker in self.tail + data
            self.tail = data[1 - len(self.marker) :]


def build_request(spec: LoadSpec, body: bytes) -> bytes:
    """The exact bytes of one request; sent unchanged for every request of the phase."""
    lines = [
        f"POST {spec.path} HTTP/1.1",
        f"Host: {spec.host}:{spec.port}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        *(f"{k}: {v}" for k, v in spec.headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class _Varied:
    """The request with ``spec.vary`` rewritten each time: the process's index, then a count, in its width."""

    def __init__(self, request: bytes, spec: LoadSpec) -> None:
        marker = spec.vary.encode()
        at = request.find(marker)
        if at < 0 or request.count(marker) != 1:
            raise ValueError(f"the body must hold {spec.vary!r} once")
        self.before, self.after = request[:at], request[at + len(marker):]
        self.width = len(marker) - 2
        self.prefix = f"{spec.share_index:03d}"
        self.count = 0

    def next(self) -> bytes:
        self.count += 1
        text = f"[{self.prefix}{self.count:0{self.width - len(self.prefix)}d}]".encode()
        return b"".join((self.before, text, self.after))


def _connect(spec: LoadSpec) -> socket.socket:
    """Blocking connect (loopback answers from the kernel's backlog at once), then non-blocking use."""
    sock = socket.create_connection((spec.host, spec.port), timeout=10)
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


class _Conn:
    __slots__ = ("sock", "fd", "out", "reader", "t0")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.out: memoryview | None = None  #: request bytes the kernel has not taken yet
        self.reader: ResponseReader | None = None
        self.t0 = 0.0


class Engine:
    """One process's clients on a level-triggered epoll loop.

    Measured on this 2-core machine: trio's per-read ``wait_readable`` (register, park, wake, unregister) cost
    about 25 µs per read, so 1,024 paced streams (51,200 reads/s) needed more than a core for the client alone
    and the harness stalled before the relay did. Sockets registered once with epoll cost a few µs per read.
    """

    def __init__(self, spec: LoadSpec, clients: int, requests: int) -> None:
        self.spec = spec
        self.marker = spec.marker.encode()
        self.request = build_request(spec, Path(spec.body_file).read_bytes())
        self.varied = _Varied(self.request, spec) if spec.vary else None
        self.requests = requests
        self.budget = _Budget(0, 0)
        self.tally = Tally()
        self.epoll = select.epoll()
        self.conns: dict[int, _Conn] = {}
        self.active = 0  #: clients that have not finished yet
        self.starts: list[tuple[float, int]] = []  #: staggered first requests: (time, client index)
        self.idle: list[_Conn | None] = []
        for _ in range(clients):
            try:
                self.idle.append(self._open())
            except OSError:
                self.idle.append(None)  # retried (and counted) when the client starts

    def _open(self) -> _Conn:
        conn = _Conn(_connect(self.spec))
        self.conns[conn.fd] = conn
        self.epoll.register(conn.fd, select.EPOLLIN)
        return conn

    def _drop(self, conn: _Conn) -> None:
        self.conns.pop(conn.fd, None)
        try:
            self.epoll.unregister(conn.fd)
        except (OSError, ValueError):
            pass
        conn.sock.close()

    def run(self) -> Tally:
        spec = self.spec
        count = len(self.idle)
        now = time.perf_counter()
        self.tally.started = time.monotonic()
        self.budget = _Budget(self.requests, spec.duration)  # the clock starts now, not at connect
        for j in range(count):
            delay = spec.stagger * (spec.share_index + j * spec.share_count) / max(1, spec.concurrency)
            heapq.heappush(self.starts, (now + delay, j))
        self.active = count
        next_sweep = now + 0.1
        while self.active:
            now = time.perf_counter()
            while self.starts and self.starts[0][0] <= now:
                _, j = heapq.heappop(self.starts)
                self._next(self.idle[j])
            if now >= next_sweep:
                self._sweep(now)
                next_sweep = now + 0.1
            wait = next_sweep - now
            if self.starts:
                wait = min(wait, self.starts[0][0] - now)
            for fd, mask in self.epoll.poll(max(0.0, wait)):
                conn = self.conns.get(fd)
                if conn is not None:
                    self._ready(conn, mask)
        self.tally.finished = time.monotonic()
        for conn in list(self.conns.values()):
            self._drop(conn)
        self.epoll.close()
        return self.tally

    def _next(self, conn: _Conn | None) -> None:
        """Start the client's next request, or retire the client when the budget is spent."""
        while self.budget.take():
            if conn is None:
                try:
                    conn = self._open()
                except OSError:
                    self.tally.error("connect")
                    continue
            request = self.varied.next() if self.varied else self.request  # (made before the clock starts)
            conn.t0 = time.perf_counter()
            conn.reader = ResponseReader(self.marker, conn.t0)
            if self._push(conn, memoryview(request)):
                return
            conn = None
        if conn is not None:
            self._drop(conn)
        self.active -= 1

    def _fail(self, conn: _Conn, kind: str) -> None:
        self.tally.error(kind)
        conn.reader = None
        self._drop(conn)

    def _push(self, conn: _Conn, data: memoryview) -> bool:
        """Send what the kernel takes now; wait for EPOLLOUT for the rest. False if the connection failed."""
        try:
            sent = _net.try_send(conn.sock, data)
        except OSError as exc:
            self._fail(conn, type(exc).__name__)
            return False
        was_waiting = conn.out is not None
        conn.out = data[sent:] if sent < len(data) else None
        if was_waiting != (conn.out is not None):
            self.epoll.modify(conn.fd, select.EPOLLIN | (select.EPOLLOUT if conn.out is not None else 0))
        return True

    def _ready(self, conn: _Conn, mask: int) -> None:
        if mask & select.EPOLLOUT and conn.out is not None and not self._push(conn, conn.out):
            self._next(None)
            return
        if not mask & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
            return
        try:
            data = conn.sock.recv(_net.READ_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            data, kind = b"", type(exc).__name__
        else:
            kind = "closed_mid_response"
        reader = conn.reader
        if reader is None:  # unsolicited bytes or EOF on an idle connection
            self._drop(conn)
            return
        try:
            done = reader.feed(data, time.perf_counter()) if data else reader.eof()
        except (ProtocolError, ValueError) as exc:
            self._fail(conn, type(exc).__name__)
            self._next(None)
            return
        if not data and not done:
            self._fail(conn, kind)
            self._next(None)
            return
        if done:
            self._record(reader, time.perf_counter() - conn.t0)
            conn.reader = None
            if not reader.keep_alive or not data:
                self._drop(conn)
                self._next(None)
            else:
                self._next(conn)

    def _record(self, reader: ResponseReader, elapsed: float) -> None:
        tally = self.tally
        if reader.status != 200:
            tally.error(f"http_{reader.status}")
        elif not reader.seen:
            tally.error("no_end_marker")
        else:
            tally.ok += 1
            tally.events += reader.events
            tally.body_bytes += reader.size
            tally.ttfb.append(reader.ttfb)
            tally.total.append(elapsed)
            tally.max_gap.append(reader.max_gap)

    def _sweep(self, now: float) -> None:
        """Fail requests older than the per-request timeout so a stuck server cannot hang the phase."""
        limit = now - self.spec.timeout
        for conn in [c for c in self.conns.values() if c.reader is not None and c.t0 < limit]:
            self._fail(conn, "timeout")
            self._next(None)


def run_share(spec: LoadSpec, ready: Callable[[], None] | None = None) -> Tally:
    """Run this process's share of ``spec``; ``ready`` is called between connecting and starting."""
    share, count = spec.share_index, spec.share_count
    clients = spec.concurrency // count + (share < spec.concurrency % count)
    requests = spec.requests // count + (share < spec.requests % count) if spec.requests else 0
    engine = Engine(spec, clients, requests)
    if ready is not None:
        ready()
    return engine.run()


def merge(tallies: list[Tally]) -> Tally:
    """One tally for a phase from the tallies of its processes."""
    out = Tally(started=min(t.started for t in tallies), finished=max(t.finished for t in tallies))
    kinds: Counter[str] = Counter()
    for t in tallies:
        out.ok += t.ok
        out.errors += t.errors
        kinds.update(t.error_kinds)
        out.events += t.events
        out.body_bytes += t.body_bytes
        out.ttfb += t.ttfb
        out.total += t.total
        out.max_gap += t.max_gap
    out.error_kinds = dict(kinds)
    return out


class LoadPool:
    """Worker processes kept alive across phases (interpreter start-up is ~0.1 s, paid once)."""

    def __init__(self, processes: int) -> None:
        self.procs: list[subprocess.Popen[bytes]] = [
            subprocess.Popen(
                [sys.executable, "-m", "bench.load", "--worker"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                cwd=Path(__file__).resolve().parent.parent,
            )
            for _ in range(max(1, processes))
        ]

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def run(self, spec: LoadSpec, processes: int | None = None) -> Tally:
        """Run ``spec`` split over ``processes`` workers (default all, never more than the clients)."""
        count = max(1, min(processes or len(self.procs), len(self.procs), spec.concurrency))
        workers = self.procs[:count]
        for i, proc in enumerate(workers):
            share = LoadSpec(**{**asdict(spec), "share_index": i, "share_count": count})
            _send_line(proc.stdin, orjson.dumps(asdict(share)))
        for proc in workers:
            _expect(proc.stdout, b"READY")
        for proc in workers:
            _send_line(proc.stdin, b"GO")
        results = []
        for proc in workers:
            line = _read_line(proc.stdout)
            results.append(Tally(**orjson.loads(line)))
        return merge(results)

    def close(self) -> None:
        for proc in self.procs:
            if proc.stdin:
                proc.stdin.close()
        for proc in self.procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def __enter__(self) -> LoadPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _send_line(stream: IO[bytes] | None, line: bytes) -> None:
    assert stream is not None
    stream.write(line + b"\n")
    stream.flush()


def _read_line(stream: IO[bytes] | None) -> bytes:
    assert stream is not None
    line = stream.readline()
    if not line:
        raise RuntimeError("load worker exited unexpectedly (see its stderr above)")
    return line


def _expect(stream: IO[bytes] | None, word: bytes) -> None:
    line = _read_line(stream).strip()
    if line != word:
        raise RuntimeError(f"load worker said {line[:200]!r}, expected {word!r}")


def _worker() -> None:
    """Serve specs from stdin until it closes."""
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    while line := stdin.readline():
        spec = LoadSpec(**orjson.loads(line))

        def ready() -> None:
            _send_line(stdout, b"READY")
            if stdin.readline().strip() != b"GO":
                raise SystemExit(0)

        tally = run_share(spec, ready)
        _send_line(stdout, orjson.dumps(asdict(tally)))


if __name__ == "__main__":
    if sys.argv[1:] != ["--worker"]:
        sys.exit("usage: python -m bench.load --worker  (driven by bench.__main__ through LoadPool)")
    _net.raise_fd_limit()
    _worker()
