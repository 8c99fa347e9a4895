"""The bash recipes refuse an override of a setting they also use after the Python step."""

from __future__ import annotations

import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("recipe, override, variable", [
    ("pebr_stage1.sh", "trainer.save_checkpoint_path=/tmp/elsewhere", "RUN_DIR"),
    ("pebr_stage1_cpu.sh", "trainer.save_checkpoint_path=/tmp/elsewhere", "RUN_DIR"),
    ("pebr_stage2.sh", "worker.actor.model.model_path=/tmp/model", "MODEL_PATH"),
    ("pebr_sample.sh", "data.train_files=my.json", "TRAIN_FILES"),
    ("pebr_sample_cpu.sh", "trainer.sample_output=/tmp/r.jsonl", "ROLLOUTS"),
    # A mapping holding the key replaces the recipe's setting as well.
    ("pebr_stage1.sh", "trainer={save_checkpoint_path: /tmp/elsewhere}", "RUN_DIR"),
    ("pebr_stage2.sh", "worker.actor.model={model_path: /tmp/model}", "MODEL_PATH"),
    ("pebr_stage2.sh", "worker={actor: {model: {model_path: /tmp/model}}}", "MODEL_PATH"),
])
def test_an_override_the_recipe_uses_later_stops_it_naming_the_variable(recipe, override, variable):
    # PATH without python: the recipe must stop before it runs anything.
    proc = subprocess.run(["bash", os.path.join("examples", recipe), "trainer.max_steps=1", override], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, env={**os.environ, "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2, proc.stderr
    assert f"error: set {variable}=... instead of the override {override}" in proc.stderr


@pytest.mark.parametrize("override", ["worker.actor.model.lora_rank=8", "worker.actor.optim={lr: 1e-5}",
                                      "trainer.save_checkpoint_path_extra=1"])
def test_an_override_beside_the_recipes_keys_passes(override):
    # PATH without the project's python: past the check, the recipe fails at its first python3 call instead.
    proc = subprocess.run(["bash", os.path.join("examples", "pebr_stage2.sh"), override], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, env={**os.environ, "PATH": "/usr/bin:/bin"})
    assert "instead of the override" not in proc.stderr and proc.returncode not in (0, 2), proc.stderr


@pytest.mark.parametrize("setting, extra, skips, n, keys", [
    ("", [], False, 8, "problem answer images"),
    ("on_bad_record: skip", [], True, 8, "problem answer images"),
    ("", ["worker.rollout.n=4", "trainer.total_epochs=3"], False, 12, "problem answer images"),
    ("answer_key: solution", ["data.prompt_key=question", "data.on_bad_record=skip"], True, 8,
     "question solution images"),
])
def test_the_split_follows_the_sampling_runs_settings(tmp_path, tiny_model_dir, synthetic_data_dir, setting, extra,
                                                      skips, n, keys):
    """The split skips bad lines when sampling did, however data.on_bad_record=skip was set (the recipe looked
    for the literal override), expects worker.rollout.n x trainer.total_epochs rollouts a question (it
    expected 8 whatever the run made), and reads records with the run's keys (to tell which ones its loader
    refused)."""
    import sys

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # python3 for the recipe: sampling does nothing, the split prints its arguments, anything else is Python.
    (bin_dir / "python3").write_text(
        "#!/bin/bash\n"
        'if [ "$1 $2" = "-m pebr.trainer.sample_main" ]; then exit 0; fi\n'
        'if [ "$1" = "_rollout_outputs/sample_dataset.py" ]; then echo "SPLIT $*"; exit 0; fi\n'
        f'exec {sys.executable} "$@"\n')
    (bin_dir / "python3").chmod(0o755)
    config = tmp_path / "mine.yaml"
    config.write_text(f"data:\n  {setting}\n" if setting else "data: {}\n")
    env = {**os.environ, "PATH": f"{bin_dir}:/usr/bin:/bin", "MODEL_PATH": tiny_model_dir,
           "TRAIN_FILES": os.path.join(synthetic_data_dir, "train.json"), "SPLIT_DIR": str(tmp_path / "split"),
           "ROLLOUTS": str(tmp_path / "rollouts.jsonl")}
    proc = subprocess.run(["bash", "examples/pebr_sample.sh", f"config={config}", *extra], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (split,) = [line for line in proc.stdout.splitlines() if line.startswith("SPLIT ")]
    assert ("--skip_bad_lines" in split) is skips, split
    assert f" --n {n}" in split, split
    prompt_key, answer_key, image_key = keys.split()
    assert f"--prompt_key {prompt_key} --answer_key {answer_key} --image_key {image_key}" in split, split


def test_the_sampling_recipe_refuses_to_split_a_data_set_over_itself(tmp_path):
    """TRAIN_FILES=dataset/mediumcase.json with SPLIT_DIR=dataset: the split would replace what it splits. Refused
    before the sampling run, not after it."""
    (tmp_path / "mediumcase.json").write_text("[]")
    env = {**os.environ, "TRAIN_FILES": str(tmp_path / "mediumcase.json"), "SPLIT_DIR": str(tmp_path)}
    proc = subprocess.run(["bash", "examples/pebr_sample.sh"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env=env)
    assert proc.returncode == 2 and "is the split file" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize("recipe", ["pebr_stage1_cpu.sh", "pebr_stage2.sh", "pebr_sample_cpu.sh"])
def test_a_recipe_started_outside_the_repository_root_stops(recipe, tmp_path):
    """The CPU twins changed to the root themselves, so a caller's relative RUN_DIR or TRAIN_FILES was read
    against the repository instead of where the caller stood."""
    proc = subprocess.run(["bash", os.path.join(ROOT, "examples", recipe)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PATH": "/usr/bin:/bin", "RUN_DIR": "runs/s1"})
    assert proc.returncode == 2 and f"run this recipe from the repository root (cd {ROOT})" in proc.stderr, proc.stderr
    assert not os.path.exists(os.path.join(ROOT, "runs"))


@pytest.mark.parametrize("recipe", ["pebr_sample.sh", "pebr_stage1.sh", "pebr_stage2.sh", "pebr_stage2_cpu.sh"])
def test_help_prints_the_recipe_and_its_variables_and_runs_nothing(recipe):
    # PATH without python: stage 2 merged stage 1's checkpoint (minutes at 7 B) before "--help" failed in the trainer.
    proc = subprocess.run(["bash", os.path.join("examples", recipe), "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert proc.stdout.startswith("usage: bash ") and "variables (default):" in proc.stdout
    assert "  N_GPUS (" in proc.stdout and "  RUN_DIR (" in proc.stdout or "  ROLLOUTS (" in proc.stdout
    if recipe.endswith("_cpu.sh"):  # the twin's own value, not only the GPU recipe's default
        assert "  N_GPUS (8)\n      now: 2\n" in proc.stdout


@pytest.mark.parametrize("recipe, value", [("pebr_stage2.sh", "abc"), ("pebr_sample_cpu.sh", "0"),
                                           ("pebr_stage1.sh", "2.5")])
def test_a_gpu_count_that_is_not_a_whole_number_stops_naming_the_variable(recipe, value):
    # PATH without python: stage 2 would have merged stage 1's checkpoint, then blamed trainer.n_gpus_per_node.
    proc = subprocess.run(["bash", os.path.join("examples", recipe)], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PATH": "/usr/bin:/bin", "N_GPUS": value})
    assert proc.returncode == 2 and proc.stderr == f"error: N_GPUS={value} is not a whole number of at least 1\n"
