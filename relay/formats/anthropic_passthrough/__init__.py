"""``format = "anthropic"``: upstreams that already speak the Anthropic Messages API (Anthropic itself, and the
``/anthropic`` endpoints of Moonshot, DeepSeek, DashScope, Zhipu, MiniMax).

Nothing is translated. The request body goes upstream as the client sent it with only the model name
re-targeted; the stream comes back byte for byte, parsed only for usage and to put the client's model name in
``message_start``. ``base_url`` is what the provider documents as ``ANTHROPIC_BASE_URL`` (no ``/v1``): relay
appends ``/v1/messages``, as Claude Code does.
"""

from __future__ import annotations

from typing import Any

from relay.config import Provider
from relay.formats.anthropic_passthrough.request import COUNT_PATH, MESSAGES_PATH, forwarded_headers, retarget
from relay.formats.anthropic_passthrough.response import translate
from relay.formats.anthropic_passthrough.stream import PassthroughTranslator
from relay.formats.base import ClientRequest, Options, UpstreamCall


def build(req: dict[str, Any], provider: Provider, model: str, stream: bool,
          client: ClientRequest | None = None) -> UpstreamCall:
    return UpstreamCall(MESSAGES_PATH, retarget(req, provider, model, client), forwarded_headers(client))


def count_tokens(req: dict[str, Any], provider: Provider, model: str, client: ClientRequest | None = None) -> UpstreamCall:
    """``POST /v1/messages/count_tokens`` forwarded to the upstream's own counter."""
    return UpstreamCall(COUNT_PATH, retarget(req, provider, model, client), forwarded_headers(client))


def stream_translator(opts: Options) -> PassthroughTranslator:
    p = opts.provider
    return PassthroughTranslator(opts.model, secrets=p.api_keys, provider=p.name, on_error=opts.overflow,
                                 input_tokens_hint=opts.input_tokens_hint)


def translate_response(doc: Any, opts: Options) -> dict[str, Any]:
    return translate(doc, opts.model, secrets=opts.provider.api_keys, provider=opts.provider.name)
