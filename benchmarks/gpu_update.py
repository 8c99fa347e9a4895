"""Update-phase throughput and MFU of the actor on one GPU: padded vs padding-free micro-batches.

One process, one rank (NCCL; gloo with --device cpu for a smoke run), the trainer's own code: the model
sharded by `shard_model` (FSDP2, bf16 compute, fp32 master weights), AdamW from `build_optimizer`,
gradient checkpointing as the recipes have it, and one `update_policy` call (one optimizer step over a
rollout-shaped batch: prompts x n responses with one image per prompt) per measurement. The variants
differ only in the micro-batch layout:

* padded, fixed: `micro_batch_size_per_device_for_update` sequences per forward, right-padded (SDPA);
* padded, token budget: `dynamic_batching` with `max_token_len_per_gpu` (count x longest per forward);
* packed, token budget: `padding_free` + `dynamic_batching` (sum of lengths per forward, one row, the
  varlen attention of `pebr.workers.attention`);
* packed, shared prompts: as packed, with `share_prompts` (a prompt laid out once for its n responses, which
  attend to it through the per-sequence SDPA loop); the model FLOPs stay those of the unshared batch;
* with --compile, also the packed layout with torch.compile'd decoder layers (`use_torch_compile`); its
  warm-up update pays the compilation, which is reported apart.

Model FLOPs per step (what MFU divides by the time), the work a log-prob update needs: 6 x (text decoder
matmul parameters) x tokens + 6 x lm_head parameters x response tokens (the only positions whose logits are
used; `response_logprobs` computes no others) + 6 x layers x hidden x sum(length^2) for causal attention
(forward + backward) + 6 x vision parameters x patches of each distinct image once. Gradient checkpointing's recomputation is not counted
(MFU, not hardware utilisation). The peak is measured in the same run: an 8192^3 bf16 matmul.

    python benchmarks/gpu_update.py --sizes gpu-0.6b gpu-2b --json $OUT/gpu_update.json
    python benchmarks/gpu_update.py --device cpu --sizes tiny --prompts 2 --n 2 --reps 1   # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time

import torch
import torch.distributed as dist

from common import fmt, summary  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

from pebr.config import ActorConfig, AlgorithmConfig, OptimConfig
from pebr.protocol import Batch
from pebr.utils.tiny_model import build_processor, build_tokenizer, model_config
from pebr.workers import actor as actor_lib
from pebr.workers.attention import register_varlen_attention, varlen_kernel

VARIANTS = {
    "padded, fixed micro-batches": dict(padding_free=False, dynamic_batching=False),
    "padded, token budget": dict(padding_free=False, dynamic_batching=True),
    "packed (varlen), token budget": dict(padding_free=True, dynamic_batching=True),
    "packed, shared prompts, token budget": dict(padding_free=True, dynamic_batching=True, share_prompts=True),
}
COMPILED = "packed (varlen), token budget, compiled layers"


def init_single_rank(device: torch.device) -> None:
    # A store on a port the system picks, as the trainer's workers meet (no free port to lose in between).
    store = dist.TCPStore("127.0.0.1", 0, 1, is_master=True)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=0, world_size=1)


def matmul_tflops(device: torch.device, size: int = 8192, reps: int = 10) -> float | None:
    """The bf16 matmul rate this device reaches (the MFU denominator), on random data."""
    if device.type != "cuda":
        return None
    a, b = (torch.randn(size, size, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * size ** 3 * reps / (start.elapsed_time(end) / 1e3) / 1e12


def rollout_batch(processor, prompts: int, n: int, image: int, low: int, high: int, seed: int) -> Batch:
    """prompts x n sequences: a chat prompt with one random image, responses of U[low, high] random tokens."""
    from PIL import Image

    rng = random.Random(seed)
    tok = processor.tokenizer
    special = set(tok.all_special_ids) | set(tok.added_tokens_decoder)
    vocab = [i for i in range(len(tok)) if i not in special]
    prompt_ids, response_ids, images = [], [], []
    for k in range(prompts):
        chat = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"How many objects are left? {k}"}]}],
            add_generation_prompt=True, tokenize=False)
        im = Image.frombytes("RGB", (image, image), bytes(rng.randrange(256) for _ in range(image * image * 3)))
        ids = processor(text=[chat], images=[im], return_tensors="pt")["input_ids"][0].tolist()
        for _ in range(n):
            prompt_ids.append(ids)
            response_ids.append([rng.choice(vocab) for _ in range(rng.randint(low, high))])
            images.append([im])
    batch = Batch(prompt_ids=prompt_ids, response_ids=response_ids, images=images, non_tensors={})
    mask = batch.response_mask()
    batch.tensors["response_mask"] = mask
    signs = torch.tensor([rng.choice((-1.0, 1.0)) for _ in range(len(batch))])
    batch.tensors["advantages"] = signs[:, None] * mask
    batch.tensors["ref_logprobs"] = torch.zeros(mask.shape)
    return batch


def model_flops(model, batch: Batch, patches_per_image: int) -> float:
    text = model.model.language_model
    cfg = text.config
    matmul = sum(p.numel() for name, p in text.named_parameters() if "layers." in name and p.dim() == 2)
    lengths = [len(p) + len(r) for p, r in zip(batch.prompt_ids, batch.response_ids)]
    head = 6 * model.lm_head.weight.numel() * sum(len(r) for r in batch.response_ids)
    attention = 6 * cfg.num_hidden_layers * cfg.num_attention_heads * (cfg.hidden_size // cfg.num_attention_heads) * sum(
        L * L for L in lengths)
    vision = sum(p.numel() for p in model.model.visual.parameters() if p.dim() == 2)
    distinct = len({id(ims[0]) for ims in batch.images})
    return 6 * matmul * sum(lengths) + head + attention + 6 * vision * patches_per_image * distinct


def run_size(size: str, args, device: torch.device, save=lambda partial: None) -> dict:
    from transformers import Qwen2_5_VLForConditionalGeneration

    tokenizer = build_tokenizer(2000, 0)
    processor = build_processor(tokenizer, min_pixels=args.image * args.image, max_pixels=args.image * args.image)
    batch = rollout_batch(processor, args.prompts, args.n, args.image, args.response_min, args.response_max, seed=0)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(model_config(size, tokenizer), dtype=torch.float32,
                                                               attn_implementation="sdpa")
    model.config.use_cache = False
    actor_lib.embed_patches_by_matmul(model)  # as `load_hf_model` does for the trainer
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    params = sum(p.numel() for p in model.parameters())
    flops = model_flops(model, batch, (args.image // 14) ** 2)
    model = actor_lib.shard_model(model, param_dtype=torch.bfloat16, cpu_offload=False)
    optimizer, scheduler = actor_lib.build_optimizer(model, OptimConfig(lr=1e-7), total_steps=1000)
    algo = AlgorithmConfig(use_kl_loss=True, kl_coef=1e-2)
    tokens = sum(len(p) + len(r) for p, r in zip(batch.prompt_ids, batch.response_ids))
    print(f"[{size}] {params / 1e9:.2f} B parameters, {len(batch)} sequences, {tokens} tokens, "
          f"{flops / 1e12:.1f} TFLOP per step; packed kernel: {varlen_kernel(device, torch.bfloat16)}", flush=True)

    variants = {v: layout for v, layout in VARIANTS.items() if not args.variants or v in args.variants}
    eager_forwards = [layer.forward for layer in actor_lib.decoder_layers(model)]
    if args.compile:
        variants[COMPILED] = dict(padding_free=True, dynamic_batching=True)
        actor_lib.compile_decoder_layers(model)
        compiled_forwards = [layer.forward for layer in actor_lib.decoder_layers(model)]

    def one(variant: str) -> dict:
        layout = variants[variant]
        for layer, eager, compiled in zip(actor_lib.decoder_layers(model), eager_forwards,
                                          compiled_forwards if args.compile else eager_forwards):
            layer.forward = compiled if variant == COMPILED else eager
        attention = register_varlen_attention() if layout["padding_free"] else "sdpa"
        model.set_attn_implementation(attention)
        assert model.config.text_config._attn_implementation == attention, model.config.text_config._attn_implementation
        cfg = ActorConfig(global_batch_size=args.prompts, micro_batch_size_per_device_for_update=args.micro,
                          max_token_len_per_gpu=args.budget, **layout)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        metrics = actor_lib.update_policy(model, optimizer, scheduler, batch, processor, device, cfg, algo,
                                          temperature=1.0, mini_batch_size=len(batch), first_on_policy=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        out = {"s": seconds, "grad_norm": metrics["actor/grad_norm"], "images_encoded": metrics["actor/images_encoded"]}
        if device.type == "cuda":
            out["peak_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
        plan = actor_lib.plan_micro_batches(batch, args.micro, actor_lib.token_budget(cfg), cfg.padding_free, device,
                                          cfg.share_prompts)
        out["micro_batches"] = len(plan)
        return out

    rows = {v: [] for v in variants}
    warmup = {}
    for v in variants:  # warm-up: kernels, allocator, the autotuning of the first shapes, the compilation
        t0 = time.perf_counter()
        one(v)
        warmup[v] = time.perf_counter() - t0
        print(f"[{size}] warm-up {v}: {warmup[v]:.1f} s", flush=True)
    if args.profile:
        profile(one, size, args.profile, device, variants)
    result = {"size": size, "params": params, "sequences": len(batch), "tokens": tokens, "flops": flops,
              "varlen_kernel": varlen_kernel(device, torch.bfloat16), "variants": rows, "warmup_s": warmup}
    for _ in range(args.reps):
        for v in variants:
            rows[v].append(one(v))
        save(result)  # after every round, so a run cut short keeps what it measured
    del model, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def profile(one, size: str, out_dir: str, device: torch.device, variants: dict) -> None:
    """One update per variant under torch.profiler: the top operators by device and by host time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    os.makedirs(out_dir, exist_ok=True)
    for v in variants:
        t0 = time.perf_counter()
        with torch_profile(activities=activities) as prof:
            one(v)
        wall = time.perf_counter() - t0
        averages = prof.key_averages()
        busy = sum(e.self_device_time_total for e in averages) / 1e6 if device.type == "cuda" else float("nan")
        tables = [f"# {size}, {v}: {wall:.2f} s wall under the profiler, device busy {busy:.2f} s"]
        for key in (["self_device_time_total"] if device.type == "cuda" else []) + ["self_cpu_time_total", "cpu_time_total"]:
            tables.append(averages.table(sort_by=key, row_limit=25, max_name_column_width=70))
        name = f"profile_{size}_{''.join(c if c.isalnum() else '_' for c in v)}.txt"
        with open(os.path.join(out_dir, name), "w") as f:
            f.write("\n\n".join(tables))
        print(tables[0], "\n", tables[1][:6000], flush=True)


def report(results: list[dict], peak: float | None, device_name: str) -> str:
    lines = [f"Device: {device_name}; measured bf16 matmul peak: "
             f"{f'{peak:.0f} TFLOP/s' if peak else 'n/a'}", ""]
    for r in results:
        lines += [f"### {r['size']}: {r['params'] / 1e9:.2f} B parameters, {r['sequences']} sequences, "
                  f"{r['tokens']} tokens, {r['flops'] / 1e12:.1f} model TFLOP per update (packed kernel: "
                  f"{r['varlen_kernel']})", "",
                  "| layout | micro-batches | images encoded | update s | tokens/s | model TFLOP/s | MFU vs measured peak | "
                  f"peak GiB | speed vs {next(iter(r['variants']))} |", "|---|---|---|---|---|---|---|---|---|"]
        base = [x["s"] for x in next(iter(r["variants"].values()))]
        for v, xs in r["variants"].items():
            secs = [x["s"] for x in xs]
            tps = [r["tokens"] / s for s in secs]
            tflops = [r["flops"] / s / 1e12 for s in secs]
            mfu = fmt(summary([t / peak for t in tflops])) if peak else "n/a"
            mem = f"{max(x.get('peak_gib', 0) for x in xs):.1f}" if "peak_gib" in xs[0] else "n/a"
            speed = summary([b / s for b, s in zip(base, secs)])
            lines.append(f"| {v} | {xs[0]['micro_batches']} | {xs[0].get('images_encoded', 'n/a')} | "
                         f"{fmt(summary(secs))} | {fmt(summary(tps))} | "
                         f"{fmt(summary(tflops))} | {mfu} | {mem} | {fmt(speed)} |")
        if COMPILED in r.get("warmup_s", {}):
            lines.append("\nWarm-up update (first shapes, allocator; the compiled row also its compilation): " + ", ".join(
                f"{v} {t:.1f} s" for v, t in r["warmup_s"].items()))
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["gpu-0.6b", "gpu-2b"])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--image", type=int, default=448, help="square image side in pixels (448 -> 256 tokens)")
    parser.add_argument("--response_min", type=int, default=128)
    parser.add_argument("--response_max", type=int, default=1024)
    parser.add_argument("--micro", type=int, default=4, help="micro_batch_size_per_device_for_update (fixed layout)")
    parser.add_argument("--budget", type=int, default=8192, help="max_token_len_per_gpu (token-budget layouts)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=None,
                        help="measure only these layouts (default: all)")
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile'd decoder layers (packed)")
    parser.add_argument("--no_gradient_checkpointing", dest="gradient_checkpointing", action="store_false")
    parser.add_argument("--json", default=None)
    parser.add_argument("--profile", default=None, metavar="DIR",
                        help="also profile one update per variant (torch.profiler) and write the tables to DIR")
    args = parser.parse_args(argv)
    device = torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    init_single_rank(device)
    peak = matmul_tflops(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    results: list[dict] = []

    def save(partial: dict) -> None:
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"device": name, "peak_tflops": peak, "args": vars(args), "results": results + [partial]}, f,
                          indent=1)

    try:
        for size in args.sizes:
            results.append(run_size(size, args, device, save))
    finally:
        print(report(results, peak, name), flush=True)
        dist.destroy_process_group()
    return results


if __name__ == "__main__":
    main()
