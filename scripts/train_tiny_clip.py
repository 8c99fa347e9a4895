"""Train a tiny CLIP on synthetic scenes for the stage-1 CLIP reward of the CPU demo.

A randomly initialised CLIP (scripts/make_tiny_clip.py) gives similarities that are noise. This
script trains a small one contrastively on freshly drawn scenes and their descriptions (the text the
SFT data puts under "### Image Description:"), then saves a directory that loads with AutoModel,
AutoTokenizer and AutoImageProcessor (pebr.rewards.clip.ClipScorer). See pebr/utils/clip_train.py.

    python scripts/train_tiny_clip.py --output DIR [--steps N --batch_size B --image_size 112 --seed S] [--eval]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pebr.config import ConfigError, check_writable_folder  # noqa: E402
from pebr.utils.clip_train import evaluate_alignment, train_tiny_clip  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="directory to write the model into")
    parser.add_argument("--steps", type=int, default=400, help="optimiser steps")
    parser.add_argument("--batch_size", type=int, default=64, help="scenes per step")
    parser.add_argument("--image_size", type=int, default=112, help="image side in pixels (multiple of 16)")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval", action="store_true", help="afterwards, score 200 held-out scenes and print metrics")
    args = parser.parse_args(argv)
    try:  # before training, not after it
        check_writable_folder(args.output, "--output")
    except ConfigError as err:
        parser.error(str(err))
    try:
        result = train_tiny_clip(args.output, steps=args.steps, batch_size=args.batch_size, image_size=args.image_size,
                                 seed=args.seed, lr=args.lr, log_every=max(1, args.steps // 10))
    except ValueError as err:  # settings it cannot train with, said before any step
        parser.error(str(err))
    print(f"wrote tiny CLIP ({result.num_parameters} parameters) to {result.output} in {result.seconds:.1f}s; "
          f"final loss {result.losses[-1]:.3f}, logit scale {result.logit_scale:.1f}")
    if args.eval:
        print(json.dumps(evaluate_alignment(args.output, image_size=args.image_size), indent=2))


if __name__ == "__main__":
    main()
