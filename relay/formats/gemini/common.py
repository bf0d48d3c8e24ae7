"""Pieces shared by the Gemini request, response and stream translators: finish reasons, usage, tool ids and
the way thought signatures ride in thinking blocks.

Thought signatures. Gemini 2.5/3 put an opaque ``thoughtSignature`` on a response part (the first
``functionCall`` of a step, or a text part) and Gemini 3 answers 400 when a function call in the current turn
comes back without its signature. Claude Code keeps thinking blocks and their ``signature`` verbatim and sends
them back on the next request, so each signature travels in a thinking block: the block of the thought summary
just before the part when there is one, else an empty thinking block of its own. The signature field says
where the signature goes back: ``relay-gemini:n:<sig>`` onto the next part (a function call: the block is
written before it), ``relay-gemini:p:<sig>`` onto the part before it (text: the block is written after it,
because the signature arrives with, or after, the text). Tool ids were the other carrier considered: they are
echoed back too, but a signature is kilobytes, and ids are repeated in every tool_result and log line.
A function call that comes back with no signature at all (the conversation started on another model, or the
client dropped it) gets Google's documented placeholder ``skip_thought_signature_validator``.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

SIGNATURE_PREFIX = "relay-gemini:"
NEXT, PREVIOUS = "n", "p"
PLACEHOLDER_SIGNATURE = "skip_thought_signature_validator"
CALL_ID_PREFIX = "toolu_gc_"  # the upstream's own functionCall.id, kept so it can be sent back
_ID_SAFE = re.compile(r"[A-Za-z0-9_-]+")

FINISH = {
    "STOP": "end_turn",
    "MAX_TOKENS": "max_tokens",
    "SAFETY": "refusal",
    "RECITATION": "refusal",
    "BLOCKLIST": "refusal",
    "PROHIBITED_CONTENT": "refusal",
    "SPII": "refusal",
    "IMAGE_SAFETY": "refusal",
    "IMAGE_PROHIBITED_CONTENT": "refusal",
    "IMAGE_RECITATION": "refusal",
    "LANGUAGE": "refusal",
}


def stop_reason(finish: str | None, saw_tool: bool, blocked: bool = False) -> str:
    """Gemini finishes with STOP after function calls too; any call means tool_use. Everything Gemini stops
    for a policy reason is a refusal; the rest (OTHER, MALFORMED_FUNCTION_CALL, ...) ends the turn."""
    if blocked:
        return "refusal"
    reason = FINISH.get(finish or "STOP", "end_turn")
    if saw_tool and reason == "end_turn":
        return "tool_use"
    return reason


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def usage_numbers(meta: Any) -> tuple[int, int, int]:
    """(input not read from cache, output including thoughts, cache read) from ``usageMetadata``.
    Gemini counts thoughts apart from ``candidatesTokenCount``; both are output the client pays for."""
    if not isinstance(meta, dict):
        return 0, 0, 0
    prompt = _int(meta.get("promptTokenCount")) + _int(meta.get("toolUsePromptTokenCount"))
    cached = min(_int(meta.get("cachedContentTokenCount")), prompt)
    output = _int(meta.get("candidatesTokenCount")) + _int(meta.get("thoughtsTokenCount"))
    return prompt - cached, output, cached


def tool_id(call: dict[str, Any], response_id: str, number: int) -> str:
    """The upstream's call id when it has one (kept, to be sent back); else an id derived from the response id
    and the call's position, so the same response always yields the same ids."""
    own = call.get("id")
    if isinstance(own, str) and own and _ID_SAFE.fullmatch(own):
        return CALL_ID_PREFIX + own
    digest = hashlib.blake2b(f"{response_id}:{number}".encode(), digest_size=12).hexdigest()
    return "toolu_01" + digest


def upstream_call_id(tool_use_id: str) -> str | None:
    return tool_use_id[len(CALL_ID_PREFIX):] if tool_use_id.startswith(CALL_ID_PREFIX) else None


def encode_signature(signature: str, where: str) -> str:
    return f"{SIGNATURE_PREFIX}{where}:{signature}"


def decode_signature(value: Any) -> tuple[str, str] | None:
    """(where, signature) from a thinking block's signature that relay wrote for Gemini, else None."""
    if not isinstance(value, str) or not value.startswith(SIGNATURE_PREFIX):
        return None
    where, sep, signature = value[len(SIGNATURE_PREFIX):].partition(":")
    if not sep or where not in (NEXT, PREVIOUS) or not signature:
        return None
    return where, signature


def part_ops(parts: Any, response_id: str, first_call: int) -> list[tuple[Any, ...]]:
    """A candidate's parts as the operations both translators apply, in order:
    ("thinking", text, signature|None), ("text", text), ("signature", encoded, may_join_open_thinking),
    ("call", id, name, args). Signatures are already encoded for the way back."""
    ops: list[tuple[Any, ...]] = []
    if not isinstance(parts, list):
        return ops
    number = first_call
    for part in parts:
        if not isinstance(part, dict):
            continue
        signature = part.get("thoughtSignature")
        signature = signature if isinstance(signature, str) and signature else None
        text = part.get("text")
        call = part.get("functionCall")
        if isinstance(call, dict):
            if signature:
                ops.append(("signature", encode_signature(signature, NEXT), True))
            args = call.get("args")
            ops.append(("call", tool_id(call, response_id, number), str(call.get("name") or ""),
                        args if isinstance(args, dict) else {}))
            number += 1
        elif part.get("thought") is True:
            ops.append(("thinking", text if isinstance(text, str) else "",
                        encode_signature(signature, NEXT) if signature else None))
        elif isinstance(text, str):
            if text:
                ops.append(("text", text))
            if signature:
                ops.append(("signature", encode_signature(signature, PREVIOUS), False))
        elif signature:
            ops.append(("signature", encode_signature(signature, PREVIOUS), False))
    return ops


def blocked(doc: dict[str, Any]) -> bool:
    """The prompt itself was refused (``promptFeedback.blockReason``, no candidates)."""
    feedback = doc.get("promptFeedback")
    return isinstance(feedback, dict) and bool(feedback.get("blockReason")) and not doc.get("candidates")
