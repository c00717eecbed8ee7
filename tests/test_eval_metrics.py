"""metrics.py (eval.py's metric functions and extraction rules) against hand-worked cases."""
import math

import pytest

from metrics import clutrr_extract, keyword_extract, mc_metrics, mean_over_folds, mquake_correct, mquake_prediction

# ---------------------------------------------------------------------------------------------
# TruthfulQA MC1 / MC2 / MC3


def test_mc_metrics_hand_worked():
    # true -1, -2; false -3, -1.5; best = -1.
    m = mc_metrics([-1.0, -2.0], [-3.0, -1.5], score_best=-1.0)
    assert m["mc1"] == 1.0  # -1 > max false -1.5
    assert m["mc3"] == 0.5  # -1 beats -1.5, -2 does not
    # (e^-1 + e^-2) / (e^-1 + e^-2 + e^-3 + e^-1.5) = 0.503215 / 0.776131
    assert m["mc2"] == pytest.approx(0.6483632, abs=1e-6)


def test_mc1_and_mc3_count_ties_as_wrong():
    m = mc_metrics([-1.5, -1.5, -0.5], [-1.5, -9.0], score_best=-1.5)
    assert m["mc1"] == 0.0  # best equals the max false score: not strictly above
    assert m["mc3"] == pytest.approx(1 / 3)  # only -0.5 is strictly above -1.5


def test_mc1_uses_the_best_answer_not_the_top_true_one():
    # Another true answer beats every false one, but the best answer does not: MC1 = 0, MC3 = 1/2.
    m = mc_metrics([-4.0, -1.0], [-2.0], score_best=-4.0)
    assert (m["mc1"], m["mc3"]) == (0.0, 0.5)


def test_mc2_orderings():
    assert mc_metrics([0.0], [0.0], 0.0)["mc2"] == pytest.approx(0.5)
    assert mc_metrics([-1.0, -1.0], [-1.0], -1.0)["mc2"] == pytest.approx(2 / 3)
    higher = mc_metrics([-1.0], [-3.0], -1.0)["mc2"]
    lower = mc_metrics([-3.0], [-1.0], -3.0)["mc2"]
    assert higher == pytest.approx(1 - lower) and higher > 0.5


def test_mc2_survives_underflow():
    # exp(-1000) is 0 in float64, so the plain formula gives 0/0; the value is 1 / (1 + e^-1).
    m = mc_metrics([-1000.0], [-1001.0], -1000.0)
    assert m["mc2"] == pytest.approx(1 / (1 + math.exp(-1)), abs=1e-12)


def test_mean_over_folds():
    s0 = {"task": "truthfulqa", "n": 409, "mc1": 0.25, "mc2": 0.5, "mc3": 0.125, "fold": 0}
    s1 = {"task": "truthfulqa", "n": 408, "mc1": 0.75, "mc2": 0.25, "mc3": 0.375, "fold": 1}
    mean = mean_over_folds([s0, s1])
    assert (mean["mc1"], mean["mc2"], mean["mc3"], mean["n"]) == (0.5, 0.375, 0.25, 817)
    assert mean["folds"] == [s0, s1]


# ---------------------------------------------------------------------------------------------
# MQuAKE: text after the last "A:", cut at the newline, lowercased, not stripped

PROMPT = "Q: Imagine that The name of the current head of the Nigeria government is Karl Döhler. " \
         "Who was the head of government of the country where Ahmadu Bello was a citizen? A:"


def test_mquake_answer_right_after_colon_is_correct():
    pred = mquake_prediction(PROMPT + "Karl Döhler\nQ: Imagine that")
    assert pred == "karl döhler"
    assert mquake_correct(pred, ["Karl Döhler"])


def test_mquake_leading_space_is_wrong_unless_stripped():
    pred = mquake_prediction(PROMPT + " Karl Döhler\n")
    assert pred == " karl döhler"
    assert not mquake_correct(pred, ["Karl Döhler"])
    assert mquake_correct(pred, ["Karl Döhler"], strip=True)


def test_mquake_aliases_and_case():
    refs = ["United States of America", "USA", "the US"]
    assert mquake_correct(mquake_prediction(PROMPT + "usa"), refs)
    assert mquake_correct(mquake_prediction(PROMPT + "The US\nmore"), refs)
    assert not mquake_correct(mquake_prediction(PROMPT + "America"), refs)


def test_mquake_uses_the_last_a_colon_and_whole_line():
    # A generated "A:" moves the cut; text after the answer on the same line makes it wrong.
    assert mquake_prediction(PROMPT + "Paris\nQ: Where? A:London") == "london"
    assert mquake_prediction(PROMPT + "Paris is nice") == "paris is nice"
    assert not mquake_correct("paris is nice", ["Paris"])
    assert mquake_prediction(PROMPT) == ""  # nothing generated


# ---------------------------------------------------------------------------------------------
# CLUTRR: decoded.split("'s\n")[1].split(".")[0].strip().lower()

CLUTRR = ('Read the following story about a family. "Herman asked his son, James." ... how is  Rosalee '
          "related to Herman? Answer:  Rosalee is Herman 's\n")


def test_clutrr_extract():
    assert clutrr_extract(CLUTRR + "Daughter-in-law. She is kind") == "daughter-in-law"
    assert clutrr_extract(CLUTRR + " son \n") == "son"  # stripped on both sides
    assert clutrr_extract(CLUTRR + "son\nQ: next") == "son\nq: next"  # no period: the rest stays
    assert clutrr_extract(CLUTRR + "aunt 's\nuncle") == "aunt"  # the piece after the FIRST "'s\n"
    assert clutrr_extract("no separator here") == ""  # the original would raise IndexError


# ---------------------------------------------------------------------------------------------
# SIQA / ARC / BoolQ: the first keyword in the generated text


def test_keyword_extract():
    choices = "answer1|answer2|answer3|answer4|answer5"
    assert keyword_extract(" the correct answer is answer2", choices) == "answer2"
    assert keyword_extract("answer3, not answer1", choices) == "answer3"
    assert keyword_extract("Answer2", choices) == ""  # case-sensitive, as LLM-Adapters
    assert keyword_extract("the correct answer is false; true", "true|false") == "false"
    assert keyword_extract("I do not know", "true|false") == ""
