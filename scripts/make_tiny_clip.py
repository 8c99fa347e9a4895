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
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from pebr.utils.clip_train import (TinyClipSpec, build_bpe_tokenizer, build_clip_model,  # noqa: E402
                                   clip_image_processor)

# Two small layers per tower at width 32, 32 px images in 8 px patches, 16 text positions.
SPEC = TinyClipSpec(image_size=32, patch_size=8, vision_hidden=32, text_hidden=32, projection_dim=16,
                    max_text_tokens=16, vocab_size=200)

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


def build_tiny_clip(output: str, seed: int = 0) -> str:
    """Write a tiny CLIP model (random weights from `seed`), tokenizer and image processor to `output`, a directory
    made if needed; returns it."""
    os.makedirs(output, exist_ok=True)
    tokenizer = build_bpe_tokenizer(_CORPUS, SPEC.vocab_size, SPEC.max_text_tokens)
    tokenizer.save_pretrained(output)
    build_clip_model(SPEC, tokenizer, seed=seed).save_pretrained(output)
    clip_image_processor(SPEC).save_pretrained(output)
    return output


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="directory to write the model into")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(f"wrote tiny CLIP to {build_tiny_clip(args.output, seed=args.seed)}")


if __name__ == "__main__":
    main()
