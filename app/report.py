"""``cosettle report RESULTS.parquet``: the paper-style table and the plots of a sweep's results.

Writes, into ``--out`` (default: ``report/`` beside the results):

- ``table.md`` and ``table.csv``: one line per backbone and training setting, baseline vs
  + projection (and the difference) for DAVIS J&F_m, VIP mIoU and JHMDB PCK@0.1, in points
  (x100), UCF101/HMDB51 top-1 or Recall@1 of video-level evaluations, plus the analysis
  distances when a ``metrics`` evaluation ran;
- ``tradeoff.png``: intra-video vs inter-video distance, an arrow from the frozen backbone to
  its projection for every backbone and setting (needs a ``metrics`` evaluation);
- ``deltas.png``: projection minus baseline per backbone and setting, one bar per metric.

With the published figures (``data_manifests/cosettle_published.csv``, by backbone name and
variant: the baseline is compared with ``base``, the projection with ``+Ours``), each DAVIS, VIP
and JHMDB column is followed by ``published`` (base / +Ours) and ``measured - published``
columns: always when the results hold imported releases (``cosettle release-sweep``), and for any
results with ``--published``.

When a task was rerun with other provenance (new weights, other settings), the table keeps, per
backbone, the rows of its most recent weights and, per (backbone, variant, setting,
evaluation), the most recent row; how many older rows were left out is reported.
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

import click
import matplotlib

matplotlib.use("Agg")  # files only; no display on clusters
import matplotlib.pyplot as plt  # noqa: E402

from cosettle.pipeline.backbones import BACKBONES  # noqa: E402

from .published import RELEASE_SETTING, PublishedError, read_published  # noqa: E402
from .results import BASELINE, METRIC, PROJECTION, ResultsError, read_results  # noqa: E402


@dataclass(frozen=True)
class Column:
    """A table column: one metric of one evaluation kind, shown as ``scale`` x value."""

    kind: str
    metric: str
    label: str
    scale: float = 100.0
    digits: int = 1


# The paper's three numbers (COSETTLE_METHOD.md section 8), all on a 0-1 scale in the results.
HEADLINE = (
    Column("davis", "J&F-Mean", "DAVIS J&F_m"),
    Column("vip", "mIoU", "VIP mIoU"),
    Column("jhmdb", "PCK@0.1", "JHMDB PCK@0.1"),
)
# Video-level tasks: top-1 for kNN, linear probe and zero-shot, Recall@1 for retrieval (whichever
# an evaluation reported).
VIDEO = tuple(Column(kind, metric, f"{title} {label}") for kind, title in (("ucf101", "UCF101"), ("hmdb51", "HMDB51"))
              for metric, label in (("top1", "top-1"), ("R@1", "R@1")))
# The consistency-separability analysis (a ``metrics`` evaluation): distances normalised by the
# diameter at the max radius, as in the release's figure.
INTRA = Column("metrics", "intra_video_distance/diameter@100", "intra-video distance", scale=1.0, digits=3)
INTER = Column("metrics", "inter_video_distance/diameter@100", "inter-video distance", scale=1.0, digits=3)
ANALYSIS = (INTRA, INTER)


class ReportError(Exception):
    """Results that cannot be reported; the message names the file and the problem."""


@dataclass
class Line:
    """One line of the table: a backbone and a training setting (None: no trained projection)."""

    backbone: str
    backbone_name: str
    setting: str | None
    setting_label: str
    baseline: dict[str, float] = field(default_factory=dict)  # "<evaluation>/<metric>" -> value
    projection: dict[str, float] = field(default_factory=dict)


def current_rows(rows: list[dict]) -> tuple[list[dict], int]:
    """The rows to report (see the module docstring) and the number of older rows left out."""
    latest_sha = {}
    for r in sorted(rows, key=lambda r: r["finished"]):
        latest_sha[r["backbone"]] = r["weights_sha256"]
    keep: dict[tuple, dict] = {}
    for r in sorted(rows, key=lambda r: r["finished"]):
        if r["weights_sha256"] == latest_sha[r["backbone"]]:
            keep[(r["backbone"], r["variant"], r["setting"], r["evaluation"])] = r
    return list(keep.values()), len(rows) - len(keep)


def build_lines(rows: list[dict]) -> list[Line]:
    """Pair every projection row with the baseline rows of its backbone, one Line per setting."""
    order = list(BACKBONES)
    lines: dict[tuple, Line] = {}
    for r in rows:
        if r["variant"] == PROJECTION:
            key = (r["backbone"], r["setting"])
            lines.setdefault(key, Line(r["backbone"], r["backbone_name"], r["setting"], r["setting_label"] or ""))
    for r in rows:
        if r["variant"] == BASELINE and not any(k[0] == r["backbone"] for k in lines):
            lines[(r["backbone"], None)] = Line(r["backbone"], r["backbone_name"], None, "(not trained)")
    for r in rows:
        metrics = {f"{r['evaluation']}/{k[len(METRIC):]}": v for k, v in r.items()
                   if k.startswith(METRIC) and v is not None}
        for key, line in lines.items():
            if r["backbone"] != key[0]:
                continue
            if r["variant"] == BASELINE:
                line.baseline.update(metrics)
            elif r["setting"] == key[1]:
                line.projection.update(metrics)
    rank = {name: i for i, name in enumerate(order)}
    return sorted(lines.values(), key=lambda ln: (rank.get(ln.backbone_name, len(order)), ln.backbone, ln.setting_label))


def table_columns(rows: list[dict]) -> list[tuple[str, Column]]:
    """(evaluation name, column) for every evaluation in the results that reported a column's metric."""
    evaluations = sorted({(r["evaluation"], r["eval_kind"]) for r in rows})
    reported = {(r["evaluation"], k[len(METRIC):]) for r in rows for k, v in r.items() if k.startswith(METRIC) and v is not None}
    return [(name, col) for col in HEADLINE + VIDEO + ANALYSIS for name, kind in evaluations
            if kind == col.kind and (name, col.metric) in reported]


def _label(name: str, col: Column) -> str:
    return col.label if name == col.kind else f"{col.label} [{name}]"


def _fmt(value: float | None, col: Column) -> str:
    return "–" if value is None or math.isnan(value) else f"{value * col.scale:.{col.digits}f}"


def _values(line: Line, name: str, col: Column) -> tuple[float | None, float | None]:
    key = f"{name}/{col.metric}"
    return line.baseline.get(key), line.projection.get(key)


def _delta(base: float | None, proj: float | None) -> float | None:
    return None if base is None or proj is None else proj - base


Published = dict[tuple[str, str], dict[tuple[str, str], float]]


def _published(ln: Line, col: Column, published: Published | None) -> tuple[float | None, float | None] | None:
    """(base, +Ours) published for a line's backbone and a headline column; None: no such column."""
    if published is None or col not in HEADLINE:
        return None
    return tuple(published.get((ln.backbone_name, v), {}).get((col.kind, col.metric)) for v in ("base", "+Ours"))


def _signed(value: float | None, col: Column) -> str:
    return "–" if value is None or math.isnan(value) else f"{value * col.scale:+.{col.digits}f}"


def markdown(lines: list[Line], columns: list[tuple[str, Column]], published: Published | None = None) -> str:
    """The paper-style table: ``baseline / + projection (difference)`` per metric, in points; with
    ``published``, each headline metric also gets ``published`` and ``measured - published``."""
    head = ["backbone", "setting"]
    for n, c in columns:
        head.append(_label(n, c))
        if published is not None and c in HEADLINE:
            head += [f"{_label(n, c)} published", f"{_label(n, c)} measured - published"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for ln in lines:
        cells = [ln.backbone, ln.setting_label]
        for name, col in columns:
            base, proj = _values(ln, name, col)
            delta = _delta(base, proj)
            sign = "" if delta is None else f" ({delta * col.scale:+.{col.digits}f})"
            cells.append(f"{_fmt(base, col)} / {_fmt(proj, col)}{sign}")
            paper = _published(ln, col, published)
            if paper is not None:
                cells.append(f"{_fmt(paper[0], col)} / {_fmt(paper[1], col)}")
                cells.append(f"{_signed(_delta(paper[0], base), col)} / {_signed(_delta(paper[1], proj), col)}")
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def write_csv(path: Path, lines: list[Line], columns: list[tuple[str, Column]], published: Published | None = None) -> None:
    """The same table with one column per (metric, baseline | projection | delta), in table units;
    with ``published``, also the published base / +Ours and measured - published per headline metric."""
    head = ["backbone", "backbone_name", "setting", "setting_label"]
    parts = ("published baseline", "published projection", "baseline - published", "projection - published")
    for name, col in columns:
        head += [f"{_label(name, col)} {part}" for part in ("baseline", "projection", "delta")]
        if published is not None and col in HEADLINE:
            head += [f"{_label(name, col)} {part}" for part in parts]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(head)
        for ln in lines:
            cells = [ln.backbone, ln.backbone_name, ln.setting or "", ln.setting_label]
            for name, col in columns:
                base, proj = _values(ln, name, col)
                cells += [_fmt(v, col) if v is not None else "" for v in (base, proj, _delta(base, proj))]
                paper = _published(ln, col, published)
                if paper is not None:
                    extra = (*paper, _delta(paper[0], base), _delta(paper[1], proj))
                    cells += [_fmt(v, col) if v is not None else "" for v in extra]
            writer.writerow(cells)


def _line_name(ln: Line, many_settings: bool) -> str:
    return f"{ln.backbone}\n{ln.setting_label}" if many_settings else ln.backbone


def plot_tradeoff(path: Path, lines: list[Line], evaluation: str) -> int:
    """Arrows baseline -> projection in the (intra, inter) plane; returns the arrows drawn."""
    fig, ax = plt.subplots(figsize=(6.5, 5))
    colours = plt.get_cmap("tab10")
    backbones = list(dict.fromkeys(ln.backbone for ln in lines))
    drawn = 0
    labelled = set()
    for ln in lines:
        (bx, px), (by, py) = _values(ln, evaluation, INTRA), _values(ln, evaluation, INTER)
        if None in (bx, px, by, py):
            continue
        colour = colours(backbones.index(ln.backbone) % 10)
        ax.annotate("", xy=(px, py), xytext=(bx, by), arrowprops=dict(arrowstyle="->", color=colour, lw=1.5))
        ax.update_datalim([(bx, by), (px, py)])  # annotations alone do not widen the axes
        if ln.backbone not in labelled:
            ax.scatter([bx], [by], color=colour, s=25, zorder=3, label=ln.backbone)
            labelled.add(ln.backbone)
        ax.annotate(ln.setting_label, (px, py), fontsize=7, color=colour, xytext=(3, 3), textcoords="offset points")
        drawn += 1
    ax.margins(0.15)
    if labelled:
        ax.legend(fontsize=8)
    ax.set_xlabel(f"{INTRA.label} (lower: more consistent)")
    ax.set_ylabel(f"{INTER.label} (higher: more separable)")
    ax.set_title("Consistency vs separability: frozen backbone (dot) -> + projection (arrow)")
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3)
    ax.autoscale_view()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return drawn


def plot_deltas(path: Path, lines: list[Line], columns: list[tuple[str, Column]]) -> int:
    """Grouped bars of projection - baseline (points) per line and headline metric; returns the bars drawn."""
    headline = [(n, c) for n, c in columns if c in HEADLINE + VIDEO]
    many = len({ln.setting for ln in lines}) > 1
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(lines) * max(1, len(headline))), 4.5))
    width = 0.8 / max(1, len(headline))
    drawn = 0
    for j, (name, col) in enumerate(headline):
        xs, ds = [], []
        for i, ln in enumerate(lines):
            d = _delta(*_values(ln, name, col))
            if d is not None:
                xs.append(i + (j - (len(headline) - 1) / 2) * width)
                ds.append(d * col.scale)
        ax.bar(xs, ds, width=width, label=_label(name, col))
        drawn += len(ds)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(lines)), [_line_name(ln, many) for ln in lines], fontsize=8)
    ax.set_ylabel("+ projection - baseline (points)")
    ax.set_title("Metric change per backbone")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return drawn


def render(results: Path, out: Path, published: bool | None = None) -> tuple[dict[str, Path], list[str]]:
    """Write the table and plots of ``results`` into ``out``; returns (files written, notes).

    ``published``: compare with the paper's figures (None: when the results hold releases)."""
    results = Path(results)
    try:
        rows = read_results(results).to_pylist()
    except ResultsError as e:
        raise ReportError(str(e)) from None
    rows, superseded = current_rows(rows)
    columns = table_columns(rows)
    if not any(c in HEADLINE + VIDEO + ANALYSIS for _, c in columns):
        kinds = sorted({r["eval_kind"] for r in rows})
        raise ReportError(f"{results}: no DAVIS, VIP, JHMDB, UCF101, HMDB51 or metrics results to report "
                          f"(found: {', '.join(kinds)})")
    lines = build_lines(rows)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    notes = []
    if superseded:
        notes.append(f"{superseded} older row(s) of rerun tasks left out (the newest of each are reported)")
    if published is None:
        published = any(ln.setting == RELEASE_SETTING for ln in lines)
    paper = None
    if published:
        try:
            paper = read_published()
        except PublishedError as e:
            raise ReportError(str(e)) from None
        missing = sorted({ln.backbone_name for ln in lines if (ln.backbone_name, "base") not in paper})
        if missing:
            notes.append(f"no published figures for {', '.join(missing)}")
    files = {"table.md": out / "table.md", "table.csv": out / "table.csv"}
    files["table.md"].write_text(markdown(lines, columns, paper))
    write_csv(files["table.csv"], lines, columns, paper)
    if any(c in HEADLINE + VIDEO for _, c in columns):
        files["deltas.png"] = out / "deltas.png"
        if not plot_deltas(files["deltas.png"], lines, columns):
            notes.append("deltas.png has no bars: no backbone has both a baseline and a projection result")
    analysis = sorted({n for n, c in columns if c is INTRA})
    if analysis:
        files["tradeoff.png"] = out / "tradeoff.png"
        if not plot_tradeoff(files["tradeoff.png"], lines, analysis[0]):
            notes.append("tradeoff.png has no arrows: no backbone has both baseline and projection distances")
    else:
        notes.append("tradeoff.png not written: the results hold no metrics evaluation (intra/inter distances)")
    return files, notes


@click.command("report", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("results", type=click.Path(exists=True, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for table.md, table.csv and the plots  [default: report/ beside RESULTS]")
@click.option("--published/--no-published", default=None,
              help="Add the paper's published figures and measured - published  [default: when the results hold releases]")
def report(results: Path, out: Path | None, published: bool | None) -> None:
    """Render a sweep's RESULTS (results.parquet folder or file) as a Markdown/CSV table and PNG plots."""
    try:
        files, notes = render(results, out or results.parent / "report", published)
    except ReportError as e:
        raise click.ClickException(str(e)) from None
    click.echo(files["table.md"].read_text())
    for note in notes:
        click.echo(f"note: {note}", err=True)
    for path in files.values():
        click.echo(f"wrote {path}")
