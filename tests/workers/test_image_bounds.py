"""The actor and the vLLM engine see the same image tokens, whatever the data's pixel bounds or image count.

The data set resizes each image within `data.min_pixels`..`data.max_pixels`; the model's image processor then
applies its own bounds, on the actor's side and inside vLLM alike. Were the two processors to differ, an image
would become one number of tokens in the engine's prompt and another in the actor's pixel values, and the
actor's forward would fail ("Image features and image tokens do not match") or score another image than the
one sampled from. The log-probs of both sides are compared too, with two images in one prompt among them.

The tokenizer comes from a `worker.actor.model.tokenizer_path` that splits text into other ids than the
model's own tokenizer, so the engine must tokenize the prompt with that path as the actor does.
"""

from __future__ import annotations

import json
import os
import sys

import pytest

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# (min_pixels, max_pixels) of the data, against the tiny model's processor bounds of 3136..50176 px: the
# 56x56 synthetic images become 28x28 (below the processor's minimum), 252x252 (above its maximum), and
# stay 56x56 in a record with two images.
CASES = {"under the minimum": (576, 784), "over the maximum": (57344, 802816), "two images": (3136, 50176)}


def both_sides(model_dir: str, tokenizer_dir: str, data_dir: str, two_image_file: str) -> dict[str, dict]:
    """In a fresh process (one vLLM engine): for each case, the first prompt's image sizes after the data set,
    its length and image tokens as the engine's prompt and as the actor expands it, and the largest gap
    between the engine's log-probs of its sampled tokens and the actor's (a plain transformers forward)."""
    import torch

    from pebr.config import ModelConfig, RolloutConfig, load_config
    from pebr.protocol import Batch
    from pebr.trainer.main import build_dataset
    from pebr.workers import actor as actor_lib
    from pebr.workers.rollout import SamplingConfig, VLLMRollout

    rows, prompts = {}, []
    for case, (min_pixels, max_pixels) in CASES.items():
        train = two_image_file if case == "two images" else f"{data_dir}/train.json"
        cfg = load_config([
            f"config={ROOT}/examples/pebr_stage2.yaml", f"config={ROOT}/examples/pebr_cpu.yaml",
            f"worker.actor.model.model_path={model_dir}", f"data.train_files={train}",
            f"data.image_dir={data_dir}/images", f"data.min_pixels={min_pixels}", f"data.max_pixels={max_pixels}",
            "worker.rollout.limit_images=2", f"worker.actor.model.tokenizer_path={tokenizer_dir}"])
        processor = actor_lib.load_processor(cfg.worker.actor.model)
        own_tokenizer = actor_lib.load_processor(ModelConfig(model_path=model_dir))
        item = build_dataset(cfg, cfg.data.train_files, processor)[0]
        _, grid, _ = actor_lib.image_inputs(item["images"], processor)
        rows[case] = {"sizes": [im.size for im in item["images"]],
                      "actor_len": len(processor(text=[item["prompt"]], images=item["images"])["input_ids"][0]),
                      "model_tokenizer_len": len(own_tokenizer(text=[item["prompt"]], images=item["images"])["input_ids"][0]),
                      "actor_image_tokens": int(grid.prod(-1).sum()) // 4}
        prompts.append(item)
    rollout = VLLMRollout(model_dir, dtype="fp32", max_model_len=1024, tensor_parallel_size=1,
                          gpu_memory_utilization=0.5, cpu_kv_cache_gb=1, enforce_eager=True,
                          enable_chunked_prefill=False, max_num_batched_tokens=1024, limit_images=2, seed=0,
                          trust_remote_code=False, external_launcher=False, tokenizer_path=tokenizer_dir)
    # Processed images kept to worker.rollout.mm_cache_gb: vLLM's own 4 GiB grew every worker by that much.
    assert rollout.llm.llm_engine.model_config.multimodal_config.mm_processor_cache_gb == RolloutConfig.mm_cache_gb
    sampled = SamplingConfig(n=2, temperature=1.0, top_p=1.0, top_k=-1, max_tokens=8, seed=3, logprobs=True)
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    model = actor_lib.load_hf_model(model_dir).eval()
    for (case, row), item, gen in zip(rows.items(), prompts, rollout.generate(prompts, sampled)):
        row["engine_len"] = len(gen.prompt_ids)
        row["engine_image_tokens"] = gen.prompt_ids.count(image_pad)
        if row["engine_len"] != row["actor_len"]:
            continue  # the actor cannot even run this prompt
        batch = Batch(prompt_ids=[gen.prompt_ids] * 2, response_ids=gen.responses, images=[item["images"]] * 2,
                      non_tensors={})
        with torch.no_grad():
            actor, _ = actor_lib.response_logprobs(model, actor_lib.collate(batch, processor, torch.device("cpu")))
        mask = batch.response_mask()
        engine = torch.zeros_like(actor)
        for i, logprobs in enumerate(gen.logprobs):
            engine[i, :len(logprobs)] = torch.tensor(logprobs)
        row["logprob_gap"] = ((engine - actor).abs() * mask).max().item()
    return rows


@pytest.fixture
def two_image_file(synthetic_data_dir, tmp_path) -> str:
    with open(os.path.join(synthetic_data_dir, "train.json")) as f:
        first, second = json.load(f)[:2]
    first["images"] = first["images"] + second["images"]
    first["problem"] = "<image>" + first["problem"]
    path = str(tmp_path / "two_images.json")
    with open(path, "w") as f:
        json.dump([first], f)
    return path


def test_actor_and_engine_see_the_same_image_tokens(tiny_model_dir, coarse_tokenizer_dir, synthetic_data_dir,
                                                    two_image_file, ray_session):
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # test modules are not importable in workers
    rows = ray_session.get(ray_session.remote(max_calls=1)(both_sides).remote(
        tiny_model_dir, coarse_tokenizer_dir, synthetic_data_dir, two_image_file))
    assert {case: row["sizes"] for case, row in rows.items()} == {
        "under the minimum": [(28, 28)], "over the maximum": [(252, 252)], "two images": [(56, 56), (56, 56)]}
    for case, row in rows.items():
        assert row["actor_image_tokens"] == row["engine_image_tokens"], (case, row)
        assert row["actor_len"] == row["engine_len"], (case, row)
        assert row["model_tokenizer_len"] < row["engine_len"], (case, row)  # tokenizer_path's ids, not the model's
        assert row["logprob_gap"] < 2e-3, (case, row)
    # The processor's bounds win on both sides: 28x28 is enlarged to 56x56 (4 tokens), 252x252 shrunk to 224x224.
    assert [row["engine_image_tokens"] for row in rows.values()] == [4, 64, 8]
