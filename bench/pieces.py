"""Instructions per call of relay's per-request set-up, piece by piece, counted in process by callgrind.

``bench.callgrind`` counts a whole request; this splits relay's own work on one (the smallest ``/v1/messages``
request, the one the burst scenario sends) into the steps ``server.py`` takes: ``setup`` (parse, the request
record, the routing tag, the estimate, the route, the key's scope), then each later step on top of it:
``build`` (the OpenAI body), ``fit`` (max_tokens to the window), ``translator`` (the stream translator made),
``stream`` (made, and fed a two-chunk stream to its end) and ``done`` (metrics, the console, the access line).
Each piece runs N times under callgrind and none (start-up and imports cancel out); ``setup`` is to be
subtracted from the others.

Run: ``python -m bench.pieces --instructions`` (needs valgrind); ``python -m bench.pieces PIECE N`` runs one.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import orjson
import trio

from bench.procs import ROOT, relay_config

PIECES = ("setup", "build", "fit", "translator", "stream", "done")
BODY = orjson.dumps({"model": "mock-model", "max_tokens": 64, "stream": True,
                     "messages": [{"role": "user", "content": "Say hello."}]})
HEADERS = [(b"host", b"127.0.0.1"), (b"content-type", b"application/json"), (b"anthropic-version", b"2023-06-01"),
           (b"content-length", b"%d" % len(BODY))]
STREAM = (b'data: {"id":"x","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"hi"},'
          b'"finish_reason":null}]}\n\n'
          b'data: {"id":"x","object":"chat.completion.chunk","choices":[{"index":0,"delta":{},"finish_reason":"stop"}],'
          b'"usage":{"prompt_tokens":5,"completion_tokens":1}}\n\ndata: [DONE]\n\n')


def run(piece: str, n: int) -> None:
    from relay import log, routing, tokens
    from relay import server as S
    from relay.auth import OPEN, permitted
    from relay.config import load
    from relay.formats import registry
    from relay.formats.base import ClientRequest, Options

    log.setup("warning")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "relay.toml"
        path.write_text(relay_config(9, "default"))  # never connected to: no piece calls the upstream
        config = load(str(path))
    server = S.Server(config)

    async def one() -> None:
        req: dict[str, Any] = S._parse(BODY)
        incoming = ClientRequest(BODY, req, tuple(HEADERS))
        ex = log.Exchange("POST", "/v1/messages")
        model = req["model"]
        override, req = routing.take_model_tag(req)
        estimate = tokens.estimate(req)
        target = permitted(OPEN, model, routing.resolve(config, override or model, req, estimate))[0]
        fmt = registry.get(target.provider.format)
        if piece == "build":
            fmt.build(req, target.provider, target.model, True, incoming)
        elif piece == "fit":
            await server.known.fit(req, target.provider, target.model, estimate, ex.request_id)
        elif piece in ("translator", "stream"):
            translator = fmt.stream_translator(Options(model, target.provider, (), estimate, None, 64))
            if piece == "stream":
                translator.feed(STREAM)
        elif piece == "done":
            ex.route, ex.target, ex.model, ex.status, ex.ttfb = "/v1/messages", target.label, model, 200, ex.started
            server.done(ex)

    async def main(count: int) -> None:
        for _ in range(count):
            await one()

    trio.run(main, 50)  # warm: first-call costs (caches, lazy imports) stay out of the count
    trio.run(main, n)


def count(piece: str, n: int) -> int:
    """Instructions per call: a run of ``n`` less a run of none."""
    totals = []
    with tempfile.TemporaryDirectory() as folder:
        for calls in (0, n):
            out = Path(folder) / f"{calls}.out"
            subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--dump-instr=no",
                            sys.executable, "-m", "bench.pieces", piece, str(calls)],
                           cwd=ROOT, check=True, capture_output=True)
            totals.append(int(re.search(r"^(?:summary|totals): (\d+)", out.read_text(), re.M).group(1)))  # type: ignore[union-attr]
    return (totals[1] - totals[0]) // n


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.pieces", description=__doc__.splitlines()[0])
    parser.add_argument("piece", nargs="?", choices=PIECES)
    parser.add_argument("n", nargs="?", type=int, default=1000)
    parser.add_argument("--instructions", action="store_true", help="count every piece under callgrind")
    args = parser.parse_args(argv)
    if args.instructions:
        base = 0
        for piece in PIECES:
            per = count(piece, args.n)
            base = base or per
            print(f"{piece:11s} {per:>9,} instructions" + (f"  ({per - base:+,} on setup)" if piece != "setup" else ""),
                  flush=True)
    elif args.piece:
        run(args.piece, args.n)
    else:
        parser.error("name a piece, or --instructions")


if __name__ == "__main__":
    main()
