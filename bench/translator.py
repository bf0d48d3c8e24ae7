"""Micro-benchmark of relay's stream translator alone: upstream chunks translated per second on one core.

It feeds the same OpenAI streams the mock upstream sends (text, tool calls, reasoning; see
:func:`bench.upstream.stream_events`) into ``relay.formats.openai_chat.stream.StreamTranslator`` in two ways:
one event per ``feed`` (a paced upstream: every read holds one chunk) and a whole stream per ``feed`` (a burst).
CPU time is ``time.process_time``; the figure is upstream SSE events per CPU second, the best of ten slices.

The translator's constructor may change: :func:`make_translator` is the one place to adapt.

Run alone: ``python -m bench.translator [--seconds 1]``.
"""

from __future__ import annotations

import argparse
import inspect
import time
from collections.abc import Callable
from typing import Any, Protocol

from bench.upstream import Profile, stream_events

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


def make_translator() -> Callable[[], Translator] | str:
    """A zero-argument factory for the current translator, or the reason there is none."""
    try:
        from relay.formats.openai_chat.stream import StreamTranslator
    except Exception as exc:  # noqa: BLE001 - any import failure means "skip", with the reason shown
        return f"cannot import relay.formats.openai_chat.stream.StreamTranslator: {exc!r}"
    params = inspect.signature(StreamTranslator).parameters.values()
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    for p in params:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.default is not p.empty:
            continue
        if p.name not in KNOWN_ARGS:
            return f"StreamTranslator needs {p.name!r}: add a value to bench.translator.KNOWN_ARGS"
        if p.kind is p.POSITIONAL_ONLY:
            args.append(KNOWN_ARGS[p.name])
        else:
            kwargs[p.name] = KNOWN_ARGS[p.name]
    return lambda: StreamTranslator(*args, **kwargs)


#: The recorded streams: name -> upstream SSE events.
STREAMS: dict[str, list[bytes]] = {
    "text": stream_events(Profile(chunks=64)),
    "tool_calls": stream_events(Profile(chunks=4, tool_calls=3, tool_chunks=20)),
    "reasoning": stream_events(Profile(chunks=16, reasoning_chunks=48)),
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
    """All streams x both feeding modes. Returns ``{"skipped": reason}`` when there is no translator."""
    factory = make_translator()
    if isinstance(factory, str):
        return {"skipped": factory}
    results: dict[str, Any] = {"target": TARGET, "streams": {}}
    for name, events in STREAMS.items():
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


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.translator", description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="CPU seconds per stream and mode")
    print(format_results(run(parser.parse_args().seconds)))


if __name__ == "__main__":
    main()
