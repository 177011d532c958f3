"""The dry run's conflict preview, on real derived keys."""

from __future__ import annotations

import io
import uuid

import sqlalchemy as sa
from alembic.config import Config
from helpers import insert_runs, make_run, upgrade_to_041

from migrations_support.preview import (
    ConflictGroup,
    ConflictPreview,
    preview_conflicts,
    write_preview,
)


def run_id(number: int) -> uuid.UUID:
    return uuid.UUID(f"{number:08x}-2222-4222-8222-222222222222")


def preview(
    engine: sa.Engine, groups_shown: int = 20, runs_shown: int = 10
) -> ConflictPreview:
    with engine.connect() as connection:
        return preview_conflicts(connection, 30_000, groups_shown, runs_shown)


def test_no_conflicts(alembic_cfg: Config, engine: sa.Engine) -> None:
    upgrade_to_041(
        alembic_cfg,
        engine,
        [
            make_run(run_id(1), partition_key="a"),
            make_run(run_id(2), partition_key="b"),
            # Same key in another workflow, or on a finished run: no conflict.
            make_run(run_id(3), partition_key="a", workflow_id="other"),
            make_run(run_id(4), partition_key="A", status="succeeded"),
        ],
    )
    assert preview(engine) == ConflictPreview(0, 0, [])


def test_groups_candidates_and_keyed_runs(
    alembic_cfg: Config, engine: sa.Engine
) -> None:
    upgrade_to_041(
        alembic_cfg,
        engine,
        [
            # Three candidates deriving "eu-west"; the earliest is listed first.
            make_run(run_id(3), partition_key="EU West", minute=1),
            make_run(run_id(1), partition_key="eu  west", minute=2),
            make_run(run_id(2), trigger={"dedupe_key": "Eu West"}, minute=3),
            # One candidate deriving a key an active run already holds.
            make_run(run_id(4), event_id="ＯＲＤＥＲ-7", minute=4),
            # Finished candidates never conflict.
            make_run(run_id(6), partition_key="eu-west", status="failed", minute=6),
        ],
    )
    insert_runs(
        engine,
        [
            make_run(
                run_id(5),
                run_key="order-7",
                run_key_normalized="order-7",
                status="waiting",
                minute=5,
            )
        ],
    )
    assert preview(engine) == ConflictPreview(
        conflicting_runs=3,
        group_count=2,
        groups=[
            ConflictGroup(
                "billing.nightly", "eu-west", None, [run_id(3), run_id(1), run_id(2)], 3
            ),
            ConflictGroup("billing.nightly", "order-7", run_id(5), [run_id(4)], 1),
        ],
    )


def test_listing_is_capped(alembic_cfg: Config, engine: sa.Engine) -> None:
    runs = [
        make_run(run_id(number), partition_key=f"key {number // 4}", minute=number)
        for number in range(12)
    ]
    upgrade_to_041(alembic_cfg, engine, runs)
    result = preview(engine, groups_shown=2, runs_shown=2)
    assert result.conflicting_runs == 9
    assert result.group_count == 3
    assert [group.run_key_normalized for group in result.groups] == ["key-0", "key-1"]
    assert result.groups[0].candidate_ids == [run_id(0), run_id(1)]
    assert result.groups[0].candidate_count == 4

    out = io.StringIO()
    write_preview(result, out)
    assert out.getvalue().splitlines() == [
        "# conflict preview: conflicts=9 groups=3",
        '# conflict group workflow_id="billing.nightly" run_key_normalized="key-0" '
        f"conflicts=3 keyed_run=none candidates={run_id(0)},{run_id(1)} "
        "candidates_not_shown=2",
        '# conflict group workflow_id="billing.nightly" run_key_normalized="key-1" '
        f"conflicts=3 keyed_run=none candidates={run_id(4)},{run_id(5)} "
        "candidates_not_shown=2",
        "# conflict preview: groups_not_shown=1",
    ]


def test_control_characters_are_escaped() -> None:
    result = ConflictPreview(
        1, 1, [ConflictGroup("wf\nnext", "k\u2028", run_id(1), [run_id(2)], 1)]
    )
    out = io.StringIO()
    write_preview(result, out)
    assert out.getvalue().splitlines()[1] == (
        '# conflict group workflow_id="wf\\nnext" run_key_normalized="k\\u2028" '
        f"conflicts=1 keyed_run={run_id(1)} candidates={run_id(2)}"
    )
