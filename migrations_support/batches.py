"""The batch statements: key one batch of candidates, or revert one batch.

Each builder takes the values that change from batch to batch (the lower
bound of the keyset walk, the batch size, the runs to leave out) as SQL
expressions. The online walker passes bound parameters, and the offline
script passes PL/pgSQL variables, so both run the same statement text.
"""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from migrations_support.derivation import derive_keys, id_hex
from migrations_support.schema import is_active, ledger, workflow_runs
from migrations_support.settings import ConflictPolicy

OUTCOME_UPDATED = "updated"
OUTCOME_SKIPPED = "skipped"
# A candidate of the batch's snapshot that another writer keyed or deleted
# before the batch could lock it. It counts as skipped.
OUTCOME_TAKEN = "taken"
SHORT_SUFFIX_HEX_DIGITS = 8


@dataclass(frozen=True)
class BatchInputs:
    """SQL expressions for the values that change between batches.

    ``lower_id`` is the smallest run id the batch may read, ``limit`` the
    batch size and ``excluded_ids`` a uuid[] of candidates to pass over
    (those skipped or failed earlier in this run).
    """

    lower_id: sa.ColumnElement[object]
    limit: sa.ColumnElement[int]
    excluded_ids: sa.ColumnElement[object]


@dataclass(frozen=True)
class PendingKeys:
    """Arrays of keys a dry run would have written in earlier batches.

    A dry run writes nothing, so later batches must see these keys as
    taken, as the real run finds its own earlier writes in the table.
    """

    workflow_ids: sa.ColumnElement[object]
    keys: sa.ColumnElement[object]
    run_ids: sa.ColumnElement[object]


def bound_inputs() -> BatchInputs:
    """Return bound parameters for the online walker."""
    return BatchInputs(
        lower_id=sa.bindparam("lower_id", type_=postgresql.UUID(as_uuid=True)),
        limit=sa.bindparam("batch_limit", type_=sa.Integer),
        excluded_ids=sa.bindparam(
            "excluded_ids", type_=postgresql.ARRAY(postgresql.UUID(as_uuid=True))
        ),
    )


def bound_pending() -> PendingKeys:
    """Return bound parameters for the keys a dry run remembers."""
    return PendingKeys(
        workflow_ids=sa.bindparam(
            "pending_workflow_ids", type_=postgresql.ARRAY(sa.Text)
        ),
        keys=sa.bindparam("pending_keys", type_=postgresql.ARRAY(sa.Text)),
        run_ids=sa.bindparam(
            "pending_run_ids", type_=postgresql.ARRAY(postgresql.UUID(as_uuid=True))
        ),
    )


_CANDIDATE_COLUMNS = (
    "id",
    "workflow_id",
    "status",
    "partition_key",
    "trigger",
    "event_id",
    "created_at",
)


def select_candidates(inputs: BatchInputs, *, lock: bool) -> sa.Select:
    """Return the next batch of candidates in id order.

    With ``lock`` the rows are locked ``FOR UPDATE``; a row another
    transaction holds is waited for up to lock_timeout. PostgreSQL rechecks
    ``run_key IS NULL`` after the wait, so a row another writer keyed
    meanwhile drops out of the batch.
    """
    w = workflow_runs
    query = (
        sa.select(*(w.c[name] for name in _CANDIDATE_COLUMNS))
        .where(
            w.c.run_key.is_(None),
            w.c.id >= inputs.lower_id,
            w.c.id != sa.func.all_(inputs.excluded_ids),
        )
        .order_by(w.c.id)
        .limit(inputs.limit)
    )
    return query.with_for_update() if lock else query


def _lock_candidates(snapshot: sa.CTE) -> sa.Select:
    """Return the snapshot's runs that still lack a key, locked FOR UPDATE.

    A run another transaction holds is waited for up to lock_timeout.
    PostgreSQL then rechecks ``run_key IS NULL`` on the newest row version,
    so a run another writer keyed or deleted meanwhile drops out. The batch
    reports it as taken.
    """
    w = workflow_runs
    snapshot_ids = sa.select(sa.func.array_agg(snapshot.c.id)).scalar_subquery()
    return (
        sa.select(*(w.c[name] for name in _CANDIDATE_COLUMNS))
        # = ANY(array) is an index condition on the primary key whatever
        # the statistics show, where IN (subquery) may become a hash join
        # over the whole table.
        .where(
            w.c.id == sa.any_(sa.cast(snapshot_ids, postgresql.ARRAY(w.c.id.type))),
            w.c.run_key.is_(None),
        )
        .with_for_update(of=w)
    )


def _table_holder(
    run: sa.FromClause, key: sa.ColumnElement[str]
) -> sa.ScalarSelect[object]:
    # Matches the partial unique index, so this is an index lookup.
    holder = workflow_runs.alias("holder")
    return (
        sa.select(holder.c.id)
        .where(
            holder.c.workflow_id == run.c.workflow_id,
            holder.c.run_key_normalized == key,
            is_active(holder.c.status),
            holder.c.id != run.c.id,
        )
        .limit(1)
        .scalar_subquery()
    )


def _pending_holder(
    pending: PendingKeys | None, run: sa.FromClause, key: sa.ColumnElement[str]
) -> sa.ColumnElement[object]:
    if pending is None:
        return sa.null()  # type: ignore[return-value]
    remembered = (
        sa.func.unnest(pending.workflow_ids, pending.keys, pending.run_ids)
        .table_valued("workflow_id", "run_key_normalized", "run_id")
        .render_derived(name="pending")
    )
    return (
        sa.select(remembered.c.run_id)
        .where(
            remembered.c.workflow_id == run.c.workflow_id,
            remembered.c.run_key_normalized == key,
        )
        .limit(1)
        .scalar_subquery()
    )


def _find_conflicts(derived: sa.FromClause, pending: PendingKeys | None) -> sa.CTE:
    """Mark each active candidate whose normalized key is already held."""
    active = is_active(derived.c.status)
    first_in_batch = sa.func.first_value(derived.c.id).over(
        partition_by=(derived.c.workflow_id, derived.c.run_key_normalized, active),
        order_by=(derived.c.created_at, derived.c.id),
    )
    ranked = sa.select(
        derived, active.label("active"), first_in_batch.label("first_in_batch")
    ).subquery("ranked")

    key = ranked.c.run_key_normalized
    holder = sa.case(
        (
            ranked.c.active,
            sa.func.coalesce(
                _table_holder(ranked, key),
                _pending_holder(pending, ranked, key),
                sa.func.nullif(ranked.c.first_in_batch, ranked.c.id),
            ),
        ),
        else_=sa.null(),
    )
    return sa.select(ranked, holder.label("holder_id")).cte("checked")


def _suffix_taken(
    checked: sa.CTE, pending: PendingKeys | None, suffix: sa.ColumnElement[str]
) -> sa.ColumnElement[bool]:
    """Return whether the normalized key with ``suffix`` is held in the table,
    by a remembered dry-run key or by a candidate of this batch keeping its key."""
    key = checked.c.run_key_normalized + suffix
    winner = checked.alias()
    # PostgreSQL runs an uncorrelated IN as a hashed subplan when the
    # planner expects the hash table to fit in work_mem * hash_mem_multiplier,
    # so each conflict costs one lookup. A correlated EXISTS scans the batch
    # once per conflict, which is quadratic for a batch of the whole table.
    # Neither side can be NULL, so IN and EXISTS give the same result.
    kept_keys = sa.select(winner.c.workflow_id, winner.c.run_key_normalized).where(
        winner.c.active, winner.c.holder_id.is_(None)
    )
    return sa.or_(
        _table_holder(checked, key).is_not(None),
        _pending_holder(pending, checked, key).is_not(None),
        sa.tuple_(checked.c.workflow_id, key).in_(kept_keys),
    )


def resolve_keys(
    candidates: sa.FromClause,
    policy: ConflictPolicy,
    pending: PendingKeys | None = None,
) -> sa.Subquery:
    """Return each candidate with its derived keys, conflict holder and outcome.

    Columns: the candidate's own, ``source``, ``run_key`` and
    ``run_key_normalized`` as derived, ``holder_id`` (the run already
    holding the key, NULL when none), ``final_key``, ``final_normalized``
    and ``outcome`` (``updated`` or ``skipped``).
    """
    checked = _find_conflicts(derive_keys(candidates), pending)
    hex_id = id_hex(checked.c.id)
    short_suffix = "-" + sa.func.left(hex_id, SHORT_SUFFIX_HEX_DIGITS)
    long_suffix = "-" + hex_id

    conflict = checked.c.holder_id.is_not(None)
    if policy == "skip":
        chosen_suffix: sa.ColumnElement[str] = sa.case(
            (conflict, sa.null()), else_=sa.literal("", sa.Text)
        )
    else:
        chosen_suffix = sa.case(
            (sa.not_(conflict), sa.literal("", sa.Text)),
            (sa.not_(_suffix_taken(checked, pending, short_suffix)), short_suffix),
            (sa.not_(_suffix_taken(checked, pending, long_suffix)), long_suffix),
            else_=sa.null(),
        )
    suffixed = sa.select(checked, chosen_suffix.label("chosen_suffix")).subquery(
        "suffixed"
    )

    final_key = suffixed.c.run_key + suffixed.c.chosen_suffix
    final_normalized = suffixed.c.run_key_normalized + suffixed.c.chosen_suffix
    outcome = sa.case(
        (suffixed.c.chosen_suffix.is_(None), OUTCOME_SKIPPED), else_=OUTCOME_UPDATED
    )
    return sa.select(
        suffixed,
        final_key.label("final_key"),
        final_normalized.label("final_normalized"),
        outcome.label("outcome"),
    ).subquery("resolved")


_NULL_WHEN_TAKEN = (
    "source",
    "run_key",
    "run_key_normalized",
    "holder_id",
    "final_key",
    "final_normalized",
)


def _result_columns(resolved: sa.FromClause) -> list[sa.ColumnElement[object]]:
    return [
        resolved.c.id,
        resolved.c.workflow_id,
        resolved.c.active,
        resolved.c.source,
        resolved.c.run_key,
        resolved.c.run_key_normalized,
        resolved.c.holder_id,
        resolved.c.final_key,
        resolved.c.final_normalized,
        resolved.c.outcome,
    ]


def key_batch_statement(inputs: BatchInputs, policy: ConflictPolicy) -> sa.Select:
    """Return the statement that keys one batch and writes its ledger rows.

    One statement, so the keys and their ledger rows commit together. It
    returns one row per candidate read, in id order.
    """
    snapshot = (
        select_candidates(inputs, lock=False)
        .with_only_columns(workflow_runs.c.id)
        .cte("snapshot")
    )
    batch = _lock_candidates(snapshot).cte("batch")
    # A CTE referenced twice is computed once.
    resolved = sa.select(resolve_keys(batch, policy)).cte("resolved")
    to_write = (
        sa.select(resolved).where(resolved.c.outcome == OUTCOME_UPDATED).cte("to_write")
    )

    w = workflow_runs
    updated = (
        sa.update(w)
        .where(w.c.id == to_write.c.id, w.c.run_key.is_(None))
        .values(
            run_key=to_write.c.final_key, run_key_normalized=to_write.c.final_normalized
        )
        # RETURNING may name the FROM list's columns, so the ledger rows
        # come straight from the rows the UPDATE changed, without a join.
        .returning(w.c.id, w.c.run_key, w.c.run_key_normalized, to_write.c.source)
        .cte("updated")
    )
    written = sa.select(
        updated.c.id, updated.c.run_key, updated.c.run_key_normalized, updated.c.source
    )
    insert = postgresql.insert(ledger).from_select(
        ["run_id", "run_key", "run_key_normalized", "source"], written
    )
    insert = insert.on_conflict_do_update(
        index_elements=[ledger.c.run_id],
        set_={
            "run_key": insert.excluded.run_key,
            "run_key_normalized": insert.excluded.run_key_normalized,
            "source": insert.excluded.source,
            "assigned_at": sa.func.now(),
        },
    )
    ledger_rows = insert.returning(ledger.c.run_id).cte("ledger_rows")

    written_ids = sa.select(ledger_rows.c.run_id)
    wrote = resolved.c.id.in_(written_ids)
    read = sa.select(*_result_columns(resolved), wrote.label("written"))
    taken = sa.select(
        snapshot.c.id,
        sa.null().label("workflow_id"),
        sa.false().label("active"),
        *(sa.null().label(name) for name in _NULL_WHEN_TAKEN),
        sa.literal(OUTCOME_TAKEN, sa.Text).label("outcome"),
        sa.false().label("written"),
    ).where(snapshot.c.id.not_in(sa.select(batch.c.id)))
    rows = sa.union_all(read, taken).subquery("batch_rows")
    return sa.select(rows).order_by(rows.c.id)


def derive_batch_statement(inputs: BatchInputs) -> sa.Select:
    """Return the next batch's derived keys, read without locks.

    A dry run uses it to pick, from the keys it remembers, only those the
    batch can collide with.
    """
    derived = derive_keys(select_candidates(inputs, lock=False).subquery("batch"))
    return sa.select(
        derived.c.id, derived.c.workflow_id, derived.c.run_key_normalized
    ).order_by(derived.c.id)


def preview_batch_statement(
    inputs: BatchInputs, policy: ConflictPolicy, pending: PendingKeys
) -> sa.Select:
    """Return the dry-run statement: the same resolution, nothing written or locked."""
    batch = select_candidates(inputs, lock=False).cte("batch")
    resolved = resolve_keys(batch, policy, pending)
    return sa.select(*_result_columns(resolved), sa.false().label("written")).order_by(
        resolved.c.id
    )


def revert_batch_statement(limit: sa.ColumnElement[int]) -> sa.Select:
    """Return the statement that reverts one batch of ledger rows.

    It deletes up to ``limit`` ledger rows and sets the keys of their runs
    back to NULL where the run still has the key the backfill wrote, so
    keys the application wrote since are left alone. It returns the count
    of ledger rows removed and of runs reverted.
    """
    batch_ids = sa.select(ledger.c.run_id).order_by(ledger.c.run_id).limit(limit)
    removed = (
        sa.delete(ledger)
        .where(ledger.c.run_id.in_(batch_ids.scalar_subquery()))
        .returning(ledger.c.run_id, ledger.c.run_key, ledger.c.run_key_normalized)
        .cte("removed")
    )
    w = workflow_runs
    reverted = (
        sa.update(w)
        .where(
            w.c.id == removed.c.run_id,
            w.c.run_key == removed.c.run_key,
            w.c.run_key_normalized == removed.c.run_key_normalized,
        )
        .values(run_key=None, run_key_normalized=None)
        .returning(w.c.id)
        .cte("reverted")
    )
    return sa.select(
        sa.select(sa.func.count())
        .select_from(removed)
        .scalar_subquery()
        .label("removed"),
        sa.select(sa.func.count())
        .select_from(reverted)
        .scalar_subquery()
        .label("reverted"),
    )
