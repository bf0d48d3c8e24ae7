"""The target format: Anthropic Messages events as byte templates, ids, and stop/usage shapes.

Hot-path output is built from byte templates plus ``orjson.dumps`` of the one string that varies, never by
serialising a dict per event.
"""

from __future__ import annotations

import os
from typing import Any

import orjson

_ALPHABET = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_TO_BASE62 = bytes(_ALPHABET[b % 62] for b in range(256))  # byte -> its letter, for bytes.translate


def _base62(length: int) -> str:
    """Random letters, one per random byte (modulo 62): a table lookup in C, not a generator (5 us -> 0.5 us:
    every request and every stream makes ids)."""
    return _random_bytes(length).translate(_TO_BASE62).decode()


_POOL_SIZE = 4096  # the system's random bytes, taken this many at a time: ids for ~170 requests per system call
_pool = b""
_taken = 0


def _random_bytes(length: int) -> bytes:
    """``os.urandom(length)`` from a pool refilled by one ``os.urandom`` call: a request makes two ids, and each
    call was a getrandom system call of its own (strace: 2 of a paced request's 81)."""
    global _pool, _taken
    end = _taken + length
    if end > len(_pool):
        _pool, _taken, end = _urandom(max(_POOL_SIZE, length)), 0, length
    piece = _pool[_taken:end]
    _taken = end
    return piece


def _forget_pool() -> None:
    """A forked child must not make the ids its parent makes from the same pool."""
    global _pool, _taken
    _pool, _taken = b"", 0


_urandom = os.urandom
os.register_at_fork(after_in_child=_forget_pool)


def message_id() -> str:
    return "msg_01" + _base62(22)


def tool_use_id() -> str:
    return "toolu_01" + _base62(22)


def request_id() -> str:
    return "req_01" + _base62(22)


def thinking_signature() -> str:
    """An opaque signature so clients (the SDK, Claude Code) accept a thinking block relay made.

    It is not verifiable by Anthropic; relay drops thinking blocks on the way back upstream, so no one checks.
    """
    return "relay-" + _base62(43)


# ---- stream event templates ------------------------------------------------------------------

MESSAGE_STOP = b'event: message_stop\ndata: {"type":"message_stop"}\n\n'


# ``usage_dict``'s object as bytes: (input_tokens, cache_read_input_tokens, output_tokens)
_USAGE = b'{"input_tokens":%d,"cache_creation_input_tokens":0,"cache_read_input_tokens":%d,"output_tokens":%d}'
_MESSAGE_START = (b'event: message_start\ndata: {"type":"message_start","message":{"id":"%b","type":"message",'
                  b'"role":"assistant","model":%b,"content":[],"stop_reason":null,"stop_sequence":null,"usage":'
                  + _USAGE + b"}}\n\n")


def message_start(msg_id: str, model: str, input_tokens: int = 0) -> bytes:
    return _MESSAGE_START % (msg_id.encode(), orjson.dumps(model), input_tokens, 0, 0)


# Anthropic's own keep-alive event: what relay writes into a stream the upstream keeps silent (``pump.Pump``).
PING = b'event: ping\ndata: {"type":"ping"}\n\n'


def text_block_start(index: int) -> bytes:
    return (
        b'event: content_block_start\ndata: {"type":"content_block_start","index":%d,'
        b'"content_block":{"type":"text","text":""}}\n\n' % index
    )


def thinking_block_start(index: int) -> bytes:
    return (
        b'event: content_block_start\ndata: {"type":"content_block_start","index":%d,'
        b'"content_block":{"type":"thinking","thinking":"","signature":""}}\n\n' % index
    )


def tool_block_start(index: int, tool_id: str, name: str) -> bytes:
    return (
        b'event: content_block_start\ndata: {"type":"content_block_start","index":%d,'
        b'"content_block":{"type":"tool_use","id":' % index
        + orjson.dumps(tool_id)
        + b',"name":'
        + orjson.dumps(name)
        + b',"input":{}}}\n\n'
    )


# A delta event is its block's head (made once per block: ``BlockWriter`` keeps the open block's) + the JSON string
# + DELTA_END; per chunk that is one concatenation, no formatting.
DELTA_END = b"}}\n\n"


def text_delta_head(index: int) -> bytes:
    return (b'event: content_block_delta\ndata: {"type":"content_block_delta","index":%d,'
            b'"delta":{"type":"text_delta","text":' % index)


def thinking_delta_head(index: int) -> bytes:
    return (b'event: content_block_delta\ndata: {"type":"content_block_delta","index":%d,'
            b'"delta":{"type":"thinking_delta","thinking":' % index)


def input_json_delta_head(index: int) -> bytes:
    return (b'event: content_block_delta\ndata: {"type":"content_block_delta","index":%d,'
            b'"delta":{"type":"input_json_delta","partial_json":' % index)


def text_delta(index: int, text: str) -> bytes:
    return text_delta_head(index) + orjson.dumps(text) + DELTA_END


def thinking_delta(index: int, text: str) -> bytes:
    return thinking_delta_head(index) + orjson.dumps(text) + DELTA_END


def signature_delta(index: int, signature: str) -> bytes:
    return (
        b'event: content_block_delta\ndata: {"type":"content_block_delta","index":%d,'
        b'"delta":{"type":"signature_delta","signature":' % index
        + orjson.dumps(signature)
        + DELTA_END
    )


def input_json_delta(index: int, partial: str) -> bytes:
    return input_json_delta_head(index) + orjson.dumps(partial) + DELTA_END


def block_stop(index: int) -> bytes:
    return b'event: content_block_stop\ndata: {"type":"content_block_stop","index":%d}\n\n' % index


def message_delta(stop_reason: str | None, stop_sequence: str | None, usage: dict[str, int]) -> bytes:
    return (
        b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":'
        + orjson.dumps(stop_reason)
        + b',"stop_sequence":'
        + orjson.dumps(stop_sequence)
        + b'},"usage":'
        + orjson.dumps(usage)
        + b"}\n\n"
    )


_MESSAGE_END = (b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":%b,"stop_sequence":%b},'
                b'"usage":' + _USAGE + b"}\n\n" + MESSAGE_STOP)


def message_end(stop_reason: str | None, stop_sequence: str | None, input_tokens: int, output_tokens: int,
                cache_read: int = 0) -> bytes:
    """``message_delta`` with ``usage_dict``'s usage, then ``MESSAGE_STOP``: how a translated stream ends, as one
    template (no dict to make and encode, once per stream)."""
    return _MESSAGE_END % (orjson.dumps(stop_reason), orjson.dumps(stop_sequence), input_tokens, cache_read,
                           output_tokens)


def usage_dict(input_tokens: int, output_tokens: int, cache_read: int = 0, cache_creation: int = 0) -> dict[str, int]:
    return {
        "input_tokens": input_tokens,
        "cache_creation_input_tokens": cache_creation,
        "cache_read_input_tokens": cache_read,
        "output_tokens": output_tokens,
    }


def message(
    msg_id: str,
    model: str,
    content: list[dict[str, Any]],
    stop_reason: str | None,
    stop_sequence: str | None,
    usage: dict[str, int],
) -> dict[str, Any]:
    return {
        "id": msg_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": stop_sequence,
        "usage": usage,
    }


def events_from_message(msg: dict[str, Any], started: bool = False) -> bytes:
    """A whole Message replayed as a stream, for upstreams that answer a stream request in one piece
    (``started``: relay's message_start is out already, during a long wait for that answer)."""
    usage = msg["usage"]
    out = [] if started else [message_start(msg["id"], msg["model"], usage.get("input_tokens", 0))]
    for index, block in enumerate(msg["content"]):
        kind = block["type"]
        if kind == "text":
            out += [text_block_start(index), text_delta(index, block["text"])]
        elif kind == "thinking":
            out += [thinking_block_start(index), thinking_delta(index, block["thinking"]),
                    signature_delta(index, block.get("signature") or thinking_signature())]
        elif kind == "tool_use":
            out.append(tool_block_start(index, block["id"], block["name"]))
            if block["input"]:
                out.append(input_json_delta(index, orjson.dumps(block["input"]).decode()))
        out.append(block_stop(index))
    out += [message_delta(msg["stop_reason"], msg["stop_sequence"], usage), MESSAGE_STOP]
    return b"".join(out)
