"""OpenAI Chat Completions SSE -> Anthropic Messages SSE, as an incremental sans-I/O state machine on
``formats.writer.BlockWriter`` (which owns the Anthropic side: blocks, message start and end, errors).

``feed(bytes)`` takes whatever one upstream read delivered and returns the Anthropic event bytes it
produces, at once. What waits: the closing ``message_delta`` (OpenAI sends usage after the finish chunk, so the
message closes at ``[DONE]``, or at EOF after a finish_reason; EOF with neither is an error), and the fragments
of a parallel tool call that arrive while another call's block is open (see ``_on_tool_delta``).

The hot path (``_delta_only``) handles the chunk nearly every read carries, one plain delta, with a few dict
lookups and one template; the general path (``_on_event``) everything else.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import repeat, takewhile
from operator import and_, is_, itemgetter
from typing import Any

import orjson
from orjson import JSONDecodeError, dumps, loads

from relay.errors import RelayError, from_stream_error
from relay.formats import anthropic as A
from relay.formats.openai_chat.common import (
    ThinkSplitter,
    chunk_usage,
    content_parts,
    matched_stop,
    reasoning_of,
    stop_reason,
    text_field,
    usage_numbers,
)
from relay.formats.writer import RUN, TEXT, THINKING, TOOL, BlockWriter
from relay.sse import Event


class _Call:
    """One upstream tool call: how the upstream keys it (``index``, ``id``), and its argument text so far."""

    __slots__ = ("index", "id", "name", "args")

    def __init__(self, index: Any, call_id: str, name: str) -> None:
        self.index = index
        self.id = call_id
        self.name = name
        self.args: list[str] = []

    def same(self, index: Any, call_id: str) -> bool:
        """A fragment keyed (``index``, ``call_id``) belongs to this call. Ollama gives every call of a batch
        index 0, so a different id under the same index is another call."""
        if index is not None and index != self.index:
            return False
        if call_id and self.id and call_id != self.id:
            return False
        return index is not None or (bool(call_id) and call_id == self.id)

    def complete(self) -> bool:
        """The arguments so far are a whole JSON object: nothing more can belong to them."""
        text = "".join(self.args)
        if not text or text.lstrip()[:1] != "{":
            return False
        try:
            return type(orjson.loads(text)) is dict
        except orjson.JSONDecodeError:
            return False


TRIES = 8  # shapes learnt in a row without one being used, before a stream stops learning them (``_learn``)
_NAME, _PAYLOAD = itemgetter(0), itemgetter(1)
WINDOW = 64  # events ``fitting`` looks at first (then twice as many each time)


def fitting(payloads: list[bytes], names: list[bytes | None] | None, at: int,
            like: tuple[bytes, bytes, int, Any]) -> int:
    """How many events from ``at`` on have the learnt shape (``names``: None when all are unnamed). Counted in C,
    in windows that double in size from ``WINDOW``: a read whose runs are short (shaped chunks among others) costs
    at most a window's looks per event, not a pass over the rest of the read per event (which made such a read
    quadratic), and a burst's run takes one or two windows (each costs ~8k instructions to set up)."""
    run, size = 0, WINDOW
    while True:
        start, stop = at + run, at + run + size
        window = payloads[start:stop]
        fit = map(and_, map(bytes.startswith, window, repeat(like[0])), map(bytes.endswith, window, repeat(like[1])))
        if names is not None:
            fit = map(and_, fit, map(is_, names[start:stop], repeat(None)))
        got = sum(takewhile(bool, fit))
        run += got
        if got < size:  # a shape broken, or the read's end
            return run
        size *= 2


class StreamTranslator(BlockWriter):
    __slots__ = ("_splitter", "_stops", "_call", "_held", "_closed", "_finish", "_matched", "_like", "_guess",
                 "_tries")
    ENDED_WITHOUT = "no finish_reason and no [DONE]"

    def __init__(self, model: str, *, think_tags: bool = False, stop_sequences: tuple[str, ...] = (),
                 input_tokens_hint: int = 0, secrets: tuple[str, ...] = (), provider: str = "upstream",
                 message_id: str | None = None, on_error: Callable[[RelayError], RelayError] | None = None) -> None:
        BlockWriter.__init__(self, model, input_tokens_hint=input_tokens_hint, secrets=secrets, provider=provider,
                             message_id=message_id, on_error=on_error)
        self._splitter = ThinkSplitter() if think_tags else None
        self._stops = stop_sequences
        self._call: _Call | None = None  # the tool call whose tool_use block is open
        self._held: list[_Call] = []  # calls whose block cannot open yet (see _on_tool_delta)
        self._closed: list[_Call] = []  # calls whose block has closed
        self._finish: str | None = None
        self._matched: str | None = None
        self._like: tuple[bytes, bytes, int, _Call | None] | None = None  # see _learn
        self._guess: tuple[dict[str, Any], dict[str, Any], str] | None = None  # _like not yet proven: see _proven
        self._tries = TRIES

    # ---- BlockWriter hooks ------------------------------------------------------------------

    def _on_end(self) -> None:
        if self._finish is None:  # neither a finish_reason nor [DONE]: the answer was cut short
            BlockWriter._on_end(self)
        else:  # a finish_reason without [DONE]: several servers (llama.cpp without --send-done) stop there
            self._close_message()

    def _stop_reason(self) -> str:
        return stop_reason(self._finish, self.saw_tool, self._matched)

    def close_block(self) -> None:
        if self._block == TOOL and self._call is not None:
            self._closed.append(self._call)
            self._call = None
        BlockWriter.close_block(self)

    def _open(self, kind: int) -> None:
        if self._held and kind != TOOL:  # text between parallel calls: the calls' blocks must close first
            self._release_held()
        BlockWriter._open(self, kind)

    def fail(self, error: RelayError) -> None:
        self._held.clear()  # calls not yet shown stay unshown: the turn failed
        BlockWriter.fail(self, error)

    # ---- the upstream's events --------------------------------------------------------------

    def _many(self, events: list[Event]) -> None:
        """A run of chunks shaped like the learnt one (``_learn``) is translated at once (``_run``), the rest one
        by one."""
        count = len(events)
        payloads: list[bytes] = []
        at = 0
        while at < count:
            like = self._like
            if like is not None and count - at >= RUN and events[at][1].startswith(like[0]) \
                    and (self._guess is None or self._proven()):
                if not payloads:
                    payloads = list(map(_PAYLOAD, events))
                    names = list(map(_NAME, events))
                    unnamed = names.count(None) == count  # (a burst's events are all unnamed)
                run = fitting(payloads, None if unnamed else names, at, like)
                if run >= RUN:
                    self._run(payloads[at:at + run], like)
                    at += run
                    if self.done:
                        break
                    continue
            name, payload = events[at]
            self._on_event(name, payload)
            at += 1
            if self.done:
                break

    def _run(self, payloads: list[bytes], like: tuple[bytes, bytes, int, _Call | None]) -> None:
        """Chunks all made of the learnt shape's bytes around a literal: what ``_on_event`` does with each, for
        all of them with one parse. The literals are parsed as one JSON array with a raw newline after each comma;
        no JSON string can hold a raw newline, so no string spans two literals, and as many strings as literals
        (no literal can be empty: ``[,`` does not parse) means each literal is one string, as the one-by-one
        parse requires. Anything else: one by one."""
        before, after, kind, call = like
        if call is None or (call is self._call and self._block == TOOL and not self._held):
            cut = slice(len(before), -len(after) if after else None)
            try:
                texts = loads(b"[" + b",\n".join(map(bytes.__getitem__, payloads, repeat(cut))) + b"]")
            except JSONDecodeError:
                texts = None
            if texts is not None and len(texts) == len(payloads) and set(map(type, texts)) == {str}:
                self._tries = TRIES
                if call is not None:
                    call.args.extend(filter(None, texts))
                self.deltas(kind, texts)
                return
        for payload in payloads:
            self._on_event(None, payload)
            if self.done:
                return

    def _on_event(self, name: bytes | None, payload: bytes) -> None:
        like = self._like
        if like is not None and name is None and payload.startswith(like[0]) and payload.endswith(like[1]) \
                and (self._guess is None or self._proven()):
            # shaped like the last hot chunk (``_learn``): only its one string is new
            try:
                text = loads(payload[len(like[0]):len(payload) - len(like[1])])
            except JSONDecodeError:
                text = None
            kind, call = like[2], like[3]
            if type(text) is str and (call is None or (call is self._call and self._block == TOOL and not self._held)):
                self._tries = TRIES
                if text:
                    if call is not None:
                        call.args.append(text)
                    self.delta(kind, text)
                return
        if payload[:6] == b"[DONE]":  # before parsing: no JSON starts so, and a failed parse makes an exception
            self._close_message()
            return
        try:
            chunk = loads(payload)
        except JSONDecodeError:
            return  # not a chunk (a provider's stray keep-alive text): nothing to translate
        if name is None and type(chunk) is dict and self._delta_only(chunk, payload):
            return
        if not isinstance(chunk, dict):
            if isinstance(chunk, list) and chunk and isinstance(chunk[0], dict) and "error" in chunk[0]:
                self.fail(from_stream_error(chunk[0], self.secrets, self.provider))
            return
        if name == b"error" or ("error" in chunk and not chunk.get("choices")):
            self.fail(from_stream_error(chunk, self.secrets, self.provider))
            return
        choices = chunk.get("choices")
        choice: Any = None
        if choices and type(choices) is list:
            choice = choices[0]
            if len(choices) > 1 or (type(choice) is dict and choice.get("index", 0) != 0):
                choice = next((c for c in choices if isinstance(c, dict) and c.get("index", 0) == 0), None)
            if type(choice) is dict and choice.get("finish_reason") == "error":  # OpenRouter's in-band error
                self.fail(from_stream_error(choice if "error" in choice else chunk, self.secrets, self.provider))
                return
        if not self.started:
            self.start()
        if "usage" in chunk or "x_groq" in chunk or (type(choice) is dict and "usage" in choice):
            usage = chunk_usage(chunk, choice)
            if usage is not None:
                self.usage(*usage_numbers(usage))
        if type(choice) is not dict:
            return
        delta = choice.get("delta")
        if delta and type(delta) is dict:  # plain mid-stream deltas took the hot path (_delta_only) already
            self._on_delta(delta)
        finish = choice.get("finish_reason")
        if finish and isinstance(finish, str):
            self._finish = finish
            if self._stops:
                self._matched = matched_stop(choice, self._stops)
            self._flush_splitter()
            self._release_held()

    def _delta_only(self, chunk: dict[str, Any], payload: bytes) -> bool:
        """The hot path: a mid-stream chunk carrying one plain delta (text, reasoning text or the next argument
        fragment of the open tool call) and nothing else: no finish, usage, error or second choice. Handles it
        and says True; anything else is left to the general path.

        Written for the interpreter, as it runs for nearly every chunk of every stream: one function (a call
        costs as much as several dict lookups) that ends in the writer's ``delta``, subscripts and ``in`` rather
        than ``.get`` (a method call) for keys the usual chunk has or lacks."""
        try:
            choices = chunk["choices"]
            if type(choices) is not list or len(choices) != 1 or "error" in chunk or "x_groq" in chunk \
                    or ("usage" in chunk and chunk["usage"] is not None):
                return False
            choice = choices[0]
            if type(choice) is not dict or "usage" in choice or choice.get("finish_reason") is not None \
                    or ("index" in choice and choice["index"] != 0) or self._splitter is not None:
                return False
            delta = choice["delta"]
            if type(delta) is not dict:
                return False
            size = len(delta) - ("role" in delta)
            if "content" in delta and delta["content"] is not None:
                box, key, open_call = delta, "content", None
                text = delta[key]
                if size != 1 or type(text) is not str:
                    return False
                kind = TEXT
            else:
                size -= "content" in delta  # DeepSeek's reasoning chunks carry "content": null
                if size != 1:
                    return False
                if "tool_calls" in delta:
                    # the next argument fragment of the open call: no id, no name, the same index
                    calls, open_call = delta["tool_calls"], self._call
                    if type(calls) is not list or len(calls) != 1 or open_call is None or self._held \
                            or self._block != TOOL:
                        return False
                    call = calls[0]
                    if type(call) is not dict or call.get("id") or call.get("index") != open_call.index:
                        return False
                    function = call["function"]
                    if type(function) is not dict or function.get("name"):
                        return False
                    box, key = function, "arguments"
                    text = function[key]
                    if type(text) is not str:
                        return False
                    open_call.args.append(text)
                    kind = TOOL
                else:
                    box, key, open_call = delta, "reasoning_content" if "reasoning_content" in delta else "reasoning", None
                    text = delta[key]
                    if type(text) is not str:
                        return False
                    kind = THINKING
        except KeyError:
            return False
        if text:
            self.delta(kind, text)  # (opens the message too, if this is the first chunk)
            if self._tries:
                self._learn(payload, chunk, box, key, text, kind, open_call)
        elif not self.started:  # an empty first chunk (the role's): the message starts, as on the general path
            self.start()
        return True

    def _learn(self, payload: bytes, chunk: dict[str, Any], box: dict[str, Any], key: str, text: str, kind: int,
               call: _Call | None) -> None:
        """Keep this hot chunk's bytes around its one varying string as the shape of the next (``_like``), if
        they provably are: the string's literal is found in the payload, and the payload with an empty string in
        its place parses to this chunk with that one field emptied. Any payload made of the same bytes around
        another string literal then parses to this chunk with that field changed, so ``_on_event`` reads only
        the literal. Upstreams whose chunks differ elsewhere (OpenAI's per-chunk ``obfuscation``) never match:
        after a few tries without a match in between, it stops trying for the stream."""
        self._tries -= 1
        self._like = None
        literal = dumps(text)
        at = payload.rfind(literal)
        if at < 0:
            return
        self._like = (payload[:at], payload[at + len(literal):], kind, call)
        self._guess = (chunk, box, key)  # the proof waits for a chunk of this shape (``_proven``)

    def _proven(self) -> bool:
        """The learnt shape (``_like``) proved (see ``_learn``) when a chunk of it comes, not when it is learnt: the
        proof parses a whole chunk, and a stream whose text came in one chunk (the smallest answer) never needs
        it. False (and no shape) when it does not hold."""
        like, (chunk, box, key) = self._like, self._guess  # type: ignore[misc]
        self._guess = None
        box[key] = ""
        try:
            if like is not None and loads(like[0] + b'""' + like[1]) == chunk:
                return True
        except JSONDecodeError:
            pass
        self._like = None
        return False

    def _on_delta(self, delta: dict[str, Any]) -> None:
        if "reasoning_content" in delta or "reasoning" in delta or "reasoning_details" in delta:
            text, signature = reasoning_of(delta)
            if signature:
                self._signature = signature  # lands on the thinking block open now, or the next one to close
            if text:
                self.thinking(text)
        content = delta.get("content")
        if content:
            if isinstance(content, str):
                if self._splitter is None:
                    self.text(content)
                else:
                    self._emit(self._splitter.feed(content))
            else:
                self._emit(content_parts(content))
        refusal = delta.get("refusal")
        if isinstance(refusal, str) and refusal:
            self.text(refusal)
        calls = delta.get("tool_calls")
        if calls and type(calls) is list:
            for call in calls:
                if isinstance(call, dict):
                    self._on_tool_delta(call)

    def _emit(self, pieces: list[tuple[str, str]]) -> None:
        for kind, text in pieces:
            if kind == "text":
                self.text(text)
            elif text:
                self.thinking(text)

    def _flush_splitter(self) -> None:
        if self._splitter is not None:
            self._emit(self._splitter.flush())

    # ---- tool calls -------------------------------------------------------------------------

    def _on_tool_delta(self, call: dict[str, Any]) -> None:
        """One tool-call fragment into its own call's block.

        Anthropic's stream has one open content block at a time, and a closed block cannot reopen. Some servers
        interleave the fragments of parallel calls (index 0, 1, 0, ...), so when a new call appears while the
        open call's arguments are not yet a whole JSON object, that call is *held* (its id, name and fragments
        kept) until the open call is whole (its block closes and the held call's opens with what it gathered,
        then streams live) or the turn ends. That is the only holding the target grammar forces: a new call
        after a whole one, the usual sequential case, opens at once and streams as it comes."""
        index = call.get("index")
        call_id = text_field(call.get("id"))
        function = call.get("function")
        if not isinstance(function, dict):
            function = {}
        name = text_field(function.get("name"))
        args = function.get("arguments")
        if args is not None and not isinstance(args, str):
            args = orjson.dumps(args).decode()  # some servers send the arguments as an object
        open_call = self._call
        target: _Call | None = None
        if open_call is not None and (open_call.same(index, call_id) or (
                index is None and not call_id and not (name and open_call.args))):
            target = open_call  # (no index and no id: the open call's, unless a name starts a new one)
        else:
            target = next((c for c in self._held if c.same(index, call_id)), None)
        if target is None and not name and any(c.same(index, call_id) for c in self._closed):
            return  # a late fragment of a call whose block had to close (text came between): it cannot reopen
        if target is None:
            target = _Call(index, call_id, name)
            if open_call is None or (not self._held and open_call.complete()):
                self._open_tool(target)
                open_call = target
            else:
                self._held.append(target)
        if not target.id and call_id:
            target.id = call_id
        if not target.name and name and target is not open_call:
            target.name = name
        if args:
            target.args.append(args)
            if target is open_call:
                self.tool_args(args)
                if self._held and open_call.complete():
                    self._release_held(whole=True)

    def _open_tool(self, call: _Call) -> None:
        self.tool(call.id if call.id else A.tool_use_id(), call.name)
        self._call = call
        if call.args:
            self.tool_args("".join(call.args))

    def _release_held(self, whole: bool = False) -> None:
        """Held calls get their blocks in the order they appeared. With ``whole``, only while each open call is
        whole (the next may still stream live); otherwise all of them (the turn is over)."""
        while self._held:
            if whole and not (self._call is not None and self._call.complete()):
                return
            self._open_tool(self._held.pop(0))
        if not whole:
            self.close_block()

    def _close_message(self) -> None:
        self._flush_splitter()
        if self._held:
            self._release_held()
        self.close(self._matched)  # (which closes the open block, as _release_held would)
