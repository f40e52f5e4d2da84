"""Procedural scenes: determinism and ground truth that agrees with the pixels."""

from __future__ import annotations

import numpy as np
import pytest

from samclip.model.rle import mask_bbox
from samclip.testbed.captions import CaptionObject, caption_scene, relation, with_article
from samclip.testbed.scenes import (
    CLASS_NAMES,
    COLOURS,
    SceneSpec,
    generate_scene,
    interior_point,
)

SEED = 11
SCENES = [generate_scene(SEED, index, size=96) for index in range(40)]


def test_scene_same_seed_same_scene():
    again = generate_scene(SEED, 3, size=96)
    assert np.array_equal(again.image, SCENES[3].image)
    assert np.array_equal(again.semantic, SCENES[3].semantic)
    assert again.caption == SCENES[3].caption
    assert [item.bbox for item in again.instances] == [item.bbox for item in SCENES[3].instances]


def test_scene_other_seed_or_index_differs():
    assert not np.array_equal(generate_scene(SEED + 1, 3, size=96).image, SCENES[3].image)
    assert not np.array_equal(SCENES[4].image, SCENES[3].image)


def test_scene_arrays():
    for scene in SCENES:
        assert scene.image.shape == (96, 96, 3)
        assert scene.image.dtype == np.uint8
        assert scene.semantic.shape == (96, 96)
        assert scene.semantic.dtype == np.uint8
        assert 1 <= len(scene.instances) <= SceneSpec().max_objects


@pytest.mark.parametrize("index", range(len(SCENES)))
def test_semantic_is_union_of_instances(index):
    scene = SCENES[index]
    rebuilt = np.zeros_like(scene.semantic)
    covered = np.zeros(scene.semantic.shape, dtype=bool)
    for instance in scene.instances:
        assert not (covered & instance.mask).any(), "instance masks overlap"
        covered |= instance.mask
        rebuilt[instance.mask] = CLASS_NAMES.index(instance.class_name)
    assert np.array_equal(rebuilt, scene.semantic)
    assert np.array_equal(scene.instance_map > 0, covered)


@pytest.mark.parametrize("index", range(len(SCENES)))
def test_instance_fields_match_mask(index):
    for instance in SCENES[index].instances:
        assert instance.area == int(instance.mask.sum()) > 0
        assert instance.bbox == tuple(int(value) for value in mask_bbox(instance.mask))
        assert instance.area <= instance.full_area
        x, y = instance.point
        assert instance.mask[int(y), int(x)], "the point lies outside the visible mask"


@pytest.mark.parametrize("index", range(len(SCENES)))
def test_instance_pixels_have_its_colour(index):
    scene = SCENES[index]
    names = list(COLOURS)
    references = np.array([COLOURS[name] for name in names], dtype=np.float64)
    for instance in scene.instances:
        mean = scene.image[instance.mask].astype(np.float64).mean(axis=0)
        nearest = names[int(np.argmin(np.linalg.norm(references - mean, axis=1)))]
        assert nearest == instance.colour


@pytest.mark.parametrize("index", range(len(SCENES)))
def test_caption_names_every_object(index):
    scene = SCENES[index]
    for instance in scene.instances:
        assert f"{instance.colour} {instance.class_name}" in scene.caption, scene.caption
    mentioned = sum(scene.caption.count(f"{colour} {shape}")
                    for colour in COLOURS for shape in CLASS_NAMES[1:])  # fmt: skip
    assert mentioned >= len(scene.instances)


def test_label_is_largest_object():
    for scene in SCENES:
        largest = max(item.area for item in scene.instances)
        assert scene.largest.area == largest
        assert scene.label == scene.largest.class_name


def test_occlusion_drops_hidden_objects():
    spec = SceneSpec()
    occluded = 0
    for scene in SCENES:
        for instance in scene.instances[:-1]:  # the top-most object is exempt from the rule
            assert instance.visible_fraction >= spec.min_visible_fraction
            assert instance.area >= spec.min_visible_pixels
            occluded += instance.visible_fraction < 1.0
        assert scene.instances[-1].visible_fraction == 1.0
    assert occluded > 0, "no scene of the sample has an occluded object"


def test_scene_variety():
    assert {scene.background for scene in SCENES} == {"noisy", "striped", "gradient", "checked"}
    classes = {item.class_name for scene in SCENES for item in scene.instances}
    colours = {item.colour for scene in SCENES for item in scene.instances}
    assert classes == set(CLASS_NAMES[1:])
    assert colours == set(COLOURS)


@pytest.mark.parametrize("size", [16, 32, 200])
def test_scene_other_sizes(size):
    scene = generate_scene(0, 1, size=size)
    assert scene.image.shape == (size, size, 3)
    assert all(instance.area > 0 for instance in scene.instances)


def test_scene_restricted_spec():
    spec = SceneSpec(shapes=("star",), colours=("blue",), min_objects=2, max_objects=2)
    scene = generate_scene(0, 0, size=64, spec=spec)
    assert {item.class_name for item in scene.instances} == {"star"}
    assert {item.colour for item in scene.instances} == {"blue"}


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"shapes": ("hexagon",)}, "SceneSpec.shapes"),
        ({"colours": ()}, "SceneSpec.colours"),
        ({"min_objects": 3, "max_objects": 2}, "min_objects"),
        ({"radius_range": (0.3, 0.6)}, "radius_range"),
    ],
)
def test_scene_spec_invalid(fields, message):
    with pytest.raises(ValueError, match=message):
        SceneSpec(**fields)


def test_generate_scene_invalid_arguments():
    with pytest.raises(ValueError, match="seed and index"):
        generate_scene(-1, 0)
    with pytest.raises(ValueError, match="at least 16"):
        generate_scene(0, 0, size=8)


def test_interior_point_of_ring_avoids_hole():
    yy, xx = np.mgrid[0:41, 0:41]
    distance = np.hypot(xx - 20, yy - 20)
    ring = (distance <= 18) & (distance >= 10)
    x, y = interior_point(ring)
    assert ring[int(y), int(x)]
    with pytest.raises(ValueError, match="at least one pixel"):
        interior_point(np.zeros((4, 4), dtype=bool))


def test_relation_directions():
    centre = CaptionObject("circle", "red", 10, (50.0, 50.0))
    assert relation(CaptionObject("star", "blue", 5, (52.0, 10.0)), centre) == "above"
    assert relation(CaptionObject("star", "blue", 5, (52.0, 90.0)), centre) == "below"
    assert relation(CaptionObject("star", "blue", 5, (10.0, 55.0)), centre) == "to the left of"
    assert relation(CaptionObject("star", "blue", 5, (90.0, 45.0)), centre) == "to the right of"


def test_caption_relation_is_consistent():
    top = CaptionObject("triangle", "red", 200, (50.0, 10.0))
    bottom = CaptionObject("circle", "blue", 100, (50.0, 90.0))
    allowed = {
        "a red triangle above a blue circle",
        "a blue circle below a red triangle",
        "a picture of a red triangle above a blue circle",
        "there is a red triangle above a blue circle",
        "a red triangle and a blue circle, the red triangle above the blue circle",
    }
    seen = set()
    for seed in range(60):
        text = caption_scene([bottom, top], "striped", np.random.default_rng(seed))
        text = text.removesuffix(", on a striped background")
        assert text in allowed
        seen.add(text)
    assert seen == allowed


def test_caption_needs_objects():
    with pytest.raises(ValueError, match="at least one object"):
        caption_scene([], "noisy", np.random.default_rng(0))


def test_with_article():
    assert with_article("red star") == "a red star"
    assert with_article("orange cross") == "an orange cross"
