"""Evaluate a model on PeBR GRPO-format data: accuracy (overall and per category), format rate,
keyword recall and response length, from one batched generation.

Prompts are built exactly as the RL stages build them (`pebr.data.dataset.RLDataset`: the PeBR format
prompt, images resized by the same rule), and generation goes through the rollout engines of
`pebr.workers.rollout` (vLLM by default, transformers `generate` as the fallback), so a model is judged
on the inputs it was trained on. The scores are the reward terms of `pebr.rewards.terms`.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import defaultdict
from typing import Any

import torch

from pebr.config import ConfigError, check_writable_folder, looks_like_model_id
from pebr.data.images import PATCH_MULTIPLE
from pebr.rewards.terms import accuracy_reward, extract_final_answer, format_reward, keyword_recall
from pebr.utils.jsonio import atomic_write_text, is_within

logger = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TOKENS = 4096  # the paper's inference budget (PeBR responses run long: description, steps, answer)
DEFAULT_FORMAT_PROMPT = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "format_prompt", "pebr.jinja"
)
BACKENDS = ("vllm", "hf")


def make_engine(
    model_path: str,
    processor: Any,
    *,
    backend: str = "vllm",
    max_model_len: int = 4096,
    limit_images: int = 1,
    seed: int = 0,
    gpu_memory_utilization: float = 0.7,
) -> Any:
    """Build a generation engine for `model_path` (float32 on CPU, bf16 on CUDA; eager mode on CPU).

    Args:
        model_path: a Hugging Face Qwen2.5-VL directory.
        processor: its processor (the hf backend generates with it; vLLM loads its own from model_path).
        backend: "vllm" or "hf".
        max_model_len: prompt plus response tokens the vLLM engine must hold.
        limit_images: the most images in one prompt.
        seed: the engine's seed.
        gpu_memory_utilization: vLLM's share of GPU memory (ignored on CPU, where the KV cache size
            comes from VLLM_CPU_KVCACHE_SPACE).

    Returns:
        A `VLLMRollout` or `HFRollout`; both take `generate(prompts, SamplingConfig)`.

    Raises:
        ValueError: an unknown backend.
    """
    from pebr.workers.rollout import HFRollout, VLLMRollout

    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    cuda = torch.cuda.is_available()
    if backend == "hf":
        device = torch.device("cuda" if cuda else "cpu")
        return HFRollout(model_path, processor=processor, device=device,
                         dtype=torch.bfloat16 if cuda else torch.float32, trust_remote_code=False)
    return VLLMRollout(  # its engine environment: in-process, KV cache from cpu_kv_cache_gb on CPU
        model_path, dtype="bf16" if cuda else "fp32", max_model_len=max_model_len, tensor_parallel_size=1,
        gpu_memory_utilization=gpu_memory_utilization, cpu_kv_cache_gb=1, enforce_eager=not cuda,
        enable_chunked_prefill=False, max_num_batched_tokens=max_model_len, limit_images=limit_images,
        seed=seed, trust_remote_code=False, external_launcher=False,
    )


def generate_texts(
    engine: Any, tokenizer: Any, prompts: list[dict[str, Any]], *, max_new_tokens: int, temperature: float,
    top_p: float = 1.0, seed: int = 0,
) -> list[tuple[str, int]]:
    """One batched generation, one response per prompt.

    Args:
        engine: from `make_engine`.
        tokenizer: decodes the response ids (special tokens dropped).
        prompts: dicts {"prompt": chat-templated text, "images": [PIL images]}.
        max_new_tokens: response budget (4096, the paper's inference setting).
        temperature: 0 is greedy.

    Returns:
        Per prompt (text, number of response tokens without the end-of-turn token).
    """
    from pebr.workers.rollout import SamplingConfig

    sampling = SamplingConfig(n=1, temperature=temperature, top_p=top_p, top_k=0,
                              max_tokens=max_new_tokens, seed=seed)
    end_ids = {tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.pad_token_id}
    results = []
    for generation in engine.generate(prompts, sampling):
        ids = list(generation.responses[0])
        while ids and ids[-1] in end_ids:
            ids.pop()
        results.append((tokenizer.decode(ids, skip_special_tokens=True), len(ids)))
    return results


def check_model_path(model_path: str) -> None:
    """A model path that can only be local and is not a directory, or a directory without weights, is the user's
    error, said before transformers raises on it; anything shaped like a hub id ("org/name") is left to
    transformers.

    Raises:
        ConfigError: naming --model_path (and, for a trainer checkpoint's huggingface/ folder, the merger).
    """
    directory = os.path.expanduser(model_path)
    if os.path.isdir(directory):
        names = os.listdir(directory)
        if "shard_index.json" in names or any(name.startswith("model_world_size_") for name in names):
            raise ConfigError(f"--model_path {model_path!r} is a sharded trainer checkpoint; merge it into a Hugging "
                              f"Face model first: scripts/model_merger.py --local_dir {model_path}")
        if not any(name.endswith((".safetensors", ".bin")) for name in names):
            raise ConfigError(f"--model_path {model_path!r} holds no weights (*.safetensors); a trainer checkpoint's "
                              "actor/huggingface folder gets them from scripts/model_merger.py --local_dir "
                              "<global_step_k>/actor")
        return
    # "runs/x" is shaped like a hub id too, but a local "runs" folder says which was meant.
    if not looks_like_model_id(model_path) or os.path.isdir(model_path.split("/")[0]):
        raise ConfigError(f"--model_path {model_path!r}: no such directory")


def load_model_processor(model_path: str) -> Any:
    """The processor of `model_path` (a directory or a hub id). A hub id that cannot be fetched (no network, no
    such model, HF_HUB_OFFLINE=1 without a cached copy) is the user's input, said as such, not a traceback.

    Raises:
        ConfigError: naming --model_path and transformers' reason, or a model outside the supported families
            (`pebr.workers.actor.SUPPORTED_MODEL_TYPES`).
    """
    from transformers import AutoConfig, AutoProcessor

    from pebr.workers.actor import check_model_family

    try:
        check_model_family(AutoConfig.from_pretrained(model_path), model_path)
        return AutoProcessor.from_pretrained(model_path)
    except OSError as err:
        raise ConfigError(f"--model_path {model_path!r} cannot be loaded: {err}") from err


def response_budget(prompt_tokens: int, context: int | None, max_new_tokens: int | None,
                    prompt_flag: str | None = None) -> int:
    """How many tokens the response may take: `max_new_tokens`, or when None DEFAULT_MAX_NEW_TOKENS cut to what
    the model's context (None: unknown) leaves after the prompt. `prompt_flag`: the option `prompt_tokens` came
    from (evaluation sizes its engine by --max_prompt_length), named in the messages; None for a real prompt.

    Raises:
        ConfigError: the prompt fills the context, or an explicit `max_new_tokens` does not fit after it.
    """
    prompt = f"{prompt_flag} {prompt_tokens}" if prompt_flag else f"a prompt of {prompt_tokens} tokens"
    room = context - prompt_tokens if context else None
    if room is not None and room < 1:
        raise ConfigError(f"{prompt} takes the whole of the model's {context}-token context"
                          + (f"; lower {prompt_flag}" if prompt_flag else ""))
    if max_new_tokens is None:
        return DEFAULT_MAX_NEW_TOKENS if room is None else min(DEFAULT_MAX_NEW_TOKENS, room)
    if room is not None and max_new_tokens > room:
        raise ConfigError(f"--max_new_tokens {max_new_tokens}: {prompt} leaves {room} of "
                          f"the model's {context}-token context (max_position_embeddings)")
    return max_new_tokens


def model_context(model_path: str) -> int | None:
    """The model's context length (its text config's max_position_embeddings), None when its config names none."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path)
    return getattr(getattr(config, "text_config", config), "max_position_embeddings", None)


def check_generation_options(max_new_tokens: int | None = None, min_pixels: int | None = None,
                             max_pixels: int | None = None, temperature: float | None = None,
                             **positive: int | None) -> None:
    """Command-line numbers that cannot work, said before any model loads: --max_new_tokens and every one of
    `positive` (when given) at least 1, pixel bounds positive and in order, --temperature at least 0 (0: greedy;
    vLLM refused a negative one after loading the model, transformers ran greedy while the report said -1).

    Raises:
        ConfigError: naming the flag.
    """
    if temperature is not None and not 0 <= temperature < float("inf"):
        raise ConfigError(f"--temperature {temperature} must be a finite number, at least 0 (0 is greedy)")
    flags = {"max_new_tokens": max_new_tokens, "min_pixels": min_pixels, "max_pixels": max_pixels, **positive}
    for name, value in flags.items():
        if value is not None and value < 1:
            raise ConfigError(f"--{name} {value} must be at least 1")
    if min_pixels is not None and max_pixels is not None and min_pixels > max_pixels:
        raise ConfigError(f"--min_pixels {min_pixels} is larger than --max_pixels {max_pixels}")
    if max_pixels is not None and max_pixels < PATCH_MULTIPLE ** 2:
        raise ConfigError(f"--max_pixels {max_pixels} is below {PATCH_MULTIPLE}x{PATCH_MULTIPLE} = "
                          f"{PATCH_MULTIPLE ** 2}, the smallest image the model takes (one merged patch); it would "
                          "be ignored")


def check_output_apart_from_inputs(output: str, data: str, model_path: str) -> None:
    """The reports (`report_paths(output)`) must not replace the data file, land in a data directory (read as data
    next time) or in the model's directory (where OUTPUT=MODEL/config would overwrite its config.json), nor replace
    a file that is not an earlier report (OUTPUT=data/train replaced the training set); and their folder must take
    files, which is found out now rather than after the whole evaluation."""
    if not os.path.basename(output):
        raise ConfigError(f"--output {output!r} names a folder; give a file prefix in it, e.g. {output}eval")
    for path in map(os.path.realpath, report_paths(output)):
        if is_within(path, data):
            same = path == os.path.realpath(data)
            raise ConfigError(f"--output {output!r} would write {path}, {'the' if same else 'inside the'} "
                              f"--data {'file' if same else 'directory'}; choose another prefix")
        if os.path.isdir(model_path) and is_within(path, model_path):
            raise ConfigError(f"--output {output!r} would write {path} inside the --model_path directory; choose "
                              "another prefix")
    json_path, md_path = report_paths(output)
    earlier_report = os.path.exists(json_path) and _is_report(json_path)
    for path in (json_path, md_path):
        if os.path.exists(path) and not earlier_report:
            raise ConfigError(f"--output {output!r} would replace {path}, which is not part of an earlier evaluation "
                              "report; choose another prefix")
    check_writable_folder(os.path.dirname(os.path.abspath(json_path)), f"--output {output!r}")


def _is_report(path: str) -> bool:
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(value, dict) and {"model_path", "overall", "records"} <= set(value)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize(rows: list[dict[str, Any]], skipped: int = 0) -> dict[str, Any]:
    """Aggregate per-record scores.

    Args:
        rows: dicts with "correct" (0/1), "format" (0/1), "keyword_recall" (float or None when the
            record has no key words), "response_length" (int).
        skipped: records of this group whose prompt was too long to run; they count as wrong, as a
            benchmark's unanswered questions do, so that skipping cannot raise the accuracy.

    Returns:
        count (records run), skipped, accuracy (over count + skipped), format_rate, keyword_recall (mean
        over records with key words; None if none has any), mean_response_length. Rates are fractions
        in [0, 1].
    """
    recalls = [r["keyword_recall"] for r in rows if r["keyword_recall"] is not None]
    return {
        "count": len(rows),
        "skipped": skipped,
        "accuracy": _mean([r["correct"] for r in rows] + [0] * skipped),
        "format_rate": _mean([r["format"] for r in rows]),
        "keyword_recall": _mean(recalls),
        "mean_response_length": _mean([r["response_length"] for r in rows]),
    }


def score_response(response: str, answer: str, key_words: list[str]) -> dict[str, Any]:
    """The per-record scores `summarize` aggregates (reward terms of `pebr.rewards.terms`)."""
    return {
        "prediction": extract_final_answer(response),
        "correct": accuracy_reward(response, answer),
        "format": format_reward(response),
        "keyword_recall": keyword_recall(response, key_words) if key_words else None,
    }


def evaluate_model(
    model_path: str,
    data: str | list[dict[str, Any]],
    image_dir: str | None = None,
    *,
    output: str | None = None,
    max_new_tokens: int | None = None,
    limit: int | None = None,
    temperature: float = 0.0,
    format_prompt: str | None = DEFAULT_FORMAT_PROMPT,
    backend: str = "vllm",
    max_prompt_length: int = 2048,
    min_pixels: int | None = 576,
    max_pixels: int | None = 802816,
    seed: int = 0,
    category_key: str = "category",
) -> dict[str, Any]:
    """Generate one response per record and score it.

    Args:
        model_path: a Hugging Face Qwen2.5-VL directory.
        data: a PeBR GRPO-format file/directory (see `pebr.data.records.load_records`) or the records.
        image_dir: directory the image paths are relative to.
        output: a path prefix; when given, writes OUTPUT.json and OUTPUT.md (see `write_report`).
        max_new_tokens: response budget; None: the paper's 4096, or what the model's context leaves after
            `max_prompt_length` when that is less (`response_budget`).
        limit: evaluate only the first `limit` records.
        temperature: 0 is greedy (the default, as in the paper's inference).
        format_prompt: jinja template for the question ("" or None: the bare question).
        backend: "vllm" (batched, the default) or "hf".
        max_prompt_length: longer prompts are skipped, counted in "skipped_overlong" and graded wrong.
        min_pixels, max_pixels: image area bounds, by default the stage recipes' (the resolution the model
            was trained at); None: unbounded on that side (the processor then applies its own).
        seed: the engine's seed (matters only with temperature > 0).
        category_key: the record key holding its category; per-category scores when present.

    Returns:
        {"model_path", "data", "settings", "overall": summarize(...), "per_category": {cat: summarize(...)},
        "skipped_overlong", "wall_s", "records": [per-record dicts with qid, category, answer, prediction,
        correct, format, keyword_recall, response_length, response]}.

    Raises:
        DataError: unreadable data or a bad record (naming file, record and key).
        ValueError: bad arguments.
        ConfigError: a model path transformers cannot load, or a max_new_tokens the model's context cannot hold
            after max_prompt_length.
    """
    from pebr.data.dataset import RLDataset
    from pebr.data.records import DataError, load_records

    if max_new_tokens is not None and max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    if limit is not None and limit <= 0:
        raise ValueError(f"limit must be positive, got {limit}")
    if isinstance(data, str):
        records, report = load_records(data)
        origins = report.kept_at
    else:
        records, origins = list(data), None
    if limit:
        records, origins = records[:limit], origins and origins[:limit]
    if not records:
        raise DataError(f"{data if isinstance(data, str) else 'the records given'} holds no records to evaluate")
    processor = load_model_processor(model_path)
    max_new_tokens = response_budget(max_prompt_length, model_context(model_path), max_new_tokens,
                                     prompt_flag="--max_prompt_length")
    dataset = RLDataset(records, processor, image_dir=image_dir, max_prompt_length=max_prompt_length,
                        source=data if isinstance(data, str) else None, origins=origins,
                        format_prompt=format_prompt or None, min_pixels=min_pixels, max_pixels=max_pixels)
    items = [dataset[i] for i in range(len(dataset))]
    start = time.perf_counter()
    engine = make_engine(model_path, processor, backend=backend, max_model_len=max_prompt_length + max_new_tokens,
                         limit_images=max([len(it["images"]) for it in items] + [1]), seed=seed)
    outputs = generate_texts(engine, processor.tokenizer, items, max_new_tokens=max_new_tokens,
                             temperature=temperature, seed=seed)
    wall = time.perf_counter() - start

    rows = []
    for item, (response, length) in zip(items, outputs):
        record = records[item["index"]]
        row = {"qid": item["qid"], "category": record.get(category_key), "answer": item["ground_truth"]}
        row.update(score_response(response, item["ground_truth"], item["key_words"]))
        row.update({"response_length": length, "response": response})
        rows.append(row)
    by_category: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        if row["category"] is not None:
            by_category[str(row["category"])].append(row)
    kept = set(dataset.record_indices)
    skipped_by_category: dict[str, int] = defaultdict(int)
    for index, record in enumerate(records):
        if index not in kept and record.get(category_key) is not None:
            skipped_by_category[str(record[category_key])] += 1
            by_category.setdefault(str(record[category_key]), [])
    result = {
        "model_path": model_path,
        "data": data if isinstance(data, str) else f"<{len(records)} records>",
        "settings": {"max_new_tokens": max_new_tokens, "temperature": temperature, "backend": backend,
                     "format_prompt": format_prompt, "limit": limit, "seed": seed},
        "overall": summarize(rows, len(records) - len(rows)),
        "per_category": {cat: summarize(group, skipped_by_category[cat]) for cat, group in sorted(by_category.items())},
        "skipped_overlong": dataset.num_overlong,
        "wall_s": wall,
        "records": rows,
    }
    if output:
        write_report(result, output)
    return result


def _cell(value: Any, percent: bool) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}" if percent else f"{value:.1f}"


def markdown_table(result: dict[str, Any]) -> str:
    """The overall row and one row per category: count, accuracy %, format %, keyword recall %, length."""
    lines = [
        f"Model: `{result['model_path']}`  Data: `{result['data']}`",
        "",
        "| split | count | accuracy (%) | format rate (%) | keyword recall (%) | mean response length |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    rows = [("all", result["overall"])] + list(result["per_category"].items())
    for name, s in rows:
        lines.append(
            f"| {name} | {s['count']} | {_cell(s['accuracy'], True)} | {_cell(s['format_rate'], True)} | "
            f"{_cell(s['keyword_recall'], True)} | {_cell(s['mean_response_length'], False)} |"
        )
    if result.get("skipped_overlong"):
        lines += ["", f"{result['skipped_overlong']} prompts were longer than the prompt limit: skipped, and counted "
                  "as wrong in the accuracy (count is the records run)."]
    return "\n".join(lines) + "\n"


def report_paths(prefix: str) -> tuple[str, str]:
    """PREFIX.json and PREFIX.md; a prefix ending in ".json" or ".md" has that suffix dropped first."""
    for suffix in (".json", ".md"):
        if prefix.endswith(suffix):
            prefix = prefix[: -len(suffix)]
    return prefix + ".json", prefix + ".md"


def write_report(result: dict[str, Any], prefix: str) -> tuple[str, str]:
    """Write the whole result as JSON and `markdown_table` as markdown to `report_paths(prefix)`; returns both."""
    json_path, md_path = report_paths(prefix)
    os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
    atomic_write_text(json_path, json.dumps(result, indent=2, ensure_ascii=False))
    atomic_write_text(md_path, markdown_table(result))
    return json_path, md_path
