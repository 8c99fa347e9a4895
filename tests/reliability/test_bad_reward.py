"""Reward functions that raise, return NaN or return the wrong number of results, run through main.run.

The run must stop at step 1 (never hang, never train on a bad score) with a message that names the
offending sample's qid, and leave no workers behind.
"""

from __future__ import annotations

import os
import time

import pytest

from conftest import idle_cpus

from pebr import checkpoint
from pebr.config import ConfigError, load_config
from pebr.data import StatefulBatchSampler
from pebr.trainer.main import build_dataset, run
from pebr.cli import WorkerFailure
from pebr.workers.actor import load_processor
from tests.reliability.procs import trainer_argv

pytestmark = pytest.mark.slow

REWARDS = {
    # each scores 0.5 except for the sample named by bad_qid
    "raises": '''
def compute_score(inputs, bad_qid=""):
    for x in inputs:
        if x["qid"] == bad_qid:
            raise ValueError("cannot parse this answer")
    return [{"overall": 0.5} for _ in inputs]
''',
    "nan": '''
def compute_score(inputs, bad_qid=""):
    return [{"overall": float("nan") if x["qid"] == bad_qid else 0.5} for x in inputs]
''',
    "wrong_length": '''
def compute_score(inputs, bad_qid=""):
    return [{"overall": 0.5} for _ in inputs[1:]]
''',
}


@pytest.mark.parametrize("kind", sorted(REWARDS))
def test_bad_reward_stops_step_1_naming_the_sample(kind, tiny_model_dir, synthetic_data_dir, ray_session, tmp_path):
    reward_file = tmp_path / f"reward_{kind}.py"
    reward_file.write_text(REWARDS[kind])
    run_dir = str(tmp_path / "run")
    argv = trainer_argv(tiny_model_dir, synthetic_data_dir, run_dir, 2) + [
        f"worker.reward.reward_function={reward_file}:compute_score", "worker.rollout.name=hf",
        "data.max_response_length=4"]
    # The offending sample is one of step 1's batch (the sampler's first batch).
    cfg = load_config(argv)
    dataset = build_dataset(cfg, cfg.data.train_files, load_processor(cfg.worker.actor.model))
    first = StatefulBatchSampler(len(dataset), cfg.data.rollout_batch_size, shuffle=True, seed=cfg.data.seed,
                                 drop_last=True).epoch_order(0)[0]
    bad_qid = dataset[first]["qid"]
    argv.append(f"worker.reward.reward_function_kwargs.bad_qid={bad_qid}")
    free_cpus = idle_cpus(ray_session)

    t0 = time.time()
    with pytest.raises(WorkerFailure) as err:
        run(argv)
    elapsed = time.time() - t0
    message = str(err.value)
    if kind == "wrong_length":
        # Caught by the start-up probe (one made-up response for the first record), before any rollout.
        assert message.startswith("reward function check on the first training record failed in a worker: "
                                  "RewardFunctionError: reward function"), message
        assert "returned 0 results for 1 inputs" in message, message
    else:
        assert message.startswith("reward failed in a worker: RewardFunctionError: reward function"), message
        assert f"qid={bad_qid!r}" in message, message
        assert ("ValueError: cannot parse this answer" if kind == "raises" else "overall=nan, not a finite number") \
            in message, message
    # Stopped in step 1: nothing trained on, logged or saved.
    assert checkpoint.complete_steps(run_dir) == []
    metrics = os.path.join(run_dir, "metrics.jsonl")
    assert not os.path.exists(metrics) or open(metrics).read() == ""
    assert not os.path.exists(os.path.join(run_dir, "rollouts"))
    # The workers were shut down on the way out.
    deadline = time.time() + 20
    while ray_session.available_resources().get("CPU", 0) < free_cpus and time.time() < deadline:
        time.sleep(0.2)
    assert ray_session.available_resources().get("CPU", 0) == free_cpus
    print(f"\nfault report: reward {kind} -> WorkerFailure after {elapsed:.1f} s (step 1): {message[:300]}")


def test_a_validation_that_fails_keeps_the_checkpoint_of_its_step(tiny_model_dir, synthetic_data_dir, ray_session,
                                                                   tmp_path):
    """The step is saved before it is validated: a reward that fails only on a validation record costs the
    validation, not the step's training."""
    import json

    reward_file = tmp_path / "reward_raises.py"
    reward_file.write_text(REWARDS["raises"])
    with open(os.path.join(synthetic_data_dir, "test.json")) as f:
        bad_qid = json.load(f)[0]["qid"]
    run_dir = str(tmp_path / "run")
    argv = trainer_argv(tiny_model_dir, synthetic_data_dir, run_dir, 1) + [
        f"worker.reward.reward_function={reward_file}:compute_score", "worker.rollout.name=hf",
        "data.max_response_length=4", f"data.val_files={synthetic_data_dir}/test.json", "trainer.val_freq=1",
        "trainer.val_before_train=false", f"worker.reward.reward_function_kwargs.bad_qid={bad_qid}"]
    with pytest.raises(WorkerFailure, match=rf"reward failed in a worker: .*qid={bad_qid!r}"):
        run(argv)
    assert checkpoint.complete_steps(run_dir) == [1]
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:  # nor are its training metrics
        (logged,) = [json.loads(line) for line in f]
    assert logged["step"] == 1 and "reward/overall" in logged and "actor/pg_loss" in logged

    # The same command with a reward that works resumes at step 1, the run's last, and validates it (it ended
    # at once, without the validation); then validation alone (trainer.val_only), although the recipe does not
    # validate before training, replaces that line.
    working = [a for a in argv if not a.startswith("worker.reward.")]
    for extra in ([], ["trainer.val_only=true"]):
        run(working + extra)
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f]
        assert [r["step"] for r in rows] == [1, 1] and rows[1]["val/samples"] == 8 and "val/overall" in rows[1]
        assert "actor/pg_loss" not in rows[1] and not os.path.exists(os.path.join(run_dir, "validation_failed_at"))


def test_online_filtering_on_a_key_the_reward_lacks_stops_before_any_rollout(tiny_model_dir, synthetic_data_dir,
                                                                              ray_session, tmp_path):
    reward_file = tmp_path / "overall_only.py"
    reward_file.write_text("def compute_score(inputs):\n    return [{'overall': 0.5} for _ in inputs]\n")
    run_dir = str(tmp_path / "run")
    argv = trainer_argv(tiny_model_dir, synthetic_data_dir, run_dir, 2) + [
        f"worker.reward.reward_function={reward_file}:compute_score", "algorithm.online_filtering=true",
        "algorithm.filter_key=accuracy"]
    free_cpus = idle_cpus(ray_session)
    with pytest.raises(ConfigError, match=r"returns \['overall'\], without 'accuracy', which algorithm\.filter_key"):
        run(argv)
    assert checkpoint.complete_steps(run_dir) == []
    deadline = time.time() + 20
    while ray_session.available_resources().get("CPU", 0) < free_cpus and time.time() < deadline:
        time.sleep(0.2)
    assert ray_session.available_resources().get("CPU", 0) == free_cpus  # the reward worker is gone


def test_records_without_key_words_or_images_are_reported_when_the_reward_has_those_terms(
        tiny_model_dir, synthetic_data_dir, ray_session, tmp_path, capsys):
    """Stage 1's keyword (CLIP) term is 0 for every response to a record without key words (an image): said
    before training.

    `trainer.device=cuda` on this CPU machine then stops the run where the workers would start (the Ray cluster
    has no GPUs), which is the resource check of WorkerGroup through the real entry point."""
    import json

    with open(os.path.join(synthetic_data_dir, "train.json")) as f:
        records = json.load(f)[:8]
    for record in records[:3]:
        record.pop("key_words", None)
    for record in records[6:]:  # text-only: stage 1's CLIP term is 0 for them
        record["problem"] = record["problem"].replace("<image>", "")
        record.pop("images")
    records[0]["problem"] = "<image><image>" + records[0]["problem"].replace("<image>", "")  # two images
    records[0]["images"] = records[0]["images"] + records[1]["images"]
    train = tmp_path / "train.json"
    train.write_text(json.dumps(records))
    reward_file = tmp_path / "with_keyword.py"
    reward_file.write_text("def compute_score(inputs):\n"  # (the start-up check scores records[0])
                           "    assert [len(x['images']) for x in inputs] == [2] and inputs[0]['image'] is not None\n"
                           "    return [{'overall': 0.5, 'keyword': 0.0, 'clip': 0.0} for _ in inputs]\n")
    argv = trainer_argv(tiny_model_dir, synthetic_data_dir, str(tmp_path / "run"), 2) + [
        f"data.train_files={train}", f"worker.reward.reward_function={reward_file}:compute_score",
        "trainer.device=cuda", "trainer.n_gpus_per_node=1", "worker.rollout.limit_images=2"]
    with pytest.raises(ConfigError, match=r"= 1 GPU workers need 0\.9 GPUs \(0 in the cluster, 0 free\): the cluster "
                                          r"cannot place them all"):
        run(argv)
    err = capsys.readouterr().err
    assert f"warning: 3 of 8 training records in {train} have no key_words" in err
    assert f"warning: 2 of 8 training records in {train} have no image: the reward's clip term is 0" in err
    assert (f"warning: 1 of 8 training records in {train} have several images: the reward's clip term scores each "
            "description against the first (reward inputs carry them all under 'images')") in err
