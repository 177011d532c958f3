"""The five backfill counters in the Prometheus text exposition format."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest, write_to_textfile
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

METRIC_PREFIX = "workflow_run_key_backfill_"

# Counter name (without the _total suffix) -> help text.
COUNTER_HELP = {
    "processed": "Candidates read: runs without a key when their batch ran.",
    "updated": "Keys written (in a dry run: keys that would be written).",
    "skipped": "Candidates left without a key: skip-policy conflicts and runs "
    "another writer locked or keyed meanwhile.",
    "conflicts": "Candidates whose derived key was already taken.",
    "failures": "Candidates whose batch failed after its retries.",
}


@dataclasses.dataclass
class BackfillCounters:
    """Counts for one run; ``processed == updated + skipped + failures``."""

    processed: int = 0
    updated: int = 0
    skipped: int = 0
    conflicts: int = 0
    failures: int = 0

    def add(self, other: BackfillCounters) -> None:
        """Add another set of counts to this one."""
        for field in dataclasses.fields(self):
            setattr(
                self, field.name, getattr(self, field.name) + getattr(other, field.name)
            )


class _CountersCollector(Collector):
    """Yields the counters without ``_created`` samples.

    ``prometheus_client.Counter`` adds a ``_created`` sample unless created
    metrics are disabled for the whole process. A collector that builds
    ``CounterMetricFamily`` without a ``created`` value keeps that choice
    local to this registry.
    """

    def __init__(self, counters: BackfillCounters, dry_run: bool) -> None:
        self._counters = counters
        self._dry_run = "true" if dry_run else "false"

    def collect(self) -> Iterator[CounterMetricFamily]:
        for name, documentation in COUNTER_HELP.items():
            family = CounterMetricFamily(
                METRIC_PREFIX + name, documentation, labels=["dry_run"]
            )
            family.add_metric([self._dry_run], getattr(self._counters, name))
            yield family


def build_registry(counters: BackfillCounters, dry_run: bool) -> CollectorRegistry:
    """Return a private registry that holds only the backfill counters."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(_CountersCollector(counters, dry_run))
    return registry


def render(counters: BackfillCounters, dry_run: bool) -> str:
    """Return the counters in the text exposition format."""
    return generate_latest(build_registry(counters, dry_run)).decode("utf-8")


def write_metrics_file(path: Path, counters: BackfillCounters, dry_run: bool) -> None:
    """Write the exposition to ``path`` atomically, for node_exporter's textfile
    collector: ``write_to_textfile`` writes a temporary file and renames it."""
    write_to_textfile(str(path), build_registry(counters, dry_run))
