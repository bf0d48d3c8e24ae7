"""Context windows: fit max_tokens into what the model has room for, and read a local server's window.

Claude Code assumes a 200k window for models it does not know, so on smaller models requests arrive that
cannot fit. relay knows the model really serving each request: it lowers max_tokens to what fits, and where
nothing fits it answers as Anthropic does ("prompt is too long: N tokens > M maximum"), which Claude Code
parses to compact and retry, instead of sending a request the upstream must refuse.
"""

from __future__ import annotations

from typing import Any

from relay.errors import RelayError
from relay.overflow import anthropic_message

MIN_OUTPUT = 1024  # below this a reply is not worth asking for: compacting is the better answer


def prompt_too_long(prompt_tokens: int, window: int) -> RelayError:
    return RelayError(400, anthropic_message(prompt_tokens, window), "invalid_request_error")


def fit_max_tokens(estimate: int, requested: int, window: int | None, max_output: int | None) -> int:
    """The max_tokens to send. Raises the Anthropic prompt-too-long error when not even the floor fits."""
    allowed = min(requested, max_output) if max_output else requested
    if window:
        floor = min(requested, MIN_OUTPUT)
        room = window - estimate
        if room < floor:
            # M is the largest prompt that still leaves room for a reply, so compaction aims low enough
            raise prompt_too_long(estimate, window - floor if estimate < window else window)
        allowed = min(allowed, room)
    return allowed


def fit_reason(estimate: int, requested: int, fitted: int, window: int | None, max_output: int | None) -> str:
    """Why ``fit_max_tokens`` lowered max_tokens, in words for the log: the output cap, the window, or both."""
    reasons = []
    if max_output and fitted == max_output < requested:
        reasons.append(f"the output cap {max_output}")
    if window and fitted == window - estimate:
        reasons.append(f"the room left in the {window}-token window beside ~{estimate} input tokens")
    return " and ".join(reasons) or "the limits"


def window_from_server(kind: str, doc: Any, model: str) -> int | None:
    """Pull the serving context size out of a local server's self-description."""
    if not isinstance(doc, dict):
        return None
    if kind == "models":  # vLLM: /v1/models data[].max_model_len; LM Studio similar fields
        for entry in doc.get("data") or []:
            if isinstance(entry, dict) and entry.get("id") in (model, None) or len(doc.get("data") or []) == 1:
                for key in ("max_model_len", "loaded_context_length", "context_length"):
                    value = entry.get(key) if isinstance(entry, dict) else None
                    if isinstance(value, int) and value > 0:
                        return value
        return None
    if kind == "props":  # llama.cpp /props: the runtime n_ctx (not the training size)
        settings = doc.get("default_generation_settings")
        for source in (settings if isinstance(settings, dict) else {}, doc):
            value = source.get("n_ctx")
            if isinstance(value, int) and value > 0:
                return value
        return None
    if kind == "lmstudio":  # LM Studio /api/v0/models/{id}
        for key in ("loaded_context_length", "max_context_length"):
            value = doc.get(key)
            if isinstance(value, int) and value > 0:
                return value
        return None
    if kind == "ollama":  # Ollama /api/show: an explicit num_ctx wins over the model's trained length
        params = doc.get("parameters")
        if isinstance(params, str):
            for line in params.splitlines():
                parts = line.split()
                if len(parts) == 2 and parts[0] == "num_ctx" and parts[1].isdigit():
                    return int(parts[1])
        info = doc.get("model_info")
        if isinstance(info, dict):
            for key, value in info.items():
                if key.endswith(".context_length") and isinstance(value, int):
                    return value
    return None
