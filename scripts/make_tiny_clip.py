"""Build a tiny CLIP model from a config, for tests of the CLIP alignment reward.

Nothing can be downloaded where this project is tested, so the stand-in for FG-CLIP is built here:
a CLIP config with two small layers per tower and random weights (seeded), a BPE tokenizer trained
locally with the `tokenizers` library, and a CLIPImageProcessor. The directory loads with
`AutoModel`, `AutoTokenizer` and `AutoImageProcessor` like a real checkpoint.

    python scripts/make_tiny_clip.py --output DIR [--seed S]

The text tower accepts 16 tokens, so tests can check that long captions are truncated.
"""

from __future__ import annotations

import argparse
import os

BOS, EOS, PAD, UNK = "<|startoftext|>", "<|endoftext|>", "<|pad|>", "<|unk|>"
MAX_TEXT_TOKENS = 16
IMAGE_SIZE = 32

# Enough words for the BPE merges to cover the captions the tests use.
_CORPUS = [
    "a red square on a white background",
    "a blue circle next to a green triangle",
    "two yellow stars and one black cube",
    "the image shows a small purple sphere above a large orange box",
    "several shapes of different colours are arranged in a grid",
    "a dog, a cat and a bird sit under a tree",
    "a chart with bars, lines and numbers",
]


def build_tokenizer(output: str):
    """Train a small whitespace-BPE tokenizer and save it as a fast tokenizer in `output`.

    Returns:
        The `PreTrainedTokenizerFast`, whose encodings are BOS + tokens + EOS.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=[PAD, UNK, BOS, EOS], show_progress=False)
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    bos_id, eos_id = tok.token_to_id(BOS), tok.token_to_id(EOS)
    # CLIP pools the text embedding at the EOS token, so every encoding must end with one.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, bos_id), (EOS, eos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=MAX_TEXT_TOKENS,
    )
    fast.save_pretrained(output)
    return fast


def build_tiny_clip(output: str, seed: int = 0) -> str:
    """Write a tiny CLIP model, tokenizer and image processor to `output`.

    Args:
        output: directory to create (or overwrite files in).
        seed: seed of the random weights.

    Returns:
        The output directory.
    """
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    os.makedirs(output, exist_ok=True)
    tokenizer = build_tokenizer(output)
    text_config = {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": MAX_TEXT_TOKENS,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    vision_config = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": IMAGE_SIZE,
        "patch_size": 8,
    }
    config = CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=16)
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(output)
    CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    ).save_pretrained(output)
    return output


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="directory to write the model into")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(f"wrote tiny CLIP to {build_tiny_clip(args.output, seed=args.seed)}")


if __name__ == "__main__":
    main()
