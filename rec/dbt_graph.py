"""The dbt project's model graph, read from its files without importing dbt.

The DAG processor parses DAG files often, so the per-model Airflow tasks are laid
out from `ref()` calls in the models' SQL and the `ref()`s their yml tests name,
which takes milliseconds, rather than from dbt's manifest, which needs a dbt parse.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

# Limitation: only literal one-argument refs are seen; a ref built from a variable or a
# two-argument (package) ref would be missed, and its task would not wait for that model.
REF = re.compile(r"""\bref\(\s*['"]([A-Za-z0-9_]+)['"]\s*\)""")


@dataclass(frozen=True)
class DbtModel:
    """One model: its layer (the folder under models/), the models it reads, and the
    other models its yml tests also read (a `relationships` test joins two models)."""

    name: str
    layer: str
    refs: frozenset[str]
    test_refs: frozenset[str] = field(default_factory=frozenset)


def _test_refs(models_dir: Path) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in sorted(models_dir.rglob("*.yml")):
        document = yaml.safe_load(path.read_text()) or {}
        for entry in document.get("models") or []:
            found.setdefault(entry["name"], set()).update(REF.findall(str(entry)))
    return found


def load_models(project_dir: Path) -> dict[str, DbtModel]:
    """Every model of the project, keyed by name, in a stable (name) order.

    Raises:
        ValueError: a model refers to a model that does not exist.
    """
    models_dir = project_dir / "models"
    tests = _test_refs(models_dir)
    models = {}
    for path in sorted(models_dir.rglob("*.sql"), key=lambda p: p.stem):
        refs = frozenset(REF.findall(path.read_text()))
        layer = path.relative_to(models_dir).parts[0] if path.parent != models_dir else "models"
        models[path.stem] = DbtModel(path.stem, layer, refs, frozenset(tests.get(path.stem, ())))

    for model in models.values():
        missing = (model.refs | model.test_refs) - models.keys()
        if missing:
            raise ValueError(f"dbt model {model.name} refers to unknown models {sorted(missing)}")
    return models


def models_before_tests(models: dict[str, DbtModel]) -> dict[str, set[str]]:
    """For each model, the models that must be built before its tests run.

    `dbt test --select M` also runs every test that touches M from another model's
    yml (a relationships test pointing at M), so both directions count.
    """
    needs = {name: {name, *model.test_refs} for name, model in models.items()}
    for name, model in models.items():
        for other in model.test_refs:
            needs[other].add(name)
    return needs
