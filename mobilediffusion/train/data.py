"""Synthetic captioned scenes: one coloured shape, or two in a relation, on a plain background, made from a seed.

Every image is drawn procedurally (nothing is downloaded or stored); item `i` of a split is a
pure function of (config, split, i), so any worker process gets the same item. A held-out set
of (colour, shape, position) combinations never appears in training, while every single colour,
shape and position does, so prompt following can be measured on unseen compositions. With
`relations` and `pair_fraction`, a share of the items shows two objects of different colours in
the outer cells of the middle row or column, captioned by their relation ("a red circle left of a blue square");
held out there are (colour, shape, relation, colour, shape) combinations.

    cfg = SceneConfig()                                  # 64x64, 7 colours, 4 shapes, 3x3 grid, one object
    train = SyntheticScenes(cfg, "train", length=10_000)
    image, caption, scene = train[0]                     # uint8 (64, 64, 3), str, Scene
    x = to_model_range(image)                            # float32 (3, 64, 64) in [-1, 1]

numpy and PIL only; torch is never imported here (a DataLoader takes `TrainingPairs` as is).
"""
from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw

from ..errors import ConfigError

# Object colours (sRGB), chosen far apart in RGB (closest pair: orange-yellow, ~95).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (245, 215, 25),
    "purple": (140, 50, 190),
    "orange": (245, 120, 15),
    "cyan": (20, 190, 210),
    "pink": (240, 120, 190),
}
# Background colours; disjoint from COLOURS so a caption's colour words are unambiguous.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
}
# Shapes as drawn inside a unit bounding box (x right, y down); all fill their box edge to edge.
SHAPES = ("circle", "square", "triangle", "cross", "diamond")
# Grid cells: name -> anchor (x, y) as a fraction of the image side.
POSITIONS: dict[str, tuple[float, float]] = {
    f"{v} {h}".strip() or "center": ((1 + 2 * j) / 6, (1 + 2 * i) / 6)
    for i, v in enumerate(("top", "", "bottom"))
    for j, h in enumerate(("left", "", "right"))
}
# Phrase used in a sentence for each position ("a red circle <phrase>").
_POSITION_PHRASES = {
    "top left": "in the top left", "top": "at the top", "top right": "in the top right",
    "left": "on the left", "center": "in the center", "right": "on the right",
    "bottom left": "in the bottom left", "bottom": "at the bottom", "bottom right": "in the bottom right",
}
CAPTION_STYLES = (
    "a {colour} {shape} {where} on a {background} background",
    "{colour} {shape}, {position}, {background} background",
    "a {background} background with a {colour} {shape} {where}",
)
# Two objects: "<first> <relation> <second>"; the caption style index picks the same sentence form.
PAIR_STYLES = (
    "a {colour} {shape} {relation} a {colour2} {shape2} on a {background} background",
    "{colour} {shape} {relation} {colour2} {shape2}, {background} background",
    "a {background} background with a {colour} {shape} {relation} a {colour2} {shape2}",
)
# Relation of the first object to the second: (axis: 0 = x, 1 = y; sign of first - second along it).
RELATIONS: dict[str, tuple[int, int]] = {"left of": (0, -1), "right of": (0, 1), "above": (1, -1), "below": (1, 1)}
SPLITS = ("train", "heldout")


@dataclass(frozen=True)
class SceneConfig:
    """What the synthetic set contains and how it is drawn. Geometry is in fractions of the side."""

    resolution: int = 64  # image side in pixels (square images)
    colours: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange", "cyan")  # keys of COLOURS
    shapes: tuple[str, ...] = ("circle", "square", "triangle", "cross")  # subset of SHAPES
    positions: tuple[str, ...] = tuple(POSITIONS)  # subset of the 3x3 grid names
    backgrounds: tuple[str, ...] = ("white",)  # keys of BACKGROUNDS; the first is the default
    size: float = 0.22  # side of the shape's bounding box
    size_jitter: float = 0.1  # relative: the side varies uniformly in size * [1 - j, 1 + j]
    jitter: float = 0.03  # the box centre moves uniformly by up to this much on each axis
    seed: int = 0  # drives the held-out choice and every item's jitter, background and caption style
    heldout_fraction: float = 0.125  # share of (colour, shape, position) combinations kept out of training
    caption_styles: tuple[int, ...] = (0, 1, 2)  # indices into CAPTION_STYLES used by the dataset
    supersample: int = 4  # draw at this multiple and box-downsample (anti-aliasing)
    relations: tuple[str, ...] = ()  # keys of RELATIONS that two-object items use
    pair_fraction: float = 0.0  # share of items showing two objects in a relation (needs `relations`)

    def __post_init__(self):
        for name, vocab in (("colours", COLOURS), ("shapes", SHAPES), ("positions", POSITIONS),
                            ("backgrounds", BACKGROUNDS)):
            values = getattr(self, name)
            unknown = [v for v in values if v not in vocab]
            if unknown or not values or len(set(values)) != len(values):
                raise ConfigError(f"SceneConfig.{name} must be distinct names from {list(vocab)}, got {values!r}")
        if self.resolution < 32:
            raise ConfigError(f"SceneConfig.resolution must be at least 32 pixels, got {self.resolution}")
        reach = 0.5 * self.size * (1 + self.size_jitter) + self.jitter  # furthest edge from a cell anchor
        if not (0 < self.size and 0 <= self.size_jitter < 1 and 0 <= self.jitter and reach <= 1 / 6 - 0.005):
            raise ConfigError(
                f"a shape must stay inside its grid cell: size * (1 + size_jitter) / 2 + jitter must be "
                f"<= 0.16, got {reach:.3f}; lower size, size_jitter or jitter")
        if not 0 <= self.heldout_fraction <= 0.5:
            raise ConfigError(f"SceneConfig.heldout_fraction must be in [0, 0.5], got {self.heldout_fraction}")
        if not self.caption_styles or any(s not in range(len(CAPTION_STYLES)) for s in self.caption_styles):
            raise ConfigError(f"SceneConfig.caption_styles must index CAPTION_STYLES (0..{len(CAPTION_STYLES) - 1})"
                              f", got {self.caption_styles!r}")
        if self.supersample < 1:
            raise ConfigError(f"SceneConfig.supersample must be >= 1, got {self.supersample}")
        unknown = [r for r in self.relations if r not in RELATIONS]
        if unknown or len(set(self.relations)) != len(self.relations):
            raise ConfigError(f"SceneConfig.relations must be distinct names from {list(RELATIONS)}, "
                              f"got {self.relations!r}")
        if not 0 <= self.pair_fraction <= 1:
            raise ConfigError(f"SceneConfig.pair_fraction must be in [0, 1], got {self.pair_fraction}")
        if self.pair_fraction > 0 and (not self.relations or len(self.colours) < 2
                                       or set(self.positions) != set(POSITIONS)):
            raise ConfigError("two-object scenes (pair_fraction > 0) need relations, at least 2 colours and the "
                              "whole 3x3 grid of positions")


@dataclass(frozen=True)
class Scene:
    """What an image shows: one `colour` `shape` in grid cell `position` on `background`; with `relation`, a second
    object (`colour2` `shape2` in cell `position2`) that the first stands in that relation to. A parsed two-object
    caption names no cells (positions None)."""

    colour: str
    shape: str
    position: str | None
    background: str = "white"
    relation: str | None = None
    colour2: str | None = None
    shape2: str | None = None
    position2: str | None = None

    @property
    def is_pair(self) -> bool:
        return self.relation is not None

    @property
    def combo(self) -> tuple[str, ...]:
        """What the held-out split is defined over: (colour, shape, position), or for two objects
        (colour, shape, relation, colour2, shape2)."""
        if self.is_pair:
            return (self.colour, self.shape, self.relation, self.colour2, self.shape2)
        return (self.colour, self.shape, self.position)

    @property
    def objects(self) -> list[tuple[str, str, str | None]]:
        """(colour, shape, position) of each object, the first first."""
        first = [(self.colour, self.shape, self.position)]
        return first + [(self.colour2, self.shape2, self.position2)] if self.is_pair else first

    def caption(self, style: int = 0) -> str:
        """English caption; style 0: 'a red circle in the top left on a white background' or
        'a red circle left of a blue square on a white background'."""
        if self.is_pair:
            return PAIR_STYLES[style].format(colour=self.colour, shape=self.shape, relation=self.relation,
                                             colour2=self.colour2, shape2=self.shape2, background=self.background)
        return CAPTION_STYLES[style].format(
            colour=self.colour, shape=self.shape, position=self.position,
            where=_POSITION_PHRASES[self.position], background=self.background)


def place_pair(relation: str) -> tuple[str, str]:
    """Grid cells (first, second) of two objects in `relation`: the outer cells of the middle row (left of / right
    of) or of the middle column (above / below), in the order the relation says. One layout per relation, so the
    caption decides where everything goes, as a position word does for one object."""
    axis, sign = RELATIONS[relation]
    a, b = ("left", "right") if axis == 0 else ("top", "bottom")
    return (b, a) if sign > 0 else (a, b)


class Sample(NamedTuple):
    image: np.ndarray  # uint8 (H, W, 3)
    caption: str
    scene: Scene


# --------------------------------------------------------------------------- drawing
def shape_outline(shape: str, box: tuple[float, float, float, float]) -> list[tuple[float, float]] | None:
    """Polygon vertices of `shape` filling `box` = (x0, y0, x1, y1); None for the circle (an ellipse)."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    if shape == "circle":
        return None
    if shape == "square":
        unit = [(0, 0), (1, 0), (1, 1), (0, 1)]
    elif shape == "triangle":  # pointing up, as tall as wide
        unit = [(0.5, 0), (1, 1), (0, 1)]
    elif shape == "diamond":
        unit = [(0.5, 0), (1, 0.5), (0.5, 1), (0, 0.5)]
    elif shape == "cross":  # a plus sign, arms a third of the side wide
        a, b = 1 / 3, 2 / 3
        unit = [(a, 0), (b, 0), (b, a), (1, a), (1, b), (b, b), (b, 1), (a, 1), (a, b), (0, b), (0, a), (a, a)]
    else:
        raise ConfigError(f"unknown shape {shape!r}; expected one of {', '.join(SHAPES)}")
    return [(x0 + u * w, y0 + v * h) for u, v in unit]


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box, fill) -> None:
    """Draw a filled `shape` into `box` = (x0, y0, x1, y1), corners inclusive, in pixel units."""
    outline = shape_outline(shape, box)
    if outline is None:
        draw.ellipse(box, fill=fill)
    else:
        draw.polygon(outline, fill=fill)


def render(scene: Scene, cfg: SceneConfig, rng: np.random.Generator | None = None) -> np.ndarray:
    """The image of `scene`: uint8 (H, W, 3), H = W = cfg.resolution.

    With `rng`, the size and centre are jittered as `cfg` says; without, the shape sits at its
    nominal size on its cell anchor. Drawn at cfg.supersample times the size, then box-averaged.
    """
    _check_scene(scene, cfg)
    side = cfg.resolution * cfg.supersample
    image = Image.new("RGB", (side, side), BACKGROUNDS[scene.background])
    for colour, shape, position in scene.objects:
        size, (cx, cy) = cfg.size, POSITIONS[position]
        if rng is not None:
            size *= 1 + rng.uniform(-cfg.size_jitter, cfg.size_jitter)
            cx, cy = cx + rng.uniform(-cfg.jitter, cfg.jitter), cy + rng.uniform(-cfg.jitter, cfg.jitter)
        half = 0.5 * size * side
        # PIL's box corners are inclusive pixel indices, hence the -1 on the far side
        box = (cx * side - half, cy * side - half, cx * side + half - 1, cy * side + half - 1)
        draw_shape(ImageDraw.Draw(image), shape, box, COLOURS[colour])
    if cfg.supersample > 1:
        image = image.reduce(cfg.supersample)  # box filter: exact area coverage
    return np.asarray(image, dtype=np.uint8)


def to_model_range(image: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) -> float32 (3, H, W) in [-1, 1], the layout and range a UNet trains on."""
    return (image.astype(np.float32).transpose(2, 0, 1) / 127.5) - 1.0  # (3, H, W)


def from_model_range(x: np.ndarray) -> np.ndarray:
    """float (3, H, W) or (B, 3, H, W) in [-1, 1] -> uint8 (H, W, 3) or (B, H, W, 3); values are clipped."""
    x = np.moveaxis(np.asarray(x, dtype=np.float32), -3, -1)  # (..., H, W, 3)
    return np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- splits
def split(cfg: SceneConfig) -> tuple[list[tuple[str, str, str]], list[tuple[str, str, str]]]:
    """(train_combos, heldout_combos): a deterministic partition of colour x shape x position.

    round(heldout_fraction * total) combinations are held out, drawn in a seeded order and
    accepted only while no colour, shape or position is held out more than its fair share, so
    every value keeps most of its combinations in training. Both lists are in a seeded order.
    """
    return _partition(list(itertools.product(cfg.colours, cfg.shapes, cfg.positions)), cfg, 7919)


def pair_split(cfg: SceneConfig) -> tuple[list[tuple[str, ...]], list[tuple[str, ...]]]:
    """(train, heldout) of two-object combinations (colour, shape, relation, colour2, shape2), colours distinct;
    partitioned like `split`. Empty lists when the config has no relations."""
    combos = [(c, s, r, c2, s2) for c, s, r, c2, s2 in itertools.product(
        cfg.colours, cfg.shapes, cfg.relations, cfg.colours, cfg.shapes) if c != c2]
    return _partition(combos, cfg, 7927) if combos else ([], [])


def _partition(combos: list[tuple[str, ...]], cfg: SceneConfig, salt: int):
    order = np.random.default_rng([cfg.seed, salt]).permutation(len(combos))
    target = round(cfg.heldout_fraction * len(combos))
    slots = range(len(combos[0]))
    caps = [math.ceil(target / len({c[a] for c in combos})) for a in slots]
    counts: list[dict[str, int]] = [{} for _ in slots]
    held: set[int] = set()
    for i in order:
        if len(held) == target:
            break
        if all(counts[a].get(v, 0) < caps[a] for a, v in enumerate(combos[i])):
            held.add(int(i))
            for a, v in enumerate(combos[i]):
                counts[a][v] = counts[a].get(v, 0) + 1
    train = [combos[i] for i in order if i not in held]
    heldout = [combos[i] for i in order if i in held]
    return train, heldout


_split = split  # SyntheticScenes takes an argument named `split`


class SyntheticScenes:
    """Indexable dataset of `Sample(image uint8 (H, W, 3), caption, scene)`.

    Items take turns between one object and two (a share `pair_fraction` of them, spread evenly);
    the k-th item of a kind shows combination k of its split's list (each combination equally
    often). Its jitter, cells, background and caption style come from a generator seeded by
    (cfg.seed, split, i), so items are reproducible in any process and in any order.
    """

    def __init__(self, cfg: SceneConfig, split: str = "train", length: int | None = None):
        if split not in SPLITS:
            raise ConfigError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        self.cfg, self.split = cfg, split
        train, heldout = _split(cfg)
        self.combos = train if split == "train" else heldout
        pairs = pair_split(cfg) if cfg.pair_fraction > 0 else ([], [])
        self.pair_combos = pairs[0] if split == "train" else pairs[1]
        if (not self.combos and cfg.pair_fraction < 1) or (not self.pair_combos and cfg.pair_fraction > 0):
            raise ConfigError(f"the {split!r} split is empty; raise heldout_fraction or add vocabulary")
        self.length = len(self.combos) if length is None else int(length)

    def __len__(self) -> int:
        return self.length

    def _kind(self, index: int) -> tuple[bool, int]:
        """(is a two-object item, its rank among the items of its kind)."""
        p = self.cfg.pair_fraction
        before = math.floor(index * p)  # two-object items among 0..index-1
        pair = math.floor((index + 1) * p) > before
        return pair, before if pair else index - before

    def scene(self, index: int) -> tuple[Scene, np.random.Generator]:
        """The scene of item `index` and the generator that draws its jitter (already past the scene)."""
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} items")
        rng = np.random.default_rng([self.cfg.seed, SPLITS.index(self.split), index])
        background = self.cfg.backgrounds[rng.integers(len(self.cfg.backgrounds))]
        pair, k = self._kind(index)
        if not pair:
            return Scene(*self.combos[k % len(self.combos)], background=background), rng
        colour, shape, relation, colour2, shape2 = self.pair_combos[k % len(self.pair_combos)]
        first, second = place_pair(relation)
        return Scene(colour, shape, first, background, relation, colour2, shape2, second), rng

    def __getitem__(self, index: int) -> Sample:
        index = index + self.length if index < 0 else index
        scene, rng = self.scene(index)
        style = self.cfg.caption_styles[rng.integers(len(self.cfg.caption_styles))]
        return Sample(render(scene, self.cfg, rng), scene.caption(style), scene)


class TrainingPairs:
    """(float32 (3, H, W) in [-1, 1], caption) pairs of a SyntheticScenes, ready for torch's DataLoader."""

    def __init__(self, scenes: SyntheticScenes):
        self.scenes = scenes

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, index: int) -> tuple[np.ndarray, str]:
        image, caption, _ = self.scenes[index]
        return to_model_range(image), caption


# --------------------------------------------------------------------------- captions
_SYNONYMS = {"centre": "center", "middle": "center", "grey": "gray", "upper": "top", "lower": "bottom",
             "violet": "purple", "magenta": "purple"}
_FILLER = {"a", "an", "the", "in", "at", "on", "of", "with", "and", "background", "corner", "side", "one"}
_VERTICAL, _HORIZONTAL = ("top", "bottom"), ("left", "right")


def parse_caption(text: str, cfg: SceneConfig | None = None) -> Scene | None:
    """The Scene a caption describes, or None if it is not one colour, one shape and one position
    from the vocabulary (of `cfg` if given, else of the whole palette) with nothing else but filler.

    Accepts the dataset's styles and small variations ('top-left', 'centre', 'upper right');
    a missing background means the default one (cfg.backgrounds[0], or white).
    """
    relation = _RELATION_WORDS.search(text.lower())
    if relation is not None:
        return _parse_pair(text.lower(), relation, cfg)
    colours, shapes = (cfg.colours, cfg.shapes) if cfg else (tuple(COLOURS), SHAPES)
    backgrounds, positions = (cfg.backgrounds, cfg.positions) if cfg else (tuple(BACKGROUNDS), tuple(POSITIONS))
    found: dict[str, list[str]] = {"colour": [], "shape": [], "background": [], "place": []}
    for word in re.findall(r"[a-z]+", text.lower()):
        word = _SYNONYMS.get(word, word)
        if word in _FILLER:
            continue
        if word.endswith("s") and word[:-1] in SHAPES:  # "squares" is still not a count we draw
            return None
        kind = ("colour" if word in COLOURS else "background" if word in BACKGROUNDS else "shape" if word in SHAPES
                else "place" if word in _VERTICAL + _HORIZONTAL + ("center",) else None)
        if kind is None:
            return None
        found[kind].append(word)
    if len(found["colour"]) != 1 or len(found["shape"]) != 1 or len(found["background"]) > 1:
        return None
    position = _position_from_words(found["place"])
    background = found["background"][0] if found["background"] else backgrounds[0]
    scene_values = (found["colour"][0], found["shape"][0], position, background)
    if position is None or any(v not in vocab for v, vocab in
                               zip(scene_values, (colours, shapes, positions, backgrounds))):
        return None
    return Scene(*scene_values)


_RELATION_WORDS = re.compile(r"\b(?:to the )?(left of|right of|above|below|under|over)\b")
_RELATION_SYNONYMS = {"under": "below", "over": "above"}


def _parse_pair(text: str, match: re.Match, cfg: SceneConfig | None) -> Scene | None:
    """'<colour> <shape> <relation> <colour> <shape>' with filler and an optional background."""
    relation = _RELATION_SYNONYMS.get(match.group(1), match.group(1))
    colours, shapes = (cfg.colours, cfg.shapes) if cfg else (tuple(COLOURS), SHAPES)
    backgrounds = cfg.backgrounds if cfg else tuple(BACKGROUNDS)
    if cfg is not None and relation not in cfg.relations:
        return None
    sides, background = [], []
    for part in (text[:match.start()], text[match.end():]):
        found: dict[str, list[str]] = {"colour": [], "shape": []}
        for word in re.findall(r"[a-z]+", part):
            word = _SYNONYMS.get(word, word)
            if word in _FILLER:
                continue
            kind = "colour" if word in COLOURS else "shape" if word in SHAPES else None
            if word in BACKGROUNDS:
                background.append(word)
            elif kind is None:
                return None
            else:
                found[kind].append(word)
        if len(found["colour"]) != 1 or len(found["shape"]) != 1:
            return None
        sides.append((found["colour"][0], found["shape"][0]))
    if len(background) > 1:
        return None
    (c, s), (c2, s2) = sides
    bg = background[0] if background else backgrounds[0]
    if c == c2 or not {c, c2} <= set(colours) or not {s, s2} <= set(shapes) or bg not in backgrounds:
        return None
    return Scene(c, s, None, bg, relation, c2, s2, None)


def _position_from_words(words: list[str]) -> str | None:
    """'top', 'left' -> 'top left'; 'center' alone -> 'center'; 'top center' -> 'top'; conflicts -> None."""
    vertical = {w for w in words if w in _VERTICAL}
    horizontal = {w for w in words if w in _HORIZONTAL}
    if not words or len(vertical) > 1 or len(horizontal) > 1 or len(words) > 2:
        return None
    if "center" in words and len(words) == 2 and len(vertical | horizontal) != 1:
        return None
    name = " ".join([*vertical, *horizontal])
    return name or "center"


def _check_scene(scene: Scene, cfg: SceneConfig) -> None:
    checks = [("colour", scene.colour, COLOURS), ("shape", scene.shape, SHAPES), ("position", scene.position, POSITIONS),
              ("background", scene.background, BACKGROUNDS)]
    if scene.is_pair:
        checks += [("relation", scene.relation, RELATIONS), ("colour", scene.colour2, COLOURS),
                   ("shape", scene.shape2, SHAPES), ("position", scene.position2, POSITIONS)]
    for name, value, vocab in checks:
        if value not in vocab:
            raise ConfigError(f"unknown {name} {value!r} in {scene}; expected one of {', '.join(vocab)}")
