"""The PeBR reward terms as pure functions of strings and numbers.

Each function scores one response and returns a float in [0, 1], but for the CLIP term, which follows the
paper's s / 0.4 below the threshold and so is negative for a negative similarity. Nothing here imports torch, Ray
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
# Where a description without a Rationales header ends: the next "###" header, or a deeper one that starts a step
# or the answer on its line ("#### Step 1:", "#### **The final answer is:**"); a "#### Objects" sub-heading inside
# the description does not end it.
# (Read once from the start of a run of "#"s: a long run is not scanned again from each of its characters.)
_ANY_HEADER = re.compile(r"(?<!#)(?:###(?!#)|#{3,}+[ \t]*+(?:[*_]++[ \t]*+)?"
                         r"(?:step\s*+\d|the\s++final\s++answer|let'?s\s++think))", _FLAGS)

_REQUIRED_HEADERS = (_DESCRIPTION, _RATIONALES, _STEP_ONE, _FINAL_ANSWER)

# A multiple-choice ground truth: one capital letter, optionally bracketed, optionally a full stop, optionally
# followed by the choice's text ("A. 60°", "(B) 12 cm").
_CHOICE_TRUTH = re.compile(r"^[(\[]?\s*([A-Z])\s*(?:[)\]]?\s*\.?$|[)\].:]\s+\S)")
# The words that introduce an answer ("The correct answer is", "Option", "Answer:", "Final answer:"), read past
# once before a choice or a yes/no is looked for: the hedge patterns below then see "(B), (C)" in "Answer: (B),
# (C)" just as they see it bare. Possessive, so a long run of spaces after "answer" is read once.
_ANSWER_LEAD_IN = re.compile(
    r"^(?:the\s++)?(?:(?:correct|final|right|best)\s++)?(?:options?|choices?|answers?)(?:\s++(?:is|are))?"
    r"(?![^\W_])\s*+[:：]?\s*+", _FLAGS)
# The choice patterns below run on an answer whose whitespace runs are single spaces (see _choice_letter), and
# every whitespace quantifier in them is possessive: "A" + 2 000 spaces + "x" took them 11 s (cubic backtracking
# between "\s*" pieces), 20 000 spaces over five minutes.
# A choice in an answer: "B", "(B)", "[B]", "B.", "B) 12 cm", "B 12 cm", "D is correct".
# A capital letter followed by a lower-case word is an article or pronoun ("A triangle", "I think B"), and
# a lower-case letter counts only when it is the whole answer ("a triangle" is not choice A).
_CHOICE_ANSWER_UPPER = re.compile(
    r"^[(\[]?+\s*+([A-Z])(?:\s*+[)\]])?"
    r"(?:[.:,)]|$|\s++(?![a-z])|\s++is\s++(?:the\s++)?(?:correct|right|answer|best)\b)")
_CHOICE_ANSWER_LOWER = re.compile(r"^[(\[]?+\s*+([a-z])(?:\s*+[)\]])?\.?$")
# Two choices or more ("A, B, C, D", "A or B", "B, or C", "(A)/(B)", "A B C D", "(A)(B)"): a hedge, wrong
# whatever the truth. Without a separator the second letter must stand alone ("(B) A circle" names choice B).
_SEVERAL_CHOICES = re.compile(
    r"^[(\[]?+\s*+[A-Z](?:\s*+[)\]])?\s*+"
    r"(?:(?:[,/&]\s*+(?:(?i:or|and)\b\s*+)?|(?i:or|and)\b\s*+)(?:(?i:maybe|perhaps|possibly)\b\s*+)?"
    r"[(\[]?+\s*+[A-Z](?:\s*+[)\]])?(?:[.:,)]|\s|$)"
    r"|[(\[]?+\s*+[A-Z](?:\s*+[)\]])?(?:[.:,)]|\s*+$|\s++(?=[(\[]?[A-Z](?![a-z]))))")
# What a clause says of another answer, offered as right too: "C is also possible", "4 could be correct".
_CLAIM = (r"\s(?i:is|are|could|might|may|would)(?:\s(?i:also|equally|even|be)\b)*+\s"
          r"(?i:possible|plausible|likely|correct|right|valid|true|acceptable)\b")
# The other answer such a clause names: one to three words.
_OTHER = r"[^\s.,;()]++(?:\s[^\s.,;()]++){0,2}?"
# Where an answer line goes on to explain itself: a sentence ends before a word, a parenthesis with words in it
# opens, or a clause starts with "because" / "since" (or ", but" / ", though", which may offer another answer).
# Only what comes before is the answer: graded whole, "4. This is because 2+1=3" counted as 3, since
# math-verify keeps the last number it finds. A full stop or semicolon before a number or a one-letter name does
# not end the answer ("x = 1; y = 2", "B. 60°", "approx. 3.14") unless a claim follows ("B. C is also
# possible"). LaTeX is not prose: "\\;" is a space, "5!" a factorial and "(\\pi + 1)" a factor. A run of spaces is
# entered at its start only ("(?<!\s)"), and the answer line's runs are single spaces anyway: "1" + 40 000 spaces
# + "x" took it 20 s, each space of the run a new start for "\s+".
_EXPLANATION = re.compile(
    r"(?<!\\)[.。;?]\s++(?=[^\W\d_]{2}|" + _OTHER + _CLAIM + r")|(?<![\\\d])!\s+"
    r"|(?<!\s)\s++\((?=[^)]{0,200}?(?<![\\A-Za-z])[A-Za-z]{2,}\s)"
    r"|(?:,|(?<!\s))\s++(?i:because|since)\b|,\s*+(?i:but|though|although)\b")
# Words after an answer that offer another one instead ("5 (or 4)", "B. Maybe C", "3, although it could be 4"),
# up to where that other answer starts.
_HEDGE = re.compile(r"^[\s.,;:(\u2014\u2013-]*(?i:or|maybe|perhaps|possibly|alternatively|otherwise|although|though|"
                    r"could|might)\b(?:\s+(?i:maybe|perhaps|possibly|it|this|that|could|might|also|even|be|is|was))*")
# A clause after an answer that names another as right too (", but C is also plausible", ". 4 is possible").
_CLAIMED_OTHER = re.compile(
    r"^[\s.,;:(]*+(?:(?i:but|though|although|yet)\s++)?(?P<other>" + _OTHER + ")" + _CLAIM)
# The same claim at the end of the words a hedge offers ("C is possible" after ", though"): only "C" is the answer.
_CLAIM_TAIL = re.compile(_CLAIM + r".*$")
# Outside the boxes of a boxed answer: exponents and subscripts ("\\boxed{8} cm^2", "x_1 = \\boxed{3}") name no
# answer; a number left after them does ("\\boxed{5}, 4", "4 (or \\boxed{5})"), and so does a capital letter
# standing alone next to a boxed choice ("\\boxed{B}, C"; "I think \\boxed{B}" has a pronoun).
_SCRIPT = re.compile(r"[\^_]\s*+(?:\{[^{}]*\}|\\?[^\s\\])")
_STRAY_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_STRAY_LETTER = re.compile(r"(?<![\\A-Za-z])[A-Z](?![A-Za-z])(?!\s[a-z])")
_BOXED_CHOICE = re.compile(r"[(\[]?[A-Z][)\]]?")
# Where each box stood in the text outside the boxes.
_BOX_MARK = "\u25a1"
# A markdown list marker before an answer ("- 5", "* B", "• 5"); "-5", with no space, is a negative number.
_BULLET = re.compile(r"^(?:[-*]\s+|•\s*)")
# Categories of a key word's edge character in scripts without spaces between words (letters, length marks,
# vowel and tone signs): no word boundary is required there.
_SPACELESS = frozenset({"Lo", "Lm", "Mn", "Mc"})
_WORD_HYPHEN = re.compile(r"(?<=[^\W\d_])-(?=[^\W\d_])")
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'"})
# A number alone, in decimal or scientific notation ("1,000", "-0.25", "1.6e-19", "9.1 \\times 10^{-31}"; a bare
# exponent is read whole, as plain text means it: "10^-19").
_MANTISSA = r"(?P<mantissa>[-+]?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|\.\d+))"
_TIMES_TEN = (r"(?:\s*[eE](?P<e>[-+]?\d+)|\s*(?:\\times|\\cdot|\*)\s*10\s*\^\s*"
              r"(?:\{\s*(?P<braced>[-+]?\d+)\s*\}|(?P<bare>[-+]?\d+)))")
_PLAIN_NUMBER = re.compile("^" + _MANTISSA + _TIMES_TEN + "?$")
# Room for any number _PLAIN_NUMBER reads (256 digits, an exponent up to 10 000), computed exactly.
_EXACT = Context(prec=400, Emax=20_000, Emin=-20_000)
# A number and what follows it ("20 m/s", "8 \\text{ cm}^2", "30°", "1.6 \\times 10^{-19} \\text{ C}"), and the
# unit's markup. Commas only as thousands separators ("1,000"): "2,5" is not 25.
_NUMBER_UNIT = re.compile(r"^(?P<number>" + _MANTISSA + _TIMES_TEN + r"?)\s*(?P<unit>.*)$")
_UNIT_MARKUP = re.compile(r"\\(?:text|mathrm)\s*\{|[{}\s]|\\[,;!]")
# A unit: common SI-style base units with exponents, joined by / or a product sign ("m/s^2", "kg·m", "cm^2").
# Named, not guessed: "2x" is an expression, not 2 of a unit x.
_UNIT = re.compile(r"^(?:(?:k|c|m|µ|n)?(?:m|g|s|l|L|N|J|W|V|A|C|Pa|Hz|eV|Ω)|h|min|mL|ml|mol|K|°C|°F|°|%|rad|deg)"
                   r"(?:\^-?\d)?(?:[/·*](?:(?:k|c|m)?(?:m|g|s|l|L)|h|min|mol|K)(?:\^-?\d)?)*$")
# Spellings of one unit (after its markup is gone: "^{\\circ}" is "^\\circ" then).
_UNIT_ALIASES = {"deg": "°", "degree": "°", "degrees": "°", "ml": "mL", "l": "L", "percent": "%", "\\%": "%",
                 "^\\circ": "°", "\\circ": "°", "\\Omega": "Ω"}
# What is counted, after a count ("3 objects", "7 birds", "5 (units)"): up to four words of two letters or more.
_COUNTED = re.compile(r"^\(?\s*(?P<words>[A-Za-z]{2,}(?:\s+[A-Za-z]{2,}){0,3})\s*\)?$")
# Words after a number that change its value or hedge it ("2 pi", "3 or more", "5 hundred"): not what is counted.
_NOT_COUNTED = frozenset(
    "pi times plus minus over divided squared cubed sqrt root hundred thousand million billion trillion dozen "
    "half halves third thirds quarter quarters fourth fourths fifth fifths tenth tenths or and to more less than "
    "at least most about approximately around nearly almost over under per by of".split())
_YES_NO = frozenset({"yes", "no", "true", "false"})
# Both words at once ("Yes or no", "yes/no", "No, yes", "True or False", "Yes, or maybe no"), not "Yes, no doubt".
_YES_NO_HEDGE = re.compile(r"^\W*+(yes|no|true|false)\W*+(?:(?:or|and)\b\W*+)?(?:(?:maybe|perhaps|possibly)\b\W*+)?"
                           r"(yes|no|true|false)\b(?!\s+[A-Za-z])", re.IGNORECASE)
_LEADING_WORD = re.compile(r"\W*+([A-Za-z]+)")
# Points named by capital letters, in an answer about a figure ("AB", "\\angle ABC", "∠ABC", "\\triangle ABC").
_FIGURE_MARKERS = re.compile(
    r"\\(?:angle|triangle|overline|overrightarrow|widehat|measuredangle)|[∠△$\s{}]|\\[,;!]")
_TRIANGLE = re.compile(r"\\triangle|△")
# A well-formed roman numeral (1-3999): "LC" and "DM" are segments, not numerals.
_ROMAN = re.compile(r"^M{0,3}(?:CM|CD|D?C{0,3})(?:XC|XL|L?X{0,3})(?:IX|IV|V?I{0,3})$")
# Two bare letters that stay a numeral: I, V and X number statements ("IV" is not "VI"); with C, D, L or M they
# name a segment far more often than a number ("CD" is "DC").
_SMALL_ROMAN_PAIR = re.compile(r"^[IVX]{2}$")
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
# An answer longer than this (after cleaning, whitespace runs collapsed) is graded wrong without a grader: a final
# answer is a value, not a page, and math-verify's free-text parse is quadratic with no time limit off the main
# thread ("1 " * 20 000 took it 5 s). A ground truth longer than half of it raises it to twice the truth.
_MAX_ANSWER_CHARS = 512
# A number sympy would build in one uninterruptible C call (so no time limit stops it): an exponent of five
# digits or more ("1e999999", "10^{100000}", "2**99999") or a tower of numeric powers ("9^9^9", "9^{9^{9}}").
# "1e999999" against a choice letter ran 35 s despite the 5 s grader limit.
_HUGE_POWER = re.compile(r"(?:\d\.?\s*+[eE]|\^|\*\*)\s*+\{?\s*+[-+]?\d{5,}"
                         r"|\d\s*+(?:\^|\*\*)\s*+\{?\s*+\d+\s*+\}?\s*+(?:\^|\*\*)\s*+\{?\s*+\d")
# A one-sided bound ("5 or more", "\\geq 5", "≥ 5") or a disjunction ("4 \\lor 5"): the graders read them as sets
# that hold the number, so "\\geq 5" matched 5. Only an answer to a truth of the same kind can be right.
_ONE_SIDED = re.compile(
    r"\\(?:geq?|leq?|geqslant|leqslant|gt|lt|lor|land|vee|wedge)(?![A-Za-z])|[≥≤><]"
    r"|\b(?:or|and)\s++(?:more|less|greater|fewer|higher|lower|larger|smaller|above|below|over|under)\b",
    _FLAGS)


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
    contents of several different boxes are joined with ", ", and so is a number written outside them before any
    explanation ("\\boxed{5}, 4" gives "5, 4"). An explanation after the answer is dropped, but a second answer
    offered there ("5 (or 4)", "B. Maybe C", "B, but C is also plausible") is joined to the first the same way
    ("5, 4"). Whitespace runs become single spaces, and a list marker before the answer ("- 5", "* B") is
    dropped, on the header's line as on the next: a negative number is written "-5".

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
    boxed, outside, rest = _boxed_contents(answer) if "\\boxed{" in answer else ([], answer, "")
    if boxed:
        # Several different boxes ("\\boxed{3} or \\boxed{5}") are graded together, not the last alone, and so is
        # an answer written outside them ("\\boxed{5}, 4"), so that hedging between answers is not rewarded.
        head = ", ".join(dict.fromkeys(boxed + _unboxed_answers(outside, boxed)))
    else:
        head, rest = _split_explanation(answer)
    other = _hedged_alternative(rest)
    # "5 (or 4)", "\\boxed{B} (maybe C)": both answers are graded, as a hedge, not the first alone.
    return f"{head}, {other}" if other and other.casefold() != head.casefold() else head


def _split_explanation(answer: str) -> tuple[str, str]:
    """The answer before the explanation that follows it (see _EXPLANATION), stripped, and that explanation."""
    explanation = _EXPLANATION.search(answer)
    cut = explanation.start() if explanation else len(answer)
    return answer[:cut].strip(), answer[cut:]


def _unboxed_answers(outside: str, boxed: list[str]) -> list[str]:
    """Numbers (and, next to a boxed choice letter, capital letters) written outside the boxes before any
    explanation: "4" in "\\boxed{5}, 4", "\\boxed{5} (4)" or "4 (or \\boxed{5})"."""
    text = _SCRIPT.sub(" ", _split_explanation(outside)[0])
    found = _STRAY_NUMBER.findall(text)
    if all(_BOXED_CHOICE.fullmatch(box) for box in boxed):
        found += _STRAY_LETTER.findall(text)
    return found


def _hedged_alternative(rest: str) -> str | None:
    """The other answer that the words after an answer offer ("(or 4)", ". Maybe 4", ", although it could be 4",
    ", but C is also plausible"); None when they offer none (an explanation, or "(perhaps)")."""
    claimed = _CLAIMED_OTHER.match(rest)
    if claimed:
        return claimed["other"]
    hedge = _HEDGE.match(rest)
    if hedge is None:
        return None
    other = re.split(r"[)\]]|[.;!?](?:\s|$)", rest[hedge.end():], maxsplit=1)[0].strip(" ,:")
    other = _CLAIM_TAIL.sub("", other)  # ", though C is possible": the answer offered is "C"
    # A short answer-like rest ("4", "C", "no", "x = 2"), not a clause ("although the figure is blurry").
    return other if other and len(other.split()) <= 3 else None


def _boxed_contents(text: str) -> tuple[list[str], str, str]:
    """The stripped contents of every closed ``\\boxed{...}`` in `text`, in order (braces balanced); the text
    outside them, each box replaced by _BOX_MARK; and the text after the last one."""
    contents, outside, start, end = [], [], text.find("\\boxed{"), 0
    while start >= 0:
        depth, i = 1, start + len("\\boxed{")
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth:  # unclosed: nothing after it is boxed either
            break
        contents.append(text[start + len("\\boxed{"):i - 1].strip())
        outside += [text[end:start], _BOX_MARK]
        start, end = text.find("\\boxed{", i), i
    return contents, "".join(outside) + text[end:], text[end:]


def _first_answer_line(text: str) -> str:
    """The answer line after a header, its whitespace runs made single spaces (the patterns run on it are then
    linear) and a list marker before it removed: "- 5" on the line after the header is a markdown bullet, and
    so it is on the header's own line ("is: - 5 cm"), where a negative number would be written "-5" or "$- 5$"."""
    lines = [" ".join(line.split()) for line in text.splitlines()]
    lines = lines[:next((i for i, line in enumerate(lines) if i and line.startswith("###")), len(lines))]
    lines = lines[next((i for i, line in enumerate(lines) if line), len(lines)):]
    if not lines:
        return ""
    close = _DISPLAY_OPEN.get(lines[0])
    if close is None:
        return _BULLET.sub("", lines[0])
    body = lines[1:lines.index(close, 1)] if close in lines[1:] else lines[1:]
    return " ".join(line for line in body if line)


def clean_answer(text: str) -> str:
    """An answer or ground truth as the graders see it: unicode normalised; whitespace runs made one space;
    spacing, markdown emphasis, math delimiters, invisible format characters and a final full stop removed. ""
    when nothing else is left."""
    text = unicodedata.normalize("NFKC", text.translate(_SUPERSCRIPTS)).translate(_UNICODE_FIXES)
    # Invisible format characters (a zero-width space, a byte-order mark) are no part of an answer.
    text = "".join(char for char in text if unicodedata.category(char) != "Cf")
    text = " ".join(text.split())  # the patterns run on an answer backtrack over long runs of spaces
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


def _without_lead_in(text: str) -> str:
    """`text` without the words that introduce an answer ("The answer is B" is "B"; see _ANSWER_LEAD_IN)."""
    return _ANSWER_LEAD_IN.sub("", text, count=1)


def _choice_letter(answer: str) -> str | None:
    """The one choice an answer names; "" for several (a hedge); None when it names none."""
    answer = _plain_words(answer).replace("**", "").replace("__", "")  # "**B** 12 cm", "\\text{(B) } 12"
    answer = _without_lead_in(" ".join(answer.split()))  # unwrapping "\\text{(B) } 12" leaves two spaces
    if _SEVERAL_CHOICES.match(answer):
        return ""
    match = _CHOICE_ANSWER_UPPER.match(answer)
    if match and match.group(1).isupper():
        return match.group(1)
    match = _CHOICE_ANSWER_LOWER.match(answer)
    return match.group(1).upper() if match else None


def _point_names(text: str) -> tuple[str, str] | None:
    """(capital letters, kind) of an answer in capital letters: kind "triangle", or "path" (a segment, or an
    angle marked as one); a bare roman numeral is kind "roman" (of two letters, only one of I, V and X: "CD" is
    a segment, see _SMALL_ROMAN_PAIR), and three or more bare letters kind "word" (an acronym such as "USA" as
    much as an angle). None for anything else."""
    letters = _FIGURE_MARKERS.sub("", text)
    if len(letters) < 2 or not letters.isascii() or not letters.isalpha() or not letters.isupper():
        return None
    if _TRIANGLE.search(text):
        return letters, "triangle"
    if letters == text and _ROMAN.match(letters) and (len(letters) > 2 or _SMALL_ROMAN_PAIR.match(letters)):
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
    match = _LEADING_WORD.match(text)
    return match.group(1).casefold() if match else ""


def _quantity(text: str) -> tuple[Decimal, str] | None:
    """(exact value, unit without markup) of "20 m/s", "8 \\text{ cm}^2", "2.5", "1.6 \\times 10^{-19} C",
    "3 objects"; None for anything else."""
    match = _NUMBER_UNIT.match(text)
    number = _plain_number(match["number"]) if match else None
    if number is None:
        return None
    unit = _UNIT_MARKUP.sub("", match["unit"].strip("() ")).replace("\\cdot", "·")
    unit = _UNIT_ALIASES.get(unit, unit)
    if unit and not _UNIT.match(unit):  # not a unit: what is counted, or not a quantity
        counted = _COUNTED.match(match["unit"])
        words = counted["words"].lower().split() if counted else []
        if not words or _NOT_COUNTED.intersection(words):
            return None
        unit = " ".join(words)
    return number, unit


def _plain_number(text: str) -> Decimal | None:
    """The exact value of `text` when it is a number and nothing else (see _PLAIN_NUMBER), else None. Decimal,
    not float: two 400-digit numbers would both be inf, and equal."""
    match = _PLAIN_NUMBER.match(text) if len(text) <= _MAX_FORMULA_CHARS else None
    if match is None:
        return None
    exponent = int(next((g for g in (match["e"], match["braced"], match["bare"]) if g is not None), "0"))
    if abs(exponent) > 10_000:  # "1e99999": refused before the graders (see _HUGE_POWER)
        return None
    return Decimal(match["mantissa"].replace(",", "")).scaleb(exponent, _EXACT)


def _same_number(a: Decimal, b: Decimal) -> bool:
    """Equal to nine significant digits (a float's rounding, "0.1 + 0.2", stays equal)."""
    return abs(a - b) <= Decimal("1e-9") * max(abs(a), abs(b))


def _same_quantity(given: tuple[Decimal, str], wanted: tuple[Decimal, str]) -> bool:
    """Equal numbers with the same unit, or with a unit on one side only, compared exactly (_same_number): the
    graders call any two numbers within 1e-6 or so equal, units or not ("0.0000016 m" and "0.0000017 m").
    Another unit is another quantity ("3 m" and "3 cm"), though the graders strip both. The graders strip some
    units (cm, degrees) but not others (m/s, \\text{cm}^2), and an answer without its unit is read alike for
    all; what a count counts is a unit here ("3 objects" for "3"). A percentage also matches its fraction
    without a unit (0.5 for 50%), as mathruler has it."""
    (a, unit_a), (b, unit_b) = given, wanted
    if unit_a and unit_b:
        return unit_a == unit_b and _same_number(a, b)
    if _same_number(a, b):
        return True
    if unit_a == "%":
        return _same_number(a.scaleb(-2, _EXACT), b)
    return unit_b == "%" and _same_number(a, b.scaleb(-2, _EXACT))


def _refused(given: str, truth: str) -> bool:
    """An answer wrong before any grader reads it: a one-sided bound or a number no grader can build in time (see
    _ONE_SIDED and _HUGE_POWER), unless the truth is one too."""
    return any(pattern.search(given) and not pattern.search(truth) for pattern in (_ONE_SIDED, _HUGE_POWER))


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

    An answer longer than _MAX_ANSWER_CHARS (512 characters, or twice a longer truth) is wrong. Multiple-choice
    ground truths (one capital letter, bracketed or not) are compared by letter, and yes/no ones by word, past a
    lead-in such as "The answer is". A one-sided bound ("5 or more", "\\geq 5") or a power too large to compute
    ("1e999999") is wrong unless the truth is one too. Numbers, with or without a unit, are compared exactly.
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
    if not given or len(given) > max(_MAX_ANSWER_CHARS, 2 * len(truth)):
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
        words = _without_lead_in(_plain_words(given))  # "The answer is yes", "Final answer: No"
        hedge = _YES_NO_HEDGE.match(words)  # "Yes or no", "yes/no", "True or False": both, so neither
        return _leading_word(words) == plain_truth and not (hedge and hedge[1].casefold() != hedge[2].casefold())
    if _refused(given, truth):
        return False
    numbers = _plain_number(given), _plain_number(truth)
    if None not in numbers:  # both graders call any two numbers within 1e-6 or 1e-7 equal: 1.6e-19 and 1.7e-19
        return _same_number(*numbers)
    names = _point_names(given), _point_names(truth)
    if None not in names:  # the graders read "BAC" as the product B*A*C, equal to "ABC"
        return _same_figure(*names)
    quantities = _quantity(given), _quantity(truth)
    if None not in quantities:  # the graders' tolerance again ("0.0000016 m" is "0.0000017 m"), and units stripped
        return _same_quantity(*quantities)
    out_of_time = [False]
    try:
        with _time_limit(_GRADER_TIMEOUT_S) as out_of_time:
            if grade_answer(given, truth):
                return True
    except Exception:  # noqa: BLE001 - mathruler raises on some malformed LaTeX (or ran out of time): no match
        pass
    if out_of_time[0]:  # "10000000!": math-verify would spend its own seconds on it too
        return False
    return _math_verify_match(given, truth)


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
    # A curly apostrophe is the straight one ("Pascal’s" mentions "Pascal's").
    text = unicodedata.normalize("NFKC", text).casefold().translate(_APOSTROPHES)
    return _WORD_HYPHEN.sub(" ", " ".join(text.split()))


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
