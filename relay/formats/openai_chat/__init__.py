"""``format = "openai"``: OpenAI Chat Completions (``POST {base_url}/chat/completions``), and every server that
speaks it: request out (``request.py``), response and stream back (``response.py``, ``stream.py``)."""

from __future__ import annotations

from typing import Any

from relay.formats.base import Options, Translated
from relay.formats.openai_chat import request, response
from relay.formats.openai_chat.stream import StreamTranslator


def _quirks(opts: Options) -> dict[str, Any]:
    return {"think_tags": opts.provider.think_tags, "stop_sequences": opts.stop_sequences}


FORMAT = Translated(request.build, lambda model, stream: "/chat/completions", StreamTranslator, response.translate,
                    _quirks, resumes=True)
