"""Run ``workflow-run-key-backfill`` as a subprocess, as an operator would."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from sqlalchemy.engine import URL

from migrations_support import database
from migrations_support.settings import ENV_PREFIX

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CLI_TIMEOUT_S = 120


def cli_environment(
    database_url: URL | None, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Return this process's environment without knob variables, plus ``extra``.

    ``database_url`` becomes DATABASE_URL; None leaves it unset.
    """
    environ = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(ENV_PREFIX) and name != database.URL_VARIABLE
    }
    if database_url is not None:
        environ[database.URL_VARIABLE] = database_url.render_as_string(
            hide_password=False
        )
    environ.update(extra or {})
    return environ


def run_cli(
    args: Sequence[str],
    database_url: URL | None,
    extra_env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m migrations_support ARGS`` and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "migrations_support", *args],
        env=cli_environment(database_url, extra_env),
        cwd=cwd or PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
        check=False,
    )


def last_line(text: str) -> str:
    """Return the last non-empty line of ``text``."""
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def log_messages(stderr: str) -> list[str]:
    """Return the log lines of ``stderr`` without their timestamps.

    Each log line is ``YYYY-MM-DD HH:MM:SS LEVEL message``; what is left is
    ``LEVEL message``. Other lines (an ``error:`` line) are kept as they are.
    """
    messages = []
    for line in stderr.splitlines():
        parts = line.split(" ", 2)
        if len(parts) == 3 and parts[0].count("-") == 2 and parts[1].count(":") == 2:
            messages.append(parts[2])
        else:
            messages.append(line)
    return messages
