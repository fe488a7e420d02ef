"""The web side of the harness: waiting for the ASGI server to answer, and where Chromium is
and how it is started. No Playwright here: every test session imports this module."""

import subprocess
import time
import urllib.error
import urllib.request
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
SERVE_TIMEOUT_S = 60.0


def chromium_executable() -> Path | None:
    return next((path for path in CHROMIUM_PATHS if path.exists()), None)


def wait_until_serving(
    url: str, proc: subprocess.Popen[bytes], log_path: Path, timeout: float = SERVE_TIMEOUT_S
) -> None:
    """Returns once url answers 200; raises if the server exits or stays silent or broken."""
    deadline = time.monotonic() + timeout
    status = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"web server exited with {proc.returncode}; see {log_path}")
        status = _http_status(url)
        if status == 200:
            return
        time.sleep(0.1)
    raise RuntimeError(f"{url} answered {status} after {timeout}s, not 200; see {log_path}")


def _http_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            status: int = response.status
            return status
    except urllib.error.HTTPError as exc:
        exc.close()
        return exc.code
    except (urllib.error.URLError, OSError):
        return None
