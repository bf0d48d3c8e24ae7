"""``python -m bench``: relay against a direct upstream. ``--smoke`` for a few-second run."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from bench import procs
from bench.runner import FULL, SCENARIOS, SMOKE, Runner


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="tiny counts: checks the harness, measures nothing")
    parser.add_argument("--only", default=",".join(SCENARIOS),
                        help=f"comma-separated scenarios to run (default: all of {','.join(SCENARIOS)})")
    parser.add_argument("--rounds", type=int, help="rounds per case (default 3, smoke 1)")
    parser.add_argument("--direct-only", action="store_true", help="skip relay (for working on the harness)")
    parser.add_argument("--load-procs", type=int, default=0,
                        help="load generator processes (default: 1 below 100 connections, else 2)")
    parser.add_argument("--results-dir", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    only = tuple(s.strip() for s in args.only.split(",") if s.strip())
    unknown = set(only) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios: {sorted(unknown)}")
    plan = SMOKE if args.smoke else FULL
    if args.rounds:
        plan = dataclasses.replace(plan, rounds=args.rounds)
    runner = Runner(plan, only=only, relay=not args.direct_only, load_procs=args.load_procs,
                    results_dir=args.results_dir, smoke=args.smoke)
    try:
        runner.run()
    except procs.RelayUnavailable as exc:
        print(f"bench: relay could not be started: {exc}\n(use --direct-only to run the harness alone)",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
