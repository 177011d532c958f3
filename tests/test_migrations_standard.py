"""pytest-alembic's standard checks of the revision history.

pytest-alembic 0.13.1's plugin fails at collection under pytest 9
(``AttributeError: 'TestCollector' object has no attribute '_nodeid'``), so
pyproject.toml disables it with ``-p no:pytest_alembic``. Its test
functions are imported here instead, and the three fixtures the plugin
would provide are defined below.

pytest-alembic hands its engine to env.py as
``config.attributes["connection"]``. This project's env.py ignores that
and connects to DATABASE_URL, as it does in a deploy, because it also
takes the advisory lock and checks the server encoding on its own
connection. The ``alembic_cfg`` fixture sets DATABASE_URL to the test's
database, so both routes reach the same database and the checks run the
production path.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from alembic.config import Config
from pytest_alembic import runner
from pytest_alembic.config import Config as PytestAlembicConfig
from pytest_alembic.runner import MigrationContext
from pytest_alembic.tests import (
    test_model_definitions_match_ddl,
    test_single_head_revision,
    test_up_down_consistency,
    test_upgrade,
)

__all__ = [
    "test_model_definitions_match_ddl",
    "test_single_head_revision",
    "test_up_down_consistency",
    "test_upgrade",
]

# Autogenerate compares the database with target_metadata, and env.py sets
# none: the revisions build their tables with Core, and no ORM models exist.
test_model_definitions_match_ddl = pytest.mark.skip(
    reason="the project has no models: env.py sets target_metadata = None"
)(test_model_definitions_match_ddl)


@pytest.fixture
def alembic_config(alembic_cfg: Config) -> PytestAlembicConfig:
    """The project's alembic.ini, with DATABASE_URL set to the test's database."""
    return PytestAlembicConfig.from_raw_config(alembic_cfg)


@pytest.fixture
def alembic_engine(engine: sa.Engine) -> sa.Engine:
    """The engine pytest-alembic uses for its own reads: the test's database."""
    return engine


@pytest.fixture
def alembic_runner(
    alembic_config: PytestAlembicConfig, alembic_engine: sa.Engine
) -> Iterator[MigrationContext]:
    """The runner the standard checks drive, as the plugin's fixture builds it."""
    with runner(config=alembic_config, engine=alembic_engine) as migration_context:
        yield migration_context
