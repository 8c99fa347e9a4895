"""Evaluate a model on PeBR GRPO-format data (the synthetic test split, or a benchmark laid out the same way).

    python scripts/evaluate.py --model_path M --data FILE [--image_dir D] [--output OUT_PREFIX]
        [--max_new_tokens 4096] [--limit K] [--temperature 0] [--top_p 1] [--backend vllm|hf]

The prompts go through batched vLLM generation (greedy, up to 4096 new tokens, images within the stage
recipes' 576..802816 px: the paper's inference settings, by default; fewer new tokens where the model's context
leaves less after --max_prompt_length). Prompts over --max_prompt_length are
skipped and graded wrong. Reports accuracy overall and per
`category` (when the records have one), format rate, keyword recall (records with `key_words`) and mean
response length in tokens; writes OUT_PREFIX.json (with every response) and OUT_PREFIX.md (a table).

The questions go to the engine --chunk_size at a time, and with --output each chunk's graded answers are appended
to OUT_PREFIX.partial.jsonl: an interrupted evaluation, rerun with the same command, answers only the rest (the
file is refused if the model's files or the settings changed; --no-resume starts again). It is removed once the
reports are written.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from pebr.config import seed_argument  # noqa: E402
from pebr.data.images import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS  # noqa: E402
from pebr.data.prompts import DEFAULT_FORMAT_PROMPT  # noqa: E402
from pebr.evaluation import (BACKENDS, DEFAULT_CHUNK_SIZE,  # noqa: E402
                             check_generation_options,
                             check_model_path, check_output_apart_from_inputs, evaluate_model, markdown_table,
                             report_paths)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_path", type=os.path.expanduser, required=True)
    parser.add_argument("--data", type=os.path.expanduser, required=True, help="PeBR GRPO-format .json/.jsonl/.parquet file or directory")
    parser.add_argument("--image_dir", type=os.path.expanduser, default=None, help="directory the records' image paths are relative to")
    parser.add_argument("--output", type=os.path.expanduser, default=None, help="prefix of the .json and .md reports (default: none)")
    parser.add_argument("--max_new_tokens", type=int, default=None,
                        help="default: 4096, as in the paper, or what the model's context leaves after "
                             "--max_prompt_length")
    parser.add_argument("--limit", type=int, default=None, help="only the first K records")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    parser.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling (with --temperature > 0)")
    parser.add_argument("--backend", choices=BACKENDS, default="vllm")
    parser.add_argument("--format_prompt", default=DEFAULT_FORMAT_PROMPT, help='jinja template; "" for none')
    parser.add_argument("--max_prompt_length", type=int, default=2048)
    parser.add_argument("--min_pixels", type=int, default=DEFAULT_MIN_PIXELS, help="image area bounds (the GPU stage "
                        "recipes'; a model trained with examples/pebr_cpu.yaml: --min_pixels 3136 --max_pixels 50176)")
    parser.add_argument("--max_pixels", type=int, default=DEFAULT_MAX_PIXELS)
    parser.add_argument("--seed", type=seed_argument, default=0)
    parser.add_argument("--chunk_size", type=int, default=DEFAULT_CHUNK_SIZE,
                        help="questions per engine call; with --output their answers are saved after each")
    parser.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                        help="answer only the questions missing from OUTPUT.partial.jsonl, an interrupted run's "
                             "(--no-resume: delete it and start again)")
    args = parser.parse_args(argv)
    check_model_path(args.model_path)
    check_generation_options(args.max_new_tokens, args.min_pixels, args.max_pixels, args.temperature, args.top_p,
                             limit=args.limit, max_prompt_length=args.max_prompt_length, chunk_size=args.chunk_size)
    if args.output:
        check_output_apart_from_inputs(args.output, args.data, args.model_path)
    logging.basicConfig(level=logging.WARNING)
    result = evaluate_model(
        args.model_path, args.data, args.image_dir, output=args.output, max_new_tokens=args.max_new_tokens,
        limit=args.limit, temperature=args.temperature, top_p=args.top_p, format_prompt=args.format_prompt,
        backend=args.backend, max_prompt_length=args.max_prompt_length, min_pixels=args.min_pixels,
        max_pixels=args.max_pixels,
        seed=args.seed, chunk_size=args.chunk_size, resume=args.resume,
    )
    print(markdown_table(result))
    if args.output:
        print("wrote {} and {}".format(*report_paths(args.output)))
    return result


if __name__ == "__main__":
    from pebr.cli import run_cli

    # A bad option or data file: its message and exit code 2, no traceback.
    sys.exit(run_cli(main, None, on_interrupt="with --output, the answers of each finished chunk are in "
                                              "OUTPUT.partial.jsonl, and the same command goes on from there"))
