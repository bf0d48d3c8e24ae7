"""Recognise an upstream's refusal of max_tokens that states the model's output cap, in any provider's words.

Claude Code asks for far more output than most models give (2.1.331 sends ``max_tokens: 128000``); OpenAI
answers that with a 400 naming its cap, and every later request fails the same way. relay reads the cap out of
the refusal, retries at once with it and keeps it for the (provider, model) for the rest of the process (see
``relay.upstream.Upstreams.learn_output_cap``). Pure: no I/O, safe to call on any error.

Only refusals of the *output* figure alone are read here. A refusal about the window (the prompt plus max_tokens
does not fit, e.g. vLLM's "'max_tokens' or 'max_completion_tokens' is too large: K. This model's maximum context
length is M") is a context overflow and belongs to ``relay.overflow``; vLLM and llama.cpp refuse only that way
(llama.cpp's server and llama-cpp-python clamp a large max_tokens to the window instead of refusing it). A credit
limit (OpenRouter's 402 "You requested up to K tokens, but can only afford N") is not a model cap and is not
read. Rate limits are never caps.
"""

from __future__ import annotations

import re
from typing import Any

from relay.overflow import nodes, number

_N = r"(\d[\d,]*)"
_FIELD = r"`?'?(?:max_tokens|max_completion_tokens|max_output_tokens|maxOutputTokens|max_new_tokens)'?`?"

# (pattern, how to turn the number found into the largest accepted value). Each names where it was seen.
_RAW: list[tuple[str, int]] = [
    # OpenAI and Azure OpenAI: "max_tokens is too large: 128000. This model supports at most 32768 completion tokens,
    # whereas you provided 128000." (https://github.com/ChatGPTNextWeb/NextChat/issues/3195,
    # https://github.com/charmbracelet/catwalk/issues/41 for Azure, https://github.com/AQBot-Desktop/AQBot/issues/93
    # where a proxy put the same text in "param")
    (_FIELD + r" is too large: \d[\d,]*\. This model supports at most " + _N + r" completion tokens", 0),
    # Anthropic: "max_tokens: 128000 > 64000, which is the maximum allowed number of output tokens for claude-..."
    # (https://github.com/anthropics/claude-code/issues/24451, https://github.com/coolcline/CoolCline/issues/23)
    (_FIELD + r": \d[\d,]* > " + _N + r", which is the maximum allowed number of output tokens", 0),
    # DeepSeek: "Invalid max_tokens value, the valid range of max_tokens is [1, 8192]"
    # (https://github.com/deepseek-ai/DeepSeek-V3/issues/69)
    (r"valid range of " + _FIELD + r" is \[\d+, ?" + _N + r"\]", 0),
    # Alibaba DashScope (Qwen): "Range of max_tokens should be [1, 8192]", also inside a 200 stream's error event
    # (https://github.com/open-webui/open-webui/issues/10507, https://github.com/anomalyco/opencode/issues/40770)
    (r"range of " + _FIELD + r" should be \[\d+, ?" + _N + r"\]", 0),
    # Groq: "`max_completion_tokens` must be less than or equal to `16384`, the maximum value for ..." and the older
    # "max_tokens for `llama-3.1-8b-instant` must be less than or equal to 8000"
    # (https://github.com/Alishahryar1/free-claude-code/issues/1354, https://github.com/skapadia3214/groq-moa/issues/8)
    (_FIELD + r"(?: for `[^`]*`)? must be less than or equal to `?" + _N, 0),
    # Volcengine Ark (Doubao): "The parameter `max_completion_tokens` specified in the request are not valid: integer
    # above maximum value, expected a value <= 12288, but got 32000 instead."
    # (https://github.com/Gitlawb/openclaude/issues/331, https://github.com/yiliqi78/TOKENICODE/issues/3)
    (_FIELD + r" specified in the request (?:is|are) not valid: integer above maximum value, expected a value <= "
     + _N, 0),
    # Vertex AI Gemini: "it has a maxOutputTokens value of 655360 but the supported range is from 1 (inclusive) to
    # 8193 (exclusive)" (https://github.com/stackblitz-labs/bolt.diy/issues/955)
    (_FIELD + r" value of \d[\d,]* but the supported range is from \d+ \(inclusive\) to " + _N + r" \(exclusive\)",
     -1),
    # Ollama's cloud models: "max_tokens (384000) exceeds model's maximum output tokens (65536) for model ..."
    # (https://github.com/DaviRain-Su/hyper-grok-build/issues/44)
    (_FIELD + r" \(\d[\d,]*\) exceeds (?:the )?model's maximum output tokens \(" + _N + r"\)", 0),
    # A provider behind a Chinese reseller: "max_tokens (current value: 4096) must be between 0 and 4000"
    # (https://github.com/neavo/KeywordGacha/issues/111)
    (_FIELD + r" \(current value: \d[\d,]*\) must be between \d+ and " + _N, 0),
]
_WORDINGS = [(re.compile(p, re.IGNORECASE), adjust) for p, adjust in _RAW]
_NOT_CAP = re.compile(r"rate.?limit|tokens per min|\bTPM\b|too many requests|quota|afford|credits", re.IGNORECASE)


def detect(message: str, body: Any = None) -> int | None:
    """The largest max_tokens the upstream says it accepts, or None when the error is not such a refusal.
    ``message`` is the human message relay extracted, ``body`` the parsed error body (every string in it is
    read: some proxies move the provider's text into another field)."""
    texts = [message] + [v for node in nodes(body) for v in node.values() if isinstance(v, str)]
    if any(_NOT_CAP.search(t) for t in texts):
        return None
    for text in texts:
        for pattern, adjust in _WORDINGS:
            m = pattern.search(text)
            if m:
                cap = number(m.group(1)) + adjust
                return cap if cap >= 1 else None
    return None
