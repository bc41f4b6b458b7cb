"""Headless Chromium for the service's web page: the page's browser tests and docs/serve_ui_screenshot.py.

Debian's /usr/bin/chromium (`make install` installs it when missing), never a browser Playwright
downloads: the project's machines reach package registries only. The flags keep a headless run quiet
and self-contained (no sandbox inside containers, no GPU, no background traffic to Google services).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]


def launch_chromium(playwright: Any) -> Any:
    """playwright.chromium.launch on Debian's Chromium with CHROMIUM_ARGS (a Playwright Browser)."""
    return playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
