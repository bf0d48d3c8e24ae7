"""Provider presets: each one is valid data, explicit keys override it key by key, the format's defaults apply, and
a preset provider works over loopback. Also the OpenAI reasoning controls the presets rely on."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import anthropic
import pytest
import trio

from relay import cli
from relay.config import (
    AUTH_STYLES, MAX_TOKENS_FIELDS, REASONING_CONTROLS, SYSTEM_TURNS, ConfigError, ModelLimits, Provider,
    parse,
)
from relay.formats.openai_chat.request import build as openai_build
from relay.formats.registry import FORMATS
from relay.presets import PRESETS
from tests.conftest import RELAY_KEY, UPSTREAM_KEY, start_relay
from tests.mock_upstream import MockUpstream, completion

README = Path(__file__).resolve().parent.parent / "README.md"


def provider(block: str) -> Provider:
    return parse(f"[providers.p]\n{block}\n", "t.toml", env={}).providers["p"]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_is_a_valid_provider(name: str) -> None:
    needs_url = "base_url" not in PRESETS[name].values
    p = provider(f'preset = "{name}"\napi_key = "k"' + ('\nbase_url = "https://r.example/{model}"' if needs_url else ""))
    assert p.format in FORMATS and p.auth in AUTH_STYLES and p.system_turns in SYSTEM_TURNS
    assert p.reasoning_control in REASONING_CONTROLS and p.max_tokens_field in MAX_TOKENS_FIELDS
    assert p.base_url.startswith(("http://", "https://")) and not p.base_url.endswith("/")
    assert p.preset == name and p.explicit >= {"preset", "api_key"}
    assert PRESETS[name].source


def test_explicit_keys_override_and_tables_merge() -> None:
    p = provider('preset = "openrouter"\nbase_url = "http://127.0.0.1:9/v1/"\nreasoning_control = "none"\n'
                 'headers = { "X-Title" = "mine", "X-Extra" = "1" }')
    assert p.base_url == "http://127.0.0.1:9/v1" and p.reasoning_control == "none"
    assert dict(p.headers) == {"HTTP-Referer": "http://localhost", "X-Title": "mine", "X-Extra": "1"}
    assert p.explicit == {"preset", "base_url", "reasoning_control", "headers"}


def test_format_defaults_without_a_preset() -> None:
    assert provider('format = "gemini"\nbase_url = "https://g"').auth == "x-goog-api-key"
    assert provider('format = "gemini"\nbase_url = "https://g"').reasoning_control == "thinking_budget"
    assert provider('format = "anthropic"\nbase_url = "https://a"').auth == "x-api-key"
    assert provider('format = "anthropic"\nbase_url = "https://a"\nauth = "bearer"').auth == "bearer"
    assert provider('base_url = "https://o"').auth == "bearer"  # openai: unchanged


def test_azure_urls() -> None:
    p = provider('preset = "azure-openai"\nbase_url = "https://res.openai.azure.com/openai/deployments/{model}"')
    assert p.auth == "api-key" and p.max_tokens_field == "max_completion_tokens"
    assert p.url("/chat/completions", "gpt-4o") == \
        "https://res.openai.azure.com/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"
    fixed = provider('preset = "azure-openai"\nbase_url = "https://r/openai/deployments/d"\nquery = { "api-version" = "2025-01-01-preview" }')
    assert fixed.url("/chat/completions", "ignored") == "https://r/openai/deployments/d/chat/completions?api-version=2025-01-01-preview"
    assert provider('base_url = "https://g/v1beta"').url("/models/m:streamGenerateContent?alt=sse", "m") == \
        "https://g/v1beta/models/m:streamGenerateContent?alt=sse"
    with pytest.raises(ConfigError, match=r"base_url is required with preset 'azure-openai'.*RESOURCE"):
        provider('preset = "azure-openai"')


def test_unknown_preset_names_the_choices() -> None:
    with pytest.raises(ConfigError, match=r"t.toml:2: providers.p.preset: must be one of .*deepseek"):
        provider('preset = "deepsek"')


def test_presets_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["presets"]) == 0
    out = capsys.readouterr().out
    for name, preset in PRESETS.items():
        assert re.search(rf"^{re.escape(name)}\s", out, re.M), name
        assert preset.source in out


def test_readme_documents_every_preset() -> None:
    text = README.read_text()
    section = text[text.index("## Provider presets"):]
    for name, preset in PRESETS.items():
        assert f"`{name}`" in section, name
        assert preset.source.split()[0].split(";")[0] in section, name


# ---- the OpenAI reasoning controls presets use ------------------------------------------------------------

BASE = Provider(name="p", base_url="http://x")
REQ = {"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}


def body(control: str, **req: Any) -> dict[str, Any]:
    return openai_build({**REQ, **req}, replace(BASE, reasoning_control=control), "m", False)[0]


def test_thinking_type_control() -> None:
    assert body("thinking_type", thinking={"type": "enabled", "budget_tokens": 4000})["thinking"] == {"type": "enabled"}
    assert body("thinking_type", thinking={"type": "disabled"})["thinking"] == {"type": "disabled"}
    assert "thinking" not in body("thinking_type")


def test_enable_thinking_control() -> None:
    on = body("enable_thinking", thinking={"type": "enabled", "budget_tokens": 4000})
    assert on["enable_thinking"] is True and on["thinking_budget"] == 4000
    assert body("enable_thinking", thinking={"type": "disabled"})["enable_thinking"] is False
    assert "enable_thinking" not in body("enable_thinking")


def test_reasoning_object_control() -> None:
    assert body("reasoning_object", output_config={"effort": "high"})["reasoning"] == {"effort": "high"}
    assert "reasoning" not in body("reasoning_object")


# ---- a preset provider over loopback ------------------------------------------------------------------------

async def test_preset_provider_over_loopback(nursery: trio.Nursery, upstream: MockUpstream) -> None:
    relay = await start_relay(nursery, f"""
[server]
api_keys = ["{RELAY_KEY}"]
[providers.or]
preset = "openrouter"
base_url = "{upstream.base_url}"
api_key = "{UPSTREAM_KEY}"
[routes]
default = "or/some/model"
""")
    upstream.handler = lambda r: completion({"content": "hi"})
    client = anthropic.Anthropic(base_url=relay.url, api_key=RELAY_KEY, max_retries=0, timeout=20)
    msg = await trio.to_thread.run_sync(lambda: client.messages.create(
        model="any-model", max_tokens=10, messages=[{"role": "user", "content": "hi"}],
        thinking={"type": "enabled", "budget_tokens": 2048}))
    assert msg.content[0].text == "hi"
    sent = upstream.requests[0]
    assert sent.headers["x-title"] == "relay" and sent.headers["http-referer"] == "http://localhost"
    assert sent.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert sent.json["model"] == "some/model" and sent.json["reasoning"] == {"effort": "low"}


# ---- documented windows and output caps --------------------------------------------------------------------


def test_preset_windows_reach_limits_for() -> None:
    p = provider('preset = "deepseek"\napi_key = "k"')
    assert p.limits_for("deepseek-reasoner") == ModelLimits(128_000, 64_000)
    assert p.limits_for("deepseek-chat") == ModelLimits(128_000, 8_000)
    assert p.limits_for("unlisted-model") == ModelLimits(None, None)
    assert provider('preset = "gemini-openai"').limits_for("gemini-2.5-pro").context_window == 1_048_576
    assert provider('preset = "minimax-anthropic"').limits_for("MiniMax-M2.7") == ModelLimits(204_800, None)
    assert "limits" not in p.explicit


def test_explicit_limits_override_one_model_only() -> None:
    p = provider('preset = "deepseek"\n[providers.p.limits]\n"deepseek-chat" = { context_window = 64000 }\n'
                 '"my-finetune" = { context_window = 32000, max_output = 4000 }')
    assert p.limits_for("deepseek-chat") == ModelLimits(64_000, 8_000)  # the preset's output cap stays
    assert p.limits_for("deepseek-reasoner") == ModelLimits(128_000, 64_000)
    assert p.limits_for("my-finetune") == ModelLimits(32_000, 4_000)
    assert PRESETS["deepseek"].values["limits"]["deepseek-chat"] == {"context_window": 128_000, "max_output": 8_000}
    with pytest.raises(ConfigError, match=r"providers\.p\.limits\.deepseek-chat.*unknown key"):
        provider('preset = "deepseek"\n[providers.p.limits]\n"deepseek-chat" = { window = 1 }')


def test_explicit_provider_wide_values_beat_preset_windows() -> None:
    p = provider('preset = "deepseek"\ncontext_window = 50000\nmax_tokens_cap = 2000')
    assert p.limits_for("deepseek-chat") == ModelLimits(50_000, 2_000)


def test_check_shows_a_preset_window(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "relay.toml"
    cfg.write_text('[providers.ds]\npreset = "deepseek"\napi_key = "k"\n')
    assert cli.main(["check", "-c", str(cfg), "ds/deepseek-reasoner"]) == 0
    assert "resolve ds/deepseek-reasoner -> ds/deepseek-reasoner  (context window 128000)" in capsys.readouterr().out
