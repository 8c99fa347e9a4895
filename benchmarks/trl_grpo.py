"""The peer of the GRPO-step comparison: TRL's `GRPOTrainer`, in its own process, one RL step per `run`.

Settings follow ours (BenchSetup + the CPU recipe): B prompts x n responses per generation, in the same order
(no shuffling), the same max response length, learning rate, KL coefficient (a reference model, like
use_kl_loss), clip ratio, max grad norm, temperature/top_p, number of optimizer steps per generation, samples
per forward (ours with token budgets puts a whole mini-batch in one forward; then so does TRL, with no gradient
accumulation), gradient checkpointing (TRL's default is on, the CPU recipe's off), and the same reward function
(examples/reward_function/pebr_2.py through pebr.rewards.RewardManager). A step here is one generation plus the
optimizer steps that consume it.

    python benchmarks/trl_grpo.py SETUP_JSON      (driven by benchmarks/run.py over stdin/stdout)
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import BenchSetup, load_prompts, peak_rss_mb, set_threads


def user_text(templated: str) -> str:
    """The user's text of a chat-templated prompt: TRL wants raw conversations for an image model and
    applies the same processor chat template itself (the image goes first, as in ours)."""
    start, end = templated.find("<|vision_end|>"), templated.rfind("<|im_end|>\n<|im_start|>assistant")
    if start < 0 or end < 0:
        raise ValueError(f"unexpected prompt layout: {templated[:200]!r}")
    return templated[start + len("<|vision_end|>"):end]


def main() -> None:
    setup = BenchSetup.from_json(sys.argv[1])
    set_threads(setup.threads * setup.workers)  # the cores all of our workers use
    import datasets
    import torch
    import trl
    from transformers import TrainerCallback

    from pebr.rewards.manager import RewardManager, reward_input

    cfg, items, processor = load_prompts(setup, count=32)
    a, acfg = cfg.algorithm, cfg.worker.actor
    manager = RewardManager(cfg.worker.reward.reward_function, reward_type=cfg.worker.reward.reward_type,
                            reward_function_kwargs=dict(cfg.worker.reward.reward_function_kwargs))
    records = [{"prompt": [{"role": "user", "content": user_text(it["prompt"])}], "image": it["images"][0],
                "question": it["question"], "ground_truth": it["ground_truth"], "key_words": it["key_words"],
                "qid": it["qid"]} for it in items]
    train = datasets.Dataset.from_list(records)
    counted = {"tokens": 0, "responses": 0}

    def reward(prompts, completions, completion_ids=None, question=None, ground_truth=None, key_words=None, qid=None,
               image=None, **_):
        lengths = [len(c) for c in completion_ids] if completion_ids is not None else [0] * len(completions)
        counted["tokens"] += sum(lengths)
        counted["responses"] += len(completions)
        # Conversational completions arrive as [{"role": "assistant", "content": text}].
        completions = [c[0]["content"] if isinstance(c, list) else c for c in completions]
        # The inputs our trainer gives, so that any reward file scores both sides alike.
        inputs = [reward_input(c, n, t, g, k, q, [im] if im is not None else [])
                  for c, n, t, g, k, q, im in zip(completions, lengths, question, ground_truth, key_words, qid,
                                                  image or [None] * len(completions))]
        return [s["overall"] for s in manager.compute(inputs)]

    samples = setup.batch * setup.n
    per_update = acfg.global_batch_size * setup.n
    # Our token budget (the CPU recipe's) holds a whole mini-batch at this workload: TRL gets it in one forward
    # too. (It ran micro-batches of 4 with gradient accumulation, smaller forwards than ours.)
    micro = per_update if acfg.dynamic_batching else acfg.micro_batch_size_per_device_for_update
    optimizer_steps = samples // per_update  # optimizer steps per generation (ours: 2)
    accum = per_update // micro
    args = dict(
        output_dir=tempfile.mkdtemp(prefix="trl_bench_"), use_cpu=True, bf16=setup.bf16, fp16=False, report_to="none",
        save_strategy="no", logging_steps=1, max_steps=10_000, learning_rate=setup.lr, lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=acfg.optim.weight_decay, max_grad_norm=acfg.max_grad_norm,
        per_device_train_batch_size=micro, gradient_accumulation_steps=accum,
        steps_per_generation=accum * optimizer_steps, num_generations=setup.n,
        max_completion_length=setup.max_tokens, temperature=1.0, top_p=1.0, beta=a.kl_coef if a.use_kl_loss else 0.0,
        epsilon=acfg.clip_ratio_low, epsilon_high=acfg.clip_ratio_high, loss_type="dapo", num_iterations=1,
        # TRL's GRPOConfig turns gradient checkpointing on unless told (TRL 1.x); ours follows the recipe.
        gradient_checkpointing=acfg.model.enable_gradient_checkpointing,
        seed=setup.seed, dataloader_num_workers=0, remove_unused_columns=False, disable_tqdm=True,
        shuffle_dataset=False)  # our benchmark trainer takes the prompts in order
    config = trl.GRPOConfig(**args)
    model = cfg.worker.actor.model.model_path

    class StepClock(TrainerCallback):
        """Times each generation + its optimizer steps, then waits for the parent's next `run`."""

        def __init__(self):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if state.global_step % optimizer_steps:
                return
            elapsed = time.perf_counter() - self.t0
            result = {"step_s": elapsed, "samples": samples, "response_tokens": counted["tokens"],
                      "responses": counted["responses"], "threads": torch.get_num_threads()}
            counted.update(tokens=0, responses=0)
            print("RESULT " + json.dumps(result), flush=True)
            if sys.stdin.readline().strip() != "run":
                control.should_training_stop = True
            self.t0 = time.perf_counter()

    clock = StepClock()
    trainer = trl.GRPOTrainer(model=model, reward_funcs=[reward], args=config, train_dataset=train,
                              processing_class=processor, callbacks=[clock])
    print("READY " + json.dumps({"trl": trl.__version__, "optimizer_steps_per_generation": optimizer_steps,
                                 "grad_accum": accum}), flush=True)
    if sys.stdin.readline().strip() == "run":
        clock.t0 = time.perf_counter()  # (transformers appends its own callbacks after ours)
        trainer.train()
    print("BYE " + json.dumps({"peak_rss_mb": peak_rss_mb()}), flush=True)


if __name__ == "__main__":
    main()
