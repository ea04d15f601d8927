"""Answer extraction and scoring (``lit_peft.eval.answers``) on hand-written model outputs, malformed ones included."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

from lit_peft.eval import (COMMONSENSE_TASKS, TASKS, AnswerAccuracy, canonical_task, extract_answer,
                           extract_commonsense_answer, extract_gsm8k_answer, extract_math_answer, gsm8k_gold,
                           is_correct, math_answers_equal, normalize_math_answer, numbers_equal)

# ------------------------------------------------------------------------------------------------- GSM-8K


@pytest.mark.parametrize("text, expected", [
    ("Janet has 16 eggs, eats 3 and bakes 4, so she sells 9. The answer is: 18", "18"),
    ("The total is 1,234 dollars.", "1234"),
    ("It costs $1,234,567.", "1234567"),
    ("She pays $5 per hour.", "5"),
    ("The temperature fell to -3 degrees.", "-3"),
    ("He lost -$5 overall", "-5"),
    ("Each costs 3.50.", "3.5"),
    ("The answer is 3.0", "3"),
    ("A discount of 5%", "5"),
    ("The answer is 42.", "42"),
    ("From 10 to 20, then 30.\n", "30"),
    ("pages 10-12", "12"),                     # a hyphen between numbers is a range, not a minus sign
    ("half is .5", "0.5"),
    ("It is 0.25 of 8, i.e. 2.", "2"),
    ("-0", "0"),
    ("007", "7"),
])
def test_gsm8k_last_number(text, expected):
    assert extract_gsm8k_answer(text) == expected


@pytest.mark.parametrize("text", ["", "I don't know.", "no digits here, only words", "$.", "---"])
def test_gsm8k_no_number(text):
    assert extract_gsm8k_answer(text) is None


def test_gsm8k_gold():
    field = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nAltogether 48+24 = <<48+24=72>>72 clips.\n#### 72"
    assert gsm8k_gold(field) == "72"
    assert gsm8k_gold("... #### 1,234") == "1234"
    assert gsm8k_gold("#### -3") == "-3"
    assert gsm8k_gold("#### 3.50") == "3.5"
    with pytest.raises(ValueError, match="no '####'.*72 clips"):
        gsm8k_gold("Altogether 72 clips.")
    with pytest.raises(ValueError, match="no number after"):
        gsm8k_gold("#### none")


def test_numbers_equal():
    assert numbers_equal("18", "18.0")
    assert numbers_equal("1,234", "1234")
    assert numbers_equal("0.33333", "0.3333")          # within 1e-4
    assert not numbers_equal("0.333", "0.3333")        # 3.3e-4 apart
    assert numbers_equal(3, "3.00001")
    assert not numbers_equal("-3", "3")
    assert not numbers_equal(None, "3")
    assert not numbers_equal("3", None)
    assert not numbers_equal("three", "3")


def test_gsm8k_is_correct():
    gold = "She has 16 - 3 - 4 = <<16-3-4=9>>9 eggs, 9 * 2 = <<9*2=18>>$18.\n#### 18"
    assert is_correct("gsm8k", "So she makes $18 every day. The answer is: 18", gold)
    assert is_correct("gsm8k", "The answer is: 18.00", "18")
    assert is_correct("gsm8k", "Total: $1,234.", "1,234")
    assert is_correct("gsm8k", "Total: 1234", "$1,234")
    assert not is_correct("gsm8k", "The answer is: 18 and then 19", gold)   # the last number counts
    assert not is_correct("gsm8k", "I cannot solve this.", gold)
    with pytest.raises(ValueError):
        is_correct("gsm8k", "18", "eighteen")

# --------------------------------------------------------------------------------------------------- MATH


@pytest.mark.parametrize("text, expected", [
    (r"So the answer is $\boxed{5}$.", "5"),
    (r"First \boxed{1}, on second thought \boxed{2}.", "2"),                 # last box wins
    (r"$\boxed{\frac{1}{2}}$", r"\frac{1}{2}"),                              # nested braces
    (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),
    (r"\boxed{ x^{2^{3}} }", "x^{2^{3}}"),
    (r"The area is \fbox{12}", "12"),
    (r"so the result is $\boxed 5$", "5"),
    (r"the result is \boxed 7.", "7"),
    (r"\boxed {3}", "3"),
    ("The answer is: 5", "5"),                                               # MetaMath's format
    ("Reasoning...\nThe answer is: 5.\n", "5"),
    ("The answer is: 4.\nThe answer is: \\frac{3}{4}", r"\frac{3}{4}"),      # last one
    ("The answer is: $\\sqrt{2}$", r"\sqrt{2}"),
    (r"\boxed{3} The answer is: 4", "3"),                                    # a balanced box beats the fallback
])
def test_extract_math_answer(text, expected):
    assert extract_math_answer(text) == expected


@pytest.mark.parametrize("text, expected", [
    (r"So it is \boxed{\frac{1}{2}", None),                        # unbalanced, no fallback
    (r"\boxed{1} and then \boxed{2", None),                        # the last box is unbalanced
    ("\\boxed{3 \nThe answer is: 3", "3"),                          # unbalanced → fallback
    ("The answer is: ", None),
    ("I think it is 5.", None),                                    # no box, no "The answer is"
    ("", None),
    (r"\boxed", None),
    (r"\boxed{}", None),                                           # empty box
])
def test_extract_math_answer_malformed(text, expected):
    assert extract_math_answer(text) == expected


@pytest.mark.parametrize("raw, expected", [
    (r"\frac12", r"\frac{1}{2}"),
    (r"\frac1b", r"\frac{1}{b}"),
    (r"\frac1{72}", r"\frac{1}{72}"),
    (r"\dfrac{3}{4}", r"\frac{3}{4}"),
    (r"\tfrac{3}{4}", r"\frac{3}{4}"),
    ("3/4", r"\frac{3}{4}"),
    ("x/4", "x/4"),                                  # only integer a/b
    ("1/2/3", "1/2/3"),
    (r"\left( 1, 2 \right)", "(1,2)"),
    (r"10\text{ cm}", "10"),
    (r"10\text{cm}", r"10\text{cm}"),                # units only with the space after "\text{"
    (r"90^\circ", "90"),
    (r"90^{\circ}", "90"),
    (r"\$5", "5"),
    (r"50\%", "50"),
    ("50%", "50%"),                                  # a bare % is kept
    (r"1\!000", "1000"),
    ("x = 5", "5"),
    ("k=\\frac{1}{2}", r"\frac{1}{2}"),
    ("y = 2x + 3", "2x+3"),
    ("abc = 5", "abc=5"),                            # left side too long to be a variable
    ("x = y = 5", "x=y=5"),                          # two "=": unchanged
    (r"\sqrt3", r"\sqrt{3}"),
    (r"2\sqrt{3}", r"2\sqrt{3}"),
    (".5", r"\frac{1}{2}"),
    ("0.5", r"\frac{1}{2}"),
    ("0.50", "0.50"),
    (".25", "0.25"),
    (r"\{.5\}", r"\{0.5\}"),
    ("5.", "5"),
    ("  7 ", "7"),
    ("", ""),
])
def test_normalize_math_answer(raw, expected):
    assert normalize_math_answer(raw) == expected


def test_math_equality_follows_the_standard_normalisation():
    # ".5", "0.5", "1/2", "\frac12", "\dfrac{1}{2}" and "\frac{1}{2}" all normalise to \frac{1}{2} ...
    for s in [".5", "0.5", "1/2", r"\frac12", r"\dfrac{1}{2}", r"\frac{1}{2}"]:
        assert math_answers_equal(s, r"\frac{1}{2}"), s
    # ... but the normalisation is string-based: "0.50" is left as it is, so it equals none of them.
    assert not math_answers_equal("0.50", ".5")
    assert not math_answers_equal("0.50", r"\frac{1}{2}")
    assert math_answers_equal("0.50", "0.50")
    assert math_answers_equal(r"\left(3, \frac{\pi}{2}\right)", r"(3,\frac{\pi}{2})")
    assert math_answers_equal("x = 3", "3")
    assert not math_answers_equal("2", "3")
    assert not math_answers_equal(None, "3")


def test_math_is_correct():
    assert is_correct("math", r"Thus $x = \boxed{\dfrac{1}{2}}$.", r"\frac{1}{2}")
    assert is_correct("math", "Simplifying... The answer is: 1/2", r"\frac12")
    # gold given as a full MATH solution
    gold_solution = r"We have $2x = 6$, so $x = \boxed{3}$."
    assert is_correct("math", r"\boxed{3}", gold_solution)
    assert not is_correct("math", r"\boxed{4}", gold_solution)
    assert not is_correct("math", r"\boxed{3", gold_solution)                   # unbalanced, no fallback
    assert not is_correct("math", "I give up.", gold_solution)
    with pytest.raises(ValueError, match="boxed"):
        is_correct("math", r"\boxed{3}", r"so \boxed{3")

# -------------------------------------------------------------------------------------------- Commonsense


def test_commonsense_tasks_table():
    assert set(COMMONSENSE_TASKS) == {"boolq", "piqa", "social_i_qa", "hellaswag", "winogrande", "ARC-Challenge",
                                      "ARC-Easy", "openbookqa"}
    assert COMMONSENSE_TASKS["boolq"] == ["true", "false"]
    assert COMMONSENSE_TASKS["social_i_qa"] == ["answer1", "answer2", "answer3"]
    assert COMMONSENSE_TASKS["hellaswag"] == [f"ending{i}" for i in range(1, 5)]
    for task in ("ARC-Challenge", "ARC-Easy", "openbookqa"):
        assert COMMONSENSE_TASKS[task] == [f"answer{i}" for i in range(1, 6)]
    assert TASKS == ("gsm8k", "math", *COMMONSENSE_TASKS, "sentiment")


@pytest.mark.parametrize("task, text, expected", [
    ("winogrande", "the correct answer is option2", "option2"),
    ("piqa", "Answer: Solution1", "solution1"),
    ("boolq", "the correct answer is True", "true"),
    ("boolq", "FALSE. It is not true that ...", "false"),        # first occurrence wins
    ("boolq", "this is untrue", None),                           # whole words only
    ("social_i_qa", "the correct answer is answer3", "answer3"),
    ("social_i_qa", "the correct answer is answer4", None),      # not in SIQA's vocabulary
    ("hellaswag", "ending4 fits best, not ending1", "ending4"),
    ("ARC-Challenge", "the correct answer is answer5", "answer5"),
    ("ARC-Easy", "Answer1", "answer1"),
    ("openbookqa", "the correct answer is answer2.", "answer2"),
    ("winogrande", "option3", None),
    ("piqa", "asdf qwerty ### 12", None),                        # garbage
    ("boolq", "", None),
])
def test_extract_commonsense_answer(task, text, expected):
    assert extract_commonsense_answer(task, text) == expected
    assert extract_answer(task, text) == expected


def test_commonsense_task_names():
    assert canonical_task("arc_e") == "ARC-Easy"
    assert canonical_task("ARC-C") == "ARC-Challenge"
    assert canonical_task("SIQA") == "social_i_qa"
    assert canonical_task("OBQA") == "openbookqa"
    assert extract_commonsense_answer("arc-easy", "answer3") == "answer3"
    with pytest.raises(ValueError, match="valid tasks:.*boolq.*openbookqa"):
        extract_commonsense_answer("mmlu", "answer1")
    with pytest.raises(ValueError, match="not a commonsense task"):
        extract_commonsense_answer("gsm8k", "answer1")
    with pytest.raises(ValueError, match="valid tasks:.*gsm8k.*math"):
        extract_answer("squad", "x")


def test_commonsense_is_correct():
    assert is_correct("winogrande", "the correct answer is option2", "option2")
    assert is_correct("piqa", "Answer: Solution1", "solution1")
    assert is_correct("boolq", "True", "true")
    assert not is_correct("boolq", "false", "true")
    assert not is_correct("hellaswag", "I am not sure.", "ending2")
    with pytest.raises(ValueError, match="not an answer of piqa"):
        is_correct("piqa", "solution1", "option1")

# ------------------------------------------------------------------------------------------------- Metric


def test_answer_accuracy():
    metric = AnswerAccuracy()
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert float(metric.compute()) == 0.0      # no samples yet
    metric.reset()
    metric.update(torch.tensor([True, False, True, True]))
    metric.update([False, False])
    metric.update(True)
    metric.update([])
    assert int(metric.total) == 7 and int(metric.correct) == 4
    assert float(metric.compute()) == pytest.approx(4 / 7)
    metric.update(torch.tensor([[1, 0], [1, 1]]))  # 0/1 integers, any shape
    assert float(metric.compute()) == pytest.approx(7 / 11)
    with pytest.raises(ValueError, match="booleans"):
        metric.update(torch.tensor([0.5]))
    metric.reset()
    metric.update([is_correct("gsm8k", "The answer is: 18", "#### 18"), is_correct("boolq", "false", "true")])
    assert float(metric.compute()) == pytest.approx(0.5)


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_answer_accuracy_states_sum_across_processes():
    metric = AnswerAccuracy()
    assert metric._reductions["correct"] is not None and metric._reductions["total"] is not None
    # What a distributed sync does: reduce each rank's states with the registered function.
    ranks = [[True, True, False], [False, True]]
    states = []
    for flags in ranks:
        m = AnswerAccuracy()
        m.update(flags)
        states.append((m.correct.clone(), m.total.clone()))
    metric.correct = metric._reductions["correct"](torch.stack([c for c, _ in states]))
    metric.total = metric._reductions["total"](torch.stack([t for _, t in states]))
    assert float(metric.compute()) == pytest.approx(3 / 5)
    # and merge_state (the same reduction, in-process)
    a, b = AnswerAccuracy(), AnswerAccuracy()
    a.update(ranks[0])
    b.update(ranks[1])
    a.merge_state(b)
    assert float(a.compute()) == pytest.approx(3 / 5)


def test_answer_accuracy_copies_and_pickles():
    metric = AnswerAccuracy()
    metric.update([True, False, True])
    for clone in (copy.deepcopy(metric), pickle.loads(pickle.dumps(metric)), metric.clone()):
        assert type(clone) is AnswerAccuracy
        assert float(clone.compute()) == pytest.approx(2 / 3)


def test_sentiment_is_a_word_task():
    assert "sentiment" in TASKS and canonical_task("Sentiment") == "sentiment"
    assert extract_answer("sentiment", " Positive. The review praises the film") == "positive"
    assert extract_answer("sentiment", "I cannot tell") is None
    assert is_correct("sentiment", "negative", "negative") and not is_correct("sentiment", "negative, not positive",
                                                                              "positive")
    with pytest.raises(ValueError, match="not an answer of sentiment"):
        is_correct("sentiment", "positive", "neutral")
