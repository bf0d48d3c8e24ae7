"""JSON Schema -> the OpenAPI subset Gemini's ``functionDeclarations[].parameters`` accepts.

Gemini answers 400 for a keyword it does not know (``$schema``, ``additionalProperties``, ``const``,
``exclusiveMinimum``, ``propertyNames``, ``$ref``, ...), for a list-valued ``type`` ("Proto field is not
repeating"), for ``properties``/``required`` on a non-object, for an empty ``properties`` on an object and for a
``format`` it does not support. So the schema is rebuilt from an allow-list, and what JSON Schema can say in
another way is said that way: ``$ref`` inlined, ``allOf`` merged, ``oneOf`` as ``anyOf``, ``["x","null"]`` and
``anyOf [.., {"type":"null"}]`` as ``nullable``, ``const`` as a one-value ``enum``, exclusive bounds as bounds.
Sources: ai.google.dev/api/caching#Schema, and the 400s quoted in README (Presets -> gemini).
"""

from __future__ import annotations

from typing import Any

KEPT = ("title", "description", "nullable", "default", "example", "pattern", "minLength", "maxLength",
        "minItems", "maxItems", "minProperties", "maxProperties", "minimum", "maximum", "propertyOrdering")
TYPES = ("string", "number", "integer", "boolean", "array", "object")
FORMATS = {"string": ("enum", "date-time"), "number": ("float", "double"), "integer": ("int32", "int64")}
MAX_DEPTH = 16  # $ref chains and nesting past this become an untyped value rather than recursing forever


def parameters(schema: dict[str, Any]) -> dict[str, Any] | None:
    """A tool's ``input_schema`` as Gemini ``parameters``; None for a tool without parameters (Gemini refuses
    an object schema with empty ``properties``)."""
    cleaned = _clean(schema, schema, 0)
    if not cleaned.get("properties"):
        return None
    cleaned["type"] = "object"
    return cleaned


def response_schema(wanted: dict[str, Any]) -> dict[str, Any] | None:
    """A structured-output schema as Gemini's ``responseSchema``; None when nothing of it survives the subset
    (the answer is then only JSON mode)."""
    cleaned = _clean(wanted, wanted, 0)
    if not cleaned or (cleaned.get("type") == "object" and not cleaned.get("properties")):
        return None
    return cleaned


def _resolve(ref: str, root: dict[str, Any]) -> Any:
    if not ref.startswith("#/"):
        return None
    node: Any = root
    for key in ref[2:].split("/"):
        key = key.replace("~1", "/").replace("~0", "~")
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _clean(node: Any, root: dict[str, Any], depth: int) -> dict[str, Any]:
    if not isinstance(node, dict) or depth > MAX_DEPTH:
        return {}
    if isinstance(node.get("$ref"), str):
        target = _resolve(node["$ref"], root)
        rest = {k: v for k, v in node.items() if k != "$ref"}
        node = {**target, **rest} if isinstance(target, dict) else rest
        depth += 1
    out: dict[str, Any] = {}
    nullable = False

    for part in node.get("allOf") or ():
        _merge(out, _clean(part, root, depth + 1))

    kind = node.get("type")
    if isinstance(kind, list):
        nullable = "null" in kind
        kinds = [k for k in kind if k in TYPES]
        if len(kinds) == 1:
            out["type"] = kinds[0]
        elif kinds:
            out["anyOf"] = [{"type": k} for k in kinds]
    elif kind == "null":
        nullable = True
    elif kind in TYPES:
        out["type"] = kind

    options = node.get("anyOf") or node.get("oneOf")
    if isinstance(options, list):
        cleaned = []
        for option in options:
            if isinstance(option, dict) and option.get("type") == "null":
                nullable = True
            elif (c := _clean(option, root, depth + 1)):
                cleaned.append(c)
        if len(cleaned) == 1 and "anyOf" not in out:
            _merge(out, cleaned[0])
        elif cleaned:
            out["anyOf"] = cleaned

    for key in KEPT:
        if key in node and key not in out:
            out[key] = node[key]
    if "exclusiveMinimum" in node and isinstance(node["exclusiveMinimum"], (int, float)) and "minimum" not in out:
        out["minimum"] = node["exclusiveMinimum"]
    if "exclusiveMaximum" in node and isinstance(node["exclusiveMaximum"], (int, float)) and "maximum" not in out:
        out["maximum"] = node["exclusiveMaximum"]

    enum = [node["const"]] if "const" in node else node.get("enum")
    if isinstance(enum, list) and enum and all(isinstance(v, str) for v in enum):
        out["enum"] = enum
        out.setdefault("type", "string")

    props = node.get("properties")
    if isinstance(props, dict):
        cleaned_props = {str(k): _clean(v, root, depth + 1) for k, v in props.items()}
        if cleaned_props:
            out["properties"] = {**out.get("properties", {}), **cleaned_props}
    if "properties" in out:
        out.setdefault("type", "object")
    required = node.get("required")
    if isinstance(required, list):
        names = out.get("properties", {})
        wanted = list(dict.fromkeys([*out.get("required", []), *(r for r in required if isinstance(r, str))]))
        out["required"] = [r for r in wanted if r in names]

    items = node.get("items")
    if isinstance(items, list):  # tuple form: Gemini has no tuples; the first item's schema describes them
        items = items[0] if items else None
    if isinstance(items, dict):
        out["items"] = _clean(items, root, depth + 1)
        out.setdefault("type", "array")

    if isinstance(node.get("format"), str) and node["format"] in FORMATS.get(out.get("type", ""), ()):
        out["format"] = node["format"]
    if nullable:
        out["nullable"] = True
    return _fit_type(out)


def _merge(into: dict[str, Any], other: dict[str, Any]) -> None:
    for key, value in other.items():
        if key == "properties" and isinstance(into.get("properties"), dict):
            into["properties"] = {**into["properties"], **value}
        elif key == "required" and isinstance(into.get("required"), list):
            into["required"] = list(dict.fromkeys([*into["required"], *value]))
        else:
            into.setdefault(key, value)


def _fit_type(out: dict[str, Any]) -> dict[str, Any]:
    """Keywords only the matching type may carry: Gemini refuses them elsewhere."""
    kind = out.get("type")
    if kind != "object":
        out.pop("properties", None)
        out.pop("required", None)
        out.pop("propertyOrdering", None)
    if kind != "array":
        out.pop("items", None)
    if not out.get("properties"):
        out.pop("properties", None)
        out.pop("propertyOrdering", None)
    if not out.get("required"):
        out.pop("required", None)
    if "enum" in out and kind not in ("string", None):
        out.pop("enum")
    return out
