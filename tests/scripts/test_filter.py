"""dataset/filter.py: every drop rule, the printed counts, the input errors and the written file."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
FILTER = REPO / "dataset" / "filter.py"

_spec = importlib.util.spec_from_file_location("pebr_dataset_filter", FILTER)
flt = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = flt  # dataclasses look their module up there
_spec.loader.exec_module(flt)


def _sample(answer: str = "### The final answer is: 1", images=None, question: str = "<image>How many?") -> dict:
    rec = {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}
    if images is not None:
        rec["images"] = images
    return rec


@pytest.fixture()
def image_root(tmp_path: Path) -> Path:
    root = tmp_path / "imgs"
    root.mkdir()
    for name, size in {"ok.png": (64, 64), "narrow.png": (27, 64), "short.png": (64, 27), "edge.png": (28, 28)}.items():
        Image.new("RGB", size, (10, 20, 30)).save(root / name)
    (root / "broken.png").write_bytes(b"this is not an image")
    return root


# index -> expected fate; KEPT records come back in this order.
CASES = [
    (_sample(images=["ok.png"]), "kept"),  # 0
    (_sample(images="ok.png"), "kept"),  # 1: a single string
    (_sample(question="How many sides has a square?"), "kept"),  # 2: text-only, no images key
    (_sample(question="Text only.", images=[]), "kept"),  # 3: text-only, empty list
    (_sample(answer="Hmm, LeT mE ReThInK iT. ### The final answer is: 2", images=["ok.png"]), "reflective"),  # 4
    (_sample(answer="Wait, let me\n  rethink it.", images=["ok.png"]), "reflective"),  # 5: broken by a line break
    # 6: only assistant turns count
    (_sample(question="<image>Let me rethink it: how many?", images=["ok.png"]), "kept"),
    (_sample(images=["narrow.png"]), "small_image"),  # 7: width 27
    (_sample(images=["short.png"]), "small_image"),  # 8: height 27
    (_sample(images=["edge.png"]), "kept"),  # 9: 28 x 28 is allowed
    (_sample(images=["nowhere.png"]), "missing_image"),  # 10
    (_sample(images="broken.png"), "unreadable_image"),  # 11
    ("just a string", "malformed"),  # 12
    ({"messages": "hello", "images": ["ok.png"]}, "malformed"),  # 13
    ({"messages": [{"role": "user"}], "images": ["ok.png"]}, "malformed"),  # 14: no content
    (_sample(images=5), "malformed"),  # 15
    # 16: any bad image drops the sample
    (_sample(question="<image><image>How many?", images=["ok.png", "narrow.png"]), "small_image"),
    (_sample(images=["ok.png", 3]), "malformed"),  # 17
]


def _write_input(path: Path, records: list) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        path.write_text(json.dumps(records))
    return path


def _expected_kept() -> list[dict]:
    kept = []
    for rec, fate in CASES:
        if fate == "kept":
            if isinstance(rec.get("images"), str):
                rec = {**rec, "images": [rec["images"]]}
            kept.append(rec)
    return kept


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_every_rule_counts_and_output(tmp_path, image_root, capsys, suffix):
    src = _write_input(tmp_path / f"raw{suffix}", [rec for rec, _ in CASES])
    out = tmp_path / f"clean{suffix}"
    assert flt.main(["--input", str(src), "--output", str(out), "--image_root", str(image_root)]) == 0
    printed = capsys.readouterr().out
    for idx in (12, 13, 14, 15, 17):  # named by file and line (.jsonl) or index (.json)
        assert (f"malformed {src} line {idx + 1} (record {idx}):" if suffix == ".jsonl"
                else f"malformed {src} record {idx}:") in printed
    for line in ("dropped 5 malformed", "dropped 2 reflective", "dropped 1 missing_image",
                 "dropped 1 unreadable_image", "dropped 3 small_image", "before 18, after 6 (dropped 12)"):
        assert line in printed
    # Records dropped for an image are named too, with where the image was looked for.
    name = f"{src} line 11 (record 10)" if suffix == ".jsonl" else f"{src} record 10"
    assert f"missing_image {name}: image 'nowhere.png' ({image_root / 'nowhere.png'})" in printed
    # The output is not beside the images: the paths it keeps are relative to --image_root, which is said.
    assert f"relative to {image_root}, not to its own folder: pass --image_dir {image_root}" in printed
    assert flt.load_records(out) == _expected_kept()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["imgs", src.name, out.name])  # no temp file left


def test_min_size_option_and_default_image_root(tmp_path, image_root, capsys):
    src = _write_input(image_root / "raw.json", [_sample(images=["edge.png"]), _sample(images=["ok.png"])])
    out = tmp_path / "clean.json"
    assert flt.main(["--input", str(src), "--output", str(out), "--min_size", "29"]) == 0  # root = input's folder
    assert "dropped 1 small_image" in capsys.readouterr().out
    assert flt.load_records(out) == [_sample(images=["ok.png"])]


def test_each_image_is_checked_once(image_root, monkeypatch):
    records = [_sample(images=["ok.png"]) for _ in range(50)] + [_sample(images=["nowhere.png"])] * 3
    opened = []
    real_open = flt.Image.open

    def counting_open(path, *args, **kwargs):
        opened.append(Path(path).name)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(flt.Image, "open", counting_open)
    flt.filter_records(records[:1], image_root)
    once = list(opened)  # the header check and the full decode may each open the file
    opened.clear()
    kept, report = flt.filter_records(records, image_root)
    assert opened == once and set(once) == {"ok.png"}  # memoised: 50 records cost what one does
    assert (len(kept), report.dropped["missing_image"]) == (50, 3)


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("bad.json", '{"messages": [', "bad.json is not a JSON file"),
        ("dict.json", '{"messages": []}', "dict.json must hold a JSON list"),
        ("bad.jsonl", '{"messages": []}\nnot json\n', "bad.jsonl line 2 is not JSON"),
        ("BAD.JSONL", '{"messages": []}\nnot json\n', "BAD.JSONL line 2 is not JSON"),  # a suffix in capitals
        # json.loads' plain ValueError for an integer of over 4300 digits went out as a traceback
        ("big.jsonl", '{"n": ' + "9" * 5000 + "}\n", "big.jsonl line 1 is not JSON: Exceeds the limit (4300 digits)"),
        ("big.json", '[{"n": ' + "9" * 5000 + "}]", "big.json cannot be read as JSON: Exceeds the limit"),
        ("absent.json", None, "cannot read"),
    ],
)
def test_unreadable_input_stops_with_a_message_naming_the_file(tmp_path, capsys, name, content, message):
    src = tmp_path / name
    if content is not None:
        src.write_text(content)
    out = tmp_path / "out.json"
    assert flt.main(["--input", str(src), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and str(tmp_path) in err
    assert not out.exists()


def test_command_line_run(tmp_path, image_root):
    src = _write_input(tmp_path / "raw.json", [_sample(images=["ok.png"]), _sample(images=["short.png"])])
    res = subprocess.run([sys.executable, str(FILTER), "--input", str(src), "--output", str(tmp_path / "o.json"),
                          "--image_root", str(image_root)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "before 2, after 1 (dropped 1)" in res.stdout
    bad = tmp_path / "bad.json"
    bad.write_text("not json at all")
    res = subprocess.run([sys.executable, str(FILTER), "--input", str(bad), "--output", str(tmp_path / "x.json")],
                         capture_output=True, text=True)
    assert res.returncode == 2 and "Traceback" not in res.stderr and "bad.json" in res.stderr


def test_warmup_docs_carry_the_paper_settings():
    cfg = yaml.safe_load((REPO / "docs" / "qwen2_5vl_full_sft.yaml").read_text())
    expected = {
        "stage": "sft", "finetuning_type": "full", "freeze_vision_tower": True, "freeze_multi_modal_projector": True,
        "dataset": "pebr_r1_warm_up", "template": "qwen2_vl", "cutoff_len": 4096, "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 4, "learning_rate": 1.0e-5, "num_train_epochs": 2,
        "lr_scheduler_type": "cosine", "warmup_ratio": 0.1, "bf16": True,
    }
    assert {k: cfg.get(k) for k in expected} == expected
    assert "ds_z3" in cfg["deepspeed"]
    entry = json.loads((REPO / "docs" / "dataset_info.json").read_text())["pebr_r1_warm_up"]
    assert entry["formatting"] == "sharegpt"
    assert entry["columns"] == {"messages": "messages", "images": "images"}
    tags = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}
    assert entry["tags"] == tags


def _noise_image(path: Path, fmt: str) -> bytes:
    """A 128x128 noise image saved as `fmt`; noise keeps the compressed file long enough to cut."""
    import random

    rng = random.Random(0)
    im = Image.frombytes("RGB", (128, 128), bytes(rng.randrange(256) for _ in range(128 * 128 * 3)))
    im.save(path, fmt)
    return path.read_bytes()


def test_truncated_images_are_unreadable(tmp_path):
    # The header of a cut file still parses, so only a full decode finds the missing pixel data.
    root = tmp_path / "imgs"
    root.mkdir()
    png, jpeg = _noise_image(root / "whole.png", "PNG"), _noise_image(root / "whole.jpg", "JPEG")
    (root / "half.png").write_bytes(png[: len(png) // 2])
    (root / "third.jpg").write_bytes(jpeg[: len(jpeg) // 3])
    with Image.open(root / "third.jpg") as im:
        assert im.size == (128, 128)  # the premise: the header alone looks fine
    records = [_sample(images=[name]) for name in ("whole.png", "half.png", "whole.jpg", "third.jpg")]
    kept, report = flt.filter_records(records, root)
    assert [r["images"] for r in kept] == [["whole.png"], ["whole.jpg"]]
    assert report.dropped["unreadable_image"] == 2


def test_truncated_images_are_not_hidden_by_pil_settings():
    # ImageFile.LOAD_TRUNCATED_IMAGES = True would make a full decode pad cut files with grey instead of failing.
    import pebr.data.images  # noqa: F401  (imported for its side effects, if any)
    from PIL import ImageFile

    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    sources = [source for folder in ("pebr", "dataset", "scripts") for source in (REPO / folder).rglob("*.py")]
    assert len(sources) > 20, sources  # (the check below reads something)
    for source in sources:
        assert "LOAD_TRUNCATED_IMAGES" not in source.read_text(encoding="utf-8"), source


# Records that pebr/sft.py's loader refuses; the filter must drop them too, each under its reason.
LOADER_REJECTS = [
    (_sample(question="<image>q", images=[]), "placeholder_mismatch"),  # 0: a placeholder, no image
    (_sample(question="<image><image>q", images=["ok.png"]), "placeholder_mismatch"),  # 1: two for one
    ({"messages": [], "images": ["ok.png"]}, "malformed"),  # 2
    ({"messages": [{"role": "user", "content": "<image>q"}], "images": ["ok.png"]}, "no_assistant_turn"),  # 3
    ({"messages": [{"role": "human", "content": "<image>q"}, {"role": "gpt", "content": "a"}],
      "images": ["ok.png"]}, "unknown_role"),  # 4
    (_sample(images=["ok.png"]), "kept"),  # 5
    # 6, 7: an empty answer taught the model to stop at once; an empty question with no image asks nothing
    (_sample(images=["ok.png"], answer=" \n"), "empty_turn"),
    (_sample(question=""), "empty_turn"),
    (_sample(question="", images=["ok.png"]), "kept"),  # 8: an image-only question (the image goes first)
]


def test_records_the_sft_loader_rejects_are_dropped_and_counted(tmp_path, image_root, capsys):
    src = _write_input(tmp_path / "raw.jsonl", [rec for rec, _ in LOADER_REJECTS])
    out = tmp_path / "clean.jsonl"
    assert flt.main(["--input", str(src), "--output", str(out), "--image_root", str(image_root)]) == 0
    printed = capsys.readouterr().out
    for idx, (_, fate) in enumerate(LOADER_REJECTS):
        if fate != "kept":
            assert f"{fate} {src} line {idx + 1} (record {idx}):" in printed  # listed, as malformed records are
    for line in ("dropped 2 placeholder_mismatch", "dropped 1 malformed", "dropped 1 no_assistant_turn",
                 "dropped 1 unknown_role", "dropped 2 empty_turn", "before 9, after 2 (dropped 7)"):
        assert line in printed
    assert "2 <image> placeholder(s) but key 'images' has 1 image(s)" in printed
    kept = [rec for rec, fate in LOADER_REJECTS if fate == "kept"]
    assert flt.load_records(out) == [kept[0], {**kept[1], "messages": [{"role": "user", "content": "<image>"},
                                                                       kept[1]["messages"][1]]}]


def test_llamafactory_shape_thin_images_and_turn_order(tmp_path, image_root, capsys):
    """What LLaMA-Factory and the Qwen2.5-VL processor refuse: one image without a placeholder gets one (where
    pebr/sft.py puts it); turns out of user/assistant order and images over 200:1 are dropped and counted."""
    Image.new("RGB", (7000, 30), (10, 20, 30)).save(image_root / "thin.png")
    system = {"role": "system", "content": "Be brief."}
    records = [
        _sample(images=["ok.png"], question="How many?"),  # kept, with "<image>How many?"
        {"messages": [system, *_sample()["messages"]], "images": ["ok.png"]},  # a system turn first: kept
        _sample(images=["thin.png"]),  # 7000 x 30: thin_image
        {"messages": [{"role": "user", "content": "<image>A"}, {"role": "user", "content": "B"},
                      {"role": "assistant", "content": "C"}], "images": ["ok.png"]},  # two user turns: turn_order
        {"messages": [*_sample()["messages"], {"role": "user", "content": "And?"}], "images": ["ok.png"]},
    ]
    out = tmp_path / "clean.json"
    assert flt.main(["--input", str(_write_input(tmp_path / "raw.json", records)), "--output", str(out),
                     "--image_root", str(image_root)]) == 0
    printed = capsys.readouterr().out
    assert "dropped 1 thin_image" in printed and "dropped 2 turn_order" in printed
    kept = flt.load_records(out)
    assert kept[0]["messages"][0]["content"] == "<image>How many?"
    assert kept[1] == records[1] and len(kept) == 2


def test_nothing_is_written_when_every_sample_is_dropped(tmp_path, image_root, capsys):
    out = tmp_path / "clean.json"
    out.write_text("[\"a good earlier output\"]")
    src = _write_input(tmp_path / "raw.json", [_sample(images=["ok.png"])] * 3)
    assert flt.main(["--input", str(src), "--output", str(out), "--image_root", str(tmp_path / "wrong")]) == 2
    captured = capsys.readouterr()
    assert "dropped 3 missing_image" in captured.out
    assert f"every sample was dropped (reasons above; images are looked for under {tmp_path / 'wrong'}" in captured.err
    assert out.read_text() == "[\"a good earlier output\"]"
    assert flt.main(["--input", str(src), "--output", str(tmp_path), "--image_root", str(image_root)]) == 2
    assert "is a directory" in capsys.readouterr().err


def test_an_empty_input_an_output_that_is_the_input_and_no_image_found_write_nothing(tmp_path, image_root, capsys):
    out = tmp_path / "clean.json"
    out.write_text("[\"a good earlier output\"]")
    for empty in ("", "\n\n"):
        (tmp_path / "empty.jsonl").write_text(empty)
        assert flt.main(["--input", str(tmp_path / "empty.jsonl"), "--output", str(out)]) == 2
        assert "empty.jsonl holds no sample" in capsys.readouterr().err
    # A wrong image root: the text-only samples were written, the others dropped as missing_image.
    src = _write_input(tmp_path / "raw.json", [_sample(images=["ok.png"]), _sample(question="Text only?")])
    assert flt.main(["--input", str(src), "--output", str(out), "--image_root", str(tmp_path / "wrong")]) == 2
    assert "not one image was found (1 samples dropped as missing_image" in capsys.readouterr().err
    assert out.read_text() == "[\"a good earlier output\"]"
    # The filter over its own input would have lost the dropped samples for good.
    before = src.read_text()
    assert flt.main(["--input", str(src), "--output", str(src), "--image_root", str(image_root)]) == 2
    assert "is the input file" in capsys.readouterr().err and src.read_text() == before
    # With the right root, text-only samples and found images are written as before.
    assert flt.main(["--input", str(src), "--output", str(out), "--image_root", str(image_root)]) == 0
    assert len(flt.load_records(out)) == 2


def test_a_full_disk_is_exit_1_as_for_every_entry_point(tmp_path, image_root, monkeypatch, capsys):
    """The filter made every write error its input error (exit 2); a full or read-only disk is exit 1 everywhere
    (pebr/cli.py), the message naming the file and what to do once there is room."""
    import errno

    src = _write_input(tmp_path / "raw.json", [_sample(images=["ok.png"])])
    out = tmp_path / "clean.json"

    def full_disk(path, records):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(flt, "write_records", full_disk)
    assert flt.main(["--input", str(src), "--output", str(out), "--image_root", str(image_root)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: [Errno 28] No space left on device: ") and "clean.json" in err
    assert "once there is room, run it again (the output is written whole or not at all)" in err and not out.exists()

    def no_folder(path, records):
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(path))

    monkeypatch.setattr(flt, "write_records", no_folder)  # not the disk's state: the user's --output, exit 2
    assert flt.main(["--input", str(src), "--output", str(out), "--image_root", str(image_root)]) == 2
    assert capsys.readouterr().err.startswith(f"error: cannot write {out}: ")


def test_a_byte_that_is_not_utf8_is_named_by_line(tmp_path, capsys):
    lines = [json.dumps(_sample(question=f"Question {i}?")) for i in range(300)]
    raw = ("\n".join(lines[:299]) + "\n").encode() + lines[299].encode().replace(b"Question", b"Qu\xe9stion") + b"\n"
    for name, where in (("big.jsonl", "big.jsonl line 300: byte 0xe9 at column"), ("big.json", "big.json line 300: byte 0xe9 is not UTF-8")):
        data = raw if name.endswith(".jsonl") else b"[" + raw.replace(b"\n", b",\n")[:-2] + b"]"
        (tmp_path / name).write_bytes(data)
        assert flt.main(["--input", str(tmp_path / name), "--output", str(tmp_path / "out.json")]) == 2
        assert where in capsys.readouterr().err
    # A byte-order mark at the start of each of two joined files is not an error.
    bom = b"\xef\xbb\xbf" + json.dumps(_sample(question="A?")).encode() + b"\n"
    (tmp_path / "joined.jsonl").write_bytes(bom + bom)
    assert len(flt.load_records(tmp_path / "joined.jsonl")) == 2


def test_images_without_a_user_turn_are_refused_by_the_shared_check():
    """Such a record loaded in the built-in SFT (the filter dropped it only as turn_order) and stopped the run at
    its step: the model found image features and no image tokens."""
    from pebr.data.records import BadRecord
    from pebr.data.sharegpt import check_sharegpt_record

    record = {"messages": [{"role": "system", "content": "S"}, {"role": "assistant", "content": "It is red."}],
              "images": ["a.png"]}
    with pytest.raises(BadRecord, match=r"data\.json record 3: key 'images' has 1 image\(s\) but 'messages' has no "
                                        r"user turn to hold them") as caught:
        check_sharegpt_record(record, "data.json record 3")
    assert caught.value.reason == "placeholder_mismatch"


def test_format_prompt_writes_the_rl_prompt_for_llamafactory_and_sft_does_not_wrap_it_twice(tmp_path, image_root,
                                                                                               capsys):
    """LLaMA-Factory trains on the text as it is: the filter's output held the bare question while the RL stages
    prompt with examples/format_prompt/pebr.jinja. --format_prompt writes the prompt in; the built-in SFT, which
    applies the template itself, leaves such a question as it is."""
    from pebr.data.prompts import load_format_prompt
    from pebr.sft import to_chat

    template_path = str(REPO / "examples" / "format_prompt" / "pebr.jinja")
    template = load_format_prompt(template_path)
    raw = [_sample(images=["ok.png"]), _sample(question="What is 2+2?")]
    src = _write_input(tmp_path / "raw.json", raw)
    out = tmp_path / "clean.json"
    assert flt.main(["--input", str(src), "--output", str(out), "--image_root", str(image_root),
                     "--format_prompt", template_path]) == 0
    written = flt.load_records(out)
    assert [r["messages"][0]["content"] for r in written] == [
        template.render(content="<image>How many?"), template.render(content="What is 2+2?")]
    assert [r["messages"][1] for r in written] == [r["messages"][1] for r in raw]  # answers untouched
    for before, after in zip(raw, written):
        record = {"messages": before["messages"], "images": before.get("images", [])}
        assert to_chat({**record, "messages": after["messages"]}, template) == to_chat(record, template)
    bad = tmp_path / "bad.jinja"
    bad.write_text("no question here")
    assert flt.main(["--input", str(src), "--output", str(tmp_path / "x.json"), "--format_prompt", str(bad)]) == 2
    assert "it places the question 0 times" in capsys.readouterr().err and not (tmp_path / "x.json").exists()


@pytest.mark.parametrize("answer", ["Let me\u200brethink it.", "let me re\u00adthink it", "Let me rethink\u2060 it",
                                    "Ｌｅｔ ｍｅ ｒｅｔｈｉｎｋ ｉｔ"])
def test_invisible_or_wide_characters_do_not_hide_the_reflective_phrase(image_root, answer):
    """A zero-width space, a soft hyphen, a word joiner or full-width letters kept the sample."""
    kept, report = flt.filter_records([_sample(answer=answer, images=["ok.png"])], image_root)
    assert kept == [] and report.dropped["reflective"] == 1


@pytest.mark.parametrize("where", ["question", "answer"])
def test_a_video_or_audio_placeholder_drops_the_sample(image_root, where):
    """LLaMA-Factory reads <video> and <audio> as media slots and refuses a sample that has no such media."""
    text = {"question": "<image>Is this frame from the <video> clip?", "answer": "Yes: <audio> is a tag."}[where]
    sample = _sample(images=["ok.png"], **{where: text})
    kept, report = flt.filter_records([sample, _sample(images=["ok.png"])], image_root)
    assert len(kept) == 1 and report.dropped["media_placeholder"] == 1
