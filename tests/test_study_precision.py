"""The results page's bf16-against-fp32 section reads each pair by its stated rule."""

from __future__ import annotations

from fedmr.study.precision import Pair, Side, reading, section


def rows(*accs: float) -> list[dict[str, float]]:
    return [{"round": 10 * (i + 1), "accuracy": a} for i, a in enumerate(accs)]


def test_finished_cells_are_compared_on_their_late_means():
    same = Pair("cnn fedavg", "cnn", Side("finished", rows(0.3, 0.4), 0.447), Side("finished", rows(0.3, 0.4), 0.431))
    row, ok = reading(same, "401-500")
    assert ok is True and row[4:7] == ["44.70", "43.10", "-1.60"]
    apart = Pair("cnn fedmr", "cnn", Side("finished", [], 0.46), Side("finished", [], 0.42))
    assert reading(apart, "401-500")[1] is False


def test_a_long_cell_is_checked_at_rounds_10_and_20():
    fp32 = Side("partial: 20 of 500 rounds", rows(0.1968, 0.2129), None)
    near = Pair("resnet20 fedavg", "resnet20", fp32, Side("partial: 30 of 500 rounds", rows(0.21, 0.25, 0.3), None))
    row, ok = reading(near, "401-500")
    assert ok is True and row[6] == "+1.32 / +3.71"
    broken = Pair("resnet20 fedavg", "resnet20", fp32, Side("partial: 20 of 500 rounds", rows(0.10, 0.10), None))
    assert reading(broken, "401-500")[1] is False
    early = Pair("resnet20 fedavg", "resnet20", fp32, Side("partial: 10 of 500 rounds", rows(0.2), None))
    assert reading(early, "401-500") == (["resnet20 fedavg", "partial: 20 of 500 rounds", "partial: 10 of 500 rounds",
                                          "rounds 10, 20", "", "", "", "not yet measurable"], None)


def test_the_verdict_per_model_says_safe_only_when_every_pair_holds():
    good = Pair("cnn fedavg", "cnn", Side("finished", [], 0.45), Side("finished", [], 0.44))
    bad = Pair("cnn fedmr", "cnn", Side("finished", [], 0.46), Side("finished", [], 0.40))
    waiting = Pair("resnet20 fedavg", "resnet20", Side("partial", rows(0.2), None), Side("not started", [], None))
    text = "\n".join(section([good, bad, waiting], "401-500", ""))
    assert "- bf16 for the cnn: **not safe**" in text
    assert "- bf16 for the resnet20: not yet shown" in text
    assert "- bf16 for the cnn: **safe** by these checks (1 pair within its rule)" in "\n".join(section([good], "401-500", ""))
