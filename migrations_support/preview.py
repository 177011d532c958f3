"""The dry run's conflict preview: active runs whose derived keys collide.

One statement derives the keys of all active candidates with
``derivation.derive_keys`` and groups them, by workflow and normalized
key, with the active runs that already hold those keys. A collision
between runs the walk reads in different batches shows up too, before
any batch runs.
"""

from __future__ import annotations

import dataclasses
import itertools
import uuid
from collections.abc import Sequence
from typing import TextIO

import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError

from migrations_support.derivation import derive_keys
from migrations_support.errors import BackfillError
from migrations_support.output import quote
from migrations_support.schema import is_active, workflow_runs

GROUPS_SHOWN = 20
RUNS_SHOWN_PER_GROUP = 10
QUERY_CANCELED = "57014"


@dataclasses.dataclass(frozen=True)
class ConflictGroup:
    """Active runs of one workflow that share a normalized key.

    ``keyed_id`` is the run that already has the key in the table, if
    any; ``candidate_ids`` lists at most ``RUNS_SHOWN_PER_GROUP`` of the
    ``candidate_count`` candidates deriving it, in created_at order.
    """

    workflow_id: str
    run_key_normalized: str
    keyed_id: uuid.UUID | None
    candidate_ids: list[uuid.UUID]
    candidate_count: int

    @property
    def conflicts(self) -> int:
        """Return the runs of the group that cannot keep the key: all but one."""
        return self.candidate_count - (0 if self.keyed_id else 1)


@dataclasses.dataclass(frozen=True)
class ConflictPreview:
    """Colliding active runs, in total and the first groups of them."""

    conflicting_runs: int
    group_count: int
    groups: list[ConflictGroup]


def _colliding_runs() -> sa.Subquery:
    """Return the active runs, keyed or candidate, of each colliding group.

    Columns: ``id``, ``workflow_id``, ``run_key_normalized``, ``keyed``,
    ``position`` in the group (the keyed run first, then by created_at
    and id), ``group_size``, ``group_rank`` (groups in key order) and
    ``group_count``.
    """
    w = workflow_runs
    candidates = (
        sa.select(
            w.c.id,
            w.c.workflow_id,
            w.c.partition_key,
            w.c.trigger,
            w.c.event_id,
            w.c.created_at,
        )
        .where(w.c.run_key.is_(None), is_active(w.c.status))
        .subquery("candidates")
    )
    derived = derive_keys(candidates)
    candidate_keys = sa.select(
        derived.c.id,
        derived.c.workflow_id,
        derived.c.run_key_normalized,
        derived.c.created_at,
        sa.false().label("keyed"),
    ).cte("candidate_keys")
    # Matches the partial unique index, so each lookup is an index scan.
    keyed = sa.select(
        w.c.id,
        w.c.workflow_id,
        w.c.run_key_normalized,
        w.c.created_at,
        sa.true().label("keyed"),
    ).where(
        is_active(w.c.status),
        w.c.run_key.is_not(None),
        sa.tuple_(w.c.workflow_id, w.c.run_key_normalized).in_(
            sa.select(candidate_keys.c.workflow_id, candidate_keys.c.run_key_normalized)
        ),
    )
    runs = sa.union_all(sa.select(candidate_keys), keyed).subquery("runs")

    group = (runs.c.workflow_id, runs.c.run_key_normalized)
    grouped = sa.select(
        runs,
        sa.func.count().over(partition_by=group).label("group_size"),
        sa.func.row_number()
        .over(
            partition_by=group,
            order_by=(runs.c.keyed.desc(), runs.c.created_at, runs.c.id),
        )
        .label("position"),
    ).subquery("grouped")
    colliding = sa.select(grouped).where(grouped.c.group_size > 1).subquery("colliding")
    rank = sa.func.dense_rank().over(
        order_by=(colliding.c.workflow_id, colliding.c.run_key_normalized)
    )
    ranked = sa.select(colliding, rank.label("group_rank")).subquery("ranked")
    return sa.select(
        ranked,
        sa.func.max(ranked.c.group_rank).over().label("group_count"),
        sa.func.count().over().label("colliding_total"),
    ).subquery("counted")


def preview_statement(
    groups_shown: int = GROUPS_SHOWN, runs_shown: int = RUNS_SHOWN_PER_GROUP
) -> sa.Select:
    """Return the statement listing the first colliding groups, run by run."""
    runs = _colliding_runs()
    return (
        sa.select(runs)
        .where(runs.c.group_rank <= groups_shown, runs.c.position <= runs_shown + 1)
        .order_by(runs.c.group_rank, runs.c.position)
    )


def _build_preview(rows: Sequence[sa.Row], runs_shown: int) -> ConflictPreview:
    """Fold the statement's rows, ordered by group and position, into groups."""
    groups: list[ConflictGroup] = []
    for _, group_rows in itertools.groupby(rows, key=lambda row: row.group_rank):
        members = list(group_rows)
        first = members[0]
        keyed_id = first.id if first.keyed else None
        candidates = [row.id for row in members if not row.keyed]
        groups.append(
            ConflictGroup(
                workflow_id=first.workflow_id,
                run_key_normalized=first.run_key_normalized,
                keyed_id=keyed_id,
                candidate_ids=candidates[:runs_shown],
                candidate_count=first.group_size - (1 if keyed_id else 0),
            )
        )
    if not rows:
        return ConflictPreview(conflicting_runs=0, group_count=0, groups=[])
    group_count = int(rows[0].group_count)
    # Each group keeps one run on the key, so every other run conflicts.
    conflicting = int(rows[0].colliding_total) - group_count
    return ConflictPreview(conflicting, group_count, groups)


def preview_conflicts(
    connection: sa.Connection,
    statement_timeout_ms: int,
    groups_shown: int = GROUPS_SHOWN,
    runs_shown: int = RUNS_SHOWN_PER_GROUP,
) -> ConflictPreview:
    """Find the active runs whose derived keys collide, without locking any row.

    The statement reads every active candidate, so it runs under the
    backfill's statement_timeout; a timeout raises ``BackfillError``.
    """
    statement = preview_statement(groups_shown, runs_shown)
    try:
        with connection.begin():
            connection.execute(
                sa.select(
                    sa.func.set_config(
                        "statement_timeout", f"{statement_timeout_ms}ms", True
                    )
                )
            )
            rows = connection.execute(statement).all()
    except DBAPIError as error:
        if getattr(error.orig, "sqlstate", None) != QUERY_CANCELED:
            raise
        raise BackfillError(
            f"the conflict preview timed out after statement_timeout="
            f"{statement_timeout_ms}ms; raise --statement-timeout to let it finish"
        ) from None
    return _build_preview(rows, runs_shown)


def write_preview(preview: ConflictPreview, out: TextIO) -> None:
    """Write the preview to ``out``: a summary line, then one line per group.

    ``conflicts`` counts the runs that cannot keep their derived key: every
    run of a group but the one that has it or gets it first. Each line is
    a comment in the Prometheus text format, like the candidate lines, so
    standard output stays one valid exposition.
    """
    out.write(
        f"# conflict preview: conflicts={preview.conflicting_runs} "
        f"groups={preview.group_count}\n"
    )
    for group in preview.groups:
        keyed = str(group.keyed_id) if group.keyed_id else "none"
        shown = ",".join(str(run_id) for run_id in group.candidate_ids)
        hidden = group.candidate_count - len(group.candidate_ids)
        more = f" candidates_not_shown={hidden}" if hidden else ""
        out.write(
            f"# conflict group workflow_id={quote(group.workflow_id)} "
            f"run_key_normalized={quote(group.run_key_normalized)} "
            f"conflicts={group.conflicts} keyed_run={keyed} "
            f"candidates={shown}{more}\n"
        )
    hidden_groups = preview.group_count - len(preview.groups)
    if hidden_groups:
        out.write(f"# conflict preview: groups_not_shown={hidden_groups}\n")
