"""The benchmark run: the same workload direct (client -> mock) and relayed (client -> relay -> mock),
interleaved round by round so that drift in the machine's speed hits both paths alike.

Scenarios (see ``bench/README.md``): ``burst`` (50-chunk streams, no delay, several concurrencies), ``bodies``
(Claude Code-shaped request bodies of growing size at concurrency 1), ``paced`` (64 chunks of 16 bytes every
20 ms, concurrency stepping up to 1,024). Burst and paced also run relay with 2 workers (when it has
``--workers``) and two floors: ``pipe`` (``bench.pipe``, bytes copied on relay's socket layer with nothing
parsed) and ``stack`` (``bench.stack``, h11 + relay's httpcore pool and nothing else: the libraries' own cost).
Burst also runs ``stack@filed``: ``stack`` as it was when issue 17 was filed (``procs.ISSUE17_FLOOR``, taken from
git), the floor that issue's burst target names.
Bodies run ``stack`` too: the TTFB those libraries add before relay does any work of its own.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench import _net, bodies, procs, report, store_path, translator
from bench.load import LoadPool, LoadSpec, Tally
from bench.report import DIRECT, PIPE, RELAY, RELAY2, STACK, STACK_FILED
from bench.upstream import Profile, stream_events

KIB = 1024
UNICODE_BODY = 100 * KIB  # the bodies scenario sends this size a second time with text beyond ASCII
STORES = ("sqlite", "redis")  # the store scenario's paths: each store with a config key, and "+vkey"
VKEY = "+vkey"


@dataclass(frozen=True)
class Plan:
    """How much of everything to run; :data:`FULL` fits in ~10 minutes here, :data:`SMOKE` in seconds."""

    rounds: int
    warmup: float  #: seconds of unrecorded load before a scenario's first phase
    burst_levels: tuple[int, ...]
    burst_seconds: float
    two_workers: bool  #: burst and paced also measure relay --workers 2 (when relay supports it)
    floor: bool  #: also measure the floors: bench.pipe (burst, paced) and bench.stack (burst, paced, bodies)
    body_sizes: tuple[int, ...]
    body_seconds: float
    paced_levels: tuple[int, ...]
    paced_chunks: int
    paced_streams: int  #: streams per client per phase
    translator_seconds: float
    store_levels: tuple[int, ...] = (1, 10)  #: concurrency: 1 for the TTFB a virtual key adds, 10 for req/s
    store_seconds: float = 2.0
    pace: float = 0.020
    timeout: float = 60.0


FULL = Plan(
    rounds=3, warmup=0.5,
    burst_levels=(1, 10, 100), burst_seconds=3.0, two_workers=True, floor=True,
    body_sizes=(10 * KIB, 100 * KIB, 400 * KIB, 1024 * KIB), body_seconds=2.0,
    paced_levels=(64, 128, 256, 512, 1024), paced_chunks=64, paced_streams=2,
    translator_seconds=1.0,
)
SMOKE = Plan(
    rounds=1, warmup=0.1,
    burst_levels=(1, 10), burst_seconds=0.3, two_workers=False, floor=True,
    body_sizes=(10 * KIB, 100 * KIB), body_seconds=0.3,
    paced_levels=(8, 32), paced_chunks=16, paced_streams=1,
    translator_seconds=0.05, store_seconds=0.3, timeout=20.0,
)
SCENARIOS = ("burst", "bodies", "paced", "store", "translator")


@dataclass
class Target:
    """Where one path's requests go and how its streams end."""

    port: int
    path: str
    marker: str
    headers: dict[str, str] = field(default_factory=dict)
    child: procs.Child | None = None  #: the relay process, whose CPU and RSS are measured


@dataclass(frozen=True)
class Case:
    """One row of the report: a scenario at one level, with the load spec of each path."""

    scenario: str  #: also the mock upstream profile it uses
    label: str
    level: int  #: concurrency, or body size for ``bodies``
    specs: dict[str, LoadSpec]
    load_procs: int = 1
    idle_rss: dict[str, int] = field(default_factory=dict)  #: relay RSS before the scenario, by path


@dataclass
class Phase:
    """One measured run of one path: the raw tally plus what /proc said."""

    scenario: str
    case: str
    level: int
    path: str
    round: int
    tally: Tally
    chunks_per_stream: int
    relay_cpu: float = 0.0
    relay_rss_idle: int = 0
    relay_rss_peak: int = 0
    harness_cpu: float = 0.0  #: cores used by the mock upstream, the load processes and idle relays in the phase
    machine_busy: float = 0.0  #: cores busy on the whole machine during the phase

    @property
    def other_load(self) -> float:
        """Cores used by programs outside the benchmark (a test suite, a build): the noise in the figures."""
        wall = max(1e-9, self.tally.finished - self.tally.started)
        return max(0.0, self.machine_busy - self.harness_cpu - self.relay_cpu / wall)


class Runner:
    def __init__(self, plan: Plan, *, only: tuple[str, ...], relay: bool, load_procs: int, results_dir: Path,
                 smoke: bool = False) -> None:
        self.plan = plan
        self.smoke = smoke
        self.only = only
        self.use_relay = relay
        self.load_procs = load_procs
        self.results_dir = results_dir
        self.phases: list[Phase] = []
        self.notes: list[str] = []
        self.started = time.monotonic()
        self.done = 0
        self.total = 0
        self.workers2 = False  #: relay --workers 2 is measured too (decided in run)
        self.filed_root: Path | None = None  #: the checkout ``stack@filed`` runs from (decided in run)
        self.workdir = Path(tempfile.mkdtemp(prefix="bench-"))
        self.profiles = {
            "burst": Profile(chunks=50, coalesce=True, stream="always"),
            "bodies": Profile(chunks=10, coalesce=True, stream="always"),
            "paced": Profile(chunks=plan.paced_chunks, delay=plan.pace, first_delay=plan.pace, stream="always"),
            "store": Profile(chunks=10, coalesce=True, stream="always"),
        }

    # -- plumbing ---------------------------------------------------------------------------------------------

    def _body_file(self, name: str, data: bytes) -> str:
        path = self.workdir / name
        if not path.exists():
            path.write_bytes(data)
        return str(path)

    def _paths(self, scenario: str) -> list[str]:
        """The paths a scenario measures, in the order each round runs them."""
        paths = [DIRECT]
        if self.use_relay:
            paths.append(RELAY)
            if scenario != "bodies" and self.workers2:
                paths.append(RELAY2)
        if self.plan.floor:
            if scenario != "bodies":
                paths.append(PIPE)
            paths.append(STACK)
            if scenario == "burst" and self.filed_root is not None:
                paths.append(STACK_FILED)
        return paths

    def _targets(self, scenario: str) -> dict[str, Target]:
        direct = Target(self.upstream_port, f"/p/{scenario}/v1/chat/completions", "data: [DONE]")
        targets: dict[str, Target] = {}
        try:
            for path in self._paths(scenario):
                if path == DIRECT:
                    targets[path] = direct
                elif path in (PIPE, STACK, STACK_FILED):  # the same requests as direct, through a floor
                    if path == PIPE:
                        child, port = procs.start_pipe(self.upstream_port)
                    else:
                        child, port = procs.start_stack(self.upstream_port,
                                                        self.filed_root if path == STACK_FILED else None)
                    targets[path] = Target(port, direct.path, direct.marker, child=child)
                else:
                    child, port = procs.start_relay(self.upstream_port, scenario, workers=2 if path == RELAY2 else 1)
                    targets[path] = Target(port, "/v1/messages", "event: message_stop",
                                           {"x-api-key": "bench", "anthropic-version": "2023-06-01"}, child)
        except BaseException:
            self._stop(targets)
            raise
        return targets

    @staticmethod
    def _stop(targets: dict[str, Target]) -> None:
        for target in reversed(targets.values()):  # the last started first: a relay before the store it writes to
            if target.child is not None:
                target.child.stop()

    def _spec(self, target: Target, body_file: str, **knobs: Any) -> LoadSpec:
        knobs.setdefault("timeout", self.plan.timeout)
        return LoadSpec(port=target.port, path=target.path, body_file=body_file, headers=target.headers,
                        marker=target.marker, **knobs)

    def _measure(self, case: Case, path: str, rnd: int, targets: dict[str, Target]) -> Phase:
        target = targets[path]
        relay_pids = procs.tree(target.child.pid) if target.child else []
        # Everything this run started, idle relays included, so that the rest is truly other programs' load.
        idle_relays = list({pid for t in targets.values() if t.child and t.child is not target.child
                            for pid in procs.tree(t.child.pid)})
        harness_pids = [self.upstream.pid, *self.pool.pids, *idle_relays]
        relay_cpu0, harness_cpu0 = procs.cpu_seconds(relay_pids), procs.cpu_seconds(harness_pids)
        busy0, all0 = procs.machine_busy()
        with procs.RssSampler(relay_pids) as rss:
            tally = self.pool.run(case.specs[path], self.load_procs or case.load_procs)
        busy1, all1 = procs.machine_busy()
        wall = max(1e-9, tally.finished - tally.started)
        phase = Phase(
            case.scenario, case.label, case.level, path, rnd, tally,
            len(stream_events(self.profiles[case.scenario])),
            relay_cpu=procs.cpu_seconds(relay_pids) - relay_cpu0,
            relay_rss_idle=case.idle_rss.get(path, 0),
            relay_rss_peak=rss.peak if relay_pids else 0,
            harness_cpu=(procs.cpu_seconds(harness_pids) - harness_cpu0) / wall,
            machine_busy=procs.cores(busy1 - busy0, all1 - all0),
        )
        self.phases.append(phase)
        self.done += 1
        self._progress(phase)
        return phase

    def _progress(self, p: Phase) -> None:
        t = p.tally
        wall = max(1e-9, t.finished - t.started)
        ttfb = report.percentile(t.ttfb, 50) * 1e3
        elapsed = time.monotonic() - self.started
        line = (f"[{self.done:>3}/{self.total} {elapsed:5.0f}s] {p.scenario:<6} {p.case:<10} round {p.round + 1} "
                f"{p.path:<8} {t.ok / wall:8.0f} req/s  TTFB p50 {ttfb:7.2f} ms  errors {t.errors}")
        if p.scenario == "paced":
            line += f"  stalled {sum(1 for g in t.max_gap if g > 2 * self.plan.pace)}"
        if t.errors:
            line += f" {t.error_kinds}"
        if p.other_load > 0.2:
            line += f"  (other programs used {p.other_load:.1f} cores)"
        print(line, file=sys.stderr, flush=True)

    def _warm(self, targets: dict[str, Target], body_file: str, concurrency: int) -> None:
        for target in targets.values():
            self.pool.run(self._spec(target, body_file, concurrency=concurrency, duration=self.plan.warmup))

    @staticmethod
    def _settle(targets: dict[str, Target], limit: float = 15.0) -> None:
        """Wait until every relay is idle: an overloaded relay still draining the last phase's streams would
        otherwise steal the CPU of the next phase (often the direct one)."""
        pids = [pid for t in targets.values() if t.child for pid in procs.tree(t.child.pid)]
        deadline = time.monotonic() + limit
        before = procs.cpu_seconds(pids)
        while time.monotonic() < deadline:
            time.sleep(0.1)
            now = procs.cpu_seconds(pids)
            if now - before < 0.02:
                return
            before = now

    def _rounds(self, case: Case, targets: dict[str, Target]) -> None:
        """Every round runs each path once; odd rounds reverse the order so neither path always goes first."""
        order = list(targets)
        for rnd in range(self.plan.rounds):
            for path in order if rnd % 2 == 0 else order[::-1]:
                self._settle(targets)
                self._measure(case, path, rnd, targets)

    # -- scenarios --------------------------------------------------------------------------------------------

    def _burst(self) -> None:
        plan = self.plan
        body = self._body_file("simple.json", bodies.simple_body())
        targets = self._targets("burst")
        try:
            self._warm(targets, body, min(10, max(plan.burst_levels)))
            for level in plan.burst_levels:
                specs = {p: self._spec(t, body, concurrency=level, duration=plan.burst_seconds)
                         for p, t in targets.items()}
                # Above ~100 unpaced streams one Python client process saturates a core: use two.
                self._rounds(Case("burst", f"c={level}", level, specs, 2 if level >= 100 else 1), targets)
        finally:
            self._stop(targets)

    def _bodies(self) -> None:
        plan = self.plan
        targets = self._targets("bodies")
        try:
            self._warm(targets, self._body_file("simple.json", bodies.simple_body()), 1)
            for size, kind in self._body_cases():
                name = f"cc-{size}{'-' + kind if kind else ''}.json"
                vary = "first" if kind == "cold" else "last"
                body = self._body_file(name, bodies.claude_code_body(size, unicode=kind == "unicode", vary=vary))
                specs = {p: self._spec(t, body, concurrency=1, duration=plan.body_seconds, vary=bodies.VARY)
                         for p, t in targets.items()}
                self._rounds(Case("bodies", f"{size // KIB} KiB{' ' + kind if kind else ''}", size, specs), targets)
        finally:
            self._stop(targets)

    def _body_cases(self) -> list[tuple[int, str]]:
        """(size, kind). Each size as the next turn of a conversation (each request the last one with its end
        rewritten, as an agent loop sends them); 100 KiB again with a character beyond ASCII in every turn's
        texts (``bench.bodies``): what real prose and source files cost, which the ASCII bodies do not show; and
        the largest size "cold", each request a conversation of its own (its first message rewritten), which is
        what a conversation's first request costs (relay.history has nothing of it to reuse)."""
        sizes = self.plan.body_sizes
        cases = [(size, "") for size in sizes] + ([(UNICODE_BODY, "unicode")] if UNICODE_BODY in sizes else [])
        return cases + ([(max(sizes), "cold")] if sizes else [])

    def _paced(self) -> None:
        plan = self.plan
        body = self._body_file("simple.json", bodies.simple_body())
        targets = self._targets("paced")
        stream_seconds = (plan.paced_chunks + 1) * plan.pace
        try:
            self._warm(targets, body, 8)
            idle = {p: procs.rss_bytes(procs.tree(t.child.pid)) for p, t in targets.items() if t.child}
            for level in plan.paced_levels:
                # Bounded even when relay falls behind: no stream starts after the planned streams' time, and
                # one that takes five times its nominal length has failed anyway.
                specs = {p: self._spec(t, body, concurrency=level, requests=level * plan.paced_streams,
                                       duration=plan.paced_streams * stream_seconds + 1.0, stagger=plan.pace,
                                       timeout=max(10.0, 5 * stream_seconds))
                         for p, t in targets.items()}
                # One client process: at 1,024 paced streams it needs ~0.5 core, and a second one only adds
                # scheduling noise on a 2-core machine.
                self._rounds(Case("paced", f"c={level}", level, specs, 1, idle), targets)
        finally:
            self._stop(targets)

    def _store_targets(self) -> dict[str, Target]:
        """relay without a store, then one relay per store, each asked with its config key (no limits) and with
        a virtual key that has every limit and a budget: the difference is what the limits cost per request."""
        headers = {"anthropic-version": "2023-06-01"}
        targets: dict[str, Target] = {}
        try:
            child, port = procs.start_relay(self.upstream_port, "store")
            targets[RELAY] = Target(port, "/v1/messages", "event: message_stop", {**headers, "x-api-key": "bench"}, child)
            for store in STORES:
                if store == "sqlite":
                    url = f"sqlite://{self.workdir / 'relay.sqlite3'}"
                else:
                    (self.workdir / "redis").mkdir(exist_ok=True)
                    redis = procs.start_redis(self.workdir / "redis")
                    if redis is None:
                        self.notes.append("redis-server is not installed: the store scenario measured SQLite only")
                        continue
                    targets["redis-server"] = Target(redis[1], "", "", child=redis[0])  # stopped with the rest
                    url = f"redis://127.0.0.1:{redis[1]}/0"
                secret = procs.create_virtual_key(self.upstream_port, "store", url)
                child, port = procs.start_relay(self.upstream_port, "store", store=url)
                targets[store] = Target(port, "/v1/messages", "event: message_stop", {**headers, "x-api-key": "bench"},
                                        child)
                targets[store + VKEY] = Target(port, "/v1/messages", "event: message_stop",
                                               {**headers, "x-api-key": secret}, child)
        except BaseException:
            self._stop(targets)
            raise
        return targets

    def _store(self) -> None:
        plan = self.plan
        body = self._body_file("simple.json", bodies.simple_body())
        everything = self._store_targets()
        targets = {path: t for path, t in everything.items() if t.path}  # not the redis-server
        try:
            self._warm(targets, body, 4)
            for level in plan.store_levels:
                specs = {p: self._spec(t, body, concurrency=level, duration=plan.store_seconds)
                         for p, t in targets.items()}
                self._rounds(Case("store", f"c={level}", level, specs), targets)
        finally:
            self._stop(everything)

    # -- the whole run ----------------------------------------------------------------------------------------

    def _count_phases(self) -> int:
        plan = self.plan
        levels = {"burst": plan.burst_levels, "bodies": self._body_cases(), "paced": plan.paced_levels}
        phases = plan.rounds * sum(len(levels[s]) * len(self._paths(s)) for s in levels if s in self.only)
        if self.use_relay and "store" in self.only:
            phases += plan.rounds * len(plan.store_levels) * (1 + 2 * len(STORES))
        return phases

    def _filed_root(self) -> Path | None:
        """Where ``stack@filed`` runs from, or None (with a note saying why) when it is not measured."""
        if not (self.use_relay and self.plan.floor and "burst" in self.only):
            return None
        if os.environ.get(procs.STACK_ROOT):
            self.notes.append(f"stack runs from ${procs.STACK_ROOT}: stack@filed not measured beside it")
            return None
        try:
            return procs.checkout(procs.ISSUE17_FLOOR, self.workdir)
        except RuntimeError as exc:
            self.notes.append(f"stack@filed (issue 17's floor) not measured: {exc}")
            return None

    def run(self) -> Path:
        """Run the selected scenarios; returns the path of the JSON results."""
        _net.raise_fd_limit()
        busy = procs.busy_cores(0.5)
        if busy > 0.25:
            self.notes.append(f"the machine was not idle before the run ({busy:.2f} cores busy): figures are noisy")
        self.workers2 = False
        if self.use_relay and self.plan.two_workers and {"burst", "paced"} & set(self.only):
            self.workers2 = procs.relay_supports_workers()
            if not self.workers2:
                self.notes.append("relay serve has no --workers yet: 1 vs 2 workers not measured")
        self.filed_root = self._filed_root()
        self.total = self._count_phases()
        if not self.use_relay:
            self.notes.append("direct path only (--direct-only): no relay figures")
        translator_results: dict[str, Any] | None = None
        self.upstream, self.upstream_port = procs.start_upstream(
            {name: asdict(p) for name, p in self.profiles.items()})
        try:
            with LoadPool(self.load_procs or 2) as self.pool:
                if "burst" in self.only:
                    self._burst()
                if "bodies" in self.only:
                    self._bodies()
                if "paced" in self.only:
                    self._paced()
                if "store" in self.only and self.use_relay:
                    self._store()
        finally:
            self.upstream.stop()
            shutil.rmtree(self.workdir, ignore_errors=True)
        if "translator" in self.only:  # alone on the machine: it measures one core
            print("translator micro-benchmark ...", file=sys.stderr, flush=True)
            translator_results = translator.run(self.plan.translator_seconds)
        store_results = None
        if "store" in self.only and self.use_relay:
            print("store request-path micro-benchmark ...", file=sys.stderr, flush=True)
            store_results = store_path.run(self.plan.translator_seconds)
        summary = report.summarise(self.phases, self.plan, translator_results, self.notes, store_results)
        print(report.render(summary))
        out = report.write(summary, self.results_dir, smoke=self.smoke)
        print(f"\nresults: {out}")
        return out
