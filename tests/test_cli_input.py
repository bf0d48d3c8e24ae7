"""What the CLI refuses and how it ends: a key expiring in the past, an empty model list (it would allow every
model), a --since that is no date; echoed input cut short; `relay ... | head` ending quietly."""

from __future__ import annotations

import calendar
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from relay.store import connected, create_key


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "relay.toml"
    path.write_text(f'[store]\nurl = "sqlite://{tmp_path / "relay.sqlite3"}"\n\n'
                    '[providers.p]\nbase_url = "http://127.0.0.1:9/v1"\nmodels = ["m"]\n')
    return path


def relay(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "relay", *args, "-c", str(config)], capture_output=True, text=True,
                          timeout=60)


def piped(config: Path, args: str) -> subprocess.CompletedProcess[str]:
    """``relay ARGS | head -1``: head leaves after one line, so relay's later writes meet a closed pipe."""
    return subprocess.run(f"{sys.executable} -m relay {args} -c {config} | head -1", shell=True, capture_output=True,
                          text=True, timeout=120)


def test_a_key_cannot_be_made_to_expire_in_the_past(config: Path) -> None:
    past = relay(config, "keys", "create", "x", "--expires", "2001-01-01")
    assert past.returncode == 2 and "2001-01-01 has passed" in past.stderr and "revoke" in past.stderr
    assert "x " not in relay(config, "keys", "list").stdout
    today = time.strftime("%Y-%m-%d", time.gmtime())
    made = relay(config, "keys", "create", "x", "--expires", today)
    assert made.returncode == 0 and f"(rk-" in made.stdout and "active)" in made.stdout, made.stderr
    later = relay(config, "keys", "set", "x", "--expires", "2999-1-2")  # written back as YYYY-MM-DD
    assert later.returncode == 0 and "expires=2999-01-02" in later.stdout, later.stderr
    again = relay(config, "keys", "set", "x", "--expires", "2001-01-01")
    assert again.returncode == 2 and "has passed" in again.stderr
    assert "expires=2999-01-02" in relay(config, "keys", "set", "x", "--rpm", "5").stdout


def test_an_expired_key_is_not_described_as_active(config: Path) -> None:
    async def store_expired() -> None:
        key, _ = create_key("old", {"expires": "2001-01-01"}, calendar.timegm((2000, 6, 1, 0, 0, 0)))  # made then
        async with connected(f"sqlite://{config.parent / 'relay.sqlite3'}") as backend:
            await backend.put_key(key, create=True)

    trio.run(store_expired)
    changed = relay(config, "keys", "set", "old", "--rpm", "3")
    assert changed.returncode == 0 and "(rk-" in changed.stdout and ", expired)" in changed.stdout, changed.stdout


def test_an_empty_model_list_is_refused_not_read_as_every_model(config: Path) -> None:
    assert relay(config, "keys", "create", "alice", "--models", "m").returncode == 0
    for empty in ("", " , ,"):
        answer = relay(config, "keys", "set", "alice", "--models", empty)
        assert answer.returncode == 2 and "names no model; write '*' for every model" in answer.stderr
        assert relay(config, "keys", "list").stdout.splitlines()[1].split()[3] == "m"  # unchanged
    every = relay(config, "keys", "set", "alice", "--models", "*")
    assert every.returncode == 0 and "models=*" in every.stdout


@pytest.mark.parametrize("since", ["garbage", "2026-13-01", "2026-02-30", ""])
def test_usage_since_must_be_a_date(config: Path, since: str) -> None:
    answer = relay(config, "usage", "--since", since)
    assert answer.returncode == 2 and "--since: expected a date YYYY-MM-DD" in answer.stderr, answer.stderr
    assert answer.stdout == ""


def test_usage_since_a_date(config: Path) -> None:
    answer = relay(config, "usage", "--since", "2026-1-5")
    assert answer.returncode == 0 and answer.stdout.split()[:2] == ["key", "model"], answer.stderr


def test_echoed_input_is_cut(config: Path) -> None:
    name = "n" * 5000
    for args in (["keys", "create", name], ["keys", "set", name, "--rpm", "3"], ["keys", "revoke", name],
                 ["keys", "create", "ok", "--rpm", "x" * 5000], ["keys", "create", "ok", "--expires", "9" * 5000],
                 ["usage", "--since", "9" * 5000], ["keys", "create", "bad\x1b[31m" + "n" * 100]):
        answer = relay(config, *args)
        assert answer.returncode in (1, 2) and len(answer.stderr) < 1000, (args[:2], answer.stderr[:300])
        assert "n" * 100 not in answer.stderr and "\x1b" not in answer.stderr
    check = relay(config, "check", "m" * 5000)
    assert check.returncode == 1 and len(check.stdout) < 5000 and "m" * 201 not in check.stdout


def test_a_closed_pipe_ends_the_listing_commands_quietly(config: Path) -> None:
    async def many_keys() -> None:  # more lines than a pipe buffer holds
        async with connected(f"sqlite://{config.parent / 'relay.sqlite3'}") as backend:
            for n in range(800):
                key, _ = create_key(f"key{n:04}", {"models": ["model-" + "x" * 50]}, time.time())
                await backend.put_key(key, create=True)

    trio.run(many_keys)
    listed = piped(config, "keys list")
    assert listed.stdout.startswith("name ") and listed.stderr == "", listed.stderr
    models = " ".join(f"p/model-{n}" for n in range(3000))  # 3000 resolve lines
    checked = piped(config, f"check {models}")
    assert checked.stdout.startswith("config: ") and checked.stderr == "", checked.stderr
    for args in ("keys list", f"check {models}"):  # and relay's own status: what SIGPIPE would have made it
        status = subprocess.run(f"set -o pipefail; {sys.executable} -m relay {args} -c {config} | head -1 >/dev/null",
                                shell=True, executable="/bin/bash", capture_output=True, text=True, timeout=120)
        assert status.returncode == 141 and status.stderr == "", (status.returncode, status.stderr)
    assert os.path.exists(config)
