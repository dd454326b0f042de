"""Yes/no existence questions and POPE's three settings."""
from __future__ import annotations

import zlib
from collections import Counter
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np

from vpo._validate import check_choice
from vpo.worlds.shapes.scene import Scene
from vpo.worlds.shapes.vocab import POPE_MODES, all_kinds as _all_kinds, existence_question


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
