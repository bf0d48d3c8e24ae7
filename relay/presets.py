"""Provider presets: ``preset = "deepseek"`` in a provider block fills in what that provider needs, so a user
writes only a key. Quirks are data here, never code paths: every value is an ordinary provider key, and any of
them can be overridden in the provider block (the block wins, key by key; ``headers``, ``query`` and the
per-model ``limits`` merge).

Each entry names the page its values come from. ``verified`` says whether that page was read and confirms them
(``True``), or whether a value rests on a third-party page or on convention (``False``: the README says which).
Naming: a provider's bare name is its OpenAI-compatible API; ``<name>-anthropic`` is its Anthropic-compatible
endpoint (passed through, the fastest path, and the one these providers document for Claude Code).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Preset:
    name: str
    values: dict[str, Any]
    source: str  # the provider documentation the values come from
    notes: str = ""
    verified: bool = True
    needs: str = ""  # what the user must add besides a key (e.g. the Azure resource URL)


# Defaults that follow from the format alone, under any preset and any explicit value.
FORMAT_DEFAULTS: dict[str, dict[str, Any]] = {
    "anthropic": {"auth": "x-api-key"},
    "gemini": {"auth": "x-goog-api-key", "reasoning_control": "thinking_budget"},
}

_LOCAL: dict[str, Any] = {"auth": "none", "discover_context": True}

# Documented windows and output caps of a provider's main models (``limits``: model id -> context_window /
# max_output). Only figures read on the provider's own page are here; a model or a figure the page did not give
# is left out (relay then knows no window for it, as before). "128K" on a page is read as 128,000, the lower
# reading, so a window errs on the side of compacting early.
# https://api-docs.deepseek.com/quick_start/pricing (Models & Pricing: context length 128K; max output 8K for
# deepseek-chat, 64K for deepseek-reasoner)
_DEEPSEEK_LIMITS = {
    "deepseek-chat": {"context_window": 128_000, "max_output": 8_000},
    "deepseek-reasoner": {"context_window": 128_000, "max_output": 64_000},
}
# Prices (USD per million tokens), read on the same kind of page as the windows, and dated: providers change them.
# https://api-docs.deepseek.com/quick_start/pricing (Pricing Details, from 2025-09-05 16:00 UTC: one price list
# for deepseek-chat and deepseek-reasoner; input cache miss $0.56, cache hit $0.07, output $1.68; no separate
# cache-write price, so a write costs as plain input)
_DEEPSEEK_PRICES = {m: {"input": 0.56, "output": 1.68, "cache_read": 0.07} for m in ("deepseek-chat", "deepseek-reasoner")}
# https://platform.minimax.io/docs/guides/text-generation (Supported Models: context window 204,800; no output
# cap given)
_MINIMAX_LIMITS = {m: {"context_window": 204_800} for m in (
    "MiniMax-M2.7", "MiniMax-M2.7-highspeed", "MiniMax-M2.5", "MiniMax-M2.5-highspeed")}
# https://docs.cloud.google.com/gemini-enterprise-agent-platform/models/gemini/2-5-pro and .../2-5-flash-lite
# (Google's model pages: maximum input 1,048,576; maximum output 65,535 for 2.5 Pro, 65,536 for 2.5 Flash-Lite)
_GEMINI_LIMITS = {
    "gemini-2.5-pro": {"context_window": 1_048_576, "max_output": 65_535},
    "gemini-2.5-flash-lite": {"context_window": 1_048_576, "max_output": 65_536},
}
# https://docs.x.ai/docs/models (Models and Pricing: context 256,000; no output cap given), read through its
# mirror https://docs.xai.ac.cn/docs/models
_XAI_LIMITS = {m: {"context_window": 256_000} for m in ("grok-4-0709", "grok-code-fast-1")}


def _p(name: str, source: str, notes: str = "", verified: bool = True, needs: str = "", **values: Any) -> Preset:
    return Preset(name, values, source, notes, verified, needs)


PRESETS: dict[str, Preset] = {p.name: p for p in (
    _p("openai", "https://platform.openai.com/docs/api-reference/chat",
       "GPT-5 and o-series take max_completion_tokens and reasoning_effort; set reasoning_control = \"none\" for "
       "gpt-4o/4.1, which refuse reasoning_effort", verified=False,
       base_url="https://api.openai.com/v1", max_tokens_field="max_completion_tokens",
       reasoning_control="reasoning_effort", structured_output="strict", prompt_cache_key=True),
    _p("openai-responses", "https://platform.openai.com/docs/api-reference/responses",
       "the Responses API (store: false, reasoning carried as encrypted content)", verified=False,
       format="openai-responses", base_url="https://api.openai.com/v1", reasoning_control="reasoning_effort",
       structured_output="strict", prompt_cache_key=True),
    _p("azure-openai", "https://learn.microsoft.com/azure/ai-services/openai/reference",
       "deployment URLs, key in the api-key header, api-version 2024-10-21 (latest GA data-plane inference)",
       needs='base_url = "https://RESOURCE.openai.azure.com/openai/deployments/{model}" ({model} = the deployment)',
       auth="api-key", query={"api-version": "2024-10-21"}, max_tokens_field="max_completion_tokens",
       structured_output="strict"),
    _p("anthropic", "https://docs.anthropic.com/en/api/messages",
       "Anthropic itself, passed through", verified=False,
       format="anthropic", base_url="https://api.anthropic.com"),
    _p("deepseek", "https://api-docs.deepseek.com/guides/thinking_mode; https://api-docs.deepseek.com/guides/json_mode",
       "thinking toggled by thinking.type; reasoning_content must go back on tool-call turns; JSON output is "
       "json_object only (no json_schema), so structured output is refused (the JSON Output guide was read through "
       "a mirror)", verified=False,
       base_url="https://api.deepseek.com", reasoning_control="thinking_type", reasoning_return=True,
       structured_output="none", limits=_DEEPSEEK_LIMITS, prices=_DEEPSEEK_PRICES),
    _p("deepseek-anthropic", "https://api-docs.deepseek.com/guides/anthropic_api",
       "anthropic-version/anthropic-beta ignored; x-api-key supported",
       format="anthropic", limits=_DEEPSEEK_LIMITS, prices=_DEEPSEEK_PRICES, base_url="https://api.deepseek.com/anthropic"),
    _p("moonshot", "https://www.developersdigest.tech/reference/api-compatibility/moonshot (quotes platform.kimi.ai)",
       "Kimi; China: https://api.moonshot.cn/v1. Thinking via thinking.type (third-party report)", verified=False,
       base_url="https://api.moonshot.ai/v1", reasoning_control="thinking_type", reasoning_return=True),
    _p("moonshot-anthropic", "https://www.developersdigest.tech/reference/api-compatibility/moonshot (quotes platform.kimi.ai)",
       "China: https://api.moonshot.cn/anthropic", verified=False,
       format="anthropic", base_url="https://api.moonshot.ai/anthropic", auth="bearer"),
    _p("qwen", "https://www.alibabacloud.com/help/en/model-studio/deep-thinking",
       "DashScope international (Singapore); China: https://dashscope.aliyuncs.com/compatible-mode/v1. "
       "Hybrid models toggle thinking with enable_thinking (+ thinking_budget)",
       base_url="https://dashscope-intl.aliyuncs.com/compatible-mode/v1", reasoning_control="enable_thinking"),
    _p("qwen-anthropic", "https://www.alibabacloud.com/help/en/model-studio/claude-code",
       "international edition (Singapore) pay-as-you-go; Coding Plan keys use their own base URL",
       format="anthropic", base_url="https://dashscope-intl.aliyuncs.com/apps/anthropic"),
    _p("zhipu", "https://java.agentscope.io/v2/en/integration/model/glm; https://docs.continue.dev/customize/model-providers/more/zai",
       "GLM; international Z.AI: https://api.z.ai/api/paas/v4. GLM-4.7/5 think by default (thinking.type)",
       verified=False, base_url="https://open.bigmodel.cn/api/paas/v4", reasoning_control="thinking_type"),
    _p("zhipu-anthropic", "https://raw.githubusercontent.com/Agents365-ai/dsclaude/main/glmclaude (a launcher script)",
       "international Z.AI: https://api.z.ai/api/anthropic", verified=False,
       format="anthropic", base_url="https://open.bigmodel.cn/api/anthropic", auth="bearer"),
    _p("minimax", "https://www.developersdigest.tech/reference/api-compatibility/minimax (quotes platform.minimax.io)",
       "M-series models write their reasoning inline in <think> tags on the OpenAI API", verified=False,
       limits=_MINIMAX_LIMITS, base_url="https://api.minimax.io/v1", think_tags=True),
    _p("minimax-anthropic", "https://platform.minimax.io/docs/api-reference/text-anthropic-api",
       "China: https://api.minimaxi.com/anthropic",
       format="anthropic", limits=_MINIMAX_LIMITS, base_url="https://api.minimax.io/anthropic"),
    _p("mistral", "https://docs.datafold.com/integrations/llm-providers/openai-compatible (example base URL)",
       "Magistral thinking arrives as typed content arrays (handled)", verified=False,
       base_url="https://api.mistral.ai/v1"),
    _p("groq", "https://ai-sdk.dev/v5/providers/ai-sdk-providers/groq",
       "reasoning models stream a `reasoning` field", verified=False,
       base_url="https://api.groq.com/openai/v1"),
    _p("xai", "https://reference.langchain.com/python/langchain-xai/chat_models/ChatXAI/xai_api_base; vercel/ai @ai-sdk/xai 4.0.8 release notes",
       "reasoning_effort is refused by several Grok models, so it is not sent", verified=False,
       limits=_XAI_LIMITS, base_url="https://api.x.ai/v1"),
    _p("openrouter", "https://openrouter.ai/openai/gpt-4-32k/api (base URL, HTTP-Referer/X-Title)",
       "app attribution headers; reasoning sent as reasoning.effort (not confirmed on the page read); "
       "reasoning_details (with signatures) handled", verified=False,
       base_url="https://openrouter.ai/api/v1", reasoning_control="reasoning_object",
       headers={"HTTP-Referer": "http://localhost", "X-Title": "relay"}),
    _p("gemini", "https://ai.google.dev/gemini-api/docs/thought-signatures; https://ai.google.dev/api/caching#Schema",
       "native API: thinking budget, thought signatures kept across tool loops, schemas cleaned",
       format="gemini", limits=_GEMINI_LIMITS, base_url="https://generativelanguage.googleapis.com/v1beta"),
    _p("gemini-openai", "https://ai.google.dev/gemini-api/docs/openai",
       "Gemini's OpenAI-compatible endpoint (tool calls without index, finish_reason stop after calls: handled); "
       "reasoning_effort support not on the excerpt read", verified=False,
       base_url="https://generativelanguage.googleapis.com/v1beta/openai", reasoning_control="reasoning_effort",
       limits=_GEMINI_LIMITS),
    _p("together", "https://docs.together.ai/docs/inference/openai-compatibility", "",
       base_url="https://api.together.ai/v1"),
    _p("fireworks", "https://www.skills.sh/ericrisco/rsc-harness/together-fireworks (a third-party guide)",
       "model ids look like accounts/fireworks/models/<name>", verified=False,
       base_url="https://api.fireworks.ai/inference/v1"),
    _p("siliconflow", "https://docs.siliconflow.cn/docs/api/chat-completions-post; https://www.siliconflow.com/es/blog/openai-sdk-siliconflow-compatibility-checks",
       "global endpoint; China: https://api.siliconflow.cn/v1. enable_thinking + thinking_budget",
       base_url="https://api.siliconflow.com/v1", reasoning_control="enable_thinking"),
    _p("ollama", "(none read: Ollama's documented default port 11434)",
       "no key; reasoning arrives in `reasoning`", verified=False,
       base_url="http://localhost:11434/v1", **_LOCAL),
    _p("vllm", "https://docs.boundaryml.com/ref/llm-client-providers/vllm (quotes docs.vllm.ai)",
       "no key by default; chat templates reject a system message that is not first", verified=False,
       base_url="http://localhost:8000/v1", system_turns="merge", pass_top_k=True, **_LOCAL),
    _p("llamacpp", "https://docs.memberjunction.org/api/variables/_memberjunction_ai-llamacpp.DEFAULT_LLAMA_CPP_URL.html",
       "llama-server's default port (llama-cpp-python's server too); templates reject a system message that is not "
       "first; content \"\" beside tool calls (llama-cpp-python's server answers null with a 500: "
       "https://github.com/abetlen/llama-cpp-python/issues/1805)", verified=False,
       base_url="http://localhost:8080/v1", system_turns="merge", pass_top_k=True, tool_call_content="empty", **_LOCAL),
    _p("lmstudio", "https://lmstudio.ai/docs/developer/core/server; https://github.com/lmstudio-ai/lmstudio-bug-tracker/issues/261",
       "the server's default port (1234) is not on the page read; it refuses content: null beside tool calls",
       verified=False, base_url="http://localhost:1234/v1", system_turns="merge", tool_call_content="empty", **_LOCAL),
)}

MERGED = ("headers", "query", "limits", "prices")  # tables merged key by key; every other key is replaced whole
# An explicit provider-wide value beats the preset's per-model figure for the same thing.
_PROVIDER_WIDE = {"context_window": "context_window", "max_tokens_cap": "max_output"}


def apply(name: str, explicit: dict[str, Any]) -> dict[str, Any]:
    """The provider block with the preset (and the format's defaults) under the keys it set explicitly."""
    preset = PRESETS[name]
    merged: dict[str, Any] = {**preset.values}
    if "limits" in merged:
        merged["limits"] = _preset_limits(merged["limits"], {f for k, f in _PROVIDER_WIDE.items() if k in explicit})
    for key, value in explicit.items():
        if key == "limits" and isinstance(value, dict):
            # per model, and within a model per figure: `"m" = { max_output = N }` keeps the preset's window
            base = merged.get("limits", {})
            merged[key] = {**base, **{m: {**base[m], **e} if m in base and isinstance(e, dict) else e
                                      for m, e in value.items()}}
        elif key in MERGED and isinstance(merged.get(key), dict) and isinstance(value, dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return format_defaults(merged, set(explicit) | set(preset.values))


def _preset_limits(limits: dict[str, dict[str, int]], overridden: set[str]) -> dict[str, dict[str, int]]:
    """The preset's per-model figures, less those the block overrides provider-wide (fresh dicts)."""
    kept = {model: {k: v for k, v in entry.items() if k not in overridden} for model, entry in limits.items()}
    return {model: entry for model, entry in kept.items() if entry}


def format_defaults(block: dict[str, Any], given: set[str] | None = None) -> dict[str, Any]:
    """What the format implies for keys nobody set (e.g. ``x-goog-api-key`` for ``format = "gemini"``)."""
    given = set(block) if given is None else given
    defaults = FORMAT_DEFAULTS.get(block.get("format", "openai"), {})
    return {**{k: v for k, v in defaults.items() if k not in given}, **block}


def listing() -> str:
    """The text of ``relay presets``."""
    lines = []
    for preset in PRESETS.values():
        values = preset.values
        fmt = values.get("format", "openai")
        base = values.get("base_url", "(set base_url)")
        lines.append(f"{preset.name:<20} {fmt:<17} {base}")
        quirks = ", ".join(f"{k}={v}" for k, v in values.items() if k not in ("format", "base_url", "limits", "prices"))
        if quirks:
            lines.append(f"{'':<20} {quirks}")
        if values.get("limits"):
            lines.append(f"{'':<20} windows: " + ", ".join(
                f"{m} {e['context_window']}" + (f"/{e['max_output']} out" if e.get("max_output") else "")
                for m, e in values["limits"].items()))
        if values.get("prices"):
            lines.append(f"{'':<20} prices (USD/M in/out/cache read): " + ", ".join(
                f"{m} {e['input']}/{e['output']}/{e.get('cache_read', e['input'])}" for m, e in values["prices"].items()))
        if preset.needs:
            lines.append(f"{'':<20} needs: {preset.needs}")
        if preset.notes:
            lines.append(f"{'':<20} {preset.notes}")
        lines.append(f"{'':<20} source: {preset.source}{'' if preset.verified else ' (partly unverified)'}")
    return "\n".join(lines)
