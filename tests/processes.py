"""Run ``alembic`` as a separate process, as a deploy does, and watch its output.

Output goes to files rather than pipes, so a process that writes many log
lines never blocks on a full pipe.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from sqlalchemy.engine import URL

from migrations_support import database
from migrations_support.settings import ENV_PREFIX
from tests.conftest import PROJECT_ROOT


@dataclasses.dataclass
class AlembicProcess:
    """A running ``python -m alembic`` with its output files."""

    popen: subprocess.Popen[bytes]
    stdout_path: Path
    stderr_path: Path

    def stdout(self) -> str:
        """Return what the process has written to standard output so far."""
        return self.stdout_path.read_text(encoding="utf-8")

    def stderr(self) -> str:
        """Return what the process has written to standard error so far."""
        return self.stderr_path.read_text(encoding="utf-8")

    def wait(self, timeout_s: float) -> int:
        """Wait for the process to exit and return its exit status."""
        return self.popen.wait(timeout=timeout_s)


def alembic_environment(
    database_url: URL, knobs: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Return this process's environment with ``DATABASE_URL`` and only ``knobs``."""
    environment = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(ENV_PREFIX)
    }
    environment[database.URL_VARIABLE] = database_url.render_as_string(
        hide_password=False
    )
    for name, value in (knobs or {}).items():
        environment[ENV_PREFIX + name.upper()] = value
    return environment


def start_alembic(
    database_url: URL,
    output_dir: Path,
    name: str,
    *arguments: str,
    knobs: Mapping[str, str] | None = None,
) -> AlembicProcess:
    """Start ``python -m alembic ARGUMENTS`` on ``database_url``.

    ``name`` is the stem of the output file names, so several processes can
    share ``output_dir``.
    """
    stdout_path = output_dir / f"{name}.out"
    stderr_path = output_dir / f"{name}.err"
    with stdout_path.open("wb") as stdout, stderr_path.open("wb") as stderr:
        popen = subprocess.Popen(
            [sys.executable, "-m", "alembic", *arguments],
            cwd=PROJECT_ROOT,
            env=alembic_environment(database_url, knobs),
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
        )
    return AlembicProcess(popen, stdout_path, stderr_path)


def wait_until(
    condition: Callable[[], bool], timeout_s: float, description: str
) -> None:
    """Poll ``condition`` every 20 ms; raise AssertionError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout_s} s waiting for {description}"
            )
        time.sleep(0.02)
