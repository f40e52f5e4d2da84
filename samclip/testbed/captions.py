"""Captions for the testbed's scenes, naming every object and one spatial relation.

The two largest visible objects (by visible pixels) are related by where their centroids lie:
vertically ("above", "below") when the centroids differ more in y than in x, horizontally
("to the left of", "to the right of") otherwise. The remaining objects are listed after them.
The phrasing is drawn from a few templates, so the same scene can be described in several ways:
"a red triangle above a blue circle", "a blue circle below a red triangle", "there is a red
triangle above a blue circle, with a green star".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

INVERSE_RELATIONS = {
    "above": "below",
    "below": "above",
    "to the left of": "to the right of",
    "to the right of": "to the left of",
}

# Templates for a scene of one object; {a} is the object.
SINGLE_TEMPLATES = ("{a}", "a picture of {a}", "there is {a}", "an image of {a}")
# Templates for two or more objects: {a} {relation} {b}, {b} {inverse} {a}, and so on.
PAIR_TEMPLATES = (
    "{a} {relation} {b}",
    "{b} {inverse} {a}",
    "a picture of {a} {relation} {b}",
    "there is {a} {relation} {b}",
    "{a} and {b}, the {a_short} {relation} the {b_short}",
)
BACKGROUND_PROBABILITY = 0.3  # chance that a caption also names the background's texture


class CaptionObject(NamedTuple):
    """The facts of one visible object that a caption uses."""

    class_name: str
    colour: str
    area: int  # visible pixels
    centroid: tuple[float, float]  # (x, y) of the visible pixels


def with_article(words: str) -> str:
    """Prefix 'a' or 'an' by the first letter: with_article('orange cross') -> 'an orange cross'."""
    return f"{'an' if words[:1] in 'aeiou' else 'a'} {words}"


def relation(first: CaptionObject, second: CaptionObject) -> str:
    """Return where `first` lies relative to `second`: above, below, to the left of, ..."""
    dx = first.centroid[0] - second.centroid[0]
    dy = first.centroid[1] - second.centroid[1]
    if abs(dy) > abs(dx):
        return "above" if dy < 0 else "below"  # image y grows downwards
    return "to the left of" if dx < 0 else "to the right of"


def _join(phrases: Sequence[str]) -> str:
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def caption_scene(
    objects: Sequence[CaptionObject], background: str, rng: np.random.Generator
) -> str:
    """Write one caption that names every object, from templates drawn with `rng`.

    Objects are ordered by visible area, largest first (ties keep the given order); the
    first two are related spatially. Raises ValueError when `objects` is empty.
    """
    if not objects:
        raise ValueError("a caption needs at least one object; the scene has none")
    ordered = sorted(objects, key=lambda item: -item.area)  # stable: ties keep paint order
    names = [with_article(f"{item.colour} {item.class_name}") for item in ordered]

    if len(ordered) == 1:
        template = SINGLE_TEMPLATES[int(rng.integers(len(SINGLE_TEMPLATES)))]
        text = template.format(a=names[0])
    else:
        first, second = ordered[0], ordered[1]
        template = PAIR_TEMPLATES[int(rng.integers(len(PAIR_TEMPLATES)))]
        link = relation(first, second)
        text = template.format(
            a=names[0],
            b=names[1],
            relation=link,
            inverse=INVERSE_RELATIONS[link],
            a_short=f"{first.colour} {first.class_name}",
            b_short=f"{second.colour} {second.class_name}",
        )
        if len(ordered) > 2:
            text += ", with " + _join(names[2:])

    if rng.uniform() < BACKGROUND_PROBABILITY:
        text += f", on {with_article(background)} background"
    return text
