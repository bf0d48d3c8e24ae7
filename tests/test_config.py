"""Config parsing: the documented format, env expansion, and errors that name the key and line."""

from __future__ import annotations

import pytest

from relay.config import ConfigError, load, parse
from relay.errors import RelayError
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


def test_no_default_means_404() -> None:
    c = parse(GOOD.replace('default = "deepseek/deepseek-chat"', ""), "relay.toml", ENV)
    with pytest.raises(RelayError) as info:
        resolve(c, "gpt-4o")
    assert info.value.status == 404 and "gpt-4o" in info.value.message


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


SCENARIOS = GOOD.replace('opus = ["deepseek/deepseek-reasoner", "local/big"]', """opus = ["deepseek/deepseek-reasoner", "local/big"]
background = "local/tiny"
think = "deepseek/deepseek-reasoner"
long_context = "local/long"
web_search = "local/searcher"
long_context_threshold = 1000""")


@pytest.mark.parametrize(("model", "req", "estimate", "expect"), [
    ("claude-sonnet-4-5", {}, 5000, "local/long"),
    ("claude-sonnet-4-5", {"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, 10, "local/searcher"),
    ("claude-3-5-haiku-20241022", {"thinking": {"type": "enabled", "budget_tokens": 1024}}, 10, "local/tiny"),
    ("claude-sonnet-4-5", {"thinking": {"type": "adaptive"}}, 10, "deepseek/deepseek-reasoner"),
    ("claude-sonnet-4-5", {"thinking": {"type": "disabled"}}, 10, "deepseek/deepseek-chat"),
    ("deepseek-chat", {"thinking": {"type": "adaptive"}}, 5000, "deepseek/deepseek-chat"),  # explicit ids win
    ("local/x", {}, 5000, "local/x"),
])
def test_scenario_routes(model: str, req: dict, estimate: int, expect: str) -> None:  # type: ignore[type-arg]
    c = parse(SCENARIOS, "relay.toml", ENV)
    assert resolve(c, model, req, estimate)[0].label == expect


def test_relay_model_tag_is_honoured_and_stripped() -> None:
    from relay.routing import take_model_tag
    req = {"system": [{"type": "text", "text": "<relay-model>local/qwen</relay-model>\nYou review code."}], "messages": []}
    model, out = take_model_tag(req)
    assert model == "local/qwen" and out["system"][0]["text"] == "You review code."
    assert req["system"][0]["text"].startswith("<relay-model>")  # the caller's dict is not changed
    req = {"messages": [{"role": "user", "content": [{"type": "text", "text": "<system-reminder>x</system-reminder>"},
                                                     {"type": "text", "text": " <relay-model>deepseek/deepseek-reasoner</relay-model> Find the bug"}]}]}
    model, out = take_model_tag(req)
    assert model == "deepseek/deepseek-reasoner" and out["messages"][0]["content"][1]["text"] == "Find the bug"
    assert take_model_tag({"messages": [{"role": "user", "content": "no tag <relay-model>a/b</relay-model>"}]})[0] is None


def test_zero_config_routes_claude_ids_to_relay_default_model() -> None:
    c = load(None, {"OPENAI_API_KEY": "k", "RELAY_DEFAULT_MODEL": "gpt-4.1"})
    assert [t.label for t in resolve(c, "claude-opus-4-1")] == ["openai/gpt-4.1"]
    assert [t.label for t in resolve(c, "claude-3-5-haiku-20241022")] == ["openai/gpt-4.1"]
    assert [t.label for t in resolve(c, "gpt-4o-mini")] == ["openai/gpt-4o-mini"]  # other names pass through
    bare = load(None, {"OPENAI_API_KEY": "k"})
    assert [t.label for t in resolve(bare, "claude-opus-4-1")] == ["openai/claude-opus-4-1"]


def test_background_route_applies_to_haiku_ids_in_check() -> None:
    c = parse(SCENARIOS, "relay.toml", ENV)
    assert resolve(c, "claude-haiku-4-5", {}, 0)[0].label == "local/tiny"
