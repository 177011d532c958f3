"""The counters' text exposition: valid for Prometheus and for promtool."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from migrations_support.metrics import (
    COUNTER_HELP,
    BackfillCounters,
    render,
    write_metrics_file,
)

COUNTERS = BackfillCounters(processed=7, updated=4, skipped=2, conflicts=3, failures=1)


@pytest.mark.parametrize("dry_run", [False, True])
def test_exposition_parses_as_counters(dry_run: bool) -> None:
    label = "true" if dry_run else "false"
    families = list(text_string_to_metric_families(render(COUNTERS, dry_run)))

    assert [family.name for family in families] == [
        f"workflow_run_key_backfill_{name}" for name in COUNTER_HELP
    ]
    for family in families:
        short_name = family.name.removeprefix("workflow_run_key_backfill_")
        assert family.type == "counter"
        assert family.documentation == COUNTER_HELP[short_name]
        assert [sample.name for sample in family.samples] == [f"{family.name}_total"]
        assert family.samples[0].labels == {"dry_run": label}
        assert family.samples[0].value == getattr(COUNTERS, short_name)


def test_exposition_has_no_created_samples() -> None:
    text = render(COUNTERS, dry_run=False)
    assert "_created" not in text


def test_metrics_file_equals_exposition(tmp_path: Path) -> None:
    path = tmp_path / "workflow_run_key_backfill.prom"
    write_metrics_file(path, COUNTERS, dry_run=False)
    assert path.read_text() == render(COUNTERS, dry_run=False)
    # write_to_textfile renames its temporary file into place.
    assert list(tmp_path.iterdir()) == [path]


@pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool is not installed (Debian package prometheus; .ci/run installs "
    "it where apt-get works); the prometheus_client parser checks above still run",
)
@pytest.mark.parametrize("dry_run", [False, True])
def test_promtool_accepts_exposition(tmp_path: Path, dry_run: bool) -> None:
    path = tmp_path / "workflow_run_key_backfill.prom"
    write_metrics_file(path, COUNTERS, dry_run)
    with path.open("rb") as exposition:
        result = subprocess.run(
            ["promtool", "check", "metrics"],
            stdin=exposition,
            capture_output=True,
            timeout=60,
            check=False,
        )
    assert result.returncode == 0, result.stdout + result.stderr
    # promtool prints a lint problem per line, and nothing for a clean file.
    assert result.stdout == b""
    assert result.stderr == b""
