"""Text for standard output: one line per dry-run candidate.

Each line starts with ``# ``, a comment in the Prometheus text format, so
standard output as a whole stays a valid exposition that a collector or
``promtool`` can read, with the counters at the end.
"""

from __future__ import annotations

import json

import sqlalchemy as sa

# Characters that end a line for Python's str.splitlines() or a terminal,
# beyond what json.dumps already escapes (U+0000-U+001F).
_LINE_BREAKING = {
    code: f"\\u{code:04x}" for code in (*range(0x7F, 0xA0), 0x2028, 0x2029)
}


def quote(value: object) -> str:
    """Return ``value`` as a JSON string with every control character escaped."""
    return json.dumps(str(value), ensure_ascii=False).translate(_LINE_BREAKING)


def candidate_line(row: sa.Row) -> str:
    """Return one line for a candidate: its ids, source and derived key."""
    parts = [
        f"# candidate run_id={row.id}",
        f"workflow_id={quote(row.workflow_id)}",
        f"source={row.source}",
        f"run_key={quote(row.final_key if row.final_key is not None else row.run_key)}",
        f"outcome={row.outcome}",
    ]
    if row.holder_id is not None:
        parts.append(f"conflicts_with={row.holder_id}")
    return " ".join(parts)
