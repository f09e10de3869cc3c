"""dbt builds the marts from a small hand-made raw dataset, and the figures match by hand."""

from __future__ import annotations

import datetime
import uuid

import psycopg
import pytest

from rec.transform import run_dbt

RUN_DATE = datetime.date(2024, 3, 10)
HALF_LIFE = 14.0
SIGNUP_PRIOR = 2.0  # dbt's signup_prior_weight: clicks' worth of the topics picked at sign-up

SLATE_A = uuid.UUID(int=0xA)  # user 1, 8 March: clicked and booked service 100
SLATE_B = uuid.UUID(int=0xB)  # user 1, 9 March: clicked service 200
SLATE_C = uuid.UUID(int=0xC)  # user 1, on the run date itself: not yet known
SLATE_D = uuid.UUID(int=0xD)  # user 2, 9 March: nothing clicked
SLATE_E = uuid.UUID(int=0xE)  # user 2, 1 February: older than history_days

TOPICS = [(1, "career"), (2, "finance"), (3, "health")]
EXPERTS = [(10, "Ada", 1), (20, "Bo", 2), (30, "Cy", 3)]
SERVICES = [  # service_id, expert_id, topic_id, price, duration, is_active
    (100, 10, 1, 50, 30, True),
    (101, 10, 1, 120, 60, True),
    (200, 20, 2, 80, 45, True),
    (300, 30, 3, 0, 20, False),
]
USERS = [  # user 3 never did anything; user 4 signs up during the run date
    (1, "2024-01-01 09:00+00", [1]),
    (2, "2024-02-01 09:00+00", [2]),
    (3, "2024-03-01 09:00+00", [3]),
    (4, "2024-03-10 12:00+00", []),
]
IMPRESSIONS = [  # slate, user, service, position, propensity, day
    (SLATE_A, 1, 100, 0, 0.5, "2024-03-08"),
    (SLATE_A, 1, 200, 1, 0.3, "2024-03-08"),
    (SLATE_A, 1, 300, 2, 0.2, "2024-03-08"),
    (SLATE_B, 1, 200, 0, 0.6, "2024-03-09"),
    (SLATE_B, 1, 101, 1, 0.4, "2024-03-09"),
    (SLATE_C, 1, 300, 0, 0.9, "2024-03-10"),
    (SLATE_D, 2, 100, 0, 0.7, "2024-03-09"),
    (SLATE_D, 2, 200, 1, 0.3, "2024-03-09"),
    (SLATE_E, 2, 101, 0, 1.0, "2024-02-01"),
]
EVENTS = [  # type, user, service, slate, day
    ("click", 1, 100, SLATE_A, "2024-03-08"),
    ("like", 1, 200, None, "2024-03-05"),
    ("click", 1, 200, SLATE_B, "2024-03-09"),
    ("click", 1, 300, SLATE_C, "2024-03-10"),
    ("click", 1, 300, None, "2023-11-01"),
    ("like", 2, 101, None, "2024-03-01"),
]
BOOKINGS = [(1, 100, SLATE_A, 50, "2024-03-08")]  # user, service, slate, price, day
REVIEWS = [(1, 100, 5, "2024-03-09"), (2, 200, 1, "2024-03-02")]  # user, service, rating, day


def insert_tiny_dataset(url: str) -> None:
    """Fill the raw tables with the dataset above."""
    with psycopg.connect(url) as conn, conn.cursor() as cur:
        cur.executemany("insert into raw.topics values (%s, %s)", TOPICS)
        cur.executemany("insert into raw.experts values (%s, %s, %s, '2023-01-01')", EXPERTS)
        cur.executemany(
            "insert into raw.services values (%s, %s, %s, 'a service', %s, %s, %s, '2023-06-01')",
            SERVICES,
        )
        cur.executemany("insert into raw.users values (%s, %s, %s)", USERS)
        cur.executemany(
            "insert into raw.impressions (impression_id, slate_id, user_id, service_id,"
            " position, propensity, source, shown_at, event_date)"
            " values (%s, %s, %s, %s, %s, %s, 'policy', %s::date + time '12:00', %s)",
            [(i, *row[:5], row[5], row[5]) for i, row in enumerate(IMPRESSIONS, 1)],
        )
        cur.executemany(
            "insert into raw.events (event_id, event_type, user_id, service_id, slate_id,"
            " occurred_at, event_date) values (%s, %s, %s, %s, %s, %s::date + time '13:00', %s)",
            [(i, *row, row[4]) for i, row in enumerate(EVENTS, 1)],
        )
        cur.executemany(
            "insert into raw.bookings (booking_id, user_id, service_id, slate_id, price,"
            " booked_at, event_date) values (%s, %s, %s, %s, %s, %s::date + time '14:00', %s)",
            [(i, *row, row[4]) for i, row in enumerate(BOOKINGS, 1)],
        )
        cur.executemany(
            "insert into raw.reviews (review_id, user_id, service_id, rating, created_at,"
            " event_date) values (%s, %s, %s, %s, %s::date + time '15:00', %s)",
            [(i, *row, row[3]) for i, row in enumerate(REVIEWS, 1)],
        )


def _decay(weight: float, event_day: str, as_of: datetime.date) -> float:
    age = (as_of - datetime.date.fromisoformat(event_day)).days
    return weight * 0.5 ** (age / HALF_LIFE)


def _rows(url: str, query: str) -> list[tuple]:
    with psycopg.connect(url) as conn:
        return conn.execute(query).fetchall()


@pytest.fixture()
def built(fresh_database) -> str:
    insert_tiny_dataset(fresh_database)
    summary = run_dbt(RUN_DATE, fresh_database)
    assert summary["failed"] == 0 and summary["passed"] > 100
    return fresh_database


def test_interests_decay_and_sum_to_one(built):
    sums = _rows(
        built, "select user_id, sum(interest) from analytics.user_interest_features group by 1"
    )
    assert {user for user, _ in sums} == {1, 2, 3}
    assert all(total == pytest.approx(1.0) for _, total in sums)

    # User 1: topic 1 from the sign-up pick of 1 January, the click and booking of 8 March
    # and the 5-star review of 9 March; topic 2 from the like of 5 March and the click of
    # 9 March. The click of 1 November is outside the 90-day window and the click on the
    # run date is not yet known.
    topic_1 = (_decay(SIGNUP_PRIOR, "2024-01-01", RUN_DATE) + _decay(1 + 4, "2024-03-08", RUN_DATE)
               + _decay(2, "2024-03-09", RUN_DATE))
    topic_2 = _decay(2, "2024-03-05", RUN_DATE) + _decay(1, "2024-03-09", RUN_DATE)
    user_1 = dict(
        (topic, (weight, interest))
        for topic, weight, interest in _rows(
            built,
            "select topic_id, decayed_weight, interest from analytics.user_interest_features"
            " where user_id = 1",
        )
    )
    assert user_1 == {
        1: pytest.approx((topic_1, topic_1 / (topic_1 + topic_2))),
        2: pytest.approx((topic_2, topic_2 / (topic_1 + topic_2))),
    }

    # User 2's one-star review weighs nothing: the liked topic and the sign-up topic remain.
    liked, picked = _decay(2, "2024-03-01", RUN_DATE), _decay(SIGNUP_PRIOR, "2024-02-01", RUN_DATE)
    assert _rows(
        built,
        "select topic_id, interest from analytics.user_interest_features where user_id = 2"
        " order by topic_id",
    ) == [(1, pytest.approx(liked / (liked + picked))),
          (2, pytest.approx(picked / (liked + picked)))]


def test_a_cold_user_starts_from_the_sign_up_topics(built):
    # User 3 never interacted: all of their interest is the prior of their one sign-up topic.
    assert _rows(
        built,
        "select topic_id, decayed_weight, interest from analytics.user_interest_features"
        " where user_id = 3",
    ) == [(3, pytest.approx(_decay(SIGNUP_PRIOR, "2024-03-01", RUN_DATE)), pytest.approx(1.0))]


def test_user_features_keep_cold_users_and_ignore_the_run_date(built):
    users = {
        row[0]: row[1:]
        for row in _rows(
            built,
            "select user_id, n_clicks, n_likes, n_bookings, n_reviews, last_active_date,"
            " total_decayed_weight, is_cold_start, signup_topics from analytics.user_features",
        )
    }
    assert set(users) == {1, 2, 3}, "user 4 signed up on the run date"
    assert users[1][:5] == (3, 1, 1, 1, datetime.date(2024, 3, 9))
    assert users[1][6] is False
    assert users[3] == (0, 0, 0, 0, None,
                        pytest.approx(_decay(SIGNUP_PRIOR, "2024-03-01", RUN_DATE)), True, [3])

    service_300 = _rows(
        built,
        "select impressions, clicks, is_active, ctr_smoothed from analytics.expert_features"
        " where service_id = 300",
    )
    assert service_300 == [(1, 1, False, pytest.approx(2 / 21))]
    service_100 = _rows(
        built,
        "select impressions, clicks, bookings, n_reviews, ctr_smoothed, booking_rate_smoothed,"
        " avg_rating_smoothed from analytics.expert_features where service_id = 100",
    )
    assert service_100 == [pytest.approx((2, 1, 1, 1, 2 / 22, 1.5 / 3, 22.5 / 6))]


def test_slates_mark_clicks_and_states_exclude_the_day_itself(built):
    slates = _rows(
        built,
        "select slate_id, position, service_id, clicked, booked"
        " from analytics.choice_training_slates order by event_date, slate_id, position",
    )
    assert slates == [
        (SLATE_A, 0, 100, True, True),
        (SLATE_A, 1, 200, False, False),
        (SLATE_A, 2, 300, False, False),
        (SLATE_B, 0, 200, True, False),
        (SLATE_B, 1, 101, False, False),
        (SLATE_D, 0, 100, False, False),
        (SLATE_D, 1, 200, False, False),
    ]

    states = {
        (user, day.isoformat(), topic): (weight, interest)
        for user, day, topic, weight, interest in _rows(
            built,
            "select user_id, event_date, topic_id, decayed_weight, interest"
            " from analytics.choice_user_states",
        )
    }
    march_8, march_9 = datetime.date(2024, 3, 8), datetime.date(2024, 3, 9)
    # At the start of 8 March user 1 had liked a finance service and, long before, picked
    # career at sign-up; that day's click and booking of a career service must not leak into
    # the state.
    picked, liked = _decay(SIGNUP_PRIOR, "2024-01-01", march_8), _decay(2, "2024-03-05", march_8)
    assert states[(1, "2024-03-08", 1)] == pytest.approx((picked, picked / (picked + liked)))
    assert states[(1, "2024-03-08", 2)] == pytest.approx((liked, liked / (picked + liked)))
    topic_1 = _decay(SIGNUP_PRIOR, "2024-01-01", march_9) + _decay(5, "2024-03-08", march_9)
    topic_2 = _decay(2, "2024-03-05", march_9)
    assert states[(1, "2024-03-09", 1)] == pytest.approx((topic_1, topic_1 / (topic_1 + topic_2)))
    assert states[(1, "2024-03-09", 2)] == pytest.approx((topic_2, topic_2 / (topic_1 + topic_2)))
    liked, picked = _decay(2, "2024-03-01", march_9), _decay(SIGNUP_PRIOR, "2024-02-01", march_9)
    assert states[(2, "2024-03-09", 1)] == pytest.approx((liked, liked / (liked + picked)))
    assert states[(2, "2024-03-09", 2)] == pytest.approx((picked, picked / (liked + picked)))
    assert len(states) == 6


def test_backfill_sees_only_its_past(fresh_database):
    insert_tiny_dataset(fresh_database)
    run_dbt(datetime.date(2024, 3, 9), fresh_database)

    days = _rows(fresh_database, "select distinct event_date from analytics.choice_training_slates")
    assert days == [(datetime.date(2024, 3, 8),)]
    assert _rows(
        fresh_database,
        "select n_clicks, n_reviews, last_active_date from analytics.user_features"
        " where user_id = 1",
    ) == [(2, 0, datetime.date(2024, 3, 8))]


def test_failing_build_names_the_node(fresh_database):
    insert_tiny_dataset(fresh_database)
    with psycopg.connect(fresh_database) as conn:
        conn.execute("update raw.services set price = -1 where service_id = 200")

    with pytest.raises(RuntimeError, match=r"value_between_stg_app__services_price.*Got 1 result"):
        run_dbt(RUN_DATE, fresh_database)
