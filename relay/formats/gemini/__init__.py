"""``format = "gemini"``: Google's native Gemini API (``generateContent`` / ``streamGenerateContent?alt=sse``),
``base_url`` = ``https://generativelanguage.googleapis.com/v1beta``, key in ``x-goog-api-key``."""

from __future__ import annotations

from relay.formats.base import Translated
from relay.formats.gemini import request, response
from relay.formats.gemini.stream import GeminiStreamTranslator

FORMAT = Translated(request.build, request.path, GeminiStreamTranslator, response.translate)
