"""The team-gateway commands: ``relay keys create|list|revoke|set`` and ``relay usage``, against the store."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from relay.config import Config, with_stored
from relay.log import printable

T = TypeVar("T")


def shown(value: str) -> str:
    """Input echoed in a message: quoted, made printable, and cut (a name of 5000 characters is not repeated)."""
    return repr(printable(value, 64))


def _cut(message: str, value: str) -> str:
    """A message (the store's own) with ``value`` in it shown as ``shown`` does."""
    return message.replace(repr(value), shown(value))


def _limit(value: str) -> int | None:
    if value.lower() in ("none", "off"):
        return None
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number or 'none', not {shown(value)}") from None
    if number < 1:
        raise argparse.ArgumentTypeError("must be at least 1 (or 'none' for no limit)")
    return number


def _budget(value: str) -> float | None:
    if value.lower() in ("none", "off"):
        return None
    try:
        number = float(value.lstrip("$"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected USD (e.g. 25 or 2.50) or 'none', not {shown(value)}") from None
    if number < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return number


def day(value: str) -> str:
    """A calendar day, YYYY-MM-DD (``relay usage --since``, ``--expires``), written back in that form."""
    try:
        return time.strftime("%Y-%m-%d", time.strptime(value, "%Y-%m-%d"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a date YYYY-MM-DD, not {shown(value)}") from None


def _expiry(value: str) -> str | None:
    """The last day a key works (UTC); that it has not passed is key_fields' check, the admin API's too."""
    return None if value.lower() in ("none", "never") else day(value)


def _models(value: str) -> list[str]:
    models = [m.strip() for m in value.split(",") if m.strip()]
    if not models:  # the store reads no models as all of them: a typo must not widen a key
        raise argparse.ArgumentTypeError("names no model; write '*' for every model")
    return models


def add_commands(sub: Any, add_config: Callable[[argparse.ArgumentParser], None]) -> None:
    keys = sub.add_parser("keys", help="virtual keys in the store: create, list, revoke, set")
    actions = keys.add_subparsers(dest="action", required=True)
    for action, help_ in (("create", "create a key; its secret is printed once, as the last line"),
                          ("set", "change a key's models, limits, budget or expiry ('none' clears one)")):
        p = actions.add_parser(action, help=help_)
        p.add_argument("name")
        p.add_argument("--models", type=_models, default=argparse.SUPPRESS, help="comma-separated model names or globs the key may use ('*': all)")
        p.add_argument("--rpm", type=_limit, default=argparse.SUPPRESS, help="requests per minute")
        p.add_argument("--tpm", type=_limit, default=argparse.SUPPRESS, help="tokens (input + output) per minute")
        p.add_argument("--max-streams", type=_limit, default=argparse.SUPPRESS, help="requests in flight at once")
        p.add_argument("--budget", type=_budget, default=argparse.SUPPRESS, help="USD per budget period")
        p.add_argument("--budget-period", choices=("day", "month"), default=argparse.SUPPRESS)
        p.add_argument("--expires", type=_expiry, default=argparse.SUPPRESS, help="last day the key works (UTC)")
        add_config(p)
    p = actions.add_parser("list", help="list the keys (never their secrets)")
    add_config(p)
    p = actions.add_parser("revoke", help="revoke a key: it stops working on every instance within a second")
    p.add_argument("name")
    add_config(p)


def _run(config: Config, work: Callable[[Any], Awaitable[T]]) -> T:
    from relay.store import StoreError, connected, url_for

    url = url_for(config.store)
    if url is None:
        raise StoreError("the store is turned off ([server] usage_db = \"\"); set [store] url")

    import trio

    async def main() -> T:
        async with connected(url, max(config.store.timeout, 5.0)) as backend:
            return await work(backend)

    return trio.run(main)


def check_store(config: Config) -> tuple[str, bool, Config]:
    """`relay check`'s store lines, after a ping (False when the store does not answer), and the config with the
    providers stored at run time merged in, as the server will serve it here. A stored provider this machine
    must leave out (its ``${VAR}`` unset here) is a warning, not a failure: another instance may serve it."""
    from relay.store import StoreError, masked, provider_table, url_for

    url = url_for(config.store)
    if url is None:
        return "store: off ([server] usage_db = \"\": no usage book, no virtual keys)", True, config
    if url.startswith("sqlite://") and not os.path.exists(os.path.expanduser(url[len("sqlite://"):])):
        return f"store: {url} (created on first start)", True, config

    async def ping(backend: Any) -> tuple[int, dict[str, bytes]]:
        await backend.ping()
        return len(await backend.load_keys()), await backend.load("providers")

    try:
        count, stored = _run(config, ping)
    except StoreError as exc:
        return f"store: {masked(url)}: unreachable: {exc}", False, config
    tables, problems = {}, {}
    for name, doc in stored.items():
        try:
            tables[name] = provider_table(doc)
        except ValueError as exc:
            problems[name] = str(exc)
    merged, left_out = with_stored(config, tables, dict(os.environ))
    problems |= left_out
    lines = [f"store: {masked(url)} ok ({count} virtual key(s), {len(stored)} stored provider(s): "
             f"{', '.join(sorted(stored)) or 'none'})"]
    lines += [f"  warning: stored provider {name} left out here: {why}" for name, why in problems.items()]
    return "\n".join(lines), True, merged


def keys_command(config: Config, args: argparse.Namespace) -> int:
    from relay.store import FIELDS, StoreError, change_key, create_key, key_fields

    fields = {k: v for k, v in vars(args).items() if k in FIELDS}
    try:
        if args.action == "create":
            if any(k.name == args.name for k in config.keys):
                print(f"relay: {shown(args.name)} names a key in the config file; choose another name", file=sys.stderr)
                return 2
            key, secret = create_key(args.name, fields, time.time())

            async def create(backend: Any) -> None:
                await backend.put_key(key, create=True)

            _run(config, create)
            _describe(key)
            print(secret)  # the last line, once: it is stored only as a digest
            return 0
        if args.action == "list":
            keys = _run(config, lambda backend: backend.load_keys())
            print(f"{'name':<20} {'hint':<10} {'state':<8} {'models':<24} {'rpm':>6} {'tpm':>9} {'streams':>7} "
                  f"{'budget':>14} {'expires':<10}")
            now = time.time()
            for k in keys:
                state = k.state(now)
                lim = k.limits
                budget = f"${lim.budget:g}/{lim.budget_period}" if lim.budget is not None else "-"
                print(f"{k.name:<20} {k.hint:<10} {state:<8} {printable(','.join(k.models) or '*', 60):<24} "
                      f"{_n(lim.rpm):>6} {_n(lim.tpm):>9} {_n(lim.max_streams):>7} {budget:>14} {k.expires or '-':<10}")
            return 0
        changes = {"revoked": True} if args.action == "revoke" else key_fields(fields)

        _describe(_run(config, lambda backend: change_key(backend, args.name, changes)))
        return 0
    except StoreError as exc:
        print(f"relay: {_cut(str(exc), args.name) if 'name' in args else exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"relay: {_cut(str(exc), args.name) if 'name' in args else exc}", file=sys.stderr)
        return 2


def _n(value: int | None) -> str:
    return "-" if value is None else str(value)


def _describe(key: Any) -> None:
    lim = key.limits
    parts = [f"models={','.join(key.models) or '*'}", f"rpm={_n(lim.rpm)}", f"tpm={_n(lim.tpm)}",
             f"max_streams={_n(lim.max_streams)}",
             f"budget={'-' if lim.budget is None else f'${lim.budget:g}/{lim.budget_period}'}",
             f"expires={key.expires or '-'}"]
    print(f"key {key.name} ({key.hint}, {key.state(time.time())}): {' '.join(parts)}")


def usage_command(config: Config, paths: list[str] | None, since: str | None) -> int:
    """Per key and model: requests served, refused apart, tokens and cost. ``paths``: read these SQLite files
    (usage books of any relay version, or stores) instead of the configured store."""
    from relay.pricing import usd
    from relay.store import StoreError, summarize

    try:
        if paths:
            from relay.store.sqlite import read_files

            rows = read_files(paths, since)
        else:
            rows = _run(config, lambda backend: backend.usage(since))
    except StoreError as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return 1
    print(f"{'key':<16} {'model':<40} {'requests':>9} {'refused':>8} {'input':>12} {'output':>12} "
          f"{'est. input':>12} {'est. output':>12} {'cost USD':>12}")
    for r in summarize(rows):
        print(f"{printable(r.key, 40):<16} {printable(r.model, 80) or '-':<40} {r.requests:>9} {r.refused:>8} "
              f"{r.input_tokens:>12} {r.output_tokens:>12} {r.estimated_input_tokens:>12} "
              f"{r.estimated_output_tokens:>12} {usd(r.cost_micros):>12.4f}")
    return 0
