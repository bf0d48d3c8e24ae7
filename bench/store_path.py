"""Micro-benchmark of the store's share of a request on relay's request path, alone: what ``Gateway.admit`` and
``Gateway.finish`` (the server's two calls) cost for a config key and for a virtual key with every limit and a
budget set. The request path only touches the store's in-memory view (relay.store), so this is its whole
per-request cost there; the background rounds with the store are measured end to end by the ``store`` scenario.

CPU time is ``time.process_time``, the best of ten slices (this VM's speed swings between seconds). The SQLite
file is never opened: nothing here does I/O.

Run alone: ``python -m bench.store_path [--seconds 1]``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from relay.config import ClientKey, parse
from relay.gateway import Gateway
from relay.limits import Limits
from relay.metrics import Metrics
from relay.store import VirtualKey, digest

from bench.procs import relay_config

LIMITS = Limits(rpm=100_000_000, tpm=100_000_000_000, max_streams=100_000, budget=1_000_000.0)


def _one_request(gateway: Gateway, key: ClientKey) -> None:
    gateway.admit(key, "mock-model")
    gateway.finish(key, True, "mock-model", "mock/mock-model", 200, 120, 30, False, 0, 0)


def measure(gateway: Gateway, key: ClientKey, seconds: float) -> float:
    """Microseconds of CPU per request (admit + finish), the best of ten slices of ``seconds / 10``."""
    best = float("inf")
    for _ in range(10):
        n, start = 0, time.process_time()
        while True:
            for _ in range(200):
                _one_request(gateway, key)
            n += 200
            spent = time.process_time() - start
            if spent >= seconds / 10:
                break
        best = min(best, spent / n * 1e6)
    return best


def run(seconds: float = 1.0) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-store-") as folder:
        config = parse(relay_config(1, "store", f"sqlite://{Path(folder) / 'relay.sqlite3'}"))
        gateway = Gateway(config, Metrics(["mock-model"]))
        assert gateway.view is not None
        secret = "rk-bench"
        limited = VirtualKey(key="", name="bench-limited", models=("mock/*",), digest=digest(secret), limits=LIMITS)
        gateway.view.keys[limited.digest] = gateway.view.by_name[limited.name] = limited
        configured = config.keys[0] if config.keys else ClientKey(key="bench", name="bench")
        config_us = measure(gateway, configured, seconds)
        limited_us = measure(gateway, limited, seconds)
    return {"config_key_us": config_us, "virtual_key_us": limited_us, "added_us": limited_us - config_us}


def format_results(results: dict[str, Any]) -> str:
    return (f"store on the request path alone (admit + finish, CPU per request, best of ten slices): config key "
            f"{results['config_key_us']:.1f} us, limited virtual key {results['virtual_key_us']:.1f} us "
            f"({results['added_us']:+.1f} us)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=1.0)
    print(format_results(run(parser.parse_args().seconds)))
