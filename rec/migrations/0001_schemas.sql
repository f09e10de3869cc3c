-- The four schemas of the pipeline: what the product writes (app), what the
-- nightly run extracted (raw), what dbt derives (analytics) and what the
-- recommender owns (rec).
create schema if not exists app;
create schema if not exists raw;
create schema if not exists analytics;
create schema if not exists rec;
