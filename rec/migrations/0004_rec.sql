-- What the recommender owns: every nightly run's figures and the published lists.
create table rec.model_runs (
    run_id text not null,
    run_date date not null,
    stage text not null,
    model_version text not null,
    artifact_path text,
    metrics jsonb not null default '{}',
    created_at timestamptz not null default now(),
    primary key (run_id, stage)
);
create index model_runs_run_date on rec.model_runs (run_date, stage);

-- One row per user and rank of the list served on run_date.
create table rec.recommendations (
    run_date date not null,
    user_id bigint not null,
    rank smallint not null check (rank >= 1),
    service_id integer not null,
    expert_id integer not null,
    score real not null,
    propensity real not null check (propensity > 0 and propensity <= 1),
    model_version text not null,
    generated_at timestamptz not null,
    primary key (run_date, user_id, rank)
);
create index recommendations_service on rec.recommendations (service_id, run_date);
