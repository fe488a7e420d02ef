"""Where Chromium is and how it is started, for the browser tests. No Playwright import
here, so a missing browser can be reported before anything is launched."""

from pathlib import Path

# Debian's binary first: the /usr/bin wrapper script starts slower and warns on stderr.
CHROMIUM_PATHS = (Path("/usr/lib/chromium/chromium"), Path("/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def chromium_executable() -> Path | None:
    return next((path for path in CHROMIUM_PATHS if path.exists()), None)
