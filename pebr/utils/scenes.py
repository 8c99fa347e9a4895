"""CLEVR-like synthetic scenes: sample, draw, ask, answer and describe.

A scene is a handful of coloured shapes on a plain background. Everything here is a pure function of
its inputs (randomness comes in through an explicit ``random.Random``), so a seed fixes the data set
byte for byte, and a saved scene can be drawn again to check the image that was written.

Positions are stored as fractions of the image side (rounded to 3 decimals so that a JSON round trip
is exact); sizes are fractions too, so one scene can be drawn at any resolution.

Questions follow a tiny grammar that :func:`parse_question` understands::

    ("Subtract all <filter>." )* ("How many objects are left?" | "How many <filter> are there?")
    <filter> = [size] [colour] [material] noun       noun: objects/things, cubes/blocks, spheres/balls, cylinders

so an answer can be worked out again from the question text alone (:func:`answer_question`).
"""

from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from PIL import Image, ImageDraw

# CLEVR's eight colours; the generated data sets use DEFAULT_COLORS, "brown" and "cyan" stay
# available for hand-built scenes (the demo image uses brown).
COLOR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (200, 40, 40),
    "blue": (40, 70, 210),
    "green": (40, 160, 60),
    "yellow": (235, 200, 30),
    "purple": (130, 50, 170),
    "gray": (120, 120, 120),
    "brown": (130, 80, 35),
    "cyan": (40, 190, 200),
}
DEFAULT_COLORS: tuple[str, ...] = ("red", "blue", "green", "yellow", "purple", "gray")
SHAPES: tuple[str, ...] = ("cube", "sphere", "cylinder")
SIZES: tuple[str, ...] = ("small", "large")
MATERIALS: tuple[str, ...] = ("rubber", "metal")
# Half of an object's bounding box, as a fraction of the image side.
SIZE_HALF_EXTENT: dict[str, float] = {"small": 0.07, "large": 0.11}
BACKGROUND_RGB: tuple[int, int, int] = (236, 232, 224)
MIN_OBJECTS, MAX_OBJECTS = 2, 6
# Free space kept between two bounding boxes and between a box and the border.
_GAP = 0.02

_SHAPE_PLURAL = {"cube": "cubes", "sphere": "spheres", "cylinder": "cylinders"}
# Words the question grammar accepts for each shape; None means "any shape".
_NOUNS: dict[str, str | None] = {
    "object": None, "objects": None, "thing": None, "things": None,
    "cube": "cube", "cubes": "cube", "block": "cube", "blocks": "cube",
    "sphere": "sphere", "spheres": "sphere", "ball": "sphere", "balls": "sphere",
    "cylinder": "cylinder", "cylinders": "cylinder",
}


@dataclass(frozen=True)
class SceneObject:
    """One shape in a scene.

    Attributes:
        color: a key of ``COLOR_RGB``.
        shape: one of ``SHAPES``.
        size: one of ``SIZES``.
        x: centre, fraction of the image width (0 = left).
        y: centre, fraction of the image height (0 = top).
        material: ``"rubber"`` (matte) or ``"metal"`` (drawn with a highlight).
    """

    color: str
    shape: str
    size: str
    x: float
    y: float
    material: str = "rubber"

    def phrase(self, with_material: bool = False, with_size: bool = True) -> str:
        """Return e.g. ``"small red cube"`` (``"small red metal cube"`` with ``with_material``, ``"red cube"``
        without ``with_size``)."""
        words = ([self.size] if with_size else []) + [self.color] + ([self.material] if with_material else [])
        return " ".join(words + [self.shape])


@dataclass
class Scene:
    """A list of non-overlapping objects; see :class:`SceneObject`.

    Attributes:
        objects: the shapes.
        scale: every object's extent is ``SIZE_HALF_EXTENT[size] * scale``; above 1 makes the
            objects easier to see for a model with few image tokens.
    """

    objects: list[SceneObject] = field(default_factory=list)
    scale: float = 1.0

    def half_extent(self, obj: SceneObject) -> float:
        """Half of ``obj``'s bounding box in this scene, as a fraction of the image side."""
        return SIZE_HALF_EXTENT[obj.size] * self.scale

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON form: ``{"objects": [{"color", "shape", "size", "material", "position": [x, y]}]}``.

        ``"object_scale"`` is added only when ``scale`` is not 1, so default scenes keep their old form.
        """
        objs = []
        for o in self.objects:
            d = asdict(o)
            d["position"] = [d.pop("x"), d.pop("y")]
            objs.append(d)
        out: dict[str, Any] = {"objects": objs}
        if self.scale != 1.0:
            out["object_scale"] = self.scale
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Scene":
        """Inverse of :meth:`to_dict`.

        Raises:
            ValueError: if an object lacks a field or names an unknown colour/shape/size/material.
        """
        objects = []
        for i, d in enumerate(data.get("objects", [])):
            try:
                x, y = d["position"]
                obj = SceneObject(d["color"], d["shape"], d["size"], float(x), float(y), d.get("material", "rubber"))
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"scene object {i} is malformed ({exc!r}): {d!r}") from exc
            _check_object(obj, f"scene object {i}")
            objects.append(obj)
        scale = data.get("object_scale", 1.0)
        if not isinstance(scale, (int, float)) or scale <= 0:
            raise ValueError(f"scene key 'object_scale' must be a positive number, got {scale!r}")
        return cls(objects, float(scale))


def _check_object(obj: SceneObject, where: str) -> None:
    for value, allowed, name in (
        (obj.color, COLOR_RGB, "color"),
        (obj.shape, SHAPES, "shape"),
        (obj.size, SIZES, "size"),
        (obj.material, MATERIALS, "material"),
    ):
        if value not in allowed:
            raise ValueError(f"{where}: unknown {name} {value!r}; allowed: {sorted(allowed)}")


def _boxes_clear(a: SceneObject, b: SceneObject, scale: float = 1.0) -> bool:
    """True when the two bounding boxes (plus the gap) do not overlap on at least one axis."""
    reach = (SIZE_HALF_EXTENT[a.size] + SIZE_HALF_EXTENT[b.size]) * scale + _GAP
    return abs(a.x - b.x) >= reach or abs(a.y - b.y) >= reach


def sample_scene(
    rng: random.Random,
    colors: tuple[str, ...] = DEFAULT_COLORS,
    min_objects: int = MIN_OBJECTS,
    max_objects: int = MAX_OBJECTS,
    object_scale: float = 1.0,
) -> Scene:
    """Draw a random scene of ``min_objects``..``max_objects`` rubber objects whose boxes do not overlap.

    Args:
        rng: the only source of randomness, so a seed fixes the scene.
        colors: colour names to draw from (keys of ``COLOR_RGB``).
        min_objects: fewest objects (inclusive).
        max_objects: most objects (inclusive); six large objects still fit comfortably.
        object_scale: multiplies every object's extent (see :attr:`Scene.scale`); at 1.6 four large
            objects still fit, six may not (a scene that cannot be placed raises).

    Returns:
        A :class:`Scene`.

    Raises:
        ValueError: if the object counts are out of order, a colour is unknown, the scale is not
            positive, or 1000 tries found no room for the objects.
    """
    if not 1 <= min_objects <= max_objects:
        raise ValueError(f"need 1 <= min_objects <= max_objects, got {min_objects}, {max_objects}")
    if not 0 < object_scale <= 3:
        raise ValueError(f"object_scale must be in (0, 3], got {object_scale}")
    if not colors:
        raise ValueError("colors must name at least one colour")
    unknown = [c for c in colors if c not in COLOR_RGB]
    if unknown:
        raise ValueError(f"unknown colours {unknown}; allowed: {sorted(COLOR_RGB)}")
    n = rng.randint(min_objects, max_objects)
    for _restart in range(1000):  # a dead end (no room for the next object) restarts the scene
        placed: list[SceneObject] = []
        for _ in range(n):
            color, shape, size = rng.choice(colors), rng.choice(SHAPES), rng.choice(SIZES)
            lo = SIZE_HALF_EXTENT[size] * object_scale + _GAP
            for _attempt in range(200):
                cand = SceneObject(
                    color, shape, size, round(rng.uniform(lo, 1 - lo), 3), round(rng.uniform(lo, 1 - lo), 3)
                )
                if all(_boxes_clear(cand, o, object_scale) for o in placed):
                    placed.append(cand)
                    break
            else:
                break
        if len(placed) == n:
            return Scene(placed, object_scale)
    raise ValueError(f"no room for {n} objects at object_scale={object_scale}; lower it or max_objects")


def _shade(rgb: tuple[int, int, int], factor: float) -> tuple[int, int, int]:
    """Scale towards black (factor < 1) or white (factor > 1)."""
    if factor <= 1:
        return tuple(int(c * factor) for c in rgb)  # type: ignore[return-value]
    return tuple(int(c + (255 - c) * (factor - 1)) for c in rgb)  # type: ignore[return-value]


def render_scene(scene: Scene, size: int | tuple[int, int] = 112) -> Image.Image:
    """Draw a scene with Pillow (no anti-aliasing, so the pixels are exactly reproducible).

    Cubes are squares, spheres circles, cylinders a body with a lighter elliptic top; metal objects
    get a white highlight. Objects are drawn back to front (by ``y``) so the picture reads as a floor.

    Args:
        scene: what to draw.
        size: side in pixels, or ``(width, height)``.

    Returns:
        An RGB ``PIL.Image`` of the requested size.
    """
    width, height = (size, size) if isinstance(size, int) else size
    img = Image.new("RGB", (width, height), BACKGROUND_RGB)
    draw = ImageDraw.Draw(img)
    for obj in sorted(scene.objects, key=lambda o: o.y):
        cx, cy = obj.x * width, obj.y * height
        rx, ry = scene.half_extent(obj) * width, scene.half_extent(obj) * height
        box = [round(cx - rx), round(cy - ry), round(cx + rx), round(cy + ry)]
        fill, edge = COLOR_RGB[obj.color], _shade(COLOR_RGB[obj.color], 0.55)
        if obj.shape == "cube":
            draw.rectangle(box, fill=fill, outline=edge)
        elif obj.shape == "sphere":
            draw.ellipse(box, fill=fill, outline=edge)
        else:
            cap = max(1, round(ry * 0.45))  # height of the elliptic top and bottom
            x0, y0, x1, y1 = box
            draw.ellipse([x0, y1 - 2 * cap, x1, y1], fill=fill, outline=edge)
            draw.rectangle([x0, y0 + cap, x1, y1 - cap], fill=fill)
            draw.line([x0, y0 + cap, x0, y1 - cap], fill=edge)
            draw.line([x1, y0 + cap, x1, y1 - cap], fill=edge)
            draw.ellipse([x0, y0, x1, y0 + 2 * cap], fill=_shade(COLOR_RGB[obj.color], 1.35), outline=edge)
        if obj.material == "metal":
            hx, hy = max(1, round(rx * 0.25)), max(1, round(ry * 0.25))
            px, py = round(cx - rx * 0.35), round(cy - ry * 0.35)
            draw.ellipse([px - hx, py - hy, px + hx, py + hy], fill=(255, 255, 255))
    return img


# ---------------------------------------------------------------- questions


@dataclass(frozen=True)
class ObjectFilter:
    """Selects objects by any subset of size, colour, material and shape (None = any)."""

    size: str | None = None
    color: str | None = None
    material: str | None = None
    shape: str | None = None

    def matches(self, obj: SceneObject) -> bool:
        """True when every attribute that is set equals the object's."""
        return all(
            want is None or want == have
            for want, have in (
                (self.size, obj.size),
                (self.color, obj.color),
                (self.material, obj.material),
                (self.shape, obj.shape),
            )
        )

    def text(self) -> str:
        """Plural noun phrase, e.g. ``"small red cubes"`` or ``"objects"``."""
        noun = _SHAPE_PLURAL[self.shape] if self.shape else "objects"
        return " ".join(w for w in (self.size, self.color, self.material, noun) if w)


@dataclass(frozen=True)
class Query:
    """A parsed question: remove ``subtract`` filters in order, then count ``count`` (None: all left)."""

    subtract: tuple[ObjectFilter, ...]
    count: ObjectFilter | None

    def text(self) -> str:
        """The question in the grammar of the module docstring."""
        parts = [f"Subtract all {f.text()}." for f in self.subtract]
        if self.count is None:
            parts.append("How many objects are left?")
        else:
            parts.append(f"How many {self.count.text()} are there?")
        return " ".join(parts)

    def evaluate(self, scene: Scene) -> int:
        """Number of objects counted after the subtractions."""
        left = [o for o in scene.objects if not any(f.matches(o) for f in self.subtract)]
        target = self.count or ObjectFilter()
        return sum(target.matches(o) for o in left)


def _parse_filter(phrase: str, question: str) -> ObjectFilter:
    words = phrase.lower().split()
    if not words or words[-1] not in _NOUNS:
        raise ValueError(f"cannot parse {phrase!r} in question {question!r}: expected a noun from {sorted(_NOUNS)}")
    attrs: dict[str, str] = {}
    for w in words[:-1]:
        for key, vocab in (("size", SIZES), ("color", COLOR_RGB), ("material", MATERIALS)):
            if w in vocab:
                if key in attrs:
                    raise ValueError(f"two {key}s in {phrase!r} of question {question!r}")
                attrs[key] = w
                break
        else:
            raise ValueError(f"unknown word {w!r} in {phrase!r} of question {question!r}")
    return ObjectFilter(shape=_NOUNS[words[-1]], **attrs)


_SUBTRACT = re.compile(r"subtract all ([a-z ]+?)\.\s*", re.IGNORECASE)
_LEFT = re.compile(r"how many objects are left\?", re.IGNORECASE)
_COUNT = re.compile(r"how many ([a-z ]+?) are there\?", re.IGNORECASE)


def parse_question(question: str) -> Query:
    """Parse a question of the module's grammar (a leading ``<image>`` tag is ignored).

    Raises:
        ValueError: naming the question, if it does not follow the grammar.
    """
    rest = question.replace("<image>", "").strip()
    subtract = []
    while (m := _SUBTRACT.match(rest)) is not None:
        subtract.append(_parse_filter(m.group(1), question))
        rest = rest[m.end():]
    if _LEFT.fullmatch(rest):
        return Query(tuple(subtract), None)
    if (m := _COUNT.fullmatch(rest)) is not None:
        return Query(tuple(subtract), _parse_filter(m.group(1), question))
    raise ValueError(f"question {question!r} does not follow the scene question grammar")


def answer_question(scene: Scene, question: str) -> str:
    """Work the answer out from the question text alone (used to check generated answers).

    Returns:
        The integer answer as a string, e.g. ``"3"``.

    Raises:
        ValueError: if the question does not parse.
    """
    return str(parse_question(question).evaluate(scene))


CATEGORIES: tuple[str, ...] = (
    "count_all",
    "count_color",
    "count_shape",
    "count_size_shape",
    "subtract_color_shape",
    "subtract_size_shape",
    "subtract_two",
)


def make_question(scene: Scene, rng: random.Random) -> tuple[str, str, str]:
    """Pick a question template and fill it from an object that is in the scene.

    Filling from a present object keeps most answers non-zero, so a model has to look.

    Args:
        scene: the scene the question is about (at least one object).
        rng: source of randomness.

    Returns:
        ``(question, answer, category)``; the answer is an integer string, the category one of
        ``CATEGORIES``.
    """
    category = rng.choice(CATEGORIES)
    a, b = rng.choice(scene.objects), rng.choice(scene.objects)
    subtract: tuple[ObjectFilter, ...] = ()
    count: ObjectFilter | None = None
    if category == "count_all":
        count = ObjectFilter()
    elif category == "count_color":
        count = ObjectFilter(color=a.color)
    elif category == "count_shape":
        count = ObjectFilter(shape=a.shape)
    elif category == "count_size_shape":
        count = ObjectFilter(size=a.size, shape=a.shape)
    elif category == "subtract_color_shape":
        subtract = (ObjectFilter(color=a.color, shape=a.shape),)
    elif category == "subtract_size_shape":
        subtract = (ObjectFilter(size=a.size, shape=a.shape),)
    else:
        subtract = (ObjectFilter(color=a.color), ObjectFilter(size=b.size, shape=b.shape))
    query = Query(subtract, count)
    return query.text(), str(query.evaluate(scene)), category


# ---------------------------------------------------------------- descriptions and responses


def _left_to_right(objs: list[SceneObject]) -> list[SceneObject]:
    return sorted(objs, key=lambda o: (o.x, o.y))


_NUMBER_WORDS = ("no", "a", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def _count_noun(n: int, singular: str) -> str:
    """``"1 object"``, ``"3 objects"``."""
    return f"{n} {singular}" if n == 1 else f"{n} {singular}s"


def _group(objs: list[SceneObject], with_size: bool = True) -> str:
    """Name a list of objects, merging identical ones: ``"two small red cubes and a large blue sphere"``.

    Groups keep the left-to-right order of their first member; the material is named only for
    metal objects, rubber being the plain, matte default. Without ``with_size`` the sizes are left out
    (and objects that differ only in size merge).
    """
    counts: dict[str, int] = {}
    for o in _left_to_right(objs):
        phrase = o.phrase(with_material=o.material == "metal", with_size=with_size)
        counts[phrase] = counts.get(phrase, 0) + 1
    parts = []
    for phrase, n in counts.items():
        # Every phrase starts with a size or a colour, none of them with a vowel sound, so "a" is right.
        number = _NUMBER_WORDS[n] if n < len(_NUMBER_WORDS) else str(n)
        parts.append(f"{number} {phrase}" + ("s" if n > 1 else ""))
    if not parts:
        return "nothing"
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + f" and {parts[-1]}"


def describe_scene(scene: Scene, with_size: bool = True) -> str:
    """One sentence naming every object by size, colour ([material,]) and shape, left to right.

    ``with_size=False`` leaves the sizes out: the incomplete description of a careless teacher.
    """
    count = _count_noun(len(scene.objects), "object")
    return f"The image shows {count} on a plain background: {_group(scene.objects, with_size)}."


def scene_keywords(scene: Scene) -> list[str]:
    """Colours, shapes and sizes a faithful description must mention ("metal" too if present).

    Returns:
        Lower-case, deduplicated words in left-to-right order of first appearance.
    """
    words: list[str] = []
    for o in _left_to_right(scene.objects):
        for w in (o.color, o.shape, o.size) + (("metal",) if o.material == "metal" else ()):
            if w not in words:
                words.append(w)
    return words


def pebr_response(scene: Scene, question: str, answer: str, with_size: bool = True) -> str:
    """A response in the PeBR format: description, rationale, numbered steps, final answer.

    With the question's own answer and ``with_size`` it is the ideal response. The synthetic warm-up
    data also writes flawed ones (``scripts/make_synthetic_data.py``): another number on the last line
    than the steps reach, or objects named without their sizes.

    Args:
        scene: the scene the image shows.
        question: a question of the module grammar.
        answer: the answer to state on the last line.
        with_size: name every object's size; without it, sizes appear only where the question
            itself names one.

    Returns:
        Text with the headers ``### Image Description:``, ``### Rationales:``,
        ``### Let's think step by step.``, ``### Step k:`` and ``### The final answer is:``.

    Raises:
        ValueError: if the question does not parse.
    """
    query = parse_question(question)
    left = list(scene.objects)
    steps = [f"There are {_count_noun(len(left), 'object')} in the image: {_group(left, with_size)}."]
    for f in query.subtract:
        gone = [o for o in left if f.matches(o)]
        left = [o for o in left if not f.matches(o)]
        if gone:
            steps.append(f"Removing the {f.text()} ({_group(gone, with_size)}) leaves {_count_noun(len(left), 'object')}.")
        else:  # "no small cubes" was false of a small green cube that an earlier step removed
            still = " left" if any(f.matches(o) for o in scene.objects) else ""
            steps.append(f"There are no {f.text()}{still}, so {_count_noun(len(left), 'object')} "
                         f"{'remains' if len(left) == 1 else 'remain'}.")
    if query.count is None:
        steps.append(f"So {_count_noun(len(left), 'object')} {'is' if len(left) == 1 else 'are'} left.")
        goal = "how many objects remain after removing the named groups"
    else:
        hits = [o for o in left if query.count.matches(o)]
        if query.count == ObjectFilter():
            steps.append(f"Counting them gives {len(hits)}.")
        else:
            found = _group(hits, with_size) if hits else "none of them"
            steps.append(f"Among these, the {query.count.text()} are: {found}. That makes {len(hits)}.")
        goal = f"how many {query.count.text()} there are"
    body = "\n".join(f"### Step {i}: {s}" for i, s in enumerate(steps, start=1))
    return (
        f"### Image Description:\n{describe_scene(scene, with_size)}\n"
        f"### Rationales:\nThe question asks {goal}. I identify each object by its size, colour and shape, "
        "apply the question's conditions in order, and count what is left.\n"
        f"### Let's think step by step.\n{body}\n"
        f"### The final answer is: {answer}"
    )
