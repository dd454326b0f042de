"""Captions: the canonical grammar (:func:`describe`) and its inverse (:func:`parse_description`)."""
from __future__ import annotations

from collections import Counter
from typing import Iterable, List, NamedTuple, Optional, Sequence, Tuple

from vpo._validate import check_choice
from vpo.worlds.shapes.scene import Scene
from vpo.worlds.shapes.vocab import (_COUNT_OF_WORD, _NEGATIONS, _PLURAL, CAPTION_STYLES, COLORS, COUNT_WORDS,
                                     POSITION_PHRASES, POSITIONS, SHAPES, plural, split_words)


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


def _join(phrases: Sequence[Sequence[str]], chain: bool = False) -> Tuple[str, List[List[Tuple[int, int]]]]:
    """Join word lists as ``"p1, p2 and p3."`` (``chain``: ``"p1 and p2 and p3."``); returns the text and, per
    phrase, each word's ``(start, end)``."""
    text, spans = "", []
    for i, words in enumerate(phrases):
        if i:
            text += " and " if chain or i == len(phrases) - 1 else ", "
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
    if style in ("count", "chain"):
        return _join([_count_words(*g) for g in _group_phrases(scene)], chain=style == "chain")[0]
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
