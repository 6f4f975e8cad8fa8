"""Verdicts on a table's claims: is the ordering the source states (row A beats row B on a column) seen in our seeds?

The rule, one-sided Welch t-tests at ALPHA (``scipy.stats.ttest_ind(equal_var=False)``) on the per-seed values of the
two cells:

- **holds**: the claimed side is larger, p < ALPHA for "better > worse";
- **does not hold**: the reverse ordering is significant, p < ALPHA for "worse > better";
- **undecided**: neither (the seeds cannot tell the two apart), or fewer than two finished seeds on a side.

Seeds that have no value are named beside the verdict; the test runs on the seeds that have one. Two cells whose
seeds agree exactly (no spread on either side) are ordered by their means.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from tables.render import Cell
from tables.spec import Claim

ALPHA = 0.05
HOLDS, DOES_NOT_HOLD, UNDECIDED = "holds", "does not hold", "undecided"


@dataclass
class Verdict:
    claim: Claim
    verdict: str  # HOLDS | DOES_NOT_HOLD | UNDECIDED
    better: List[float] = field(default_factory=list)  # the finished seeds' values of each side
    worse: List[float] = field(default_factory=list)
    p_value: Optional[float] = None  # one-sided, for "better > worse"
    missing: List[str] = field(default_factory=list)  # "crop_only/linear seed 2: not run"

    @property
    def difference(self) -> Optional[float]:
        """Mean of the better side minus mean of the worse side (None without values on both)."""
        if not self.better or not self.worse:
            return None
        return statistics.fmean(self.better) - statistics.fmean(self.worse)


def one_sided_p(better: Sequence[float], worse: Sequence[float]) -> float:
    """p-value of Welch's t-test for mean(better) > mean(worse); NaN where it is undefined (equal means, no spread)."""
    if statistics.pvariance(better) == 0 and statistics.pvariance(worse) == 0:
        gap = statistics.fmean(better) - statistics.fmean(worse)
        return 0.0 if gap > 0 else 1.0 if gap < 0 else math.nan
    from scipy.stats import ttest_ind  # imported here: only rendering claims needs scipy

    return float(ttest_ind(better, worse, equal_var=False, alternative="greater").pvalue)


def judge(better: Sequence[float], worse: Sequence[float], alpha: float = ALPHA) -> Tuple[str, Optional[float]]:
    """(verdict, one-sided p) for the claim mean(better) > mean(worse) from per-seed values."""
    if len(better) < 2 or len(worse) < 2:
        return UNDECIDED, None
    p = one_sided_p(better, worse)
    if math.isnan(p):
        return UNDECIDED, None
    return (HOLDS if p < alpha else DOES_NOT_HOLD if 1 - p < alpha else UNDECIDED), p


def check_claims(claims: Sequence[Claim], cells: Sequence[Cell]) -> List[Verdict]:
    """A verdict for every claim, from the rendered cells (row and column names as in the spec)."""
    by_key: Dict[Tuple[str, str], Cell] = {(c.row.name, c.column.name): c for c in cells}
    verdicts = []
    for claim in claims:
        sides = [by_key[(claim.better, claim.column)], by_key[(claim.worse, claim.other_column)]]
        missing = [f"{c.row.name}/{c.column.name} seed {seed}: {why}" for c in sides for seed, why in c.missing.items()]
        better, worse = (list(c.values.values()) for c in sides)
        verdict, p = judge(better, worse)
        verdicts.append(Verdict(claim, verdict, better, worse, p, missing))
    return verdicts


def claim_text(claim: Claim) -> str:
    """'default > crop_only on linear', or 'default/linear > default/linear_gh' across columns."""
    if claim.other_column == claim.column:
        return f"{claim.better} > {claim.worse} on {claim.column}"
    return f"{claim.better}/{claim.column} > {claim.worse}/{claim.other_column}"


def verdicts_markdown(verdicts: Sequence[Verdict]) -> str:
    """The claims as a Markdown table under the results: ordering, source, the measured difference, p, verdict."""
    if not verdicts:
        return ""
    lines = ["", f"#### Claims (one-sided Welch t-test over seeds, p < {ALPHA:g}: holds; reverse p < {ALPHA:g}: does "
             "not hold; else undecided)", "",
             "| claim | source says | where | difference (points) | p | verdict |",
             "| --- | --- | --- | ---: | ---: | --- |"]
    for v in verdicts:
        difference = f"{v.difference:+.2f}" if v.difference is not None else ""
        p = f"{v.p_value:.3g}" if v.p_value is not None else ""
        verdict = f"**{v.verdict}**" + (f" (missing: {'; '.join(v.missing)})" if v.missing else "")
        lines.append(f"| {claim_text(v.claim)} | {v.claim.statement} | {v.claim.where} | {difference} | {p} | "
                     f"{verdict} |")
    return "\n".join(lines) + "\n"
