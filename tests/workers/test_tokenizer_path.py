"""worker.actor.model.tokenizer_path: the actor's processor comes from it, and a path whose image processor
differs from the model's (which the vLLM engine uses) is refused. The engine's side, that it tokenizes with
tokenizer_path, is checked with a real engine in test_image_bounds."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from pebr.config import ConfigError, ModelConfig
from pebr.workers.actor import load_processor

PROMPT = "<|im_start|>user\nHow many red cubes are left of the large sphere?<|im_end|>\n<|im_start|>assistant\n"


def test_processor_comes_from_tokenizer_path(tiny_model_dir, coarse_tokenizer_dir):
    own = load_processor(ModelConfig(model_path=tiny_model_dir))
    coarse = load_processor(ModelConfig(model_path=tiny_model_dir, tokenizer_path=coarse_tokenizer_dir))
    own_ids, coarse_ids = own.tokenizer(PROMPT)["input_ids"], coarse.tokenizer(PROMPT)["input_ids"]
    assert len(coarse_ids) > len(own_ids)
    assert max(coarse_ids) < own.tokenizer.vocab_size + len(own.tokenizer.added_tokens_decoder)
    assert own.tokenizer.decode(own_ids) == coarse.tokenizer.decode(coarse_ids) == PROMPT


def test_tokenizer_path_with_another_image_processor_is_refused(tiny_model_dir, coarse_tokenizer_dir, tmp_path):
    other = str(tmp_path / "other_image_processor")
    shutil.copytree(coarse_tokenizer_dir, other)
    path = os.path.join(other, "processor_config.json")
    with open(path) as f:
        settings = json.load(f)
    settings["image_processor"]["size"]["longest_edge"] *= 4  # images up to 4x the pixels: more tokens
    with open(path, "w") as f:
        json.dump(settings, f)
    with pytest.raises(ConfigError, match=r"tokenizer_path=.*differs from model_path=.*vLLM.*size"):
        load_processor(ModelConfig(model_path=tiny_model_dir, tokenizer_path=other))
