# The project image: Airflow 3 with the rec package, its DAGs and dbt project.
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    AIRFLOW_HOME=/opt/airflow \
    REC_HOME=/opt/rec

RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential libpq-dev postgresql-client curl \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/project
COPY pyproject.toml README.md ./
COPY rec ./rec
COPY data_checks ./data_checks
RUN pip install --extra-index-url https://download.pytorch.org/whl/cpu . \
    && mkdir -p "$AIRFLOW_HOME" "$REC_HOME"
COPY dags ./dags
COPY dbt_project ./dbt_project

ENV AIRFLOW__CORE__DAGS_FOLDER=/opt/project/dags
