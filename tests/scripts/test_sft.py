"""Warm-up SFT (pebr/sft.py, scripts/sft_warmup.py) on the tiny model: labels, loss, saved model."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from pebr.data.records import DataError
from pebr.data.prompts import DEFAULT_FORMAT_PROMPT
from pebr.sft import (
    IGNORE_INDEX,
    SFTConfig,
    SFTDataset,
    assistant_label_mask,
    collate,
    encode_chat,
    load_sharegpt,
    train_sft,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def clean_sft(synthetic_data_dir: str, tmp_path_factory) -> str:
    """The synthetic SFT set after dataset/filter.py (its defects would otherwise stop the loader)."""
    out = str(tmp_path_factory.mktemp("sft") / "clean.json")
    subprocess.run(
        [sys.executable, os.path.join(ROOT, "dataset", "filter.py"), "--input",
         os.path.join(synthetic_data_dir, "sft", "sft.json"), "--output", out,
         "--image_root", os.path.join(synthetic_data_dir, "images")],
        check=True, capture_output=True,
    )
    return out


@pytest.fixture(scope="module")
def processor(tiny_model_dir: str):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_model_dir)


def _image_records(path: str) -> list[dict]:
    return [r for r in load_sharegpt(path) if r["images"]]


def test_assistant_label_mask_by_hand() -> None:
    # header = [5, 6], end = 9: two assistant turns; the end token is a target, the header is not.
    ids = [1, 2, 5, 6, 7, 8, 9, 3, 5, 6, 4, 9, 0]
    mask = assistant_label_mask(ids, [5, 6], 9)
    assert [i for i, m in enumerate(mask) if m] == [4, 5, 6, 10, 11]


# Qwen2's pre-tokenizer (tokenizer.json of Qwen2.5-VL): a run of newlines is one piece, which its merges join.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")


def _processor_that_merges_newlines(model_dir: str, out_dir: str):
    """The tiny model's processor with Qwen2's newline handling: its tokenizer splits text as Qwen2's does and
    has the merge of two newlines (in place of its last merge, so the vocabulary keeps its size)."""
    from transformers import AutoProcessor

    os.makedirs(out_dir)
    for name in os.listdir(model_dir):
        if not name.endswith(".safetensors"):
            shutil.copy(os.path.join(model_dir, name), out_dir)
    with open(os.path.join(out_dir, "tokenizer.json")) as f:
        spec = json.load(f)
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": QWEN2_SPLIT}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]}
    vocab, merges = spec["model"]["vocab"], spec["model"]["merges"]
    last = merges[-1]
    vocab["\u010a\u010a"] = vocab.pop("".join(last) if isinstance(last, list) else last.replace(" ", ""))
    merges[-1] = ["\u010a", "\u010a"] if isinstance(last, list) else "\u010a \u010a"
    with open(os.path.join(out_dir, "tokenizer.json"), "w") as f:
        json.dump(spec, f)
    return AutoProcessor.from_pretrained(out_dir)


def test_a_reply_that_starts_with_a_newline_trains_on_what_inference_sees(tiny_model_dir, tmp_path) -> None:
    """With Qwen2's tokenizer the header's newline and a reply's leading one became one token: the header was
    not found, the sample raised a DataError in the middle of training (blaming the chat template), and the ids
    would not have begun with the prompt the model gets at inference. The encoded sample now begins with exactly
    the inference prompt's ids, and its labels are the reply's tokens and the end of turn."""
    processor = _processor_that_merges_newlines(tiny_model_dir, str(tmp_path / "qwen_like"))
    tok = processor.tokenizer
    assert len(tok("\n\n", add_special_tokens=False)["input_ids"]) == 1  # the merge is there
    reply = "\n### The final answer is: 3"
    chat = [{"role": "user", "content": "How many?"}, {"role": "assistant", "content": reply}]
    joint = processor(text=[processor.apply_chat_template(chat, tokenize=False)])["input_ids"][0]
    opener = tok("<|im_start|>assistant", add_special_tokens=False)["input_ids"]
    at = next(i for i in range(len(joint)) if joint[i:i + len(opener)] == opener) + len(opener)
    assert tok.decode([joint[at]]) == "\n\n"  # the header's newline merged with the reply's
    out = encode_chat(processor, chat, [])
    prompt = tok(processor.apply_chat_template(chat[:1], tokenize=False, add_generation_prompt=True),
                 add_special_tokens=False)["input_ids"]
    ids = out["input_ids"].tolist()
    assert ids[:len(prompt)] == prompt and len(ids) == len(joint) + 1
    labelled = out["labels"] != IGNORE_INDEX
    assert tok.decode(out["input_ids"][labelled]) == reply + "<|im_end|>"
    assert labelled.nonzero()[0].item() == len(prompt)
    assert out["attention_mask"].shape == out["input_ids"].shape == out["mm_token_type_ids"].shape
    # A reply without the leading newline is encoded as the processor reads it.
    plain = [chat[0], {"role": "assistant", "content": reply.lstrip()}]
    assert encode_chat(processor, plain, [])["input_ids"].tolist() == processor(
        text=[processor.apply_chat_template(plain, tokenize=False)])["input_ids"][0]


def test_labels_cover_exactly_the_assistant_turn(clean_sft, synthetic_data_dir, processor) -> None:
    record = _image_records(clean_sft)[0]
    ds = SFTDataset([record], processor, image_dir=os.path.join(synthetic_data_dir, "images"), max_length=4096)
    sample = ds[0]
    ids, labels = sample["input_ids"], sample["labels"]
    chat = ds.samples[0][0]
    # The prompt part, as the chat template renders it with the generation prompt, is all masked...
    prompt_text = processor.apply_chat_template(chat[:1], tokenize=False, add_generation_prompt=True)
    prompt_len = len(processor(text=[prompt_text], images=[_load(record, synthetic_data_dir)])["input_ids"][0])
    assert (labels[:prompt_len] == IGNORE_INDEX).all()
    # ...and everything after it up to and including <|im_end|> is a target, equal to the input ids.
    answer = record["messages"][1]["content"] + "<|im_end|>"
    n_answer = len(processor.tokenizer(answer, add_special_tokens=False)["input_ids"])
    target = labels != IGNORE_INDEX
    assert target.sum().item() == n_answer
    assert target[prompt_len : prompt_len + n_answer].all()
    assert torch.equal(labels[target], ids[target])
    assert processor.tokenizer.decode(ids[target]) == answer
    # Image tokens are never targets, and are flagged for 3-D rope positions.
    image_tokens = ids == processor.image_token_id
    assert image_tokens.sum() > 0 and not target[image_tokens].any()
    assert torch.equal(sample["mm_token_type_ids"].bool(), image_tokens)
    assert sample["pixel_values"].shape[0] == int(sample["image_grid_thw"].prod())


def _load(record: dict, data_dir: str):
    from pebr.data.images import load_image

    return load_image(record["images"][0], os.path.join(data_dir, "images"))


def test_user_turn_is_rendered_through_the_format_prompt(clean_sft, synthetic_data_dir, processor) -> None:
    record = _image_records(clean_sft)[0]
    question = record["messages"][0]["content"].replace("<image>", "")
    image_dir = os.path.join(synthetic_data_dir, "images")
    with_prompt = SFTDataset([record], processor, image_dir=image_dir, max_length=4096)
    bare = SFTDataset([record], processor, image_dir=image_dir, max_length=4096, format_prompt=None)
    text = with_prompt.samples[0][0][0]["content"][-1]["text"]
    assert text.startswith(question) and "### The final answer is:" in text
    assert bare.samples[0][0][0]["content"][-1]["text"] == question
    assert with_prompt.lengths[0] > bare.lengths[0]


def test_collate_pads_and_counts(clean_sft, synthetic_data_dir, processor) -> None:
    ds = SFTDataset(_image_records(clean_sft)[:3], processor, image_dir=os.path.join(synthetic_data_dir, "images"),
                    max_length=4096)
    feats = [ds[i] for i in range(3)]
    batch = collate(feats, pad_token_id=processor.tokenizer.pad_token_id)
    width = max(f["input_ids"].numel() for f in feats)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["mm_token_type_ids"].shape == (3, width)
    assert batch["attention_mask"].sum().item() == sum(f["input_ids"].numel() for f in feats)
    assert batch["image_grid_thw"].shape == (3, 3)
    assert batch["pixel_values"].shape[0] == sum(f["pixel_values"].shape[0] for f in feats)


def test_overlong_samples_are_dropped_and_counted(clean_sft, synthetic_data_dir, processor) -> None:
    records = _image_records(clean_sft)[:4]
    image_dir = os.path.join(synthetic_data_dir, "images")
    full = SFTDataset(records, processor, image_dir=image_dir, max_length=4096)
    cut = sorted(full.lengths)[1]  # keeps the two shortest (ties aside)
    ds = SFTDataset(records, processor, image_dir=image_dir, max_length=cut)
    assert len(ds) == sum(n <= cut for n in full.lengths) and ds.num_overlong == 4 - len(ds)
    # The measured length is the real encoded length.
    assert full.lengths[0] == full[0]["input_ids"].numel()


def test_bad_records_name_the_problem(tmp_path, synthetic_data_dir, processor) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"messages": [{"role": "user", "content": "<image>q"}]}]))
    with pytest.raises(DataError, match="record 0.*no assistant turn"):
        load_sharegpt(str(bad))
    bad.write_text(json.dumps([{"messages": [{"role": "user", "content": "<image><image>q"},
                                             {"role": "assistant", "content": "a"}], "images": ["x.png"]}]))
    with pytest.raises(DataError, match="2 <image> placeholder"):
        load_sharegpt(str(bad))
    missing = [{"messages": [{"role": "user", "content": "<image>q"}, {"role": "assistant", "content": "a"}],
                "images": ["nowhere.png"]}]
    with pytest.raises(DataError, match="sft record 0.*nowhere.png.*filter.py"):
        SFTDataset(missing, processor, image_dir=str(tmp_path), max_length=512)
    # Read from a file, the record is named by its file and line, as the loader's own errors name it.
    jsonl = tmp_path / "warm.jsonl"
    jsonl.write_text("\n\n" + json.dumps(missing[0]) + "\n")
    locations: list[str] = []
    records = load_sharegpt(str(jsonl), locations)
    assert locations == [f"{jsonl} line 3 (record 0)"]
    with pytest.raises(DataError, match=rf"{jsonl} line 3 \(record 0\): image.*nowhere.png.*--image_dir; give it "
                                        "the filter's --image_root"):
        SFTDataset(records, processor, image_dir=str(tmp_path), max_length=512, locations=locations)


def test_loss_falls_on_a_repeated_batch(tmp_path, clean_sft, synthetic_data_dir, tiny_model_dir) -> None:
    # One short answer, repeated: every step sees the same batch, so the loss must fall steadily.
    image = _image_records(clean_sft)[0]["images"]
    record = {"messages": [{"role": "user", "content": "<image>How many cubes are there?"},
                           {"role": "assistant", "content": "### Step 1: Count them.\n### The final answer is: 3"}],
              "images": image}
    data = tmp_path / "one.json"
    data.write_text(json.dumps([record] * 8))
    metrics = train_sft(SFTConfig(
        model_path=tiny_model_dir, data=str(data), image_dir=os.path.join(synthetic_data_dir, "images"),
        output_dir=str(tmp_path / "out"), lr=3e-3, batch_size=2, max_steps=12, warmup_ratio=0.0,
        lr_scheduler="constant", logging_steps=1, format_prompt="",
    ))
    losses = [e["loss"] for e in metrics["log_history"] if "loss" in e]
    assert len(losses) == 12 and metrics["steps"] == 12
    # A random tiny model starts near ln(vocab) ~ 7; memorising one short answer brings it down fast.
    assert losses[0] > 6.0
    assert losses[-1] < 0.6 * losses[0]
    assert sum(b < a for a, b in zip(losses, losses[1:])) >= 10  # falls at (nearly) every step


def test_an_accumulated_step_averages_over_all_its_tokens(tmp_path, clean_sft, synthetic_data_dir, tiny_model_dir):
    """A batch of 2 in one micro-batch and in two of 1 (grad_accum=2): the same loss, the token mean over both
    answers, though one answer is 20x as long as the other (the mean of the micro-batches' means differs)."""
    image = _image_records(clean_sft)[0]["images"]
    answers = ["3", "### Step 1: " + "count the red cubes, then the blue balls; " * 8 + "\n### The final answer is: 3"]
    data = tmp_path / "two.json"
    data.write_text(json.dumps([{"messages": [{"role": "user", "content": "<image>How many?"},
                                              {"role": "assistant", "content": a}], "images": image} for a in answers]))
    losses = {}
    for batch_size, grad_accum in ((2, 1), (1, 2)):
        metrics = train_sft(SFTConfig(
            model_path=tiny_model_dir, data=str(data), image_dir=os.path.join(synthetic_data_dir, "images"),
            output_dir=str(tmp_path / f"out{grad_accum}"), batch_size=batch_size, grad_accum=grad_accum,
            max_steps=1, warmup_ratio=0.0, lr_scheduler="constant", format_prompt=""))
        losses[grad_accum] = metrics["train_loss"]
    assert losses[2] == pytest.approx(losses[1], rel=1e-4)


def test_cli_trains_and_saves_a_model_transformers_and_vllm_load(
    tmp_path, clean_sft, synthetic_data_dir, tiny_model_dir
) -> None:
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText, AutoProcessor

    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    from sft_warmup import main

    out = str(tmp_path / "warm")
    metrics = main(["--model_path", tiny_model_dir, "--data", clean_sft, "--image_dir",
                    os.path.join(synthetic_data_dir, "images"), "--output_dir", out, "--max_steps", "3",
                    "--batch_size", "2", "--lr", "1e-3", "--logging_steps", "1"])
    assert metrics["steps"] == 3 and metrics["samples"] == len(load_sharegpt(clean_sft))
    assert os.path.isfile(os.path.join(out, "model.safetensors"))
    assert json.load(open(os.path.join(out, "sft_metrics.json")))["steps"] == 3

    before = load_file(os.path.join(tiny_model_dir, "model.safetensors"))
    after = load_file(os.path.join(out, "model.safetensors"))
    assert before.keys() == after.keys()
    vision = [k for k in before if ".visual." in k or k.startswith("visual.")]
    text = [k for k in before if k not in vision]
    assert vision and all(torch.equal(before[k], after[k]) for k in vision)  # frozen by default
    assert any(not torch.equal(before[k], after[k]) for k in text)

    model = AutoModelForImageTextToText.from_pretrained(out)
    assert sum(p.numel() for p in model.parameters()) == sum(t.numel() for t in after.values())
    AutoProcessor.from_pretrained(out)

    from vllm import LLM, SamplingParams

    llm = LLM(model=out, dtype="float32", enforce_eager=True, max_model_len=1024, limit_mm_per_prompt={"image": 1})
    outputs = llm.generate([{"prompt": "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"}],
                           SamplingParams(max_tokens=4, temperature=0.0), use_tqdm=False)
    assert len(outputs[0].outputs[0].token_ids) >= 1


def test_a_bf16_base_model_is_saved_in_bf16(tmp_path, clean_sft, synthetic_data_dir, tiny_model_dir) -> None:
    """Trained with fp32 master weights, saved in the base model's dtype (a 7B model in fp32 is twice the disk,
    and every later stage and merge would keep fp32 as the base dtype)."""
    from transformers import AutoModelForImageTextToText

    base = str(tmp_path / "base_bf16")
    AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).save_pretrained(base)
    for name in os.listdir(tiny_model_dir):  # tokenizer, processor, chat template
        if not name.endswith(".safetensors") and name not in os.listdir(base):
            shutil.copy(os.path.join(tiny_model_dir, name), base)
    out = str(tmp_path / "warm")
    train_sft(SFTConfig(model_path=base, data=clean_sft, image_dir=os.path.join(synthetic_data_dir, "images"),
                        output_dir=out, max_steps=1, batch_size=2))
    config = json.load(open(os.path.join(out, "config.json")))
    # (the sub-configs too: the fp32 load had set theirs to float32, and save_pretrained rewrites the top one only)
    assert [config["dtype"], config["text_config"]["dtype"], config["vision_config"]["dtype"]] == ["bfloat16"] * 3
    assert AutoModelForImageTextToText.from_pretrained(out, dtype="auto").dtype == torch.bfloat16


def test_a_killed_warm_up_resumes_from_its_newest_checkpoint_and_ends_as_an_uninterrupted_one(
    tmp_path, clean_sft, synthetic_data_dir, tiny_model_dir
) -> None:
    """SIGKILL mid-run, then the same command: it continues from the newest published checkpoint and its
    weights and losses equal a run never interrupted (transformers' own resume had left the weights at the
    base model's). Checkpoints of other settings are refused; --no-resume deletes them."""
    from safetensors.torch import load_file

    from pebr.config import ConfigError
    from pebr.sft_checkpoints import CHECKPOINT_META, complete_checkpoints, find_resume_checkpoint, run_identity

    images = os.path.join(synthetic_data_dir, "images")
    common = ["--model_path", tiny_model_dir, "--data", clean_sft, "--image_dir", images, "--max_steps", "40",
              "--batch_size", "2", "--lr", "1e-3", "--logging_steps", "1"]
    out = str(tmp_path / "warm")
    checkpoints = out + ".checkpoints"
    child = subprocess.Popen([sys.executable, os.path.join(ROOT, "scripts", "sft_warmup.py"), *common,
                              "--output_dir", out, "--save_steps", "2", "--save_total_limit", "2"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not os.path.isdir(os.path.join(checkpoints, "checkpoint-8")):
            assert child.poll() is None, "the warm-up ended before its fourth checkpoint"
        os.kill(child.pid, signal.SIGSTOP)  # frozen where it was, to look at what it left
        published = [n for n in os.listdir(checkpoints) if re.fullmatch(r"checkpoint-\d+", n)]  # not .deleting
        assert "checkpoint-8" in published and "checkpoint-2" not in published  # rotated when 6 came
        assert all(os.path.isfile(os.path.join(checkpoints, n, CHECKPOINT_META)) for n in published)
        assert not os.path.exists(out)
    finally:
        child.kill()
        child.wait()
    for leftover in (".partial/checkpoint-98", "checkpoint-1.deleting"):  # a save, a rotation cut short: ignored
        os.makedirs(os.path.join(checkpoints, leftover), exist_ok=True)

    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    from sft_warmup import main

    with pytest.raises(ConfigError, match=r"other settings \(lr: 0.001 -> 0.002\).*--no-resume"):
        main([*common, "--output_dir", out, "--save_steps", "2", "--lr", "2e-3"])
    stale = str(tmp_path / "other")
    shutil.copytree(checkpoints, stale + ".checkpoints")
    cfg = SFTConfig(model_path=tiny_model_dir, data=clean_sft, output_dir=stale, resume=False)
    assert find_resume_checkpoint(cfg, run_identity(cfg)) is None and not os.path.exists(stale + ".checkpoints")
    # A run killed after its output was complete, while its checkpoints (renamed for deletion) were being removed:
    # they stayed on disk until another run into this output_dir completed.
    done = SFTConfig(model_path=tiny_model_dir, data=clean_sft, output_dir=str(tmp_path / "done"))
    os.makedirs(done.checkpoint_dir + ".deleting/checkpoint-4")
    assert find_resume_checkpoint(done, None) is None and not os.path.exists(done.checkpoint_dir + ".deleting")

    newest = complete_checkpoints(checkpoints)[-1][1]
    resumed = main([*common, "--output_dir", out, "--save_steps", "2", "--save_total_limit", "2"])
    assert resumed["resumed_from"] == newest
    assert resumed["steps"] == 40 and not os.path.exists(checkpoints)  # deleted once the model is in place

    whole = main([*common, "--output_dir", str(tmp_path / "whole")])  # checkpoints change nothing of the run
    assert whole["resumed_from"] is None
    losses = [[e["loss"] for e in m["log_history"] if "loss" in e] for m in (resumed, whole)]
    # Equal up to the rounding of multi-threaded CPU kernels (often bit for bit); resuming from the base weights
    # instead moved the loss by 0.3 within four steps and the weights by about 1e-2.
    assert len(losses[0]) == 40 and losses[0] == pytest.approx(losses[1], rel=1e-5, abs=0)
    got, want = load_file(os.path.join(out, "model.safetensors")), load_file(str(tmp_path / "whole" / "model.safetensors"))
    assert got.keys() == want.keys() and all(torch.allclose(got[k], want[k], rtol=0, atol=1e-5) for k in want)

    data = tmp_path / "changed.json"  # the same path, other contents
    data.write_text(json.dumps(load_sharegpt(clean_sft)[:-1]))
    changed = SFTConfig(model_path=tiny_model_dir, data=str(data), output_dir=str(tmp_path / "c"))
    os.makedirs(os.path.join(changed.checkpoint_dir, "checkpoint-2"))
    with open(os.path.join(changed.checkpoint_dir, "checkpoint-2", CHECKPOINT_META), "w") as handle:
        json.dump(run_identity(changed), handle)
    data.write_text(json.dumps(load_sharegpt(clean_sft)))
    with pytest.raises(ConfigError, match=r"other settings \(the contents of data\)"):
        find_resume_checkpoint(changed, run_identity(changed))


def test_a_checkpoint_belongs_to_the_inputs_contents_not_their_paths(tmp_path, clean_sft, tiny_model_dir) -> None:
    """Compared as resolved paths, a checkpoint copied to another machine (or a run from another clone, whose
    format prompt lies elsewhere) was refused with the same files, and the way out offered deleted it."""
    from pebr.sft_checkpoints import remove_checkpoints, run_identity

    moved = tmp_path / "elsewhere"
    shutil.copytree(tiny_model_dir, moved / "model")
    shutil.copy(clean_sft, moved / "clean.json")
    shutil.copy(DEFAULT_FORMAT_PROMPT, moved / "prompt.jinja")
    here = SFTConfig(model_path=tiny_model_dir, data=clean_sft, output_dir=str(tmp_path / "a"))
    there = SFTConfig(model_path=str(moved / "model"), data=str(moved / "clean.json"), output_dir=str(tmp_path / "b"),
                      image_dir=str(moved), format_prompt=str(moved / "prompt.jinja"))
    assert run_identity(here) == run_identity(there)
    (moved / "prompt.jinja").write_text("Think first.\n{{ content }}")
    assert run_identity(here)["settings"].keys() == run_identity(there)["settings"].keys()
    assert [k for k, v in run_identity(there)["settings"].items() if run_identity(here)["settings"][k] != v] == [
        "the contents of format_prompt"]
    # Another model of the same architecture and file sizes (a fine-tune of the same base), or the same weights
    # with another chat template: the config and weight sizes alone took either for the checkpoint's base model.
    from safetensors.torch import load_file, save_file

    weights_file = moved / "model" / "model.safetensors"
    weights = load_file(str(weights_file))
    size = weights_file.stat().st_size
    first = sorted(weights)[0]
    weights[first] = weights[first] + 1
    save_file(weights, str(weights_file), metadata={"format": "pt"})
    assert weights_file.stat().st_size == size
    for edit in ("weights", "chat template"):
        if edit == "chat template":
            shutil.copy(os.path.join(tiny_model_dir, "model.safetensors"), weights_file)
            template = moved / "model" / "chat_template.jinja"
            template.write_text(template.read_text() + "\n")
        assert [k for k, v in run_identity(there)["settings"].items() if run_identity(here)["settings"][k] != v] == [
            "the base model (model_path)", "the contents of format_prompt"], edit
    # A note beside the model is no part of it; a checkpoint of the earlier version (config and weight sizes
    # only) is named as such, not sent back to "rerun with those settings".
    shutil.copy(os.path.join(tiny_model_dir, "chat_template.jinja"), moved / "model" / "chat_template.jinja")
    (moved / "model" / "README.md").write_text("fine-tuned on Tuesday")
    assert run_identity(here)["settings"]["the base model (model_path)"] == run_identity(there)["settings"][
        "the base model (model_path)"]
    from pebr.config import ConfigError
    from pebr.sft_checkpoints import CHECKPOINT_META, find_resume_checkpoint

    old = run_identity(here)
    old["settings"]["the base model (model_path)"] = {"config": "abc", "weights": [["model.safetensors", 1]]}
    os.makedirs(os.path.join(here.checkpoint_dir, "checkpoint-2"))
    with open(os.path.join(here.checkpoint_dir, "checkpoint-2", CHECKPOINT_META), "w") as handle:
        json.dump(old, handle)
    with pytest.raises(ConfigError, match="saved by an earlier version of this trainer.*--no-resume"):
        find_resume_checkpoint(here, run_identity(here))
    # The version just before hashed every file: its checkpoint, with a README's hash, resumes.
    before = run_identity(here)
    before["settings"]["the base model (model_path)"]["README.md"] = "0" * 64
    with open(os.path.join(here.checkpoint_dir, "checkpoint-2", CHECKPOINT_META), "w") as handle:
        json.dump(before, handle)
    assert find_resume_checkpoint(here, run_identity(here)) == os.path.join(here.checkpoint_dir, "checkpoint-2")

    # A checkpoints folder that is a link to another disk: emptied, the link kept (it was renamed away, its
    # checkpoints left behind, and the next run's clean-up failed on it).
    disk = tmp_path / "disk"
    (disk / "checkpoint-2").mkdir(parents=True)
    os.symlink(disk, there.checkpoint_dir)
    remove_checkpoints(there.checkpoint_dir)
    assert os.path.islink(there.checkpoint_dir) and os.listdir(disk) == []


def test_several_gpus_or_processes_are_refused_naming_the_way_out() -> None:
    """On several GPUs without a launcher Trainer ran DataParallel, whose loss this trainer's token mean makes
    n_gpu times too large (read in transformers 5.19, not run: no machine here has two GPUs)."""
    from pebr.config import ConfigError
    from pebr.sft import check_one_process_one_device

    check_one_process_one_device(0, {})
    check_one_process_one_device(1, {"WORLD_SIZE": "1"})
    with pytest.raises(ConfigError, match="2 GPUs are visible.*CUDA_VISIBLE_DEVICES=0"):
        check_one_process_one_device(2, {})
    with pytest.raises(ConfigError, match="started as 4 processes"):
        check_one_process_one_device(1, {"WORLD_SIZE": "4"})


def test_config_rejects_bad_values(tiny_model_dir) -> None:
    with pytest.raises(ValueError, match="lr"):
        SFTConfig(model_path=tiny_model_dir, data="x", output_dir="y", lr=0).validate()
    with pytest.raises(ValueError, match="model_path"):
        SFTConfig(model_path="/nonexistent", data="x", output_dir="y").validate()
    for name, value in (("save_steps", -1), ("save_total_limit", 0)):
        with pytest.raises(ValueError, match=f"{name}={value}"):
            SFTConfig(model_path=tiny_model_dir, data="x", output_dir="y", **{name: value}).validate()
    with pytest.raises(ValueError, match="lies in .*y.checkpoints, the checkpoints of this output_dir"):
        SFTConfig(model_path=tiny_model_dir, data="y.checkpoints/checkpoint-2/d.json", output_dir="y").validate()
    with pytest.raises(ValueError, match=r"lr_scheduler='cosin' is not one of \['linear', 'cosine'"):
        SFTConfig(model_path=tiny_model_dir, data="x", output_dir="y", lr_scheduler="cosin").validate()
    assert os.path.isfile(DEFAULT_FORMAT_PROMPT)


def test_optimizer_groups_follow_freezing_and_vision_lr(tiny_model_dir) -> None:
    from pebr.sft import build_optimizer, freeze_vision
    from pebr.workers.actor import load_hf_model

    model = load_hf_model(tiny_model_dir)
    visual = {id(p) for p in model.model.visual.parameters()}
    cfg = SFTConfig(model_path=tiny_model_dir, data="x", output_dir="y", lr=1e-3, vision_lr=1e-2)
    groups = {g["lr"]: {id(p) for p in g["params"]} for g in build_optimizer(model, cfg).param_groups}
    assert groups == {1e-2: visual, 1e-3: {id(p) for p in model.parameters()} - visual}
    frozen = freeze_vision(model)
    assert frozen == sum(p.numel() for p in model.model.visual.parameters())
    (group,) = build_optimizer(model, cfg).param_groups
    assert group["lr"] == 1e-3 and not visual & {id(p) for p in group["params"]}


def test_weight_decay_spares_biases_and_norms(tiny_model_dir) -> None:
    """Every trainable parameter was decayed, q_proj's bias and the RMSNorm scales too; transformers' Trainer and
    LLaMA-Factory (the paper's SFT) decay matrices alone."""
    from pebr.sft import build_optimizer
    from pebr.workers.actor import load_hf_model

    model = load_hf_model(tiny_model_dir)
    cfg = SFTConfig(model_path=tiny_model_dir, data="x", output_dir="y", weight_decay=0.01)
    decay = {g["weight_decay"]: {n for n, p in model.named_parameters() if any(p is q for q in g["params"])}
             for g in build_optimizer(model, cfg).param_groups}
    assert set(decay) == {0.01, 0.0} and decay[0.0] and decay[0.01]
    assert "model.language_model.layers.0.self_attn.q_proj.bias" in decay[0.0]
    assert "model.language_model.norm.weight" in decay[0.0]
    assert "model.language_model.layers.0.self_attn.q_proj.weight" in decay[0.01]
    assert all(p.ndim >= 2 for n, p in model.named_parameters() if n in decay[0.01])


def test_bad_jsonl_line_is_named_by_file_and_line(tmp_path) -> None:
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(good) + "\n" + '{"messages": [oops\n')
    with pytest.raises(DataError, match=r"bad\.jsonl line 2 is not JSON"):
        load_sharegpt(str(bad))
    bad.write_text("\n" + json.dumps({"messages": good["messages"][:1]}) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl line 2 \(record 0\): key 'messages' has no assistant turn"):
        load_sharegpt(str(bad))
    bad.write_text("\n")
    with pytest.raises(DataError, match=r"bad\.jsonl holds no SFT record"):
        load_sharegpt(str(bad))


def test_whatever_the_filter_keeps_the_loader_accepts(tmp_path) -> None:
    # One rule set for both: the records the loader refuses are the ones the filter drops.
    from PIL import Image

    Image.new("RGB", (56, 56), (10, 20, 30)).save(tmp_path / "ok.png")
    ok = {"messages": [{"role": "user", "content": "<image>q"}, {"role": "assistant", "content": "a"}],
          "images": ["ok.png"]}
    refused = [
        {**ok, "images": []},
        {**ok, "messages": [{"role": "user", "content": "<image><image>q"}, ok["messages"][1]]},
        {**ok, "messages": []},
        {**ok, "messages": ok["messages"][:1]},
        {**ok, "messages": [{"role": "human", "content": "<image>q"}, {"role": "gpt", "content": "a"}]},
        {**ok, "messages": [ok["messages"][0], {"role": "assistant", "content": "the <|image_pad|> token"}]},
        # The chat template's control tokens in a turn: they passed both and failed mid-training, naming no record.
        {**ok, "messages": [ok["messages"][0], {"role": "assistant", "content": "a<|im_end|>"}]},
        {**ok, "messages": [{"role": "user", "content": "<image>q<|im_start|>assistant\n"}, ok["messages"][1]]},
        # Half an emoji (JSON's "\\ud83c"): the filter failed writing its whole output, the loader with a TypeError.
        {**ok, "messages": [{"role": "user", "content": "<image>q \ud83c"}, ok["messages"][1]]},
        {**ok, "images": ["ok\udc80.png"]},
        # A placeholder in a reply: LLaMA-Factory counts every turn's and stops at the mismatch.
        {**ok, "messages": [ok["messages"][0], {"role": "assistant", "content": "an <image> here"}]},
        # An empty answer: its only label was the end of the turn, which taught the model to stop at once.
        {**ok, "messages": [ok["messages"][0], {"role": "assistant", "content": "  "}]},
    ]
    for record in refused:
        (tmp_path / "one.json").write_text(json.dumps([ok, record]))
        with pytest.raises(DataError, match="one.json record 1: .*key '(messages|images)"):
            load_sharegpt(str(tmp_path / "one.json"))
    raw, clean = tmp_path / "raw.json", tmp_path / "clean.json"
    raw.write_text(json.dumps([ok, *refused]))
    subprocess.run([sys.executable, os.path.join(ROOT, "dataset", "filter.py"), "--input", str(raw), "--output",
                    str(clean)], check=True, capture_output=True)
    assert load_sharegpt(str(clean)) == [ok]


def test_relative_image_paths_are_read_beside_the_data_file_as_the_filter_reads_them(tmp_path, tiny_model_dir,
                                                                                        monkeypatch) -> None:
    """dataset/filter.py resolves relative image paths against the data file's folder; the warm-up read them from
    the working directory, so records the filter had just kept failed, with a hint to run the filter."""
    from PIL import Image

    (tmp_path / "rel" / "imgs").mkdir(parents=True)
    Image.new("RGB", (56, 56), (10, 20, 30)).save(tmp_path / "rel" / "imgs" / "a.png")
    record = {"messages": [{"role": "user", "content": "<image>q"}, {"role": "assistant", "content": "a"}],
              "images": ["imgs/a.png"]}
    data = tmp_path / "rel" / "clean.json"
    data.write_text(json.dumps([record]))
    subprocess.run([sys.executable, os.path.join(ROOT, "dataset", "filter.py"), "--input", str(data), "--output",
                    str(tmp_path / "rel" / "kept.json")], check=True, capture_output=True)
    assert len(json.loads((tmp_path / "rel" / "kept.json").read_text())) == 1  # the filter found the image
    monkeypatch.chdir(tmp_path)  # anywhere but the data's folder
    cfg = SFTConfig(model_path=tiny_model_dir, data=str(data), output_dir=str(tmp_path / "out"))
    assert cfg.resolved_image_dir == str(tmp_path / "rel")
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    assert len(SFTDataset(load_sharegpt(str(data)), processor, image_dir=cfg.resolved_image_dir, max_length=512)) == 1
    wrong = str(tmp_path / "elsewhere")
    with pytest.raises(DataError, match=re.escape(f"relative image paths are joined to {wrong!r} (--image_dir; ")):
        SFTDataset(load_sharegpt(str(data)), processor, image_dir=wrong, max_length=512)


def test_undecodable_image_names_the_record_and_path(tmp_path, processor) -> None:
    # A JPEG cut to a third keeps a good header; the load-time probe decodes it (at an eighth of its size).
    import random
    import shutil

    from PIL import Image

    rng = random.Random(0)
    Image.frombytes("RGB", (128, 128), bytes(rng.randrange(256) for _ in range(128 * 128 * 3))).save(
        tmp_path / "whole.jpg")
    data = (tmp_path / "whole.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 3])
    overlong = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "word " * 2000}],
                "images": []}
    cut = {"messages": [{"role": "user", "content": "<image>q"}, {"role": "assistant", "content": "a"}],
           "images": ["cut.jpg"]}
    path = os.path.join(str(tmp_path), "cut.jpg")
    with pytest.raises(DataError, match=rf"sft record 1: image '{path}' cannot be read: .*truncated.*filter\.py"):
        SFTDataset([overlong, cut], processor, image_dir=str(tmp_path), max_length=512, format_prompt=None)
    # A file broken after the load is named when its sample is read.
    shutil.copy(tmp_path / "whole.jpg", tmp_path / "cut.jpg")
    ds = SFTDataset([overlong, cut], processor, image_dir=str(tmp_path), max_length=512, format_prompt=None)
    assert len(ds) == 1  # sample 0 is record 1: the message must name the record
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 3])
    with pytest.raises(DataError, match=rf"sft record 1: image '{path}' cannot be decoded: .*truncated.*filter\.py"):
        ds[0]


def test_a_thin_image_is_refused_by_its_fitted_size(tmp_path, processor) -> None:
    """8100x41 px is 198:1, under the processor's 200, but resized into the pixel bounds it becomes 8092x28,
    289:1: the filter drops it and the SFT data set names it (the processor's bare ValueError named nothing)."""
    from PIL import Image

    Image.new("RGB", (8100, 41), (200, 10, 10)).save(tmp_path / "thin.png")
    Image.new("RGB", (5600, 28), (200, 10, 10)).save(tmp_path / "ok.png")  # exactly 200:1, kept
    record = {"messages": [{"role": "user", "content": "<image>q"}, {"role": "assistant", "content": "a"}],
              "images": ["thin.png"]}
    ok = {**record, "images": ["ok.png"]}
    with pytest.raises(DataError, match=r"sft record 1: image 'thin.png' becomes 8092x28 px.*200 times"):
        SFTDataset([ok, record], processor, image_dir=str(tmp_path), max_length=4096)
    raw, clean = tmp_path / "raw.json", tmp_path / "clean.json"
    raw.write_text(json.dumps([ok, record]))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "dataset", "filter.py"), "--input", str(raw),
                           "--output", str(clean)], capture_output=True, text=True, check=True)
    assert "dropped 1 thin_image" in proc.stdout + proc.stderr and json.loads(clean.read_text()) == [ok]


def test_a_processor_error_names_the_record_instead_of_ending_the_epoch(tmp_path, processor) -> None:
    """Records given to SFTDataset directly skip the loader's checks: a vision token in a turn makes the processor
    run out of images with a StopIteration, which a DataLoader takes for the end of the data (SFT ended its epoch
    early and saved as if it had finished)."""
    from PIL import Image

    Image.new("RGB", (56, 56), (10, 20, 30)).save(tmp_path / "ok.png")
    record = {"messages": [{"role": "user", "content": "<image>q"},
                           {"role": "assistant", "content": "the <|image_pad|> token"}], "images": ["ok.png"]}
    ds = SFTDataset([record], processor, image_dir=str(tmp_path), max_length=4096)
    with pytest.raises(DataError, match="sft record 0: the processor refused it: StopIteration"):
        ds[0]


def test_text_the_tokenizer_normalises_keeps_its_labels(tmp_path, tiny_model_dir) -> None:
    """The real Qwen2.5-VL tokenizer NFC-normalises: an OHM SIGN comes back as an Omega, and the label check
    compared the decoded labels with the raw text, so one such answer ended a run mid-way."""
    from transformers import AutoProcessor

    model = tmp_path / "nfc"
    shutil.copytree(tiny_model_dir, model)
    with open(model / "tokenizer.json") as f:
        spec = json.load(f)
    spec["normalizer"] = {"type": "NFC"}
    with open(model / "tokenizer.json", "w") as f:
        json.dump(spec, f)
    processor = AutoProcessor.from_pretrained(str(model))
    chat = [{"role": "user", "content": "What is R?"}, {"role": "assistant", "content": "R = 5 \u2126"}]
    out = encode_chat(processor, chat, [])
    labelled = processor.tokenizer.decode(out["input_ids"][out["labels"] != -100])
    assert labelled == "R = 5 \u03a9<|im_end|>"  # the normalised answer and its end-of-turn token


def test_an_output_dir_that_is_an_input_or_a_users_directory_is_refused(tmp_path, tiny_model_dir) -> None:
    """output_dir=model_path overwrote the base model in place."""
    with pytest.raises(ValueError, match="is or holds model_path"):
        SFTConfig(model_path=tiny_model_dir, data="x", output_dir=tiny_model_dir).validate()
    data = tmp_path / "work" / "sft.json"
    data.parent.mkdir()
    data.write_text("[]")
    with pytest.raises(ValueError, match="is or holds data"):
        SFTConfig(model_path=tiny_model_dir, data=str(data), output_dir=str(tmp_path / "work")).validate()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(ValueError, match="holds files but no sft_metrics.json"):
        SFTConfig(model_path=tiny_model_dir, data="x", output_dir=str(tmp_path / "mine")).validate()


def test_an_interrupted_save_leaves_the_previous_output_whole(tmp_path, clean_sft, synthetic_data_dir,
                                                              tiny_model_dir, monkeypatch) -> None:
    """A second run into the same directory, killed while saving, left its weights beside the first run's
    sft_metrics.json, which marked the mixture as finished."""
    from transformers import ProcessorMixin

    out = str(tmp_path / "warm")
    settings = dict(model_path=tiny_model_dir, data=clean_sft, image_dir=os.path.join(synthetic_data_dir, "images"),
                    output_dir=out, batch_size=2, lr=1e-3)
    train_sft(SFTConfig(max_steps=1, **settings))
    first = {name: open(os.path.join(out, name), "rb").read() for name in sorted(os.listdir(out))}

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ProcessorMixin, "save_pretrained", killed)
    with pytest.raises(KeyboardInterrupt):
        train_sft(SFTConfig(max_steps=2, **settings))
    assert {name: open(os.path.join(out, name), "rb").read() for name in sorted(os.listdir(out))} == first
    monkeypatch.undo()
    assert train_sft(SFTConfig(max_steps=2, **settings))["steps"] == 2  # the killed run's staging is cleared
    assert json.load(open(os.path.join(out, "sft_metrics.json")))["steps"] == 2
    assert sorted(os.listdir(tmp_path)) == ["warm"]


def test_a_reply_starting_with_a_newline_is_measured_as_it_is_encoded(tmp_path, tiny_model_dir) -> None:
    """With a tokenizer that reads "\n\n" as one token (Qwen2's does), the header's newline split off such a reply
    made the sample one token longer than measured, so a sample at max_length was kept and ran past it."""
    import json
    import shutil

    from PIL import Image
    from transformers import AutoProcessor

    merging = tmp_path / "merging"
    shutil.copytree(tiny_model_dir, merging)
    spec = json.loads((merging / "tokenizer.json").read_text())
    vocab, merges = spec["model"]["vocab"], spec["model"]["merges"]
    # The last merge's token gives its id to "\n\n" (byte-level "ĊĊ"): the model's vocabulary has no free row.
    last = "".join(merges.pop()) if isinstance(merges[-1], list) else merges.pop().replace(" ", "")
    vocab["ĊĊ"] = vocab.pop(last)
    merges.insert(0, ["Ċ", "Ċ"] if isinstance(merges[0], list) else "Ċ Ċ")
    # and reads a newline run as one word, as Qwen2's pre-tokenizer does (the tiny model's splits "\n\nTwo" apart)
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "\\s*[\\r\\n]+|[^\\r\\n]+"}, "behavior": "Isolated", "invert": False},
        {**spec["pre_tokenizer"], "use_regex": True}]}
    (merging / "tokenizer.json").write_text(json.dumps(spec))
    processor = AutoProcessor.from_pretrained(str(merging))
    ids = processor.tokenizer("<|im_start|>assistant\n\nTwo", add_special_tokens=False)["input_ids"]
    assert processor.tokenizer.convert_ids_to_tokens(ids)[2] == "ĊĊ"  # the header's newline merged into the reply's

    Image.new("RGB", (56, 56), (10, 20, 30)).save(tmp_path / "ok.png")
    record = {"messages": [{"role": "user", "content": "<image>How many?"},
                           {"role": "assistant", "content": "\nTwo cubes."}], "images": ["ok.png"]}
    ds = SFTDataset([record], processor, image_dir=str(tmp_path), max_length=4096, format_prompt=None)
    assert ds.lengths[0] == ds[0]["input_ids"].numel()
    fits = SFTDataset([record], processor, image_dir=str(tmp_path), max_length=ds.lengths[0], format_prompt=None)
    assert len(fits) == 1
    with pytest.raises(DataError, match="no SFT sample fits"):
        SFTDataset([record], processor, image_dir=str(tmp_path), max_length=ds.lengths[0] - 1, format_prompt=None)


def test_the_demo_learning_rate_on_a_real_model_is_warned_about() -> None:
    from pebr.sft import lr_warning

    assert "paper's warm-up of Qwen2.5-VL-7B ran at 1e-5" in lr_warning(1e-3, 7_000_000_000)
    assert lr_warning(1e-5, 7_000_000_000) is None and lr_warning(1e-3, 2_000_000) is None
