"""Table specs: configs/tables/<name>.yaml, read into typed dataclasses and checked before anything runs.

A spec names a base pretraining recipe and the evaluations run on each pretrained encoder, then lists rows: each
row is a set of ``key=value`` overrides (exactly what the command line takes) plus the published values it is
compared with, per column. A column is one metric of one evaluation (``test/top1`` of the linear probe, say) or of
the pretraining run itself (``evaluation: pretrain`` reads summary.json).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Optional

import yaml
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from configs.load import config_keys
from configs.schema import PretrainConfig
from core.errors import UserError

REPO = Path(__file__).resolve().parents[1]
TABLES_DIR = REPO / "configs" / "tables"
PRETRAIN = "pretrain"  # the evaluation name that means "the pretraining run's own summary.json"


@dataclass
class Source:
    paper: str = ""
    where: str = ""  # the table, figure or section
    url: str = ""


@dataclass
class Stage:
    """A recipe file (None = the schema defaults) plus overrides, in the command line's key=value form."""

    recipe: Optional[str] = None
    overrides: List[str] = field(default_factory=list)


@dataclass
class Column:
    name: str = MISSING
    evaluation: str = MISSING  # a key of `evaluations`, or "pretrain"
    metric: str = MISSING  # a key of that run's results.json (evaluations) or summary.json (pretrain)
    label: str = ""


@dataclass
class Published:
    value: Optional[float] = None
    figure_only: bool = False  # shown only in a figure of the source: no number is transcribed
    protocol: str = ""  # how the published number was measured
    source: str = ""  # who published it, where that is not the table's source
    note: str = ""


@dataclass
class Row:
    name: str = MISSING
    recipe: Optional[str] = None  # this row's pretraining recipe file (None = the table's pretrain.recipe)
    pretrain: List[str] = field(default_factory=list)  # overrides of the pretraining run
    from_scratch: bool = False  # no pretraining: evaluations start from random weights of the same encoder
    # eval.mode=distill rows: the row (listed earlier) whose run of the same evaluation and seed is the teacher
    teacher: Optional[str] = None
    evaluations: Dict[str, List[str]] = field(default_factory=dict)  # extra overrides per evaluation
    columns: Optional[List[str]] = None  # None = all of the table's columns
    published: Dict[str, Published] = field(default_factory=dict)  # by column name
    note: str = ""


@dataclass
class Plot:
    """A PNG of one column across rows: x and series are config keys of the rows' pretraining runs. ``x: row``
    instead draws one group of bars per row, one bar per column of ``columns`` (default: ``column`` alone)."""

    column: str = MISSING
    x: str = MISSING
    series: Optional[str] = None
    columns: List[str] = field(default_factory=list)


ROW_AXIS = "row"  # Plot.x: one group of bars per row


@dataclass
class Claim:
    """An ordering the source states: the mean of ``better`` (a row) on ``column`` exceeds that of ``worse`` on
    ``worse_column`` (default: the same column; another column of the same row compares two representations of one
    run). tables.claims gives it a verdict from the seeds."""

    better: str = MISSING
    worse: str = MISSING
    column: str = MISSING
    worse_column: Optional[str] = None
    statement: str = ""  # what the source says, paraphrased
    where: str = ""  # its section, figure or table

    @property
    def other_column(self) -> str:
        return self.worse_column or self.column


@dataclass
class TableSpec:
    name: str = MISSING
    title: str = MISSING
    source: Source = field(default_factory=Source)
    pretrain: Stage = field(default_factory=Stage)
    evaluations: Dict[str, Stage] = field(default_factory=dict)
    shared: List[str] = field(default_factory=list)  # overrides of every run, pretraining and evaluation
    columns: List[Column] = field(default_factory=list)
    rows: List[Row] = field(default_factory=list)
    seeds: List[int] = field(default_factory=lambda: [0])
    plot: Optional[Plot] = None
    claims: List[Claim] = field(default_factory=list)
    notes: str = ""

    def row_columns(self, row: Row) -> List[Column]:
        """The columns a row is measured in."""
        return [c for c in self.columns if row.columns is None or c.name in row.columns]

    def row_evaluations(self, row: Row) -> List[str]:
        """The evaluation runs a row needs (per seed), in the order of the table's evaluations."""
        wanted = {c.evaluation for c in self.row_columns(row)}
        return [name for name in self.evaluations if name in wanted]


def available_tables() -> List[str]:
    return sorted(p.stem for p in TABLES_DIR.glob("*.yaml"))


def load_table(name_or_path: str) -> TableSpec:
    """A table by name (configs/tables/<name>.yaml) or by path to a spec file, validated."""
    path = Path(name_or_path)
    if not (path.suffix in (".yaml", ".yml") and path.is_file()):
        path = TABLES_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise UserError(f"no table {name_or_path!r}; available: {', '.join(available_tables())} "
                        "(or the path of a spec file)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        if not isinstance(raw, (dict, type(None))):
            raise UserError(f"table spec {str(path)!r} must be a mapping of keys (name, title, rows, ...), not a "
                            f"{type(raw).__name__}")
        spec = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TableSpec), raw or {}))
    except UnicodeDecodeError as err:
        raise UserError(f"table spec {str(path)!r} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    except yaml.YAMLError as err:
        raise UserError(f"table spec {str(path)!r} is not valid YAML: {str(err).splitlines()[0]}") from None
    except OmegaConfBaseException as err:
        where = f" at {err.full_key!r}" if getattr(err, "full_key", None) else ""
        raise UserError(f"table spec {str(path)!r}{where}: {str(err).splitlines()[0]}") from None
    check_table(spec, path)
    return spec


def check_table(spec: TableSpec, path: Path) -> None:
    """Cross-references a typed load cannot see: columns, evaluations, recipes, names, published values."""
    where = f"table spec {str(path)!r}"
    recipes = [spec.pretrain.recipe] + [stage.recipe for stage in spec.evaluations.values()]
    recipes += [row.recipe for row in spec.rows]
    for recipe in filter(None, recipes):
        if not (REPO / recipe).is_file():
            raise UserError(f"{where}: recipe {recipe!r} does not exist")
    columns = {c.name for c in spec.columns}
    for column in spec.columns:
        if column.evaluation != PRETRAIN and column.evaluation not in spec.evaluations:
            raise UserError(f"{where}: column {column.name!r} reads evaluation {column.evaluation!r}, which is not "
                            f"one of pretrain, {', '.join(spec.evaluations)}")
    if not re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9._-]*", spec.name):  # it names directories under --runs-dir
        raise UserError(f"{where}: name {spec.name!r} may hold only letters, digits, '.', '_' and '-'")
    names = [row.name for row in spec.rows]
    if not names or len(set(names)) != len(names):
        raise UserError(f"{where}: rows must be present and have unique names")
    for row in spec.rows:
        if not re.fullmatch(r"[A-Za-z0-9._-]+", row.name):  # it becomes part of run directory names
            raise UserError(f"{where}: row name {row.name!r} may hold only letters, digits, '.', '_' and '-'")
        if any(p.figure_only and p.value is not None for p in row.published.values()):
            raise UserError(f"{where}: row {row.name!r} gives a value for a figure-only published number")
        unknown = (set(row.columns or []) | set(row.published)) - columns
        if unknown:
            raise UserError(f"{where}: row {row.name!r} names unknown columns {sorted(unknown)}")
        if row.from_scratch and any(c.evaluation == PRETRAIN for c in spec.row_columns(row)):
            raise UserError(f"{where}: row {row.name!r} is from_scratch but reads a column of the pretraining run")
        if row.teacher is not None:
            check_teacher_row(spec, row, where)
        extra = set(row.evaluations) - set(spec.evaluations)
        if extra:
            raise UserError(f"{where}: row {row.name!r} overrides unknown evaluations {sorted(extra)}")
    if spec.plot is not None:
        check_plot(spec.plot, columns, where)
    for i, claim in enumerate(spec.claims):
        check_claim(spec, claim, f"{where}: claims[{i}]")
    if not spec.seeds:
        raise UserError(f"{where}: seeds must list at least one seed")


def check_teacher_row(spec: TableSpec, row: Row, where: str) -> None:
    """A distillation row's teacher is an earlier row measured in every evaluation this row runs (each of its runs
    learns from the teacher row's run of the same evaluation and seed)."""
    earlier = [r.name for r in spec.rows[:spec.rows.index(row)]]
    if row.teacher not in earlier:
        raise UserError(f"{where}: row {row.name!r} names teacher {row.teacher!r}, which is not a row listed before "
                        f"it ({', '.join(earlier) or 'none is'})")
    teacher = next(r for r in spec.rows if r.name == row.teacher)
    lacking = sorted(set(spec.row_evaluations(row)) - set(spec.row_evaluations(teacher)))
    if lacking:
        raise UserError(f"{where}: row {row.name!r} distils from {row.teacher!r}, which runs no {', '.join(lacking)}")


def check_plot(plot: Plot, columns: set, where: str) -> None:
    """A plot names existing columns and, unless drawn by row, pretraining config keys as its axes."""
    unknown = sorted(({plot.column} | set(plot.columns)) - columns)
    if unknown:
        raise UserError(f"{where}: plot names unknown columns {unknown}")
    if plot.x == ROW_AXIS:
        if plot.series is not None:
            raise UserError(f"{where}: plot.x=row draws the columns as series; plot.series does not apply")
        return
    keys = config_keys(PretrainConfig)
    for axis, key in (("x", plot.x), ("series", plot.series)):
        if key is not None and key not in keys:  # checked before anything runs or is written
            raise UserError(f"{where}: plot.{axis} {key!r} is not a pretraining config key (or x: row)")


def check_claim(spec: TableSpec, claim: Claim, where: str) -> None:
    """Both sides of a claim name a row and a column it is measured in, and are not the same cell."""
    rows = {row.name: row for row in spec.rows}
    for row_name, column in ((claim.better, claim.column), (claim.worse, claim.other_column)):
        if row_name not in rows:
            raise UserError(f"{where} names row {row_name!r}, which is not one of {', '.join(rows)}")
        if column not in {c.name for c in spec.row_columns(rows[row_name])}:
            raise UserError(f"{where}: row {row_name!r} is not measured in column {column!r}")
    if (claim.better, claim.column) == (claim.worse, claim.other_column):
        raise UserError(f"{where} compares the cell {claim.better}/{claim.column} with itself")


def select_rows(spec: TableSpec, names: Optional[List[str]]) -> TableSpec:
    """The table restricted to rows ``names`` (in the spec's order) and the claims among them; all rows for None."""
    if not names:
        return spec
    known = [row.name for row in spec.rows]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise UserError(f"--rows: table {spec.name!r} has no row {', '.join(map(repr, unknown))}; its rows: "
                        f"{', '.join(known)}")
    rows = [row for row in spec.rows if row.name in names]
    claims = [c for c in spec.claims if {c.better, c.worse} <= set(names)]
    return replace(spec, rows=rows, claims=claims)
