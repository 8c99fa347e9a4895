"""Check one sharegpt SFT record: the one rule set of dataset/filter.py and pebr/sft.py (no torch).

A sharegpt record is::

    {"messages": [{"role": "user", "content": "<image>question"},
                  {"role": "assistant", "content": "### Image Description: ..."}],
     "images": ["relative/path.png"]}

The filter drops what the SFT loader would refuse, so both call `check_sharegpt_record`; a record the
filter keeps then never stops a training run at load time.
"""

from __future__ import annotations

from typing import Any

from pebr.data.records import IMAGE_PLACEHOLDER, BadRecord, check_no_model_tokens, check_unicode

ROLES = ("system", "user", "assistant")
# Reason tags of `BadRecord`, counted by dataset/filter.py.
SHAREGPT_REASONS = ("malformed", "unknown_role", "no_assistant_turn", "empty_turn", "vision_token_in_text",
                    "chat_token_in_text", "placeholder_mismatch")


def check_sharegpt_record(value: Any, where: str) -> dict[str, Any]:
    """Check a record's shape and return it normalised.

    Args:
        value: one record, as parsed from JSON.
        where: how to name the record in messages (e.g. "data.json record 3").

    Returns:
        ``{"messages": [...], "images": [...]}``: messages as given (a list of {"role", "content"} with
        string values, at least one assistant turn); images always a list of non-empty strings (a
        missing key or None is no image, a plain string a list of one). Other keys are not copied.

    Raises:
        BadRecord: naming `where` and the key, with reason
            "malformed" (wrong types, no messages, a lone surrogate), "unknown_role" (a role outside `ROLES`, e.g. the
            sharegpt "human"/"gpt"), "no_assistant_turn" (nothing to learn), "empty_turn" (an assistant turn with
            no text, which would teach the model to stop at once, or a user turn with no text in a record without
            images), or "placeholder_mismatch"
            (the user turns' `<image>` placeholders do not match the images, or another turn holds one, or there
            is no user turn for the images; no placeholder with one image is allowed, the image then goes before
            the first question).
    """
    if not isinstance(value, dict):
        raise BadRecord("malformed", f"{where}: a record must be a JSON object, got {type(value).__name__}")
    messages = value.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRecord("malformed", f"{where}: key 'messages' must be a non-empty list")
    for j, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise BadRecord("malformed", f"{where}: key 'messages'[{j}] must be a dict with a string 'content'")
        role = message.get("role")
        if role not in ROLES:
            # A non-string role is a broken record; a foreign role name is a known layout mix-up.
            reason = "unknown_role" if isinstance(role, str) else "malformed"
            raise BadRecord(reason, f"{where}: key 'messages'[{j}]['role'] is {role!r}, expected one of {ROLES}")
        check_unicode(message["content"], where, f"messages[{j}].content", "malformed")
        check_no_model_tokens(message["content"], where, f"messages[{j}].content")
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRecord(
            "no_assistant_turn", f"{where}: key 'messages' has no assistant turn, so nothing would be learned"
        )
    images = value.get("images")
    # A user turn of an image-only question has no text; an assistant turn always needs some.
    empty = [j for j, m in enumerate(messages) if not m["content"].strip()
             and (m["role"] == "assistant" or m["role"] == "user" and not images)]
    if empty:
        role = messages[empty[0]]["role"]
        raise BadRecord("empty_turn", f"{where}: key 'messages'[{empty[0]}] ({role}) has no text"
                                      + ("" if role == "assistant" else " and the record no image"))
    if images is None:
        images = []
    elif isinstance(images, str):
        images = [images]
    if not isinstance(images, list) or not all(isinstance(x, str) and x for x in images):
        raise BadRecord(
            "malformed", f"{where}: key 'images' must be a path or a list of paths, got {str(value.get('images'))[:80]}"
        )
    for k, path in enumerate(images):
        check_unicode(path, where, f"images[{k}]", "malformed")
    # LLaMA-Factory (the real-scale warm-up) counts placeholders in every turn and stops at a mismatch.
    stray = [j for j, m in enumerate(messages) if m["role"] != "user" and IMAGE_PLACEHOLDER in m["content"]]
    if stray:
        raise BadRecord("placeholder_mismatch", f"{where}: key 'messages'[{stray[0]}] ({messages[stray[0]]['role']}) "
                                                f"holds {IMAGE_PLACEHOLDER}, which only user turns may hold")
    placeholders = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages if m["role"] == "user")
    if images and not any(m["role"] == "user" for m in messages):  # no turn to place them in: the model's forward
        raise BadRecord("placeholder_mismatch", f"{where}: key 'images' has {len(images)} image(s) but 'messages' "
                                                "has no user turn to hold them")  # raised mid-training
    if placeholders not in (0, len(images)) or (placeholders == 0 and len(images) > 1):
        raise BadRecord(
            "placeholder_mismatch",
            f"{where}: the user turns hold {placeholders} {IMAGE_PLACEHOLDER} placeholder(s) but key 'images' "
            f"has {len(images)} image(s)",
        )
    return {"messages": messages, "images": images}
