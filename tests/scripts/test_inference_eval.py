"""inference.py and scripts/evaluate.py (pebr/evaluation.py) on the tiny model, with real vLLM and transformers."""

from __future__ import annotations

import json
import os
import sys
from collections import Counter

import pytest

from pebr.evaluation import evaluate_model, markdown_table, summarize

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))

NUM_RECORDS = 6
MAX_NEW_TOKENS = 12


@pytest.mark.parametrize("backend", ["hf", "vllm"])
def test_inference_prints_answer_and_extracted_answer(backend, tiny_model_dir, capsys) -> None:
    import inference

    from pebr.rewards.terms import extract_final_answer

    assert os.path.isfile(inference.DEFAULT_IMAGE)  # the repo's demo.jpg is the default image
    text = inference.main(["--model_path", tiny_model_dir, "--max_new_tokens", "8", "--backend", backend])
    printed = capsys.readouterr().out
    assert text.strip() and text in printed
    assert printed.rstrip().endswith("=== extracted final answer ===\n" + extract_final_answer(text))


def test_inference_names_a_missing_image(tiny_model_dir) -> None:
    import inference

    with pytest.raises(FileNotFoundError, match="nowhere.jpg"):
        inference.main(["--model_path", tiny_model_dir, "--image", "/nowhere.jpg"])


def test_summarize_by_hand() -> None:
    rows = [
        {"correct": 1.0, "format": 1.0, "keyword_recall": 0.5, "response_length": 10},
        {"correct": 0.0, "format": 1.0, "keyword_recall": None, "response_length": 20},
        {"correct": 1.0, "format": 0.0, "keyword_recall": 1.0, "response_length": 30},
        {"correct": 0.0, "format": 0.0, "keyword_recall": 0.0, "response_length": 40},
    ]
    assert summarize(rows) == {"count": 4, "accuracy": 0.5, "format_rate": 0.5, "keyword_recall": 0.5,
                               "mean_response_length": 25.0}


@pytest.fixture(scope="module")
def first_pass(tiny_model_dir, synthetic_data_dir):
    """Greedy responses of the tiny model to the first records of the synthetic test split."""
    return evaluate_model(tiny_model_dir, os.path.join(synthetic_data_dir, "test.json"),
                          os.path.join(synthetic_data_dir, "images"), max_new_tokens=MAX_NEW_TOKENS,
                          limit=NUM_RECORDS)


def test_evaluate_counts_and_categories(first_pass, synthetic_data_dir) -> None:
    records = json.load(open(os.path.join(synthetic_data_dir, "test.json")))[:NUM_RECORDS]
    assert first_pass["overall"]["count"] == NUM_RECORDS == len(first_pass["records"])
    assert [r["qid"] for r in first_pass["records"]] == [r["qid"] for r in records]
    expected = Counter(r["category"] for r in records)
    assert {c: s["count"] for c, s in first_pass["per_category"].items()} == dict(expected)
    lengths = [r["response_length"] for r in first_pass["records"]]
    assert all(0 < n <= MAX_NEW_TOKENS for n in lengths)
    assert first_pass["overall"]["mean_response_length"] == pytest.approx(sum(lengths) / NUM_RECORDS)


def test_evaluate_script_accuracy_against_chosen_ground_truths(first_pass, synthetic_data_dir, tmp_path) -> None:
    """Ground truths set to what the (deterministic, greedy) model answers for some records, to nonsense
    for the others: accuracy must be exactly the share of the first kind."""
    from evaluate import main

    records = json.load(open(os.path.join(synthetic_data_dir, "test.json")))[:NUM_RECORDS]
    predictions = [r["prediction"] for r in first_pass["records"]]
    usable = [i for i, p in enumerate(predictions) if p.strip()]
    assert len(usable) >= 3, predictions
    right = set(usable[:3])
    for i, record in enumerate(records):
        record["answer"] = predictions[i] if i in right else "no model says this 987654321"
        if i == 0:
            record.pop("key_words")  # keyword recall is averaged over records that have key words only
    data = tmp_path / "chosen.json"
    data.write_text(json.dumps(records))
    prefix = str(tmp_path / "report" / "eval")
    result = main(["--model_path", first_pass["model_path"], "--data", str(data), "--image_dir",
                   os.path.join(synthetic_data_dir, "images"), "--output", prefix,
                   "--max_new_tokens", str(MAX_NEW_TOKENS), "--temperature", "0"])

    saved = json.load(open(prefix + ".json"))
    assert set(saved) >= {"model_path", "data", "settings", "overall", "per_category", "records", "skipped_overlong"}
    assert set(saved["overall"]) == {"count", "accuracy", "format_rate", "keyword_recall", "mean_response_length"}
    assert [r["response"] for r in saved["records"]] == [r["response"] for r in first_pass["records"]]
    assert saved["overall"]["accuracy"] == pytest.approx(3 / NUM_RECORDS)
    assert [r["correct"] for r in saved["records"]] == [float(i in right) for i in range(NUM_RECORDS)]
    recalls = [r["keyword_recall"] for r in saved["records"]]
    assert recalls[0] is None and all(x is not None for x in recalls[1:])
    assert saved["overall"]["keyword_recall"] == pytest.approx(sum(recalls[1:]) / (NUM_RECORDS - 1))
    for category, stats in saved["per_category"].items():
        rows = [i for i, r in enumerate(records) if r["category"] == category]
        assert stats["accuracy"] == pytest.approx(sum(i in right for i in rows) / len(rows))

    table = open(prefix + ".md").read()
    assert table == markdown_table(result)
    assert f"| all | {NUM_RECORDS} | {100 * 3 / NUM_RECORDS:.1f} |" in table
    assert len([line for line in table.splitlines() if line.startswith("| ")]) == 3 + len(saved["per_category"])  # header, rule, "all"
