"""Connecting to PostgreSQL from ``DATABASE_URL`` and checking the server."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Mapping

import sqlalchemy as sa
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.pool import NullPool

from migrations_support.errors import BackfillError

log = logging.getLogger(__name__)

URL_VARIABLE = "DATABASE_URL"
URL_EXAMPLE = "postgresql://user:password@host:5432/dbname"
_POSTGRES_SCHEMES = ("postgres", "postgresql", "postgresql+psycopg")

# One key for every runner of these migrations and of the command line, so
# two runners never walk the same table at once. The value is arbitrary;
# it spells "runkeys" in ASCII.
ADVISORY_LOCK_KEY = 0x72756E6B657973
ADVISORY_LOCK_POLL_S = 1.0


def parse_database_url(raw: str | None) -> URL:
    """Return the URL in ``DATABASE_URL`` with the psycopg 3 driver.

    ``postgres://`` and ``postgresql://`` URLs run on psycopg 3. Percent
    escapes in the user and password are decoded. Raises ``BackfillError``
    for a missing or unusable URL, without the password in the message.
    """
    if raw is None or not raw.strip():
        raise BackfillError(f"{URL_VARIABLE} is not set: set it to {URL_EXAMPLE}")
    try:
        url = make_url(raw.strip())
    except ArgumentError:
        raise BackfillError(
            f"{URL_VARIABLE} is not a valid database URL: expected {URL_EXAMPLE}"
        ) from None
    if url.drivername not in _POSTGRES_SCHEMES:
        raise BackfillError(
            f"{URL_VARIABLE} has scheme {url.drivername!r}: expected postgresql:// "
            "(this project runs on PostgreSQL with psycopg 3)"
        )
    if not url.database:
        raise BackfillError(f"{URL_VARIABLE} names no database: expected {URL_EXAMPLE}")
    return url.set(drivername="postgresql+psycopg")


def url_from_environment(environ: Mapping[str, str]) -> URL:
    """Return the parsed ``DATABASE_URL`` of ``environ``."""
    return parse_database_url(environ.get(URL_VARIABLE))


def describe_url(url: URL) -> str:
    """Return the URL for logs, with the password masked."""
    return url.render_as_string(hide_password=True)


def create_engine(url: URL) -> sa.Engine:
    """Return an engine that opens a new connection each time.

    NullPool keeps no idle connection behind, so a finished run leaves
    nothing open on the server.
    """
    return sa.create_engine(url, poolclass=NullPool)


def connect_error(url: URL, error: Exception) -> BackfillError:
    """Return a one-line error for a failed connection, without the password."""
    reason = str(getattr(error, "orig", error)).strip().splitlines()
    first_line = reason[0] if reason else type(error).__name__
    return BackfillError(
        f"could not connect to the database in {URL_VARIABLE} "
        f"({describe_url(url)}): {first_line}"
    )


def check_server_encoding(connection: sa.Connection) -> None:
    """Raise ``BackfillError`` unless the database encoding is UTF-8.

    NFKC normalization and the key rules are defined on Unicode text, and
    PostgreSQL's ``normalize()`` works only in a UTF-8 database.
    """
    encoding = connection.execute(sa.text("SHOW server_encoding")).scalar_one()
    if str(encoding).upper() not in ("UTF8", "UTF-8"):
        raise BackfillError(
            f"database encoding is {encoding}: run keys need a UTF8 database "
            "(NFKC normalization is defined only there); nothing was written"
        )


@contextlib.contextmanager
def advisory_lock(connection: sa.Connection) -> Iterator[None]:
    """Hold the session-level advisory lock that allows one runner at a time.

    A second runner polls until the first releases the lock, then finds
    the work done. The lock belongs to the session, so it survives the
    commits of each batch and ends with the connection if the process dies.
    """
    if not _try_advisory_lock(connection):
        log.info("another runner has the backfill lock; waiting for it to finish")
        while not _try_advisory_lock(connection):
            time.sleep(ADVISORY_LOCK_POLL_S)
        log.info("backfill lock acquired")
    try:
        yield
    finally:
        if connection.in_transaction():
            connection.rollback()
        connection.execute(sa.select(sa.func.pg_advisory_unlock(ADVISORY_LOCK_KEY)))
        connection.commit()


def _try_advisory_lock(connection: sa.Connection) -> bool:
    # A session blocked in pg_advisory_lock() keeps its statement's snapshot,
    # and CREATE INDEX CONCURRENTLY in the runner holding the lock waits for
    # every older snapshot in the database. The two then deadlock and
    # PostgreSQL aborts one of them, so each try is its own short transaction.
    acquired = connection.execute(
        sa.select(sa.func.pg_try_advisory_lock(ADVISORY_LOCK_KEY))
    ).scalar_one()
    connection.commit()
    return bool(acquired)
