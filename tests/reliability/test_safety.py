"""Safety defaults: no remote code unless asked, no pickles in checkpoints."""

from __future__ import annotations

import glob
import inspect
import os

import torch
from omegaconf import OmegaConf

from pebr import checkpoint
from pebr.config import PPOConfig
from tests.reliability.procs import ROOT, pickle_like_files


def test_trust_remote_code_is_off_by_default():
    assert PPOConfig().worker.actor.model.trust_remote_code is False
    # No shipped recipe turns it on.
    recipes = glob.glob(os.path.join(ROOT, "examples", "*.yaml"))
    assert len(recipes) >= 4, recipes  # (the loop below checks nothing on an empty list)
    for path in recipes:
        model = OmegaConf.to_container(OmegaConf.load(path)).get("worker", {}).get("actor", {}).get("model", {})
        assert model.get("trust_remote_code", False) is False, path
    # The loaders the workers and rewards call default to False when not told otherwise.
    from pebr.rewards.clip import ClipScorer
    from pebr.workers.actor import load_hf_model

    for fn in (load_hf_model, ClipScorer.__init__):
        assert inspect.signature(fn).parameters["trust_remote_code"].default is False, fn.__qualname__


def test_sharded_checkpoint_holds_safetensors_and_json_only(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    scheduler.step()
    actor = str(tmp_path / "global_step_1.partial" / "actor")
    checkpoint.save_sharded(actor, model, optimizer, scheduler, rank=0, world_size=1)
    final = checkpoint.finalize(str(tmp_path), 1, {"global_step": 1}, save_limit=-1)
    names = sorted(os.path.relpath(os.path.join(d, f), final) for d, _, fs in os.walk(final) for f in fs)
    assert names == ["actor/extra_state_world_size_1_rank_0.json", "actor/model_world_size_1_rank_0.safetensors",
                     "actor/optim_world_size_1_rank_0.safetensors", "actor/shard_index.json",
                     checkpoint.STATE_FILE]
    assert pickle_like_files(final) == []
    # The checker itself finds a torch.save file (a zip archive around a pickle).
    torch.save({"w": torch.ones(1)}, os.path.join(final, "actor", "extra.safetensors"))
    assert pickle_like_files(final) == ["actor/extra.safetensors"]
