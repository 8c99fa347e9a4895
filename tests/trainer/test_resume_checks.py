"""A checkpoint the workers could not resume from is refused by the driver, before any worker starts."""

from __future__ import annotations

import os
import re

import pytest
import torch

from pebr import checkpoint


def saved(tmp_path, step: int, with_optimizer: bool, lora: dict | None = None, freeze_vision_tower: bool = False) -> str:
    """A real checkpoint of a small model, written as a one-rank run writes it."""
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3) if with_optimizer else None
    if optimizer is not None:
        model(torch.randn(2, 4)).sum().backward()
        optimizer.step()
    checkpoint.save_sharded(str(tmp_path / f"global_step_{step}.partial" / "actor"), model, optimizer, None,
                            rank=0, world_size=1, lora=lora, freeze_vision_tower=freeze_vision_tower)
    return checkpoint.finalize(str(tmp_path), step, {"global_step": step}, save_limit=-1)


def test_a_full_checkpoint_resumes_with_its_world_size_only(tmp_path):
    path = saved(tmp_path, 1, with_optimizer=True)
    checkpoint.check_resumable(path, 1)
    with pytest.raises(checkpoint.CheckpointError, match=r"saved by 1 workers and resumes only with as many "
                                                         r"\(trainer\.nnodes x trainer\.n_gpus_per_node = 2 now\)"):
        checkpoint.check_resumable(path, 2)


def test_a_checkpoint_resumes_with_its_lora_settings_only(tmp_path):
    adapters = {"rank": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj"]}
    with_lora = saved(tmp_path / "lora", 1, with_optimizer=True, lora=adapters)
    checkpoint.check_resumable(with_lora, 1, dict(adapters))
    for other in (None, {**adapters, "rank": 8}, {**adapters, "target_modules": ["q_proj"]}):
        with pytest.raises(checkpoint.CheckpointError, match=r"saved with LoRA settings \{'rank': 4.*this run has "
                                                             + re.escape(str(other))):
            checkpoint.check_resumable(with_lora, 1, other)
    plain = saved(tmp_path / "plain", 1, with_optimizer=True)
    with pytest.raises(checkpoint.CheckpointError, match=r"saved with LoRA settings None and this run has \{'rank'"):
        checkpoint.check_resumable(plain, 1, adapters)


def test_a_checkpoint_resumes_with_its_vision_tower_freezing_only(tmp_path):
    """Saved frozen, resumed trainable: torch's "Missing optimizer state for parameter ..." came from inside the
    workers, after every engine had been built, advising a StateDictOptions nobody here can pass."""
    frozen = saved(tmp_path, 1, with_optimizer=True, freeze_vision_tower=True)
    checkpoint.check_resumable(frozen, 1, None, freeze_vision_tower=True)
    with pytest.raises(checkpoint.CheckpointError, match=r"saved with worker\.actor\.model\.freeze_vision_tower=True "
                                                         r"and this run has False"):
        checkpoint.check_resumable(frozen, 1, None, freeze_vision_tower=False)


def test_a_checkpoint_that_lost_a_ranks_files_is_refused_before_the_workers_start(tmp_path):
    """Rank 1's shard gone from a published checkpoint: the check passed and the worker then blamed the world
    size, which was right."""
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    for rank in (0, 1):  # the files of a two-rank save (each rank writing the whole tensors is enough here)
        checkpoint.save_sharded(str(tmp_path / "global_step_1.partial" / "actor"), model, optimizer, None, rank, 2)
    path = checkpoint.finalize(str(tmp_path), 1, {"global_step": 1}, save_limit=-1)
    checkpoint.check_resumable(path, 2)
    lost = os.path.join(path, "actor", "model_world_size_2_rank_1.safetensors")
    os.remove(lost)
    with pytest.raises(checkpoint.CheckpointError, match=re.escape(lost) + " is missing: the checkpoint is incomplete"):
        checkpoint.check_resumable(path, 2)
    with pytest.raises(checkpoint.CheckpointError, match=r"is missing \(found .*\): the checkpoint is incomplete$"):
        checkpoint.load_sharded(os.path.join(path, "actor"), model, optimizer, None, rank=1, world_size=2)


def test_a_step_directory_with_a_leading_zero_is_not_taken_for_a_checkpoint(tmp_path):
    """"global_step_05" was read as step 5, whose path global_step_5 does not exist: auto-resume picked it and
    the next save's rotation died on renaming it."""
    saved(tmp_path, 3, with_optimizer=False)
    os.rename(saved(tmp_path / "copy", 5, with_optimizer=False), tmp_path / "global_step_05")
    assert checkpoint.complete_steps(str(tmp_path)) == [3]
    saved(tmp_path, 6, with_optimizer=False)
    checkpoint.save_sharded(str(tmp_path / "global_step_7.partial" / "actor"), torch.nn.Linear(4, 3), None, None, 0, 1)
    checkpoint.finalize(str(tmp_path), 7, {"global_step": 7}, save_limit=1)
    assert checkpoint.complete_steps(str(tmp_path)) == [7] and (tmp_path / "global_step_05").is_dir()


def test_a_weights_only_checkpoint_is_refused_with_the_way_forward(tmp_path):
    path = saved(tmp_path, 2, with_optimizer=False)  # what trainer.save_model_only=true writes
    with pytest.raises(checkpoint.CheckpointError, match=r"weights only \(saved with trainer\.save_model_only=true\)"
                                                         r".*scripts/model_merger\.py"):
        checkpoint.check_resumable(path, 1)
    os.remove(os.path.join(path, "actor", checkpoint.INDEX_FILE))
    with pytest.raises(checkpoint.CheckpointError, match=r"shard_index\.json cannot be read"):
        checkpoint.check_resumable(path, 1)


def test_rotation_keeps_this_save_and_never_deletes_a_later_step(tmp_path):
    for step in (1, 2, 3):
        saved(tmp_path, step, with_optimizer=False)
    checkpoint.save_sharded(str(tmp_path / "global_step_4.partial" / "actor"), torch.nn.Linear(4, 3), None, None, 0, 1)
    checkpoint.finalize(str(tmp_path), 4, {"global_step": 4}, save_limit=2)
    assert checkpoint.complete_steps(str(tmp_path)) == [3, 4]
    # Steps of another run above this save: it used to be rotated away itself, leaving the other run's steps.
    for step in (10, 20):
        saved(tmp_path, step, with_optimizer=False)
    assert checkpoint.later_steps(str(tmp_path), 4) == [10, 20]
    checkpoint.save_sharded(str(tmp_path / "global_step_5.partial" / "actor"), torch.nn.Linear(4, 3), None, None, 0, 1)
    checkpoint.finalize(str(tmp_path), 5, {"global_step": 5}, save_limit=2)
    assert checkpoint.complete_steps(str(tmp_path)) == [4, 5, 10, 20]


@pytest.mark.parametrize("missing", ["model_world_size_2_rank_1.safetensors", "optim_world_size_2_rank_1.safetensors",
                                     "extra_state_world_size_2_rank_1.json"])
def test_an_incomplete_save_is_not_published_and_deletes_no_earlier_checkpoint(tmp_path, missing):
    """Rank 1's files absent from the head's directory (each node saving to its own disk): publishing it made it
    `latest` and rotation deleted the only complete checkpoint."""
    saved(tmp_path, 1, with_optimizer=True)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    actor = str(tmp_path / "global_step_2.partial" / "actor")
    for rank in (0, 1):  # two ranks' files, as a 2-rank run on one shared disk writes them
        checkpoint.save_sharded(actor, model, optimizer, None, rank=rank, world_size=2)
    os.remove(os.path.join(actor, missing))
    with pytest.raises(checkpoint.CheckpointError, match=rf"step 2 is incomplete.*{missing} is missing.*shared"):
        checkpoint.finalize(str(tmp_path), 2, {"global_step": 2}, save_limit=1)
    assert checkpoint.complete_steps(str(tmp_path)) == [1]
    assert checkpoint.latest_checkpoint(str(tmp_path)).endswith("global_step_1")


def test_a_crash_while_deleting_leaves_no_half_checkpoint(tmp_path, monkeypatch):
    for step in (1, 2):
        saved(tmp_path, step, with_optimizer=True)
    real_rmtree = checkpoint.shutil.rmtree

    def killed_midway(path, ignore_errors=False):
        if path.endswith(".deleting") and os.path.isdir(path):
            os.remove(os.path.join(path, "actor", "model_world_size_1_rank_0.safetensors"))
            raise KeyboardInterrupt  # the process dies with part of the directory gone
        real_rmtree(path, ignore_errors=ignore_errors)

    monkeypatch.setattr(checkpoint.shutil, "rmtree", killed_midway)
    checkpoint.save_sharded(str(tmp_path / "global_step_3.partial" / "actor"), torch.nn.Linear(4, 3), None, None, 0, 1)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.finalize(str(tmp_path), 3, {"global_step": 3}, save_limit=2)
    monkeypatch.setattr(checkpoint.shutil, "rmtree", real_rmtree)
    # Step 1 was renamed away before its files went: it is not taken for a complete checkpoint.
    assert checkpoint.complete_steps(str(tmp_path)) == [2, 3]
    assert checkpoint.remove_partial(str(tmp_path)) == ["global_step_1.deleting"]
    assert sorted(os.listdir(tmp_path)) == ["global_step_2", "global_step_3"]


class Tied(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(5, 4)
        self.head = torch.nn.Linear(4, 5, bias=False)
        self.head.weight = self.embed.weight  # as Qwen2.5-VL-3B ties lm_head to embed_tokens


def test_tied_weights_save_and_load(tmp_path):
    """safetensors refuses tensors sharing memory; on CPU the local shards are not copied on their way out."""
    model = Tied()
    actor = str(tmp_path / "global_step_1.partial" / "actor")
    checkpoint.save_sharded(actor, model, None, None, rank=0, world_size=1)
    final = checkpoint.finalize(str(tmp_path), 1, {"global_step": 1}, save_limit=-1)
    merged = checkpoint.merge_shards(os.path.join(final, "actor"))
    assert torch.equal(merged["head.weight"], model.embed.weight) and torch.equal(merged["embed.weight"],
                                                                                   model.embed.weight)
    fresh = Tied()
    checkpoint.load_sharded(os.path.join(final, "actor"), fresh, None, None, rank=0, world_size=1)
    assert torch.equal(fresh.embed.weight, model.embed.weight) and fresh.head.weight is fresh.embed.weight


@pytest.mark.parametrize("damage", ["index", "shard"])
def test_damaged_files_are_named(tmp_path, damage):
    path = saved(tmp_path, 1, with_optimizer=False)
    actor = os.path.join(path, "actor")
    target = os.path.join(actor, checkpoint.INDEX_FILE if damage == "index" else "model_world_size_1_rank_0.safetensors")
    with open(target, "r+b") as f:
        f.truncate(5)
    with pytest.raises(checkpoint.CheckpointError, match=rf"{target} cannot be read .*damaged"):
        checkpoint.merge_shards(actor)


def _trainer_config(tmp_path, *overrides: str):
    """A configuration the trainer accepts (2 prompts x 2 responses, one rank) and its run directory."""
    from pebr.config import load_config

    run_dir = tmp_path / "run"
    (tmp_path / "model").mkdir(exist_ok=True)
    (tmp_path / "model" / "config.json").write_text("{}")  # a model directory, as far as the config checks look
    (tmp_path / "model" / "model.safetensors").write_bytes(b"")
    (tmp_path / "train.json").write_text("[]")
    cfg = load_config([f"worker.actor.model.model_path={tmp_path / 'model'}", f"data.train_files={tmp_path}/train.json",
                       "worker.reward.reward_function=" + os.path.join(os.path.dirname(__file__), "__init__.py"),
                       "trainer.n_gpus_per_node=1", "data.rollout_batch_size=2", "worker.actor.global_batch_size=2",
                       "worker.rollout.n=2", f"trainer.save_checkpoint_path={run_dir}", *overrides])
    return cfg, run_dir


def _save_run_step(run_dir, step: int, sampler) -> None:
    """A complete checkpoint of `step` in `run_dir` whose data order is `sampler`'s."""
    model = torch.nn.Linear(4, 3)
    checkpoint.save_sharded(str(run_dir / f"global_step_{step}.partial" / "actor"), model,
                            torch.optim.AdamW(model.parameters()), None, rank=0, world_size=1)
    checkpoint.finalize(str(run_dir), step, {"global_step": step, "sampler": sampler.state_dict()}, save_limit=-1)


def test_a_resume_with_another_batch_size_is_refused_naming_the_settings(tmp_path):
    """The saved data order fits one data set and batch size: another is a CheckpointError (exit 2 through
    run_cli), raised before any worker starts, not a ValueError traceback."""
    from pebr.data import StatefulBatchSampler
    from pebr.trainer.ray_trainer import RayPPOTrainer

    cfg, run_dir = _trainer_config(tmp_path)
    _save_run_step(run_dir, 1, StatefulBatchSampler(10, 3, shuffle=True, seed=cfg.data.seed, drop_last=True))
    sampler = StatefulBatchSampler(10, 2, shuffle=True, seed=cfg.data.seed, drop_last=True)
    with pytest.raises(checkpoint.CheckpointError, match=r"global_step_1 cannot continue its data order: sampler "
                                                         r"state key 'batch_size' is 3, but this sampler has 2.*"
                                                         r"data\.train_files and data\.rollout_batch_size"):
        RayPPOTrainer(cfg, None, None, sampler, None)


class WorkersNotStarted(Exception):
    pass


@pytest.fixture
def no_workers(monkeypatch):
    """The trainer's constructor stops where its workers would start (its checks and config.yaml come before)."""
    from pebr.trainer import ray_trainer

    def refuse(*args, **kwargs):
        raise WorkersNotStarted

    monkeypatch.setattr(ray_trainer, "WorkerGroup", refuse)


def test_a_resume_records_the_data_seed_its_order_continues_with(tmp_path, capsys, no_workers):
    """The saved data order goes on with its own seed: config.yaml recorded the seed given now, which the run
    did not use. It records the saved one, and the run says the given one is ignored."""
    import yaml

    from pebr.data import StatefulBatchSampler
    from pebr.trainer import ray_trainer

    cfg, run_dir = _trainer_config(tmp_path, "data.seed=5")
    _save_run_step(run_dir, 1, StatefulBatchSampler(10, 2, shuffle=True, seed=1, drop_last=True))
    sampler = StatefulBatchSampler(10, 2, shuffle=True, seed=cfg.data.seed, drop_last=True)
    with pytest.raises(WorkersNotStarted):
        ray_trainer.RayPPOTrainer(cfg, None, None, sampler, None)
    assert sampler.seed == 1
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["data"]["seed"] == 1
    assert "warning: data.seed=5 is ignored: " in capsys.readouterr().out


def test_a_model_of_other_widths_is_refused_naming_a_tensor_and_both_shapes(tmp_path):
    """The same parameter names at other sizes: torch's own error printed the model's shape on both sides."""
    path = saved(tmp_path, 1, with_optimizer=True)
    actor = os.path.join(path, "actor")
    wider = torch.nn.Linear(4, 5)
    with pytest.raises(checkpoint.CheckpointError, match=r"holds another model: 2 tensors differ in shape, e\.g\. "
                                                         r"weight \[3, 4\] in the checkpoint, \[5, 4\] in"):
        checkpoint.load_sharded(actor, wider, None, None, rank=0, world_size=1)
    same = torch.nn.Linear(4, 3)
    checkpoint.load_sharded(actor, same, None, None, rank=0, world_size=1)


def test_a_resume_runs_on_the_configured_optimizer_settings(tmp_path, caplog):
    """The checkpoint's moments and schedule position are loaded, its lr, betas and weight decay are not: a resume
    with another worker.actor.optim.lr ran on the old one while config.yaml recorded the new one."""
    def build(lr, betas, weight_decay):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 3)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=betas, weight_decay=weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 4))
        return model, optimizer, scheduler

    model, optimizer, scheduler = build(1e-3, (0.9, 0.999), 0.01)
    for _ in range(2):
        model(torch.randn(2, 4)).sum().backward()
        optimizer.step()
        scheduler.step()
    actor = str(tmp_path / "global_step_2.partial" / "actor")
    checkpoint.save_sharded(actor, model, optimizer, scheduler, rank=0, world_size=1)
    path = checkpoint.finalize(str(tmp_path), 2, {"global_step": 2}, save_limit=-1)

    model2, optimizer2, scheduler2 = build(5e-3, (0.8, 0.95), 0.1)
    with caplog.at_level("WARNING"):
        checkpoint.load_sharded(os.path.join(path, "actor"), model2, optimizer2, scheduler2, rank=0, world_size=1)
    (group,) = optimizer2.param_groups
    assert (group["initial_lr"], group["betas"], group["weight_decay"]) == (5e-3, (0.8, 0.95), 0.1)
    assert scheduler2.last_epoch == 2 and group["lr"] == pytest.approx(5e-3 * 3 / 4)  # the position is kept
    assert scheduler2.get_last_lr() == [group["lr"]]
    assert torch.equal(optimizer2.state[model2.weight]["exp_avg"], optimizer.state[model.weight]["exp_avg"])
    assert "initial_lr 0.001 -> 0.005" in caplog.text and "weight_decay 0.01 -> 0.1" in caplog.text
    scheduler2.step()
    assert group["lr"] == pytest.approx(5e-3)


def test_a_resume_that_names_another_starting_model_is_refused(tmp_path, capsys):
    """A stage rerun with another warm-up model silently continued the old run's actor weights (the reference
    model loading the new ones); an explicit trainer.load_checkpoint_path is taken, with a warning."""
    from pebr.data import StatefulBatchSampler
    from pebr.trainer.ray_trainer import RayPPOTrainer, model_identity

    cfg, run_dir = _trainer_config(tmp_path)
    sampler = StatefulBatchSampler(10, 2, shuffle=True, seed=cfg.data.seed, drop_last=True)
    model = torch.nn.Linear(4, 3)
    checkpoint.save_sharded(str(run_dir / "global_step_1.partial" / "actor"), model,
                            torch.optim.AdamW(model.parameters()), None, rank=0, world_size=1)
    checkpoint.finalize(str(run_dir), 1, {"global_step": 1, "sampler": sampler.state_dict(),
                                          "model_path": str(tmp_path / "warmup_a")}, save_limit=-1)
    assert model_identity(str(tmp_path / "." / "model")) == str(tmp_path / "model")
    with pytest.raises(checkpoint.CheckpointError, match=r"global_step_1 continues a run from the model .*warmup_a, "
                                                         r"and this run names .*model: .*another "
                                                         r"trainer\.save_checkpoint_path"):
        RayPPOTrainer(cfg, None, None, sampler, None)
    os.makedirs(tmp_path / "b")
    cfg, _ = _trainer_config(tmp_path / "b", f"trainer.load_checkpoint_path={run_dir}/global_step_1")
    other_order = StatefulBatchSampler(10, 3, shuffle=True, seed=cfg.data.seed, drop_last=True)
    with pytest.raises(checkpoint.CheckpointError, match="cannot continue its data order"):  # a later check
        RayPPOTrainer(cfg, None, None, other_order, None)
    out = capsys.readouterr().out
    assert "warning: " in out and "warmup_a" in out and "resuming it as trainer.load_checkpoint_path asks" in out


def test_a_resume_past_the_runs_last_step_is_refused(tmp_path):
    """max_steps lowered below the checkpoint's step: the run trained nothing, exited 0 and rewrote config.yaml."""
    from pebr.data import StatefulBatchSampler
    from pebr.trainer.ray_trainer import RayPPOTrainer

    cfg, run_dir = _trainer_config(tmp_path, "trainer.max_steps=2")
    sampler = StatefulBatchSampler(10, 2, shuffle=True, seed=cfg.data.seed, drop_last=True)
    _save_run_step(run_dir, 3, sampler)
    with pytest.raises(checkpoint.CheckpointError, match=r"global_step_3 is at step 3, past the 2 steps of this run"):
        RayPPOTrainer(cfg, None, None, sampler, None)
    assert not (run_dir / "config.yaml").exists()


def test_a_second_run_on_a_live_runs_folder_stops_before_touching_it(tmp_path, tiny_model_dir, synthetic_data_dir):
    """A rerun while the first run still trained removed its in-flight save, trimmed its metrics file and purged
    its TensorBoard steps, then failed on a checkpoint the first run had rotated away, blaming the world size."""
    from conftest import lock_held_elsewhere

    from pebr.trainer.main import run

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    in_flight = run_dir / "global_step_3.partial"
    in_flight.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with lock_held_elsewhere(str(run_dir / checkpoint.LOCK_FILE)) as pid:
        with pytest.raises(checkpoint.CheckpointError, match=re.escape(f"{run_dir} is in use by another training run "
                                                                       f"(pid {pid} on ")):
            run([f"config={root}/examples/pebr_stage2.yaml", f"config={root}/examples/pebr_cpu.yaml",
                 f"worker.actor.model.model_path={tiny_model_dir}", f"data.train_files={synthetic_data_dir}/train.json",
                 f"data.image_dir={synthetic_data_dir}/images", f"trainer.save_checkpoint_path={run_dir}",
                 "data.max_response_length=24"])
    assert in_flight.is_dir() and (run_dir / "metrics.jsonl").read_text() == '{"step": 1}\n{"step": 2}\n'
    with checkpoint.run_dir_lock(str(run_dir)):  # the holder's end freed it
        with pytest.raises(checkpoint.CheckpointError, match="is in use by another training run"):
            with checkpoint.run_dir_lock(str(run_dir)):
                pass


def test_a_checkpoint_emptied_after_it_was_picked_is_not_blamed_on_the_world_size(tmp_path):
    actor = tmp_path / "global_step_4" / "actor"
    actor.mkdir(parents=True)
    with pytest.raises(checkpoint.CheckpointError, match=r"holds no model shards at all: was the checkpoint deleted"):
        checkpoint.load_sharded(str(actor), torch.nn.Linear(4, 3), None, None, rank=1, world_size=2)


def test_validation_alone_takes_a_checkpoint_past_the_runs_steps(tmp_path, no_workers):
    """A run trained past total_epochs (with max_steps) could not be validated with trainer.val_only: "nothing would
    be trained". Validation alone trains nothing, and its checks stop there."""
    from pebr.data import StatefulBatchSampler
    from pebr.trainer import ray_trainer

    sampler = StatefulBatchSampler(8, 2, shuffle=True, seed=1, drop_last=True)  # 4 steps an epoch
    cfg, run_dir = _trainer_config(tmp_path, "data.seed=1")
    _save_run_step(run_dir, 6, sampler)
    with pytest.raises(checkpoint.CheckpointError, match="is at step 6, past the 4 steps of this run"):
        ray_trainer.RayPPOTrainer(cfg, None, None, sampler, None)
    (tmp_path / "val.json").write_text("[]")
    (tmp_path / "b").mkdir()
    cfg, _ = _trainer_config(tmp_path / "b", "data.seed=1", "trainer.val_only=true", f"data.val_files={tmp_path}/val.json",
                             f"trainer.load_checkpoint_path={run_dir}/global_step_6")
    with pytest.raises(WorkersNotStarted):
        ray_trainer.RayPPOTrainer(cfg, None, None, sampler, None)
    # An earlier checkpoint of the run, in its own directory: its validation would cut the later steps' logs back;
    # it was refused as a checkpoint "from another run". The message names the way that works.
    _save_run_step(run_dir, 2, sampler)
    (tmp_path / "c").mkdir()
    cfg, _ = _trainer_config(tmp_path / "c", "data.seed=1", "trainer.val_only=true",
                             f"data.val_files={tmp_path}/val.json", f"trainer.load_checkpoint_path={run_dir}/global_step_2",
                             f"trainer.save_checkpoint_path={run_dir}")
    with pytest.raises(checkpoint.CheckpointError, match=r"trainer.val_only of step 2 .* holds later steps \[6\]: "
                                                         r"their logs would be cut back.*set trainer.save_checkpoint_"
                                                         r"path to a new directory"):
        ray_trainer.RayPPOTrainer(cfg, None, None, sampler, None)


@pytest.mark.parametrize("damage", ["state", "index"])
def test_a_damaged_newest_checkpoint_names_its_file_and_the_way_back_to_the_one_before(tmp_path, capsys, no_workers,
                                                                                      damage):
    """A truncated trainer_state.json was a JSONDecodeError traceback; a damaged shard index said "use another
    global_step_* directory", and naming step 1 was then refused for the later step 2. Moved aside as the message
    says, the damaged one is out of the listing and the run resumes from step 1."""
    from pebr.data import StatefulBatchSampler
    from pebr.trainer import ray_trainer

    cfg, run_dir = _trainer_config(tmp_path)
    sampler = StatefulBatchSampler(10, 2, shuffle=True, seed=cfg.data.seed, drop_last=True)
    for step in (1, 2):
        _save_run_step(run_dir, step, sampler)
    newest = run_dir / "global_step_2"
    damaged = newest / checkpoint.STATE_FILE if damage == "state" else newest / "actor" / checkpoint.INDEX_FILE
    damaged.write_text(damaged.read_text()[:7])
    with pytest.raises(checkpoint.DamagedCheckpoint, match=rf"{damaged} cannot be read .*the checkpoint is damaged.*"
                                                           rf"move it aside \(mv {newest} {newest}.damaged\)"):
        ray_trainer.RayPPOTrainer(cfg, None, None, sampler, None)
    os.rename(newest, f"{newest}.damaged")
    with pytest.raises(WorkersNotStarted):
        ray_trainer.RayPPOTrainer(cfg, None, None, sampler, None)
    assert checkpoint.complete_steps(str(run_dir)) == [1] and os.path.isdir(f"{newest}.damaged")


def test_a_resume_rotates_what_a_stop_before_rotation_left(tmp_path, no_workers):
    """Stopped between publishing step 3 and rotating: the rerun had nothing to train, so save_limit=2 never
    removed step 1."""
    from pebr.data import StatefulBatchSampler
    from pebr.trainer import ray_trainer

    cfg, run_dir = _trainer_config(tmp_path, "trainer.save_limit=2", "trainer.max_steps=3")
    sampler = StatefulBatchSampler(10, 2, shuffle=True, seed=cfg.data.seed, drop_last=True)
    for step in (1, 2, 3):
        _save_run_step(run_dir, step, sampler)  # (save_limit=-1: nothing rotated)
    with pytest.raises(WorkersNotStarted):
        ray_trainer.RayPPOTrainer(cfg, None, None, sampler, None)
    assert checkpoint.complete_steps(str(run_dir)) == [2, 3]


def test_a_resume_with_other_settings_lists_them(tmp_path, capsys, no_workers):
    """Warm-up steps, n, the KL coefficient changed at a resume went through without a word (only the lr was
    said); the earlier config is kept beside config.yaml as before."""
    from pebr.data import StatefulBatchSampler
    from pebr.trainer import ray_trainer

    cfg, run_dir = _trainer_config(tmp_path)
    sampler = StatefulBatchSampler(10, 2, shuffle=True, seed=cfg.data.seed, drop_last=True)
    _save_run_step(run_dir, 1, sampler)
    with pytest.raises(WorkersNotStarted):  # the same settings: nothing to say
        ray_trainer.RayPPOTrainer(cfg, None, None, sampler, None)
    assert "setting(s) other than" not in capsys.readouterr().out
    cfg, _ = _trainer_config(tmp_path, "algorithm.kl_coef=0.5", "worker.actor.optim.lr_warmup_steps=1")
    with pytest.raises(WorkersNotStarted):
        ray_trainer.RayPPOTrainer(cfg, None, None, sampler, None)
    out = capsys.readouterr().out
    assert ("warning: resuming at step 1 with 2 setting(s) other than the run's config.yaml, applied from here on: "
            "algorithm.kl_coef: 0.01 -> 0.5; worker.actor.optim.lr_warmup_steps:") in out
    assert "(the earlier ones are kept in config.until_step_1.yaml)" in out
    assert (run_dir / "config.until_step_1.yaml").is_file()
