"""Warm-up SFT of a Qwen2.5-VL on the filtered sharegpt data (the demo's single-machine route).

    python scripts/sft_warmup.py --model_path M --data DIR/sft/clean.json --image_dir DIR/images \\
        --output_dir OUT [--epochs 2 --lr 1e-3 --batch_size 8 --max_length 1024 --seed 0 --max_steps -1]

Loss is on assistant tokens only; the user turn is rendered through the PeBR format prompt as in the RL
stages (`--format_prompt ""` to train on the bare question). The vision tower and its projector are
frozen by default, as in the paper (`--no-freeze_vision_tower` trains them too). OUT is a Hugging Face
model directory (safetensors, processor, tokenizer) that transformers, vLLM and the RL recipes load;
`OUT/sft_metrics.json` holds the losses and the wall time. OUT is written whole at the end (through OUT.saving)
and replaces an earlier warm-up's output only then.

`--save_steps N` keeps a checkpoint every N optimizer steps in OUT.checkpoints (the newest `--save_total_limit`);
rerunning the same command continues from the newest one, and a checkpoint of other settings or another data file
is refused (`--no-resume` deletes them and starts again). They are deleted once OUT is complete. Without
`--save_steps` an interrupted run starts again. At real scale use LLaMA-Factory (docs/).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from pebr.config import seed_argument  # noqa: E402
from pebr.data.images import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS  # noqa: E402
from pebr.data.prompts import DEFAULT_FORMAT_PROMPT  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_path", type=os.path.expanduser, required=True)
    parser.add_argument("--data", type=os.path.expanduser, required=True, help="filtered sharegpt json (dataset/filter.py output)")
    parser.add_argument("--image_dir", type=os.path.expanduser, default=None,
                        help="directory relative image paths are joined to (default: the --data file's directory, "
                             "as dataset/filter.py reads them)")
    parser.add_argument("--output_dir", type=os.path.expanduser, required=True)
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--grad_accum", type=int, default=1)
    parser.add_argument("--warmup_ratio", type=float, default=0.1)
    parser.add_argument("--weight_decay", type=float, default=0.0)
    parser.add_argument("--lr_scheduler", default="cosine")
    parser.add_argument("--max_length", type=int, default=1024)
    parser.add_argument("--max_steps", type=int, default=-1, help="stop after this many steps (-1: all epochs)")
    parser.add_argument("--seed", type=seed_argument, default=0)
    parser.add_argument("--freeze_vision_tower", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--vision_lr", type=float, default=None,
                        help="learning rate of the vision tower when it trains (default: --lr)")
    parser.add_argument("--format_prompt", default=DEFAULT_FORMAT_PROMPT, help='jinja template; "" for none')
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=False,
                        help="bf16 autocast with fp32 master weights")
    parser.add_argument("--min_pixels", type=int, default=DEFAULT_MIN_PIXELS,
                        help="image area bounds (the RL stages', so SFT trains at their resolution)")
    parser.add_argument("--max_pixels", type=int, default=DEFAULT_MAX_PIXELS)
    parser.add_argument("--logging_steps", type=int, default=10)
    parser.add_argument("--save_steps", type=int, default=0,
                        help="keep a resumable checkpoint every this many steps in OUTPUT_DIR.checkpoints (0: none)")
    parser.add_argument("--save_total_limit", type=int, default=2, help="how many checkpoints to keep, the newest")
    parser.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                        help="continue from the newest checkpoint of OUTPUT_DIR.checkpoints (--no-resume: delete them)")
    args = parser.parse_args(argv)
    from pebr.sft import SFTConfig, train_sft  # torch and transformers: only once the options parse

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    metrics = train_sft(SFTConfig(**vars(args)))
    summary = {k: metrics[k] for k in ("samples", "dropped_overlong", "steps", "first_loss", "final_loss", "train_loss",
                                       "wall_s")}
    print(json.dumps(summary, indent=2))
    print(f"saved the warm-up model to {args.output_dir}")
    return metrics


if __name__ == "__main__":
    from pebr.cli import run_cli

    sys.exit(run_cli(main, None))  # a bad option or data file: its message and exit code 2, no traceback
