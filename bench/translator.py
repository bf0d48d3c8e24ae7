"""Micro-benchmark of relay's stream translator alone: upstream chunks translated per second on one core.

It feeds the same OpenAI streams the mock upstream sends (text, tool calls, reasoning; see
:func:`bench.upstream.stream_events`) into ``relay.formats.openai_chat.stream.StreamTranslator``, and one stream
of each other format into its translator (native Gemini, OpenAI Responses, the Anthropic passthrough), in two ways:
one event per ``feed`` (a paced upstream: every read holds one chunk) and a whole stream per ``feed`` (a burst).
CPU time is ``time.process_time``; the figure is upstream SSE events per CPU second, the best of ten slices.

The translators' constructors may change: :func:`make_translator` is the one place to adapt.

Run alone: ``python -m bench.translator [--seconds 1]``. ``--instructions`` counts instead of timing: each stream
under ``valgrind --tool=callgrind``, instructions per upstream chunk (one event per feed), a figure that repeats on
this shared VM where the rate swings by tens of percent between runs.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import orjson

from bench.upstream import Profile, _tool_arguments, stream_events

TARGET = 200_000  #: chunks per second on one core, from the issue


class Translator(Protocol):
    def feed(self, data: bytes) -> bytes: ...

    def finish(self) -> bytes: ...


#: Values for constructor parameters the translator may require, by name. Extend when its signature grows.
KNOWN_ARGS: dict[str, Any] = {
    "model": "mock-model",
    "message_id": "msg_bench",
    "provider": "mock",
    "input_tokens_hint": 100,
}


WINDOWS = 10  # measure() reports the best of this many slices


#: The translator of each format: (module, class).
FORMATS: dict[str, tuple[str, str]] = {
    "openai": ("relay.formats.openai_chat.stream", "StreamTranslator"),
    "gemini": ("relay.formats.gemini.stream", "GeminiStreamTranslator"),
    "responses": ("relay.formats.openai_responses.stream", "ResponsesStreamTranslator"),
    "anthropic": ("relay.formats.anthropic_passthrough.stream", "PassthroughTranslator"),
}


def make_translator(fmt: str = "openai") -> Callable[[], Translator] | str:
    """A zero-argument factory for the current translator of ``fmt``, or the reason there is none."""
    module, name = FORMATS[fmt]
    try:
        cls = getattr(importlib.import_module(module), name)
    except Exception as exc:  # noqa: BLE001 - any import failure means "skip", with the reason shown
        return f"cannot import {module}.{name}: {exc!r}"
    params = inspect.signature(cls).parameters.values()
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    for p in params:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.default is not p.empty:
            continue
        if p.name not in KNOWN_ARGS:
            return f"{name} needs {p.name!r}: add a value to bench.translator.KNOWN_ARGS"
        if p.kind is p.POSITIONAL_ONLY:
            args.append(KNOWN_ARGS[p.name])
        else:
            kwargs[p.name] = KNOWN_ARGS[p.name]
    return lambda: cls(*args, **kwargs)


def _sse(events: list[dict[str, Any]], named: bool = False, end: bytes = b"\n\n") -> list[bytes]:
    """Events framed as their format frames them: ``data:`` only, or ``event:`` + ``data:`` (typed events)."""
    return [(b"event: %b\n" % e["type"].encode() if named else b"") + b"data: " + orjson.dumps(e) + end
            for e in events]


def _gemini() -> list[bytes]:
    """Native Gemini (``streamGenerateContent?alt=sse``, framed with CRLF as Gemini frames it): thoughts, text,
    a whole function call, the finish with usage."""
    def chunk(part: dict[str, Any], **extra: Any) -> dict[str, Any]:
        return {"candidates": [{"content": {"parts": [part], "role": "model"}, "index": 0, **extra}],
                "modelVersion": "mock-model", "responseId": "resp-bench"}
    text = "Hello, world!   "
    docs = [chunk({"text": text, "thought": True}) for _ in range(16)] + [chunk({"text": text}) for _ in range(48)]
    docs.append(chunk({"functionCall": {"name": "Bash", "args": {"command": "ls -la /tmp"}}}))
    last = chunk({"text": ""}, finishReason="STOP")
    last["usageMetadata"] = {"promptTokenCount": 100, "candidatesTokenCount": 64, "totalTokenCount": 164}
    return [b"data: " + orjson.dumps(d) + b"\r\n\r\n" for d in [*docs, last]]


def _responses() -> list[bytes]:
    """OpenAI Responses (typed events): a message of text deltas, then a function call's argument deltas."""
    text, args = "Hello, world!   ", _tool_arguments(0, 20)
    msg = {"id": "msg_1", "type": "message", "role": "assistant", "status": "completed", "content": []}
    call = {"id": "fc_1", "type": "function_call", "call_id": "call_1", "name": "Bash", "arguments": ""}
    response = {"id": "resp_1", "object": "response", "status": "completed", "model": "mock-model", "output": [],
                "usage": {"input_tokens": 100, "output_tokens": 64, "total_tokens": 164}}
    events = [{"type": "response.created", "response": {**response, "status": "in_progress", "usage": None}},
              {"type": "response.output_item.added", "output_index": 0, "item": msg},
              *({"type": "response.output_text.delta", "output_index": 0, "item_id": "msg_1", "content_index": 0,
                 "delta": text} for _ in range(40)),
              {"type": "response.output_item.done", "output_index": 0, "item": msg},
              {"type": "response.output_item.added", "output_index": 1, "item": call},
              *({"type": "response.function_call_arguments.delta", "output_index": 1, "item_id": "fc_1",
                 "delta": a} for a in args),
              {"type": "response.output_item.done", "output_index": 1, "item": {**call, "arguments": "".join(args)}},
              {"type": "response.completed", "response": response}]
    return _sse(events, named=True)


def _anthropic() -> list[bytes]:
    """An Anthropic stream for the passthrough: text deltas, then a tool_use block's input deltas."""
    text, args = "Hello, world!   ", _tool_arguments(0, 20)
    start = {"id": "msg_up", "type": "message", "role": "assistant", "model": "up-model", "content": [],
             "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 100, "output_tokens": 1}}
    events = [{"type": "message_start", "message": start},
              {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
              *({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}}
                for _ in range(40)),
              {"type": "content_block_stop", "index": 0},
              {"type": "content_block_start", "index": 1,
               "content_block": {"type": "tool_use", "id": "toolu_1", "name": "Bash", "input": {}}},
              *({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": a}}
                for a in args),
              {"type": "content_block_stop", "index": 1},
              {"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None},
               "usage": {"output_tokens": 64}},
              {"type": "message_stop"}]
    return _sse(events, named=True)


#: The recorded streams: name -> (format, upstream SSE events). The OpenAI ones are what the mock upstream sends.
STREAMS: dict[str, tuple[str, list[bytes]]] = {
    "text": ("openai", stream_events(Profile(chunks=64))),
    "tool_calls": ("openai", stream_events(Profile(chunks=4, tool_calls=3, tool_chunks=20))),
    "reasoning": ("openai", stream_events(Profile(chunks=16, reasoning_chunks=48))),
    "gemini": ("gemini", _gemini()),
    "responses": ("responses", _responses()),
    "anthropic": ("anthropic", _anthropic()),
}


def _check(factory: Callable[[], Translator], events: list[bytes]) -> None:
    """Fail loudly if the translator does not produce a complete Anthropic stream (a fast wrong answer is no
    figure)."""
    translator = factory()
    out = b"".join(translator.feed(e) for e in events) + translator.finish()
    if b"message_stop" not in out:
        raise RuntimeError(f"translator output has no message_stop: {out[-300:]!r}")


def measure(factory: Callable[[], Translator], events: list[bytes], per_event: bool, seconds: float,
            windows: int = WINDOWS) -> float:
    """Upstream events translated per CPU second: the best of ``windows`` slices of about ``seconds`` in all,
    each looping whole streams. The best, as timeit takes the minimum: this VM's speed swings by tens of percent
    from one second to the next (other tenants), and the best slice is the one least disturbed."""
    feeds = events if per_event else [b"".join(events)]
    best = 0.0
    for _ in range(windows):
        done = 0
        start = time.process_time()
        deadline = start + seconds / windows
        while True:
            translator = factory()
            for data in feeds:
                translator.feed(data)
            translator.finish()
            done += len(events)
            now = time.process_time()
            if now >= deadline:
                break
        best = max(best, done / (now - start))
    return best


def run(seconds: float = 1.0) -> dict[str, Any]:
    """All streams x both feeding modes. Returns ``{"skipped": reason}`` when a translator is missing."""
    factories = {fmt: make_translator(fmt) for fmt in FORMATS}
    missing = [f for f in factories.values() if isinstance(f, str)]
    if missing:
        return {"skipped": "; ".join(missing)}  # type: ignore[arg-type]
    results: dict[str, Any] = {"target": TARGET, "streams": {}}
    for name, (fmt, events) in STREAMS.items():
        factory = factories[fmt]
        assert not isinstance(factory, str)
        _check(factory, events)
        results["streams"][name] = {
            "events": len(events),
            "per_event_feed": measure(factory, events, True, seconds),
            "whole_stream_feed": measure(factory, events, False, seconds),
        }
    results["min_per_event_feed"] = min(r["per_event_feed"] for r in results["streams"].values())
    return results


def format_results(results: dict[str, Any]) -> str:
    """Human-readable lines for the runner's report."""
    if "skipped" in results:
        return f"translator: skipped ({results['skipped']})"
    lines = ["translator alone (upstream chunks per CPU second, one core, best of ten slices):",
             f"  {'stream':<12}{'events':>8}{'one event/feed':>17}{'whole stream/feed':>20}"]
    for name, r in results["streams"].items():
        lines.append(f"  {name:<12}{r['events']:>8}{r['per_event_feed']:>17,.0f}{r['whole_stream_feed']:>20,.0f}")
    verdict = "met" if results["min_per_event_feed"] >= TARGET else "NOT met"
    slowest = results["min_per_event_feed"]
    lines.append(f"  target {TARGET:,}/s with one event per feed: {verdict} (slowest {slowest:,.0f}/s)")
    return "\n".join(lines)


def _loop(name: str, streams: int) -> None:
    """``streams`` runs of one recorded stream, one event per feed (what ``--instructions`` counts)."""
    fmt, events = STREAMS[name]
    factory = make_translator(fmt)
    assert not isinstance(factory, str), factory
    for _ in range(streams):
        translator = factory()
        for data in events:
            translator.feed(data)
        translator.finish()


def _instructions(name: str, streams: int) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        out = f"{tmp}/callgrind.out"
        subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--dump-instr=no",
                        sys.executable, "-m", "bench.translator", "--loop", name, str(streams)],
                       check=True, capture_output=True)
        with open(out) as f:
            text = f.read()
    return int(re.search(r"^(?:summary|totals): (\d+)", text, re.M).group(1))  # type: ignore[union-attr]


def instructions(streams: int = 120) -> dict[str, float]:
    """Instructions per upstream chunk, one event per feed, by stream: a run of ``streams`` streams less a run of
    a few (start-up, imports and first-call warm-up cancel out)."""
    base = 20
    with ThreadPoolExecutor(2) as pool:  # valgrind runs one thread per process: two at a time use both cores
        counts = {(name, n): pool.submit(_instructions, name, n) for name in STREAMS for n in (base, streams)}
        return {name: (counts[name, streams].result() - counts[name, base].result()) / ((streams - base) * len(events))
                for name, (_, events) in STREAMS.items()}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.translator", description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="CPU seconds per stream and mode")
    parser.add_argument("--instructions", action="store_true", help="count instructions per chunk (valgrind)")
    parser.add_argument("--loop", nargs=2, metavar=("STREAM", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.loop:
        _loop(args.loop[0], int(args.loop[1]))
    elif args.instructions:
        for name, per in instructions().items():
            print(f"  {name:<12}{per:>10,.0f} instructions per chunk (one event per feed)")
    else:
        print(format_results(run(args.seconds)))


if __name__ == "__main__":
    main()
