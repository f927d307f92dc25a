"""The study page's comparisons, read by the rules the page states: each contrasted method against the
baseline ("Differences from ...") and against the strongest other method, paired by seed; the
"Verdict" section (verdicts.py) gathers their readings.

A difference is in points of accuracy (the late mean); with three or more seeds the reading rests on
the 95% Student-t interval of the per-seed differences, with fewer on their signs (``verdict``)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from .cells import Entry
from .sheet import Sheet
from .text import mean_std, points, table


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float] | None:
    """Student-t interval of the mean (None below three values, where it says little)."""
    if len(values) < 3:
        return None
    from scipy import stats

    m, sd = mean_std(values)
    half = float(stats.t.ppf(0.5 + level / 2, len(values) - 1)) * (sd or 0.0) / math.sqrt(len(values))
    return m - half, m + half

def verdict(diffs: Sequence[float], margin: float) -> str:
    """The rules the page states: interval (three or more seeds) or sign in every seed (fewer).  Level with
    an interval only when the whole interval lies within the margin: a mean near 0 with a wide interval
    says the seeds disagree, not that the methods tie."""
    n = len(diffs)
    m = sum(diffs) / n
    tie = margin / 100
    within = f"{margin:g} point{'' if margin == 1 else 's'}"
    ci = t_interval(diffs)
    if ci is not None:
        lo, hi = ci
        if lo > 0:
            return f"**ahead** by {points(m)[1:]} points; the 95% interval ({points(lo)} to {points(hi)}) excludes 0"
        if hi < 0:
            return f"**behind** by {points(m)[1:]} points; the 95% interval ({points(lo)} to {points(hi)}) excludes 0"
        if -tie < lo and hi < tie:
            return f"**level** ({points(m)} points; the 95% interval ({points(lo)} to {points(hi)}) lies within {within})"
        if abs(m) < tie:
            return (f"level on average ({points(m)} points), **not established**: the 95% interval ({points(lo)} to "
                    f"{points(hi)}) reaches past {within}")
        side = "ahead" if m > 0 else "behind"
        return (f"{side} by {points(abs(m))[1:]} points on average, **not established**: the 95% interval "
                f"({points(lo)} to {points(hi)}) includes 0")
    seeds = "the one seed" if n == 1 else "both seeds" if n == 2 else f"all {n} seeds"
    few = "one seed, no interval" if n == 1 else f"{n} seeds, too few for an interval"
    if all(d > tie for d in diffs):
        return f"ahead by {points(m)[1:]} points in {seeds} ({few})"
    if all(d < -tie for d in diffs):
        return f"behind by {points(-m)[1:]} points in {seeds} ({few})"
    if all(abs(d) <= tie for d in diffs):
        return f"level: within {within} in {seeds} ({few})"
    ahead = sum(d > 0 for d in diffs)
    return f"mixed: ahead in {ahead} of {n} seeds, mean {points(m)} points ({few})"


def paired(page: Sheet, groups: dict[tuple[str, str], list[Entry]], method: str, het: str,
           against: str | None = None) -> list[tuple[int, float]]:
    """(seed, late mean of ``method`` minus that of ``against``, the baseline by default) for each seed both
    finished at ``het``."""
    against = against or page.o["baseline"]
    base = {e.seed: e.stats.late for e in groups.get((against, het), []) if e.stats is not None}
    other = {e.seed: e.stats.late for e in groups.get((method, het), []) if e.stats is not None}
    return [(seed, other[seed] - base[seed]) for seed in sorted(set(base) & set(other))]


def contrasts(page: Sheet, groups: dict[tuple[str, str], list[Entry]], hets: Sequence[str]) -> None:
    """Each contrasted method minus the baseline per heterogeneity level, paired by seed; the readings are
    kept (``page.verdicts``) for the verdict."""
    baseline, margin = page.o["baseline"], float(page.o["tie_margin"])
    if not page.o["contrasts"]:
        return
    page.add(f"## Differences from {baseline}", "",
             f"Accuracy of the method minus {baseline}'s, in points, paired by seed (same partition and initial "
             "model). The 95% interval is Student's t over the per-seed differences, given from three seeds on.", "")
    rows = []
    for method in page.o["contrasts"]:
        for het in hets:
            pairs = paired(page, groups, method, het)
            if not pairs:
                rows.append([f"{method} - {baseline}", het, "no pair finished yet", "", "", ""])
                continue
            diffs = [d for _, d in pairs]
            ci = t_interval(diffs)
            rows.append([f"{method} - {baseline}", het, ", ".join(f"seed {s}: {points(d)}" for s, d in pairs),
                         points(sum(diffs) / len(diffs)), f"{points(ci[0])} to {points(ci[1])}" if ci else "",
                         verdict(diffs, margin)])
            page.verdicts.append((method, het, verdict(diffs, margin)))
    page.add(*table(["difference", "heterogeneity", "per seed", "mean", "95% interval", "reading"], rows))


def strongest(page: Sheet, groups: dict[tuple[str, str], list[Entry]], method: str, het: str,
              others: Sequence[str]) -> tuple[str, list[tuple[int, float]], str]:
    """The other method with the highest accuracy relative to ``method`` at ``het``, with its paired
    differences on every seed both finished (none where no other finished), and "K of N" others finished.

    The others are ranked on the seeds every finished other shares with ``method``, so that one with
    more seeds is not judged on seeds the others never ran (seeds differ in difficulty: a 3-seed mean
    against a 1-seed value would rank the seeds, not the methods); where those seeds share none, each
    is ranked on all its own."""
    pairs = {o: p for o in others if (p := paired(page, groups, method, het, o))}
    label = f"{len(pairs)} of {len(others)}"
    if not pairs:
        return "", [], label
    common = set.intersection(*({seed for seed, _ in p} for p in pairs.values()))

    def relative(o: str) -> float:
        diffs = [d for seed, d in pairs[o] if seed in common] or [d for _, d in pairs[o]]
        return sum(diffs) / len(diffs)

    rival = min(pairs, key=relative)  # the highest accuracy relative to the method
    return rival, pairs[rival], label


def rivals(page: Sheet, groups: dict[tuple[str, str], list[Entry]], methods: Sequence[str], hets: Sequence[str]) -> None:
    """Each contrast against the strongest other method of its column: the paper claims FedMR beats
    every baseline, not only the one the table above pairs it with."""
    compared = list(page.o["contrasts"])
    others = [m for m in methods if m not in compared]
    if not compared or len(others) < 2:  # only the baseline: the differences above say it all
        return
    margin = float(page.o["tie_margin"])
    page.add("## Against the strongest other method", "",
             "Per heterogeneity level, the method other than those compared above (the baselines and FedIndep) "
             "with the highest accuracy relative to the compared one on the seeds that every finished other method "
             "shares with it (so that a method with more seeds is not ranked on seeds the others never ran); its "
             "difference is then paired by seed on every seed both finished and read by the same rules. **others "
             "finished** counts the methods that could be compared.", "")
    rows = []
    for method in compared:
        for het in hets:
            rival, pairs, label = strongest(page, groups, method, het, others)
            if not pairs:
                rows.append([method, het, "no pair finished yet", "", "", "", label])
                continue
            diffs = [d for _, d in pairs]
            reading = verdict(diffs, margin)
            rows.append([method, het, rival, ", ".join(f"seed {s}: {points(d)}" for s, d in pairs),
                         points(sum(diffs) / len(diffs)), reading, label])
            page.rival_verdicts.append((method, het, f"{rival} ({label} others finished): {reading}"))
    page.add(*table(["method", "heterogeneity", "strongest other", "per seed", "mean", "reading",
                      "others finished"], rows))

