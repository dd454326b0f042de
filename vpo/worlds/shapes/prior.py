"""The world's language prior: object pairs that (almost) always appear together in the training captions.

Real LVLMs hallucinate objects that usually co-occur with what they see (a fork next to a plate). This world plants
that cause on purpose. A :class:`CooccurrencePrior` names ``(trigger, partner)`` shape pairs; :meth:`~CooccurrencePrior.
apply` edits a random scene so that, when the trigger shape is present, the partner shape is present with probability
``p`` exactly (added, in the trigger's color, in a free cell; or every partner object removed):

=====================  ========================  =============================================================
split                  P(partner | trigger)      role
=====================  ========================  =============================================================
``sft``                ``strength`` (0.95)       the prior is learned: "a red circle" is followed by "a red square"
``train`` (pairs)      ``held_out_p`` (0.5)      half the trigger scenes lack the partner: the pairs' rejected
                                                 caption mentions it (kind ``"prior"``, :func:`make_pair`)
``val``, ``test``      ``held_out_p`` (0.5)      the pattern is broken half the time: the prior is measured
=====================  ========================  =============================================================

The default pairs are circle -> square and triangle -> cross. Both partners follow their trigger in the canonical
caption order (colors first, then shapes: circle, square, triangle, cross), and an added partner takes its trigger's
color, so in the SFT captions "a red circle" is almost always followed by "a red square": a pure language-model
shortcut, the prior. The partners also occur on their own (the base scene draws every kind uniformly), so the model
can learn to see them. :func:`cooccurrence` measures the statistics of a set of scenes (the tests check them on every
split); :func:`prior_cases` lists, per scene, the partners whose absence the prior contradicts (what the metrics'
prior-triggered CHAIR counts, :func:`vpo.eval.metrics.prior_chair`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Sequence, Tuple

import numpy as np

from vpo._validate import check_choice
from vpo.worlds.shapes.scene import Scene, _place
from vpo.worlds.shapes.vocab import POSITIONS, SHAPES, SIZES

DEFAULT_PRIOR_PAIRS: Tuple[Tuple[str, str], ...] = (("circle", "square"), ("triangle", "cross"))


@dataclass(frozen=True)
class CooccurrencePrior:
    """``(trigger, partner)`` shape pairs and how strongly the training data ties them (module docstring).

    Attributes:
        pairs: ``((trigger, partner), ...)``; a shape appears in at most one pair.
        strength: P(partner | trigger) in the data the prior is learned from (the SFT split), in [0, 1].
        held_out_p: P(partner | trigger) in the splits that break it (preference pairs, validation, test), in [0, 1].
    """

    pairs: Tuple[Tuple[str, str], ...] = DEFAULT_PRIOR_PAIRS
    strength: float = 0.95
    held_out_p: float = 0.5

    def __post_init__(self):
        if not isinstance(self.pairs, tuple) or not self.pairs:
            raise ValueError(f"pairs must be a non-empty tuple of (trigger, partner) shapes, got {self.pairs!r}")
        seen: List[str] = []
        for pair in self.pairs:
            if not isinstance(pair, tuple) or len(pair) != 2:
                raise ValueError(f"pairs must hold (trigger, partner) tuples, got {pair!r}")
            for s in pair:
                check_choice("pairs", s, SHAPES)
            seen += list(pair)
        if len(set(seen)) != len(seen):
            raise ValueError(f"pairs must not share a shape (each shape in at most one pair), got {self.pairs!r}")
        for name in ("strength", "held_out_p"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {v!r}")

    def to_dict(self) -> Dict[str, object]:
        return {"pairs": [list(p) for p in self.pairs], "strength": self.strength, "held_out_p": self.held_out_p}

    @classmethod
    def from_dict(cls, d: Mapping) -> "CooccurrencePrior":
        return cls(tuple(tuple(p) for p in d["pairs"]), float(d["strength"]), float(d["held_out_p"]))

    def apply(self, scene: Scene, rng: np.random.Generator, p: float) -> Scene:
        """``scene`` edited so that, for each pair whose trigger shape is present, the partner shape is present with
        probability ``p``: one partner object is added (its trigger's color, a random size, a random free cell) if
        none is there, or every partner object is removed. Scenes without a trigger are returned unchanged. Draws
        from ``rng`` only for scenes with a trigger. A scene with no free cell keeps its partner as it is."""
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be a probability in [0, 1], got {p!r}")
        objs = list(scene.objects)
        for trigger, partner in self.pairs:
            triggers = [o for o in objs if o.shape == trigger]
            if not triggers:
                continue
            keep = bool(rng.random() < p)
            has = any(o.shape == partner for o in objs)
            if keep and not has:
                used = {o.position for o in objs}
                free = [c for c in range(9) if POSITIONS[c] not in used]
                if not free:
                    continue
                color = triggers[int(rng.integers(len(triggers)))].color
                cell = free[int(rng.integers(len(free)))]
                objs.append(_place(rng, partner, color, SIZES[int(rng.integers(len(SIZES)))], cell,
                                   scene.image_size))
            elif not keep and has:
                objs = [o for o in objs if o.shape != partner]
        if len(objs) == len(scene.objects) and all(a is b for a, b in zip(objs, scene.objects)):
            return scene
        return Scene(tuple(sorted(objs, key=lambda o: POSITIONS.index(o.position))), scene.image_size, scene.seed)

    def cases(self, scene: Scene) -> List[Tuple[str, str]]:
        """The ``(trigger, partner)`` pairs whose trigger shape ``scene`` has and whose partner it lacks: where the
        prior predicts an object that is not there."""
        shapes = scene.shapes()
        return [(t, q) for t, q in self.pairs if t in shapes and q not in shapes]


DEFAULT_PRIOR = CooccurrencePrior()


def cooccurrence(scenes: Sequence[Scene], pairs: Sequence[Tuple[str, str]] = DEFAULT_PRIOR_PAIRS
                 ) -> Dict[str, Dict[str, float]]:
    """Per pair ``"trigger->partner"``: ``n_trigger`` (scenes with the trigger shape), ``p_partner_given_trigger``,
    ``p_partner_given_no_trigger`` and ``n_broken`` (trigger without partner). A 0/0 ratio is 0."""
    out: Dict[str, Dict[str, float]] = {}
    for t, q in pairs:
        with_t = [s for s in scenes if t in s.shapes()]
        without = [s for s in scenes if t not in s.shapes()]
        both = sum(q in s.shapes() for s in with_t)
        alone = sum(q in s.shapes() for s in without)
        out[f"{t}->{q}"] = {
            "n_trigger": float(len(with_t)),
            "p_partner_given_trigger": both / len(with_t) if with_t else 0.0,
            "p_partner_given_no_trigger": alone / len(without) if without else 0.0,
            "n_broken": float(len(with_t) - both),
        }
    return out

