"""Routing: model id -> the upstream targets that serve it (aliases, provider/model, tiers, scenarios, tags)."""

from __future__ import annotations

import pytest

from relay.config import load, parse
from relay.errors import RelayError
from relay.routing import resolve, take_model_tag
from tests.test_config import ENV, GOOD


def test_no_default_means_404() -> None:
    c = parse(GOOD.replace('default = "deepseek/deepseek-chat"', ""), "relay.toml", ENV)
    with pytest.raises(RelayError) as info:
        resolve(c, "gpt-4o")
    assert info.value.status == 404 and "gpt-4o" in info.value.message


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
