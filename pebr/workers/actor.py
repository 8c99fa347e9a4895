"""The FSDP2 policy (and reference) model: build, shard, compute log-probs, update.

Everything here runs inside one worker process, on one rank of a torch.distributed group.
Every rank runs the same number of forward passes per call (the controller gives each rank an equal
share), because FSDP gathers parameters with collective operations.
"""

from __future__ import annotations

import math
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

from pebr.algorithms.losses import agg_loss, entropy_from_logits, kl_penalty, logprobs_from_logits, masked_mean, ppo_policy_loss
from pebr.protocol import Batch

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' means bf16 on CUDA and fp32 on CPU (see README: bf16 on CPU is opt-in, measured in benchmarks/)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def load_hf_model(model_path: str, trust_remote_code: bool = False) -> torch.nn.Module:
    """Load a Qwen2.5-VL-style model in fp32 (the master weights)."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    model = AutoModelForImageTextToText.from_pretrained(
        model_path, config=config, dtype=torch.float32, trust_remote_code=trust_remote_code,
        attn_implementation="sdpa")
    return model


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The text decoder layers, each its own FSDP unit."""
    return list(model.model.language_model.layers)


def shard_model(model: torch.nn.Module, *, param_dtype: torch.dtype, cpu_offload: bool,
                reshard_after_forward: bool = True) -> torch.nn.Module:
    """Apply FSDP2 per decoder layer and at the root.

    The vision tower stays in the root unit on purpose: a rank whose micro-batch has no image skips
    the vision forward, and per-block units there would then wait forever for that rank's collectives.
    """
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    kwargs: dict[str, Any] = {"mp_policy": mp, "reshard_after_forward": reshard_after_forward}
    if cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return model


def collate(batch: Batch, processor: Any, device: torch.device) -> dict[str, torch.Tensor]:
    """Model inputs for a micro-batch: prompt + response, right-padded, with pixel values.

    Returns a dict with input_ids / attention_mask / mm_token_type_ids [B, L], pixel_values and
    image_grid_thw when there are images, and `response_index` [B, T]: the position of each
    response token in the sequence (for gathering its log-prob), plus `response_mask` [B, T].
    """
    tok = processor.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    seqs = [p + r for p, r in zip(batch.prompt_ids, batch.response_ids)]
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        input_ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        attention_mask[i, : len(s)] = 1
    image_token_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    # Without mm_token_type_ids transformers silently uses 1-D positions for image tokens (see ENVIRONMENT.md).
    mm_token_type_ids = (input_ids == image_token_id).to(torch.int32)
    out = {"input_ids": input_ids, "attention_mask": attention_mask, "mm_token_type_ids": mm_token_type_ids}
    images = [im for ims in batch.images for im in ims]
    if images:
        vision = processor.image_processor(images=images, return_tensors="pt")
        out["pixel_values"] = vision["pixel_values"]
        out["image_grid_thw"] = vision["image_grid_thw"]
    resp_len = batch.response_lengths
    t = int(resp_len.max())
    prompt_len = torch.tensor([len(p) for p in batch.prompt_ids], dtype=torch.long)
    offsets = torch.arange(t)[None, :]
    out["response_mask"] = (offsets < resp_len[:, None]).float()
    out["response_index"] = (prompt_len[:, None] + offsets).clamp(max=width - 1)
    return {k: v.to(device) for k, v in out.items()}


def response_logprobs(model: torch.nn.Module, inputs: dict[str, torch.Tensor], temperature: float = 1.0,
                      with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs [B, T] of the response tokens (and their entropies) under `model`.

    Logits are divided by the rollout temperature, so the log-probs are those of the distribution
    the responses were sampled from.
    """
    model_inputs = {k: v for k, v in inputs.items() if k not in ("response_mask", "response_index")}
    logits = model(**model_inputs, use_cache=False).logits  # [B, L, V]
    # The token at position j is predicted by the logits at j - 1.
    index = inputs["response_index"]
    pred = torch.gather(logits, 1, (index - 1).clamp(min=0)[..., None].expand(-1, -1, logits.shape[-1]))
    pred = pred.float() / temperature
    labels = torch.gather(inputs["input_ids"], 1, index)
    logp = logprobs_from_logits(pred, labels) * inputs["response_mask"]
    entropy = entropy_from_logits(pred) * inputs["response_mask"] if with_entropy else None
    return logp, entropy


def micro_batches(batch: Batch, size: int) -> Iterator[Batch]:
    for start in range(0, len(batch), size):
        yield batch.select(range(start, min(start + size, len(batch))))


@torch.no_grad()
def compute_logprobs(model: torch.nn.Module, batch: Batch, processor: Any, device: torch.device,
                     micro_batch_size: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs and entropies [N, T] of every response of `batch` (padded to the batch's longest)."""
    model.eval()
    width = int(batch.response_lengths.max())
    logps, ents = [], []
    for mb in micro_batches(batch, micro_batch_size):
        logp, ent = response_logprobs(model, collate(mb, processor, device), temperature, with_entropy=True)
        logps.append(torch.nn.functional.pad(logp.cpu(), (0, width - logp.shape[1])))
        ents.append(torch.nn.functional.pad(ent.cpu(), (0, width - ent.shape[1])))
    return torch.cat(logps), torch.cat(ents)


def global_sum(value: float, device: torch.device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return float(t.item())


def update_policy(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, batch: Batch,
                  processor: Any, device: torch.device, cfg: Any, algo: Any, temperature: float,
                  mini_batch_size: int) -> dict[str, float]:
    """PPO/GRPO updates on this rank's share of the experience.

    `batch` carries tensors old_logprobs, advantages and (with a KL loss) ref_logprobs, [N, T].
    The share is cut into mini-batches of `mini_batch_size` samples (one optimizer step each) and each mini-batch into
    micro-batches (gradient accumulation). The loss of a micro-batch is scaled so that the summed
    gradient equals the gradient of the loss averaged over the whole global mini-batch: token-mean
    over all valid tokens of all ranks (loss_avg_mode=token) or mean over all sequences (seq).
    FSDP averages gradients over ranks, hence the factor world_size.
    """
    model.train()
    world = dist.get_world_size() if dist.is_initialized() else 1
    token_mode = cfg.loss_avg_mode == "token"
    agg_mode = "token-mean" if token_mode else "seq-mean-token-mean"
    use_kl = algo.use_kl_loss and not algo.disable_kl
    metrics: dict[str, list[float]] = {}

    def log(name: str, value: float) -> None:
        metrics.setdefault(name, []).append(value)

    for _ in range(cfg.ppo_epochs):
        for mini in micro_batches(batch, mini_batch_size):
            mask = mini.tensors["response_mask"]
            denom = max(global_sum(float(mask.sum()) if token_mode else float(len(mini)), device), 1.0)
            loss_sums = {"pg": 0.0, "kl": 0.0}
            optimizer.zero_grad(set_to_none=True)
            for mb in micro_batches(mini, cfg.micro_batch_size_per_device_for_update):
                inputs = collate(mb, processor, device)
                logp, entropy = response_logprobs(model, inputs, temperature, with_entropy=True)
                t = logp.shape[1]
                rmask = inputs["response_mask"]
                old = mb.tensors["old_logprobs"][:, :t].to(device)
                adv = mb.tensors["advantages"][:, :t].to(device)
                pg_loss, pg_metrics = ppo_policy_loss(
                    old, logp, adv, rmask, clip_ratio_low=cfg.clip_ratio_low, clip_ratio_high=cfg.clip_ratio_high,
                    clip_ratio_dual=cfg.clip_ratio_dual, loss_agg_mode=agg_mode)
                weight = float(rmask.sum()) if token_mode else float(len(mb))
                loss = pg_loss
                loss_sums["pg"] += pg_loss.item() * weight
                if use_kl:
                    ref = mb.tensors["ref_logprobs"][:, :t].to(device)
                    kl_loss = agg_loss(kl_penalty(logp, ref, algo.kl_penalty), rmask, agg_mode)
                    loss = loss + algo.kl_coef * kl_loss
                    loss_sums["kl"] += kl_loss.item() * weight
                # Scaled so that the gradient summed over micro-batches and averaged over ranks by FSDP
                # is the gradient of the loss averaged over the whole global mini-batch.
                (loss * weight * world / denom).backward()
                log("actor/entropy", masked_mean(entropy.detach(), rmask).item())
                for k, v in pg_metrics.items():
                    log(f"actor/{k}", v)
            log("actor/pg_loss", global_sum(loss_sums["pg"], device) / denom)
            if use_kl:
                log("actor/kl_loss", global_sum(loss_sums["kl"], device) / denom)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
            if math.isfinite(grad_norm):
                optimizer.step()
            log("actor/grad_norm", grad_norm)
            log("actor/lr", scheduler.get_last_lr()[0])
    scheduler.step()
    return {k: sum(v) / len(v) for k, v in metrics.items()}


def build_optimizer(model: torch.nn.Module, optim_cfg: Any, total_steps: int):
    """AdamW with a constant or cosine schedule after linear warm-up; the schedule advances once per RL step."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=optim_cfg.lr, betas=tuple(optim_cfg.betas),
                                  weight_decay=optim_cfg.weight_decay)
    warmup = optim_cfg.lr_warmup_steps if optim_cfg.lr_warmup_steps is not None else int(
        optim_cfg.lr_warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        if optim_cfg.warmup_style == "cosine":
            progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
            return optim_cfg.min_lr_ratio + (1 - optim_cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return optimizer, scheduler
