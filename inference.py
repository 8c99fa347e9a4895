"""Ask a PeBR model one question about one image; print its answer and the extracted final answer.

    python inference.py --model_path M [--image demo.jpg] [--question "..."] [--max_new_tokens 4096]
        [--temperature 0] [--top_p 1] [--backend hf|vllm]

The question is wrapped in the PeBR format prompt (examples/format_prompt/pebr.jinja), as in training,
so the model answers with an image description, a rationale, numbered steps and a final answer line.
Works on the embedded small model (scripts/make_tiny_model.py, then the demo's warm-up/RL stages) and on
a real Qwen2.5-VL directory or hub id. Decoding is greedy with up to 4096 new tokens by default, as in the
paper's inference (fewer when the model's context leaves less room after the prompt, as the embedded model's does).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, ROOT)

from pebr.config import ConfigError  # noqa: E402
from pebr.data.images import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS  # noqa: E402
from pebr.data.prompts import DEFAULT_FORMAT_PROMPT  # noqa: E402
from pebr.evaluation import (BACKENDS, DEFAULT_MAX_NEW_TOKENS,  # noqa: E402
                             check_generation_options, check_model_path, generate_texts, load_model_processor,
                             make_engine, model_context, response_budget)

DEFAULT_IMAGE = os.path.join(ROOT, "demo.jpg")
NO_ANSWER = "(none: the response has no \"### The final answer is:\" line)"
DEFAULT_QUESTION = "Subtract all brown blocks. Subtract all large blue rubber things. How many objects are left?"


def answer(
    model_path: str,
    image: str,
    question: str,
    *,
    max_new_tokens: int | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    backend: str = "hf",
    format_prompt: str | None = DEFAULT_FORMAT_PROMPT,
    min_pixels: int | None = DEFAULT_MIN_PIXELS,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> str:
    """The model's full response to `question` about the image at `image`.

    Args:
        model_path: a model directory or a hub id.
        max_new_tokens: the response budget; None for DEFAULT_MAX_NEW_TOKENS, or what the model's context
            (max_position_embeddings) leaves after the prompt when that is less.

    Raises:
        FileNotFoundError: the image does not exist.
        ConfigError: an explicit `max_new_tokens` that does not fit in the model's context after the prompt.
        DataError: an empty question, or one holding the model's vision or chat tokens (they would be taken for
            image slots, or open a turn of their own).
    """
    from pebr.data.images import check_fitted_aspect, load_image, probe_image
    from pebr.data.prompts import build_messages, load_format_prompt
    from pebr.data.records import DataError, check_no_model_tokens

    if not question.strip():
        raise DataError("--question is empty")
    check_no_model_tokens(question, "the question", "--question")
    if not os.path.exists(image):  # the model path may be a hub id: transformers says what is wrong with it
        raise FileNotFoundError(f"image {image!r} does not exist")
    # Its header first: a 121-megapixel file was decoded whole (1.5 GB) that evaluation refuses, and a larger
    # one raised PIL's DecompressionBombError as a traceback that named no file.
    probe_image(image, None, "--image")
    processor = load_model_processor(model_path)
    template = load_format_prompt(format_prompt) if format_prompt else None
    prompt = processor.apply_chat_template(build_messages(question, 1, template), add_generation_prompt=True,
                                           tokenize=False)
    try:
        picture = load_image(image, None, min_pixels=min_pixels, max_pixels=max_pixels)
    except (OSError, SyntaxError, ValueError) as err:  # PIL's ways of saying a file is not a readable image
        raise DataError(f"image {image!r} cannot be read: {err}") from err
    check_fitted_aspect(*picture.size, f"image {image!r}")  # a BadRecord, which is a DataError
    prompt_tokens = len(processor(text=[prompt], images=[picture])["input_ids"][0])
    max_new_tokens = response_budget(prompt_tokens, model_context(model_path), max_new_tokens)
    engine = make_engine(model_path, processor, backend=backend, max_model_len=prompt_tokens + max_new_tokens)
    ((text, _),) = generate_texts(engine, processor.tokenizer, [{"prompt": prompt, "images": [picture]}],
                                  max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
    return text


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_path", type=os.path.expanduser, required=True,
                        help="a Hugging Face model directory or hub id (Qwen2.5-VL, Qwen2-VL or Qwen3-VL)")
    parser.add_argument("--image", type=os.path.expanduser, default=DEFAULT_IMAGE)
    parser.add_argument("--question", default=DEFAULT_QUESTION)
    parser.add_argument("--max_new_tokens", type=int, default=None,
                        help=f"default: {DEFAULT_MAX_NEW_TOKENS}, as in the paper, or what the model's context leaves")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    parser.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling (with --temperature > 0)")
    parser.add_argument("--backend", choices=BACKENDS, default="hf")
    parser.add_argument("--format_prompt", default=DEFAULT_FORMAT_PROMPT, help='jinja template; "" for none')
    parser.add_argument("--min_pixels", type=int, default=DEFAULT_MIN_PIXELS,
                        help="image area bounds, as in training (the GPU stage recipes'; a model trained "
                             "with examples/pebr_cpu.yaml: --min_pixels 3136 --max_pixels 50176)")
    parser.add_argument("--max_pixels", type=int, default=DEFAULT_MAX_PIXELS)
    args = parser.parse_args(argv)
    check_model_path(args.model_path)
    check_generation_options(args.max_new_tokens, args.min_pixels, args.max_pixels, args.temperature, args.top_p)
    if not os.path.isfile(args.image):
        raise ConfigError(f"--image {args.image!r}: " + ("a directory" if os.path.isdir(args.image) else "no such file"))
    from pebr.rewards.terms import extract_final_answer  # sympy: once the options are checked

    logging.basicConfig(level=logging.WARNING)
    text = answer(args.model_path, args.image, args.question, max_new_tokens=args.max_new_tokens,
                  temperature=args.temperature, top_p=args.top_p, backend=args.backend,
                  format_prompt=args.format_prompt,
                  min_pixels=args.min_pixels, max_pixels=args.max_pixels)
    print(text)
    print("\n=== extracted final answer ===")
    print(extract_final_answer(text) or NO_ANSWER)
    return text


if __name__ == "__main__":
    from pebr.cli import run_cli

    sys.exit(run_cli(main, None, on_interrupt="no answer"))  # a bad option: its message and exit code 2
