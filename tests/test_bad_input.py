"""A corpus of bad rows mixed into a day of good traffic: none is lost, none reaches the marts.

Bad rows arrive both through the typed app tables and through `app.event_inbox`, where the
event collector lands what clients send as text. Every bad row must end in
`raw.quarantine` with its expected reason and the run's id, every good row in `raw` and in
the marts' counts, and the run's accounting must hold: read = accepted + quarantined.
"""

from __future__ import annotations

import json
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta

import psycopg
from psycopg.types.json import Jsonb

from rec.extract import InboxRules, extract_day
from rec.transform import run_dbt
from rec.world.generate import WorldSpec, seed_world
from rec.world.traffic import simulate_day

DAY = date(2026, 1, 1)
START = datetime(2026, 1, 1, tzinfo=UTC)
END = datetime(2026, 1, 2, tzinfo=UTC)
RECEIVED = datetime(2026, 1, 1, 12, tzinfo=UTC)
RULES = InboxRules(max_payload_bytes=16 * 1024, clock_skew=timedelta(minutes=5),
                   max_lateness=timedelta(days=7))
SQL_TEXT = "'); drop table app.users; --"
INBOX_COLUMNS = ("received_at", "event_id", "event_type", "user_id", "service_id",
                 "slate_id", "occurred_at", "payload")
RAW_TABLES = ("raw.impressions", "raw.events", "raw.bookings", "raw.reviews")


def _payload_of_size(size: int) -> str:
    """A JSON object of exactly `size` bytes."""
    text = '{"query": ""}'
    return '{"query": "' + "x" * (size - len(text)) + '"}'


def _iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


# (name, event type of the good row it spoils, fields replaced, expected reason)
INBOX_CASES: list[tuple[str, str, dict, str]] = [
    ("event id absent", "click", {"event_id": None}, "missing event_id"),
    ("event id empty", "click", {"event_id": ""}, "missing event_id"),
    ("event id in letters", "click", {"event_id": "abc"}, "malformed event_id"),
    ("event id negative", "click", {"event_id": "-17"}, "malformed event_id"),
    ("event id decimal", "click", {"event_id": "12.5"}, "malformed event_id"),
    ("event id with leading zeros", "click", {"event_id": "007"}, "malformed event_id"),
    ("event id in exponent form", "click", {"event_id": "1e6"}, "malformed event_id"),
    ("event id beyond bigint", "click", {"event_id": "9" * 20}, "malformed event_id"),
    ("event id of 19 digits", "click", {"event_id": "1234567890123456789"},
     "malformed event_id"),
    ("event id padded", "click", {"event_id": " 123"}, "malformed event_id"),
    ("event id holding SQL", "click", {"event_id": "1; drop table app.users"},
     "malformed event_id"),
    ("event type absent", "click", {"event_type": None}, "missing event_type"),
    ("event type unknown", "click", {"event_type": "purchase"}, "unknown event_type"),
    ("event type in capitals", "click", {"event_type": "CLICK"}, "unknown event_type"),
    ("event type of the typed path only", "click", {"event_type": "impression"},
     "unknown event_type"),
    ("event type holding SQL", "click", {"event_type": "click'; drop table raw.events; --"},
     "unknown event_type"),
    ("user id absent", "click", {"user_id": None}, "missing user_id"),
    ("user id a name", "like", {"user_id": "alice"}, "malformed user_id"),
    ("user id a float", "click", {"user_id": "1.0"}, "malformed user_id"),
    ("user id zero", "click", {"user_id": "0"}, "malformed user_id"),
    ("service id absent", "click", {"service_id": None}, "missing service_id"),
    ("service id beyond integer", "click", {"service_id": "3000000000"},
     "malformed service_id"),
    ("service id one above integer", "click", {"service_id": "2147483648"},
     "malformed service_id"),
    ("service id with letters", "booking", {"service_id": "12abc"}, "malformed service_id"),
    ("slate id not a uuid", "click", {"slate_id": "not-a-uuid"}, "malformed slate_id"),
    ("slate id empty", "click", {"slate_id": ""}, "malformed slate_id"),
    ("slate id with misplaced dashes", "click",
     {"slate_id": "123456789-123-4567-89ab-cdef01234567"}, "malformed slate_id"),
    ("slate id in braces", "click", {"slate_id": f"{{{uuid.UUID(int=1)}}}"},
     "malformed slate_id"),
    ("timestamp absent", "click", {"occurred_at": None}, "missing timestamp"),
    ("timestamp empty", "review", {"occurred_at": ""}, "missing timestamp"),
    ("timestamp without zone", "click", {"occurred_at": "2026-01-01T11:00:00"},
     "timestamp without time zone"),
    ("timestamp without zone or seconds", "click", {"occurred_at": "2026-01-01 11:00"},
     "timestamp without time zone"),
    ("timestamp a word", "click", {"occurred_at": "yesterday"}, "malformed timestamp"),
    ("timestamp as epoch seconds", "click", {"occurred_at": "1767268800"},
     "malformed timestamp"),
    ("timestamp in US order", "click", {"occurred_at": "01/01/2026 11:00 +00"},
     "malformed timestamp"),
    ("timestamp on 30 February", "click", {"occurred_at": "2026-02-30T10:00:00Z"},
     "invalid date or time"),
    ("timestamp at hour 25", "click", {"occurred_at": "2026-01-01T25:00:00Z"},
     "invalid date or time"),
    ("timestamp in month 13", "click", {"occurred_at": "2026-13-01T10:00:00Z"},
     "invalid date or time"),
    ("timestamp with offset +25:00", "click", {"occurred_at": "2026-01-01T11:00:00+25:00"},
     "invalid date or time"),
    ("timestamp a day ahead", "click", {"occurred_at": _iso(RECEIVED + timedelta(days=1))},
     "timestamp in the future"),
    ("timestamp beyond the clock skew", "like",
     {"occurred_at": _iso(RECEIVED + timedelta(minutes=10))}, "timestamp in the future"),
    ("timestamp in 2099", "booking", {"occurred_at": "2099-01-01T00:00:00Z"},
     "timestamp in the future"),
    ("timestamp at the epoch", "click", {"occurred_at": "1970-01-01T00:00:00Z"},
     "timestamp too old"),
    ("timestamp beyond the lateness allowed", "review",
     {"occurred_at": _iso(RECEIVED - timedelta(days=8))}, "timestamp too old"),
    ("payload one byte over the limit", "click", {"payload": _payload_of_size(16 * 1024 + 1)},
     "payload too large"),
    ("payload of a megabyte", "click", {"payload": _payload_of_size(1024 * 1024)},
     "payload too large"),
    ("payload cut short", "click", {"payload": '{"query": "yoga'}, "malformed payload JSON"),
    ("payload with single quotes", "click", {"payload": "{'query': 'yoga'}"},
     "malformed payload JSON"),
    ("payload with a trailing comma", "click", {"payload": '{"query": "yoga",}'},
     "malformed payload JSON"),
    ("payload empty", "click", {"payload": ""}, "malformed payload JSON"),
    ("payload with a NUL escape", "click", {"payload": json.dumps({"query": "a\x00b"})},
     "malformed payload JSON"),
    ("payload with a lone surrogate", "click", {"payload": '{"query": "\\ud800"}'},
     "malformed payload JSON"),
    ("payload an array", "click", {"payload": "[1, 2]"}, "payload is not a JSON object"),
    ("payload a string", "like", {"payload": '"hello"'}, "payload is not a JSON object"),
    ("payload JSON null", "click", {"payload": "null"}, "payload is not a JSON object"),
    ("query with a bell", "click", {"payload": json.dumps({"query": "yoga\x07"})},
     "control characters in text"),
    ("query with a terminal escape", "click",
     {"payload": json.dumps({"query": "\x1b[31mred"})}, "control characters in text"),
    ("query with a carriage return", "click", {"payload": json.dumps({"query": "a\rb"})},
     "control characters in text"),
    ("query with a C1 control", "click", {"payload": json.dumps({"query": "a\x85b"})},
     "control characters in text"),
    ("nested text with a control", "like",
     {"payload": json.dumps({"filters": {"topic": ["ok", "bad\x01"]}})},
     "control characters in text"),
    ("review body with a backspace", "review",
     {"payload": json.dumps({"rating": 4, "body": "fine\x08"})}, "control characters in text"),
    ("booking without price", "booking", {"payload": json.dumps({"duration_minutes": 30})},
     "missing price"),
    ("booking without payload", "booking", {"payload": None}, "missing price"),
    ("booking price null", "booking", {"payload": json.dumps({"price": None})},
     "missing price"),
    ("booking price as text", "booking", {"payload": json.dumps({"price": "12.50"})},
     "malformed price"),
    ("booking price a boolean", "booking", {"payload": json.dumps({"price": True})},
     "malformed price"),
    ("booking price negative", "booking", {"payload": json.dumps({"price": -5})},
     "negative price"),
    ("booking price beyond numeric(10, 2)", "booking", {"payload": '{"price": 1e12}'},
     "price out of range"),
    ("booking price with tenths of a cent", "booking",
     {"payload": json.dumps({"price": 10.005})}, "price with fractions of a cent"),
    ("booking duration negative", "booking",
     {"payload": json.dumps({"price": 50, "duration_minutes": -30})},
     "negative or zero duration"),
    ("booking duration zero", "booking",
     {"payload": json.dumps({"price": 50, "duration_minutes": 0})},
     "negative or zero duration"),
    ("booking duration fractional", "booking",
     {"payload": json.dumps({"price": 50, "duration_minutes": 30.5})}, "malformed duration"),
    ("booking duration as text", "booking",
     {"payload": json.dumps({"price": 50, "duration_minutes": "45"})}, "malformed duration"),
    ("booking duration of weeks", "booking",
     {"payload": json.dumps({"price": 50, "duration_minutes": 100_000})},
     "duration over 24 hours"),
    ("review without rating", "review", {"payload": json.dumps({"body": "ok"})},
     "missing rating"),
    ("review rating zero", "review", {"payload": json.dumps({"rating": 0})},
     "rating outside 1..5"),
    ("review rating six", "review", {"payload": json.dumps({"rating": 6})},
     "rating outside 1..5"),
    ("review rating negative", "review", {"payload": json.dumps({"rating": -1})},
     "rating outside 1..5"),
    ("review rating beyond smallint", "review", {"payload": '{"rating": 1e30}'},
     "rating outside 1..5"),
    ("review rating fractional", "review", {"payload": json.dumps({"rating": 4.5})},
     "malformed rating"),
    ("review rating as a word", "review", {"payload": json.dumps({"rating": "five"})},
     "malformed rating"),
    ("review body a number", "review", {"payload": json.dumps({"rating": 3, "body": 42})},
     "body is not a string"),
    ("review body a list", "review", {"payload": json.dumps({"rating": 3, "body": ["a"]})},
     "body is not a string"),
    ("review booking id as text", "review",
     {"payload": json.dumps({"rating": 3, "booking_id": "abc"})}, "malformed booking_id"),
    ("review booking id fractional", "review",
     {"payload": json.dumps({"rating": 3, "booking_id": 1.5})}, "malformed booking_id"),
    ("review booking id negative", "review",
     {"payload": json.dumps({"rating": 3, "booking_id": -3})}, "malformed booking_id"),
]


@dataclass
class Corpus:
    """What was written for the day: the bad rows with their reasons and the good rows."""

    conn: psycopg.Connection
    user: int
    service: int
    unknown_user: int
    unknown_service: int
    typed_click: int
    """A click of the day in the typed table, whose id an inbox row reuses."""
    yesterday: dict = field(default_factory=dict)
    """An inbox event received the day before, copied again today."""
    next_id: int = 10**12
    bad: list[tuple[str, str, int, str]] = field(default_factory=list)
    """(case name, source table, source id, expected reason)"""
    good: list[tuple[str, int, tuple]] = field(default_factory=list)
    """(raw table, id, the values expected there)"""

    def fields(self, kind: str, /, **replaced) -> dict:
        """A good inbox row of the type, with a fresh event id, and `replaced` applied."""
        self.next_id += 1
        payload = {"click": {"query": "pitch deck"}, "like": None,
                   "booking": {"price": 120.5, "duration_minutes": 45},
                   "review": {"rating": 4, "body": "helpful", "booking_id": 5}}[kind]
        row = {"received_at": RECEIVED, "event_id": str(self.next_id), "event_type": kind,
               "user_id": str(self.user), "service_id": str(self.service),
               "slate_id": str(uuid.UUID(int=self.next_id)),
               "occurred_at": _iso(RECEIVED - timedelta(minutes=1)),
               "payload": None if payload is None else json.dumps(payload)}
        row.update(replaced)
        return row

    def land(self, row: dict) -> int:
        return self.conn.execute(
            f"insert into app.event_inbox ({', '.join(INBOX_COLUMNS)})"
            f" values ({', '.join(['%s'] * len(INBOX_COLUMNS))}) returning inbox_id",
            [row[c] for c in INBOX_COLUMNS]).fetchone()[0]

    def bad_inbox(self, name: str, row: dict, reason: str) -> None:
        self.bad.append((name, "event_inbox", self.land(row), reason))

    def good_inbox(self, row: dict) -> None:
        """Land a good row and note what raw must hold for it."""
        self.land(row)
        payload = json.loads(row["payload"]) if row["payload"] is not None else None
        moment = datetime.fromisoformat(row["occurred_at"])
        ids = (int(row["user_id"]), int(row["service_id"]))
        if row["event_type"] in ("click", "like"):
            self.good.append(("raw.events", int(row["event_id"]),
                              (row["event_type"], *ids, moment, payload)))
        elif row["event_type"] == "booking":
            self.good.append(("raw.bookings", int(row["event_id"]),
                              (*ids, round(payload["price"], 2), moment)))
        else:
            self.good.append(("raw.reviews", int(row["event_id"]),
                              (*ids, payload["rating"], payload.get("body"), moment)))

    def bad_typed(self, name: str, table: str, values: dict, reason: str) -> None:
        key = {"impressions": "impression_id", "events": "event_id",
               "bookings": "booking_id", "reviews": "review_id"}[table]
        row_id = self.conn.execute(
            f"insert into app.{table} ({', '.join(values)})"
            f" values ({', '.join(['%s'] * len(values))}) returning {key}",
            list(values.values())).fetchone()[0]
        self.bad.append((name, table, row_id, reason))


def _write_good_inbox_rows(corpus: Corpus) -> None:
    at = RECEIVED - timedelta(minutes=1)
    for row in (
        corpus.fields("click"),
        corpus.fields("like"),
        corpus.fields("click", slate_id=None, payload=None),
        corpus.fields("click", occurred_at=at.astimezone(UTC).strftime(
            "%Y-%m-%d %H:%M:%S.123456+00")),
        corpus.fields("click", occurred_at="2026-01-01T17:29:00+05:30"),
        corpus.fields("like", occurred_at="2026-01-01T06:59-0500"),
        corpus.fields("click", occurred_at=_iso(RECEIVED - timedelta(days=3))),
        corpus.fields("click", occurred_at=_iso(RECEIVED + timedelta(minutes=2))),
        corpus.fields("click", event_id="9" * 18),
        corpus.fields("click", payload=_payload_of_size(RULES.max_payload_bytes)),
        corpus.fields("click", payload=json.dumps({"query": SQL_TEXT})),
        corpus.fields("booking"),
        corpus.fields("booking", payload=json.dumps({"price": 0})),
        corpus.fields("review", payload=json.dumps({"rating": 5, "body": SQL_TEXT})),
        corpus.fields("review", payload=json.dumps(
            {"rating": 1, "body": "Late start.\n\tStill useful \u00e9\u263a", "booking_id": None})),
        corpus.fields("review", payload='{"rating": 3.0}'),
    ):
        corpus.good_inbox(row)


def _write_duplicates(corpus: Corpus) -> None:
    """Copies of events already seen: later copies go, the first copy stays."""
    first = corpus.fields("click", received_at=RECEIVED - timedelta(hours=2),
                          occurred_at=_iso(RECEIVED - timedelta(hours=3)))
    corpus.good_inbox(first)
    corpus.bad_inbox("second copy the same day", {**first, "received_at": RECEIVED},
                     "duplicate event_id")
    corpus.bad_inbox("copy with other content", {**first, "event_type": "like",
                                                 "payload": None}, "duplicate event_id")

    replayed = corpus.fields("booking")
    corpus.good_inbox(replayed)
    corpus.bad_inbox("replay received at the same instant", dict(replayed),
                     "duplicate event_id")

    corpus.bad_inbox("copy of an event of the previous day",
                     {**corpus.yesterday, "received_at": RECEIVED}, "duplicate event_id")
    corpus.bad_inbox("id of a click from the typed table",
                     corpus.fields("click", event_id=str(corpus.typed_click)),
                     "duplicate event_id")


def _write_bad_typed_rows(corpus: Corpus) -> None:
    at = RECEIVED
    user, service = corpus.user, corpus.service
    slate = uuid.UUID(int=7)
    impression = {"slate_id": slate, "user_id": user, "service_id": service, "position": 0,
                  "propensity": 0.5, "source": "policy", "shown_at": at}
    for name, replaced, reason in (
        ("impression at a negative position", {"position": -1}, "negative position"),
        ("impression with propensity zero", {"propensity": 0.0}, "propensity outside (0, 1]"),
        ("impression with propensity above one", {"propensity": 1.5},
         "propensity outside (0, 1]"),
        ("impression of an unknown user", {"user_id": corpus.unknown_user}, "unknown user_id"),
        ("impression without service", {"service_id": None}, "missing service_id"),
        ("impression without timestamp", {"shown_at": None}, "missing timestamp"),
    ):
        corpus.bad_typed(name, "impressions", {**impression, **replaced}, reason)

    event = {"event_type": "click", "user_id": user, "service_id": service,
             "occurred_at": at, "payload": None}
    for name, replaced, reason in (
        ("typed event of an unknown type", {"event_type": "tap"}, "unknown event_type"),
        ("typed click on an unknown service", {"service_id": corpus.unknown_service},
         "unknown service_id"),
        ("typed click without user", {"user_id": None}, "missing user_id"),
        ("typed click with a control in its payload",
         {"payload": Jsonb({"query": "a\x02"})}, "control characters in text"),
        ("typed like without timestamp", {"event_type": "like", "occurred_at": None},
         "missing timestamp"),
    ):
        corpus.bad_typed(name, "events", {**event, **replaced}, reason)

    booking = {"user_id": user, "service_id": service, "price": 50, "booked_at": at}
    for name, replaced, reason in (
        ("typed booking at a negative price", {"price": -10}, "missing or negative price"),
        ("typed booking without price", {"price": None}, "missing or negative price"),
        ("typed booking without timestamp", {"booked_at": None}, "missing timestamp"),
    ):
        corpus.bad_typed(name, "bookings", {**booking, **replaced}, reason)

    review = {"user_id": user, "service_id": service, "rating": 4, "body": "ok",
              "created_at": at}
    for name, replaced, reason in (
        ("typed review rated 9", {"rating": 9}, "rating outside 1..5"),
        ("typed review without rating", {"rating": None}, "rating outside 1..5"),
        ("typed review with an escape in its text", {"body": "\x1b[2J"},
         "control characters in text"),
        ("typed review by an unknown user", {"user_id": corpus.unknown_user},
         "unknown user_id"),
    ):
        corpus.bad_typed(name, "reviews", {**review, **replaced}, reason)


def _seed(conn: psycopg.Connection) -> Corpus:
    """The world, a day of its traffic, and one inbox event received the evening before."""
    seed_world(conn, WorldSpec(users=80, experts=8, seed=11))
    simulate_day(conn, DAY)
    user, max_user = conn.execute("select min(user_id), max(user_id) from app.users").fetchone()
    service, max_service = conn.execute(
        "select min(service_id), max(service_id) from app.services").fetchone()
    typed_click = conn.execute(
        "insert into app.events (event_type, user_id, service_id, occurred_at)"
        " values ('click', %s, %s, %s) returning event_id", (user, service, RECEIVED)
    ).fetchone()[0]
    corpus = Corpus(conn, user, service, max_user + 1000, max_service + 1000, typed_click)
    corpus.yesterday = corpus.fields("review", received_at=START - timedelta(hours=1),
                                     occurred_at=_iso(START - timedelta(hours=2)))
    corpus.land(corpus.yesterday)
    return corpus


def _write_day(corpus: Corpus) -> None:
    """The day's bad rows of every kind, mixed with good inbox rows."""
    for name, event_type, replaced, reason in INBOX_CASES:
        corpus.bad_inbox(name, corpus.fields(event_type, **replaced), reason)
    for name, event_type, replaced, reason in (
        ("user unknown", "click", {"user_id": str(corpus.unknown_user)}, "unknown user_id"),
        ("service unknown", "review", {"service_id": str(corpus.unknown_service)},
         "unknown service_id"),
    ):
        corpus.bad_inbox(name, corpus.fields(event_type, **replaced), reason)
    _write_good_inbox_rows(corpus)
    _write_duplicates(corpus)
    _write_bad_typed_rows(corpus)


def _raw_values(conn, table: str, row_id: int) -> tuple | None:
    columns = {
        "raw.events": "event_type, user_id, service_id, occurred_at, payload",
        "raw.bookings": "user_id, service_id, price, booked_at",
        "raw.reviews": "user_id, service_id, rating, body, created_at",
    }[table]
    key = {"raw.events": "event_id", "raw.bookings": "booking_id",
           "raw.reviews": "review_id"}[table]
    return conn.execute(f"select {columns} from {table} where {key} = %s and"
                        " event_date = %s", (row_id, DAY)).fetchone()


def _snapshot(conn) -> dict:
    tables = {t: "extracted_at" for t in RAW_TABLES}
    tables["raw.quarantine"] = "quarantined_at"
    snapshot = {
        table: conn.execute(
            f"select count(*), coalesce(sum(hashtext((to_jsonb(r) - '{stamp}' - 'run_id')"
            f"::text)), 0) from {table} r").fetchone()
        for table, stamp in tables.items()}
    snapshot["accounting"] = conn.execute(
        "select source_table, rows_read, rows_accepted, rows_quarantined from raw.extract_runs"
        " where event_date = %s order by 1", (DAY,)).fetchall()
    return snapshot


def _typed_rows_of_day(conn) -> dict[str, int]:
    """Rows of the typed tables the day's run reads: its timestamps and the untimed rows."""
    return {
        table: conn.execute(
            f"select count(*) from app.{table} where ({column} >= %s and {column} < %s)"
            f" or {column} is null", (START, END)).fetchone()[0]
        for table, column in (("impressions", "shown_at"), ("events", "occurred_at"),
                              ("bookings", "booked_at"), ("reviews", "created_at"))}


def _typed_rows_not_in_raw(conn) -> dict[str, set[int]]:
    """Ids of the day's typed rows (untimed ones included) that raw does not hold."""
    return {
        table: {r[0] for r in conn.execute(
            f"select {key} from app.{table} s where (({column} >= %s and {column} < %s)"
            f" or {column} is null) and not exists (select 1 from raw.{table} r"
            f" where r.{key} = s.{key} and r.event_date = %s)", (START, END, DAY))}
        for table, key, column in (("impressions", "impression_id", "shown_at"),
                                   ("events", "event_id", "occurred_at"),
                                   ("bookings", "booking_id", "booked_at"),
                                   ("reviews", "review_id", "created_at"))}


def test_corpus_of_bad_rows_is_quarantined_and_none_is_lost(fresh_database, tmp_path):
    with psycopg.connect(fresh_database) as conn:
        corpus = _seed(conn)
        conn.commit()
        extract_day(START - timedelta(days=1), START, "run-previous", rules=RULES)
        _write_day(corpus)
        conn.commit()
    kinds = {name for name, *_ in corpus.bad}
    assert len(kinds) == len(corpus.bad) >= 50, "every bad row is a kind of its own"

    summary = extract_day(START, END, "run-1", rules=RULES)

    with psycopg.connect(fresh_database) as conn:
        quarantined = {
            (source, source_id): (reason, run_id)
            for source, source_id, reason, run_id in conn.execute(
                "select source_table, source_id, reason, run_id from raw.quarantine"
                " where event_date = %s", (DAY,))}
        wrong = [(name, quarantined.get((source, source_id)), reason)
                 for name, source, source_id, reason in corpus.bad
                 if quarantined.get((source, source_id)) != (reason, "run-1")]
        missing_good = [(table, row_id, expected, _raw_values(conn, table, row_id))
                        for table, row_id, expected in corpus.good
                        if _raw_values(conn, table, row_id) != expected]
        accounting = conn.execute(
            "select source_table, rows_read, rows_accepted, rows_quarantined, run_id"
            " from raw.extract_runs where event_date = %s", (DAY,)).fetchall()
        typed_read = _typed_rows_of_day(conn)
        typed_left_out = _typed_rows_not_in_raw(conn)
        inbox_read = conn.execute("select count(*) from app.event_inbox where received_at >= %s"
                                  " and received_at < %s", (START, END)).fetchone()[0]
        tables_left = conn.execute(
            "select to_regclass('app.users') is not null, to_regclass('raw.events') is not"
            " null, (select count(*) from app.users), (select count(*) from raw.users)"
        ).fetchone()
        sql_text_kept = conn.execute(
            "select (select count(*) from raw.reviews where body = %s),"
            " (select count(*) from raw.events where payload ->> 'query' = %s)",
            (SQL_TEXT, SQL_TEXT)).fetchone()

    tried = len(corpus.bad)
    caught = tried - len(wrong)
    lost = tried - caught
    print(f"\n{tried} bad rows tried, {caught} quarantined, {lost} lost")
    print("quarantine reasons:", dict(sorted(Counter(r for *_, r in corpus.bad).items())))

    assert wrong == []
    assert caught == tried and lost == 0
    unexpected = set(quarantined) - {(source, source_id) for _, source, source_id, _ in corpus.bad}
    assert {k: quarantined[k] for k in unexpected} == {}, "only the bad rows are quarantined"
    assert missing_good == []
    bad_typed = {t: {i for _, source, i, _ in corpus.bad if source == t} for t in typed_left_out}
    assert typed_left_out == bad_typed, "every good typed row reached raw"
    assert all(read == accepted + rejected and run_id == "run-1"
               for _, read, accepted, rejected, run_id in accounting)
    reads = {source: read for source, read, *_ in accounting}
    assert reads == {**typed_read, "event_inbox": inbox_read}
    assert sum(rejected for *_, rejected, _ in accounting) == tried
    assert sum(c["accepted"] for c in summary.values()) == sum(reads.values()) - tried
    assert summary["event_inbox"] == {"read": inbox_read, "accepted": len(corpus.good),
                                      "quarantined": inbox_read - len(corpus.good)}
    assert tables_left[:2] == (True, True) and tables_left[2] == tables_left[3] > 0
    assert sql_text_kept == (1, 1), "text holding SQL is data, stored as written"

    # A rerun of the day, under another run id, leaves the same rows behind.
    with psycopg.connect(fresh_database) as conn:
        before = _snapshot(conn)
    assert extract_day(START, END, "run-2", rules=RULES) == summary
    with psycopg.connect(fresh_database) as conn:
        assert _snapshot(conn) == before
        raw_counts = conn.execute(
            "select (select count(*) from raw.impressions),"
            " (select count(*) from raw.events where event_type = 'click'),"
            " (select count(*) from raw.events where event_type = 'like'),"
            " (select count(*) from raw.bookings), (select count(*) from raw.reviews)"
        ).fetchone()

    # The marts count exactly the rows in raw: the good ones.
    run_dbt(DAY + timedelta(days=1), fresh_database, command="run", select="+expert_features",
            target_path=tmp_path)
    with psycopg.connect(fresh_database) as conn:
        mart_counts = conn.execute(
            "select sum(impressions), sum(clicks), sum(likes), sum(bookings), sum(n_reviews)"
            " from analytics.expert_features").fetchone()
    assert tuple(int(c) for c in mart_counts) == raw_counts
