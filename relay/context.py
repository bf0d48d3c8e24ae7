"""Context windows: what relay knows of each model's window, and fitting max_tokens into it.

Claude Code assumes a 200k window for models it does not know, so on smaller models requests arrive that
cannot fit. relay knows the model really serving each request: it lowers max_tokens to what fits, and where
nothing fits it answers as Anthropic does ("prompt is too long: N tokens > M maximum"), which Claude Code
parses to compact and retry, instead of sending a request the upstream must refuse.

The configured limits are config's (``Provider.limits_for``); everything else about them is here: ``Limits``
adds what local servers say of their window (asked once per model, over the injected ``fetch``) and the output
caps upstreams state when they refuse a max_tokens.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote

import orjson

from relay.config import Provider
from relay.errors import RelayError
from relay.overflow import anthropic_message

# Logged under the names these lines always had: what upstreams told relay, and how relay fitted a request.
log = logging.getLogger("relay.upstream")
fit_log = logging.getLogger("relay.server")

Fetch = Callable[[Provider, str, "bytes | None"], Awaitable[Any]]  # (provider, url, POST body) -> JSON or None

WINDOWS_KEPT = 1024  # discovered windows kept; past it the oldest go (asked again when needed)
MIN_OUTPUT = 1024  # below this a reply is not worth asking for: compacting is the better answer


def prompt_too_long(prompt_tokens: int, window: int) -> RelayError:
    return RelayError(400, anthropic_message(prompt_tokens, window), "invalid_request_error")


def fit_max_tokens(estimate: int, requested: int, window: int | None, max_output: int | None) -> int:
    """The max_tokens to send. Raises the Anthropic prompt-too-long error when not even the floor fits."""
    allowed = min(requested, max_output) if max_output else requested
    if window:
        floor = min(requested, MIN_OUTPUT)
        room = window - estimate
        if room < floor:
            # M is the largest prompt that still leaves room for a reply, so compaction aims low enough
            raise prompt_too_long(estimate, window - floor if estimate < window else window)
        allowed = min(allowed, room)
    return allowed


def fit_reason(estimate: int, requested: int, fitted: int, window: int | None, max_output: int | None) -> str:
    """Why ``fit_max_tokens`` lowered max_tokens, in words for the log: the output cap, the window, or both."""
    reasons = []
    if max_output and fitted == max_output < requested:
        reasons.append(f"the output cap {max_output}")
    if window and fitted == window - estimate:
        reasons.append(f"the room left in the {window}-token window beside ~{estimate} input tokens")
    return " and ".join(reasons) or "the limits"


Probe = tuple[str, str, bytes | None]  # (kind for window_from_server, URL, POST body or None for a GET)


def server_probes(base_url: str) -> list[Probe]:
    """What a local server says about itself with no model name in it: asked once per provider."""
    root = base_url[: -len("/v1")] if base_url.endswith("/v1") else base_url
    return [("models", base_url + "/models", None), ("props", root + "/props", None)]


def model_probes(base_url: str, model: str) -> list[Probe]:
    """What a server says about one model (LM Studio, Ollama). The name is one encoded path segment, never a path
    (issue 19: ``../../internal?a=1`` must not reach another endpoint with the provider's key); names no encoding
    keeps inside its segment (empty, ``.``, ``..``) are not asked about at all."""
    if model.strip(".") == "":
        return []
    root = base_url[: -len("/v1")] if base_url.endswith("/v1") else base_url
    return [("lmstudio", root + "/api/v0/models/" + quote(model, safe=""), None),
            ("ollama", root + "/api/show", orjson.dumps({"model": model}))]


def listed_ids(doc: Any) -> frozenset[str]:
    """The model ids of an OpenAI-style ``/models`` listing."""
    data = doc.get("data") if isinstance(doc, dict) else None
    return frozenset(e["id"] for e in data or () if isinstance(e, dict) and isinstance(e.get("id"), str))


def window_from_server(kind: str, doc: Any, model: str) -> int | None:
    """Pull the serving context size out of a local server's self-description."""
    if not isinstance(doc, dict):
        return None
    if kind == "models":  # vLLM: /v1/models data[].max_model_len; LM Studio similar fields
        for entry in doc.get("data") or []:
            if isinstance(entry, dict) and entry.get("id") in (model, None) or len(doc.get("data") or []) == 1:
                for key in ("max_model_len", "loaded_context_length", "context_length"):
                    value = entry.get(key) if isinstance(entry, dict) else None
                    if isinstance(value, int) and value > 0:
                        return value
        return None
    if kind == "props":  # llama.cpp /props: the runtime n_ctx (not the training size)
        settings = doc.get("default_generation_settings")
        for source in (settings if isinstance(settings, dict) else {}, doc):
            value = source.get("n_ctx")
            if isinstance(value, int) and value > 0:
                return value
        return None
    if kind == "lmstudio":  # LM Studio /api/v0/models/{id}
        for key in ("loaded_context_length", "max_context_length"):
            value = doc.get(key)
            if isinstance(value, int) and value > 0:
                return value
        return None
    if kind == "ollama":  # Ollama /api/show: an explicit num_ctx wins over the model's trained length
        params = doc.get("parameters")
        if isinstance(params, str):
            for line in params.splitlines():
                parts = line.split()
                if len(parts) == 2 and parts[0] == "num_ctx" and parts[1].isdigit():
                    return int(parts[1])
        info = doc.get("model_info")
        if isinstance(info, dict):
            for key, value in info.items():
                if key.endswith(".context_length") and isinstance(value, int):
                    return value
    return None


class Limits:
    """The window and output cap of every model relay serves: configured, else learned (a local server's
    window, asked once; an output cap an upstream stated in a refusal). Learned figures last for the process."""

    def __init__(self, fetch: Fetch, named: frozenset[tuple[str, str]] = frozenset()) -> None:
        """``named``: the (provider, model) pairs the config writes down (routing.named_targets), the only names
        besides those a server lists that relay asks a server about."""
        self._fetch = fetch
        self._named = named
        self._found: dict[tuple[str, str], int | None] = {}  # per named or listed model, bounded (WINDOWS_KEPT)
        self._described: dict[str, dict[str, Any]] = {}  # provider -> kind -> its answer to server_probes
        self._output_caps: dict[tuple[str, str], int] = {}  # what upstreams said when they refused max_tokens

    def carry(self, old: "Limits", providers: set[str]) -> None:
        """Keep what ``old`` (the config before a reload) learned of ``providers``, those the reload left as they
        were: a change to one provider does not make relay forget every other's window and caps."""
        self._found |= {k: v for k, v in old._found.items() if k[0] in providers}
        self._described |= {k: v for k, v in old._described.items() if k in providers}
        self._output_caps |= {k: v for k, v in old._output_caps.items() if k[0] in providers}

    def window(self, provider: Provider, model: str) -> int | None:
        """Without asking anyone: configured, or discovered earlier."""
        return provider.limits_for(model).context_window or self._found.get((provider.name, model))

    async def window_of(self, provider: Provider, model: str) -> int | None:
        """Configured, else (for a provider with discover_context) asked of the server, once."""
        window = provider.limits_for(model).context_window
        if window is None and provider.discover_context:
            window = await self._discover(provider, model)
        return window

    async def _discover(self, provider: Provider, model: str) -> int | None:
        """Ask a local server how large its context is. Its name-free self-description (``/models``, ``/props``) is
        asked once per provider; a model is asked about by name only when the config names it or the server lists
        it, once, and the answer (or its absence) kept, in a bounded table. Any other name a client sends costs no
        request and no entry (issue 19): it gets what the name-free answers say."""
        key = (provider.name, model)
        if key in self._found:
            return self._found[key]
        described = self._described.setdefault(provider.name, {})
        window = None
        for kind, url, body in server_probes(provider.base_url):
            if kind not in described:
                described[kind] = await self._fetch(provider, url, body)
            if window := window_from_server(kind, described[kind], model):
                break
        if key not in self._named and model not in listed_ids(described.get("models")):
            return window
        for kind, url, body in () if window else model_probes(provider.base_url, model):
            if window := window_from_server(kind, await self._fetch(provider, url, body), model):
                break
        if len(self._found) >= WINDOWS_KEPT:
            del self._found[next(iter(self._found))]
        self._found[key] = window
        if window is None:  # once per model: the answer (none) is kept like a found one
            log.warning("%s/%s: could not learn the context window from %s (asked /models, /props, /api/v0/models, "
                        "/api/show); set context_window in [providers.%s] (or RELAY_CONTEXT_WINDOW with no config "
                        "file). Until then relay cannot fit max_tokens to it, and an overflowing request may run "
                        "until the server's window fills", provider.name, model, provider.base_url, provider.name)
        return window

    def max_output(self, provider: Provider, model: str) -> int | None:
        """The output cap relay applies: the configured one, or the lower one an upstream stated in a refusal."""
        caps = [c for c in (provider.limits_for(model).max_output, self._output_caps.get((provider.name, model))) if c]
        return min(caps) if caps else None

    def learn_output_cap(self, provider: Provider, model: str, cap: int) -> bool:
        """Keep the cap an upstream stated (for this process); True when it is news, i.e. lower than the cap relay
        applied, so a retry with it can succeed. Never True twice for the same figure, so retries stay bounded."""
        known = self.max_output(provider, model)
        if known is not None and cap >= known:
            return False
        self._output_caps[(provider.name, model)] = cap
        log.info("%s/%s refused max_tokens and says it accepts at most %d: relay caps max_tokens there from now on "
                 "(until restart; max_tokens_cap or limits in the config make it permanent)", provider.name, model, cap)
        return True

    async def fit(self, req: dict[str, Any], provider: Provider, model: str, estimate: int,
                  request_id: str = "") -> tuple[dict[str, Any], int | None]:
        """``req`` with max_tokens lowered to what the window has room for (a new dict; the same one when
        nothing changes), and the window. Raises the Anthropic prompt-too-long error when nothing fits."""
        max_tokens = req.get("max_tokens")
        max_output = self.max_output(provider, model)
        window = await self.window_of(provider, model)
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1 or not (window or max_output):
            return req, window
        fitted = fit_max_tokens(estimate, max_tokens, window, max_output)
        if fitted == max_tokens:
            return req, window
        fit_log.info("%s max_tokens %d -> %d for %s/%s: %s", request_id, max_tokens, fitted, provider.name, model,
                 fit_reason(estimate, max_tokens, fitted, window, max_output))
        return {**req, "max_tokens": fitted}, window
