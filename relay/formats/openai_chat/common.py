"""Pieces shared by the OpenAI response and stream translators: usage, stop reasons, the many dialects of
reasoning text, and the inline ``<think>`` splitter."""

from __future__ import annotations

from typing import Any

STOP_REASONS = {
    "stop": "end_turn",
    "eos": "end_turn",
    "end_turn": "end_turn",
    "length": "max_tokens",
    "max_tokens": "max_tokens",
    "model_length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "tool_use": "tool_use",
    "content_filter": "refusal",
    "safety": "refusal",
    "refusal": "refusal",
}


def stop_reason(finish: Any, saw_tool: bool, matched_stop: str | None) -> str:
    reason = STOP_REASONS.get(finish if isinstance(finish, str) and finish else "stop", "end_turn")
    if matched_stop is not None:
        return "stop_sequence"
    if saw_tool and reason in ("end_turn", "tool_use"):  # Gemini's endpoint says "stop" after tool calls
        return "tool_use"
    if reason == "tool_use" and not saw_tool:
        return "end_turn"
    return reason


def matched_stop(choice: dict[str, Any], stop_sequences: tuple[str, ...]) -> str | None:
    """vLLM and some others report which stop string matched (``stop_reason``)."""
    value = choice.get("stop_reason")
    if isinstance(value, str) and value in stop_sequences:
        return value
    return None


def _count(value: Any) -> int:
    """A token count as reported, or 0 for anything that is not a non-negative integer."""
    return value if type(value) is int and value > 0 else 0


def text_field(value: Any) -> str:
    """An id or name from the upstream as a string, whatever JSON type it arrived as."""
    if isinstance(value, str):
        return value
    return "" if value is None or isinstance(value, (dict, list, bool)) else str(value)


def usage_numbers(usage: dict[str, Any]) -> tuple[int, int, int]:
    """(input_tokens not read from cache, output_tokens, cache_read_input_tokens)."""
    prompt = usage.get("prompt_tokens") or usage.get("input_tokens") or 0
    completion = usage.get("completion_tokens") or usage.get("output_tokens") or 0
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    if not cached:
        cached = usage.get("prompt_cache_hit_tokens") or usage.get("cached_tokens") or 0
    prompt, completion, cached = _count(prompt), _count(completion), _count(cached)
    cached = min(cached, prompt)
    return prompt - cached, completion, cached


def chunk_usage(chunk: dict[str, Any], choice: Any) -> dict[str, Any] | None:
    """Usage may be top level, inside the choice (Kimi), or in x_groq (Groq). ``choice`` is whatever the
    upstream put first in ``choices`` (not always an object)."""
    usage = chunk.get("usage")
    if isinstance(usage, dict):
        return usage
    if isinstance(choice, dict) and isinstance(choice.get("usage"), dict):
        return choice["usage"]
    groq = chunk.get("x_groq")
    if isinstance(groq, dict) and isinstance(groq.get("usage"), dict):
        return groq["usage"]
    return None


def reasoning_of(delta: dict[str, Any]) -> tuple[str, str | None]:
    """Reasoning text and an upstream signature, whichever field the provider uses."""
    text = delta.get("reasoning_content")
    if not isinstance(text, str) or not text:
        text = delta.get("reasoning")
    signature: str | None = None
    details = delta.get("reasoning_details")
    detail_text: list[str] = []
    if isinstance(details, list):
        for detail in details:
            if not isinstance(detail, dict):
                continue
            if isinstance(detail.get("signature"), str) and detail["signature"]:
                signature = detail["signature"]
            if detail.get("type") == "reasoning.text" and isinstance(detail.get("text"), str):
                detail_text.append(detail["text"])
            elif detail.get("type") == "reasoning.summary" and isinstance(detail.get("summary"), str):
                detail_text.append(detail["summary"])
    if not isinstance(text, str) or not text:
        text = "".join(detail_text)
    return text, signature


def content_parts(content: Any) -> list[tuple[str, str]]:
    """Content as ("text"|"thinking", text) pieces: a plain string, or Mistral's typed arrays."""
    if isinstance(content, str):
        return [("text", content)] if content else []
    if not isinstance(content, list):
        return []
    parts: list[tuple[str, str]] = []
    for part in content:
        if isinstance(part, str):
            parts.append(("text", part))
        elif isinstance(part, dict):
            kind = part.get("type")
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append(("text", part["text"]))
            elif kind == "thinking":
                inner = part.get("thinking")
                if isinstance(inner, str):
                    parts.append(("thinking", inner))
                elif isinstance(inner, list):
                    parts.append(("thinking", "".join(
                        p.get("text", "") for p in inner if isinstance(p, dict) and isinstance(p.get("text"), str)
                    )))
    return [p for p in parts if p[1]]


OPEN_TAG = "<think>"
CLOSE_TAG = "</think>"


class ThinkSplitter:
    """Splits inline ``<think>…</think>`` out of content text, across chunk boundaries.

    Holds back only what cannot be classified yet: a trailing fragment that could be the start of a tag (at
    most 7 characters), and whitespace at the start of a think section, which becomes a thinking block only if
    real reasoning follows (Qwen3 with thinking off writes an empty ``<think>\n\n</think>`` on every reply).
    """

    __slots__ = ("inside", "_held", "_blank", "_thought", "_trim")

    def __init__(self) -> None:
        self.inside = False
        self._held = ""  # a possible partial tag
        self._blank = ""  # whitespace opening a think section, not yet known to lead anywhere
        self._thought = False  # this think section has had real reasoning
        self._trim = 0  # newlines still to drop after </think> (markup, not answer)

    def feed(self, text: str) -> list[tuple[str, str]]:
        text = self._held + text
        self._held = ""
        out: list[tuple[str, str]] = []
        while text:
            tag = CLOSE_TAG if self.inside else OPEN_TAG
            at = text.find(tag)
            if at >= 0:
                self._emit(out, text[:at])
                text = text[at + len(tag):]
                self.inside = not self.inside
                self._blank, self._thought = "", False
                self._trim = 0 if self.inside else 2
                continue
            keep = _partial_suffix(text, tag)
            if keep:
                self._held = text[-keep:]
                text = text[:-keep]
            self._emit(out, text)
            break
        return out

    def _emit(self, out: list[tuple[str, str]], text: str) -> None:
        if not self.inside:
            while self._trim and text[:1] == "\n":
                text = text[1:]
                self._trim -= 1
            if text:
                self._trim = 0
                out.append(("text", text))
            return
        if not self._thought:
            if not text.strip():
                self._blank += text
                return
            text, self._blank, self._thought = self._blank + text, "", True
        if text:
            out.append(("thinking", text))

    def flush(self) -> list[tuple[str, str]]:
        held, self._held = self._held, ""
        out: list[tuple[str, str]] = []
        self._emit(out, held)
        return out


def _partial_suffix(text: str, tag: str) -> int:
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-size:]):
            return size
    return 0
