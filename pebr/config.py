"""Typed configuration: dataclasses with the key names of the EasyR1-style YAML recipes.

A run's configuration is `config=FILE.yaml` merged with dotted command-line overrides
(`worker.rollout.n=8`), applied in their order: the later word wins, and a mapping setting given whole (in a later
file, or as key={...}) replaces the earlier mapping. Everything is checked here, once, before any worker starts:
unknown keys, wrong types, batch sizes that do not divide and settings that cannot work name the key at fault.
"""

from __future__ import annotations

import functools
import math
import os
import re
import tempfile
import types
from dataclasses import asdict, dataclass, field, fields, is_dataclass
import importlib.util
import typing
from typing import Any, List, Optional

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pebr.cli import UserError
from pebr.data.images import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS


class ConfigError(UserError, ValueError):
    """A configuration value that cannot work; the message names the key."""

    label = "configuration error"


@dataclass
class DataConfig:
    train_files: str = ""
    val_files: str = ""
    prompt_key: str = "problem"
    answer_key: str = "answer"
    image_key: str = "images"
    image_dir: Optional[str] = None
    max_prompt_length: int = 2048
    max_response_length: int = 2048
    rollout_batch_size: int = 512
    val_batch_size: int = -1  # validation prompts per generate call, split over the workers (-1: all at once)
    format_prompt: Optional[str] = None
    shuffle: bool = True
    seed: int = 1
    min_pixels: Optional[int] = DEFAULT_MIN_PIXELS
    max_pixels: Optional[int] = DEFAULT_MAX_PIXELS
    filter_overlong_prompts: bool = True
    on_bad_record: str = "raise"  # raise | skip


@dataclass
class AlgorithmConfig:
    adv_estimator: str = "grpo"  # grpo | rloo | reinforce_plus_plus (remax: refused, no greedy baseline rollout)
    gamma: float = 1.0
    disable_kl: bool = False
    use_kl_loss: bool = True
    kl_penalty: str = "low_var_kl"  # kl | abs | mse | low_var_kl, or k1 | k2 | k3 (kl, mse, low_var_kl)
    kl_coef: float = 1.0e-2
    online_filtering: bool = False
    filter_key: str = "overall"
    filter_low: float = 0.01
    filter_high: float = 0.99
    # Where the PPO ratio's old log-probs come from. actor: the actor's own forward over the step's samples
    # before the update (skipped for the first mini-batch, whose update supplies them). rollout: the log-probs
    # the vLLM engine computed for the tokens it sampled; the engine holds the actor's weights at sampling
    # time, so this skips that forward entirely, at the price of the engine/actor numeric gap entering the
    # ratio (CPU fp32: 2e-8 on average at step 1, tests/trainer/test_grpo_e2e.py; larger in bf16 on GPUs).
    # Needs the vLLM rollout sampling at temperature 1 from the full distribution (validate says why). Off in
    # every recipe: on CPU at size small the engine's log-prob gathering cost more generation time (0.10-0.23 s)
    # than the skipped pass saved (0.12 s), whole step 2.40-2.60 vs 2.30-2.44 s (benchmarks/RESULTS.md, tenth
    # round). It saves more where the old pass covers more samples (several mini-batches per rollout).
    old_logprobs: str = "actor"  # actor | rollout

    @property
    def old_from_rollout(self) -> bool:
        """The PPO ratio's old log-probs are the rollout engine's (no old log-prob pass)."""
        return self.old_logprobs == "rollout"

    @property
    def kl_in_loss(self) -> bool:
        """KL to the reference as a term of the actor loss."""
        return self.use_kl_loss and not self.disable_kl

    @property
    def kl_in_reward(self) -> bool:
        """KL to the reference subtracted from the token rewards (needs the old log-probs before the update)."""
        return not self.use_kl_loss and not self.disable_kl


@dataclass
class ModelConfig:
    model_path: Optional[str] = None
    tokenizer_path: Optional[str] = None
    trust_remote_code: bool = False
    freeze_vision_tower: bool = False
    enable_gradient_checkpointing: bool = True
    # LoRA (pebr/workers/lora.py): rank 0 trains every weight; rank > 0 trains only adapters of rank lora_rank
    # on these linears of the text decoder (scaled by lora_alpha / lora_rank), everything else frozen. The
    # reference is then the actor with its adapters off (no second model), and the engine and merged
    # checkpoints get the folded weights W + scale * B @ A.
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_target_modules: List[str] = field(default_factory=lambda: ["all-linear"])  # or some of q_proj ... down_proj


@dataclass
class OptimConfig:
    lr: float = 1.0e-6
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 1.0e-2
    strategy: str = "adamw"
    lr_warmup_ratio: float = 0.0  # of the run's steps; or lr_warmup_steps, not both
    lr_warmup_steps: Optional[int] = None
    warmup_style: str = "constant"  # constant | cosine
    min_lr_ratio: float = 0.0


@dataclass
class FSDPConfig:
    # True: each unit's gathered parameters are freed after its forward and gathered again for the backward
    # (ZeRO-3). False keeps them from forward to backward (ZeRO-2: one all-gather less per update, the full
    # parameters of a unit held meanwhile); the CPU recipe sets it, its ranks' gloo gathers being slow.
    enable_full_shard: bool = True
    # FSDP2's CPU offload: parameters, gradients and optimizer state live on the CPU (CUDA only).
    enable_cpu_offload: bool = False
    enable_rank0_init: bool = False  # not implemented: every rank loads the weights (refused when true)
    # Mixed precision of the sharded compute; master weights and optimizer state stay fp32.
    mixed_precision: str = "auto"  # auto (bf16 on a CUDA card with native bf16, else fp32) | bf16 | fp32


@dataclass
class OffloadConfig:
    # EasyR1's offloading between phases is not implemented (refused when true); use fsdp.enable_cpu_offload.
    offload_params: bool = False
    offload_optimizer: bool = False


@dataclass
class ActorConfig:
    global_batch_size: int = 256
    micro_batch_size_per_device_for_update: int = 4
    micro_batch_size_per_device_for_experience: int = 16
    max_grad_norm: float = 1.0
    # The PPO ratio is clipped to [1 - clip_ratio_low, 1 + clip_ratio_high] (clip-higher, DAPO); a negative-advantage
    # token's loss is bounded at clip_ratio_dual times its advantage (dual clip).
    clip_ratio_low: float = 0.2
    clip_ratio_high: float = 0.3
    clip_ratio_dual: float = 3.0
    loss_avg_mode: str = "token"  # token: mean over the mini-batch's tokens | seq: mean of each response's mean
    ppo_epochs: int = 1  # passes over each step's samples, each pass one optimizer step per mini-batch
    # Pack each micro-batch's sequences end to end in one row (no pad tokens computed); the model then runs
    # the variable-length attention of pebr/workers/attention.py (flash varlen on CUDA). Every recipe turns
    # it on; alone it measured about as fast as padding on CPU, with share_prompts about twice as fast
    # (benchmarks/RESULTS.md).
    padding_free: bool = False
    # With padding_free: lay out a prompt shared by several responses (the n of a GRPO group) once per packed
    # row, its responses attending to it, instead of once per response; exact (same log-probs and gradients).
    # The prompt, image tokens included, is often most of a sequence. Measured on CPU only: the attention of
    # such rows runs PyTorch's SDPA per sequence on every device (no flash varlen form yet), so the GPU
    # recipes leave it off.
    share_prompts: bool = False
    # Cut micro-batches by token count (max_token_len_per_gpu) instead of by micro_batch_size_per_device_*:
    # tokens are count x longest when padded (similar lengths grouped), the sum of lengths when padding_free
    # (a prompt's responses kept together, so its image is encoded once). A single longer sequence gets a
    # micro-batch of its own. Same gradient as fixed-size micro-batches.
    dynamic_batching: bool = False
    max_token_len_per_gpu: int = 16384
    # torch.compile each text decoder layer (actor and reference): fused elementwise kernels where the update
    # is bound by kernel launches rather than by matmuls (GPUs, benchmarks/gpu_update.py). The first steps
    # pay the compilation (about a minute); off by default. On CPU it did not pay: forward + backward 0.358 vs
    # 0.363 s eager at size small (benchmarks/RESULTS.md, ninth round).
    use_torch_compile: bool = False
    ulysses_sequence_parallel_size: int = 1
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)
    offload: OffloadConfig = field(default_factory=OffloadConfig)


@dataclass
class RefConfig:
    fsdp: FSDPConfig = field(default_factory=lambda: FSDPConfig(enable_cpu_offload=True))
    offload: OffloadConfig = field(default_factory=OffloadConfig)


@dataclass
class RolloutConfig:
    name: str = "vllm"  # vllm | hf
    n: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    # The first engine's sampling seed, the next ones' seed + 1, ... (one engine per tensor-parallel group); a
    # training rollout draws from it mixed with its step and try.
    seed: int = 1
    limit_images: int = 1
    dtype: str = "auto"  # auto (bf16 on a CUDA card with native bf16, else fp32) | bf16 | fp32
    gpu_memory_utilization: float = 0.6
    # vLLM on CPU sizes its KV cache from this (GiB) instead of gpu_memory_utilization.
    cpu_kv_cache_gb: float = 1.0
    # Host memory (GiB) each engine keeps processed images in, to skip preprocessing an image seen before. A
    # prompt comes back only in the next epoch or validation, so this pays little; vLLM's default of 4 GiB an
    # engine grew every worker by up to 4 GiB over a run (0 turns the cache off).
    mm_cache_gb: float = 1.0
    enforce_eager: bool = False
    enable_chunked_prefill: bool = False
    tensor_parallel_size: int = 1
    # Tokens one engine step takes in; without chunked prefill vLLM needs a whole prompt and response in one
    # step, so it is raised to data.max_prompt_length + data.max_response_length there.
    max_num_batched_tokens: int = 8192
    # Tokens per KV-cache block; None leaves vLLM's choice (16 on CUDA, 128 on CPU). The n responses of a prompt
    # are n requests, and each recomputes the prompt's tokens past its last full block: a smaller block
    # recomputes fewer (the CPU recipe sets 32, the smallest vLLM's CPU attention takes).
    block_size: int | None = None
    # Validation samples one response a question at temperature 0.5 (with the training's top_p, top_k, seed and
    # max_tokens); keys here (n, temperature, top_p, top_k, max_tokens, seed) replace those.
    val_override_config: dict = field(default_factory=dict)


@dataclass
class RewardConfig:
    reward_type: str = "batch"  # batch | sequential
    reward_function: Optional[str] = None
    reward_function_kwargs: dict = field(default_factory=dict)
    # CPUs a Ray cluster this run starts itself sets aside for the reward actor. The actor reserves none, so on
    # a cluster of exactly the workers' CPUs (the multi-node test's raylets) it still finds a place.
    num_cpus: float = 1
    # Whole GPUs of the reward actor's own, for a reward model that runs on a card
    # (examples/reward_function/reward_model.py): the cluster needs them beside the training workers' cards. Ray
    # then shows the actor only those (CUDA_VISIBLE_DEVICES). 0: the actor sees no GPU.
    num_gpus: int = 0


@dataclass
class WorkerConfig:
    hybrid_engine: bool = True
    actor: ActorConfig = field(default_factory=ActorConfig)
    ref: RefConfig = field(default_factory=RefConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)


@dataclass
class TrainerConfig:
    total_epochs: int = 1
    # The run's length when set, whatever total_epochs says (the data order goes on into further epochs); EasyR1
    # and verl stop at whichever of the two comes first. The run says which it took.
    max_steps: Optional[int] = None
    project_name: str = "easy_r1"
    experiment_name: str = "demo"
    logger: List[str] = field(default_factory=lambda: ["console", "file"])
    nnodes: int = 1
    n_gpus_per_node: int = 8
    device: str = "auto"  # auto (GPUs when the Ray cluster has any, else CPU) | cuda | cpu
    max_try_make_batch: int = 20  # online filtering's generations per step at most; <= 0: no limit
    val_freq: int = -1  # k > 0: every k steps and at the end; -1: at the end (and before, see below); 0: never
    val_before_train: bool = True
    val_only: bool = False
    val_generations_to_log: int = 0
    save_freq: int = -1
    save_limit: int = -1
    save_model_only: bool = False
    save_checkpoint_path: Optional[str] = None
    load_checkpoint_path: Optional[str] = None
    find_last_checkpoint: bool = True
    ray_address: Optional[str] = None
    # Sampling runs (pebr.trainer.sample_main) write their rollouts here, one JSON record per line.
    sample_output: str = "_rollout_outputs/rollouts.jsonl"
    # Write each step's responses and rewards, with each question's qid, index and ground truth (not its prompt
    # text), to {run dir}/rollouts/step_{k}.jsonl.
    save_rollouts: bool = False
    worker_timeout_s: float = 3600.0
    # Steps (1-based) to record under torch.profiler on every FSDP worker: a Chrome trace and an operator table
    # per rank in {profile_dir}/step_{k}/ (pebr.utils.profiling). profile_dir defaults to {run dir}/profile.
    profile_steps: List[int] = field(default_factory=list)
    profile_dir: Optional[str] = None


@dataclass
class PPOConfig:
    data: DataConfig = field(default_factory=DataConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)

    @property
    def world_size(self) -> int:
        return self.trainer.nnodes * self.trainer.n_gpus_per_node

    @property
    def checkpoint_dir(self) -> str:
        if self.trainer.save_checkpoint_path:
            return self.trainer.save_checkpoint_path
        return os.path.join("checkpoints", self.trainer.project_name, self.trainer.experiment_name)

    def to_dict(self) -> dict:
        return asdict(self)


# The sampling settings validation may override (pebr.workers.rollout.SamplingConfig's fields).
VAL_SAMPLING_KEYS = ("n", "temperature", "top_p", "top_k", "max_tokens", "seed")  # (validation reads no log-probs)
LOGGERS = ("console", "file", "wandb", "tensorboard")  # trainer.logger's back-ends


def _choice(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not one of {list(allowed)}")


def _positive(key: str, value: int) -> None:
    if value <= 0:
        raise ConfigError(f"{key} must be positive, got {value}")


# numpy's seeds, which vLLM and transformers' set_seed pass their seed to: another one failed there, naming nothing.
MAX_SEED = 2**32 - 1


def split_reward_spec(spec: str) -> tuple[str, str | None]:
    """`path/to/file.py:function` -> (path, function); a spec with no `:function` after a `.py` path is all path
    (function None): a ":" may stand inside a folder's name."""
    path, sep, function = spec.rpartition(":")
    if not sep or not path.endswith(".py"):
        return spec, None
    return path, function


def check_seed(key: str, value: int) -> None:
    """Raises ConfigError naming `key` when `value` is outside [0, MAX_SEED]."""
    if not 0 <= value <= MAX_SEED:
        raise ConfigError(f"{key}={value} must be in [0, 2**32 - 1] (numpy's seeds)")


def seed_argument(text: str, engines: int = 1) -> int:
    """An argparse type for a --seed option: an integer in [0, MAX_SEED]; with `engines` rollout engines that each
    take the seed plus their rank (`functools.partial(seed_argument, engines=2)`), in [0, MAX_SEED - engines + 1]."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= MAX_SEED - (engines - 1):
        why = f"; each of the {engines} rollout engines takes it plus its index" if engines > 1 else ""
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer in [0, 2**32 - {engines}] (numpy's seeds{why})")
    return value


def check_writable_folder(folder: str, what: str) -> None:
    """Create `folder` if need be and check that it takes a file, now rather than when the first output is written
    (after hours of training or sampling, say).

    Raises:
        ConfigError: naming `what` (the setting or option), the folder and the reason.
    """
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ConfigError(f"{what}: {folder} is a file, not a directory")
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder) as probe:  # a byte written: an empty file takes no room
            probe.write(b"\0")
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as err:
        raise ConfigError(f"{what}: cannot write into {folder}: {err}") from err


def looks_local(path: str) -> bool:
    """A path that cannot be a hub id ("org/name", "name@split"), so that its absence is certainly an error."""
    return path.startswith(("/", "./", "../", "~"))


def looks_like_model_id(path: str) -> bool:
    """A path shaped like a hub model id ("org/name"), which the hub or its local cache may resolve."""
    return not looks_local(path) and path.count("/") == 1


def _check_val_sampling(overrides: dict) -> None:
    """worker.rollout.val_override_config: known keys, each of a type and range vLLM accepts (vLLM itself
    says so only at the first validation, which may come many steps in)."""
    unknown = sorted(set(overrides) - set(VAL_SAMPLING_KEYS))
    if unknown:
        raise ConfigError(f"worker.rollout.val_override_config has unknown keys {unknown}; it takes "
                          f"{list(VAL_SAMPLING_KEYS)}")
    checks = {"n": (int, lambda v: v >= 1, ">= 1"), "max_tokens": (int, lambda v: v >= 1, ">= 1"),
              "temperature": ((int, float), lambda v: v >= 0, ">= 0"),
              "top_p": ((int, float), lambda v: 0 < v <= 1, "in (0, 1]"),
              "top_k": (int, lambda v: v >= -1, "-1 or 0 (off) or >= 1"),
              "seed": ((int, type(None)), lambda v: True, "an integer or null")}  # (mixed into a request's seed)
    for key, value in overrides.items():
        kind, ok, wanted = checks[key]
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"worker.rollout.val_override_config.{key}={value!r} must be a finite number")
        if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kind) or not ok(value):
            raise ConfigError(f"worker.rollout.val_override_config.{key}={value!r} must be {wanted}")


def _cannot_be_hub_id(path: str) -> bool:
    """A path that is no folder here and no hub id either ("org/name"): a mistyped directory. A bare name is one
    too (hub models are named with their organisation), and so is "runs/x" where "runs" is a folder here."""
    return not looks_like_model_id(path) or os.path.isdir(path.split("/")[0])


def _check_model_folder(key: str, value: str, files: tuple[str, ...], what: str) -> None:
    """A local folder must hold one of `files`; a path that cannot be a hub id must be a folder."""
    folder = os.path.expanduser(value)
    if os.path.isdir(folder) and not any(os.path.isfile(os.path.join(folder, name)) for name in files):
        raise ConfigError(f"{key}={value!r} holds no {' or '.join(files)}: {what}")
    if not os.path.isdir(folder) and _cannot_be_hub_id(folder):
        raise ConfigError(f"{key}={value!r}: no such directory")


def has_model_weights(folder: str) -> bool:
    """Whether a model folder holds weight files (*.safetensors or *.bin)."""
    return any(name.endswith((".safetensors", ".bin")) for name in os.listdir(folder))


def check_model_dir(key: str, value: str, weights: bool = True) -> None:
    """A model folder must hold a whole Hugging Face model: not a sharded trainer checkpoint, not a peft adapter
    alone, a config.json and (unless `weights` is False) weights; a path that cannot be a hub id must be a folder.
    Said here, naming `key` (a setting or an option), before transformers raises on it inside a worker.

    Raises:
        ConfigError: naming `key` and, for a trainer checkpoint or its unmerged huggingface/ folder, the merger;
            for a peft adapter, its base model.
    """
    label = f"{key} {value!r}" if key.startswith("-") else f"{key}={value!r}"
    folder = os.path.expanduser(value)
    if os.path.isdir(folder):
        names = os.listdir(folder)
        has_weights = has_model_weights(folder)
        if "shard_index.json" in names or any(name.startswith("model_world_size_") for name in names):
            raise ConfigError(f"{label} is a sharded trainer checkpoint; merge it into a Hugging Face model first: "
                              f"scripts/model_merger.py --local_dir {value}")
        if "trainer_state.json" in names and "actor" in names:
            raise ConfigError(f"{label} is a trainer checkpoint (global_step_*); merge its actor into a Hugging "
                              f"Face model first: scripts/model_merger.py --local_dir {os.path.join(value, 'actor')}")
        if "adapter_config.json" in names and "config.json" not in names:
            raise ConfigError(f"{label} is a peft adapter (adapter_config.json), not a model: load it onto its base "
                              "model (PeftModel.from_pretrained(base_model, that folder)), or name a merged model "
                              "(scripts/model_merger.py without --adapter_dir writes one)")
        if "config.json" not in names:
            raise ConfigError(f"{label} holds weights but no config.json: not a Hugging Face model folder; name the "
                              "folder a model was saved to (save_pretrained or scripts/model_merger.py)" if has_weights
                              else f"{label} holds no config.json: not a Hugging Face model directory")
        if weights and not has_weights:
            raise ConfigError(f"{label} holds no weights (*.safetensors or *.bin); a trainer checkpoint's "
                              "actor/huggingface folder gets them from scripts/model_merger.py --local_dir "
                              "<global_step_k>/actor")
        return
    if _cannot_be_hub_id(folder):
        raise ConfigError(f"{label}: no such directory")


def validate(cfg: PPOConfig, *, training: bool = True, model_weights: bool = True) -> PPOConfig:
    """Check settings that the type system cannot; raise ConfigError naming the key. Also makes
    trainer.load_checkpoint_path the global_step_* folder it names (given as that folder or its actor/).

    Args:
        cfg: the merged configuration.
        training: False for sampling-only runs (no update-phase batch checks).
        model_weights: False to accept a model folder without its weights (see `check_model_dir`).
    """
    _check_choices(cfg)
    _check_trainer(cfg)
    _check_workers(cfg)
    _check_data(cfg)  # (before the rollout's checks, which read the lengths)
    _check_rollout(cfg, training)
    _check_algorithm(cfg)
    _check_model(cfg, model_weights)
    _check_finite(cfg)
    if training:
        _check_update(cfg)
    elif cfg.trainer.total_epochs < 1:  # sampling draws worker.rollout.n x trainer.total_epochs per question
        raise ConfigError(f"trainer.total_epochs={cfg.trainer.total_epochs} must be >= 1 (sampling draws "
                          "worker.rollout.n x trainer.total_epochs responses per question)")
    return cfg


def _check_choices(cfg: PPOConfig) -> None:
    """Settings that take one of a few words."""
    d, a, w, t = cfg.data, cfg.algorithm, cfg.worker, cfg.trainer
    actor, rollout = w.actor, w.rollout
    _choice("algorithm.adv_estimator", a.adv_estimator, ("grpo", "rloo", "reinforce_plus_plus", "remax"))
    _choice("algorithm.old_logprobs", a.old_logprobs, ("actor", "rollout"))
    _choice("algorithm.kl_penalty", a.kl_penalty, ("kl", "abs", "mse", "low_var_kl", "k1", "k2", "k3"))
    _choice("worker.rollout.name", rollout.name, ("vllm", "hf"))
    _choice("worker.reward.reward_type", w.reward.reward_type, ("batch", "sequential"))
    _choice("worker.actor.loss_avg_mode", actor.loss_avg_mode, ("token", "seq"))
    _choice("worker.actor.optim.warmup_style", actor.optim.warmup_style, ("constant", "cosine"))
    _choice("trainer.device", t.device, ("auto", "cuda", "cpu"))
    _choice("data.on_bad_record", d.on_bad_record, ("raise", "skip"))
    for key, value in (("worker.actor.fsdp.mixed_precision", actor.fsdp.mixed_precision),
                       ("worker.ref.fsdp.mixed_precision", w.ref.fsdp.mixed_precision),
                       ("worker.rollout.dtype", rollout.dtype)):
        _choice(key, value, ("auto", "bf16", "fp32"))


def _check_trainer(cfg: PPOConfig) -> None:
    """The cluster, the checkpoint to resume, the loggers, profiling and time-outs."""
    t = cfg.trainer
    for key, value in (("trainer.nnodes", t.nnodes), ("trainer.n_gpus_per_node", t.n_gpus_per_node)):
        _positive(key, value)
    if t.nnodes > 1 and not (t.ray_address or os.environ.get("RAY_ADDRESS")):  # else: a one-node local cluster
        raise ConfigError(f"trainer.nnodes={t.nnodes} needs trainer.ray_address (or RAY_ADDRESS, as `ray job "
                          f"submit` sets it): the head of a cluster of {t.nnodes} nodes, started with `ray start`; "
                          "without it the run starts a local Ray cluster of this machine alone")
    bad_steps = [k for k in t.profile_steps if k < 1]
    if bad_steps:
        raise ConfigError(f"trainer.profile_steps={list(t.profile_steps)}: steps are counted from 1 (the first "
                          f"step trained); {bad_steps} cannot be profiled")
    if t.load_checkpoint_path:
        path = os.path.expanduser(t.load_checkpoint_path.rstrip("/"))
        path = os.path.dirname(path) if os.path.basename(path) == "actor" else path
        from pebr.checkpoint import STATE_FILE

        if not os.path.isfile(os.path.join(path, STATE_FILE)):
            raise ConfigError(f"trainer.load_checkpoint_path={t.load_checkpoint_path!r} is not a complete checkpoint "
                              "(no trainer_state.json in it); name a global_step_* directory")
        t.load_checkpoint_path = path  # the global_step_* folder, whichever of its forms was given
    if not t.worker_timeout_s > 0:  # every call to a worker would time out at once
        raise ConfigError(f"trainer.worker_timeout_s={t.worker_timeout_s} must be positive (seconds)")
    unknown = sorted(set(t.logger) - set(LOGGERS))
    if unknown:
        raise ConfigError(f"trainer.logger has unknown back-ends {unknown}; choose from {list(LOGGERS)}")
    for backend, package in (("wandb", "wandb"), ("tensorboard", "tensorboard")):
        if backend in t.logger and importlib.util.find_spec(package) is None:  # said now, not after Ray starts
            raise ConfigError(f"trainer.logger includes {backend}, but the {package} package is not installed: "
                              f"pip install {package} (or pip install -e '.[logging]'), or drop it from "
                              "trainer.logger")


def _check_workers(cfg: PPOConfig) -> None:
    """The FSDP workers, the reward worker and the rollout engines' placement on them."""
    w, t = cfg.worker, cfg.trainer
    actor, rollout = w.actor, w.rollout
    if w.ref.fsdp.mixed_precision not in ("auto", actor.fsdp.mixed_precision):
        raise ConfigError(f"worker.ref.fsdp.mixed_precision={w.ref.fsdp.mixed_precision}: the reference model computes "
                          f"in the actor's precision (worker.actor.fsdp.mixed_precision={actor.fsdp.mixed_precision}), "
                          "so that its log-probs compare with the actor's; set the actor's, or leave the ref's at auto")
    if not w.ref.fsdp.enable_full_shard:  # FSDP2 reshards after a backward, which the reference never runs
        raise ConfigError("worker.ref.fsdp.enable_full_shard=false: the reference model runs forwards only, so its "
                          "gathered parameters would never be freed (a whole copy of the model on every rank, its "
                          "CPU offload undone); leave it true")
    for key, value, default in (
            ("worker.actor.ulysses_sequence_parallel_size", actor.ulysses_sequence_parallel_size, 1),
            ("worker.actor.optim.strategy", actor.optim.strategy, "adamw"),
            ("worker.hybrid_engine", w.hybrid_engine, True),
            ("trainer.val_generations_to_log", t.val_generations_to_log, 0)):
        if value != default:  # read by nothing: accepting another value would ignore it silently
            raise ConfigError(f"{key}={value!r} is not implemented; only {default!r} is")
    for role, part in (("actor", actor), ("ref", w.ref)):
        if part.fsdp.enable_rank0_init:
            raise ConfigError(f"worker.{role}.fsdp.enable_rank0_init=true is not implemented: every rank loads the "
                              "weights from disk itself")
        for key, value in ((f"worker.{role}.offload.offload_params", part.offload.offload_params),
                           (f"worker.{role}.offload.offload_optimizer", part.offload.offload_optimizer)):
            if value:
                raise ConfigError(f"{key}=true is not implemented (nothing is moved off the device between phases); "
                                  f"worker.{role}.fsdp.enable_cpu_offload=true keeps parameters, gradients and "
                                  "optimizer state on the CPU instead (CUDA only)")
    if not 0 <= w.reward.num_cpus <= 1024:  # NaN too: it sizes the local cluster (int() of it raised)
        raise ConfigError(f"worker.reward.num_cpus={w.reward.num_cpus} must be a number of CPUs in [0, 1024]")
    if not 0 <= w.reward.num_gpus <= 1024:
        raise ConfigError(f"worker.reward.num_gpus={w.reward.num_gpus} must be a whole number of GPUs in [0, 1024]")
    if w.reward.reward_function:
        # The file is read inside the reward actor; a wrong path must fail here, before Ray starts.
        spec = w.reward.reward_function
        path, _ = split_reward_spec(spec)
        if not os.path.isfile(path):
            raise ConfigError(f"worker.reward.reward_function={spec!r}: no such file {path!r}")
    _positive("worker.rollout.tensor_parallel_size", rollout.tensor_parallel_size)
    if rollout.name == "hf" and rollout.tensor_parallel_size > 1:
        # The controller scores one rank per engine group and the others reuse those samples by position; each
        # transformers rollout samples its own, so those ranks would train on responses nobody scored.
        raise ConfigError(f"worker.rollout.tensor_parallel_size={rollout.tensor_parallel_size} needs "
                          "worker.rollout.name=vllm: the transformers rollout runs a whole model on every rank; set "
                          "worker.rollout.tensor_parallel_size=1")
    if cfg.world_size % rollout.tensor_parallel_size:
        raise ConfigError(
            f"worker.rollout.tensor_parallel_size={rollout.tensor_parallel_size} must divide the number of "
            f"workers (trainer.nnodes x trainer.n_gpus_per_node = {cfg.world_size})")


def _check_rollout(cfg: PPOConfig, training: bool) -> None:
    """Sampling: the engine's sizes, the sampling parameters, the seeds."""
    d, a, t, rollout = cfg.data, cfg.algorithm, cfg.trainer, cfg.worker.rollout
    _positive("worker.rollout.n", rollout.n)
    if rollout.temperature < 0:
        raise ConfigError(f"worker.rollout.temperature={rollout.temperature} must be >= 0 (0 is greedy)")
    if not 0.0 < rollout.gpu_memory_utilization <= 1.0:
        raise ConfigError(f"worker.rollout.gpu_memory_utilization={rollout.gpu_memory_utilization} must be in (0, 1]")
    if rollout.top_k < -1:
        raise ConfigError(f"worker.rollout.top_k={rollout.top_k} must be -1 or 0 (off) or >= 1")
    if not rollout.mm_cache_gb >= 0:
        raise ConfigError(f"worker.rollout.mm_cache_gb={rollout.mm_cache_gb} must be >= 0")
    if not (rollout.cpu_kv_cache_gb >= 1 and float(rollout.cpu_kv_cache_gb).is_integer()):
        raise ConfigError(f"worker.rollout.cpu_kv_cache_gb={rollout.cpu_kv_cache_gb} must be a whole number of GiB, "
                          "at least 1 (vLLM sizes its CPU KV cache in whole GiB)")
    _positive("worker.rollout.limit_images", rollout.limit_images)
    _positive("worker.rollout.max_num_batched_tokens", rollout.max_num_batched_tokens)
    if rollout.block_size is not None:
        _positive("worker.rollout.block_size", rollout.block_size)
        if rollout.block_size % 32 and _runs_on_cpu(t.device):
            raise ConfigError(f"worker.rollout.block_size={rollout.block_size} must be a multiple of 32 on CPU "
                              "(vLLM's CPU attention takes no other), or null for vLLM's choice")
    if training and rollout.temperature <= 0:
        # The actor divides its logits by the sampling temperature, and GRPO learns nothing from n equal greedy answers.
        raise ConfigError(f"worker.rollout.temperature={rollout.temperature} must be positive for training (validation "
                          "may sample greedily through worker.rollout.val_override_config)")
    if a.old_from_rollout:
        if rollout.name != "vllm":
            raise ConfigError(f"algorithm.old_logprobs=rollout needs worker.rollout.name=vllm (got {rollout.name!r}): "
                              "only the vLLM engine returns the log-probs of the tokens it sampled")
        if rollout.temperature != 1.0 or rollout.top_p < 1.0 or rollout.top_k > 0:
            # vLLM's raw log-probs are the log-softmax of the model's logits, the actor's at temperature 1. Its
            # processed ones carry temperature and truncation, but also the logit bias that bans image tokens,
            # which the actor's do not: at temperature 0.7 the tiny model's differed by 6e-3 on average.
            raise ConfigError(f"algorithm.old_logprobs=rollout needs worker.rollout.temperature=1.0, top_p=1.0 and "
                              f"top_k=-1 (got {rollout.temperature}, {rollout.top_p}, {rollout.top_k}): only then "
                              "are the engine's log-probs of its samples the actor's")
    # Each engine takes the seed plus its index: vLLM's tensor-parallel groups one engine per group.
    engines = cfg.world_size // rollout.tensor_parallel_size if rollout.name == "vllm" else cfg.world_size
    if not 0 <= rollout.seed <= MAX_SEED - (engines - 1):
        raise ConfigError(f"worker.rollout.seed={rollout.seed} must be in [0, 2**32 - {engines}] (numpy's "
                          f"seeds; each of the {engines} rollout engines takes it plus its index)")
    if not 0.0 < rollout.top_p <= 1.0:
        raise ConfigError(f"worker.rollout.top_p={rollout.top_p} must be in (0, 1]")
    _check_val_sampling(rollout.val_override_config)
    val_tokens = rollout.val_override_config.get("max_tokens", d.max_response_length)
    if val_tokens > d.max_response_length:  # the engine is sized for the training responses: vLLM cuts them there
        raise ConfigError(f"worker.rollout.val_override_config.max_tokens={val_tokens} is more than "
                          f"data.max_response_length={d.max_response_length}, which sizes the rollout engine")


def _check_algorithm(cfg: PPOConfig) -> None:
    """The advantage estimator, the loss and its clips."""
    a, actor = cfg.algorithm, cfg.worker.actor
    if not 0.0 <= actor.clip_ratio_low < 1.0 or actor.clip_ratio_high < 0.0:
        raise ConfigError(f"worker.actor.clip_ratio_low={actor.clip_ratio_low} must be in [0, 1) and "
                          f"worker.actor.clip_ratio_high={actor.clip_ratio_high} >= 0")
    if a.kl_coef < 0:
        raise ConfigError(f"algorithm.kl_coef={a.kl_coef} must be >= 0")
    if not 0.0 <= a.gamma <= 1.0:
        raise ConfigError(f"algorithm.gamma={a.gamma} must be in [0, 1]")
    if a.gamma != 1.0 and a.adv_estimator != "reinforce_plus_plus":  # the outcome estimators do not discount
        raise ConfigError(f"algorithm.gamma={a.gamma} acts only with algorithm.adv_estimator=reinforce_plus_plus "
                          f"(it is {a.adv_estimator!r}); leave it at 1.0")
    if actor.clip_ratio_dual <= 1.0:
        raise ConfigError(f"worker.actor.clip_ratio_dual={actor.clip_ratio_dual} must be > 1 (it bounds the loss of "
                          "negative-advantage tokens at that multiple)")
    if a.adv_estimator == "remax":
        raise ConfigError("algorithm.adv_estimator=remax is not implemented in the trainer: it needs a greedy "
                          "baseline response per prompt, which the rollout does not generate")
    if actor.share_prompts and not actor.padding_free:
        raise ConfigError("worker.actor.share_prompts=true needs worker.actor.padding_free=true: a prompt is laid "
                          "out once only in a packed row")


def _check_model(cfg: PPOConfig, model_weights: bool) -> None:
    """The model folder, its tokenizer and the LoRA settings."""
    actor = cfg.worker.actor
    model = actor.model
    if model.lora_rank < 0:
        raise ConfigError(f"worker.actor.model.lora_rank={model.lora_rank} must be >= 0 (0: no LoRA)")
    if not model.lora_rank:
        for name in ("lora_alpha", "lora_target_modules"):
            value, default = getattr(model, name), getattr(ModelConfig(), name)
            if value != default:  # read by nothing without adapters
                raise ConfigError(f"worker.actor.model.{name}={value!r} acts only with LoRA: set "
                                  "worker.actor.model.lora_rank > 0, or leave it at its default")
    if model.lora_rank:
        from pebr.workers.lora import target_modules

        if model.lora_alpha <= 0:
            raise ConfigError(f"worker.actor.model.lora_alpha={model.lora_alpha} must be positive")
        try:
            target_modules(str(name) for name in model.lora_target_modules)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    if not actor.model.model_path:
        raise ConfigError("worker.actor.model.model_path is required")
    model_dir = os.path.expanduser(actor.model.model_path)
    check_model_dir("worker.actor.model.model_path", actor.model.model_path, weights=model_weights)
    if actor.model.tokenizer_path:
        _check_model_folder("worker.actor.model.tokenizer_path", actor.model.tokenizer_path,
                            ("tokenizer_config.json", "tokenizer.json"), "not a Hugging Face tokenizer directory")
    if os.path.isdir(model_dir) and any(char in os.path.abspath(model_dir) for char in "*?["):
        # vLLM looks for the weights with glob patterns made from the folder's path: it found none, after Ray and
        # every model had started.
        raise ConfigError(f"worker.actor.model.model_path={actor.model.model_path!r}: vLLM cannot load from a path "
                          "with *, ? or [ in it (it reads the path as a pattern); rename the folder or link it")


def _check_data(cfg: PPOConfig) -> None:
    """The data files, their lengths and image bounds, and the validation set."""
    d, t = cfg.data, cfg.trainer
    for key, value in (("data.rollout_batch_size", d.rollout_batch_size),
                       ("data.max_prompt_length", d.max_prompt_length),
                       ("data.max_response_length", d.max_response_length)):
        _positive(key, value)
    check_seed("data.seed", d.seed)
    if not d.train_files:
        raise ConfigError("data.train_files is required")
    for key, source in (("data.train_files", d.train_files), ("data.val_files", d.val_files)):
        # Checked here, not only by the record reader, so that a mistyped path fails before transformers loads.
        if looks_local(source) and not os.path.exists(os.path.expanduser(source)):
            raise ConfigError(f"{key}={source!r}: no such file or directory")
    bounds = d.min_pixels, d.max_pixels
    for key, value in zip(("data.min_pixels", "data.max_pixels"), bounds):
        if value is not None and value < 1:
            raise ConfigError(f"{key}={value} must be at least 1 (or null for the model's own bound)")
    if None not in bounds and bounds[0] > bounds[1]:
        raise ConfigError(f"data.min_pixels={bounds[0]} is larger than data.max_pixels={bounds[1]}")
    if d.max_pixels is not None and d.max_pixels < 28 * 28:
        raise ConfigError(f"data.max_pixels={d.max_pixels} is below 28x28 = 784, the smallest image the model takes "
                          "(one merged patch); every image would come out larger than it says")
    if not d.val_files and (t.val_only or t.val_freq > 0):
        raise ConfigError(f"trainer.{'val_only=true' if t.val_only else f'val_freq={t.val_freq}'} needs "
                          "data.val_files (the questions to validate on)")


def _check_finite(cfg: PPOConfig) -> None:
    """Every float setting is a finite number: NaN passed every comparison of the checks before this one, inf most
    of them."""
    for key, kind in _leaf_fields(PPOConfig):
        if float in (kind, *typing.get_args(kind)):
            value = _setting(cfg, key)
            for number in value if isinstance(value, list) else [value]:
                if number is not None and not math.isfinite(number):
                    raise ConfigError(f"{key}={value} must be a finite number")


def _check_update(cfg: PPOConfig) -> None:
    """What training alone reads: steps, saves, the optimizer and the batch sizes of an update."""
    d, a, w, t = cfg.data, cfg.algorithm, cfg.worker, cfg.trainer
    actor, rollout = w.actor, w.rollout
    if t.max_steps is not None and t.max_steps < 1:
        raise ConfigError(f"trainer.max_steps={t.max_steps} must be >= 1, or null to run trainer.total_epochs")
    if t.total_epochs < 1:
        raise ConfigError(f"trainer.total_epochs={t.total_epochs} must be >= 1")
    # -1 is each key's "off" (or "at the end", "all"); anything below it was read as -1 without a word.
    for key, value in (("trainer.val_freq", t.val_freq), ("trainer.save_freq", t.save_freq),
                       ("trainer.save_limit", t.save_limit), ("data.val_batch_size", d.val_batch_size)):
        if value < -1 or key == "data.val_batch_size" and value == 0:
            raise ConfigError(f"{key}={value} must be -1 or " + ("at least 1 (-1: all at once)"
                                                                   if key == "data.val_batch_size" else "at least 0"))
    _positive("worker.actor.ppo_epochs", actor.ppo_epochs)
    o = actor.optim
    for key, value in (("worker.actor.optim.lr", o.lr), ("worker.actor.max_grad_norm", actor.max_grad_norm)):
        if not value > 0:
            raise ConfigError(f"{key}={value} must be positive")
    if not o.weight_decay >= 0:
        raise ConfigError(f"worker.actor.optim.weight_decay={o.weight_decay} must be at least 0")
    if len(o.betas) != 2 or not all(0.0 <= b < 1.0 for b in o.betas):
        raise ConfigError(f"worker.actor.optim.betas={list(o.betas)} must be two numbers in [0, 1)")
    if o.lr_warmup_steps is not None and o.lr_warmup_steps < 0:
        raise ConfigError(f"worker.actor.optim.lr_warmup_steps={o.lr_warmup_steps} must be >= 0 (or null to use "
                          "lr_warmup_ratio)")
    if o.lr_warmup_steps is not None and o.lr_warmup_ratio:  # the steps won, and the ratio was dropped unsaid
        raise ConfigError(f"worker.actor.optim.lr_warmup_steps={o.lr_warmup_steps} and lr_warmup_ratio="
                          f"{o.lr_warmup_ratio} both set the warm-up; set one (the other null or 0)")
    for key, value in (("worker.actor.optim.lr_warmup_ratio", o.lr_warmup_ratio),
                       ("worker.actor.optim.min_lr_ratio", o.min_lr_ratio)):
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"{key}={value} must be in [0, 1]")
    if o.min_lr_ratio and o.warmup_style != "cosine":  # the constant schedule never leaves its peak
        raise ConfigError(f"worker.actor.optim.min_lr_ratio={o.min_lr_ratio} acts only with "
                          f"worker.actor.optim.warmup_style=cosine (it is {o.warmup_style!r}); set both or neither")
    if w.reward.reward_function is None:
        raise ConfigError("worker.reward.reward_function is required (path/to/file.py:function)")
    if a.adv_estimator in ("grpo", "rloo") and rollout.n < 2:
        raise ConfigError(
            f"worker.rollout.n={rollout.n} with algorithm.adv_estimator={a.adv_estimator}: a group of one "
            "response has zero advantage, so nothing would be learned; use n >= 2")
    if not 0.0 <= a.filter_low < a.filter_high <= 1.0:  # (checked with online_filtering off too: it may be turned on)
        raise ConfigError(f"algorithm.filter_low={a.filter_low} < algorithm.filter_high={a.filter_high} must hold, "
                          "both in [0, 1] (a group is kept when its mean lies strictly between them)")
    _positive("worker.actor.global_batch_size", actor.global_batch_size)
    _positive("worker.actor.micro_batch_size_per_device_for_update", actor.micro_batch_size_per_device_for_update)
    _positive("worker.actor.micro_batch_size_per_device_for_experience",
              actor.micro_batch_size_per_device_for_experience)
    if actor.dynamic_batching and actor.max_token_len_per_gpu < 1:
        raise ConfigError(f"worker.actor.max_token_len_per_gpu={actor.max_token_len_per_gpu} must be >= 1 with "
                          "worker.actor.dynamic_batching=true")
    if actor.global_batch_size > d.rollout_batch_size:
        raise ConfigError(f"worker.actor.global_batch_size={actor.global_batch_size} is larger than "
                          f"data.rollout_batch_size={d.rollout_batch_size}")
    if d.rollout_batch_size % actor.global_batch_size:
        raise ConfigError(f"data.rollout_batch_size={d.rollout_batch_size} must be a multiple of "
                          f"worker.actor.global_batch_size={actor.global_batch_size}")
    samples_per_update = actor.global_batch_size * rollout.n
    if samples_per_update % cfg.world_size:
        raise ConfigError(
            f"worker.actor.global_batch_size x worker.rollout.n = {samples_per_update} must be divisible by the "
            f"number of workers ({cfg.world_size})")
    per_device = samples_per_update // cfg.world_size
    micro = actor.micro_batch_size_per_device_for_update
    if not actor.dynamic_batching and micro < per_device and per_device % micro:  # token budgets ignore `micro`
        raise ConfigError(
            f"each worker gets {per_device} samples per update (global_batch_size x n / workers); "
            f"worker.actor.micro_batch_size_per_device_for_update="
            f"{actor.micro_batch_size_per_device_for_update} must divide it")
    # (rollout_batch_size x n is then divisible by the workers too: it is a multiple of global_batch_size x n.)


def _structured_merge(base: Any, sources: list, origin: str) -> Any:
    try:
        return OmegaConf.merge(base, *sources)
    except (OmegaConfBaseException, TypeError, ValueError) as e:  # TypeError: a list where a mapping goes, or back
        key = getattr(e, "full_key", None) or _rejected_key(base, sources[0]) or "?"
        msg = str(e).splitlines()[0]
        raise ConfigError(f"{origin}: bad configuration key '{key}': {msg}") from None


def _rejected_key(base: Any, source: Any, prefix: str = "") -> str | None:
    """The dotted key of `source` that `base` refuses to merge, for errors OmegaConf gives without one (a whole
    section given a number or a list: data=5)."""
    for key in source:
        try:
            OmegaConf.merge(base, {key: source[key]})
        except (OmegaConfBaseException, TypeError, ValueError) as e:
            if getattr(e, "full_key", None):
                return e.full_key
            child = source[key]
            if isinstance(child, DictConfig) and key in base and isinstance(base[key], DictConfig):
                return _rejected_key(base[key], child, f"{prefix}{key}.") or f"{prefix}{key}"
            return f"{prefix}{key}"
    return None


def load_config(argv: list[str], schema: type = PPOConfig, *, training: bool = True,
                model_weights: bool = True) -> Any:
    """Build the configuration from `config=FILE` plus dotted overrides, then validate it.

    The files are merged in their order, then every key=value in theirs, wherever they stand in `argv`:
    a key=value always beats a file, and of two words for the same setting the later one wins. A mapping
    setting (reward_function_kwargs, val_override_config) given whole, in a later file or as key={...}, replaces
    the earlier mapping ("{}" clears it); a dotted key (...reward_function_kwargs.clip_weight=0) changes one entry.
    Text settings keep a command-line value as typed; in a file, a value YAML reads as a number, a boolean or a
    date is refused rather than retyped (1.10 would become "1.1"): quote it there.

    Args:
        argv: command-line words such as ["config=examples/pebr_stage1.yaml", "worker.rollout.n=4"].
        schema: the dataclass to fill.
        training: passed on to `validate`.
        model_weights: False to check the model folder without its weights (`pebr.trainer.main --check` against a
            checkpoint's unmerged huggingface/ folder).

    Raises:
        ConfigError: a missing file, an unknown key, a wrong type or an impossible setting.
    """
    merged = OmegaConf.structured(schema)
    overrides = [a for a in argv if not a.startswith("config=")]
    files = [os.path.expanduser(a.split("=", 1)[1]) for a in argv if a.startswith("config=")]
    sources = []
    for path in files:
        if not os.path.isfile(path):
            problem = "is a directory; name a YAML file in it" if os.path.isdir(path) else "does not exist"
            raise ConfigError(f"config file {path!r} {problem}")
        try:
            loaded = OmegaConf.load(path)
        except Exception as err:  # noqa: BLE001 - yaml's and OmegaConf's parse errors, with the line
            raise ConfigError(f"config file {path!r} cannot be read: {err}") from None
        if not isinstance(loaded, DictConfig):
            raise ConfigError(f"config file {path!r} holds a {type(loaded).__name__}, not a mapping of keys")
        _check_file_text(loaded, schema, path)
        _check_file_numbers(path, schema)
        _listify_scalars(loaded, schema)
        sources.append((loaded, path))
    for word in overrides:
        if "=" not in word:
            raise ConfigError(f"command-line override {word!r} is not of the form key=value")
    for src, origin in sources:
        merged = _structured_merge(merged, [src], origin)
        _replace_mappings(merged, src, schema, "", origin)
    for word in overrides:  # one at a time, so that a later word beats an earlier one whatever their forms
        key = word.split("=", 1)[0]
        parsed = _parse_override(word, schema)
        merged = _structured_merge(merged, [parsed], "command line")
        _replace_mappings(merged, parsed, schema, key, "command line")
    try:
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:  # e.g. an interpolation ${...} that names no key
        raise ConfigError(f"bad configuration key '{getattr(e, 'full_key', None) or '?'}': "
                          f"{str(e).splitlines()[0]}") from None
    _check_list_items(cfg, schema)
    if isinstance(cfg, PPOConfig):
        if not cfg.trainer.save_checkpoint_path:  # the default run directory, where the driver runs
            cfg.trainer.save_checkpoint_path = cfg.checkpoint_dir
        _resolve_paths(cfg)
        validate(cfg, training=training, model_weights=model_weights)
    return cfg


_ABSENT = object()  # a key that a source does not give (None is a value)


@functools.lru_cache(maxsize=None)  # asked once per override word and per check: the schema does not change
def _leaf_fields(schema: type, prefix: str = "") -> tuple[tuple[str, Any], ...]:
    """(dotted key, declared type) of every setting of a dataclass tree."""
    leaves: list[tuple[str, Any]] = []
    for name, kind in typing.get_type_hints(schema).items():
        if is_dataclass(kind):
            leaves += _leaf_fields(kind, f"{prefix}{name}.")
        else:
            leaves.append((f"{prefix}{name}", kind))
    return tuple(leaves)


def _replace_mappings(merged: DictConfig, source: DictConfig, schema: type, given: str, origin: str) -> None:
    """Mapping settings that `source` gives whole, at or under its key `given` ("" for a file), replace the merged
    mapping instead of adding to it (OmegaConf merges mappings key by key)."""
    for key, kind in _leaf_fields(schema):
        given_whole = not given or key == given or key.startswith(given + ".")
        value = OmegaConf.select(source, key, default=_ABSENT) if kind is dict and given_whole else _ABSENT
        if value is _ABSENT:
            continue
        try:
            OmegaConf.update(merged, key, value, merge=False)
        except (OmegaConfBaseException, TypeError, ValueError) as e:
            raise ConfigError(f"{origin}: bad configuration key '{key}': {str(e).splitlines()[0]}") from None


# Numbers YAML 1.1 (PyYAML, OmegaConf) reads as other than the decimal written: a leading zero makes an octal
# (n: 010 is 8) and colons a base-60 number (save_freq: 1:00 is 60).
_YAML_NUMBER_TRAP = re.compile(r"[-+]?(0[0-7_]+|[1-9][0-9_]*(:[0-5]?[0-9])+(\.[0-9_]*)?)")


def _is_number(kind: Any) -> bool:
    """An int or float setting, or an optional one."""
    return kind in (int, float) or (typing.get_origin(kind) in (typing.Union, types.UnionType)
                                    and any(k in (int, float) for k in typing.get_args(kind)))


def _check_number_text(key: str, text: str, where: str) -> None:
    text = text.strip()
    if not _YAML_NUMBER_TRAP.fullmatch(text):
        return
    read = yaml.safe_load(text)
    written = None if ":" in text else float(text.replace("_", ""))
    if read != written:  # (00 is 0 either way)
        raise ConfigError(f"{where}: {key}={text} is read by YAML as {read!r} (a leading zero makes an octal number, "
                          "colons a base-60 one); write the decimal number without them")


def _plain_scalars(text: str) -> dict[str, str]:
    """Each unquoted scalar of a YAML mapping's text, by dotted key, as written."""
    found: dict[str, str] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                walk(value, f"{prefix}{key.value}.")
        elif isinstance(node, yaml.ScalarNode) and node.style is None:  # a quoted "010" is text, as written
            found[prefix[:-1]] = node.value

    try:
        walk(yaml.compose(text, Loader=yaml.SafeLoader), "")
    except yaml.YAMLError:  # (OmegaConf read it: its own loader's quirks are not this check's business)
        pass
    return found


def _check_file_numbers(path: str, schema: type) -> None:
    with open(path, encoding="utf-8") as f:
        scalars = _plain_scalars(f.read())
    for key, kind in _leaf_fields(schema):
        if _is_number(kind) and key in scalars:
            _check_number_text(key, scalars[key], f"config file {path!r}")


def _listify_scalars(loaded: DictConfig, schema: type) -> None:
    """A list setting a file gives as one scalar (logger: console) is a list of it, as on the command line: OmegaConf
    said "AnyNode is not a ListConfig"."""
    plain = _flatten(OmegaConf.to_container(loaded, resolve=False))
    for key, kind in _leaf_fields(schema):
        if typing.get_origin(kind) is not list:
            continue
        value = plain.get(key)
        if value is not None and not isinstance(value, (list, dict)) and not str(value).startswith("${"):
            # "console,wandb" is two items, as on the command line
            items = yaml.safe_load(f"[{value}]") if isinstance(value, str) else [value]
            OmegaConf.update(loaded, key, items, merge=False)


def _check_file_text(loaded: DictConfig, schema: type, path: str) -> None:
    """Text settings of a file must be YAML strings: the loader has already turned experiment_name: 1.10 into
    1.1, 0755 into 493 and on into True, and the text as written is gone."""
    plain = OmegaConf.to_container(loaded, resolve=False)
    for key, kind in _leaf_fields(schema):
        if not _is_text(kind):
            continue
        value: Any = plain
        for part in key.split("."):
            value = value.get(part, _ABSENT) if isinstance(value, dict) else _ABSENT
        if value is not _ABSENT and value is not None and not isinstance(value, str):
            raise ConfigError(f"config file {path!r}: {key} is text, but YAML read its value as the "
                              f"{type(value).__name__} {value!r}; quote it (\"...\") to keep it as written")


def _setting(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _runs_on_cpu(device: str) -> bool:
    """trainer.device as this process can tell before Ray starts: "auto" by its own CUDA (the workers follow the
    Ray cluster's GPUs, which a driver on a head node without GPUs does not see; set trainer.device there)."""
    if device != "auto":
        return device == "cpu"
    import torch  # only for this question: loading torch takes seconds

    return not torch.cuda.is_available()


def _check_list_items(cfg: Any, schema: type) -> None:
    """List settings hold scalars of their declared type: OmegaConf lets a mapping or a list through as an item
    (trainer.logger={a: 1}, [[console]])."""
    for key, kind in _leaf_fields(schema):
        if typing.get_origin(kind) is not list:
            continue
        (item_type,) = typing.get_args(kind)
        for index, item in enumerate(_setting(cfg, key)):
            if not isinstance(item, item_type) or isinstance(item, bool) and item_type is not bool:
                raise ConfigError(f"{key}[{index}]={item!r} must be a {item_type.__name__}")


def _parse_override(word: str, schema: type) -> DictConfig:
    """A key=value word as a config. The value is read as YAML ("4" an int, "[a,b]" a list, "null" None) except for
    text settings, which keep it as typed: YAML would make experiment_name=0710 the octal 456, 1e3 a float and
    cut a path at " #"."""
    key, value = word.split("=", 1)
    kind = _field_type(schema, key)
    if _is_number(kind):
        _check_number_text(key, value, "command-line override")
    if typing.get_origin(kind) is list and value.strip() and value.strip()[0] != "[" and value not in ("null", "~"):
        # A list setting given bare (trainer.logger=console, ...=console,wandb): its items, not OmegaConf's
        # "Value 'console' of type 'str' could not be converted to a ListConfig".
        word = f"{key}=[{value}]"
    try:
        if _is_text(kind) and value not in ("null", "~"):
            parsed = OmegaConf.create()
            OmegaConf.update(parsed, key, value, force_add=True)
            return parsed
        return OmegaConf.from_dotlist([word])
    except yaml.YAMLError as err:  # "[512" and the like: the word named, not a YAML traceback
        raise ConfigError(f"command-line override {word!r}: its value is not YAML ({str(err).splitlines()[0]})"
                          ) from None
    except OmegaConfBaseException as err:  # "${" unclosed: an interpolation that does not parse
        raise ConfigError(f"command-line override {word!r}: bad configuration key '{key}': "
                          f"{str(err).splitlines()[0]} (a literal ${{ is written \\${{)") from None


def _field_type(schema: type, dotted: str) -> Any:
    """The declared type of a dotted key of a dataclass tree (None for a key it does not declare)."""
    kind: Any = schema
    for part in dotted.split("."):
        if not is_dataclass(kind):
            return None
        kind = typing.get_type_hints(kind).get(part)
    return kind


def _is_text(kind: Any) -> bool:
    return kind is str or (typing.get_origin(kind) is typing.Union and set(typing.get_args(kind)) == {str, type(None)})


# Paths a user may give as ~/...: the shell leaves a ~ after "=" as it is, and the libraries do not expand it.
_PATH_KEYS = ("worker.actor.model.model_path", "worker.actor.model.tokenizer_path", "data.train_files",
              "data.val_files", "data.image_dir", "data.format_prompt", "worker.reward.reward_function",
              "trainer.save_checkpoint_path", "trainer.load_checkpoint_path", "trainer.sample_output",
              "trainer.profile_dir")


# Outputs, made absolute whether they exist or not; the other path keys are made absolute when they name
# something here (a hub id or a missing path is left as given, for the checks to name).
_OUTPUT_KEYS = ("trainer.save_checkpoint_path", "trainer.sample_output", "trainer.profile_dir")


def _resolve_paths(cfg: Any) -> None:
    """Expand "~" in every path setting and make it absolute against this process's directory: on a cluster
    started with `ray start` the workers run in each raylet's directory, where a relative model, reward file or
    run directory named something else (or nothing)."""
    for dotted in _PATH_KEYS:
        *parents, name = dotted.split(".")
        owner = cfg
        for part in parents:
            owner = getattr(owner, part)
        value = getattr(owner, name)
        if not isinstance(value, str) or not value.strip() or dotted == "trainer.sample_output" and value.endswith("/"):
            continue  # (no file named: sampling refuses it, naming it as given)
        path, function = split_reward_spec(value) if dotted == "worker.reward.reward_function" else (value, None)
        function = f":{function}" if function is not None else ""
        path = os.path.expanduser(path)
        if dotted in _OUTPUT_KEYS or os.path.exists(path):
            path = os.path.abspath(path)
        setattr(owner, name, path + function)
    kwargs = cfg.worker.reward.reward_function_kwargs  # the reward's own files (clip_model_path), read by its actor
    for key, value in list(kwargs.items()):
        path = os.path.expanduser(value) if key.endswith(("_path", "_dir")) and isinstance(value, str) else ""
        if path and os.path.exists(path):
            kwargs[key] = os.path.abspath(path)


def config_to_yaml(cfg: Any) -> str:
    """The configuration as YAML that load_config reads back as the same values: a literal "${" in a text (given
    escaped, "\\${USER}") is escaped again, or it would come back as an interpolation."""
    return OmegaConf.to_yaml(OmegaConf.create(_escape_interpolations(asdict(cfg))))


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """A nested mapping's leaves by dotted key ({"a": {"b": 1}} -> {"a.b": 1}); an empty mapping has none."""
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _flatten(item, f"{prefix}{key}.").items()}
    return {prefix[:-1]: value}


def changed_settings(old_yaml: str, new_yaml: str) -> list[str]:
    """The dotted keys whose values differ between two configurations written by `config_to_yaml`, each as
    "key: old -> new", in key order (a key only one of them has shows as <absent>)."""
    old, new = _flatten(yaml.safe_load(old_yaml) or {}), _flatten(yaml.safe_load(new_yaml) or {})
    absent = "<absent>"
    return [f"{key}: {old.get(key, absent)!r:.80} -> {new.get(key, absent)!r:.80}"
            for key in sorted(old.keys() | new.keys()) if old.get(key, absent) != new.get(key, absent)]


def _escape_interpolations(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _escape_interpolations(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_escape_interpolations(item) for item in value]
    if isinstance(value, str):  # OmegaConf reads 2k backslashes before "${" as k, 2k + 1 as k and a literal "${"
        return re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + "\\${", value)
    return value


def dataclass_keys(obj: Any, prefix: str = "") -> list[str]:
    """All dotted keys of a dataclass tree (used by tests that check recipes)."""
    keys = []
    for f in fields(obj):
        value = getattr(obj, f.name)
        if is_dataclass(value):
            keys += dataclass_keys(value, f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys
