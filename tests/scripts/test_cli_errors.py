"""The command-line tools other than the trainer stop on bad input with their message and exit code 2."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))


@pytest.mark.parametrize("tool, argv, message", [
    ("inference", ["--model_path", "/nonexistent/model"], "--model_path '/nonexistent/model': no such directory"),
    ("evaluate", ["--model_path", "./no/such/model", "--data", "x.json"],
     "--model_path './no/such/model': no such directory"),
    ("evaluate", ["--model_path", "{model}", "--data", "/nonexistent/test.json"], "/nonexistent/test.json"),
    ("sft_warmup", ["--model_path", "/nonexistent/model", "--data", "x.json", "--output_dir", "{tmp}"],
     "sft config: model_path '/nonexistent/model' is not a directory"),
    ("inference", ["--model_path", "{model}", "--image", "/nonexistent/photo.jpg"],
     "--image '/nonexistent/photo.jpg': no such file"),
    ("inference", ["--model_path", "{tmp}/not_an_image", "--image", "{tmp}/not_an_image/config.json"],
     "holds no weights (*.safetensors or *.bin); a trainer checkpoint's actor/huggingface folder gets them from "
     "scripts/model_merger.py"),
    ("inference", ["--model_path", "{model}", "--image", "{model}/config.json"], "/config.json' cannot be read"),
    ("inference", ["--model_path", "{model}", "--image", "{model}"], "': a directory"),  # "no such file"
    # Numbers that cannot work, before any model loads.
    ("evaluate", ["--model_path", "{model}", "--data", "x.json", "--limit", "0"], "--limit 0 must be at least 1"),
    ("evaluate", ["--model_path", "{model}", "--data", "x.json", "--max_prompt_length", "0"],
     "--max_prompt_length 0 must be at least 1"),
    ("evaluate", ["--model_path", "{model}", "--data", "x.json", "--min_pixels", "900000"],
     "--min_pixels 900000 is larger than --max_pixels 802816"),
    ("inference", ["--model_path", "{model}", "--max_pixels", "0"], "--max_pixels 0 must be at least 1"),
    ("inference", ["--model_path", "{model}", "--max_new_tokens", "0"], "--max_new_tokens 0 must be at least 1"),
    ("inference", ["--model_path", "{model}", "--temperature", "-0.5"],
     "--temperature -0.5 must be a finite number, at least 0"),
    ("evaluate", ["--model_path", "{model}", "--data", "x.json", "--temperature", "-1"],
     "--temperature -1.0 must be a finite number, at least 0"),
    # transformers' sampling raised "probability tensor contains either inf, nan"; vLLM after loading the model.
    ("inference", ["--model_path", "{model}", "--temperature", "inf"], "--temperature inf must be a finite number"),
    ("inference", ["--model_path", "{model}", "--temperature", "1", "--top_p", "0"], "--top_p 0.0 must be in (0, 1]"),
    ("evaluate", ["--model_path", "{model}", "--data", "x.json", "--top_p", "1.5"], "--top_p 1.5 must be in (0, 1]"),
    # "~" was expanded for the first check only: the loader then took "~/model" for a malformed hub id.
    ("inference", ["--model_path", "~/no_model"], "--model_path '{home}/no_model': no such directory"),
    ("evaluate", ["--model_path", "{model}", "--data", "~/no.json"], "{home}/no.json"),
    # Shaped like a hub id ("org/name"), but "tests" is a folder here: a mistyped local path.
    ("evaluate", ["--model_path", "tests/no_model", "--data", "x.json"], "--model_path 'tests/no_model': no such"),
    ("sft_warmup", ["--model_path", "{model}", "--data", "x.json", "--output_dir", "{tmp}", "--max_pixels", "0"],
     "sft config: max_pixels=0 is out of range"),
    # An OverflowError traceback; a decay clamped to 0 without a word; a learning rate that set no parameter's.
    ("sft_warmup", ["--model_path", "{model}", "--data", "x.json", "--output_dir", "{tmp}/o", "--epochs", "inf"],
     "sft config: epochs=inf is out of range: it must be a finite number above 0"),
    ("sft_warmup", ["--model_path", "{model}", "--data", "x.json", "--output_dir", "{tmp}/o", "--weight_decay", "-1"],
     "sft config: weight_decay=-1.0 is out of range: it must be a finite number, at least 0"),
    ("sft_warmup", ["--model_path", "{model}", "--data", "x.json", "--output_dir", "{tmp}/o", "--vision_lr", "1e-5"],
     "vision_lr=1e-05 acts only on a vision tower that trains; it is frozen"),
    # A file as the output was moved aside to FILE.replaced, silently; an unwritable place failed after training.
    ("sft_warmup", ["--model_path", "{model}", "--data", "x.json", "--output_dir", "{tmp}/test.json"],
     "output_dir '{tmp}/test.json' is a file"),
    ("sft_warmup", ["--model_path", "{model}", "--data", "x.json", "--output_dir", "/proc/warmup"],
     "cannot write into /proc"),
    # A trainer checkpoint before merging.
    ("evaluate", ["--model_path", "{tmp}/actor", "--data", "x.json"], "is a sharded trainer checkpoint; merge it"),
    # ... or its global_step_* folder (it was "holds no config.json"); a bare name is a mistyped folder, not an id.
    ("inference", ["--model_path", "{tmp}", "--image", "x.png"],
     "is a trainer checkpoint (global_step_*); merge its actor into a Hugging Face model first: "
     "scripts/model_merger.py --local_dir {tmp}/actor"),
    ("evaluate", ["--model_path", "my_warmup_model", "--data", "x.json"], "'my_warmup_model': no such directory"),
    ("sft_warmup", ["--model_path", "{tmp}/actor", "--data", "x.json", "--output_dir", "{tmp}/out"],
     "is a sharded trainer checkpoint; merge it"),
    # The reports would replace the data.
    ("evaluate", ["--model_path", "{model}", "--data", "{tmp}/test.json", "--output", "{tmp}/test"],
     "the --data file; choose another prefix"),
    # Nor any other file that is not an earlier report (the training set beside the test set), nor a folder.
    ("evaluate", ["--model_path", "{model}", "--data", "{tmp}/test.json", "--output", "{tmp}/train"],
     "/train.json, which is not part of an earlier evaluation report"),
    ("evaluate", ["--model_path", "{model}", "--data", "{tmp}/test.json", "--output", "{tmp}/"], "names a folder"),
    ("evaluate", ["--model_path", "{model}", "--data", "{tmp}/test.json", "--output", "/proc/eval"],
     "cannot write into /proc"),
])
def test_bad_input_is_exit_2_with_its_message(tool, argv, message, tiny_model_dir, tmp_path, capsys, monkeypatch):
    """Through `run_cli`, as each script's __main__ runs it."""
    import importlib

    from pebr.cli import run_cli

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    main = importlib.import_module(tool).main
    unmerged = tmp_path / "not_an_image"  # what a checkpoint's actor/huggingface holds before merging
    unmerged.mkdir()
    (unmerged / "config.json").write_text("{}")
    actor = tmp_path / "actor"  # a trainer checkpoint's actor directory
    actor.mkdir()
    (actor / "shard_index.json").write_text("{}")
    (actor / "model_world_size_1_rank_0.safetensors").write_bytes(b"")
    (tmp_path / "trainer_state.json").write_text("{}")  # tmp_path: the global_step_* folder around it
    (tmp_path / "test.json").write_text("[]")
    (tmp_path / "train.json").write_text("[]")
    assert run_cli(main, [word.format(model=tiny_model_dir, tmp=tmp_path) for word in argv]) == 2
    assert message.format(tmp=tmp_path, home=tmp_path / "home") in capsys.readouterr().err


SEED_RANGE = "is not an integer in [0, 2**32 - 1] (numpy's seeds)"


@pytest.mark.parametrize("tool, argv, said", [
    # vLLM and transformers' set_seed failed with numpy's traceback, after the model had loaded.
    ("evaluate", ["--model_path", "m", "--data", "x.json", "--seed", "-1"], f"'-1' {SEED_RANGE}"),
    ("sft_warmup", ["--model_path", "m", "--data", "x.json", "--output_dir", "o", "--seed", "4294967296"],
     f"'4294967296' {SEED_RANGE}"),
    ("demo", ["--seeds", "0", "-1"], "'-1' is not an integer in [0, 2**32 - 2]"),
    # The demo's second engine takes the seed plus one: the trainer refused it after the data and the warm-up.
    ("demo", ["--seed", "4294967295"], "'4294967295' is not an integer in [0, 2**32 - 2] (numpy's seeds; each of "
                                      "the 2 rollout engines takes it plus its index)"),
    # Options that were ignored without a word.
    ("demo", ["--seed", "1", "--seeds", "2", "3"], "--seed and --seeds both choose the seeds: give one of them"),
    ("model_merger", ["--local_dir", "x/actor", "--final_only"], "--final_only acts with --latest_in"),
])
def test_usage_errors_stop_before_any_work(tool, argv, said, capsys):
    import importlib

    with pytest.raises(SystemExit) as stop:
        importlib.import_module(tool).main(argv)
    assert stop.value.code == 2
    assert said in capsys.readouterr().err


@pytest.mark.slow
def test_from_the_command_line_there_is_no_traceback():
    """One real process, for the exit code and stderr as a user sees them (each script's __main__ runs run_cli)."""
    proc = subprocess.run([sys.executable, "inference.py", "--model_path", "/nonexistent/model"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "configuration error: --model_path '/nonexistent/model': no such directory" in proc.stderr


def test_run_cli_says_help_interrupts_and_worker_failures_in_one_message(capsys):
    from pebr.cli import WorkerFailure, run_cli
    from pebr.trainer.main import USAGE, main

    assert main(["--help"]) == 0 and capsys.readouterr().out.strip() == USAGE  # it was "not of the form key=value"

    def interrupted(argv):
        raise KeyboardInterrupt

    def worker_died(argv):
        raise WorkerFailure("actor update: worker 1 of 2 died: its start-up raised ValueError: x")

    assert run_cli(interrupted, []) == 130 and "interrupted; the same command continues" in capsys.readouterr().err
    # evaluate.py and inference.py keep nothing of an interrupted run: they must not promise a continuation
    assert run_cli(interrupted, [], on_interrupt="nothing was written") == 130
    assert capsys.readouterr().err == "interrupted; nothing was written\n"
    assert run_cli(worker_died, []) == 1
    assert capsys.readouterr().err == "error: actor update: worker 1 of 2 died: its start-up raised ValueError: x\n"


def test_every_error_of_the_users_input_is_one_line_with_its_label_and_exit_code_2(capsys):
    """The command lines share one exit path (pebr/cli.py): the merger printed `model_merger: ...`, the filter and
    the split their own `error: ...` with their own exit codes, and a sampling log another."""
    import importlib.util

    from pebr.checkpoint import CheckpointError
    from pebr.cli import UserError, run_cli
    from pebr.config import ConfigError
    from pebr.data.records import BadRecord, DataError
    from pebr.trainer.sample_main import SampleLogError
    from pebr.trainer.split import SplitError

    spec = importlib.util.spec_from_file_location("filter_script", os.path.join(ROOT, "dataset", "filter.py"))
    filter_script = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # (for its dataclasses)
    spec.loader.exec_module(filter_script)
    labels = {ConfigError: "configuration error", DataError: "data error", BadRecord: "data error",
              CheckpointError: "checkpoint error", SplitError: "error", SampleLogError: "error",
              filter_script.FilterInputError: "error"}
    for error, label in labels.items():
        def fails(argv, error=error):
            message = "f.json line 3: key 'answer' is missing"
            raise BadRecord("no_answer", message) if error is BadRecord else error(message)

        assert issubclass(error, UserError) and run_cli(fails, []) == 2
        assert capsys.readouterr().err == f"{label}: f.json line 3: key 'answer' is missing\n"

    def bug(argv):
        raise RuntimeError("a bug of ours")

    with pytest.raises(RuntimeError, match="a bug of ours"):  # not the user's: the traceback stays
        run_cli(bug, [])


def test_the_exit_path_loads_nothing_heavy():
    """dataset/filter.py and the split use it; importing torch or Ray there would cost seconds per call."""
    code = "import sys, pebr.cli; print(sorted({'torch', 'ray', 'vllm', 'transformers'} & set(sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout == "[]\n", proc.stderr


@pytest.mark.parametrize("script, argv, said", [
    ("inference.py", ["--model_path", "/nonexistent/model"], "--model_path '/nonexistent/model': no such directory"),
    ("scripts/evaluate.py", ["--model_path", "/nonexistent/model", "--data", "x.json"], "no such directory"),
    ("scripts/sft_warmup.py", ["--model_path", "m", "--data", "d.json"], "required: --output_dir"),
    ("scripts/model_merger.py", ["--latest_in", "/nonexistent/run"], "no complete checkpoint in /nonexistent/run"),
    ("dataset/filter.py", ["--input", "/nonexistent/sharegpt.json", "--output", "kept.json"],
     "cannot read /nonexistent/sharegpt.json"),
])
def test_a_script_refuses_a_bad_option_before_it_loads_torch(script, argv, said):
    """A mistyped path or flag costs a fifth of a second, not the 2-2.5 s torch, transformers and sympy took to
    import before the options were even read (measured here)."""
    code = ("import runpy, sys\n"
            "sys.argv = sys.argv[1:]  # as `python SCRIPT ARGS` sets it\n"
            "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
            "except SystemExit as stop:\n    rc = stop.code\n"
            "heavy = ('torch', 'transformers', 'ray', 'vllm', 'sympy')\n"
            "print('loaded:', sorted(m for m in heavy if m in sys.modules))\n"
            "sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, os.path.join(ROOT, script), *argv], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and said in proc.stderr, proc.stderr[-2000:]
    assert "loaded: []" in proc.stdout, proc.stdout


def test_sigterm_while_the_driver_runs_is_an_interrupt_with_exit_143_and_the_old_handler_comes_back(capsys):
    import os
    import signal

    from pebr.cli import run_cli
    from pebr.trainer.ray_trainer import sigterm_as_interrupt

    before = signal.getsignal(signal.SIGTERM)
    reached = []

    def terminated(argv):
        with sigterm_as_interrupt():
            os.kill(os.getpid(), signal.SIGTERM)
            reached.append("after the signal")  # (the handler raises before the next bytecode runs)

    assert run_cli(terminated, []) == 143 and not reached
    assert capsys.readouterr().err == ("terminated (SIGTERM); the same command continues from the last complete "
                                       "checkpoint or output\n")
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_reward_function_that_cannot_start_is_a_configuration_error_naming_its_cause(ray_session):
    """It was a WorkerFailure whose first line said only that a worker died, and 50 lines of Ray's traceback."""
    from pebr.config import ConfigError, load_config
    from pebr.trainer.main import start_reward_worker

    cfg = load_config([f"config={ROOT}/examples/pebr_stage2.yaml", "worker.actor.model.model_path=Qwen/Qwen2.5-VL-3B",
                       "data.train_files=dataset/train.json",
                       f"worker.reward.reward_function={ROOT}/examples/reward_function/pebr_2.py:nope"])
    with pytest.raises(ConfigError, match=r"reward_function=.*pebr_2.py:nope.*start-up raised .*has no function 'nope'"):
        start_reward_worker(cfg)


def test_an_output_folder_that_takes_no_files_is_refused_before_any_worker(tiny_model_dir, synthetic_data_dir, capsys):
    """They failed with a traceback once Ray and the workers had started (or, for the samples, at the first
    write)."""
    from pebr.trainer import main as trainer_main
    from pebr.trainer import sample_main

    common = [f"worker.actor.model.model_path={tiny_model_dir}", f"data.train_files={synthetic_data_dir}/train.json",
              f"data.image_dir={synthetic_data_dir}/images"]
    assert trainer_main.main([f"config={ROOT}/examples/pebr_stage2.yaml", f"config={ROOT}/examples/pebr_cpu.yaml",
                              *common, "trainer.save_checkpoint_path=/proc/pebr_ckpt"]) == 2
    assert "trainer.save_checkpoint_path: cannot write into /proc/pebr_ckpt" in capsys.readouterr().err
    assert sample_main.main([f"config={ROOT}/examples/pebr_sample.yaml", *common,
                             "trainer.sample_output=/proc/pebr/rollouts.jsonl"]) == 2
    assert "trainer.sample_output='/proc/pebr/rollouts.jsonl': cannot write into /proc/pebr" in capsys.readouterr().err


def test_the_model_builders_replace_no_one_elses_folder_and_say_what_they_cannot_use(tmp_path):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "model.safetensors").write_text("someone's model")
    runs = {"make_tiny_model.py": (["--output", str(tmp_path / "other")], "holds files this script did not write"),
            "train_tiny_clip.py": (["--output", str(tmp_path / "clip"), "--image_size", "100", "--steps", "2"],
                                   "image_size 100 is not a multiple of patch_size 16")}
    for script, (argv, message) in runs.items():
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", script), *argv], capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert (tmp_path / "other" / "model.safetensors").read_text() == "someone's model"


@pytest.mark.slow
def test_a_run_shuts_down_the_ray_it_started_so_the_next_run_in_the_process_starts_its_own(
        tiny_model_dir, synthetic_data_dir, tmp_path):
    """A second run in one Python process joined the first one's cluster (a remote one, say) whatever its own
    settings, and waited for workers that cluster could not place. A fresh process: this one's Ray may be up."""
    script = ("import sys, ray\nfrom pebr.trainer.main import main\n"
              "print('EXIT', main(sys.argv[1:]), 'RAY UP', ray.is_initialized())\n")
    argv = [f"config={ROOT}/examples/pebr_stage2.yaml", f"config={ROOT}/examples/pebr_cpu.yaml",
            f"worker.actor.model.model_path={tiny_model_dir}", f"data.train_files={synthetic_data_dir}/train.json",
            f"data.image_dir={synthetic_data_dir}/images", f"trainer.save_checkpoint_path={tmp_path}/run",
            # fails after Ray started: the reward function cannot be loaded
            f"worker.reward.reward_function={ROOT}/examples/reward_function/pebr_2.py:nope"]
    proc = subprocess.run([sys.executable, "-c", script, *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "RAY_ADDRESS": "", "PYTHONPATH": ROOT})
    assert "EXIT 2 RAY UP False" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
