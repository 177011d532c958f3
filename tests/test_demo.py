"""The demo command end to end, on its own embedded server."""

from __future__ import annotations

from pathlib import Path

import pytest

from migrations_support import demo


def test_demo_small_run_passes_checks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)

    status = demo.run_demo(2000, tmp_path / "out")

    out = capsys.readouterr().out
    assert status == 0
    assert "Loaded 2000 generated runs at revision 040" in out
    assert 'workflow_run_key_backfill_processed_total{dry_run="true"} 2000.0' in out
    assert 'workflow_run_key_backfill_processed_total{dry_run="false"} 2000.0' in out
    assert 'workflow_run_key_backfill_updated_total{dry_run="false"} 2000.0' in out
    assert "Checks passed: every run has a key" in out
    assert "export DATABASE_URL=postgresql://user:password@host:5432/dbname" in out
    listing = (tmp_path / "out" / "dry-run.prom").read_text(encoding="utf-8")
    assert listing.count("# candidate run_id=") == 2000
    assert (tmp_path / "out" / "backfill.log").stat().st_size > 0
