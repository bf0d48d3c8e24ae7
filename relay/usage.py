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
    estimated_input_tokens INTEGER NOT NULL DEFAULT 0, estimated_output_tokens INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (key, model, day)
)
"""
# Tokens the upstream reported go in input_tokens/output_tokens; relay's estimates for answers that came without
# usage (llama-cpp-python's streams) go in their own columns, so a count is never a guess in disguise. Books written
# before these columns existed gain them on the next write and read as zero until then.
ESTIMATE_COLUMNS = ("estimated_input_tokens", "estimated_output_tokens")
UPSERT = """
INSERT INTO usage (key, model, day, requests, input_tokens, output_tokens, estimated_input_tokens,
                   estimated_output_tokens) VALUES (?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (key, model, day) DO UPDATE SET
    requests = requests + excluded.requests,
    input_tokens = input_tokens + excluded.input_tokens,
    output_tokens = output_tokens + excluded.output_tokens,
    estimated_input_tokens = estimated_input_tokens + excluded.estimated_input_tokens,
    estimated_output_tokens = estimated_output_tokens + excluded.estimated_output_tokens
"""
Row = tuple[str, str, str, int, int, int, int, int]  # key, model, day, requests, in, out, estimated in, estimated out


def default_path() -> str:
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(state, "relay", "usage.sqlite3")


class UsageBook:
    def __init__(self, path: str) -> None:
        self.path = path
        self._pending: dict[tuple[str, str, str], list[int]] = defaultdict(lambda: [0, 0, 0, 0, 0])

    def add(self, key: str, model: str, input_tokens: int | None, output_tokens: int | None,
            estimated: bool = False) -> None:
        row = self._pending[(key, model, time.strftime("%Y-%m-%d", time.gmtime()))]
        row[0] += 1
        at = 3 if estimated else 1
        row[at] += input_tokens or 0
        row[at + 1] += output_tokens or 0

    def take(self) -> list[Row]:
        rows = [(*k, *v) for k, v in self._pending.items()]
        self._pending.clear()
        return rows  # type: ignore[return-value]

    def write(self, rows: list[Row]) -> None:
        """Blocking: run it in a thread."""
        if not rows:
            return
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        with closing(sqlite3.connect(self.path, timeout=10)) as db, db:  # commit, then close the file
            db.execute(SCHEMA)
            have = _estimate_columns(db)
            for column in (c for c in ESTIMATE_COLUMNS if c not in have):  # a book from before the columns
                db.execute(f"ALTER TABLE usage ADD COLUMN {column} INTEGER NOT NULL DEFAULT 0")
            db.executemany(UPSERT, rows)


def _estimate_columns(db: sqlite3.Connection) -> list[str]:
    have = {row[1] for row in db.execute("PRAGMA table_info(usage)")}
    return [c for c in ESTIMATE_COLUMNS if c in have]


def report(paths: list[str], since: str | None = None) -> list[tuple[str, str, int, int, int, int, int]]:
    """(key, model, requests, input_tokens, output_tokens, estimated input, estimated output) summed over the
    files and days given."""
    totals: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0, 0, 0])
    for path in paths:
        if not os.path.exists(path):
            continue
        with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            estimates = [f"SUM({c})" for c in _estimate_columns(db)] + ["0"] * 2
            query = ("SELECT key, model, SUM(requests), SUM(input_tokens), SUM(output_tokens), "
                     + ", ".join(estimates[:2]) + " FROM usage")
            args: tuple[str, ...] = ()
            if since:
                query += " WHERE day >= ?"
                args = (since,)
            for key, model, *numbers in db.execute(query + " GROUP BY key, model", args):
                row = totals[(key, model)]
                for i, value in enumerate(numbers):
                    row[i] += value
    return sorted(((k, m, *v) for (k, m), v in totals.items()),  # type: ignore[misc]
                  key=lambda r: (r[0], -(r[4] + r[6])))
