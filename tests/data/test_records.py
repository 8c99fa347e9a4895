"""load_records: sources, validation of every field, raise vs skip, and a fuzz test."""

from __future__ import annotations

import json
import os
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pebr.data.records import DataError, LoadReport, load_records

GOOD = {"qid": "q0", "problem": "<image>How many cubes?", "answer": "3", "images": ["a.png"], "key_words": ["cube"]}


def write_json(path, records) -> str:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(records, handle)
    return str(path)


def write_jsonl(path, lines: list[str]) -> str:
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")
    return str(path)


def test_json_source_normalises_fields(tmp_path):
    source = write_json(
        tmp_path / "rl.json",
        [
            GOOD,
            {"problem": "What is 2+2?", "answer": 4, "key_words": None},  # text-only, numeric answer
            {"problem": "Describe it.", "answer": 1.5, "images": "b.png"},  # single image wrapped
            # A text-only row's empty cell, as a CSV export writes it (it was refused as an empty path).
            {"problem": "What is 3+3?", "answer": "6", "images": ""},
        ],
    )
    records, report = load_records(source)
    assert report == LoadReport(total=4, kept=4, skipped={}, messages=[],
                                kept_at=[f"{source} record {i}" for i in range(4)])
    assert records[3]["images"] == [] and records[3]["problem"] == "What is 3+3?"
    # Without an image nothing can be put in the wrong place: "<Image>" is the question's own text.
    (text_only,), _ = load_records(write_json(tmp_path / "t.json", [{"problem": "Is <Image> a tag?", "answer": "1"}]))
    assert text_only["problem"] == "Is <Image> a tag?"
    assert records[0] == GOOD
    assert records[1] == {"problem": "What is 2+2?", "answer": "4", "images": [], "key_words": [], "qid": "rl-1"}
    # A prompt with images but no placeholder gets one placeholder per image in front.
    assert records[2]["problem"] == "<image>Describe it."
    assert records[2]["images"] == ["b.png"]
    assert records[2]["answer"] == "1.5"
    assert records[2]["qid"] == "rl-2"


def test_extra_keys_and_custom_key_names_kept(tmp_path):
    record = {"question": "q?", "solution": "7", "pics": [], "source": "synth", "qid": 5}
    source = write_json(tmp_path / "x.json", [record])
    records, _ = load_records(source, prompt_key="question", answer_key="solution", image_key="pics")
    assert records == [{"question": "q?", "solution": "7", "pics": [], "source": "synth", "qid": "5", "key_words": []}]


def test_jsonl_source_and_blank_lines(tmp_path):
    source = write_jsonl(tmp_path / "rl.jsonl", [json.dumps(GOOD), "", json.dumps({**GOOD, "qid": "q1"})])
    records, report = load_records(source)
    assert [r["qid"] for r in records] == ["q0", "q1"]
    assert report.total == 2 and report.kept == 2


def test_parquet_source_with_image_structs(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    # The layout of a Hugging Face Image feature: a struct of bytes and path per image.
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    images = [[{"bytes": b"\x89PNG...", "path": "x.png"}], [{"bytes": None, "path": "y.png"}]]
    table = pa.table(
        {
            "problem": ["<image>first", "second"],
            "answer": ["1", "2"],
            "images": pa.array(images, type=pa.list_(image_type)),
        }
    )
    pq.write_table(table, tmp_path / "part.parquet")
    records, report = load_records(str(tmp_path / "part.parquet"))
    assert report.kept == 2
    assert records[0]["images"] == [b"\x89PNG..."]  # bytes win over the path
    assert records[1]["images"] == ["y.png"] and records[1]["problem"] == "<image>second"
    assert [r["qid"] for r in records] == ["part-0", "part-1"]


def test_directory_source_reads_files_in_sorted_order(tmp_path):
    write_jsonl(tmp_path / "b.jsonl", [json.dumps({"problem": "B", "answer": "b"})])
    write_json(tmp_path / "a.json", [{"problem": "A", "answer": "a"}])
    (tmp_path / "notes.txt").write_text("ignored")
    records, report = load_records(str(tmp_path))
    assert [r["problem"] for r in records] == ["A", "B"]
    assert [r["qid"] for r in records] == ["a-0", "b-0"]
    assert report.total == 2


def test_local_path_wins_over_hub_name(tmp_path):
    folder = tmp_path / "owner" / "name@train"
    folder.mkdir(parents=True)
    write_json(folder / "d.json", [{"problem": "local", "answer": "1"}])
    records, _ = load_records(str(folder))
    assert records[0]["problem"] == "local"


def test_hub_style_source_goes_through_datasets(tmp_path, monkeypatch):
    # `name@split` calls datasets.load_dataset(name, split=split); a local folder as the name keeps it offline.
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = tmp_path / "hubby"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [json.dumps({"problem": "from datasets", "answer": 9, "qid": "h0"})])
    records, _ = load_records(f"{folder}@train")
    assert records == [{"problem": "from datasets", "answer": "9", "qid": "h0", "images": [], "key_words": []}]


def test_hub_images_arrive_undecoded(tmp_path, monkeypatch):
    """datasets decodes Image columns as rows are read: one corrupt image stopped the whole load with a bare
    PIL error. Now images arrive as bytes and are checked (and counted when skipped) like local files."""
    import io

    import datasets
    from PIL import Image

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    png = io.BytesIO()
    Image.new("RGB", (60, 40), "red").save(png, format="PNG")
    features = datasets.Features({"problem": datasets.Value("string"), "answer": datasets.Value("string"),
                                  "images": datasets.List(datasets.Image())})
    (tmp_path / "hubby" / "data").mkdir(parents=True)
    datasets.Dataset.from_dict(
        {"problem": ["<image>q1", "<image>q2"], "answer": ["a", "b"],
         "images": [[{"bytes": png.getvalue(), "path": None}], [{"bytes": b"not an image", "path": "broken.png"}]]},
        features=features).to_parquet(str(tmp_path / "hubby" / "data" / "train-00000.parquet"))
    records, report = load_records(f"{tmp_path / 'hubby'}@train")
    assert report.kept == 2 and [type(r["images"][0]) for r in records] == [bytes, bytes]
    assert records[0]["images"][0] == png.getvalue()


def test_a_folder_saved_by_datasets_is_read_with_its_images_undecoded(tmp_path):
    """Its dataset_info.json was read as a data file ("must hold a list of records, found dict")."""
    import io

    import datasets
    from PIL import Image

    png = io.BytesIO()
    Image.new("RGB", (60, 40), "red").save(png, format="PNG")
    features = datasets.Features({"problem": datasets.Value("string"), "answer": datasets.Value("string"),
                                  "images": datasets.List(datasets.Image())})
    table = datasets.Dataset.from_dict({"problem": ["<image>q1", "q2"], "answer": ["a", "b"],
                                        "images": [[{"bytes": png.getvalue(), "path": None}], []]}, features=features)
    table.save_to_disk(str(tmp_path / "saved"))
    files = sorted(os.listdir(tmp_path / "saved"))
    records, report = load_records(str(tmp_path / "saved"))
    assert sorted(os.listdir(tmp_path / "saved")) == files  # read, not copied (a cast wrote the table again there)
    assert report.kept == 2 and [r["qid"] for r in records] == ["saved-0", "saved-1"]
    assert records[0]["images"] == [png.getvalue()] and records[1]["images"] == []
    datasets.DatasetDict({"train": table, "test": table}).save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(DataError, match=r"a saved DatasetDict with splits \['test', 'train'\]; name the folder of one"):
        load_records(str(tmp_path / "dict"))
    assert load_records(str(tmp_path / "dict" / "train"))[1].kept == 2


def test_missing_source_and_empty_directory(tmp_path):
    with pytest.raises(DataError, match="no such file or directory"):
        load_records(str(tmp_path / "nope.json"))
    with pytest.raises(DataError, match="holds no"):
        load_records(str(tmp_path))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported file type"):
        load_records(str(tmp_path / "x.csv"))


def test_malformed_json_document_names_file_and_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"problem": "a", "answer": "1"},\n  {"problem": "b" "answer": "2"}\n]\n')
    with pytest.raises(DataError, match=r"bad\.json: malformed JSON at line 3"):
        load_records(str(path))
    # A broken document cannot be partly skipped.
    with pytest.raises(DataError, match="line 3"):
        load_records(str(path), on_bad_record="skip")
    path.write_text('{"problem": "a", "answer": "1"}')
    with pytest.raises(DataError, match="must hold a list"):
        load_records(str(path))


def test_malformed_jsonl_line_raise_names_line_and_skip_counts(tmp_path):
    source = write_jsonl(
        tmp_path / "rl.jsonl",
        [json.dumps(GOOD), "", '{"problem": "oops", "answer": ', json.dumps({**GOOD, "qid": "q2"})],
    )
    with pytest.raises(DataError, match=r"rl\.jsonl line 3 \(record 1\): malformed JSON"):
        load_records(source)
    records, report = load_records(source, on_bad_record="skip")
    assert [r["qid"] for r in records] == ["q0", "q2"]
    assert report.total == 3 and report.kept == 2
    assert report.skipped == {"malformed_json": 1}
    assert "line 3" in report.messages[0]


def test_an_integer_past_pythons_4300_digits_is_a_malformed_line(tmp_path):
    # json.loads raises a plain ValueError for it, which went out bare, naming no file, even when skipping.
    big = '{"problem": "q", "answer": ' + "7" * 5000 + "}"
    source = write_jsonl(tmp_path / "rl.jsonl", [json.dumps(GOOD), big])
    with pytest.raises(DataError, match=r"rl\.jsonl line 2 \(record 1\): malformed JSON: Exceeds the limit"):
        load_records(source)
    records, report = load_records(source, on_bad_record="skip")
    assert records == [GOOD] and report.skipped == {"malformed_json": 1}
    (tmp_path / "rl.json").write_text("[" + big + "]")
    with pytest.raises(DataError, match=r"rl\.json: cannot be read as JSON: Exceeds the limit \(4300 digits\)"):
        load_records(str(tmp_path / "rl.json"))


def test_non_utf8_bytes(tmp_path):
    path = tmp_path / "rl.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"problem": "\xff", "answer": "1"}\n')
    with pytest.raises(DataError, match=r"rl\.jsonl line 2 \(record 1\): malformed JSON: not UTF-8"):
        load_records(str(path))
    records, report = load_records(str(path), on_bad_record="skip")
    assert records == [GOOD] and report.skipped == {"malformed_json": 1}
    (tmp_path / "rl.json").write_bytes(b'[{"problem": "\xff"}]')
    with pytest.raises(DataError, match=r"rl\.json: not UTF-8 text \(byte 14\)"):
        load_records(str(tmp_path / "rl.json"))


@pytest.mark.parametrize(
    "record, key, reason",
    [
        ({"answer": "1"}, "'problem' is missing", "bad_prompt"),
        ({"problem": "", "answer": "1"}, "'problem' is not a non-empty string", "bad_prompt"),
        ({"problem": ["x"], "answer": "1"}, "'problem' is not a non-empty string", "bad_prompt"),
        ({"problem": "q"}, "'answer' is missing", "bad_answer"),
        ({"problem": "q", "answer": None}, "'answer' is null", "bad_answer"),
        ({"problem": "q", "answer": True}, "'answer' must be a string or a number", "bad_answer"),
        ({"problem": "q", "answer": {"v": 1}}, "'answer' must be a string or a number", "bad_answer"),
        ({"problem": "q", "answer": "  "}, "'answer' is an empty string", "bad_answer"),
        ({"problem": "q", "answer": "1", "images": 3}, "'images' must be a list", "bad_image"),
        ({"problem": "q", "answer": "1", "images": [3]}, r"'images'\[0\] must be a path", "bad_image"),
        ({"problem": "q", "answer": "1", "images": [""]}, r"'images'\[0\] is an empty path", "bad_image"),
        ({"problem": "q", "answer": "1", "images": [{"x": 1}]}, "without non-empty 'bytes' or 'path'", "bad_image"),
        ({"problem": "q", "answer": "1", "key_words": "cube"}, "'key_words' must be a list of str", "bad_key_words"),
        ({"problem": "q", "answer": "1", "key_words": ["a", 2]}, "'key_words' must be a list of str", "bad_key_words"),
        ({"problem": "q", "answer": "1", "qid": [1]}, "'qid' must be a string or an integer", "bad_qid"),
        ({"problem": "<image>q", "answer": "1"}, "1 <image> placeholder.* 0 image", "image_count_mismatch"),
        ({"problem": "<image><image>q", "answer": "1", "images": ["a.png"]}, "2 <image>", "image_count_mismatch"),
        # It stayed text, and the image went in front of the question: the model saw the image, then "<Image>".
        ({"problem": "<Image> how many?", "answer": "1", "images": ["a.png"]},
         "'problem' holds '<Image>', which is not the image placeholder <image>", "image_count_mismatch"),
        ({"problem": "<image>a and < image >b", "answer": "1", "images": ["a.png", "b.png"]}, "holds '< image >'",
         "image_count_mismatch"),
        ("not a dict", "must be a JSON object", "not_a_dict"),
        ({"problem": "<image>what is <|image_pad|>?", "answer": "1", "images": ["a.png"]},
         r"'problem' holds the model's vision token '<\|image_pad\|>'", "vision_token_in_text"),
        ({"problem": "q<|vision_start|>", "answer": "1"}, "vision token", "vision_token_in_text"),
        ({"problem": "q<|im_end|>", "answer": "1"}, r"control token '<\|im_end\|>'", "chat_token_in_text"),
        # Half an emoji: the tokenizer failed with a bare TypeError, the question digest with a UnicodeEncodeError.
        ({"problem": "how many \ud83c?", "answer": "1"}, r"'problem' is not valid Unicode \(a lone surrogate "
                                                          r"'\\ud83c' at character 9\)", "bad_prompt"),
        ({"problem": "q", "answer": "3 \ud83c"}, "'answer' is not valid Unicode", "bad_answer"),
        ({"problem": "q", "answer": "1", "qid": "x\udc00"}, "'qid' is not valid Unicode", "bad_qid"),
        ({"problem": "q", "answer": "1", "images": ["a\ud83c.png"]}, r"'images\[0\]' is not valid Unicode",
         "bad_image"),
        ({"problem": "q", "answer": "1", "key_words": ["cube\ud83c"]}, r"'key_words\[0\]' is not valid", "bad_key_words"),
        # images under the other usual column name would have been loaded as a text-only question
        ({"problem": "q", "answer": "1", "image": "a.png"}, "'images' is missing but key 'image' is set.*"
                                                             "data.image_key=image", "bad_image"),
    ],
)
def test_bad_record_raise_and_skip(tmp_path, record, key, reason):
    source = write_json(tmp_path / "rl.json", [GOOD, record])
    with pytest.raises(DataError, match=rf"rl\.json record 1.*{key}"):
        load_records(source)
    records, report = load_records(source, on_bad_record="skip")
    assert records == [GOOD]
    assert report.total == 2 and report.kept == 1 and report.skipped == {reason: 1}
    assert len(report.messages) == 1 and "record 1" in report.messages[0]


def test_error_names_qid_when_known(tmp_path):
    source = write_json(tmp_path / "rl.json", [{"qid": "abc", "problem": "q"}])
    with pytest.raises(DataError, match=r"record 0 qid='abc': key 'answer' is missing"):
        load_records(source)


def test_duplicate_qid_is_a_bad_record(tmp_path):
    source = write_json(tmp_path / "rl.json", [GOOD, GOOD, {**GOOD, "qid": "q9"}])
    with pytest.raises(DataError, match=r"record 1: its qid 'q0' was already used by .*rl.json record 0"):
        load_records(source)
    records, report = load_records(source, on_bad_record="skip")
    assert [r["qid"] for r in records] == ["q0", "q9"] and report.skipped == {"duplicate_qid": 1}


@pytest.mark.parametrize("first, second, said", [
    ({"qid": "rl-1"}, {}, "its default qid 'rl-1'"),  # record 1 has no qid: its default clashed with record 0's
    ({"qid": 1}, {"qid": "1"}, "its qid '1'"),
    ({"qid": "1"}, {"qid": 1}, "its qid 1, read as the string '1'"),
])
def test_a_duplicate_qid_says_where_it_came_from(tmp_path, first, second, said):
    """The message blamed "key 'qid' value 'rl-1'" of a record that had no qid key."""
    plain = {k: v for k, v in GOOD.items() if k != "qid"}
    source = write_json(tmp_path / "rl.json", [{**plain, **first}, {**plain, **second}])
    with pytest.raises(DataError) as err:
        load_records(source)
    assert f"record 1: {said} was already used by " in str(err.value) and str(err.value).endswith("rl.json record 0")


@pytest.mark.parametrize("qid", ["", "   "])
def test_a_blank_qid_is_refused(tmp_path, qid):
    source = write_json(tmp_path / "rl.json", [{**GOOD, "qid": qid}])
    with pytest.raises(DataError, match="key 'qid' is blank"):
        load_records(source)


def test_blank_key_words_are_dropped(tmp_path):
    """A blank key word is in no response: it took recall to 0 for every response, and the record counted as one
    with key words."""
    source = write_json(tmp_path / "rl.json", [{**GOOD, "key_words": ["", "  ", "cube"]},
                                               {**GOOD, "qid": "q1", "key_words": ["", " "]}])
    records, _ = load_records(source)
    assert [r["key_words"] for r in records] == [["cube"], []]


def test_json_lines_in_a_json_file_gets_a_hint(tmp_path):
    path = tmp_path / "rl.json"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps({**GOOD, "qid": "q1"}) + "\n")
    with pytest.raises(DataError, match="Extra data; it looks like JSON Lines .*name it .jsonl"):
        load_records(str(path))


def test_skip_summary_logged_once_and_messages_capped(tmp_path, caplog):
    source = write_json(tmp_path / "rl.json", [{"problem": "q"}] * 15 + [GOOD])
    with caplog.at_level("WARNING", logger="pebr.data.records"):
        records, report = load_records(source, on_bad_record="skip")
    assert len(records) == 1 and report.skipped == {"bad_answer": 15}
    assert len(report.messages) == 10
    summaries = [r for r in caplog.records if r.name == "pebr.data.records"]
    assert len(summaries) == 1 and "kept 1 of 16 records; skipped 15 (bad_answer=15)" in summaries[0].getMessage()


def test_bad_on_bad_record_value(tmp_path):
    with pytest.raises(ValueError, match="on_bad_record must be one of"):
        load_records(write_json(tmp_path / "rl.json", [GOOD]), on_bad_record="ignore")


# ------------------------------------------------------------------------------------------------
# Fuzz: whatever the records look like, the loader returns valid records or raises DataError.
# ------------------------------------------------------------------------------------------------

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
prompt_values = st.sampled_from(["", "q", "<image>q", "<image><image>two", "  "]) | json_values
image_values = (
    st.sampled_from([None, [], "a.png", ["a.png"], ["a.png", "b.png"], [""], {"bytes": None, "path": "p.png"}])
    | json_values
)
record_values = st.fixed_dictionaries(
    {},
    optional={
        "problem": prompt_values,
        "answer": st.sampled_from(["1", 2, 2.5, "", None, float("nan"), float("inf")]) | json_values,
        "images": image_values,
        "key_words": st.sampled_from([None, [], ["a"], "a"]) | json_values,
        "qid": st.sampled_from(["x", "y", 1]) | json_values,
    },
) | json_values
lines = st.lists(record_values.map(json.dumps) | st.sampled_from(["{", "[1,", "nul", "{\"a\": }"]), max_size=6)


def assert_valid(record: dict) -> None:
    assert isinstance(record["problem"], str) and record["problem"].strip()
    assert isinstance(record["answer"], str) and record["answer"].strip()
    assert isinstance(record["qid"], str)
    assert isinstance(record["images"], list)
    assert record["problem"].count("<image>") == len(record["images"])
    assert all(isinstance(w, str) for w in record["key_words"])


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lines=lines, on_bad_record=st.sampled_from(["raise", "skip"]), as_jsonl=st.booleans())
def test_fuzz_records_valid_or_data_error(lines, on_bad_record, as_jsonl):
    with tempfile.TemporaryDirectory() as folder:
        if as_jsonl:
            path = write_jsonl(os.path.join(folder, "f.jsonl"), lines)
        else:
            path = os.path.join(folder, "f.json")
            with open(path, "w") as handle:
                handle.write("[" + ",".join(lines) + "]")
        try:
            records, report = load_records(path, on_bad_record=on_bad_record)
        except DataError:
            return
        for record in records:
            assert_valid(record)
        assert len({r["qid"] for r in records}) == len(records)
        assert report.kept == len(records) and report.kept + report.num_skipped == report.total
        if on_bad_record == "raise":
            assert report.num_skipped == 0


def test_fuzz_helpers_catch_an_invalid_record():
    # The property above can only fail if `assert_valid` rejects bad records; check it does.
    with pytest.raises(AssertionError):
        assert_valid({"problem": "<image>", "answer": "1", "qid": "a", "images": [], "key_words": []})


def test_loading_records_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, pebr.data; from pebr.data import load_records; print('torch' in sys.modules)"
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
    assert result.stdout.strip() == "False"


def test_a_byte_order_mark_is_skipped(tmp_path):
    record = {"qid": "bom", "problem": "q", "answer": "1"}
    (tmp_path / "a.json").write_bytes(b"\xef\xbb\xbf" + json.dumps([record]).encode())
    (tmp_path / "b.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps({**record, "qid": "bom2"}).encode() + b"\n")
    records, report = load_records(str(tmp_path))
    assert [r["qid"] for r in records] == ["bom", "bom2"] and report.num_skipped == 0
