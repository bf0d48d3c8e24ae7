"""Instructions per request, counted by valgrind's callgrind: a figure that does not move with the machine's load.

Wall-clock and even CPU-time figures swing by tens of percent on this shared 2-core VM; an instruction count
of the same workload repeats to a fraction of a percent. The workload: the mock upstream (not counted) and one
server under ``valgrind --tool=callgrind`` (relay, or ``stack``/``pipe`` for the floors), sequential
keep-alive requests for a 50-chunk stream written in one piece (``--shape burst``: the whole body comes in one
read) or 16 chunks 20 ms apart (``--shape paced``: one read per chunk, what a real model's stream costs). Counting starts after a warm-up (callgrind_control
zeroes the counters) and stops after ``--requests`` more, so start-up is not in the figure.

``--claude-code-head`` sends Claude Code's own request head (its 20 headers, as recorded in
``tests/fixtures/reference``) instead of a 4-header one: what a real client's head costs to read.

``--tls`` puts ``bench.tls_front`` between the server and the mock: the upstream is HTTPS, as every hosted
provider is, and each chunk is a TLS record to decrypt (``relay`` and ``stack`` only).

``--body KIB`` sends a Claude Code-shaped request body of that size instead of the smallest one (what relay's
request side costs: reading, parsing, translating and forwarding the body); ``--unicode`` puts a character
beyond ASCII in each of its turns' texts, as real prose and source files so often have.

Run: ``python -m bench.callgrind --target relay --requests 200`` (needs valgrind: ``apt-get install valgrind``).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

from bench.bodies import claude_code_body
from bench.procs import ROOT, free_port, relay_config, start_tls_front, start_upstream
from bench.tls_front import make_certificate

BODY = orjson.dumps({"model": "mock-model", "max_tokens": 64, "stream": True,
                     "messages": [{"role": "user", "content": "Say hello."}]})


CLAUDE_CODE = ROOT / "tests" / "fixtures" / "reference" / "claude-code-2.1.331-request-1.json"


def claude_code_headers() -> bytes:
    """Claude Code's request headers as it sends them (but Host and Content-Length), one line each."""
    headers = orjson.loads(CLAUDE_CODE.read_bytes())["headers"]
    return b"".join(b"%s: %s\r\n" % (name.encode(), value.encode()) for name, value in headers.items())


def request(target: str, body_kib: int = 0, unicode: bool = False, claude_code_head: bool = False) -> bytes:
    """``body_kib``: a Claude Code-shaped body of that size (``bench.bodies``, the bodies scenario's), the same
    bytes to relay and to a floor (which forwards them unread); else the smallest request. ``unicode``: its
    turns' texts each hold a character beyond ASCII. ``claude_code_head``: Claude Code's headers, not four."""
    if body_kib:
        path = b"/v1/messages" if target == "relay" else b"/p/default/v1/chat/completions"
        body = claude_code_body(body_kib * 1024, unicode=unicode)
    elif target == "relay":
        path, body = b"/v1/messages", BODY
    else:  # the floors speak OpenAI on both sides
        path, body = b"/p/default/v1/chat/completions", orjson.dumps(
            {"model": "mock-model", "stream": True, "messages": [{"role": "user", "content": "Say hello."}]})
    if claude_code_head:
        return (b"POST %b HTTP/1.1\r\nHost: 127.0.0.1\r\n%bContent-Length: %d\r\n\r\n%b"
                % (path, claude_code_headers(), len(body), body))
    return (b"POST %b HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\nanthropic-version: 2023-06-01\r\n"
            b"content-length: %d\r\n\r\n%b" % (path, len(body), body))


def ask(sock: socket.socket, raw: bytes) -> None:
    """One request on a keep-alive connection; returns once the chunked answer's terminator arrived."""
    sock.sendall(raw)
    data = b""
    while not data.endswith(b"\r\n0\r\n\r\n"):
        more = sock.recv(65536)
        if not more:
            raise RuntimeError(f"connection closed mid-answer: {data[-200:]!r}")
        data += more
    if not data.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"bad answer: {data[:300]!r}")


def wait_port(port: int, proc: subprocess.Popen[bytes], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("the server under valgrind exited")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"nothing listening on {port} after {seconds:.0f}s")


def server_argv(target: str, upstream_port: int, port: int, config: Path, ca_file: str = "") -> list[str]:
    if target == "relay":
        config.write_text(relay_config(upstream_port, "default", ca_file=ca_file))
        return [sys.executable, "-m", "relay", "serve", "-c", str(config), "--host", "127.0.0.1", "--port", str(port),
                "--log-level", "warning"]
    tls = ["--upstream-ca", ca_file] if ca_file else []
    return [sys.executable, "-m", f"bench.{target}", "--upstream-port", str(upstream_port), "--port", str(port), *tls]


SHAPES = {"burst": {"chunks": 50, "coalesce": True}, "paced": {"chunks": 16, "delay": 0.02}}


def measure(target: str, requests: int, warmup: int, shape: str = "burst", chunks: int = 0,
            body_kib: int = 0, unicode: bool = False, claude_code_head: bool = False, tls: bool = False) -> int:
    upstream, upstream_port = start_upstream({"default": {**SHAPES[shape], **({"chunks": chunks} if chunks else {})}})
    workdir = Path(tempfile.mkdtemp(prefix="bench-callgrind-"))
    front, ca_file = None, ""
    if tls:
        if target == "pipe":
            raise SystemExit("--tls: pipe copies bytes to a plain upstream only")
        cert, key = make_certificate(workdir)
        front, upstream_port = start_tls_front(upstream_port, cert, key)
        ca_file = str(cert)
    port = free_port()
    out = workdir / "callgrind.out"
    argv = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--dump-instr=no",
            *server_argv(target, upstream_port, port, workdir / "relay.toml", ca_file)]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=(workdir / "valgrind.log").open("wb"))
    try:
        wait_port(port, proc, 300)
        raw = request(target, body_kib, unicode, claude_code_head)
        with socket.create_connection(("127.0.0.1", port)) as sock:
            for _ in range(warmup):
                ask(sock, raw)
            subprocess.run(["callgrind_control", "--zero", str(proc.pid)], check=True, capture_output=True)
            for _ in range(requests):
                ask(sock, raw)
            subprocess.run(["callgrind_control", "--dump=measured", str(proc.pid)], check=True, capture_output=True)
        dumps = sorted(workdir.glob("callgrind.out*"), key=os.path.getmtime)
        text = next(p for p in reversed(dumps) if b"measured" in p.read_bytes()[:2000]).read_text()
        total = int(re.search(r"^(?:summary|totals): (\d+)", text, re.M).group(1))  # type: ignore[union-attr]
        return total // requests
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if front is not None:
            front.stop()
        upstream.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.callgrind", description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="relay", choices=["relay", "stack", "pipe"])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--shape", default="burst", choices=list(SHAPES))
    parser.add_argument("--chunks", type=int, default=0,
                        help="chunks per answer instead of the shape's (two counts give the cost per chunk)")
    parser.add_argument("--body", type=int, default=0, metavar="KIB",
                        help="a Claude Code-shaped request body of this size (as the bodies scenario sends)")
    parser.add_argument("--unicode", action="store_true",
                        help="the body's turns each hold a character beyond ASCII (bench.bodies)")
    parser.add_argument("--tls", action="store_true", help="an HTTPS upstream (bench.tls_front before the mock)")
    parser.add_argument("--claude-code-head", action="store_true",
                        help="Claude Code's own request headers (tests/fixtures/reference), not four")
    args = parser.parse_args(argv)
    per = measure(args.target, args.requests, args.warmup, args.shape, args.chunks, args.body, args.unicode,
                  args.claude_code_head, args.tls)
    body = f", {args.body} KiB{' unicode' if args.unicode else ''} body" if args.body else ""
    body += ", Claude Code's head" if args.claude_code_head else ""
    body += ", HTTPS upstream" if args.tls else ""
    print(f"{args.target}: {per:,} instructions per {args.shape} request ({args.chunks or SHAPES[args.shape]['chunks']} chunks{body}; "
          f"{args.requests} requests after {args.warmup} warm-up)")


if __name__ == "__main__":
    main()
