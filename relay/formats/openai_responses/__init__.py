"""``format = "openai-responses"``: OpenAI's Responses API (``POST {base_url}/responses``), for models served only
there; ``base_url`` as for Chat Completions (``https://api.openai.com/v1``)."""

from __future__ import annotations

from relay.formats.base import Translated
from relay.formats.openai_responses import request, response
from relay.formats.openai_responses.stream import ResponsesStreamTranslator

FORMAT = Translated(request.build, lambda model, stream: "/responses", ResponsesStreamTranslator, response.translate)
