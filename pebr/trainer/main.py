"""Entry point: `python3 -m pebr.trainer.main config=examples/pebr_stage1.yaml key=value ...`."""

from __future__ import annotations

import sys
from typing import Any

from pebr.cli import run_cli
from pebr.config import ConfigError, PPOConfig, check_writable_folder, load_config
from pebr.utils.versions import warn_untested_versions


def load_dataset(cfg: PPOConfig, source: str, processor: Any):
    """Load and check every record up front: bad data stops here, not inside a worker.

    Returns:
        (dataset, records, load_report): the RLDataset, every record read (kept or not) and the
        report of records skipped while reading.
    """
    from pebr.data import RLDataset, load_records

    d = cfg.data
    records, report = load_records(source, prompt_key=d.prompt_key, answer_key=d.answer_key, image_key=d.image_key,
                                   on_bad_record=d.on_bad_record)
    if report.num_skipped:
        print(f"{source}: {report.summary()}", flush=True)
    dataset = RLDataset(records, processor, image_dir=d.image_dir, max_prompt_length=d.max_prompt_length,
                        format_prompt=d.format_prompt, min_pixels=d.min_pixels, max_pixels=d.max_pixels,
                        filter_overlong_prompts=d.filter_overlong_prompts, on_bad_record=d.on_bad_record,
                        prompt_key=d.prompt_key, answer_key=d.answer_key, image_key=d.image_key,
                        max_images=cfg.worker.rollout.limit_images, source=source, origins=report.kept_at)
    if len(dataset) == 0:
        raise ConfigError(f"{source}: no usable records ({dataset.report.summary()})")
    return dataset, records, report


def check_fits_context(cfg: PPOConfig) -> None:
    """The rollout engine holds a prompt and its response (data.max_prompt_length + data.max_response_length):
    refuse a sum past the model's context now; vLLM refused it only after Ray and every model had started, naming
    neither key.

    Raises:
        ConfigError: naming both keys and the model's max_position_embeddings.
    """
    from pebr.evaluation import model_context

    d = cfg.data
    context = model_context(cfg.worker.actor.model.model_path)
    if context is not None and d.max_prompt_length + d.max_response_length > context:
        raise ConfigError(
            f"data.max_prompt_length={d.max_prompt_length} + data.max_response_length={d.max_response_length} = "
            f"{d.max_prompt_length + d.max_response_length} tokens is more than the model's context "
            f"({context}, max_position_embeddings of {cfg.worker.actor.model.model_path}); lower either")


def build_dataset(cfg: PPOConfig, source: str, processor: Any):
    return load_dataset(cfg, source, processor)[0]


def start_reward_worker(cfg: PPOConfig, require_overall: bool = True):
    """The reward function is loaded (and its setup run) now, so a bad path fails before any rollout."""

    import ray

    from pebr.cli import WorkerFailure, WorkerTimeout
    from pebr.trainer.ray_trainer import check_reward_gpus, ray_get
    from pebr.workers.reward import RewardWorker

    r = cfg.worker.reward
    check_reward_gpus(cfg)
    worker = RewardWorker.options(num_cpus=0, num_gpus=r.num_gpus).remote(
        r.reward_function, reward_type=r.reward_type, reward_function_kwargs=dict(r.reward_function_kwargs),
        require_overall=require_overall)
    try:
        # (A setup that never returns, waiting on a judge service, hung the run here without a limit.)
        ray_get(worker.ready.remote(), "reward worker start-up", cfg.trainer.worker_timeout_s)
    except WorkerFailure as err:
        ray.kill(worker)
        cause = err.__cause__
        # A process or node that died (not a start-up that raised) is no setting's fault: a worker failure, exit 1.
        died = isinstance(cause, ray.exceptions.RayActorError) and not getattr(cause, "_actor_init_failed", False)
        if isinstance(err, WorkerTimeout) or died:  # (a timeout: the settings may be right, a service down)
            raise
        # Loading the function or its setup (options, a CLIP model) failed: the settings' fault.
        raise ConfigError(f"worker.reward.reward_function={r.reward_function!r} with reward_function_kwargs="
                          f"{dict(r.reward_function_kwargs)}: {err}") from err
    return worker


def probe_reward(worker: Any, item: dict, timeout: float, require: dict[str, str] | None = None) -> dict[str, float]:
    """Score one made-up response before any rollout: a reward function that raises or returns the wrong
    shape fails here, in seconds, instead of after the first step's generation.

    Args:
        timeout: seconds to wait for the score (trainer.worker_timeout_s).
        require: score keys the run reads later -> the setting or step that reads it, named in the error.

    Returns:
        The scores of the made-up response (their keys are the reward's terms).
    """
    from pebr.rewards.manager import reward_input
    from pebr.trainer.ray_trainer import ray_get

    # A description too, so that a stage-1 reward runs its CLIP scorer on the record's image now (a checkpoint that
    # loads but fails to score would otherwise stop the run after the first step's rollout).
    response = ("### Image Description: " + " ".join(item["key_words"] or ["an image"]) + "\n### Rationales: -\n"
                "### Step 1: -\n### The final answer is: " + item["ground_truth"])
    probe = reward_input(response, 32, item["question"], item["ground_truth"], item["key_words"], item["qid"],
                         item["images"])
    scores = ray_get(worker.compute.remote([probe]), "reward function check on the first training record", timeout)
    for key, reader in (require or {}).items():
        if key not in scores[0]:
            raise ConfigError(f"worker.reward.reward_function returns {sorted(scores[0])}, without {key!r}, "
                              f"which {reader} needs")
    return scores[0]


def run(argv: list[str]) -> None:
    check_only = "--check" in argv
    # (--check may name a checkpoint's huggingface/ folder, whose weights the merge writes later)
    cfg, train, val, sampler = prepare([word for word in argv if word != "--check"], model_weights=not check_only)
    if check_only:
        print(f"settings and data check out: {len(train)} training records"
              + (f", {len(val)} validation records" if val is not None else "") + "; nothing was trained", flush=True)
        return
    from pebr.checkpoint import run_dir_lock
    from pebr.trainer.ray_trainer import init_ray, sigterm_as_interrupt

    with run_dir_lock(cfg.checkpoint_dir):  # before Ray starts: a second run on this folder stops here
        started = init_ray(cfg)
        try:
            with sigterm_as_interrupt():  # (after ray.init, which sets a handler of its own)
                _train(cfg, train, val, sampler)
        finally:
            if started:  # a later run in this process starts (or joins) its own cluster, not this one
                import ray

                ray.shutdown()


def prepare(argv: list[str], model_weights: bool = True) -> tuple[PPOConfig, Any, Any, Any]:
    """Everything a run checks before Ray starts: the settings, the processor, the context, the data sets and
    the output folders (`model_weights`: whether the model folder must hold its weights already).

    Returns:
        (config, training set, validation set or None, batch sampler).
    """
    cfg = load_config(argv, model_weights=model_weights)
    # Imported after the settings are read: a mistyped key is reported in a fraction of a second, not after
    # torch and transformers have loaded.
    from pebr.data import StatefulBatchSampler
    from pebr.workers.actor import load_processor

    warn_untested_versions()
    processor = load_processor(cfg.worker.actor.model)
    check_fits_context(cfg)
    train = build_dataset(cfg, cfg.data.train_files, processor)
    val = build_dataset(cfg, cfg.data.val_files, processor) if cfg.data.val_files else None
    if len(train) < cfg.data.rollout_batch_size:
        raise ConfigError(f"data.rollout_batch_size={cfg.data.rollout_batch_size} is larger than the training set "
                          f"({len(train)} usable records in {cfg.data.train_files})")
    sampler = StatefulBatchSampler(len(train), cfg.data.rollout_batch_size, shuffle=cfg.data.shuffle,
                                   seed=cfg.data.seed, drop_last=True)
    left_out = len(train) % cfg.data.rollout_batch_size
    if left_out:  # every step needs a whole batch (its mini-batches and ranks divide it)
        print(f"note: {left_out} of {len(train)} training records do not fill a batch of "
              f"data.rollout_batch_size={cfg.data.rollout_batch_size} and are left out of each epoch ("
              + ("other ones each epoch, the order being shuffled)" if cfg.data.shuffle else
                 "the same ones each epoch: data.shuffle=false)"), flush=True)
    if cfg.worker.rollout.top_k > 0:
        print(f"warning: worker.rollout.top_k={cfg.worker.rollout.top_k}: the rollout samples from the top "
              f"{cfg.worker.rollout.top_k} tokens, while the loss scores them under the whole distribution as if "
              "they came from it (the tiny model: 3.4 nats a token apart at top_k=20); top_p near 1 costs little "
              "(about -log top_p)", file=sys.stderr, flush=True)
    check_writable_folder(cfg.checkpoint_dir, "trainer.save_checkpoint_path")
    if cfg.trainer.profile_steps and cfg.trainer.profile_dir:  # (by default a folder of the run directory)
        check_writable_folder(cfg.trainer.profile_dir, "trainer.profile_dir")  # not first at the profiled step
    return cfg, train, val, sampler


def _train(cfg: PPOConfig, train: Any, val: Any, sampler: Any) -> None:
    """Start the reward actor and the trainer, and fit; the workers and the reward actor end with it."""
    import ray

    from pebr.trainer.ray_trainer import RayPPOTrainer

    reward = start_reward_worker(cfg)
    trainer = None
    try:
        a = cfg.algorithm
        terms = probe_reward(reward, train[0], cfg.trainer.worker_timeout_s,
                             {a.filter_key: "algorithm.filter_key"} if a.online_filtering else None)
        for term, count, lacking in (("keyword", train.num_without_key_words, "key_words"),
                                     ("clip", train.num_without_images, "image")):
            if term in terms and count:
                print(f"warning: {count} of {len(train)} training records in {cfg.data.train_files} have no "
                      f"{lacking}: the reward's {term} term is 0 for all their responses", file=sys.stderr, flush=True)
        if "clip" in terms and train.num_with_several_images:
            print(f"warning: {train.num_with_several_images} of {len(train)} training records in "
                  f"{cfg.data.train_files} have several images: the reward's clip term scores each description "
                  "against the first (reward inputs carry them all under 'images')", file=sys.stderr, flush=True)
        trainer = RayPPOTrainer(cfg, train, val, sampler, reward)
        trainer.fit()
    finally:
        if trainer is not None:
            trainer.workers.shutdown()
        ray.kill(reward)


USAGE = """usage: python3 -m pebr.trainer.main [--check] config=FILE [config=FILE ...] [key=value ...]

GRPO training (README, "Running the trainer"). config=FILE words are merged in their order (the stage recipes:
examples/pebr_stage1.yaml, examples/pebr_stage2.yaml; examples/pebr_cpu.yaml on top for a CPU), then every
dotted key=value override, e.g. worker.actor.model.model_path=DIR data.train_files=FILE trainer.n_gpus_per_node=8.
The keys, their defaults and meanings: pebr/config.py. Rerunning the same command resumes. --check stops after
the settings, the data and the output folders are checked, before Ray starts (the stage-2 recipe runs it before
its merge of stage 1)."""


def main(argv: list[str] | None = None) -> int:
    return run_cli(run, argv, USAGE)


if __name__ == "__main__":
    sys.exit(main())
