"""Knobs: defaults, sources, precedence and every invalid value's message."""

from __future__ import annotations

from pathlib import Path

import pytest

from migrations_support.errors import BackfillError
from migrations_support.settings import BackfillSettings, load_settings


def test_defaults() -> None:
    settings = load_settings({})
    assert settings == BackfillSettings(
        dry_run=False,
        batch_size=500,
        max_updates=None,
        on_conflict="suffix",
        lock_timeout_ms=2000,
        statement_timeout_ms=30_000,
        sleep_ms=0,
        metrics_file=None,
    )


def test_environment_values(tmp_path: Path) -> None:
    settings = load_settings(
        {
            "RUN_KEY_BACKFILL_DRY_RUN": "yes",
            "RUN_KEY_BACKFILL_BATCH_SIZE": "10000",
            "RUN_KEY_BACKFILL_MAX_UPDATES": "1",
            "RUN_KEY_BACKFILL_ON_CONFLICT": "SKIP",
            "RUN_KEY_BACKFILL_LOCK_TIMEOUT": "250ms",
            "RUN_KEY_BACKFILL_STATEMENT_TIMEOUT": "1min",
            "RUN_KEY_BACKFILL_SLEEP": "50ms",
            "RUN_KEY_BACKFILL_METRICS_FILE": str(tmp_path / "backfill.prom"),
        }
    )
    assert settings.dry_run is True
    assert settings.batch_size == 10_000
    assert settings.max_updates == 1
    assert settings.on_conflict == "skip"
    assert settings.lock_timeout_ms == 250
    assert settings.statement_timeout_ms == 60_000
    assert settings.sleep_ms == 50
    assert settings.metrics_file == tmp_path / "backfill.prom"


def test_x_argument_wins_over_environment() -> None:
    settings = load_settings(
        {"RUN_KEY_BACKFILL_BATCH_SIZE": "100", "RUN_KEY_BACKFILL_DRY_RUN": "true"},
        {"batch_size": "7", "dry_run": "off"},
    )
    assert settings.batch_size == 7
    assert settings.dry_run is False


def test_invalid_environment_reported_under_x() -> None:
    # The -x value replaces the variable, but a bad variable is still reported:
    # an operator who set it should learn it is wrong.
    with pytest.raises(BackfillError) as error:
        load_settings({"RUN_KEY_BACKFILL_BATCH_SIZE": "lots"}, {"batch_size": "7"})
    assert str(error.value) == (
        "invalid RUN_KEY_BACKFILL_BATCH_SIZE 'lots': expected a whole number "
        "from 1 to 10000"
    )


def test_empty_variable_counts_as_unset() -> None:
    assert load_settings({"RUN_KEY_BACKFILL_MAX_UPDATES": ""}).max_updates is None


@pytest.mark.parametrize(
    ("word", "expected"),
    [
        ("1", True),
        ("TRUE", True),
        ("yes", True),
        ("On", True),
        ("0", False),
        ("false", False),
        ("NO", False),
        ("off", False),
    ],
)
def test_boolean_words(word: str, expected: bool) -> None:
    assert load_settings({"RUN_KEY_BACKFILL_DRY_RUN": word}).dry_run is expected


@pytest.mark.parametrize(
    ("text", "expected_ms"),
    [("2s", 2000), ("500ms", 500), ("1min", 60_000), ("750", 750), (" 3 s ", 3000)],
)
def test_duration_units(text: str, expected_ms: int) -> None:
    assert (
        load_settings({"RUN_KEY_BACKFILL_LOCK_TIMEOUT": text}).lock_timeout_ms
        == expected_ms
    )


DURATION_EXPECTED = "a duration such as 500ms, 2s or 1min, from 1ms to 2147483647ms"
SLEEP_EXPECTED = "a duration such as 500ms, 2s or 1min, from 0 to 2147483647ms"


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("DRY_RUN", "maybe", "expected one of 1, true, yes, on, 0, false, no, off"),
        ("DRY_RUN", "2", "expected one of 1, true, yes, on, 0, false, no, off"),
        ("BATCH_SIZE", "0", "expected a whole number from 1 to 10000"),
        ("BATCH_SIZE", "10001", "expected a whole number from 1 to 10000"),
        ("BATCH_SIZE", "-5", "expected a whole number from 1 to 10000"),
        ("BATCH_SIZE", "1.5", "expected a whole number from 1 to 10000"),
        ("BATCH_SIZE", "1e3", "expected a whole number from 1 to 10000"),
        ("MAX_UPDATES", "0", "expected a whole number from 1 to 9223372036854775807"),
        ("MAX_UPDATES", "-1", "expected a whole number from 1 to 9223372036854775807"),
        ("MAX_UPDATES", "all", "expected a whole number from 1 to 9223372036854775807"),
        ("ON_CONFLICT", "ignore", "expected suffix or skip"),
        ("LOCK_TIMEOUT", "0", f"expected {DURATION_EXPECTED}"),
        ("LOCK_TIMEOUT", "2h", f"expected {DURATION_EXPECTED}"),
        ("LOCK_TIMEOUT", "-1s", f"expected {DURATION_EXPECTED}"),
        ("LOCK_TIMEOUT", "1.5s", f"expected {DURATION_EXPECTED}"),
        ("STATEMENT_TIMEOUT", "0ms", f"expected {DURATION_EXPECTED}"),
        ("STATEMENT_TIMEOUT", "99999999s", f"expected {DURATION_EXPECTED}"),
        ("SLEEP", "soon", f"expected {SLEEP_EXPECTED}"),
    ],
)
def test_invalid_values(variable: str, value: str, message: str) -> None:
    with pytest.raises(BackfillError) as error:
        load_settings({f"RUN_KEY_BACKFILL_{variable}": value})
    assert (
        str(error.value) == f"invalid RUN_KEY_BACKFILL_{variable} {value!r}: {message}"
    )


def test_invalid_x_argument_names_the_argument() -> None:
    with pytest.raises(BackfillError) as error:
        load_settings({}, {"on_conflict": "merge"})
    assert str(error.value) == "invalid -x on_conflict 'merge': expected suffix or skip"


def test_unknown_x_argument_rejected() -> None:
    with pytest.raises(BackfillError) as error:
        load_settings({}, {"batchsize": "10"})
    assert str(error.value) == (
        "unknown -x argument 'batchsize': expected one of dry_run, batch_size, "
        "max_updates, on_conflict, lock_timeout, statement_timeout, sleep, metrics_file"
    )


def test_metrics_file_in_missing_directory(tmp_path: Path) -> None:
    target = tmp_path / "absent" / "backfill.prom"
    with pytest.raises(BackfillError) as error:
        load_settings({"RUN_KEY_BACKFILL_METRICS_FILE": str(target)})
    assert str(error.value) == (
        f"invalid RUN_KEY_BACKFILL_METRICS_FILE {str(target)!r}: expected a file "
        f"in an existing directory ({tmp_path / 'absent'})"
    )


def test_metrics_file_that_is_a_directory(tmp_path: Path) -> None:
    with pytest.raises(BackfillError) as error:
        load_settings({"RUN_KEY_BACKFILL_METRICS_FILE": str(tmp_path)})
    assert str(error.value) == (
        f"invalid RUN_KEY_BACKFILL_METRICS_FILE {str(tmp_path)!r}: expected the "
        "path of a file to write, not a directory"
    )


def test_describe_lists_every_knob(tmp_path: Path) -> None:
    settings = BackfillSettings(max_updates=10, metrics_file=tmp_path / "m.prom")
    assert settings.describe() == (
        "dry_run=false batch_size=500 max_updates=10 on_conflict=suffix "
        "lock_timeout=2000ms statement_timeout=30000ms sleep=0ms "
        f"metrics_file={tmp_path / 'm.prom'}"
    )
