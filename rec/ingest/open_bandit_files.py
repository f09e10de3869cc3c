"""Reading one campaign folder of the Open Bandit Dataset, row by row, with quarantine.

A campaign folder (`<policy>/<campaign>/`) holds `<campaign>.csv`, one logged impression a
row, and `item_context.csv`, the campaign's items. Every row is checked; the rows that do
not fit are kept aside with the reason and the raw fields, so that read = accepted +
quarantined holds for every file.
"""

from __future__ import annotations

import csv
import logging
import math
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

LOG_COLUMNS = ("timestamp", "item_id", "position", "click", "propensity_score")
USER_FEATURE_PREFIX = "user_feature_"
AFFINITY_PREFIX = "user-item_affinity_"
ITEM_NUMERIC_COLUMN = "item_feature_0"


@dataclass(frozen=True)
class QuarantinedRow:
    """A row that did not fit: which file and line, why, and its fields as read."""

    source_file: str
    line_number: int
    reason: str
    row: dict[str, str]


@dataclass
class ItemContext:
    """The campaign's items: one numeric and some hashed categorical features each."""

    item_ids: np.ndarray
    """(A,) item ids, sorted; the log's `item_id` indexes this array."""
    numeric: np.ndarray
    """(A,) the numeric feature (`item_feature_0`)."""
    categorical: np.ndarray
    """(A, C) str, the hashed categorical features (`item_feature_1..`)."""
    categorical_names: tuple[str, ...]


@dataclass
class CampaignLog:
    """The accepted impressions of one campaign folder, as arrays, and what was quarantined."""

    campaign: str
    policy: str
    folder: Path
    items: ItemContext
    row_index: np.ndarray
    """(N,) the row's index in the file (its first, unnamed column)."""
    timestamp: list[datetime]
    item: np.ndarray
    """(N,) row of the item in `items`."""
    position: np.ndarray
    """(N,) 0-based slot (the file's positions are 1-based)."""
    click: np.ndarray
    propensity: np.ndarray
    user_features: np.ndarray
    """(N, U) str, the hashed user features."""
    affinity: np.ndarray
    """(N, A) user-item affinities; all zero where the file has no affinity columns."""
    rows_read: int = 0
    quarantined: list[QuarantinedRow] = field(default_factory=list)

    @property
    def n_positions(self) -> int:
        return int(self.position.max()) + 1 if len(self.position) else 0

    @property
    def source(self) -> str:
        """The label of this log in the app schema: `obd:<policy>:<campaign>`."""
        return f"obd:{self.policy}:{self.campaign}"


def resolve_campaign_folder(path: str | Path, campaign: str | None = None) -> tuple[Path, str]:
    """The folder holding `<campaign>.csv` and the campaign's name.

    `path` is either the campaign folder itself (`random/men`) or the behaviour policy's
    folder (`random`) with `campaign` given, as the dataset lays them out.
    """
    path = Path(path)
    if campaign and (path / campaign / f"{campaign}.csv").exists():
        return path / campaign, campaign
    name = campaign or path.name
    if (path / f"{name}.csv").exists():
        return path, name
    raise FileNotFoundError(
        f"no campaign file under {path}: expected {name}.csv there"
        + (f" or {campaign}/{campaign}.csv" if campaign else "")
    )


def find_prior_file(folder: Path, name: str = "prior_bts.yaml") -> Path | None:
    """The first `prior_bts.yaml` in the campaign folder or one of its two parents."""
    for candidate in (folder, folder.parent, folder.parent.parent):
        if (candidate / name).exists():
            return candidate / name
    return None


def _read_items(path: Path, quarantined: list[QuarantinedRow]) -> ItemContext:
    with path.open(newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader)
        categorical_names = tuple(
            h for h in header if h.startswith("item_feature_") and h != ITEM_NUMERIC_COLUMN
        )
        rows = {}
        for line_number, fields in enumerate(reader, start=2):
            row = dict(zip(header, fields, strict=False))
            reason = None
            if len(fields) != len(header):
                reason = f"wrong number of fields ({len(fields)}, expected {len(header)})"
            elif not row.get("item_id", "").isdigit():
                reason = "item_id not a non-negative integer"
            elif not _is_finite(row.get(ITEM_NUMERIC_COLUMN, "")):
                reason = f"{ITEM_NUMERIC_COLUMN} not a number"
            elif any(not row[name] for name in categorical_names):
                reason = "missing categorical item feature"
            elif int(row["item_id"]) in rows:
                reason = "duplicate item_id"
            if reason:
                quarantined.append(QuarantinedRow(path.name, line_number, reason, row))
                continue
            rows[int(row["item_id"])] = row
    item_ids = np.array(sorted(rows), dtype=np.int64)
    return ItemContext(
        item_ids=item_ids,
        numeric=np.array([float(rows[i][ITEM_NUMERIC_COLUMN]) for i in item_ids]),
        categorical=np.array(
            [[rows[i][name] for name in categorical_names] for i in item_ids], dtype=object
        ).reshape(len(item_ids), len(categorical_names)),
        categorical_names=categorical_names,
    )


def _is_finite(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def _check_row(row: dict[str, str], n_fields: int, n_header: int, known_items: dict[int, int],
               user_columns: list[str], affinity_columns: list[str]) -> str | None:
    """The reason the row does not fit, or None; checks run in a fixed order."""
    if n_fields != n_header:
        return f"wrong number of fields ({n_fields}, expected {n_header})"
    try:
        stamp = datetime.fromisoformat(row["timestamp"])
    except ValueError:
        return "unparseable timestamp"
    if stamp.tzinfo is None:
        return "timestamp without time zone"
    if not row["item_id"].isdigit() or int(row["item_id"]) not in known_items:
        return "item_id not in item_context"
    if not row["position"].isdigit() or int(row["position"]) < 1:
        return "position not a positive integer"
    if row["click"] not in ("0", "1"):
        return "click not 0 or 1"
    if not _is_finite(row["propensity_score"]) or not 0 < float(row["propensity_score"]) <= 1:
        return "propensity_score outside (0, 1]"
    if any(not row[c] for c in user_columns):
        return "missing user feature"
    if any(not _is_finite(row[c]) or float(row[c]) < 0 for c in affinity_columns):
        return "user-item affinity not a non-negative number"
    return None


def read_campaign(path: str | Path, campaign: str | None = None) -> CampaignLog:
    """Read and check one campaign folder.

    Args:
        path: the campaign folder, or its behaviour policy's folder with `campaign`.
        campaign: the campaign's name; the folder's name when None.

    Returns:
        The accepted rows as arrays, with the quarantined rows and the count read.
    """
    folder, name = resolve_campaign_folder(path, campaign)
    quarantined: list[QuarantinedRow] = []
    items = _read_items(folder / "item_context.csv", quarantined)
    known_items = {int(item): row for row, item in enumerate(items.item_ids)}

    log_file = folder / f"{name}.csv"
    accepted: list[dict[str, str]] = []
    rows_read = 0
    with log_file.open(newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader)
        missing = [c for c in LOG_COLUMNS if c not in header]
        if missing:
            raise ValueError(f"{log_file} lacks the columns {missing}")
        user_columns = [h for h in header if h.startswith(USER_FEATURE_PREFIX)]
        affinity_columns = [h for h in header if h.startswith(AFFINITY_PREFIX)]
        for line_number, fields in enumerate(reader, start=2):
            rows_read += 1
            row = dict(zip(header, fields, strict=False))
            reason = _check_row(row, len(fields), len(header), known_items, user_columns,
                                affinity_columns)
            if reason:
                quarantined.append(QuarantinedRow(log_file.name, line_number, reason, row))
            else:
                accepted.append(row)

    affinity = np.zeros((len(accepted), len(items.item_ids)))
    if affinity_columns:
        # Limitation: affinity columns are matched to items by their suffix; columns naming
        # items absent from item_context are ignored.
        for column in affinity_columns:
            item = int(column.removeprefix(AFFINITY_PREFIX))
            if item in known_items:
                affinity[:, known_items[item]] = [float(r[column]) for r in accepted]

    result = CampaignLog(
        campaign=name,
        policy=folder.parent.name,
        folder=folder,
        items=items,
        row_index=np.array([int(r[""]) if r.get("", "").isdigit() else i
                            for i, r in enumerate(accepted)], dtype=np.int64),
        timestamp=[datetime.fromisoformat(r["timestamp"]) for r in accepted],
        item=np.array([known_items[int(r["item_id"])] for r in accepted], dtype=np.int64),
        position=np.array([int(r["position"]) - 1 for r in accepted], dtype=np.int64),
        click=np.array([int(r["click"]) for r in accepted], dtype=np.int64),
        propensity=np.array([float(r["propensity_score"]) for r in accepted]),
        user_features=np.array([[r[c] for c in user_columns] for r in accepted],
                               dtype=object).reshape(len(accepted), len(user_columns)),
        affinity=affinity,
        rows_read=rows_read,
        quarantined=quarantined,
    )
    log.info("read %s: %d rows, %d accepted, %d quarantined (items: %d)", log_file,
             rows_read, len(accepted), sum(q.source_file == log_file.name for q in quarantined),
             len(items.item_ids))
    return result
