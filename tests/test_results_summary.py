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
