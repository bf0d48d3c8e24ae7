"""Benchmark harness for relay: mock upstream, load generator, runner, translator micro-benchmark.

Run it with ``python -m bench`` (full, a few minutes) or ``python -m bench --smoke`` (seconds).
See ``bench/README.md`` for what each figure means.
"""
