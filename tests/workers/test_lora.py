"""LoRA on the actor: folding by hand, the adapted model against its folded and base forms, and two gloo ranks
training adapters with the reference from the same model, the engine on folded weights and a merged checkpoint."""

from __future__ import annotations

import os
import sys

import pytest
import ray
import torch

from pebr import checkpoint
from pebr.config import ConfigError, load_config
from pebr.workers import lora

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import the test modules
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ADAPTERS = {"rank": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj", "down_proj"]}


def test_fold_lora_by_hand():
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    a = torch.tensor([[1.0, 2.0]])  # rank 1, 2 inputs
    b = torch.tensor([[1.0], [3.0]])  # 2 outputs
    stream = [("m.proj.base_layer.weight", w), ("m.proj.base_layer.bias", torch.tensor([5.0, 6.0])),
              ("m.proj.lora_A.default.weight", a), ("m.proj.lora_B.default.weight", b), ("m.norm.weight", w[0])]
    out = list(lora.fold_lora(stream, scaling=0.5))
    # W + 0.5 * B @ A = I + 0.5 * [[1, 2], [3, 6]]
    assert [n for n, _ in out] == ["m.proj.bias", "m.proj.weight", "m.norm.weight"]
    assert torch.equal(out[1][1], torch.tensor([[1.5, 1.0], [1.5, 4.0]]))
    assert torch.equal(out[0][1], torch.tensor([5.0, 6.0])) and torch.equal(out[2][1], w[0])
    assert torch.equal(w, torch.eye(2))  # the inputs are left as they were
    assert sorted(lora.folded_names(n for n, _ in stream)) == sorted(n for n, _ in out)
    with pytest.raises(ValueError, match=r"LoRA layer 'm.proj' lacks \['B'\]"):
        list(lora.fold_lora(stream[:3], 0.5))
    with pytest.raises(ValueError, match="only one LoRA adapter"):
        list(lora.fold_lora([("m.proj.lora_A.second.weight", a)], 0.5))


def test_adapted_model_equals_its_folded_weights_and_switches_back_to_its_base(tiny_model_dir):
    from pebr.workers.actor import load_hf_model

    model = lora.add_lora(load_hf_model(tiny_model_dir), ADAPTERS)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    # Only adapters train, and only on the text decoder's named linears (the vision MLP has a down_proj too).
    assert trainable and all(".lora_" in n and "language_model" in n for n in trainable)
    assert {n.split(".lora_")[0].rsplit(".", 1)[1] for n in trainable} == set(ADAPTERS["target_modules"])
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:  # B starts at zero (the adapted model is the base): make it count
                p.normal_(0.0, 0.1)
    folded = load_hf_model(tiny_model_dir)
    folded.load_state_dict(dict(lora.fold_lora(model.named_parameters(), ADAPTERS["alpha"] / ADAPTERS["rank"])),
                           strict=True)
    base = load_hf_model(tiny_model_dir)
    ids = torch.randint(0, 200, (2, 10))
    with torch.no_grad():
        adapted, plain, original = (m(input_ids=ids).logits for m in (model, folded, base))
        with lora.adapters_disabled(model):
            switched_off = model(input_ids=ids).logits
    assert (adapted - original).abs().max() > 1e-2  # the adapters change the function...
    torch.testing.assert_close(plain, adapted, atol=1e-5, rtol=0)  # ...and folding keeps it
    torch.testing.assert_close(switched_off, original, atol=0, rtol=0)
    with lora.adapters_disabled(model):  # the switch leaves requires_grad alone (FSDP2 copies it at each unshard)
        assert [n for n, p in model.named_parameters() if p.requires_grad] == trainable
    with pytest.raises(ValueError, match=r"lora_target_modules=\['qkv_proj'\] matches no linear layer"):
        lora.add_lora(load_hf_model(tiny_model_dir), {**ADAPTERS, "target_modules": ["qkv_proj"]})


def test_target_modules_are_the_decoders_linears_in_one_order():
    assert lora.target_modules(["all-linear"]) == list(lora.DECODER_LINEARS)
    in_order = ["q_proj", "v_proj"]
    assert lora.target_modules(["v_proj", "q_proj"]) == lora.target_modules(in_order) == in_order
    settings = {"lora_rank": 8, "lora_alpha": 16, "lora_target_modules": ["down_proj", "q_proj"]}
    assert lora.requested_settings(type("M", (), settings)) == {"rank": 8, "alpha": 16.0,
                                                                 "target_modules": ["q_proj", "down_proj"]}


@pytest.mark.parametrize("override,message", [
    ("worker.actor.model.lora_rank=-1", "lora_rank=-1 must be >= 0"),
    ("worker.actor.model.lora_alpha=0", "lora_alpha=0.0 must be positive"),
    ("worker.actor.model.lora_target_modules=[]", r"lora_target_modules=\[\]: empty"),
    ("worker.actor.model.lora_target_modules=[q_proj,lm_head]", r"\['lm_head'\]; name linear layers of the text "
                                                                 r"decoder, \['q_proj'.*or all-linear"),
])
def test_bad_lora_settings_are_refused_naming_the_key(tiny_model_dir, synthetic_data_dir, override, message):
    with pytest.raises(ConfigError, match=message):
        make_config(tiny_model_dir, synthetic_data_dir, 1, "worker.actor.model.lora_rank=4", override)


def make_config(model_dir: str, data_dir: str, world: int, *extra: str):
    return load_config([
        f"config={ROOT}/examples/pebr_stage2.yaml", f"config={ROOT}/examples/pebr_cpu.yaml",
        f"worker.actor.model.model_path={model_dir}", f"data.train_files={data_dir}/train.json",
        f"data.image_dir={data_dir}/images", f"trainer.n_gpus_per_node={world}", "data.max_response_length=16",
        "worker.rollout.n=2", *extra])


@pytest.mark.slow
def test_two_ranks_train_adapters_against_the_base_and_merge_them(tiny_model_dir, synthetic_data_dir, ray_session,
                                                                   tmp_path):
    from transformers import AutoModelForImageTextToText

    from pebr.trainer.main import build_dataset
    from pebr.trainer.ray_trainer import WorkerGroup, batch_advantages
    from pebr.workers.actor import load_processor

    # One mini-batch per rollout (global batch = rollout batch of 4 prompts), two epochs over it: the first
    # optimizer step takes its old log-probs from its own forward, so the reference pass is the step's first
    # forward (the parameters still sharded), and the second step needs the adapters to have stayed trainable.
    cfg = make_config(tiny_model_dir, synthetic_data_dir, 2, "worker.actor.optim.lr=5e-2",
                      "worker.actor.global_batch_size=4", "worker.actor.ppo_epochs=2",
                      f"worker.actor.model.lora_rank={ADAPTERS['rank']}",
                      f"worker.actor.model.lora_alpha={ADAPTERS['alpha']}",
                      f"worker.actor.model.lora_target_modules=[{','.join(ADAPTERS['target_modules'])}]")
    assert cfg.worker.actor.fsdp.enable_full_shard is False  # the CPU recipe's ZeRO-2, where the bug showed
    dataset = build_dataset(cfg, cfg.data.train_files, load_processor(cfg.worker.actor.model))
    prompts = [dict(dataset[i], uid=f"u{i}") for i in range(4)]
    sampling = {"n": 2, "temperature": 1.0, "top_p": 1.0, "top_k": -1, "max_tokens": 16, "logprobs": True}
    group = WorkerGroup(cfg, total_steps=10)
    try:
        assert all(w["weight_sync"] == "direct copies into the engine's parameters" for w in group.started)
        # The adapters start from data.seed, on both ranks alike: each process drew its own, so two runs of one
        # config trained apart from their first step.
        from pebr.workers.actor import load_hf_model

        initial = group.call_all("full_state_dict")[0]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.data.seed)
            alone = lora.add_lora(load_hf_model(tiny_model_dir, False, cfg.worker.actor.padding_free), ADAPTERS)
        starts = {k: v for k, v in alone.state_dict().items() if "lora_A" in k}
        assert starts and all(torch.equal(initial[k].cpu(), v) for k, v in starts.items())
        batch, _ = group.generate(prompts, dict(sampling, seed=3))
        first = group.compute_log_probs(batch, on_policy=len(batch))  # reference only: the update gives the old
        assert set(first) == {"ref_logprobs"}
        mask = batch.response_mask()
        batch.tensors.update(first)
        batch.tensors["scores"] = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0])
        batch_advantages(batch, cfg.algorithm)
        metrics = group.update_actor(batch)  # two optimizer steps; writes the old log-probs into `batch`
        assert metrics["actor/grad_norm"] > 0
        # B starts at zero: the reference (adapters off) and the actor agreed before the update.
        torch.testing.assert_close(first["ref_logprobs"] * mask, batch.tensors["old_logprobs"][:, :mask.shape[1]]
                                   * mask, atol=1e-5, rtol=0)
        again = group.compute_log_probs(batch)
        moved = ((again["old_logprobs"] - first["ref_logprobs"]).abs() * mask).max().item()
        assert moved > 0.05, moved
        # The reference is still the base model, though the model it runs in has changed.
        torch.testing.assert_close(again["ref_logprobs"] * mask, first["ref_logprobs"] * mask, atol=1e-5, rtol=0)

        # The engine samples with the folded weights: its log-probs are the trained actor's.
        fresh, _ = group.generate(prompts, dict(sampling, seed=4))
        actor = group.compute_log_probs(fresh)["old_logprobs"]
        gap = ((fresh.tensors["rollout_logprobs"] - actor).abs() * fresh.response_mask()).max().item()
        assert gap < 2e-3, f"vLLM and the LoRA actor disagree by {gap}: the folded weight sync is broken"

        ckpt = str(tmp_path / "ckpt")
        group.call_all("save_checkpoint", os.path.join(checkpoint.partial_dir(ckpt, 1), "actor"), False)
        actor_dir = os.path.join(checkpoint.finalize(ckpt, 1, {"global_step": 1}, save_limit=-1), "actor")
        assert checkpoint.read_index(actor_dir)["lora"] == ADAPTERS
        trained = group.call_all("full_state_dict")[0]
        sys.path.insert(0, os.path.join(ROOT, "scripts"))
        from model_merger import merge

        merged = AutoModelForImageTextToText.from_pretrained(merge(actor_dir)).state_dict()
        expected = dict(lora.fold_lora(trained.items(), ADAPTERS["alpha"] / ADAPTERS["rank"]))
        base = AutoModelForImageTextToText.from_pretrained(tiny_model_dir).state_dict()
        assert set(merged) == set(expected)
        changed = set()
        for name, value in expected.items():
            torch.testing.assert_close(merged[name], value.cpu(), atol=1e-6, rtol=0, msg=name)
            if name in base and not torch.equal(base[name], merged[name]):
                changed.add(name)
        # Exactly the targeted linears of the text decoder moved; the rest is the base model, bit for bit.
        targets = {f"model.language_model.layers.{i}.{part}.{m}.weight" for i in range(64)
                   for part in ("self_attn", "mlp") for m in ADAPTERS["target_modules"]}
        assert changed and changed <= targets, sorted(changed - targets)

        # Restoring the checkpoint gives back the adapters (and the frozen base) exactly.
        group.call_all("load_checkpoint", actor_dir)
        restored = group.call_all("full_state_dict")[1]
        assert all(torch.equal(restored[k].cpu(), v.cpu()) for k, v in trained.items())
    finally:
        group.shutdown()


def test_adapters_exported_for_peft_give_the_merged_model(tiny_model_dir, tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    from model_merger import export_adapter, merge
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from pebr.workers.actor import load_hf_model

    model = lora.add_lora(load_hf_model(tiny_model_dir), ADAPTERS)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0.0, 0.1)
    run = tmp_path / "run"
    actor = os.path.join(checkpoint.partial_dir(str(run), 1), "actor")
    checkpoint.save_sharded(actor, model, None, None, rank=0, world_size=1, lora=ADAPTERS)
    load_hf_model(tiny_model_dir).config.save_pretrained(os.path.join(actor, "huggingface"))
    AutoProcessor.from_pretrained(tiny_model_dir).save_pretrained(os.path.join(actor, "huggingface"))  # as the trainer
    (run / "config.yaml").write_text(f"worker:\n  actor:\n    model:\n      model_path: {tiny_model_dir}\n")
    actor = os.path.join(checkpoint.finalize(str(run), 1, {"global_step": 1}, save_limit=-1), "actor")

    out = export_adapter(actor, str(tmp_path / "adapter"))
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors"]
    base = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.float32)
    ids = torch.randint(0, 200, (2, 10))
    with torch.no_grad():
        original, trained = base(input_ids=ids).logits, model(input_ids=ids).logits
    peft_model = PeftModel.from_pretrained(base, out)  # adapters injected into `base`
    assert peft_model.peft_config["default"].base_model_name_or_path == tiny_model_dir
    merged = AutoModelForImageTextToText.from_pretrained(merge(actor), dtype=torch.float32)
    with torch.no_grad():
        adapted, ours = peft_model(input_ids=ids).logits, merged(input_ids=ids).logits
    assert (trained - original).abs().max() > 1e-2  # the adapters count
    torch.testing.assert_close(adapted, trained, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours, trained, atol=1e-5, rtol=0)

    export_adapter(actor, out)  # an earlier export is replaced
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(checkpoint.CheckpointError,
                       match=r"holds \['notes.txt'\], not only an earlier export's adapter files"):
        export_adapter(actor, str(tmp_path / "other"))
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
