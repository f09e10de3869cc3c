"""The expectation suites that guard the marts the recommender reads.

One suite per mart, built for a given run because some bounds (how many users
and services the snapshot holds, the run date, the row counts of the previous run)
change every night.
"""

from __future__ import annotations

import datetime
import math
from dataclasses import dataclass, field

import great_expectations as gx
import great_expectations.expectations as gxe

INTEREST_SUM_TOLERANCE = 1e-6

STALE_AFTER_DAYS = 2
"""The newest training slate may be at most this many days older than the run date.

A healthy night's marts end the day before the run date; two days tolerate one day
whose traffic arrives late, while a feed that stopped fails on its second silent night.
"""

# Limitation: the collapse check compares with one earlier night only, so a mart shrinking
# by less than half a night (60%, then 60% again) passes every night, and the first
# night a database validates has no baseline at all.
COLLAPSE_RATIO = 0.5
"""A mart holding fewer than this share of the previous run's rows has collapsed."""

PROPENSITY_NOT_NULL_SHARE = 0.95
"""Impressions log the serving policy's propensity; more than 5% without one is a spike."""


@dataclass(frozen=True)
class RunFacts:
    """What the raw snapshot says the marts of one run must hold."""

    run_date: datetime.date
    users_signed_up: int
    """Users in raw.users signed up before the run date: one user_features row each."""
    services: int
    """Services in raw.services: one expert_features row each."""
    previous_row_counts: dict[str, tuple[datetime.date, int]] = field(default_factory=dict)
    """Per mart, the run date and row count of the newest earlier validation that passed."""
    signup_prior_weight: float = 0.0
    """The dbt project's `signup_prior_weight`: the most interest weight a cold user has."""


def _suite(name: str, expectations: list[gxe.Expectation]) -> gx.ExpectationSuite:
    suite = gx.ExpectationSuite(name=name)
    for expectation in expectations:
        suite.add_expectation(expectation)
    return suite


def _no_collapse(facts: RunFacts, mart: str) -> list[gxe.Expectation]:
    """At least COLLAPSE_RATIO of the previous run's rows; nothing when there was no run."""
    if mart not in facts.previous_row_counts:
        return []
    previous_date, previous_count = facts.previous_row_counts[mart]
    return [
        gxe.ExpectTableRowCountToBeBetween(
            min_value=math.ceil(previous_count * COLLAPSE_RATIO),
            description=(
                f"row count collapse: at least {COLLAPSE_RATIO:.0%} of the {previous_count}"
                f" rows validated for {previous_date.isoformat()}"
            ),
        )
    ]


def _not_null(*columns: str) -> list[gxe.Expectation]:
    return [gxe.ExpectColumnValuesToNotBeNull(column=column) for column in columns]


def _non_negative(*columns: str) -> list[gxe.Expectation]:
    return [gxe.ExpectColumnValuesToBeBetween(column=column, min_value=0) for column in columns]


def user_interest_features_suite(facts: RunFacts) -> gx.ExpectationSuite:
    return _suite(
        "user_interest_features",
        [
            gxe.ExpectTableColumnsToMatchSet(
                column_set=["user_id", "topic_id", "decayed_weight", "interest"], exact_match=True
            ),
            gxe.ExpectTableRowCountToBeBetween(min_value=1),
            *_no_collapse(facts, "user_interest_features"),
            *_not_null("user_id", "topic_id", "decayed_weight", "interest"),
            gxe.ExpectCompoundColumnsToBeUnique(column_list=["user_id", "topic_id"]),
            gxe.ExpectColumnValuesToBeBetween(column="interest", min_value=0, max_value=1),
            gxe.ExpectColumnValuesToBeBetween(
                column="decayed_weight", min_value=0, strict_min=True
            ),
            gxe.UnexpectedRowsExpectation(
                description="interest shares sum to 1 per user",
                unexpected_rows_query=(
                    "select user_id, sum(interest) as interest_sum from {batch} group by user_id"
                    f" having abs(sum(interest) - 1) > {INTEREST_SUM_TOLERANCE}"
                ),
            ),
        ],
    )


def user_features_suite(facts: RunFacts) -> gx.ExpectationSuite:
    counts = ("n_clicks", "n_likes", "n_bookings", "n_reviews")
    return _suite(
        "user_features",
        [
            gxe.ExpectTableRowCountToBeBetween(min_value=1),
            *_no_collapse(facts, "user_features"),
            gxe.ExpectTableRowCountToEqual(value=facts.users_signed_up),
            *_not_null("user_id", "signed_up_at", "is_cold_start", "total_decayed_weight", *counts),
            gxe.ExpectColumnValuesToBeUnique(column="user_id"),
            *_non_negative("total_decayed_weight", *counts),
            gxe.UnexpectedRowsExpectation(
                description="cold-start users have no interactions and no interest weight"
                " beyond their sign-up topics' prior",
                unexpected_rows_query=(
                    "select user_id from {batch} where is_cold_start and"
                    " (n_clicks + n_likes + n_bookings + n_reviews > 0"
                    f" or total_decayed_weight > {facts.signup_prior_weight} + 1e-9"
                    " or (cardinality(signup_topics) = 0 and total_decayed_weight > 0))"
                ),
            ),
            gxe.UnexpectedRowsExpectation(
                description="no user is active on or after the run date",
                unexpected_rows_query=(
                    "select user_id, last_active_date from {batch}"
                    f" where last_active_date >= date '{facts.run_date.isoformat()}'"
                ),
            ),
            gxe.UnexpectedRowsExpectation(
                description="users with interactions have a last active date",
                unexpected_rows_query=(
                    "select user_id from {batch}"
                    " where not is_cold_start and last_active_date is null"
                ),
            ),
        ],
    )


def expert_features_suite(facts: RunFacts) -> gx.ExpectationSuite:
    counts = ("impressions", "clicks", "bookings", "likes", "n_reviews")
    return _suite(
        "expert_features",
        [
            gxe.ExpectTableRowCountToBeBetween(min_value=1),
            *_no_collapse(facts, "expert_features"),
            gxe.ExpectTableRowCountToEqual(value=facts.services),
            *_not_null("service_id", "expert_id", "topic_id", "price", "is_active", *counts),
            gxe.ExpectColumnValuesToBeUnique(column="service_id"),
            *_non_negative("price", *counts),
            gxe.ExpectColumnValuesToBeBetween(column="duration_minutes", min_value=1),
            gxe.ExpectColumnValuesToBeBetween(
                column="ctr_smoothed", min_value=0, max_value=1, strict_min=True, strict_max=True
            ),
            gxe.ExpectColumnValuesToBeBetween(
                column="booking_rate_smoothed", min_value=0, strict_min=True
            ),
            gxe.ExpectColumnValuesToBeBetween(
                column="avg_rating_smoothed", min_value=1, max_value=5
            ),
        ],
    )


def choice_training_slates_suite(facts: RunFacts) -> gx.ExpectationSuite:
    # Freshness is judged on slates, which every day with traffic has, and not on user
    # activity, which a quiet day may legitimately lack.
    oldest_fresh = facts.run_date - datetime.timedelta(days=STALE_AFTER_DAYS)
    return _suite(
        "choice_training_slates",
        [
            gxe.ExpectTableRowCountToBeBetween(min_value=1),
            *_no_collapse(facts, "choice_training_slates"),
            *_not_null(
                "slate_id",
                "user_id",
                "event_date",
                "position",
                "service_id",
                "topic_id",
                "clicked",
                "booked",
            ),
            gxe.ExpectCompoundColumnsToBeUnique(column_list=["slate_id", "position"]),
            gxe.ExpectColumnValuesToBeBetween(column="position", min_value=0),
            gxe.ExpectColumnValuesToBeBetween(column="propensity", min_value=0, max_value=1),
            gxe.ExpectColumnValuesToNotBeNull(
                column="propensity",
                mostly=PROPENSITY_NOT_NULL_SHARE,
                description=(
                    f"null spike: at least {PROPENSITY_NOT_NULL_SHARE:.0%}"
                    " of impressions carry a propensity"
                ),
            ),
            gxe.ExpectColumnMaxToBeBetween(
                column="event_date",
                min_value=oldest_fresh,
                description=(
                    f"stale features: the newest slate is from {oldest_fresh.isoformat()}"
                    f" or later ({STALE_AFTER_DAYS} days before the run date)"
                ),
            ),
            gxe.UnexpectedRowsExpectation(
                description="no slate is from the run date or later",
                unexpected_rows_query=(
                    "select slate_id, event_date from {batch}"
                    f" where event_date >= date '{facts.run_date.isoformat()}'"
                ),
            ),
        ],
    )


def build_suites(facts: RunFacts) -> list[gx.ExpectationSuite]:
    """Every mart's suite for one run; each suite is named after its table."""
    return [
        user_interest_features_suite(facts),
        user_features_suite(facts),
        expert_features_suite(facts),
        choice_training_slates_suite(facts),
    ]
