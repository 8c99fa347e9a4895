"""Build the embedded default model: a small Qwen2.5-VL from a config, with a locally trained tokenizer.

No weights can be downloaded where this project is tested, so tests and the demo run on a model that is
built here: a byte-level BPE tokenizer trained on text of the synthetic task (plus the Qwen special tokens
and chat template), a Qwen2.5-VL image processor and processor, and randomly initialised weights.

    python scripts/make_tiny_model.py --output DIR [--size tiny|small] [--seed S]
        [--family qwen2_5_vl|qwen2_vl|qwen3_vl]

`tiny` (about 0.4 M parameters) loads and generates in about a second: it is for tests.
`small` (about 5 M parameters) is large enough to learn the synthetic counting task on 2 CPU cores in
minutes of SFT: the demo trains it (README, "What the demo shows": what the three stages reach with it).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from pebr.config import ConfigError, check_writable_folder  # noqa: E402
from pebr.utils.tiny_model import FAMILIES, build_tiny_model  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="directory to write the Hugging Face model into")
    parser.add_argument("--size", choices=["tiny", "small"], default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--family", choices=FAMILIES, default="qwen2_5_vl",
                        help="the model family (the others are for trying the trainer on them)")
    args = parser.parse_args(argv)
    if os.path.isdir(args.output) and os.listdir(args.output) and not os.path.exists(
            os.path.join(args.output, "pebr_tiny_model.json")):
        parser.error(f"--output {args.output} holds files this script did not write; name a new or empty directory")
    try:
        check_writable_folder(args.output, "--output")
    except ConfigError as err:
        parser.error(str(err))
    path = build_tiny_model(args.output, size=args.size, seed=args.seed, family=args.family)
    print(f"wrote {args.size} {args.family} to {path}")


if __name__ == "__main__":
    main()
