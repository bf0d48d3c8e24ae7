"""`make bench-smoke` runs in the suite so the benchmark harness cannot rot unnoticed.

It starts the real pieces (mock upstream, relay, the bench.pipe and bench.stack floors, bench.stack as it was
when issue 17 was filed, load processes, a redis-server for the store scenario) as the full benchmark does, with tiny counts,
and checks that every path of every scenario completed its requests without a single error.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from bench.callgrind import ask, request, server_argv, wait_port
from bench.procs import free_port, start_tls_front, start_upstream
from bench.tls_front import make_certificate

ROOT = Path(__file__).resolve().parent.parent


def test_bench_smoke_runs_clean(tmp_path: Path) -> None:
    state = tmp_path / "state"  # where relay would keep its usage book (XDG_STATE_HOME)
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--results-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "XDG_STATE_HOME": str(state)},
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    files = list(tmp_path.glob("bench-*-smoke.json"))
    assert len(files) == 1, proc.stdout[-3000:]
    results = json.loads(files[0].read_text())

    phases = results["phases"]
    assert {p["scenario"] for p in phases} == {"burst", "bodies", "paced", "store"}
    # the store's cost: relay without a store, then SQLite and Redis each with a config key and a virtual key
    # (refused or unknown, the virtual key's requests would be errors below)
    assert {p["path"] for p in phases if p["scenario"] == "store"} == {"relay", "sqlite", "sqlite+vkey", "redis",
                                                                        "redis+vkey"}
    assert {p["path"] for p in phases} >= {"direct", "relay", "pipe", "stack"}
    assert {p["scenario"] for p in phases if p["path"] == "pipe"} == {"burst", "paced"}  # the byte floor
    assert {p["scenario"] for p in phases if p["path"] == "stack"} == {"burst", "bodies", "paced"}  # the libraries
    # issue 17's floor, stack as it was the day the issue was filed, from git (a note says why if it was not)
    assert {p["scenario"] for p in phases if p["path"] == "stack@filed"} == {"burst"}, results["notes"]
    for phase in phases:
        where = f"{phase['scenario']} {phase['case']} {phase['path']}"
        assert phase["errors"] == 0, f"{where}: {phase['error_kinds']}"
        assert phase["requests"] > 0, where
    assert {c["case"] for c in results["cases"] if c["scenario"] == "bodies"} == {"10 KiB", "100 KiB", "100 KiB unicode",
                                                                                            "100 KiB cold"}
    for case in results["cases"]:
        relay = case["paths"]["relay"]
        assert relay["relay_rss_peak"] > 0, case["case"]  # /proc sampling found the relay process
    assert results["targets"], "targets section missing"
    assert sum(t["target"].startswith("store (") and t["figure"] is not None for t in results["targets"]) == 6
    assert not (state / "relay").exists(), "the bench's relays wrote to the user's usage book"


def test_bench_pieces_run() -> None:
    """`python -m bench.pieces` (relay's per-request set-up, piece by piece) keeps working as relay changes: each
    piece runs a few times in process, as it would under callgrind."""
    for piece in ("setup", "build", "fit", "translator", "stream", "done"):
        proc = subprocess.run([sys.executable, "-m", "bench.pieces", piece, "3"], cwd=ROOT, capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 0, f"{piece}:\n{proc.stderr[-3000:]}"


def test_the_tls_front_serves_relay_and_stack(tmp_path: Path) -> None:
    """``bench.callgrind --tls`` puts ``bench.tls_front`` before the mock: relay and ``stack`` each stream a
    paced answer from it over HTTPS, chunk by chunk, as ``bench.callgrind`` asks them (its own request and wait)."""
    upstream, upstream_port = start_upstream({"default": {"chunks": 5, "delay": 0.01}})
    cert, key = make_certificate(tmp_path)
    front, front_port = start_tls_front(upstream_port, cert, key)
    try:
        for target in ("relay", "stack"):
            port = free_port()
            proc = subprocess.Popen(server_argv(target, front_port, port, tmp_path / "relay.toml", str(cert)), cwd=ROOT,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            try:
                wait_port(port, proc, 30)
                with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                    for _ in range(2):  # the second on the kept-alive TLS connection
                        ask(sock, request(target))
            finally:
                proc.terminate()
                _, err = proc.communicate(timeout=10)
            assert b"Traceback" not in err, err.decode()[-2000:]
    finally:
        front.stop()
        upstream.stop()


def test_issue_17_targets_are_read_within_the_run() -> None:
    """Issue 17's targets come out of one run's figures: 1 MiB added first byte, burst CPU against the filing
    day's `stack` (today's shown beside it, for reference), paced c=256 stalls (judged only where `direct` held 256), TTFB added at 128 starts."""
    from bench import report
    from bench.runner import FULL

    def case(scenario: str, name: str, paths: dict[str, dict[str, float]],
             ratios: dict[str, dict[str, float]] | None = None) -> dict[str, object]:
        return {"scenario": scenario, "case": name, "level": 0, "paths": paths, "ratios": ratios or {}}

    def verdicts(cases: list[dict[str, object]]) -> dict[str, tuple[object, object]]:
        got = report._targets({"cases": cases}, FULL)
        named = {"TTFB added, c=1, 1 MiB": "1 MiB", "burst c=10: relay CPU per request / stack@filed":
                 "burst", "burst c=10: relay CPU per request / bench.stack": "burst today", "paced c=256": "c=256",
                 "paced c=128": "c=128"}
        return {short: (t["figure"], t["met"]) for t in got for start, short in named.items()
                if t["target"].startswith(start)}

    calm = {"stalled": 0, "errors": 0}
    cases = [
        case("bodies", "1024 KiB", {}, {"relay": {"added_ttfb_p50_ms": 3.5, "added_ttfb_p99_ms": 5.0}}),
        case("burst", "c=10", {"relay": {"relay_cpu_us_per_request": 300.0},
                               "stack": {"relay_cpu_us_per_request": 250.0},
                               "stack@filed": {"relay_cpu_us_per_request": 400.0}}),
        case("paced", "c=256", {"direct": calm, "relay": {"stalled": 3, "errors": 0}}),
        case("paced", "c=128", {"direct": calm, "relay": calm}, {"relay": {"added_ttfb_p50_ms": 7.0}}),
    ]
    v = verdicts(cases)
    assert v == {"1 MiB": (3.5, True), "burst": (0.75, True), "burst today": (1.2, None), "c=256": (3, False),
                 "c=128": (7.0, True)}
    cases[1]["paths"]["stack@filed"] = {"relay_cpu_us_per_request": 240.0}  # type: ignore[index]
    assert verdicts(cases)["burst"] == (1.25, False)
    cases[2]["paths"]["direct"] = {"stalled": 1, "errors": 0}  # type: ignore[index]  # the host did not hold 256
    assert verdicts(cases)["c=256"] == (3, None)
    assert verdicts([]) == {"1 MiB": (None, None), "burst": (None, None), "burst today": (None, None),
                            "c=256": (None, None), "c=128": (None, None)}
