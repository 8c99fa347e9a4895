"""The actor and the vLLM engine expand an image into the same tokens, whatever the data's pixel bounds.

The data set resizes each image within `data.min_pixels`..`data.max_pixels`; the model's image processor then
applies its own bounds, on the actor's side and inside vLLM alike. Were the two processors to differ, an image
would become one number of tokens in the engine's prompt and another in the actor's pixel values, and the
actor's forward would fail (or, with equal counts, see another image than the one sampled from).
"""

from __future__ import annotations

import os
import sys

import pytest

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# (min_pixels, max_pixels) of the data, against the tiny model's processor bounds of 3136..50176 px: the
# 56x56 synthetic images become 28x28 (below the processor's minimum) or 252x252 (above its maximum).
BOUNDS = [(576, 784), (57344, 802816)]


def image_tokens_both_sides(model_dir: str, data_dir: str) -> list[dict]:
    """In a fresh process (one vLLM engine): for each bound setting, the first prompt's image size after the
    data set, its length as the engine's prompt and as the actor's processor expands it, and the image
    tokens each side has."""
    from pebr.config import load_config
    from pebr.trainer.main import build_dataset
    from pebr.workers.actor import image_inputs, load_processor
    from pebr.workers.rollout import SamplingConfig, VLLMRollout

    rows = []
    for min_pixels, max_pixels in BOUNDS:
        cfg = load_config([
            f"config={ROOT}/examples/pebr_stage2.yaml", f"config={ROOT}/examples/pebr_cpu.yaml",
            f"worker.actor.model.model_path={model_dir}", f"data.train_files={data_dir}/train.json",
            f"data.image_dir={data_dir}/images", f"data.min_pixels={min_pixels}", f"data.max_pixels={max_pixels}"])
        processor = load_processor(cfg.worker.actor.model)
        item = build_dataset(cfg, cfg.data.train_files, processor)[0]
        actor_ids = processor(text=[item["prompt"]], images=item["images"])["input_ids"][0]
        _, grid, _ = image_inputs(item["images"], processor)
        rows.append({"bounds": (min_pixels, max_pixels), "size": item["images"][0].size, "prompt": item,
                     "actor_len": len(actor_ids), "actor_image_tokens": int(grid.prod(-1).sum()) // 4})
    rollout = VLLMRollout(model_dir, dtype="fp32", max_model_len=1024, tensor_parallel_size=1,
                          gpu_memory_utilization=0.5, cpu_kv_cache_gb=1, enforce_eager=True,
                          enable_chunked_prefill=False, max_num_batched_tokens=1024, limit_images=1, seed=0,
                          trust_remote_code=False, tokenizer=processor.tokenizer, external_launcher=False)
    greedy = SamplingConfig(n=1, temperature=0.0, top_p=1.0, top_k=-1, max_tokens=1)
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    for row, gen in zip(rows, rollout.generate([row.pop("prompt") for row in rows], greedy)):
        row["engine_len"] = len(gen.prompt_ids)
        row["engine_image_tokens"] = gen.prompt_ids.count(image_pad)
    return rows


def test_actor_and_engine_expand_images_alike_outside_the_processor_bounds(tiny_model_dir, synthetic_data_dir,
                                                                            ray_session):
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # test modules are not importable in workers
    rows = ray_session.get(ray_session.remote(max_calls=1)(image_tokens_both_sides).remote(
        tiny_model_dir, synthetic_data_dir))
    assert [row["size"] for row in rows] == [(28, 28), (252, 252)]  # the data set's resize, outside 3136..50176
    for row in rows:
        assert row["actor_image_tokens"] == row["engine_image_tokens"], row
        assert row["actor_len"] == row["engine_len"], row
    # The processor's bounds win on both sides: 28x28 is enlarged to 56x56 (4 tokens), 252x252 shrunk to 224x224.
    assert [row["engine_image_tokens"] for row in rows] == [4, 64]
