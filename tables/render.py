"""Render a table: ours (mean and spread over seeds) beside the published value, as Markdown, CSV and a PNG plot.

A cell is one row x one column. Seeds whose run is missing, unfinished or diverged are listed in the cell, never
dropped silently: the mean is over finished seeds only and says how many that is.
"""
from __future__ import annotations

import csv
import statistics
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from tables.collect import RunRecord, describe, inputs_pending
from tables.plan import Plan
from tables.spec import PRETRAIN, ROW_AXIS, Column, Row


@dataclass
class Cell:
    row: Row
    column: Column
    values: Dict[int, float] = field(default_factory=dict)  # seed -> metric of a finished run
    missing: Dict[int, str] = field(default_factory=dict)  # seed -> why there is no value
    runs: List[str] = field(default_factory=list)  # where the values came from

    @property
    def mean(self) -> Optional[float]:
        return statistics.fmean(self.values.values()) if self.values else None

    @property
    def std(self) -> Optional[float]:
        """Sample standard deviation over seeds (None below two seeds)."""
        return statistics.stdev(self.values.values()) if len(self.values) > 1 else None

    @property
    def published(self):
        return self.row.published.get(self.column.name)

    @property
    def difference(self) -> Optional[float]:
        published = self.published
        if self.mean is None or published is None or published.value is None:
            return None
        return self.mean - published.value


def build_cells(plan: Plan, found: Dict[str, Optional[RunRecord]]) -> List[Cell]:
    """One cell per (row, column), filled from the matched runs of every seed."""
    cells = []
    for row in plan.spec.rows:
        for column in plan.spec.row_columns(row):
            cell = Cell(row, column)
            for seed in plan.seeds:
                run = plan.by_cell[(row.name, seed, column.evaluation)]
                record, pending = found.get(run.name), inputs_pending(run, found)
                if record is not None and record.status == "finished" and column.metric in record.values:
                    cell.values[seed] = float(record.values[column.metric])
                    cell.runs.append(record.where)
                elif pending:
                    cell.missing[seed] = " ".join(pending)
                elif record is not None and record.status == "finished":
                    cell.missing[seed] = f"no {column.metric} in {record.where}"
                else:
                    cell.missing[seed] = describe(record)
            cells.append(cell)
    return cells


def ours_text(cell: Cell) -> str:
    """'93.12 ± 0.21 (3 seeds)', with any seeds lacking a value named."""
    text = ""
    if cell.values:
        text = f"{cell.mean:.2f}" + (f" ± {cell.std:.2f}" if cell.std is not None else "")
        text += f" ({len(cell.values)} seed{'s' if len(cell.values) > 1 else ''})"
    reasons = set(cell.missing.values())
    if not cell.values and len(reasons) == 1:  # nothing to show yet, for one reason: say it once
        return reasons.pop()
    if cell.missing:
        gaps = "; ".join(f"seed {seed}: {why}" for seed, why in cell.missing.items())
        text = f"{text}; {gaps}" if text else gaps
    return text


def published_text(cell: Cell) -> str:
    published = cell.published
    if published is None:
        return "—"
    text = "figure only" if published.figure_only else f"{published.value:g}" if published.value is not None else "—"
    return f"{text} ({published.source})" if published.source else text


def setting_text(row: Row) -> str:
    """What sets the row apart: its overrides, or 'no pretraining'."""
    parts = ["no pretraining (random init)"] if row.from_scratch else []
    parts += [f"recipe `{Path(row.recipe).name}`"] if row.recipe else []
    parts += [f"`{o}`" for o in row.pretrain]
    used_by: Dict[str, List[str]] = {}  # an override -> the evaluations it applies to, named once
    for name, overrides in row.evaluations.items():
        for override in overrides:
            used_by.setdefault(override, []).append(name)
    parts += [f"`{o}` ({', '.join(names)})" for o, names in used_by.items()]
    parts += [f"teacher: {row.teacher}"] if row.teacher else []
    return "; ".join(filter(None, [", ".join(parts) or "base recipe", row.note]))


def markdown(plan: Plan, cells: List[Cell]) -> str:
    """The table as Markdown: a heading with the source, one line per cell, the spec's notes below."""
    spec = plan.spec
    source = ", ".join(filter(None, [spec.source.paper, spec.source.where, spec.source.url]))
    lines = [f"### {spec.title}", "", f"Source: {source}. Seeds: {', '.join(map(str, plan.seeds))}.", "",
             "| row | setting | column | ours | published | ours − published | published protocol |",
             "| --- | --- | --- | --- | ---: | ---: | --- |"]
    for cell in cells:
        published = cell.published
        protocol = "; ".join(filter(None, [published.protocol, published.note])) if published else ""
        difference = f"{cell.difference:+.2f}" if cell.difference is not None else ""
        lines.append(f"| {cell.row.name} | {setting_text(cell.row)} | {cell.column.label or cell.column.name} | "
                     f"{ours_text(cell)} | {published_text(cell)} | {difference} | {protocol} |")
    if spec.notes:
        lines += ["", spec.notes.strip()]
    return "\n".join(lines) + "\n"


CSV_FIELDS = ("table", "row", "column", "evaluation", "metric", "mean", "std", "n_finished", "n_seeds", "values",
              "missing", "published", "figure_only", "difference", "protocol", "published_source", "runs")


def write_csv(plan: Plan, cells: List[Cell], path: Path) -> Path:
    """One line per cell with full-precision numbers; per-seed values as 'seed:value' separated by spaces."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for cell in cells:
            published = cell.published
            writer.writerow({
                "table": plan.spec.name, "row": cell.row.name, "column": cell.column.name,
                "evaluation": cell.column.evaluation, "metric": cell.column.metric,
                "mean": _blank(cell.mean), "std": _blank(cell.std), "n_finished": len(cell.values),
                "n_seeds": len(plan.seeds), "values": " ".join(f"{s}:{v!r}" for s, v in cell.values.items()),
                "missing": "; ".join(f"{s}:{why}" for s, why in cell.missing.items()),
                "published": _blank(published.value if published else None),
                "figure_only": bool(published and published.figure_only), "difference": _blank(cell.difference),
                "protocol": published.protocol if published else "", "published_source": published.source
                if published else "", "runs": " ".join(cell.runs)})
    return path


def _blank(value: Optional[float]) -> str:
    return "" if value is None else repr(value)


def plot_png(plan: Plan, cells: List[Cell], path: Path) -> Optional[Path]:
    """Grouped bars of the plotted column (x and series from the rows' pretraining configs), with error bars over
    seeds and published values as black markers; rows without pretraining become dashed lines. None without a plot."""
    spec = plan.spec
    if spec.plot is None:
        return None
    import matplotlib  # imported here: only rendering a plot needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if spec.plot.x == ROW_AXIS:
        return _plot_by_row(plan, cells, path, plt)
    chosen = [c for c in cells if c.column.name == spec.plot.column]
    swept = [c for c in chosen if not c.row.from_scratch]
    setting = {c.row.name: plan.by_cell[(c.row.name, plan.seeds[0], PRETRAIN)].expected for c in swept}
    xs = sorted({setting[c.row.name][spec.plot.x] for c in swept})
    series = sorted({setting[c.row.name].get(spec.plot.series) for c in swept}, key=str) if spec.plot.series \
        else [None]
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(xs) * max(1, len(series)) ** 0.5), 4))
    for i, label in enumerate(series):
        named = False
        for c in swept:
            if spec.plot.series and setting[c.row.name].get(spec.plot.series) != label:
                continue
            x = xs.index(setting[c.row.name][spec.plot.x]) - 0.4 + width * (i + 0.5)
            if c.mean is not None:  # the series' first bar carries its legend entry
                ax.bar(x, c.mean, width, yerr=c.std or 0, color=f"C{i}", capsize=2,
                       label=f"{spec.plot.series}={label}" if label is not None and not named else None)
                named = True
            if c.published is not None and c.published.value is not None:
                ax.plot(x, c.published.value, "k*", markersize=10)
    for j, c in enumerate(c for c in chosen if c.row.from_scratch and c.mean is not None):
        ax.axhline(c.mean, color=f"C{len(series) + j}", linestyle="--", label=f"{c.row.name} (no pretraining)")
    ax.plot([], [], "k*", label="published")
    shown = [c.mean for c in chosen if c.mean is not None] + [
        c.published.value for c in chosen if c.published is not None and c.published.value is not None]
    if shown:  # accuracies near 90%: start the axis a little below the lowest bar so differences show
        ax.set_ylim(bottom=max(0.0, min(shown) - 5.0))
    ax.set_xticks(range(len(xs)), [f"{x:g}" if isinstance(x, float) else str(x) for x in xs])
    ax.set_xlabel(spec.plot.x)
    column = next(c.column for c in chosen)
    ax.set_ylabel(column.label or column.metric)
    ax.set_title(textwrap.fill(spec.title, 70), fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _plot_by_row(plan: Plan, cells: List[Cell], path: Path, plt) -> Path:
    """One group of bars per row, one bar per plotted column, error bars over seeds; each seed's value as a dot."""
    spec = plan.spec
    names = spec.plot.columns or [spec.plot.column]
    by_key = {(c.row.name, c.column.name): c for c in cells}
    columns = {c.name: c for c in spec.columns}
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.75 * len(spec.rows) * len(names) ** 0.5), 4.2))
    for i, name in enumerate(names):
        named = False
        for j, row in enumerate(spec.rows):
            cell = by_key.get((row.name, name))
            if cell is None or cell.mean is None:
                continue
            x = j - 0.4 + width * (i + 0.5)
            ax.bar(x, cell.mean, width, yerr=cell.std or 0, color=f"C{i}", capsize=2,
                   label=None if named else columns[name].label or name)  # the column's first bar names it
            named = True
            ax.plot([x] * len(cell.values), list(cell.values.values()), "k.", markersize=3)
    shown = [c.mean for c in cells if c.column.name in names and c.mean is not None]
    if shown:
        ax.set_ylim(bottom=max(0.0, min(shown) - 5.0), top=max(shown) + 3.0)
    ax.set_xticks(range(len(spec.rows)), [row.name for row in spec.rows], rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("top-1 (%)")
    ax.set_title(textwrap.fill(spec.title, 80), fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
