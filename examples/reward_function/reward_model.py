"""A learned reward model: a transformers sequence classifier scores each question and response.

    worker.reward.reward_function=examples/reward_function/reward_model.py:compute_score
    worker.reward.reward_function_kwargs.model_path=/models/my-reward-model

The model (`AutoModelForSequenceClassification`, one output) is loaded once per reward actor, in `setup`: on the
actor's CPU, or on its GPU when the run gives it one (`worker.reward.num_gpus=1`; `dtype` auto is then bf16 on a
card that has it, as the trainer's, and fp32 on a CPU). Each response is shown to it as the assistant's answer to
the question (the tokenizer's chat template when it has one; the question's `<image>` placeholders are dropped, as
the model reads text only), cut to `max_length` tokens (at most the model's context) from the left so that the
response's end, which the score is read at, stays. Scores come in batches of `batch_size`, padded on the right;
each is the score the same text gets alone.

    overall = sigmoid(score) if squash else score      (also logged raw as reward/reward_model)

A reward model of billions of parameters wants a GPU: `worker.reward.num_gpus=1` gives the reward actor a card of
its own beside the training workers'; a model shared by several runs is better served (any server that takes a
JSON batch) and reached through `remote.py`.
"""

from __future__ import annotations

import math
import os
from typing import Any

from pebr.rewards.manager import check_whole_numbers, resolve_options

REWARD_TYPE = "batch"
DEFAULTS: dict[str, Any] = {"model_path": "", "batch_size": 8, "max_length": 2048, "squash": True, "dtype": "auto"}
IMAGE_PLACEHOLDER = "<image>"
_loaded: dict[tuple[str, str], tuple[Any, Any]] = {}  # (model_path, dtype) -> (tokenizer, model), once per process


def _options(kwargs: dict[str, Any]) -> dict[str, Any]:
    options = resolve_options(DEFAULTS, kwargs, os.path.basename(__file__))
    path = options["model_path"]
    if not isinstance(path, str) or not os.path.isdir(os.path.expanduser(path)):
        raise ValueError(f"worker.reward.reward_function_kwargs.model_path={path!r} is not a directory holding a "
                         "reward model")
    check_whole_numbers(options, {"batch_size": 1, "max_length": 1}, os.path.basename(__file__))
    return options


def _model(path: str, dtype: str) -> tuple[Any, Any]:
    if (path, dtype) not in _loaded:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from pebr.utils.dtypes import resolve_dtype

        # Ray shows the actor the cards worker.reward.num_gpus gave it, and none without.
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSequenceClassification.from_pretrained(
            path, dtype=resolve_dtype(dtype, device, "worker.reward.reward_function_kwargs.dtype")).to(device).eval()
        if model.config.num_labels != 1:
            raise ValueError(f"{path}: a reward model has one output (num_labels=1), this one has "
                             f"{model.config.num_labels}")
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side, tokenizer.truncation_side = "right", "left"
        # The classifier reads each row's score at its last token that is not padding: it must know the pad id.
        model.config.pad_token_id = tokenizer.pad_token_id
        _loaded[path, dtype] = tokenizer, model
    return _loaded[path, dtype]


def setup(**kwargs: Any) -> None:
    """Check the settings and load the model once, at start-up."""
    options = _options(kwargs)
    _model(os.path.expanduser(options["model_path"]), options["dtype"])


def conversation(tokenizer: Any, question: str, response: str) -> str:
    """The text the model scores: the question and the response as one exchange."""
    question = question.replace(IMAGE_PLACEHOLDER, "").strip()
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template([{"role": "user", "content": question},
                                              {"role": "assistant", "content": response}], tokenize=False)
    return f"{question}\n{response}"


def compute_score(reward_inputs: list[dict], **kwargs: Any) -> list[dict[str, float]]:
    """The reward model's score of each input, in order."""
    import torch

    options = _options(kwargs)
    tokenizer, model = _model(os.path.expanduser(options["model_path"]), options["dtype"])
    texts = [conversation(tokenizer, item["question"], item["response"]) for item in reward_inputs]
    raw: list[float] = []
    size = options["batch_size"]
    max_length = min(options["max_length"], getattr(model.config, "max_position_embeddings", None) or math.inf)
    with torch.inference_mode():
        for start in range(0, len(texts), size):
            # A chat template writes its own special tokens (a BOS among them, for some); a second BOS would
            # shift every text the model was trained on.
            encoded = tokenizer(texts[start:start + size], padding=True, truncation=True, max_length=max_length,
                                add_special_tokens=not tokenizer.chat_template, return_tensors="pt")
            raw += model(**encoded.to(model.device)).logits[:, 0].float().tolist()
    squash = options["squash"]
    return [{"overall": float(torch.sigmoid(torch.tensor(s))) if squash else s, "reward_model": s} for s in raw]
