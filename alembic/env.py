"""Alembic environment for the workflow run key migrations.

It keeps the template's shape; a comment on each addition gives its reason.
"""

import os
from logging.config import fileConfig

from alembic import context
from sqlalchemy.exc import OperationalError

from migrations_support import backfill, database, offline
from migrations_support.errors import BackfillError
from migrations_support.settings import load_settings

config = context.config

# Keep loggers created before this point (pytest's, an embedding program's)
# working; the template's default would disable them.
if config.config_file_name is not None and config.attributes.get(
    "configure_logger", True
):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

# The database URL comes only from DATABASE_URL, never from alembic.ini, so
# no password is kept in a file and a deploy without it fails instead of
# migrating some other database.
target_metadata = None

# Every knob is checked here, before any revision runs, so an invalid value
# stops the upgrade before anything is written.
config.attributes[backfill.SETTINGS_ATTRIBUTE] = load_settings(
    os.environ, context.get_x_argument(as_dictionary=True)
)


def run_migrations_offline() -> None:
    """Write the SQL script to standard output instead of running it."""
    settings = config.attributes[backfill.SETTINGS_ATTRIBUTE]
    if settings.dry_run:
        raise BackfillError(
            "a dry run cannot be combined with --sql: the generated SQL is the "
            "review; unset RUN_KEY_BACKFILL_DRY_RUN or -x dry_run"
        )
    # No connection is made, so a DATABASE_URL that points nowhere is fine.
    raw_url = os.environ.get(database.URL_VARIABLE)
    url = database.parse_database_url(raw_url) if raw_url else None
    # The named paramstyle keeps a literal "%" as it is. With psycopg's
    # pyformat, string literals and text() would come out with "%%".
    context.configure(
        url=url,
        dialect_name=None if url else "postgresql",
        dialect_opts={"paramstyle": "named"},
        literal_binds=True,
        transaction_per_migration=True,
    )
    context.static_output(offline.script_header(settings))
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Run the migrations on DATABASE_URL, one runner at a time."""
    url = database.url_from_environment(os.environ)
    engine = database.create_engine(url)
    try:
        connection = engine.connect()
    except OperationalError as error:
        raise database.connect_error(url, error) from None

    with connection:
        database.check_server_encoding(connection)
        connection.commit()
        with database.advisory_lock(connection):
            # Each revision commits with its own version stamp, so a failure
            # in 042 leaves 041 applied.
            context.configure(
                connection=connection,
                target_metadata=target_metadata,
                transaction_per_migration=True,
            )
            with context.begin_transaction():
                context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
