"""Shared code behind the workflow run key migrations and their command line.

Revision files in ``alembic/versions`` stay thin and call into this package:
``schema`` defines the tables and DDL, ``derivation`` the key derivation SQL,
``batches`` the batch statements, ``walker`` the batch loop, ``settings`` the
knobs, ``metrics`` the Prometheus counters and ``backfill`` the revision 042
entry points. ``cli`` is the ``workflow-run-key-backfill`` command, with its
schema checks in ``preflight``, the dry run's conflict preview in ``preview``
and progress lines in ``progress``.
"""
