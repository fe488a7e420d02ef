"""Where the embedded services keep their data, and how to reach the embedded PostgreSQL.

Kept free of Django imports: the launcher and the test harness use it before settings load.
"""

import os
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent
DEFAULT_REDIS_PORT = 6391


def var_dir() -> Path:
    return Path(os.environ.get("SLUICE_VAR_DIR") or BASE_DIR / "var")


def postgres_data_dir(root: Path | None = None) -> Path:
    return (root or var_dir()) / "pg"


def postgres_socket_dir(data_dir: Path) -> str:
    """The unix socket folder of a PostgreSQL whose data lives in data_dir.

    postmaster.pid's fifth line names it; pgserver moves it to /tmp when the data dir's
    path is too long for a socket, so read it rather than assume.
    """
    lines = postmaster_pid_lines(data_dir) or []
    if len(lines) >= 5 and lines[4].strip():
        return lines[4].strip()
    return str(data_dir)


def postmaster_pid_lines(data_dir: Path) -> list[str] | None:
    """postmaster.pid's lines (pid, data dir, start, port, socket dir, ...), or None when
    there is none or it cannot be read."""
    try:
        return (data_dir / "postmaster.pid").read_text().splitlines()
    except OSError:
        return None


def embedded_database_url(data_dir: Path, dbname: str = "postgres") -> str:
    return f"postgresql://postgres@/{dbname}?host={postgres_socket_dir(data_dir)}"
