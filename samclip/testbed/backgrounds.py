"""Seeded textured backgrounds for the testbed's scenes: noise, stripes, gradients, checks.

Backgrounds use muted, low-saturation colours, so no background pixel reads as one of the
saturated object colours and the colour of an object stays a property of the object alone.
Every texture is computed in numpy from the generator it is given; the same generator state
gives the same array.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from samclip.testbed.shapes import pixel_grid

# (rng, height, width) -> (H, W, 3) float64 in [0, 255]
Texture = Callable[[np.random.Generator, int, int], np.ndarray]

GREY_RANGE = (70.0, 190.0)  # grey level of a muted background colour
TINT = 18.0  # largest per-channel offset from grey, which keeps the saturation low


def muted_colour(rng: np.random.Generator) -> np.ndarray:
    """Draw a (3,) low-saturation RGB colour: a grey level plus a small tint per channel."""
    grey = rng.uniform(*GREY_RANGE)
    return grey + rng.uniform(-TINT, TINT, size=3)


def _blend(weight: np.ndarray, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Mix two (3,) colours per pixel by an (H, W) weight in [0, 1]; returns (H, W, 3)."""
    return first + weight[..., None] * (second - first)


def _upsample_bilinear(grid: np.ndarray, height: int, width: int) -> np.ndarray:
    """Interpolate a coarse (h, w) grid bilinearly to (H, W), corners aligned."""
    rows = np.linspace(0.0, grid.shape[0] - 1.0, height)
    columns = np.linspace(0.0, grid.shape[1] - 1.0, width)
    row0 = np.minimum(rows.astype(int), grid.shape[0] - 2)
    column0 = np.minimum(columns.astype(int), grid.shape[1] - 2)
    dy = (rows - row0)[:, None]
    dx = (columns - column0)[None, :]
    top = grid[row0][:, column0] * (1 - dx) + grid[row0][:, column0 + 1] * dx
    bottom = grid[row0 + 1][:, column0] * (1 - dx) + grid[row0 + 1][:, column0 + 1] * dx
    return top * (1 - dy) + bottom * dy


def noise(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Draw smooth value noise: a coarse random grid, upsampled, blends two muted colours."""
    cells = int(rng.integers(3, 9))
    coarse = rng.uniform(0.0, 1.0, size=(cells + 1, cells + 1))
    weight = _upsample_bilinear(coarse, height, width)
    return _blend(weight, muted_colour(rng), muted_colour(rng))


def stripes(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Draw soft sinusoidal stripes at a random angle and period between two muted colours."""
    xx, yy = pixel_grid(height, width)
    angle = rng.uniform(0.0, math.pi)
    period = rng.uniform(0.06, 0.25) * max(height, width)
    phase = rng.uniform(0.0, 2.0 * math.pi)
    along = xx * math.cos(angle) + yy * math.sin(angle)
    weight = 0.5 + 0.5 * np.sin(2.0 * math.pi * along / period + phase)
    return _blend(weight, muted_colour(rng), muted_colour(rng))


def gradient(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Draw a linear gradient between two muted colours along a random direction."""
    xx, yy = pixel_grid(height, width)
    angle = rng.uniform(0.0, 2.0 * math.pi)
    along = xx * math.cos(angle) + yy * math.sin(angle)
    weight = (along - along.min()) / max(float(np.ptp(along)), 1e-9)
    return _blend(weight, muted_colour(rng), muted_colour(rng))


def checks(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Draw an axis-aligned checkerboard of two muted colours with a random cell size and offset."""
    xx, yy = pixel_grid(height, width)
    cell = rng.uniform(0.08, 0.2) * max(height, width)
    offset_x, offset_y = rng.uniform(0.0, cell, size=2)
    parity = (np.floor((xx + offset_x) / cell) + np.floor((yy + offset_y) / cell)) % 2
    return _blend(parity, muted_colour(rng), muted_colour(rng))


# Each name is also the adjective a caption may use ("on a striped background").
BACKGROUNDS: dict[str, Texture] = {
    "noisy": noise,
    "striped": stripes,
    "gradient": gradient,
    "checked": checks,
}


def draw_background(name: str, rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Draw one background texture as (H, W, 3) float64 in [0, 255].

    Raises ValueError for a name that is not in BACKGROUNDS.
    """
    try:
        texture = BACKGROUNDS[name]
    except KeyError as error:
        raise ValueError(
            f"unknown background {name!r}; expected one of {sorted(BACKGROUNDS)}"
        ) from error
    return np.clip(texture(rng, height, width), 0.0, 255.0)
