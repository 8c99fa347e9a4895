"""Write the embedded CLEVR-like data set: RL train/test records, their scenes, and a raw warm-up SFT set.

Usage:
    python scripts/make_synthetic_data.py --output_dir data/synth --num 200 --seed 0
    python scripts/make_synthetic_data.py --demo demo.jpg      # the demo image only

Layout written under ``--output_dir`` (image paths in records are relative to ``DIR/images``, so a
recipe sets ``data.image_dir=DIR/images``)::

    images/{train,test,sft}/NNNNN.png
    train.json, test.json   PeBR GRPO records {qid, problem, answer, images, key_words, category}
    scenes.json             qid -> {"objects": [...], "image_size": [w, h], "image": path or null}
    sft/sft.json            sharegpt records for LLaMA-Factory, drawn from their own scenes

The SFT set is deliberately raw, like Mulberry-SFT before cleaning: about 10% reflective answers
("let me rethink it" in varying case), about 5% images under 28 px on a side, one record pointing at a
missing image, a few records with ``images`` as a plain string and two text-only records. Run
``dataset/filter.py`` over it before training.

``--sft_total_answer_share`` and ``--sft_no_size_share`` make the warm-up teacher imperfect the way a real one
is (Mulberry-SFT's traces were written by other models): in that share of the SFT traces the last line gives the
number of objects in the image instead of the number the steps reached, or the objects are named without their
sizes. Filtering cannot see these flaws; the RL stages, rewarded against the ground truth, can. Each flaw is
drawn independently per record from a stream of its own, so at 0 (the default) the data set is unchanged. A
total that is the answer anyway (every object counted) is right, and not logged as a flaw in scenes.json.

The same seed gives the same bytes: all randomness comes from ``random.Random`` streams seeded by
``(seed, part)``, so changing ``--sft_num`` leaves train and test unchanged.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

try:
    from pebr.utils import scenes as sc
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from pebr.utils import scenes as sc
from pebr.utils.jsonio import atomic_write_text  # noqa: E402

REFLECTIVE_SHARE = 0.10
TINY_SHARE = 0.05
NUM_STRING_IMAGES = 3
NUM_TEXT_ONLY = 2
NUM_MISSING = 1
REFLECTIVE_VARIANTS = ("Let me rethink it", "let me rethink it", "LET ME RETHINK IT", "Let Me Rethink it")
# (width, height) of the deliberately unusable images: narrow, short, and both.
TINY_SIZES = ((20, 112), (112, 20), (16, 16))

# The demo scene is built by hand. "Subtract all brown blocks. Subtract all large blue rubber things.
# How many objects are left?" -> the two brown cubes go, then the large blue rubber cylinder; the
# large blue METAL sphere, the small blue cube, the small red sphere and the green cylinder stay.
# Answer: 4.
DEMO_QUESTION = "Subtract all brown blocks. Subtract all large blue rubber things. How many objects are left?"
DEMO_ANSWER = "4"
DEMO_SCENE = sc.Scene(
    [
        sc.SceneObject("brown", "cube", "large", 0.18, 0.30),
        sc.SceneObject("brown", "cube", "small", 0.78, 0.78, "metal"),
        sc.SceneObject("blue", "cylinder", "large", 0.50, 0.25),
        sc.SceneObject("blue", "sphere", "large", 0.80, 0.35, "metal"),
        sc.SceneObject("blue", "cube", "small", 0.20, 0.75),
        sc.SceneObject("red", "sphere", "small", 0.48, 0.62),
        sc.SceneObject("green", "cylinder", "large", 0.50, 0.85, "metal"),
    ]
)


# The files that index the images, written in this order (train.json, which the recipes read, last).
INDEX_FILES = ("scenes.json", "sft/sft.json", "test.json", "train.json")


def _save_png(img: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG", optimize=False)  # no metadata, fixed compression: reproducible bytes


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(str(path), json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def _scene_entry(
    scene: sc.Scene, size: tuple[int, int], image: str | None, flaws: list[str] | None = None
) -> dict[str, Any]:
    return {**scene.to_dict(), "image_size": list(size), "image": image, **({"teacher_flaws": flaws} if flaws else {})}


def make_rl_split(
    split: str, count: int, seed: int, image_size: int, image_root: Path, scene_log: dict[str, Any],
    scene_options: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Draw, save and describe ``count`` scenes of one RL split.

    ``scene_options`` are keyword arguments of :func:`pebr.utils.scenes.sample_scene` (colours,
    object counts, object scale); None keeps its defaults.

    Returns:
        PeBR GRPO records; ``scene_log`` gains one entry per record, keyed by qid.
    """
    rng = random.Random(f"{seed}/{split}")
    records = []
    for i in range(count):
        scene = sc.sample_scene(rng, **(scene_options or {}))
        question, answer, category = sc.make_question(scene, rng)
        qid, rel = f"{split}_{i:05d}", f"{split}/{i:05d}.png"
        _save_png(sc.render_scene(scene, image_size), image_root / rel)
        scene_log[qid] = _scene_entry(scene, (image_size, image_size), rel)
        records.append(
            {
                "qid": qid,
                "problem": "<image>" + question,
                "answer": answer,
                "images": [rel],
                "key_words": sc.scene_keywords(scene),
                "category": category,
            }
        )
    return records


def _sft_kinds(count: int, rng: random.Random) -> list[str]:
    """Assign each SFT index a kind; the shares are counts, so even a small set has each defect."""
    special = (
        ["reflective"] * max(1, round(REFLECTIVE_SHARE * count))
        + ["tiny"] * max(1, round(TINY_SHARE * count))
        + ["string_images"] * NUM_STRING_IMAGES
        + ["text_only"] * NUM_TEXT_ONLY
        + ["missing"] * NUM_MISSING
    )
    if count < len(special) + 1:
        raise ValueError(f"--sft_num must be 0 or at least {len(special) + 1}, got {count}")
    kinds = special + ["plain"] * (count - len(special))
    rng.shuffle(kinds)
    return kinds


@dataclass(frozen=True)
class TeacherFlaws:
    """Shares of SFT traces with each flaw of an imperfect teacher (module docstring).

    Attributes:
        total_answer: the last line states the number of objects in the image, not the steps' result.
        no_size: objects are named without their sizes (except where the question names one).
    """

    total_answer: float = 0.0
    no_size: float = 0.0

    def __post_init__(self) -> None:
        for name in ("total_answer", "no_size"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"--sft_{name}_share must be in [0, 1], got {getattr(self, name)}")


def make_sft(
    count: int, seed: int, image_size: int, image_root: Path, scene_log: dict[str, Any],
    scene_options: dict[str, Any] | None = None, flaws: TeacherFlaws = TeacherFlaws(),
) -> list[dict[str, Any]]:
    """Draw the raw warm-up SFT set (sharegpt layout) from scenes of its own (``scene_options`` as in
    :func:`make_rl_split`), with the teacher's ``flaws``.

    Returns:
        Records ``{"messages": [user, assistant], "images": [...]}``; see the module docstring for
        the deliberately bad ones. A flawed trace's scene-log entry lists its flaws under ``"teacher_flaws"``.
    """
    if count == 0:
        return []
    rng = random.Random(f"{seed}/sft")
    teacher_rng = random.Random(f"{seed}/sft_teacher")
    records = []
    for i, kind in enumerate(_sft_kinds(count, rng)):
        scene = sc.sample_scene(rng, **(scene_options or {}))
        question, answer, _ = sc.make_question(scene, rng)
        said_total = teacher_rng.random() < flaws.total_answer
        no_size = teacher_rng.random() < flaws.no_size
        stated = str(len(scene.objects)) if said_total else answer
        response = sc.pebr_response(scene, question, stated, with_size=not no_size)
        # A total that is the answer anyway ("how many objects are there") is no flaw, and is not logged as one.
        flaw_names = [name for name, on in (("total_answer", stated != answer), ("no_size", no_size)) if on]
        key, rel = f"sft_{i:05d}", f"sft/{i:05d}.png"
        size = (image_size, image_size)
        if kind == "reflective":
            variant = rng.choice(REFLECTIVE_VARIANTS)
            final = "\n### The final answer is:"
            response = response.replace(final, f"\nWait, {variant}. Counting once more gives {stated}.{final}")
        elif kind == "tiny":
            size = rng.choice(TINY_SIZES)
        if kind == "text_only":
            prompt = describe_as_text(scene) + " " + question
            scene_log[key] = _scene_entry(scene, size, None, flaw_names)
            records.append({"messages": [_msg("user", prompt), _msg("assistant", response)]})
            continue
        if kind == "missing":
            rel = f"sft/missing_{i:05d}.png"  # referenced but never written
        else:
            _save_png(sc.render_scene(scene, size), image_root / rel)
        scene_log[key] = _scene_entry(scene, size, rel, flaw_names)
        records.append(
            {
                "messages": [_msg("user", "<image>" + question), _msg("assistant", response)],
                "images": rel if kind == "string_images" else [rel],
            }
        )
    return records


def describe_as_text(scene: sc.Scene) -> str:
    """The scene told in words, for the text-only SFT records."""
    return "There is no picture. " + sc.describe_scene(scene).replace("The image shows", "Imagine", 1)


def _msg(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


def build_dataset(
    output_dir: str | Path,
    num: int,
    seed: int,
    test_fraction: float = 0.2,
    image_size: int = 112,
    sft_num: int | None = None,
    scene_options: dict[str, Any] | None = None,
    flaws: TeacherFlaws = TeacherFlaws(),
) -> dict[str, int]:
    """Write the whole data set under ``output_dir`` (layout in the module docstring).

    Args:
        output_dir: created if missing; existing files of the same names are overwritten.
        num: RL questions in all (train + test), one scene each.
        seed: fixes every byte written.
        test_fraction: share of ``num`` that goes to test.json.
        image_size: side of the square images in pixels.
        sft_num: raw SFT records (default ``num``); 0 writes an empty SFT set.
        scene_options: keyword arguments of :func:`pebr.utils.scenes.sample_scene` for every split
            (``colors``, ``min_objects``, ``max_objects``, ``object_scale``); None: its defaults.
        flaws: the SFT teacher's flaws (:class:`TeacherFlaws`); none by default.

    Returns:
        Counts ``{"train", "test", "sft"}``, and the SFT records with each flaw that is switched on.

    Raises:
        ValueError: on a non-positive ``num``/``image_size``, a ``test_fraction`` outside [0, 1), scene options
            ``sample_scene`` refuses, or an ``output_dir`` that is a file; nothing is written or deleted then.
    """
    if num < 1 or image_size < 28:
        raise ValueError(f"need --num >= 1 and --image_size >= 28, got {num}, {image_size}")
    if not 0 <= test_fraction < 1:
        raise ValueError(f"--test_fraction must be in [0, 1), got {test_fraction}")
    sft_num = num if sft_num is None else sft_num
    if sft_num:
        _sft_kinds(sft_num, random.Random(0))  # its size check, before anything is drawn or written
    # The scene options' checks, before any deletion: on scenes of the most objects, the hardest to place (one
    # scene of a random count passed, then a later one found no room after the old data set was deleted).
    check = random.Random(f"{seed}/check")
    sc.sample_scene(check, **(scene_options or {}))
    crowded = {**(scene_options or {}), "min_objects": (scene_options or {}).get("max_objects", sc.MAX_OBJECTS)}
    for _ in range(10):
        sc.sample_scene(check, **crowded)
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output_dir {out} is a file; name a directory")
    image_root = out / "images"
    # The record files go first and come back last (each atomically): a run stopped half-way leaves no record
    # file that names another run's images.
    for name in INDEX_FILES:
        (out / name).unlink(missing_ok=True)
    n_test = round(num * test_fraction)
    scene_log: dict[str, Any] = {}
    train = make_rl_split("train", num - n_test, seed, image_size, image_root, scene_log, scene_options)
    test = make_rl_split("test", n_test, seed, image_size, image_root, scene_log, scene_options)
    sft = make_sft(sft_num, seed, image_size, image_root, scene_log, scene_options, flaws)
    for name, data in zip(INDEX_FILES, (scene_log, sft, test, train)):
        _write_json(out / name, data)
    counts = {"train": len(train), "test": len(test), "sft": len(sft)}
    for flaw in ("total_answer", "no_size"):
        if getattr(flaws, flaw):
            counts[f"sft with flaw {flaw}"] = sum(flaw in e.get("teacher_flaws", ()) for e in scene_log.values())
    return counts


def write_demo(path: str | Path, size: int = 224) -> None:
    """Draw the hand-built demo scene (question ``DEMO_QUESTION``, answer ``DEMO_ANSWER``) to ``path``."""
    derived = sc.answer_question(DEMO_SCENE, DEMO_QUESTION)
    if derived != DEMO_ANSWER:  # guards the answer quoted in the comment above DEMO_SCENE
        raise RuntimeError(f"demo scene answers {derived}, expected {DEMO_ANSWER}")
    sc.render_scene(DEMO_SCENE, size).save(path, quality=95)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", help="where to write the data set")
    parser.add_argument("--num", type=int, default=200, help="RL questions (train + test)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--test_fraction", type=float, default=0.2)
    parser.add_argument("--image_size", type=int, default=112, help="image side in pixels")
    parser.add_argument("--sft_num", type=int, default=None, help="raw SFT records (default: --num)")
    parser.add_argument("--demo", help="also (or only) write the 224 px demo image to this path")
    parser.add_argument("--colors", default=",".join(sc.DEFAULT_COLORS),
                        help=f"comma-separated colours to draw from (of {', '.join(sc.COLOR_RGB)})")
    parser.add_argument("--min_objects", type=int, default=sc.MIN_OBJECTS, help="fewest objects per scene")
    parser.add_argument("--max_objects", type=int, default=sc.MAX_OBJECTS, help="most objects per scene")
    parser.add_argument("--object_scale", type=float, default=1.0,
                        help="multiplies every object's size; larger objects are easier for a small model to see")
    parser.add_argument("--sft_total_answer_share", type=float, default=0.0,
                        help="share of SFT traces whose last line gives the number of objects in the image")
    parser.add_argument("--sft_no_size_share", type=float, default=0.0,
                        help="share of SFT traces that name objects without their sizes")
    args = parser.parse_args(argv)
    scene_options = {
        "colors": tuple(c.strip() for c in args.colors.split(",") if c.strip()),
        "min_objects": args.min_objects, "max_objects": args.max_objects, "object_scale": args.object_scale,
    }
    if args.output_dir is None and args.demo is None:
        parser.error("give --output_dir, --demo, or both")
    if args.demo:
        try:
            write_demo(args.demo)
        except (OSError, ValueError) as exc:  # a missing folder, a suffix Pillow cannot write
            parser.error(f"--demo {args.demo}: {exc}")
        print(f"wrote {args.demo}: {DEMO_QUESTION} -> {DEMO_ANSWER}")
    if args.output_dir:
        try:
            flaws = TeacherFlaws(args.sft_total_answer_share, args.sft_no_size_share)
            counts = build_dataset(
                args.output_dir, args.num, args.seed, args.test_fraction, args.image_size, args.sft_num,
                scene_options, flaws,
            )
        except (OSError, ValueError) as exc:
            parser.error(str(exc))
        print(f"wrote {args.output_dir}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
