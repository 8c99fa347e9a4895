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
    """config.json's dtype, which its sub-configs (text_config, vision_config) must say too."""
    with open(os.path.join(directory, "config.json")) as f:
        config = json.load(f)
    subs = {key: value["dtype"] for key, value in config.items() if isinstance(value, dict) and "dtype" in value}
    assert set(subs.values()) <= {config["dtype"]}, f"dtype {config['dtype']}, sub-configs {subs}"
    return config["dtype"]


def test_auto_keeps_the_base_models_dtype(bf16_checkpoint):
    from safetensors import safe_open

    actor, _ = bf16_checkpoint
    out = merge(actor)
    assert saved_dtype(out) == "bfloat16"
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        assert {f.get_slice(name).get_dtype() for name in f.keys()} == {"BF16"}


def test_published_checkpoints_and_merges_follow_the_umask(tiny_model_dir, tmp_path):
    """safetensors (so save_pretrained too) writes its files 0600: a checkpoint or a merged model that a colleague's
    job on a shared cluster could not read. Published folders give every file the umask's permissions."""
    old = os.umask(0o022)
    try:
        model = load_hf_model(tiny_model_dir)
        actor = str(tmp_path / "run" / "global_step_1.partial" / "actor")
        checkpoint.save_sharded(actor, model, None, None, rank=0, world_size=1)
        shutil.copytree(tiny_model_dir, os.path.join(actor, "huggingface"),
                        ignore=shutil.ignore_patterns("*.safetensors"))
        final = checkpoint.finalize(str(tmp_path / "run"), 1, {"global_step": 1}, save_limit=-1)
        merged = merge(os.path.join(final, "actor"))
    finally:
        os.umask(old)
    files = [os.path.join(folder, name) for top in (final, merged) for folder, _, names in os.walk(top)
             for name in names]
    assert any(f.endswith("model_world_size_1_rank_0.safetensors") for f in files)
    assert any(f.endswith(os.path.join("huggingface", "model.safetensors")) for f in files)
    assert {f: oct(os.stat(f).st_mode & 0o777) for f in files} == {f: "0o644" for f in files}


def test_only_the_weights_written_here_are_made_readable(tmp_path):
    """A merge carries the target's other files over (links, hard links): their modes, and files outside the
    folder that links point to, are not the publisher's to change."""
    from pebr.utils.jsonio import finish_tree

    folder, outside = tmp_path / "staging", tmp_path / "elsewhere.safetensors"
    folder.mkdir()
    for path, mode in ((folder / "model.safetensors", 0o600), (folder / "notes.txt", 0o600), (outside, 0o400)):
        path.write_bytes(b"x")
        os.chmod(path, mode)
    os.symlink(outside, folder / "linked.safetensors")
    old = os.umask(0o022)
    try:
        finish_tree(str(folder))
    finally:
        os.umask(old)
    modes = {p.name: oct(os.lstat(p).st_mode & 0o777) for p in (folder / "model.safetensors", folder / "notes.txt",
                                                                 outside)}
    assert modes == {"model.safetensors": "0o644", "notes.txt": "0o600", "elsewhere.safetensors": "0o400"}


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


def test_a_second_merge_of_the_same_shards_is_skipped_and_any_change_merges_again(bf16_checkpoint, capsys,
                                                                                  monkeypatch):
    import model_merger

    actor, weights = bf16_checkpoint
    out = merge(actor)
    weight_file = os.path.join(out, "model.safetensors")

    def merged_again(**kwargs) -> bool:
        before = os.stat(weight_file).st_ino  # a merge writes a new file and renames it over the old one
        merge(actor, **kwargs)
        return os.stat(weight_file).st_ino != before

    assert not merged_again() and "already holds this checkpoint's merge" in capsys.readouterr().out
    with monkeypatch.context() as patch:  # skipped before transformers loads the processor (5 s of a stage-2 rerun)
        patch.setattr(model_merger, "check_processor", lambda hf_dir: pytest.fail("the processor was loaded"))
        assert not merged_again()
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


def test_weight_files_that_are_not_the_models_are_refused_and_kept_when_forced(bf16_checkpoint, tmp_path):
    """Every *.safetensors, *.bin and *.index.json in the target used to be deleted, a user's own included; then a
    peft adapter was kept beside the merged weights, which transformers applied on top of them (LoRA twice) and
    vLLM read as weights. Such files are now refused unless --force, which removes the adapter alone."""
    actor, _ = bf16_checkpoint
    target = tmp_path / "served"
    target.mkdir()
    mine = {"adapter_config.json": "{}", "adapter_model.safetensors": "a", "embeddings.bin": "e",
            "faiss.index.json": "{}", "notes.txt": "n"}
    for name, text in mine.items():
        (target / name).write_text(text)
    (target / "model.safetensors").write_text("an older merge")  # the model's own weights are replaced
    (target / "merged_from.json").write_text("{}")  # which this script wrote
    before = sorted(os.listdir(target))
    with pytest.raises(CheckpointError, match=r"holds \['adapter_config.json', 'adapter_model.safetensors', "
                                              r"'embeddings.bin'\], which are not this model's weight files"):
        merge(actor, str(target))
    assert sorted(os.listdir(target)) == before
    out = merge(actor, str(target), force=True)
    kept = {name: text for name, text in mine.items() if not name.startswith("adapter_")}
    assert {name: (target / name).read_text() for name in kept} == kept
    assert not {"adapter_config.json", "adapter_model.safetensors"} & set(os.listdir(out))
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
    assert not os.path.exists(target) and not os.path.exists(target + ".merging")  # (a model's size, left hidden)
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


def test_auto_is_fp32_for_a_base_that_named_no_dtype_after_an_explicit_merge(bf16_checkpoint):
    """The shard index's null dtype (a base whose config.json names none) fell back to config.json, which the
    --dtype bf16 merge into the checkpoint's folder had rewritten: auto came out bf16 from then on."""
    actor, _ = bf16_checkpoint
    index_path = os.path.join(actor, checkpoint.INDEX_FILE)
    with open(index_path) as f:
        index = json.load(f)
    with open(index_path, "w") as f:
        json.dump({**index, "dtype": None}, f)
    assert saved_dtype(merge(actor, dtype="bf16")) == "bfloat16"
    assert saved_dtype(merge(actor, dtype="auto")) == "float32"


def test_a_second_merge_into_a_target_being_merged_is_refused(bf16_checkpoint, tmp_path):
    """Both used <target>.merging, each emptying it first: one published the other's half-written weights."""
    from pebr.utils.jsonio import exclusive_lock

    actor, _ = bf16_checkpoint
    target = str(tmp_path / "out")
    with exclusive_lock(target + ".merging.lock", RuntimeError):  # the first merge, as far as the second can tell
        with pytest.raises(CheckpointError, match=rf"another merge into {target} is running \(pid {os.getpid()}"):
            merge(actor, target_dir=target)
    assert not os.path.exists(target) and not os.path.exists(target + ".merging")
    merge(actor, target_dir=target)  # once it has ended
    assert saved_dtype(target) == "bfloat16"


def test_a_checkpoint_rotated_away_while_merged_is_named_and_leaves_nothing(bf16_checkpoint, monkeypatch):
    """Its run's save_limit deleted it after the weights were read: a FileNotFoundError traceback, and the staging
    folder made the checkpoint's actor/ folder again under the deleted checkpoint's name."""
    import model_merger

    actor, _ = bf16_checkpoint
    step = os.path.dirname(actor)
    load = model_merger.load_merged_model

    def load_then_rotated(*args, **kwargs):
        model = load(*args, **kwargs)
        checkpoint.delete_checkpoint(step)  # what the run's rotation does
        return model

    monkeypatch.setattr(model_merger, "load_merged_model", load_then_rotated)
    with pytest.raises(CheckpointError, match=rf"{actor} was deleted while it was merged"):
        merge(actor)
    assert not os.path.exists(step)


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


def _model_of_other_widths(tiny_model_dir: str, folder: str) -> dict[str, torch.Tensor]:
    """A whole model (weights, config, tokenizer, processor) whose MLPs are wider than the tiny model's: its
    weights do not load under the tiny model's config, nor the other way round. Returns its state."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.text_config.intermediate_size += 8
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config)
    model.save_pretrained(folder)
    for name in os.listdir(tiny_model_dir):
        if not name.endswith(".safetensors") and name not in os.listdir(folder):
            shutil.copy(os.path.join(tiny_model_dir, name), folder)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_weights(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> bool:
    return state.keys() == expected.keys() and all(
        state[k].shape == v.shape and torch.equal(state[k].to(v.dtype), v) for k, v in expected.items())


def test_replacing_a_model_is_never_a_mixture_of_its_files_and_the_merges(bf16_checkpoint, tmp_path, tiny_model_dir,
                                                                         monkeypatch):
    """A merge over an existing model renamed its files in one by one: a kill midway left the new config.json
    beside the old weights, which did not load. The folder is swapped whole now: a kill at any rename leaves the
    old model or the new one, and no hidden staging folder."""
    from transformers import AutoModelForImageTextToText

    actor, weights = bf16_checkpoint
    new = {k: v.to(torch.bfloat16) for k, v in weights.items()}
    original = str(tmp_path / "original")
    old = _model_of_other_widths(tiny_model_dir, original)
    (tmp_path / "original" / "notes.txt").write_text("mine")
    target = str(tmp_path / "served")
    finished, kills = False, 0
    while not finished:
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(original, target)
        with monkeypatch.context() as patch:
            patch.setattr(os, "replace", killed_on_call(os.replace, kills + 1))
            try:
                merge(actor, target, force=True)  # a model it did not merge, replaced as asked
                finished = True
            except KeyboardInterrupt:
                kills += 1
        held = AutoModelForImageTextToText.from_pretrained(target, dtype="auto").state_dict()
        assert _same_weights(held, new if finished else old), f"killed at rename {kills}"
        assert (tmp_path / "served" / "notes.txt").read_text() == "mine"
        assert not [f for f in os.listdir(tmp_path) if f.startswith("served.")]
    assert kills >= 2 and "merged_from.json" in os.listdir(target)


@pytest.fixture
def mount_point(tmp_path):
    """An empty tmpfs mounted at tmp_path/served: a folder that cannot be renamed or swapped whole."""
    import subprocess

    folder = tmp_path / "served"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", str(folder)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN): {mounted.stderr.strip()}")
    try:
        assert os.path.ismount(folder)
        yield str(folder)
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_a_mount_point_is_merged_into_file_by_file_and_a_kill_midway_is_redone(bf16_checkpoint, tmp_path,
                                                                            tiny_model_dir, mount_point, monkeypatch):
    """A mount point cannot be swapped whole, so its files are replaced one by one: the new weights replace the
    old (an old shard set's files and index removed), the user's other files stay, no staging folder is left,
    and a kill midway leaves the marker "unfinished", so that the next merge does it again."""
    from transformers import AutoModelForImageTextToText

    actor, weights = bf16_checkpoint
    new = {k: v.to(torch.bfloat16) for k, v in weights.items()}
    original = str(tmp_path / "original")
    old = _model_of_other_widths(tiny_model_dir, original)
    AutoModelForImageTextToText.from_pretrained(original).save_pretrained(original, max_shard_size="1MB")
    old_shards = [f for f in os.listdir(original) if f.startswith("model-")]
    assert len(old_shards) > 1 and "model.safetensors.index.json" in os.listdir(original)
    for name in os.listdir(original):
        shutil.copy(os.path.join(original, name), mount_point)
    (tmp_path / "served" / "notes.txt").write_text("mine")

    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", killed_on_call(os.replace, 3))  # the marker's write, then two staged files
        with pytest.raises(KeyboardInterrupt):
            merge(actor, mount_point, force=True)
    assert json.load(open(os.path.join(mount_point, "merged_from.json"))) == {"unfinished": True}
    merge(actor, mount_point)  # the marker is the merger's: no --force needed to finish the job
    assert os.path.ismount(mount_point)
    held = AutoModelForImageTextToText.from_pretrained(mount_point, dtype="auto").state_dict()
    assert _same_weights(held, new) and not _same_weights(held, old)
    left = set(os.listdir(mount_point))
    assert not left & {*old_shards, "model.safetensors.index.json", ".merging"}
    assert (tmp_path / "served" / "notes.txt").read_text() == "mine"
    assert "unfinished" not in json.load(open(os.path.join(mount_point, "merged_from.json")))


def test_a_merge_killed_between_the_swaps_renames_is_put_right_by_the_next(bf16_checkpoint):
    """Killed outright (no cleanup) once the checkpoint's own huggingface/ folder, the default target and the
    source of its config and tokenizer, is renamed aside: the next merge puts it back and merges."""
    import signal
    import subprocess

    from transformers import AutoModelForImageTextToText, AutoProcessor

    actor, weights = bf16_checkpoint
    hf_dir = os.path.realpath(os.path.join(actor, "huggingface"))
    code = (f"import os, signal, sys\nsys.path[:0] = [{ROOT!r}, {os.path.join(ROOT, 'scripts')!r}]\n"
            "import model_merger\nreal = os.replace\n"
            "def replace(src, dst):\n    real(src, dst)\n"
            f"    if os.path.realpath(src) == {hf_dir!r}:\n        os.kill(os.getpid(), signal.SIGKILL)\n"
            f"os.replace = replace\nmodel_merger.merge({actor!r})\n")
    killed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not os.path.exists(hf_dir) and os.path.isdir(hf_dir + ".replaced")
    out = merge(actor)
    assert not [f for f in os.listdir(actor) if f.startswith("huggingface.")]
    merged = AutoModelForImageTextToText.from_pretrained(out, dtype="float32").state_dict()
    assert _same_weights(merged, {k: v.to(torch.bfloat16) for k, v in weights.items()})
    assert AutoProcessor.from_pretrained(out).chat_template


def test_a_bf16_merge_converts_without_the_fp32_state_held_beside_the_model(bf16_checkpoint, tmp_path, monkeypatch):
    """The merged fp32 state dict was kept while the model was converted: the fp32 weights and the converted ones
    were in memory together (1.5 times the fp32 model). When the conversion starts, the model must hold the only
    references to the merged tensors, so each is freed as it is converted."""
    import weakref

    import model_merger

    actor, _ = bf16_checkpoint
    merged = []

    def merge_shards_watched(directory: str) -> dict:
        state = checkpoint.merge_shards(directory)
        merged.extend(weakref.ref(t) for t in state.values())
        return state

    at_conversion = []
    to = torch.nn.Module.to

    def to_watched(self, *args, **kwargs):
        if torch.bfloat16 in args or kwargs.get("dtype") == torch.bfloat16:
            at_conversion.append(sum(ref() is not None for ref in merged))
        return to(self, *args, **kwargs)

    monkeypatch.setattr(model_merger, "merge_shards", merge_shards_watched)
    monkeypatch.setattr(torch.nn.Module, "to", to_watched)
    merge(actor, str(tmp_path / "served"), dtype="bf16")
    assert merged and at_conversion and set(at_conversion) == {0}, at_conversion


def _split_into_ranks(actor: str, world: int) -> None:
    """Rewrite a one-rank checkpoint as `world` ranks' files, every tensor of one axis or more split on axis 0 as
    FSDP2 splits it (chunks of ceil(n / world) rows, so the last ranks' may be empty)."""
    from safetensors.torch import load_file, save_file

    one = os.path.join(actor, "model_world_size_1_rank_0.safetensors")
    tensors = load_file(one)
    with open(os.path.join(actor, checkpoint.INDEX_FILE)) as f:
        index = json.load(f)
    parts: list[dict[str, torch.Tensor]] = [{} for _ in range(world)]
    for name, tensor in tensors.items():
        pieces = list(torch.chunk(tensor, world)) if tensor.dim() else [tensor]
        pieces += [tensor[tensor.shape[0]:]] * (world - len(pieces))
        for part, piece in zip(parts, pieces):
            part[name] = piece.contiguous()
        index["tensors"][name]["shard_dim"] = 0 if tensor.dim() else None
    for rank, part in enumerate(parts):
        save_file(part, os.path.join(actor, f"model_world_size_{world}_rank_{rank}.safetensors"))
    os.remove(one)
    index["world_size"] = world
    with open(os.path.join(actor, checkpoint.INDEX_FILE), "w") as f:
        json.dump(index, f)


def test_a_ranks_shard_of_another_shape_is_named(bf16_checkpoint, tmp_path, capsys):
    """A rank's part whose other axes do not match the index ended in torch.cat's RuntimeError, naming neither the
    file nor the tensor (a traceback from the merger)."""
    from safetensors.torch import load_file, save_file

    # Uneven splits, as FSDP2 leaves them (a rank's part empty), are no mismatch.
    small = torch.nn.Sequential(torch.nn.Linear(3, 1), torch.nn.Linear(1, 5))
    small_actor = str(tmp_path / "small" / "actor")
    checkpoint.save_sharded(small_actor, small, None, None, rank=0, world_size=1)
    _split_into_ranks(small_actor, 2)
    assert load_file(os.path.join(small_actor, "model_world_size_2_rank_1.safetensors"))["0.weight"].shape == (0, 3)
    assert _same_weights(checkpoint.merge_shards(small_actor), small.state_dict())
    actor, weights = bf16_checkpoint
    _split_into_ranks(actor, 3)
    assert _same_weights(checkpoint.merge_shards(actor), weights)
    path = os.path.join(actor, "model_world_size_3_rank_1.safetensors")
    part = load_file(path)
    name = next(k for k, v in part.items() if v.dim() == 2 and v.shape[0] > 0 and v.shape[1] > 1)
    part[name] = part[name][:, 1:].contiguous()
    save_file(part, path)
    assert main(["--local_dir", actor, "--target_dir", str(tmp_path / "served")]) == 2
    said = capsys.readouterr().err
    assert f"model_world_size_3_rank_1.safetensors: its part of {name!r} has shape" in said, said
    assert not os.path.exists(tmp_path / "served")


@pytest.mark.parametrize("removed, said", [
    (("tokenizer.json", "tokenizer_config.json"), "has no tokenizer (tokenizer.json, or vocab.json and merges.txt)"),
    (("processor_config.json",), "its processor cannot be loaded"),
    (("chat_template.jinja",), "has no chat template (chat_template.jinja)"),
])
def test_a_checkpoint_without_its_processor_is_refused_before_merging(bf16_checkpoint, tmp_path, capsys, removed,
                                                                       said):
    """It merged into a folder that AutoProcessor could not load (or loaded with a one-token tokenizer)."""
    actor, _ = bf16_checkpoint
    hf_dir = os.path.join(actor, "huggingface")
    for name in removed:
        os.remove(os.path.join(hf_dir, name))
    assert main(["--local_dir", actor, "--target_dir", str(tmp_path / "served")]) == 2
    err = capsys.readouterr().err
    assert hf_dir in err and said in err, err
    assert not os.path.exists(tmp_path / "served")


def test_final_only_names_a_damaged_trainer_state(bf16_checkpoint, capsys):
    """A truncated trainer_state.json (JSONDecodeError) or one without global_step (TypeError) was a traceback."""
    actor, _ = bf16_checkpoint
    step = os.path.dirname(actor)
    state = os.path.join(step, checkpoint.STATE_FILE)
    for text, said in (('{"global_step": 1, "total', "cannot be read"),
                       ('{"total_steps": 5}', "has no integer 'global_step' (found None)"),
                       ('{"global_step": 1, "total_steps": "5"}', "has no integer 'total_steps' (found '5')"),
                       ("[1]", "has no integer 'global_step'")):
        with open(state, "w") as f:
            f.write(text)
        assert main(["--latest_in", os.path.dirname(step), "--final_only"]) == 2
        err = capsys.readouterr().err
        assert f"checkpoint error: {state}" in err and said in err, err
    assert "merged_from.json" not in os.listdir(os.path.join(actor, "huggingface"))


def test_a_tied_models_merge_stores_its_embeddings_once(tiny_model_dir, tmp_path):
    """load_state_dict(assign=True) set the output embeddings apart from the input ones: the merge saved both."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    from pebr.workers.actor import load_hf_model

    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.tie_word_embeddings = config.text_config.tie_word_embeddings = True
    tied = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, config=config)
    tied.lm_head.weight = tied.get_input_embeddings().weight  # (the tiny model's own are apart)
    base = str(tmp_path / "tied_base")
    tied.save_pretrained(base)
    model = load_hf_model(base).eval()
    assert model.lm_head.weight is model.get_input_embeddings().weight
    run = str(tmp_path / "run")
    actor = os.path.join(checkpoint.partial_dir(run, 1), "actor")
    checkpoint.save_sharded(actor, model, None, None, rank=0, world_size=1)
    model.config.save_pretrained(os.path.join(actor, "huggingface"))
    AutoProcessor.from_pretrained(tiny_model_dir).save_pretrained(os.path.join(actor, "huggingface"))
    actor = os.path.join(checkpoint.finalize(run, 1, {"global_step": 1}, save_limit=-1), "actor")
    out = merge(actor, str(tmp_path / "served"))
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f, \
            safe_open(os.path.join(base, "model.safetensors"), "pt") as b:
        assert "lm_head.weight" not in f.keys() and set(f.keys()) == set(b.keys())  # the base model's layout
    merged = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32).eval()
    assert merged.lm_head.weight is merged.get_input_embeddings().weight
    ids = torch.randint(0, 200, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(merged(input_ids=ids).logits, model(input_ids=ids).logits)


@pytest.fixture
def lora_checkpoint(tiny_model_dir, tmp_path) -> tuple[str, torch.nn.Module]:
    """A one-rank checkpoint of the tiny model trained with LoRA (adapters that change its outputs), with its
    processor, and the adapted model itself."""
    from transformers import AutoProcessor

    from pebr.workers import lora
    from pebr.workers.actor import load_hf_model

    settings = {"rank": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj", "down_proj"]}
    model = lora.add_lora(load_hf_model(tiny_model_dir), settings)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(0)
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    run = tmp_path / "lora_run"
    actor = os.path.join(checkpoint.partial_dir(str(run), 1), "actor")
    checkpoint.save_sharded(actor, model, None, None, rank=0, world_size=1, lora=settings)
    model.config.save_pretrained(os.path.join(actor, "huggingface"))
    AutoProcessor.from_pretrained(tiny_model_dir).save_pretrained(os.path.join(actor, "huggingface"))
    (run / "config.yaml").write_text(f"worker:\n  actor:\n    model:\n      model_path: {tiny_model_dir}\n")
    return os.path.join(checkpoint.finalize(str(run), 1, {"global_step": 1}, save_limit=-1), "actor"), model.eval()


def test_a_merge_into_a_peft_adapters_folder_is_refused_and_forced_leaves_no_adapter(lora_checkpoint, tmp_path,
                                                                                     capsys):
    """The merge went in beside the adapter and kept it: transformers then applied the adapters to the weights
    they were already folded into, and vLLM read adapter_model.safetensors as weights."""
    from transformers import AutoModelForImageTextToText

    from model_merger import export_adapter

    actor, adapted = lora_checkpoint
    folder = export_adapter(actor, str(tmp_path / "adapter"))
    assert main(["--local_dir", actor, "--target_dir", folder]) == 2
    assert "holds ['adapter_config.json', 'adapter_model.safetensors'], which are not this model's weight files" \
        in capsys.readouterr().err
    assert sorted(os.listdir(folder)) == ["adapter_config.json", "adapter_model.safetensors"]
    assert main(["--local_dir", actor, "--target_dir", folder, "--force"]) == 0
    assert not [f for f in os.listdir(folder) if f.startswith("adapter_")]
    merged = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.randint(0, 200, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted(input_ids=ids).logits, atol=1e-5, rtol=0)


def test_merged_and_exported_files_reach_the_disk_before_they_are_published(bf16_checkpoint, lora_checkpoint,
                                                                            tmp_path, monkeypatch):
    """The weights were renamed into place unflushed: a power cut could leave the published folder with empty or
    partial weight files."""
    from model_merger import export_adapter

    synced = []
    fsync = os.fsync

    def fsync_watched(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync_watched)
    root = os.path.realpath(tmp_path)
    merge(bf16_checkpoint[0], os.path.join(root, "served"))
    staging = os.path.join(root, "served.merging")
    assert {staging, f"{staging}/model.safetensors", f"{staging}/config.json", f"{staging}/tokenizer.json"} <= \
        set(synced)
    synced.clear()
    export_adapter(lora_checkpoint[0], os.path.join(root, "adapter"))
    staging = os.path.join(root, "adapter.writing")
    assert {staging, f"{staging}/adapter_model.safetensors", f"{staging}/adapter_config.json"} <= set(synced)


def test_a_failed_save_leaves_no_staging_folder(bf16_checkpoint, tmp_path):
    """A write that fails (here a file-size limit: EFBIG, as a full disk gives ENOSPC) left `<target>.merging`,
    a model's size of hidden files."""
    import subprocess

    actor, _ = bf16_checkpoint
    target = str(tmp_path / "served")
    limit = os.path.getsize(os.path.join(actor, "model_world_size_1_rank_0.safetensors")) // 4
    code = (f"import resource, signal, sys\nsys.path[:0] = [{ROOT!r}, {os.path.join(ROOT, 'scripts')!r}]\n"
            "from model_merger import main\nsignal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))\n"
            f"sys.exit(main(['--local_dir', {actor!r}, '--target_dir', {target!r}]))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "the checkpoint is untouched" in done.stderr, done.stderr[-3000:]
    assert not [f for f in os.listdir(tmp_path) if f.startswith("served")]
