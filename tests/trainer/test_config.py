"""Configuration: every recipe loads through validation; bad settings name the key."""

from __future__ import annotations

import glob
import os
import re
import sys

import pytest

from pebr.config import ConfigError, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REQUIRED = ["worker.actor.model.model_path=Qwen/Qwen2.5-VL-7B-Instruct", "data.train_files=dataset/train.json"]


def stage(name: str) -> str:
    return f"config={os.path.join(ROOT, 'examples', name)}"


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "examples", "pebr_stage*.yaml"))))
def test_stage_recipes_validate(path):
    cfg = load_config([f"config={path}", *REQUIRED])
    assert cfg.algorithm.adv_estimator == "grpo"
    assert cfg.algorithm.kl_penalty == "low_var_kl" and cfg.algorithm.kl_coef == pytest.approx(0.01)
    assert cfg.worker.rollout.n == 8 and cfg.worker.rollout.temperature == pytest.approx(1.2)
    # A GPU recipe on a machine without GPUs is refused (it fell back to N workers on CPU without a word).
    assert cfg.trainer.device == "cuda"


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "examples", "pebr_stage*.yaml"))))
def test_stage_recipes_with_cpu_overlay_validate(path):
    cfg = load_config([f"config={path}", stage("pebr_cpu.yaml"), *REQUIRED])
    assert cfg.world_size == 2 and cfg.trainer.device == "cpu"


def test_stage_settings_are_the_papers():
    s1 = load_config([stage("pebr_stage1.yaml"), *REQUIRED])
    s2 = load_config([stage("pebr_stage2.yaml"), *REQUIRED])
    assert (s1.data.rollout_batch_size, s1.worker.actor.global_batch_size, s1.world_size) == (560, 112, 7)
    assert (s2.data.rollout_batch_size, s2.worker.actor.global_batch_size, s2.world_size) == (512, 128, 8)
    assert s1.worker.reward.reward_function.endswith("pebr_1.py:compute_score")
    assert s2.worker.reward.reward_function.endswith("pebr_2.py:compute_score")
    assert s1.trainer.total_epochs == 1 and s2.trainer.total_epochs == 2


def test_overrides_win_over_files():
    cfg = load_config([stage("pebr_stage2.yaml"), *REQUIRED, "worker.rollout.n=4", "worker.actor.optim.lr=3e-6"])
    assert cfg.worker.rollout.n == 4 and cfg.worker.actor.optim.lr == pytest.approx(3e-6)


@pytest.mark.parametrize("override, key", [
    ("worker.rollout.nn=4", "worker.rollout.nn"),
    ("worker.rollout.n=four", "worker.rollout.n"),
    ("data.rollout_batch_size=500", "data.rollout_batch_size=500 must be a multiple of worker.actor.global_batch_size"),
    ("worker.actor.global_batch_size=1000", "worker.actor.global_batch_size=1000 is larger than"),
    ("worker.rollout.mm_cache_gb=-1", "worker.rollout.mm_cache_gb=-1.0 must be >= 0"),
    ("trainer.n_gpus_per_node=3 worker.rollout.tensor_parallel_size=1",
     "global_batch_size x worker.rollout.n = 1024 must be divisible by the number of workers (3)"),
    ("worker.rollout.n=1", "worker.rollout.n"),
    ("algorithm.adv_estimator=ppo_critic", "algorithm.adv_estimator"),
    ("algorithm.kl_penalty=k9", "algorithm.kl_penalty"),
    ("worker.rollout.tensor_parallel_size=3", "tensor_parallel_size"),
    ("data.on_bad_record=ignore", "data.on_bad_record"),
    ("algorithm.old_logprobs=engine", "algorithm.old_logprobs"),
    ("data.val_files=/nonexistent/val.json", "data.val_files='/nonexistent/val.json': no such file"),
    ("data.train_files=./nonexistent/", "data.train_files"),
    ("data.max_prompt_length=[512", "override 'data.max_prompt_length=[512': its value is not YAML"),
    ("data.max_response_length=01024", "data.max_response_length=01024 is read by YAML as 532"),
    ("trainer.save_freq=1:00", "trainer.save_freq=1:00 is read by YAML as 60"),
    # numpy's seeds: vLLM refused another one at engine start, after Ray, naming no key.
    ("worker.rollout.seed=-1", "worker.rollout.seed=-1 must be in [0, 2**32 - 8]"),
    ("worker.rollout.seed=4294967295", "worker.rollout.seed=4294967295 must be in [0, 2**32 - 8] (numpy's seeds; "
     "each of the 8 rollout engines takes it plus its index)"),
    # One vLLM engine per tensor-parallel group of 2: 4 seeds (the bound was the 8 workers').
    ("worker.rollout.seed=4294967293 worker.rollout.tensor_parallel_size=2",
     "worker.rollout.seed=4294967293 must be in [0, 2**32 - 4] (numpy's seeds; each of the 4 rollout engines"),
    ("data.seed=4294967296", "data.seed=4294967296 must be in [0, 2**32 - 1]"),
    # Not a hub id ("name" or "org/name"): the recipes' default warm-up path before the warm-up was run.
    ("worker.actor.model.model_path=saves/pebr_r1/qwen2_5vl_7b/full_sft_warm_up",
     "model_path='saves/pebr_r1/qwen2_5vl_7b/full_sft_warm_up': no such directory"),
    ("worker.actor.model.model_path=tests/no_model", "model_path='tests/no_model': no such directory"),
    (f"worker.actor.model.model_path={ROOT}/examples", "/examples' holds no config.json"),
    # A processor traceback from inside the first load, or an error blaming model_path.
    ("worker.actor.model.tokenizer_path=./no/tokenizer", "tokenizer_path='./no/tokenizer': no such directory"),
    (f"worker.actor.model.tokenizer_path={ROOT}/examples",
     "/examples' holds no tokenizer_config.json or tokenizer.json: not a Hugging Face tokenizer directory"),
    # EasyR1 keys this project does not implement are refused, not silently ignored.
    ("worker.actor.offload.offload_params=true", "worker.actor.offload.offload_params"),
    ("worker.ref.offload.offload_optimizer=true", "worker.ref.offload.offload_optimizer"),
    ("worker.actor.fsdp.enable_rank0_init=true", "worker.actor.fsdp.enable_rank0_init"),
    # FSDP2 reshards after a backward: the reference (forwards only) stayed gathered on every rank for good.
    ("worker.ref.fsdp.enable_full_shard=false", "worker.ref.fsdp.enable_full_shard=false: the reference model runs "
     "forwards only"),
    ("worker.actor.ulysses_sequence_parallel_size=4", "ulysses_sequence_parallel_size=4 is not implemented"),
    ("worker.actor.optim.strategy=adamw_bf16", "worker.actor.optim.strategy='adamw_bf16' is not implemented"),
    ("worker.hybrid_engine=false", "worker.hybrid_engine=False is not implemented"),
    ("trainer.val_generations_to_log=3", "trainer.val_generations_to_log=3 is not implemented"),
    ("algorithm.adv_estimator=remax", "algorithm.adv_estimator=remax is not implemented"),
    ("worker.rollout.temperature=0", "worker.rollout.temperature=0.0 must be positive for training"),
    ("worker.actor.clip_ratio_dual=1.0", "worker.actor.clip_ratio_dual=1.0 must be > 1"),
    ("worker.rollout.val_override_config.temprature=0.5", "val_override_config has unknown keys"),
    # Refused at load, not at the first rollout or validation (vLLM), nor by training nothing.
    ("worker.rollout.top_p=1.5", "worker.rollout.top_p=1.5 must be in"),
    ("worker.rollout.val_override_config.n=two", "val_override_config.n='two' must be >= 1"),
    ("worker.rollout.val_override_config.n=0", "val_override_config.n=0 must be >= 1"),
    ("worker.rollout.val_override_config.max_tokens=-5", "val_override_config.max_tokens=-5 must be >= 1"),
    ("worker.rollout.val_override_config.top_k=-3", "val_override_config.top_k=-3 must be -1 or 0 (off) or >= 1"),
    ("worker.rollout.val_override_config.max_tokens=9000", "val_override_config.max_tokens=9000 is more than "
     "data.max_response_length=2048, which sizes the rollout engine"),
    ("trainer.logger=[console,wandbb]", "trainer.logger has unknown back-ends"),
    ("trainer.val_freq=5", "trainer.val_freq=5 needs data.val_files"),
    ("trainer.val_only=true", "trainer.val_only=true needs data.val_files"),
    ("trainer.max_steps=-1", "trainer.max_steps=-1 must be >= 1, or null"),
    ("trainer.total_epochs=0", "trainer.total_epochs=0 must be >= 1"),
    ("worker.actor.ppo_epochs=0", "worker.actor.ppo_epochs"),
    ("worker.actor.max_grad_norm=0", "worker.actor.max_grad_norm=0.0 must be positive"),
    ("worker.actor.optim.lr=-1", "worker.actor.optim.lr=-1.0 must be positive"),
    ("worker.actor.optim.betas=[0.9]", "must be two numbers in"),
    ("worker.actor.optim.lr_warmup_ratio=1.5", "worker.actor.optim.lr_warmup_ratio=1.5 must be in"),
    ("worker.actor.optim.min_lr_ratio=2", "worker.actor.optim.min_lr_ratio=2.0 must be in"),
    ("data.min_pixels=900000", "data.min_pixels=900000 is larger than data.max_pixels=802816"),
    # Passed validation and failed in vLLM or the workers after Ray started, or were ignored.
    ("worker.rollout.gpu_memory_utilization=1.5", "gpu_memory_utilization=1.5 must be in"),
    ("worker.rollout.gpu_memory_utilization=0", "gpu_memory_utilization=0.0 must be in"),
    ("worker.rollout.top_k=-5", "worker.rollout.top_k=-5 must be -1 or 0"),
    ("worker.rollout.cpu_kv_cache_gb=0", "cpu_kv_cache_gb=0.0 must be a whole number of GiB, at least 1"),
    ("worker.rollout.cpu_kv_cache_gb=2.5", "cpu_kv_cache_gb=2.5 must be a whole number"),  # was rounded to 2
    # A crash in the image resizing (math domain error, division by zero) when the data loaded.
    ("data.min_pixels=null data.max_pixels=-1", "data.max_pixels=-1 must be at least 1"),
    ("data.min_pixels=0 data.max_pixels=0", "data.min_pixels=0 must be at least 1"),
    ("data.min_pixels=50 data.max_pixels=100", "data.max_pixels=100 is below 28x28 = 784"),
    # torch's "Invalid weight_decay value" from inside every worker, after the models loaded.
    ("worker.actor.optim.weight_decay=-1", "worker.actor.optim.weight_decay=-1.0 must be at least 0"),
    # Every worker call timed out at once.
    ("trainer.worker_timeout_s=0", "trainer.worker_timeout_s=0.0 must be positive"),
    # The constant schedule ignored it.
    ("worker.actor.optim.min_lr_ratio=0.5", "min_lr_ratio=0.5 acts only with worker.actor.optim.warmup_style=cosine"),
    # Two "nodes" on a local one-node cluster ran without a word; NaN CPUs raised in int().
    ("trainer.nnodes=2", "trainer.nnodes=2 needs trainer.ray_address"),
    ("worker.reward.num_cpus=nan", "worker.reward.num_cpus=nan must be a number of CPUs in [0, 1024]"),
    ("worker.reward.num_gpus=-1", "worker.reward.num_gpus=-1 must be a whole number of GPUs in [0, 1024]"),
    # A card's fraction: none is left beside a worker's 0.9 and the CLIP scorer's 0.1.
    ("worker.reward.num_gpus=0.5", "'worker.reward.num_gpus': Value '0.5' of type 'float' could not be converted"),
    # A whole section given a number or a list: the key was '?'.
    ("data=5", "bad configuration key 'data'"),
    ("worker.rollout=[1]", "bad configuration key 'worker.rollout'"),
    ("worker.rollout.limit_images=0", "worker.rollout.limit_images must be positive"),
    ("worker.actor.clip_ratio_low=-1", "clip_ratio_low=-1.0 must be in"),
    ("algorithm.kl_coef=-1", "algorithm.kl_coef=-1.0 must be >= 0"),
    ("worker.actor.optim.lr_warmup_steps=-3", "lr_warmup_steps=-3 must be >= 0"),
    # The steps won, and the ratio was dropped without a word.
    ("worker.actor.optim.lr_warmup_steps=3 worker.actor.optim.lr_warmup_ratio=0.1",
     "lr_warmup_steps=3 and lr_warmup_ratio=0.1 both set the warm-up"),
    ("worker.rollout.max_num_batched_tokens=0", "worker.rollout.max_num_batched_tokens must be positive"),
    ("worker.ref.fsdp.mixed_precision=garbage", "worker.ref.fsdp.mixed_precision"),
    ("worker.ref.fsdp.mixed_precision=bf16", "reference model computes in the actor's precision"),
    ("trainer.load_checkpoint_path=./no_such_ckpt", "load_checkpoint_path='./no_such_ckpt' is not a complete"),
    # Read as -1 (or as "all") without a word; accepted beside max_steps; checked only with filtering on.
    ("trainer.val_freq=-4", "trainer.val_freq=-4 must be -1 or at least 0"),
    ("trainer.save_freq=-5", "trainer.save_freq=-5 must be -1 or at least 0"),
    ("trainer.save_limit=-7", "trainer.save_limit=-7 must be -1 or at least 0"),
    ("data.val_batch_size=0", "data.val_batch_size=0 must be -1 or at least 1"),
    ("trainer.total_epochs=0 trainer.max_steps=3", "trainer.total_epochs=0 must be >= 1"),
    ("algorithm.filter_low=0.9 algorithm.filter_high=0.1", "algorithm.filter_low=0.9 < algorithm.filter_high=0.1"),
    ("algorithm.filter_low=0.5 algorithm.filter_high=0.5", "strictly between them"),  # would keep no group
])
def test_bad_settings_name_the_key(override, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config([stage("pebr_stage2.yaml"), *REQUIRED, *override.split()])


def test_a_model_folder_without_its_weights_is_refused_before_ray(tmp_path, tiny_model_dir):
    """A checkpoint's unmerged actor/huggingface folder (config, no weights) failed inside a worker with
    transformers' OSError; the sharded checkpoint beside it is named with the merger too."""
    import shutil

    actor = tmp_path / "global_step_3" / "actor"
    shutil.copytree(tiny_model_dir, actor / "huggingface", ignore=shutil.ignore_patterns("*.safetensors"))
    (actor / "shard_index.json").write_text("{}")
    model_path = "worker.actor.model.model_path"
    with pytest.raises(ConfigError, match=r"model_path='.*/huggingface' holds no weights .*scripts/model_merger.py"):
        load_config([stage("pebr_stage2.yaml"), *REQUIRED, f"{model_path}={actor / 'huggingface'}"])
    with pytest.raises(ConfigError, match=r"/actor' is a sharded trainer checkpoint; merge it .*--local_dir"):
        load_config([stage("pebr_stage2.yaml"), *REQUIRED, f"{model_path}={actor}"])
    # `pebr.trainer.main --check` (stage 2, before its merge) checks the rest against that folder.
    cfg = load_config([stage("pebr_stage2.yaml"), *REQUIRED, f"{model_path}={actor / 'huggingface'}"],
                      model_weights=False)
    assert cfg.worker.actor.model.model_path == str(actor / "huggingface")


def test_the_last_seeds_with_tensor_parallel_engines_are_taken():
    """Four engines of two ranks take seeds 2**32 - 4 to 2**32 - 1 (the bound counted the 8 ranks)."""
    cfg = load_config([stage("pebr_stage2.yaml"), *REQUIRED, "worker.rollout.tensor_parallel_size=2",
                       f"worker.rollout.seed={2**32 - 4}"])
    assert cfg.world_size == 8 and cfg.worker.rollout.seed == 2**32 - 4


def test_shared_prompts_need_packed_rows():
    with pytest.raises(ConfigError, match=r"share_prompts=true needs worker\.actor\.padding_free=true"):
        load_config([stage("pebr_stage2.yaml"), *REQUIRED, "worker.actor.padding_free=false",
                     "worker.actor.share_prompts=true"])


@pytest.mark.parametrize("overrides, message", [
    (["worker.rollout.name=hf"], r"old_logprobs=rollout needs worker\.rollout\.name=vllm \(got 'hf'\)"),
    (["worker.rollout.temperature=0.7"], r"needs worker\.rollout\.temperature=1\.0, top_p=1\.0 and top_k=-1 "
                                          r"\(got 0\.7, 1\.0, -1\)"),
    (["worker.rollout.top_p=0.9"], r"\(got 1\.0, 0\.9, -1\)"),
    (["worker.rollout.top_k=50"], r"\(got 1\.0, 1\.0, 50\)"),
])
def test_rollout_logprobs_need_the_engines_full_distribution(overrides, message):
    # The stage recipes sample at temperature 1.2 with top_p 0.99: the CPU overlay's 1.0 and 1.0 are accepted.
    base = [stage("pebr_stage2.yaml"), stage("pebr_cpu.yaml"), *REQUIRED, "algorithm.old_logprobs=rollout"]
    with pytest.raises(ConfigError, match=message):
        load_config(base + overrides)
    assert load_config(base).algorithm.old_logprobs == "rollout"


def test_missing_model_path_and_missing_file():
    with pytest.raises(ConfigError, match="model_path"):
        load_config([stage("pebr_stage2.yaml"), "data.train_files=x.json", "worker.actor.model.model_path=null"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(["config=/nonexistent.yaml", *REQUIRED])
    with pytest.raises(ConfigError, match="no such directory"):
        load_config([stage("pebr_stage2.yaml"), "worker.actor.model.model_path=/no/such/model",
                     "data.train_files=x.json"])


def test_missing_reward_function():
    with pytest.raises(ConfigError, match="reward_function"):
        load_config([stage("pebr_stage2.yaml"), *REQUIRED, "worker.reward.reward_function=null"])


def test_validation_overrides_name_the_sampling_fields():
    """`VAL_SAMPLING_KEYS` lists what `SamplingConfig` takes, so a valid override never fails in a worker."""
    import dataclasses

    from pebr.config import VAL_SAMPLING_KEYS
    from pebr.workers.rollout import SamplingConfig

    # (`stream` is the trainer's: a training rollout's step and try; validation is seeded per question instead.
    # `logprobs`: validation reads none, so asking for them only cost the engine their gathering.)
    assert set(VAL_SAMPLING_KEYS) == {f.name for f in dataclasses.fields(SamplingConfig)} - {"stream", "logprobs"}
    with pytest.raises(ConfigError, match=r"val_override_config has unknown keys \['logprobs'\]"):
        load_config([stage("pebr_stage2.yaml"), *REQUIRED, "worker.rollout.val_override_config.logprobs=true"])
    cfg = load_config([stage("pebr_stage2.yaml"), *REQUIRED, "worker.rollout.val_override_config.temperature=0.7",
                       "worker.rollout.val_override_config.n=2"])
    assert dict(cfg.worker.rollout.val_override_config) == {"temperature": 0.7, "n": 2}


def test_text_settings_keep_the_value_as_typed_and_paths_expand_the_home(tmp_path, monkeypatch):
    """YAML would read experiment_name=0710 as the octal 456 and cut a path at " #"."""
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = load_config([stage("pebr_stage2.yaml"), *REQUIRED, "trainer.experiment_name=0710",
                       "trainer.project_name=1e3", "data.image_dir=/data/run #3/img", "worker.rollout.n=4",
                       "trainer.save_checkpoint_path=~/runs/a"])
    assert (cfg.trainer.experiment_name, cfg.trainer.project_name, cfg.data.image_dir) == ("0710", "1e3",
                                                                                           "/data/run #3/img")
    assert cfg.worker.rollout.n == 4 and cfg.trainer.save_checkpoint_path == str(tmp_path / "runs" / "a")
    # Every path setting: the reward file was looked for under a folder named "~", the profile written into one.
    (tmp_path / "mine.py").write_text("def score(reward_inputs):\n    return []\n")
    (tmp_path / "prompt.jinja").write_text("{{ content }}")
    cfg = load_config([stage("pebr_stage2.yaml"), *REQUIRED, "worker.reward.reward_function=~/mine.py:score",
                       "data.format_prompt=~/prompt.jinja", "trainer.profile_dir=~/prof"])
    assert (cfg.worker.reward.reward_function, cfg.data.format_prompt, cfg.trainer.profile_dir) == (
        f"{tmp_path}/mine.py:score", f"{tmp_path}/prompt.jinja", f"{tmp_path}/prof")


@pytest.mark.parametrize("text, message", [
    ("a: [1\n", "cannot be read: while parsing a flow sequence"),
    ("- 1\n- 2\n", "holds a ListConfig, not a mapping of keys"),
    ("trainer:\n  experiment_name: ${nowhere}\n", "bad configuration key"),
    # YAML 1.1 reads these as other numbers than the decimal written: 8 and 60.
    ("worker:\n  rollout:\n    n: 010\n", "worker.rollout.n=010 is read by YAML as 8 (a leading zero makes an octal"),
    ("trainer:\n  save_freq: 1:00\n", "trainer.save_freq=1:00 is read by YAML as 60"),
])
def test_a_config_file_that_is_not_a_mapping_of_keys_is_a_config_error(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config([stage("pebr_stage2.yaml"), *REQUIRED, f"config={path}"])


def test_paths_are_made_absolute_where_the_driver_runs(tmp_path, monkeypatch):
    """Workers on a `ray start` node run in its raylet's directory: a relative run directory (the default one too,
    or an empty setting) put the shards there; a relative local model named nothing. Hub ids stay as given."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "model" / "model.safetensors").write_bytes(b"")  # (only its name is looked at here)
    (tmp_path / "reward.py").write_text("def score(reward_inputs):\n    return []\n")
    cfg = load_config([stage("pebr_stage2.yaml"), "worker.actor.model.model_path=model",
                       "data.train_files=dataset/train.json", "worker.reward.reward_function=reward.py:score",
                       "trainer.save_checkpoint_path=", "trainer.sample_output=out/r.jsonl"], training=False)
    assert cfg.worker.actor.model.model_path == str(tmp_path / "model")
    assert cfg.worker.reward.reward_function == f"{tmp_path}/reward.py:score"
    assert cfg.trainer.save_checkpoint_path == cfg.checkpoint_dir == str(tmp_path / "checkpoints" / "easy_r1" /
                                                                         cfg.trainer.experiment_name)
    assert cfg.trainer.sample_output == str(tmp_path / "out" / "r.jsonl")
    assert cfg.data.train_files == "dataset/train.json"  # nothing there: left for the checks (a hub id, or a typo)
    # A ":" in a folder's name is no function's: the file was left relative (the reward actor read it elsewhere).
    (tmp_path / "run:2").mkdir()
    (tmp_path / "run:2" / "reward.py").write_text("def compute_score(reward_inputs):\n    return []\n")
    cfg = load_config([stage("pebr_stage2.yaml"), "worker.actor.model.model_path=model",
                       "data.train_files=dataset/train.json", "worker.reward.reward_function=run:2/reward.py"],
                      training=False)
    assert cfg.worker.reward.reward_function == f"{tmp_path}/run:2/reward.py"


def test_the_workers_get_the_drivers_settings_but_not_each_nodes_own(monkeypatch):
    from pebr.trainer.ray_trainer import forwarded_environment

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "eth7")  # this node's interface, not the others'
    monkeypatch.setenv("PEBR_UNRELATED_HOME", "x")
    forwarded = forwarded_environment()
    assert forwarded["HF_HUB_OFFLINE"] == "1" and forwarded["PEBR_UNRELATED_HOME"] == "x"
    assert "GLOO_SOCKET_IFNAME" not in forwarded and "PATH" not in forwarded


def test_a_list_setting_given_as_one_value_in_a_file_is_a_list_of_it(tmp_path):
    """As on the command line (trainer.logger=console); OmegaConf said "AnyNode is not a ListConfig"."""
    path = tmp_path / "mine.yaml"
    path.write_text("trainer:\n  logger: console\n")
    assert load_config([stage("pebr_stage2.yaml"), *REQUIRED, f"config={path}"]).trainer.logger == ["console"]
    path.write_text("trainer:\n  logger: console,file\n")
    assert load_config([stage("pebr_stage2.yaml"), *REQUIRED, f"config={path}"]).trainer.logger == ["console", "file"]
    with pytest.raises(ConfigError, match=r"config file '.*' is a directory; name a YAML file in it"):
        load_config([stage("pebr_stage2.yaml"), *REQUIRED, f"config={tmp_path}"])


def test_list_elements_are_typed_and_a_missing_logger_package_is_named(monkeypatch):
    with pytest.raises(ConfigError, match=r"worker\.actor\.optim\.betas\[1\].*could not be converted to Float"):
        load_config([stage("pebr_stage2.yaml"), *REQUIRED, "worker.actor.optim.betas=[0.9,x]"])
    monkeypatch.setitem(sys.modules, "wandb", None)  # what find_spec sees for a package that is not installed
    with pytest.raises(ConfigError, match="trainer.logger includes wandb, but the wandb package is not installed"):
        load_config([stage("pebr_stage2.yaml"), *REQUIRED, "trainer.logger=[console,wandb]"])


def test_a_whole_mapping_on_the_command_line_replaces_the_files_one():
    """reward_function_kwargs={} clears stage 1's CLIP settings (merged, they stayed, and stage 2's reward refused
    them); a dotted key still changes one entry."""
    stage1 = [stage("pebr_stage1.yaml"), *REQUIRED]
    kwargs = load_config(stage1).worker.reward.reward_function_kwargs
    assert "clip_model_path" in kwargs
    assert load_config(stage1 + ["worker.reward.reward_function_kwargs={}"]).worker.reward.reward_function_kwargs == {}
    assert load_config(stage1 + ["worker.reward.reward_function_kwargs={clip_weight: 0}"]
                       ).worker.reward.reward_function_kwargs == {"clip_weight": 0}
    assert load_config(stage1 + ["worker.reward.reward_function_kwargs.clip_weight=0"]
                       ).worker.reward.reward_function_kwargs == {**kwargs, "clip_weight": 0}


def test_the_micro_batch_size_must_divide_a_workers_samples_only_when_it_is_used():
    fixed = [stage("pebr_stage2.yaml"), *REQUIRED, "worker.actor.micro_batch_size_per_device_for_update=3"]
    with pytest.raises(ConfigError, match="micro_batch_size_per_device_for_update=3 must divide"):
        load_config(fixed + ["worker.actor.dynamic_batching=false"])
    load_config(fixed)  # token-budget micro-batches (the recipe's): the size is not used, so not refused


@pytest.mark.parametrize("override, message", [
    ("trainer.total_epochs=0", "trainer.total_epochs=0 must be >= 1 (sampling draws"),
    ("worker.rollout.temperature=-1", "worker.rollout.temperature=-1.0 must be >= 0"),
])
def test_a_sampling_run_refuses_what_would_fail_after_ray_starts(override, message):
    """Sampling skips the training checks; these reached Ray and vLLM (n=0 responses per question)."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config([stage("pebr_sample.yaml"), *REQUIRED, override], training=False)
    load_config([stage("pebr_sample.yaml"), *REQUIRED, "worker.rollout.temperature=0"], training=False)  # greedy: fine


def test_validation_sampling_takes_top_k_0_as_vllm_does():
    load_config([stage("pebr_stage2.yaml"), *REQUIRED, "worker.rollout.val_override_config.top_k=0"])


def test_a_list_setting_given_bare_is_read_as_its_items():
    """trainer.logger=console failed with OmegaConf's "could not be converted to a ListConfig"."""
    cfg = load_config([stage("pebr_stage2.yaml"), *REQUIRED, "trainer.logger=console",
                       "worker.actor.model.lora_rank=8", "worker.actor.model.lora_target_modules=q_proj,v_proj"])
    assert cfg.trainer.logger == ["console"] and cfg.worker.actor.model.lora_target_modules == ["q_proj", "v_proj"]
    assert load_config([stage("pebr_stage2.yaml"), *REQUIRED, "trainer.logger=[console,file]"]).trainer.logger == [
        "console", "file"]


def test_profile_steps_are_counted_from_one():
    assert load_config([stage("pebr_stage2.yaml"), *REQUIRED, "trainer.profile_steps=[1,5]"]).trainer.profile_steps == [
        1, 5]
    with pytest.raises(ConfigError, match=re.escape("trainer.profile_steps=[2, 0]: steps are counted from 1 (the "
                                                    "first step trained); [0] cannot be profiled")):
        load_config([stage("pebr_stage2.yaml"), *REQUIRED, "trainer.profile_steps=[2,0]"])


@pytest.mark.parametrize("recipe", ["pebr_stage2.yaml", "pebr_sample.yaml"])
def test_the_transformers_rollout_refuses_engine_groups(recipe):
    """With hf and tensor_parallel_size 2, the second rank of each group trained on its own samples with the
    first rank's advantages: the controller scores one rank per group, the others reuse its samples by position."""
    with pytest.raises(ConfigError, match="tensor_parallel_size=2 needs worker.rollout.name=vllm"):
        load_config([stage(recipe), *REQUIRED, "worker.rollout.name=hf", "worker.rollout.tensor_parallel_size=2"])


def test_prompt_and_response_past_the_models_context_are_refused_before_ray(tiny_model_dir):
    """vLLM refused max_model_len past max_position_embeddings (4096 here) only after Ray, the actor and the
    reference model had started, naming no data.* key."""
    from pebr.trainer.main import check_fits_context

    base = [stage("pebr_stage2.yaml"), f"worker.actor.model.model_path={tiny_model_dir}",
            "data.train_files=dataset/train.json"]
    check_fits_context(load_config([*base, "data.max_prompt_length=2048", "data.max_response_length=2048"]))
    cfg = load_config([*base, "data.max_prompt_length=2048", "data.max_response_length=2049"])
    with pytest.raises(ConfigError, match=re.escape("data.max_prompt_length=2048 + data.max_response_length=2049 = "
                                                    "4097 tokens is more than the model's context (4096")):
        check_fits_context(cfg)


def test_the_kv_cache_setting_sizes_the_engine_whatever_the_environment_says(monkeypatch):
    """worker.rollout.cpu_kv_cache_gb lost to an exported VLLM_CPU_KVCACHE_SPACE, and was rounded."""
    from pebr.workers.rollout import set_engine_environment

    for name in ("VLLM_CPU_KVCACHE_SPACE", "VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_NO_USAGE_STATS", "DO_NOT_TRACK",
                 "VLLM_USE_AOT_COMPILE"):
        monkeypatch.setenv(name, os.environ.get(name, "0"))  # restored after the test
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "40")
    set_engine_environment(3.0)
    assert os.environ["VLLM_CPU_KVCACHE_SPACE"] == "3"


def test_a_ray_address_with_no_cluster_is_a_configuration_error_at_once(tmp_path):
    """A dead address kept Ray's client retrying for about 14 minutes; a malformed one raised ValueError from
    inside ray.init. Run in a fresh process: this one's Ray may be up already (init_ray then joins nothing)."""
    import socket
    import subprocess

    with socket.socket() as free:  # a port nothing listens on
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    script = ("import sys\nfrom pebr.config import ConfigError, load_config\nfrom pebr.trainer.ray_trainer import init_ray\n"
              "cfg = load_config(sys.argv[1:])\ntry:\n    init_ray(cfg)\nexcept ConfigError as e:\n    print('ERROR', e)\n")
    dead = f"127.0.0.1:{port}"
    for address, environment, said in (
            (dead, "", re.escape(f"trainer.ray_address='{dead}': nothing answers there")),
            ("notanaddress", "", re.escape("trainer.ray_address='notanaddress': no Ray cluster to join")),
            # "auto" as Ray resolves it (it retried a dead one for 14 minutes), and RAY_ADDRESS alone, which
            # `ray job submit` sets (it was ignored: the run started a cluster of its own).
            ("auto", dead, rf"trainer.ray_address='auto' \([\d.]+:{port}\): nothing answers there"),  # (the host's IP)
            (None, dead, re.escape(f"RAY_ADDRESS='{dead}': nothing answers there"))):
        proc = subprocess.run([sys.executable, "-c", script, stage("pebr_stage2.yaml"), *REQUIRED]
                              + ([f"trainer.ray_address={address}"] if address else []), cwd=ROOT,
                              capture_output=True, text=True, timeout=120,
                              env={**os.environ, "RAY_ADDRESS": environment, "PYTHONPATH": ROOT})
        assert re.search(said, proc.stdout), proc.stdout[-2000:] + proc.stderr[-2000:]  # (the old code outlived it)


def test_a_local_cluster_keeps_a_bounded_record_of_actor_calls():
    """The GCS of a local cluster kept 100 000 calls' records (3-4 KB each): its memory grew with every step.
    A fresh process, as above, so that init_ray starts the cluster."""
    import subprocess

    script = ("import sys, ray\nfrom pebr.config import load_config\nfrom pebr.trainer.ray_trainer import init_ray\n"
              "assert init_ray(load_config(sys.argv[1:]))\n"
              "print('CAP', ray._private.worker._global_node._config['task_events_max_num_task_in_gcs'])\n")
    proc = subprocess.run([sys.executable, "-c", script, stage("pebr_stage2.yaml"), *REQUIRED,
                           "trainer.n_gpus_per_node=1"], cwd=ROOT, capture_output=True, text=True, timeout=180,
                          env={**os.environ, "RAY_ADDRESS": "", "PYTHONPATH": ROOT})
    assert "CAP 10000" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]


def test_a_model_folder_whose_path_vllm_reads_as_a_pattern_is_refused_before_any_work(tmp_path, tiny_model_dir):
    """vLLM looks for the weights with a glob of the folder's path: "[x]" in it failed after Ray and every model had
    started ("Cannot find any model weights")."""
    import shutil

    odd = tmp_path / "runs [x]" / "model"
    shutil.copytree(tiny_model_dir, odd)
    with pytest.raises(ConfigError, match=r"cannot load from a path with \*, \? or \[ in it"):
        load_config([f"worker.actor.model.model_path={odd}", "data.train_files=dataset/train.json"])


@pytest.mark.parametrize("text, message", [
    ("trainer:\n  logger: {console: true}\n", "bad configuration key 'trainer.logger': Cannot merge incompatible"),
    ("worker:\n  reward:\n    reward_function_kwargs: [{clip_weight: 0}]\n",
     "bad configuration key 'worker.reward.reward_function_kwargs'"),
    ("trainer:\n  logger: [console, {file: true}]\n", "trainer.logger[1]={'file': True} must be a str"),
])
def test_a_container_of_the_wrong_kind_in_a_file_is_a_config_error(tmp_path, text, message):
    """A mapping where a list goes (or back) raised TypeError ("Cannot merge incompatible container types",
    "unhashable type"): a traceback and exit 1, not the entry points' message and exit 2."""
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config([stage("pebr_stage2.yaml"), *REQUIRED, f"config={path}"])


@pytest.mark.parametrize("override, message", [
    ("trainer.logger.1=wandb", "bad configuration key 'trainer.logger'"),
    ("worker.actor.optim.betas.0=0.8", "bad configuration key 'worker.actor.optim.betas'"),
    ("worker.rollout.val_override_config=[1,2]", "bad configuration key 'worker.rollout.val_override_config'"),
    ("trainer.logger={a: 1}", "trainer.logger[0]={'a': 1} must be a str"),
    ("trainer.logger=[[console]]", "trainer.logger[0]=['console'] must be a str"),
    ("worker.actor.model.lora_target_modules=[[q_proj]]", "lora_target_modules[0]=['q_proj'] must be a str"),
    # An unclosed interpolation raised OmegaConf's GrammarParseError.
    ("trainer.experiment_name=${", "override 'trainer.experiment_name=${': bad configuration key "
                                   "'trainer.experiment_name'"),
    ("data.image_dir=/d/${x", "bad configuration key 'data.image_dir'"),
])
def test_a_container_of_the_wrong_kind_on_the_command_line_is_a_config_error(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config([stage("pebr_stage2.yaml"), *REQUIRED, override])


KWARGS = "worker.reward.reward_function_kwargs"


@pytest.mark.parametrize("words, expected", [
    ([f"{KWARGS}.clip_model_path=X", f"{KWARGS}={{}}"], {}),
    ([f"{KWARGS}={{a: 1}}", f"{KWARGS}={{}}"], {}),
    ([f"{KWARGS}={{a: 1}}", f"{KWARGS}={{b: 2}}"], {"b": 2}),
    ([f"{KWARGS}={{a: 1}}", f"{KWARGS}.b=2"], {"a": 1, "b": 2}),
    (["worker.reward={reward_function_kwargs: {a: 1}}", f"{KWARGS}={{b: 2}}"], {"b": 2}),
])
def test_mapping_overrides_apply_in_command_line_order(words, expected):
    """The whole mappings were applied after every dotted key, and merged with one another: K={a: 1} K={} gave
    {a: 1}."""
    cfg = load_config([stage("pebr_stage2.yaml"), *REQUIRED, *words])
    assert cfg.worker.reward.reward_function_kwargs == expected
    val = "worker.rollout.val_override_config"
    cfg = load_config([stage("pebr_stage2.yaml"), *REQUIRED, f"{val}={{n: 2}}", f"{val}={{}}"])
    assert cfg.worker.rollout.val_override_config == {}


@pytest.mark.parametrize("text, expected", [
    ("reward_function_kwargs: {}", {}),
    ("reward_function_kwargs: {clip_weight: 0}", {"clip_weight": 0}),
    ("num_cpus: 2", None),  # the section without the mapping: stage 1's kwargs stay
])
def test_a_later_config_file_replaces_a_mapping_setting(tmp_path, text, expected):
    stage1 = load_config([stage("pebr_stage1.yaml"), *REQUIRED]).worker.reward.reward_function_kwargs
    path = tmp_path / "mine.yaml"
    path.write_text(f"worker:\n  reward:\n    {text}\n")
    cfg = load_config([stage("pebr_stage1.yaml"), f"config={path}", *REQUIRED])
    assert cfg.worker.reward.reward_function_kwargs == (stage1 if expected is None else expected)


@pytest.mark.parametrize("text, key", [
    ("trainer:\n  experiment_name: 1.10\n",
     "trainer.experiment_name is text, but YAML read its value as the float 1.1"),
    ("trainer:\n  project_name: 2024_01_05\n", "trainer.project_name is text, but YAML read its value as the int"),
    ("trainer:\n  experiment_name: 1:30\n", "trainer.experiment_name is text, but YAML read its value as the int 90"),
    ("data:\n  prompt_key: on\n", "data.prompt_key is text, but YAML read its value as the bool True"),
    ("data:\n  image_dir: 0755\n", "data.image_dir is text, but YAML read its value as the int 493"),
])
def test_a_text_setting_that_yaml_reads_as_something_else_in_a_file_is_refused(tmp_path, text, key):
    """They were retyped without a word ('1.1', '20240105', 'True', '493', '90'), while the command line keeps
    what was typed: the text as written is gone once YAML has read it, so the file must quote it."""
    path = tmp_path / "mine.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(key) + ".*quote it"):
        load_config([stage("pebr_stage2.yaml"), f"config={path}", *REQUIRED])
    path.write_text("trainer:\n  experiment_name: '1.10'\n  project_name: ${trainer.experiment_name}\ndata:\n"
                    "  image_dir: null\n")
    cfg = load_config([stage("pebr_stage2.yaml"), f"config={path}", *REQUIRED])
    assert (cfg.trainer.experiment_name, cfg.trainer.project_name, cfg.data.image_dir) == ("1.10", "1.10", None)


@pytest.mark.parametrize("override", [
    "worker.rollout.temperature=nan", "worker.rollout.temperature=inf", "algorithm.kl_coef=nan",
    "algorithm.kl_coef=inf",
    "worker.actor.clip_ratio_high=nan", "worker.actor.clip_ratio_dual=nan", "worker.actor.optim.lr=inf",
    "worker.actor.optim.weight_decay=inf", "worker.rollout.mm_cache_gb=inf", "algorithm.gamma=nan",
    "worker.actor.model.lora_alpha=nan worker.actor.model.lora_rank=8",
    "worker.actor.model.lora_alpha=inf worker.actor.model.lora_rank=8",
    "worker.rollout.val_override_config.temperature=.inf",
])
def test_a_float_setting_must_be_a_finite_number(override):
    """NaN fails no comparison, and inf passed every lower bound: both reached the workers."""
    key = override.split()[0].split("=")[0]
    with pytest.raises(ConfigError, match=re.escape(key) + r"=(nan|inf) must be (a finite number|in \[0, 1\])"):
        load_config([stage("pebr_stage2.yaml"), *REQUIRED, *override.split()])


@pytest.mark.parametrize("override, message", [
    ("worker.rollout.block_size=0", "worker.rollout.block_size must be positive, got 0"),
    ("worker.rollout.block_size=-1", "worker.rollout.block_size must be positive, got -1"),
    ("worker.rollout.block_size=7 trainer.device=cpu", "worker.rollout.block_size=7 must be a multiple of 32 on CPU"),
    ("algorithm.gamma=0.9", "algorithm.gamma=0.9 acts only with algorithm.adv_estimator=reinforce_plus_plus"),
    ("algorithm.gamma=2 algorithm.adv_estimator=reinforce_plus_plus", "algorithm.gamma=2.0 must be in [0, 1]"),
    ("worker.actor.model.lora_alpha=-3", "worker.actor.model.lora_alpha=-3.0 acts only with LoRA"),
    ("worker.actor.model.lora_alpha=32", "worker.actor.model.lora_alpha=32.0 acts only with LoRA"),
    ("worker.actor.model.lora_target_modules=[q_proj]", "lora_target_modules=['q_proj'] acts only with LoRA"),
])
def test_settings_that_cannot_work_or_are_read_by_nothing_are_refused(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config([stage("pebr_stage2.yaml"), *REQUIRED, *override.split()])


def test_the_settings_beside_the_refused_ones_still_load():
    base = [stage("pebr_stage2.yaml"), *REQUIRED]
    assert load_config(base + ["worker.rollout.block_size=16"]).worker.rollout.block_size == 16  # CUDA: any size
    assert load_config([stage("pebr_stage2.yaml"), stage("pebr_cpu.yaml"), *REQUIRED]).worker.rollout.block_size == 32
    discounted = load_config(base + ["algorithm.gamma=0.9", "algorithm.adv_estimator=reinforce_plus_plus"])
    assert discounted.algorithm.gamma == 0.9
    lora = load_config(base + ["worker.actor.model.lora_rank=8", "worker.actor.model.lora_alpha=32",
                               "worker.actor.model.lora_target_modules=[q_proj]"]).worker.actor.model
    assert (lora.lora_alpha, lora.lora_target_modules) == (32.0, ["q_proj"])


def test_a_config_file_path_expands_the_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "mine.yaml").write_text("worker:\n  rollout:\n    n: 4\n")
    assert load_config([stage("pebr_stage2.yaml"), "config=~/mine.yaml", *REQUIRED]).worker.rollout.n == 4


@pytest.mark.parametrize("image_dir", [r"/data/\${USER}/img", r"/data/\\\${USER}/img", "/data/a\\b/img"])
def test_the_written_configuration_loads_back_as_the_same_values(tmp_path, image_dir):
    """A literal "${USER}" (given escaped) was written as is, and then read back as an interpolation."""
    from pebr.config import config_to_yaml

    cfg = load_config([stage("pebr_stage2.yaml"), *REQUIRED, f"data.image_dir={image_dir}",
                       f"{KWARGS}.note={image_dir}"])
    (tmp_path / "config.yaml").write_text(config_to_yaml(cfg))
    assert load_config([f"config={tmp_path / 'config.yaml'}"]) == cfg


@pytest.mark.parametrize("override, refused", [
    ("worker={rollout: {n: 4}}", False),
    ("worker={actor: {model: {model_path: /tmp/model}}}", True),
    ("worker.actor.model.model_path=/tmp/model", True),
])
def test_a_recipe_refuses_a_mapping_override_only_if_it_holds_the_setting(override, refused):
    """examples/refuse_overrides.sh stopped at any mapping above the setting, whatever it held."""
    import subprocess

    script = 'source examples/refuse_overrides.sh; refuse_overrides "worker.actor.model.model_path=MODEL_PATH" "$1"'
    proc = subprocess.run(["bash", "-c", script, "recipe", override], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == (2 if refused else 0), proc.stderr
