import math

from fedmr.results import summarize_metrics


def test_summary_reads_central_accuracy():
    rows = [{"round": 5, "accuracy": 0.5, "fed_accuracy": 0.9}, {"round": 10, "accuracy": 0.6, "fed_accuracy": 0.1}]
    s = summarize_metrics(rows, 2.0, 10)
    assert (s["final_accuracy"], s["best_accuracy"], s["best_round"]) == (0.6, 0.6, 10)
    assert "accuracy_from" not in s


def test_summary_falls_back_to_federated_evaluation_without_a_server_test_set():
    nan = math.nan
    rows = [{"round": 5, "accuracy": nan, "fed_accuracy": 0.7}, {"round": 10, "accuracy": nan, "fed_accuracy": 0.65}]
    s = summarize_metrics(rows, 2.0, 10)
    assert s["accuracy_from"] == "fed_accuracy"
    assert (s["final_accuracy"], s["best_accuracy"], s["best_round"]) == (0.65, 0.7, 5)
    assert math.isclose(s["mean_last5_accuracy"], 0.675)


def test_summary_without_any_accuracy_has_no_accuracy_keys():
    s = summarize_metrics([{"round": 5, "accuracy": math.nan}], 1.0, 5)
    assert "final_accuracy" not in s and s["rounds"] == 5


def _summary(n_evaluations):
    rows = [{"round": r, "accuracy": 0.1 * r} for r in range(1, n_evaluations + 1)]
    return summarize_metrics(rows, 2.0, n_evaluations)


def test_summary_records_how_many_evaluations_the_late_mean_is_over():
    short, long = _summary(3), _summary(8)
    assert short["last_n"] == 3 and math.isclose(short["mean_last5_accuracy"], 0.2)
    assert long["last_n"] == 5 and math.isclose(long["mean_last5_accuracy"], 0.6)


def test_comparison_table_says_last_n_when_fewer_than_five_evaluations():
    from fedmr.results import comparison_table

    short = comparison_table({"fedavg": _summary(3), "fedmr": _summary(3)})
    assert "| mean of last 3 |" in short and "last 5" not in short
    long = comparison_table({"fedavg": _summary(8)})
    assert "| mean of last 5 |" in long and "(last" not in long
    mixed = comparison_table({"fedavg": _summary(8), "fedmr": _summary(2)}).splitlines()
    assert "| mean of last 5 |" in mixed[0]
    assert "(last" not in mixed[2] and "0.1500 (last 2) |" in mixed[3]
    old = {k: v for k, v in _summary(8).items() if k != "last_n"}  # a summary.json written before last_n
    assert "| mean of last 5 |" in comparison_table({"fedavg": old})
