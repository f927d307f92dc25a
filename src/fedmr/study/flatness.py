"""The results page's section "Flatness (the paper's argument)", from the ``fedmr landscape`` files in the
cells' folders (docs/landscape.md); without any, the section is not there and the page is unchanged.

What it reads (each cell's landscape files, in its own folder or in a rerun of it under the folders
``[study] landscape`` names, so that a study's finished cells can be rerun elsewhere, keeping their
models, and measured there) is :mod:`measured`.

The reading in words follows rules stated on the page: a model is *flatter* than another when both its
top eigenvalue and its trace are lower (the trace by more than two combined standard errors; with no
trace, the eigenvalue alone), *sharper* when both are higher, otherwise the two measures disagree.
Over two or more seeds, a line per FedMR variant: in how many seeds it is flatter, and each measure's ratio to
the baseline's as the geometric mean of the per-seed ratios, with (from three seeds) its 95% Student-t interval
on the log ratios; flatter is *established* only where every interval lies below 1.
Whether flatness goes with accuracy is Spearman's rank correlation of the top eigenvalue with the test
accuracy across the models measured in one setting (its methods and seeds; heterogeneity level, and model
where the cells differ in it; three or more methods), with its two-sided p-value (exact over every ordering
for up to seven models): a relation is *established* only where p < 0.05, which four models can never reach
(p >= 1/12).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .measured import BASIN, Measured, collect, pair_means
from .sheet import Sheet, link

EXACT = 7  # up to this many models, the rank correlation's p-value is exact over every ordering


def _rank_p(x: Sequence[float], y: Sequence[float]) -> tuple[float, str]:
    """The two-sided p-value of Spearman's rank correlation of ``x`` with ``y`` and how it was found: exact
    over all n! orderings for a few models (with 3 of them, +-1 arises by chance one time in three), else
    scipy's t approximation."""
    from scipy import stats

    n = len(x)
    if n > EXACT:
        return float(stats.spearmanr(x, y).pvalue), "t approximation"
    result = stats.permutation_test((list(y),), lambda v: stats.spearmanr(x, v).statistic,
                                    permutation_type="pairings", n_resamples=math.inf, alternative="two-sided")
    return float(result.pvalue), f"exact over the {math.factorial(n)} orderings"


def _g(x: float | None, digits: int = 4) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}g}"


def compare(a: Measured, b: Measured) -> str:
    """How ``a``'s flatness reads against ``b``'s, by the rules in the module's docstring."""
    ea, eb = a.eigen, b.eigen
    if ea is None or eb is None:
        return "not measured"
    eigen = -1 if ea < eb else 1 if ea > eb else 0
    ta, tb = a.trace, b.trace
    if ta is None or tb is None:
        trace = eigen
    else:
        margin = 2 * math.sqrt(ta[1] ** 2 + tb[1] ** 2) if not (math.isnan(ta[1]) or math.isnan(tb[1])) else 0.0
        trace = -1 if ta[0] < tb[0] - margin else 1 if ta[0] > tb[0] + margin else 0
    if eigen < 0 and trace < 0:
        return "flatter"
    if eigen > 0 and trace > 0:
        return "sharper"
    return "mixed"


def _log_interval(logs: Sequence[float]) -> tuple[float, float] | None:
    """The 95% Student-t interval of the mean log ratio, as ratios (None below three seeds)."""
    from .contrasts import t_interval

    ci = t_interval(logs)
    return None if ci is None else (math.exp(ci[0]), math.exp(ci[1]))


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f} times" if b else "against 0"


class Flatness:
    """Renders the section onto ``page`` (a ``report.Page``)."""

    def __init__(self, page: Sheet):
        self.page = page
        self.baseline = str(page.o["baseline"])
        self.measured = collect(page.entries, [Path(p) for p in page.o.get("landscape", [])])

    def render(self) -> None:
        if not self.measured:
            return
        p = self.page
        p.add("## Flatness (the paper's argument)", "",
              "The paper explains FedMR's gain by geometry: recombined models land in flat regions of the loss "
              "surface, FedAvg's average in sharp ones. Measured with `fedmr landscape` (see "
              "[docs/landscape.md](" + _docs_link(p) + ")) on each model's training loss over a fixed, seeded "
              "subset of the run's training data, the model in evaluation mode (BatchNorm with its running "
              "statistics): the top eigenvalue of the Hessian (power iteration) and its trace (Hutchinson, ± "
              "standard error), the lower the flatter. Rules of the reading: a model is *flatter* than another when "
              "both its top eigenvalue and its trace are lower (the trace by more than two combined standard errors), "
              "*sharper* when both are higher, otherwise the measures disagree. Over several seeds, each measure's "
              "ratio to the baseline's is summed up by the geometric mean of the per-seed ratios, with its 95% Student-t "
              "interval on their logarithms from three seeds on: flatter is *established* only where every interval "
              "lies below 1. Whether flatness goes with "
              "accuracy: Spearman's rank correlation of the top eigenvalue with the test accuracy across the models "
              "measured in one setting (its methods and seeds), with its two-sided p-value (exact over every ordering "
              "of up to seven models); a relation is *established* only where p < 0.05, which four models can never "
              "reach (p >= 1/12).", "")
        self.table()
        self.reruns()
        self.reading()
        self.curves()
        self.paths()
        self.over_rounds()

    def table(self) -> None:
        rows = []
        for m in sorted((m for m in self.measured if m.final), key=lambda m: (m.setting, m.method, m.entry.seed)):
            f = m.final
            trace = (_g(m.trace[0]) + ("" if math.isnan(m.trace[1]) else f" ± {_g(m.trace[1], 2)}")) if m.trace else ""
            train = f.get("train", {})
            samples = f.get("data", {}).get("samples")
            eigen = _g(m.eigen) + ("" if f.get("eigen", {}).get("converged", True) else " (not converged)")
            rows.append([m.method, m.setting, str(m.entry.seed), eigen, trace,
                         f"{train['loss']:.4f}" if "loss" in train else "",
                         f"{100 * m.accuracy:.2f}" if m.accuracy is not None else "", str(samples or "")])
        if rows:
            self.page.add(*_table(["method", self.column, "seed", "top eigenvalue", "trace ± SE", "training loss",
                                   "test accuracy (%)", "samples"], rows))

    def reruns(self) -> None:
        """Where a cell's models were measured on a rerun of it ([study] landscape), the rerun's accuracy beside
        the cell's: the same config gives the same curve only up to float drift (another CPU, other threads)."""
        from ..results import read_metrics
        from .execute import late_mean

        rows = []
        fraction = float(self.page.o["late_fraction"])
        for m in sorted(self.measured, key=lambda m: (m.setting, m.method, m.entry.seed)):
            if m.entry.stats is None or m.folder.resolve() == m.entry.status.folder.resolve():
                continue
            rerun = late_mean(read_metrics(m.folder / "metrics.csv"), m.entry.rounds, fraction)
            if rerun is None:
                continue
            cell = m.entry.stats.late
            rows.append([m.method, m.setting, str(m.entry.seed), f"{100 * cell:.2f}", f"{100 * rerun:.2f}",
                         f"{100 * (rerun - cell):+.2f}", f"[{m.folder.name}]({link(m.folder, self.page.page_dir)})"])
        if rows:
            self.page.add(f"Measured on reruns of the cells, which kept their models: accuracy over rounds "
                          f"{self.page.window} of the cell and of its rerun, in percent (the same config; the curves "
                          "differ by float drift, another CPU or other threads, which training amplifies):", "")
            self.page.add(*_table([
                "method", self.column, "seed", "the cell", "its rerun", "difference", "rerun folder"], rows))

    @property
    def column(self) -> str:
        """The tables' name for a measured model's setting: its heterogeneity, unless the cells differ in more."""
        return "heterogeneity" if all(m.setting == m.entry.het for m in self.measured) else "setting"

    def _by_setting(self) -> dict[str, list[Measured]]:
        out: dict[str, list[Measured]] = {}
        for m in self.measured:
            if m.final:
                out.setdefault(m.setting, []).append(m)
        return out

    def reading(self) -> None:
        lines = self.reading_lines()
        if lines:
            self.page.add("**Reading.**", "", *lines, "")

    def reading_lines(self) -> list[str]:
        """The reading in words, one bullet per measured pair and per setting's relation to accuracy (the claims
        page quotes them)."""
        lines: list[str] = []
        for het, group in self._by_setting().items():
            for seed in sorted({m.entry.seed for m in group}):
                here = {m.method: m for m in group if m.entry.seed == seed}
                base = here.get(self.baseline)
                if base is None or base.eigen is None:
                    continue
                for method, m in here.items():
                    if method == self.baseline or not method.startswith("fedmr") or m.eigen is None:
                        continue
                    lines.append(f"- {het}, seed {seed}: " + self._pair(method, m, base))
            lines += self._over_seeds(het, group)
            lines += self._accuracy_relation(het, group)
        return lines

    def _pair(self, method: str, m: Measured, base: Measured) -> str:
        verdict = compare(m, base)
        assert m.eigen is not None and base.eigen is not None
        numbers = f"top eigenvalue {_g(m.eigen)} against {_g(base.eigen)} ({_ratio(m.eigen, base.eigen)} {self.baseline}'s)"
        if m.trace and base.trace:
            numbers += f", trace {_g(m.trace[0])} ± {_g(m.trace[1], 2)} against {_g(base.trace[0])} ± {_g(base.trace[1], 2)}"
        if verdict == "flatter":
            return f"{method}'s global model is **flatter** than {self.baseline}'s: {numbers}."
        if verdict == "sharper":
            return f"{method}'s global model is **not flatter** than {self.baseline}'s, it is sharper: {numbers}."
        return f"{method}'s global model is **not clearly flatter** than {self.baseline}'s (the measures disagree): {numbers}."

    def _over_seeds(self, het: str, group: Sequence[Measured]) -> list[str]:
        """One line per FedMR variant measured in two or more seeds beside the baseline: in how many it is
        flatter, and each measure's ratio to the baseline's over the seeds (geometric mean; from three seeds its
        95% Student-t interval on the log ratios, which decides, as the accuracy differences are decided)."""
        by = {(m.method, m.entry.seed): m for m in group if m.eigen is not None}
        base = {seed: m for (method, seed), m in by.items() if method == self.baseline}
        lines = []
        for method in sorted({k[0] for k in by if k[0] != self.baseline and k[0].startswith("fedmr")}):
            pairs = [(by[(method, s)], base[s]) for s in sorted(base) if (method, s) in by]
            if len(pairs) < 2:
                continue
            verdicts = [compare(a, b) for a, b in pairs]
            counts = ", ".join(f"{what} in {verdicts.count(what)}" for what in ("sharper", "mixed") if what in verdicts)
            measures = {"top eigenvalue": [(a.eigen or math.nan, b.eigen or math.nan) for a, b in pairs],
                        "trace": [(a.trace[0] if a.trace else math.nan, b.trace[0] if b.trace else math.nan)
                                  for a, b in pairs]}
            parts, sides = [], []
            for name, values in measures.items():
                if not all(x > 0 and y > 0 for x, y in values):
                    continue  # missing, or a ratio of signs, which says nothing: the measure is left out
                logs = [math.log(x / y) for x, y in values]
                ci = _log_interval(logs)
                text = f"{name} {math.exp(sum(logs) / len(logs)):.2f} times {self.baseline}'s"
                if ci is not None:
                    text += f" (95% interval {ci[0]:.2f} to {ci[1]:.2f})"
                    sides.append(-1 if ci[1] < 1 else 1 if ci[0] > 1 else 0)
                parts.append(text)
            if not parts:
                continue
            n = len(pairs)
            if n < 3:
                reading = f"{n} seeds, too few for an interval"
            elif all(side < 0 for side in sides):
                reading = "**flatter**, established: every interval lies below 1"
            elif all(side > 0 for side in sides):
                reading = "**sharper**, established: every interval lies above 1"
            else:
                reading = "**not established**: an interval includes 1, or the measures disagree"
            lines.append(f"- {het}, over {n} seeds: {method}'s global model is flatter than {self.baseline}'s in "
                         f"{verdicts.count('flatter')} of {n}" + (f" ({counts})" if counts else "") + "; geometric mean "
                         f"of the per-seed ratios: {', '.join(parts)}: {reading}.")
        return lines

    def _accuracy_relation(self, het: str, group: Sequence[Measured]) -> list[str]:
        pairs = [(m.eigen, m.accuracy) for m in group if m.eigen is not None and m.accuracy is not None]
        if len({m.method for m in group}) < 3 or len(pairs) < 3:
            return [f"- {het}: too few methods measured ({len(pairs)}) to say whether flatness goes with accuracy."]
        from scipy import stats

        eigen, accuracy = [p[0] for p in pairs], [p[1] for p in pairs]
        rho = float(stats.spearmanr(eigen, accuracy).statistic)
        if math.isnan(rho):
            return [f"- {het}: the {len(pairs)} measured models tie in eigenvalue or accuracy; no relation to read."]
        p, how = _rank_p(eigen, accuracy)
        if rho <= -0.5:
            what = "the flatter models are the more accurate ones"
        elif rho >= 0.5:
            what = "the sharper models are the more accurate ones: flatness does not explain accuracy here"
        else:
            what = "no clear relation between flatness and accuracy"
        if abs(rho) >= 0.5:
            what += ", established (p < 0.05)" if p < 0.05 else f", **not established** with {len(pairs)} models"
        return [f"- {het}: across {len(pairs)} measured models, Spearman's rank correlation of the top eigenvalue "
                f"with test accuracy is {rho:+.2f} (two-sided p = {p:.2g}, {how}): {what}."]

    def curves(self) -> None:
        for het, group in self._by_setting().items():
            curves = {f"{m.method} (seed {m.entry.seed})": m.final["curve_1d"] for m in
                      sorted(group, key=lambda m: (m.method != self.baseline, m.method, m.entry.seed))
                      if "curve_1d" in m.final}
            if curves:
                self._figure("1d", het, f"1-D loss curves along filter-normalised random directions, {het}",
                             lambda path, c=curves, h=het: _draw("curves", c, path, f"training loss, {h}"))

    def paths(self) -> None:
        by_folder = {m.folder.name: m for m in self.measured}
        rows: list[list[str]] = []
        drawn: dict[str, dict[str, Any]] = {}
        for m in self.measured:
            for other, doc in m.paths:
                end = by_folder.get(other)
                label = f"{m.method} -> {end.method if end else other}"
                path = doc["path"]
                chord = f"{path['barrier_linear']:.4f}" if "barrier_linear" in path else ""
                rows.append([m.setting, str(m.entry.seed), label, f"{path['loss'][0]:.4f}", f"{path['loss'][-1]:.4f}",
                             f"{max(path['loss']):.4f} (t = {path['barrier_at']:g})", f"{path['barrier']:.4f}", chord])
                drawn.setdefault(m.setting, {})[f"{label} (seed {m.entry.seed})"] = path
        if not rows:
            return
        self.page.add("Straight line between two final models (training loss on the subset; the barrier is the "
                      "highest loss on the line minus the mean of the two ends' losses; above the chord: the highest "
                      "loss minus the straight line between the ends' losses, 0 when the loss never rises above it):", "")
        self.page.add(*_table([self.column, "seed", "from -> to", "loss at t = 0", "loss at t = 1", "highest",
                               "barrier", "above the chord"], sorted(rows)))
        for het, paths in drawn.items():
            self._figure("path", het, f"Straight line between final models, {het}",
                         lambda out, p=paths, h=het: _draw("paths", p, out, f"straight line, {h}"))

    def over_rounds(self) -> None:
        series = {f"{m.method} ({m.setting}, seed {m.entry.seed})": sorted(m.eigen_rounds)
                  for m in self.measured if m.eigen_rounds}
        barriers = {f"{m.method} ({m.setting}, seed {m.entry.seed})": sorted(m.pool_barriers)
                    for m in self.measured if m.pool_barriers}
        if not series and not barriers:
            return
        switch = sorted({int(m.entry.status.cell.cfg.section("fedmr")["first_stage_rounds"]) for m in self.measured
                         if m.entry.status.cell.cfg.algorithm == "fedmr" and m.eigen_rounds} - {0})
        mark = float(switch[0]) if switch else None
        lines = []
        if series:
            self._figure("rounds", "", "Top Hessian eigenvalue of the global model over the rounds",
                         lambda out: _draw("rounds", series, out, "top eigenvalue over the rounds",
                                           "top Hessian eigenvalue", mark, "two-stage switch" if mark else ""))
            lines += self._diverge(series)
        if barriers:
            means = {k: pair_means(v) for k, v in barriers.items()}
            points = {f"{k}: {what}": [(v[0], v[i]) for v in values] for k, values in means.items()
                      for i, what in ((1, "above the ends' mean"), (2, "above the chord"))}
            self._figure("pool-barrier", "", "Barrier between two members of FedMR's pool over the rounds",
                         lambda out: _draw("rounds", points, out, "barrier between two pool members",
                                           "barrier (training loss)", mark, "two-stage switch" if mark else ""))
            lines += [_pool_reading(label, values) for label, values in barriers.items()]
        if lines:
            self.page.add(*lines, "")

    def _diverge(self, series: dict[str, list[tuple[int, float]]]) -> list[str]:
        base = [k for k in series if k.startswith(f"{self.baseline} (")]
        lines = []
        for b in base:
            context = b[len(self.baseline):]
            for label, values in series.items():
                if label == b or not label.endswith(context) or not label.startswith("fedmr"):
                    continue
                theirs = dict(series[b])
                common = [(r, v, theirs[r]) for r, v in values if r in theirs]
                if not common:
                    continue
                below = next((r for i, (r, _, _) in enumerate(common) if all(v < w for _, v, w in common[i:])), None)
                method = label[:-len(context)]
                last = f"at round {common[-1][0]}: {_g(common[-1][1])} against {_g(common[-1][2])}"
                if below is None:
                    lines.append(f"- {method}{context}: its top eigenvalue does not stay below {self.baseline}'s over "
                                 f"rounds {common[0][0]}-{common[-1][0]} ({last}).")
                else:
                    lines.append(f"- {method}{context}: its top eigenvalue is below {self.baseline}'s from round {below} "
                                 f"on ({last}).")
        return lines

    def _figure(self, kind: str, het: str, alt: str, draw: Any) -> None:
        p = self.page
        name = f"flatness-{kind}" + ("-" + re.sub(r"[,=]+", "-", het.replace(" ", "")) if het else "")
        path = p.plots / f"{name}.png"
        if p.draw:
            draw(path)
            p.drawn.add(path)
        p.add(f"![{alt}]({link(path, p.page_dir)})", "")


def _pool_reading(label: str, values: Sequence[tuple[int, float, float, float]]) -> str:
    """The reading of the barrier between pool members over the rounds: (round, barrier, above the chord,
    the ends' mean loss) per measured pair; one basin from the first round after which every measured line
    stays within ``BASIN`` of its chord."""
    rounds = sorted({r for r, *_ in values})
    basin = next((r for r in rounds if all(c <= BASIN * e for q, _, c, e in values if q >= r)), None)
    pairs = max(sum(1 for q, *_ in values if q == r) for r in rounds)
    means = pair_means(values)
    first, last = means[0], means[-1]
    if len(means) > 1:
        how, since = f"goes from {first[1]:.4f} (round {first[0]}) to {last[1]:.4f} (round {last[0]})", "from round {} on"
    else:
        how, since = f"is {first[1]:.4f} at round {first[0]}, the one round measured", "at round {}"
    line = "every measured line" if pairs > 1 else "the line"
    if basin is not None:
        where = (f"the loss on {line} stays within {100 * BASIN:g}% of the chord between the ends (one basin) "
                 + since.format(basin))
    elif pairs == 1:
        where = (f"the loss on the line rises more than {100 * BASIN:g}% above the chord up to the last measured "
                 "round: the members are in separate basins")
    else:
        where = (f"the loss on some line rises more than {100 * BASIN:g}% above the chord up to the last measured "
                 "round: not all members are in one basin")
    which = f"; the mean over {pairs} pairs of members" if pairs > 1 else ""
    return f"- {label}: the barrier between two pool members (highest loss above the ends' mean{which}) {how}; {where}."


def _draw(kind: str, *args: Any) -> None:
    from ..landscape import plots

    draw: Any = {"curves": plots.draw_curves_1d, "paths": plots.draw_paths, "rounds": plots.draw_over_rounds}[kind]
    draw(*args)


def _docs_link(page: Sheet) -> str:
    """docs/landscape.md relative to the page (the repository's docs/, above the study's output)."""
    here = page.page_dir.resolve()
    for place in [here, *here.parents]:
        if (place / "docs" / "landscape.md").is_file():
            return link(place / "docs" / "landscape.md", page.page_dir)
    return "docs/landscape.md"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    marks = ["---"] * 3 + ["---:"] * (len(header) - 3)
    return ["| " + " | ".join(header) + " |", "|" + "|".join(marks) + "|", *("| " + " | ".join(r) + " |" for r in rows), ""]
