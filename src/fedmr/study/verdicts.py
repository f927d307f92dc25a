"""The study page's "Verdict" section: the rules, then per model the readings.

The main table's readings are those ``contrasts.contrasts`` and ``contrasts.rivals`` kept.  Where the study
has long-cell sections (the ones ``sections.long_cells`` renders: ResNet-20 cells that span sittings),
the section names the main table's model and adds, per long-cell model:

* each contrasted method against the baseline, paired by seed and read by ``contrasts.verdict`` once both
  are finished (and against the strongest other finished method of that section, as ``rivals``); while
  either is partial or not started, "not yet" with each one's state and, where both cover a ``BLOCK``-round
  block to its end, the lead in the latest such block, marked interim;
* the paper's pattern (larger gains on the deeper model): that lead beside the lead on the main table's
  model at the same heterogeneity and seeds over the same rounds (the late mean once the long cells are
  finished, else the same block), larger / smaller / level by the tie margin.

A page without long-cell sections is as before: the main readings, unlabelled."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .cells import Entry
from .contrasts import strongest, verdict
from .sections import BLOCK, RENDERERS, block_means, long_cells
from .sheet import Sheet, ordered
from .text import points

Groups = dict[tuple[str, str], list[Entry]]


@dataclass
class Lead:
    """A method's lead over the baseline on the seeds of a long-cell section: over the late rounds once every
    cell of the pairs is finished (``block`` None), else over the latest block all the pairs cover."""

    seeds: list[int]
    diffs: list[float]  # per seed, method minus baseline
    rounds: str  # "241-300" (the late mean) or "101-200" (a block)
    total: int  # the cells' rounds
    block: int | None  # the block's index, None for the late mean

    @property
    def mean(self) -> float:
        return sum(self.diffs) / len(self.diffs)

    @property
    def interim(self) -> bool:
        return self.block is not None


def count(n: int) -> str:
    return "one seed" if n == 1 else f"{n} seeds"


def seeds_text(seeds: Sequence[int]) -> str:
    return f"seed{'' if len(seeds) == 1 else 's'} {', '.join(str(s) for s in seeds)}"


def by_variant(entries: Sequence[Entry]) -> Groups:
    """The entries by (algorithm variant, heterogeneity): a long section's methods carry its model and
    precision as settings, which its table (and this section) leave out."""
    out: Groups = {}
    for e in entries:
        out.setdefault((e.variant, e.het), []).append(e)
    return out


def pairs_of(groups: Groups, method: str, baseline: str, het: str) -> list[tuple[int, Entry, Entry]]:
    """(seed, the method's cell, the baseline's) for each seed both have at ``het``."""
    ours: dict[int, Entry] = {}
    theirs: dict[int, Entry] = {}
    for side, name in ((ours, method), (theirs, baseline)):
        for e in groups.get((name, het), []):
            side.setdefault(e.seed, e)  # the first where a section has the variant twice (other settings)
    return [(s, ours[s], theirs[s]) for s in sorted(set(ours) & set(theirs))]


def lead(pairs: Sequence[tuple[int, Entry, Entry]], fraction: float) -> Lead | None:
    """The late-mean lead when every cell of the pairs is finished, else the interim lead in the latest block
    that each pair with one covers (over those pairs); None when no pair covers a block."""
    if not pairs:
        return None
    total = max(max(a.rounds, b.rounds) for _, a, b in pairs)
    if all(a.stats and b.stats for _, a, b in pairs):
        start = total - round(total * fraction)
        return Lead([s for s, _, _ in pairs], [a.done_stats.late - b.done_stats.late for _, a, b in pairs],
                    f"{start + 1}-{total}", total, None)
    covered = []
    for s, a, b in pairs:
        means = list(zip(block_means(a.rows, total), block_means(b.rows, total)))
        common = [i for i, (x, y) in enumerate(means) if x is not None and y is not None]
        if common:
            covered.append((s, common[-1], means))
    if not covered:
        return None
    i = min(last for _, last, _ in covered)
    diffs = [x - y for _, _, means in covered for x, y in [means[i]] if x is not None and y is not None]
    return Lead([s for s, _, _ in covered], diffs, f"{i * BLOCK + 1}-{min((i + 1) * BLOCK, total)}", total, i)


def state(cells: Sequence[Entry]) -> str:
    if len(cells) == 1:
        return cells[0].state
    return ", ".join(f"seed {e.seed} {e.state}" for e in sorted(cells, key=lambda e: e.seed))


def long_reading(page: Sheet, groups: Groups, others: Sequence[str], method: str, het: str) -> list[str]:
    """The bullets of one contrasted method at one heterogeneity of a long-cell section."""
    baseline, margin = page.o["baseline"], float(page.o["tie_margin"])
    pairs = pairs_of(groups, method, baseline, het)
    head = f"- **{method}** against {baseline}: {het}: "
    if not pairs:
        return [head + f"no {baseline} cell of the same seed in this section."]
    found = lead(pairs, float(page.o["late_fraction"]))
    if found is not None and not found.interim:
        lines = [head + verdict(found.diffs, margin) + "."]
        rival, rival_pairs, label = strongest(page, groups, method, het, others)
        if rival_pairs:
            reading = verdict([d for _, d in rival_pairs], margin)
            lines.append(f"- **{method}** against the strongest other method: {het}: {rival} ({label} others "
                         f"finished): {reading}.")
        return lines
    text = (f"not yet ({method} {state([a for _, a, _ in pairs])}; "
            f"{baseline} {state([b for _, _, b in pairs])})")
    if found is not None:
        text += f"; rounds {found.rounds}: {points(found.mean)} points, {count(len(found.seeds))}; interim, not a verdict"
    return [head + text + "."]


def main_lead(page: Sheet, method: str, het: str, found: Lead) -> float | str:
    """The main table's lead of ``method`` over the baseline at ``het`` on the seeds and rounds of ``found``,
    or why there is none."""
    baseline, fraction = page.o["baseline"], float(page.o["late_fraction"])
    groups = by_variant([e for e in page.entries if e.membership.section == "main"])
    pairs = {s: (a, b) for s, a, b in pairs_of(groups, method, baseline, het) if a.stats and b.stats}
    if any(s not in pairs for s in found.seeds):
        return f"the main table has no finished {method} and {baseline} cells at {het}, {seeds_text(found.seeds)}"
    from .execute import late_mean

    diffs = []
    for s in found.seeds:
        a, b = pairs[s]
        if found.block is not None:
            ours, theirs = block_means(a.rows, found.total)[found.block], block_means(b.rows, found.total)[found.block]
        elif min(a.rows[-1]["round"], b.rows[-1]["round"]) < found.total:
            ours = theirs = None
        else:
            ours, theirs = late_mean(a.rows, found.total, fraction), late_mean(b.rows, found.total, fraction)
        if ours is None or theirs is None:
            return f"the main table's {method} and {baseline} cells do not cover rounds {found.rounds}"
        diffs.append(ours - theirs)
    return sum(diffs) / len(diffs)


def pattern(page: Sheet, groups: Groups, model: str, main_model: str) -> list[str]:
    """One bullet per contrasted method and heterogeneity of a long-cell section: its lead there beside the
    main model's."""
    baseline, margin = page.o["baseline"], float(page.o["tie_margin"])
    lines = []
    for method in page.o["contrasts"]:
        for het in ordered([h for m, h in groups if m == method]):
            pairs = pairs_of(groups, method, baseline, het)
            if not pairs:
                lines.append(f"- **{method}** at {het}: no {baseline} cell of the same seed on the {model}.")
                continue
            found = lead(pairs, float(page.o["late_fraction"]))
            if found is None:
                lines.append(f"- **{method}** at {het}, {seeds_text([s for s, _, _ in pairs])}: not yet (no "
                             f"{BLOCK}-round block that both {method} and {baseline} cover on the {model}).")
                continue
            head = f"- **{method}** at {het}, {seeds_text(found.seeds)}, rounds {found.rounds}" + (
                "" if found.interim else " (the late mean)")
            other = main_lead(page, method, het, found)
            if isinstance(other, str):
                lines.append(f"{head}: {points(found.mean)} points over {baseline} on the {model}; {other}.")
                continue
            delta, tie = found.mean - other, margin / 100
            word = "larger" if delta > tie else "smaller" if delta < -tie else "level"
            by = f"within {margin:g} point{'' if margin == 1 else 's'}" if word == "level" else \
                f"by {points(abs(delta))[1:]} points"
            lines.append(f"{head}: {points(found.mean)} points over {baseline} on the {model}, {points(other)} on the "
                         f"{main_model}: **{word}** on the deeper model ({by}; {count(len(found.seeds))} each"
                         + ("; interim, not a verdict" if found.interim else "") + ").")
    return lines


def models(entries: Sequence[Entry], default: str) -> str:
    return "/".join(ordered([e.status.cell.cfg.model for e in entries])) or default


def precisions(entries: Sequence[Entry]) -> str:
    return "/".join(ordered([e.status.cell.cfg.precision for e in entries]))


def verdict_section(page: Sheet) -> None:
    """The rules, then per contrasted method the readings that ``contrasts`` and ``rivals`` kept (under the
    main table's model where long-cell sections follow with their own), and how many cells are still missing."""
    baseline, margin = page.o["baseline"], float(page.o["tie_margin"])
    unit = f"{margin:g} point{'' if margin == 1 else 's'}"
    page.add("## Verdict", "",
             f"Rules: a method is compared with {baseline} on the paired per-seed difference of accuracy. With three "
             "or more seeds it is **ahead** (or **behind**) when the 95% t-interval excludes 0, **level** when the "
             f"whole interval lies within {unit} of 0, otherwise *not established*. With one "
             f"or two seeds there is no interval: ahead/behind when every seed differs by more than {unit} "
             f"the same way, level when every seed is within {unit}, otherwise mixed. Differences are in "
             "percentage points of accuracy; nothing else is claimed.", "")
    long = [s for s in page.sections if RENDERERS.get(s) is long_cells]
    main_entries = [e for e in page.entries if e.membership.section == "main"]
    main_model, main_precision = models(main_entries, page.study.base.model), precisions(main_entries)
    if long:
        page.add(f"On the {main_model} (main table):", "")
    for method in page.o["contrasts"]:
        readings = [(het, text) for m, het, text in page.verdicts if m == method]
        if not readings:
            page.add(f"- **{method}** against {baseline}: no finished pair yet.")
            continue
        page.add(f"- **{method}** against {baseline}: " + "; ".join(f"{het}: {text}" for het, text in readings) + ".")
        rivals = [(het, text) for m, het, text in page.rival_verdicts if m == method]
        if rivals:
            page.add(f"- **{method}** against the strongest other method: "
                     + "; ".join(f"{het}: {text}" for het, text in rivals) + ".")
    patterns = []
    for section in long:
        entries = [e for e in page.entries if e.membership.section == section]
        groups, model = by_variant(entries), models(entries, page.study.base.model)
        others = [m for m in ordered([e.variant for e in entries]) if m not in page.o["contrasts"]]
        page.add("", f"On the {model} (section \"{entries[0].membership.title}\"):", "")
        for method in page.o["contrasts"]:
            for het in ordered([h for m, h in groups if m == method]):
                page.add(*long_reading(page, groups, others, method, het))
        precision = precisions(entries)
        patterns.append((model, "" if precision == main_precision else
                         f" The {model} cells train in {precision}, the {main_model} cells in {main_precision}: "
                         "the leads are each within one precision, and the page's precision section (if any) checks "
                         "that the change of precision keeps the accuracy.", pattern(page, groups, model, main_model)))
    for model, note, lines in patterns:
        page.add("", f"The paper's pattern, larger gains on the deeper model: each method's lead over {baseline} on "
                 f"the {model} beside its lead on the {main_model} at the same heterogeneity and seeds, over the same "
                 f"rounds (the late mean once the {model} cells are finished, until then the latest {BLOCK}-round "
                 f"block both cover); larger or smaller when they differ by more than {unit}, else level.{note}", "")
        page.add(*lines)
    if long:
        page.add("")
    missing = [s for s in page.statuses if not s.finished]
    if missing:
        by_priority: dict[int, int] = {}
        for s in missing:
            by_priority[s.cell.priority] = by_priority.get(s.cell.priority, 0) + 1
        page.add(f"- Still missing: {len(missing)} of {len(page.statuses)} cells ("
                 + ", ".join(f"priority {p}: {n}" for p, n in sorted(by_priority.items()))
                 + "); the readings above cover only the finished cells.")
    else:
        page.add("- Every cell of the study is finished.")
    page.add("")
