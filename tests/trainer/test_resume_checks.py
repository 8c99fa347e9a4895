"""A checkpoint the workers could not resume from is refused by the driver, before any worker starts."""

from __future__ import annotations

import os

import pytest
import torch

from pebr import checkpoint


def saved(tmp_path, step: int, with_optimizer: bool) -> str:
    """A real checkpoint of a small model, written as a one-rank run writes it."""
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3) if with_optimizer else None
    if optimizer is not None:
        model(torch.randn(2, 4)).sum().backward()
        optimizer.step()
    checkpoint.save_sharded(str(tmp_path / f"global_step_{step}.partial" / "actor"), model, optimizer, None,
                            rank=0, world_size=1)
    return checkpoint.finalize(str(tmp_path), step, {"global_step": step}, save_limit=-1)


def test_a_full_checkpoint_resumes_with_its_world_size_only(tmp_path):
    path = saved(tmp_path, 1, with_optimizer=True)
    checkpoint.check_resumable(path, 1)
    with pytest.raises(checkpoint.CheckpointError, match=r"saved by 1 workers and resumes only with as many "
                                                         r"\(trainer\.nnodes x trainer\.n_gpus_per_node = 2 now\)"):
        checkpoint.check_resumable(path, 2)


def test_a_weights_only_checkpoint_is_refused_with_the_way_forward(tmp_path):
    path = saved(tmp_path, 2, with_optimizer=False)  # what trainer.save_model_only=true writes
    with pytest.raises(checkpoint.CheckpointError, match=r"weights only \(saved with trainer\.save_model_only=true\)"
                                                         r".*scripts/model_merger\.py"):
        checkpoint.check_resumable(path, 1)
    os.remove(os.path.join(path, "actor", checkpoint.INDEX_FILE))
    with pytest.raises(checkpoint.CheckpointError, match=r"no readable shard_index\.json"):
        checkpoint.check_resumable(path, 1)
