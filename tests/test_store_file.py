"""The SQLite store holds stored upstream keys and virtual keys' digests: its file (and the -wal and -shm files
sqlite makes beside it, which take the file's mode) is readable by its owner only, whatever the umask."""

from __future__ import annotations

import os
import sqlite3
import stat
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest

from relay.store.sqlite import SQLiteBackend


@pytest.fixture
def loose_umask() -> Iterator[None]:
    old = os.umask(0o022)  # the common default, under which a file is made -rw-r--r--
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> str:
    return stat.filemode(path.stat().st_mode)


async def test_the_store_file_is_made_for_its_owner_only(tmp_path: Path, loose_umask: None) -> None:
    path = tmp_path / "state" / "relay.sqlite3"
    store = SQLiteBackend(str(path))
    async with store:
        await store.put("providers", "p", b'{"api_key": ["sk-stored"]}', create=True)
    assert mode(path) == "-rw-------"
    with closing(sqlite3.connect(path, isolation_level=None)) as db:  # a connection open in WAL mode: -wal, -shm
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("INSERT INTO meta (name, value) VALUES ('probe', 1)")
        beside = [Path(f"{path}{end}") for end in ("-wal", "-shm")]
        assert all(p.exists() for p in beside)
        assert [mode(p) for p in beside] == ["-rw-------", "-rw-------"]
    assert await store.load("providers") == {"p": b'{"api_key": ["sk-stored"]}'}


async def test_an_existing_store_file_is_opened_as_it_is(tmp_path: Path, loose_umask: None) -> None:
    path = tmp_path / "relay.sqlite3"
    path.touch(0o640)  # the operator's choice (a group that reads the usage): left alone
    async with SQLiteBackend(str(path)):
        pass
    assert mode(path) == "-rw-r-----"
