"""The README's configuration examples are the public contract: every TOML block in it must load."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from relay.config import parse

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
BLOCKS = re.findall(r"```toml\n(.*?)```", README, re.S)
ENV = {name: f"x-{name}" for name in set(re.findall(r"\$\{([A-Z_0-9]+)", README))}  # distinct, as real keys are


def test_readme_has_config_examples() -> None:
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("block", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_toml_block_loads(block: str) -> None:
    text = block
    if "[providers." not in text:  # a fragment (routes, keys): give it the providers it names
        names = set(re.findall(r'"([a-z][a-z0-9-]*)/', text))
        text = "".join(f'[providers.{n}]\nbase_url = "http://127.0.0.1:1/v1"\n' for n in sorted(names)) + text
    parse(text, "README.md", ENV)
