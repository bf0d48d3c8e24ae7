"""OpenAI Chat Completions: request out, response and stream back."""

from __future__ import annotations

from typing import Any

import orjson

from relay.config import Provider
from relay.formats.base import ClientRequest, Options, UpstreamCall
from relay.formats.openai_chat import request, response
from relay.formats.openai_chat.stream import StreamTranslator


def build(req: dict[str, Any], provider: Provider, model: str, stream: bool,
          client: ClientRequest | None = None) -> UpstreamCall:
    body, dropped = request.build(req, provider, model, stream)
    return UpstreamCall("/chat/completions", orjson.dumps(body), dropped=dropped)


def stream_translator(opts: Options) -> StreamTranslator:
    p = opts.provider
    return StreamTranslator(opts.model, input_tokens_hint=opts.input_tokens_hint, think_tags=p.think_tags,
                            stop_sequences=opts.stop_sequences, secrets=p.api_keys, provider=p.name,
                            on_error=opts.overflow)


def translate_response(doc: Any, opts: Options) -> dict[str, Any]:
    p = opts.provider
    return response.translate(doc, opts.model, think_tags=p.think_tags, stop_sequences=opts.stop_sequences,
                              secrets=p.api_keys, provider=p.name)
