"""The stage reward files in examples/reward_function, without the CLIP model (clip_weight 0)."""

from __future__ import annotations

import os

import pytest

from pebr.rewards.manager import RewardManager

from .conftest import REWARD_DIR
from .test_terms import FULL

STAGE1 = os.path.join(REWARD_DIR, "pebr_1.py") + ":compute_score"
STAGE2 = os.path.join(REWARD_DIR, "pebr_2.py") + ":compute_score"
SAMPLE = os.path.join(REWARD_DIR, "pebr_sample.py") + ":compute_score"


def item(response: str = FULL, truth: str = "9", length: int = 100, key_word=("red", "Square", "triangle")) -> dict:
    return {"qid": "q", "response": response, "response_length": length, "ground_truth": truth,
            "key_word": list(key_word), "image": None}


def test_stage1_default_weights_without_clip() -> None:
    # format 1, accuracy 1 (not rewarded), keyword 2/3, length 1 (100 <= 512); then length 1024 -> 0.5.
    manager = RewardManager(STAGE1, reward_function_kwargs={"clip_weight": 0.0})
    first, second = manager.compute([item(), item(length=1024, truth="8")])
    assert set(first) == {"overall", "format", "accuracy", "keyword", "length"}
    assert first["overall"] == pytest.approx(0.4 * 2 / 3 + 0.1 * 1 + 0.1 * 1)
    assert (first["format"], first["accuracy"], first["length"]) == (1.0, 1.0, 1.0)
    assert first["keyword"] == pytest.approx(2 / 3)
    assert second["overall"] == pytest.approx(0.4 * 2 / 3 + 0.1 * 1 + 0.1 * 0.5)
    assert second["accuracy"] == 0.0


def test_stage1_weights_can_be_overridden() -> None:
    kwargs = {"clip_weight": 0, "keyword_weight": 0.5, "length_weight": 0.0, "accuracy_weight": 0.5, "max_length": 50}
    [scores] = RewardManager(STAGE1, reward_function_kwargs=kwargs).compute([item(length=100)])
    assert scores["length"] == 0.5  # 50 / 100
    assert scores["overall"] == pytest.approx(0.5 * 2 / 3 + 0.1 * 1 + 0.0 * 0.5 + 0.5 * 1)


def test_stage1_unknown_key_fails_at_construction() -> None:
    with pytest.raises(KeyError, match="clip_wieght"):
        RewardManager(STAGE1, reward_function_kwargs={"clip_wieght": 0.0})


def test_stage1_missing_clip_path_fails_at_construction(tmp_path) -> None:
    with pytest.raises(ValueError, match="clip_model_path is not set"):
        RewardManager(STAGE1)  # clip_weight defaults to 0.4
    with pytest.raises(FileNotFoundError, match="clip_model_path"):
        RewardManager(STAGE1, reward_function_kwargs={"clip_model_path": str(tmp_path / "no_such_model")})


def test_stage1_clip_weight_zero_never_touches_the_model_path(tmp_path) -> None:
    manager = RewardManager(
        STAGE1, reward_function_kwargs={"clip_weight": 0, "clip_model_path": str(tmp_path / "no_such_model")}
    )
    assert manager.compute([item()])[0]["overall"] == pytest.approx(0.4 * 2 / 3 + 0.2)
    assert manager.module._scorers == {}


@pytest.mark.parametrize(
    "response, truth, expected",
    [
        (FULL, "9", {"overall": 1.0, "accuracy": 1.0, "format": 1.0}),
        (FULL, "8", {"overall": 0.1, "accuracy": 0.0, "format": 1.0}),
        ("9", "9", {"overall": 0.0, "accuracy": 0.0, "format": 0.0}),  # no final-answer header, no answer
        ("### The final answer is: 9", "9", {"overall": 0.9, "accuracy": 1.0, "format": 0.0}),
        ("", "9", {"overall": 0.0, "accuracy": 0.0, "format": 0.0}),
    ],
)
def test_stage2(response: str, truth: str, expected: dict) -> None:
    [scores] = RewardManager(STAGE2).compute([item(response, truth)])
    assert scores == pytest.approx(expected)


def test_stage2_weights_can_be_overridden() -> None:
    manager = RewardManager(STAGE2, reward_function_kwargs={"accuracy_weight": 0.5, "format_weight": 0.5})
    assert manager.compute([item("### The final answer is: 9", "9")])[0]["overall"] == pytest.approx(0.5)
    with pytest.raises(KeyError, match="clip_weight"):
        RewardManager(STAGE2, reward_function_kwargs={"clip_weight": 0.4})
    with pytest.raises(KeyError, match="max_length"):
        RewardManager(SAMPLE, reward_function_kwargs={"max_length": 512})


def test_sampling_reward_is_accuracy() -> None:
    items = [item(), item(truth="8"), item("### The final answer is: (B)", "B")]
    out = RewardManager(SAMPLE, require_overall=False).compute(items)
    assert [scores["accuracy"] for scores in out] == [1.0, 0.0, 1.0]


def test_stage1_text_only_record_scores_clip_0_beside_an_image_record(tiny_clip_path: str) -> None:
    """A record without an image (the data set accepts them) gets CLIP term 0; it used to raise mid-run."""
    from PIL import Image

    manager = RewardManager(STAGE1, reward_function_kwargs={"clip_model_path": tiny_clip_path})
    with_image = {**item(), "image": Image.new("RGB", (32, 32), "red")}
    pictured, text_only = manager.compute([with_image, item()])
    assert pictured["clip"] != 0.0 and text_only["clip"] == 0.0  # s / 0.4 below the threshold, any sign
    assert text_only["overall"] == pytest.approx(0.4 * 2 / 3 + 0.2)


def test_stage1_overall_weighs_the_clip_term_at_its_threshold(tiny_clip_path: str) -> None:
    """The clip term is the description's similarity over clip_threshold (capped at 1), weighed 0.4 in overall
    beside keyword 0.4, format 0.1 and length 0.1; the similarity is the tiny CLIP model's own."""
    from PIL import Image

    from pebr.rewards.clip import ClipScorer
    from pebr.rewards.terms import extract_image_description

    image = Image.new("RGB", (32, 32), "red")
    [similarity] = ClipScorer(tiny_clip_path).score([image], [extract_image_description(FULL)])
    assert similarity != 0.0
    # The paper's 0.4, twice the similarity's size (the term s / t) and half of it (1 when s > 0): r = 1 if
    # s >= t else s / t.
    for threshold in (0.4, 2 * abs(similarity), abs(similarity) / 2):
        clip = 1.0 if similarity >= threshold else similarity / threshold
        manager = RewardManager(STAGE1, reward_function_kwargs={"clip_model_path": tiny_clip_path,
                                                                "clip_threshold": threshold})
        [scores] = manager.compute([{**item(), "image": image}])
        assert scores["clip"] == pytest.approx(clip, abs=1e-5)
        assert scores["overall"] == pytest.approx(0.4 * clip + 0.4 * 2 / 3 + 0.1 * 1 + 0.1 * 1, abs=1e-5)
