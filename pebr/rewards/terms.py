"""The PeBR reward terms as pure functions of strings and numbers.

Each function scores one response and returns a float in [0, 1]. Nothing here imports torch, Ray
or a model: the CLIP similarity arrives as a number (see `pebr.rewards.clip` for the scorer), so the
whole file is testable in milliseconds.

The response format the prompt asks for (examples/format_prompt/, as in the paper) is::

    ### Image Description: ...
    ### Rationales: ...
    ### Let's think step by step.
    ### Step 1: ...
    ### The final answer is: <answer>

Headers are matched case-insensitively with any spacing after ``###``. The authors' release matched the
final-answer header case-sensitively and graded the whole response when it found none; both are defects
we do not repeat. Here a response without the header has no answer: a truncated or header-less response is not
searched for a number that happens to equal the ground truth.
"""

from __future__ import annotations

import contextlib
import math
import re
import signal
import threading
import unicodedata
from collections.abc import Iterator, Sequence
from decimal import Context, Decimal

from mathruler.grader import grade_answer
from math_verify import parse as mv_parse
from math_verify import verify as mv_verify

__all__ = [
    "format_reward",
    "extract_final_answer",
    "clean_answer",
    "answers_match",
    "accuracy_reward",
    "keyword_recall",
    "length_reward",
    "extract_image_description",
    "clip_alignment_reward",
]

_FLAGS = re.IGNORECASE
_DESCRIPTION = re.compile(r"###\s*image\s+description\s*:", _FLAGS)
_RATIONALES = re.compile(r"###\s*rationales\s*:", _FLAGS)
_STEP_ONE = re.compile(r"###\s*step\s*1\s*:", _FLAGS)
_FINAL_ANSWER = re.compile(r"###\s*the\s+final\s+answer\s+is\s*:", _FLAGS)
# Extraction also accepts the header without its colon ("### The final answer is 42"), or with a full-width one
# (Qwen drifting into Chinese writes "："); the format
# reward still requires the colon, so a sloppy header costs the format term, not the answer.
# Markdown emphasis around the header's words ("### **The final answer is:** 5") is read past too.
# (Whitespace is read once: "\s*[*_]*\s*" took quadratic time on a long run of spaces after "###".)
_FINAL_ANSWER_LOOSE = re.compile(r"###\s*(?:[*_]+\s*)?the\s+final\s+answer\s+is(?![^\W_])[*_]*\s*[:：]?[*_]*",
                                 _FLAGS)
_ANY_HEADER = re.compile(r"###")

_REQUIRED_HEADERS = (_DESCRIPTION, _RATIONALES, _STEP_ONE, _FINAL_ANSWER)

# A multiple-choice ground truth: one capital letter, optionally bracketed, optionally a full stop, optionally
# followed by the choice's text ("A. 60°", "(B) 12 cm").
_CHOICE_TRUTH = re.compile(r"^[(\[]?\s*([A-Z])\s*(?:[)\]]?\s*\.?$|[)\].:]\s+\S)")
# A choice in an answer: "B", "(B)", "[B]", "B.", "B) 12 cm", "B 12 cm", "Option B: ...", "The answer is B".
# A capital letter followed by a lower-case word is an article or pronoun ("A triangle", "I think B"), and
# a lower-case letter counts only when it is the whole answer ("a triangle" is not choice A).
_CHOICE_ANSWER_UPPER = re.compile(
    r"^(?:(?i:(?:the\s+)?(?:correct\s+)?(?:option|choice|answer)(?:\s+is)?)\s*:?\s*)?"
    r"[(\[]?\s*([A-Z])\s*[)\]]?(?:[.:,)]|\s+(?![a-z])|$|\s+is\s+(?:the\s+)?(?:correct|right|answer|best)\b)"
)
_CHOICE_ANSWER_LOWER = re.compile(r"^[(\[]?\s*([a-z])\s*[)\]]?\.?$")
# Two choices or more ("A, B, C, D", "A or B", "(A)/(B)", "A B C D", "(A)(B)"): a hedge, wrong whatever the
# truth. Without a separator the second letter must stand alone ("(B) A circle" names choice B).
_SEVERAL_CHOICES = re.compile(
    r"^[(\[]?\s*[A-Z]\s*[)\]]?\s*(?:(?:[,/&]|(?i:or|and)\b)(?:\s*(?i:maybe|perhaps|possibly)\b)?\s*[(\[]?\s*[A-Z]\s*[)\]]?"
    r"(?:[.:,)]|\s|$)"
    r"|[(\[]?\s*[A-Z]\s*[)\]]?(?:[.:,)]|\s*$|\s+(?=[(\[]?[A-Z](?![a-z]))))")
# Where an answer line goes on to explain itself: a sentence ends before a word, a parenthesis with words in it
# opens, or a clause starts with "because" / "since". Only what comes before is the answer: graded whole,
# "4. This is because 2+1=3" counted as 3, since math-verify keeps the last number it finds. A full stop or
# semicolon before a number or a one-letter name does not end the answer ("x = 1; y = 2", "B. 60°",
# "approx. 3.14"). LaTeX is not prose: "\\;" is a space, "5!" a factorial and "(\\pi + 1)" a factor.
_EXPLANATION = re.compile(
    r"(?<!\\)[.。;?]\s+(?=[^\W\d_]{2})|(?<![\\\d])!\s+|\s+\((?=[^)]{0,200}?(?<![\\A-Za-z])[A-Za-z]{2,}\s)"
    r"|,?\s+(?i:because|since)\b")
# Words after an answer that offer another one instead ("5 (or 4)", "B. Maybe C", "3, although it could be 4"),
# up to where that other answer starts.
_HEDGE = re.compile(r"^[\s.,;:(\u2014\u2013-]*(?i:or|maybe|perhaps|possibly|alternatively|otherwise|although|though|"
                    r"could|might)\b(?:\s+(?i:maybe|perhaps|possibly|it|this|that|could|might|also|even|be|is|was))*")
# Categories of a key word's edge character in scripts without spaces between words (letters, length marks,
# vowel and tone signs): no word boundary is required there.
_SPACELESS = frozenset({"Lo", "Lm", "Mn", "Mc"})
_WORD_HYPHEN = re.compile(r"(?<=[^\W\d_])-(?=[^\W\d_])")
# A number alone, in decimal or scientific notation ("1,000", "-0.25", "1.6e-19", "9.1 \\times 10^{-31}"; a bare
# exponent is read whole, as plain text means it: "10^-19").
_PLAIN_NUMBER = re.compile(
    r"^(?P<mantissa>[-+]?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|\.\d+))"
    r"(?:\s*[eE](?P<e>[-+]?\d+)|\s*(?:\\times|\\cdot|\*)\s*10\s*\^\s*(?:\{\s*(?P<braced>[-+]?\d+)\s*\}|(?P<bare>[-+]?\d+)))?$")
# Room for any number _PLAIN_NUMBER reads (256 digits, an exponent up to 10 000), computed exactly.
_EXACT = Context(prec=400, Emax=20_000, Emin=-20_000)
# A number and what follows it ("20 m/s", "8 \\text{ cm}^2", "30°"), and the unit's markup.
# Commas only as thousands separators ("1,000"): "2,5" is not 25.
_NUMBER_UNIT = re.compile(r"^(?P<number>[-+]?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|\.\d+))\s*(?P<unit>.*)$")
_UNIT_MARKUP = re.compile(r"\\(?:text|mathrm)\s*\{|[{}\s]|\\[,;!]")
# A unit: common SI-style base units with exponents, joined by / or a product sign ("m/s^2", "kg·m", "cm^2").
# Named, not guessed: "2x" is an expression, not 2 of a unit x.
_UNIT = re.compile(r"^(?:(?:k|c|m|µ|n)?(?:m|g|s|l|L|N|J|W|V|A|Pa|Hz)|h|min|mL|ml|mol|K|°C|°F|°|%|rad|deg)"
                   r"(?:\^-?\d)?(?:[/·*](?:(?:k|c|m)?(?:m|g|s|l|L)|h|min|mol|K)(?:\^-?\d)?)*$")
# Spellings of one unit.
_UNIT_ALIASES = {"deg": "°", "degree": "°", "degrees": "°", "ml": "mL", "l": "L", "percent": "%"}
# What is counted, after a count ("3 objects", "7 birds", "5 (units)"): up to four words of two letters or more.
_COUNTED = re.compile(r"^\(?\s*(?P<words>[A-Za-z]{2,}(?:\s+[A-Za-z]{2,}){0,3})\s*\)?$")
# Words after a number that change its value or hedge it ("2 pi", "3 or more", "5 hundred"): not what is counted.
_NOT_COUNTED = frozenset(
    "pi times plus minus over divided squared cubed sqrt root hundred thousand million billion trillion dozen "
    "half halves third thirds quarter quarters fourth fourths fifth fifths tenth tenths or and to more less than "
    "at least most about approximately around nearly almost over under per by of".split())
_YES_NO = frozenset({"yes", "no", "true", "false"})
# Both words at once ("Yes or no", "yes/no", "No, yes", "True or False"), not "Yes, no doubt".
_YES_NO_HEDGE = re.compile(r"^\W*(yes|no|true|false)\W*(?:(?:or|and)\W+)?(yes|no|true|false)\b(?!\s+[A-Za-z])",
                           re.IGNORECASE)
# Points named by capital letters, in an answer about a figure ("AB", "\\angle ABC", "∠ABC", "\\triangle ABC").
_FIGURE_MARKERS = re.compile(
    r"\\(?:angle|triangle|overline|overrightarrow|widehat|measuredangle)|[∠△$\s{}]|\\[,;!]")
_TRIANGLE = re.compile(r"\\triangle|△")
# A well-formed roman numeral (1-3999): "LC" and "DM" are segments, not numerals.
_ROMAN = re.compile(r"^M{0,3}(?:CM|CD|D?C{0,3})(?:XC|XL|L?X{0,3})(?:IX|IV|V?I{0,3})$")
# LaTeX that wraps words ("\\text{Yes}", "\\textbf{B}"): its content is what a yes/no or a choice is read from.
_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mathit|operatorname)\s*\{([^{}]*)\}")
# A square root sign and what it takes: a bracketed group, a number or one letter ("√3", "2√(x+1)").
_ROOT_SIGN = re.compile(r"√\s*(?:\(([^()]*)\)|\{([^{}]*)\}|(\d+(?:\.\d+)?|[A-Za-z]))")

# Signs and symbols that NFKC leaves alone but graders do not understand.
_UNICODE_FIXES = str.maketrans({"\u2212": "-", "\u2013": "-", "\u00d7": "\\times ", "\u00b7": "\\cdot ",
                                "\u221e": "\\infty "})
# Superscript digits, made exponents before NFKC would turn "cm²" into "cm2".
_SUPERSCRIPTS = str.maketrans({sup: f"^{digit}" for sup, digit in zip("⁰¹²³⁴⁵⁶⁷⁸⁹", "0123456789")})
# Markdown around an answer ("**3**", "`B`") and LaTeX display delimiters ("$$3$$", "\[3\]", "\(3\)").
_WRAPPERS = (("**", "**"), ("__", "__"), ("`", "`"), ("*", "*"), ("$$", "$$"), ("\\[", "\\]"), ("\\(", "\\)"),
             ("$", "$"))
# A display-math block opened on its own line after the header: its lines up to the closing delimiter.
_DISPLAY_OPEN = {"$$": "$$", "\\[": "\\]"}
# Seconds a grader may spend on one comparison (sympy can be slow on adversarial expressions).
_GRADER_TIMEOUT_S = 5
# Answers longer than this are free text (a response without the final-answer header): math-verify
# then reads them in its extraction mode; as one LaTeX formula they would hit the timeout instead.
_MAX_FORMULA_CHARS = 256


def format_reward(response: str) -> float:
    """1.0 if the response contains all four required headers, else 0.0.

    Args:
        response: the decoded response text.

    Returns:
        1.0 when ``### Image Description:``, ``### Rationales:``, ``### Step 1:`` and
        ``### The final answer is:`` all occur (any case, any spacing after ``###``), else 0.0.
    """
    return float(all(pattern.search(response) for pattern in _REQUIRED_HEADERS))


def extract_final_answer(response: str) -> str:
    """The answer the response commits to.

    The text after the last ``### The final answer is:`` header that has one, up to the end of its line;
    if that line is empty the next non-empty line is taken (models often break the line after the header),
    and a display-math block opened there (``$$`` or ``\\[`` on its own line) is read to its closing
    delimiter. A header with nothing after it before the next one (or the end) does not void an earlier
    answer. Without the header there is no answer. A ``\\boxed{...}`` inside the answer is unwrapped; the
    contents of several different boxes are joined with ", ". An explanation after the answer is dropped, but
    a second answer offered there ("5 (or 4)", "B. Maybe C") is joined to the first the same way ("5, 4").

    Args:
        response: the decoded response text.

    Returns:
        The answer text, stripped; "" when there is none.
    """
    headers = list(_FINAL_ANSWER_LOOSE.finditer(response))
    ends = [h.start() for h in headers[1:]] + [len(response)]
    answer = ""
    for header, end in reversed(list(zip(headers, ends))):
        answer = _first_answer_line(response[header.end():end])
        if answer:
            break
    boxed, after = _boxed_contents(answer) if "\\boxed{" in answer else ([], 0)
    if boxed:
        # Several different boxes ("\\boxed{3} or \\boxed{5}") are graded together, not the last alone,
        # so that hedging between answers is not rewarded.
        head, rest = ", ".join(dict.fromkeys(boxed)), answer[after:]
    else:
        explanation = _EXPLANATION.search(answer)
        cut = explanation.start() if explanation else len(answer)
        head, rest = answer[:cut].strip(), answer[cut:]
    other = _hedged_alternative(rest)
    # "5 (or 4)", "\\boxed{B} (maybe C)": both answers are graded, as a hedge, not the first alone.
    return f"{head}, {other}" if other and other.casefold() != head.casefold() else head


def _hedged_alternative(rest: str) -> str | None:
    """The other answer that the words after an answer offer ("(or 4)", ". Maybe 4", ", although it could be 4");
    None when they offer none (an explanation, or "(perhaps)")."""
    hedge = _HEDGE.match(rest)
    if hedge is None:
        return None
    other = re.split(r"[)\]]|[.;!?](?:\s|$)", rest[hedge.end():], maxsplit=1)[0].strip(" ,:")
    # A short answer-like rest ("4", "C", "no", "x = 2"), not a clause ("although the figure is blurry").
    return other if other and len(other.split()) <= 3 else None


def _boxed_contents(text: str) -> tuple[list[str], int]:
    """The stripped contents of every closed ``\\boxed{...}`` in `text`, in order (braces balanced), and where
    the last one ends."""
    contents, start, end = [], text.find("\\boxed{"), 0
    while start >= 0:
        depth, i = 1, start + len("\\boxed{")
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth:  # unclosed: nothing after it is boxed either
            break
        contents.append(text[start + len("\\boxed{"):i - 1].strip())
        start, end = text.find("\\boxed{", i), i
    return contents, end


def _first_answer_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines()]
    lines = lines[:next((i for i, line in enumerate(lines) if i and line.startswith("###")), len(lines))]
    lines = lines[next((i for i, line in enumerate(lines) if line), len(lines)):]
    if not lines:
        return ""
    close = _DISPLAY_OPEN.get(lines[0])
    if close is None:
        return lines[0]
    body = lines[1:lines.index(close, 1)] if close in lines[1:] else lines[1:]
    return " ".join(line for line in body if line)


def clean_answer(text: str) -> str:
    """An answer or ground truth as the graders see it: unicode normalised; spacing, markdown emphasis, math
    delimiters, invisible format characters and a final full stop removed. "" when nothing else is left."""
    text = unicodedata.normalize("NFKC", text.translate(_SUPERSCRIPTS)).translate(_UNICODE_FIXES)
    # Invisible format characters (a zero-width space, a byte-order mark) are no part of an answer.
    text = "".join(char for char in text if unicodedata.category(char) != "Cf").strip()
    text = _ROOT_SIGN.sub(lambda m: "\\sqrt{%s}" % next(g for g in m.groups() if g is not None), text)
    text = text.rstrip("。.").strip()
    unwrapped = True
    while unwrapped:
        unwrapped = False
        for left, right in _WRAPPERS:
            if len(text) > len(left) + len(right) and text.startswith(left) and text.endswith(right):
                text, unwrapped = text[len(left):len(text) - len(right)].strip().rstrip("。.").strip(), True
                break
    return text if text.strip("$*`_") else ""


def _plain_words(text: str) -> str:
    """`text` with LaTeX word wrappers and math delimiters removed: "\\text{Yes}" -> "Yes"."""
    previous = None
    while previous != text:  # nested: "\\textbf{\\text{B}}"
        previous, text = text, _TEXT_WRAPPER.sub(r"\1", text)
    return text.replace("$", "").strip()


def _choice_letter(answer: str) -> str | None:
    """The one choice an answer names; "" for several (a hedge); None when it names none."""
    answer = _plain_words(answer).replace("**", "").replace("__", "")  # "**B** 12 cm", "\\text{(B) } 12"
    if _SEVERAL_CHOICES.match(answer):
        return ""
    match = _CHOICE_ANSWER_UPPER.match(answer)
    if match and match.group(1).isupper():
        return match.group(1)
    match = _CHOICE_ANSWER_LOWER.match(answer)
    return match.group(1).upper() if match else None


def _point_names(text: str) -> tuple[str, str] | None:
    """(capital letters, kind) of an answer in capital letters: kind "triangle", or "path" (a segment, or an
    angle marked as one); a bare roman numeral is kind "roman", and three or more bare letters kind "word"
    (an acronym such as "USA" as much as an angle). None for anything else."""
    letters = _FIGURE_MARKERS.sub("", text)
    if len(letters) < 2 or not letters.isascii() or not letters.isalpha() or not letters.isupper():
        return None
    if _TRIANGLE.search(text):
        return letters, "triangle"
    if letters == text and _ROMAN.match(letters):
        return letters, "roman"
    return letters, "path" if letters != text.strip() or len(letters) == 2 else "word"


def _same_figure(answer: tuple[str, str], truth: tuple[str, str]) -> bool:
    """A segment or marked angle read either way (AB = BA, ∠ABC = ∠CBA, not ∠BAC); a triangle in any order;
    two roman numerals or bare words as written (IV is not VI, ASU is not USA; LC is no numeral, so it is CL)."""
    (given, given_kind), (wanted, wanted_kind) = answer, truth
    if "triangle" in (given_kind, wanted_kind):
        return len(given) == len(wanted) and sorted(given) == sorted(wanted)
    if given_kind == wanted_kind == "roman" or "path" not in (given_kind, wanted_kind):
        return given == wanted
    return given in (wanted, wanted[::-1])


def _leading_word(text: str) -> str:
    match = re.match(r"\W*([A-Za-z]+)", text)
    return match.group(1).casefold() if match else ""


def _number_and_unit(text: str) -> tuple[float, str] | None:
    """(value, unit without markup) of "20 m/s", "8 \\text{ cm}^2", "2.5", "3 objects"; None for anything else."""
    match = _NUMBER_UNIT.match(text)
    if match is None:
        return None
    unit = _UNIT_MARKUP.sub("", match["unit"].strip("() ")).replace("\\cdot", "·")
    unit = _UNIT_ALIASES.get(unit, unit)
    if unit and not _UNIT.match(unit):  # not a unit: what is counted, or not a quantity
        counted = _COUNTED.match(match["unit"])
        words = counted["words"].lower().split() if counted else []
        if not words or _NOT_COUNTED.intersection(words):
            return None
        unit = " ".join(words)
    try:
        return float(match["number"].replace(",", "")), unit
    except ValueError:
        return None


def _plain_number(text: str) -> Decimal | None:
    """The exact value of `text` when it is a number and nothing else (see _PLAIN_NUMBER), else None. Decimal,
    not float: two 400-digit numbers would both be inf, and equal."""
    match = _PLAIN_NUMBER.match(text)
    if match is None or len(text) > _MAX_FORMULA_CHARS:
        return None
    exponent = int(next((g for g in (match["e"], match["braced"], match["bare"]) if g is not None), "0"))
    if abs(exponent) > 10_000:  # "1e999999999": left to the graders (and their time limit)
        return None
    return Decimal(match["mantissa"].replace(",", "")).scaleb(exponent, _EXACT)


def _same_number(a: Decimal, b: Decimal) -> bool:
    """Equal to nine significant digits (a float's rounding, "0.1 + 0.2", stays equal)."""
    return abs(a - b) <= Decimal("1e-9") * max(abs(a), abs(b))


def _other_units(answer: str, ground_truth: str) -> bool:
    """Both are a number with a unit, and the units differ ("3 m" and "3 cm"), which the graders, stripping
    units, would call equal."""
    given, wanted = _number_and_unit(answer), _number_and_unit(ground_truth)
    return given is not None and wanted is not None and bool(given[1]) and bool(wanted[1]) and given[1] != wanted[1]


def _same_quantity(answer: str, ground_truth: str) -> bool:
    """Equal numbers with the same unit, or with a unit on one side only. The graders strip some units
    (cm, degrees) but not others (m/s, \\text{cm}^2), and an answer without its unit is read alike for all;
    what a count counts is a unit here ("3 objects" for "3")."""
    given, wanted = _number_and_unit(answer), _number_and_unit(ground_truth)
    if given is None or wanted is None or not math.isclose(given[0], wanted[0], rel_tol=1e-9, abs_tol=1e-12):
        return False
    return not given[1] or not wanted[1] or given[1] == wanted[1]


@contextlib.contextmanager
def _time_limit(seconds: float) -> Iterator[list[bool]]:
    """Raise TimeoutError in the block after `seconds` (SIGALRM: on the main thread only; elsewhere no limit).
    mathruler's sympy has no limit of its own: "10000000!" against a fraction ran for minutes. Yields a list
    that holds True once the time ran out (mathruler may swallow the error and answer False)."""
    fired = [False]
    if threading.current_thread() is not threading.main_thread():
        yield fired
        return

    def out_of_time(signum: int, frame: object) -> None:
        fired[0] = True
        raise TimeoutError(f"the grader took more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, out_of_time)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield fired
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _math_verify_match(answer: str, ground_truth: str) -> bool:
    # math-verify times out with SIGALRM, which only the main thread may use; elsewhere (a threaded
    # Ray actor, a thread pool) run without its timeout rather than fail.
    timeout = _GRADER_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
    # Wrapping a short answer in $...$ makes math-verify read bare LaTeX ("2\pi", "\sqrt{2}") as
    # one formula instead of pulling the first number out of it.
    def as_formula(text: str) -> str:
        return f"${text}$" if len(text) <= _MAX_FORMULA_CHARS and "$" not in text else text

    try:
        gold = mv_parse(as_formula(ground_truth), parsing_timeout=timeout)
        pred = mv_parse(as_formula(answer), parsing_timeout=timeout)
        return bool(gold) and bool(pred) and bool(mv_verify(gold, pred, timeout_seconds=timeout))
    except Exception:  # noqa: BLE001 - an unparsable answer is a wrong answer, not a crash
        return False


def answers_match(answer: str, ground_truth: str) -> bool:
    """Whether an extracted answer equals the ground truth, mathematically.

    Multiple-choice ground truths (one capital letter, bracketed or not) are compared by letter.
    Everything else goes to two maintained graders and counts as correct when either accepts:
    mathruler (PRM800K-style normalisation plus sympy; strips units such as cm and degrees, ``%``,
    ``\\text{}``) and math-verify (LaTeX-aware parsing with numeric tolerance; handles unicode
    minus, trailing words such as "3 kg").

    Args:
        answer: the extracted answer (see `extract_final_answer`).
        ground_truth: the reference answer of the record.

    Returns:
        True when the answer is judged correct.

    Raises:
        TypeError: if the ground truth or the answer is not a string.
        ValueError: if the ground truth is empty.
    """
    for name, value in (("ground truth", ground_truth), ("answer", answer)):
        if not isinstance(value, str):
            raise TypeError(f"the {name} must be a string, got {type(value).__name__} {value!r}")
    truth = clean_answer(ground_truth)
    if not truth:
        raise ValueError(f"ground truth is empty ({ground_truth!r}); every record needs an answer")
    given = clean_answer(answer)
    if not given:
        return False
    choice = _CHOICE_TRUTH.match(truth)
    if choice:
        letter = _choice_letter(given)
        if letter is not None:
            return letter == choice.group(1)
    if given.casefold() == truth.casefold():
        return True
    plain_truth = _plain_words(truth).casefold()
    if plain_truth in _YES_NO:  # "Yes, the triangle is isosceles" or "\\text{Yes}" for "Yes"
        words = _plain_words(given)
        hedge = _YES_NO_HEDGE.match(words)  # "Yes or no", "yes/no", "True or False": both, so neither
        return _leading_word(words) == plain_truth and not (hedge and hedge[1].casefold() != hedge[2].casefold())
    numbers = _plain_number(given), _plain_number(truth)
    if None not in numbers:  # both graders call any two numbers within 1e-6 or 1e-7 equal: 1.6e-19 and 1.7e-19
        return _same_number(*numbers)
    names = _point_names(given), _point_names(truth)
    if None not in names:  # the graders read "BAC" as the product B*A*C, equal to "ABC"
        return _same_figure(*names)
    if _other_units(given, truth):
        return False
    out_of_time = [False]
    try:
        with _time_limit(_GRADER_TIMEOUT_S) as out_of_time:
            if grade_answer(given, truth):
                return True
    except Exception:  # noqa: BLE001 - mathruler raises on some malformed LaTeX (or ran out of time): no match
        pass
    if out_of_time[0]:  # "10000000!": math-verify would spend its own seconds on it too
        return _same_quantity(given, truth)
    return _math_verify_match(given, truth) or _same_quantity(given, truth)


def accuracy_reward(response: str, ground_truth: str) -> float:
    """1.0 if the response's final answer matches the ground truth, else 0.0.

    Args:
        response: the decoded response text.
        ground_truth: the reference answer of the record.

    Returns:
        1.0 or 0.0.

    Raises:
        ValueError: if the ground truth is empty.
    """
    return float(answers_match(extract_final_answer(response), ground_truth))


def _squash(text: str) -> str:
    # A hyphen between letters reads as a space: "traffic-light" mentions "traffic light", and the other way.
    return _WORD_HYPHEN.sub(" ", " ".join(unicodedata.normalize("NFKC", text).casefold().split()))


def keyword_recall(response: str, key_words: Sequence[str] | None) -> float:
    """Fraction of the key words that the response mentions.

    A key word counts as mentioned when it occurs in the response as a whole word or phrase, ignoring case,
    runs of whitespace and hyphens between letters (so "traffic  Light" and "traffic-light" match "traffic
    light"), also with its regular English plural ("apples", "boxes", "berries"); "red" inside "considered" is
    not a mention, nor "hat" in "hates", nor a number inside another ("3" in "3.5", "-3" or "3,000"). In scripts
    without spaces between words (Chinese, Japanese, Thai) a key word counts wherever it occurs. Blank and
    repeated entries are ignored.

    Args:
        response: the decoded response text.
        key_words: the record's key words (objects and attributes in the image); None or empty
            gives 0.

    Returns:
        found / total in [0, 1]; 0.0 when there are no (non-blank) key words.

    Raises:
        TypeError: if key_words is a single string (it would be read as a list of characters).
    """
    if key_words is None:
        return 0.0
    if isinstance(key_words, str):
        raise TypeError(f"key_words must be a list of strings, got the string {key_words!r}")
    words = list(dict.fromkeys(_squash(str(word)) for word in key_words))  # a repeated key word counts once
    words = [word for word in words if word]
    if not words:
        return 0.0
    text = _squash(response)
    return sum(_mentions(text, word) for word in words) / len(words)


def _mentions(text: str, word: str) -> bool:
    # Scripts written without spaces between words (CJK, Thai) have no word boundary to look for, so there a
    # key word's edge may touch other letters: its edge is one of their letters (Lo), a length mark ("ー", Lm)
    # or a vowel or tone sign ("ไม้", Mn/Mc).
    left = "" if unicodedata.category(word[0]) in _SPACELESS else r"(?<!\w)"
    if word[0].isdigit():  # "3" is not mentioned by "-3", "2.3" or "1,3"
        left += r"(?<!-)(?<!\d[.,])"
    if unicodedata.category(word[-1]) in _SPACELESS:
        body, right = re.escape(word), ""
    elif word[-1].isdigit():  # nor by "3.5" or "3,000"
        body, right = re.escape(word), r"(?!\w|[.,]\d)"
    else:
        body, right = _with_plural(word), r"(?!\w)"
    return re.search(left + body + right, text) is not None


def _with_plural(word: str) -> str:
    """A pattern for `word` and its regular English plural: "cube(s)", "box(es)", "berry/berries"; "hat" does not
    match "hates", nor "cub" "cubes"."""
    if re.search(r"[^aeiou\W]y$", word):
        return re.escape(word[:-1]) + "(?:y|ies)"
    if re.search(r"(?:[sxz]|ch|sh)$", word):
        return re.escape(word) + "(?:es)?"
    return re.escape(word) + ("(?:e?s)?" if word.endswith("o") else "s?")


def length_reward(response_length: int, max_length: int = 512) -> float:
    """1.0 for responses of at most max_length tokens, else max_length / response_length.

    Args:
        response_length: number of response tokens.
        max_length: the length up to which no penalty applies.

    Returns:
        A float in (0, 1].

    Raises:
        ValueError: if max_length is not positive or response_length is negative.
    """
    if max_length <= 0:
        raise ValueError(f"max_length must be positive, got {max_length}")
    if not response_length >= 0:  # NaN too
        raise ValueError(f"response_length must be >= 0, got {response_length}")
    if response_length <= max_length:
        return 1.0
    return max_length / response_length


def extract_image_description(response: str) -> str:
    """The caption: the text between ``### Image Description:`` and ``### Rationales:``.

    It ends early at a repeated description header (the header is no part of a caption); a header repeated
    before any text is read past, so the text after the second one is the caption. If the Rationales header is
    missing, the caption runs to the next ``###`` header (or the end).

    Args:
        response: the decoded response text.

    Returns:
        The description, stripped; "" when the description header is absent.
    """
    for start in _DESCRIPTION.finditer(response):
        rest = response[start.end() :]
        ends = [match.start() for match in (_RATIONALES.search(rest), _DESCRIPTION.search(rest)) if match]
        if not ends:
            ends = [match.start() for match in (_ANY_HEADER.search(rest),) if match]
        # Markup left by a header's own ("**### Image Description:**", "#### Rationales") is no part of it.
        caption = rest[: min(ends, default=len(rest))].strip().strip("#*").strip()
        if caption:  # a header repeated before any text ("stutter") does not void the description after it
            return caption
    return ""


def clip_alignment_reward(similarity: float, threshold: float = 0.4) -> float:
    """Map an image-caption cosine similarity to a reward, as the paper writes it.

    r = 1 if s >= threshold, else s / threshold. A caption whose similarity is negative (further from
    the image than an unrelated one) gets a negative reward, down to -1 / threshold, rather than the
    0 of an empty description.

    Args:
        similarity: cosine similarity s in [-1, 1].
        threshold: similarity at which the reward saturates (0.4 in the paper).

    Returns:
        A float in [-1 / threshold, 1].

    Raises:
        ValueError: if similarity is not finite or threshold is not positive.
    """
    if threshold <= 0:
        raise ValueError(f"clip threshold must be positive, got {threshold}")
    if not math.isfinite(similarity):
        raise ValueError(f"CLIP similarity is not finite: {similarity}")
    if similarity >= threshold:
        return 1.0
    return similarity / threshold
