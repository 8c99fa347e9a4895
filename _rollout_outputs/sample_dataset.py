"""Split the RL data set into easy / medium / hard cases from the sampled rollouts.

    python _rollout_outputs/sample_dataset.py [--rollouts FILE] [--dataset FILE] [--output_dir DIR] [--n 8]

The defaults chain with the recipes: examples/pebr_sample.yaml writes _rollout_outputs/rollouts.jsonl
from dataset/train.json, and this writes dataset/easycase.json (read by examples/pebr_stage1.yaml),
dataset/mediumcase.json (read by examples/pebr_stage2.yaml) and dataset/hardcase.json.
The logic lives in `pebr.trainer.split`.
"""

from __future__ import annotations

import argparse
import os
import sys

# Run as a file from the repository root: make the package importable without installing it.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pebr.cli import run_cli  # noqa: E402
from pebr.trainer.split import split_dataset  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rollouts", default="_rollout_outputs/rollouts.jsonl",
                        help="JSONL rollouts from pebr.trainer.sample_main (trainer.sample_output)")
    parser.add_argument("--dataset", default="dataset/train.json",
                        help="the data set that was sampled (the sampling run's data.train_files: a .json, .jsonl "
                             "or .parquet file, a directory of them, or a hub name@split)")
    parser.add_argument("--output_dir", default="dataset", help="where easycase/mediumcase/hardcase.json go")
    parser.add_argument("--n", type=int, default=8,
                        help="rollouts per question (worker.rollout.n x trainer.total_epochs of the sampling run)")
    parser.add_argument("--skip_bad_lines", action="store_true",
                        help="count and skip malformed or repeated rollout lines, malformed JSONL lines of the "
                             "data set, records its loader refuses and records whose qid an earlier valid record "
                             "has (as sampling with data.on_bad_record=skip did), instead of stopping at the first")
    for key, default in (("prompt_key", "problem"), ("answer_key", "answer"), ("image_key", "images")):
        parser.add_argument(f"--{key}", default=default,
                            help=f"the sampling run's data.{key} (to check that each question is the one its "
                                 "rollouts answered, and with --skip_bad_lines, which records its loader skipped)")
    parser.add_argument("--allow_count_mismatch", action="store_true",
                        help="split a qid sampled other than --n times anyway, by all / some / none correct "
                             "(by default it is an error)")
    return parser.parse_args(argv)


def run(argv: list[str]) -> None:
    args = parse_args(argv)
    split_dataset(args.rollouts, args.dataset, args.output_dir, args.n,
                  skip_bad_lines=args.skip_bad_lines, allow_count_mismatch=args.allow_count_mismatch,
                  prompt_key=args.prompt_key, answer_key=args.answer_key, image_key=args.image_key)


def main(argv: list[str] | None = None) -> int:
    return run_cli(run, argv, on_interrupt="run it again (the split files are written whole or not at all)")


if __name__ == "__main__":
    sys.exit(main())
