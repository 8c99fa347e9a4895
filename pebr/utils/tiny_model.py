"""Build a small Qwen2.5-VL (config, tokenizer, processor, random weights) entirely offline.

The tokenizer is a byte-level BPE trained on a corpus of the synthetic task's words, so any text can
be encoded (byte fallback) while the task's own words are single tokens, which keeps sequences short on
CPU. Special tokens and the chat template follow the Qwen2.5-VL layout, so the same code path serves a
real Qwen2.5-VL checkpoint.
"""

from __future__ import annotations

import json
import os
import random
from typing import Any

from pebr.data.prompts import DEFAULT_FORMAT_PROMPT

# Qwen2.5-VL's special tokens, in the order their ids are assigned after the BPE vocabulary.
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# The Qwen chat layout: <|im_start|>role\n...<|im_end|>\n; images become vision_start/image_pad/vision_end.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}"
    "{% if messages[0]['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}"
    "{{ message['content'] }}"
    "{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part or 'image_url' in part %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' or 'video' in part %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in part %}"
    "{{ part['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "<|im_start|>assistant\n"
    "{% endif %}"
)

SIZES = {
    # head_dim 32 -> the multimodal rope sections must sum to 16.
    "tiny": dict(hidden=64, layers=2, heads=2, kv_heads=1, inter=128, mrope=[4, 6, 6],
                 v_hidden=64, v_depth=2, v_heads=2, v_inter=128, vocab=1200),
    # head_dim 64 -> sections sum to 32.
    "small": dict(hidden=256, layers=4, heads=4, kv_heads=2, inter=768, mrope=[8, 12, 12],
                  v_hidden=128, v_depth=4, v_heads=4, v_inter=384, vocab=2000),
}
# Real-scale shapes for GPU benchmarks (benchmarks/gpu_update.py): built from config on the device, never
# written to disk. The tokenizer stays the small one; the embedding and lm_head keep Qwen2.5's 151936 rows,
# so the logits cost what they cost in the real model.
GPU_SIZES = {
    # Qwen2.5-0.5B's text shape (head_dim 64) with an 8-block vision tower.
    "gpu-0.6b": dict(hidden=896, layers=24, heads=14, kv_heads=2, inter=4864, mrope=[8, 12, 12],
                     v_hidden=1280, v_depth=8, v_heads=16, v_inter=3420, vocab=2000, model_vocab=151936),
    # Qwen2.5-1.5B's text shape (head_dim 128) with Qwen2.5-VL's full 32-block vision tower: about 2.4 B.
    "gpu-2b": dict(hidden=1536, layers=28, heads=12, kv_heads=2, inter=8960, mrope=[16, 24, 24],
                   v_hidden=1280, v_depth=32, v_heads=16, v_inter=3420, vocab=2000, model_vocab=151936),
}


_WORDS = (
    "red blue green yellow purple gray grey brown cyan black white orange large small big tiny metal rubber "
    "shiny matte cube cubes sphere spheres cylinder cylinders block blocks ball balls object objects thing things "
    "shape shapes color colour size left right front behind there are is the a an of and in image shows "
    "Subtract all How many objects left Are there more than fewer same number What What's which count total "
    "Image Description Rationales Let's think step by step Step The final answer is question asks remove removing "
    "after so then we count counting remaining each one two three four five six seven eight nine ten zero "
    "describe the image first then reason about the question and give only the answer on the last line "
    "You are a helpful assistant Please rethink it let me rethink wait"
)


def _tokenizer_corpus(seed: int) -> list[str]:
    """Text covering the task vocabulary, the PeBR headers and digits, so they become single tokens."""
    rng = random.Random(seed)
    words = _WORDS.split()
    headers = ["### Image Description:", "### Rationales:", "### Let's think step by step.",
               "### Step 1:", "### Step 2:", "### Step 3:", "### The final answer is:"]
    lines = list(headers) + [" ".join(headers)]
    for _ in range(3000):
        k = rng.randint(4, 16)
        sentence = " ".join(rng.choice(words) for _ in range(k))
        lines.append(f"{sentence}. {rng.randint(0, 20)} {rng.choice(headers)} {rng.randint(0, 9)}")
    lines.append("0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 + - = ( ) . , : ? !")
    # The PeBR format prompt is part of every RL prompt: make its words single tokens too.
    if os.path.isfile(DEFAULT_FORMAT_PROMPT):
        with open(DEFAULT_FORMAT_PROMPT) as f:
            lines += [f.read()] * 50
    return lines


def build_tokenizer(vocab_size: int, seed: int):
    """Train a byte-level BPE with the Qwen special tokens; returns a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_tokenizer_corpus(seed), trainer=trainer)
    tok.add_special_tokens(SPECIAL_TOKENS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
        model_max_length=32768,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


FAMILIES = ("qwen2_5_vl", "qwen2_vl", "qwen3_vl")  # pebr.workers.actor.SUPPORTED_MODEL_TYPES, built for tests


def model_config(size: str, tokenizer: Any, family: str = "qwen2_5_vl") -> Any:
    """The config of `size` (SIZES or GPU_SIZES) for `tokenizer`'s special tokens: a Qwen2.5-VL, or with `family`
    a Qwen2-VL or Qwen3-VL of the same text shape (their own vision towers: Qwen3-VL's takes 16 px patches and
    feeds the first decoder layer its deepstack features)."""
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig, Qwen3VLConfig

    shapes = {**SIZES, **GPU_SIZES}
    if size not in shapes:
        raise ValueError(f"size must be one of {sorted(shapes)}, got {size!r}")
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    s = shapes[size]
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    vision_blocks = s["v_depth"]
    text = dict(
        vocab_size=max(len(tokenizer), s.get("model_vocab", 0)), hidden_size=s["hidden"],
        intermediate_size=s["inter"], num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
        num_key_value_heads=s["kv_heads"], max_position_embeddings=4096 if size in SIZES else 32768,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": s["mrope"]},
        tie_word_embeddings=False, bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"])
    tokens = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
                  tie_word_embeddings=False)
    if family == "qwen2_vl":
        return Qwen2VLConfig(text_config=text, vision_config=dict(
            depth=vision_blocks, embed_dim=s["v_hidden"], hidden_size=s["hidden"],
            mlp_ratio=s["v_inter"] // s["v_hidden"], num_heads=s["v_heads"], patch_size=14, spatial_merge_size=2,
            temporal_patch_size=2), **tokens)
    if family == "qwen3_vl":
        text["head_dim"] = s["hidden"] // s["heads"]
        text["rope_parameters"] = {**text["rope_parameters"], "mrope_interleaved": True}
        return Qwen3VLConfig(text_config=text, vision_config=dict(
            depth=vision_blocks, hidden_size=s["v_hidden"], intermediate_size=s["v_inter"], num_heads=s["v_heads"],
            out_hidden_size=s["hidden"], patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
            num_position_embeddings=144, deepstack_visual_indexes=[0]), **tokens)
    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=max(len(tokenizer), s.get("model_vocab", 0)),
            hidden_size=s["hidden"],
            intermediate_size=s["inter"],
            num_hidden_layers=s["layers"],
            num_attention_heads=s["heads"],
            num_key_value_heads=s["kv_heads"],
            max_position_embeddings=4096 if size in SIZES else 32768,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": s["mrope"]},
            tie_word_embeddings=False,
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(
            depth=vision_blocks,
            hidden_size=s["v_hidden"],
            intermediate_size=s["v_inter"],
            num_heads=s["v_heads"],
            out_hidden_size=s["hidden"],
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            # Full attention in every 8th block and the last, as Qwen2.5-VL's 32 blocks have at 7, 15, 23, 31.
            fullatt_block_indexes=sorted({*range(7, vision_blocks, 8), vision_blocks - 1}),
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )


def build_processor(tokenizer: Any, min_pixels: int = 28 * 28 * 4, max_pixels: int = 224 * 224,
                    family: str = "qwen2_5_vl") -> Any:
    """A processor of `family` around `tokenizer`. The default pixel budget keeps image token counts low
    (a 112x112 image -> 16 tokens)."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen3VLProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    if family == "qwen3_vl":  # 16 px patches, merged 2 x 2: sides in multiples of 32
        images = Qwen2VLImageProcessor(patch_size=16, min_pixels=32 * 32 * 4, max_pixels=max_pixels,
                                       image_mean=[0.5] * 3, image_std=[0.5] * 3)
        return Qwen3VLProcessor(image_processor=images, tokenizer=tokenizer, video_processor=Qwen3VLVideoProcessor(),
                                chat_template=CHAT_TEMPLATE)
    kind = Qwen2VLProcessor if family == "qwen2_vl" else Qwen2_5_VLProcessor
    return kind(image_processor=Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels),
                tokenizer=tokenizer, video_processor=Qwen2VLVideoProcessor(), chat_template=CHAT_TEMPLATE)


def build_tiny_model(output: str, size: str = "tiny", seed: int = 0, family: str = "qwen2_5_vl") -> str:
    """Write a randomly initialised Qwen2.5-VL (or another of FAMILIES) with tokenizer and processor to `output`.

    Args:
        output: directory to create (overwritten files, not a merged tree).
        size: "tiny" for tests, "small" for the demo.
        seed: seeds the tokenizer corpus and the weight initialisation.
        family: the model family; the tests train the other ones too.

    Returns:
        The output directory.
    """
    import torch
    import transformers

    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    os.makedirs(output, exist_ok=True)
    tokenizer = build_tokenizer(SIZES[size]["vocab"], seed)
    config = model_config(size, tokenizer, family)
    torch.manual_seed(seed)
    model_class = {"qwen2_5_vl": transformers.Qwen2_5_VLForConditionalGeneration,
                   "qwen2_vl": transformers.Qwen2VLForConditionalGeneration,
                   "qwen3_vl": transformers.Qwen3VLForConditionalGeneration}[family]
    model = model_class(config).to(torch.float32)
    eos, pad = tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")
    model.generation_config.eos_token_id = [eos, pad]
    model.generation_config.pad_token_id = pad
    model.save_pretrained(output, safe_serialization=True)
    build_processor(tokenizer, family=family).save_pretrained(output)
    tokenizer.save_pretrained(output)
    with open(os.path.join(output, "pebr_tiny_model.json"), "w") as f:
        json.dump({"size": size, "seed": seed, "family": family,
                   "num_parameters": sum(p.numel() for p in model.parameters())}, f)
    return output
