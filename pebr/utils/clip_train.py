"""Train a tiny CLIP contrastively on synthetic scenes, so that the stage-1 CLIP reward means something.

The paper scores a response's "Image Description" with FG-CLIP; offline we cannot download it, and a
randomly initialised CLIP (``scripts/make_tiny_clip.py``) gives noise. Here a CLIP of a few hundred
thousand parameters learns to match images drawn by :func:`pebr.utils.scenes.render_scene` with the
sentences of :func:`pebr.utils.scenes.describe_scene` (the text the SFT data puts under
"### Image Description:"), with CLIP's symmetric InfoNCE loss and learnable temperature.

Besides the other captions of the batch, every image also competes against a "hard negative": its
own description with one object's colour, shape or size changed. Without those, telling two random
scenes apart is enough to win the loss, and a description with one wrong colour would still score
almost as high as the right one.

Scenes are sampled afresh for every batch, so no data files are involved. The saved directory loads
with ``AutoModel``, ``AutoTokenizer`` and ``AutoImageProcessor``, i.e. with
:class:`pebr.rewards.clip.ClipScorer`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
import string
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pebr.utils import scenes as sc

__all__ = [
    "SceneBatch",
    "TinyClipSpec",
    "TrainResult",
    "build_bpe_tokenizer",
    "build_clip_model",
    "build_scene_tokenizer",
    "clip_image_processor",
    "contrastive_loss",
    "describe_training_scene",
    "evaluate_alignment",
    "images_to_pixel_values",
    "make_batch",
    "make_optimizer",
    "perturb_scene",
    "sample_training_scene",
    "torch_threads",
    "train_step",
    "train_tiny_clip",
]

BOS, EOS, PAD, UNK = "<|startoftext|>", "<|endoftext|>", "<|pad|>", "<|unk|>"
# CLIP's own normalisation, which CLIPImageProcessor applies by default.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# CLIP clamps its learnable inverse temperature so that the logits never exceed 100 x cosine.
MAX_LOGIT_SCALE = 100.0

# Words a policy may use when it describes a scene in its own way; with them in the BPE corpus they
# stay single tokens instead of falling apart into letters.
_EXTRA_WORDS = (
    "grey black white orange pink big tiny shiny matte metallic block blocks ball balls thing things "
    "object objects shape shapes left right front behind middle center top bottom there is are with "
    "one zero image picture scene shows contains background plain several different"
)


@dataclass(frozen=True)
class TinyClipSpec:
    """Sizes of the tiny CLIP.

    Attributes:
        image_size: side of the square input image in pixels.
        patch_size: ViT patch side; image_size must be a multiple of it.
        vision_hidden, vision_layers, vision_heads: vision tower width, depth and heads.
        text_hidden, text_layers, text_heads: text tower width, depth and heads.
        projection_dim: size of the shared embedding space.
        max_text_tokens: text positions, BOS and EOS included (a 7-object description needs about 55).
        vocab_size: BPE vocabulary size, special tokens included.
    """

    image_size: int = 112
    patch_size: int = 16
    vision_hidden: int = 64
    vision_layers: int = 2
    vision_heads: int = 2
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 2
    projection_dim: int = 64
    max_text_tokens: int = 64
    vocab_size: int = 400

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")


# ---------------------------------------------------------------- tokenizer and model


def _tokenizer_corpus(rng: random.Random, num_scenes: int = 2000) -> list[str]:
    lines = [describe_training_scene(sample_training_scene(rng)) for _ in range(num_scenes)]
    lines.append(_EXTRA_WORDS)
    lines.append(" ".join(str(n) for n in range(21)))
    return lines


def describe_training_scene(scene: sc.Scene) -> str:
    """The caption the model learns for a scene: exactly :func:`pebr.utils.scenes.describe_scene`."""
    return sc.describe_scene(scene)


def build_scene_tokenizer(spec: TinyClipSpec, seed: int = 0):
    """Train a lower-casing, whitespace-split BPE on scene descriptions.

    Every word of the description grammar becomes one token; any other ASCII word still encodes (as
    letters), so an unusual caption is read rather than mapped to UNK.

    Args:
        spec: gives ``vocab_size`` and ``max_text_tokens`` (the tokenizer's ``model_max_length``).
        seed: seeds the scenes of the training corpus.

    Returns:
        A ``PreTrainedTokenizerFast`` whose encodings are ``BOS + tokens + EOS``.
    """
    return build_bpe_tokenizer(_tokenizer_corpus(random.Random(seed)), spec.vocab_size, spec.max_text_tokens,
                               initial_alphabet=string.ascii_lowercase + string.digits + string.punctuation)


def build_bpe_tokenizer(corpus: Sequence[str], vocab_size: int, max_tokens: int,
                        initial_alphabet: str = ""):
    """A lower-casing, whitespace-split BPE trained on `corpus` (each character of `initial_alphabet` a token
    whatever the corpus), as CLIP's text tower takes it.

    Returns:
        A ``PreTrainedTokenizerFast`` whose encodings are ``BOS + tokens + EOS``, ``model_max_length``
        `max_tokens`.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, UNK, BOS, EOS],
                                  initial_alphabet=list(initial_alphabet), show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    # CLIP pools the text at the first EOS, so every encoding must carry one (truncation keeps it).
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}",
        special_tokens=[(BOS, tok.token_to_id(BOS)), (EOS, tok.token_to_id(EOS))],
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
                                   model_max_length=max_tokens)


def build_clip_model(spec: TinyClipSpec, tokenizer: Any, seed: int = 0):
    """A randomly initialised ``CLIPModel`` of the given sizes.

    Args:
        spec: tower sizes.
        tokenizer: the tokenizer from :func:`build_scene_tokenizer` (vocabulary and special ids).
        seed: seed of the initial weights.

    Returns:
        A ``transformers.CLIPModel`` in float32.
    """
    from transformers import CLIPConfig, CLIPModel

    text_config = {
        "vocab_size": len(tokenizer),
        "hidden_size": spec.text_hidden,
        "intermediate_size": 2 * spec.text_hidden,
        "num_hidden_layers": spec.text_layers,
        "num_attention_heads": spec.text_heads,
        "max_position_embeddings": spec.max_text_tokens,
        "bos_token_id": tokenizer.bos_token_id,
        # Not 2, so transformers pools at the first EOS rather than at the largest token id.
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    vision_config = {
        "hidden_size": spec.vision_hidden,
        "intermediate_size": 2 * spec.vision_hidden,
        "num_hidden_layers": spec.vision_layers,
        "num_attention_heads": spec.vision_heads,
        "image_size": spec.image_size,
        "patch_size": spec.patch_size,
    }
    config = CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=spec.projection_dim)
    torch.manual_seed(seed)
    return CLIPModel(config)


def clip_image_processor(spec: TinyClipSpec):
    """CLIP's image processor at the spec's image size (resize the short side, centre crop, CLIP's mean/std)."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(
        size={"shortest_edge": spec.image_size},
        crop_size={"height": spec.image_size, "width": spec.image_size},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )


# ---------------------------------------------------------------- data


def sample_training_scene(rng: random.Random, metal_fraction: float = 0.25) -> sc.Scene:
    """A random scene over all eight colours, with some objects made of metal.

    The generated data sets use six colours and rubber only, but the demo scene has brown and metal
    objects and seven of them, so training covers those too.

    Args:
        rng: source of randomness.
        metal_fraction: chance that an object is metal.

    Returns:
        A :class:`pebr.utils.scenes.Scene` of 2..7 objects.
    """
    scene = sc.sample_scene(rng, colors=tuple(sc.COLOR_RGB), max_objects=sc.MAX_OBJECTS + 1)
    return sc.Scene(
        [dataclasses.replace(o, material="metal") if rng.random() < metal_fraction else o for o in scene.objects]
    )


def perturb_scene(scene: sc.Scene, rng: random.Random) -> sc.Scene:
    """The scene with one object's colour (half the time), shape or size replaced by another value.

    The multiset of object phrases changes, so the description always changes too.

    Args:
        scene: a scene with at least one object.
        rng: source of randomness.

    Returns:
        A new scene (positions unchanged).
    """
    i = rng.randrange(len(scene.objects))
    obj = scene.objects[i]
    kind = rng.choice(("color", "color", "shape", "size"))
    choices = {"color": tuple(sc.COLOR_RGB), "shape": sc.SHAPES, "size": sc.SIZES}[kind]
    new = rng.choice([v for v in choices if v != getattr(obj, kind)])
    objects = list(scene.objects)
    objects[i] = dataclasses.replace(obj, **{kind: new})
    return sc.Scene(objects)


def images_to_pixel_values(
    images: Sequence[Image.Image], mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD
) -> torch.Tensor:
    """Normalise RGB images that already have the model's input size, as CLIPImageProcessor would.

    Resizing and cropping are no-ops at the model's size, so this skips the processor (several times
    faster) while giving the same tensor.

    Args:
        images: N RGB images of equal size H x W.
        mean, std: per-channel normalisation.

    Returns:
        float32 tensor of shape (N, 3, H, W).
    """
    array = np.stack([np.asarray(img.convert("RGB"), dtype=np.float32) for img in images])  # (N, H, W, 3)
    pixels = torch.from_numpy(array).permute(0, 3, 1, 2) / 255.0
    return (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


@dataclass
class SceneBatch:
    """One training batch.

    Attributes:
        pixel_values: (B, 3, H, W) normalised images.
        input_ids: ((1 + K) B, L) token ids: rows 0..B-1 describe image i; then K blocks of B hard
            negatives, row k B + i being image i's description with one attribute changed.
        attention_mask: same shape as input_ids.
        captions: the (1 + K) B caption strings, same order.
    """

    pixel_values: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    captions: list[str] = field(default_factory=list)


def make_batch(
    rng: random.Random, batch_size: int, image_size: int, tokenizer: Any, num_negatives: int = 1
) -> SceneBatch:
    """Sample, draw and tokenize ``batch_size`` fresh scenes plus ``num_negatives`` hard negative captions each.

    Args:
        rng: source of randomness.
        batch_size: number of images B.
        image_size: side of the drawn images.
        tokenizer: tokenizer of the model (truncates to its ``model_max_length``).
        num_negatives: hard negatives K per image (0: in-batch negatives only).

    Returns:
        A :class:`SceneBatch`.
    """
    scenes = [sample_training_scene(rng) for _ in range(batch_size)]
    captions = [describe_training_scene(s) for s in scenes]
    for _ in range(num_negatives):
        captions += [describe_training_scene(perturb_scene(s, rng)) for s in scenes]
    text = tokenizer(captions, padding=True, truncation=True, return_tensors="pt")
    pixel_values = images_to_pixel_values([sc.render_scene(s, image_size) for s in scenes])
    return SceneBatch(pixel_values, text["input_ids"], text["attention_mask"], captions)


# ---------------------------------------------------------------- loss and training


@contextlib.contextmanager
def torch_threads(num_threads: int | None) -> Iterator[None]:
    """Run the block with ``num_threads`` torch threads (None: unchanged), then restore the setting.

    Tiny models gain little from a second thread, and on a shared two-core machine two threads that
    wait for each other run several times slower than one.
    """
    previous = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def contrastive_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric InfoNCE, with extra caption-only negatives.

    Image i's positive is caption i. Image-to-text: each image picks its caption among all T
    captions (the B positives and T - B extra negatives). Text-to-image: each of the B positive
    captions picks its image among the B images. The loss is the mean of the two cross-entropies.

    Args:
        image_emb: (B, D) image embeddings (normalised here).
        text_emb: (T, D) caption embeddings, T >= B; rows 0..B-1 pair with the images.
        logit_scale: scalar, log of the inverse temperature.

    Returns:
        Scalar loss.

    Raises:
        ValueError: if there are fewer captions than images or the widths differ.
    """
    b, t = image_emb.shape[0], text_emb.shape[0]
    if t < b or image_emb.shape[1] != text_emb.shape[1]:
        raise ValueError(f"need text_emb (T >= {b}, {image_emb.shape[1]}), got {tuple(text_emb.shape)}")
    image_emb = F.normalize(image_emb, dim=-1)
    text_emb = F.normalize(text_emb, dim=-1)
    logits = logit_scale.exp() * image_emb @ text_emb.T  # (B, T)
    target = torch.arange(b, device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits[:, :b].T, target))


def train_step(
    model: Any, batch: SceneBatch, optimizer: torch.optim.Optimizer, max_logit_scale: float = MAX_LOGIT_SCALE
) -> float:
    """One optimiser step on a batch; returns the loss before the step.

    The learnable log-scale is clamped afterwards to [0, log(max_logit_scale)], as CLIP clamps it.
    """
    model.train()
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixel_values)
    loss = contrastive_loss(out.image_embeds, out.text_embeds, model.logit_scale)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    with torch.no_grad():
        model.logit_scale.clamp_(0.0, math.log(max_logit_scale))
    return float(loss.detach())


def make_optimizer(model: Any, lr: float, steps: int, warmup: int) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW (no decay on norms, biases, embeddings' scale) with linear warm-up and cosine decay."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}], lr=lr
    )

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class TrainResult:
    """What :func:`train_tiny_clip` did.

    Attributes:
        output: the saved model directory.
        losses: loss of every step.
        seconds: wall time of the whole call.
        num_parameters: parameter count of the model.
        logit_scale: final inverse temperature (exp of the learnt log-scale).
    """

    output: str
    losses: list[float]
    seconds: float
    num_parameters: int
    logit_scale: float


def train_tiny_clip(
    output: str,
    steps: int = 400,
    batch_size: int = 64,
    image_size: int = 112,
    seed: int = 0,
    lr: float = 2e-3,
    num_negatives: int = 1,
    max_logit_scale: float = MAX_LOGIT_SCALE,
    num_threads: int | None = 1,
    spec: TinyClipSpec | None = None,
    log_every: int = 0,
) -> TrainResult:
    """Build a tiny CLIP, train it on fresh synthetic scenes and save it to ``output``.

    Args:
        output: directory to write (model, tokenizer, image processor).
        steps: optimiser steps.
        batch_size: images per step.
        image_size: image side; overrides ``spec.image_size``.
        seed: seeds the tokenizer corpus, the weights and the scenes.
        lr: peak learning rate (linear warm-up over 5% of the steps, then cosine decay).
        num_negatives: hard negative captions per image (see :func:`make_batch`).
        max_logit_scale: ceiling of the learnable inverse temperature (see ``MAX_LOGIT_SCALE``).
        num_threads: torch threads while training (see :func:`torch_threads`).
        spec: model sizes (defaults of :class:`TinyClipSpec`).
        log_every: print the mean loss every this many steps (0: silent).

    Returns:
        A :class:`TrainResult`.

    Raises:
        ValueError: on a non-positive ``steps``, a ``batch_size`` below 2 or a negative ``num_negatives``.
    """
    if steps < 1 or batch_size < 2 or num_negatives < 0:
        raise ValueError(f"need steps >= 1, batch_size >= 2, num_negatives >= 0; got {steps}, {batch_size}, "
                         f"{num_negatives}")
    start = time.perf_counter()
    with torch_threads(num_threads):
        spec = dataclasses.replace(spec or TinyClipSpec(), image_size=image_size)
        tokenizer = build_scene_tokenizer(spec, seed=seed)
        model = build_clip_model(spec, tokenizer, seed=seed)
        optimizer, schedule = make_optimizer(model, lr, steps, warmup=max(1, steps // 20))
        rng = random.Random(seed)
        losses = []
        for step in range(steps):
            batch = make_batch(rng, batch_size, image_size, tokenizer, num_negatives)
            losses.append(train_step(model, batch, optimizer, max_logit_scale))
            schedule.step()
            if log_every and (step + 1) % log_every == 0:
                recent = losses[-log_every:]
                print(f"step {step + 1}/{steps}  loss {sum(recent) / len(recent):.3f}  "
                      f"scale {model.logit_scale.exp().item():.1f}  {time.perf_counter() - start:.0f}s", flush=True)
    os.makedirs(output, exist_ok=True)
    model.eval()
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)
    clip_image_processor(spec).save_pretrained(output)
    return TrainResult(
        output=output,
        losses=losses,
        seconds=time.perf_counter() - start,
        num_parameters=sum(p.numel() for p in model.parameters()),
        logit_scale=float(model.logit_scale.detach().exp()),
    )


# ---------------------------------------------------------------- evaluation


@torch.inference_mode()
def _embed(scorer: Any, images: Sequence[Image.Image], captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-norm embeddings (N, D) of images and captions with a ClipScorer's model, each computed once."""
    image_emb, text_emb = scorer.embed(images, captions)
    return F.normalize(image_emb, dim=-1), F.normalize(text_emb, dim=-1)


def evaluate_alignment(
    model_dir: str, num_scenes: int = 200, group_size: int = 16, seed: int = 10_000, image_size: int = 112,
    threshold: float = 0.4, num_threads: int | None = 1,
) -> dict[str, float]:
    """Measure how well a saved CLIP separates right from wrong descriptions, through ClipScorer.

    Held-out scenes come from ``seed`` (training uses its own seed's stream). Scenes use the data
    sets' six colours and rubber only, like the RL data.

    Args:
        model_dir: directory loadable by :class:`pebr.rewards.clip.ClipScorer`.
        num_scenes: held-out scenes; a multiple of ``group_size`` is best (the rest is not
            used for retrieval).
        group_size: candidates per retrieval question (the own description among group_size).
        seed: seed of the held-out scenes.
        image_size: side of the drawn images.
        threshold: the stage-1 reward's saturation point.
        num_threads: torch threads while scoring (see :func:`torch_threads`).

    Returns:
        ``own`` / ``other`` / ``one_colour_changed``: mean cosine of an image with its own
        description, with another scene's, and with its own after one object's colour changed;
        ``empty``: mean cosine with the empty caption; ``retrieval_acc``: fraction of images whose own
        description has the highest cosine among ``group_size`` descriptions of the same group;
        ``own_above_threshold``: fraction of own pairs reaching ``threshold``; ``reward_*``: mean
        stage-1 CLIP reward of each kind of caption (``empty`` as ClipScorer sees it; the stage-1
        reward function itself gives an empty description 0 without calling the model).

    Raises:
        ValueError: if ``num_scenes < group_size`` or ``group_size < 2``.
    """
    from pebr.rewards.clip import ClipScorer
    from pebr.rewards.terms import clip_alignment_reward

    if group_size < 2 or num_scenes < group_size:
        raise ValueError(f"need 2 <= group_size <= num_scenes, got {group_size}, {num_scenes}")
    rng = random.Random(seed)
    scenes = [sc.sample_scene(rng) for _ in range(num_scenes)]
    images = [sc.render_scene(s, image_size) for s in scenes]
    own = [sc.describe_scene(s) for s in scenes]
    other = own[1:] + own[:1]  # a different scene's description for each image
    recoloured = []
    for s in scenes:
        i = rng.randrange(len(s.objects))
        colour = rng.choice([c for c in sc.DEFAULT_COLORS if c != s.objects[i].color])
        objects = list(s.objects)
        objects[i] = dataclasses.replace(objects[i], color=colour)
        recoloured.append(sc.describe_scene(sc.Scene(objects)))
    with torch_threads(num_threads):
        scorer = ClipScorer(model_dir, device="cpu", batch_size=64)
        cos = {
            "own": scorer.score(images, own),
            "other": scorer.score(images, other),
            "one_colour_changed": scorer.score(images, recoloured),
            "empty": scorer.score(images, [""] * num_scenes),
        }
        image_emb, text_emb = _embed(scorer, images, own)
        hits = total = 0
        for g in range(0, num_scenes - group_size + 1, group_size):
            sims = image_emb[g : g + group_size] @ text_emb[g : g + group_size].T  # (G, G)
            hits += int((sims.argmax(dim=1) == torch.arange(group_size)).sum())
            total += group_size
    result = {name: float(np.mean(v)) for name, v in cos.items()}
    result["retrieval_acc"] = hits / total
    result["own_above_threshold"] = float(np.mean([c >= threshold for c in cos["own"]]))
    for name, values in cos.items():
        result[f"reward_{name}"] = float(np.mean([clip_alignment_reward(c, threshold) for c in values]))
    return result
