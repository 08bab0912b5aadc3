"""Synthetic scenes: a few coloured shapes on a varied background, and captions that describe them.

The library behind ``python -m preprocess synth`` (see ``preprocess.synth``), also used by
finetune to build task datasets. A ``Scene`` is plain data; ``sample_scene`` draws one from a
numpy ``Generator``, ``render`` turns it into an image (a pure function: noise comes from a seed
stored in the scene), ``describe`` writes a caption naming every object's colour and shape,
usually its size and position, in varied wording so a model has to read it.

Boxes are the exact pixel extent of the drawn shapes (``render`` draws each shape to touch all
four sides of its box), objects never overlap, and backgrounds are desaturated colours kept far
from every object colour, so boxes and colours stay meaningful for a detector.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SYNTH_CLASS_NAMES = ("circle", "square", "triangle", "cross", "star")
# Saturated object colours; backgrounds are kept desaturated (see _sample_background), so no
# background pixel is ever close to an object colour.
COLOURS = {
    "red": (215, 25, 30),
    "orange": (245, 135, 15),
    "yellow": (240, 215, 20),
    "green": (35, 160, 50),
    "blue": (30, 80, 220),
    "purple": (135, 45, 180),
}
SIZES = ("small", "medium", "large")
# Object extent (box side) as a fraction of the image's shorter side.
SIZE_FRACTIONS = {"small": (0.16, 0.22), "medium": (0.28, 0.35), "large": (0.42, 0.50)}
SPLITS = ("train", "heldout")
# Each colour held out once; every shape keeps at least three training colours.
HELDOUT_PAIRS = frozenset(
    {
        ("red", "star"),
        ("orange", "circle"),
        ("yellow", "cross"),
        ("green", "triangle"),
        ("blue", "square"),
        ("purple", "circle"),
    }
)
ALL_PAIRS = tuple((c, s) for c in COLOURS for s in SYNTH_CLASS_NAMES)
TRAIN_PAIRS = tuple(p for p in ALL_PAIRS if p not in HELDOUT_PAIRS)

# Words a caption may use for each attribute (the first is the canonical name).
COLOUR_WORDS = {c: (c,) for c in COLOURS} | {"purple": ("purple", "violet")}
SHAPE_WORDS = {
    "circle": ("circle", "disc"),
    "square": ("square",),
    "triangle": ("triangle",),
    "cross": ("cross", "plus sign"),
    "star": ("star",),
}
SIZE_WORDS = {
    "small": ("small", "little", "tiny"),
    "medium": ("medium", "medium-sized", "mid-sized"),
    "large": ("large", "big"),
}

_OBJECT_COUNT_WEIGHTS = np.array([0.3, 0.35, 0.2, 0.15])  # 1..4 objects
_BORDER = 2  # pixels kept free around the image edge and between objects
# Background colours keep this L1 RGB distance from every object colour; noise moves a pixel by
# at most 3 * _NOISE_CLIP, so even noisy pixels stay _MIN_BACKGROUND_DISTANCE - 72 = 78 away.
_MIN_BACKGROUND_DISTANCE = 150
_NOISE_STD, _NOISE_CLIP = 12.0, 24.0


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    box: tuple[int, int, int, int]  # x1, y1, x2, y2 in pixels; the shape covers columns x1..x2-1

    @property
    def label(self) -> int:
        return SYNTH_CLASS_NAMES.index(self.shape)

    @property
    def centre(self) -> tuple[float, float]:
        x1, y1, x2, y2 = self.box
        return (x1 + x2) / 2, (y1 + y2) / 2


@dataclass(frozen=True)
class Background:
    kind: str  # "solid", "gradient" or "noise"
    colours: tuple[tuple[int, int, int], ...]  # one colour, or two for a gradient
    direction: str = ""  # gradient only: "horizontal", "vertical" or "diagonal"
    noise_seed: int = 0  # noise only: makes render() a pure function of the scene

    @property
    def tone(self) -> str:
        return "light" if np.mean(self.colours) > 140 else "dark"


@dataclass(frozen=True)
class Scene:
    width: int
    height: int
    background: Background
    objects: tuple[SceneObject, ...]


def sample_scene(
    rng: np.random.Generator, split: str = "train", image_size: tuple[int, int] = (96, 192)
) -> Scene:
    """A random scene of 1-4 non-overlapping shapes; ``heldout`` scenes hold at least one held-out pair."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    width, height = _sample_image_size(rng, *image_size)
    count = int(rng.choice(len(_OBJECT_COUNT_WEIGHTS), p=_OBJECT_COUNT_WEIGHTS)) + 1
    pairs = _sample_pairs(rng, split, count)
    objects: list[SceneObject] = []
    for colour, shape in pairs:
        placed = _place_object(rng, width, height, [o.box for o in objects], str(rng.choice(SIZES)))
        if placed is None:
            break  # the image is full; keep the objects placed so far (the first always fits)
        size, box = placed
        objects.append(SceneObject(shape=shape, colour=colour, size=size, box=box))
    return Scene(width=width, height=height, background=_sample_background(rng), objects=tuple(objects))


def _sample_image_size(rng: np.random.Generator, low: int, high: int) -> tuple[int, int]:
    while True:
        width, height = (int(v) for v in rng.integers(low, high + 1, size=2))
        if width != height or low == high:  # non-square whenever the range allows it
            return width, height


def _sample_pairs(rng: np.random.Generator, split: str, count: int) -> list[tuple[str, str]]:
    """Distinct (colour, shape) pairs, so every object in a scene can be named unambiguously."""
    pool = list(TRAIN_PAIRS)
    chosen: list[tuple[str, str]] = []
    if split == "heldout":
        held = sorted(HELDOUT_PAIRS)
        chosen.append(held[int(rng.integers(len(held)))])
        pool = [p for p in ALL_PAIRS if p != chosen[0]]
    picks = rng.choice(len(pool), size=count - len(chosen), replace=False)
    chosen.extend(pool[int(i)] for i in picks)
    return chosen


def _place_object(
    rng: np.random.Generator, width: int, height: int, taken: list[tuple], size: str, attempts: int = 40
) -> tuple[str, tuple[int, int, int, int]] | None:
    """A box for a new object that keeps ``_BORDER`` pixels from the edges and from every taken box.

    Falls back to smaller sizes when the requested one does not fit; None when nothing fits.
    """
    for size in SIZES[: SIZES.index(size) + 1][::-1]:
        low, high = SIZE_FRACTIONS[size]
        for _ in range(attempts):
            side = max(8, int(round(rng.uniform(low, high) * min(width, height))))
            if side + 2 * _BORDER > min(width, height):
                continue
            x1 = int(rng.integers(_BORDER, width - _BORDER - side + 1))
            y1 = int(rng.integers(_BORDER, height - _BORDER - side + 1))
            box = (x1, y1, x1 + side, y1 + side)
            if all(_apart(box, other) for other in taken):
                return size, box
    return None


def _apart(a: tuple, b: tuple) -> bool:
    return (
        a[2] + _BORDER <= b[0] or b[2] + _BORDER <= a[0] or a[3] + _BORDER <= b[1] or b[3] + _BORDER <= a[1]
    )


def _sample_background(rng: np.random.Generator) -> Background:
    kind = str(rng.choice(["solid", "gradient", "noise"]))
    while True:
        colours = tuple(_muted_colour(rng) for _ in range(2 if kind == "gradient" else 1))
        # L1 distance to the palette is convex along a gradient, so check its inside too.
        ramp = np.linspace(0.0, 1.0, 11)[:, None] * (np.subtract(colours[-1], colours[0]))[None] + colours[0]
        if _palette_distance(ramp).min() >= _MIN_BACKGROUND_DISTANCE:
            break
    if kind == "gradient":
        return Background(kind, colours, direction=str(rng.choice(["horizontal", "vertical", "diagonal"])))
    if kind == "noise":
        return Background(kind, colours, noise_seed=int(rng.integers(2**31)))
    return Background(kind, colours)


def _muted_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    # Saturation <= 0.2: greys, beiges, slate tones, away from the saturated object colours.
    rgb = colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.0, 0.2), rng.uniform(0.3, 0.95))
    return tuple(int(round(255 * v)) for v in rgb)


def _palette_distance(pixels: np.ndarray) -> np.ndarray:
    """L1 RGB distance from each pixel (``[..., 3]``) to the nearest object colour."""
    palette = np.array(list(COLOURS.values()), dtype=np.float32)
    return np.abs(np.asarray(pixels, dtype=np.float32)[..., None, :] - palette).sum(-1).min(-1)


# ---------------------------------------------------------------- rendering


def _unit_polygon(shape: str) -> list[tuple[float, float]] | None:
    """Vertices in [-1, 1]^2 touching all four sides of the square (so the box is tight)."""
    if shape == "triangle":
        return [(0.0, -1.0), (1.0, 1.0), (-1.0, 1.0)]
    if shape == "cross":
        t = 0.3  # half the arm thickness
        return [
            (-t, -1),
            (t, -1),
            (t, -t),
            (1, -t),
            (1, t),
            (t, t),
            (t, 1),
            (-t, 1),
            (-t, t),
            (-1, t),
            (-1, -t),
            (-t, -t),
        ]
    if shape == "star":
        angles = -np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.5)
        xs, ys = radii * np.cos(angles), radii * np.sin(angles)
        xs = 2 * (xs - xs.min()) / (xs.max() - xs.min()) - 1
        ys = 2 * (ys - ys.min()) / (ys.max() - ys.min()) - 1
        return list(zip(xs.tolist(), ys.tolist()))
    return None  # circle and square are drawn with their own primitives


def render(scene: Scene) -> Image.Image:
    """The scene as an RGB image; a pure function of the scene (noise comes from its seed)."""
    image = Image.fromarray(_render_background(scene.background, scene.width, scene.height), "RGB")
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        fill = COLOURS[obj.colour]
        x1, y1, x2, y2 = obj.box
        last_x, last_y = x2 - 1, y2 - 1  # PIL's coordinates are inclusive pixel indices
        if obj.shape == "circle":
            draw.ellipse((x1, y1, last_x, last_y), fill=fill)
        elif obj.shape == "square":
            draw.rectangle((x1, y1, last_x, last_y), fill=fill)
        else:
            points = [
                (round(x1 + (u + 1) / 2 * (last_x - x1)), round(y1 + (v + 1) / 2 * (last_y - y1)))
                for u, v in _unit_polygon(obj.shape)
            ]
            draw.polygon(points, fill=fill)
    return image


def _render_background(background: Background, width: int, height: int) -> np.ndarray:
    first = np.array(background.colours[0], dtype=np.float32)
    if background.kind == "gradient":
        second = np.array(background.colours[1], dtype=np.float32)
        ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
        t = {
            "horizontal": xs / max(width - 1, 1),
            "vertical": ys / max(height - 1, 1),
            "diagonal": (xs / max(width - 1, 1) + ys / max(height - 1, 1)) / 2,
        }[background.direction]
        pixels = first + t[..., None] * (second - first)
    else:
        pixels = np.broadcast_to(first, (height, width, 3))
        if background.kind == "noise":
            noise = np.random.default_rng(background.noise_seed).normal(
                0.0, _NOISE_STD, size=(height, width, 3)
            )
            pixels = pixels + np.clip(noise, -_NOISE_CLIP, _NOISE_CLIP)
    return np.clip(np.round(pixels), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- captions

_NUMBER_WORDS = {2: "two", 3: "three", 4: "four"}


def describe(scene: Scene, rng: np.random.Generator) -> str:
    """A caption naming every object's colour and shape, usually size and position, in varied wording."""
    objects = [scene.objects[int(i)] for i in rng.permutation(len(scene.objects))]
    names = [with_article(noun_phrase(obj, rng)) for obj in objects]
    if len(objects) == 1:
        where = _location(objects[0], scene, rng)
        template = int(rng.integers(5))
        caption = [
            f"{names[0]} {where}",
            f"there is {names[0]} {where}",
            f"a picture of {names[0]}",
            f"a single {noun_phrase(objects[0], rng)} {where}",
            f"{names[0]} on its own {where}",
        ][template]
    elif len(objects) == 2:
        a, b = objects
        relation = _relation(a, b, rng)
        short_a, short_b = _short_name(a, scene), _short_name(b, scene)
        caption = [
            f"{names[0]} {relation} {names[1]}",
            f"there is {names[0]} {relation} {names[1]}",
            f"two objects: {names[0]} and {names[1]}",
            f"{names[0]} and {names[1]}, the {short_a} is {relation} the {short_b}",
        ][int(rng.integers(4))]
    else:
        listing = ", ".join(names[:-1]) + " and " + names[-1]
        count = _NUMBER_WORDS[len(objects)]
        a, b = objects[0], objects[1]
        caption = [
            f"{count} shapes: {listing}",
            f"there are {count} objects: {listing}",
            f"{listing}",
            f"{listing}; the {_short_name(a, scene)} is {_relation(a, b, rng)} the {_short_name(b, scene)}",
        ][int(rng.integers(4))]
    if rng.uniform() < 0.25:
        caption += f" on a {scene.background.tone} {_background_word(scene.background, rng)} background"
    return caption


def noun_phrase(obj: SceneObject, rng: np.random.Generator) -> str:
    """E.g. "large red circle" or "violet star": colour and shape always, size 80% of the time."""
    words = [_pick(COLOUR_WORDS[obj.colour], rng), _pick(SHAPE_WORDS[obj.shape], rng)]
    if rng.uniform() < 0.8:
        words.insert(0, _pick(SIZE_WORDS[obj.size], rng))
    return " ".join(words)


def _short_name(obj: SceneObject, scene: Scene) -> str:
    """The shape alone when no other object has it, else colour and shape (pairs are unique)."""
    if sum(o.shape == obj.shape for o in scene.objects) == 1:
        return obj.shape
    return f"{obj.colour} {obj.shape}"


def with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _pick(options: tuple[str, ...], rng: np.random.Generator) -> str:
    return options[int(rng.integers(len(options)))]


def _relation(a: SceneObject, b: SceneObject, rng: np.random.Generator) -> str:
    """Where ``a`` is relative to ``b``, along the axis where they are further apart."""
    (ax, ay), (bx, by) = a.centre, b.centre
    if abs(ax - bx) >= abs(ay - by):
        options = ("to the left of", "left of") if ax < bx else ("to the right of", "right of")
    else:
        options = ("above", "over") if ay < by else ("below", "under", "beneath")
    return _pick(options, rng)


def _location(obj: SceneObject, scene: Scene, rng: np.random.Generator) -> str:
    x, y = obj.centre
    column = ("left", "", "right")[min(2, int(3 * x / scene.width))]
    row = ("top", "", "bottom")[min(2, int(3 * y / scene.height))]
    if row and column:
        return _pick((f"in the {row} {column} corner", f"at the {row} {column}"), rng)
    if row:
        return _pick((f"at the {row}", f"near the {row} of the image"), rng)
    if column:
        return _pick((f"on the {column}", f"on the {column} side"), rng)
    return _pick(("in the centre", "in the middle"), rng)


def _background_word(background: Background, rng: np.random.Generator) -> str:
    return {"solid": ("plain", "solid"), "gradient": ("gradient", "shaded"), "noise": ("noisy", "grainy")}[
        background.kind
    ][int(rng.integers(2))]
