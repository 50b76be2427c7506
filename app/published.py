"""The paper's published figures (``data_manifests/cosettle_published.csv``), read for the report.

The file has one line per backbone and variant (``base``: the frozen backbone; ``+Ours``: with
the released projection), DAVIS J&F_m, VIP mIoU and JHMDB PCK@0.1 in points; ``#`` lines are
comments. The figures live in that file only, never in code.
"""
from __future__ import annotations

import csv
from pathlib import Path

PUBLISHED_FILE = Path(__file__).resolve().parents[1] / "data_manifests" / "cosettle_published.csv"
# CSV column -> (evaluation kind, metric) of the results table
METRICS = {"davis_jf": ("davis", "J&F-Mean"), "vip_miou": ("vip", "mIoU"), "jhmdb_pck": ("jhmdb", "PCK@0.1")}
VARIANTS = ("base", "+Ours")
RELEASE_SETTING = "release"  # the ``setting`` of a release's rows (``cosettle release-sweep``)


class PublishedError(Exception):
    """A published-figures file that cannot be read; the message names the file and line."""


def read_published(path: Path = PUBLISHED_FILE) -> dict[tuple[str, str], dict[tuple[str, str], float]]:
    """(backbone, variant) -> {(kind, metric): value on the results' 0-1 scale}."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise PublishedError(f"{path}: cannot read the published figures ({e.strerror})") from None
    rows = [(n, line) for n, line in enumerate(lines, start=1) if line.strip() and not line.lstrip().startswith("#")]
    if not rows:
        raise PublishedError(f"{path}: no published figures")
    reader = csv.DictReader([line for _, line in rows])
    need = {"backbone", "variant", *METRICS}
    if not need <= set(reader.fieldnames or ()):
        raise PublishedError(f"{path}: needs the columns {', '.join(sorted(need))}")
    out: dict[tuple[str, str], dict[tuple[str, str], float]] = {}
    for (n, _), record in zip(rows[1:], reader):
        if record["variant"] not in VARIANTS:
            raise PublishedError(f"{path}:{n}: variant {record['variant']!r} is not one of {', '.join(VARIANTS)}")
        values = {}
        for column, key in METRICS.items():
            try:
                values[key] = float(record[column]) / 100.0
            except (TypeError, ValueError):
                raise PublishedError(f"{path}:{n}: {column} {record[column]!r} is not a number") from None
        out[(record["backbone"], record["variant"])] = values
    return out
