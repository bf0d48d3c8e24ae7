"""provider.format -> the module that speaks it. A new wire format is a new package and one line here."""

from __future__ import annotations

from typing import cast

from relay.formats import openai_chat
from relay.formats.base import Format

FORMATS: dict[str, Format] = {
    "openai": cast(Format, openai_chat),
}


def get(name: str) -> Format:
    return FORMATS[name]
