"""A real headless Chromium for the console tests: Debian's ``chromium`` driven by Playwright for Python.

Playwright's own browser download is never used (``executable_path`` points at the system binary). A missing
browser or Playwright fails the test and says how to get it. Every page records what would be a defect in any
test: an error in the browser console, an uncaught exception, a request to another origin.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

INSTALL = ("chromium is not installed: `make test` installs Debian's chromium package when it can (as root, with "
           "apt-get); otherwise install it yourself (apt-get install chromium)")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]


def chromium_path() -> str:
    found = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
    if found is None:
        pytest.fail(INSTALL)
    return found


@dataclass
class Watch:
    """What went wrong in the page, whatever the test was looking at."""

    origin: str
    errors: list[str] = field(default_factory=list)
    foreign: list[str] = field(default_factory=list)

    def clean(self) -> None:
        assert not self.errors, f"errors in the browser console: {self.errors}"
        assert not self.foreign, f"requests to another origin: {self.foreign}"


@contextmanager
def browser_page(base_url: str, width: int = 1280, height: int = 860) -> Iterator[tuple[Any, Watch]]:
    """A fresh profile each time (no state shared between tests); yields (page, watch)."""
    executable = chromium_path()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright (Python) is not installed: `make install` installs it with the test extras")
    origin = "{0.scheme}://{0.netloc}".format(urlsplit(base_url))
    watch = Watch(origin)
    with tempfile.TemporaryDirectory(prefix="relay-chromium-") as profile, sync_playwright() as p:
        context = p.chromium.launch_persistent_context(profile, executable_path=executable, args=ARGS, headless=True,
                                                       viewport={"width": width, "height": height})
        try:
            page = context.pages[0] if context.pages else context.new_page()
            page.on("console", lambda m: watch.errors.append(f"{m.text} ({m.location.get('url')})")
                    if m.type == "error" else None)
            page.on("pageerror", lambda exc: watch.errors.append(str(exc)))

            def seen(request: Any) -> None:
                url = request.url
                if not (url.startswith(origin + "/") or url.startswith(("blob:", "data:", "about:"))):
                    watch.foreign.append(url)

            page.on("request", seen)
            yield page, watch
        finally:
            context.close()
