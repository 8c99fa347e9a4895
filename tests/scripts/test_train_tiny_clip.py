"""Contrastive training of the tiny CLIP: the loss, the data, and a short run scored through ClipScorer."""

from __future__ import annotations

import importlib.util
import math
import random
from pathlib import Path

import pytest
import torch

from pebr.utils import clip_train as ct
from pebr.utils import scenes as sc

REPO = Path(__file__).resolve().parents[2]


def _load_cli():
    spec = importlib.util.spec_from_file_location("_test_train_tiny_clip", REPO / "scripts" / "train_tiny_clip.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_contrastive_loss_matches_hand_computation() -> None:
    # Two images on the axes, their captions equal to them, one extra caption equal to image 0, scale 1.
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[2.0, 0.0], [0.0, 3.0], [5.0, 0.0]])  # norms differ: the loss normalises
    loss = ct.contrastive_loss(image, text, torch.tensor(0.0))
    # image->text rows: logits [1, 0, 1] (target 0) and [0, 1, 0] (target 1);
    # text->image uses the first two captions only: logits [1, 0] and [0, 1].
    i2t = (math.log(2 + math.exp(-1)) + math.log(1 + 2 * math.exp(-1))) / 2
    t2i = math.log(1 + math.exp(-1))
    assert float(loss) == pytest.approx((i2t + t2i) / 2, abs=1e-6)
    # The scale multiplies the logits: ln(2) doubles them.
    doubled = ct.contrastive_loss(image, text, torch.tensor(math.log(2.0)))
    i2t2 = (math.log(2 + math.exp(-2)) + math.log(1 + 2 * math.exp(-2))) / 2
    assert float(doubled) == pytest.approx((i2t2 + math.log(1 + math.exp(-2))) / 2, abs=1e-6)
    with pytest.raises(ValueError, match="T >= 2"):
        ct.contrastive_loss(image, text[:1], torch.tensor(0.0))


def test_perturbed_scene_differs_in_one_attribute_and_in_its_description() -> None:
    rng = random.Random(3)
    for _ in range(100):
        scene = ct.sample_training_scene(rng)
        changed = ct.perturb_scene(scene, rng)
        diffs = [
            (a, b) for a, b in zip(scene.objects, changed.objects) if a != b
        ]
        assert len(diffs) == 1
        a, b = diffs[0]
        assert sum(getattr(a, f) != getattr(b, f) for f in ("color", "shape", "size", "material", "x", "y")) == 1
        assert sc.describe_scene(changed) != sc.describe_scene(scene)


def test_pixel_values_equal_the_saved_image_processor(tmp_path: Path) -> None:
    from transformers import AutoImageProcessor

    spec = ct.TinyClipSpec(image_size=112)
    ct.clip_image_processor(spec).save_pretrained(tmp_path)
    rng = random.Random(0)
    images = [sc.render_scene(ct.sample_training_scene(rng), 112) for _ in range(3)]
    ours = ct.images_to_pixel_values(images)
    theirs = AutoImageProcessor.from_pretrained(tmp_path)(images=images, return_tensors="pt")["pixel_values"]
    assert ours.shape == theirs.shape == (3, 3, 112, 112)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_tokenizer_keeps_the_longest_description_whole() -> None:
    spec = ct.TinyClipSpec()
    tokenizer = ct.build_scene_tokenizer(spec)
    # Seven large metal objects, all different: the longest description training produces.
    objects = [sc.SceneObject(c, s, "large", 0.1 + 0.12 * i, 0.5, "metal")
               for i, (c, s) in enumerate(zip(("red", "blue", "green", "yellow", "purple", "gray", "brown"),
                                              sc.SHAPES * 3))]
    text = sc.describe_scene(sc.Scene(objects))
    ids = tokenizer(text)["input_ids"]
    assert len(ids) <= spec.max_text_tokens
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.unk_token_id not in ids
    # Each word and punctuation mark of the grammar is a single token.
    assert len(ids) == len(text.replace(",", " ,").replace(":", " :").replace(".", " .").split()) + 2


def test_a_few_steps_reduce_the_loss_on_a_fixed_batch() -> None:
    torch.manual_seed(0)
    spec = ct.TinyClipSpec(image_size=64)
    tokenizer = ct.build_scene_tokenizer(spec)
    model = ct.build_clip_model(spec, tokenizer, seed=0)
    batch = ct.make_batch(random.Random(0), 16, 64, tokenizer, num_negatives=1)
    assert batch.pixel_values.shape == (16, 3, 64, 64) and batch.input_ids.shape[0] == 32
    optimizer, _ = ct.make_optimizer(model, lr=2e-3, steps=30, warmup=1)
    with ct.torch_threads(1):
        losses = [ct.train_step(model, batch, optimizer) for _ in range(30)]
    # At random init every caption is about as likely: (ln 32 + ln 16) / 2.
    assert losses[0] == pytest.approx((math.log(32) + math.log(16)) / 2, abs=0.3)
    assert losses[-1] < 0.5 * losses[0]
    assert float(model.logit_scale.detach().exp()) <= ct.MAX_LOGIT_SCALE + 1e-4


def test_bad_arguments_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="multiple of patch_size"):
        ct.TinyClipSpec(image_size=100)
    with pytest.raises(ValueError, match="steps >= 1"):
        ct.train_tiny_clip(str(tmp_path), steps=0)


def test_short_run_saves_a_clip_that_prefers_the_right_description(tmp_path: Path) -> None:
    from pebr.rewards.clip import ClipScorer

    out = tmp_path / "clip"
    # Seeds 0-3 of this setting all give a mean gap of 0.27-0.36 and 26-27 of 32 pairs in order.
    _load_cli().main(["--output", str(out), "--steps", "200", "--batch_size", "16", "--lr", "1.5e-3",
                      "--image_size", "64"])
    scorer = ClipScorer(str(out), device="cpu")
    assert scorer.max_text_length == ct.TinyClipSpec().max_text_tokens
    rng = random.Random(123)  # held out: training draws from seed 0's stream
    scenes = [sc.sample_scene(rng) for _ in range(32)]
    images = [sc.render_scene(s, 64) for s in scenes]
    own = scorer.score(images, [sc.describe_scene(s) for s in scenes])
    other = scorer.score(images, [sc.describe_scene(s) for s in scenes[1:] + scenes[:1]])
    assert sum(own) / len(own) > sum(other) / len(other) + 0.15
    assert sum(o > m for o, m in zip(own, other)) >= 22
