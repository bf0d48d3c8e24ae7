"""`relay keys` and `relay usage` against both stores, `relay check` pinging the store, bad store urls."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.redis_server import RedisServer, redis_server  # noqa: F401  (a fixture)


@pytest.fixture(params=["sqlite", "redis"])
def config_file(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    if request.param == "sqlite":
        url = f"sqlite://{tmp_path / 'relay.sqlite3'}"
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        url = server.url.replace("redis://", "redis://:${STORE_PASSWORD}@")
        server.command("CONFIG", "SET", "requirepass", "s3cret-store-pass")
    path = tmp_path / "relay.toml"
    path.write_text(f'[store]\nurl = "{url}"\n\n[providers.p]\nbase_url = "http://127.0.0.1:9/v1"\n')
    return path


def relay(*args: str, config: Path | None = None) -> subprocess.CompletedProcess[str]:
    extra = ["-c", str(config)] if config else []
    env = {**os.environ, "STORE_PASSWORD": "s3cret-store-pass"}
    return subprocess.run([sys.executable, "-m", "relay", *args, *extra], capture_output=True, text=True, timeout=60,
                          env=env)


def test_keys_lifecycle_and_usage(config_file: Path) -> None:
    created = relay("keys", "create", "alice", "--models", "mock-*,other", "--rpm", "5", "--budget", "2.5",
                    "--budget-period", "day", "--expires", "2030-01-31", config=config_file)
    assert created.returncode == 0, created.stderr
    secret = created.stdout.strip().splitlines()[-1]
    assert secret.startswith("rk-") and len(secret) > 40
    assert "rpm=5" in created.stdout and "budget=$2.5/day" in created.stdout
    again = relay("keys", "create", "alice", config=config_file)
    assert again.returncode == 1 and "exists" in again.stderr
    listed = relay("keys", "list", config=config_file)
    assert listed.returncode == 0 and secret not in listed.stdout
    assert listed.stdout.splitlines()[1].split()[:4] == ["alice", secret[:7] + "…", "active", "mock-*,other"]
    changed = relay("keys", "set", "alice", "--rpm", "none", "--tpm", "1000", config=config_file)
    assert changed.returncode == 0 and "rpm=- tpm=1000" in changed.stdout, changed.stderr
    revoked = relay("keys", "revoke", "alice", config=config_file)
    assert revoked.returncode == 0 and "revoked" in revoked.stdout
    assert relay("keys", "list", config=config_file).stdout.splitlines()[1].split()[2] == "revoked"
    missing = relay("keys", "set", "bob", "--rpm", "3", config=config_file)
    assert missing.returncode == 1 and "no key named 'bob'" in missing.stderr
    bad = relay("keys", "create", "no spaces", config=config_file)
    assert bad.returncode == 2 and "key name" in bad.stderr
    usage = relay("usage", config=config_file)
    assert usage.returncode == 0 and usage.stdout.split()[:4] == ["key", "model", "requests", "refused"]
    check = relay("check", config=config_file)
    assert "ok (1 virtual key(s), 0 stored provider(s): none)" in check.stdout, check.stdout + check.stderr
    for out in (created, listed, changed, check, usage):
        assert "s3cret-store-pass" not in out.stdout + out.stderr


def test_check_says_which_stored_providers_this_machine_cannot_serve(config_file: Path) -> None:
    import orjson
    import trio

    from relay.config import load
    from relay.store import connected, url_for

    config = load(str(config_file), {**os.environ, "STORE_PASSWORD": "s3cret-store-pass"})

    async def store_two() -> None:
        async with connected(url_for(config.store) or "") as backend:
            for name, key in (("lab", "${LAB_KEY_NOT_SET_HERE}"), ("ok", "sk-fine")):
                table = {"base_url": "http://127.0.0.1:9/v1", "api_key": key, "models": [f"{name}-model"]}
                await backend.put("providers", name, orjson.dumps({"table": table}), create=True)

    trio.run(store_two)
    check = relay("check", "ok-model", config=config_file)
    assert check.returncode == 0, check.stdout + check.stderr  # a warning: another instance may serve it
    assert "2 stored provider(s): lab, ok" in check.stdout
    assert "warning: stored provider lab left out here: " in check.stdout
    assert "provider_env allows (none)" in check.stdout  # this config allows no variable
    assert "provider ok (stored at run time): format=openai" in check.stdout
    assert "resolve ok-model -> ok/ok-model" in check.stdout, check.stdout  # resolved as the server would
    assert "sk-fine" not in check.stdout


def test_a_store_that_is_down_or_misnamed(tmp_path: Path) -> None:
    from tests.redis_server import free_port

    path = tmp_path / "relay.toml"
    path.write_text(f'[store]\nurl = "redis://:pw-not-shown@127.0.0.1:{free_port()}/0"\n')
    check = relay("check", config=path)
    assert check.returncode == 1 and "unreachable" in check.stdout and "pw-not-shown" not in check.stdout
    keys = relay("keys", "list", config=path)
    assert keys.returncode == 1 and "redis://:***@127.0.0.1" in keys.stderr and "Traceback" not in keys.stderr
    for url, why in (("redis://h:6379/x", "the database must be a number"), ("postgres://h/db", "expected sqlite"),
                     ("sqlite://", "no file")):
        path.write_text(f'[store]\nurl = "{url}"\n')
        out = relay("check", config=path)
        assert out.returncode == 2 and "store.url" in out.stderr and why in out.stderr, out.stderr
