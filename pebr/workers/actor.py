"""The FSDP2 policy (and reference) model: build, shard, compute log-probs, update.

Everything here runs inside one worker process, on one rank of a torch.distributed group.
Every rank runs the same number of forward passes per call, because FSDP gathers parameters with
collective operations: the controller gives each rank an equal share, and token-budget micro-batches
(dynamic_batching) agree on their count across ranks before the first forward.

Two layouts of a micro-batch feed the same `response_logprobs`: right-padded rows (`collate`) or all
sequences end to end in one row (`collate_packed`, worker.actor.padding_free).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
from torch.profiler import record_function

from pebr.algorithms.losses import agg_loss, kl_penalty, masked_mean, ppo_policy_loss, token_logprobs
from pebr.config import ConfigError, ModelConfig
from pebr.protocol import Batch
from pebr.workers.attention import register_varlen_attention

logger = logging.getLogger(__name__)

# The model families whose layout this code relies on (the vision tower at model.model.visual, the text decoder at
# model.model.language_model, M-RoPE positions from get_rope_index, the Qwen vision tokens), each trained end to
# end on a tiny model of its kind in tests/workers/test_model_families.py.
SUPPORTED_MODEL_TYPES = ("qwen2_5_vl", "qwen2_vl", "qwen3_vl")


def check_model_family(config: Any, model_path: str) -> None:
    """Refuse a model outside SUPPORTED_MODEL_TYPES, before any worker or engine starts: another family (LLaVA, a
    text-only LM) failed minutes later inside a worker, with an error that did not say why.

    Raises:
        ConfigError: naming the model, its model_type and the supported ones.
    """
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"model {model_path!r} is a {model_type!r} model"
            f"{' (' + ', '.join(config.architectures) + ')' if getattr(config, 'architectures', None) else ''}"
            f"; this trainer runs the Qwen-VL families {', '.join(SUPPORTED_MODEL_TYPES)} (it relies on their vision "
            "tower, M-RoPE positions and vision tokens)")


def load_hf_model(model_path: str, trust_remote_code: bool = False, padding_free: bool = False) -> torch.nn.Module:
    """Load a Qwen-VL model (`SUPPORTED_MODEL_TYPES`) in fp32 (the master weights).

    With `padding_free` its attention is the variable-length one (`pebr.workers.attention`), which packed
    micro-batches (`collate_packed`) need to cost no more than padded ones; otherwise SDPA.
    The dtype the checkpoint was stored in is kept as `model.source_dtype` (None when its config names
    none), so that saved configs, and models merged from them, keep the base model's dtype.
    """
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    check_model_family(config, model_path)
    source_dtype = getattr(config, "dtype", None)
    model = AutoModelForImageTextToText.from_pretrained(
        model_path, config=config, dtype=torch.float32, trust_remote_code=trust_remote_code,
        attn_implementation=register_varlen_attention() if padding_free else "sdpa")
    model.source_dtype = source_dtype
    embed_patches_by_matmul(model)
    return model


def embed_patches_by_matmul(model: torch.nn.Module) -> None:
    """Compute the vision tower's patch embedding as one matrix product.

    Qwen2.5-VL embeds each flattened 3 x 2 x 14 x 14 patch with a Conv3d whose stride equals its kernel: a
    linear map of the patch, with the same weights and the same result up to rounding. On CPU (one thread,
    1024 patches, embedding 128) oneDNN's Conv3d forward + backward took 28 ms in fp32 and 178 ms in bf16, the
    product 5 and 1.6 ms. The Conv3d and its weight stay as they are, so checkpoints, the weight sync and the
    merger see the same parameters.
    """
    for module in model.modules():
        conv = getattr(module, "proj", None)
        if (type(module).__name__.endswith("VisionPatchEmbed") and isinstance(conv, torch.nn.Conv3d)
                and conv.stride == conv.kernel_size and conv.padding == (0, 0, 0) and conv.dilation == (1, 1, 1)
                and conv.groups == 1 and conv.padding_mode == "zeros"):
            module.forward = _embed_patches.__get__(module)


def _embed_patches(self: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    weight = self.proj.weight  # [embedding, channels, frames, height, width]: a patch flattened in that order
    patches = hidden_states.reshape(-1, weight[0].numel()).to(weight.dtype)
    return torch.nn.functional.linear(patches, weight.reshape(weight.shape[0], -1), self.proj.bias)


def load_processor(model: ModelConfig) -> Any:
    """The processor of `model` (from its tokenizer_path, else its model_path).

    Its image bounds are left as the model ships them, as vLLM's engine uses them: the data set has already
    resized each image within `data.min_pixels`..`data.max_pixels`, and the processor then applies the
    model's bounds here and inside vLLM alike, so an image becomes the same tokens in the engine's prompt
    and in the actor's pixel values.

    vLLM takes its tokenizer from tokenizer_path too, but its image processor from model_path; a
    tokenizer_path whose image processor settings differ from model_path's is refused, since the engine and
    the actor would then expand one image into different tokens.

    Raises:
        ConfigError: naming both paths and the settings that differ, or a model outside SUPPORTED_MODEL_TYPES.
    """
    from transformers import AutoConfig, AutoImageProcessor, AutoProcessor

    try:  # the first load of a run, before any worker: a hub id that cannot be fetched is said so here
        check_model_family(AutoConfig.from_pretrained(model.model_path, trust_remote_code=model.trust_remote_code),
                           model.model_path)
    except OSError as err:
        raise ConfigError(f"worker.actor.model.model_path={model.model_path!r} cannot be loaded: {err}") from err
    key = "worker.actor.model.tokenizer_path" if model.tokenizer_path else "worker.actor.model.model_path"
    try:
        processor = AutoProcessor.from_pretrained(model.tokenizer_path or model.model_path,
                                                  trust_remote_code=model.trust_remote_code)
    except (OSError, ValueError) as err:  # (ValueError: "Unrecognized processing class" in a folder without one)
        raise ConfigError(f"{key}={model.tokenizer_path or model.model_path!r}: its processor (tokenizer and image "
                          f"processor) cannot be loaded: {str(err).splitlines()[0]}") from err
    if model.tokenizer_path and os.path.realpath(model.tokenizer_path) != os.path.realpath(model.model_path):
        engine_side = AutoImageProcessor.from_pretrained(model.model_path, trust_remote_code=model.trust_remote_code)
        ours, theirs = _image_settings(processor.image_processor), _image_settings(engine_side)
        differ = sorted(key for key in ours.keys() | theirs.keys() if ours.get(key) != theirs.get(key))
        if differ:
            shown = "; ".join(f"{key}: {ours.get(key)!r} vs {theirs.get(key)!r}" for key in differ[:5])
            raise ConfigError(
                f"worker.actor.model.tokenizer_path={model.tokenizer_path!r} has an image processor that differs "
                f"from model_path={model.model_path!r}'s, which the vLLM engine uses ({shown}); make them equal, "
                "or leave tokenizer_path unset")
    return processor


def _image_settings(image_processor: Any) -> dict[str, Any]:
    """An image processor's settings, without the names of its classes (slow and fast ones work alike)."""
    return {key: value for key, value in image_processor.to_dict().items()
            if not key.startswith("_") and key not in ("image_processor_type", "processor_class")}


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The text decoder layers, each its own FSDP unit."""
    return list(model.model.language_model.layers)


def compile_decoder_layers(model: torch.nn.Module) -> None:
    """torch.compile the forward of each text decoder layer, in place (worker.actor.use_torch_compile).

    Only the layer's own computation is compiled: FSDP's gather/reshard hooks and gradient checkpointing
    wrap `forward` from outside, so they run as they do eagerly, and the packed attention excludes itself
    (`torch.compiler.disable`), leaving each layer two graphs around it. The layers share their code, so
    one compilation serves all of them; shapes are dynamic from the start because every micro-batch has
    another length.
    """
    for layer in decoder_layers(model):
        layer.forward = torch.compile(layer.forward, dynamic=True)


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


def full_parameters(model: torch.nn.Module, device: torch.device,
                    bucket_bytes: int = 256 << 20) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full tensor) of every parameter of an FSDP2 `model`, for the rollout engine's weight sync.

    Sharded parameters are gathered in buckets of about `bucket_bytes`: each rank lays its dim-0 shards of a
    bucket end to end in one buffer and a single all-gather brings all ranks' buffers. One gather per
    parameter cost a collective each: 0.19 s of a 1.7 s step for the small model on two gloo ranks
    (benchmarks/RESULTS.md, seventh round). A bucket bounds the unsharded weights held at once beside the
    engine's copy. With one rank nothing is gathered. Every rank must call this and consume it to the end:
    the gathers are collectives, in `named_parameters` order.
    """
    from torch.distributed.tensor import DTensor, Shard

    bucket: list[tuple[str, DTensor]] = []
    size = 0

    for name, param in model.named_parameters():
        tensor = param.detach()
        if not isinstance(tensor, DTensor) or tensor.device_mesh.size() == 1:
            yield name, tensor.to_local() if isinstance(tensor, DTensor) else tensor
            continue
        if tuple(tensor.placements) != (Shard(0),):
            raise ValueError(f"parameter {name!r} is sharded as {tensor.placements}; the weight sync gathers "
                             "FSDP2's dim-0 shards (Shard(0)) only")
        if bucket and (tensor.dtype != bucket[0][1].dtype or tensor.device_mesh != bucket[0][1].device_mesh):
            yield from _gather_bucket(bucket, device)
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += tensor.numel() * tensor.element_size()
        if size >= bucket_bytes:
            yield from _gather_bucket(bucket, device)
            bucket, size = [], 0
    yield from _gather_bucket(bucket, device)


def _gather_bucket(bucket: list[tuple[str, Any]], device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    """Full tensors of dim-0-sharded DTensors on one mesh with one all-gather. FSDP2 gives rank r rows
    [r * c, (r + 1) * c) of a parameter's D0, with c = ceil(D0 / world) (the last ranks may hold fewer or none),
    so each rank pads a short shard to c rows and every rank's buffer has the same layout."""
    if not bucket:
        return
    mesh = bucket[0][1].device_mesh
    world, rank = mesh.size(), mesh.get_local_rank()
    pieces, layout = [], []
    for name, tensor in bucket:
        rows, rest = tensor.shape[0], tuple(tensor.shape[1:])
        chunk = -(-rows // world)
        local = tensor.to_local().reshape(-1, *rest)
        expected = max(0, min(chunk, rows - rank * chunk))
        if local.shape[0] != expected:
            raise ValueError(f"parameter {name!r}: rank {rank} holds {local.shape[0]} of {rows} rows, FSDP2's "
                             f"even chunks give it {expected}")
        count = chunk * math.prod(rest)
        pieces.append(local.flatten())
        if expected < chunk:  # torch.cat copies once anyway; only a short shard needs zeros after it
            pieces.append(local.new_zeros(count - local.numel()))
        layout.append((name, rows, rest, count))
    send = torch.cat(pieces).to(device)
    received = send.new_empty(world * send.numel())
    dist.all_gather_into_tensor(received, send, group=mesh.get_group())
    received = received.view(world, -1)
    offset = 0
    for name, rows, rest, count in layout:
        full = received[:, offset:offset + count].reshape(-1, *rest)[:rows]  # rank-major rows, padding cut
        offset += count
        yield name, full


def _response_positions(batch: Batch) -> torch.Tensor:
    """Position [B, T] of each response token inside its own sequence (prompt + response).

    Entries past a response's end point at the sequence's last token: valid to gather, masked out later.
    """
    prompt_len = torch.tensor([len(p) for p in batch.prompt_ids], dtype=torch.long)
    seq_len = prompt_len + batch.response_lengths
    offsets = torch.arange(int(batch.response_lengths.max()))[None, :]
    return torch.minimum(prompt_len[:, None] + offsets, seq_len[:, None] - 1)


def image_inputs(images: list[Any], processor: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Model inputs for `images`, each distinct image object processed (and later encoded) once.

    The n responses of a prompt share its image objects (pickling keeps shared objects shared), so a
    micro-batch holds each image up to n times.

    Returns:
        pixel_values of the distinct images only; image_grid_thw [len(images), 3] of every entry, as the
        text's image placeholders and the M-RoPE positions need it; image_order [len(images)], the index
        of each entry among the distinct images (see `images_encoded_once`).
    """
    first: dict[int, int] = {}  # id of an image object -> its index among the distinct ones
    unique: list[Any] = []
    for im in images:
        if id(im) not in first:
            first[id(im)] = len(unique)
            unique.append(im)
    vision = processor.image_processor(images=unique, return_tensors="pt")
    order = torch.tensor([first[id(im)] for im in images], dtype=torch.long)
    return vision["pixel_values"], vision["image_grid_thw"][order], order


def _first_entries(image_order: list[int]) -> list[int]:
    """For each distinct image 0, 1, ..., the index of its first entry in `image_order`."""
    first: dict[int, int] = {}
    for entry, distinct in enumerate(image_order):
        first.setdefault(distinct, entry)
    return [first[u] for u in range(len(first))]


@contextlib.contextmanager
def images_encoded_once(model: torch.nn.Module, image_order: torch.Tensor | None) -> Iterator[None]:
    """During the block, the vision tower of a Qwen2.5-VL `model` encodes only the distinct images.

    `pixel_values` then holds the distinct images (`image_inputs`), and each entry's embedding is that of
    its distinct image, so the n copies cost one encoding; autograd adds their gradients, so the result
    is the same as encoding every copy. The hook sits inside the model's own forward, where FSDP has
    gathered the vision tower's parameters.
    """
    if image_order is None:
        yield
        return
    inner = model.model
    encode = inner.get_image_features
    order = image_order.tolist()
    firsts = _first_entries(order)

    def encode_distinct(pixel_values: torch.Tensor, image_grid_thw: torch.Tensor, **kwargs: Any) -> Any:
        out = encode(pixel_values, image_grid_thw[firsts], **kwargs)
        out.pooler_output = tuple(out.pooler_output[u] for u in order)
        if getattr(out, "deepstack_features", None) is not None:  # Qwen3-VL: per layer, per image, like the above
            out.deepstack_features = [tuple(layer[u] for u in order) for layer in out.deepstack_features]
        return out

    inner.get_image_features = encode_distinct  # an instance attribute shadows the class's method
    try:
        yield
    finally:
        del inner.get_image_features


@contextlib.contextmanager
def vision_tower_in_graph(model: torch.nn.Module) -> Iterator[None]:
    """During the block, a forward of a Qwen-VL `model` without images still runs its vision tower, on one
    blank image of the smallest grid, and adds 0 x its output to the text embeddings: the vision parameters
    then get a gradient, zero, as with images.

    FSDP2 reduce-scatters only the parameters that received a gradient. A rank whose micro-batch had no image
    gave the trainable vision tower none while the other ranks did, so the ranks' collectives differed in size
    (gloo aborts, NCCL hangs). The encoding happens inside the model's own forward, where FSDP has gathered
    the vision tower's parameters (outside it they are shards). Nothing is done for a frozen vision tower.
    """
    inner = model.model
    if not any(p.requires_grad for p in inner.visual.parameters()):
        yield
        return
    vision = inner.config.vision_config
    merge = vision.spatial_merge_size
    width = vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2

    def add_blank_image(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        embeds = kwargs["inputs_embeds"]
        grid = torch.tensor([[1, merge, merge]], device=embeds.device)
        blank = torch.zeros(merge * merge, width, device=embeds.device)
        encoded = inner.get_image_features(blank, grid)
        # Every output, not only the embeddings: Qwen3-VL's deepstack features come from modules of their own.
        anchor = sum(t.sum() for t in _float_tensors(encoded.to_tuple()))
        kwargs["inputs_embeds"] = embeds + 0.0 * anchor.to(embeds.dtype)
        return args, kwargs

    handle = inner.language_model.register_forward_pre_hook(add_blank_image, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def _float_tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        if value.is_floating_point():
            yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _float_tensors(item)


def every_image_copy(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`inputs` with the pixels of every image entry written out and no image_order: what the model would
    encode without `images_encoded_once` (the reference its tests and benchmark compare against)."""
    order = inputs["image_order"].tolist()
    sizes = inputs["image_grid_thw"][_first_entries(order)].prod(-1)
    distinct = torch.split(inputs["pixel_values"], sizes.tolist())
    full = {k: v for k, v in inputs.items() if k != "image_order"}
    full["pixel_values"] = torch.cat([distinct[u] for u in order])
    return full


def collate(batch: Batch, processor: Any, device: torch.device) -> dict[str, torch.Tensor]:
    """Model inputs for a micro-batch: prompt + response, right-padded, with pixel values.

    Returns a dict with input_ids / attention_mask / mm_token_type_ids [B, L], pixel_values, image_grid_thw
    and image_order when there are images (`image_inputs`), `response_mask` [B, T], `response_index` [B, T]: the
    index of each response token in the flattened input_ids (row * L + position), and `predictor_index` [B, T]:
    that of the token whose logits predict it (here the one before), so that `response_logprobs` gathers the
    same way from this layout and from the packed ones.
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
    expected = 0
    if images:
        out["pixel_values"], out["image_grid_thw"], out["image_order"] = image_inputs(images, processor)
        merge = getattr(processor.image_processor, "merge_size", 2)
        expected = int(out["image_grid_thw"].prod(-1).sum()) // merge**2
    found = int(mm_token_type_ids.sum())
    if found != expected:
        # Without images the model reads image tokens as text, silently (log-probs 0.2 nats off on the tiny model).
        raise ValueError(f"a micro-batch of {len(seqs)} sequences holds {found} image tokens, "
                         f"and its {len(images)} images make {expected}: the Batch's images do not go with its ids")
    out["response_mask"] = batch.response_mask()
    out["response_index"] = torch.arange(len(seqs))[:, None] * width + _response_positions(batch)
    out["predictor_index"] = out["response_index"] - 1
    return {k: v.to(device) for k, v in out.items()}


def collate_packed(batch: Batch, processor: Any, device: torch.device, model: torch.nn.Module,
                   share_prompts: bool = False) -> dict[str, torch.Tensor]:
    """Model inputs for a micro-batch laid end to end in one row, with no padding (padding_free).

    Returns input_ids / mm_token_type_ids [1, S] (S = the tokens laid out), position_ids [4, 1, S],
    pixel_values / image_grid_thw / image_order of the images in the row, `response_mask`, `response_index` and
    `predictor_index` [B, T] (indices into the row, in batch order). Row 0 of position_ids is the text
    position, restarting at 0 for each sequence; the varlen attention (`pebr.workers.attention`) reads the
    boundaries from it, so no token attends across one. Rows 1-3 are each sequence's own multimodal RoPE
    positions (`model.model.get_rope_index`), i.e. exactly what the padded forward computes. There is no
    attention_mask on purpose: given one, transformers would ignore the boundaries in the positions.

    With `share_prompts`, the samples of one prompt (`Batch.prompt_groups`) are laid out together and the
    prompt once: the first sample whole, the others' responses only, their positions continuing the prompt's,
    so each response attends to the prompt and to itself. The prompt's tokens and images are computed once
    instead of once per response; autograd sums their gradients over the responses, so the result is the
    same as laying out every sequence whole. The first token of each later response is predicted by the
    prompt's last token, hence `predictor_index`.
    """
    padded = collate(batch, processor, torch.device("cpu"))
    attention_mask = padded.pop("attention_mask")
    rope, _ = model.model.get_rope_index(padded["input_ids"], padded["mm_token_type_ids"],
                                         image_grid_thw=padded.get("image_grid_thw"), attention_mask=attention_mask)
    groups = batch.prompt_groups() if share_prompts else [[i] for i in range(len(batch))]
    order = [i for group in groups for i in group]
    leader = torch.zeros(len(batch), dtype=torch.long)  # the sample whose prompt tokens each sample uses
    skip = torch.zeros(len(batch), dtype=torch.long)  # columns of each sample not laid out (a shared prompt)
    for group in groups:
        leader[group] = group[0]
        skip[group[1:]] = len(batch.prompt_ids[group[0]])
    columns = torch.arange(attention_mask.shape[1])
    keep = attention_mask.bool() & (columns[None] >= skip[:, None])
    counts = keep.sum(1)
    start = torch.zeros(len(batch), dtype=torch.long)  # row offset of each sample's first token laid out
    start[order] = torch.cumsum(counts[order], 0) - counts[order]
    text = columns.expand_as(keep)
    # Boolean indexing walks the rows in `order`, so sample i occupies [start[i], start[i] + counts[i]).
    positions = torch.cat([text[None], rope.to(torch.long)], 0)[:, order][:, keep[order]]

    def row_index(col: torch.Tensor) -> torch.Tensor:
        """Row index of the token at padded column `col` [B, T] of each sample (a shared prompt's: the leader's)."""
        return torch.where(col >= skip[:, None], start[:, None] - skip[:, None] + col, start[leader][:, None] + col)

    response_columns = _response_positions(batch)
    packed = dict(padded, input_ids=padded["input_ids"][order][keep[order]][None],
                  mm_token_type_ids=padded["mm_token_type_ids"][order][keep[order]][None],
                  position_ids=positions[:, None, :],
                  response_index=row_index(response_columns), predictor_index=row_index(response_columns - 1))
    if share_prompts and "image_grid_thw" in padded:  # only the leaders' image entries are in the row
        first_entry = list(itertools.accumulate([0] + [len(ims) for ims in batch.images]))
        entries = [e for i in order if i == int(leader[i]) for e in range(first_entry[i], first_entry[i + 1])]
        packed["image_grid_thw"] = padded["image_grid_thw"][entries]
        packed["image_order"] = padded["image_order"][entries]
    return {k: v.to(device) for k, v in packed.items()}


def model_inputs(model: torch.nn.Module, batch: Batch, processor: Any, device: torch.device,
                 padding_free: bool, share_prompts: bool = False) -> dict[str, torch.Tensor]:
    """`collate_packed` or `collate`: all layouts feed `response_logprobs` alike (`share_prompts` only packed)."""
    if padding_free:
        return collate_packed(batch, processor, device, model, share_prompts)
    return collate(batch, processor, device)


def response_logprobs(model: torch.nn.Module, inputs: dict[str, torch.Tensor], temperature: float = 1.0,
                      with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs [B, T] of the response tokens (and their entropies) under `model`, zero where masked.

    `inputs` comes from `collate` (padded, [B, L]) or `collate_packed` (one row, [1, S]); either way
    `response_index` indexes the flattened row(s), so the result has the same shape for both layouts.
    Logits are divided by the rollout temperature, so the log-probs are those of the distribution
    the responses were sampled from.

    The LM head runs only on the positions that predict a response token (`logits_to_keep`): the prompt's
    positions, image tokens included, need no [V]-wide row. Log-probs come from `token_logprobs`, which
    never holds a float32 copy of the [tokens, V] logits.
    """
    forward_inputs = {k: v for k, v in inputs.items()
                      if k not in ("response_mask", "response_index", "predictor_index", "image_order")}
    mask = inputs["response_mask"]
    valid = mask.bool()
    width = inputs["input_ids"].shape[1]
    positions = inputs["response_index"][valid]  # [n] flat positions (row * width + column) of response tokens
    predictors = inputs["predictor_index"][valid]  # [n] where the logits predicting each of them are
    rows, columns = predictors // width, predictors % width
    keep = torch.unique(columns)  # sorted
    with images_encoded_once(model, inputs.get("image_order")):
        logits = model(**forward_inputs, use_cache=False, logits_to_keep=keep).logits  # [rows, len(keep), V]
    if logits.shape[0] == 1 and torch.equal(keep, columns):
        logits = logits[0]  # one row, predictors in order: row k of the kept logits is predictor k, no gather
    else:
        logits = logits[rows, torch.searchsorted(keep, columns)]  # [n, V]
    labels = inputs["input_ids"].flatten()[positions]
    logp, entropy = token_logprobs(logits, labels, temperature, with_entropy=with_entropy)
    zeros = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    # Entropy is a metric, never in the loss: token_logprobs computes it without a graph.
    return zeros.masked_scatter(valid, logp), None if entropy is None else zeros.masked_scatter(valid, entropy)


def distinct_images(batch: Batch) -> int:
    """How many distinct image objects `batch` holds (each is processed and encoded once per forward)."""
    return len({id(im) for ims in batch.images for im in ims})


def fixed_slices(count: int, size: int) -> list[list[int]]:
    """Indices of consecutive slices of `size` out of `count` samples (the last may be shorter)."""
    return [list(range(start, min(start + size, count))) for start in range(0, count, size)]


def micro_batches(batch: Batch, size: int) -> Iterator[Batch]:
    """Consecutive slices of `size` samples (the last may be shorter)."""
    for idx in fixed_slices(len(batch), size):
        yield batch.select(idx)


def token_budget(cfg: Any) -> int | None:
    """The per-forward token budget of an ActorConfig: max_token_len_per_gpu with dynamic_batching, else None."""
    return cfg.max_token_len_per_gpu if cfg.dynamic_batching else None


# -- token-budget (dynamic) micro-batches -------------------------------------------------------------


def sequence_lengths(batch: Batch) -> list[int]:
    """Tokens of each sample as the model sees them (prompt, image tokens expanded, + response)."""
    return [len(p) + len(r) for p, r in zip(batch.prompt_ids, batch.response_ids)]


def micro_batch_tokens(lengths: Sequence[int], padding_free: bool) -> int:
    """Tokens a forward over sequences of these lengths computes: their sum packed, count x longest padded."""
    if not lengths:
        return 0
    return sum(lengths) if padding_free else len(lengths) * max(lengths)


def token_budget_groups(lengths: Sequence[int], max_tokens: int, padding_free: bool) -> list[list[int]]:
    """Greedy grouping of sample indices into micro-batches of at most `max_tokens` tokens each.

    Samples are sorted longest first and filled greedily, so each group holds sequences of similar
    length (little padding when padded). A sequence longer than the budget gets a group of its own.
    """
    groups: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if groups and micro_batch_tokens([lengths[j] for j in groups[-1]] + [lengths[i]], padding_free) <= max_tokens:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def image_group_budget_groups(lengths: Sequence[int], max_tokens: int, units: Sequence[Sequence[int]],
                              shared: Sequence[int] | None = None) -> list[list[int]]:
    """Packed (padding_free) micro-batches of at most `max_tokens` tokens that keep samples sharing an image
    together, so that each image is encoded in as few micro-batches as the budget allows.

    `units` are the image groups (`Batch.image_groups`): the n responses of a prompt. A unit larger than
    the budget is cut into budget-sized pieces (`token_budget_groups` within it); the pieces are then
    packed first-fit, largest first. Packed, a sequence costs its length wherever it goes, so keeping a
    unit together costs no padding; sorting by length instead scatters a prompt's responses over every
    micro-batch, which then each encode the image again (measured on an H100: the vision tower became
    a third of a 2 B model's update, benchmarks/RESULTS.md).

    `shared[u]`, when given, is the number of tokens of unit u's prompt laid out once per micro-batch
    (`collate_packed` with share_prompts, units from `Batch.prompt_groups`): a piece then costs its prompt
    once plus its samples' other tokens.
    """
    pieces: list[list[int]] = []
    costs: list[int] = []
    for u, unit in enumerate(units):
        once = shared[u] if shared is not None else 0
        rest = [lengths[i] - once for i in unit]
        for piece in token_budget_groups(rest, max_tokens - once, padding_free=True):
            pieces.append([unit[j] for j in piece])
            costs.append(once + sum(rest[j] for j in piece))
    groups: list[list[int]] = []
    loads: list[int] = []
    for k in sorted(range(len(pieces)), key=lambda k: -costs[k]):
        at = next((g for g, load in enumerate(loads) if load + costs[k] <= max_tokens), None)
        if at is None:
            groups.append(list(pieces[k]))
            loads.append(costs[k])
        else:
            groups[at].extend(pieces[k])
            loads[at] += costs[k]
    return groups


def split_to_count(groups: list[list[int]], count: int, lengths: Sequence[int], padding_free: bool) -> list[list[int]]:
    """Split groups until there are exactly `count` (all non-empty); none gets more tokens than before.

    The costliest splittable group is cut where the larger half is smallest. Every rank must run the
    same number of forward passes (FSDP's collectives), so ranks with fewer groups split theirs.

    Raises:
        ValueError: fewer samples than `count`, or already more groups than `count`.
    """
    if count > len(lengths) or count < len(groups):
        raise ValueError(f"cannot make {count} non-empty micro-batches from {len(groups)} groups of "
                         f"{len(lengths)} samples")
    groups = [list(g) for g in groups]
    while len(groups) < count:
        at = max((k for k, g in enumerate(groups) if len(g) > 1),
                 key=lambda k: micro_batch_tokens([lengths[j] for j in groups[k]], padding_free))
        group = groups.pop(at)
        sizes = [lengths[j] for j in group]
        head = _prefix_tokens(sizes, padding_free)  # head[c - 1]: tokens of group[:c]
        tail = _prefix_tokens(sizes[::-1], padding_free)[::-1]  # tail[c]: tokens of group[c:]
        cut = min(range(1, len(group)), key=lambda c: max(head[c - 1], tail[c]))
        groups[at:at] = [group[:cut], group[cut:]]
    return groups


def _prefix_tokens(lengths: Sequence[int], padding_free: bool) -> list[int]:
    """`micro_batch_tokens(lengths[:c])` for c = 1..len(lengths), in one pass (a rank's share can be hundreds)."""
    if padding_free:
        return list(itertools.accumulate(lengths))
    return [(c + 1) * longest for c, longest in enumerate(itertools.accumulate(lengths, max))]


def global_sums(values: list[float], device: torch.device) -> list[float]:
    """Each value summed over all ranks, in one collective (the values themselves without torch.distributed)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def global_sum(value: float, device: torch.device) -> float:
    """The sum of `value` over all ranks (itself without torch.distributed)."""
    return global_sums([value], device)[0]


def global_max(value: int, device: torch.device) -> int:
    """The largest `value` over all ranks (itself without torch.distributed)."""
    t = torch.tensor([value], dtype=torch.int64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def plan_micro_batches(batch: Batch, size: int, max_tokens: int | None, padding_free: bool,
                       device: torch.device, share_prompts: bool = False) -> list[list[int]]:
    """Sample indices of each micro-batch of `batch`.

    With `max_tokens` None: consecutive slices of `size` samples. Otherwise token-budget groups: similar
    lengths together when padded (`token_budget_groups`), a prompt's responses together when packed
    (`image_group_budget_groups`, a shared prompt counted once with `share_prompts`); then split so that every
    rank gets the same number of micro-batches (the largest any rank needs, agreed by an all_reduce: a
    collective, so every rank must call this).
    """
    if max_tokens is None:
        return fixed_slices(len(batch), size)
    lengths = sequence_lengths(batch)
    if padding_free:
        units = batch.prompt_groups() if share_prompts else batch.image_groups()
        shared = [len(batch.prompt_ids[u[0]]) for u in units] if share_prompts else None
        groups = image_group_budget_groups(lengths, max_tokens, units, shared)
    else:
        groups = token_budget_groups(lengths, max_tokens, padding_free)
    return split_to_count(groups, global_max(len(groups), device), lengths, padding_free)


@torch.no_grad()
def compute_logprobs(model: torch.nn.Module, batch: Batch, processor: Any, device: torch.device,
                     micro_batch_size: int, temperature: float, *, padding_free: bool = False,
                     share_prompts: bool = False, max_token_len: int | None = None,
                     with_entropy: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs and entropies [N, T] of every response of `batch` (padded to the batch's longest);
    the entropies are None when `with_entropy` is False (the reference pass does not need them).

    Args:
        micro_batch_size: samples per forward when `max_token_len` is None.
        padding_free: pack each micro-batch into one row (`collate_packed`) instead of padding it.
        share_prompts: in a packed row, lay out a prompt shared by several responses once.
        max_token_len: token budget per forward (dynamic micro-batches); rows come back in `batch` order.
    """
    model.eval()
    width = int(batch.response_lengths.max())
    logps = torch.zeros(len(batch), width)
    ents = torch.zeros(len(batch), width) if with_entropy else None
    for idx in plan_micro_batches(batch, micro_batch_size, max_token_len, padding_free, device, share_prompts):
        inputs = model_inputs(model, batch.select(idx), processor, device, padding_free, share_prompts)
        logp, ent = response_logprobs(model, inputs, temperature, with_entropy=with_entropy)
        t = logp.shape[1]
        logps[idx, :t] = logp.float().cpu()
        if ents is not None:
            ents[idx, :t] = ent.float().cpu()
    return logps, ents


def update_policy(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, batch: Batch,
                  processor: Any, device: torch.device, cfg: Any, algo: Any, temperature: float,
                  mini_batch_size: int, first_on_policy: bool = False) -> dict[str, float]:
    """PPO/GRPO updates on this rank's share of the experience.

    `batch` carries tensors old_logprobs, advantages and (with a KL loss) ref_logprobs, [N, T].
    The share is cut into mini-batches of `mini_batch_size` samples (one optimizer step each) and each mini-batch into
    micro-batches (gradient accumulation). The loss of a micro-batch is scaled so that the summed
    gradient equals the gradient of the loss averaged over the whole global mini-batch: token-mean
    over all valid tokens of all ranks (loss_avg_mode=token) or mean over all sequences (seq).
    FSDP averages gradients over ranks, hence the factor world_size. Because of that scaling any
    partition into micro-batches gives the same gradient: fixed `micro_batch_size_per_device_for_update`
    samples, or token-budget groups of at most `max_token_len_per_gpu` tokens when `cfg.dynamic_batching`;
    `cfg.padding_free` packs each micro-batch into one row (a shared prompt once with `cfg.share_prompts`).

    With `first_on_policy`, the first mini-batch needs no old log-probs: nothing has updated the policy
    since it sampled them, so its current log-probs, detached, are the old ones (ratio 1), which saves
    computing them beforehand. They are written, with their entropies, into `batch.tensors["old_logprobs"]`
    and `["entropy"]` (created where missing), for later PPO epochs and for the caller's metrics.
    """
    model.train()
    world = dist.get_world_size() if dist.is_initialized() else 1
    token_mode = cfg.loss_avg_mode == "token"
    agg_mode = "token-mean" if token_mode else "seq-mean-token-mean"
    use_kl = algo.kl_in_loss
    max_tokens = token_budget(cfg)
    metrics: dict[str, list[float]] = {}

    def log(name: str, value: float) -> None:
        metrics.setdefault(name, []).append(value)

    for epoch in range(cfg.ppo_epochs):
        for number, rows in enumerate(fixed_slices(len(batch), mini_batch_size)):
            mini = batch.select(rows)
            on_policy = first_on_policy and epoch == 0 and number == 0
            mask = mini.tensors["response_mask"]
            # seq mode counts the rows with a response token, as agg_loss's row mean does (an empty row has no mean).
            denom = max(global_sum(float(mask.sum()) if token_mode else float((mask.sum(-1) > 0).sum()), device), 1.0)
            loss_sums = {"pg": 0.0, "kl": 0.0}
            # Token-weighted sums of the per-token metrics, so that they are means over the mini-batch's tokens
            # on all ranks whatever the micro-batches (a micro-batch of one long response is not one of many).
            token_sums: dict[str, float] = {}
            optimizer.zero_grad(set_to_none=True)
            # Each micro-batch encodes its distinct images once; fewer encodings than images x micro-batches
            # is what keeping a prompt's responses together buys (image_group_budget_groups, balanced_order).
            images_encoded = 0
            for idx in plan_micro_batches(mini, cfg.micro_batch_size_per_device_for_update, max_tokens,
                                          cfg.padding_free, device, cfg.share_prompts):
                mb = mini.select(idx)
                images_encoded += distinct_images(mb)
                with record_function("pebr/model_inputs"):
                    inputs = model_inputs(model, mb, processor, device, cfg.padding_free, cfg.share_prompts)
                with record_function("pebr/forward"), (
                        contextlib.nullcontext() if any(mb.images) else vision_tower_in_graph(model)):
                    logp, entropy = response_logprobs(model, inputs, temperature, with_entropy=True)
                t = logp.shape[1]
                rmask = inputs["response_mask"]
                if on_policy:
                    old = logp.detach()
                    in_batch = [rows[i] for i in idx]
                    batch.response_tensor("old_logprobs")[in_batch, :t] = old.float().cpu()
                    batch.response_tensor("entropy")[in_batch, :t] = entropy.detach().float().cpu()
                else:
                    old = mb.tensors["old_logprobs"][:, :t].to(device)
                adv = mb.tensors["advantages"][:, :t].to(device)
                pg_loss, pg_metrics = ppo_policy_loss(
                    old, logp, adv, rmask, clip_ratio_low=cfg.clip_ratio_low, clip_ratio_high=cfg.clip_ratio_high,
                    clip_ratio_dual=cfg.clip_ratio_dual, loss_agg_mode=agg_mode)
                weight = float(rmask.sum()) if token_mode else float((rmask.sum(-1) > 0).sum())
                loss = pg_loss
                loss_sums["pg"] += pg_loss.item() * weight
                if use_kl:
                    ref = mb.tensors["ref_logprobs"][:, :t].to(device)
                    kl_loss = agg_loss(kl_penalty(logp, ref, algo.kl_penalty), rmask, agg_mode)
                    loss = loss + algo.kl_coef * kl_loss
                    loss_sums["kl"] += kl_loss.item() * weight
                # Scaled so that the gradient summed over micro-batches and averaged over ranks by FSDP
                # is the gradient of the loss averaged over the whole global mini-batch.
                with record_function("pebr/backward"):
                    (loss * weight * world / denom).backward()
                tokens = float(rmask.sum())
                for k, v in {"tokens": 1.0, "entropy": masked_mean(entropy, rmask).item(), **pg_metrics}.items():
                    token_sums[k] = token_sums.get(k, 0.0) + v * tokens
            # (The image counts are summed over the ranks too, in the same collective: the mini-batch's, not a rank's.)
            counts = {"images_encoded": float(images_encoded), "distinct_images": float(distinct_images(mini))}
            totals = dict(zip([*token_sums, *counts], global_sums([*token_sums.values(), *counts.values()], device)))
            for k, v in totals.items():
                if k in counts:
                    log(f"actor/{k}", v)
                elif k != "tokens":
                    log(f"actor/{k}", v / max(totals["tokens"], 1.0))
            log("actor/pg_loss", global_sum(loss_sums["pg"], device) / denom)
            if use_kl:
                log("actor/kl_loss", global_sum(loss_sums["kl"], device) / denom)
            with record_function("pebr/optimizer"):
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm, foreach=True)
                grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
                if math.isfinite(grad_norm):
                    optimizer.step()
            # A skipped optimizer step is counted, and its non-finite norm kept out of the mean of the others.
            log("actor/skipped_optimizer_steps", float(not math.isfinite(grad_norm)))
            if math.isfinite(grad_norm):
                log("actor/grad_norm", grad_norm)
            log("actor/lr", scheduler.get_last_lr()[0])
    scheduler.step()
    # The last mini-batch's gradients are not needed until the next update: freed now, not held through the
    # rollout and the log-prob passes (fp32 shards, about 4.7 GiB a GPU at 7 B over 7 GPUs).
    optimizer.zero_grad(set_to_none=True)
    result = {k: sum(v) / len(v) for k, v in metrics.items()}
    result["actor/skipped_optimizer_steps"] = sum(metrics["actor/skipped_optimizer_steps"])
    result.setdefault("actor/grad_norm", math.nan)  # every step skipped
    return result


def build_optimizer(model: torch.nn.Module, optim_cfg: Any, total_steps: int):
    """AdamW with a constant or cosine schedule after linear warm-up; the schedule advances once per RL step."""
    params = [p for p in model.parameters() if p.requires_grad]
    # fused: one kernel over all parameters. torch's default on CPU is a Python loop over them, which took
    # 31 ms per step at size small against 6 ms fused (benchmarks/RESULTS.md, seventh round).
    optimizer = torch.optim.AdamW(params, lr=optim_cfg.lr, betas=tuple(optim_cfg.betas),
                                  weight_decay=optim_cfg.weight_decay, fused=True)
    warmup = optim_cfg.lr_warmup_steps if optim_cfg.lr_warmup_steps is not None else int(
        optim_cfg.lr_warmup_ratio * total_steps)
    if optim_cfg.lr_warmup_steps is None and optim_cfg.lr_warmup_ratio > 0 and warmup == 0:
        logger.warning("lr_warmup_ratio=%s of %d steps rounds to no warm-up step", optim_cfg.lr_warmup_ratio,
                       total_steps)
    elif warmup >= total_steps > 0:
        logger.warning("the lr warm-up (%d steps) does not end within the run's %d steps: the peak lr is never "
                       "reached", warmup, total_steps)

    def factor(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        if optim_cfg.warmup_style == "cosine":
            progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
            return optim_cfg.min_lr_ratio + (1 - optim_cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return optimizer, scheduler
