"""A fast local token estimate for count_tokens and for message_start before the upstream reports usage.

Method: about 4 characters per token for ASCII text (English prose and code under BPE tokenizers), half a
token per extra UTF-8 byte otherwise (1/2 per accented letter, 1 per CJK character, 3/2 per emoji), a few tokens of
framing per message and per tool, and images by Anthropic's own rule (width*height/750, capped at 1600)
when a PNG/GIF header gives the size, else 1600. It does not tokenize; README gives its measured error
(bench/tokens_accuracy.py: mean 14.6% against six real tokenizers).
"""

from __future__ import annotations

import base64
import binascii
import ctypes
from typing import Any

import orjson

IMAGE_TOKENS_MAX = 1600
PER_MESSAGE = 4
PER_TOOL = 8


def text_tokens(text: Any) -> int:
    """The tokens of a string; anything else counts as nothing, never raises (estimation runs before
    validation, so a field meant to be a string may not be one)."""
    if not isinstance(text, str) or not text:
        return 0
    if text.isascii():
        return (len(text) + 3) // 4
    return _tokens(len(text), utf8_size(text) - len(text))


FILL_FROM = 1024  # characters: below, a call through ctypes costs more than the conversion it spares


def utf8_size(text: str) -> int:
    """The size of ``text`` in UTF-8. A long string is measured by CPython's own conversion
    (``PyUnicode_AsUTF8AndSize``), which keeps the UTF-8 form inside the str: orjson writes a string from that
    form when it is there, and converts it itself otherwise. A string that is not ASCII costs ~11 instructions
    a character to convert, against ~1.4 to write once converted, so measuring it this way, rather than with
    ``encode`` (which converts and keeps nothing), spares the body's serialisation the conversion: a tool
    result's text goes upstream as the same str (bench/README.md, session 8)."""
    if len(text) >= FILL_FROM and _as_utf8 is not None:
        size = ctypes.c_ssize_t()
        try:
            _as_utf8(text, ctypes.byref(size))
        except UnicodeEncodeError:  # a lone surrogate (never from JSON: orjson refuses one)
            return len(text.encode("utf-8", "surrogatepass"))
        return size.value
    return len(text.encode("utf-8", "surrogatepass"))


def _utf8_converter() -> Any:
    try:
        convert = ctypes.pythonapi.PyUnicode_AsUTF8AndSize  # the stable ABI's, in every CPython relay runs on
    except AttributeError:  # not CPython: measure by encoding
        return None
    convert.argtypes = (ctypes.py_object, ctypes.POINTER(ctypes.c_ssize_t))
    convert.restype = ctypes.c_void_p
    return convert


_as_utf8 = _utf8_converter()


def _tokens(chars: int, extra: int) -> int:
    """The rule on counts: ``chars`` characters whose UTF-8 form has ``extra`` bytes beyond one per character
    (1 per accented letter, 2 per CJK character, 3 per emoji)."""
    if not extra:
        return (chars + 3) // 4
    non_ascii = max(1, extra // 2)
    return (chars - non_ascii + 3) // 4 + non_ascii


class OutputCount:
    """The output tokens of a streamed answer, estimated from its text as it passes through, for upstreams that
    send no usage (llama-cpp-python ignores stream_options.include_usage). Keeps two counters, not the text."""

    __slots__ = ("chars", "extra")

    def __init__(self) -> None:
        self.chars = 0
        self.extra = 0

    def add(self, text: str) -> None:
        self.chars += len(text)
        if not text.isascii():
            self.extra += utf8_size(text) - len(text)

    def tokens(self) -> int:
        return _tokens(self.chars, self.extra) if self.chars else 0


def _image_tokens(source: Any) -> int:
    if not isinstance(source, dict) or source.get("type") != "base64":
        return IMAGE_TOKENS_MAX
    data = source.get("data")
    if not isinstance(data, str):
        return IMAGE_TOKENS_MAX
    try:
        head = base64.b64decode(data[:64] + "=" * (-len(data[:64]) % 4))
    except (binascii.Error, ValueError):
        return IMAGE_TOKENS_MAX
    size: tuple[int, int] | None = None
    if head[:8] == b"\x89PNG\r\n\x1a\n" and len(head) >= 24:
        size = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    elif head[:6] in (b"GIF87a", b"GIF89a") and len(head) >= 10:
        size = int.from_bytes(head[6:8], "little"), int.from_bytes(head[8:10], "little")
    if size is None:
        return IMAGE_TOKENS_MAX
    return max(1, min(IMAGE_TOKENS_MAX, size[0] * size[1] // 750))


def _content_tokens(content: Any) -> int:
    """The tokens of a message's (or a tool result's) content. Runs for every block of every request (~700 in a
    1 MiB Claude Code request): the common blocks (text, tool_result, tool_use, in the order they are most often
    met) count their ASCII strings in place, without a call."""
    if type(content) is str:  # (exact types: the request is orjson's, and ``type() is`` is the cheaper check)
        return text_tokens(content)
    if type(content) is not list:
        return 0
    total = 0
    for block in content:
        if type(block) is not dict:
            continue
        kind = block.get("type")
        if kind == "text":
            text = block.get("text")
            if type(text) is str:
                total += (len(text) + 3) // 4 if text.isascii() else text_tokens(text)
        elif kind == "tool_result":
            inner = block.get("content")
            if type(inner) is str:
                total += ((len(inner) + 3) // 4 if inner.isascii() else text_tokens(inner)) + 4
            else:
                total += _content_tokens(inner) + 4
        elif kind == "tool_use":
            total += text_tokens(block.get("name")) + _json_tokens(block.get("input")) + 4
        elif kind == "image":
            total += _image_tokens(block.get("source"))
        elif kind == "thinking":
            total += text_tokens(block.get("thinking"))
        elif kind == "document":
            source = block.get("source")
            data = source.get("data") if isinstance(source, dict) else None
            if isinstance(data, str):
                # a PDF page is ~1500-3000 tokens; base64 size is a rough stand-in for page count
                total += text_tokens(data) if isinstance(source, dict) and source.get("type") == "text" else len(data) // 50
        elif kind == "tool_reference":
            total += 8
    return total


def _json_tokens(value: Any) -> int:
    """The tokens of a value's JSON text, counted on orjson's bytes: they are its UTF-8 form already, so only
    the characters need counting when they are not ASCII (decoding, not a round trip through ``text_tokens``,
    which would encode them again: Claude Code's tool schemas hold an ellipsis or an arrow on every request)."""
    try:
        data = orjson.dumps(value)
    except (orjson.JSONEncodeError, TypeError):  # deeper than orjson writes: validation will refuse it
        return 0
    if data.isascii():
        return (len(data) + 3) // 4
    chars = len(data.decode())
    return _tokens(chars, len(data) - chars)


def message_tokens(message: Any) -> int:
    """One message's share of ``estimate`` (``relay.history`` keeps these for the messages a request repeats)."""
    return PER_MESSAGE + _content_tokens(message.get("content")) if type(message) is dict else 0


def estimate(req: dict[str, Any], known: int = 0, known_tokens: int = 0) -> int:
    """``known``: the first messages are already counted, at ``known_tokens`` (``relay.history.Reuse``)."""
    total = known_tokens
    system = req.get("system")
    if system is not None:
        total += _content_tokens(system) + PER_MESSAGE
    messages = req.get("messages")
    if type(messages) is list:
        for message in messages[known:] if known else messages:
            if type(message) is dict:
                total += PER_MESSAGE + _content_tokens(message.get("content"))
    tools = req.get("tools")
    if isinstance(tools, list):
        for tool in tools:
            if isinstance(tool, dict):
                total += PER_TOOL + text_tokens(tool.get("name")) + text_tokens(tool.get("description"))
                schema = tool.get("input_schema")
                if schema is not None:
                    total += _json_tokens(schema)
    return max(1, total)
