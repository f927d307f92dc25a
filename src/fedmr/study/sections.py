"""The study page's sections other than "main", one renderer per section name (``RENDERERS``); any
other section (an ablation) gets ``section_table``.  Each renderer writes its section's body, after
the heading, onto the page:

* ``section_table``: one row per setting, over its seeds, and the settings' curves;
* ``precision_pairs`` ("precision"): each bf16 cell beside its fp32 twin (rules and verdict in precision.py);
* ``communication``: probe runs' traffic, the same tensors on the wire as the main cells';
* ``long_cells`` ("resnet20"): finished or partial cells, by blocks of ``BLOCK`` rounds, and where their
  rounds ran (rounds_ran.py); their verdict is in verdicts.py."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from . import precision as precision_page
from . import rounds_ran
from .cells import Entry, first_reach
from .plots import seed_curve, seed_label
from .sheet import Sheet, ordered
from .spec import difference
from .text import pct, points, table, with_spread

BLOCK = 100  # rounds per block of the long (ResNet-20) cells' table
LONG_THRESHOLDS = (0.3, 0.4)  # rounds to reach these in the ResNet-20 section
TRAFFIC = ("down_mb", "up_mb", "down_client_state_mb", "down_total_mb", "up_total_mb")  # metrics.csv, MB


def section_table(page: Sheet, section: str, entries: Sequence[Entry]) -> None:
    """An ablation's (or any other section's) table: one row per setting, over its seeds."""
    title = entries[0].membership.title
    varying = [k for k in ordered([k for e in entries for k in e.membership.settings if k != "seed"])
               if len({repr(e.membership.settings.get(k)) for e in entries}) > 1]
    groups: dict[str, list[Entry]] = {}
    for e in entries:
        values = {k: e.membership.settings.get(k, "") for k in varying}
        label = ", ".join(f"{v}" if k == "algorithm" else f"{k}={v}" for k, v in values.items()) or e.method
        groups.setdefault(label, []).append(e)
    rows, curves, bands = [], {}, {}
    for label, group in groups.items():
        done = sorted((e for e in group if e.stats is not None), key=lambda e: e.seed)
        if not done:
            rows.append([label, "missing", "", *([""] * len(page.thresholds)), "", f"0 of {len(group)}"])
            continue
        reach = [", ".join(str(e.done_stats.reach[t]) if e.done_stats.reach[t] else "never" for e in done)
                 for t in page.thresholds]
        rows.append([label, with_spread([e.done_stats.late for e in done]), with_spread([e.done_stats.best for e in done]),
                     *reach, f"{sum(e.done_stats.seconds_per_round for e in done) / len(done):.2f}",
                     f"{len(done)} of {len(group)}"])
        curve, band = seed_curve([e.done_stats.rows for e in done])
        curves[seed_label(label, len(done))] = curve
        if len(done) > 1:
            bands[seed_label(label, len(done))] = band
    page.add(*table(["setting", "accuracy", "best", *[f"round to {100 * t:g}%" for t in page.thresholds],
                      "s/round", "seeds"], rows))
    page.figure(curves, section, title, bands=bands)


def precision_pairs(page: Sheet, section: str, entries: Sequence[Entry]) -> None:
    """Each bf16 cell beside its fp32 twin (the same config but for precision), read by precision.py's rules."""
    def twin(e: Entry) -> Entry | None:
        cfg = dict(e.status.cell.cfg)
        return next((o for o in page.entries if o.status.cell.cfg.precision != cfg["precision"]
                     and difference({**dict(o.status.cell.cfg), "precision": "fp32"}, {**cfg, "precision": "fp32"})
                     is None), None)

    pairs, curves = {}, {}
    for e in entries:
        other = twin(e)
        if other is None:
            continue
        fp32, bf16 = (e, other) if e.status.cell.cfg.precision == "fp32" else (other, e)
        label = f"{fp32.status.cell.cfg.model} {fp32.variant}"
        sides = [precision_page.Side(x.state, x.rows, x.stats.late if x.stats else None) for x in (fp32, bf16)]
        pairs[label] = precision_page.Pair(label, fp32.status.cell.cfg.model, *sides)
        for x, name in ((fp32, "fp32"), (bf16, "bf16")):
            if x.rows:
                curves[f"{label} {name}" + ("" if x.stats else " (partial)")] = [(r["round"], r["accuracy"])
                                                                                 for r in x.rows]
    page.add(*precision_page.section(list(pairs.values()), page.window, ""))
    page.figure(curves, section, entries[0].membership.title)


def traffic(rows: Sequence[dict[str, float]]) -> bool:
    """Whether the rows record the traffic columns (runs from before them have none, or empty ones)."""
    return bool(rows) and all(not math.isnan(r.get(k, math.nan)) for r in rows for k in TRAFFIC)


def total_at(rows: Sequence[dict[str, float]], r: int) -> tuple[float, bool]:
    """MB down+up over rounds 1-r, and whether it is extrapolated: the cumulative totals of the last row at
    or before r, plus the rounds after it at that row's per-round down+up."""
    before = [row for row in rows if row["round"] <= r]
    base = before[-1] if before else {**rows[0], "round": 0.0, "down_total_mb": 0.0, "up_total_mb": 0.0}
    total = base["down_total_mb"] + base["up_total_mb"] + (r - base["round"]) * (base["down_mb"] + base["up_mb"])
    return total, base["round"] != r


def main_cell(page: Sheet, probe: Entry) -> Entry | None:
    """The main-section cell of the probe's algorithm variant, heterogeneity and seed."""
    return next((e for e in page.entries if e.membership.section == "main" and e.variant == probe.variant
                 and e.het == probe.het and e.seed == probe.seed), None)


def to_reach(probe_rows: Sequence[dict[str, float]], main: Entry | None, t: float) -> tuple[str, bool]:
    if main is None or main.stats is None:
        return "main cell missing", False
    r = main.stats.reach[t]
    if r is None:
        return "never", False
    total, guessed = total_at(probe_rows, r)
    return f"{'≈' if guessed else ''}{total:.1f} (round {r})", guessed


def communication(page: Sheet, section: str, entries: Sequence[Entry]) -> None:
    """Probe runs' traffic per round, the same tensors on the wire as the main cells', and the total until the
    main cells reached each threshold."""
    baseline = page.o["baseline"]
    done = [e for e in entries if e.stats is not None and traffic(e.stats.rows)]
    lasts = ", ".join(ordered([f"{int(e.done_stats.rows[-1]['round'])}" for e in done]))
    cfg = entries[0].status.cell.cfg
    page.add(f"Megabytes (2^20 bytes) of every tensor in the server's messages to the round's clients (**down**) "
             "and in their replies (**up**): model states, SCAFFOLD's control variates, FedGen's generator, "
             "MOON's previous model (clients are stateless in fedmr, so client-owned state such as MOON's "
             "previous model and SCAFFOLD's c_i is sent back down each time: **client state** is that part of "
             "down). FedGen's label counts are given to the server at set-up in fedmr, not sent per round. "
             f"Measured on probe runs ({cfg.rounds} rounds of {cfg.local_epochs} local "
             f"epoch{'' if cfg.local_epochs == 1 else 's'}, "
             f"{entries[0].het}, seed {entries[0].seed}): the same seed, partition, model and clients per round as "
             "the main cells, so the same tensors cross the wire; training does not change what is exchanged. "
             f"**last**: the round of the probe's last evaluation{f' (round {lasts})' if lasts else ''}; "
             f"**mean**: its cumulative total / rounds. **× {baseline}**: down+up per round at the last round "
             f"over {baseline}'s. FedMR's traffic "
             f"equals {baseline}'s: one model down and one up per selected client. **total to reach**: MB down+up "
             "until the round at which the main cell of the same method, heterogeneity and seed first reached "
             "the accuracy.", "")
    ref = next((e.done_stats.rows[-1] for e in done if e.variant == baseline), None)
    rows, guessed = [], False
    for e in entries:
        if e.stats is None or not traffic(e.stats.rows):
            why = "missing" if e.stats is None else "not recorded (a run from before the traffic columns)"
            rows.append([e.variant, why, *[""] * (5 + len(page.thresholds))])
            continue
        last, n = e.stats.rows[-1], e.stats.rows[-1]["round"]
        ratio = f"{(last['down_mb'] + last['up_mb']) / (ref['down_mb'] + ref['up_mb']):.2f}" if ref else ""
        reach = [to_reach(e.stats.rows, main_cell(page, e), t) for t in page.thresholds]
        guessed |= any(g for _, g in reach)
        rows.append([e.variant, f"{last['down_mb']:.2f}", f"{last['up_mb']:.2f}", f"{last['down_total_mb'] / n:.2f}",
                     f"{last['up_total_mb'] / n:.2f}", f"{last['down_client_state_mb']:.2f}", ratio,
                     *[text for text, _ in reach]])
    page.add(*table(["method", "down MB/round (last)", "up MB/round (last)", "down MB/round (mean)",
                      "up MB/round (mean)", "client state in down (last)", f"× {baseline}",
                      *[f"total MB to reach {100 * t:g}%" for t in page.thresholds]], rows))
    if guessed:
        page.add("≈: the main cell reached the accuracy after the probe's last round; the total is the probe's "
                 "total at its last round plus its last round's down+up for each round after it. By then every "
                 "method's per-round traffic is at its steady state: SCAFFOLD's c_i and MOON's previous model "
                 "exist for nearly every selected client.", "")


def block_means(rows: Sequence[dict[str, float]], rounds: int) -> list[float | None]:
    """Mean accuracy of the evaluated rows in each BLOCK-round block (1-100, 101-200, ...); None for a block
    the rows do not cover to its end."""
    last = rows[-1]["round"] if rows else 0
    out: list[float | None] = []
    for start in range(0, rounds, BLOCK):
        accs = [r["accuracy"] for r in rows if start < r["round"] <= start + BLOCK]
        out.append(sum(accs) / len(accs) if accs and min(start + BLOCK, rounds) <= last else None)
    return out


def seconds_per_round(rows: Sequence[dict[str, float]]) -> str:
    last = rows[-1] if rows else None
    if not last or not last.get("elapsed_s") or math.isnan(float(last["elapsed_s"])):
        return ""
    return f"{float(last['elapsed_s']) / float(last['round']):.0f}"


def reach_long(e: Entry, t: float) -> str:
    r = first_reach(e.rows, t)
    return str(r) if r else "never" if e.stats else "not yet" if e.parked else ""


def long_cells(page: Sheet, section: str, entries: Sequence[Entry]) -> None:
    """The long (ResNet-20) cells, finished or partial, by blocks of ``BLOCK`` rounds."""
    baseline, title = page.o["baseline"], entries[0].membership.title
    rounds = max(e.rounds for e in entries)
    blocks = [f"{s + 1}-{min(s + BLOCK, rounds)}" for s in range(0, rounds, BLOCK)]
    means = [block_means(e.rows, rounds) for e in entries]
    page.add(f"Mean test accuracy over the evaluations in each block of {BLOCK} rounds, given only for blocks a "
             "cell's rows cover to their end. A **partial** cell (one that spans sittings) is shown as its "
             "parked checkpoint holds it (`parked/metrics.csv`, committed with the cell), not as a finished result; "
             "rounds to an accuracy: the first evaluated round at or above it (\"not yet\" for a partial cell, "
             "\"never\" for a finished one).", "")
    rows = [[e.variant, e.state, *["" if m is None else pct(m) for m in block],
             *[reach_long(e, t) for t in LONG_THRESHOLDS], seconds_per_round(e.rows)]
            for e, block in zip(entries, means)]
    page.add(*table(["method", "state", *[f"mean {b}" for b in blocks],
                      *[f"round to {100 * t:g}%" for t in LONG_THRESHOLDS], "s/round"], rows))
    page.add("s/round: the run's own clock (`elapsed_s` of its last row over its rounds), on whatever machine ran "
             "each part of it and however shared it was; the cell's config says its precision.", "")
    rounds_ran.section(page, entries)
    base = next((block for e, block in zip(entries, means) if e.variant == baseline), None)
    leads = [[f"{e.variant} - {baseline}", *["" if a is None or b is None else points(a - b) for a, b in zip(block, base)]]
             for e, block in zip(entries, means) if e.variant.startswith("fedmr") and base is not None]
    if any(cell for row in leads for cell in row[1:]):
        page.add(f"Lead over {baseline} per block, in points (where both have the block):", "")
        page.add(*table(["difference", *blocks], leads))
    page.figure({e.variant + ("" if e.stats else " (partial)"): [(r["round"], r["accuracy"]) for r in e.rows]
                 for e in entries if e.rows}, section, title)


RENDERERS: dict[str, Callable[[Sheet, str, Sequence[Entry]], None]] = {
    "communication": communication, "resnet20": long_cells, "precision": precision_pairs}


def render(page: Sheet) -> None:
    """Every section but "main", in the order the study declares them, each under its heading."""
    for section in page.sections:
        if section == "main":
            continue
        entries = [e for e in page.entries if e.membership.section == section]
        page.add(f"## {entries[0].membership.title}", "")
        RENDERERS.get(section, section_table)(page, section, entries)
