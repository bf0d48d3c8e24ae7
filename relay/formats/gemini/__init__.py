"""``format = "gemini"``: Google's native Gemini API (``generateContent`` / ``streamGenerateContent?alt=sse``),
``base_url`` = ``https://generativelanguage.googleapis.com/v1beta``, key in ``x-goog-api-key``."""

from __future__ import annotations

from typing import Any

import orjson

from relay.config import Provider
from relay.formats.base import ClientRequest, Options, UpstreamCall
from relay.formats.gemini import request, response
from relay.formats.gemini.stream import GeminiStreamTranslator


def build(req: dict[str, Any], provider: Provider, model: str, stream: bool,
          client: ClientRequest | None = None) -> UpstreamCall:
    body, dropped = request.build(req, provider, model, stream)
    return UpstreamCall(request.path(model, stream), orjson.dumps(body), dropped=dropped)


def stream_translator(opts: Options) -> GeminiStreamTranslator:
    p = opts.provider
    return GeminiStreamTranslator(opts.model, input_tokens_hint=opts.input_tokens_hint, secrets=p.api_keys,
                                  provider=p.name, on_error=opts.overflow)


def translate_response(doc: Any, opts: Options) -> dict[str, Any]:
    p = opts.provider
    return response.translate(doc, opts.model, secrets=p.api_keys, provider=p.name)
