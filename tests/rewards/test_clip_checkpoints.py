"""The CLIP scorer with checkpoints shaped like FG-CLIP's, and with hub ids.

FG-CLIP cannot be downloaded here, so a stand-in carries the traits the scorer has to meet: modelling
code shipped beside the weights and registered under AutoModelForCausalLM only, features returned as
plain tensors, a `get_text_features` without an attention mask, and a `walk_short_pos` switch between
a 77-position table and a longer one.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil

import pytest
import torch
from PIL import Image

from pebr.rewards.clip import ClipScorer, resolve_model_dir
from pebr.workers.reward import get_clip_scorer

REMOTE_CODE = '''
from transformers import CLIPConfig, CLIPModel


class StandInFGClipConfig(CLIPConfig):
    model_type = "stand_in_fgclip"


class StandInFGClipModel(CLIPModel):
    config_class = StandInFGClipConfig

    def get_image_features(self, pixel_values):
        return super().get_image_features(pixel_values=pixel_values).pooler_output

    def get_text_features(self, input_ids, walk_short_pos=True):
        self.walk_short_pos_seen = walk_short_pos
        if walk_short_pos and input_ids.shape[1] > 77:
            raise IndexError(f"{input_ids.shape[1]} tokens do not fit the 77 short positions")
        return super().get_text_features(input_ids=input_ids).pooler_output
'''

LONG_CAPTION = " ".join(["a red square next to a blue circle"] * 12)  # about 100 tokens


@pytest.fixture(scope="module")
def fgclip_like_path(tiny_clip_path: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A checkpoint with remote code, 120 text positions, and the tiny CLIP's tokenizer and processor."""
    output = str(tmp_path_factory.mktemp("fgclip_like"))
    with open(os.path.join(output, "modeling_stand_in.py"), "w") as handle:
        handle.write(REMOTE_CODE)
    spec = importlib.util.spec_from_file_location("modeling_stand_in", os.path.join(output, "modeling_stand_in.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with open(os.path.join(tiny_clip_path, "config.json")) as handle:
        config = json.load(handle)
    config["text_config"]["max_position_embeddings"] = 120
    torch.manual_seed(0)
    model = module.StandInFGClipModel(module.StandInFGClipConfig(text_config=config["text_config"],
                                                                  vision_config=config["vision_config"]))
    model.save_pretrained(output)
    path = os.path.join(output, "config.json")
    with open(path) as handle:
        saved = json.load(handle)
    saved["auto_map"] = {"AutoConfig": "modeling_stand_in.StandInFGClipConfig",
                         "AutoModelForCausalLM": "modeling_stand_in.StandInFGClipModel"}
    with open(path, "w") as handle:
        json.dump(saved, handle)
    for name in os.listdir(tiny_clip_path):
        if name.startswith(("tokenizer", "special_tokens", "preprocessor", "vocab", "merges")):
            shutil.copy(os.path.join(tiny_clip_path, name), output)
    return output


def test_remote_code_needs_trust_remote_code(fgclip_like_path: str) -> None:
    with pytest.raises(ValueError, match="trust_remote_code"):
        ClipScorer(fgclip_like_path)


def test_fgclip_like_checkpoint_scores_long_captions(fgclip_like_path: str) -> None:
    scorer = ClipScorer(fgclip_like_path, trust_remote_code=True)
    assert type(scorer.model).__name__ == "StandInFGClipModel"  # loaded through its auto_map entry
    assert scorer.max_text_length == 120 and scorer.text_kwargs == {"walk_short_pos": False}
    assert not scorer.pass_attention_mask
    image = Image.new("RGB", (40, 40), (200, 30, 30))
    [score] = scorer.score([image], [LONG_CAPTION])
    assert scorer.model.walk_short_pos_seen is False
    ids = scorer.tokenizer([LONG_CAPTION], truncation=True, max_length=120, return_tensors="pt")["input_ids"]
    assert 77 < ids.shape[1] < 120  # the caption needs the long table, and is not cut
    pixels = scorer.image_processor(images=[image], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected = torch.nn.functional.cosine_similarity(
            scorer.model.get_image_features(pixels), scorer.model.get_text_features(ids, walk_short_pos=False))
    assert score == pytest.approx(float(expected), abs=1e-5)


def test_short_limit_uses_the_short_positions(fgclip_like_path: str) -> None:
    scorer = ClipScorer(fgclip_like_path, trust_remote_code=True, max_text_length=77)
    assert scorer.text_kwargs == {"walk_short_pos": True}
    scorer.score([Image.new("RGB", (40, 40))], [LONG_CAPTION])  # cut to 77 tokens, so it fits
    assert scorer.model.walk_short_pos_seen is True


def test_text_limit_over_the_models_positions_is_refused(tiny_clip_path: str) -> None:
    with pytest.raises(ValueError, match=r"clip_max_text_length.*2 to 16 tokens"):
        ClipScorer(tiny_clip_path, max_text_length=248)


def test_image_size_resizes_the_whole_image(tiny_clip_path: str) -> None:
    """A wide image: the processor alone crops its sides; image_size squashes it whole instead."""
    wide = Image.new("RGB", (96, 32), (0, 0, 255))
    wide.paste((255, 0, 0), (0, 0, 32, 32))  # red on the left third, which a centre crop cuts off
    cropped = ClipScorer(tiny_clip_path)
    whole = ClipScorer(tiny_clip_path, image_size=32)
    caption = ["a red square on a blue background"]
    squashed = wide.resize((32, 32), Image.Resampling.BICUBIC)
    assert whole.score([wide], caption) == pytest.approx(cropped.score([squashed], caption), abs=1e-6)
    assert whole.score([wide], caption) != pytest.approx(cropped.score([wide], caption), abs=1e-4)


def _cache_snapshot(cache: str, repo_id: str, source: str) -> None:
    """Lay `source` out in a Hugging Face hub cache as the main revision of `repo_id`."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
    os.makedirs(os.path.join(repo_dir, "refs"))
    with open(os.path.join(repo_dir, "refs", "main"), "w") as handle:
        handle.write(commit)
    shutil.copytree(source, os.path.join(repo_dir, "snapshots", commit))


@pytest.fixture
def offline_hub_cache(tmp_path, monkeypatch) -> str:
    from huggingface_hub import constants

    cache = str(tmp_path / "hub")
    os.makedirs(cache)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", cache)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_hub_id_is_read_from_the_cache_offline(offline_hub_cache: str, tiny_clip_path: str) -> None:
    _cache_snapshot(offline_hub_cache, "pebr-test/tiny-clip", tiny_clip_path)
    resolved = resolve_model_dir("pebr-test/tiny-clip")
    assert resolved.startswith(offline_hub_cache) and os.path.isfile(os.path.join(resolved, "config.json"))
    image, caption = [Image.new("RGB", (32, 32), (0, 200, 0))], ["a green square"]
    by_id = get_clip_scorer("pebr-test/tiny-clip", use_ray=False)
    assert by_id.score(image, caption) == pytest.approx(ClipScorer(tiny_clip_path).score(image, caption), abs=1e-6)


def test_hub_id_not_in_the_cache_is_a_clear_error(offline_hub_cache: str) -> None:
    with pytest.raises(FileNotFoundError, match=r"clip_model_path='pebr-test/absent'.*--local-dir"):
        resolve_model_dir("pebr-test/absent")
    with pytest.raises(FileNotFoundError, match="clip_model_path"):
        get_clip_scorer("./not/a/dir", use_ray=False)
