-- One row per mart per validation of the marts: the row count the suite saw and whether
-- it passed. A night's row counts are checked against the newest earlier night that passed,
-- so that a mart that suddenly lost most of its rows stops the run.
create table rec.data_check_runs (
    run_date date not null,
    suite text not null,
    row_count bigint,
    success boolean not null,
    checked_at timestamptz not null default clock_timestamp(),
    primary key (run_date, suite, checked_at)
);
create index data_check_runs_passed on rec.data_check_runs (suite, run_date) where success;
