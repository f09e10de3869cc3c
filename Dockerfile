# The project image: Airflow 3 with the rec package, its DAGs, dbt project and data checks.
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    AIRFLOW_HOME=/opt/airflow \
    REC_HOME=/opt/rec \
    AIRFLOW__CORE__DAGS_FOLDER=/opt/project/dags

RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential libpq-dev postgresql-client curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 50000 --gid 0 --create-home airflow \
    && mkdir -p "$AIRFLOW_HOME/logs" "$AIRFLOW_HOME/config" "$REC_HOME" /opt/project \
    && chown -R airflow:0 "$AIRFLOW_HOME" "$REC_HOME" /opt/project

WORKDIR /opt/project

# torch alone comes from PyTorch's CPU index: the default wheel pulls CUDA libraries.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0

COPY --chown=airflow:0 pyproject.toml README.md ./
COPY --chown=airflow:0 rec ./rec
COPY --chown=airflow:0 data_checks ./data_checks
COPY --chown=airflow:0 dags ./dags
COPY --chown=airflow:0 dbt_project ./dbt_project

# Editable, so that the package finds dbt_project/ beside it. The celery extra brings the
# Celery executor for the compose file's `celery` profile.
RUN pip install -e '.[celery]'

USER airflow
