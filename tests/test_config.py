"""Config parsing: the documented format, env expansion, and errors that name the key and line."""

from __future__ import annotations

import pytest

from relay.config import ConfigError, load, parse
from relay.routing import resolve

GOOD = """
[server]
port = 9000
api_keys = ["${RELAY_KEY}"]

[providers.deepseek]
format = "openai"
base_url = "https://api.deepseek.com/v1/"
api_key = "${DS_KEY}"
models = ["deepseek-chat", "deepseek-reasoner"]
headers = { "X-Title" = "relay" }
max_tokens_cap = 8192

[providers.local]
base_url = "http://127.0.0.1:8080/v1"
api_key = "${LOCAL_KEY:-}"

[models]
"kimi" = "deepseek/kimi-k2"

[routes]
default = "deepseek/deepseek-chat"
haiku = "local/qwen"
opus = ["deepseek/deepseek-reasoner", "local/big"]
"""
ENV = {"RELAY_KEY": "rk", "DS_KEY": "dk"}


def test_good_config_and_resolution() -> None:
    c = parse(GOOD, "relay.toml", ENV)
    assert c.server.port == 9000 and c.server.api_keys == ("rk",)
    ds = c.providers["deepseek"]
    assert ds.base_url == "https://api.deepseek.com/v1" and ds.api_key == "dk" and ds.headers == (("X-Title", "relay"),)
    assert c.providers["local"].api_keys == ()
    label = lambda m: [t.label for t in resolve(c, m)]  # noqa: E731
    assert label("kimi") == ["deepseek/kimi-k2"]
    assert label("local/anything") == ["local/anything"]
    assert label("deepseek-reasoner") == ["deepseek/deepseek-reasoner"]
    assert label("claude-3-5-haiku-20241022") == ["local/qwen"]
    assert label("claude-opus-4-1") == ["deepseek/deepseek-reasoner", "local/big"]
    assert label("claude-sonnet-4-5") == ["deepseek/deepseek-chat"]  # no sonnet route: default
    assert label("gpt-4o") == ["deepseek/deepseek-chat"]


@pytest.mark.parametrize(("mutate", "words"), [
    (lambda t: t.replace("max_tokens_cap = 8192", "max_token_cap = 8192"), "relay.toml:12: providers.deepseek.max_token_cap: unknown key"),
    (lambda t: t.replace('api_key = "${DS_KEY}"', 'api_key = "${NOPE}"'), "relay.toml:9: providers.deepseek.api_key: environment variable NOPE"),
    (lambda t: t.replace('haiku = "local/qwen"', 'haiku = "ghost/qwen"'), "relay.toml:23: routes.haiku: unknown provider 'ghost'"),
    (lambda t: t.replace("port = 9000", 'port = "x"'), "relay.toml:3: server.port: expected int"),
    (lambda t: t.replace('format = "openai"', 'format = "soap"'), "providers.deepseek.format: must be one of"),
    (lambda t: t + "\n[nonsense]\n", "nonsense: unknown section"),
    (lambda t: t.replace("[routes]", "[routes\n"), "invalid TOML"),
    (lambda t: t.replace('"kimi" = "deepseek/kimi-k2"', '"kimi" = "no-slash"'), "models.kimi: 'no-slash' is not of the form provider/model"),
])
def test_config_errors_name_key_and_line(mutate, words: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError) as info:
        parse(mutate(GOOD), "relay.toml", ENV)
    assert words in str(info.value)


def test_no_file_serves_openai_from_environment() -> None:
    c = load(None, {"OPENAI_API_KEY": "sk-x", "OPENAI_BASE_URL": "http://127.0.0.1:1/v1/"})
    (target,) = resolve(c, "gpt-4o-mini")
    assert target.model == "gpt-4o-mini" and target.provider.base_url == "http://127.0.0.1:1/v1"
    assert target.provider.api_key == "sk-x"
    assert "sk-x" not in c.source and "OPENAI_API_KEY set" in c.source


def test_the_startup_line_says_what_the_environment_is_missing() -> None:
    source = load(None, {}).source
    assert "OPENAI_API_KEY NOT SET" in source and "https://api.openai.com/v1" in source
    assert "RELAY_DEFAULT_MODEL=not set" in source
    assert "RELAY_DEFAULT_MODEL=gpt-4.1>" in load(None, {"RELAY_DEFAULT_MODEL": "gpt-4.1"}).source


def test_missing_file_is_a_clear_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError, match="cannot read config"):
        load(str(tmp_path / "absent.toml"), {})
