"""The CLIP alignment path: the scorer against the model's own forward, then end to end through Ray."""

from __future__ import annotations

import os

import pytest
import torch
from PIL import Image

from pebr.rewards.clip import ClipScorer
from pebr.rewards.terms import clip_alignment_reward
from pebr.workers.reward import CLIP_ACTOR_NAME, RewardWorker, get_clip_scorer

from .conftest import REWARD_DIR
from .test_terms import FULL

STAGE1 = os.path.join(REWARD_DIR, "pebr_1.py") + ":compute_score"
COLOURS = [(255, 0, 0), (0, 0, 255), (20, 200, 40)]
CAPTIONS = ["a red square", "a blue circle next to a green triangle", "two yellow stars and one black cube"]


def images() -> list[Image.Image]:
    # Different sizes and modes: the processor must resize, the scorer must convert to RGB.
    return [Image.new("RGB", (48, 40), COLOURS[0]), Image.new("RGB", (32, 64), COLOURS[1]),
            Image.new("L", (20, 20), 128)]


def cosine_from_forward(model_path: str, imgs: list[Image.Image], captions: list[str]) -> list[float]:
    """cos(image_i, caption_i) read off CLIP's forward: logits_per_image = exp(logit_scale) * cos."""
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    model = CLIPModel.from_pretrained(model_path).eval()
    text = AutoTokenizer.from_pretrained(model_path)(captions, padding=True, return_tensors="pt")
    pixels = CLIPImageProcessor.from_pretrained(model_path)([im.convert("RGB") for im in imgs], return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=text["input_ids"], attention_mask=text["attention_mask"],
                    pixel_values=pixels["pixel_values"])
    return (out.logits_per_image.diagonal() / model.logit_scale.exp()).tolist()


def test_scorer_matches_the_models_forward(tiny_clip_path: str) -> None:
    scorer = ClipScorer(tiny_clip_path, batch_size=2)  # two chunks for three pairs
    got = scorer.score(images(), CAPTIONS)
    assert got == pytest.approx(cosine_from_forward(tiny_clip_path, images(), CAPTIONS), abs=1e-5)
    assert scorer.max_text_length == 16  # the text config's max_position_embeddings


def test_an_image_shared_by_several_responses_is_encoded_once(tiny_clip_path: str) -> None:
    """A prompt's n responses share its image object; each was prepared and encoded again (n times the vision
    tower's work in a stage-1 step). The scores are those of scoring each pair apart."""
    scorer = ClipScorer(tiny_clip_path, batch_size=2)
    pictures = images()
    shared = [pictures[0]] * 4 + [pictures[1]] * 3 + [pictures[2]]
    captions = [CAPTIONS[i % 3] for i in range(len(shared))]
    encoded = []
    forward = scorer.model.get_image_features

    def counted(pixel_values, **kwargs):
        encoded.append(pixel_values.shape[0])
        return forward(pixel_values=pixel_values, **kwargs)

    scorer.model.get_image_features = counted
    got = scorer.score(shared, captions)
    assert sum(encoded) == 3  # the distinct images, in chunks of batch_size
    del scorer.model.get_image_features
    apart = [scorer.score([image], [caption])[0] for image, caption in zip(shared, captions)]
    assert got == pytest.approx(apart, abs=1e-6)
    assert scorer.score([], []) == []


def test_a_transparent_image_is_scored_as_laid_on_white(tiny_clip_path: str) -> None:
    """A drawing on a transparent background is what the policy sees, laid on white: a plain RGB conversion
    turned the transparent pixels black (the colour stored under them) and scored that picture instead."""
    drawing = Image.new("RGBA", (48, 48), (0, 0, 0, 0))
    drawing.paste((255, 0, 0, 255), (12, 12, 36, 36))
    on_white = Image.new("RGB", (48, 48), (255, 255, 255))
    on_white.paste((255, 0, 0), (12, 12, 36, 36))
    scorer = ClipScorer(tiny_clip_path)
    got = scorer.score([drawing], CAPTIONS[:1])
    assert got == pytest.approx(scorer.score([on_white], CAPTIONS[:1]), abs=1e-6)
    assert got != pytest.approx(scorer.score([drawing.convert("RGB")], CAPTIONS[:1]), abs=1e-4)


def test_long_captions_are_truncated(tiny_clip_path: str) -> None:
    scorer = get_clip_scorer(tiny_clip_path, use_ray=False)
    assert get_clip_scorer(tiny_clip_path, use_ray=False) is scorer  # loaded once per process
    assert get_clip_scorer(tiny_clip_path, use_ray=False, max_text_length=None, image_size=None) is scorer  # defaults
    shorter = get_clip_scorer(tiny_clip_path, use_ray=False, max_text_length=8)  # was `scorer`, cut at 16
    assert shorter is not scorer and shorter.max_text_length == 8
    long_caption = " ".join(CAPTIONS * 10)  # far more than 16 tokens
    tokens = scorer.tokenizer(long_caption, truncation=True, max_length=16)["input_ids"]
    assert len(tokens) == 16 and tokens[-1] == scorer.tokenizer.eos_token_id  # pooled at EOS
    # Same score as the caption cut to the 14 tokens that fit between BOS and EOS.
    cut = scorer.tokenizer.decode(tokens[1:-1])
    [long_score, cut_score] = scorer.score(images()[:1] * 2, [long_caption, cut])
    assert long_score == pytest.approx(cut_score, abs=1e-6)


def test_missing_model_path_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="clip_model_path"):
        get_clip_scorer(str(tmp_path / "missing"))


def stage1_inputs() -> list[dict]:
    base = {"response_length": 100, "ground_truth": "9", "key_word": ["red", "square", "triangle"]}
    return [
        {**base, "qid": "a", "response": FULL.replace("A red square and a blue circle.", CAPTIONS[0]),
         "image": images()[0]},
        {**base, "qid": "b", "response": FULL.replace("A red square and a blue circle.", CAPTIONS[1]),
         "image": images()[1]},
        # No description: the CLIP term is 0 without asking the model (and no image is needed).
        {**base, "qid": "c", "response": "### The final answer is: 9", "image": None},
    ]


def named_actors(ray) -> list[str]:
    return list(ray.util.list_named_actors(all_namespaces=False))  # names in this namespace


@pytest.mark.slow
def test_clip_weight_zero_never_loads_the_model(ray_session, tmp_path) -> None:
    ray = ray_session
    worker = RewardWorker.remote(
        STAGE1, reward_function_kwargs={"clip_weight": 0.0, "clip_model_path": str(tmp_path / "missing")}
    )
    ref = worker.compute.remote(stage1_inputs())  # returns at once; the result comes later
    assert isinstance(ref, ray.ObjectRef)
    out = ray.get(ref)
    assert "clip" not in out[0] and out[0]["overall"] == pytest.approx(0.4 * 2 / 3 + 0.2)
    assert CLIP_ACTOR_NAME not in named_actors(ray)
    ray.kill(worker)


@pytest.mark.slow
def test_missing_clip_path_fails_when_the_worker_starts(ray_session, tmp_path) -> None:
    ray = ray_session
    worker = RewardWorker.remote(STAGE1, reward_function_kwargs={"clip_model_path": str(tmp_path / "missing")})
    with pytest.raises(ray.exceptions.RayActorError, match="CLIP model directory not found"):
        ray.get(worker.ready.remote())


@pytest.mark.slow
def test_stage1_clip_end_to_end_through_ray(ray_session, tiny_clip_path: str) -> None:
    ray = ray_session
    inputs = stage1_inputs()
    similarity = cosine_from_forward(tiny_clip_path, [x["image"] for x in inputs[:2]], CAPTIONS[:2])
    # A threshold above the larger similarity keeps the reward on its linear part (not saturated),
    # so a wrong similarity changes the number.
    assert max(similarity) > 0, similarity
    threshold = 2 * max(similarity)
    kwargs = {"clip_model_path": tiny_clip_path, "clip_threshold": threshold}
    worker = RewardWorker.remote(STAGE1, reward_function_kwargs=kwargs)
    try:
        ray.get(worker.ready.remote())
        out = ray.get(worker.compute.remote(inputs))
        scorer = ray.get_actor(CLIP_ACTOR_NAME)  # the shared actor exists in this namespace
        assert ray.get(scorer.device.remote()) == "cpu"
        for scores, s in zip(out, similarity):
            expected_clip = min(s / threshold, 1.0)  # negative for a negative similarity, as the paper has it
            assert scores["clip"] == pytest.approx(expected_clip, abs=1e-5)
            assert scores["clip"] == pytest.approx(clip_alignment_reward(s, threshold), abs=1e-5)
            assert scores["overall"] == pytest.approx(0.4 * expected_clip + 0.4 * 2 / 3 + 0.1 + 0.1, abs=1e-5)
        assert out[2]["clip"] == 0.0 and out[2]["format"] == 0.0
        # The start-up probe's made-up response has a description: the scorer runs before any rollout (a model
        # that loads but fails to score stopped the run only after the first step's generation).
        from pebr.trainer.main import probe_reward

        probed = probe_reward(worker, {"question": "<image>Count.", "ground_truth": "2", "key_words": ["red", "square"],
                                       "qid": "q", "images": [inputs[0]["image"]]}, timeout=120)
        assert probed["clip"] != 0.0 and probed["format"] == 1.0
        # A second worker finds the same scorer instead of loading another copy.
        other = RewardWorker.remote(STAGE1, reward_function_kwargs=kwargs)
        # Scored alone instead of in a batch of three: float32 kernels round differently by batch size, and
        # the reward divides the similarity by a small threshold (seen here: 1.6e-6 apart), hence 1e-5 as above.
        assert ray.get(other.compute.remote(inputs[:1]))[0]["clip"] == pytest.approx(out[0]["clip"], abs=1e-5)
        assert named_actors(ray).count(CLIP_ACTOR_NAME) == 1
        ray.kill(other)
    finally:
        ray.kill(worker)
        try:
            ray.kill(ray.get_actor(CLIP_ACTOR_NAME))
        except ValueError:
            pass


@pytest.mark.slow
def test_a_scorer_whose_owner_died_is_replaced(ray_session, tiny_clip_path: str) -> None:
    """The shared scorer dies with the reward worker that created it (Ray ties an actor to its owner). A run
    that starts right after another in the same Ray session (sampling, then training, in a notebook) must get a
    live scorer, not the dying one its name still points to."""
    ray = ray_session
    first = RewardWorker.remote(STAGE1, reward_function_kwargs={"clip_model_path": tiny_clip_path})
    ray.get(first.ready.remote())
    dying = ray.get_actor(CLIP_ACTOR_NAME)
    ray.kill(first)
    try:
        scorer = get_clip_scorer(tiny_clip_path, use_ray=True)
        (similarity,) = scorer.score(images()[:1], CAPTIONS[:1])
        assert similarity == pytest.approx(cosine_from_forward(tiny_clip_path, images()[:1], CAPTIONS[:1])[0],
                                           abs=1e-5)
        assert scorer.actor._actor_id != dying._actor_id
        # The live scorer was made with the reward file's default settings; other settings are refused, not
        # served by a scorer that would ignore them.
        with pytest.raises(ValueError, match="settings"):
            get_clip_scorer(tiny_clip_path, use_ray=True, max_text_length=8)
    finally:
        try:
            ray.kill(ray.get_actor(CLIP_ACTOR_NAME))
        except ValueError:
            pass
