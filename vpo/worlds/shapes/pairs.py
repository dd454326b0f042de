"""Preference pairs (a true caption and one with a single hallucination) and OViP's negative images."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np

from vpo._validate import check_choice
from vpo.worlds.shapes.captions import (Mention, _canonical_key, _count_words, _group_phrases, _join, describe,
                                        parse_description)
from vpo.worlds.shapes.prior import CooccurrencePrior
from vpo.worlds.shapes.scene import Obj, Scene, _place, render
from vpo.worlds.shapes.vocab import (COLORS, COUNT_WORDS, DEFAULT_IMAGE_SIZE, DESCRIBE_PROMPTS, HALLUCINATION_KINDS,
                                     PAIR_KINDS, POSITIONS, SIZES, all_kinds as _all_kinds)


@dataclass(frozen=True)
class Hallucination:
    """What the rejected caption of a :class:`PreferencePair` gets wrong.

    Attributes:
        kind: ``"absent"``, ``"color"``, ``"count"``, ``"prior"`` (an absent object the language prior predicts) or
            ``"omission"`` (a present group left out: the chosen caption is the more complete one).
        claimed: the wrong mention as the rejected caption states it (``"omission"``: count 0).
        truth: the true group it replaces (``None`` for ``"absent"`` and ``"prior"``).
        spans: ``(start, end)`` character spans in the rejected caption of the hallucinated words: the whole phrase
            for ``"absent"`` and ``"prior"``; the color word for ``"color"``; the count word, plus the shape word when its number
            changes (``circle`` -> ``circles``), for ``"count"``; none for ``"omission"``.
        words: the text of each span.
        object_index: index in ``scene.objects`` of the object the hallucination concerns (the first object of the
            changed group; for ``"prior"``, the trigger object; for ``"absent"``, a present object of the same shape
            or color if any, else a random one).
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


def _hallucinate(scene: Scene, rng: np.random.Generator, kind: str, prior: Optional[CooccurrencePrior] = None):
    """``(groups of the rejected caption, its changed group, claimed, truth)`` for ``kind``, or None when the scene
    admits no such error."""
    groups = _group_phrases(scene)
    present = scene.counts()
    if kind == "omission":
        if len(groups) < 2:
            return None
        pool = list(range(len(groups)))
        if prior is not None:  # the prior's partner when its trigger is there too: "say it only when you see it"
            shapes = scene.shapes()
            partners = [i for i, g in enumerate(groups)
                        if any(g[2] == q and t in shapes for t, q in prior.pairs)]
            pool = partners or pool
        gone = groups[pool[int(rng.integers(len(pool)))]]
        return [g for g in groups if g != gone], gone, Mention(0, gone[1], gone[2]), Mention(*gone)
    if kind == "prior":
        cases = prior.cases(scene) if prior is not None else []
        if not cases:
            return None
        trigger, partner = cases[int(rng.integers(len(cases)))]
        colors = [o.color for o in scene.objects if o.shape == trigger]
        new = (1, colors[int(rng.integers(len(colors)))], partner)
        return groups + [new], new, Mention(*new), None
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
              prompt: Optional[str] = None, *, prior: Optional[CooccurrencePrior] = None,
              style: str = "count") -> PreferencePair:
    """A preference pair for ``scene``: chosen = :func:`describe` (style ``"count"``), rejected = the same caption
    with one hallucination of ``kind`` (drawn uniformly from :data:`HALLUCINATION_KINDS` when None; a kind the scene
    cannot have, e.g. ``"color"`` when every color of every present shape is present, falls back to another).
    ``prompt``: default a random one of :data:`DESCRIBE_PROMPTS`.

    ``kind="prior"`` (needs ``prior``): the language prior's hallucination — the partner of a present trigger shape
    that the scene lacks, in the trigger's color (:class:`~vpo.worlds.shapes.prior.CooccurrencePrior`), e.g.
    ``"a red circle."`` -> ``"a red circle and a red square."``; a scene with no such case falls back to the other
    kinds. ``style``: the caption grammar of both captions, ``"count"`` or ``"chain"`` (:func:`describe`).
    ``kind="omission"``: the rejected caption leaves one group out (with ``prior``, a partner whose trigger is
    present when there is one) — the counterweight that keeps preference training from simply saying less."""
    if not scene.objects:
        raise ValueError("scene must have at least one object to make a preference pair")
    check_choice("style", style, ("count", "chain"))
    if kind is not None:
        check_choice("kind", kind, PAIR_KINDS)
        if kind == "prior" and prior is None:
            raise ValueError("kind='prior' needs prior (a CooccurrencePrior)")
    kinds = [kind] if kind is not None else []
    rest = [HALLUCINATION_KINDS[i] for i in rng.permutation(len(HALLUCINATION_KINDS))]
    kinds += [k for k in rest if k not in kinds]
    if prompt is None:
        prompt = DESCRIBE_PROMPTS[int(rng.integers(len(DESCRIBE_PROMPTS)))]
    for k in kinds:
        res = _hallucinate(scene, rng, k, prior)
        if res is not None:
            break
    else:  # pragma: no cover - "count" is always possible
        raise RuntimeError("no hallucination possible")
    groups, new, claimed, truth = res
    groups = sorted(groups, key=_canonical_key)
    rejected, spans = _join([_count_words(*g) for g in groups], chain=style == "chain")
    ws = spans[groups.index(new)] if k != "omission" else []
    if k == "omission":
        hspans = ()
    elif k in ("absent", "prior"):
        hspans = (ws[0][0], ws[-1][1]),
    elif k == "color":
        hspans = (ws[1],)
    else:
        hspans = (ws[0], ws[2]) if (truth.count == 1) != (claimed.count == 1) else (ws[0],)
    # The object the error concerns (LPOI's critical object).
    objs = scene.objects
    if k == "prior":
        obj_idx = next(i for i, o in enumerate(objs) if o.color == claimed.color
                       and any(o.shape == t for t, q in prior.pairs if q == claimed.shape))
    elif truth is not None:
        obj_idx = next(i for i, o in enumerate(objs) if o.kind == (truth.color, truth.shape))
    else:
        near = [i for i, o in enumerate(objs) if o.shape == claimed.shape or o.color == claimed.color]
        pool = near or list(range(len(objs)))
        obj_idx = pool[int(rng.integers(len(pool)))]
    return PreferencePair(
        prompt=prompt,
        chosen=describe(scene, style),
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
