"""Rasterise the testbed's shape classes into boolean masks, in pure numpy.

Every shape is placed by a centre (cx, cy), a size ``radius`` and a rotation ``angle``, all in
pixels and radians of the image frame (x right, y down). A pixel belongs to a shape when its
centre (x + 0.5, y + 0.5) lies inside, so masks have hard edges and no anti-aliasing: the mask
is exactly the set of pixels the scene paints. Non-convex shapes (star, cross) are unions of
convex polygons, each tested with half-planes.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import numpy as np

# (xx, yy, cx, cy, radius, angle) -> (H, W) bool; xx and yy are the pixel-centre grids
Rasteriser = Callable[[np.ndarray, np.ndarray, float, float, float, float], np.ndarray]


@functools.lru_cache(maxsize=8)
def pixel_grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Return (xx, yy), each (H, W) float64: the x and y of every pixel centre.

    The arrays are cached per size and read-only, because every shape and texture of a scene
    reuses them.
    """
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    xx, yy = xs + 0.5, ys + 0.5
    xx.flags.writeable = False
    yy.flags.writeable = False
    return xx, yy


def convex_polygon_mask(xx: np.ndarray, yy: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Mask the pixel centres inside a convex polygon given as (V, 2) (x, y) vertices in order.

    The vertices may run either way round; points on an edge count as inside.
    """
    x, y = vertices[:, 0], vertices[:, 1]
    signed_area = 0.5 * float(np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y))
    orientation = 1.0 if signed_area >= 0 else -1.0
    inside = np.ones(xx.shape, dtype=bool)
    for (x0, y0), (x1, y1) in zip(vertices, np.roll(vertices, -1, axis=0)):
        # The cross product of the edge with the vector to the point: >= 0 on the inner side.
        inside &= orientation * ((x1 - x0) * (yy - y0) - (y1 - y0) * (xx - x0)) >= 0
    return inside


def _regular_points(cx: float, cy: float, radius: float, angle: float, count: int) -> np.ndarray:
    """Return (count, 2) points evenly spaced on a circle, the first at `angle`."""
    angles = angle + 2.0 * math.pi * np.arange(count) / count
    return np.stack([cx + radius * np.cos(angles), cy + radius * np.sin(angles)], axis=1)


def _rectangle(cx: float, cy: float, half_u: float, half_v: float, angle: float) -> np.ndarray:
    """Return the (4, 2) corners of a rectangle with half-sides (half_u, half_v), rotated."""
    cos, sin = math.cos(angle), math.sin(angle)
    corners = np.array([[-half_u, -half_v], [half_u, -half_v], [half_u, half_v], [-half_u, half_v]])
    rotation = np.array([[cos, -sin], [sin, cos]])
    return corners @ rotation.T + np.array([cx, cy])


def circle(
    xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, radius: float, angle: float
) -> np.ndarray:
    """Mask a disc of the given radius; the angle has no effect."""
    del angle
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= radius**2


def square(
    xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, radius: float, angle: float
) -> np.ndarray:
    """Mask a square of side 1.7 * radius, about the area of the disc of that radius."""
    half = 0.85 * radius
    return convex_polygon_mask(xx, yy, _rectangle(cx, cy, half, half, angle))


def triangle(
    xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, radius: float, angle: float
) -> np.ndarray:
    """Mask an equilateral triangle of circumradius 1.2 * radius, about as large as a disc."""
    return convex_polygon_mask(xx, yy, _regular_points(cx, cy, 1.2 * radius, angle, 3))


def star(
    xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, radius: float, angle: float
) -> np.ndarray:
    """Mask a five-pointed star with tips at 1.2 * radius, and inner corners at 0.45 of that."""
    outer = _regular_points(cx, cy, 1.2 * radius, angle, 5)
    inner = _regular_points(cx, cy, 0.54 * radius, angle + math.pi / 5, 5)
    mask = convex_polygon_mask(xx, yy, inner)  # the pentagon in the middle
    for tip in range(5):
        # Tip k lies between inner corners k - 1 and k.
        points = np.stack([inner[tip - 1], outer[tip], inner[tip]])
        mask |= convex_polygon_mask(xx, yy, points)
    return mask


def cross(
    xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, radius: float, angle: float
) -> np.ndarray:
    """Mask a plus sign: two bars of length 2 * radius and width 0.7 * radius, crossed."""
    long_half, short_half = radius, 0.35 * radius
    bar = convex_polygon_mask(xx, yy, _rectangle(cx, cy, long_half, short_half, angle))
    return bar | convex_polygon_mask(xx, yy, _rectangle(cx, cy, short_half, long_half, angle))


# The shape classes in the order of their semantic-mask index (1, 2, ...; 0 is background).
SHAPES: dict[str, Rasteriser] = {
    "circle": circle,
    "square": square,
    "triangle": triangle,
    "star": star,
    "cross": cross,
}


def rasterise(
    name: str, height: int, width: int, cx: float, cy: float, radius: float, angle: float
) -> np.ndarray:
    """Rasterise one shape class into an (H, W) bool mask.

    Raises ValueError for a name that is not in SHAPES.
    """
    try:
        rasteriser = SHAPES[name]
    except KeyError as error:
        raise ValueError(f"unknown shape {name!r}; expected one of {sorted(SHAPES)}") from error
    xx, yy = pixel_grid(height, width)
    return rasteriser(xx, yy, cx, cy, radius, angle)
