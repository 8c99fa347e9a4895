"""The embedded CLEVR-like data set: schema, correct answers, faithful key words, determinism."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from pebr.utils import scenes as sc

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "make_synthetic_data.py"
NUM, SFT_NUM, SIZE = 15, 30, 64
HEADERS = (
    "### Image Description:",
    "### Rationales:",
    "### Let's think step by step.",
    "### Step 1:",
    "### The final answer is:",
)


def _generate(out: Path, seed: int) -> Path:
    cmd = [sys.executable, str(SCRIPT), "--output_dir", str(out), "--num", str(NUM), "--seed", str(seed),
           "--image_size", str(SIZE), "--sft_num", str(SFT_NUM)]
    subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("synth")
    return {"a": _generate(base / "a", 0), "b": _generate(base / "b", 0), "other": _generate(base / "c", 1)}


def _load(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------ the written data set


def test_rl_records_schema(runs):
    root = runs["a"]
    train, test = _load(root / "train.json"), _load(root / "test.json")
    assert (len(train), len(test)) == (12, 3)  # test_fraction 0.2 of 15
    qids = [r["qid"] for r in train + test]
    assert len(set(qids)) == len(qids)
    for split, records in (("train", train), ("test", test)):
        for r in records:
            assert set(r) == {"qid", "problem", "answer", "images", "key_words", "category"}
            assert r["problem"].startswith("<image>") and r["problem"].count("<image>") == 1
            assert r["answer"].isdigit()
            assert isinstance(r["images"], list) and len(r["images"]) == 1
            assert r["images"][0].startswith(f"{split}/")
            assert (root / "images" / r["images"][0]).is_file()
            assert r["category"] in sc.CATEGORIES
            assert all(isinstance(w, str) and w == w.lower() for w in r["key_words"])


def test_answers_keywords_and_pixels_match_the_scenes(runs):
    root = runs["a"]
    scenes = _load(root / "scenes.json")
    for r in _load(root / "train.json") + _load(root / "test.json"):
        entry = scenes[r["qid"]]
        scene = sc.Scene.from_dict(entry)
        assert 2 <= len(scene.objects) <= 6
        assert sc.answer_question(scene, r["problem"]) == r["answer"], r["qid"]
        attrs = {o.color for o in scene.objects} | {o.shape for o in scene.objects} | {o.size for o in scene.objects}
        assert len(r["key_words"]) == len(set(r["key_words"]))
        assert set(r["key_words"]) == attrs, r["qid"]
        saved = Image.open(root / "images" / r["images"][0])
        assert saved.size == (SIZE, SIZE) and entry["image_size"] == [SIZE, SIZE]
        assert saved.convert("RGB").tobytes() == sc.render_scene(scene, SIZE).tobytes(), r["qid"]


def test_same_seed_same_bytes_other_seed_differs(runs):
    a, b, other = _files(runs["a"]), _files(runs["b"]), _files(runs["other"])
    assert a == b
    assert a["train.json"] != other["train.json"]
    pngs = [k for k in a if k.endswith(".png") and k in other]
    assert sum(a[k] != other[k] for k in pngs) > len(pngs) // 2


def test_sft_set_has_pebr_responses_and_the_planned_defects(runs):
    root = runs["a"]
    sft = _load(root / "sft" / "sft.json")
    scenes = _load(root / "scenes.json")
    by_image = {e["image"]: sc.Scene.from_dict(e) for k, e in scenes.items() if k.startswith("sft_") and e["image"]}
    test_images = {e["image"] for k, e in scenes.items() if k.startswith("test_")}
    assert len(sft) == SFT_NUM
    reflective = strings = text_only = tiny = missing = 0
    for r in sft:
        user, assistant = r["messages"]
        assert (user["role"], assistant["role"]) == ("user", "assistant")
        positions = [assistant["content"].find(h) for h in HEADERS]
        assert -1 not in positions and positions == sorted(positions), assistant["content"]
        final = assistant["content"].rsplit("### The final answer is:", 1)[1].strip()
        reflective += "let me rethink it" in assistant["content"].lower()
        if "images" not in r:
            text_only += 1
            assert "<image>" not in user["content"]
            continue
        strings += isinstance(r["images"], str)
        rel = r["images"] if isinstance(r["images"], str) else r["images"][0]
        assert rel.startswith("sft/") and rel not in test_images
        assert user["content"].startswith("<image>")
        assert sc.answer_question(by_image[rel], user["content"]) == final
        path = root / "images" / rel
        if not path.exists():
            missing += 1
            continue
        w, h = Image.open(path).size
        tiny += min(w, h) < 28
    assert (reflective, tiny, strings, text_only, missing) == (3, 2, 3, 2, 1)  # round(10%), round(5%) of 30


def test_filter_removes_exactly_the_planned_defects(runs, tmp_path):
    root = runs["a"]
    out = tmp_path / "clean.json"
    cmd = [sys.executable, str(REPO / "dataset" / "filter.py"), "--input", str(root / "sft" / "sft.json"),
           "--output", str(out), "--image_root", str(root / "images")]
    res = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO)
    assert "dropped 3 reflective" in res.stdout and "dropped 2 small_image" in res.stdout
    assert "dropped 1 missing_image" in res.stdout and "before 30, after 24 (dropped 6)" in res.stdout
    clean = _load(out)
    assert len(clean) == 24 and all(isinstance(r.get("images", []), list) for r in clean)


def test_teacher_flaws_are_drawn_per_record_and_logged(tmp_path):
    out = tmp_path / "flawed"
    cmd = [sys.executable, str(SCRIPT), "--output_dir", str(out), "--num", "5", "--image_size", str(SIZE),
           "--sft_num", "40", "--sft_total_answer_share", "0.5", "--sft_no_size_share", "0.5"]
    res = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO)
    scenes = _load(out / "scenes.json")
    seen = {"total_answer": 0, "no_size": 0}
    for i, r in enumerate(_load(out / "sft" / "sft.json")):
        entry = scenes[f"sft_{i:05d}"]
        scene, flaws = sc.Scene.from_dict(entry), entry.get("teacher_flaws", [])
        question, text = r["messages"][0]["content"], r["messages"][1]["content"]
        for flaw in flaws:
            seen[flaw] += 1
        if "images" not in r:  # the two text-only records tell the scene in the prompt
            continue
        final = text.rsplit("### The final answer is:", 1)[1].strip()
        truth = sc.answer_question(scene, question)
        description = text.split("### Rationales:")[0]
        assert final == (str(len(scene.objects)) if "total_answer" in flaws else truth), (i, flaws, text)
        if "no_size" in flaws:
            assert "small" not in description and "large" not in description, text
        else:
            assert sc.describe_scene(scene) in description
    # 40 draws at 0.5 each: both flaws occur, neither everywhere.
    assert all(5 <= n <= 35 for n in seen.values()), seen
    assert f"sft with flaw total_answer {seen['total_answer']}" in res.stdout
    bad = subprocess.run(cmd[:-1] + ["1.5"], capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 2 and "--sft_no_size_share must be in [0, 1], got 1.5" in bad.stderr


# ------------------------------------------------------------------ the module's functions


def test_answer_question_on_the_demo_scene_worked_by_hand():
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import make_synthetic_data as msd
    finally:
        sys.path.remove(str(REPO / "scripts"))
    scene = msd.DEMO_SCENE
    # 7 objects: two brown cubes go (5 left), then the one large blue rubber cylinder (4 left).
    assert sc.answer_question(scene, msd.DEMO_QUESTION) == "4"
    assert sc.answer_question(scene, "How many blue things are there?") == "3"
    assert sc.answer_question(scene, "How many metal objects are there?") == "3"
    assert sc.answer_question(scene, "Subtract all spheres. How many cylinders are there?") == "2"
    assert sc.answer_question(scene, "<image>Subtract all small objects. How many objects are left?") == "4"
    demo = Image.open(REPO / "demo.jpg")
    assert demo.size == (224, 224)


@pytest.mark.parametrize(
    "question", ["How many dogs are there?", "Subtract all red. How many objects are left?", "What colour is it?"]
)
def test_parse_question_rejects_text_outside_the_grammar(question):
    with pytest.raises(ValueError, match="question"):
        sc.parse_question(question)


def test_sampled_scenes_fit_and_do_not_overlap():
    rng = random.Random(7)
    for _ in range(200):
        scene = sc.sample_scene(rng)
        assert 2 <= len(scene.objects) <= 6
        for i, a in enumerate(scene.objects):
            half = sc.SIZE_HALF_EXTENT[a.size]
            assert half <= a.x <= 1 - half and half <= a.y <= 1 - half
            for b in scene.objects[i + 1:]:
                reach = half + sc.SIZE_HALF_EXTENT[b.size]
                assert abs(a.x - b.x) >= reach or abs(a.y - b.y) >= reach


def test_make_question_answers_agree_with_the_parser():
    rng = random.Random(3)
    seen = set()
    for _ in range(300):
        scene = sc.sample_scene(rng)
        question, answer, category = sc.make_question(scene, rng)
        seen.add(category)
        assert sc.answer_question(scene, question) == answer
    assert seen == set(sc.CATEGORIES)


def test_description_keywords_and_response_for_a_hand_built_scene():
    scene = sc.Scene([
        sc.SceneObject("red", "cube", "small", 0.2, 0.5),
        sc.SceneObject("red", "cube", "small", 0.8, 0.5),
        sc.SceneObject("blue", "sphere", "large", 0.5, 0.2),
    ])
    assert sc.describe_scene(scene) == (
        "The image shows 3 objects on a plain background: two small red cubes and a large blue sphere."
    )
    assert sc.scene_keywords(scene) == ["red", "cube", "small", "blue", "sphere", "large"]
    text = sc.pebr_response(scene, "Subtract all red cubes. How many objects are left?", "1")
    assert "Removing the red cubes (two small red cubes) leaves 1 object." in text
    assert text.endswith("### The final answer is: 1")
    # The small cubes are gone with the red ones, which the trace must not deny ("There are no small cubes").
    again = sc.pebr_response(scene, "Subtract all red cubes. Subtract all small cubes. How many objects are left?",
                             "1")
    assert "There are no small cubes left, so 1 object remains." in again
    assert "There are no green objects, so" in sc.pebr_response(
        scene, "Subtract all green things. How many objects are left?", "3")
    terse = sc.pebr_response(scene, "Subtract all red cubes. How many objects are left?", "3", with_size=False)
    assert "a plain background: two red cubes and a blue sphere.\n" in terse
    assert "Removing the red cubes (two red cubes) leaves 1 object." in terse
    assert terse.endswith("### The final answer is: 3")
    assert sc.Scene.from_dict(json.loads(json.dumps(scene.to_dict()))) == scene


def test_scene_from_dict_names_the_bad_object():
    with pytest.raises(ValueError, match="scene object 0: unknown color 'pink'"):
        sc.Scene.from_dict({"objects": [{"color": "pink", "shape": "cube", "size": "small", "position": [0.5, 0.5]}]})


def test_a_bad_sft_size_writes_nothing_and_a_stopped_run_leaves_no_stale_record_file(runs, tmp_path):
    """--sft_num was checked after the train/test images were drawn, so a rerun into a used directory replaced
    the images and kept the old record files, whose answers no longer matched the pictures."""
    out = tmp_path / "data"
    _generate(out, 0)
    before = _files(out)
    cmd = [sys.executable, str(SCRIPT), "--output_dir", str(out), "--num", str(NUM), "--seed", "1",
           "--image_size", str(SIZE), "--sft_num", "3"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 2 and "--sft_num must be 0 or at least" in res.stderr
    assert _files(out) == before
    # A run stopped while drawing: its record files are gone, not left naming the new images.
    sys.path.insert(0, str(REPO / "scripts"))
    import make_synthetic_data

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    real = make_synthetic_data.make_sft
    make_synthetic_data.make_sft = stopped
    try:
        with pytest.raises(KeyboardInterrupt):
            make_synthetic_data.build_dataset(str(out), NUM, 1, 0.2, SIZE, SFT_NUM)
    finally:
        make_synthetic_data.make_sft = real
    assert not [name for name in make_synthetic_data.INDEX_FILES if (out / name).exists()]


@pytest.mark.parametrize("bad, message", [(["--colors", "red,bleu"], "unknown colo"),
                                          (["--min_objects", "9", "--max_objects", "2"], "objects"),
                                          # A first scene of 4 objects fitted; a later one of 6 did not, after the
                                          # old data set's record files were deleted.
                                          (["--object_scale", "2.0"], "no room")])
def test_bad_options_stop_before_an_existing_data_set_is_touched(tmp_path, bad, message):
    out = _generate(tmp_path / "data", 0)
    before = _files(out)
    proc = subprocess.run([sys.executable, str(SCRIPT), "--output_dir", str(out), "--num", str(NUM), *bad],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert _files(out) == before  # the record files were deleted before the options were checked
    (tmp_path / "a_file").write_text("")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--output_dir", str(tmp_path / "a_file")],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2 and "is a file" in proc.stderr
