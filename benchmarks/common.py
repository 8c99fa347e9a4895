"""Shared pieces of the benchmarks: the model/data/config every measurement uses, statistics, load, memory.

Every figure in RESULTS.md is built from the same `BenchSetup`, so the compared variants see the same
model, prompts, batch size, n, lengths and learning rate.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


@dataclass
class BenchSetup:
    """The one set of settings every compared variant runs with.

    Attributes:
        size: "tiny" or "small" (scripts/make_tiny_model.py).
        work_dir: where the model and the synthetic data are built (reused between runs).
        batch: prompts per step (data.rollout_batch_size).
        n: responses per prompt.
        max_tokens: response length; the engines generate this many tokens unless EOS comes first.
        lr: actor learning rate.
        seed: sampling seed (fixed so both engines draw the same tokens).
        threads: torch / OpenMP threads given to every measured process.
        global_batch: prompts per optimizer step (worker.actor.global_batch_size); None keeps the CPU
            recipe's value. batch / global_batch optimizer steps are taken per generation, on both sides.
        bf16: bf16 compute everywhere (our FSDP mixed precision and vLLM dtype, the bare engine's dtype,
            TRL's `bf16=True`); fp32 otherwise.
        workers: our trainer's workers (trainer.n_gpus_per_node), each with `threads` threads; TRL's single
            process then gets `threads * workers` threads, so that both use the same cores.
    """

    size: str
    work_dir: str
    batch: int = 4
    n: int = 4
    max_tokens: int = 64
    lr: float = 1e-5
    seed: int = 7
    threads: int = 2
    global_batch: int | None = None
    bf16: bool = False
    workers: int = 1
    extra: list[str] = field(default_factory=list)

    @property
    def dtype(self) -> str:
        return "bf16" if self.bf16 else "fp32"

    @property
    def model_dir(self) -> str:
        return os.path.join(self.work_dir, f"{self.size}_model")

    @property
    def data_dir(self) -> str:
        return os.path.join(self.work_dir, "data")

    def overrides(self) -> list[str]:
        """Config arguments for `pebr.config.load_config` (the CPU recipe with `workers` workers)."""
        return [
            f"config={ROOT}/examples/pebr_stage2.yaml", f"config={ROOT}/examples/pebr_cpu.yaml",
            f"worker.actor.model.model_path={self.model_dir}", f"data.train_files={self.data_dir}/train.json",
            f"data.image_dir={self.data_dir}/images", f"trainer.n_gpus_per_node={self.workers}",
            f"data.rollout_batch_size={self.batch}", f"worker.rollout.n={self.n}",
            f"data.max_response_length={self.max_tokens}", f"worker.actor.optim.lr={self.lr}",
            "trainer.save_freq=-1", "trainer.val_freq=-1", "trainer.logger=[console]",
            f"trainer.save_checkpoint_path={self.work_dir}/ckpt_{self.size}",
            f"worker.actor.fsdp.mixed_precision={self.dtype}", f"worker.rollout.dtype={self.dtype}",
            *([f"worker.actor.global_batch_size={self.global_batch}"] if self.global_batch else []), *self.extra,
        ]

    def sampling(self) -> dict:
        """Sampling parameters of the rollout comparison (the trainer's own, with a fixed seed)."""
        return {"n": self.n, "temperature": 1.0, "top_p": 1.0, "top_k": -1, "max_tokens": self.max_tokens,
                "seed": self.seed}

    def to_json(self) -> str:
        return json.dumps(self.__dict__)

    @staticmethod
    def from_json(text: str) -> BenchSetup:
        return BenchSetup(**json.loads(text))


def prepare(setup: BenchSetup) -> None:
    """Build the embedded model and synthetic data once (skipped when already there)."""
    py = sys.executable
    if not os.path.isfile(os.path.join(setup.model_dir, "config.json")):
        subprocess.run([py, os.path.join(ROOT, "scripts", "make_tiny_model.py"), "--output", setup.model_dir,
                        "--size", setup.size], check=True, capture_output=True)
    if not os.path.isfile(os.path.join(setup.data_dir, "train.json")):
        subprocess.run([py, os.path.join(ROOT, "scripts", "make_synthetic_data.py"), "--output_dir", setup.data_dir,
                        "--num", "40", "--seed", "0"], check=True, capture_output=True)


def load_prompts(setup: BenchSetup, count: int | None = None) -> tuple[Any, list[dict], Any]:
    """(config, the first `count` prompts of the training set with uids, processor)."""
    from pebr.config import load_config
    from pebr.trainer.main import build_dataset
    from pebr.workers.actor import load_processor

    cfg = load_config(setup.overrides())
    processor = load_processor(cfg.worker.actor.model)
    dataset = build_dataset(cfg, cfg.data.train_files, processor)
    items = [dataset[i] for i in range(count if count is not None else setup.batch)]
    for item in items:
        item["uid"] = f"bench-{item['index']}"
    return cfg, items, processor


def forget_prompts(llm: Any) -> None:
    """Drop the engine's cached KV blocks, encoder outputs and processed images. A benchmark repeats the same
    prompts, and warm caches would let an engine skip their whole prefill (image processing and vision encoder
    included), which no training step can: its prompts or weights are new. Every weight load of our engine
    drops the first two; the processed images it keeps (a prompt comes back in the next epoch), so the
    benchmark drops them on both sides before each timed call."""
    llm.reset_prefix_cache()
    llm.llm_engine.reset_encoder_cache()
    llm.reset_mm_cache()


def bare_engine(setup: BenchSetup, **llm_kwargs: Any) -> tuple[Any, Any, list[dict]]:
    """A bare `vllm.LLM` configured as our rollout engine, with its SamplingParams and requests.

    Same model, prompts (with images), dtype, eager or compiled (`enforce_eager`), max_model_len,
    batched-token budget, KV-cache block size, KV cache size and sampling (including the logit bias that
    bans image placeholders, so both engines sample from one distribution, and no detokenizing by vLLM: our
    worker decodes the responses itself, inside its timed rollout). `llm_kwargs` go to `vllm.LLM`
    (e.g. the external launcher).

    Returns:
        (llm, sampling params, requests for `llm.generate`).
    """
    from pebr.workers.rollout import (banned_token_ids, multimodal_engine_options, request_seed,
                                      set_engine_environment)

    cfg, prompts, processor = load_prompts(setup)
    r = cfg.worker.rollout
    set_engine_environment(r.cpu_kv_cache_gb)
    from vllm import LLM, SamplingParams

    max_model_len = cfg.data.max_prompt_length + cfg.data.max_response_length
    llm = LLM(model=cfg.worker.actor.model.model_path, dtype={"bf16": "bfloat16", "fp32": "float32"}[setup.dtype],
              max_model_len=max_model_len, enforce_eager=r.enforce_eager,
              enable_chunked_prefill=r.enable_chunked_prefill,
              max_num_batched_tokens=max(r.max_num_batched_tokens, max_model_len),
              seed=r.seed, disable_log_stats=True, **multimodal_engine_options(r.limit_images, r.mm_cache_gb),
              **({"block_size": r.block_size} if r.block_size is not None else {}), **llm_kwargs)
    s = setup.sampling()
    # One SamplingParams a request, seeded as our engine seeds each prompt of a seeded call.
    params = [SamplingParams(n=s["n"], temperature=s["temperature"], top_p=s["top_p"], top_k=s["top_k"],
                             max_tokens=s["max_tokens"], seed=request_seed(s["seed"], p), detokenize=False,
                             logit_bias={t: -100.0 for t in banned_token_ids(processor.tokenizer)})
              for p in prompts]
    requests = [{"prompt": p["prompt"], "multi_modal_data": {"image": p["images"][0]}} if p.get("images")
                else {"prompt": p["prompt"]} for p in prompts]
    return llm, params, requests


def set_threads(n: int) -> None:
    """Same thread count in every measured process (set before torch is imported where possible)."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)
    import torch

    torch.set_num_threads(n)


def peak_rss_mb(pid: int | None = None) -> float:
    """Peak resident memory (VmHWM) of a process in MiB, from /proc; the current process by default."""
    with open(f"/proc/{pid or os.getpid()}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for pid {pid}")


def load_average() -> float:
    """One-minute load average (what `uptime` shows first)."""
    return os.getloadavg()[0]


def summary(values: list[float]) -> dict[str, float]:
    """Median and spread (min, max) of repeated measurements."""
    if not values:
        raise ValueError("no measurements")
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def fmt(s: dict[str, float], digits: int = 3) -> str:
    """'median (min-max, n=k)' for a table cell."""
    return f"{s['median']:.{digits}g} ({s['min']:.{digits}g}-{s['max']:.{digits}g}, n={s['n']})"


class LineServer:
    """A measured variant in its own process, driven one repetition at a time over stdin/stdout.

    The child prints `READY <json>` once set up and `RESULT <json>` after each `run` line it reads, so
    the parent can interleave repetitions of two variants (A B A B ...) under the same machine load.
    """

    def __init__(self, argv: list[str], log_path: str, env: dict | None = None, timeout: float = 600):
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen([sys.executable, *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True, cwd=ROOT, env={**os.environ, **(env or {})})
        self.log_path = log_path
        self.info = self._read("READY")

    def _read(self, tag: str) -> dict:
        for line in self.proc.stdout:
            if line.startswith(tag + " "):
                return json.loads(line[len(tag) + 1:])
        code = self.proc.wait()
        with open(self.log_path) as f:
            tail = f.read()[-3000:]
        raise RuntimeError(f"{self.log_path}: child exited with {code} before {tag}:\n{tail}")

    def run(self) -> dict:
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        return self._read("RESULT")

    def close(self) -> dict:
        """Ask the child for its final figures (peak memory) and let it exit."""
        try:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
            final = self._read("BYE")
        except (RuntimeError, BrokenPipeError):
            final = {}
        self.proc.wait(timeout=60)
        self.log.close()
        return final


def serve(run_once, final=dict) -> None:
    """The child side of `LineServer`: answer each `run` with one measurement."""
    print("READY {}", flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "run":
            print("RESULT " + json.dumps(run_once()), flush=True)
        elif cmd == "quit":
            break
    print("BYE " + json.dumps({"peak_rss_mb": peak_rss_mb(), **final()}), flush=True)
