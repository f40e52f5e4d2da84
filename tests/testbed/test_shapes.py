"""Shape rasterisers and background textures of the testbed."""

from __future__ import annotations

import math

import numpy as np
import pytest

from samclip.testbed.backgrounds import BACKGROUNDS, TINT, draw_background
from samclip.testbed.shapes import SHAPES, convex_polygon_mask, pixel_grid, rasterise

SIZE = 96


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_shape_area_near_disc(name):
    radius = 20.0
    mask = rasterise(name, SIZE, SIZE, 48.0, 48.0, radius, 0.3)
    disc = math.pi * radius**2
    assert mask.dtype == bool
    assert mask.shape == (SIZE, SIZE)
    # Every class is sized to look about as large as a disc of the same radius.
    assert 0.35 * disc < mask.sum() < 1.3 * disc
    assert mask[48, 48]  # the centre is inside every shape


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_shape_stays_near_centre(name):
    mask = rasterise(name, SIZE, SIZE, 40.0, 50.0, 10.0, 1.0)
    ys, xs = np.nonzero(mask)
    assert np.all(np.hypot(xs + 0.5 - 40.0, ys + 0.5 - 50.0) <= 1.2 * 10.0 + 1e-9)


def test_shapes_differ_from_each_other():
    masks = {name: rasterise(name, SIZE, SIZE, 48.0, 48.0, 20.0, 0.3) for name in SHAPES}
    names = sorted(masks)
    for first in names:
        for second in names:
            if first < second:
                assert not np.array_equal(masks[first], masks[second]), (first, second)


def test_convex_polygon_either_orientation():
    xx, yy = pixel_grid(20, 20)
    square = np.array([[2.0, 2.0], [12.0, 2.0], [12.0, 12.0], [2.0, 12.0]])
    clockwise = convex_polygon_mask(xx, yy, square)
    counter = convex_polygon_mask(xx, yy, square[::-1])
    assert np.array_equal(clockwise, counter)
    assert clockwise.sum() == 100


def test_rasterise_unknown_shape():
    with pytest.raises(ValueError, match="unknown shape 'hexagon'"):
        rasterise("hexagon", 8, 8, 4.0, 4.0, 2.0, 0.0)


@pytest.mark.parametrize("name", sorted(BACKGROUNDS))
def test_background_seeded_and_muted(name):
    first = draw_background(name, np.random.default_rng(3), 40, 50)
    second = draw_background(name, np.random.default_rng(3), 40, 50)
    other = draw_background(name, np.random.default_rng(4), 40, 50)
    assert first.shape == (40, 50, 3)
    assert np.array_equal(first, second)
    assert not np.array_equal(first, other)
    assert first.min() >= 0.0
    assert first.max() <= 255.0
    # Low saturation: the channels of a pixel stay within two tints of each other.
    spread = first.max(axis=2) - first.min(axis=2)
    assert spread.max() <= 2 * TINT + 1e-9


def test_background_unknown_name():
    with pytest.raises(ValueError, match="unknown background"):
        draw_background("plaid", np.random.default_rng(0), 8, 8)
