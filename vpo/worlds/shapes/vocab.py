"""The shapes world's closed vocabulary: shapes, colors, sizes, positions, counts, the palette, and word helpers."""
from __future__ import annotations

import re
from typing import Dict, List, Sequence, Tuple

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
# Every kind make_pair writes: the three above, the language prior's ("prior", vpo.worlds.shapes.prior) and
# "omission" (the rejected caption leaves a present object out: a coverage pair, nothing hallucinated).
PAIR_KINDS: Tuple[str, ...] = HALLUCINATION_KINDS + ("prior", "omission")
CAPTION_STYLES: Tuple[str, ...] = ("count", "detailed", "chain")
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


def all_kinds() -> List[Tuple[str, str]]:
    """Every ``(color, shape)`` kind, colors first (vocabulary order)."""
    return [(c, s) for c in COLORS for s in SHAPES]
