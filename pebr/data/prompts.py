"""The PeBR format prompt: reading a jinja2 template, rendering a question through it, and the user turn that puts
each image where its `<image>` placeholder stands.

No torch here: the data filter, the SFT and evaluation command lines and the RL data set all build their prompts
with these, and the light ones should not wait for torch to import.
"""

from __future__ import annotations

import os
from typing import Any

import jinja2

from pebr.data.records import CHAT_TOKENS, IMAGE_PLACEHOLDER, VISION_TOKENS, DataError

DEFAULT_FORMAT_PROMPT = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "examples", "format_prompt",
    "pebr.jinja")

# Stands for the question when a template is checked: digits only, which no filter (upper, tojson, trim) changes.
_QUESTION_MARK = "0123456789876543210"


def load_format_prompt(path: str) -> jinja2.Template:
    """Read a jinja2 prompt template; rendering fails on any variable other than the ones passed.

    The template is rendered once here, so that one using another variable than `content`, leaving the
    question out (or putting it in twice), or holding an `<image>` placeholder or a model token of its own,
    fails at load and not at the first record, or not at all while every prompt lacked its question.

    Raises:
        DataError: the file is missing, is not valid jinja2, uses a variable other than `content`, does not
            place `content` exactly once, or holds `<image>`, a vision token or a chat control token (the
            message names the file, and the line where jinja2 gives one).
    """
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as err:
        raise DataError(f"format_prompt {path!r} cannot be read: {err}") from err
    environment = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=False)
    try:
        template = environment.from_string(text)
        rendered = template.render(content=_QUESTION_MARK)
    except jinja2.TemplateSyntaxError as err:
        raise DataError(f"format_prompt {path!r} line {err.lineno}: {err.message}") from err
    except jinja2.UndefinedError as err:
        raise DataError(f"format_prompt {path!r}: {err.message}; the only variable given is `content` (the "
                        "record's question)") from err
    if rendered.count(_QUESTION_MARK) != 1:
        raise DataError(f"format_prompt {path!r}: it places the question {rendered.count(_QUESTION_MARK)} times; it "
                        "must render {{ content }} exactly once, or every prompt would lack its question or repeat it")
    if IMAGE_PLACEHOLDER in rendered:
        raise DataError(f"format_prompt {path!r}: it holds {IMAGE_PLACEHOLDER!r}; images are placed where the "
                        "record's question puts them, so the template must not add placeholders of its own")
    for token in (*VISION_TOKENS, *CHAT_TOKENS):
        if token in rendered:
            raise DataError(f"format_prompt {path!r}: it holds the model's token {token!r}; a template is text only: "
                            "images go where a record's question places <image>, and the chat template adds the "
                            "turn markers")
    return template


def render_question(template: jinja2.Template, question: str) -> str:
    """`question` rendered through the format prompt, or as it is when it already reads as such a rendering (the
    text before and after the template's `{{ content }}` around it): data written with the prompt in it, as
    `dataset/filter.py --format_prompt` writes it for LLaMA-Factory, is not wrapped a second time."""
    head, tail = (part.strip() for part in template.render(content=_QUESTION_MARK).split(_QUESTION_MARK))
    # Placeholders the loader put first (a question with images and none in its text) are no part of the rendering
    # to recognise; they go where the rendering would have put them, after the template's head.
    body = question.lstrip()
    images = ""
    while body.startswith(IMAGE_PLACEHOLDER):
        images, body = images + IMAGE_PLACEHOLDER, body[len(IMAGE_PLACEHOLDER):].lstrip()
    if (head or tail) and body.startswith(head) and body.endswith(tail) and len(body) >= len(head) + len(tail):
        return body[:len(head)] + images + body[len(head):] if images else question
    return template.render(content=question)


def build_messages(question: str, num_images: int, template: jinja2.Template | None) -> list[dict[str, Any]]:
    """One user turn: the (templated) question, with each image where its `<image>` placeholder stands.

    The template is rendered with the placeholders in `content`, then the text is cut at them, so a
    question like "compare <image> with <image>" keeps its images in place; a question without
    placeholders gets all its images first, before it is rendered, as the RL loader does
    (`pebr.data.records`): SFT, RL, evaluation and inference then put them at the same place, after any text
    the template puts before the question. Spaces around a placeholder are dropped (the vision tokens delimit it).

    Args:
        question: the record's prompt, with one `<image>` per image or none.
        num_images: how many {"type": "image"} parts the turn holds.
        template: rendered with `content` = the question (`render_question`: not a question that already
            holds it); None uses the question as it is.

    Returns:
        The chat messages for `processor.apply_chat_template`.

    Raises:
        DataError: the question holds placeholders, but not `num_images` of them.
    """
    content = question.strip()
    if IMAGE_PLACEHOLDER not in content:
        content = IMAGE_PLACEHOLDER * num_images + content
    text = render_question(template, content) if template is not None else content
    chunks = text.split(IMAGE_PLACEHOLDER)
    if len(chunks) - 1 != num_images:
        raise DataError(f"the question has {len(chunks) - 1} {IMAGE_PLACEHOLDER} placeholders but {num_images} images: "
                        f"{question[:80]!r}")
    parts: list[dict[str, Any]] = []
    for position, chunk in enumerate(chunks):
        if position > 0:
            parts.append({"type": "image"})
            chunk = chunk.lstrip()
        if position < len(chunks) - 1:
            chunk = chunk.rstrip()
        if chunk:
            parts.append({"type": "text", "text": chunk})
    return [{"role": "user", "content": parts}]
