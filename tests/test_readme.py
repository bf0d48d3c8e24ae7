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


def test_the_redis_extra_is_documented_as_this_checkout_installs_it() -> None:
    """`pip install 'relay[redis]'` would fetch another project of that name: the README says how to get the extra
    from this checkout, the container image installs it, and README and pyproject agree on how coredis runs."""
    import tomllib

    root = Path(__file__).resolve().parent.parent
    pyproject_text = (root / "pyproject.toml").read_text()
    extras = tomllib.loads(pyproject_text)["project"]["optional-dependencies"]
    assert any(dep.startswith("coredis") for dep in extras["redis"])
    # what `make install` installs (README: "`make install` already has it")
    installed = re.search(r"^\$\(STAMP\):.*?pip install -q -e '\.\[([a-z,-]+)\]'", (root / "Makefile").read_text(),
                          re.S | re.M)
    assert installed is not None
    assert any(dep.startswith("coredis") for extra in installed.group(1).split(",") for dep in extras[extra])
    assert "relay[redis]" not in README and "pip install '.[redis]'" in README
    (container,) = re.findall(r"```dockerfile\n(.*?)```", README, re.S)
    assert "RUN pip install --no-cache-dir '.[redis]'" in container
    assert "runs on trio through anyio" in README and "runs on trio through anyio" in pyproject_text
    assert "trio itself" not in README
