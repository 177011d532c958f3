"""The run key derivation, as one SQL definition built with SQLAlchemy Core.

The online batches, the dry run, the offline SQL and the benchmarks all
select from ``derive_keys``, so they cannot disagree on a key.

Rules, in the order they apply:

- Sources, first usable wins: ``partition_key``; ``trigger->'dedupe_key'``
  when it is a JSON string or number (the number in jsonb's text form);
  ``event_id``; else ``run-`` and the first 12 hex digits of the id.
- Cleaning: each control character (U+0001-U+001F, U+007F-U+009F; text
  cannot contain U+0000) becomes a space, each run of whitespace becomes
  one space, both ends are trimmed, and an empty result moves on to the
  next source.
- A value over 120 characters becomes its first 111 characters, ``~`` and
  the first 8 hex digits of the MD5 of the whole value in UTF-8.
- ``run_key_normalized`` is the key under NFKC, lowercased in the
  database's collation, each run of whitespace replaced by ``-``, then
  shortened by the same 120-character rule.
"""

from __future__ import annotations

import sqlalchemy as sa

MAX_KEY_LENGTH = 120
KEPT_PREFIX_LENGTH = 111
HASH_HEX_DIGITS = 8
UUID_FALLBACK_HEX_DIGITS = 12

# The Unicode White_Space characters, spelt out because the meaning of \s
# in a PostgreSQL regex depends on the server's locale (PostgreSQL 15 under
# C.UTF-8 does not count U+00A0). These are regex escapes of PostgreSQL's
# advanced regular expressions, kept as constants and never built from data.
WHITESPACE_CLASS = (
    r"[\u0009-\u000d\u0020\u0085\u00a0\u1680\u2000-\u200a"
    r"\u2028\u2029\u202f\u205f\u3000]"
)
CONTROL_CLASS = r"[\u0001-\u001f\u007f-\u009f]"

SOURCE_PARTITION = "partition"
SOURCE_DEDUPE = "dedupe"
SOURCE_EVENT = "event"
SOURCE_UUID = "uuid"


def _constant(value: str) -> sa.ColumnElement[str]:
    # literal_execute renders the constant into the SQL text, so the online
    # statements, EXPLAIN output and the offline script all read the same.
    return sa.bindparam(None, value, type_=sa.Text, literal_execute=True)


def clean_value(value: sa.ColumnElement[str]) -> sa.ColumnElement[str]:
    """Return the cleaned value: controls to spaces, whitespace collapsed, trimmed."""
    no_controls = sa.func.regexp_replace(value, _constant(CONTROL_CLASS), " ", "g")
    collapsed = sa.func.regexp_replace(
        no_controls, _constant(WHITESPACE_CLASS + "+"), " ", "g"
    )
    return sa.func.btrim(collapsed, " ")


def shorten(value: sa.ColumnElement[str]) -> sa.ColumnElement[str]:
    """Return ``value`` cut to 120 characters with an MD5 tag when it is longer."""
    digest = sa.func.md5(sa.func.convert_to(value, "UTF8"))
    shortened = (
        sa.func.left(value, KEPT_PREFIX_LENGTH)
        + "~"
        + sa.func.left(digest, HASH_HEX_DIGITS)
    )
    return sa.case(
        (sa.func.char_length(value) > MAX_KEY_LENGTH, shortened), else_=value
    )


def normalize_unshortened(run_key: sa.ColumnElement[str]) -> sa.ColumnElement[str]:
    """Return a run key under NFKC, lowercased, with whitespace runs as ``-``."""
    nfkc = sa.func.normalize(run_key, sa.literal_column("NFKC"))
    return sa.func.regexp_replace(
        sa.func.lower(nfkc), _constant(WHITESPACE_CLASS + "+"), "-", "g"
    )


def id_hex(run_id: sa.ColumnElement[object]) -> sa.ColumnElement[str]:
    """Return the 32 lowercase hex digits of a uuid."""
    return sa.func.replace(sa.cast(run_id, sa.Text), "-", "")


def dedupe_value(trigger: sa.ColumnElement[object]) -> sa.ColumnElement[str]:
    """Return ``dedupe_key`` as text when it is a JSON string or number."""
    member = trigger.op("->")(sa.literal("dedupe_key", sa.Text))
    kind = sa.func.jsonb_typeof(member)
    return sa.case(
        (kind == "string", trigger.op("->>")(sa.literal("dedupe_key", sa.Text))),
        (kind == "number", sa.cast(member, sa.Text)),
        else_=sa.null(),
    )


def _step(query: sa.Select, name: str) -> sa.Subquery:
    """Return ``query`` as a subquery that the planner keeps as its own step.

    PostgreSQL pulls a plain subquery up into the query that reads it and
    then evaluates a column's expression again at every reference. The
    cleaned source value is referenced about a dozen times on its way to
    ``run_key_normalized``, so its regular expressions ran that often per
    run. A subquery with OFFSET is never pulled up, and OFFSET 0 skips
    no row, so each step computes its columns once per run.
    """
    return query.offset(sa.literal_column("0", sa.Integer)).subquery(name)


def derive_keys(runs: sa.FromClause) -> sa.Subquery:
    """Return ``runs`` with ``source``, ``run_key`` and ``run_key_normalized`` added.

    ``runs`` must have the columns ``id``, ``partition_key``, ``trigger`` and
    ``event_id``; all its columns pass through unchanged. Each step is its
    own subquery, so every expression appears once in the SQL text and is
    computed once per run.

    A condition on the result cannot reach ``runs`` through these steps, so
    filter ``runs`` itself, or every run in it is derived.
    """
    passthrough = [column.name for column in runs.columns]
    cleaned = _step(
        sa.select(
            runs,
            clean_value(runs.c.partition_key).label("clean_partition"),
            clean_value(dedupe_value(runs.c.trigger)).label("clean_dedupe"),
            clean_value(runs.c.event_id).label("clean_event"),
        ),
        "cleaned",
    )

    choices = [
        (cleaned.c.clean_partition, SOURCE_PARTITION),
        (cleaned.c.clean_dedupe, SOURCE_DEDUPE),
        (cleaned.c.clean_event, SOURCE_EVENT),
    ]
    fallback = "run-" + sa.func.left(id_hex(cleaned.c.id), UUID_FALLBACK_HEX_DIGITS)
    source = sa.case(
        *((value != "", name) for value, name in choices), else_=SOURCE_UUID
    )
    value = sa.case(*((value != "", value) for value, _ in choices), else_=fallback)
    chosen = _step(
        sa.select(
            *(cleaned.c[name] for name in passthrough),
            source.label("source"),
            value.label("source_value"),
        ),
        "chosen",
    )

    keyed = _step(
        sa.select(
            *(chosen.c[name] for name in passthrough),
            chosen.c.source,
            shorten(chosen.c.source_value).label("run_key"),
        ),
        "keyed",
    )
    dashed = _step(
        sa.select(
            keyed, normalize_unshortened(keyed.c.run_key).label("normalized_value")
        ),
        "dashed",
    )
    return sa.select(
        *(dashed.c[name] for name in passthrough),
        dashed.c.source,
        dashed.c.run_key,
        shorten(dashed.c.normalized_value).label("run_key_normalized"),
    ).subquery("derived")
