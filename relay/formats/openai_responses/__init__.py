"""``format = "openai-responses"``: OpenAI's Responses API (``POST {base_url}/responses``), for models served only
there; ``base_url`` as for Chat Completions (``https://api.openai.com/v1``)."""

from __future__ import annotations

from typing import Any

import orjson

from relay.config import Provider
from relay.formats.base import ClientRequest, Options, UpstreamCall
from relay.formats.openai_responses import request, response
from relay.formats.openai_responses.stream import ResponsesStreamTranslator


def build(req: dict[str, Any], provider: Provider, model: str, stream: bool,
          client: ClientRequest | None = None) -> UpstreamCall:
    body, dropped = request.build(req, provider, model, stream)
    return UpstreamCall("/responses", orjson.dumps(body), dropped=dropped)


def stream_translator(opts: Options) -> ResponsesStreamTranslator:
    p = opts.provider
    return ResponsesStreamTranslator(opts.model, input_tokens_hint=opts.input_tokens_hint, secrets=p.api_keys,
                                     provider=p.name, on_error=opts.overflow)


def translate_response(doc: Any, opts: Options) -> dict[str, Any]:
    p = opts.provider
    return response.translate(doc, opts.model, secrets=p.api_keys, provider=p.name)
