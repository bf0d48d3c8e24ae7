"""What a request cost: prices per model (USD per million tokens) -> the cost of one usage record.

Pure. Prices come from a provider block's ``prices`` table and from the presets that document them (each with the
page it was read on, as the windows are); the block wins, model by model. A model with no price costs nothing
and says so (``None``), so a budget never silently counts a free local model as spend, nor an unpriced paid one.
Costs are kept in whole micro-dollars so that sums over many instances and days are exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any, Mapping

FIELDS = ("input", "output", "cache_read", "cache_write")


@dataclass(frozen=True)
class Price:
    """USD per million tokens. Cache reads and writes cost as much as plain input unless given."""

    input: float
    output: float
    cache_read: float | None = None
    cache_write: float | None = None


def parse(entry: Mapping[str, Any]) -> Price:
    """A ``{ input = 0.56, output = 1.68, cache_read = 0.07 }`` table; ValueError names what is wrong."""
    unknown = set(entry) - set(FIELDS)
    if unknown:
        raise ValueError(f"unknown price field(s) {', '.join(sorted(unknown))} (allowed: {', '.join(FIELDS)})")
    for name in ("input", "output"):
        if name not in entry:
            raise ValueError(f"{name} is required (USD per million tokens)")
    for name, value in entry.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be a number >= 0 (USD per million tokens), got {value!r}")
    return Price(float(entry["input"]), float(entry["output"]),
                 None if entry.get("cache_read") is None else float(entry["cache_read"]),
                 None if entry.get("cache_write") is None else float(entry["cache_write"]))


def lookup(prices: Mapping[str, Price], model: str) -> Price | None:
    """The price of ``model``: its own entry, else the first glob pattern (``"llama-*"``) that matches it."""
    found = prices.get(model)
    if found is not None:
        return found
    for pattern, price in prices.items():
        if any(c in pattern for c in "*?[") and fnmatchcase(model, pattern):
            return price
    return None


def cost_micros(price: Price | None, input_tokens: int = 0, output_tokens: int = 0, cache_read: int = 0,
                cache_write: int = 0) -> int:
    """The cost in micro-dollars (rounded to the nearest). ``input_tokens`` counts uncached input only."""
    if price is None:
        return 0
    read = price.input if price.cache_read is None else price.cache_read
    write = price.input if price.cache_write is None else price.cache_write
    per_million = (input_tokens * price.input + output_tokens * price.output + cache_read * read
                   + cache_write * write)
    return round(per_million)  # USD/M tokens x tokens = micro-dollars


def usd(micros: int) -> float:
    return micros / 1_000_000
