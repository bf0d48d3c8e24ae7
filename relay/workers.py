"""`relay serve --workers N`: N worker processes sharing one port (SO_REUSEPORT), supervised.

The supervisor holds the port (bound, not listening) so it cannot be taken between restarts, starts the
workers, replaces any that die, and forwards SIGTERM/SIGINT (drain) and SIGHUP (reload) to all of them.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

from relay.transport import reuse_port_socket

RESTART_BACKOFF = 1.0


def supervise(workers: int, host: str, port: int, worker_args: list[str]) -> int:
    reserved = reuse_port_socket(host, port)
    port = reserved.getsockname()[1]
    command = [sys.executable, "-m", "relay", "serve", *worker_args, "--host", host, "--port", str(port), "--reuse-port"]
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
    procs = [subprocess.Popen(command) for _ in range(workers)]
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
                    time.sleep(RESTART_BACKOFF)
                    procs[i] = subprocess.Popen(command)
        for proc in procs:
            proc.wait()
        return 0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        reserved.close()
