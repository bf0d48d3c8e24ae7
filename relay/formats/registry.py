"""provider.format -> the module that speaks it. A new wire format is a new package and one line here."""

from __future__ import annotations

from typing import cast

from relay.formats import anthropic_passthrough, gemini, openai_chat, openai_responses
from relay.formats.base import Format

FORMATS: dict[str, Format] = {
    "openai": openai_chat.FORMAT,
    "anthropic": cast(Format, anthropic_passthrough),  # forwards rather than translates: a module of its own
    "gemini": gemini.FORMAT,
    "openai-responses": openai_responses.FORMAT,
}


def get(name: str) -> Format:
    return FORMATS[name]
