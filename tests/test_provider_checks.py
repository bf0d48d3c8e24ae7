"""A provider table's values are checked where it is read (the config file, or the admin API storing one at run
time): a value that would only fail later, on every request (a negative timeout, a header with a line break, a
key that is not a string), is refused at once, naming the key and never showing a secret."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from relay.config import ConfigError, parse, stored_provider
from tests.conftest import RELAY_KEY, start_relay
from tests.mock_upstream import MockUpstream, text_stream
from tests.test_gateway import ADMIN, ask, call, gateway_config, run

SECRET = "sk-provider-secret-0123456789"
FILE = """
[providers.p]
base_url = "http://127.0.0.1:1/v1"
{line}
"""

# (a line of the provider's table, the key the error names, words of its message)
BAD = [
    ('api_key = ["a", 5]', "api_key", "expected a list of strings, item 2 is int"),
    ('models = ["m", 1.5]', "models", "expected a list of strings, item 2 is float"),
    ('api_key = "sk-provider-secret-0123456789\\n"', "api_key", "a key holds a line break"),
    ("read_timeout = -1", "read_timeout", "must be > 0"),
    ("connect_timeout = 0", "connect_timeout", "must be > 0"),
    ("first_byte_timeout = nan", "first_byte_timeout", "must be > 0"),
    ("max_retry_wait = -0.5", "max_retry_wait", "must be >= 0"),
    ("cooldown = -1", "cooldown", "must be >= 0"),
    ("keepalive_start = -1", "keepalive_start", "must be >= 0"),
    ("max_connections = 0", "max_connections", "must be >= 1"),
    ("retries = -1", "retries", "must be >= 0"),
    ("failure_threshold = 0", "failure_threshold", "must be >= 1"),
    ("context_window = 0", "context_window", "must be >= 1"),
    ("max_tokens_cap = -5", "max_tokens_cap", "must be >= 1"),
    ('query = { "a" = [1] }', "query", "'a': expected a string, number or boolean, got list"),
    ('headers = { "X-A" = "a\\nb" }', "headers", "the value of 'X-A' holds a line break"),
    ('headers = { "X-A" = "c\\r\\nInjected: 1" }', "headers", "the value of 'X-A' holds a line break"),
    ('headers = { "X-A" = "nul\\u0000" }', "headers", "the value of 'X-A' holds a line break, NUL"),
    ('headers = { "Authorization" = " Bearer sk-provider-secret-0123456789" }', "headers", "starts or ends with a space"),
    ('headers = { "X A" = "v" }', "headers", "'X A' is not an HTTP header name"),
    ('headers = { "X:A" = "v" }', "headers", "'X:A' is not an HTTP header name"),
    ('headers = { "X-A" = { b = 1 } }', "headers", "'X-A': expected a string, number or boolean, got dict"),
]


@pytest.mark.parametrize(("line", "key", "words"), BAD)
def test_a_bad_provider_value_is_refused_naming_its_key_and_line(line: str, key: str, words: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parse(FILE.format(line=line), "relay.toml", {})
    message = str(raised.value)
    assert message.startswith(f"relay.toml:4: providers.p.{key}: ") and words in message, message
    assert SECRET not in message


@pytest.mark.parametrize(("table", "words"), [
    ({"base_url": "http://x y/v1"}, "holds a space or a control character"),
    ({"base_url": "http://x\ty/v1"}, "holds a space or a control character"),
    ({"base_url": "http://exa$mple.com/v1"}, "is not a host name"),
    ({"base_url": "http://h\u00e9.example/v1"}, "xn-- form"),
    ({"base_url": "http://[not-v6]/v1"}, "base_url: 'http://[not-v6]/v1'"),
    ({"base_url": "http://h:99999/v1"}, "the port is not a number"),
    ({"base_url": "http://h:ab/v1"}, "the port is not a number"),
    ({"base_url": "http://:80/v1"}, "has no host"),
    ({"limits": {"m": {"context_window": 0}}}, "providers.mine.limits.m.context_window: must be >= 1"),
    ({"limits": {"m": {"max_output": -1}}}, "providers.mine.limits.m.max_output: must be >= 1"),
])
def test_a_stored_provider_is_held_to_the_same_checks(table: dict[str, object], words: str) -> None:
    with pytest.raises(ConfigError) as raised:
        stored_provider("mine", {"base_url": "http://127.0.0.1:1/v1", **table}, {})
    assert words in str(raised.value), str(raised.value)


def test_good_values_still_load() -> None:
    good = stored_provider("mine", {
        "base_url": "http://[::1]:8080/v1", "api_key": ["k1", "k2"], "models": ["m"],
        "headers": {"X-Title": "relay tool", "X-Retries": 3}, "query": {"api-version": "2024-10-21", "n": 1, "on": True},
        "retries": 0, "max_retry_wait": 0, "cooldown": 0, "keepalive_start": 0, "read_timeout": 0.5,
        "max_connections": 1, "failure_threshold": 1, "limits": {"m": {"context_window": 1, "max_output": 1}}}, {})
    assert good.headers == (("X-Title", "relay tool"), ("X-Retries", "3"))
    assert good.query == (("api-version", "2024-10-21"), ("n", "1"), ("on", "true"))
    azure = stored_provider("az", {"base_url": "https://r.openai.azure.com/openai/deployments/{model}"}, {})
    assert azure.url("/chat/completions", "gpt 4") == "https://r.openai.azure.com/openai/deployments/gpt%204/chat/completions"


async def test_the_admin_api_refuses_them_before_storing_and_the_gateway_keeps_serving(
        nursery: trio.Nursery, upstream: MockUpstream, tmp_path: Path) -> None:
    """Before these checks, such a table was stored and every request to it dropped the client's connection
    (an int key has no .encode) or failed with a 502 (a header with a line break)."""
    upstream.handler = lambda r: text_stream("ok", usage=(1, 1))
    relay = await start_relay(nursery, gateway_config(upstream, f"sqlite://{tmp_path / 'relay.sqlite3'}"))
    base = {"name": "custom", "format": "openai", "base_url": upstream.base_url, "models": ["custom-model"]}
    for change, words in [({"api_key": [SECRET, 5]}, "providers.custom.api_key: expected a list of strings"),
                          ({"read_timeout": -1}, "providers.custom.read_timeout: must be > 0"),
                          ({"headers": {"X-A": "c\r\nInjected: 1"}}, "providers.custom.headers: the value of 'X-A'"),
                          ({"query": {"a": [1]}}, "providers.custom.query: 'a'"),
                          ({"base_url": "http://x y/v1"}, "providers.custom.base_url:")]:
        answer = await run(call, relay.url, "POST", "/admin/providers", ADMIN, {**base, **change})
        assert answer.status_code == 400, answer.text
        assert words in answer.json()["error"]["message"] and SECRET not in answer.text
    listed = await run(call, relay.url, "GET", "/admin/providers", ADMIN)
    assert "custom" not in listed.text
    assert await run(ask, relay.url, RELAY_KEY, "mock-model") == "ok"
