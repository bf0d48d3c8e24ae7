"""relay's own work before the upstream sees a byte, for a large Claude Code body, in process: the parse (through
``relay.history``), the estimate and the OpenAI Chat build, with the history's reuse on and off, for the next turn
of a conversation and for a conversation's first request (``bench.bodies.VARY`` rewritten in the last or the
first message, as the ``bodies`` scenario does). Prints the p50 and p90 of each, in ms.

    python -m bench.history [--kib 1024] [--requests 300] [--rounds 2]

Each variant runs in a fresh process, the variants in turns.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from bench.bodies import VARY, claude_code_body
from relay import tokens
from relay.config import parse
from relay.formats import registry
from relay.formats.base import ClientRequest
from relay.history import Histories

CONFIG = """
[providers.mock]
format = "openai"
base_url = "http://127.0.0.1:9/v1"
api_key = "x"
models = ["m"]
[routes]
default = "mock/m"
"""


def front(kib: int, vary: str, memory: int, requests: int) -> list[float]:
    """Seconds from the body to the upstream body, per request (the first 50 left out: the conversation starts)."""
    provider = parse(CONFIG, "bench.toml", env={}).providers["mock"]
    fmt = registry.get("openai")
    body = claude_code_body(kib * 1024, vary=vary)
    histories = Histories(memory)
    times = []
    for i in range(requests):
        raw = body.replace(VARY.encode(), f"[{i:015d}]".encode())
        started = time.perf_counter()
        req, reuse = histories.parse("bench", raw)
        tokens.estimate(req, reuse.count, reuse.tokens) if reuse else tokens.estimate(req)
        fmt.build(req, provider, "m", True, ClientRequest(raw, req, (), reuse))
        times.append(time.perf_counter() - started)
        histories.learn("bench", raw, req, reuse)
    return sorted(times[50:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kib", type=int, default=1024)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--one", nargs=2, metavar=("VARY", "MEMORY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:  # one variant, in a process of its own: a process that ran others first runs slower
        t = front(args.kib, args.one[0], int(args.one[1]), args.requests)
        print(f"p50 {t[len(t) // 2] * 1e3:6.3f} ms  p90 {t[int(len(t) * 0.9)] * 1e3:6.3f} ms")
        return
    for _ in range(args.rounds):
        for vary, name in (("last", "next turn"), ("first", "first request (cold)")):
            for memory, label in ((256 * 1024 * 1024, "with the history"), (0, "without")):
                out = subprocess.run([sys.executable, "-m", "bench.history", "--kib", str(args.kib), "--requests",
                                      str(args.requests), "--one", vary, str(memory)],
                                     capture_output=True, text=True, check=True).stdout.strip()
                print(f"{args.kib} KiB {name:<21} {label:<17} {out}", flush=True)


if __name__ == "__main__":
    main()
