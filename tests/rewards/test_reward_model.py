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
    tokenizer, _ = module._loaded[reward_model_dir, "auto"]
    text = module.conversation(tokenizer, "<image>How many cubes?", "Three.")
    assert "<image>" not in text and "<|im_start|>user\nHow many cubes?<|im_end|>" in text
    assert "<|im_start|>assistant\nThree.<|im_end|>" in text
    # Cut from the left: a long response scores as its last max_length tokens do.
    long = "one two three four five six seven eight nine ten " * 20 + "### The final answer is: 3"
    ids = tokenizer(module.conversation(tokenizer, "How many cubes?", long))["input_ids"]
    cut = module.compute_score(items([long]), model_path=reward_model_dir, max_length=16)[0]["reward_model"]
    _, model = module._loaded[reward_model_dir, "auto"]
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


def test_the_dtype_setting_picks_the_models_precision(reward_model_dir):
    """auto is fp32 on a CPU (bf16 on a card that has it, as the trainer's); bf16 is taken when asked, and scores
    near fp32; another name is refused at start-up, naming the key."""
    from pebr.config import ConfigError

    module = load_reward_module(SPEC)
    fp32 = module.compute_score(items(RESPONSES), model_path=reward_model_dir)
    bf16 = module.compute_score(items(RESPONSES), model_path=reward_model_dir, dtype="bf16")
    assert next(module._loaded[reward_model_dir, "auto"][1].parameters()).dtype == torch.float32
    assert next(module._loaded[reward_model_dir, "bf16"][1].parameters()).dtype == torch.bfloat16
    for a, b in zip(fp32, bf16):
        assert b["reward_model"] == pytest.approx(a["reward_model"], abs=0.05)
    with pytest.raises(ConfigError, match="reward_function_kwargs.dtype='fp16': must be one of auto, bf16, fp32"):
        RewardManager(f"{SPEC}:compute_score", reward_function_kwargs={"model_path": reward_model_dir, "dtype": "fp16"})


GPU_CHECK = r"""
import json, sys, types
import ray
from pebr.config import ConfigError
from pebr.trainer.main import start_reward_worker

ray.init(num_cpus=2, num_gpus=2, include_dashboard=False)  # (this machine has none: Ray's accounting alone)
said = []
for device, world_size in (("cuda", 2), ("cpu", 1)):
    cfg = types.SimpleNamespace(
        world_size=world_size, trainer=types.SimpleNamespace(device=device, worker_timeout_s=120.0),
        worker=types.SimpleNamespace(reward=types.SimpleNamespace(
            reward_function=f"{sys.argv[1]}:compute_score", reward_type="batch", reward_function_kwargs={},
            num_gpus=1)))
    try:
        worker = start_reward_worker(cfg)
    except ConfigError as err:
        said.append({"refused": str(err)})
    else:
        said.append({"scores": ray.get(worker.compute.remote([{}]))})
print(json.dumps(said))
"""


@pytest.mark.slow  # (a Ray cluster of its own)
def test_worker_reward_num_gpus_gives_the_reward_actor_a_card_of_its_own(tmp_path):
    """On a cluster that declares 2 GPUs: beside 2 GPU workers there is no card for the reward actor, and the run is
    refused before the actor starts, naming the setting (the actor, or the last worker, waited until
    trainer.worker_timeout_s); beside CPU workers the actor asks Ray for one and is shown that card alone."""
    import json
    import subprocess
    import sys

    reward = tmp_path / "sees_gpus.py"
    reward.write_text("import os\n\ndef compute_score(reward_inputs):\n"
                      "    cards = [d for d in os.environ.get('CUDA_VISIBLE_DEVICES', '').split(',') if d]\n"
                      "    return [{'overall': float(len(cards))}]\n")
    proc = subprocess.run([sys.executable, "-c", GPU_CHECK, str(reward)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_ADDRESS": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    refused, placed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert refused["refused"] == (
        "worker.reward.num_gpus=1: the reward actor needs 1 GPU(s) of its own beside the 2 of the training workers "
        "(trainer.nnodes x trainer.n_gpus_per_node), 3 in all, and the Ray cluster has 2; lower "
        "trainer.n_gpus_per_node to leave cards free, or set worker.reward.num_gpus=0 (the reward actor on a CPU)")
    assert placed == {"scores": [{"overall": 1.0}]}  # CUDA_VISIBLE_DEVICES names one card, its own
