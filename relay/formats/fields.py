"""Every top-level field of an Anthropic Messages request, and what each translated upstream format does with it:
the one place that says so (the README's "Top-level request fields" table is checked against it).

A field is *mapped* (the format's ``build`` translates it; some only where the provider supports it, and there
the build drops it with a debug line, or refuses the request with a 400 ``invalid_request_error`` naming the field
when answering without it would mislead the client: structured output), or *dropped* (no equivalent upstream:
left out on purpose and named in the ``dropped on purpose`` debug line). Fields not in the table are dropped the
same way. The ``anthropic`` format forwards the body untouched,
so it needs no column. The list follows the current Messages API reference (the anthropic SDK's
``messages.create`` parameters) plus the beta fields Claude Code and older SDKs send.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

MAPPED, DROPPED = "mapped", "dropped"
TRANSLATED = ("openai", "gemini", "openai-responses")  # the formats that translate (columns of the table)


@dataclass(frozen=True)
class Fate:
    openai: str
    gemini: str
    responses: str
    note: str  # what becomes of the field (README row), or why it is dropped (debug line)

    def of(self, fmt: str) -> str:
        return (self.openai, self.gemini, self.responses)[TRANSLATED.index(fmt)]


def _all(fate: str, note: str) -> Fate:
    return Fate(fate, fate, fate, note)


FIELDS: dict[str, Fate] = {
    "model": _all(MAPPED, "routed (see Model resolution); the target's model name goes upstream"),
    "messages": _all(MAPPED, "translated turn by turn (tables below)"),
    "system": _all(MAPPED, "system message / systemInstruction / instructions"),
    "max_tokens": _all(MAPPED, "max_tokens (or max_completion_tokens) / maxOutputTokens / max_output_tokens, "
                               "clamped to max_tokens_cap and fitted to the window"),
    "stream": _all(MAPPED, "stream (+ include_usage) / streamGenerateContent / stream"),
    "stop_sequences": Fate(MAPPED, MAPPED, DROPPED, "stop / stopSequences; the Responses API has none"),
    "temperature": _all(MAPPED, "temperature"),
    "top_p": _all(MAPPED, "top_p / topP"),
    "top_k": Fate(MAPPED, MAPPED, DROPPED, "OpenAI Chat: only with pass_top_k (else dropped); topK; the Responses "
                                           "API has none"),
    "tools": _all(MAPPED, "function tools (server tools dropped with a warning)"),
    "tool_choice": _all(MAPPED, "tool_choice / functionCallingConfig / tool_choice"),
    "thinking": _all(MAPPED, "per reasoning_control (dropped where it is none); display (Claude Code 2.1.332 sends "
                             "omitted) is not applied: reasoning text comes back as the upstream sends it, since "
                             "reasoning_return sends it upstream again"),
    "output_config": _all(MAPPED, "effort per reasoning_control; format (structured output) -> response_format / "
                                  "responseSchema / text.format, refused where structured_output = none"),
    "output_format": _all(MAPPED, "the older (beta) spelling of output_config.format: the same"),
    "metadata": Fate(MAPPED, DROPPED, MAPPED, "user_id's session_id -> prompt_cache_key with prompt_cache_key = true "
                                              "(never as user); otherwise dropped"),
    "cache_control": _all(DROPPED, "Anthropic cache breakpoints; upstream prefix caches work on their own"),
    "container": _all(DROPPED, "Anthropic code-execution containers"),
    "context_management": _all(DROPPED, "Anthropic server-side context edits; thinking history is not sent anyway"),
    "compaction": _all(DROPPED, "Anthropic server-side compaction"),
    "diagnostics": _all(DROPPED, "Anthropic cache diagnostics"),
    "inference_geo": _all(DROPPED, "Anthropic inference region"),
    "mcp_servers": _all(DROPPED, "Anthropic's MCP connector: the upstream cannot reach those servers"),
    "service_tier": _all(DROPPED, "Anthropic capacity tier"),
    "speed": _all(DROPPED, "Anthropic fast mode"),
    "fallbacks": _all(DROPPED, "Anthropic server-side fallback (relay's own is [routes] lists)"),
    "fallback_credit_token": _all(DROPPED, "Anthropic server-side fallback"),
    "billing_policy": _all(DROPPED, "Anthropic billing"),
    "thread": _all(DROPPED, "Anthropic threads"),
    "user_profile_id": _all(DROPPED, "Anthropic attribution (the SDK sends it as a header)"),
    "workspace_id": _all(DROPPED, "Anthropic workspace (the SDK sends it as a header)"),
    "betas": _all(DROPPED, "anthropic-beta (a header; never forwarded to a translated upstream)"),
}
UNKNOWN = "not a Messages API field relay knows"


# per format, the table's dropped fields: ``audit`` runs on every request (one set lookup per field)
_DROPPED_BY = {fmt: frozenset(key for key, fate in FIELDS.items() if fate.of(fmt) == DROPPED) for fmt in TRANSLATED}


def audit(req: dict[str, Any], fmt: str, dropped: set[str]) -> None:
    """Name every top-level field ``fmt`` leaves out (and unknown ones) in ``dropped``, for the debug line."""
    left_out = _DROPPED_BY[fmt]
    for key, value in req.items():
        if key in left_out:
            if value is not None:
                dropped.add(key)  # the why is the table's note (and the README's row)
        elif key not in FIELDS:
            dropped.add(f"{key} ({UNKNOWN})")
