"""``python -m migrations_support``: the ``workflow-run-key-backfill`` command."""

from migrations_support.cli import main

raise SystemExit(main())
