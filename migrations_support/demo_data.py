"""Generate demo ``workflow_runs`` rows and load them into PostgreSQL with COPY.

The rows imitate what Temporal, Dagster, Airflow and Prefect workers and Stripe or
GitHub webhook consumers store, so that the run-key backfill can be tested on messy
data. As ``migrations_support.derivation`` defines it, a run's key comes from the
first usable source: ``partition_key``, then ``trigger->'dedupe_key'`` (a JSON
string or number), then ``event_id``, then ``id``. A source is unusable when it is
SQL NULL, when it is empty after control characters become spaces and whitespace is
trimmed, or when ``dedupe_key`` is missing or has another JSON type.

Approximate mix, as fractions of all runs (measured on 10,000 and 100,000 rows with
the default seed):

- 40 workflow ids with skewed weights: the top 5 have about 0.50 of the runs.
- Status: about 0.25 active (pending, queued, running, waiting), the rest succeeded,
  failed, cancelled or timed_out. Most pending, queued and running runs are from the
  last 2 days, waiting runs from the last 30 days, finished runs from the last 90.
- Key source: partition_key 0.27, dedupe_key 0.33, event_id 0.30, none 0.10 (the key
  falls back to the run id).
- partition_key: daily (``2026-11-03``), hourly, composite
  (``region=eu-west|date=2026-11-03``, ``EU West\\t2026-12-01``), free-form
  (``ＯＲＤＥＲ-7``), and padded, mixed-case or full-width forms. About 0.01 contain
  control characters (never ``\\x00``), 0.008 have 121 to 300 characters, and 0.005
  contain 4-byte characters such as emoji. About 0.03 are whitespace-only (a few
  of them control characters only), so the next source is used.
- trigger: SQL NULL 0.28, an object without ``dedupe_key`` 0.31, and a JSON scalar
  or array 0.01. ``dedupe_key`` is a JSON string in 0.24 and a number in 0.13,
  including exponents and values beyond bigint. It is unusable in 0.03: null,
  boolean, object, array, or an empty or whitespace-only string. One payload shape
  has a ``dedupeKey`` field, which is not a source.
- event_id: ULID 0.28, Stripe event id (``evt_1…``) 0.13, GitHub delivery id (UUID
  text) 0.06, a padded, recased or full-width form of one of these 0.01, an empty or
  whitespace-only string 0.05, and NULL 0.47.
- Collisions: 0.04 of active runs reuse the key of one of the last 16 active runs of
  the same workflow, often in a form that differs only by case, whitespace or
  full-width characters. Counting keys that repeat by chance, about 0.09 of active
  runs share their ``run_key_normalized`` with another active run of the workflow at
  10,000 rows, 0.12 at 100,000 and 0.21 at 1,000,000, because the random keys come
  from fixed ranges such as order-10000 to order-99999.
"""

from __future__ import annotations

import base64
import json
import math
import random
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from typing import Any, Final, Generic, TypeVar

import psycopg

T = TypeVar("T")

RunRow = tuple[
    uuid.UUID, str, str, str | None, str | None, str | None, datetime, datetime
]
"""A row in ``COPY_COLUMNS`` order. ``trigger`` is JSON text or None."""

ACTIVE_STATUSES: Final = ("pending", "queued", "running", "waiting")
FINISHED_STATUSES: Final = ("succeeded", "failed", "cancelled", "timed_out")
DEFAULT_SEED: Final = 20261204
# A fixed end instead of now(), so that a seed gives the same rows on any day.
CREATED_AT_END: Final = datetime(2026, 12, 4, tzinfo=timezone.utc)
CREATED_AT_SPAN: Final = timedelta(days=90)
COPY_COLUMNS: Final = (
    "id",
    "workflow_id",
    "status",
    "partition_key",
    "trigger",
    "event_id",
    "created_at",
    "updated_at",
)
# Text format COPY sends every value as text, so the server parses the trigger JSON
# text into jsonb. Declaring the trigger column as jsonb would make psycopg encode
# the str a second time, as a JSON string.
_COPY_TYPES: Final = (
    "uuid",
    "text",
    "text",
    "text",
    "text",
    "text",
    "timestamptz",
    "timestamptz",
)
_COPY_SQL: Final = f"COPY workflow_runs ({', '.join(COPY_COLUMNS)}) FROM STDIN"

_DAY_S: Final = 86_400.0
_END_TS: Final = CREATED_AT_END.timestamp()
_SPAN_S: Final = CREATED_AT_SPAN.total_seconds()
# Probability that an active run reuses the key of a recent active run of its
# workflow, and how many recent keys each workflow keeps for that.
_ACTIVE_COLLISION_RATE: Final = 0.04
_RECENT_KEYS_PER_WORKFLOW: Final = 16


class _WeightedTable(Generic[T]):
    """Items repeated by integer weight, so that a weighted pick is one lookup."""

    def __init__(self, weighted_items: Sequence[tuple[T, int]]) -> None:
        self._items = [item for item, weight in weighted_items for _ in range(weight)]
        self._size = len(self._items)

    def pick(self, random_float: Callable[[], float]) -> T:
        return self._items[int(random_float() * self._size)]


@dataclass(frozen=True, slots=True)
class _Workflow:
    name: str
    kind: str  # "partitioned", "triggered", "webhook" or "event"
    event_id_format: str  # "ulid", "stripe" or "uuid"


# Weights are relative run counts, skewed like a production system where a few
# workflows (webhooks, daily ETL, order processing) run far more often than the rest.
_WORKFLOW_WEIGHTS: Final[tuple[tuple[_Workflow, int], ...]] = (
    (_Workflow("etl.orders_daily", "partitioned", "ulid"), 90),
    (_Workflow("etl.customers_daily", "partitioned", "ulid"), 25),
    (_Workflow("etl.payments_hourly", "partitioned", "ulid"), 30),
    (_Workflow("etl.refunds_daily", "partitioned", "ulid"), 3),
    (_Workflow("dbt.nightly_models", "partitioned", "ulid"), 12),
    (_Workflow("dagster.sales_by_region", "partitioned", "ulid"), 20),
    (_Workflow("airflow.marketing_attribution", "partitioned", "ulid"), 8),
    (_Workflow("analytics.sessions_rollup", "partitioned", "ulid"), 15),
    (_Workflow("ml.feature_backfill", "partitioned", "ulid"), 6),
    (_Workflow("reports.weekly_kpis", "partitioned", "ulid"), 4),
    (_Workflow("warehouse.inventory_snapshot", "partitioned", "ulid"), 10),
    (_Workflow("exports.partner_feeds", "partitioned", "ulid"), 5),
    (_Workflow("billing.nightly-invoices", "triggered", "ulid"), 60),
    (_Workflow("billing.dunning-retry", "triggered", "ulid"), 18),
    (_Workflow("billing.usage-aggregation", "triggered", "ulid"), 14),
    (_Workflow("orders.fulfillment", "triggered", "ulid"), 70),
    (_Workflow("orders.cancellation", "triggered", "ulid"), 9),
    (_Workflow("payments.payout-reconcile", "triggered", "ulid"), 7),
    (_Workflow("notifications.email-digest", "triggered", "ulid"), 22),
    (_Workflow("accounts.gdpr-export", "triggered", "ulid"), 2),
    (_Workflow("accounts.onboarding", "triggered", "ulid"), 11),
    (_Workflow("search.reindex", "triggered", "ulid"), 3),
    (_Workflow("prefect.sync-crm", "triggered", "ulid"), 8),
    (_Workflow("temporal.subscription-renewal", "triggered", "ulid"), 16),
    (_Workflow("shipping.label-purchase", "triggered", "ulid"), 12),
    (_Workflow("support.ticket-escalation", "triggered", "ulid"), 2),
    (_Workflow("webhooks.stripe", "webhook", "stripe"), 100),
    (_Workflow("webhooks.stripe-connect", "webhook", "stripe"), 10),
    (_Workflow("webhooks.github", "webhook", "uuid"), 35),
    (_Workflow("webhooks.github-actions", "webhook", "uuid"), 9),
    (_Workflow("webhooks.shopify", "webhook", "uuid"), 6),
    (_Workflow("webhooks.slack-events", "webhook", "ulid"), 4),
    (_Workflow("webhooks.twilio-status", "webhook", "uuid"), 3),
    (_Workflow("events.order-created", "event", "ulid"), 40),
    (_Workflow("events.user-signed-up", "event", "ulid"), 12),
    (_Workflow("events.cart-abandoned", "event", "ulid"), 5),
    (_Workflow("events.inventory-low", "event", "ulid"), 2),
    (_Workflow("events.price-changed", "event", "ulid"), 3),
    (_Workflow("events.audit-log", "event", "ulid"), 1),
    (_Workflow("events.feature-flag-changed", "event", "ulid"), 1),
)
WORKFLOW_IDS: Final = tuple(workflow.name for workflow, _ in _WORKFLOW_WEIGHTS)
_WORKFLOWS: Final = _WeightedTable(_WORKFLOW_WEIGHTS)

_STATUSES: Final = _WeightedTable(
    [
        ("pending", 6),
        ("queued", 5),
        ("running", 9),
        ("waiting", 5),
        ("succeeded", 55),
        ("failed", 11),
        ("cancelled", 5),
        ("timed_out", 4),
    ]
)

# The first usable source of a run, per workflow kind. "none" leaves all three
# sources unusable, so the key falls back to the run id.
_KEY_SOURCES: Final = {
    "partitioned": _WeightedTable(
        [("partition", 80), ("dedupe", 5), ("event", 5), ("none", 10)]
    ),
    "triggered": _WeightedTable(
        [("partition", 5), ("dedupe", 75), ("event", 10), ("none", 10)]
    ),
    "webhook": _WeightedTable([("dedupe", 12), ("event", 78), ("none", 10)]),
    "event": _WeightedTable([("dedupe", 20), ("event", 70), ("none", 10)]),
}

_REGIONS: Final = (
    ("eu-west", "EU West"),
    ("eu-central", "EU Central"),
    ("us-east-1", "US East 1"),
    ("us-west-2", "US West 2"),
    ("ap-southeast-2", "AP Southeast 2"),
    ("sa-east-1", "SA East 1"),
)
# Partition dates start in 2019, so that backfill runs can target days years back.
_FIRST_PARTITION_DATE: Final = date(2019, 1, 1)
_PARTITION_DATES: Final = tuple(
    (_FIRST_PARTITION_DATE + timedelta(days=offset)).isoformat()
    for offset in range((CREATED_AT_END.date() - _FIRST_PARTITION_DATE).days)
)
_FIRST_PARTITION_TS: Final = datetime.combine(
    _FIRST_PARTITION_DATE, datetime.min.time(), timezone.utc
).timestamp()

# Maps printable ASCII to the full-width forms U+FF01..U+FF5E and the space to the
# ideographic space U+3000. NFKC normalization maps them back.
_FULLWIDTH: Final = {code: code + 0xFEE0 for code in range(0x21, 0x7F)} | {0x20: 0x3000}
_CONTROL_CHARS: Final = tuple(chr(code) for code in range(0x01, 0x20)) + (
    "\x7f",
    "\x85",
)
# Values that are empty after the key derivation's cleaning, which turns control
# characters into spaces and trims Unicode White_Space. Most are ASCII whitespace,
# U+00A0 or U+3000.
_BLANK_VALUES: Final = (
    " ",
    "  ",
    "\t",
    "\n",
    " \t\r\n ",
    "\u00a0",
    "\u3000",
    " \u3000 ",
    "\u00a0\u00a0",
    "\u2002\u2028",
    "\x85",
    "\t\x01\n",
)
_CROCKFORD_BASE32: Final = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
# Every pair of Crockford digits, indexed by the 10 bits that the pair encodes.
_CROCKFORD_PAIRS: Final = tuple(
    first + second for first in _CROCKFORD_BASE32 for second in _CROCKFORD_BASE32
)
# Bit offsets of the 13 digit pairs of a ULID: 26 digits encode 130 bits, and the
# top 2 bits are zero.
_ULID_PAIR_SHIFTS: Final = tuple(range(120, -1, -10))
_JSON: Final = json.JSONEncoder(ensure_ascii=False)


def _upper(key: str) -> str:
    return key.upper()


def _lower(key: str) -> str:
    return key.lower()


def _swapcase(key: str) -> str:
    return key.swapcase()


def _pad_spaces(key: str) -> str:
    return f"  {key} "


def _pad_tab_newline(key: str) -> str:
    return f"\t{key}\n"


def _pad_nbsp(key: str) -> str:
    return f"\u00a0{key}"


def _pad_ideographic_space(key: str) -> str:
    return f"{key}\u3000"


def _double_inner_spaces(key: str) -> str:
    return " " + key.replace(" ", "  ").replace("\t", "  ")


def _nbsp_inner_spaces(key: str) -> str:
    return key.replace(" ", "\u00a0") + " "


def _pad_other_unicode_spaces(key: str) -> str:
    # U+2002 EN SPACE and U+2028 LINE SEPARATOR, as pasted from documents.
    return f"\u2002{key}\u2028"


def _fullwidth(key: str) -> str:
    return key.translate(_FULLWIDTH)


# Variants that differ from the key only by case, whitespace or full-width forms.
# They all give the key's run_key_normalized: whitespace runs collapsed and trimmed,
# then NFKC and lowercase. The case variants hold only for keys without characters
# such as "ß", whose upper case "SS" lowercases to "ss".
_EQUIVALENT_VARIANTS: Final[tuple[Callable[[str], str], ...]] = (
    _upper,
    _lower,
    _swapcase,
    _pad_spaces,
    _pad_tab_newline,
    _pad_nbsp,
    _pad_ideographic_space,
    _pad_other_unicode_spaces,
    _double_inner_spaces,
    _nbsp_inner_spaces,
    _fullwidth,
)

_PARTITION_STYLES: Final = _WeightedTable(
    [
        ("daily", 50),
        ("hourly", 8),
        ("composite", 14),
        ("free_form", 8),
        ("messy", 12),
        ("control", 3),
        ("long", 3),
        ("emoji", 2),
    ]
)
_DEDUPE_STRING_STYLES: Final = _WeightedTable(
    [
        ("order", 30),
        ("ord", 20),
        ("invoice", 10),
        ("idempotency", 15),
        ("renewal", 10),
        ("unicode", 5),
        ("messy", 10),
    ]
)
_UNUSABLE_DEDUPE_KEYS: Final = _WeightedTable[object](
    [
        (None, 30),
        (True, 15),
        (False, 10),
        ({"order_id": 48213}, 15),
        (["order-48213", 2], 15),
        ("", 8),
        ("   ", 7),
    ]
)
# Triggers that are valid JSON but not objects, so they have no dedupe_key.
_NON_OBJECT_TRIGGERS: Final = tuple(
    _JSON.encode(trigger) for trigger in ("manual", [], ["order-48213"], 0)
)

# Trigger payload shapes by workflow kind, loosely following what each engine
# records: Dagster and Airflow run configs, Temporal and Prefect start requests,
# Stripe and GitHub webhook envelopes, and an internal event bus.
# Every payload is a non-empty object, because _trigger_with_key appends to it.
_TRIGGER_PAYLOADS: Final[dict[str, tuple[dict[str, object], ...]]] = {
    "partitioned": (
        {"source": "schedule", "schedule": "daily_0200_utc", "tags": {}},
        {"run_type": "scheduled", "conf": {}},
        {"run_type": "manual", "conf": {"full_refresh": True}, "user": "ana.müller"},
        {"source": "backfill", "backfill_id": "bkf_7f3a", "tags": {"team": "data"}},
    ),
    "triggered": (
        {"source": "api", "workflow_type": "InvoiceWorkflow", "task_queue": "billing"},
        {"source": "schedule", "schedule_id": "nightly", "attempt": 1},
        {"type": "deployment", "flow_run_name": "cheerful-otter", "parameters": {}},
        {"source": "api", "dedupeKey": "order-1", "requested_by": "svc-checkout"},
    ),
    "webhook": (
        {"source": "webhook", "provider": "stripe", "type": "invoice.paid"},
        {"source": "webhook", "provider": "github", "event": "push", "ref": "main"},
        {"source": "webhook", "provider": "shopify", "topic": "orders/create"},
    ),
    "event": (
        {"source": "event_bus", "topic": "orders.created", "schema_version": 3},
        {"source": "event_bus", "topic": "users.signed_up", "region": "eu-west"},
    ),
}
# The payloads without dedupe_key are encoded once, because JSON encoding is the
# largest cost per row.
_ENCODED_TRIGGER_PAYLOADS: Final = {
    kind: tuple(_JSON.encode(payload) for payload in payloads)
    for kind, payloads in _TRIGGER_PAYLOADS.items()
}
_ACTIVE_STATUS_SET: Final = frozenset(ACTIVE_STATUSES)


def generate_runs(count: int, seed: int = DEFAULT_SEED) -> Iterator[RunRow]:
    """Return an iterator over ``count`` generated rows, deterministic for ``seed``.

    Rows are built one at a time, so memory does not grow with ``count``.
    Raises ValueError if ``count`` is negative.
    """
    if count < 0:
        raise ValueError(f"count must be zero or positive, got {count}")
    return _iterate_runs(count, seed)


def _iterate_runs(count: int, seed: int) -> Iterator[RunRow]:
    factory = _RunFactory(seed)
    for _ in range(count):
        yield factory.make_row()


def load_runs(
    conn: psycopg.Connection[Any], count: int, seed: int = DEFAULT_SEED
) -> int:
    """Insert ``generate_runs(count, seed)`` into ``workflow_runs`` and analyze it.

    Writes the rows with COPY, commits, runs ANALYZE and commits again. Returns the
    row count that the server reported for the COPY. The table must already exist.
    Raises ValueError if the client encoding is not UTF-8, because the keys contain
    emoji, CJK and full-width characters.
    """
    if conn.info.encoding != "utf-8":
        raise ValueError(
            f"client encoding must be UTF-8 to load demo runs, got "
            f"{conn.info.encoding!r}; use a database created with ENCODING 'UTF8'"
        )
    rows = generate_runs(count, seed)
    with conn.cursor() as cursor:
        with cursor.copy(_COPY_SQL) as copy:
            copy.set_types(_COPY_TYPES)
            for row in rows:
                copy.write_row(row)
        loaded = cursor.rowcount
    conn.commit()
    conn.execute("ANALYZE workflow_runs")
    conn.commit()
    return loaded


# partition_key, trigger JSON text and event_id of one run.
_Sources = tuple[str | None, str | None, str | None]


class _RunFactory:
    """Builds rows from one ``random.Random`` stream.

    Remembers the last few usable keys of active runs per workflow, so that later
    active runs can reuse them to produce collisions.
    """

    def __init__(self, seed: int) -> None:
        self._rng = random.Random(seed)
        self._random = self._rng.random
        self._getrandbits = self._rng.getrandbits
        self._recent_active_keys: dict[str, deque[tuple[str, object]]] = {
            name: deque(maxlen=_RECENT_KEYS_PER_WORKFLOW) for name in WORKFLOW_IDS
        }

    def make_row(self) -> RunRow:
        run_id = uuid.UUID(int=self._getrandbits(128), version=4)
        workflow = _WORKFLOWS.pick(self._random)
        status = _STATUSES.pick(self._random)
        active = status in _ACTIVE_STATUS_SET
        created_ts, updated_ts = self._timestamps(status, active)
        partition_key, trigger, event_id = self._sources(workflow, active, created_ts)
        return (
            run_id,
            workflow.name,
            status,
            partition_key,
            trigger,
            event_id,
            datetime.fromtimestamp(created_ts, timezone.utc),
            datetime.fromtimestamp(updated_ts, timezone.utc),
        )

    def _timestamps(self, status: str, active: bool) -> tuple[float, float]:
        """Return created and updated times as POSIX timestamps."""
        random_float = self._random
        if status == "waiting":
            age = random_float() * 30 * _DAY_S
        elif active and random_float() < 0.95:
            age = random_float() ** 2 * 2 * _DAY_S
        else:
            age = random_float() * _SPAN_S
        created_ts = _END_TS - age
        if active:
            return created_ts, created_ts + random_float() * age
        # Exponential run duration with a 15-minute mean.
        duration = -math.log(1.0 - random_float()) * 900.0
        return created_ts, min(created_ts + duration, _END_TS)

    def _sources(
        self, workflow: _Workflow, active: bool, created_ts: float
    ) -> _Sources:
        recent = self._recent_active_keys[workflow.name]
        if active and recent and self._random() < _ACTIVE_COLLISION_RATE:
            source, key = recent[int(self._random() * len(recent))]
            key = self._equivalent(key)
            return self._build_sources(workflow, source, key, created_ts)
        source = _KEY_SOURCES[workflow.kind].pick(self._random)
        key = self._usable_key(workflow, source, active, created_ts)
        if active and key is not None:
            recent.append((source, key))
        return self._build_sources(workflow, source, key, created_ts)

    def _usable_key(
        self, workflow: _Workflow, source: str, active: bool, created_ts: float
    ) -> object | None:
        if source == "partition":
            return self._partition_key(workflow, active, created_ts)
        if source == "dedupe":
            return self._dedupe_key()
        if source == "event":
            return self._event_id(workflow, created_ts)
        return None

    def _build_sources(
        self, workflow: _Workflow, source: str, key: object, created_ts: float
    ) -> _Sources:
        """Place ``key`` in its source and fill the other sources around it.

        Sources before the key's source are unusable. Sources after it are sometimes
        usable, so that tests can check that the backfill applies the precedence.
        """
        if source == "partition":
            assert isinstance(key, str)
            trigger = self._trigger_any(workflow)
            return key, trigger, self._event_id_any(workflow, created_ts)
        partition_key = self._unusable_partition_key()
        if source == "dedupe":
            trigger = self._trigger_with_key(workflow, key)
            return partition_key, trigger, self._event_id_any(workflow, created_ts)
        trigger = self._trigger_without_key(workflow)
        if source == "event":
            assert isinstance(key, str)
            return partition_key, trigger, key
        return partition_key, trigger, self._unusable_event_id()

    def _equivalent(self, key: object) -> object:
        """Return ``key`` or a form of it that normalizes to the same text."""
        keep_as_is = self._random() < 0.25
        if isinstance(key, str):
            return key if keep_as_is else self._pick(_EQUIVALENT_VARIANTS)(key)
        if isinstance(key, int) and not keep_as_is:
            # ->> returns the same text for the JSON number 48213 and "48213".
            return str(key)
        return key

    def _pick(self, items: Sequence[T]) -> T:
        return items[int(self._random() * len(items))]

    def _partition_date(self, active: bool, created_ts: float) -> str:
        """Return the day before the run for most finished runs, else a backfill day."""
        if not active and self._random() < 0.7:
            day_index = int((created_ts - _FIRST_PARTITION_TS) // _DAY_S) - 1
            return _PARTITION_DATES[day_index]
        return self._pick(_PARTITION_DATES)

    def _partition_key(
        self, workflow: _Workflow, active: bool, created_ts: float
    ) -> str:
        day = self._partition_date(active, created_ts)
        style = _PARTITION_STYLES.pick(self._random)
        if style == "daily":
            return day
        if style == "hourly":
            return f"{day}-{int(self._random() * 24):02d}:00"
        if style == "composite":
            return self._composite_partition_key(day)
        if style == "free_form":
            return self._free_form_partition_key(workflow)
        if style == "messy":
            return self._pick(_EQUIVALENT_VARIANTS)(self._composite_partition_key(day))
        if style == "control":
            return self._with_control_char(day)
        if style == "long":
            return self._long_partition_key(day)
        return self._emoji_partition_key(day)

    def _composite_partition_key(self, day: str) -> str:
        region, region_title = self._pick(_REGIONS)
        layout = self._random()
        if layout < 0.4:
            return f"region={region}|date={day}"
        if layout < 0.7:
            # Dagster's MultiPartitionKey joins the dimension keys with "|", ordered
            # by dimension name, so "date" comes before "region".
            return f"{day}|{region}"
        if layout < 0.9:
            return f"{region_title}\t{day}"
        return f"tenant=Acme GmbH|{region_title}|{day}"

    def _free_form_partition_key(self, workflow: _Workflow) -> str:
        number = 1 + int(self._random() * 99_999)
        layout = self._random()
        if layout < 0.3:
            return f"customer-{number:05d}"
        if layout < 0.5:
            return f"ＯＲＤＥＲ-{number % 100}"
        if layout < 0.6:
            return f"Order {number}"
        if layout < 0.7:
            # U+200B ZERO WIDTH SPACE is not White_Space, so the key keeps it.
            return f"Order {number}\u200b"
        return f"{workflow.name.split('.')[-1]}:batch-{number}"

    def _with_control_char(self, key: str) -> str:
        position = int(self._random() * (len(key) + 1))
        return f"{key[:position]}{self._pick(_CONTROL_CHARS)}{key[position:]}"

    def _long_partition_key(self, day: str) -> str:
        """Return an S3-style object key of 121 to 300 characters."""
        length = 121 + int(self._random() * 180)
        region, _ = self._pick(_REGIONS)
        parts = "/".join(
            f"part-{self._getrandbits(64):016x}.snappy.parquet" for _ in range(8)
        )
        return f"s3://acme-data-lake/raw/orders/region={region}/date={day}/{parts}"[
            :length
        ]

    def _emoji_partition_key(self, day: str) -> str:
        number = 1 + int(self._random() * 9_999)
        layout = int(self._random() * 5)
        if layout == 0:
            return f"🚀 launch-{day}"
        if layout == 1:
            return f"team-🦄|date={day}"
        if layout == 2:
            return f"注文-{number} 🎉"
        if layout == 3:
            # Mathematical fraktur letters, which NFKC maps to "order".
            return f"𝔬𝔯𝔡𝔢𝔯-{number}"
        return f"𠀋-{number}"

    def _unusable_partition_key(self) -> str | None:
        if self._random() < 0.04:
            return self._pick(_BLANK_VALUES)
        return None

    def _dedupe_key(self) -> str | int | float:
        if self._random() < 0.35:
            return self._dedupe_number()
        return self._dedupe_string()

    def _dedupe_number(self) -> int | float:
        choice = self._random()
        if choice < 0.6:
            return 10_000 + int(self._random() * 90_000)
        if choice < 0.7:
            return 1 + int(self._random() * 100)
        if choice < 0.78:
            return -1 - int(self._random() * 10)
        if choice < 0.85:
            # json.dumps writes these in exponent notation: 1.5e+16, 2.5e-07, 1e+21.
            return self._pick((1.5e16, 2.5e-07, 1e21))
        if choice < 0.93:
            return self._pick((1.5e3, 0.25, 12.0))
        # Larger than a bigint, so a cast to bigint would fail.
        return 2**63 + self._getrandbits(32)

    def _dedupe_string(self) -> str:
        style = _DEDUPE_STRING_STYLES.pick(self._random)
        number = int(self._random() * 1_000_000)
        if style == "order":
            return f"order-{10_000 + number % 90_000}"
        if style == "ord":
            return f"ORD_2026_{number:06d}"
        if style == "invoice":
            return f"in_1{self._alphanumeric(22)}"
        if style == "idempotency":
            return f"idem-{uuid.UUID(int=self._getrandbits(128), version=4)}"
        if style == "renewal":
            return f"renewal:sub_{self._alphanumeric(14)}:2026-{1 + number % 12:02d}"
        if style == "unicode":
            return self._pick((f"Bestellung-{number}-Ö", f"注文-{number}"))
        return self._pick(_EQUIVALENT_VARIANTS)(f"order-{10_000 + number % 90_000}")

    def _alphanumeric(self, length: int) -> str:
        """Return random letters and digits, like the tail of a Stripe object id."""
        # Base64 of random bytes, with "+" and "/" mapped to letters. The small bias
        # toward "x" and "Z" does not matter for demo ids.
        encoded = base64.b64encode(self._rng.randbytes(length), altchars=b"xZ")
        return encoded.decode("ascii")[:length]

    def _trigger_with_key(self, workflow: _Workflow, key: object) -> str:
        # Appending the encoded key to a pre-encoded payload gives the same text as
        # encoding the merged dict, and is faster.
        payload = self._pick(_ENCODED_TRIGGER_PAYLOADS[workflow.kind])
        return f'{payload[:-1]}, "dedupe_key": {_JSON.encode(key)}}}'

    def _trigger_without_key(self, workflow: _Workflow) -> str | None:
        choice = self._random()
        if choice < 0.45:
            return None
        if choice < 0.935:
            return self._pick(_ENCODED_TRIGGER_PAYLOADS[workflow.kind])
        if choice < 0.985:
            unusable_key = _UNUSABLE_DEDUPE_KEYS.pick(self._random)
            return self._trigger_with_key(workflow, unusable_key)
        return self._pick(_NON_OBJECT_TRIGGERS)

    def _trigger_any(self, workflow: _Workflow) -> str | None:
        if self._random() < 0.15:
            return self._trigger_with_key(workflow, self._dedupe_key())
        return self._trigger_without_key(workflow)

    def _event_id(self, workflow: _Workflow, created_ts: float) -> str:
        if workflow.event_id_format == "stripe":
            event_id = f"evt_1{self._alphanumeric(23)}"
        elif workflow.event_id_format == "uuid":
            event_id = str(uuid.UUID(int=self._getrandbits(128), version=4))
        else:
            event_id = self._ulid(created_ts)
        if self._random() < 0.03:
            return self._pick(_EQUIVALENT_VARIANTS)(event_id)
        return event_id

    def _ulid(self, created_ts: float) -> str:
        """Return a ULID: a 48-bit millisecond time and 80 random bits in base32."""
        value = (int(created_ts * 1000) << 80) | self._getrandbits(80)
        pairs = _CROCKFORD_PAIRS
        return "".join([pairs[(value >> shift) & 0x3FF] for shift in _ULID_PAIR_SHIFTS])

    def _event_id_any(self, workflow: _Workflow, created_ts: float) -> str | None:
        if self._random() < 0.3:
            return self._event_id(workflow, created_ts)
        return self._unusable_event_id()

    def _unusable_event_id(self) -> str | None:
        choice = self._random()
        if choice < 0.9:
            return None
        if choice < 0.98:
            return ""
        return self._pick(_BLANK_VALUES)
