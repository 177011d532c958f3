"""Backfill knobs: environment variables and Alembic ``-x`` arguments.

Each knob is an environment variable ``RUN_KEY_BACKFILL_<NAME>`` and an
``-x <name>=<value>`` argument; the ``-x`` argument wins. Every value is
checked before anything is written, and an invalid one raises
``BackfillError`` naming the knob, the value and what is accepted.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Literal

from migrations_support.errors import BackfillError

ENV_PREFIX = "RUN_KEY_BACKFILL_"
MIN_BATCH_SIZE = 1
MAX_BATCH_SIZE = 10_000
# PostgreSQL keeps lock_timeout and statement_timeout as a 32-bit count of ms.
MAX_TIMEOUT_MS = 2_147_483_647

ConflictPolicy = Literal["suffix", "skip"]

_TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
_FALSE_WORDS = frozenset({"0", "false", "no", "off"})
_DURATION = re.compile(r"^(\d+)\s*(ms|s|min)?$")
_DURATION_UNITS_MS = {"ms": 1, "s": 1000, "min": 60_000}


@dataclasses.dataclass(frozen=True)
class BackfillSettings:
    """Knob values in force for one backfill run."""

    dry_run: bool = False
    batch_size: int = 500
    max_updates: int | None = None
    on_conflict: ConflictPolicy = "suffix"
    lock_timeout_ms: int = 2000
    statement_timeout_ms: int = 30_000
    sleep_ms: int = 0
    metrics_file: Path | None = None

    def describe(self) -> str:
        """Return the knobs as ``name=value`` pairs for logs and SQL headers."""
        cap = "unlimited" if self.max_updates is None else str(self.max_updates)
        metrics_file = "none" if self.metrics_file is None else str(self.metrics_file)
        return (
            f"dry_run={str(self.dry_run).lower()} batch_size={self.batch_size} "
            f"max_updates={cap} on_conflict={self.on_conflict} "
            f"lock_timeout={self.lock_timeout_ms}ms "
            f"statement_timeout={self.statement_timeout_ms}ms "
            f"sleep={self.sleep_ms}ms metrics_file={metrics_file}"
        )


def _reject(origin: str, value: str, expected: str) -> BackfillError:
    return BackfillError(f"invalid {origin} {value!r}: expected {expected}")


def parse_bool(origin: str, value: str) -> bool:
    """Parse 1/true/yes/on or 0/false/no/off, in any case."""
    word = value.strip().lower()
    if word in _TRUE_WORDS:
        return True
    if word in _FALSE_WORDS:
        return False
    raise _reject(origin, value, "one of 1, true, yes, on, 0, false, no, off")


def parse_int_in_range(origin: str, value: str, low: int, high: int) -> int:
    """Parse a whole number from ``low`` to ``high`` inclusive."""
    text = value.strip()
    if not re.fullmatch(r"\d+", text) or not low <= int(text) <= high:
        raise _reject(origin, value, f"a whole number from {low} to {high}")
    return int(text)


def parse_duration_ms(origin: str, value: str, *, allow_zero: bool) -> int:
    """Parse ``250ms``, ``2s`` or ``1min`` into milliseconds.

    A bare number counts milliseconds, as PostgreSQL's own timeout
    settings do.
    """
    match = _DURATION.fullmatch(value.strip().lower())
    smallest = "0" if allow_zero else "1ms"
    expected = (
        f"a duration such as 500ms, 2s or 1min, from {smallest} to {MAX_TIMEOUT_MS}ms"
    )
    if match is None:
        raise _reject(origin, value, expected)
    amount_ms = int(match.group(1)) * _DURATION_UNITS_MS[match.group(2) or "ms"]
    if amount_ms > MAX_TIMEOUT_MS or (amount_ms == 0 and not allow_zero):
        raise _reject(origin, value, expected)
    return amount_ms


def parse_conflict_policy(origin: str, value: str) -> ConflictPolicy:
    """Parse ``suffix`` or ``skip``."""
    word = value.strip().lower()
    if word == "suffix":
        return "suffix"
    if word == "skip":
        return "skip"
    raise _reject(origin, value, "suffix or skip")


def parse_metrics_file(origin: str, value: str) -> Path:
    """Check that the metrics file can be created before any row is written."""
    path = Path(value.strip()).expanduser()
    if not value.strip() or path.is_dir():
        raise _reject(origin, value, "the path of a file to write, not a directory")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise _reject(origin, value, f"a file in an existing directory ({folder})")
    if not os.access(folder, os.W_OK):
        raise _reject(origin, value, f"a file in a writable directory ({folder})")
    return path


def _parse_knob(name: str, origin: str, value: str) -> object:
    if name == "dry_run":
        return parse_bool(origin, value)
    if name == "batch_size":
        return parse_int_in_range(origin, value, MIN_BATCH_SIZE, MAX_BATCH_SIZE)
    if name == "max_updates":
        return parse_int_in_range(origin, value, 1, 2**63 - 1)
    if name == "on_conflict":
        return parse_conflict_policy(origin, value)
    if name in ("lock_timeout", "statement_timeout"):
        return parse_duration_ms(origin, value, allow_zero=False)
    if name == "sleep":
        return parse_duration_ms(origin, value, allow_zero=True)
    return parse_metrics_file(origin, value)


# Knob name -> field of BackfillSettings.
KNOB_FIELDS = {
    "dry_run": "dry_run",
    "batch_size": "batch_size",
    "max_updates": "max_updates",
    "on_conflict": "on_conflict",
    "lock_timeout": "lock_timeout_ms",
    "statement_timeout": "statement_timeout_ms",
    "sleep": "sleep_ms",
    "metrics_file": "metrics_file",
}


def x_argument_label(name: str) -> str:
    """Return how an error message names the ``-x`` argument for knob ``name``."""
    return f"-x {name}"


def load_settings(
    environ: Mapping[str, str],
    x_arguments: Mapping[str, str] | None = None,
    *,
    override_label: Callable[[str], str] = x_argument_label,
) -> BackfillSettings:
    """Build the settings from the environment and ``-x`` arguments.

    An empty environment variable counts as unset. An ``-x`` argument that
    names no knob is rejected, so a misspelt knob cannot silently fall back
    to its default. ``override_label`` names an override in error messages,
    so a caller with its own options (the command line's ``--batch-size``)
    reports the option the user typed. Raises ``BackfillError`` on the first
    invalid value.
    """
    values: dict[str, object] = {}
    for name, field in KNOB_FIELDS.items():
        variable = ENV_PREFIX + name.upper()
        raw = environ.get(variable, "")
        if raw.strip():
            values[field] = _parse_knob(name, variable, raw)

    for name, raw in (x_arguments or {}).items():
        if name not in KNOB_FIELDS:
            known = ", ".join(KNOB_FIELDS)
            raise BackfillError(
                f"unknown -x argument {name!r}: expected one of {known}"
            )
        values[KNOB_FIELDS[name]] = _parse_knob(name, override_label(name), raw)
    return BackfillSettings(**values)  # type: ignore[arg-type]
