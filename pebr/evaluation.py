"""Evaluate a model on PeBR GRPO-format data: accuracy (overall and per category), format rate,
keyword recall and response length, from batched generation (a chunk of questions per engine call, whose graded
answers are saved, so that an interrupted evaluation goes on where it stopped).

Prompts are built exactly as the RL stages build them (`pebr.data.dataset.RLDataset`: the PeBR format
prompt, images resized by the same rule), and generation goes through the rollout engines of
`pebr.workers.rollout` (vLLM by default, transformers `generate` as the fallback), so a model is judged
on the inputs it was trained on. The scores are the reward terms of `pebr.rewards.terms`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections import defaultdict
from typing import Any

from pebr.config import ConfigError, check_model_dir, check_writable_folder
from pebr.data.images import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS, PATCH_MULTIPLE
from pebr.data.prompts import DEFAULT_FORMAT_PROMPT
from pebr.utils.jsonio import append_durably, atomic_write_texts, exclusive_lock, is_within

logger = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TOKENS = 4096  # the paper's inference budget (PeBR responses run long: description, steps, answer)
BACKENDS = ("vllm", "hf")
# Questions per engine call; the answers are saved after each, so an interrupted evaluation goes on from there.
DEFAULT_CHUNK_SIZE = 512


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
    """Build a generation engine for `model_path` (bf16 on a CUDA card that has it, else float32; eager on CPU).

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
    import torch

    from pebr.utils.dtypes import resolve_dtype
    from pebr.workers.rollout import HFRollout, VLLMRollout

    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    cuda = torch.cuda.is_available()
    dtype = resolve_dtype("auto", "cuda" if cuda else "cpu")
    if backend == "hf":
        device = torch.device("cuda" if cuda else "cpu")
        return HFRollout(model_path, processor=processor, device=device, dtype=dtype, trust_remote_code=False)
    return VLLMRollout(  # its engine environment: in-process, KV cache from cpu_kv_cache_gb on CPU
        model_path, dtype="bf16" if dtype == torch.bfloat16 else "fp32", max_model_len=max_model_len, tensor_parallel_size=1,
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
        top_p: nucleus sampling's share of probability kept.

    Returns:
        Per prompt (text, number of response tokens without the end-of-turn token).
    """
    from pebr.workers.rollout import SamplingConfig, stop_token_ids

    sampling = SamplingConfig(n=1, temperature=temperature, top_p=top_p, top_k=0,
                              max_tokens=max_new_tokens, seed=seed)
    end_ids = set(stop_token_ids(tokenizer))
    results = []
    for generation in engine.generate(prompts, sampling):
        ids = list(generation.responses[0])
        while ids and ids[-1] in end_ids:
            ids.pop()
        results.append((tokenizer.decode(ids, skip_special_tokens=True), len(ids)))
    return results


def check_model_path(model_path: str) -> None:
    """`check_model_dir` for a --model_path option (evaluation, inference, the warm-up's base model)."""
    check_model_dir("--model_path", model_path)


def load_model_processor(model_path: str) -> Any:
    """The processor of `model_path` (a directory or a hub id). A hub id that cannot be fetched (no network, no
    such model, HF_HUB_OFFLINE=1 without a cached copy) or a folder whose config or tokenizer transformers cannot
    read is the user's input, said as such, not a traceback.

    Raises:
        ConfigError: naming --model_path and transformers' reason, or a model outside the supported families
            (`pebr.workers.actor.SUPPORTED_MODEL_TYPES`).
    """
    from transformers import AutoConfig, AutoProcessor

    from pebr.workers.actor import check_model_family

    try:
        check_model_family(AutoConfig.from_pretrained(model_path), model_path)
        return AutoProcessor.from_pretrained(model_path)
    except ConfigError:
        raise  # (a ValueError too) the family refusal, said already
    except (OSError, ValueError) as err:  # ValueError: an unknown model_type, a tokenizer without its files
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
                             top_p: float | None = None, **positive: int | None) -> None:
    """Command-line numbers that cannot work, said before any model loads: --max_new_tokens and every one of
    `positive` (when given) at least 1, pixel bounds positive and in order, --top_p in (0, 1], --temperature at
    least 0 (0: greedy;
    vLLM refused a negative one after loading the model, transformers ran greedy while the report said -1).

    Raises:
        ConfigError: naming the flag.
    """
    if temperature is not None and not 0 <= temperature < float("inf"):
        raise ConfigError(f"--temperature {temperature} must be a finite number, at least 0 (0 is greedy)")
    if top_p is not None and not 0 < top_p <= 1:
        raise ConfigError(f"--top_p {top_p} must be in (0, 1] (1 keeps every token)")
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
    progress = progress_path(output)
    for path in map(os.path.realpath, (*report_paths(output), progress, f"{progress}.lock")):
        if is_within(path, data):
            same = path == os.path.realpath(data)
            raise ConfigError(f"--output {output!r} would write {path}, {'the' if same else 'inside the'} "
                              f"--data {'file' if same else 'directory'}; choose another prefix")
        if os.path.isdir(model_path) and is_within(path, model_path):
            raise ConfigError(f"--output {output!r} would write {path} inside the --model_path directory; choose "
                              "another prefix")
    if os.path.exists(progress) and not _is_progress_file(progress):
        raise ConfigError(f"--output {output!r} would resume from (and then delete) {progress}, which is not an "
                          "evaluation's progress file; move it away, or choose another prefix")
    json_path, md_path = report_paths(output)
    earlier_report = os.path.exists(json_path) and _is_report(json_path)
    for path in (json_path, md_path):
        if os.path.exists(path) and not earlier_report:
            raise ConfigError(f"--output {output!r} would replace {path}, which is not part of an earlier evaluation "
                              "report; choose another prefix")
    check_writable_folder(os.path.dirname(os.path.abspath(json_path)), f"--output {output!r}")


def _is_progress_file(path: str) -> bool:
    """Whether `path` begins as `_append_progress` begins a file (a header cut short included)."""
    with open(path, "rb") as f:
        return f.read(len(_PROGRESS_HEAD)) == _PROGRESS_HEAD


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
    from pebr.rewards.terms import accuracy_reward, extract_final_answer, format_reward, keyword_recall

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
    top_p: float = 1.0,
    format_prompt: str | None = DEFAULT_FORMAT_PROMPT,
    backend: str = "vllm",
    max_prompt_length: int = 2048,
    min_pixels: int | None = DEFAULT_MIN_PIXELS,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    seed: int = 0,
    category_key: str = "category",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    resume: bool = True,
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
        top_p: nucleus sampling's share of probability kept (1: all; matters only with temperature > 0).
        format_prompt: jinja template for the question ("" or None: the bare question).
        backend: "vllm" (batched, the default) or "hf".
        max_prompt_length: longer prompts are skipped, counted in "skipped_overlong" and graded wrong.
        min_pixels, max_pixels: image area bounds, by default the stage recipes' (the resolution the model
            was trained at); None: unbounded on that side (the processor then applies its own).
        seed: the engine's seed (matters only with temperature > 0).
        category_key: the record key holding its category; per-category scores when present.
        chunk_size: questions per engine call. With `output`, each call's graded answers are appended to
            `progress_path(output)`, and a rerun with the same model files and settings answers only the
            questions missing there (its `wall_s` is its own); the file is removed once the reports are written.
        resume: False starts again, deleting an earlier run's progress file.

    Returns:
        {"model_path", "data", "settings", "overall": summarize(...), "per_category": {cat: summarize(...)},
        "skipped_overlong", "wall_s", "records": [per-record dicts with qid, category, answer, prediction,
        correct, format, keyword_recall, response_length, response]}.

    Raises:
        DataError: unreadable data or a bad record (naming file, record and key).
        ValueError: bad arguments.
        ConfigError: a model path transformers cannot load, a max_new_tokens the model's context cannot hold
            after max_prompt_length, or a progress file of another evaluation (other model files or settings).
    """
    from pebr.data.dataset import RLDataset
    from pebr.data.records import DataError, load_records, question_digest

    if max_new_tokens is not None and max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    if limit is not None and limit <= 0:
        raise ValueError(f"limit must be positive, got {limit}")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if isinstance(data, str):
        records, report = load_records(data)
        origins = report.kept_at
    else:
        records, origins = list(data), None
    if limit:
        records, origins = records[:limit], origins and origins[:limit]
    if not records:
        raise DataError(f"{data if isinstance(data, str) else 'the records given'} holds no records to evaluate")
    categories = [_category(record, category_key, i) for i, record in enumerate(records)]  # (refused before work)
    processor = load_model_processor(model_path)
    max_new_tokens = response_budget(max_prompt_length, model_context(model_path), max_new_tokens,
                                     prompt_flag="--max_prompt_length")
    dataset = RLDataset(records, processor, image_dir=image_dir, max_prompt_length=max_prompt_length,
                        source=data if isinstance(data, str) else None, origins=origins,
                        format_prompt=format_prompt or None, min_pixels=min_pixels, max_pixels=max_pixels)
    settings = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "backend": backend,
                "format_prompt": format_prompt, "limit": limit, "seed": seed, "max_prompt_length": max_prompt_length,
                "min_pixels": min_pixels, "max_pixels": max_pixels}
    keys = [f"{record['qid']}/" + question_digest(record, prompt_key=dataset.prompt_key, answer_key=dataset.answer_key,
                                                  image_key=dataset.image_key)
            for record in map(dataset.record, range(len(dataset)))]
    # (--limit changes which questions are asked, not their answers: a longer run may go on from a shorter one.)
    identity = _run_identity(model_path, image_dir, dict(settings, limit=None))
    # The report says everything its numbers depend on but the model files' times (the progress file's identity).
    settings = dict({k: v for k, v in identity.items() if k not in ("model", "model_files")}, limit=limit)
    answer = dict(model_path=model_path, processor=processor, backend=backend, max_prompt_length=max_prompt_length,
                  max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                  chunk_size=chunk_size, identity=identity)
    if not output:
        answers, wall = _answer(dataset, keys, progress=None, **answer)
        return _report(model_path, data, records, dataset, answers, categories, settings, wall)
    progress = progress_path(output)
    with exclusive_lock(f"{progress}.lock", lambda holder: ConfigError(
            f"{progress} is being written by another evaluation ({holder}): wait for it to end, or choose another "
            "--output")):
        if not resume and os.path.exists(progress):
            os.remove(progress)  # (an evaluation's: check_output_apart_from_inputs saw to it)
        answers, wall = _answer(dataset, keys, progress=progress, **answer)
        result = _report(model_path, data, records, dataset, answers, categories, settings, wall)
        write_report(result, output)
        with contextlib.suppress(FileNotFoundError):  # (none when every prompt was over the limit)
            os.remove(progress)
    with contextlib.suppress(FileNotFoundError):
        os.remove(f"{progress}.lock")
    return result


def _answer(dataset: Any, keys: list[str], *, model_path: str, processor: Any, backend: str,
            max_prompt_length: int, max_new_tokens: int, temperature: float, top_p: float, seed: int,
            chunk_size: int,
            progress: str | None, identity: dict[str, Any]) -> tuple[list[dict[str, Any]], float]:
    """The answer ({"response", "response_length"}) to every item of `dataset` (in order), generating only those
    not saved in `progress`, a chunk of questions per engine call, each chunk saved there; and this run's seconds
    of generation. Answers are saved ungraded: the report grades them against the records as they are then."""
    saved = _load_progress(progress, identity) if progress else {}
    todo = [i for i, key in enumerate(keys) if key not in saved]
    if saved:
        print(f"{progress}: {len(keys) - len(todo)} of {len(keys)} questions already answered; {len(todo)} to go",
              flush=True)
    start = time.perf_counter()
    if todo:
        engine = make_engine(model_path, processor, backend=backend, max_model_len=max_prompt_length + max_new_tokens,
                             limit_images=max([len(dataset.record(i)[dataset.image_key]) for i in todo] + [1]),
                             seed=seed)
    for first in range(0, len(todo), chunk_size):
        chunk = todo[first:first + chunk_size]
        items = [dataset[i] for i in chunk]  # (images loaded a chunk at a time)
        outputs = generate_texts(engine, processor.tokenizer, items, max_new_tokens=max_new_tokens,
                                 temperature=temperature, top_p=top_p, seed=seed)
        answered = {keys[i]: {"response": response, "response_length": length}
                    for i, (response, length) in zip(chunk, outputs)}
        if progress:
            _append_progress(progress, identity, answered)
        saved.update(answered)
    return [saved[key] for key in keys], time.perf_counter() - start


def _report(model_path: str, data: Any, records: list[dict], dataset: Any, answers: list[dict],
            categories: list[str | None], settings: dict, wall: float) -> dict[str, Any]:
    """The result of `evaluate_model` from the answers to the kept records (in their order), graded now; each
    record's category (`_category`) in `categories`."""
    rows = []
    for i, saved in enumerate(answers):
        record, index = dataset.record(i), dataset.record_indices[i]
        row = {"qid": record["qid"], "category": categories[index], "answer": record[dataset.answer_key]}
        row.update(score_response(saved["response"], record[dataset.answer_key], list(record["key_words"])))
        row.update({"response_length": saved["response_length"], "response": saved["response"]})
        rows.append(row)
    # With categories, each record is in one: those without in "(none)", so that the rows add up to "all".
    if any(c is not None for c in categories):
        categories = [NO_CATEGORY if c is None else c for c in categories]
    by_category: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row, index in zip(rows, dataset.record_indices):
        if categories[index] is not None:
            by_category[categories[index]].append(row)
    kept = set(dataset.record_indices)
    skipped_by_category: dict[str, int] = defaultdict(int)
    for index, category in enumerate(categories):
        if index not in kept and category is not None:
            skipped_by_category[category] += 1
            by_category.setdefault(category, [])
    return {
        "model_path": model_path,
        "data": data if isinstance(data, str) else f"<{len(records)} records>",
        "settings": settings,
        "overall": summarize(rows, len(records) - len(rows)),
        "per_category": {cat: summarize(group, skipped_by_category[cat]) for cat, group in sorted(by_category.items())},
        "skipped_overlong": dataset.num_overlong,
        "wall_s": wall,
        "records": rows,
    }


NO_CATEGORY = "(none)"  # the category row of records without one, when others have one


def _category(record: dict[str, Any], key: str, position: int) -> str | None:
    """A record's category as a string (None without one).

    Raises:
        DataError: a category that is not a string or an integer (a list read as "['x']" made a row of its own).
    """
    from pebr.data.records import DataError

    value = record.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DataError(f"record {position} qid={record.get('qid')!r}: key {key!r} must be a string or an integer, "
                        f"got {type(value).__name__}")
    return str(value)


def progress_path(prefix: str) -> str:
    """PREFIX.partial.jsonl: the graded answers of an evaluation still running (or interrupted)."""
    return report_paths(prefix)[0][: -len(".json")] + ".partial.jsonl"


def _run_identity(model_path: str, image_dir: str | None, settings: dict[str, Any]) -> dict[str, Any]:
    """What saved answers depend on besides their questions: the model (its files' sizes and times, the tokenizer,
    processor and chat template with the weights: a model retrained into the same folder is another, and so is one
    whose chat template was edited), the images' folder and the generation settings."""
    files = {}
    if os.path.isdir(model_path):
        for name in sorted(os.listdir(model_path)):
            if os.path.isfile(os.path.join(model_path, name)):
                stat = os.stat(os.path.join(model_path, name))
                files[name] = [stat.st_size, stat.st_mtime_ns]
    template = settings.get("format_prompt")
    if template and os.path.isfile(template):
        with open(template, "rb") as f:
            settings = dict(settings, format_prompt_sha256=hashlib.sha256(f.read()).hexdigest()[:16])
    return {"model": os.path.realpath(model_path) if os.path.isdir(model_path) else model_path,
            "model_files": files, "image_dir": os.path.realpath(image_dir) if image_dir else None, **settings}


def _load_progress(path: str, identity: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The graded answers saved in `path` by an evaluation with this `identity`, by "qid/question digest"; a line
    cut by a crash is dropped.

    Raises:
        ConfigError: the file is not an evaluation's progress file, or one of another model or settings.
    """
    if not os.path.exists(path):
        return {}
    with open(path, "rb") as f:
        text = f.read()
    # Looked at before anything is cut or removed: a file that is not one's is left as it is.
    if not text.startswith(_PROGRESS_HEAD):
        raise ConfigError(f"{path} is not an evaluation's progress file (its first line is not one's header): move "
                          "it away, or choose another --output")
    if not text.endswith(b"\n"):  # a write cut short: its part goes, or the next append would join it
        os.truncate(path, text.rfind(b"\n") + 1)
    lines = text.split(b"\n")[:-1]
    if not lines:  # (the header itself was cut: nothing was saved)
        os.remove(path)
        return {}
    try:
        header = json.loads(lines[0])
    except ValueError:
        header = None
    if not isinstance(header, dict) or "evaluation" not in header:
        raise ConfigError(f"{path} is not an evaluation's progress file (its first line is not one's header): move "
                          "it away, or choose another --output")
    saved_identity = {"top_p": 1.0, **header["evaluation"]}  # (saved before --top_p existed: sampling kept all)
    if saved_identity != identity:
        changed = sorted(key for key in set(identity) | set(saved_identity)
                         if identity.get(key) != saved_identity.get(key))
        raise ConfigError(f"{path} holds the answers of an evaluation with another {', '.join(changed)}: rerun it "
                          "as it was to continue it, or pass --no-resume to start again")
    saved = {}
    for number, line in enumerate(lines[1:], start=2):
        try:
            entry = json.loads(line)
            saved[entry["key"]] = {k: entry["row"][k] for k in ("response", "response_length")}
        except (ValueError, KeyError, TypeError):
            raise ConfigError(f"{path} line {number} is not a saved answer: move the file away, or pass "
                              "--no-resume to start again") from None
    return saved


_PROGRESS_HEAD = b'{"evaluation": '  # how a progress file starts (json.dumps of its header)


def _append_progress(path: str, identity: dict[str, Any], answered: dict[str, dict[str, Any]]) -> None:
    """Append graded answers (after a header line, for a new file), flushed to disk: a crash loses at most the
    answers of the engine call in flight."""
    lines = [json.dumps({"evaluation": identity}, ensure_ascii=False)] if not os.path.exists(path) else []
    lines += [json.dumps({"key": key, "row": row}, ensure_ascii=False) for key, row in answered.items()]
    append_durably(path, ("\n".join(lines) + "\n").encode("utf-8"))


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
        name = name.replace("|", "\\|")  # a bar in a category's name would split its row into more columns
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
    atomic_write_texts({json_path: json.dumps(result, indent=2, ensure_ascii=False), md_path: markdown_table(result)})
    return json_path, md_path
