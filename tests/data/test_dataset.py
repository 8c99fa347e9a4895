"""RLDataset on the tiny Qwen2.5-VL processor: items, prompt lengths, bad images, overlong prompts."""

from __future__ import annotations

import io
import json
import logging
import os
import re

import pytest
from PIL import Image

from pebr.data.dataset import RLDataset, note_processor_bounds
from pebr.data.records import BadRecord, DataError, load_records

TEMPLATE = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "format_prompt", "pebr.jinja")
VISION = "<|vision_start|><|image_pad|><|vision_end|>"


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_model_dir)


@pytest.fixture
def image_dir(tmp_path):
    Image.new("RGB", (100, 60), "red").save(tmp_path / "wide.png")
    Image.new("RGB", (50, 90), "green").save(tmp_path / "tall.png")
    return str(tmp_path)


def make(records, processor, image_dir, **kwargs):
    options = {"max_prompt_length": 4096, "min_pixels": 3136, "max_pixels": 50176}
    options.update(kwargs)
    return RLDataset(records, processor, image_dir=image_dir, **options)


def test_records_under_other_key_names_load_and_are_counted(processor, image_dir):
    """data.image_key other than "images": the image counts read record["images"], a KeyError at load."""
    records = [{"qid": "a", "question": "<image>How many?", "solution": "2", "pics": ["wide.png"]},
               {"qid": "b", "question": "Compare <image> and <image>.", "solution": "left", "pics": ["wide.png", "tall.png"]},
               {"qid": "c", "question": "What is 3+4?", "solution": "7"}]
    dataset = make(records, processor, image_dir, prompt_key="question", answer_key="solution", image_key="pics")
    assert len(dataset) == 3 and (dataset.num_without_images, dataset.num_with_several_images) == (1, 1)
    assert [len(dataset[i]["images"]) for i in range(3)] == [1, 2, 0] and dataset[1]["ground_truth"] == "left"


def test_item_fields_and_resized_images(processor, image_dir):
    records = [
        {"qid": "a", "problem": "<image>How many red?", "answer": 2, "images": ["wide.png"], "key_words": ["red"]},
        {"qid": "b", "problem": "Compare <image> and <image>.", "answer": "left", "images": ["wide.png", "tall.png"]},
        {"qid": "c", "problem": "What is 3+4?", "answer": "7", "key_words": None},
    ]
    dataset = make(records, processor, image_dir, format_prompt=TEMPLATE)
    assert len(dataset) == 3 and dataset.report.kept == 3 and dataset.num_overlong == 0
    assert dataset.num_without_key_words == 2  # b has none, c has None

    first = dataset[0]
    assert set(first) == {"prompt", "images", "question", "ground_truth", "qid", "key_words", "index"}
    assert first["question"] == "<image>How many red?"  # as written, for the reward: no template, no format prompt
    assert (first["ground_truth"], first["qid"], first["key_words"], first["index"]) == ("2", "a", ["red"], 0)
    # 100x60 rounds to 112x56 = 6272 px, inside [3136, 50176].
    assert [im.size for im in first["images"]] == [(112, 56)]
    assert first["images"][0].mode == "RGB"
    prompt = first["prompt"]
    assert prompt.count(VISION) == 1 and "<image>" not in prompt
    # Images come first in the user turn, then the templated question, then the assistant prompt.
    user_turn = prompt.split("<|im_start|>user\n", 1)[1]
    assert user_turn.startswith(VISION + "How many red?")
    assert "### Image Description:" in user_turn and "### The final answer is:" in user_turn
    assert prompt.endswith("<|im_start|>assistant\n")

    second = dataset[1]
    assert second["prompt"].count(VISION) == 2
    # 50x90 rounds to 56x84 = 4704 px.
    assert [im.size for im in second["images"]] == [(112, 56), (56, 84)]
    # Each image stays where its placeholder stood (it used to be moved to the front: "Compare  and .").
    assert f"<|im_start|>user\nCompare{VISION}and{VISION}." in second["prompt"]

    third = dataset[2]
    assert third["images"] == [] and third["key_words"] == [] and VISION not in third["prompt"]


def test_without_template_the_question_is_the_text(processor, image_dir):
    dataset = make([{"problem": "<image>Just this?", "answer": "yes", "images": ["wide.png"]}], processor, image_dir)
    user_turn = dataset[0]["prompt"].split("<|im_start|>user\n", 1)[1]
    assert user_turn == VISION + "Just this?<|im_end|>\n<|im_start|>assistant\n"
    assert dataset[0]["qid"] == "record-0"


def test_prompt_length_matches_the_processor_expansion(processor, image_dir):
    records = [{"problem": "<image><image>Two pictures.", "answer": "1", "images": ["wide.png", "tall.png"]}]
    dataset = make(records, processor, image_dir, format_prompt=TEMPLATE)
    item = dataset[0]
    expected = len(processor(text=[item["prompt"]], images=item["images"])["input_ids"][0])
    # 112x56 -> 8x4 patches of 14 px -> 32 / 4 merged = 8 tokens; 56x84 -> 4x6 -> 6 tokens.
    text_only = len(processor.tokenizer(item["prompt"])["input_ids"])
    assert expected == text_only - 2 + 8 + 6
    # At exactly the measured length the record stays; one token less and it is dropped.
    assert len(make(records, processor, image_dir, format_prompt=TEMPLATE, max_prompt_length=expected)) == 1
    short = make(records, processor, image_dir, format_prompt=TEMPLATE, max_prompt_length=expected - 1)
    assert len(short) == 0 and short.num_overlong == 1


def test_overlong_prompts_dropped_counted_logged_or_raised(processor, image_dir, caplog):
    records = [
        {"qid": "short", "problem": "Hi?", "answer": "1"},
        {"qid": "long", "problem": "word " * 300, "answer": "1"},
        {"qid": "long2", "problem": "<image>" + "more " * 300, "answer": "1", "images": ["wide.png"]},
    ]
    with caplog.at_level("WARNING", logger="pebr.data.dataset"):
        dataset = make(records, processor, image_dir, max_prompt_length=100)
    assert [dataset[i]["qid"] for i in range(len(dataset))] == ["short"]
    assert dataset.num_overlong == 2 and dataset.report.skipped == {"prompt_too_long": 2}
    assert any("dropped 2 of 3 prompts longer than 100 tokens" in r.getMessage() for r in caplog.records)
    with pytest.raises(DataError, match=r"record 1 qid='long': prompt has \d+ tokens, more than max_prompt_length=100"):
        make(records, processor, image_dir, max_prompt_length=100, filter_overlong_prompts=False)


def test_bad_images_raise_or_skip_with_index_preserved(processor, image_dir):
    (open(os.path.join(image_dir, "zero.png"), "wb")).close()
    with open(os.path.join(image_dir, "corrupt.png"), "wb") as handle:
        handle.write(b"\x89PNG\r\n\x1a\n garbage")
    records = [
        {"qid": "missing", "problem": "q", "answer": "1", "images": ["nope.png"]},
        {"qid": "zero", "problem": "q", "answer": "1", "images": ["zero.png"]},
        {"qid": "corrupt", "problem": "q", "answer": "1", "images": ["corrupt.png"]},
        {"qid": "ok", "problem": "q", "answer": "1", "images": ["tall.png"]},
    ]
    with pytest.raises(DataError, match=r"record 0 qid='missing': image file '.*nope\.png' does not exist"):
        make(records, processor, image_dir)
    with pytest.raises(DataError, match=r"record 0 qid='zero': image file '.*zero\.png' is empty"):
        make(records[1:], processor, image_dir)
    with pytest.raises(DataError, match=r"record 0 qid='corrupt': image '.*corrupt\.png' cannot be read"):
        make(records[2:], processor, image_dir)

    dataset = make(records, processor, image_dir, on_bad_record="skip")
    assert len(dataset) == 1
    assert dataset[0]["qid"] == "ok" and dataset[0]["index"] == 3  # position in the original list
    assert dataset.report.total == 4 and dataset.report.skipped == {"image_missing": 1, "image_unreadable": 2}
    # The log named no skipped record (only counts): the first one's message comes with them.
    assert re.search(r"kept 1 of 4 records; skipped 3 \(image_missing=1, image_unreadable=2\); first: record 0 "
                     r"qid='missing': image file '.*nope\.png' does not exist", dataset.report.summary())


def test_image_forms_bytes_pil_dict_absolute(processor, image_dir):
    buffer = io.BytesIO()
    Image.new("RGB", (60, 60), "blue").save(buffer, format="PNG")
    records = [
        {"problem": "q", "answer": "1", "images": [buffer.getvalue()]},
        {"problem": "q", "answer": "1", "images": [Image.new("RGBA", (60, 60))]},
        {"problem": "q", "answer": "1", "images": [{"bytes": None, "path": "tall.png"}]},
        {"problem": "q", "answer": "1", "images": os.path.join(image_dir, "wide.png")},
    ]
    # Without an image_dir only bytes, PIL images and absolute paths resolve.
    dataset = make(records[:2] + records[3:], processor, None)
    assert [item["images"][0].size for item in dataset] == [(56, 56), (56, 56), (112, 56)]
    assert all(item["images"][0].mode == "RGB" for item in dataset)
    assert len(make(records[2:3], processor, image_dir)) == 1


def test_records_from_loader_and_raw_records_are_checked(processor, image_dir, tmp_path):
    import json

    source = tmp_path / "rl.jsonl"
    record = {"qid": 7, "problem": "q", "answer": 1, "images": "wide.png", "key_words": ["x"]}
    source.write_text(json.dumps(record) + "\n")
    records, _ = load_records(str(source))
    item = make(records, processor, image_dir)[0]
    assert item["qid"] == "7" and item["ground_truth"] == "1" and item["key_words"] == ["x"]
    assert item["prompt"].count(VISION) == 1
    with pytest.raises(DataError, match=r"record 0: key 'answer' is missing"):
        make([{"problem": "q"}], processor, image_dir)


def test_template_and_argument_errors(processor, image_dir, tmp_path):
    records = [{"problem": "q", "answer": "1"}]
    with pytest.raises(DataError, match="format_prompt '.*missing.jinja' cannot be read"):
        make(records, processor, image_dir, format_prompt=str(tmp_path / "missing.jinja"))
    broken = tmp_path / "broken.jinja"
    broken.write_text("ok\n{{ content \n")
    with pytest.raises(DataError, match="broken.jinja' line"):
        make(records, processor, image_dir, format_prompt=str(broken))
    with pytest.raises(ValueError, match="max_prompt_length must be positive"):
        make(records, processor, image_dir, max_prompt_length=0)
    with pytest.raises(ValueError, match="on_bad_record"):
        make(records, processor, image_dir, on_bad_record="warn")


def test_items_do_not_hold_decoded_images(processor, image_dir):
    dataset = make([{"problem": "q", "answer": "1", "images": ["wide.png"]}], processor, image_dir)
    first, second = dataset[0]["images"][0], dataset[0]["images"][0]
    assert first is not second  # decoded afresh on each read
    # and nothing decoded is kept anywhere the data set can reach (a cache would hold every image of an epoch)
    import gc

    from PIL import Image

    seen, todo = set(), [dataset]
    while todo:
        obj = todo.pop()
        if id(obj) in seen or isinstance(obj, (str, bytes, int, float, type)) or callable(obj) and obj is not dataset:
            continue
        seen.add(id(obj))
        assert not isinstance(obj, Image.Image), "the data set holds a decoded image"
        todo.extend(gc.get_referents(obj))
    assert len(seen) > 10  # the walk reached the data set's records


def test_a_template_with_a_head_puts_the_image_after_it_wherever_the_prompt_is_built(tmp_path):
    """The RL loader put a record's image after the template's head and inference and SFT before it, so a model was
    trained on one layout and asked in another; and a question already wrapped in the template was wrapped again once
    the loader had put its image first."""
    from pebr.data.prompts import build_messages, load_format_prompt
    from pebr.data.records import normalize_record

    (tmp_path / "head.jinja").write_text("Answer about the picture.\n{{ content }}\nEnd with the answer.")
    template = load_format_prompt(str(tmp_path / "head.jinja"))
    expected = [{"type": "text", "text": "Answer about the picture."}, {"type": "image"},
                {"type": "text", "text": "How many cubes?\nEnd with the answer."}]
    wrapped = template.render(content="How many cubes?")
    for question in ("How many cubes?", wrapped):
        loaded = normalize_record({"problem": question, "answer": "3", "images": ["a.png"]}, where="data.json",
                                  default_qid="0")
        for text in (question, loaded["problem"]):  # as inference / SFT get it, as RL gets it from the loader
            assert build_messages(text, 1, template)[0]["content"] == expected, (question, text)
    assert build_messages(wrapped, 0, template)[0]["content"] == [{"type": "text", "text": wrapped}]


def test_pebr_template_asks_for_the_exact_layout():
    from pebr.data.prompts import load_format_prompt

    text = load_format_prompt(TEMPLATE).render(content="How many cubes are left?")
    assert text.startswith("How many cubes are left?")
    layout = [
        "### Image Description:",
        "### Rationales:",
        "### Let's think step by step.",
        "### Step 1:",
        "### Step 2:",
        "...",
        "### The final answer is:",
    ]
    # The layout block closes the prompt, one heading per line, in this order.
    assert text.rstrip().splitlines()[-len(layout):] == layout
    import jinja2

    with pytest.raises(jinja2.UndefinedError, match="content"):
        load_format_prompt(TEMPLATE).render()  # a missing question is an error, not an empty prompt


@pytest.mark.parametrize("template, message", [
    ("{{ question }}", r"'question' is undefined; the only variable given is `content`"),
    ("<image>{{ content }}", r"holds '<image>'"),
    # Loaded without a word before: every prompt lacked its question, or held it twice (and then failed on its
    # placeholders naming neither file nor record), or gave the processor an image slot or a turn of its own.
    ("Answer in the PeBR layout.", r"places the question 0 times; it must render \{\{ content \}\} exactly once"),
    ("{% if content == 'never' %}{{ content }}{% endif %}Answer.", "places the question 0 times"),
    ("{{ content }}\n(Question: {{ content }})", "places the question 2 times"),
    ("<|vision_start|><|image_pad|><|vision_end|>{{ content }}",
     "holds the model's token '<|vision_start|>'; a template is text only: images go where a record's question"),
    ("{{ content }}<|im_end|>\n<|im_start|>assistant\n", "holds the model's token '<|im_end|>'"),
])
def test_format_prompt_problems_fail_at_load_naming_the_file(tmp_path, template, message):
    from pebr.data.prompts import load_format_prompt

    load_format_prompt(TEMPLATE)  # the shipped one passes: {{ content }} once, through no filter
    filtered = tmp_path / "filtered.jinja"
    filtered.write_text("Question: {{ content | trim | tojson }}")  # filters keep the question: not refused
    assert load_format_prompt(str(filtered)).render(content=" 2 cubes? ") == 'Question: "2 cubes?"'

    path = tmp_path / "mine.jinja"
    path.write_text(template)
    with pytest.raises(DataError, match=rf"format_prompt '{path}': .*{message}"):
        load_format_prompt(str(path))


def test_image_too_thin_for_the_processor_is_a_counted_skip(processor, tmp_path):
    Image.new("RGB", (20000, 25), "red").save(tmp_path / "ribbon.png")
    Image.new("RGB", (60, 60), "red").save(tmp_path / "square.png")
    records = [{"qid": "thin", "problem": "<image>q?", "answer": "1", "images": ["ribbon.png"]},
               {"qid": "fine", "problem": "<image>q?", "answer": "1", "images": ["square.png"]}]
    with pytest.raises(BadRecord, match=r"qid='thin': image 0 becomes 19992x28 px.*more than 200 times"):
        make(records, processor, str(tmp_path), max_pixels=802816)
    dataset = make(records, processor, str(tmp_path), max_pixels=802816, on_bad_record="skip")
    assert len(dataset) == 1 and dataset.report.skipped == {"image_aspect_ratio": 1}
    assert dataset[0]["qid"] == "fine"


def test_a_bad_record_is_named_by_its_place_in_its_file(processor, tmp_path):
    """With skipping on, a record was named by its position among the records the reader kept ("record 2" for
    line 4) and, from a directory, by the directory and a position across its files."""
    from pebr.data.records import load_records

    Image.new("RGB", (60, 60), "red").save(tmp_path / "a.png")
    rows = [{"problem": "<image>q", "answer": "1", "images": ["a.png"]},
            {"problem": "<image>q", "images": ["a.png"]},  # no answer: the reader skips it
            {"problem": "<image>q", "answer": "2", "images": ["a.png"]},
            {"problem": "<image>q", "answer": "3", "images": ["missing.png"]}]
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "part1.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "part2.json").write_text(json.dumps([rows[3]]))
    for source, wheres in ((str(folder / "part1.jsonl"), ["part1.jsonl line 4 (record 3)"]),
                           (str(folder), ["part1.jsonl line 4 (record 3)", "part2.json record 0"])):
        records, report = load_records(source, on_bad_record="skip")
        dataset = RLDataset(records, processor, image_dir=str(tmp_path), max_prompt_length=4096,
                            on_bad_record="skip", source=source, origins=report.kept_at)
        assert len(dataset) == 2 and len(dataset.report.messages) == len(wheres)
        for message, where in zip(dataset.report.messages, wheres):
            assert message.startswith(str(folder / where)), message
    records, report = load_records(str(folder / "part1.jsonl"), on_bad_record="skip")
    with pytest.raises(BadRecord, match=re.escape(str(folder / "part1.jsonl")) + r" line 4 \(record 3\) qid="):
        RLDataset(records, processor, image_dir=str(tmp_path), max_prompt_length=4096, origins=report.kept_at)


def test_data_bounds_past_the_processors_are_logged(processor, caplog):
    """The tiny processor keeps images within 3136..50176 px; data bounds outside that are not reached."""
    with caplog.at_level(logging.INFO, logger="pebr.data.dataset"):
        note_processor_bounds(processor, 3136, 50176)
        note_processor_bounds(processor, None, None)
        assert caplog.records == []
        note_processor_bounds(processor, 576, 802816)
    assert [r.getMessage().split(":")[0] for r in caplog.records] == [
        "data min_pixels=576 is below the model's image processor minimum of 3136 px",
        "data max_pixels=802816 is above the model's image processor maximum of 50176 px"]


def test_a_record_with_more_images_than_the_engine_takes_is_refused_at_load(processor, image_dir):
    records = [
        {"qid": "one", "problem": "<image>How many?", "answer": 2, "images": ["wide.png"]},
        {"qid": "two", "problem": "Compare <image> and <image>.", "answer": "left", "images": ["wide.png", "tall.png"]},
    ]
    with pytest.raises(DataError, match=r"record 1 qid='two': 2 images, more than the 1 the rollout engine takes "
                                        r"per prompt \(worker.rollout.limit_images\)"):
        make(records, processor, image_dir, max_images=1)
    dataset = make(records, processor, image_dir, max_images=1, on_bad_record="skip")
    assert [dataset[i]["qid"] for i in range(len(dataset))] == ["one"]
    assert dataset.report.skipped == {"too_many_images": 1}
    assert len(make(records, processor, image_dir, max_images=2)) == 2


@pytest.mark.parametrize("answer", [".", "$$", "**"])
def test_a_ground_truth_with_nothing_to_grade_is_refused_at_load(processor, image_dir, answer):
    """Scoring would raise on it at the step that draws the record; the data set says so when it loads."""
    records = [{"qid": "ok", "problem": "What is 3+4?", "answer": "7"},
               {"qid": "dot", "problem": "Why?", "answer": answer}]
    with pytest.raises(DataError, match=r"record 1 qid='dot': key 'answer' is .*, which leaves nothing to grade"):
        make(records, processor, image_dir)
    dataset = make(records, processor, image_dir, on_bad_record="skip")
    assert len(dataset) == 1 and dataset.report.skipped == {"bad_answer": 1}
