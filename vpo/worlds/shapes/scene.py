"""Scenes of the shapes world: objects in a 3 x 3 grid (:class:`Obj`, :class:`Scene`), random scenes, rendering."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Dict, List, Mapping, Sequence, Tuple

import numpy as np

from vpo._validate import check_choice
from vpo.worlds.shapes.vocab import (BACKGROUND, COLORS, DEFAULT_IMAGE_SIZE, MAX_COUNT, PALETTE, POSITIONS, SHAPES,
                                     SIZE_FRACTION, SIZES)


@dataclass(frozen=True)
class Obj:
    """One object of a scene.

    Attributes:
        shape, color, size: words of :data:`SHAPES`, :data:`COLORS`, :data:`SIZES`.
        position: a word of :data:`POSITIONS` (the grid cell).
        bbox: ``(x0, y0, x1, y1)`` in pixels, ``x1``/``y1`` exclusive: the object covers columns ``x0 .. x1-1`` and
            rows ``y0 .. y1-1`` and touches all four sides of its box.
    """

    shape: str
    color: str
    size: str
    position: str
    bbox: Tuple[int, int, int, int]

    @property
    def kind(self) -> Tuple[str, str]:
        """``(color, shape)``."""
        return (self.color, self.shape)

    def to_dict(self) -> Dict[str, object]:
        return {"shape": self.shape, "color": self.color, "size": self.size, "position": self.position,
                "bbox": list(self.bbox)}

    @classmethod
    def from_dict(cls, d: Mapping) -> "Obj":
        return cls(shape=d["shape"], color=d["color"], size=d.get("size", "large"),
                   position=d.get("position", "center"), bbox=tuple(int(v) for v in d["bbox"]))


@dataclass(frozen=True)
class Scene:
    """A scene: objects on a square canvas of ``image_size`` pixels; ``seed`` draws the background clutter."""

    objects: Tuple[Obj, ...]
    image_size: int = DEFAULT_IMAGE_SIZE
    seed: int = 0

    def counts(self) -> Counter:
        """``Counter`` of ``(color, shape) -> number of objects``."""
        return Counter(o.kind for o in self.objects)

    def shapes(self) -> set:
        return {o.shape for o in self.objects}

    def to_dict(self) -> Dict[str, object]:
        return {"objects": [o.to_dict() for o in self.objects], "image_size": self.image_size, "seed": self.seed}

    @classmethod
    def from_dict(cls, d: Mapping) -> "Scene":
        """From :meth:`to_dict`, or from a dataset record (its ``"objects"`` and ``"scene"`` fields)."""
        meta = d.get("scene", d)
        return cls(objects=tuple(Obj.from_dict(o) for o in d["objects"]),
                   image_size=int(meta.get("image_size", DEFAULT_IMAGE_SIZE)), seed=int(meta.get("seed", 0)))


def _cell_bounds(cell: int, image_size: int) -> Tuple[int, int, int, int]:
    row, col = divmod(cell, 3)
    return (round(col * image_size / 3), round(row * image_size / 3),
            round((col + 1) * image_size / 3), round((row + 1) * image_size / 3))


def _side(size: str, image_size: int) -> int:
    return max(3, round(SIZE_FRACTION[size] * image_size / 3))


def _place(rng: np.random.Generator, shape: str, color: str, size: str, cell: int, image_size: int) -> Obj:
    """An object of the given side at a random offset inside ``cell``, 1 px from the cell's edges."""
    cx0, cy0, cx1, cy1 = _cell_bounds(cell, image_size)
    side = _side(size, image_size)
    x0 = int(rng.integers(cx0 + 1, max(cx0 + 1, cx1 - 1 - side) + 1))
    y0 = int(rng.integers(cy0 + 1, max(cy0 + 1, cy1 - 1 - side) + 1))
    return Obj(shape, color, size, POSITIONS[cell], (x0, y0, x0 + side, y0 + side))


def random_scene(
    rng: np.random.Generator,
    *,
    image_size: int = DEFAULT_IMAGE_SIZE,
    min_objects: int = 1,
    max_objects: int = 4,
    repeat_prob: float = 0.3,
    colors: Sequence[str] = COLORS,
    shapes: Sequence[str] = SHAPES,
) -> Scene:
    """A random scene of ``min_objects .. max_objects`` objects in distinct grid cells.

    Each object after the first copies the (color, shape) of an earlier one with probability ``repeat_prob`` (so
    counts above one are common), else draws both uniformly from ``colors`` x ``shapes``. Sizes are uniform.
    """
    if image_size < 24:
        raise ValueError(f"image_size must be >= 24 (three cells of >= 8 px), got {image_size}")
    if not 1 <= min_objects <= max_objects <= min(9, MAX_COUNT):
        raise ValueError(f"expected 1 <= min_objects <= max_objects <= {min(9, MAX_COUNT)}, got "
                         f"min_objects={min_objects}, max_objects={max_objects}")
    for c in colors:
        check_choice("colors", c, COLORS)
    for s in shapes:
        check_choice("shapes", s, SHAPES)
    n = int(rng.integers(min_objects, max_objects + 1))
    cells = rng.permutation(9)[:n]
    objs: List[Obj] = []
    for cell in cells:
        if objs and rng.random() < repeat_prob:
            prev = objs[int(rng.integers(len(objs)))]
            color, shape = prev.color, prev.shape
        else:
            color, shape = colors[int(rng.integers(len(colors)))], shapes[int(rng.integers(len(shapes)))]
        size = SIZES[int(rng.integers(len(SIZES)))]
        objs.append(_place(rng, shape, color, size, int(cell), image_size))
    return Scene(tuple(sorted(objs, key=lambda o: POSITIONS.index(o.position))), image_size,
                 int(rng.integers(2**31 - 1)))


# -------------------------------------------------------------------------------------------------------- render
def _draw_object(draw, o: Obj) -> None:
    x0, y0, x1, y1 = o.bbox
    xe, ye = x1 - 1, y1 - 1  # PIL's coordinates are inclusive
    fill = PALETTE[o.color]
    if o.shape == "square":
        draw.rectangle([x0, y0, xe, ye], fill=fill)
    elif o.shape == "circle":
        draw.ellipse([x0, y0, xe, ye], fill=fill)
    elif o.shape == "triangle":
        draw.polygon([(x0, ye), (xe, ye), ((x0 + xe) // 2, y0)], fill=fill)
    elif o.shape == "cross":
        w = x1 - x0
        t = max(1, round(w / 3))  # arm thickness
        a = x0 + (w - t) // 2
        draw.rectangle([a, y0, a + t - 1, ye], fill=fill)
        b = y0 + (w - t) // 2
        draw.rectangle([x0, b, xe, b + t - 1], fill=fill)
    else:
        raise ValueError(f"object shape must be one of {list(SHAPES)}, got {o.shape!r}")


def render(scene: Scene, *, clutter: bool = False):
    """Draw ``scene`` as an RGB ``PIL.Image`` of ``scene.image_size`` squared pixels.

    ``clutter=True`` first scatters gray dots and short lines (drawn from ``scene.seed``) over the background; objects
    are drawn on top, so object pixels keep their exact palette colors.
    """
    from PIL import Image, ImageDraw

    size = scene.image_size
    img = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    if clutter:
        crng = np.random.default_rng(scene.seed)
        for _ in range(int(crng.integers(6, 14))):
            g = int(crng.integers(120, 230))
            x, y = (int(v) for v in crng.integers(0, size, 2))
            if crng.random() < 0.5:
                r = int(crng.integers(0, 2))
                draw.rectangle([x, y, x + r, y + r], fill=(g, g, g))
            else:
                dx, dy = (int(v) for v in crng.integers(-size // 6, size // 6 + 1, 2))
                draw.line([x, y, x + dx, y + dy], fill=(g, g, g), width=1)
    for o in scene.objects:
        _draw_object(draw, o)
    return img
