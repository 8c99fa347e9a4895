"""The stage-2 accuracy grader against the audit's findings: answers that took it minutes, and hedges, bounds and
near misses that it graded 1.0 (or right answers it graded 0.0). Every case here failed before its fix."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from pebr.rewards import terms
from pebr.rewards.terms import accuracy_reward, extract_final_answer

H = "### The final answer is: "
H2 = "### The final answer is:\n"  # the answer on the line after the header
REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
# The margin of the termination guards below: each input took the old grader several minutes (cubic or quadratic
# backtracking, measured by the audit); the fixed grader takes milliseconds, and the subprocess its imports
# (sympy) on top. No timing is asserted, only that the call ends at all.
GUARD_S = 60


def _finishes(code: str) -> None:
    """Run `code` (after importing the terms) in a fresh interpreter; fail if it has not finished in GUARD_S."""
    script = "from pebr.rewards import terms\nH = " + repr(H) + "\n" + textwrap.dedent(code)
    try:
        done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                              timeout=GUARD_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running after {GUARD_S} s:\n{code}")
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.fixture
def graders_asked(monkeypatch) -> list[str]:
    """The answers that reached mathruler or math-verify (neither grades them: both answer "no match")."""
    asked: list[str] = []
    monkeypatch.setattr(terms, "grade_answer", lambda given, truth: asked.append(given) or False)
    monkeypatch.setattr(terms, "mv_parse", lambda text, **kw: asked.append(text) or [])
    return asked


# ---- 0. linear-time splitting ------------------------------------------------------------------

def test_an_answer_of_many_brackets_is_split_in_linear_time() -> None:
    # Quadratic before: 28 s at 20 000 brackets, so about 7 minutes at these 80 000 (0.5 s now).
    _finishes("assert terms.extract_final_answer(H.strip() + ' 1' + ' (a' * 80000) == '1' + ' (a' * 80000")


def test_a_long_run_of_spaces_after_a_header_is_read_in_linear_time() -> None:
    # Quadratic before: about 15 s at 64 000 spaces, so about 4 minutes at these 256 000 (10 ms now).
    _finishes("assert terms.extract_final_answer('###' + ' ' * 256000 + 'x') == ''")


# ---- 1. choice letters and a long run of spaces -----------------------------------------------

def test_a_choice_answer_with_a_long_run_of_spaces_is_graded_at_once() -> None:
    """Cubic backtracking between the "\\s*" pieces of the choice patterns: "A" + 2 000 spaces + "x" against
    choice B took 11 s, 20 000 spaces over five minutes. Guard: the subprocess must end within 60 s (old code:
    minutes at these sizes; fixed: milliseconds). The patterns themselves are checked too, on raw spaces, since
    the fix makes their whitespace quantifiers possessive besides collapsing the runs."""
    _finishes("""
        spaces = " " * 20_000
        assert terms.accuracy_reward(H + "A" + spaces + "x", "B") == 0.0
        assert terms.accuracy_reward(H + "The answer is" + spaces + "x", "B") == 0.0
        assert not terms.answers_match("(A" + spaces + ") or" + spaces + "x", "B")
        assert terms._SEVERAL_CHOICES.match("A" + spaces + "x") is None
        assert terms._CHOICE_ANSWER_UPPER.match("A" + spaces + "x") is None
    """)


# ---- 2. the explanation split and a long run of spaces -----------------------------------------

def test_an_answer_line_with_a_long_run_of_spaces_is_split_at_once() -> None:
    """_EXPLANATION was quadratic on a run of spaces: 40 000 took 20 s, so 200 000 take minutes. Guard: the
    subprocess must end within 60 s (old code: minutes; fixed: milliseconds)."""
    _finishes("""
        assert terms.extract_final_answer(H + "1" + " " * 200_000 + "x") == "1 x"
        assert terms._EXPLANATION.search("1" + " " * 200_000 + "x") is None
    """)


# ---- 3. an answer line too long to be an answer -------------------------------------------------

def test_an_answer_line_longer_than_the_cap_is_wrong_without_a_grader(graders_asked: list[str]) -> None:
    """math-verify's free-text parse of a 40 KB line took 5 s (quadratic), with no time limit off the main thread."""
    assert accuracy_reward(H + "1 " * 20_000, "5") == 0.0
    assert accuracy_reward(H + "5" + " 0" * 300, "5") == 0.0  # 601 characters, over _MAX_ANSWER_CHARS
    assert graders_asked == []


def test_an_answer_line_under_the_cap_still_reaches_the_graders() -> None:
    assert accuracy_reward(H + "1" + "+0" * 200, "1") == 1.0  # 401 characters


# ---- 4. powers no grader can build in time ------------------------------------------------------

@pytest.mark.parametrize("answer", ["1e999999", "1.5e+99999", "10^{999999}", "1.5 \\times 10^{123456}", "2**100000",
                                    "9^9^9", "9^{9^{9}}"])
@pytest.mark.parametrize("truth", ["B", "5"])
def test_a_huge_power_is_wrong_without_a_grader(answer: str, truth: str, graders_asked: list[str]) -> None:
    """sympy computed 10**999999 in one C call that SIGALRM cannot interrupt: "1e999999" against "B" ran 35 s
    despite the 5 s grader limit."""
    assert accuracy_reward(H + answer, truth) == 0.0
    assert graders_asked == []


@pytest.mark.parametrize("answer, truth", [("2^{10}", "1024"), ("e^{-x^{2}}", "e^{-x^2}"), ("1e3", "1000")])
def test_a_power_of_ordinary_size_is_still_graded(answer: str, truth: str) -> None:
    assert accuracy_reward(H + answer, truth) == 1.0


# ---- 5. hedges between choices after a lead-in or with ", or" -----------------------------------

@pytest.mark.parametrize("answer", ["The answer is B, C", "Answer: (B), (C)", "Option B, C", "The answer is (B) or (C)",
                                    "The correct answer is (B)/(C)", "B, or C", "B, and C"])
def test_a_hedge_between_choices_is_wrong(answer: str) -> None:
    assert accuracy_reward(H + answer, "B") == 0.0


@pytest.mark.parametrize("answer, expected", [("B, C", 0.0), ("B or C", 0.0), ("The answer is B", 1.0),
                                              ("Answer: (B)", 1.0), ("The correct option is B.", 1.0)])
def test_choices_after_a_lead_in_are_still_read(answer: str, expected: float) -> None:
    assert accuracy_reward(H + answer, "B") == expected


# ---- 6. hedges said in words --------------------------------------------------------------------

@pytest.mark.parametrize("answer, truth", [("Yes, or maybe no", "Yes"), ("B, though C is possible", "B"),
                                           ("B. C is also possible", "B"), ("B, but C is also plausible", "B"),
                                           ("5, but 4 is also possible", "5")])
def test_another_answer_offered_in_words_is_a_hedge(answer: str, truth: str) -> None:
    assert accuracy_reward(H + answer, truth) == 0.0


@pytest.mark.parametrize("answer, truth, expected", [
    ("5 (perhaps)", "5", 1.0), ("B. Or maybe not", "B", 1.0), ("\\boxed{3}. It could also be found by counting", "3", 1.0),
    ("5 (or 4)", "5", 0.0), ("5, but see step 2", "5", 1.0), ("B, but the figure is unclear", "B", 1.0),
])
def test_words_after_an_answer_that_offer_none_are_still_an_explanation(answer: str, truth: str,
                                                                       expected: float) -> None:
    assert accuracy_reward(H + answer, truth) == expected


# ---- 7. one-sided bounds ------------------------------------------------------------------------

@pytest.mark.parametrize("answer", ["5 or more", "5 or less", "\\geq 5", "≥ 5", "\\ge 5", "4 \\lor 5"])
def test_a_one_sided_bound_is_not_the_number(answer: str) -> None:
    """math-verify reads "\\geq 5" as a set holding 5, and called it equal to 5."""
    assert accuracy_reward(H + answer, "5") == 0.0


@pytest.mark.parametrize("answer, truth", [("x \\geq 5", "x \\ge 5"), ("x > 5", "x > 5"), ("5 \\text{ cm}", "5")])
def test_a_bound_is_still_graded_against_a_bound(answer: str, truth: str) -> None:
    assert accuracy_reward(H + answer, truth) == 1.0


# ---- 8. small numbers with units ----------------------------------------------------------------

@pytest.mark.parametrize("answer, truth", [
    ("0.0000016 m", "0.0000017 m"), ("0.0000016", "0.0000017 m"), ("0.0000016 m", "0.0000017"),
    ("1.6 \\times 10^{-19} \\text{ C}", "1.7 \\times 10^{-19} \\text{ C}"), ("0.0000001%", "0.0000002%"),
    ("0.0000001", "0%"), ("50.00001%", "50%"), ("0.0000001\\%", "0.0000002\\%"),
])
def test_numbers_with_units_are_compared_exactly(answer: str, truth: str) -> None:
    """The graders call numbers within about 1e-6 equal; with a unit or % they were not compared exactly."""
    assert accuracy_reward(H + answer, truth) == 0.0


@pytest.mark.parametrize("answer, truth, expected", [
    ("0.5", "50%", 1.0), ("50%", "0.5", 1.0), ("50", "50%", 1.0), ("50\\%", "50", 1.0),
    ("1.6 \\times 10^{-19} \\text{ C}", "1.6e-19 C", 1.0), ("1.6e-19", "1.6 \\times 10^{-19} \\text{ C}", 1.0),
    ("45^\\circ", "45", 1.0), ("0.0000017 m", "0.0000017 m", 1.0), ("3 m", "3 cm", 0.0),
])
def test_equal_quantities_still_match(answer: str, truth: str, expected: float) -> None:
    assert accuracy_reward(H + answer, truth) == expected


# ---- 9. segments named like roman numerals ------------------------------------------------------

@pytest.mark.parametrize("answer, truth", [("DC", "CD"), ("CD", "DC"), ("MC", "CM"), ("CD", "CD")])
def test_a_two_letter_segment_reads_either_way_though_it_spells_a_numeral(answer: str, truth: str) -> None:
    assert accuracy_reward(H + answer, truth) == 1.0


def test_a_numeral_of_i_v_and_x_is_still_not_reversed() -> None:
    assert accuracy_reward(H + "VI", "IV") == 0.0 and accuracy_reward(H + "XI", "IX") == 0.0


# ---- 10. yes/no after a lead-in -----------------------------------------------------------------

@pytest.mark.parametrize("answer, truth", [("The answer is yes.", "Yes"), ("Answer: No", "No"),
                                           ("Final answer: Yes", "Yes")])
def test_yes_or_no_after_a_lead_in_is_read(answer: str, truth: str) -> None:
    assert accuracy_reward(H + answer, truth) == 1.0


def test_the_other_word_after_a_lead_in_is_still_wrong() -> None:
    assert accuracy_reward(H + "The answer is no", "Yes") == 0.0


# ---- 11. a list marker before the answer, and answers outside the boxes -------------------------

@pytest.mark.parametrize("response, truth, expected", [
    (H2 + "- 5", "5", 1.0), (H2 + "- 5", "-5", 0.0), (H2 + "- B", "B", 1.0), (H2 + "* 5", "5", 1.0),
    (H + "- 5 cm", "5 cm", 1.0),  # on the header's line too: a negative number is written "-5"
])
def test_a_list_marker_before_the_answer_is_not_a_minus_sign(response: str, truth: str, expected: float) -> None:
    assert accuracy_reward(response, truth) == expected


@pytest.mark.parametrize("response, truth", [(H2 + "-5", "-5"), (H + "-5", "-5"), (H + "$- 5$", "-5")])
def test_a_minus_sign_is_still_a_minus_sign(response: str, truth: str) -> None:
    assert accuracy_reward(response, truth) == 1.0


@pytest.mark.parametrize("answer, truth", [("\\boxed{5}, 4", "5"), ("\\boxed{5} (4)", "5"), ("4 (or \\boxed{5})", "5"),
                                           ("\\boxed{B}, C", "B")])
def test_another_answer_outside_the_boxes_is_a_hedge(answer: str, truth: str) -> None:
    assert accuracy_reward(H + answer, truth) == 0.0


@pytest.mark.parametrize("answer, truth", [
    ("\\boxed{3}. It could also be found by counting", "3"), ("\\boxed{3}. Because 1+2=3", "3"),
    ("\\boxed{8} \\text{ cm}^2", "8"), ("x_1 = \\boxed{3}", "3"), ("I think \\boxed{B}", "B"),
    ("\\boxed{5} N", "5 N"), ("\\boxed{5}, that is \\boxed{5}", "5"), ("\\boxed{5} (2 red and 3 blue)", "5"),
])
def test_words_exponents_and_units_outside_the_boxes_are_no_second_answer(answer: str, truth: str) -> None:
    assert accuracy_reward(H + answer, truth) == 1.0
    assert extract_final_answer(H + answer) != ""
