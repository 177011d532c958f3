"""The project's one error type."""

from alembic.util import CommandError


class BackfillError(CommandError):
    """An error an operator can act on, reported as one line.

    It subclasses Alembic's ``CommandError`` so that the ``alembic`` command
    line prints it as a single ``FAILED:`` line on standard output and exits
    with status 255 (``sys.exit(-1)`` in Alembic 1.20), keeping the traceback
    behind ``alembic --raiseerr``.
    """
