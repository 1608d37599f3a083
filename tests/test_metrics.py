"""ROUGE-L and exact match against values worked out by hand, and their means per task."""

import pytest

from mops_core.data import Record
from mops_core.metrics import exact_match, first_per_task, normalise, rouge_l, score_answers


@pytest.mark.parametrize(
    "prediction, reference, expected",
    [
        ("the cat sat on the mat", "the cat sat on the mat", 100.0),
        # stemmed: [the cat were run] vs [the cat ran]: LCS 2, P = 2/4, R = 2/3, F = 2PR / (P + R) = 4/7
        ("The cats were running", "the cat ran", 400 / 7),
        ("Hello, world!", "hello world", 100.0),  # punctuation is not a word
        ("b a", "a b c", 2 * (1 / 2) * (1 / 3) / (1 / 2 + 1 / 3) * 100),  # LCS 1 of 2 and of 3 words
        ("", "an answer", 0.0),  # an empty answer scores nothing
        ("an answer", "", 0.0),
        ("...", "!!", 0.0),  # no words on either side
    ],
)
def test_rouge_l_is_the_lcs_f_measure_of_stemmed_words(prediction, reference, expected):
    assert rouge_l(prediction, reference) == pytest.approx(expected)


@pytest.mark.parametrize(
    "prediction, reference, expected",
    [
        ("  The Answer. ", "the answer", 100.0),  # case, punctuation and spaces do not count
        ("yes!", "Yes", 100.0),
        ("[1, 2, 3]", "1 2 3", 100.0),
        ("answer", "an answer", 0.0),  # articles do count (as in SNI's evaluation)
        ("", "", 100.0),
        ("", "x", 0.0),
        ("4", "four", 0.0),
    ],
)
def test_exact_match_after_normalisation(prediction, reference, expected):
    assert exact_match(prediction, reference) == expected
    assert normalise("  A  b,\tC!") == "a b c"


def test_scores_are_means_per_task_and_each_sample_counts_once_overall():
    records = [Record("q", "", ref, task) for ref, task in [("a b", "x"), ("c d", "x"), ("e", "y")]]
    result = score_answers(["a b", "nothing", "E."], records, ("x", "y", "z"), max_new_tokens=8)
    assert result.per_task["x"].samples == 2 and result.per_task["x"].rouge_l == 50.0 and result.per_task["x"].exact_match == 50.0
    assert result.per_task["y"].rouge_l == 100.0 and result.per_task["z"].samples == 0
    assert result.overall.samples == 3 and result.overall.rouge_l == pytest.approx(200 / 3)
    assert result.to_dict()["per_task"] == {"x": {"samples": 2, "rouge_l": 50.0, "exact_match": 50.0},
                                            "y": {"samples": 1, "rouge_l": 100.0, "exact_match": 100.0}}  # not z: unscored
    assert [e["task"] for e in result.examples] == ["x", "y"]  # one answer of each task to read


def test_the_first_samples_of_every_task_in_the_runs_task_order():
    records = [Record(str(i), "", "r", t) for i, t in enumerate("abacbca")]
    chosen = first_per_task(records, ("c", "a", "b"), 2)
    assert [(r.task, r.instruction) for r in chosen] == [("c", "3"), ("c", "5"), ("a", "0"), ("a", "2"), ("b", "1"), ("b", "4")]


def test_scoring_leaves_the_root_logger_alone_so_flower_lines_print_once(monkeypatch):
    import logging

    from mops_core import metrics

    metrics._scorer.cache_clear()
    monkeypatch.setattr(logging.root, "handlers", [])  # as in a ServerApp process, where pytest adds none
    rouge_l("a b", "a")
    assert logging.root.handlers == []
