"""The sweep's results table: one Parquet part file per finished evaluation, read as one table.

``RESULTS.parquet/`` is a directory of ``<task>-<provenance>.parquet`` parts of one row each.
Every part is written aside and renamed into place, so concurrent writers never collide and a
reader never sees half a row. Columns: the fixed ones of :data:`BASE_SCHEMA`, then
``train.<option>`` for the training settings of a projection row and ``metric.<name>`` for every
metric the evaluation returned (absent columns read as null).
"""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from cosettle.core.atomic import write_atomic

METRIC = "metric."
TRAIN = "train."
BASELINE, PROJECTION = "baseline", "projection"

BASE_SCHEMA = pa.schema([
    ("task", pa.string()),            # the sweep task that wrote the row
    ("provenance", pa.string()),      # sha256 of everything the row's numbers depend on
    ("sweep", pa.string()),           # the sweep file
    ("backbone", pa.string()),        # the sweep's backbone id
    ("backbone_name", pa.string()),   # the registered backbone
    ("weights", pa.string()),         # weights file name, or "random"
    ("weights_sha256", pa.string()),
    ("arch", pa.string()),            # JSON of the architecture overrides, or null
    ("variant", pa.string()),         # "baseline" (frozen backbone) or "projection"
    ("setting", pa.string()),         # training setting id, null for a baseline
    ("setting_label", pa.string()),   # the varied options, e.g. "lambda_reg=1.0"
    ("evaluation", pa.string()),      # the evaluation's name in the sweep file
    ("eval_kind", pa.string()),       # davis, jhmdb, vip, metrics
    ("dataset", pa.string()),
    ("run_dir", pa.string()),
    ("eval_out", pa.string()),
    ("wall_extract_s", pa.float64()),  # wall time of the task that made the store (null: baseline)
    ("wall_train_s", pa.float64()),
    ("wall_eval_s", pa.float64()),
    ("started", pa.string()),         # ISO 8601 UTC, of the evaluation
    ("finished", pa.string()),
    ("cosettle_version", pa.string()),
    ("host", pa.string()),
    ("worker", pa.string()),          # the Dask worker that ran the evaluation
])


class ResultsError(Exception):
    """A results table that cannot be read; the message names the path and the problem."""


def part_path(results: Path, task: str, provenance: str) -> Path:
    """Where the row of one evaluation task with one provenance lives."""
    return Path(results) / f"{task}-{provenance[:16]}.parquet"


def flat_metrics(summary: dict, prefix: str = "") -> dict[str, float]:
    """The numbers of a task's summary, nested keys joined with '/' (missing values left out)."""
    out = {}
    for k, v in summary.items():
        if isinstance(v, dict):
            out |= flat_metrics(v, f"{prefix}{k}/")
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = float(v)
    return out


def _arrow_type(value) -> pa.DataType:
    if isinstance(value, bool):
        return pa.bool_()
    if isinstance(value, int):
        return pa.int64()
    if isinstance(value, float):
        return pa.float64()
    return pa.string()


def row_table(row: dict, settings: dict, metrics: dict[str, float]) -> pa.Table:
    """One row: the :data:`BASE_SCHEMA` fields of ``row``, then the settings and metrics columns."""
    missing = [f.name for f in BASE_SCHEMA if f.name not in row]
    if missing:
        raise ValueError(f"result row lacks {', '.join(missing)}")
    fields = list(BASE_SCHEMA)
    values = {f.name: row[f.name] for f in BASE_SCHEMA}
    for name, value in settings.items():
        fields.append(pa.field(TRAIN + name, _arrow_type(value)))
        values[TRAIN + name] = value
    for name, value in metrics.items():
        fields.append(pa.field(METRIC + name, pa.float64()))
        values[METRIC + name] = float(value)
    return pa.Table.from_pylist([values], schema=pa.schema(fields))


def write_row(results: Path, row: dict, settings: dict, metrics: dict[str, float]) -> Path:
    """Add one evaluation's row to the table at ``results`` (atomic; safe with concurrent writers)."""
    results = Path(results)
    results.mkdir(parents=True, exist_ok=True)
    table = row_table(row, settings, metrics)
    return write_atomic(part_path(results, row["task"], row["provenance"]), lambda tmp: pq.write_table(table, tmp))


def read_results(path: Path) -> pa.Table:
    """The whole table: a directory of parts (columns unified, absent ones null) or one file."""
    path = Path(path)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(path.glob("*.parquet"))
        if not files:
            raise ResultsError(f"{path}: no result rows (no *.parquet parts)")
    else:
        raise ResultsError(f"{path}: no such results table")
    try:
        tables = [pq.read_table(f) for f in files]
    except (pa.ArrowInvalid, OSError) as e:
        raise ResultsError(f"{path}: unreadable results part ({e})") from None
    table = pa.concat_tables(tables, promote_options="permissive")
    missing = [f.name for f in BASE_SCHEMA if f.name not in table.column_names]
    if missing:
        raise ResultsError(f"{path}: not a cosettle results table (no column {', '.join(missing)})")
    return table
