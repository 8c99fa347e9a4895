"""scripts/model_merger.py: the dtype on disk and in config.json, and a target that held another model."""

from __future__ import annotations

import json
import os
import shutil
import sys

import pytest
import torch

from pebr import checkpoint
from pebr.checkpoint import CheckpointError
from pebr.workers.actor import load_hf_model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
from model_merger import main, merge  # noqa: E402


@pytest.fixture
def bf16_checkpoint(tiny_model_dir, tmp_path) -> tuple[str, dict]:
    """A one-rank checkpoint of a model stored in bf16, as the trainer saves it (fp32 master weights)."""
    from transformers import AutoModelForImageTextToText

    base = str(tmp_path / "base_bf16")
    AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).save_pretrained(base)
    for name in os.listdir(tiny_model_dir):  # tokenizer, processor, chat template
        if not name.endswith(".safetensors") and name not in os.listdir(base):
            shutil.copy(os.path.join(tiny_model_dir, name), base)
    model = load_hf_model(base)
    assert model.dtype == torch.float32 and model.source_dtype == torch.bfloat16
    actor = str(tmp_path / "run" / "global_step_1.partial" / "actor")
    checkpoint.save_sharded(actor, model, None, None, rank=0, world_size=1)
    hf_dir = os.path.join(actor, "huggingface")
    config = model.config
    config.dtype = model.source_dtype  # what FSDPWorker.save_checkpoint writes
    config.save_pretrained(hf_dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "processor_config.json"):
        if os.path.exists(os.path.join(base, name)):
            shutil.copy(os.path.join(base, name), hf_dir)
    final = checkpoint.finalize(str(tmp_path / "run"), 1, {"global_step": 1}, save_limit=-1)
    return os.path.join(final, "actor"), {k: v.detach().clone() for k, v in model.state_dict().items()}


def killed_on_call(function, n: int):
    """`function`, but a KeyboardInterrupt (a kill, as far as the merger can tell) on its n-th call."""
    calls = []

    def wrapped(*args, **kwargs):
        calls.append(args)
        if len(calls) == n:
            raise KeyboardInterrupt
        return function(*args, **kwargs)

    return wrapped


def saved_dtype(directory: str) -> str:
    with open(os.path.join(directory, "config.json")) as f:
        return json.load(f)["dtype"]


def test_auto_keeps_the_base_models_dtype(bf16_checkpoint):
    from safetensors import safe_open

    actor, _ = bf16_checkpoint
    out = merge(actor)
    assert saved_dtype(out) == "bfloat16"
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        assert {f.get_slice(name).get_dtype() for name in f.keys()} == {"BF16"}


def test_target_dir_that_held_a_sharded_model(bf16_checkpoint, tmp_path):
    from transformers import AutoModelForImageTextToText

    actor, weights = bf16_checkpoint
    target = tmp_path / "served"
    target.mkdir()
    # What a sharded save of another model leaves: an index naming shards, and the shards.
    (target / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"x": "model-00001-of-00002.safetensors"}}))
    (target / "model-00001-of-00002.safetensors").write_bytes(b"old")
    # A model this script did not merge (the base model copied there, say) is not replaced unless asked.
    with pytest.raises(CheckpointError, match=r"holds a model this script did not merge \(no merged_from.json\)"):
        merge(actor, str(target), dtype="fp32")
    assert (target / "model-00001-of-00002.safetensors").read_bytes() == b"old"
    out = merge(actor, str(target), dtype="fp32", force=True)
    assert sorted(f for f in os.listdir(out) if "safetensors" in f) == ["model.safetensors"]
    assert saved_dtype(out) == "float32"  # the config save_pretrained wrote, not the checkpoint's copied over it
    assert os.path.isfile(os.path.join(out, "tokenizer.json")) and not os.path.exists(f"{target}.merging")
    merged = AutoModelForImageTextToText.from_pretrained(out, dtype="auto")
    assert merged.dtype == torch.float32
    assert all(torch.equal(merged.state_dict()[k], v) for k, v in weights.items())


def test_a_second_merge_of_the_same_shards_is_skipped_and_any_change_merges_again(bf16_checkpoint, capsys):
    actor, weights = bf16_checkpoint
    out = merge(actor)
    weight_file = os.path.join(out, "model.safetensors")

    def merged_again(**kwargs) -> bool:
        before = os.stat(weight_file).st_ino  # a merge writes a new file and renames it over the old one
        merge(actor, **kwargs)
        return os.stat(weight_file).st_ino != before

    assert not merged_again() and "already holds this checkpoint's merge" in capsys.readouterr().out
    assert merged_again(force=True)
    assert merged_again(dtype="fp32") and saved_dtype(out) == "float32"
    assert not merged_again(dtype="fp32")
    shard = os.path.join(actor, "model_world_size_1_rank_0.safetensors")
    os.utime(shard)  # a checkpoint written again under the same name
    assert merged_again(dtype="fp32")
    os.utime(weight_file)  # another model saved over the merge, even of the same size
    assert merged_again(dtype="fp32")
    # A replacement cut short leaves the marker saying so (written first), so the next merge redoes it.
    with open(os.path.join(out, "merged_from.json"), "w") as f:
        json.dump({"unfinished": True}, f)
    assert merged_again(dtype="fp32")
    from transformers import AutoModelForImageTextToText

    merged = AutoModelForImageTextToText.from_pretrained(out, dtype="auto")
    assert all(torch.equal(merged.state_dict()[k], v) for k, v in weights.items())


def test_the_base_models_generation_config_is_kept(bf16_checkpoint, tmp_path):
    from transformers import GenerationConfig

    actor, _ = bf16_checkpoint
    hf_dir = os.path.join(actor, "huggingface")
    GenerationConfig(eos_token_id=[7, 8], repetition_penalty=1.05, temperature=0.1, do_sample=True).save_pretrained(
        hf_dir)
    for out in (merge(actor), merge(actor, str(tmp_path / "served"))):
        kept = GenerationConfig.from_pretrained(out)
        assert (kept.eos_token_id, kept.repetition_penalty, kept.temperature) == ([7, 8], 1.05, 0.1), out


def test_a_target_holding_checkpoint_shards_is_refused_and_a_copied_actor_directory_merges(bf16_checkpoint,
                                                                                           tmp_path):
    actor, weights = bf16_checkpoint
    before = sorted(os.listdir(actor))
    # The actor folder, its step folder, and the run folder above them (its config.json and weights went in
    # beside global_step_*).
    for target in (actor, os.path.dirname(actor), os.path.dirname(os.path.dirname(actor))):
        with pytest.raises(checkpoint.CheckpointError, match="holds a sharded checkpoint or a training run's"):
            merge(actor, target)
    assert sorted(os.listdir(actor)) == before
    copied = str(tmp_path / "elsewhere" / "actor")  # without the step directory's trainer_state.json
    shutil.copytree(actor, copied)
    from transformers import AutoModelForImageTextToText

    merged = AutoModelForImageTextToText.from_pretrained(merge(copied, dtype="fp32"))
    assert all(torch.equal(merged.state_dict()[k], v) for k, v in weights.items())


def test_adapter_export_of_a_checkpoint_without_lora_is_refused(bf16_checkpoint, tmp_path, capsys):
    actor, _ = bf16_checkpoint
    assert main(["--local_dir", actor, "--adapter_dir", str(tmp_path / "adapter")]) == 2
    assert "trained without LoRA" in capsys.readouterr().err and not os.path.exists(tmp_path / "adapter")


def test_a_merge_leaves_files_that_are_not_the_models_weights(bf16_checkpoint, tmp_path):
    """Every *.safetensors, *.bin and *.index.json in the target used to be deleted, a user's own included."""
    actor, _ = bf16_checkpoint
    target = tmp_path / "served"
    target.mkdir()
    mine = {"adapter_model.safetensors": "a", "embeddings.bin": "e", "faiss.index.json": "{}", "notes.txt": "n"}
    for name, text in mine.items():
        (target / name).write_text(text)
    (target / "model.safetensors").write_text("an older merge")  # the model's own weights are replaced
    (target / "merged_from.json").write_text("{}")  # which this script wrote
    out = merge(actor, str(target))
    assert {name: (target / name).read_text() for name in mine} == mine
    assert os.path.getsize(os.path.join(out, "model.safetensors")) > 1000


def test_a_new_target_is_complete_or_absent(bf16_checkpoint, tmp_path, monkeypatch):
    """A kill while the tokenizer and processor files were copied left weights without a processor."""
    import model_merger

    actor, _ = bf16_checkpoint
    target = str(tmp_path / "served")
    with monkeypatch.context() as patch:
        patch.setattr(model_merger.shutil, "copy2", killed_on_call(shutil.copy2, 2))
        with pytest.raises(KeyboardInterrupt):
            merge(actor, target)
    assert not os.path.exists(target)
    out = merge(actor, target)
    assert {"config.json", "tokenizer.json", "model.safetensors", "merged_from.json"} <= set(os.listdir(out))


def test_a_symlink_to_the_checkpoints_own_folder_merges_there(bf16_checkpoint, tmp_path):
    actor, weights = bf16_checkpoint
    link = str(tmp_path / "hf_link")
    os.symlink(os.path.join(actor, "huggingface"), link)
    out = merge(actor, link, force=True)  # copied every file onto itself: SameFileError after the weights moved
    from transformers import AutoModelForImageTextToText

    merged = AutoModelForImageTextToText.from_pretrained(out, dtype="float32")
    assert all(torch.equal(merged.state_dict()[k], v.float()) for k, v in weights.items())


def test_damaged_checkpoints_and_targets_are_named_errors(bf16_checkpoint, tmp_path, capsys):
    actor, _ = bf16_checkpoint
    damaged = str(tmp_path / "damaged" / "actor")
    shutil.copytree(actor, damaged)
    index_path = os.path.join(damaged, checkpoint.INDEX_FILE)
    with open(index_path) as f:
        index = json.load(f)
    index["tensors"]["extra.weight"] = {"shape": [2], "shard_dim": None}
    with open(index_path, "w") as f:
        json.dump(index, f)
    assert main(["--local_dir", damaged, "--target_dir", str(tmp_path / "out1")]) == 2
    assert "rank_0.safetensors has no readable tensor 'extra.weight'" in capsys.readouterr().err
    index["tensors"].pop("extra.weight")
    name = next(iter(index["tensors"]))
    index["tensors"][name]["shape"] = [1, 1]  # the shard holds another shape than the index says
    with open(index_path, "w") as f:
        json.dump(index, f)
    assert main(["--local_dir", damaged, "--target_dir", str(tmp_path / "out2")]) == 2
    assert f"merged {name} has shape" in capsys.readouterr().err
    # An entry or a dtype the merger cannot use: a KeyError or an AttributeError traceback before.
    for damage, said in (({"tensors": {**index["tensors"], name: {"shape": [4]}}}, f"tensor {name!r} has no integer"),
                         ({"dtype": "float64x"}, "'dtype' 'float64x' is not a torch dtype")):
        with open(index_path, "w") as f:
            json.dump({**index, **damage}, f)
        assert main(["--local_dir", damaged, "--target_dir", str(tmp_path / "out2")]) == 2
        assert said in capsys.readouterr().err
    with open(os.path.join(actor, "huggingface", "config.json"), "w") as f:
        f.write("{not json")
    assert main(["--local_dir", actor, "--target_dir", str(tmp_path / "out3")]) == 2
    assert "config.json cannot be read" in capsys.readouterr().err
    (tmp_path / "a_file").write_text("x")
    assert main(["--local_dir", actor, "--target_dir", str(tmp_path / "a_file")]) == 2
    assert "is a file" in capsys.readouterr().err
    assert not [p for p in os.listdir(tmp_path) if p.startswith("out")]


def test_an_adapter_directory_holding_other_files_is_refused(bf16_checkpoint, tmp_path, capsys):
    actor, _ = bf16_checkpoint
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    for name in ("adapter_config.json", "README.md", "eval_results.json"):
        (adapter / name).write_text("{}")
    assert main(["--local_dir", actor, "--adapter_dir", str(adapter)]) == 2
    assert "holds ['README.md', 'eval_results.json']" in capsys.readouterr().err
    assert sorted(os.listdir(adapter)) == ["README.md", "adapter_config.json", "eval_results.json"]


@pytest.mark.parametrize("extra", [["--dtype", "bf16"], ["--target_dir", "x"], ["--force"]])
def test_adapter_export_refuses_the_merge_only_options(bf16_checkpoint, tmp_path, capsys, extra):
    """They were ignored with --adapter_dir: the adapters came out in float32 and no target folder was made."""
    actor, _ = bf16_checkpoint
    with pytest.raises(SystemExit) as info:
        main(["--local_dir", actor, "--adapter_dir", str(tmp_path / "adapter"), *extra])
    assert info.value.code == 2 and "acts on a merged model; --adapter_dir writes the adapters alone" in \
        capsys.readouterr().err
    assert not (tmp_path / "adapter").exists()


def test_auto_stays_the_base_models_dtype_after_an_explicit_merge(bf16_checkpoint):
    """--dtype fp32 into the checkpoint's folder rewrote its config.json, from which "auto" read the dtype: every
    later auto merge (the stage-2 recipe's) came out fp32. The shard index records the base model's dtype."""
    from safetensors import safe_open

    actor, _ = bf16_checkpoint
    assert saved_dtype(merge(actor, dtype="fp32")) == "float32"
    out = merge(actor, dtype="auto")
    assert saved_dtype(out) == "bfloat16"
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        assert {f.get_slice(name).get_dtype() for name in f.keys()} == {"BF16"}


def _other_file_system() -> str | None:
    """/dev/shm when it is another file system than the temporary folder (a tmpfs), else None."""
    import tempfile

    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        if os.stat("/dev/shm").st_dev != os.stat(tempfile.gettempdir()).st_dev:
            return "/dev/shm"
    return None


@pytest.mark.parametrize("where", ["same file system", "another file system"])
@pytest.mark.parametrize("holding", ["an earlier model", "nothing"])
def test_a_linked_target_is_merged_where_the_link_points(bf16_checkpoint, tmp_path, tiny_model_dir, where, holding):
    """A link to a folder on another disk: the old weights were deleted, then moving the new ones in failed
    (EXDEV) and left no model at all; a link to an empty folder was replaced by a folder, the linked one left
    empty."""
    import uuid

    from transformers import AutoModelForImageTextToText

    actor, weights = bf16_checkpoint
    disk = str(tmp_path) if where == "same file system" else _other_file_system()
    if disk is None:
        pytest.skip("no second file system here (/dev/shm missing or on the same device as the temporary folder)")
    real = os.path.join(disk, f"pebr-served-{uuid.uuid4().hex}")
    try:
        if holding == "nothing":
            os.makedirs(real)
        else:
            shutil.copytree(tiny_model_dir, real)
        link = str(tmp_path / "served")
        os.symlink(real, link)
        merge(actor, link, force=holding == "an earlier model")  # a model it did not merge is replaced if asked
        assert os.path.islink(link) and os.path.realpath(link) == real
        assert "merged_from.json" in os.listdir(real) and ".merging" not in os.listdir(real)
        assert not os.path.exists(link + ".merging") and not os.path.exists(real + ".merging")
        merged = AutoModelForImageTextToText.from_pretrained(real, dtype="float32").state_dict()
        assert all(torch.equal(merged[k], v.to(torch.bfloat16).float()) for k, v in weights.items())
    finally:
        shutil.rmtree(real, ignore_errors=True)


def test_a_merge_killed_while_moving_in_leaves_a_model_and_an_unfinished_marker(bf16_checkpoint, tmp_path, tiny_model_dir,
                                                                      monkeypatch):
    """The old weight files were removed before the new ones were moved in: a kill in between left a folder with
    no weights."""
    import model_merger

    actor, _ = bf16_checkpoint
    target = str(tmp_path / "served")
    shutil.copytree(tiny_model_dir, target)
    with monkeypatch.context() as patch:
        patch.setattr(model_merger.os, "replace", killed_on_call(os.replace, 2))
        with pytest.raises(KeyboardInterrupt):
            merge(actor, target, force=True)  # the base model's copy, replaced as asked
    # The marker says unfinished: the next merge redoes it, and without --force, as the folder is now this script's.
    assert "model.safetensors" in os.listdir(target)
    assert json.load(open(os.path.join(target, "merged_from.json"))) == {"unfinished": True}
    merge(actor, target)
    assert "merged_from.json" in os.listdir(target) and ".merging" not in os.listdir(target)
