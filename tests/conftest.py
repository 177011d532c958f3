"""Fixtures: a real PostgreSQL server and a fresh database for each test.

The server is the one in ``TEST_DATABASE_URL`` when that is set, else an
embedded PostgreSQL 18 started once for the session.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.config import Config
from sqlalchemy.engine import URL, make_url

from migrations_support import database, embedded
from migrations_support.settings import ENV_PREFIX

PROJECT_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def server_url() -> Iterator[URL]:
    """URL of the PostgreSQL server the tests run against."""
    raw = os.environ.get("TEST_DATABASE_URL")
    if raw:
        yield database.parse_database_url(raw)
        return
    server = embedded.EmbeddedServer()
    try:
        yield server.url
    finally:
        server.stop()


@contextlib.contextmanager
def fresh_database(server_url: URL) -> Iterator[URL]:
    """Create a new, empty UTF-8 database and drop it when the block ends."""
    name = f"test_{uuid.uuid4().hex[:12]}"
    url = embedded.create_database(server_url, name)
    try:
        yield url
    finally:
        embedded.drop_database(server_url, name)


@pytest.fixture
def database_url(server_url: URL) -> Iterator[URL]:
    """URL of a new, empty UTF-8 database, dropped after the test."""
    with fresh_database(server_url) as url:
        yield url


@pytest.fixture
def engine(database_url: URL) -> Iterator[sa.Engine]:
    """Engine on the test's database."""
    engine = database.create_engine(database_url)
    yield engine
    engine.dispose()


@pytest.fixture
def alembic_cfg(database_url: URL, monkeypatch: pytest.MonkeyPatch) -> Config:
    """Alembic configuration whose DATABASE_URL is the test's database.

    Knob variables from the calling shell are removed, so each test sets
    exactly the knobs it means to.
    """
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)
    monkeypatch.setenv(
        database.URL_VARIABLE, database_url.render_as_string(hide_password=False)
    )
    cfg = Config(str(PROJECT_ROOT / "alembic.ini"))
    cfg.attributes["configure_logger"] = False
    return cfg


def url_with(url: URL, **parts: object) -> URL:
    """Return ``url`` with some parts replaced."""
    return make_url(url).set(**parts)  # type: ignore[arg-type]
