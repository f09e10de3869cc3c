"""Every DAG file parses without import errors and wires the stages in order."""

from __future__ import annotations

from rec.config import REPO_ROOT


def test_dagbag_has_no_import_errors():
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(REPO_ROOT / "dags"))
    assert bag.import_errors == {}
    assert {"rec_nightly", "world_traffic"} <= set(bag.dags)
    dag = bag.dags["rec_nightly"]
    order = ["migrate", "extract", "build_features", "validate_features", "fit_choice_model",
             "train_agent", "publish"]
    assert [t.task_id for t in dag.topological_sort()] == order
    for upstream, downstream in zip(order, order[1:], strict=False):
        assert downstream in dag.get_task(upstream).downstream_task_ids
