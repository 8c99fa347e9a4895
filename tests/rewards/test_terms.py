"""Each reward term on hand-written responses, with expected values worked out by hand."""

from __future__ import annotations

import math

import pytest

from pebr.rewards import terms
from pebr.rewards.terms import (
    accuracy_reward,
    answers_match,
    clip_alignment_reward,
    extract_final_answer,
    extract_image_description,
    format_reward,
    keyword_recall,
    length_reward,
)

FULL = (
    "### Image Description: A red square and a blue circle.\n"
    "### Rationales: The question asks for the area of the square.\n"
    "### Let's think step by step.\n"
    "### Step 1: The side is 3 cm, so the area is 3 * 3.\n"
    "### The final answer is: 9\n"
)
ONLY_HEADERS = "### Image Description:\n### Rationales:\n### Step 1:\n### The final answer is:"
MIXED_CASE = (
    "###image DESCRIPTION: a cat\n### RATIONALES: none\n### step 1: look\n### The Final Answer Is: (B)"
)
SPACED = "### Image Description: x\n###  Rationales: y\n###   Step 1: z\n###\tThe final answer is: 2"
UNICODE = (
    "### Image Description: Un CAFÉ ☕ et un 三角形.\n### Rationales: …\n### Step 1: −5 + 0\n"
    "### The final answer is: −5"
)
# About 10 000 tokens of filler between the headers.
LONG = FULL.replace("### Step 1:", "### Step 1: " + "word " * 10_000)


# ---- format ----------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "response, expected",
    [
        ("", 0.0),
        (ONLY_HEADERS, 1.0),
        (FULL, 1.0),
        (MIXED_CASE, 1.0),
        (SPACED, 1.0),
        (UNICODE, 1.0),
        (LONG, 1.0),
        (FULL.replace("### Step 1:", "Step 1:"), 0.0),  # header without ###
        (FULL.replace("### Rationales:", "### Rationale:"), 0.0),  # header misspelt
        (FULL.replace("### The final answer is:", "### The final answer is"), 0.0),  # no colon
        (FULL.replace("### Image Description:", "Image Description:"), 0.0),  # the description's header too
        ("The answer is 9.", 0.0),
    ],
)
def test_format_reward(response: str, expected: float) -> None:
    assert format_reward(response) == expected


# ---- final answer and accuracy ---------------------------------------------------------------

@pytest.mark.parametrize(
    "response, expected",
    [
        (FULL, "9"),
        (MIXED_CASE, "(B)"),  # lower-case header: the authors' release fell back to the whole text
        ("### THE FINAL ANSWER IS: 7 apples\nso that's it", "7 apples"),  # only its own line
        ("### The final answer is: 1\n### The final answer is: 2", "2"),  # the last one counts
        ("### The final answer is:\n\n  42\n", "42"),  # answer on the next line
        ("### The final answer is: \\boxed{\\frac{3}{4}}", "\\frac{3}{4}"),
        ("  no header, just 12  ", ""),  # no header, no answer (the release graded the whole text: a defect)
        ("### The final answer is: 3\n### The final answer is:", "3"),  # an empty last header voids nothing
        ("### The final answer is: 3\n### The final answer is:\n### Step 2: x", "3"),
        ("### The final answer is:\n$$\n\\frac{1}{2}\n$$\nDone.", "\\frac{1}{2}"),  # display math block
        ("### The final answer is:\n\\[\nx + 1\n\\]", "x + 1"),
        (ONLY_HEADERS, ""),
        ("", ""),
        # The answer, not the explanation after it (math-verify would keep the explanation's last number).
        ("### The final answer is: 4. This is because 2+1=3.", "4"),
        ("### The final answer is: 5 (2 red and 3 blue)", "5"),
        ("### The final answer is: 3, since 1 + 2 = 3", "3"),
        ("### The final answer is: 3.14. That is pi.", "3.14"),
        ("### The final answer is: 2 (x+1)", "2 (x+1)"),  # a bracket of formula, not of words
        ("### The final answer is: \\boxed{3}. Because 1+2=3", "3"),
        ("### The final answer is：42", "42"),  # a full-width colon: "：42" was graded
    ],
)
def test_extract_final_answer(response: str, expected: str) -> None:
    assert extract_final_answer(response) == expected


@pytest.mark.parametrize(
    "answer, truth, expected",
    [
        ("\\frac{1}{2}", "0.5", True),
        ("0.5", "\\frac{1}{2}", True),
        ("$\\frac{1}{2}$", "1/2", True),
        ("(B)", "B", True),
        ("B", "(B)", True),
        ("B.", "B", True),
        ("[C]", "C", True),
        ("b", "B", True),
        ("(B) 12 cm", "B", True),
        ("C", "B", False),
        ("(A)", "B", False),
        ("a triangle", "A", False),  # an article, not choice A
        ("3 cm.", "3", True),
        ("3 cm", "3", True),
        ("3.", "3", True),
        ("45^\\circ", "45", True),
        ("50\\%", "50", True),
        ("1,000", "1000", True),
        ("−5", "-5", True),  # unicode minus
        ("３", "3", True),  # full-width digit
        ("x^2+1", "1+x^2", True),
        ("\\sqrt{2}", "\\sqrt2", True),
        ("Yes", "yes", True),
        ("A triangle", "A", False),  # capitalised, still an article
        ("I think B", "B", False),  # a pronoun, not choice I
        ("The answer is B", "B", True),
        ("**B** 12 cm", "B", True),
        ("B 12 cm", "B", True),
        ("A, B, C, D", "A", False),  # every choice at once: a hedge
        ("A or B", "B", False),
        ("(A)/(B)", "A", False),
        ("\\angle BAC", "\\angle ABC", False),  # another vertex: the graders read both as products B*A*C
        ("BAC", "ABC", False),
        ("\\angle CBA", "\\angle ABC", True),  # the same angle read the other way
        ("∠ABC", "\\angle ABC", True),
        ("BA", "AB", True),
        ("\\triangle BCA", "\\triangle ABC", True),
        ("NO", "YES", False),
        ("VI", "IV", False),  # roman numerals, not a segment read backwards
        ("ASU", "USA", False),  # a word, not an angle read backwards
        ("LC", "CL", True),  # not a roman numeral, so a segment read backwards
        ("DM", "MD", True),
        # Small numbers: both graders call numbers within 1e-6 or 1e-7 of each other equal.
        ("1.6e-19", "1.7e-19", False),
        ("1.6e-19", "0", False),
        ("0.00000009", "0", False),
        ("3.00000005", "3", False),
        ("0.0000001", "0.0000002", False),
        ("1.6 \\times 10^{-19}", "1.6e-19", True),
        ("1.6×10^-19", "0.00000000000000000016", True),
        ("2e3", "2,000", True),
        ("1" + "0" * 200, "2" + "0" * 200, False),  # exact, not floats (both were inf, and equal)
        ("0.1", "0.10000000001", True),  # within nine significant digits
        # Hedges between yes and no, and between choice letters without a separator.
        ("Yes or no", "Yes", False),
        ("yes/no", "Yes", False),
        ("No, yes", "No", False),
        ("True or False", "True", False),
        ("Yes, no doubt", "Yes", True),
        ("A B C D", "A", False),
        ("B C", "B", False),
        ("(A)(B)", "A", False),
        ("(B) A circle", "B", True),  # the choice's text starts with an article
        ("∞", "\\infty", True),
        ("\u200b42", "42", True),  # a zero-width space
        ("CBA", "\\angle ABC", True),  # one side marks the angle
        ("USA", "USA", True),
        ("20", "20 m/s", True),  # an answer without its unit, as "8" against "8 cm²"
        ("20 m/s", "20", True),
        ("8 \\text{ cm}^2", "8 cm²", True),
        ("9.8", "9.8 m/s^2", True),
        ("21", "20 m/s", False),
        ("20 kg", "20 m/s", False),
        ("2x", "2", False),  # an expression, not 2 of a unit x
        ("20 - 3", "20", False),
        ("4", "3", False),
        ("30", "3", False),
        ("1/3", "0.3", False),
        ("", "3", False),
        # What a count counts ("How many objects are left?"), not a product of letters for the graders.
        ("3 objects", "3", True),
        ("3 objects left", "3", True),
        ("7 birds", "7", True),
        ("5 (units)", "5", True),
        ("8 (\\text{cm}^2)", "8", True),
        ("3 objects", "4", False),
        ("3 apples", "3 oranges", False),
        ("2 pi", "2", False),  # words that change the value are not counted
        ("5 hundred", "5", False),
        # Another unit is another quantity, though both graders strip units.
        ("3 m", "3 cm", False),
        ("20 g", "20 kg", False),
        ("90°", "90 cm", False),
        ("3 cm^2", "3 cm^3", False),
        ("90 degrees", "90°", True),
        ("3 Hz", "3 \\text{Hz}", True),  # a unit is a unit however it is written, not a counted "hz"
        ("50 percent", "50%", True),
        # A comma separates thousands, or nothing.
        ("2,5", "25", False),
        ("1,000,000", "1000000", True),
        # Yes / no and choices said in a sentence.
        ("Yes, the triangle is isosceles", "Yes", True),
        ("No, it is not", "No", True),
        ("Not sure", "No", False),
        ("D is correct", "D", True),
        ("C is the answer", "C", True),
        ("C is the answer", "D", False),
        # A choice truth with the choice's text.
        ("A. 60°", "A. 60°", True),
        ("A", "(A) 60°", True),
        ("B", "A. 60°", False),
    ],
)
def test_answers_match(answer: str, truth: str, expected: bool) -> None:
    assert answers_match(answer, truth) is expected


@pytest.mark.parametrize(
    "response, truth, expected",
    [
        (FULL, "9", 1.0),
        (FULL, "8", 0.0),
        (MIXED_CASE, "B", 1.0),
        (MIXED_CASE, "C", 0.0),
        (SPACED, "2", 1.0),
        (UNICODE, "-5", 1.0),
        ("### the final answer is: \\frac{1}{2}", "0.5", 1.0),
        ("### The final answer is: 3 cm.", "3", 1.0),
        ("7", "7", 0.0),  # no header, no answer
        # A truncated response mentions the truth on the way: graded as a whole it scored 1.0.
        ("### Image Description: 3 red cubes and 5 blue balls.\n### Step 1: the balls number 5. Now", "5", 0.0),
        # An explanation on the answer line: its numbers are not the answer (graded whole, these scored the
        # other way round).
        ("### The final answer is: 4. This is because 2+1=3.", "3", 0.0),
        ("### The final answer is: 4. This is because 2+1=3.", "4", 1.0),
        ("### The final answer is: 5 (2 red and 3 blue)", "3", 0.0),
        ("### The final answer is: 5 (2 red and 3 blue)", "5", 1.0),
        # A full stop or semicolon before a number or a one-letter name ends no sentence: these were cut to
        # "x = 1", "1", "B" and "approx", so even the ground truth copied out scored 0.
        ("### The final answer is: x = 1; y = 2", "x=1; y=2", 1.0),
        ("### The final answer is: 1; 2; 3", "1; 2; 3", 1.0),
        ("### The final answer is: B. 60°", "60°", 1.0),
        ("### The final answer is: approx. 3.14", "3.14", 1.0),
        ("### The final answer is: 12; the rest is a guess", "12", 1.0),
        ("### The final answer is: B. The angle is 60°", "B", 1.0),
        ("### The final answer is: **3**", "3", 1.0),  # markdown around the answer
        ("### The final answer is: **B**", "B", 1.0),
        ("### The final answer is: `3`", "3", 1.0),
        ("### The final answer is: $$3$$", "3", 1.0),
        ("### The final answer is: \\(3\\)", "3", 1.0),
        ("### The final answer is: 5 cm²", "5", 1.0),  # a superscript is an exponent, not a digit
        ("### The final answer is: 3\n### The final answer is:", "3", 1.0),
        # LaTeX on the answer line is not an explanation: "\\;" is a space, "(\\pi + 1)" a factor, "5!" a factorial.
        ("### The final answer is: 2 (\\pi + 1)", "2", 0.0),
        ("### The final answer is: 2 (\\pi + 1)", "2\\pi + 2", 1.0),
        ("### The final answer is: \\frac{1}{2} (\\sin x + \\cos x)", "\\frac{1}{2}", 0.0),
        ("### The final answer is: 12\\; \\mathrm{cm}^2", "12 cm^2", 1.0),
        ("### The final answer is: 5! = 120", "5", 0.0),
        ("### The final answer is: A. 60°", "A. 60°", 1.0),  # the truth itself
        ("I think it is 8", "7", 0.0),
        (ONLY_HEADERS, "9", 0.0),
        ("", "9", 0.0),
    ],
)
def test_accuracy_reward(response: str, truth: str, expected: float) -> None:
    assert accuracy_reward(response, truth) == expected


def test_a_grader_that_runs_away_is_stopped() -> None:
    """mathruler's sympy computed 10000000! exactly to compare it with a fraction, for minutes, holding the whole
    batch's reward; each grader now has _GRADER_TIMEOUT_S (5 s) on the main thread."""
    import time

    start = time.perf_counter()
    assert accuracy_reward("### The final answer is: 10000000!", "\\frac{1}{2}") == 0.0
    assert time.perf_counter() - start < 30  # two graders of 5 s each, and their imports


def test_math_verify_is_not_asked_once_mathruler_ran_out_of_time(monkeypatch) -> None:
    """mathruler swallows its timeout and answers False; math-verify then spent its own 5 s on the same input."""
    monkeypatch.setattr(terms, "_GRADER_TIMEOUT_S", 1)
    asked = []
    monkeypatch.setattr(terms, "_math_verify_match", lambda *args: asked.append(args) or False)
    assert not answers_match("10000000!", "\\frac{1}{2}")
    assert asked == []
    assert answers_match("\\frac{2}{4}", "0.5") is True  # an answer in time is still graded


def test_a_10k_token_response_is_never_parsed_as_one_formula(monkeypatch) -> None:
    """Read as one LaTeX formula, 50 000 characters took math-verify 5 s; as free text, still seconds (quadratic,
    and without a time limit off the main thread). A line that long is no final answer: it is graded wrong
    before any parser sees it (_MAX_ANSWER_CHARS)."""
    parsed: list[str] = []
    real_parse = terms.mv_parse
    monkeypatch.setattr(terms, "mv_parse", lambda text, **kw: parsed.append(text) or real_parse(text, **kw))
    assert accuracy_reward(LONG, "9") == 1.0
    assert accuracy_reward("### The final answer is:\n" + "word " * 10_000, "9") == 0.0  # one long free-text line
    assert all(len(text) <= terms._MAX_ANSWER_CHARS for text in parsed)  # the long line reached no parser
    assert accuracy_reward("### The final answer is: \\sqrt{4}", "2") == 1.0  # a formula does reach it
    assert "$\\sqrt{4}$" in parsed  # (so the check below has something to check)
    assert all(len(text) <= terms._MAX_FORMULA_CHARS + 2 for text in parsed if text.startswith("$"))


@pytest.mark.parametrize(
    "answer, truth, expected",
    [
        # Words in LaTeX text macros: read for yes/no and choices (all three were 0 before).
        ("\\boxed{\\text{Yes}}", "Yes", 1.0),
        ("$\\text{No}$", "No", 1.0),
        ("\\textbf{Yes}", "No", 0.0),
        ("\\boxed{\\text{B}}", "B. 12 cm", 1.0),
        ("\\boxed{\\text{(B) } 12}", "B", 1.0),
        # Several different boxes are graded together: a hedge between answers is wrong.
        ("\\boxed{3} or \\boxed{5}", "5", 0.0),
        ("\\boxed{5}, that is \\boxed{5}", "5", 1.0),
        ("x = \\boxed{3}, y = \\boxed{5}", "3, 5", 1.0),
        # A unicode square root.
        ("√3/2", "\\frac{\\sqrt{3}}{2}", 1.0),
        ("2√(x+1)", "2\\sqrt{x+1}", 1.0),
        ("√2", "2", 0.0),
    ],
)
def test_answers_in_latex_words_boxes_and_root_signs(answer: str, truth: str, expected: float) -> None:
    assert accuracy_reward("### The final answer is: " + answer, truth) == expected


@pytest.mark.parametrize(
    "answer, truth, expected",
    [
        # Another answer offered after the first is a hedge (all of these were graded 1.0 on the first alone).
        ("5 (or 4)", "5", 0.0),
        ("5 (maybe 4)", "5", 0.0),
        ("5 (although it could be 4)", "5", 0.0),
        ("5. Or 4", "5", 0.0),
        ("\\boxed{5} (or 4)", "5", 0.0),
        ("B (or C)", "B", 0.0),
        ("\\boxed{B} (maybe C)", "B", 0.0),
        ("(B) or maybe (C)", "B", 0.0),
        ("Yes (or maybe no)", "Yes", 0.0),
        ("x = 2 (or x = -2)", "x=2", 0.0),
        # Words after the answer that offer none stay an explanation.
        ("5 (perhaps)", "5", 1.0),
        ("B. Or maybe not", "B", 1.0),
        ("Yes. Otherwise the angles differ", "Yes", 1.0),
        ("\\boxed{3}. It could also be found by counting", "3", 1.0),
        ("3 objects (the cubes)", "3", 1.0),
        ("5 (or 5)", "5", 1.0),
    ],
)
def test_a_second_answer_offered_after_the_first_is_a_hedge(answer: str, truth: str, expected: float) -> None:
    assert accuracy_reward("### The final answer is: " + answer, truth) == expected


@pytest.mark.parametrize("header", ["### **The final answer is:** 5", "### **The final answer is**: 5",
                                    "### __The final answer is__ 5"])
def test_a_final_answer_header_in_markdown_emphasis_keeps_its_answer(header: str) -> None:
    assert extract_final_answer(header) == "5" and accuracy_reward(header, "5") == 1.0
    assert extract_final_answer("### The final answer isn't 5") == ""  # "is" must end the header's words


@pytest.mark.parametrize("truth", [5, 5.0, None, ["5"]])
def test_a_ground_truth_that_is_not_a_string_is_named(truth) -> None:
    with pytest.raises(TypeError, match="ground truth must be a string"):
        accuracy_reward("### The final answer is: 5", truth)


@pytest.mark.parametrize("truth", ["  ", ".", "$$", "**", "` `"])
def test_accuracy_rejects_a_ground_truth_with_nothing_to_grade(truth: str) -> None:
    with pytest.raises(ValueError, match="ground truth is empty"):
        accuracy_reward(FULL, truth)


# ---- keyword recall --------------------------------------------------------------------------

@pytest.mark.parametrize(
    "key_words, expected",
    [
        (["red", "Square", "triangle"], 2 / 3),
        (["RED", "blue circle"], 1.0),
        (["green"], 0.0),
        (["red", "", "  "], 1.0),  # blank entries are ignored
        ([], 0.0),
        (None, 0.0),
    ],
)
def test_keyword_recall(key_words, expected: float) -> None:
    assert keyword_recall(FULL, key_words) == pytest.approx(expected, abs=1e-12)


def test_keyword_recall_counts_whole_words_and_plurals_only() -> None:
    # As substrings, "red" was found in "considered", "cat" in "indicated" and "one" in "none": recall 1.0.
    assert keyword_recall("We considered the indicated values; none apply.", ["red", "cat", "one"]) == 0.0
    assert keyword_recall("two apples and three boxes", ["apple", "box", "three"]) == 1.0
    assert keyword_recall("one apple", ["apples"]) == 0.0
    assert keyword_recall("a red-brown cube (red)", ["red", "brown"]) == 1.0
    # A stem plus "es" is another word unless the stem takes "es" as its plural: all three were 1.0.
    assert keyword_recall("he hates the notes on the cubes", ["hat", "not", "cub"]) == 0.0
    assert keyword_recall("glasses, tomatoes, photos, berries and keys", ["glass", "tomato", "photo", "berry",
                                                                           "key"]) == 1.0
    assert keyword_recall("a traffic-light", ["traffic light"]) == keyword_recall("a traffic light", ["traffic-light"])
    assert keyword_recall("a traffic light", ["traffic-light"]) == 1.0


def test_keyword_recall_finds_a_number_as_itself_only() -> None:
    """"3" was found in "3.5", "-3" and "3,000"."""
    assert keyword_recall("lengths 3.5 and -3 and 3,000 and 2.3", ["3"]) == 0.0
    assert keyword_recall("there are 3 cubes. It is 3.", ["3", "cubes"]) == 1.0
    assert keyword_recall("a 1.5 m pole", ["1.5"]) == 1.0


def test_keyword_recall_unicode_and_spacing() -> None:
    assert keyword_recall(UNICODE, ["café", "tea"]) == pytest.approx(1 / 2)
    assert keyword_recall("A traffic\n  light", ["Traffic Light"]) == 1.0
    assert keyword_recall("", ["red"]) == 0.0
    assert keyword_recall("Pascal\u2019s triangle", ["Pascal's triangle"]) == 1.0  # a curly apostrophe: 0


def test_keyword_recall_counts_a_repeated_key_word_once_and_finds_words_in_unspaced_scripts() -> None:
    assert keyword_recall("a red cube", ["cube", "Cube", "sphere"]) == pytest.approx(1 / 2)  # was 2 / 3
    assert keyword_recall("一只猫坐在桌子上", ["猫", "桌子", "狗"]) == pytest.approx(2 / 3)  # was 0
    assert keyword_recall("this is considered", ["red"]) == 0.0  # Latin words keep their boundaries
    # Ending in a length mark (ー) or a tone sign: they were found only before a space.
    assert keyword_recall("テーブルの上にコーヒーがある", ["コーヒー"]) == 1.0
    assert keyword_recall("ไม้สีแดง", ["ไม้"]) == 1.0


def test_keyword_recall_rejects_a_bare_string() -> None:
    with pytest.raises(TypeError, match="list of strings"):
        keyword_recall(FULL, "red")


# ---- length ----------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "length, max_length, expected",
    [(0, 512, 1.0), (100, 512, 1.0), (512, 512, 1.0), (513, 512, 512 / 513), (1024, 512, 0.5),
     (10_000, 512, 0.0512), (200, 100, 0.5)],
)
def test_length_reward(length: int, max_length: int, expected: float) -> None:
    assert length_reward(length, max_length) == pytest.approx(expected, abs=1e-12)


def test_length_reward_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="max_length"):
        length_reward(10, 0)
    with pytest.raises(ValueError, match="response_length"):
        length_reward(-1)
    with pytest.raises(ValueError, match="response_length must be >= 0, got nan"):  # it returned NaN
        length_reward(float("nan"))


# ---- image description and CLIP alignment ----------------------------------------------------

@pytest.mark.parametrize(
    "response, expected",
    [
        (FULL, "A red square and a blue circle."),
        (MIXED_CASE, "a cat"),
        (UNICODE, "Un CAFÉ ☕ et un 三角形."),
        ("### Image Description: a dog\n### Step 1: x", "a dog"),  # no Rationales: stop at next header
        ("### Image Description: only this", "only this"),
        (ONLY_HEADERS, ""),
        ("no headers at all", ""),
        # A repeated header was fed to CLIP as part of the caption.
        ("### Image Description:\nA\n### Image Description:\nB\n### Rationales: x", "A"),
        # A header repeated before any text gave "" (CLIP term 0) though a description followed.
        ("### Image Description:\n### Image Description: a red cube\n### Rationales: x", "a red cube"),
        # Markup of the headers' own is no part of the caption (it kept "#" and "**").
        ("#### Image Description: a red cube\n#### Rationales: r", "a red cube"),
        ("**### Image Description:** a red cube\n### Rationales: x", "a red cube"),
        # Without the Rationales header, a "####" sub-heading of the description ended it (caption "").
        ("### Image Description:\n#### Objects\n- a red cube\n### Step 1: x", "Objects\n- a red cube"),
        # ... while a response written with "####" headers throughout still ends it at its first step.
        ("#### Image Description: X\n#### Step 1: a\n#### The final answer is: 1", "X"),
        ("#### Image Description: X\n#### **Step 1:** a\n#### **The final answer is:** 1", "X"),  # bold
        ("### Image Description: X\n####\nStep 3 of the process", "X\n####\nStep 3 of the process"),  # its line
    ],
)
def test_extract_image_description(response: str, expected: str) -> None:
    assert extract_image_description(response) == expected


@pytest.mark.parametrize(
    "similarity, threshold, expected",
    [(0.9, 0.4, 1.0), (0.4, 0.4, 1.0), (0.2, 0.4, 0.5), (0.1, 0.4, 0.25), (0.0, 0.4, 0.0),
     (-0.3, 0.4, -0.75), (-1.0, 0.4, -2.5), (0.1, 0.2, 0.5)],  # negative s: s / 0.4 as the paper writes it
)
def test_clip_alignment_reward(similarity: float, threshold: float, expected: float) -> None:
    assert clip_alignment_reward(similarity, threshold) == pytest.approx(expected, abs=1e-12)


def test_clip_alignment_rejects_nan_and_bad_threshold() -> None:
    with pytest.raises(ValueError, match="not finite"):
        clip_alignment_reward(math.nan)
    with pytest.raises(ValueError, match="threshold"):
        clip_alignment_reward(0.3, threshold=0.0)
