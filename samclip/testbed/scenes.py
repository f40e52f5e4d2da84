"""Procedural scenes with exact ground truth: coloured shapes on textured backgrounds.

``generate_scene(seed, index)`` draws one scene from its own random stream
``np.random.default_rng([seed, index])``, so a scene depends on nothing but (seed, index, size,
spec) and any subset of a dataset can be regenerated alone. A scene holds:

- ``image``: (H, W, 3) uint8 RGB;
- ``instances``: one per visible object, with its mask of visible pixels, shape class, colour
  name, XYWH box, areas and an interior point;
- ``semantic``: (H, W) uint8 class index per pixel (0 background, then CLASS_NAMES order);
- ``caption``: a sentence naming every object and how the two largest lie to each other.

Objects are painted in order, so later objects occlude earlier ones. An object whose visible
part is too small (see SceneSpec) is dropped before painting, so every painted pixel belongs to
exactly one instance and the semantic mask is exactly the union of the instance masks by class.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from samclip.model.rle import mask_bbox
from samclip.testbed.backgrounds import BACKGROUNDS, draw_background
from samclip.testbed.captions import CaptionObject, caption_scene
from samclip.testbed.shapes import SHAPES, pixel_grid, rasterise

# Saturated object colours, far from the muted background colours.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 165, 55),
    "blue": (35, 75, 215),
    "yellow": (235, 205, 30),
    "purple": (145, 55, 185),
}
# Semantic class index = position in this tuple; 0 is background.
CLASS_NAMES: tuple[str, ...] = ("background", *SHAPES)
DEFAULT_SIZE = 128  # pixels per side
# Smallest object radius in pixels, whatever the image size: at 3 pixels the thinnest part of
# any shape (a cross's bar, 0.7 * radius wide) still covers whole pixel centres.
MIN_RADIUS_PIXELS = 3.0


@dataclass(frozen=True)
class SceneSpec:
    """Settings of the scene generator: the classes, colours, counts and sizes to draw from."""

    shapes: tuple[str, ...] = tuple(SHAPES)  # shape classes to draw from
    colours: tuple[str, ...] = tuple(COLOURS)  # colour names to draw from
    backgrounds: tuple[str, ...] = tuple(BACKGROUNDS)  # background textures to draw from
    min_objects: int = 1  # objects drawn before occluded ones are dropped
    max_objects: int = 3
    radius_range: tuple[float, float] = (0.14, 0.28)  # object radius as a fraction of the side
    # An occluded object is dropped unless this share of its pixels, and at least
    # min_visible_pixels, stay visible; the top-most object is always kept.
    min_visible_fraction: float = 0.35
    min_visible_pixels: int = 30
    colour_jitter: float = 20.0  # largest per-channel offset from the named colour, 0-255 scale
    shading: float = 0.15  # largest relative brightness change across an object
    pixel_noise: float = 4.0  # standard deviation of Gaussian noise on every pixel, 0-255 scale

    def __post_init__(self) -> None:
        checks = (("shapes", self.shapes, SHAPES), ("colours", self.colours, COLOURS),
                  ("backgrounds", self.backgrounds, BACKGROUNDS))  # fmt: skip
        for label, chosen, known in checks:
            unknown = [name for name in chosen if name not in known]
            if not chosen or unknown:
                raise ValueError(
                    f"SceneSpec.{label} must be a non-empty subset of {sorted(known)}; "
                    f"got {list(chosen)}"
                )
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError(
                f"expected 1 <= min_objects <= max_objects, got {self.min_objects} and "
                f"{self.max_objects}"
            )
        low, high = self.radius_range
        if not 0 < low <= high <= 0.5:
            raise ValueError(f"radius_range must satisfy 0 < low <= high <= 0.5, got {low, high}")


@dataclass(frozen=True)
class Instance:
    """One visible object of a scene."""

    mask: np.ndarray = field(repr=False)  # (H, W) bool: the visible pixels
    class_name: str
    colour: str
    bbox: tuple[int, int, int, int]  # XYWH of the visible pixels, in pixels
    area: int  # visible pixels
    full_area: int  # pixels of the whole shape inside the image, before occlusion
    point: tuple[float, float]  # (x, y) pixel centre deep inside the visible pixels

    @property
    def class_index(self) -> int:
        """Value of this object's pixels in the semantic mask."""
        return CLASS_NAMES.index(self.class_name)

    @property
    def visible_fraction(self) -> float:
        return self.area / self.full_area


@dataclass(frozen=True)
class Scene:
    """One generated image with its ground truth; instances are in paint order."""

    seed: int
    index: int
    image: np.ndarray = field(repr=False)  # (H, W, 3) uint8 RGB
    semantic: np.ndarray = field(repr=False)  # (H, W) uint8 index into CLASS_NAMES
    instances: tuple[Instance, ...]
    background: str  # the texture's name in BACKGROUNDS
    caption: str

    @property
    def largest(self) -> Instance:
        """The instance with the most visible pixels; the earliest painted wins a tie."""
        return max(self.instances, key=lambda instance: instance.area)

    @property
    def label(self) -> str:
        """The image's class label: the shape class of its largest object."""
        return self.largest.class_name

    @property
    def instance_map(self) -> np.ndarray:
        """(H, W) uint8: 0 background, k for the pixels of the k-th instance (1-based)."""
        result = np.zeros(self.semantic.shape, dtype=np.uint8)
        for number, instance in enumerate(self.instances, start=1):
            result[instance.mask] = number
        return result


def interior_point(mask: np.ndarray) -> tuple[float, float]:
    """Return the (x, y) centre of a pixel far from the mask's edge, a stand-in for its skeleton.

    The mask is eroded with a 4-neighbourhood until one more step would empty it, and pixels
    outside the image count as outside the mask. Of the pixels that remain, the one nearest their
    centroid is returned. Raises ValueError for an empty mask.
    """
    if not mask.any():
        raise ValueError("interior_point needs a mask with at least one pixel")
    current = mask.astype(bool)
    while True:
        eroded = current.copy()
        eroded[1:, :] &= current[:-1, :]
        eroded[:-1, :] &= current[1:, :]
        eroded[:, 1:] &= current[:, :-1]
        eroded[:, :-1] &= current[:, 1:]
        eroded[0, :] = eroded[-1, :] = False
        eroded[:, 0] = eroded[:, -1] = False
        if not eroded.any():
            break
        current = eroded
    ys, xs = np.nonzero(current)
    nearest = int(np.argmin((xs - xs.mean()) ** 2 + (ys - ys.mean()) ** 2))
    return float(xs[nearest]) + 0.5, float(ys[nearest]) + 0.5


def _visible_masks(full_masks: list[np.ndarray]) -> list[np.ndarray]:
    """Return what stays visible of each mask when later masks are painted over earlier ones."""
    covered = np.zeros_like(full_masks[0]) if full_masks else None
    visible: list[np.ndarray] = [np.zeros(0, dtype=bool)] * len(full_masks)
    for position in range(len(full_masks) - 1, -1, -1):
        visible[position] = full_masks[position] & ~covered
        covered |= full_masks[position]
    return visible


def _shaded_colour(
    rng: np.random.Generator, base: tuple[int, int, int], spec: SceneSpec, size: int,
    cx: float, cy: float, radius: float,
) -> np.ndarray:  # fmt: skip
    """Return (H, W, 3) float64: the object's jittered colour, brightened along one direction."""
    colour = np.asarray(base, dtype=np.float64) + rng.uniform(
        -spec.colour_jitter, spec.colour_jitter, size=3
    )
    direction = rng.uniform(0.0, 2.0 * math.pi)
    strength = rng.uniform(0.0, spec.shading)
    xx, yy = pixel_grid(size, size)
    along = ((xx - cx) * math.cos(direction) + (yy - cy) * math.sin(direction)) / radius
    brightness = 1.0 + strength * np.clip(along, -1.0, 1.0)
    return colour[None, None, :] * brightness[..., None]


def generate_scene(
    seed: int, index: int, size: int = DEFAULT_SIZE, spec: SceneSpec | None = None
) -> Scene:
    """Draw scene `index` of the dataset with `seed`: a (size, size) image and its ground truth.

    The same (seed, index, size, spec) always gives the same arrays and caption. Raises
    ValueError for a negative seed or index, or a size under 16 pixels.
    """
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got seed={seed}, index={index}")
    if size < 16:
        raise ValueError(f"size must be at least 16 pixels, got {size}")
    spec = spec or SceneSpec()
    rng = np.random.default_rng([seed, index])

    # background
    background = spec.backgrounds[int(rng.integers(len(spec.backgrounds)))]
    canvas = draw_background(background, rng, size, size)

    # objects: every draw happens whether or not the object is kept later, so dropping one
    # never shifts the random stream of the others
    count = int(rng.integers(spec.min_objects, spec.max_objects + 1))
    drawn = []
    for _ in range(count):
        class_name = spec.shapes[int(rng.integers(len(spec.shapes)))]
        colour = spec.colours[int(rng.integers(len(spec.colours)))]
        radius = max(rng.uniform(*spec.radius_range) * size, MIN_RADIUS_PIXELS)
        cx, cy = rng.uniform(radius, size - radius, size=2)
        angle = rng.uniform(0.0, 2.0 * math.pi)
        full = rasterise(class_name, size, size, cx, cy, radius, angle)
        paint = _shaded_colour(rng, COLOURS[colour], spec, size, cx, cy, radius)
        drawn.append((class_name, colour, full, paint))

    # occlusion: drop objects that stay too hidden; removing one only uncovers the others,
    # so a single pass leaves every painted object above the threshold
    visible = _visible_masks([full for _, _, full, _ in drawn])
    painted = []
    for position, (item, shown) in enumerate(zip(drawn, visible)):
        full_area = int(item[2].sum())
        needed = max(spec.min_visible_pixels, spec.min_visible_fraction * full_area)
        if position == len(drawn) - 1 or int(shown.sum()) >= needed:
            painted.append(item)
    visible = _visible_masks([full for _, _, full, _ in painted])

    # paint, then add pixel noise
    for _, _, full, paint in painted:
        canvas[full] = paint[full]
    canvas += rng.normal(0.0, spec.pixel_noise, size=canvas.shape)
    image = np.rint(np.clip(canvas, 0.0, 255.0)).astype(np.uint8)

    # ground truth
    semantic = np.zeros((size, size), dtype=np.uint8)
    instances = []
    for (class_name, colour, full, _), shown in zip(painted, visible):
        x, y, width, height = (int(value) for value in mask_bbox(shown))
        instances.append(
            Instance(
                mask=shown,
                class_name=class_name,
                colour=colour,
                bbox=(x, y, width, height),
                area=int(shown.sum()),
                full_area=int(full.sum()),
                point=interior_point(shown),
            )
        )
        semantic[shown] = CLASS_NAMES.index(class_name)
    caption_objects = [
        CaptionObject(item.class_name, item.colour, item.area, _centroid(item.mask))
        for item in instances
    ]
    caption = caption_scene(caption_objects, background, rng)
    return Scene(seed, index, image, semantic, tuple(instances), background, caption)


def _centroid(mask: np.ndarray) -> tuple[float, float]:
    ys, xs = np.nonzero(mask)
    return float(xs.mean()) + 0.5, float(ys.mean()) + 0.5
