"""The hybrid-engine worker: one Ray actor per rank holding the FSDP actor, the reference model and a rollout engine.

The controller calls these methods on every worker at once (each with its own share of the batch)
and waits for all of them, because the FSDP collectives need every rank. Data flow per step:

    generate(prompts)                -> Batch of responses, without the images the controller already has
                                        (syncs the actor's weights into the engine first; keeps the rollout)
    compute_log_probs(share)         -> old / ref log-probs, entropy (keeps the share as this step's experience;
                                        old ones only past the first mini-batch when the update is on-policy there)
    update_actor(tensors)            -> metrics, and the first mini-batch's old log-probs when the update supplied
                                        them (the experience + the controller's advantages; marks the engine's
                                        weights stale)

A rank's samples cross the process boundary at most once per step after generation: `share` is a Batch,
or only the positions of the samples in this worker's own last rollout when they are all there (one rank,
or a share that stayed where it was generated), and the update receives only the tensors the worker lacks.
"""

from __future__ import annotations

import contextlib
import copy
import os
import time
import uuid

import ray
import torch
import torch.distributed as dist
from torch.distributed.constants import default_pg_timeout
from torch.profiler import record_function

from pebr import checkpoint
from pebr.config import PPOConfig
from pebr.protocol import Batch
from pebr.utils.dtypes import resolve_dtype
from pebr.utils.profiling import StepProfiler
from pebr.workers import actor as actor_lib
from pebr.workers import lora
from pebr.workers.rollout import SHM_PREFIX_ENV, HFRollout, SamplingConfig, VLLMRollout, stop_token_ids


def pick_device(cfg_device: str) -> torch.device:
    if cfg_device == "cuda" or (cfg_device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", 0)  # Ray sets CUDA_VISIBLE_DEVICES to this worker's GPU
    return torch.device("cpu")


def interface_of(address: str) -> str | None:
    """The name of this machine's network interface that holds `address`, or None."""
    import psutil  # (a Ray dependency)

    for name, addresses in psutil.net_if_addrs().items():
        if any(a.address == address for a in addresses):
            return name
    return None


def process_group_backend(device: torch.device) -> str:
    """The workers' process group: gloo on CPU; on GPUs NCCL for CUDA tensors and gloo for CPU ones, which the
    actor's CPU offload makes of its gradients (clipping all-reduces their norm: NCCL alone raised "No backend
    type associated with device type cpu" at the first optimizer step on 2 or more GPUs)."""
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


JOB_ID_KEY = "pebr/job_id"  # in the rendezvous store: the id rank 0 gave this worker group


def memory_metrics(device: torch.device) -> dict[str, float]:
    """This process's memory at the end of its update (actor, reference and rollout engine together): resident
    host memory and, on a GPU, the peak allocated by torch since the last call."""
    import psutil

    metrics = {"perf/cpu_memory_gb": psutil.Process().memory_info().rss / 2**30}
    if device.type == "cuda":
        metrics["perf/max_memory_allocated_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)
    return metrics


class FSDPWorker:
    def __init__(self, config: PPOConfig, rank: int, world_size: int, total_steps: int, need_actor: bool = True):
        self.cfg = config
        self.rank = rank
        self.world_size = world_size
        self.total_steps = total_steps
        self.need_actor = need_actor
        self.weights_stale = True
        self.store: dist.TCPStore | None = None  # the process group's rendezvous
        self.last_rollout: tuple[str, Batch] | None = None  # (rollout id, batch with images) of the last generate
        self.experience: Batch | None = None  # this step's share, from compute_log_probs to update_actor
        self.on_policy = 0  # how many of its first samples take their old log-probs from the update itself
        self.profiler: StepProfiler | None = None  # set in `init`, records only between start_ and stop_profile

    # -- set-up -----------------------------------------------------------------------------------
    def address(self) -> tuple[str, int]:
        """Where the process group meets (asked of rank 0): this node's address and the port of the rendezvous
        store that rank 0 opens here and keeps. The store listens on a port the system picks, so nothing can take
        it first (a port found free, closed and bound again later was taken in between once in CI: EADDRINUSE).
        The store also holds this job's id, which names the engines' shared memory (`rollout.SHM_PREFIX_ENV`)."""
        # The address Ray knows this node by: the host name's often resolves to a loopback address (127.0.1.1 in
        # Ubuntu's /etc/hosts), where ranks on other nodes waited until trainer.worker_timeout_s.
        self.store = dist.TCPStore(ray.util.get_node_ip_address(), 0, self.world_size, is_master=True,
                                   wait_for_workers=False, timeout=default_pg_timeout)
        self.store.set(JOB_ID_KEY, uuid.uuid4().hex[:12])
        return self.store.host, self.store.port

    def init(self, master_addr: str, master_port: int) -> dict:
        t0 = time.time()
        cfg, wcfg = self.cfg, self.cfg.worker
        self.device = pick_device(cfg.trainer.device)
        backend = process_group_backend(self.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if self.store is None:  # rank 0 opened it in `address`
            self.store = dist.TCPStore(master_addr, master_port, self.world_size, is_master=False,
                                       timeout=default_pg_timeout)
        # vLLM's external launcher reads the rendezvous from the environment, as torchrun would set it.
        os.environ.update(RANK=str(self.rank), WORLD_SIZE=str(self.world_size), LOCAL_RANK="0",
                          MASTER_ADDR=master_addr, MASTER_PORT=str(master_port),
                          **{SHM_PREFIX_ENV: f"pebr-{self.store.get(JOB_ID_KEY).decode()}"})
        # gloo listens on the address the host name resolves to, often a loopback one (127.0.1.1), where ranks on
        # other nodes cannot reach it: the interface of the address Ray knows this node by, unless the user set one.
        interface = interface_of(ray.util.get_node_ip_address())
        if interface and "GLOO_SOCKET_IFNAME" not in os.environ:
            os.environ["GLOO_SOCKET_IFNAME"] = interface
        dist.init_process_group(backend, store=self.store, rank=self.rank, world_size=self.world_size)
        mcfg = wcfg.actor.model
        self.processor = actor_lib.load_processor(mcfg)
        compute_dtype = resolve_dtype(wcfg.actor.fsdp.mixed_precision, self.device, "worker.actor.fsdp.mixed_precision")
        self.model = self.optimizer = self.scheduler = self.ref_model = None
        if self.need_actor:
            model = actor_lib.load_hf_model(mcfg.model_path, mcfg.trust_remote_code, wcfg.actor.padding_free)
            if mcfg.freeze_vision_tower:
                model.model.visual.requires_grad_(False)
            if mcfg.lora_rank:
                # The adapters' random start, the same on every rank and in every run with this data.seed (it came
                # from each process's own unseeded stream: two runs of one config trained apart from step 1).
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(self.cfg.data.seed)
                    model = lora.add_lora(model, lora.requested_settings(mcfg))
            if mcfg.enable_gradient_checkpointing:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
            self.model = actor_lib.shard_model(model.to(self.device), param_dtype=compute_dtype,
                                               cpu_offload=wcfg.actor.fsdp.enable_cpu_offload and self.device.type == "cuda",
                                               reshard_after_forward=wcfg.actor.fsdp.enable_full_shard)
            if wcfg.actor.use_torch_compile:
                actor_lib.compile_decoder_layers(self.model)
            self.optimizer, self.scheduler = actor_lib.build_optimizer(self.model, wcfg.actor.optim, self.total_steps)
            # KL as a loss term or as a reward penalty: both need the reference; with LoRA it is the actor with
            # its adapters off (`_reference`).
            if not cfg.algorithm.disable_kl and not mcfg.lora_rank:
                ref = actor_lib.load_hf_model(mcfg.model_path, mcfg.trust_remote_code,
                                               wcfg.actor.padding_free).requires_grad_(False)
                self.ref_model = actor_lib.shard_model(
                    ref.to(self.device), param_dtype=compute_dtype,
                    cpu_offload=wcfg.ref.fsdp.enable_cpu_offload and self.device.type == "cuda",
                    reshard_after_forward=wcfg.ref.fsdp.enable_full_shard)
                if wcfg.actor.use_torch_compile:
                    actor_lib.compile_decoder_layers(self.ref_model)
        self.rollout = self._build_rollout(compute_dtype)
        self.profiler = StepProfiler(self.device)
        return {"rank": self.rank, "init_s": time.time() - t0, "device": str(self.device),
                "weight_sync": self.rollout.weight_sync, "node": ray.get_runtime_context().get_node_id()}

    def _build_rollout(self, compute_dtype: torch.dtype):
        rcfg, mcfg = self.cfg.worker.rollout, self.cfg.worker.actor.model
        if rcfg.name == "hf":
            return HFRollout(mcfg.model_path, processor=self.processor, device=self.device,
                             dtype=resolve_dtype(rcfg.dtype, self.device, "worker.rollout.dtype"),
                             trust_remote_code=mcfg.trust_remote_code, seed=rcfg.seed + self.rank)
        dtype = "bf16" if resolve_dtype(rcfg.dtype, self.device, "worker.rollout.dtype") == torch.bfloat16 else "fp32"
        # What the weight sync will send: the actor's parameters, LoRA layers folded into plain weights.
        names = None if self.model is None else lora.folded_names(n for n, _ in self.model.named_parameters())
        return VLLMRollout(
            mcfg.model_path, dtype=dtype,
            max_model_len=self.cfg.data.max_prompt_length + self.cfg.data.max_response_length,
            tensor_parallel_size=rcfg.tensor_parallel_size, gpu_memory_utilization=rcfg.gpu_memory_utilization,
            cpu_kv_cache_gb=rcfg.cpu_kv_cache_gb, enforce_eager=rcfg.enforce_eager,
            enable_chunked_prefill=rcfg.enable_chunked_prefill, max_num_batched_tokens=rcfg.max_num_batched_tokens,
            limit_images=rcfg.limit_images, block_size=rcfg.block_size, mm_cache_gb=rcfg.mm_cache_gb,
            # One seed per engine: the ranks of a tensor-parallel engine run one sampler each, which must draw
            # alike (different draws desynchronise their collectives); separate engines draw differently.
            seed=rcfg.seed + self.rank // rcfg.tensor_parallel_size,
            trust_remote_code=mcfg.trust_remote_code,
            tokenizer_path=mcfg.tokenizer_path, external_launcher=True, sleep_mode=self.device.type == "cuda",
            weight_names=names)

    def _reference(self) -> tuple[torch.nn.Module | None, contextlib.AbstractContextManager]:
        """The model that gives reference log-probs, and the context to run it in (None: no KL at all)."""
        if self.ref_model is not None:
            return self.ref_model, contextlib.nullcontext()
        if self.model is not None and lora.lora_settings(self.model) and not self.cfg.algorithm.disable_kl:
            return self.model, lora.adapters_disabled(self.model)
        return None, contextlib.nullcontext()

    # -- rollout ----------------------------------------------------------------------------------
    def sync_weights(self) -> float:
        """Load the actor's current weights into the rollout engine (all ranks take part in the gathers)."""
        t0 = time.time()
        if self.model is not None and self.weights_stale:
            # Gathered a bucket at a time as the engine consumes them; a collective on every rank.
            # LoRA layers are folded into plain weights on the way (a no-op without adapters).
            with record_function("pebr/weight_sync"):
                self.rollout.load_weights(lora.fold_lora(actor_lib.full_parameters(self.model, self.device),
                                                         lora.scaling(lora.lora_settings(self.model))))
        self.weights_stale = False
        return time.time() - t0

    def generate(self, prompts: list[dict], sampling: dict, rollout_id: str = "") -> tuple[Batch, dict]:
        """n responses for each prompt; returns the batch, without its images, and timings.

        The batch is kept (with the images) under `rollout_id`, so that a later `compute_log_probs` can name
        samples by position instead of receiving them again; the controller holds the images already.
        """
        sync_s = self.sync_weights()
        t0 = time.time()
        sampling_cfg = SamplingConfig(**sampling)
        with record_function("pebr/generate"):
            gens = self.rollout.generate(prompts, sampling_cfg) if prompts else []
        engine_s = time.time() - t0
        self.rollout.release()
        tok = self.processor.tokenizer
        eos = tok.convert_tokens_to_ids("<|im_end|>")
        stops = set(stop_token_ids(tok))
        rollout_logprobs: list[list[float]] = []
        per_sample = ("uid", "qid", "question", "ground_truth", "key_words", "response", "index", "truncated")
        prompt_ids, response_ids, images, extra = [], [], [], {k: [] for k in per_sample}
        for p, g in zip(prompts, gens):
            for j, r in enumerate(g.responses):
                if g.logprobs is not None:
                    rollout_logprobs.append(g.logprobs[j] or [0.0])
                # Cut by the length limit: as long as allowed and not ended by a stop token.
                extra["truncated"].append(len(r) >= sampling_cfg.max_tokens and r[-1] not in stops)
                r = r or [eos]  # an empty response still needs one token to carry its reward
                prompt_ids.append(g.prompt_ids)
                response_ids.append(r)
                images.append(p.get("images") or [])
                extra["uid"].append(p["uid"])
                extra["qid"].append(p["qid"])
                extra["question"].append(p["question"])
                extra["ground_truth"].append(p["ground_truth"])
                extra["key_words"].append(p.get("key_words", []))
                extra["index"].append(p.get("index", -1))
        extra["response"] = tok.batch_decode(response_ids, skip_special_tokens=True) if response_ids else []
        batch = Batch(prompt_ids=prompt_ids, response_ids=response_ids, images=images, non_tensors=extra)
        if rollout_logprobs:
            width = max(len(r) for r in response_ids)
            batch.tensors["rollout_logprobs"] = torch.tensor([lp + [0.0] * (width - len(lp)) for lp in rollout_logprobs])
        self.last_rollout = (rollout_id, batch)
        text_only = Batch(batch.prompt_ids, batch.response_ids, [[] for _ in response_ids], dict(batch.non_tensors),
                          dict(batch.tensors))
        # generate_s: the engine call and building the batch from its output (decoding included); engine_s: the call
        return text_only, {"timing/weight_sync_s": sync_s, "timing/generate_s": time.time() - t0,
                           "timing/engine_s": engine_s}

    # -- training ---------------------------------------------------------------------------------
    def compute_log_probs(self, share: Batch | tuple[str, list[int]], on_policy: int = 0,
                          old: bool = True) -> dict[str, torch.Tensor]:
        """Old log-probs and entropies of all but the first `on_policy` samples of this rank's share, and
        reference log-probs of all, [rows, T]; the share, with them, is kept for `update_actor`.

        Args:
            share: the samples as a Batch, or (rollout id, positions) of samples in this worker's last rollout.
            on_policy: the length of the share's first mini-batch when the update takes that mini-batch's old
                log-probs from its own forward (`update_policy`'s `first_on_policy`), else 0.
            old: False when the old log-probs are the rollout's (algorithm.old_logprobs=rollout): none are
                computed, and `update_actor` receives them with the advantages.
        """
        batch = self._own_samples(*share) if isinstance(share, tuple) else share
        acfg = self.cfg.worker.actor
        temperature = self.cfg.worker.rollout.temperature
        layout = {"padding_free": acfg.padding_free, "share_prompts": acfg.share_prompts,
                  "max_token_len": actor_lib.token_budget(acfg)}
        out = {}
        if old and on_policy < len(batch):
            rest = batch.select(range(on_policy, len(batch))) if on_policy else batch
            with record_function("pebr/old_logprobs"):
                out["old_logprobs"], out["entropy"] = actor_lib.compute_logprobs(
                    self.model, rest, self.processor, self.device, acfg.micro_batch_size_per_device_for_experience,
                    temperature, **layout)
            for name, rows in out.items():
                batch.tensors[name] = torch.cat([torch.zeros(on_policy, rows.shape[1]), rows])
        reference, context = self._reference()
        if reference is not None:
            with context, record_function("pebr/ref_logprobs"):
                out["ref_logprobs"], _ = actor_lib.compute_logprobs(
                    reference, batch, self.processor, self.device, acfg.micro_batch_size_per_device_for_experience,
                    temperature, **layout, with_entropy=False)
            batch.tensors["ref_logprobs"] = out["ref_logprobs"]
        self.experience, self.on_policy = batch, on_policy
        return out

    def _own_samples(self, rollout_id: str, positions: list[int]) -> Batch:
        if self.last_rollout is None or self.last_rollout[0] != rollout_id:
            held = self.last_rollout[0] if self.last_rollout else None
            raise RuntimeError(f"worker {self.rank} was asked for samples of rollout {rollout_id!r} but holds "
                               f"rollout {held!r}; the controller must send the samples themselves")
        return self.last_rollout[1].select(positions)

    def update_actor(self, tensors: dict[str, torch.Tensor]) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        """Update on the experience kept by `compute_log_probs`, with the controller's per-sample `tensors`
        (advantages, response_mask, ...) added to the ones computed here.

        Returns:
            the update's metrics, and the old log-probs and entropies of the on-policy first mini-batch
            (taken from the update's own forward; empty when `compute_log_probs` computed them all).
        """
        if self.experience is None:
            raise RuntimeError(f"worker {self.rank}: update_actor without compute_log_probs first (no experience "
                               "held for this step)")
        batch, self.experience = self.experience, None
        for name, value in tensors.items():
            if value.shape[0] != len(batch):
                raise ValueError(f"worker {self.rank}: tensor {name!r} has {value.shape[0]} rows for an experience "
                                 f"of {len(batch)} samples")
        batch.tensors.update(tensors)
        acfg = self.cfg.worker.actor
        mini_batch_size = acfg.global_batch_size * self.cfg.worker.rollout.n // self.world_size
        if self.on_policy not in (0, min(mini_batch_size, len(batch))):
            raise ValueError(f"worker {self.rank}: {self.on_policy} on-policy samples, but the first mini-batch "
                             f"has {min(mini_batch_size, len(batch))}")
        metrics = actor_lib.update_policy(self.model, self.optimizer, self.scheduler, batch, self.processor,
                                          self.device, acfg, self.cfg.algorithm, self.cfg.worker.rollout.temperature,
                                          mini_batch_size, first_on_policy=self.on_policy > 0)
        self.weights_stale = True
        metrics.update(memory_metrics(self.device))
        filled = {}
        if self.on_policy:  # cloned: a pickled slice would carry its whole storage
            filled = {k: batch.tensors[k][:self.on_policy].clone() for k in ("old_logprobs", "entropy")}
        return metrics, filled

    # -- profiling --------------------------------------------------------------------------------
    def start_profile(self) -> None:
        """Record this worker's calls under torch.profiler until `stop_profile` (trainer.profile_steps)."""
        self.profiler.start()

    def stop_profile(self, out_dir: str) -> list[str]:
        """Stop recording; write this rank's Chrome trace and operator table into `out_dir` (their paths)."""
        return self.profiler.stop(out_dir, self.rank)

    # -- checkpoints ------------------------------------------------------------------------------
    def save_checkpoint(self, actor_dir: str, model_only: bool = False) -> None:
        checkpoint.save_sharded(actor_dir, self.model, None if model_only else self.optimizer,
                                None if model_only else self.scheduler, self.rank, self.world_size,
                                lora=lora.lora_settings(self.model),
                                freeze_vision_tower=self.cfg.worker.actor.model.freeze_vision_tower)
        if self.rank == 0:
            hf_dir = os.path.join(actor_dir, "huggingface")
            config = copy.deepcopy(self.model.config)
            if getattr(self.model, "source_dtype", None) is not None:
                config.dtype = self.model.source_dtype  # the base model's, not the fp32 of the master weights
            config.save_pretrained(hf_dir)
            self.processor.save_pretrained(hf_dir)
            gen = getattr(self.model, "generation_config", None)
            if gen is not None:
                gen.save_pretrained(hf_dir)
        dist.barrier()

    def load_checkpoint(self, actor_dir: str, weights_only: bool = False) -> None:
        """Load this rank's shards; `weights_only` (validation alone): not the optimizer or the schedule."""
        checkpoint.load_sharded(actor_dir, self.model, None if weights_only else self.optimizer,
                                None if weights_only else self.scheduler, self.rank, self.world_size)
        self.weights_stale = True
        dist.barrier()

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The actor's full weights on every rank (tests compare against the merged checkpoint)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=False))
