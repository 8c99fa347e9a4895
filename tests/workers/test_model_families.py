"""The Qwen-VL families besides Qwen2.5-VL (pebr.workers.actor.SUPPORTED_MODEL_TYPES), and the refusal of others.

Qwen2-VL and Qwen3-VL share Qwen2.5-VL's layout (vision tower, text decoder, M-RoPE positions, vision tokens);
Qwen3-VL's vision tower also feeds deepstack features into the first decoder layers, from modules of its own. The
actor's hooks must carry those too: encoding each distinct image once, and the blank image that gives a frozen-free
vision tower its gradient on a rank whose micro-batch has no image.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from test_actor_batching import CPU, make_batch

from pebr.config import ConfigError, ModelConfig
from pebr.workers import actor as actor_lib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen3_vl"])
def family_dir(request, tmp_path_factory) -> str:
    from pebr.utils.tiny_model import build_tiny_model

    return build_tiny_model(str(tmp_path_factory.mktemp(request.param)), size="tiny", seed=0, family=request.param)


@pytest.fixture(scope="module")
def loaded(family_dir):
    processor = actor_lib.load_processor(ModelConfig(model_path=family_dir))
    torch.manual_seed(0)
    model, varlen = actor_lib.load_hf_model(family_dir), actor_lib.load_hf_model(family_dir, padding_free=True)
    for m in (model, varlen):
        m.config.use_cache = False
    return model, varlen, processor


def test_each_distinct_image_encoded_once_gives_every_copys_logprobs_and_gradients(loaded):
    model, _, processor = loaded
    batch = make_batch(processor).select([3, 6, 0, 5, 2, 7, 1, 4])  # copies of an image apart
    inputs = actor_lib.model_inputs(model, batch, processor, CPU, False)
    assert inputs["image_order"].tolist() == [0, 1, 2, 0, 1, 2]
    results = []
    for layout in (inputs, actor_lib.every_image_copy(inputs)):
        model.zero_grad()
        logp, _ = actor_lib.response_logprobs(model, layout)
        logp.sum().backward()
        results.append((logp.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                        if "visual" in n and p.grad is not None}))
    model.zero_grad()
    (once, once_grads), (every, every_grads) = results
    torch.testing.assert_close(once, every, atol=1e-5, rtol=0)
    assert once_grads.keys() == every_grads.keys() and len(once_grads) > 10
    for name in once_grads:
        torch.testing.assert_close(once_grads[name], every_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_packed_logprobs_match_padded(loaded):
    """The packed row's M-RoPE positions come from the family's own get_rope_index."""
    model, varlen, processor = loaded
    batch = make_batch(processor)
    with torch.no_grad():
        padded, _ = actor_lib.response_logprobs(model, actor_lib.collate(batch, processor, CPU))
        packed, _ = actor_lib.response_logprobs(varlen, actor_lib.collate_packed(batch, processor, CPU, varlen))
    mask = actor_lib.collate(batch, processor, CPU)["response_mask"].bool()
    torch.testing.assert_close(packed[mask], padded[mask], atol=1e-5, rtol=0)


def test_a_forward_without_images_gives_every_vision_parameter_a_gradient(loaded):
    """Qwen3-VL's deepstack mergers were left without a gradient, so two ranks reduce-scattered gradients of
    different sizes when one micro-batch had no image (gloo aborted the run at its first update)."""
    model, _, _ = loaded
    model.zero_grad()
    with actor_lib.vision_tower_in_graph(model):
        model(input_ids=torch.tensor([[1, 2, 3, 4]]), use_cache=False).logits.sum().backward()
    vision = dict(model.model.visual.named_parameters())
    assert [n for n, p in vision.items() if p.grad is None] == []
    assert all(torch.count_nonzero(p.grad) == 0 for p in vision.values())  # 0 x the encoding: nothing learned
    model.zero_grad()


@pytest.mark.parametrize("kind", ["llava", "text-only"])
def test_other_families_are_refused_before_any_worker_or_engine(tmp_path, kind):
    from transformers import LlavaConfig, Qwen2Config

    from pebr.evaluation import load_model_processor

    config = LlavaConfig() if kind == "llava" else Qwen2Config(architectures=["Qwen2ForCausalLM"])
    config.save_pretrained(tmp_path)
    expected = (r"is a 'llava' model" if kind == "llava" else r"is a 'qwen2' model \(Qwen2ForCausalLM\)") + \
        r".*runs the Qwen-VL families qwen2_5_vl, qwen2_vl, qwen3_vl"
    for load in (lambda: actor_lib.load_processor(ModelConfig(model_path=str(tmp_path))),  # the trainer, before Ray
                 lambda: load_model_processor(str(tmp_path)),  # inference, evaluation, the SFT warm-up
                 lambda: actor_lib.load_hf_model(str(tmp_path))):  # every model load
        with pytest.raises(ConfigError, match=expected):
            load()


@pytest.mark.slow
def test_qwen3_vl_trains_on_two_workers_with_text_only_and_image_questions(tmp_path, synthetic_data_dir, ray_session):
    """The case that crashed: half the questions text-only, the vision tower trained, each image encoded once for
    its n responses (share_prompts off), two gloo workers; then the merged model loads as a Qwen3-VL."""
    from pebr.trainer.main import run
    from pebr.utils.tiny_model import build_tiny_model

    model_dir = build_tiny_model(str(tmp_path / "qwen3_vl"), size="tiny", seed=0, family="qwen3_vl")
    records = json.load(open(os.path.join(synthetic_data_dir, "train.json")))[:16]
    mixed = [dict(r, problem=r["problem"].replace("<image>", ""), images=[]) if i % 2 else r
             for i, r in enumerate(records)]
    (tmp_path / "mixed.json").write_text(json.dumps(mixed))
    run_dir = tmp_path / "run"
    run([f"config={ROOT}/examples/pebr_stage2.yaml", f"config={ROOT}/examples/pebr_cpu.yaml",
         f"worker.actor.model.model_path={model_dir}", f"data.train_files={tmp_path / 'mixed.json'}",
         f"data.image_dir={synthetic_data_dir}/images", "data.max_response_length=8", "trainer.max_steps=2",
         "trainer.save_freq=2", "trainer.val_freq=0", f"trainer.save_checkpoint_path={run_dir}",
         "worker.actor.share_prompts=false", "worker.actor.model.freeze_vision_tower=false"])
    metrics = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    assert [m["step"] for m in metrics] == [1, 2] and all(m["actor/grad_norm"] > 0 for m in metrics)
