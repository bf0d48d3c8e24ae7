"""`relay serve --workers N`: N worker processes sharing one port (SO_REUSEPORT), supervised.

The supervisor holds the port (bound, not listening) so it cannot be taken between restarts, starts the
workers, replaces any that die, and forwards SIGTERM/SIGINT (drain) and SIGHUP (reload) to all of them.
It also gives them a run directory where each publishes its metrics (relay/instance_metrics.py).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from relay.instance_metrics import RUN_DIR_ENV, retire
from relay.transport import reuse_port_socket

RESTART_BACKOFF = 1.0


def supervise(workers: int, host: str, port: int, worker_args: list[str]) -> int:
    reserved = reuse_port_socket(host, port)
    port = reserved.getsockname()[1]
    command = [sys.executable, "-m", "relay", "serve", *worker_args, "--host", host, "--port", str(port), "--reuse-port"]
    run_dir = Path(tempfile.mkdtemp(prefix="relay-workers-"))  # the workers' metrics, summed by whichever is scraped
    env = {**os.environ, RUN_DIR_ENV: str(run_dir)}
    procs: list[subprocess.Popen[bytes]] = []
    stopping = False

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        if signum in (signal.SIGTERM, signal.SIGINT):
            stopping = True
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    procs = [subprocess.Popen(command, env=env) for _ in range(workers)]
    print(f"relay: listening on http://{host}:{port} with {workers} workers", file=sys.stderr, flush=True)
    try:
        while True:
            time.sleep(0.2)
            if stopping:
                break
            for i, proc in enumerate(procs):
                code = proc.poll()
                if code is not None:
                    print(f"relay: worker {proc.pid} exited with {code}; starting another", file=sys.stderr, flush=True)
                    retire(run_dir, proc.pid)
                    time.sleep(RESTART_BACKOFF)
                    procs[i] = subprocess.Popen(command, env=env)
        for proc in procs:
            proc.wait()
        return 0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        reserved.close()
        shutil.rmtree(run_dir, ignore_errors=True)
