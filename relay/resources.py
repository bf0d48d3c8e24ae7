"""The process's open-file allowance: raised to the hard limit at start, and the connection guard sized from
it, so that past the guard relay answers 529 instead of failing to accept (trio then logs every 100 ms and
every connection, /health included, waits)."""

from __future__ import annotations

import logging
import resource

log = logging.getLogger("relay.server")

RESERVED_FILES = 64  # listeners, log and usage files, DNS lookups, certificate files, the supervisor's pipes


def raise_open_files() -> None:
    """Lift the soft limit to the hard one (as far as the kernel allows); a service manager's LimitNOFILE
    sets the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            log.info("open-file limit raised from %d to %d", soft, wanted)
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit from %d: %s", soft, exc)


def connection_budget(configured: int) -> int:
    """Client connections relay can hold under the open-file limit: each may hold an upstream connection too."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return configured
    return max(1, min(configured, (soft - RESERVED_FILES) // 2))
