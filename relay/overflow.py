"""Recognise a context-window overflow in any upstream's error, and say it the way Claude Code understands.

Claude Code compacts a conversation when Anthropic answers ``prompt is too long: N tokens > M maximum`` and lowers
``max_tokens`` when it answers ``input length and `max_tokens` exceed context limit: N + K > M``. Every other provider
words the same refusal differently (and some put the numbers in JSON fields instead of the text), so without this
module a long session on a 64k model just dies on the upstream's 400. Pure: no I/O, safe to call on any error.

Classification rule for max_tokens complaints: a refusal is an overflow only when it is about the *window*, i.e. the
prompt plus the requested output does not fit (vLLM's "'max_tokens' ... is too large: K. This model's maximum context
length is M tokens and your request has N input tokens"). A cap on the output alone ("max_tokens is too large: 100000.
This model supports at most 8192 completion tokens") does not depend on the prompt, compacting cannot fix it, so it
stays an ordinary 400. Rate limits that count tokens ("tokens per minute") are never overflows.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson

# Claude Code lowers max_tokens to (M - N - 1000) and gives up below 3000 (withRetry.ts FLOOR_OUTPUT_TOKENS and its
# safety buffer), so the max_tokens wording only helps when at least this much room is left beside the prompt.
MAX_TOKENS_MIN_ROOM = 4000


@dataclass(frozen=True)
class Overflow:
    """What the upstream said about the overflow; None wherever it did not say."""

    prompt_tokens: int | None  # N: the request's input, never including the output it asked for
    window: int | None  # M: the model's context (for DashScope, its input limit)
    requested_output: int | None = None  # max_tokens the upstream says it counted against the window
    total_tokens: int | None = None  # input + output when the upstream gave only the sum (Kimi, Cerebras)
    excess: int | None = None  # tokens over the window when that is all it gave (Ollama "exceeded ... by X")

    def to_anthropic(self, estimate: int, window: int | None = None, max_tokens: int | None = None) -> str:
        """Anthropic's message for this overflow, filling what the upstream left out from relay's own figures.

        ``estimate`` is relay's count of the prompt, ``window`` the window relay knows for the model and
        ``max_tokens`` what relay sent. Where the prompt alone fits and enough room is left for Claude Code to lower
        max_tokens, the answer is the max_tokens wording (no needless compaction); otherwise prompt-too-long, with
        N kept above M because the upstream has already said the request does not fit.
        """
        limit = self.window or window
        output = self.requested_output if self.requested_output is not None else max_tokens
        if self.prompt_tokens is not None:
            prompt = self.prompt_tokens
        elif self.total_tokens is not None and output and self.total_tokens > output:
            prompt = self.total_tokens - output
        elif self.excess is not None and limit:
            prompt = limit + self.excess
        else:
            prompt = estimate
        if not limit:
            limit = max(prompt - 1, 1)  # no window known anywhere: still a figure Claude Code compacts on
        if output and prompt + output > limit and limit - prompt >= MAX_TOKENS_MIN_ROOM:
            return anthropic_max_tokens_message(prompt, output, limit)
        return anthropic_message(max(prompt, limit + 1), limit)


def anthropic_message(prompt_tokens: int, window: int) -> str:
    """Anthropic's own wording, which Claude Code parses to compact: 'prompt is too long: N tokens > M maximum'."""
    return f"prompt is too long: {prompt_tokens} tokens > {window} maximum"


def anthropic_max_tokens_message(prompt_tokens: int, max_tokens: int, window: int) -> str:
    """Anthropic's wording for a prompt that fits but leaves no room for max_tokens; Claude Code lowers max_tokens."""
    return (
        f"input length and `max_tokens` exceed context limit: {prompt_tokens} + {max_tokens} > {window}, "
        "decrease input length or `max_tokens` and try again"
    )


_N = r"(\d[\d,]*)"  # Mistral and others print 300,000
_CTX = r"maximum context length is " + _N + r" tokens"

# (pattern, group names in order). Order matters: specific wordings before the generic ones that they contain.
# Group names: n prompt, m window, k requested output, t total, x excess, p parenthesised parts to split.
_RAW: list[tuple[str, tuple[str, ...]]] = [
    # Anthropic (and relay's own answer, so a relay upstream is understood too)
    (r"prompt is too long: " + _N + r" tokens > " + _N + r" maximum", ("n", "m")),
    (r"input length and `?max_tokens`? exceed context limit: " + _N + r" \+ " + _N + r" > " + _N, ("n", "k", "m")),
    # vLLM >= 0.19: output asked and prompt counted (or only bounded below: "at least")
    (_CTX + r"\. However, you requested " + _N + r" output tokens and your prompt contains (?:at least )?" + _N
     + r" input tokens", ("m", "k", "n")),
    # vLLM's character pre-check: its big number is characters, not the prompt's token count
    (_CTX + r"\. However, you requested " + _N + r" output tokens and your prompt contains (?:at least )?[\d,]+ characters",
     ("m", "k")),
    # vLLM 0.10-0.18: prompt fits but max_tokens does not; then the prompt alone is too long
    (r"'max_tokens' or 'max_completion_tokens' is too large: " + _N + r"\. This model's " + _CTX
     + r" and your request has " + _N + r" input tokens", ("k", "m", "n")),
    (_CTX + r"\. However, your request has " + _N + r" input tokens", ("m", "n")),
    # vLLM renderers/params.py: the token check, then its character pre-check (characters again not tokens)
    (r"you passed " + _N + r" input tokens and requested " + _N + r" output tokens\. However, the model's context "
     r"length is only " + _N + r" tokens", ("n", "k", "m")),
    (r"you passed [\d,]+ input characters and requested " + _N + r" output tokens\. However, the model's context "
     r"length is only " + _N + r" tokens", ("k", "m")),
    # OpenAI, DeepSeek, old vLLM, OpenRouter: a total with its split in parentheses
    (_CTX + r"[.,] however,? you requested (?:about )?" + _N + r" tokens \(([^)]*)\)", ("m", "t", "p")),
    (_CTX + r"[.,] however,? you requested " + _N + r" tokens in the messages", ("m", "n")),
    (_CTX + r"[.,] however,? your messages resulted in (?:over )?" + _N + r" tokens", ("m", "n")),
    # Gemini, Mistral, xAI, Kimi, DashScope, Zhipu, Cerebras, Groq
    (r"input token count \(?" + _N + r"\)? exceeds the maximum number of tokens allowed \(?" + _N, ("n", "m")),
    (r"prompt contains " + _N + r" tokens.*?too large for model with " + _N + r" maximum context length", ("n", "m")),
    (r"maximum prompt length is " + _N + r" but the request contains " + _N + r" tokens", ("m", "n")),
    (r"exceeded model token limit: " + _N + r" \(requested: " + _N + r"\)", ("m", "t")),
    (r"range of input length should be \[\d+, ?" + _N + r"\]", ("m",)),
    (r"request " + _N + r" input tokens exceeds the model's maximum context length " + _N, ("n", "m")),
    (r"prompt exceeds max length", ()),
    (r"current length is " + _N + r" while limit is " + _N, ("t", "m")),
    (r"reduce the length of the messages", ()),
    # llama.cpp (also relayed by Ollama), LM Studio, Ollama
    (r"request \(" + _N + r" tokens\) exceeds the available context size \(" + _N + r" tokens\)", ("n", "m")),
    (r"exceeds the available context size", ()),
    # llama-cpp-python's own words (its server rewords them as OpenAI's for non-streamed requests only):
    # https://github.com/fedora-copr/logdetective-website/pull/193, https://github.com/rllm-team/rllm/issues/55
    (r"requested tokens \(" + _N + r"\) exceed context window of " + _N, ("n", "m")),
    (r"tokens to keep from the initial prompt is greater than the context length \(n_keep: " + _N + r"\s*>= ?n_ctx: " + _N,
     ("n", "m")),
    (r"tokens to keep from the initial prompt is greater than the context length", ()),
    (r"trying to keep the first " + _N + r" tokens when context the overflows\. however, the model is loaded with "
     r"context length of only " + _N, ("n", "m")),
    (r"cannot truncate prompt with n_keep \(" + _N + r"\) >= n_ctx \(" + _N + r"\)", ("n", "m")),
    (r"input length " + _N + r" exceeds context length " + _N, ("n", "m")),
    (r"prompt too long; exceeded (?:max )?context length by " + _N + r" tokens", ("x",)),
    (r"prompt too long; exceeded (?:max )?context length", ()),
    (r"the input length exceeds the context length", ()),
    # Together, GitHub Copilot, oMLX
    (r"the input \(" + _N + r" tokens\) is longer than the model's context length \(" + _N + r" tokens\)", ("n", "m")),
    (r"prompt token count of " + _N + r" exceeds the limit of " + _N, ("n", "m")),
    (r"prompt too long: " + _N + r" tokens exceeds max context window of " + _N, ("n", "m")),
    # OpenAI Responses/newer models, MiniMax, z.ai, and the bare codes seen in text
    (r"exceeds the context window", ()),
    (r"context window exceeds limit", ()),
    (r"model_context_window_exceeded|context_length_exceeded", ()),
]
_WORDINGS = [(re.compile(p, re.IGNORECASE | re.DOTALL), names) for p, names in _RAW]

# Throttling that mentions tokens ("tokens per minute", Bedrock's "Too many tokens, please wait") is not about the window.
_NOT_OVERFLOW = re.compile(r"rate.?limit|tokens per min|\bTPM\b|too many requests|throttl|please wait|quota", re.IGNORECASE)

# Error codes/types that name an overflow without words: OpenAI/Groq, GitHub Copilot, llama.cpp, Zhipu.
_OVERFLOW_CODES = {"context_length_exceeded", "model_max_prompt_tokens_exceeded", "exceed_context_size_error", "1261"}

_OUTPUT_PART = re.compile(r"completion|output", re.IGNORECASE)
_PART = re.compile(_N + r"\s+(?:in|of|for)\s+(.*)", re.IGNORECASE)


def number(text: str) -> int:
    return int(text.replace(",", ""))


def _split(parts: str, total: int) -> dict[str, int]:
    """'60000 in the messages, 10000 in the completion' -> prompt 60000, output 10000 (functions/tools count as prompt)."""
    prompt = output = 0
    seen_prompt = seen_output = False
    for piece in re.split(r"[,;]|\band\b", parts):
        m = _PART.search(piece.strip())
        if not m:
            continue
        if _OUTPUT_PART.search(m.group(2)):
            output, seen_output = output + number(m.group(1)), True
        else:
            prompt, seen_prompt = prompt + number(m.group(1)), True
    if seen_prompt:
        return {"n": prompt, "k": output} if seen_output else {"n": prompt}
    return {"t": total, "k": output} if seen_output else {"t": total}


def _from_text(text: str) -> dict[str, int] | None:
    for pattern, names in _WORDINGS:
        m = pattern.search(text)
        if not m:
            continue
        found = dict(zip(names, m.groups()))
        parts = found.pop("p", None)
        numbers = {k: number(v) for k, v in found.items()}
        if parts is not None:
            numbers = _split(parts, numbers["t"]) | {"m": numbers["m"]}
        return numbers
    return None


def nodes(doc: Any, depth: int = 0) -> list[dict[str, Any]]:
    """Every object in an error body, including JSON carried as a string (OpenRouter metadata.raw, Ollama's
    ``{"error": "<llama.cpp error JSON>"}``)."""
    if depth > 6:
        return []
    if isinstance(doc, str):
        text = doc.strip()
        if text[:1] in ("{", "["):
            try:
                return nodes(orjson.loads(text), depth + 1)
            except orjson.JSONDecodeError:
                return []
        return []
    if isinstance(doc, list):
        return [node for item in doc for node in nodes(item, depth + 1)]
    if isinstance(doc, dict):
        return [doc] + [node for value in doc.values() for node in nodes(value, depth + 1)]
    return []


def detect(message: str, body: Any = None) -> Overflow | None:
    """Recognise a context-window overflow in an upstream error: `message` is the human message relay extracted,
    `body` the parsed JSON error body when there was one (some providers put numbers in fields, e.g. llama.cpp's
    n_prompt_tokens / n_ctx, or OpenAI's code "context_length_exceeded")."""
    doc_nodes = nodes(body)
    texts = [message] + [v for node in doc_nodes for k in ("message", "error", "detail") if isinstance(v := node.get(k), str)]
    if any(_NOT_OVERFLOW.search(t) for t in texts):
        return None
    numbers = next((found for t in texts if (found := _from_text(t)) is not None), None)
    coded = any(str(node.get(key)) in _OVERFLOW_CODES for node in doc_nodes for key in ("code", "type"))
    if numbers is None and not coded:
        return None
    numbers = dict(numbers or {})
    for node in doc_nodes:  # llama.cpp (and Ollama relaying it) put the figures in fields
        for field, name in (("n_prompt_tokens", "n"), ("n_ctx", "m")):
            value = node.get(field)
            if isinstance(value, int) and not isinstance(value, bool) and name not in numbers:
                numbers[name] = value
    return Overflow(
        prompt_tokens=numbers.get("n"),
        window=numbers.get("m"),
        requested_output=numbers.get("k"),
        total_tokens=numbers.get("t"),
        excess=numbers.get("x"),
    )
