"""Per-key usage totals (requests and tokens by model and day) in an embedded SQLite file.

Requests add to an in-memory tally; a flush every few seconds (in a worker thread, so the event loop never
waits on the disk) folds it into the file with one UPSERT per row. A team sharing one relay can see who used
what with `relay usage`; several relays each keep a file and `relay usage --db a --db b` adds them up.
"""

from __future__ import annotations

import os
import sqlite3
from contextlib import closing
import time
from collections import defaultdict
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    key TEXT NOT NULL, model TEXT NOT NULL, day TEXT NOT NULL,
    requests INTEGER NOT NULL, input_tokens INTEGER NOT NULL, output_tokens INTEGER NOT NULL,
    PRIMARY KEY (key, model, day)
)
"""
UPSERT = """
INSERT INTO usage (key, model, day, requests, input_tokens, output_tokens) VALUES (?, ?, ?, ?, ?, ?)
ON CONFLICT (key, model, day) DO UPDATE SET
    requests = requests + excluded.requests,
    input_tokens = input_tokens + excluded.input_tokens,
    output_tokens = output_tokens + excluded.output_tokens
"""


def default_path() -> str:
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(state, "relay", "usage.sqlite3")


class UsageBook:
    def __init__(self, path: str) -> None:
        self.path = path
        self._pending: dict[tuple[str, str, str], list[int]] = defaultdict(lambda: [0, 0, 0])

    def add(self, key: str, model: str, input_tokens: int | None, output_tokens: int | None) -> None:
        row = self._pending[(key, model, time.strftime("%Y-%m-%d", time.gmtime()))]
        row[0] += 1
        row[1] += input_tokens or 0
        row[2] += output_tokens or 0

    def take(self) -> list[tuple[str, str, str, int, int, int]]:
        rows = [(*k, *v) for k, v in self._pending.items()]
        self._pending.clear()
        return rows  # type: ignore[return-value]

    def write(self, rows: list[tuple[str, str, str, int, int, int]]) -> None:
        """Blocking: run it in a thread."""
        if not rows:
            return
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        with closing(sqlite3.connect(self.path, timeout=10)) as db, db:  # commit, then close the file
            db.execute(SCHEMA)
            db.executemany(UPSERT, rows)


def report(paths: list[str], since: str | None = None) -> list[tuple[str, str, int, int, int]]:
    """(key, model, requests, input_tokens, output_tokens) summed over the files and days given."""
    totals: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0])
    for path in paths:
        if not os.path.exists(path):
            continue
        with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            query = "SELECT key, model, SUM(requests), SUM(input_tokens), SUM(output_tokens) FROM usage"
            args: tuple[str, ...] = ()
            if since:
                query += " WHERE day >= ?"
                args = (since,)
            for key, model, n, tin, tout in db.execute(query + " GROUP BY key, model", args):
                row = totals[(key, model)]
                row[0] += n
                row[1] += tin
                row[2] += tout
    return sorted(((k, m, *v) for (k, m), v in totals.items()), key=lambda r: (r[0], -r[2]))  # type: ignore[misc]
