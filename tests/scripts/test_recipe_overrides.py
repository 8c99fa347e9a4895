"""The bash recipes: overrides of settings they also use outside the Python step are refused, with the other
checks they make before any work (variables, the repository root, which stage-1 model stage 2 starts from)."""

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


@pytest.mark.parametrize("recipe, text, key, variable", [
    ("pebr_stage2.sh", "data:\n  train_files: my.json\n", "data.train_files", "TRAIN_FILES"),
    ("pebr_stage1_cpu.sh", "worker:\n  reward:\n    reward_function_kwargs:\n      clip_model_path: /m\n",
     "worker.reward.reward_function_kwargs.clip_model_path", "CLIP_MODEL_PATH"),
    ("pebr_sample.sh", "trainer:\n  n_gpus_per_node: 4\n", "trainer.n_gpus_per_node", "N_GPUS"),
])
def test_a_config_file_setting_a_key_the_recipe_sets_stops_it_naming_the_variable(tmp_path, recipe, text, key,
                                                                                   variable):
    """The recipe's own key=value settings come after config files: the file's value was dropped without a word."""
    import sys

    mine = tmp_path / "mine.yaml"
    mine.write_text(text)
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:/usr/bin:/bin"}
    proc = subprocess.run(["bash", os.path.join("examples", recipe), f"config={mine}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 2, proc.stderr
    assert f"error: {mine} sets {key}, which this recipe sets after the file from {variable}: set {variable}=" \
           in proc.stderr
    # Other keys pass (the recipe goes on, and fails later here on its missing stage-1 run or model), and so does
    # the CPU twins' own examples/pebr_cpu.yaml, which sets trainer.n_gpus_per_node for N_GPUS to set again.
    mine.write_text("worker:\n  actor:\n    optim:\n      lr: 1.0e-5\n")
    proc = subprocess.run(["bash", os.path.join("examples", recipe), f"config={mine}", "config=examples/pebr_cpu.yaml"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert "which this recipe sets after the file" not in proc.stderr and proc.returncode != 0, proc.stderr


def python3_that_stands_in_for(tmp_path, cases: list[str]):
    """A folder to put first on PATH whose `python3` runs the bash `cases` (lines that exit for the calls they
    answer) and hands every other call to this Python: the recipe's own logic, without its minutes of work."""
    import sys

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").write_text("#!/bin/bash\n" + "".join(line + "\n" for line in cases)
                                     + f'exec {sys.executable} "$@"\n')
    (bin_dir / "python3").chmod(0o755)
    return bin_dir


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
    # python3 for the recipe: sampling does nothing, the split prints its arguments, anything else is Python.
    bin_dir = python3_that_stands_in_for(tmp_path, [
        'if [ "$1 $2" = "-m pebr.trainer.sample_main" ]; then exit 0; fi',
        'if [ "$1" = "_rollout_outputs/sample_dataset.py" ]; then echo "SPLIT $*"; exit 0; fi'])
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


@pytest.mark.parametrize("clip_path", ["/data/models #1/fg-clip", "/data/x: y", "2024", "/data/it's \\ \"q\""])
def test_stage1_hands_the_clip_path_to_the_reward_as_typed(tmp_path, clip_path):
    """The reward's keyword arguments are read as YAML: " #1/fg-clip" was cut off as a comment, "x: y" became a
    mapping and 2024 a number."""
    import sys

    (tmp_path / "show.py").write_text("import sys\nfrom pebr.config import load_config\n"
                                      "kwargs = load_config(sys.argv[1:]).worker.reward.reward_function_kwargs\n"
                                      "print('CLIP', repr(kwargs['clip_model_path']))\n")
    bin_dir = python3_that_stands_in_for(tmp_path, [
        f'if [ "$1 $2" = "-m pebr.trainer.main" ]; then shift 2; {sys.executable} {tmp_path}/show.py "$@"; exit 3; fi'])
    env = {**os.environ, "PATH": f"{bin_dir}:/usr/bin:/bin", "PYTHONPATH": ROOT, "CLIP_MODEL_PATH": clip_path,
           "MODEL_PATH": "Qwen/Qwen2.5-VL-7B-Instruct", "TRAIN_FILES": "dataset/train.json"}
    proc = subprocess.run(["bash", "examples/pebr_stage1.sh"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=env)
    assert proc.returncode == 3 and f"CLIP {clip_path!r}\n" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]


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
    if recipe.startswith("pebr_stage2"):  # read inside an `if`, it was left out of the list
        assert "  MODEL_PATH ()" in proc.stdout and "  STAGE1_DIR (" in proc.stdout
    if recipe.endswith("_cpu.sh"):  # the twin's own value, not only the GPU recipe's default
        assert "  N_GPUS (8)\n      now: 2\n" in proc.stdout
        # The usage line named the GPU recipe, which is not what the user ran; the twin's header comes first.
        gpu = recipe.replace("_cpu", "")
        assert proc.stdout.startswith(f"usage: bash examples/{recipe} [") and f"CPU twin of {gpu}" in proc.stdout
        assert f"It runs examples/{gpu}:" in proc.stdout


@pytest.mark.parametrize("recipe, value", [("pebr_stage2.sh", "abc"), ("pebr_sample_cpu.sh", "0"),
                                           ("pebr_stage1.sh", "2.5")])
def test_a_gpu_count_that_is_not_a_whole_number_stops_naming_the_variable(recipe, value):
    # PATH without python: stage 2 would have merged stage 1's checkpoint, then blamed trainer.n_gpus_per_node.
    proc = subprocess.run(["bash", os.path.join("examples", recipe)], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PATH": "/usr/bin:/bin", "N_GPUS": value})
    assert proc.returncode == 2 and proc.stderr == f"error: N_GPUS={value} is not a whole number of at least 1\n"


def _stage1_run(run_dir, step: int, total_steps: int | None) -> None:
    """A stage-1 run directory whose newest complete checkpoint is `step` of a run of `total_steps`."""
    import torch

    from pebr import checkpoint

    model = torch.nn.Linear(4, 3)
    checkpoint.save_sharded(str(run_dir / f"global_step_{step}.partial" / "actor"), model, None, None, 0, 1)
    state = {"global_step": step, **({"total_steps": total_steps} if total_steps else {})}
    checkpoint.finalize(str(run_dir), step, state, save_limit=-1)


def test_stage2_refuses_a_stage1_that_stopped_before_its_last_step(tmp_path):
    """Stage 2 merged whatever stage 1 had saved last (a run killed after step 1 of 8) and trained from it, saying
    nothing of which model it took."""
    import sys

    _stage1_run(tmp_path / "stage1", 1, 8)
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:/usr/bin:/bin", "STAGE1_DIR": str(tmp_path / "stage1"),
           "RUN_DIR": str(tmp_path / "stage2")}
    proc = subprocess.run(["bash", "examples/pebr_stage2.sh"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "global_step_1 is step 1 of the 8 its run was to train: that run stopped early" in proc.stderr
    assert not (tmp_path / "stage2").exists()


def test_stage2_says_which_model_it_starts_from(tmp_path):
    """An exported MODEL_PATH (the sampling and stage-1 recipes take one) made stage 2 skip stage 1 silently."""
    # python3 for the recipe: the trainer and the merger print what they were asked, the rest is Python.
    bin_dir = python3_that_stands_in_for(tmp_path, [
        'if [ "$1 $2" = "-m pebr.trainer.main" ]; then echo "TRAIN $*"; exit 0; fi',
        'if [ "$1" = "scripts/model_merger.py" ]; then echo "MERGE $*" >&2; echo "/merged/$2"; exit 0; fi'])
    env = {**os.environ, "PATH": f"{bin_dir}:/usr/bin:/bin", "STAGE1_DIR": "/runs/s1", "RUN_DIR": "/runs/s2"}
    given = subprocess.run(["bash", "examples/pebr_stage2.sh"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                           env={**env, "MODEL_PATH": "/models/warmup"})
    assert given.returncode == 0 and "stage 2 starts from MODEL_PATH=/models/warmup (not from STAGE1_DIR)" in given.stderr
    assert "worker.actor.model.model_path=/models/warmup" in given.stdout
    merged = subprocess.run(["bash", "examples/pebr_stage2.sh"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                            env=env)
    assert merged.returncode == 0, merged.stderr
    assert "MERGE scripts/model_merger.py --latest_in=/runs/s1 --final_only" in merged.stderr
    assert "stage 2 starts from stage 1's merged model /merged/--latest_in=/runs/s1" in merged.stderr
    assert "worker.actor.model.model_path=/merged/--latest_in=/runs/s1" in merged.stdout


def test_the_merger_tells_a_runs_last_step_from_an_early_stop(tmp_path):
    import sys

    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    from model_merger import unfinished_run

    _stage1_run(tmp_path / "a", 8, 8)
    _stage1_run(tmp_path / "b", 3, 8)
    _stage1_run(tmp_path / "c", 3, None)  # saved before runs recorded their length: taken
    assert unfinished_run(str(tmp_path / "a" / "global_step_8")) is None
    assert "is step 3 of the 8" in unfinished_run(str(tmp_path / "b" / "global_step_3"))
    assert unfinished_run(str(tmp_path / "c" / "global_step_3")) is None


def test_stage2_checks_its_settings_and_data_before_the_merge(tmp_path, tiny_model_dir, synthetic_data_dir):
    """A mistyped override stopped stage 2 only after the merge of stage 1 (minutes for a 7B model): the settings
    and data are now checked first, against the config and processor saved with stage 1's checkpoint."""
    import shutil
    import sys

    _stage1_run(tmp_path / "stage1", 8, 8)
    hf_dir = tmp_path / "stage1" / "global_step_8" / "actor" / "huggingface"
    shutil.copytree(tiny_model_dir, hf_dir, ignore=shutil.ignore_patterns("*.safetensors"))
    saved = sorted(os.listdir(hf_dir))
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:/usr/bin:/bin", "N_GPUS": "2",
           "STAGE1_DIR": str(tmp_path / "stage1"), "RUN_DIR": str(tmp_path / "stage2"),
           "TRAIN_FILES": os.path.join(synthetic_data_dir, "train.json"),
           "IMAGE_DIR": os.path.join(synthetic_data_dir, "images")}
    proc = subprocess.run(["bash", "examples/pebr_stage2.sh", "config=examples/pebr_cpu.yaml",
                           "worker.rollout.temprature=0.7"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "configuration error" in proc.stderr and "temprature" in proc.stderr
    assert sorted(os.listdir(hf_dir)) == saved  # nothing merged
    # Good settings pass the check; the merge then runs (and refuses these stand-in shards, which fit no model).
    proc = subprocess.run(["bash", "examples/pebr_stage2.sh", "config=examples/pebr_cpu.yaml"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env=env)
    assert "settings and data check out: " in proc.stdout, proc.stderr[-2000:]
    assert proc.returncode == 2 and "do not fit the model of" in proc.stderr
    # Weights in the checkpoint's huggingface/ already: the check is skipped (the trainer checks the same as it
    # starts); the merger still runs (it skips only its own earlier merge) and refuses these shards again.
    (hf_dir / "model.safetensors").write_bytes(b"")
    proc = subprocess.run(["bash", "examples/pebr_stage2.sh", "config=examples/pebr_cpu.yaml"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env=env)
    assert "settings and data check out" not in proc.stdout and "do not fit the model of" in proc.stderr
