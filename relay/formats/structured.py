"""Structured output for the two OpenAI APIs: the client's JSON schema as a ``json_schema`` response format
(Chat Completions wraps it in ``response_format``, Responses puts it in ``text.format``).

``structured_output = "strict"`` (OpenAI itself) sends ``strict: true``, which OpenAI accepts only for schemas in
its strict subset: every object closed (``additionalProperties: false``) and every property required. The schema
is narrowed to that, never widened: a property the client left optional becomes required (not nullable, which
would let through a ``null`` the client's schema forbids), so every answer the strict schema allows is valid
under the client's own schema. A schema that cannot be narrowed so (a free-form object, a root that is not an
object) goes with ``strict: false`` instead. ``"json_schema"`` (the default: vLLM, llama.cpp, Ollama, LM Studio,
Groq, Mistral, ...) sends the schema as written, without ``strict``.
"""

from __future__ import annotations

import copy
import re
from typing import Any

from relay.config import Provider

_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_SUBSCHEMA_LISTS = ("anyOf", "allOf", "prefixItems")
_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions")


def json_schema_format(schema: dict[str, Any], provider: Provider) -> dict[str, Any]:
    """``{"name", "schema"[, "strict"]}``: the body of OpenAI's ``json_schema`` format."""
    title = schema.get("title")
    out: dict[str, Any] = {"name": title if isinstance(title, str) and _NAME.fullmatch(title) else "output"}
    if provider.structured_output == "strict":
        narrowed = strict_schema(schema)
        out["schema"] = narrowed if narrowed is not None else schema
        out["strict"] = narrowed is not None
    else:
        out["schema"] = schema
    return out


def strict_schema(schema: dict[str, Any]) -> dict[str, Any] | None:
    """``schema`` narrowed to OpenAI's strict subset, or None when it cannot be without changing what it means."""
    if schema.get("type") != "object":
        return None
    out = copy.deepcopy(schema)
    return out if _narrow(out, 0) else None


def _narrow(node: Any, depth: int) -> bool:
    if not isinstance(node, dict):
        return True
    if depth > 64:
        return False
    if "oneOf" in node and "anyOf" not in node:  # strict mode knows anyOf; for answers, oneOf reads the same
        node["anyOf"] = node.pop("oneOf")
    is_object = node.get("type") == "object" or "properties" in node
    if is_object:
        extra = node.get("additionalProperties", False)
        props = node.get("properties")
        if extra is not False or not isinstance(props, dict):
            return False  # a free-form object: strict mode cannot say "any keys"
        node["additionalProperties"] = False
        node["required"] = list(props)
    for key in _SUBSCHEMA_MAPS:
        children = node.get(key)
        if isinstance(children, dict) and not all(_narrow(c, depth + 1) for c in children.values()):
            return False
    for key in _SUBSCHEMA_LISTS:
        children = node.get(key)
        if isinstance(children, list) and not all(_narrow(c, depth + 1) for c in children):
            return False
    items = node.get("items")
    return _narrow(items, depth + 1) if isinstance(items, dict) else True
