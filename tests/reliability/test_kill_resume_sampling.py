"""SIGKILL the real sampling program (`python -m pebr.trainer.sample_main`) mid-run, then rerun it."""

from __future__ import annotations

import json
import os
import time
from collections import Counter

import pytest

from tests.reliability.procs import descendants, sigkill, start, wait_gone, wait_until

pytestmark = pytest.mark.slow
N, EPOCHS, QUESTIONS, BATCH = 2, 2, 6, 2  # 4 records per question, 3 batches


def test_sigkill_during_sampling_then_rerun(tiny_model_dir, synthetic_data_dir, tmp_path):
    with open(os.path.join(synthetic_data_dir, "train.json")) as f:
        records = json.load(f)[:QUESTIONS]
    train = tmp_path / "train.json"
    train.write_text(json.dumps(records))
    out = str(tmp_path / "out" / "rollouts.jsonl")
    argv = ["config=examples/pebr_sample.yaml", "config=examples/pebr_cpu.yaml",
            f"worker.actor.model.model_path={tiny_model_dir}", f"data.train_files={train}",
            f"data.image_dir={os.path.join(synthetic_data_dir, 'images')}", f"trainer.sample_output={out}",
            "data.max_response_length=16", f"data.rollout_batch_size={BATCH}", f"worker.rollout.n={N}",
            f"trainer.total_epochs={EPOCHS}", "worker.rollout.tensor_parallel_size=1", "trainer.n_gpus_per_node=2",
            "trainer.device=cpu"]
    log = str(tmp_path / "sample.log")
    per_question = N * EPOCHS

    proc = start("pebr.trainer.sample_main", argv, log)
    # Kill as soon as the first batch is on disk: the run is between batches or inside the next one.
    wait_until("first batch written", lambda: os.path.exists(out) and os.path.getsize(out) > 0, proc, 240,
               poll=0.001)
    family = descendants(proc.pid)
    t_kill = sigkill(proc, group=True)
    with open(out, "rb") as f:
        at_kill = f.read()
    lines_at_kill = at_kill.count(b"\n")
    assert 0 < lines_at_kill < QUESTIONS * per_question  # killed mid-run
    gone = wait_gone(family, timeout=20, since=t_kill)
    assert all(v is not None for v in gone.values()), gone  # all gone within wait_gone's 20 s

    t0 = time.time()
    proc = start("pebr.trainer.sample_main", argv, log)
    assert proc.wait(timeout=300) == 0, open(log).read()[-3000:]
    rerun_s = time.time() - t0
    text = open(log).read()
    done_before = len({json.loads(line)["qid"] for line in at_kill.splitlines() if line.strip()})
    assert f"{done_before} of {QUESTIONS} questions already sampled" in text

    rows = [json.loads(line) for line in open(out)]
    keys = Counter((r["qid"], r["sample"]) for r in rows)
    assert max(keys.values()) == 1, "duplicate (qid, sample)"
    assert Counter(r["qid"] for r in rows) == {r["qid"]: per_question for r in records}
    assert sorted(keys) == sorted((r["qid"], s) for r in records for s in range(per_question))
    # The records on disk before the kill are kept as they were, not sampled again.
    with open(out, "rb") as f:
        assert f.read().startswith(at_kill)
    print(f"\nfault report: sampling killed with {lines_at_kill} records on disk; workers gone {gone}; "
          f"rerun finished in {rerun_s:.1f} s with {len(rows)} records")
