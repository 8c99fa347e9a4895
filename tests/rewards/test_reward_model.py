"""examples/reward_function/reward_model.py with a tiny Qwen2 sequence classifier built here (random weights)."""

from __future__ import annotations

import math
import os

import pytest
import torch

from pebr.rewards.manager import RewardManager, load_reward_module

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SPEC = os.path.join(ROOT, "examples", "reward_function", "reward_model.py")


def build_classifier(tokenizer_dir: str, out: str, num_labels: int = 1) -> str:
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         num_labels=num_labels, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    Qwen2ForSequenceClassification(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def reward_model_dir(tiny_model_dir, tmp_path_factory) -> str:
    return build_classifier(tiny_model_dir, str(tmp_path_factory.mktemp("reward_model")))


def items(responses: list[str]) -> list[dict]:
    return [{"qid": f"q{i}", "question": "<image>How many cubes are there?", "response": r, "response_length": 1,
             "ground_truth": "3", "key_word": [], "image": None, "images": []} for i, r in enumerate(responses)]


RESPONSES = ["3", "There are three cubes.", "### The final answer is: 3", "I count 2 cubes and one sphere, so 2.",
             "cubes"]


def test_a_padded_batch_scores_each_text_as_it_scores_alone(reward_model_dir):
    """Rows of different lengths, padded in batches of 3: each score is read at its own last token."""
    manager = RewardManager(f"{SPEC}:compute_score", reward_function_kwargs={"model_path": reward_model_dir,
                                                                            "batch_size": 3})
    batched = manager.compute(items(RESPONSES))
    alone = [manager.compute(items([r]))[0] for r in RESPONSES]
    assert len({round(s["reward_model"], 6) for s in batched}) == len(RESPONSES)  # the texts score differently
    for b, a in zip(batched, alone):
        assert b["reward_model"] == pytest.approx(a["reward_model"], abs=1e-5)
        assert b["overall"] == pytest.approx(1 / (1 + math.exp(-b["reward_model"])), abs=1e-6)
    raw = manager.function(items(RESPONSES[:2]), model_path=reward_model_dir, squash=False)
    assert [s["overall"] for s in raw] == [s["reward_model"] for s in raw]


def test_the_model_reads_the_exchange_without_image_placeholders_and_keeps_the_end(reward_model_dir):
    module = load_reward_module(SPEC)
    module.setup(model_path=reward_model_dir)
    tokenizer, _ = module._loaded[reward_model_dir]
    text = module.conversation(tokenizer, "<image>How many cubes?", "Three.")
    assert "<image>" not in text and "<|im_start|>user\nHow many cubes?<|im_end|>" in text
    assert "<|im_start|>assistant\nThree.<|im_end|>" in text
    # Cut from the left: a long response scores as its last max_length tokens do.
    long = "one two three four five six seven eight nine ten " * 20 + "### The final answer is: 3"
    ids = tokenizer(module.conversation(tokenizer, "How many cubes?", long))["input_ids"]
    cut = module.compute_score(items([long]), model_path=reward_model_dir, max_length=16)[0]["reward_model"]
    _, model = module._loaded[reward_model_dir]
    with torch.inference_mode():
        tail = model(input_ids=torch.tensor([ids[-16:]])).logits[0, 0].item()
    assert len(ids) > 16 and cut == pytest.approx(tail, abs=1e-5)
    # Past the model's context (512 positions here): cut to it rather than failing on the position table.
    longer = long * 5
    ids = tokenizer(module.conversation(tokenizer, "How many cubes?", longer))["input_ids"]
    capped = module.compute_score(items([longer]), model_path=reward_model_dir)[0]["reward_model"]
    with torch.inference_mode():
        tail = model(input_ids=torch.tensor([ids[-512:]])).logits[0, 0].item()
    assert len(ids) > 512 and capped == pytest.approx(tail, abs=1e-5)


def test_settings_are_checked_at_start_up(reward_model_dir, tiny_model_dir, tmp_path):
    def start(**kwargs):
        return RewardManager(f"{SPEC}:compute_score", reward_function_kwargs=kwargs)

    with pytest.raises(ValueError, match="model_path='/nonexistent' is not a directory"):
        start(model_path="/nonexistent")
    with pytest.raises(ValueError, match="batch_size=0 for reward_model.py must be a whole number >= 1"):
        start(model_path=reward_model_dir, batch_size=0)
    with pytest.raises(KeyError, match="unknown reward_function_kwargs"):
        start(model_path=reward_model_dir, model="x")
    two = build_classifier(tiny_model_dir, str(tmp_path / "two_labels"), num_labels=2)
    with pytest.raises(ValueError, match="one output \\(num_labels=1\\), this one has 2"):
        start(model_path=two)
