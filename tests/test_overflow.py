"""Context-overflow detection over each provider's real wording, and the Anthropic message relay answers with.

Every case is a wording seen from the provider, with where it was seen; the figures are what Claude Code needs
(N the prompt, M the window, K the output the provider counted, T when only a total was given, X the excess).
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from relay.errors import from_upstream
from relay.overflow import (
    MAX_TOKENS_MIN_ROOM,
    Overflow,
    anthropic_max_tokens_message,
    anthropic_message,
    detect,
)

OV = Overflow


def openai_body(message: str, code: str | None = "context_length_exceeded", **extra: Any) -> dict[str, Any]:
    return {"error": {"message": message, "type": "invalid_request_error", "param": "messages", "code": code, **extra}}


# (id, message, body, expected)
POSITIVE: list[tuple[str, str, Any, Overflow]] = [
    # --- Anthropic itself (also what relay answers, so relay in front of relay works) ---
    # https://github.com/earendil-works/pi/issues/102
    ("anthropic-prompt-too-long", "prompt is too long: 219898 tokens > 200000 maximum", None, OV(219898, 200000)),
    # https://github.com/anthropics/claude-code/issues/228
    ("anthropic-max-tokens",
     "input length and `max_tokens` exceed context limit: 184915 + 20000 > 204648, decrease input length or "
     "`max_tokens` and try again", None, OV(184915, 204648, 20000)),
    # https://github.com/ericc-ch/copilot-api/issues/83 (GitHub Copilot's copy, without backticks)
    # https://github.com/fedora-copr/logdetective-website/pull/193 (llama-cpp-python's own words)
    ("llama-cpp-python", "Requested tokens (2285) exceed context window of 2048", None, OV(2285, 2048)),
    ("copilot-max-tokens",
     "input length and max_tokens exceed context limit: 189727 + 16000 > 200000, decrease input length or "
     "max_tokens and try again", None, OV(189727, 200000, 16000)),
    # --- OpenAI ---
    # https://github.com/chathub-dev/chathub/issues/126
    ("openai-messages-resulted",
     "This model's maximum context length is 4097 tokens. However, your messages resulted in 4294 tokens. "
     "Please reduce the length of the messages.", None, OV(4294, 4097)),
    # https://github.com/conghaonet/hao_chatgpt/issues/4
    ("openai-split",
     "This model's maximum context length is 4097 tokens. However, you requested 4268 tokens (4012 in the "
     "messages, 256 in the completion). Please reduce the length of the messages or completion.", None,
     OV(4012, 4097, 256)),
    # https://github.com/FoundationAgents/OpenManus/issues/62 (functions count as prompt)
    ("openai-split-functions",
     "This model's maximum context length is 8192 tokens. However, you requested 8213 tokens (6683 in the "
     "messages, 730 in the functions, and 800 in the completion). Please reduce the length of the messages, "
     "functions, or completion.", None, OV(7413, 8192, 800)),
    # https://github.com/bytedance/deer-flow/issues/310
    ("openai-messages-and-functions",
     "This model's maximum context length is 128000 tokens. However, your messages resulted in 202868 tokens "
     "(202767 in the messages, 101 in the functions). Please reduce the length of the messages or functions.",
     None, OV(202868, 128000)),
    # https://github.com/AstrBotDevs/AstrBot/issues/1 (legacy completions)
    ("openai-legacy-completions",
     "This model's maximum context length is 4097 tokens, however you requested 4569 tokens (3545 in your "
     "prompt; 1024 for the completion). Please reduce your prompt; or completion length.", None,
     OV(3545, 4097, 1024)),
    # https://github.com/anomalyco/opencode/issues/6071 (Responses API, no numbers)
    ("openai-context-window-no-numbers",
     "Your input exceeds the context window of this model. Please adjust your input and try again.",
     {"type": "error", "sequence_number": 2, "error": {"type": "invalid_request_error",
      "code": "context_length_exceeded", "message": "Your input exceeds the context window of this model. "
      "Please adjust your input and try again.", "param": "input"}}, OV(None, None)),
    # the code alone is enough when relay could not extract a message (synthetic body, OpenAI's code)
    ("openai-code-only", "HTTP 400", {"error": {"code": "context_length_exceeded", "message": "Bad Request"}},
     OV(None, None)),
    # --- DeepSeek ---
    # https://github.com/FoundationAgents/OpenManus/issues/79
    ("deepseek-split",
     "This model's maximum context length is 65536 tokens. However, you requested 66343 tokens (62247 in the "
     "messages, 4096 in the completion). Please reduce the length of the messages or completion.",
     openai_body("…", code="invalid_request_error"), OV(62247, 65536, 4096)),
    # https://github.com/bytedance/deer-flow/issues/66
    ("deepseek-zero-completion",
     "This model's maximum context length is 65536 tokens. However, you requested 87731 tokens (87731 in the "
     "messages, 0 in the completion). Please reduce the length of the messages or completion.", None,
     OV(87731, 65536, 0)),
    # --- Kimi / Moonshot: only a total (input + output, per platform.kimi.ai/docs/introduction) ---
    # https://github.com/MoonshotAI/kimi-cli/issues/2011
    ("kimi", "Invalid request: Your request exceeded model token limit: 262144 (requested: 269030)",
     {"error": {"message": "Invalid request: Your request exceeded model token limit: 262144 (requested: 269030)",
                "type": "invalid_request_error"}}, OV(None, 262144, total_tokens=269030)),
    # --- Qwen / DashScope: the input limit only ---
    # https://github.com/agentscope-ai/QwenPaw/issues/6255
    ("dashscope", "<400> InternalError.Algo.InvalidParameter: Range of input length should be [1, 983616]",
     {"error": {"code": "invalid_parameter_error", "message": "<400> InternalError.Algo.InvalidParameter: Range "
      "of input length should be [1, 983616]", "param": None, "type": "invalid_request_error"}},
     OV(None, 983616)),
    # https://github.com/QwenLM/qwen-code/issues/98
    ("dashscope-qwen-code", "OpenAI API error: 400 <400> InternalError.Algo.InvalidParameter: Range of input "
     "length should be [1, 204800]", None, OV(None, 204800)),
    # --- Zhipu GLM ---
    # https://github.com/zeroclaw-labs/zeroclaw/issues/4124 (code 1261, no numbers)
    ("zhipu-1261", "Prompt exceeds max length", {"error": {"code": "1261", "message": "Prompt exceeds max length"}},
     OV(None, None)),
    # https://github.com/foreveryh/claude-code-switch/issues/12 (code 1210; N fits, the output did not)
    ("zhipu-1210", "API 调用参数有误，请检查文档。Request 182387 input tokens exceeds the model's maximum context "
     "length 202750", {"error": {"message": "API 调用参数有误，请检查文档。Request 182387 input tokens exceeds the "
                                 "model's maximum context length 202750", "code": "1210"}}, OV(182387, 202750)),
    # --- Groq, Cerebras ---
    # https://github.com/letta-ai/letta/issues/1963
    ("groq", "Please reduce the length of the messages or completion.",
     openai_body("Please reduce the length of the messages or completion."), OV(None, None)),
    # https://github.com/cline/cline/issues/5140
    ("cerebras", "Please reduce the length of the messages or completion. Current length is 42328 while limit is "
     "40000", None, OV(None, 40000, total_tokens=42328)),
    # --- xAI ---
    # https://github.com/cline/cline/issues/3120
    ("xai", "This model's maximum prompt length is 131072 but the request contains 136973 tokens.", None,
     OV(136973, 131072)),
    # --- Mistral ---
    # https://portkey.ai/error-library/context-length-exceeded-error-13710000
    ("mistral", "Prompt contains 66385 tokens, too large for model with 32768 maximum context length", None,
     OV(66385, 32768)),
    # --- Gemini (native and OpenAI-compatible both answer a list-wrapped Google error) ---
    # https://github.com/google-gemini/gemini-cli/issues/6678
    ("gemini", "The input token count (1200293) exceeds the maximum number of tokens allowed (1048576).",
     [{"error": {"code": 400, "message": "The input token count (1200293) exceeds the maximum number of tokens "
       "allowed (1048576).", "errors": [{"message": "The input token count (1200293) exceeds the maximum number "
       "of tokens allowed (1048576).", "domain": "global", "reason": "badRequest"}],
       "status": "INVALID_ARGUMENT"}}], OV(1200293, 1048576)),
    # --- OpenRouter: its own wording, then a provider's error wrapped in metadata.raw ---
    # https://github.com/OpenHands/OpenHands/issues/9937
    ("openrouter-output",
     "This endpoint's maximum context length is 131072 tokens. However, you requested about 138956 tokens (7884 "
     "of text input, 131072 in the output). Please reduce the length of either one, or use the \"middle-out\" "
     "transform to compress your prompt automatically.", None, OV(7884, 131072, 131072)),
    # https://github.com/earendil-works/pi/issues/6378 (tool input counts as prompt)
    ("openrouter-tool-input",
     "This endpoint's maximum context length is 262000 tokens. However, you requested about 263390 tokens (658 "
     "of text input, 732 of tool input, 262000 in the output). Please reduce the length of either one, or use "
     "the context-compression plugin to compress your prompt automatically.",
     {"error": {"message": "…", "code": 400, "metadata": {"provider_name": None}}}, OV(1390, 262000, 262000)),
    # https://github.com/topoteretes/cognee/issues/1061
    ("openrouter-text-only",
     "This endpoint's maximum context length is 16384 tokens. However, you requested about 94307 tokens (94307 "
     "of text input). Please reduce the length of either one, or use the \"middle-out\" transform to compress "
     "your prompt automatically.", None, OV(94307, 16384)),
    # https://github.com/cline/cline/issues/13194 (relay's message may be just "Provider returned error")
    ("openrouter-wrapped", "openrouter: Provider returned error",
     {"error": {"message": "Provider returned error", "code": 400, "metadata": {
         "raw": "{\"error\":{\"message\":\"This model's maximum context length is 262144 tokens. However, your "
                "messages resulted in 262897 tokens. Please reduce the length of the messages.\",\"type\":\"Bad "
                "Request\",\"code\":400}}", "provider_name": "Nvidia", "is_byok": False,
         "provider_error_code": "400"}}}, OV(262897, 262144)),
    # --- vLLM, oldest to newest ---
    # https://github.com/vllm-project/vllm/issues/20409
    ("vllm-split",
     "This model's maximum context length is 16384 tokens. However, you requested 122946 tokens (112946 in the "
     "messages, 10000 in the completion). Please reduce the length of the messages or completion.", None,
     OV(112946, 16384, 10000)),
    # vllm-project/vllm vllm/entrypoints/openai/serving_engine.py (input alone); text as logged by NVIDIA's API
    ("vllm-input-only",
     "This model's maximum context length is 262144 tokens. However, your request has 372027 input tokens. "
     "Please reduce the length of the input messages. None",
     {"object": "error", "message": "…", "type": "BadRequestError", "code": 400}, OV(372027, 262144)),
    # same file, prompt fits but max_tokens does not; https://github.com/claude-code-best/claude-code/issues/272
    ("vllm-max-tokens-too-large",
     "'max_tokens' or 'max_completion_tokens' is too large: 64000. This model's maximum context length is 64001 "
     "tokens and your request has 24235 input tokens (64000 > 64001 - 24235). None", None,
     OV(24235, 64001, 64000)),
    # the rewording of https://github.com/vllm-project/vllm/pull/36197, as served (here by Amazon Bedrock)
    ("vllm-output-and-prompt",
     "ValidationException: \"This model's maximum context length is 202752 tokens. However, you requested 64000 "
     "output tokens and your prompt contains at least 138753 input tokens, for a total of at least 202753 "
     "tokens. Please reduce the length of the input prompt or the number of requested output tokens.\"", None,
     OV(138753, 202752, 64000)),
    # vllm-project/vllm vllm/renderers/params.py _token_len_check
    ("vllm-renderer-tokens",
     "You passed 40000 input tokens and requested 8192 output tokens. However, the model's context length is "
     "only 32768 tokens, resulting in a maximum input length of 24576 tokens. Please reduce the length of the "
     "input prompt. (parameter=input_tokens, value=40000)", None, OV(40000, 32768, 8192)),
    # same file, _text_len_check: the big number is characters, so N stays unknown
    ("vllm-renderer-characters",
     "You passed 200000 input characters and requested 8192 output tokens. However, the model's context length "
     "is only 32768 tokens, resulting in a maximum input length of 24576 tokens (at most 98304 characters). "
     "Please reduce the length of the input prompt.", None, OV(None, 32768, 8192)),
    # --- llama.cpp server ---
    # https://github.com/ggml-org/llama.cpp/pull/15780 (numbers only in fields; note HTTP 500 there)
    ("llamacpp-fields",
     "the request exceeds the available context size. try increasing the context size or enable context shift",
     {"error": {"code": 500, "message": "the request exceeds the available context size. try increasing the "
      "context size or enable context shift", "type": "exceed_context_size_error", "n_prompt_tokens": 1407,
      "n_ctx": 256}}, OV(1407, 256)),
    # https://github.com/janhq/jan/issues/8108 (newer wording with numbers)
    ("llamacpp-numbers",
     "request (24071 tokens) exceeds the available context size (8192 tokens), try increasing it",
     {"error": {"code": 400, "message": "request (24071 tokens) exceeds the available context size (8192 "
      "tokens), try increasing it", "type": "exceed_context_size_error", "n_prompt_tokens": 24071,
      "n_ctx": 8192}}, OV(24071, 8192)),
    # --- Ollama ---
    # https://github.com/ollama/ollama/issues/16800 (truncate:false: llama.cpp's error JSON inside a string)
    ("ollama-nested-llamacpp",
     "{\"error\":{\"code\":400,\"message\":\"request (351 tokens) exceeds the available context size (256 "
     "tokens), try increasing it\",\"type\":\"exceed_context_size_error\",\"n_prompt_tokens\":351,\"n_ctx\":256}}",
     {"error": "{\"error\":{\"code\":400,\"message\":\"request (351 tokens) exceeds the available context size "
               "(256 tokens), try increasing it\",\"type\":\"exceed_context_size_error\",\"n_prompt_tokens\":351,"
               "\"n_ctx\":256}}"}, OV(351, 256)),
    # openclaw's test of a real Ollama payload (found via code search; pi-ai's overflow.ts documents the same)
    ("ollama-exceeded-by", "prompt too long; exceeded max context length by 4 tokens",
     {"StatusCode": 400, "Status": "400 Bad Request",
      "error": "prompt too long; exceeded max context length by 4 tokens"}, OV(None, None, excess=4)),
    # https://github.com/nano-step/nano-brain/issues/208 (embeddings endpoint)
    ("ollama-input-length", "the input length exceeds the context length",
     {"error": "the input length exceeds the context length"}, OV(None, None)),
    # --- LM Studio ---
    # https://github.com/Gitlawb/openclaude/issues/353
    ("lmstudio-n-keep",
     "The number of tokens to keep from the initial prompt is greater than the context length (n_keep: 13055>= "
     "n_ctx: 4096). Try to load the model with a larger context length, or provide a shorter input.",
     {"error": "The number of tokens to keep from the initial prompt is greater than the context length (n_keep: "
               "13055>= n_ctx: 4096). Try to load the model with a larger context length, or provide a shorter "
               "input."}, OV(13055, 4096)),
    # https://github.com/anomalyco/opencode/issues/2259
    ("lmstudio-no-numbers",
     "The number of tokens to keep from the initial prompt is greater than the context length. Try to load the "
     "model with a larger context length, or provide a shorter input", None, OV(None, None)),
    # https://github.com/lmstudio-ai/lmstudio-bug-tracker/issues/546
    ("lmstudio-keep-first",
     "Trying to keep the first 111490 tokens when context the overflows. However, the model is loaded with "
     "context length of only 32768 tokens, which is not enough. Try to load the model with a larger context "
     "length, or provide a shorter input.", None, OV(111490, 32768)),
    # https://github.com/anomalyco/opencode/issues/11141
    ("lmstudio-cannot-truncate", "Cannot truncate prompt with n_keep (15028) >= n_ctx (7424)", None,
     OV(15028, 7424)),
    # https://github.com/lmstudio-ai/examples/issues/29
    ("lmstudio-old", "Error: Input length 6491 exceeds context length 1500", None, OV(6491, 1500)),
    # --- others seen in front of Claude Code ---
    # https://github.com/Alishahryar1/free-claude-code/issues/263
    ("together", "The input (345516 tokens) is longer than the model's context length (262144 tokens). "
     "(request_id=req_123)", None, OV(345516, 262144)),
    # https://github.com/ericc-ch/copilot-api/issues/210
    ("github-copilot", "prompt token count of 74490 exceeds the limit of 72000",
     {"error": {"message": "prompt token count of 74490 exceeds the limit of 72000",
                "code": "model_max_prompt_tokens_exceeded"}}, OV(74490, 72000)),
    # https://github.com/jundot/omlx/issues/169
    ("omlx", "Prompt too long: 51587 tokens exceeds max context window of 32768 tokens", None, OV(51587, 32768)),
]


@pytest.mark.parametrize("message,body,expected", [c[1:] for c in POSITIVE], ids=[c[0] for c in POSITIVE])
def test_overflow_wordings(message: str, body: Any, expected: Overflow) -> None:
    assert detect(message, body) == expected


def test_detects_through_relays_own_message_extraction() -> None:
    """What server code will pass: relay's ``from_upstream`` message (with its "provider: " prefix) and the body."""
    body = {"error": {"message": "Provider returned error", "code": 400, "metadata": {
        "raw": orjson.dumps(openai_body("This model's maximum context length is 65536 tokens. However, you requested "
                                        "70000 tokens (60000 in the messages, 10000 in the completion).")).decode(),
        "provider_name": "DeepSeek"}}}
    err = from_upstream(400, orjson.dumps(body), provider="openrouter")
    assert detect(err.message, body) == OV(60000, 65536, 10000)


# (id, message, body): refusals that are not about the window.
NEGATIVE: list[tuple[str, str, Any]] = [
    # output cap alone: https://github.com/ChatGPTNextWeb/NextChat/issues/3195
    ("openai-max-tokens-cap", "max_tokens is too large: 8192. This model supports at most 4096 completion tokens, "
     "whereas you provided 8192.", {"error": {"message": "max_tokens is too large: 8192. This model supports at "
     "most 4096 completion tokens, whereas you provided 8192.", "type": "invalid_request_error",
     "param": "max_tokens", "code": None}}),
    # https://github.com/RooCodeInc/Roo-Code/issues/5729 (mentions context_window, still only the output cap)
    ("groq-max-tokens-cap", "max_tokens must be less than or equal to 16384, the maximum value for max_tokens is "
     "less than the context_window for this model", None),
    # https://github.com/BerriAI/litellm/issues/5198
    ("deepseek-max-tokens-range", "Invalid max_tokens value, the valid range of max_tokens is [1, 4096]", None),
    # https://github.com/Gitlawb/openclaude/issues/331
    ("doubao-max-completion-tokens", "The parameter `max_completion_tokens` specified in the request are not "
     "valid: integer above maximum value, expected a value <= 12288, but got 32000 instead.", None),
    # rate limits that count tokens: https://github.com/cline/cline/issues/4971 (Groq 413 TPM)
    ("groq-tpm", "Request too large for model `moonshotai/kimi-k2-instruct` in organization `org_01` service tier "
     "`on_demand` on tokens per minute (TPM): Limit 10000, Requested 15088, please reduce your message size and "
     "try again.", {"error": {"message": "Request too large ...", "type": "tokens", "code": "rate_limit_exceeded"}}),
    # OpenAI's TPM 429 wording
    ("openai-tpm", "Rate limit reached for gpt-4o in organization org-x on tokens per min (TPM): Limit 30000, "
     "Used 25000, Requested 9000. Please try again in 8s.", None),
    # Bedrock throttling that says "Too many tokens" (pi-ai overflow.ts documents it as a false positive to avoid)
    ("bedrock-throttling", "ThrottlingException: Too many tokens, please wait before trying again.", None),
    # a 429 even when the body also carries an overflow-looking code must stay a rate limit
    ("rate-limit-with-code", "Rate limit exceeded", {"error": {"code": "context_length_exceeded",
                                                              "message": "Rate limit exceeded"}}),
    # ordinary 400s
    ("invalid-model", "The model `gpt-9` does not exist or you do not have access to it.",
     {"error": {"message": "The model `gpt-9` does not exist", "code": "model_not_found"}}),
    ("kimi-temperature", "invalid temperature: only 1 is allowed for this model", None),
    # https://github.com/MoonshotAI/Kimi-K2.5/issues/20 (Kimi's number-free 400 may or may not be an overflow)
    ("kimi-generic", "Invalid request Error", {"error": {"type": "invalid_request_error",
                                                        "message": "Invalid request Error"}}),
    ("empty", "", None),
]


@pytest.mark.parametrize("message,body", [c[1:] for c in NEGATIVE], ids=[c[0] for c in NEGATIVE])
def test_not_overflows(message: str, body: Any) -> None:
    assert detect(message, body) is None


def test_anthropic_wordings_round_trip() -> None:
    """relay's answers are exactly Anthropic's, and relay in front of relay recognises them again."""
    assert anthropic_message(70000, 65536) == "prompt is too long: 70000 tokens > 65536 maximum"
    assert anthropic_max_tokens_message(60000, 10000, 65536) == (
        "input length and `max_tokens` exceed context limit: 60000 + 10000 > 65536, decrease input length or "
        "`max_tokens` and try again")
    assert detect(anthropic_message(70000, 65536)) == OV(70000, 65536)
    assert detect(anthropic_max_tokens_message(60000, 10000, 65536)) == OV(60000, 65536, 10000)


# (id, overflow, relay's estimate, relay's window, relay's max_tokens, expected message)
RESOLVE: list[tuple[str, Overflow, int, int | None, int | None, str]] = [
    ("upstream-figures-win", OV(70000, 65536), 50000, 64000, 8000, anthropic_message(70000, 65536)),
    ("prompt-fits-output-does-not", OV(60000, 65536, 10000), 1, None, None,
     anthropic_max_tokens_message(60000, 10000, 65536)),
    # DeepSeek "0 in the completion": nothing to lower, the prompt itself is over
    ("zero-output", OV(87731, 65536, 0), 1, None, 8000, anthropic_message(87731, 65536)),
    # room beside the prompt below Claude Code's floor + buffer: lowering max_tokens cannot help, compact instead
    ("too-little-room", OV(64000, 65536, 4096), 1, None, None, anthropic_message(65537, 65536)),
    ("room-at-the-floor", OV(65536 - MAX_TOKENS_MIN_ROOM, 65536, 8192), 1, None, None,
     anthropic_max_tokens_message(65536 - MAX_TOKENS_MIN_ROOM, 8192, 65536)),
    # Kimi's total: relay's own max_tokens is the output part
    ("total-minus-max-tokens", OV(None, 262144, total_tokens=269030), 1, None, 32000,
     anthropic_max_tokens_message(237030, 32000, 262144)),
    ("total-all-prompt", OV(None, 262144, total_tokens=300000), 1, None, 32000, anthropic_message(268000, 262144)),
    # Zhipu 1210 said N < M: the output relay asked for is what overflowed
    ("prompt-under-window-uses-max-tokens", OV(182387, 202750), 1, None, 32000,
     anthropic_max_tokens_message(182387, 32000, 202750)),
    # Ollama's excess over the window relay knows
    ("excess", OV(None, None, excess=4), 1, 8192, 1024, anthropic_message(8196, 8192)),
    # DashScope's window, relay's estimate
    ("window-only", OV(None, 204800), 210000, 128000, 8000, anthropic_message(210000, 204800)),
    # no numbers at all: relay's estimate and known window
    ("estimate-and-known-window", OV(None, None), 70000, 65536, 8000, anthropic_message(70000, 65536)),
    # the upstream refused but relay's estimate says it fits: keep N above M so the message is not self-contradictory
    ("estimate-undercounts", OV(None, None), 50000, 65536, 1000, anthropic_message(65537, 65536)),
    ("no-window-anywhere", OV(None, None), 70000, None, 8000, anthropic_message(70000, 69999)),
]


@pytest.mark.parametrize("overflow,estimate,window,max_tokens,expected", [c[1:] for c in RESOLVE],
                         ids=[c[0] for c in RESOLVE])
def test_to_anthropic(overflow: Overflow, estimate: int, window: int | None, max_tokens: int | None,
                      expected: str) -> None:
    assert overflow.to_anthropic(estimate, window, max_tokens) == expected
