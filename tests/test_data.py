"""Synthetic scenes (mobilediffusion.train.data) and the model-free evaluator (train.evaluate)."""
import dataclasses
import itertools
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageFilter

from mobilediffusion.errors import ConfigError
from mobilediffusion.train.data import (
    BACKGROUNDS, CAPTION_STYLES, COLOURS, POSITIONS, SHAPES, Scene, SceneConfig, SyntheticScenes, TrainingPairs,
    from_model_range, parse_caption, render, split,
)
from mobilediffusion.train.evaluate import SceneReader, evaluate, frechet_distance, read_scene

FULL = SceneConfig(colours=tuple(COLOURS), shapes=SHAPES, backgrounds=tuple(BACKGROUNDS))
CONFIGS = {
    "default": SceneConfig(),
    "full": FULL,
    "small": SceneConfig(colours=("red", "blue", "green"), shapes=("circle", "square", "triangle"),
                         positions=("top left", "center", "bottom right"), seed=3, heldout_fraction=0.3),
}


def _samples(cfg, n, split_name="train"):
    ds = SyntheticScenes(cfg, split_name, length=n)
    return [ds[i] for i in range(n)]


def _degrade(image, rng, radius, sigma):
    """Gaussian blur of `radius` pixels, then Gaussian noise of std `sigma` (0..255 units)."""
    blurred = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius)), np.float32)
    return np.clip(blurred + rng.normal(0, sigma, blurred.shape), 0, 255).astype(np.uint8)


def _accuracy(cfg, images, scenes):
    reader = SceneReader(cfg)
    detected = [reader(im) for im in images]
    acc = {a: np.mean([getattr(d, a) == getattr(s, a) for d, s in zip(detected, scenes)])
           for a in ("colour", "shape", "position", "background")}
    acc["all"] = np.mean([d.scene == s for d, s in zip(detected, scenes)])
    return acc


# --------------------------------------------------------------------------- dataset
def test_items_are_deterministic_and_order_free():
    cfg = SceneConfig(seed=5)
    a, b = SyntheticScenes(cfg, length=50), SyntheticScenes(cfg, length=50)
    for i in (17, 3, 0, 49):  # any order, fresh objects
        ia, ib = a[i], b[i]
        assert np.array_equal(ia.image, ib.image) and ia.caption == ib.caption and ia.scene == ib.scene
    assert not np.array_equal(a[0].image, a[1].image)
    assert a[-1].caption == a[49].caption
    other_seed = SyntheticScenes(SceneConfig(seed=6), length=50)
    assert any(not np.array_equal(a[i].image, other_seed[i].image) for i in range(5))
    with pytest.raises(IndexError):
        a[50]


def test_item_format_and_value_range():
    cfg = SceneConfig(resolution=96)
    image, caption, scene = SyntheticScenes(cfg, length=3)[2]
    assert image.shape == (96, 96, 3) and image.dtype == np.uint8
    assert parse_caption(caption, cfg) == scene
    x, text = TrainingPairs(SyntheticScenes(cfg, length=3))[2]
    assert x.shape == (3, 96, 96) and x.dtype == np.float32 and text == caption
    assert x.min() >= -1 and x.max() <= 1 and x.max() == 1  # white background -> 1
    assert np.array_equal(from_model_range(x), image)
    assert np.array_equal(from_model_range(np.stack([x, x]))[1], image)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_split_holds_out_unseen_combinations(name):
    cfg = CONFIGS[name]
    train, heldout = split(cfg)
    everything = set(itertools.product(cfg.colours, cfg.shapes, cfg.positions))
    assert not set(train) & set(heldout)
    assert set(train) | set(heldout) == everything and len(train) + len(heldout) == len(everything)
    assert len(heldout) == round(cfg.heldout_fraction * len(everything)) > 0
    for a, values in enumerate((cfg.colours, cfg.shapes, cfg.positions)):
        assert {c[a] for c in train} == set(values)  # every single value is seen in training
    assert split(cfg) == (train, heldout)
    assert SyntheticScenes(cfg, "heldout").combos == heldout
    for s_name, combos in (("train", train), ("heldout", heldout)):
        ds = SyntheticScenes(cfg, s_name, length=2 * len(combos))
        seen = [ds[i].scene for i in range(len(ds))]
        assert {s.combo for s in seen} == set(combos)  # each combination, equally often
        assert {s.background for s in seen} <= set(cfg.backgrounds)
    assert set(split(dataclasses.replace(cfg, seed=cfg.seed + 1))[1]) != set(heldout)


def test_heldout_is_spread_over_values():
    train, heldout = split(SceneConfig())  # 7 x 4 x 9 = 252 combinations, 32 held out
    for a, n_values in enumerate((7, 4, 9)):
        counts = np.unique([c[a] for c in heldout], return_counts=True)[1]
        assert counts.max() <= -(-len(heldout) // n_values)


# --------------------------------------------------------------------------- captions
@pytest.mark.parametrize("style", range(len(CAPTION_STYLES)))
def test_every_caption_parses_back(style):
    for values in itertools.product(COLOURS, SHAPES, POSITIONS, BACKGROUNDS):
        scene = Scene(*values)
        assert parse_caption(scene.caption(style)) == scene, scene.caption(style)
        assert parse_caption(scene.caption(style), FULL) == scene


@pytest.mark.parametrize("text, expected", [
    ("Top-left: a RED circle.", Scene("red", "circle", "top left")),
    ("a blue square in the centre", Scene("blue", "square", "center")),
    ("green triangle, upper right corner, on black", Scene("green", "triangle", "top right", "black")),
    ("a grey background with a cyan cross in the middle", Scene("cyan", "cross", "center", "gray")),
    ("yellow square at the top center", Scene("yellow", "square", "top")),
    ("a red dog in the top left", None),  # unknown word
    ("a red circle", None),  # no position
    ("a red blue circle at the top", None),  # two colours
    ("red circle and a square on the left", None),  # two shapes
    ("a red circle in the top bottom", None),  # conflicting position
    ("two red circles on the left", None),
    ("a white circle on the left", None),  # background colour is not an object colour
    ("", None),
])
def test_parse_caption_variants_and_refusals(text, expected):
    assert parse_caption(text) == expected


def test_parse_caption_respects_config_vocabulary():
    cfg = SceneConfig(colours=("red", "blue"), backgrounds=("black", "white"))
    assert parse_caption("a red circle on the left", cfg) == Scene("red", "circle", "left", "black")
    assert parse_caption("a pink circle on the left", cfg) is None
    assert parse_caption("a red diamond on the left", cfg) is None
    assert parse_caption("a red circle on the left on gray", cfg) is None


# --------------------------------------------------------------------------- read-back
@pytest.mark.parametrize("resolution", [64, 128])
def test_reads_back_rendered_scenes(resolution):
    cfg = SceneConfig(resolution=resolution)
    samples = _samples(cfg, 300)
    acc = _accuracy(cfg, [s.image for s in samples], [s.scene for s in samples])
    assert all(v >= 0.99 for v in acc.values()), acc


def test_reads_back_full_vocabulary_on_all_backgrounds():
    samples = _samples(FULL, 300, "heldout")
    acc = _accuracy(FULL, [s.image for s in samples], [s.scene for s in samples])
    assert all(v >= 0.99 for v in acc.values()), acc


@pytest.mark.parametrize("resolution", [64, 128])
def test_reads_back_blurred_noisy_scenes(resolution):
    cfg = SceneConfig(resolution=resolution)
    samples, rng = _samples(cfg, 200), np.random.default_rng(0)
    images = [_degrade(s.image, rng, radius=resolution / 64, sigma=8) for s in samples]
    acc = _accuracy(cfg, images, [s.scene for s in samples])
    assert all(v >= 0.95 for v in acc.values()), acc


def test_read_scene_details():
    cfg = SceneConfig()
    scene = Scene("orange", "triangle", "bottom right")
    image = render(scene, cfg)  # no jitter: nominal size on the anchor
    d = read_scene(image, cfg)
    assert d.scene == scene and d.found and d.blob_fraction == 1.0
    assert d.shape_score > 0.9 and d.shape_margin > 0.1 and d.colour_error < 0.02
    assert np.allclose(d.centre, POSITIONS["bottom right"], atol=0.01)
    assert np.allclose(d.extent, cfg.size, atol=0.01)
    assert read_scene(image / 255.0, cfg).scene == scene  # float input in [0, 1]
    blank = read_scene(np.full((64, 64, 3), 255, np.uint8), cfg)
    assert not blank.found and blank.scene is None and blank.confidence == 0 and blank.background == "white"


def test_read_scene_picks_the_largest_object():
    cfg = SceneConfig()
    image = render(Scene("blue", "square", "left"), cfg).copy()
    image[2:5, 55:58] = (220, 30, 30)  # a small red speck in the top right
    d = read_scene(image, cfg)
    assert d.scene == Scene("blue", "square", "left") and d.blob_fraction < 1


def test_bad_images_are_refused():
    cfg = SceneConfig()
    with pytest.raises(ConfigError, match=r"\(H, W, 3\)"):
        read_scene(np.zeros((3, 64, 64), np.float32), cfg)
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        read_scene(np.full((64, 64, 3), -1.0), cfg)
    with pytest.raises(ConfigError, match="one scene per image"):
        evaluate(np.zeros((2, 64, 64, 3), np.uint8), [Scene("red", "circle", "top")], cfg)


# --------------------------------------------------------------------------- evaluate and distance
def test_frechet_distance_matches_closed_form():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 3)) * [1.0, 2.0, 0.5]
    b = rng.normal(size=(4000, 3)) * [2.0, 1.0, 0.5] + [1.0, 0.0, 0.0]
    # diagonal Gaussians: |mu_a - mu_b|^2 + sum (sigma_a - sigma_b)^2 = 1 + 1 + 1 + 0
    assert frechet_distance(a, b) == pytest.approx(3.0, rel=0.1)
    assert abs(frechet_distance(a, a)) < 1e-9


def test_evaluate_scores_and_distances():
    cfg = SceneConfig()
    samples = _samples(cfg, 150, "heldout")
    scenes, real = [s.scene for s in samples], np.stack([s.image for s in samples])
    rng = np.random.default_rng(1)
    report = evaluate(real, scenes, cfg)
    assert report.n == 150 and report.found == 1.0 and min(report.accuracy.values()) >= 0.99
    assert report.fsd < 0.01 and report.fsd_baseline < 0.01
    assert "FSD" in report.table() and "position" in report.table()
    noise = evaluate(rng.integers(0, 256, real.shape, dtype=np.uint8), scenes, cfg)
    assert noise.fsd > 1.0 and noise.accuracy["all"] < 0.1
    red = np.stack([render(dataclasses.replace(s, colour="red"), cfg, rng) for s in scenes])
    red_report = evaluate(red, scenes, cfg)
    assert red_report.fsd > 0.1 and red_report.accuracy["shape"] >= 0.99
    assert red_report.by_value["colour"]["red"] == 1.0 and red_report.by_value["colour"]["blue"] == 0.0
    shuffled = evaluate(real[::-1], scenes, cfg)  # right distribution, wrong prompts
    assert shuffled.fsd < 0.01 and shuffled.accuracy["all"] < 0.2
    assert evaluate(real[:1], scenes[:1], cfg).fsd is None


# --------------------------------------------------------------------------- config
@pytest.mark.parametrize("kwargs, match", [
    (dict(colours=("red", "crimson")), "colours"),
    (dict(shapes=("circle", "circle")), "shapes"),
    (dict(size=0.3), "inside its grid cell"),
    (dict(jitter=0.1), "inside its grid cell"),
    (dict(heldout_fraction=0.8), "heldout_fraction"),
    (dict(resolution=16), "resolution"),
    (dict(caption_styles=(5,)), "caption_styles"),
])
def test_bad_config_is_refused(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        SceneConfig(**kwargs)


def test_bad_split_and_scene_are_refused():
    with pytest.raises(ConfigError, match="split"):
        SyntheticScenes(SceneConfig(), "test")
    with pytest.raises(ConfigError, match="shape"):
        render(Scene("red", "hexagon", "top"), SceneConfig())


def test_import_does_not_load_torch():
    code = "import sys, mobilediffusion.train.data, mobilediffusion.train.evaluate; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --------------------------------------------------------------------------- two objects in a relation
PAIRS = SceneConfig(resolution=128, relations=("left of", "right of", "above", "below"), pair_fraction=0.5)


def test_pair_scenes_place_both_objects_as_their_relation_says():
    from mobilediffusion.train.data import RELATIONS

    samples = _samples(PAIRS, 64)
    pairs = [s for s in samples if s.scene.is_pair]
    assert len(pairs) == 32 and [s.scene.is_pair for s in samples] == [i % 2 == 1 for i in range(64)]
    for image, caption, scene in pairs:
        assert scene.colour != scene.colour2 and f" {scene.relation} " in caption
        axis, sign = RELATIONS[scene.relation]
        (x1, y1), (x2, y2) = POSITIONS[scene.position], POSITIONS[scene.position2]
        along, across = ((x1 - x2), (y1 - y2)) if axis == 0 else ((y1 - y2), (x1 - x2))
        assert along * sign > 0 and across == 0  # one row or one column, in the named order
        assert parse_caption(caption, PAIRS).combo == scene.combo


def test_pair_split_holds_out_unseen_combinations_with_every_value_in_training():
    from mobilediffusion.train.data import pair_split

    train, held = pair_split(PAIRS)
    assert not set(train) & set(held) and abs(len(held) - 0.125 * (len(train) + len(held))) <= 3  # fair-share caps
    for slot in range(5):
        assert {c[slot] for c in held} <= {c[slot] for c in train}
    heldout = SyntheticScenes(PAIRS, "heldout", length=40)
    assert {heldout[i].scene.combo for i in range(40) if heldout[i].scene.is_pair} <= set(held)
    assert pair_split(PAIRS) == (train, held)  # deterministic


@pytest.mark.parametrize("text, expected", [
    ("a red circle left of a blue square", ("red", "circle", "left of", "blue", "square")),
    ("Green cross to the right of a yellow triangle, black background", ("green", "cross", "right of", "yellow",
                                                                        "triangle")),
    ("a purple square under an orange circle", ("purple", "square", "below", "orange", "circle")),
    ("a red circle left of a red square", None),  # one colour for both: not a scene of the set
    ("a red circle left of a blue square in the top left", None),
    ("a red circle left of a square", None),
])
def test_parse_pair_captions(text, expected):
    scene = parse_caption(text)
    assert (scene.combo if scene else None) == expected
    if scene is not None:  # a config without the caption's relation does not read it
        only_above = dataclasses.replace(PAIRS, relations=("above",))
        assert (parse_caption(text, only_above) is not None) == (scene.relation == "above")


def test_evaluator_reads_two_objects_and_their_relation():
    items = _samples(PAIRS, 96, "heldout")
    images, scenes = np.stack([s.image for s in items]), [s.scene for s in items]
    report = evaluate(images, scenes, PAIRS)
    assert all(report.accuracy[a] == 1.0 for a in ("colour", "shape", "position", "relation", "all"))
    rng = np.random.default_rng(0)
    soft = evaluate(np.stack([_degrade(im, rng, 1.0, 6.0) for im in images]), scenes, PAIRS)
    assert min(soft.accuracy[a] for a in ("colour", "shape", "relation")) >= 0.95, soft.accuracy
    mirrored = evaluate(images[:, :, ::-1], scenes, PAIRS)  # left and right swap; above and below stay
    horizontal = [s.is_pair and s.relation in ("left of", "right of") for s in scenes]
    assert mirrored.accuracy["colour"] == 1.0
    assert mirrored.accuracy["relation"] == pytest.approx(1 - sum(horizontal) / sum(s.is_pair for s in scenes))
    # one object where two were asked for: colour, shape and relation all wrong for that prompt
    single = [s for s in items if not s.scene.is_pair][0].image
    pair_scene = next(s for s in scenes if s.is_pair)
    assert evaluate(single[None], [pair_scene], PAIRS).accuracy["relation"] == 0.0


@pytest.mark.parametrize("kwargs, match", [
    (dict(relations=("beside",)), "relations"),
    (dict(relations=("above",), pair_fraction=1.5), "pair_fraction"),
    (dict(pair_fraction=0.5), "relations"),
    (dict(relations=("above",), pair_fraction=0.5, positions=("top", "center")), "grid"),
])
def test_bad_pair_config_is_refused(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        SceneConfig(**kwargs)
