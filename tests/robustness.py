"""Shared by the fuzz and fault suites: the checks a "clean end" must pass (of what ``tests.client.roundtrip``,
which notices every way an answer can go wrong, brings back), and a trap for relay's logs.

Known relay bugs that the property tests run into are recognised here by where they crash (``KNOWN_CRASHES``),
so a property can tolerate them while each one is pinned by its own ``xfail(strict=True)`` test; any other crash
still fails the property. Delete an entry once its pinned test starts passing.
"""

from __future__ import annotations

import json
import logging
import threading
import traceback
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import anthropic
import orjson
import pytest
import trio
from hypothesis import strategies as st

from tests.anthropic_events import ERROR_TYPES, USAGE_COUNTS, Outcome, check_body, parse_sse
from tests.client import Answer, roundtrip
from tests.conftest import RelayHandle, relay_config, start_relay
from tests.mock_upstream import MockUpstream, Recorded, Reply, completion, text_stream



def answer_ok(rec: Recorded) -> Reply:
    """The upstream is always well: a valid stream or completion, whatever relay sent."""
    return text_stream("ok") if orjson.loads(rec.body).get("stream") is True else completion({"content": "ok"})


class SharedRelay:
    """A mock upstream and the real relay in front of it, in a trio loop of their own (a thread), for Hypothesis
    properties: pytest-trio cannot rebuild its fixtures per example, and a fresh relay per example costs more
    than the example. Examples run in it one at a time (``run``); it outlives them all, as a gateway must."""

    def __init__(self, server_config: str = "", provider_config: str = "",
                 handler: Callable[[Recorded], Reply] = answer_ok) -> None:
        self._config = (server_config, provider_config)
        self.handler = handler
        self._ready = threading.Event()
        self._failed: BaseException | None = None
        self._thread = threading.Thread(target=self._thread_main, name="shared-relay", daemon=True)
        self._thread.start()
        if not self._ready.wait(10) or self._failed is not None:
            raise RuntimeError("the shared relay did not start") from self._failed

    def _thread_main(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:  # noqa: BLE001  reported to the thread that waits for the start
            self._failed = exc
            self._ready.set()

    async def _main(self) -> None:
        async with trio.open_nursery() as nursery:
            self.upstream = MockUpstream(self.handler)
            await nursery.start(self.upstream.serve)
            server_config, provider_config = self._config
            provider_config = provider_config.replace("{upstream_url}", self.upstream.base_url)
            config = relay_config(self.upstream.base_url, extra_provider=provider_config)
            if server_config:
                config = config.replace("[server]", "[server]\n" + server_config)
            self.relay = await start_relay(nursery, config)
            self._token = trio.lowlevel.current_trio_token()
            self._cancel = nursery.cancel_scope
            self._ready.set()
            await trio.sleep_forever()

    def run(self, exchange: Callable[[RelayHandle, MockUpstream], Awaitable[Any]]) -> Any:
        """``exchange(relay, upstream)`` in the relay's loop; its result or exception comes back here. The mock
        upstream answers well (``handler``) unless the exchange scripts it."""
        self.upstream.handler = self.handler
        return trio.from_thread.run(exchange, self.relay, self.upstream, trio_token=self._token)

    def close(self) -> None:
        trio.from_thread.run_sync(self._cancel.cancel, trio_token=self._token)
        self._thread.join(10)


@pytest.fixture(scope="module")
def shared_relays() -> Iterator[Callable[..., SharedRelay]]:
    """``shared_relays(server_config="", provider_config="", handler=answer_ok)``: one SharedRelay per configuration,
    per module (``{upstream_url}`` in provider_config becomes the mock's base URL)."""
    made: dict[tuple[str, str, Any], SharedRelay] = {}

    def get(server_config: str = "", provider_config: str = "",
            handler: Callable[[Recorded], Reply] = answer_ok) -> SharedRelay:
        key = (server_config, provider_config, handler)
        if key not in made:
            made[key] = SharedRelay(*key)
        return made[key]

    yield get
    for shared in made.values():
        shared.close()


# ---- what a clean answer is ----------------------------------------------------------------------

def check_error_doc(body: bytes, where: str = "") -> dict[str, Any]:
    """An Anthropic error: {"type":"error","error":{"type":<known type>,"message":<str>}} (request_id optional)."""
    doc = orjson.loads(body)
    assert isinstance(doc, dict) and doc.get("type") == "error", f"{where} not an Anthropic error: {body[:300]!r}"
    err = doc.get("error")
    assert isinstance(err, dict), f"{where} no error object: {body[:300]!r}"
    assert err.get("type") in ERROR_TYPES, f"{where} unknown error type: {body[:300]!r}"
    assert isinstance(err.get("message"), str) and err["message"], f"{where} no message: {body[:300]!r}"
    return err


def check_message_doc(doc: Any, model: str | None = None) -> anthropic.types.Message:
    """A whole (non-streamed) Message, validated by the SDK's own pydantic model plus what pydantic lets by."""
    message = anthropic.types.Message.model_validate(doc)
    assert message.id.startswith("msg_") and message.role == "assistant" and message.type == "message"
    if model is not None:
        assert message.model == model
    for key in USAGE_COUNTS:
        value = doc["usage"].get(key)
        assert value is None or (type(value) is int and value >= 0), f"usage.{key} = {value!r}"
    return message


def check_framing(body: bytes) -> list[tuple[str, dict[str, Any]]]:
    """A stream that ends cleanly, whatever it carries: SSE events with JSON data named by their type, opening
    with message_start and closing with message_stop or an error event."""
    events = parse_sse(body, strict=True)
    assert events, "an empty event stream"
    names = [name for name, _ in events if name != "ping"]
    assert names[0] in ("message_start", "error"), f"the stream opens with {names[0]}"
    assert names[-1] in ("message_stop", "error"), f"the stream ends with {names[-1]}: not a clean end"
    assert names.count("message_stop") + names.count("error") == 1, f"more than one end: {names}"
    return events


def assert_clean(answer: Answer, *, allow_5xx: bool = False, model: str | None = None,
                 loose: bool = False) -> Outcome | dict[str, Any] | list[Any] | None:
    """The whole contract of a finished exchange: a complete response that is either a valid 200 (JSON message,
    or an SSE stream that passes the strict grammar validator) or an Anthropic error with a 4xx status (5xx only
    where the upstream is at fault). ``loose``: a 200 need only be framed right (a stream that ends cleanly, a JSON
    message object), for upstreams that send nonsense relay can only pass on. Returns the stream Outcome (events
    when loose), the error object, or the JSON document."""
    assert answer.status is not None, f"connection ended without a response ({answer.note})"
    assert answer.complete, f"response {answer.status} cut short ({answer.note}); got {answer.body[-300:]!r}"
    assert b"Traceback" not in answer.body and b'File "' not in answer.body, answer.body[:500]
    if answer.status == 200:
        if answer.content_type.startswith("text/event-stream"):
            return check_framing(answer.body) if loose else check_body(answer.body, strict=True, model=model)
        if not answer.body:  # HEAD
            return None
        doc = orjson.loads(answer.body)
        if isinstance(doc, dict) and doc.get("type") == "message" and not loose:
            check_message_doc(doc, model)
        return doc
    if allow_5xx:
        assert 400 <= answer.status < 600, answer.status
    else:
        assert 400 <= answer.status < 500, f"relay answered {answer.status}: {answer.body[:300]!r}"
    if not answer.body:  # HEAD
        return None
    return check_error_doc(answer.body, f"HTTP {answer.status}:")


# ---- relay's logs --------------------------------------------------------------------------------

class LogTrap(logging.Handler):
    """Every record relay logs at WARNING and above while it is installed."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    @property
    def crashes(self) -> list[logging.LogRecord]:
        return [r for r in self.records if r.exc_info or "unhandled" in r.getMessage() or "Traceback" in r.getMessage()]

    def describe(self) -> str:
        out = []
        for r in self.crashes:
            out.append(r.getMessage())
            if r.exc_info:
                out.append("".join(traceback.format_exception(*r.exc_info)))
        return "\n".join(out)


@contextmanager
def trap_relay_logs() -> Iterator[LogTrap]:
    trap = LogTrap()
    logger = logging.getLogger("relay")
    logger.addHandler(trap)
    try:
        yield trap
    finally:
        logger.removeHandler(trap)


# ---- known bugs, recognised by where they crash --------------------------------------------------

def _leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside nursery exception groups (a crash in a stream surfaces wrapped in one)."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


def _crash_sites(record: logging.LogRecord) -> list[tuple[str, str, str]]:
    """(exception type, message, the innermost relay file in its traceback) of each exception logged."""
    assert record.exc_info and record.exc_info[1] is not None
    sites = []
    for exc in _leaves(record.exc_info[1]):
        files = [f.filename for f in traceback.extract_tb(exc.__traceback__) if "/relay/" in f.filename]
        sites.append((type(exc).__name__, str(exc), files[-1] if files else ""))
    return sites


KNOWN_CRASHES: dict[str, Any] = {
    # "what it is": lambda kind, msg, where: ...  (a crash site that a property may meet while its bug is pinned
    # by an xfail(strict=True) test; empty now: every bug found so far is fixed)
}


def known_crash(trap: LogTrap) -> str | None:
    """The name of the known bug behind every crash relay logged, or None when any crash is not a known one."""
    names = set()
    for record in trap.crashes:
        if not record.exc_info:
            return None
        for site in _crash_sites(record):
            name = next((n for n, match in KNOWN_CRASHES.items() if match(*site)), None)
            if name is None:
                return None
            names.add(name)
    return " + ".join(sorted(names)) or None


def known_answer(answer: Answer) -> str | None:
    """A known bug recognised by the answer itself (nothing is logged for it)."""
    return None


async def relay_idle(relay: RelayHandle, timeout: float = 2.0) -> None:
    """Until relay has finished with every connection (so whatever it logs about one has been logged)."""
    with trio.move_on_after(timeout):
        while getattr(relay.server, "_open", 0):
            await trio.sleep(0.001)


async def check_exchange(relay: RelayHandle, raw: bytes, *, method: str = "POST", model: Any = None,
                         allow_5xx: bool = False, loose: bool = False) -> str:
    """One exchange, held to the whole contract; a crash relay logs fails it unless it is a known bug. Returns a
    label for Hypothesis's statistics (``event``, which only works in the test's own thread)."""
    with trap_relay_logs() as trap:
        answer = await roundtrip(relay.port, raw, method=method)
        await relay_idle(relay)
    try:
        assert not trap.crashes, trap.describe()
        assert_clean(answer, model=model if isinstance(model, str) else None, allow_5xx=allow_5xx, loose=loose)
    except AssertionError:
        bug = known_crash(trap) if trap.crashes else known_answer(answer)
        if bug is None:
            raise
        return f"tolerated known bug: {bug}"
    return f"HTTP {answer.status}"


# ---- JSON with values orjson and json.dumps cannot build directly, and strategies for it -----------

@dataclass(frozen=True)
class Nest:
    """``inner`` wrapped in ``depth`` arrays or objects, written textually (no recursion limit on our side)."""

    depth: int
    inner: Any = 1
    objects: bool = False


def to_json(value: Any) -> str:
    if isinstance(value, Nest):
        inner = to_json(value.inner)
        if value.objects:
            return '{"a":' * value.depth + inner + "}" * value.depth
        return "[" * value.depth + inner + "]" * value.depth
    if isinstance(value, dict):
        return "{" + ",".join(json.dumps(str(k), ensure_ascii=False) + ":" + to_json(v) for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(to_json(v) for v in value) + "]"
    return json.dumps(value, ensure_ascii=False)


def encode(value: Any) -> bytes:
    return to_json(value).encode("utf-8", "surrogatepass")


LEAF = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                 st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=12))
ANY_JSON = st.recursive(LEAF, lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=6), kids, max_size=3),
                        max_leaves=8)
DEEP = st.builds(Nest, st.integers(min_value=1, max_value=1100), ANY_JSON, st.booleans())
HUGE = st.integers(min_value=10_000, max_value=1_000_000).map(lambda n: "é" * (n // 8) + "x" * n)
WILD = st.integers(0, 19).flatmap(lambda i: DEEP if i == 0 else HUGE if i == 1 else ANY_JSON)  # anything at all
BADNESS = st.shared(st.sampled_from([0, 1, 3, 10, 30]), key="badness")  # percent of fields gone wrong, per example


def f(good: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """A field's value: right-shaped, or (as often as this example's BADNESS says) anything at all."""
    return st.tuples(BADNESS, st.integers(0, 99)).flatmap(lambda t: WILD if t[1] >= 100 - t[0] else good)


