"""Starting the mock upstream and the relay as separate processes, and reading their costs from /proc.

Separate processes because the figures are about relay alone: its CPU time and RSS are read from
``/proc/<pid>/stat`` and ``/proc/<pid>/status`` (summed over its worker processes), which only works when
nothing else shares its interpreter. Linux only, as is this machine.
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import orjson

from bench import _net

ROOT = Path(__file__).resolve().parent.parent
_TICK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def free_port() -> int:
    """A port nothing listens on right now (the tiny race with other programs is acceptable here)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _ppids() -> dict[int, int]:
    out: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            out[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    return out


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (relay's ``--workers`` children count as relay)."""
    children: dict[int, list[int]] = {}
    for child, parent in _ppids().items():
        children.setdefault(parent, []).append(child)
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo += children.get(p, [])
    return found


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time consumed so far by ``pids`` (vanished ones count as 0)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / _TICK


def rss_bytes(pids: list[int]) -> int:
    """Resident set size summed over ``pids``, from ``/proc/<pid>/statm`` (cheap enough to poll)."""
    total = 0
    for pid in pids:
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1])
        except (OSError, IndexError, ValueError):
            continue
    return total * _PAGE


def machine_busy() -> tuple[int, int]:
    """(busy, total) jiffies over all cores: shows how much else the machine was doing during a phase."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    total = sum(fields)
    return total - fields[3] - fields[4], total


def cores(busy: int, total: int) -> float:
    """Busy jiffies over total jiffies (all cores), as a number of busy cores."""
    return busy / max(1, total) * (os.cpu_count() or 1)


def busy_cores(seconds: float) -> float:
    """How many cores the machine keeps busy over ``seconds`` (used to warn that figures will be noisy)."""
    busy0, all0 = machine_busy()
    time.sleep(seconds)
    busy1, all1 = machine_busy()
    return cores(busy1 - busy0, all1 - all0)


class RssSampler:
    """Peak RSS of some processes while a phase runs, polled from a thread every ``interval`` seconds."""

    def __init__(self, pids: list[int], interval: float = 0.02) -> None:
        self.pids = pids
        self.interval = interval
        self.peak = rss_bytes(pids)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss_bytes(self.pids))

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes(self.pids))


class Child:
    """A child process with its stderr in a log file, stopped by its own pid only."""

    def __init__(self, name: str, argv: list[str], stdout: int | None = None, owns: Path | None = None,
                 cwd: str | None = None) -> None:
        self.name = name
        self.owns = owns  #: a file (relay's config) removed when the process is stopped
        self.log_path = Path(tempfile.mkstemp(prefix=f"bench-{name}-", suffix=".log")[1])
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(argv, cwd=cwd or ROOT, stdout=stdout, stderr=self._log, preexec_fn=_net.raise_fd_limit)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, lines: int = 20) -> str:
        self._log.flush()
        text = self.log_path.read_text(errors="replace").strip().splitlines()
        return "\n".join(text[-lines:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        self.log_path.unlink(missing_ok=True)
        if self.owns is not None:
            self.owns.unlink(missing_ok=True)


def _start_ready(name: str, argv: list[str], cwd: str | None = None) -> tuple[Child, int]:
    """Start a harness server that prints ``READY <port>`` once listening; returns it and the port."""
    child = Child(name, argv, stdout=subprocess.PIPE, cwd=cwd)
    assert child.proc.stdout is not None
    line = child.proc.stdout.readline().decode().split()
    if len(line) != 2 or line[0] != "READY":
        child.stop()
        raise RuntimeError(f"{name} did not start: {line!r}\n{child.log_tail()}")
    return child, int(line[1])


def start_tls_front(upstream_port: int, cert: Path, key: Path) -> tuple[Child, int]:
    """Start ``bench.tls_front`` (HTTPS with this certificate) before the mock; returns it and its port."""
    return _start_ready("tls-front", [sys.executable, "-m", "bench.tls_front", "--upstream-port", str(upstream_port),
                                      "--cert", str(cert), "--key", str(key)])


def start_upstream(profiles: dict[str, dict[str, object]]) -> tuple[Child, int]:
    """Start ``bench.upstream`` with these profiles; returns it and the port it listens on."""
    return _start_ready("upstream", [sys.executable, "-m", "bench.upstream", "--port", "0",
                                     "--profiles", orjson.dumps(profiles).decode()])


def start_pipe(upstream_port: int) -> tuple[Child, int]:
    """Start ``bench.pipe`` (the floor: bytes copied, nothing parsed) in front of the mock."""
    return _start_ready("pipe", [sys.executable, "-m", "bench.pipe", "--upstream-port", str(upstream_port)])


STACK_ROOT = "RELAY_BENCH_STACK_ROOT"  # a checkout whose ``stack`` (and relay pool under it) runs instead of this one's

#: Issue 17's burst target: relay's CPU per request "no more than today's ``stack`` figure", the day it was filed.
#: ``stack`` runs on relay's own pool, head writer and body reader, so it got cheaper as relay did; the floor of
#: that day is ``stack`` at the commit the issue's figures were measured from.
ISSUE17_FLOOR = "17a9cf9f5fdc04dac122a7e80fa0856a46a7ebd6"


def checkout(commit: str, into: Path) -> Path:
    """This repository's ``relay/`` and ``bench/`` as they were at ``commit`` (``git archive``), written under
    ``into``; RuntimeError saying why when git or the commit is not there (a shallow clone, an unpacked sdist)."""
    dest = into / commit[:12]
    if (dest / "bench" / "stack.py").exists():
        return dest
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", commit, "relay", "bench"],
                             capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RuntimeError(f"git archive {commit[:12]}: {exc}") from exc
    if out.returncode:
        raise RuntimeError(f"git archive {commit[:12]}: {out.stderr.decode(errors='replace').strip()[:200]}")
    with tarfile.open(fileobj=io.BytesIO(out.stdout)) as tar:
        tar.extractall(dest, filter="data")
    return dest


def start_stack(upstream_port: int, root: Path | None = None) -> tuple[Child, int]:
    """Start ``bench.stack`` (the library floor: h11 + httpcore, nothing else) in front of the mock; from the
    checkout ``root`` or ``$RELAY_BENCH_STACK_ROOT`` names, if given: the libraries as relay used them at another
    commit."""
    return _start_ready("stack", [sys.executable, "-m", "bench.stack", "--upstream-port", str(upstream_port)],
                        cwd=str(root) if root else os.environ.get(STACK_ROOT) or None)


class RelayUnavailable(RuntimeError):
    """relay could not be started (not written yet, a broken config, ...); the message says why."""


def relay_supports_workers() -> bool:
    """Whether ``relay serve`` knows ``--workers`` (it may come later than the rest)."""
    try:
        out = subprocess.run(
            [sys.executable, "-m", "relay", "serve", "--help"], cwd=ROOT, capture_output=True, timeout=30, text=True
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "--workers" in out.stdout


def relay_config(upstream_port: int, profile: str, store: str = "", ca_file: str = "") -> str:
    """A relay config whose one provider is the mock upstream's ``profile``; ``store``: a store url (with a
    config key, ``bench``, and a price for the model, so every request is booked with a cost), else no store;
    ``ca_file``: the upstream is HTTPS (``bench.tls_front``), with this CA."""
    server = 'api_keys = ["bench"]\n' if store else 'usage_db = ""\n'  # no store: stays out of the user's usage book
    return (
        "[server]\n"
        'host = "127.0.0.1"\n'
        "port = 8787\n"
        + server
        + (f'[store]\nurl = "{store}"\n' if store else "")
        + "[providers.mock]\n"
        'format = "openai"\n'
        f'base_url = "{"https" if ca_file else "http"}://127.0.0.1:{upstream_port}/p/{profile}/v1"\n'
        + (f'ca_file = "{ca_file}"\n' if ca_file else "") +
        'api_key = "x"\n'
        'models = ["mock-model"]\n'
        "max_connections = 4096\n"  # measure relay, not its per-provider cap (1,024 by default)
        + ('prices = { "mock-model" = { input = 1, output = 2 } }\n' if store else "")
        + "[routes]\n"
        'default = "mock/mock-model"\n'
    )


def start_relay(upstream_port: int, profile: str, workers: int = 1, timeout: float = 20.0,
                store: str = "") -> tuple[Child, int]:
    """Start ``relay serve`` in front of the mock and wait for ``GET /health``; raises RelayUnavailable."""
    config = Path(tempfile.mkstemp(prefix="bench-relay-", suffix=".toml")[1])
    config.write_text(relay_config(upstream_port, profile, store))
    port = free_port()
    argv = [sys.executable, "-m", "relay", "serve", "-c", str(config), "--host", "127.0.0.1", "--port", str(port),
            "--log-level", "warning"]
    if workers > 1:
        argv += ["--workers", str(workers)]
    child = Child("relay", argv, owns=config)
    deadline = time.monotonic() + timeout
    try:
        while True:
            if child.proc.poll() is not None:
                raise RelayUnavailable(f"relay exited with {child.proc.returncode}:\n{child.log_tail()}")
            if _healthy(port):
                return child, port
            if time.monotonic() > deadline:
                raise RelayUnavailable(f"relay did not answer /health within {timeout:.0f} s:\n{child.log_tail()}")
            time.sleep(0.05)
    except BaseException:
        child.stop()
        raise


def _healthy(port: int) -> bool:
    """GET /health over a plain socket (urllib would honour proxy variables meant for the outside)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            return sock.recv(64).startswith((b"HTTP/1.1 200", b"HTTP/1.0 200"))
    except OSError:
        return False


def create_virtual_key(upstream_port: int, profile: str, store: str) -> str:
    """``relay keys create`` in ``store``: a virtual key with every limit and a budget set (so every request is
    checked against all of them) but too high to refuse anything. Returns its secret."""
    config = Path(tempfile.mkstemp(prefix="bench-keys-", suffix=".toml")[1])
    try:
        config.write_text(relay_config(upstream_port, profile, store))
        out = subprocess.run(
            [sys.executable, "-m", "relay", "keys", "create", "bench-limited", "--models", "mock/*", "--rpm", "100000000",
             "--tpm", "100000000000", "--max-streams", "100000", "--budget", "1000000", "-c", str(config)],
            cwd=ROOT, capture_output=True, text=True, timeout=60)
    finally:
        config.unlink(missing_ok=True)
    if out.returncode != 0:
        raise RelayUnavailable(f"relay keys create failed ({out.returncode}): {out.stderr.strip()[-500:]}")
    return out.stdout.strip().splitlines()[-1]


def start_redis(folder: Path) -> tuple[Child, int] | None:
    """A redis-server on a free loopback port, persistence off (the bench measures relay, not disks); None
    when the binary is missing (``make test`` installs Debian's package)."""
    binary = shutil.which("redis-server") or ("/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None)
    if binary is None:
        return None
    port = free_port()
    child = Child("redis", [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder), "--save", "",
                            "--appendonly", "no", "--protected-mode", "no"], stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and child.proc.poll() is None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return child, port
        except OSError:
            time.sleep(0.05)
    child.stop()
    raise RuntimeError(f"redis-server did not answer on port {port}:\n{child.log_tail()}")
