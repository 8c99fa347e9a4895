"""End to end on CPU: GRPO steps with 2 gloo/FSDP2/vLLM workers, checkpoints, restart, resume."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from pebr import checkpoint
from pebr.config import ConfigError, load_config
from pebr.data import StatefulBatchSampler
from pebr.trainer.main import build_dataset, run
from pebr.workers.actor import load_processor

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def argv(model_dir: str, data_dir: str, run_dir: str, steps: int) -> list[str]:
    return [
        f"config={ROOT}/examples/pebr_stage2.yaml", f"config={ROOT}/examples/pebr_cpu.yaml",
        f"worker.actor.model.model_path={model_dir}", f"data.train_files={data_dir}/train.json",
        f"data.val_files={data_dir}/test.json", f"data.image_dir={data_dir}/images",
        f"worker.reward.reward_function={ROOT}/examples/reward_function/pebr_2.py:compute_score",
        "data.max_response_length=24", f"trainer.max_steps={steps}", "trainer.save_freq=1", "trainer.save_limit=2",
        "trainer.save_rollouts=true", "trainer.val_freq=2", f"trainer.save_checkpoint_path={run_dir}",
        "data.val_batch_size=3",  # the 8 validation prompts in chunks of 3, 3 and 2 over the 2 workers
    ]


def read_metrics(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def step_indices(run_dir: str, step: int) -> set[int]:
    with open(os.path.join(run_dir, "rollouts", f"step_{step}.jsonl")) as f:
        return {json.loads(line)["index"] for line in f}


def test_train_save_restart_resume(tiny_model_dir, synthetic_data_dir, ray_session, tmp_path, capsys):
    run_dir = str(tmp_path / "run")
    run(argv(tiny_model_dir, synthetic_data_dir, run_dir, steps=2))

    assert checkpoint.complete_steps(run_dir) == [1, 2]
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        for key in ("reward/overall", "reward/accuracy", "reward/format", "actor/pg_loss", "actor/kl_loss",
                    "actor/grad_norm", "actor/lr", "response/length_mean", "timing/step_s",
                    "timing/weight_sync_s", "timing/update_actor_s", "batch/zero_variance_group_fraction"):
            assert key in m, key
        assert 0.0 <= m["reward/overall"] <= 1.0
        assert m["response/length_mean"] > 0
        # 2 mini-batches per rollout: the update supplies the first one's old log-probs, the pass the second's.
        assert m["batch/old_logprobs_from_update"] == 0.5
        assert m["actor/entropy_rollout"] > 0 and math.isfinite(m["actor/kl_ref"])
        assert 0.3 < m["perf/cpu_memory_gb"] < 24  # a worker with its model, reference and engine; the machine's
    assert "val/overall" in metrics[1] and metrics[1]["val/samples"] == 8  # val_freq=2, every chunk scored
    assert metrics[1]["timing/validate_s"] > 0 and "timing/validate_s" not in metrics[0]  # it was timed nowhere
    with open(os.path.join(run_dir, "global_step_2", checkpoint.STATE_FILE)) as f:
        saved = json.load(f)
    assert saved["global_step"] == 2 and saved["metrics"]["actor/pg_loss"] == metrics[1]["actor/pg_loss"]

    # The same questions in another order: the saved data order would repeat some prompts and skip others.
    with open(os.path.join(synthetic_data_dir, "train.json")) as f:
        records = json.load(f)
    reordered = tmp_path / "reordered.json"
    reordered.write_text(json.dumps(records[::-1]))
    with pytest.raises(checkpoint.CheckpointError, match="global_step_2 was saved with another training set"):
        run(argv(tiny_model_dir, synthetic_data_dir, run_dir, steps=3) + [f"data.train_files={reordered}"])

    # Killed after step 2 was saved and before it was logged (during its validation, say): the resume logs it, and
    # runs the validation due at that step, which was lost before.
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        first_line = f.readline()
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        f.write(first_line)
    # An earlier run's rollouts of steps past the checkpoint: this run trains those steps again, or never.
    for stale in (3, 7):
        with open(os.path.join(run_dir, "rollouts", f"step_{stale}.jsonl"), "w") as f:
            f.write('{"index": -1}\n')
    # The same command with one more step resumes from step 2 and serves the third batch.
    capsys.readouterr()
    run(argv(tiny_model_dir, synthetic_data_dir, run_dir, steps=3))
    assert "resuming at step 2 with 1 setting(s) other than the run's config.yaml, applied from here on: " \
           "trainer.max_steps: 2 -> 3 " in capsys.readouterr().out
    assert checkpoint.complete_steps(run_dir) == [2, 3]  # save_limit=2 rotated step 1 away
    resumed = read_metrics(run_dir)
    assert [m["step"] for m in resumed] == [1, 2, 3]
    assert {k: v for k, v in resumed[1].items() if not k.startswith(("val/", "timing/validate_s"))} == {
        "step": 2, **saved["metrics"]}
    # Timed as a step that ran through: the save (its shards' writes, from the checkpoint) and the validation.
    assert resumed[1]["timing/save_checkpoint_s"] > 0 and resumed[1]["timing/validate_s"] > 0
    assert resumed[1]["val/samples"] == 8  # (the old code logged the training metrics alone)

    cfg = load_config(argv(tiny_model_dir, synthetic_data_dir, run_dir, steps=3))
    dataset = build_dataset(cfg, cfg.data.train_files, load_processor(cfg.worker.actor.model))
    order = StatefulBatchSampler(len(dataset), cfg.data.rollout_batch_size, shuffle=True,
                                 seed=cfg.data.seed, drop_last=True).epoch_order(0)
    batches = [{dataset.record_indices[i] for i in order[k * 4:(k + 1) * 4]} for k in range(3)]
    assert [step_indices(run_dir, s) for s in (1, 2, 3)] == batches
    assert sorted(os.listdir(os.path.join(run_dir, "rollouts"))) == [f"step_{s}.jsonl" for s in (1, 2, 3)]
    # The resume ran other settings (max_steps): the ones steps 1-2 ran with are kept beside config.yaml.
    with open(os.path.join(run_dir, "config.until_step_2.yaml")) as f:
        assert "max_steps: 2" in f.read()
    with open(os.path.join(run_dir, "config.yaml")) as f:
        assert "max_steps: 3" in f.read()

    # An interrupted save left behind is ignored and cleaned up; the merger refuses it.
    partial = checkpoint.partial_dir(run_dir, 4)
    os.makedirs(os.path.join(partial, "actor"))
    assert checkpoint.latest_checkpoint(run_dir).endswith("global_step_3")
    with pytest.raises(checkpoint.CheckpointError, match="incomplete"):
        checkpoint.check_complete(os.path.join(partial, "actor"))


def test_a_resumed_run_trains_as_an_uninterrupted_one(tiny_model_dir, synthetic_data_dir, ray_session, tmp_path):
    """Stopped after step 1 and resumed, a run samples, scores and updates at step 2 exactly as an uninterrupted
    one: the rollout's random draws come from the step, not from the process's history (the engine of a resumed
    run starts its stream afresh), and everything else is in the checkpoint."""
    def args(run_dir: str, steps: int) -> list[str]:
        return (argv(tiny_model_dir, synthetic_data_dir, run_dir, steps) + varied_reward(tmp_path)
                + ["trainer.val_freq=0", "data.max_response_length=12", "worker.actor.optim.lr=1e-4"])

    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    run(args(straight, steps=2))
    run(args(resumed, steps=1))
    run(args(resumed, steps=2))

    def rollouts(run_dir: str, step: int) -> list[tuple]:
        with open(os.path.join(run_dir, "rollouts", f"step_{step}.jsonl")) as f:
            return [(r["index"], r["response"], r["reward/overall"]) for r in map(json.loads, f)]

    assert rollouts(resumed, 2) == rollouts(straight, 2)

    def trained(run_dir: str) -> dict:  # what a step computed, not how long it took
        (_, m) = read_metrics(run_dir)
        return {k: v for k, v in m.items() if not k.startswith(("timing/", "perf/"))}

    assert trained(resumed) == trained(straight)
    assert trained(straight)["actor/grad_norm"] > 0  # the weights moved between the steps
    from safetensors.torch import load_file
    for name in sorted(os.listdir(os.path.join(straight, "global_step_2", "actor"))):
        if name.endswith(".safetensors"):
            a = load_file(os.path.join(straight, "global_step_2", "actor", name))
            b = load_file(os.path.join(resumed, "global_step_2", "actor", name))
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_hf_rollout_backend_runs_a_step(tiny_model_dir, synthetic_data_dir, ray_session, tmp_path):
    """worker.rollout.name=hf: transformers `generate` on a synced copy of the policy (no vLLM)."""
    run_dir = str(tmp_path / "hf")
    run(argv(tiny_model_dir, synthetic_data_dir, run_dir, steps=1)
        + ["worker.rollout.name=hf", "trainer.val_freq=0", "data.max_response_length=8"])
    (m,) = read_metrics(run_dir)
    assert m["step"] == 1 and 0 < m["response/length_mean"] <= 8
    assert checkpoint.complete_steps(run_dir) == [1]


def test_online_filtering_refills_or_stops_with_a_clear_error(tiny_model_dir, synthetic_data_dir, ray_session,
                                                            tmp_path):
    base = argv(tiny_model_dir, synthetic_data_dir, str(tmp_path / "keep"), steps=1) + [
        "trainer.val_freq=0", "data.max_response_length=8", "algorithm.online_filtering=true",
        "algorithm.filter_key=overall"] + varied_reward(tmp_path)
    # A first try whose groups are all flat (every score 0, outside the strict window (0, 1)) is dropped whole;
    # the second, whose group means lie inside it, fills the batch. reward/* and the flat-group fraction count
    # every generated response (both tries), reward_kept/* the kept ones: the mean of the saved rewards, which
    # differ from response to response.
    flat_first = tmp_path / "flat_first.py"
    flat_first.write_text(TEXT_REWARD + FLAT_FIRST_TRY.format(mark=str(tmp_path / "first_try_scored")))
    run(base + ["algorithm.filter_low=0.0", "algorithm.filter_high=1.0",
                f"worker.reward.reward_function={flat_first}:compute_score_flat_first"])
    (m,) = read_metrics(str(tmp_path / "keep"))
    assert m["batch/filter_tries"] == 2 and m["batch/filter_kept_groups"] == 4
    with open(os.path.join(tmp_path / "keep", "rollouts", "step_1.jsonl")) as f:
        saved = [json.loads(line)["reward/overall"] for line in f]
    assert len(saved) == 16 and len(set(saved)) > 4
    assert m["reward_kept/overall"] == pytest.approx(sum(saved) / len(saved))
    assert m["reward/overall"] == pytest.approx(m["reward_kept/overall"] / 2)  # 16 zeros beside the kept 16
    assert m["batch/zero_variance_group_fraction"] == 0.0
    assert m["batch/zero_variance_group_fraction_generated"] == pytest.approx(0.5)  # 4 flat groups of 8
    # No group of an untrained model reaches a mean of 0.99: after max_try_make_batch tries the run stops.
    with pytest.raises(ConfigError, match=r"after 2 tries \(trainer.max_try_make_batch\)"):  # exit 2, no traceback
        run(base + ["algorithm.filter_low=0.99", "algorithm.filter_high=1.0",
                                 "trainer.max_try_make_batch=2", f"trainer.save_checkpoint_path={tmp_path / 'stop'}"])


def test_kl_as_reward_penalty_uses_the_reference(tiny_model_dir, synthetic_data_dir, ray_session, tmp_path):
    """use_kl_loss=false with KL enabled: the run builds the reference and logs its KL, with no KL loss. (At
    step 1 the reference is the actor, so the penalty is 0 here; its arithmetic is tested by hand in
    tests/trainer/test_step_planning.py.) With validation data and val_freq=-1 the run validates at its end,
    as EasyR1 does (it did not), over every one of its chunks: a reward of the question alone (QID_REWARD) makes
    val/overall a number known in advance."""
    run_dir = str(tmp_path / "klr")
    reward_file = tmp_path / "qid_reward.py"
    reward_file.write_text(QID_REWARD)
    run(argv(tiny_model_dir, synthetic_data_dir, run_dir, steps=1)
        + ["algorithm.use_kl_loss=false", "algorithm.kl_coef=0.1", "trainer.val_freq=-1", "data.max_response_length=8",
           f"worker.reward.reward_function={reward_file}:compute_score"])
    (m,) = read_metrics(run_dir)
    assert "actor/kl_ref" in m and "actor/kl_loss" not in m
    assert m["actor/reward_kl_penalty"] == pytest.approx(0.0, abs=1e-6)  # the penalty taken was not logged at all
    namespace: dict = {}
    exec(QID_REWARD, namespace)
    val = [r["qid"] for r in json.load(open(os.path.join(synthetic_data_dir, "test.json")))]
    assert m["val/samples"] == len(val) == 8  # in chunks of 3, 3 and 2
    assert m["val/overall"] == pytest.approx(sum(map(namespace["checksum"], val)) / len(val))


TEXT_REWARD = '''
def checksum(text):
    return (sum(map(ord, text)) % 97) / 97.0


def compute_score(reward_inputs, **kwargs):
    return [{"overall": checksum(x["response"]), "checksum": checksum(x["response"]),
             "question": checksum(x["question"])} for x in reward_inputs]
'''


# The first scoring of a batch (the start-up probe scores one response) gives every response 0.
FLAT_FIRST_TRY = '''

def compute_score_flat_first(reward_inputs, **kwargs):
    import os

    scores = compute_score(reward_inputs)
    if len(reward_inputs) > 1 and not os.path.exists({mark!r}):
        open({mark!r}, "w").close()
        scores = [dict.fromkeys(s, 0.0) for s in scores]
    return scores
'''

QID_REWARD = TEXT_REWARD.replace('checksum(x["response"])', 'checksum(x["qid"])')


def varied_reward(tmp_path) -> list[str]:
    """The override for a reward that differs between responses (TEXT_REWARD): the stage-2 reward gives every
    response of the untrained model 0 (it never writes the final-answer line), hence zero advantages and no
    gradient, which a test of the update's gradient cannot use."""
    reward_file = tmp_path / "text_reward.py"
    reward_file.write_text(TEXT_REWARD)
    return [f"worker.reward.reward_function={reward_file}:compute_score"]


def test_rewards_stay_with_their_responses(tiny_model_dir, synthetic_data_dir, ray_session, tmp_path):
    """With 2 workers the controller reorders the batch to balance tokens; every saved reward must still be
    the reward of the response saved next to it (a reward that differs for almost every response), and the
    reward sees the question of that response's record."""
    run_dir = str(tmp_path / "aligned")
    run(argv(tiny_model_dir, synthetic_data_dir, run_dir, steps=1) + varied_reward(tmp_path)
        + ["trainer.val_freq=0", "data.max_response_length=12"])
    with open(os.path.join(run_dir, "rollouts", "step_1.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert len({r["reward/overall"] for r in records}) > 4  # the check below can tell samples apart
    namespace: dict = {}
    exec(TEXT_REWARD, namespace)
    with open(os.path.join(synthetic_data_dir, "train.json")) as f:
        questions = {r["qid"]: r["problem"] for r in json.load(f)}
    for r in records:
        assert r["reward/overall"] == pytest.approx(namespace["checksum"](r["response"])), r["qid"]
        assert r["reward/question"] == pytest.approx(namespace["checksum"](questions[r["qid"]])), r["qid"]


def test_on_policy_packed_token_budget_step(tiny_model_dir, synthetic_data_dir, ray_session, tmp_path):
    """One mini-batch per rollout (old log-probs reused), padding-free rows with shared prompts and token-budget
    micro-batches, all through the real workers. The reference equals the actor at step 1, so a zero KL also
    shows that the reference log-probs came back in the right rows."""
    run_dir = str(tmp_path / "packed")
    run(argv(tiny_model_dir, synthetic_data_dir, run_dir, steps=1) + varied_reward(tmp_path)
        + ["trainer.val_freq=0", "data.max_response_length=8", "worker.actor.global_batch_size=4",
           "worker.actor.padding_free=true", "worker.actor.share_prompts=true", "worker.actor.dynamic_batching=true",
           "worker.actor.max_token_len_per_gpu=300"])
    (m,) = read_metrics(run_dir)
    assert m["batch/old_logprobs_from_update"] == 1.0
    assert m["actor/kl_loss"] == pytest.approx(0.0, abs=1e-6)
    # The old log-probs handed back by the update, in their rows: equal to the reference ones at step 1.
    assert m["actor/kl_ref"] == pytest.approx(0.0, abs=1e-6) and m["actor/entropy_rollout"] > 0
    assert m["actor/ppo_kl"] == 0.0 and m["actor/pg_clipfrac"] == 0.0  # ratio exactly 1 on-policy
    assert m["actor/grad_norm"] > 0
    # Counts of the whole mini-batch, not a rank's mean (each rank had 2 of the 4 prompts, and 1.0 was logged...).
    assert m["actor/distinct_images"] == 4 and m["actor/images_encoded"] >= 4
    # ...and response tokens alone: prompt tokens were counted in (ten times the response tokens here).
    assert m["response/tokens_total"] == pytest.approx(16 * m["response/length_mean"])
    assert m["perf/tokens_per_s"] == pytest.approx(
        (m["prompt/tokens_total"] + m["response/tokens_total"]) / m["timing/step_s"])
    assert m["prompt/tokens_total"] > m["response/tokens_total"]


def test_a_profiled_step_writes_a_trace_and_an_operator_table_per_rank(tiny_model_dir, synthetic_data_dir,
                                                                         ray_session, tmp_path, capsys):
    """trainer.profile_steps: each of the 2 workers records the named step under torch.profiler and writes a Chrome
    trace and an operator table holding the step's phases (the engine's generation, the weight sync, both log-prob
    passes, the update); a step the run never reaches is reported, not silently dropped."""
    import gzip

    run_dir = str(tmp_path / "profiled")
    run(argv(tiny_model_dir, synthetic_data_dir, run_dir, steps=1)
        + ["trainer.val_freq=0", "data.max_response_length=8", "trainer.profile_steps=[1,7]"])
    out = capsys.readouterr().out
    assert "trainer.profile_steps [7]: outside the steps this run trains (1-1), not profiled" in out
    step_dir = os.path.join(run_dir, "profile", "step_1")
    assert "step 1 profiled: 2 worker(s) wrote" in out and step_dir in out
    assert sorted(os.listdir(os.path.join(run_dir, "profile"))) == ["step_1"]
    assert sorted(os.listdir(step_dir)) == ["rank0.ops.txt", "rank0.trace.json.gz", "rank1.ops.txt",
                                            "rank1.trace.json.gz"]
    phases = ["pebr/weight_sync", "pebr/generate", "pebr/old_logprobs", "pebr/ref_logprobs", "pebr/forward",
              "pebr/backward", "pebr/optimizer"]
    for rank in (0, 1):
        with gzip.open(os.path.join(step_dir, f"rank{rank}.trace.json.gz"), "rt") as f:
            events = json.load(f)["traceEvents"]
        names = {e.get("name") for e in events}
        assert set(phases) <= names, sorted(set(phases) - names)
        assert "aten::mm" in names or "aten::addmm" in names
        with open(os.path.join(step_dir, f"rank{rank}.ops.txt")) as f:
            table = f.read()
        assert table.startswith(f"# rank {rank}, the trainer's regions") and "operators by self_cpu_time_total" in table
        assert all(p in table for p in ("pebr/generate", "pebr/backward")), table[:2000]
    (m,) = read_metrics(run_dir)
    assert m["timing/profile_write_s"] > 0


def test_old_logprobs_from_the_rollout(tiny_model_dir, synthetic_data_dir, ray_session, tmp_path):
    """algorithm.old_logprobs=rollout: no old log-prob pass; the engine's log-probs of the tokens it sampled are
    the old ones. At step 1, in one mini-batch, the ratio compares them with the actor's forward on the same
    weights (2 ranks, packed rows with shared prompts): equal to float error, in the right rows and columns."""
    run_dir = str(tmp_path / "rollout_logprobs")
    run(argv(tiny_model_dir, synthetic_data_dir, run_dir, steps=1) + varied_reward(tmp_path)
        + ["trainer.val_freq=0", "data.max_response_length=8", "worker.actor.global_batch_size=4",
           "algorithm.old_logprobs=rollout"])
    (m,) = read_metrics(run_dir)
    assert m["batch/old_logprobs_from_update"] == 0.0
    assert "actor/entropy_rollout" not in m  # no old log-prob pass ran, so nothing measured the rollout's entropy
    assert abs(m["actor/ppo_kl"]) < 1e-5 and m["actor/pg_clipfrac"] == 0.0, m  # 2e-8 seen
    # The reference equals the actor at step 1: the engine's log-probs against the reference's.
    assert abs(m["actor/kl_ref"]) < 1e-5 and abs(m["actor/kl_loss"]) < 1e-5, m
    assert m["actor/grad_norm"] > 0


CHARS_REWARD = '''
def compute_score(reward_inputs, **kwargs):
    # Characters per response token: the untrained tiny model picks tokens of 1 to ~8 characters at random.
    return [{"overall": len(x["response"]) / (8 * max(x["response_length"], 1)),
             "chars_per_token": len(x["response"]) / max(x["response_length"], 1)} for x in reward_inputs]
'''


def test_grpo_learns_a_simple_reward(tiny_model_dir, synthetic_data_dir, ray_session, tmp_path):
    """The whole loop pushes the policy where the reward points: rewarded for long tokens, the untrained tiny
    model's characters per token rise within a few steps (a wrong sign, rewards or advantages attached to the
    wrong samples, or a weight sync that does not reach the engine each stop it)."""
    reward_file = tmp_path / "chars_reward.py"
    reward_file.write_text(CHARS_REWARD)
    run_dir = str(tmp_path / "learn")
    run(argv(tiny_model_dir, synthetic_data_dir, run_dir, steps=8)
        + [f"worker.reward.reward_function={reward_file}:compute_score", "trainer.val_freq=0",
           "trainer.save_rollouts=false", "data.max_response_length=16", "worker.rollout.n=8",
           "worker.actor.global_batch_size=4", "worker.actor.optim.lr=1e-2", "algorithm.kl_coef=0.0"])
    chars = [m["reward/chars_per_token"] for m in read_metrics(run_dir)]
    first, last = sum(chars[:2]) / 2, sum(chars[-2:]) / 2
    assert last > first + 0.25, chars  # seen: 3.24 -> 3.72 over 8 steps


def test_validation_alone_from_a_weights_only_checkpoint(tiny_model_dir, synthetic_data_dir, ray_session, tmp_path):
    """trainer.val_only needs the weights alone: a trainer.save_model_only checkpoint was refused ("training cannot
    resume from it"), and so was one past the run's steps."""
    run_dir = str(tmp_path / "weights")
    base = argv(tiny_model_dir, synthetic_data_dir, run_dir, steps=1) + [
        "trainer.save_model_only=true", "trainer.val_freq=0", "data.max_response_length=8"]
    run(base)
    run(base + ["trainer.val_only=true"])
    (trained, validated) = read_metrics(run_dir)
    assert trained["step"] == validated["step"] == 1 and "val/overall" not in trained
    assert validated["val/samples"] == 8 and validated["timing/validate_s"] > 0
    assert set(validated) == {"step", "timing/validate_s"} | {k for k in validated if k.startswith("val/")}
