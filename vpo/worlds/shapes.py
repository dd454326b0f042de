"""The "shapes" world: small synthetic images with exact ground truth, captions, yes/no questions and preference pairs.

A scene is 1-4 flat objects on a white (optionally cluttered) square canvas. Each object has a shape, a color, a size
and a position, the position being one cell of a 3 x 3 grid (at most one object per cell, so objects never touch: two
objects are always >= 2 px apart). Everything is drawn without anti-aliasing, so every object pixel has exactly its
palette color and the ground truth can be read back from the pixels (the tests do). The vocabulary is closed and small
so a tiny VLM learns it on a CPU in minutes:

==========  ========================================================================================================
shapes      circle, square, triangle, cross  (plurals: circles, squares, triangles, crosses)
colors      red, green, blue, yellow         (palette :data:`PALETTE`; clutter is gray, never a palette color)
sizes       small, large                     (side ~0.45 and ~0.8 of a grid cell)
positions   top left, top, top right, left, center, right, bottom left, bottom, bottom right  (the 3 x 3 grid)
counts      a (1), two, three, four
==========  ========================================================================================================

Captions (:func:`describe`) follow one deterministic grammar. Style ``"count"`` (default) groups the objects by
(color, shape) in vocabulary order (colors first, then shapes)::

    a red circle.
    a red circle and two blue squares.
    a red circle, a green cross and two blue squares.

Style ``"detailed"`` names every object with its size and position, in reading order (row-major over the grid)::

    a large red circle at the top left and a small blue square in the center.

:func:`parse_description` inverts both (and tolerates extra words); the metrics in :mod:`vpo.eval.metrics` use it.

Preference pairs (:func:`make_pair`): chosen = the true caption; rejected = the caption with exactly one hallucination,

- ``"absent"``: an extra mention of an object the scene does not have (an absent shape when the scene lacks one,
  else an absent (color, shape) combination);
- ``"color"``: one group's color changed to a color that shape does not have in the scene;
- ``"count"``: one group's count changed (1-4);

with the character spans of the hallucinated words in the rejected caption. The rejected caption keeps the canonical
group order, so word order never gives the answer away.

OViP's negative image (:func:`render_description`, :func:`scene_from_description`) is a scene matching a caption;
with ``base=`` it is the minimal edit of the original scene (recolor the object, add the absent object in a free
cell, add / remove instances), which keeps the rest of the picture, clutter included.

Randomness: every function takes a ``numpy.random.Generator``; the dataset writers derive one generator per record
from ``(seed, split, index)``, so the output is byte-for-byte reproducible and record ``i`` does not depend on ``n``.

Example:
    >>> import numpy as np
    >>> from vpo.worlds import shapes
    >>> rng = np.random.default_rng(0)
    >>> scene = shapes.random_scene(rng)
    >>> image = shapes.render(scene)                      # a 64 x 64 RGB PIL image
    >>> pair = shapes.make_pair(scene, rng)
    >>> shapes.parse_description(pair.chosen) == shapes.parse_description(shapes.describe(scene))
    True
"""
from __future__ import annotations

import json
import os
import re
import zlib
from collections import Counter
from dataclasses import dataclass
from typing import Dict, Iterable, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from vpo._validate import check_choice

# --------------------------------------------------------------------------------------------------- the vocabulary
SHAPES: Tuple[str, ...] = ("circle", "square", "triangle", "cross")
COLORS: Tuple[str, ...] = ("red", "green", "blue", "yellow")
SIZES: Tuple[str, ...] = ("small", "large")
# The 3 x 3 grid, row-major: cell index = 3 * row + col.
POSITIONS: Tuple[str, ...] = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)
POSITION_PHRASES: Dict[str, str] = {
    "top left": "at the top left", "top": "at the top", "top right": "at the top right",
    "left": "on the left", "center": "in the center", "right": "on the right",
    "bottom left": "at the bottom left", "bottom": "at the bottom", "bottom right": "at the bottom right",
}
COUNT_WORDS: Dict[int, str] = {1: "a", 2: "two", 3: "three", 4: "four"}
MAX_COUNT = max(COUNT_WORDS)
# Words parse_description reads as counts ("one" and "an" are accepted though the grammar writes "a").
_COUNT_OF_WORD: Dict[str, int] = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4}
# A mention preceded by one of these is a negated claim ("there is no red circle"), not a mention.
_NEGATIONS = ("no", "not", "without")

# RGB of each color; distinct from each other and from the gray clutter (r = g = b) and the white background.
PALETTE: Dict[str, Tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (30, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 190, 20),
}
BACKGROUND: Tuple[int, int, int] = (255, 255, 255)
# Side of an object as a fraction of a grid cell.
SIZE_FRACTION: Dict[str, float] = {"small": 0.45, "large": 0.8}

DESCRIBE_PROMPTS: Tuple[str, ...] = ("describe the image.", "what is in the image?")
ANSWERS: Tuple[str, str] = ("yes", "no")
HALLUCINATION_KINDS: Tuple[str, ...] = ("absent", "color", "count")
CAPTION_STYLES: Tuple[str, ...] = ("count", "detailed")
POPE_MODES: Tuple[str, ...] = ("random", "popular", "adversarial")

DEFAULT_IMAGE_SIZE = 64

_TOKEN_RE = re.compile(r"[a-z]+|[^\sa-z]")


def split_words(text: str) -> List[str]:
    """Lower-case ``text`` and split it into words and single punctuation marks: ``"a red circle."`` ->
    ``["a", "red", "circle", "."]``. Every text the world writes splits into words of :func:`vocabulary`."""
    return _TOKEN_RE.findall(text.lower())


def word_span_mask(text: str, spans: Sequence[Tuple[int, int]]) -> List[bool]:
    """For each word of ``split_words(text)``, whether it overlaps one of the character ``spans`` (e.g. the
    hallucinated words of a rejected caption, :class:`Hallucination`).

    >>> word_span_mask("a green circle.", [(2, 7)])
    [False, True, False, False]
    """
    return [any(m.start() < b and a < m.end() for a, b in spans) for m in _TOKEN_RE.finditer(text.lower())]


def plural(shape: str, count: int) -> str:
    """``shape`` for one object, its plural otherwise (``circles``, ``crosses``)."""
    if count == 1:
        return shape
    return shape + ("es" if shape.endswith("s") else "s")


_PLURAL = {plural(s, 2): s for s in SHAPES}


def existence_question(color: str, shape: str) -> str:
    """The yes/no question asking whether a (color, shape) object is in the image."""
    return f"is there a {color} {shape} in the image?"


def vocabulary() -> List[str]:
    """Every word and punctuation mark the world's prompts, captions (both styles), questions and answers use,
    sorted. A word-level tokenizer built from it covers every text this module writes."""
    texts = list(DESCRIBE_PROMPTS) + list(ANSWERS) + [existence_question(c, s) for c in COLORS for s in SHAPES]
    texts += [" ".join(COUNT_WORDS.values()), " ".join(SIZES), " ".join(POSITION_PHRASES.values())]
    texts += [plural(s, 2) for s in SHAPES] + ["and , .", "nothing."]  # the caption joiners; the empty scene
    return sorted({w for t in texts for w in split_words(t)} | set(SHAPES) | set(COLORS))


# ----------------------------------------------------------------------------------------------------- the scene
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


# ------------------------------------------------------------------------------------------------------ captions
class Mention(NamedTuple):
    """An object mention parsed from a text: ``count`` (None when the text gives none, e.g. a bare plural),
    ``color`` (None when the text names none) and ``shape``."""

    count: Optional[int]
    color: Optional[str]
    shape: str


def _group_phrases(scene: Scene) -> List[Tuple[int, str, str]]:
    """``[(count, color, shape)]`` of the scene in canonical order (vocabulary order of color, then shape)."""
    c = scene.counts()
    return [(c[(col, sh)], col, sh) for col in COLORS for sh in SHAPES if c[(col, sh)]]


def _canonical_key(g: Tuple[int, str, str]) -> Tuple[int, int]:
    return (COLORS.index(g[1]), SHAPES.index(g[2]))


def _join(phrases: Sequence[Sequence[str]]) -> Tuple[str, List[List[Tuple[int, int]]]]:
    """Join word lists as ``"p1, p2 and p3."``; returns the text and, per phrase, each word's ``(start, end)``."""
    text, spans = "", []
    for i, words in enumerate(phrases):
        if i:
            text += " and " if i == len(phrases) - 1 else ", "
        ws = []
        for j, w in enumerate(words):
            if j:
                text += " "
            ws.append((len(text), len(text) + len(w)))
            text += w
        spans.append(ws)
    return text + ".", spans


def _count_words(count: int, color: str, shape: str) -> List[str]:
    return [COUNT_WORDS[count], color, plural(shape, count)]


def describe(scene: Scene, style: str = "count") -> str:
    """The canonical caption of ``scene`` (see the module docstring for the grammar of each ``style``)."""
    check_choice("style", style, CAPTION_STYLES)
    if not scene.objects:
        return "nothing."
    if style == "count":
        return _join([_count_words(*g) for g in _group_phrases(scene)])[0]
    objs = sorted(scene.objects, key=lambda o: POSITIONS.index(o.position))
    return _join([["a", o.size, o.color, o.shape] + POSITION_PHRASES[o.position].split() for o in objs])[0]


def parse_description(text: str) -> List[Mention]:
    """The object mentions of a free-form text, in order: every shape word (singular or plural) is a mention; its
    color and count are the nearest color word and count word among the (up to 4) words before it, stopping at
    punctuation, "and"/"or" or another shape. Size and other words in between are skipped. A mention preceded there
    by "no", "not" or "without" is a negated claim and is left out. Count: the count word; else 1 for a singular
    shape and None for a bare plural.

    >>> [tuple(m) for m in parse_description("a red circle, a green cross and two blue squares.")]
    [(1, 'red', 'circle'), (1, 'green', 'cross'), (2, 'blue', 'square')]
    >>> parse_description("I see three big yellow triangles but no blue circle")
    [Mention(count=3, color='yellow', shape='triangle')]
    """
    words = split_words(text)
    out: List[Mention] = []
    for i, w in enumerate(words):
        if w in SHAPES:
            shape, is_plural = w, False
        elif w in _PLURAL:
            shape, is_plural = _PLURAL[w], True
        else:
            continue
        color = count = None
        negated = False
        for j in range(i - 1, max(-1, i - 5), -1):
            v = words[j]
            if v in SHAPES or v in _PLURAL or v in ("and", "or") or not v.isalpha():
                break
            if v in COLORS and color is None:
                color = v
            elif v in _COUNT_OF_WORD and count is None:
                count = _COUNT_OF_WORD[v]
            elif v in _NEGATIONS:
                negated = True
                break
        if negated:
            continue
        if count is None and not is_plural:
            count = 1
        out.append(Mention(count, color, shape))
    return out


def mention_counts(mentions: Iterable[Mention]) -> Counter:
    """``Counter`` of ``(color, shape) -> total count`` of the mentions that name a color (count None counts 1)."""
    c: Counter = Counter()
    for m in mentions:
        if m.color is not None:
            c[(m.color, m.shape)] += 1 if m.count is None else m.count
    return c


# ----------------------------------------------------------------------------------------------------- questions
@dataclass(frozen=True)
class Question:
    """A yes/no existence question about one (color, shape).

    Attributes:
        prompt: ``"is there a red circle in the image?"``.
        answer: ``"yes"`` or ``"no"``.
        color, shape: what it asks about.
        mode: the POPE setting of the set it belongs to, i.e. how the set's negatives were drawn: ``"random"``,
            ``"popular"`` or ``"adversarial"`` (positives carry their set's mode too).
        scene_index: the index of its scene in the list given to :func:`pope_questions` (None otherwise).
    """

    prompt: str
    answer: str
    color: str
    shape: str
    mode: str
    scene_index: Optional[int] = None


def _all_kinds() -> List[Tuple[str, str]]:
    return [(c, s) for c in COLORS for s in SHAPES]


def yes_no_questions(scene: Scene, rng: np.random.Generator, n: int = 2, *, mode: str = "random",
                     popularity: Optional[Counter] = None) -> List[Question]:
    """Balanced existence questions: ``n`` positives about distinct present (color, shape) kinds (fewer when the
    scene has fewer kinds) and as many negatives about absent kinds, drawn by ``mode`` (see :func:`pope_questions`).
    Positives first, then negatives."""
    check_choice("mode", mode, POPE_MODES)
    present = sorted(scene.counts(), key=lambda k: _all_kinds().index(k))
    absent = [k for k in _all_kinds() if k not in scene.counts()]
    k = min(n, len(present), len(absent))
    pos = [present[i] for i in rng.permutation(len(present))[:k]]
    order = [absent[i] for i in rng.permutation(len(absent))]  # random tie-breaking for every mode
    if mode == "popular":
        pop = popularity or Counter()
        order.sort(key=lambda a: -pop[a])
    elif mode == "adversarial":
        shapes, colors = scene.shapes(), {o.color for o in scene.objects}
        order.sort(key=lambda a: (a[1] not in shapes, a[0] not in colors))
    neg = order[:k]
    qs = [Question(existence_question(c, s), "yes", c, s, mode) for c, s in pos]
    qs += [Question(existence_question(c, s), "no", c, s, mode) for c, s in neg]
    return qs


def pope_questions(scenes: Sequence[Scene], seed: int = 0, *, mode: str = "random", per_scene: int = 3
                   ) -> List[Question]:
    """POPE-style questions over ``scenes``: per scene, ``per_scene`` positives (distinct present kinds; fewer if
    the scene has fewer) and as many negatives about absent kinds, so yes and no are balanced overall.

    Negatives by ``mode`` (POPE's three settings, adapted to this world):

    - ``"random"``: uniform over the absent (color, shape) kinds;
    - ``"popular"``: the absent kinds most frequent over all ``scenes`` (ties at random);
    - ``"adversarial"``: near misses first: absent kinds whose shape is in the scene (a wrong color), then those
      whose color is (a wrong shape), then the rest (ties at random). POPE ranks by co-occurrence, which carries no
      signal in a world whose objects are drawn independently; the near miss is this world's hard negative.
    """
    check_choice("mode", mode, POPE_MODES)
    popularity = Counter(k for s in scenes for k in s.counts()) if mode == "popular" else None
    out = []
    for i, scene in enumerate(scenes):
        rng = np.random.default_rng([seed, zlib.crc32(mode.encode()), i])
        for q in yes_no_questions(scene, rng, per_scene, mode=mode, popularity=popularity):
            out.append(Question(q.prompt, q.answer, q.color, q.shape, q.mode, i))
    return out


# ------------------------------------------------------------------------------------------------- preference pairs
@dataclass(frozen=True)
class Hallucination:
    """What the rejected caption of a :class:`PreferencePair` gets wrong.

    Attributes:
        kind: ``"absent"``, ``"color"`` or ``"count"``.
        claimed: the wrong mention as the rejected caption states it.
        truth: the true group it replaces (``None`` for ``"absent"``).
        spans: ``(start, end)`` character spans in the rejected caption of the hallucinated words: the whole phrase
            for ``"absent"``; the color word for ``"color"``; the count word, plus the shape word when its number
            changes (``circle`` -> ``circles``), for ``"count"``.
        words: the text of each span.
        object_index: index in ``scene.objects`` of the object the hallucination concerns (the first object of the
            changed group; for ``"absent"``, a present object of the same shape or color if any, else a random one).
    """

    kind: str
    claimed: Mention
    truth: Optional[Mention]
    spans: Tuple[Tuple[int, int], ...]
    words: Tuple[str, ...]
    object_index: int


@dataclass(frozen=True)
class PreferencePair:
    """A describe ``prompt``, the true caption ``chosen``, the ``rejected`` caption and what it gets wrong."""

    prompt: str
    chosen: str
    rejected: str
    hallucination: Hallucination


def _hallucinate(scene: Scene, rng: np.random.Generator, kind: str):
    """``(groups of the rejected caption, its changed group, claimed, truth)`` for ``kind``, or None when the scene
    admits no such error."""
    groups = _group_phrases(scene)
    present = scene.counts()
    if kind == "absent":
        absent_shape = [k for k in _all_kinds() if k[1] not in scene.shapes()]
        pool = absent_shape or [k for k in _all_kinds() if k not in present]
        if not pool:
            return None
        color, shape = pool[int(rng.integers(len(pool)))]
        new = (1, color, shape)
        return groups + [new], new, Mention(1, color, shape), None
    g_idx = int(rng.integers(len(groups)))
    count, color, shape = groups[g_idx]
    if kind == "color":
        options = [c for c in COLORS if (c, shape) not in present]
        if not options:
            others = [i for i, (_, _, s) in enumerate(groups) if any((c, s) not in present for c in COLORS)]
            if not others:
                return None
            g_idx = others[int(rng.integers(len(others)))]
            count, color, shape = groups[g_idx]
            options = [c for c in COLORS if (c, shape) not in present]
        new = (count, options[int(rng.integers(len(options)))], shape)
    else:  # count
        options = [n for n in COUNT_WORDS if n != count]
        new = (options[int(rng.integers(len(options)))], color, shape)
    out = list(groups)
    out[g_idx] = new
    return out, new, Mention(*new), Mention(count, color, shape)


def make_pair(scene: Scene, rng: np.random.Generator, kind: Optional[str] = None,
              prompt: Optional[str] = None) -> PreferencePair:
    """A preference pair for ``scene``: chosen = :func:`describe` (style ``"count"``), rejected = the same caption
    with one hallucination of ``kind`` (drawn uniformly from :data:`HALLUCINATION_KINDS` when None; a kind the scene
    cannot have, e.g. ``"color"`` when every color of every present shape is present, falls back to another).
    ``prompt``: default a random one of :data:`DESCRIBE_PROMPTS`."""
    if not scene.objects:
        raise ValueError("scene must have at least one object to make a preference pair")
    if kind is not None:
        check_choice("kind", kind, HALLUCINATION_KINDS)
    kinds = [kind] if kind is not None else []
    rest = [HALLUCINATION_KINDS[i] for i in rng.permutation(len(HALLUCINATION_KINDS))]
    kinds += [k for k in rest if k not in kinds]
    if prompt is None:
        prompt = DESCRIBE_PROMPTS[int(rng.integers(len(DESCRIBE_PROMPTS)))]
    for k in kinds:
        res = _hallucinate(scene, rng, k)
        if res is not None:
            break
    else:  # pragma: no cover - "count" is always possible
        raise RuntimeError("no hallucination possible")
    groups, new, claimed, truth = res
    groups = sorted(groups, key=_canonical_key)
    pos = groups.index(new)
    rejected, spans = _join([_count_words(*g) for g in groups])
    ws = spans[pos]
    if k == "absent":
        hspans = (ws[0][0], ws[-1][1]),
    elif k == "color":
        hspans = (ws[1],)
    else:
        hspans = (ws[0], ws[2]) if (truth.count == 1) != (claimed.count == 1) else (ws[0],)
    # The object the error concerns (LPOI's critical object).
    objs = scene.objects
    if truth is not None:
        obj_idx = next(i for i, o in enumerate(objs) if o.kind == (truth.color, truth.shape))
    else:
        near = [i for i, o in enumerate(objs) if o.shape == claimed.shape or o.color == claimed.color]
        pool = near or list(range(len(objs)))
        obj_idx = pool[int(rng.integers(len(pool)))]
    return PreferencePair(
        prompt=prompt,
        chosen=describe(scene),
        rejected=rejected,
        hallucination=Hallucination(k, claimed, truth, tuple(hspans), tuple(rejected[a:b] for a, b in hspans),
                                    obj_idx),
    )


# ------------------------------------------------------------------------------------- rendering a described scene
def scene_from_description(
    text: str,
    rng: np.random.Generator,
    *,
    base: Optional[Scene] = None,
    image_size: Optional[int] = None,
) -> Scene:
    """A scene that matches ``text``: the objects of :func:`parse_description` (mentions without a color get a
    random one; counts default to 1), at most 9 objects.

    Without ``base``: a fresh random layout (sizes and cells at random). With ``base``: the minimal edit of ``base``
    — objects whose (color, shape) the text keeps stay where they are; an object of a shape the text needs in a new
    color is recolored in place; missing objects are added in free cells; surplus objects are removed. The base's
    clutter seed is kept, so ``render(..., clutter=True)`` differs only where objects changed.
    """
    size = image_size or (base.image_size if base is not None else DEFAULT_IMAGE_SIZE)
    target: Counter = Counter()
    for m in parse_description(text):
        color = m.color if m.color is not None else COLORS[int(rng.integers(len(COLORS)))]
        target[(color, m.shape)] += 1 if m.count is None else m.count
    kinds = [k for k in _all_kinds() if target[k]]
    if base is None or base.image_size != size:
        want = [k for k in kinds for _ in range(target[k])][:9]
        cells = rng.permutation(9)[: len(want)]
        objs = [_place(rng, s, c, SIZES[int(rng.integers(2))], int(cell), size) for (c, s), cell in zip(want, cells)]
        seed = int(rng.integers(2**31 - 1)) if base is None else base.seed
        return Scene(tuple(sorted(objs, key=lambda o: POSITIONS.index(o.position))), size, seed)
    kept: List[Obj] = []
    surplus: List[Obj] = []
    have: Counter = Counter()
    for o in base.objects:
        if have[o.kind] < target[o.kind]:
            have[o.kind] += 1
            kept.append(o)
        else:
            surplus.append(o)
    deficit = [k for k in kinds for _ in range(target[k] - have[k])]
    added: List[Tuple[str, str]] = []
    for color, shape in deficit:
        same = [i for i, o in enumerate(surplus) if o.shape == shape]
        if same:
            o = surplus.pop(same[0])
            kept.append(Obj(shape, color, o.size, o.position, o.bbox))
        else:
            added.append((color, shape))
    used = {o.position for o in kept}
    free = [c for c in range(9) if POSITIONS[c] not in used]
    free = [free[i] for i in rng.permutation(len(free))]
    for (color, shape), cell in zip(added, free):
        kept.append(_place(rng, shape, color, SIZES[int(rng.integers(2))], cell, size))
    return Scene(tuple(sorted(kept, key=lambda o: POSITIONS.index(o.position))), size, base.seed)


def render_description(text: str, rng: np.random.Generator, *, base: Optional[Scene] = None,
                       image_size: Optional[int] = None, clutter: bool = False):
    """Render a scene matching ``text`` (:func:`scene_from_description`): OViP's negative image from a rejected
    caption. Returns a ``PIL.Image``."""
    return render(scene_from_description(text, rng, base=base, image_size=image_size), clutter=clutter)


# -------------------------------------------------------------------------------------------------------- datasets
def record_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of record ``index`` of ``split``: independent of how many records are written."""
    return np.random.default_rng([int(seed), zlib.crc32(split.encode()), int(index)])


def _save_png(img, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img.save(path, format="PNG")  # no metadata, fixed zlib level: identical bytes for identical pixels


def _write_jsonl(path: str, rows: Iterable[Mapping]) -> str:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


def _scene_fields(scene: Scene, clutter: bool) -> Dict[str, object]:
    return {"objects": [o.to_dict() for o in scene.objects],
            "scene": {"image_size": scene.image_size, "seed": scene.seed, "clutter": clutter}}


def make_dataset(
    root: str,
    n: int,
    seed: int = 0,
    split: str = "train",
    *,
    image_size: int = DEFAULT_IMAGE_SIZE,
    clutter: bool = False,
    max_objects: int = 4,
    kinds: Sequence[str] = HALLUCINATION_KINDS,
    neg_image: str = "edit",
) -> str:
    """Write ``n`` preference records to ``root/{split}.jsonl`` and their images to ``root/images/{split}/``.

    One JSONL line (the ``"vpo"`` layout of :mod:`vpo.data`; paths relative to ``root``)::

        {"id": "shapes-train-000000", "image": "images/train/000000.png", "prompt": "describe the image.",
         "chosen": "a red circle and two blue squares.", "rejected": "a green circle and two blue squares.",
         "neg_image": "images/train/000000_neg.png", "bbox": [x0, y0, x1, y1],
         "objects": [{"shape", "color", "size", "position", "bbox"}, ...],
         "scene": {"image_size": 64, "seed": ..., "clutter": false},
         "hallucination": {"kind": "color", "claimed": [1, "green", "circle"], "truth": [1, "red", "circle"],
                           "spans": [[2, 7]], "words": ["green"], "object_index": 0}}

    ``bbox`` is the box of the object the hallucination concerns (:class:`Hallucination`), pixels, ``x1``/``y1``
    exclusive. ``neg_image`` is rendered from the rejected caption: ``"edit"`` = the minimal edit of the scene,
    ``"random"`` = a fresh layout (:func:`scene_from_description`). ``kinds``: the hallucination kinds drawn from.
    Returns the JSONL path.
    """
    check_choice("neg_image", neg_image, ("edit", "random"))
    for k in kinds:
        check_choice("kinds", k, HALLUCINATION_KINDS)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rows = []
    for i in range(n):
        rng = record_rng(seed, split, i)
        scene = random_scene(rng, image_size=image_size, max_objects=max_objects)
        pair = make_pair(scene, rng, kind=kinds[int(rng.integers(len(kinds)))])
        neg = scene_from_description(pair.rejected, rng, base=scene if neg_image == "edit" else None,
                                     image_size=image_size)
        img_rel, neg_rel = f"images/{split}/{i:06d}.png", f"images/{split}/{i:06d}_neg.png"
        _save_png(render(scene, clutter=clutter), os.path.join(root, img_rel))
        _save_png(render(neg, clutter=clutter), os.path.join(root, neg_rel))
        h = pair.hallucination
        rows.append({
            "id": f"shapes-{split}-{i:06d}", "image": img_rel, "prompt": pair.prompt,
            "chosen": pair.chosen, "rejected": pair.rejected, "neg_image": neg_rel,
            "bbox": list(scene.objects[h.object_index].bbox),
            **_scene_fields(scene, clutter),
            "hallucination": {"kind": h.kind, "claimed": list(h.claimed), "truth": None if h.truth is None
                              else list(h.truth), "spans": [list(s) for s in h.spans], "words": list(h.words),
                              "object_index": h.object_index},
        })
    os.makedirs(root, exist_ok=True)
    return _write_jsonl(os.path.join(root, f"{split}.jsonl"), rows)


def make_sft_dataset(
    root: str,
    n: int,
    seed: int = 0,
    split: str = "sft",
    *,
    image_size: int = DEFAULT_IMAGE_SIZE,
    clutter: bool = False,
    max_objects: int = 4,
    questions_per_image: int = 1,
    style: str = "count",
) -> str:
    """Write supervised examples for ``n`` images to ``root/{split}.jsonl`` (images in ``root/images/{split}/``):
    per image, one caption example (``prompt`` = a describe prompt, ``response`` = :func:`describe`) then
    ``questions_per_image`` yes and as many no existence questions (``response`` = ``"yes"`` / ``"no"``; random
    negatives). One line: ``{"id", "image", "prompt", "response", "objects", "scene"}``. Returns the JSONL path."""
    check_choice("style", style, CAPTION_STYLES)
    rows = []
    for i in range(n):
        rng = record_rng(seed, split, i)
        scene = random_scene(rng, image_size=image_size, max_objects=max_objects)
        img_rel = f"images/{split}/{i:06d}.png"
        _save_png(render(scene, clutter=clutter), os.path.join(root, img_rel))
        meta = _scene_fields(scene, clutter)
        prompt = DESCRIBE_PROMPTS[int(rng.integers(len(DESCRIBE_PROMPTS)))]
        rows.append({"id": f"shapes-{split}-{i:06d}-caption", "image": img_rel, "prompt": prompt,
                     "response": describe(scene, style), **meta})
        for j, q in enumerate(yes_no_questions(scene, rng, questions_per_image)):
            rows.append({"id": f"shapes-{split}-{i:06d}-q{j}", "image": img_rel, "prompt": q.prompt,
                         "response": q.answer, **meta})
    os.makedirs(root, exist_ok=True)
    return _write_jsonl(os.path.join(root, f"{split}.jsonl"), rows)


def make_eval_dataset(
    root: str,
    n: int,
    seed: int = 0,
    split: str = "test",
    *,
    image_size: int = DEFAULT_IMAGE_SIZE,
    clutter: bool = False,
    max_objects: int = 4,
    pope_modes: Sequence[str] = POPE_MODES,
    pope_per_scene: int = 3,
) -> Dict[str, str]:
    """Held-out evaluation data: ``n`` images in ``root/images/{split}/``; ``root/{split}_captions.jsonl`` with one
    line per image ``{"id", "image", "prompt": DESCRIBE_PROMPTS[0], "objects", "scene"}``; and
    ``root/{split}_pope.jsonl`` with the POPE questions of every mode in ``pope_modes``
    ``{"id", "image", "prompt", "answer", "mode", "color", "shape", "scene_index"}`` (``mode`` = the setting the
    question belongs to; positives are repeated in every setting, as in POPE). Use a ``split`` name other than the
    training split's: the record generators are keyed by split, so the images differ. Returns
    ``{"captions": path, "pope": path}``."""
    for m in pope_modes:
        check_choice("pope_modes", m, POPE_MODES)
    scenes, cap_rows = [], []
    for i in range(n):
        rng = record_rng(seed, split, i)
        scene = random_scene(rng, image_size=image_size, max_objects=max_objects)
        scenes.append(scene)
        img_rel = f"images/{split}/{i:06d}.png"
        _save_png(render(scene, clutter=clutter), os.path.join(root, img_rel))
        cap_rows.append({"id": f"shapes-{split}-{i:06d}", "image": img_rel, "prompt": DESCRIBE_PROMPTS[0],
                         **_scene_fields(scene, clutter)})
    pope_rows = []
    for mode in pope_modes:
        for j, q in enumerate(pope_questions(scenes, seed, mode=mode, per_scene=pope_per_scene)):
            pope_rows.append({"id": f"shapes-{split}-pope-{mode}-{j:06d}", "image": cap_rows[q.scene_index]["image"],
                              "prompt": q.prompt, "answer": q.answer, "mode": mode, "color": q.color,
                              "shape": q.shape, "scene_index": q.scene_index})
    os.makedirs(root, exist_ok=True)
    return {"captions": _write_jsonl(os.path.join(root, f"{split}_captions.jsonl"), cap_rows),
            "pope": _write_jsonl(os.path.join(root, f"{split}_pope.jsonl"), pope_rows)}


def read_jsonl(path: str) -> List[Dict[str, object]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
