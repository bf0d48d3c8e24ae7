"""`relay serve --workers N`: ``/metrics`` for the whole instance, whichever worker a scrape lands on.

The supervisor makes a run directory for the instance. Each worker writes its counters there as one file,
whole and renamed into place (a reader never sees half of one), every second and before it answers a
scrape; the scraped worker sums every file. A worker's file only grows, so the sum never goes back. When a
worker dies the supervisor folds its last file into ``retired.json`` (its counters, not its gauges: it has
no open streams any more), under an exclusive lock that scrapes take shared, so no scrape counts a worker
twice or not at all. What a killed worker counted after its last write (at most a second) is lost with it.
"""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
import trio

from relay.metrics import Metrics

log = logging.getLogger("relay.metrics")

RUN_DIR_ENV = "RELAY_RUN_DIR"  # set by the supervisor for its workers
RETIRED = "retired.json"
PUBLISH_EVERY = 1.0  # seconds: how stale another worker's share of a scrape can be


@contextmanager
def _locked(directory: Path, mode: int) -> Iterator[None]:
    with open(directory / ".lock", "a") as lock:
        fcntl.flock(lock, mode)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _write(path: Path, snap: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(orjson.dumps(snap))
    os.replace(tmp, path)


def _read(path: Path) -> dict[str, Any] | None:
    try:
        snap = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None  # gone between listing and reading (folded by the supervisor, which holds the lock then)
    return snap if isinstance(snap, dict) else None


class Board:
    """One worker's view of the run directory: it publishes its own counters and sums everyone's."""

    def __init__(self, directory: Path, metrics: Metrics) -> None:
        self.directory = directory
        self.metrics = metrics
        self.path = directory / f"{os.getpid()}.json"
        self.failed = False  # a write failed (logged once): metrics are never worth a worker

    @classmethod
    def from_env(cls, metrics: Metrics) -> Board | None:
        directory = os.environ.get(RUN_DIR_ENV)
        return cls(Path(directory), metrics) if directory else None

    def publish(self) -> bool:
        try:
            _write(self.path, self.metrics.snapshot())
        except OSError as exc:
            if not self.failed:
                log.error("cannot publish this worker's metrics to %s (%s): /metrics shows this worker alone",
                          self.directory, exc)
            self.failed = True
            return False
        self.failed = False
        return True

    def render(self) -> bytes:
        """The instance's metrics: this worker's as of now, the others' as last published, the dead's as left
        (this worker's alone when the run directory cannot be used)."""
        if not self.publish():
            return self.metrics.render()
        total = Metrics(self.metrics.configured)
        try:
            with _locked(self.directory, fcntl.LOCK_SH):
                for path in sorted(self.directory.glob("*.json")):
                    snap = _read(path)
                    if snap is not None:
                        total.absorb(snap, live=path.name != RETIRED)
        except OSError:
            return self.metrics.render()
        return total.render()

    async def run(self) -> None:
        """Publish every second until cancelled, then once more (a worker that drains leaves its last counts)."""
        try:
            while True:
                self.publish()
                await trio.sleep(PUBLISH_EVERY)
        finally:
            self.publish()


def retire(directory: Path, pid: int) -> None:
    """Fold a dead worker's last counters into the retired totals (the supervisor calls it on a worker's exit)."""
    path = directory / f"{pid}.json"
    with _locked(directory, fcntl.LOCK_EX):
        snap = _read(path)
        if snap is not None:
            retired = Metrics()
            for source in (_read(directory / RETIRED), snap):
                if source is not None:
                    retired.absorb(source, live=False)
            _write(directory / RETIRED, retired.snapshot())
        path.unlink(missing_ok=True)
        path.with_name(f".{path.name}.tmp").unlink(missing_ok=True)
