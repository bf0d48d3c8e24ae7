"""Providers added at run time: checked by the config file's own parser, stored, and live without a restart, on
the instance that took them and on every other instance sharing the store."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
import trio

from relay.config import ConfigError, parse, stored_provider, with_stored
from tests.conftest import RELAY_KEY, relay_config, start_relay
from tests.mock_upstream import MockUpstream, text_stream
from tests.redis_server import RedisServer, redis_server  # noqa: F401  (a fixture)
from tests.test_gateway import ADMIN, ask, call, gateway_config, run, running, until

SECRET = "sk-custom-secret-0123456789"


def test_a_stored_table_is_checked_as_the_config_files_are() -> None:
    ok = stored_provider("mine", {"base_url": "http://127.0.0.1:1/v1", "format": "gemini", "models": ["g"]}, {})
    assert ok.format == "gemini" and ok.models == ("g",)
    env = {"DS_KEY": "sk-ds", "RELAY_ADMIN_KEY": "admin-secret", "OTHER_UPSTREAM_KEY": "sk-other"}
    preset = stored_provider("ds", {"preset": "deepseek", "api_key": "${DS_KEY}"}, env, ("DS_*",))
    assert preset.api_keys == ("sk-ds",) and preset.base_url.startswith("https://")
    # only api_key may name a variable, only an allowed one, and nothing of the environment is echoed
    for table, expected in (({"preset": "deepseek", "api_key": "${OTHER_UPSTREAM_KEY}"}, "provider_env allows (DS_*)"),
                            ({"base_url": "${RELAY_ADMIN_KEY}"}, "only api_key may name an environment variable"),
                            ({"base_url": "http://h/v1", "headers": {"x": "${DS_KEY}"}}, "only api_key may name"),
                            ({"base_url": "http://h/v1", "api_key": ["a", "${RELAY_ADMIN_KEY}"]}, "RELAY_ADMIN_KEY}:")):
        with pytest.raises(ConfigError) as refused:
            stored_provider("x", table, env, ("DS_*",))
        assert expected in str(refused.value) and not any(v in str(refused.value) for v in env.values()), refused.value
    unset = stored_provider("lab", {"base_url": "http://h/v1", "api_key": "${DS_UNSET}"}, env, ("DS_*",), unset_ok=True)
    assert unset.api_keys == ()  # allowed but unset here: passes the check (another instance may have it)
    cases = [
        ("mine", {"format": "openai"}, "base_url is required"),
        ("mine", {"base_url": "example.com/v1"}, "needs to start with http:// or https://"),
        ("mine", {"base_url": "http://h/v1", "format": "soap"}, "format: must be one of"),
        ("mine", {"base_url": "http://h/v1", "retries": "3"}, "retries: expected int"),
        ("mine", {"base_url": "http://h/v1", "colour": "red"}, "colour: unknown key"),
        ("mine", {"base_url": "http://h/v1", "api_key": "${UNSET_VAR}"}, "provider_env allows (none)"),
        ("mine", {"base_url": "http://h/v1", "ca_file": "/etc/hosts"}, "only a config file's providers"),
        ("a/b", {"base_url": "http://h/v1"}, "provider name 'a/b'"),
        ("mine", ["not", "a", "table"], "expected a table"),
    ]
    for name, table, expected in cases:
        with pytest.raises(ConfigError, match=None) as raised:
            stored_provider(name, table, {})
        assert expected in str(raised.value), (table, str(raised.value))


def test_the_config_files_provider_wins_over_a_stored_one_of_its_name() -> None:
    config = parse(relay_config("http://127.0.0.1:1/v1"), "test.toml", env={})
    merged, problems = with_stored(config, {"mock": {"base_url": "http://127.0.0.1:2/v1"},
                                            "extra": {"base_url": "http://127.0.0.1:3/v1", "models": ["x"]},
                                            "broken": {"format": "openai"}}, {})
    assert merged.providers["mock"].base_url == "http://127.0.0.1:1/v1"
    assert merged.stored == {"extra"} and merged.providers["extra"].models == ("x",)
    assert set(problems) == {"mock", "broken"} and "base_url is required" in problems["broken"]
    assert config.stored == frozenset() and "extra" not in config.providers  # the file's config is untouched


async def test_add_use_edit_and_delete_a_provider_without_a_restart(nursery: trio.Nursery, upstream: MockUpstream,
                                                                    tmp_path: Path) -> None:
    custom = MockUpstream(lambda r: text_stream("from custom", usage=(7, 3)))
    await nursery.start(custom.serve)
    upstream.handler = lambda r: text_stream("from mock", usage=(1, 1))
    relay = await start_relay(nursery, gateway_config(upstream, f"sqlite://{tmp_path / 'relay.sqlite3'}")
                              + 'provider_env = ["LAB_*"]\n')
    url = relay.url
    table = {"name": "custom", "format": "openai", "base_url": custom.base_url, "api_key": SECRET,
             "models": ["custom-model"], "prices": {"custom-model": {"input": 1, "output": 2}}}
    # admin keys only, and checked before anything is stored
    assert (await run(call, url, "POST", "/admin/providers", RELAY_KEY, table)).status_code == 403
    bad = await run(call, url, "POST", "/admin/providers", ADMIN, {**table, "format": "soap"})
    assert bad.status_code == 400 and "format: must be one of" in bad.json()["error"]["message"]
    taken = await run(call, url, "POST", "/admin/providers", ADMIN, {**table, "name": "mock"})
    assert taken.status_code == 409 and "config file" in taken.json()["error"]["message"]
    assert await run(ask, url, RELAY_KEY, "mock-model") == "from mock"
    warm = upstream.accepted
    server = relay.server
    health = server.healths.of(server.config.providers["mock"])
    server.known._output_caps[("mock", "mock-model")] = 4096  # as if the upstream had stated its cap
    made = await run(call, url, "POST", "/admin/providers", ADMIN, table)
    assert made.status_code == 201, made.text
    assert SECRET not in made.text and made.json()["table"]["api_key"] == ["(set)"]
    assert (await run(call, url, "POST", "/admin/providers", ADMIN, table)).status_code == 409
    # live at once: by provider/model, and by its listed model name; the upstream gets its key
    assert await run(ask, url, RELAY_KEY, "custom/custom-model") == "from custom"
    assert await run(ask, url, RELAY_KEY, "custom-model") == "from custom"
    assert custom.requests[-1].headers["authorization"] == f"Bearer {SECRET}"
    assert custom.requests[-1].json["model"] == "custom-model"
    assert await run(ask, url, RELAY_KEY, "mock-model") == "from mock"  # the file's providers are untouched,
    assert upstream.accepted == warm  # and keep their warm connections through the change,
    assert server.healths.of(server.config.providers["mock"]) is health  # their circuit and cool-downs,
    assert server.known._output_caps[("mock", "mock-model")] == 4096  # and what relay learned of them
    # the console's list: the stored one with its (masked) table beside the file's, read-only
    listed = (await run(call, url, "GET", "/admin/providers")).json()["data"]
    sources = {p["name"]: p["source"] for p in listed}
    assert sources == {"mock": "config", "custom": "store"}
    one = (await run(call, url, "GET", "/admin/providers/custom")).json()
    assert one["models"][0]["price"]["input"] == 1 and one["table"]["base_url"] == custom.base_url
    assert SECRET not in (await run(call, url, "GET", "/admin/providers")).text
    # the cost of a request to it is booked with its prices
    await relay.server.flush_usage()
    rows = (await run(call, url, "GET", "/admin/usage")).json()["data"]
    assert any(r["model"] == "custom-model" and r["cost_usd"] == round((7 * 1 + 3 * 2) / 1e6, 6) for r in rows), rows
    # edited: a new model list; an absent api_key stays; null removes a key
    edited = await run(call, url, "PATCH", "/admin/providers/custom", ADMIN, {"models": ["renamed"], "prices": None})
    assert edited.status_code == 200, edited.text
    assert "prices" not in edited.json()["table"] and edited.json()["table"]["api_key"] == ["(set)"]
    assert await run(ask, url, RELAY_KEY, "renamed") == "from custom"
    assert custom.requests[-1].headers["authorization"] == f"Bearer {SECRET}"
    broken = await run(call, url, "PATCH", "/admin/providers/custom", ADMIN, {"base_url": "nowhere"})
    assert broken.status_code == 400 and "http://" in broken.json()["error"]["message"]
    assert await run(ask, url, RELAY_KEY, "renamed") == "from custom"  # a refused edit changed nothing
    assert (await run(call, url, "PATCH", "/admin/providers/mock", ADMIN, {"retries": 2})).status_code == 409
    assert (await run(call, url, "DELETE", "/admin/providers/mock")).status_code == 409
    # deleted: gone from routing and from the list
    assert custom.open_connections >= 1  # relay keeps a warm connection to it...
    assert (await run(call, url, "DELETE", "/admin/providers/custom")).status_code == 200
    with trio.fail_after(5):  # ...and closes it once the provider is gone
        while custom.open_connections:
            await trio.sleep(0.02)
    assert (await run(call, url, "DELETE", "/admin/providers/custom")).status_code == 404
    seen = len(custom.requests)
    assert await run(ask, url, RELAY_KEY, "custom/renamed") == "from mock"  # no such provider now: the default route
    assert len(custom.requests) == seen
    assert [p["name"] for p in (await run(call, url, "GET", "/admin/providers")).json()["data"]] == ["mock"]
    # one another instance stored with a ${VAR} this one lacks: left out here, and the list says why
    view = relay.server.gateway.view
    doc = orjson.dumps({"table": {"base_url": custom.base_url, "api_key": "${LAB_ONLY_ON_THE_OTHER_HOST}"}})
    await view.call(lambda backend: backend.put("providers", "elsewhere", doc, create=True))
    await view.refreshed()
    (left,) = [p for p in (await run(call, url, "GET", "/admin/providers")).json()["data"] if p["name"] == "elsewhere"]
    assert left["source"] == "store" and "LAB_ONLY_ON_THE_OTHER_HOST is not set" in left["error"]
    assert left["table"]["api_key"] == ["${LAB_ONLY_ON_THE_OTHER_HOST}"]  # a name, not a secret: shown
    assert (await run(call, url, "GET", "/admin/providersx")).status_code == 404
    # allowed but unset here: stored (other instances may have it); the answer says this one leaves it out
    later = await run(call, url, "POST", "/admin/providers", ADMIN, {"name": "later", "base_url": custom.base_url,
                                                                     "api_key": "${LAB_SET_ELSEWHERE}"})
    assert later.status_code == 201 and "LAB_SET_ELSEWHERE is not set" in later.json()["left_out"], later.text
    taker = await run(call, url, "POST", "/admin/providers", ADMIN, {"name": "taker", "base_url": custom.base_url,
                                                                     "models": ["claude-sonnet-4-5"]})
    assert "Claude Code's requests for them now go to 'taker'" in taker.json()["note"]
    refused = await run(call, url, "POST", "/admin/providers", ADMIN, {"name": "peek", "base_url": "${HOME}"})
    assert refused.status_code == 400 and "only api_key" in refused.text


async def test_what_is_shown_and_what_a_form_sends_back(nursery: trio.Nursery, upstream: MockUpstream,
                                                        tmp_path: Path) -> None:
    """Secrets in a stored table are masked wherever they sit, and a form that sends back what it was shown
    (masks included) changes nothing it did not mean to."""
    custom = MockUpstream(lambda r: text_stream("from custom", usage=(3, 2)))
    await nursery.start(custom.serve)
    relay = await start_relay(nursery, gateway_config(upstream, f"sqlite://{tmp_path / 'relay.sqlite3'}"))
    url = relay.url
    base = custom.base_url.replace("http://", "http://user:URLPASS@") + "?token=URLTOKEN"
    table = {"name": "sec", "base_url": base, "api_key": ["sk-ONE-0123456789", "sk-TWO-0123456789"],
             "headers": {"x-team-secret": "HEADERSECRET"}, "query": {"key": "QUERYSECRET"}, "models": ["m"]}
    made = await run(call, url, "POST", "/admin/providers", ADMIN, table)
    assert made.status_code == 201, made.text
    for answer in (made, await run(call, url, "GET", "/admin/providers"), await run(call, url, "GET", "/admin/providers/sec")):
        for secret in ("URLPASS", "URLTOKEN", "sk-ONE", "sk-TWO", "HEADERSECRET", "QUERYSECRET"):
            assert secret not in answer.text, (secret, answer.text)
    shown = made.json()["table"]
    assert shown["headers"] == {"x-team-secret": "(set)"} and shown["query"] == {"key": "(set)"}
    # the form sends everything back as shown, with one change
    edited = await run(call, url, "PATCH", "/admin/providers/sec", ADMIN, {**shown, "models": ["m", "n"]})
    assert edited.status_code == 200, edited.text
    assert await run(ask, url, RELAY_KEY, "sec/n") == "from custom"
    seen = custom.requests[-1]
    assert seen.headers["x-team-secret"] == "HEADERSECRET" and seen.headers["authorization"] == "Bearer sk-ONE-0123456789"
    assert "key=QUERYSECRET" in seen.path and "token=URLTOKEN" in seen.path, seen.path
    # a header added beside the masked one: the masked one keeps its value
    await run(call, url, "PATCH", "/admin/providers/sec", ADMIN, {"headers": {"x-team-secret": "(set)", "x-more": "1"}})
    assert await run(ask, url, RELAY_KEY, "sec/n") == "from custom"
    assert custom.requests[-1].headers["x-team-secret"] == "HEADERSECRET" and custom.requests[-1].headers["x-more"] == "1"


async def test_concurrent_changes_to_a_key_are_never_lost(nursery: trio.Nursery, upstream: MockUpstream,
                                                          tmp_path: Path) -> None:
    """A revocation at the same moment as an edit stays revoked, and edits of different fields all land."""
    upstream.handler = lambda r: text_stream("ok", usage=(1, 1))
    relay = await start_relay(nursery, gateway_config(upstream, f"sqlite://{tmp_path / 'relay.sqlite3'}"))
    url = relay.url
    for n in range(6):
        name = f"victim{n}"
        assert (await run(call, url, "POST", "/admin/keys", ADMIN, {"name": name})).status_code == 201
        async with trio.open_nursery() as both:
            both.start_soon(run, call, url, "PATCH", f"/admin/keys/{name}", ADMIN, {"rpm": 5})
            both.start_soon(run, call, url, "DELETE", f"/admin/keys/{name}")
            both.start_soon(run, call, url, "PATCH", f"/admin/keys/{name}", ADMIN, {"tpm": 500})
        key = (await run(call, url, "GET", f"/admin/keys/{name}")).json()
        assert key["state"] == "revoked" and key["limits"]["rpm"] == 5 and key["limits"]["tpm"] == 500, key


async def test_a_provider_added_on_one_instance_serves_on_the_others(nursery: trio.Nursery, upstream: MockUpstream,
                                                                     redis_server: RedisServer,  # noqa: F811
                                                                     tmp_path: Path) -> None:
    custom = MockUpstream(lambda r: text_stream("from custom", usage=(7, 3)))
    await nursery.start(custom.serve)
    upstream.handler = lambda r: text_stream("from mock", usage=(1, 1))
    config = tmp_path / "relay.toml"
    config.write_text(gateway_config(upstream, redis_server.url, refresh=0.1))
    async with running(config, "relay0", "relay1") as (one, two):
        table = {"name": "custom", "base_url": custom.base_url, "api_key": SECRET, "models": ["custom-model"]}
        assert (await run(call, one.url, "POST", "/admin/providers", ADMIN, table)).status_code == 201
        started = trio.current_time()

        async def served_on_two() -> bool:
            try:
                return await run(ask, two.url, RELAY_KEY, "custom-model") == "from custom"  # type: ignore[no-any-return]
            except Exception:
                return False

        await until(served_on_two, seconds=5)
        assert trio.current_time() - started < 1.0
        assert (await run(call, two.url, "DELETE", "/admin/providers/custom")).status_code == 200
        started = trio.current_time()

        async def gone_from_one() -> bool:
            return "custom" not in [p["name"] for p in (await run(call, one.url, "GET", "/admin/providers")).json()["data"]]

        await until(gone_from_one, seconds=5)
        assert trio.current_time() - started < 1.0
        logs = [i.stop() for i in (one, two)]
    assert all("Traceback" not in log and SECRET not in log for log in logs), logs
