"""The commands: serve, check, --version."""

from __future__ import annotations

import argparse
import os
import sys

from relay import __version__
from relay.config import Config, ConfigError, load, loopback


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", help="path to relay.toml (default: $RELAY_CONFIG; none = OpenAI from the environment)")


def workers_count(value: str) -> int:
    """``--workers``: a positive count, or ``auto`` for the cores this process may run on (a container's CPU
    set, not the host's)."""
    if value == "auto":
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        count = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', not {value!r}") from None
    if count < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return count


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="relay", description="The Anthropic Messages API in front of any model.")
    parser.add_argument("--version", action="version", version=f"relay {__version__}")
    sub = parser.add_subparsers(dest="command")
    serve = sub.add_parser("serve", help="run the gateway")
    _add_config(serve)
    serve.add_argument("--host", help="address to listen on (default from config, else 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (default from config, else 8787)")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.add_argument("--log-format", default="text", choices=["text", "json"], help="json: one object per line")
    serve.add_argument("--workers", type=workers_count, default=1,
                       help="worker processes sharing the port (SO_REUSEPORT); 'auto' = one per usable core")
    serve.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)
    serve.add_argument("--allow-open", action="store_true",
                       help="allow serving with no client keys on a non-loopback address")
    check = sub.add_parser("check", help="validate a config and print the resolved providers and routes")
    _add_config(check)
    check.add_argument("models", nargs="*", help="model ids to show the resolution of")
    claude = sub.add_parser(
        "claude", help="run Claude Code through relay (starts a relay if none is listening)",
        description="Run the Claude Code CLI (`claude`, on PATH) with ANTHROPIC_BASE_URL and ANTHROPIC_AUTH_TOKEN "
                    "pointing at relay, starting a relay for the session when none listens on the configured port. "
                    "It sets the compaction variables from the main model's window and warns when that window is too "
                    "small for Claude Code.",
        epilog="Everything after relay's own -c and --port goes to claude; claude's own -c/--continue and --help go after --: "
               "`relay claude -- --help` shows Claude Code's help.")
    _add_config(claude)
    claude.add_argument("--port", type=int, help="the relay's port, when it was started with --port (default from "
                                                 "config, else 8787)")
    claude.add_argument("args", nargs="*", help="arguments for claude (relay's own -c and --port come first)")
    usage = sub.add_parser("usage", help="per key and model: requests served and refused, tokens, cost")
    _add_config(usage)
    usage.add_argument("--db", action="append",
                       help="SQLite file(s) to add up instead of the store (old usage books read too)")
    usage.add_argument("--since", help="only days from YYYY-MM-DD on")
    settings = sub.add_parser("claude-settings", help="print the ~/.claude/settings.json block for this relay")
    _add_config(settings)
    sub.add_parser("presets", help="list the provider presets (preset = \"name\" in a provider block)")
    from relay.gateway_cli import add_commands

    add_commands(sub, _add_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["claude"]:  # everything after relay's own leading -c / --port goes to claude untouched
        rest = argv[1:]
        if rest[:1] in (["-h"], ["--help"]):  # relay's own help; Claude Code's is `relay claude -- --help`
            build_parser().parse_args(["claude", "--help"])
        own: list[str] = []
        while rest[:1] in (["-c"], ["--config"], ["--port"]) and len(rest) > 1:
            own, rest = own + rest[:2], rest[2:]
        if rest[:1] == ["--"]:
            rest = rest[1:]
        argv = ["claude", *own, "--", *rest]
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "presets":
        from relay.presets import listing

        print(listing())
        return 0
    try:
        config = load(args.config)
    except ConfigError as exc:
        print(f"relay: config error: {exc}", file=sys.stderr)
        return 2
    if args.command == "check":
        return check(config, args.models)
    if args.command == "usage":
        from relay.gateway_cli import usage_command

        return usage_command(config, args.db, args.since)
    if args.command == "keys":
        from relay.gateway_cli import keys_command

        return keys_command(config, args)
    if args.command == "claude-settings":
        from relay.launcher import settings_json

        print(settings_json(config))
        return 0
    if args.command == "claude":
        from relay.launcher import run_claude

        return run_claude(config, args.config or os.environ.get("RELAY_CONFIG"), args.args, args.port)
    config_path = args.config or os.environ.get("RELAY_CONFIG")
    if args.workers > 1:
        from relay.workers import supervise

        bind = args.host or config.server.host
        if _refuses_open(config, bind, args.allow_open):
            return 2
        worker_args = ["--log-level", args.log_level, "--log-format", args.log_format, "--workers", "1"]
        if config_path:
            worker_args += ["-c", config_path]
        if args.allow_open:
            worker_args.append("--allow-open")
        return supervise(args.workers, bind, config.server.port if args.port is None else args.port, worker_args)
    return serve(config, args.host, args.port, args.log_level, args.allow_open, config_path, args.log_format,
                 args.reuse_port)


def _refuses_open(config: Config, bind: str, allow_open: bool) -> bool:
    """True (and says why) when relay would serve a reachable address with no client keys: anyone reaching it
    could spend the upstream keys. Checked before workers start as well as in each one."""
    if config.server.api_keys or config.keys or loopback(bind) or allow_open:
        return False
    print(f"relay: refusing to serve {bind} with no [server].api_keys: anyone who can reach it could spend "
          "your upstream keys. Set api_keys, bind 127.0.0.1, or pass --allow-open.", file=sys.stderr)
    return True


def serve(config: Config, host: str | None, port: int | None, log_level: str, allow_open: bool = False,
          config_path: str | None = None, log_format: str = "text", reuse_port: bool = False) -> int:
    import gc

    import trio

    from relay.log import setup
    from relay.resources import raise_open_files
    from relay.server import Server

    if _refuses_open(config, host or config.server.host, allow_open):
        return 2
    setup(log_level, log_format)
    raise_open_files()
    server = Server(config)
    # What is loaded by now (modules, config, tables) lives as long as the process. Frozen, it is no longer
    # walked by every full garbage collection, which on a busy relay halves those pauses (13 -> 7 ms at
    # 128 streams, measured with gc.callbacks): a pause stalls every open stream at once.
    gc.collect()
    gc.freeze()

    async def run() -> None:
        import signal

        async with trio.open_nursery() as nursery:
            async def serve_then_stop() -> None:
                await server.serve(host, port, reuse_port=reuse_port)
                nursery.cancel_scope.cancel()

            nursery.start_soon(serve_then_stop)
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
                async for signum in signals:
                    if signum == signal.SIGHUP:
                        try:
                            server.reload(load(config_path))
                        except ConfigError as exc:
                            server_log.error("reload refused, keeping the running config: %s", exc)
                    elif server.draining:  # a second signal: stop now
                        nursery.cancel_scope.cancel()
                    else:
                        server.drain()

    import logging

    server_log = logging.getLogger("relay")
    try:
        trio.run(run)
    except OSError as exc:
        print(f"relay: cannot listen: {exc}", file=sys.stderr)
        return 1
    return 0


def check(config: Config, models: list[str]) -> int:
    from relay.errors import RelayError
    from relay.gateway_cli import check_store
    from relay.launcher import CLAUDE_CODE_MODELS
    from relay.routing import resolve

    print(f"config: {config.source}")
    s = config.server
    print(f"server: http://{s.host}:{s.port}  client keys: {len(s.api_keys) or 'none (open)'}  body limit: {s.body_limit} bytes")
    store_line, store_ok, config = check_store(config)  # from here on, with the providers stored at run time
    print(store_line)
    for p in config.providers.values():
        keys = f"{len(p.api_keys)} key(s)" if p.api_keys else "no key"
        stored = " (stored at run time)" if p.name in config.stored else ""
        print(f"provider {p.name}{stored}: format={p.format} base_url={p.base_url} {keys}")
        if p.models:
            print(f"  models: {', '.join(p.models)}")
        quirks = [f"{k}={getattr(p, k)}" for k in ("max_tokens_cap", "context_window", "system_turns", "tool_call_content", "reasoning_control", "think_tags", "discover_context") if getattr(p, k) not in (None, False, "keep", "none", "null")]
        if quirks:
            print(f"  {' '.join(quirks)}")
        for model, lim in p.limits.items():
            print(f"  {model}: context_window={lim.context_window} max_output={lim.max_output}")
        for model, price in p.prices.items():
            print(f"  {model}: USD per million tokens: input {price.input:g} output {price.output:g}"
                  + (f" cache read {price.cache_read:g}" if price.cache_read is not None else "")
                  + (f" cache write {price.cache_write:g}" if price.cache_write is not None else ""))
    for alias, targets in config.models.items():
        print(f"alias {alias} -> {', '.join(targets)}")
    for route, targets in config.routes.items():
        print(f"route {route} -> {', '.join(targets)}")
    status = 0 if store_ok else 1
    samples = models or list(CLAUDE_CODE_MODELS)
    for model in samples:
        try:
            resolved = resolve(config, model, {}, 0)  # an empty request: scenario routes that depend on it stay off
            window = resolved[0].provider.limits_for(resolved[0].model).context_window
            extra = f"  (context window {window})" if window else ""
            print(f"resolve {model} -> {', '.join(t.label for t in resolved)}{extra}")
        except RelayError as exc:
            print(f"resolve {model} -> error: {exc.message}")
            status = 1 if models else status
    return status
