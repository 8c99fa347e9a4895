"""Stage-1 (perception) reward of PeBR-R1.

    overall = 0.4 * clip + 0.4 * keyword + 0.1 * format + 0.1 * length

Accuracy is computed and reported but carries no weight by default: stage 1 trains on questions the
model already answers, so the signal is the quality of the image description. Every weight and
setting can be overridden through worker.reward.reward_function_kwargs (keys in DEFAULTS).

The CLIP scorer (one shared Ray actor, or in-process without Ray) is created in `setup`, which the
reward manager calls once at start-up; with clip_weight = 0 no model is ever loaded.
"""

from __future__ import annotations

import os
from typing import Any

from pebr.rewards.manager import resolve_options
from pebr.rewards.terms import (
    accuracy_reward,
    clip_alignment_reward,
    extract_image_description,
    format_reward,
    keyword_recall,
    length_reward,
)
from pebr.workers.reward import get_clip_scorer

REWARD_TYPE = "batch"  # compute_score takes the list of inputs (worker.reward.reward_type=batch)
DEFAULTS: dict[str, Any] = {
    "clip_weight": 0.4,
    "keyword_weight": 0.4,
    "format_weight": 0.1,
    "length_weight": 0.1,
    "accuracy_weight": 0.0,
    "clip_model_path": None,
    "clip_threshold": 0.4,
    # FG-CLIP's modelling code ships with its checkpoint, so it loads only with this set.
    "clip_trust_remote_code": False,
    # Caption limit in tokens; None: the CLIP's own (248 for FG-CLIP, 77 for OpenAI CLIP).
    "clip_max_text_length": None,
    # Square size images are resized to before scoring (336 in the paper); None: the processor's own
    # resize and centre crop.
    "clip_image_size": None,
    "max_length": 512,
}

_scorers: dict[tuple, Any] = {}  # by model path and settings


def _options(kwargs: dict[str, Any]) -> dict[str, Any]:
    options = resolve_options(DEFAULTS, kwargs, os.path.basename(__file__))
    # Checked here, not where they are used: the start-up probe's response has no description, so a bad
    # threshold would pass it and stop the run at its first step, blamed on a sample.
    for key in ("clip_threshold", "max_length"):
        if not options[key] > 0:
            raise ValueError(f"reward_function_kwargs {key}={options[key]!r} for {os.path.basename(__file__)} "
                             "must be positive")
    return options


def _scorer(options: dict[str, Any]) -> Any:
    path = options["clip_model_path"]
    if not path:
        raise ValueError(
            "clip_model_path is not set in worker.reward.reward_function_kwargs; the CLIP term needs "
            "a CLIP-family model (a local directory or a hub id) or clip_weight=0"
        )
    settings = {"trust_remote_code": bool(options["clip_trust_remote_code"]),
                "max_text_length": options["clip_max_text_length"], "image_size": options["clip_image_size"]}
    key = (path, *settings.values())
    if key not in _scorers:
        _scorers[key] = get_clip_scorer(path, **settings)
    return _scorers[key]


def setup(**kwargs: Any) -> None:
    """Check the options and load the CLIP scorer once, so a bad path fails at start-up."""
    options = _options(kwargs)
    if options["clip_weight"] != 0:
        _scorer(options)


def _clip_terms(reward_inputs: list[dict], options: dict[str, Any]) -> list[float]:
    """CLIP alignment reward of each response; an empty description, or a record without an image (the trainer
    counts those before training), scores 0 without the model."""
    captions = [extract_image_description(item["response"]) for item in reward_inputs]
    todo = [i for i, caption in enumerate(captions) if caption and reward_inputs[i].get("image") is not None]
    terms = [0.0] * len(reward_inputs)
    if todo:
        similarities = _scorer(options).score(
            [reward_inputs[i]["image"] for i in todo], [captions[i] for i in todo]
        )
        for i, similarity in zip(todo, similarities):
            terms[i] = clip_alignment_reward(similarity, options["clip_threshold"])
    return terms


def compute_score(reward_inputs: list[dict], **kwargs: Any) -> list[dict[str, float]]:
    """Stage-1 scores of a batch.

    Args:
        reward_inputs: dicts with response, response_length, ground_truth, key_word, image, qid.
        **kwargs: overrides of DEFAULTS.

    Returns:
        Per input: overall, format, accuracy, keyword, length and (when clip_weight != 0) clip.
    """
    options = _options(kwargs)
    scores = [
        {
            "format": format_reward(item["response"]),
            "accuracy": accuracy_reward(item["response"], item["ground_truth"]),
            "keyword": keyword_recall(item["response"], item.get("key_word")),
            "length": length_reward(item["response_length"], options["max_length"]),
        }
        for item in reward_inputs
    ]
    if options["clip_weight"] != 0:
        for score, clip in zip(scores, _clip_terms(reward_inputs, options)):
            score["clip"] = clip
    for score in scores:
        score["overall"] = sum(options[f"{name}_weight"] * value for name, value in score.items())
    return scores
