"""Dataset writers: preference pairs, SFT examples and held-out evaluation sets (JSONL + PNG)."""
from __future__ import annotations

import json
import os
import zlib
from typing import Dict, Iterable, List, Mapping, Optional, Sequence

import numpy as np

from vpo._validate import check_choice
from vpo.worlds.shapes.captions import describe
from vpo.worlds.shapes.pairs import make_pair, scene_from_description
from vpo.worlds.shapes.prior import CooccurrencePrior
from vpo.worlds.shapes.questions import pope_questions, yes_no_questions
from vpo.worlds.shapes.scene import Scene, random_scene, render
from vpo.worlds.shapes.vocab import (CAPTION_STYLES, DEFAULT_IMAGE_SIZE, DESCRIBE_PROMPTS, HALLUCINATION_KINDS,
                                     POPE_MODES)


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


def _scene_fields(scene: Scene, clutter: bool, prior: Optional[CooccurrencePrior] = None,
                  prior_p: Optional[float] = None) -> Dict[str, object]:
    meta: Dict[str, object] = {"image_size": scene.image_size, "seed": scene.seed, "clutter": clutter}
    if prior is not None:
        meta["prior"] = {**prior.to_dict(), "p": prior_p}
    return {"objects": [o.to_dict() for o in scene.objects], "scene": meta}


def _scene(rng: np.random.Generator, image_size: int, max_objects: int, prior: Optional[CooccurrencePrior],
           prior_p: Optional[float]) -> Scene:
    """A random scene, then (with a prior) :meth:`CooccurrencePrior.apply` at ``prior_p``."""
    scene = random_scene(rng, image_size=image_size, max_objects=max_objects)
    return prior.apply(scene, rng, prior_p) if prior is not None else scene


def _prior_p(prior: Optional[CooccurrencePrior], prior_p: Optional[float], default: str) -> Optional[float]:
    if prior is None:
        if prior_p is not None:
            raise ValueError("prior_p needs prior (a CooccurrencePrior)")
        return None
    if not isinstance(prior, CooccurrencePrior):
        raise ValueError(f"prior must be a CooccurrencePrior, got {type(prior).__name__}")
    p = getattr(prior, default) if prior_p is None else prior_p
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
        raise ValueError(f"prior_p must be a probability in [0, 1], got {p!r}")
    return float(p)


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
    prior: Optional[CooccurrencePrior] = None,
    prior_p: Optional[float] = None,
    prior_pair_prob: float = 1.0,
    style: str = "count",
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
    ``"random"`` = a fresh layout (:func:`scene_from_description`). ``kinds``: the kinds drawn from (of
    :data:`PAIR_KINDS`, ``"prior"`` excepted: that one comes with ``prior``).

    With a ``prior`` (:class:`~vpo.worlds.shapes.prior.CooccurrencePrior`): each scene goes through
    ``prior.apply(scene, rng, prior_p)`` (``prior_p`` default ``prior.held_out_p``: the pairs are collected where the
    prior fails); with probability ``prior_pair_prob`` a scene where the prior predicts an absent object gets the
    prior's hallucination (kind ``"prior"``), and a scene with a trigger AND its partner gets the partner left out
    of the rejected caption (kind ``"omission"``): together they reward mentioning the partner exactly when it is
    seen. Other scenes get a kind of ``kinds``. ``style``: the captions' grammar (``"count"`` or ``"chain"``,
    :func:`describe`). Without a prior the records are
    byte-identical to what they were before priors existed. Returns the JSONL path.
    """
    check_choice("neg_image", neg_image, ("edit", "random"))
    prior_p = _prior_p(prior, prior_p, "held_out_p")
    if isinstance(prior_pair_prob, bool) or not isinstance(prior_pair_prob, (int, float)) \
            or not 0.0 <= prior_pair_prob <= 1.0:
        raise ValueError(f"prior_pair_prob must be a probability in [0, 1], got {prior_pair_prob!r}")
    for k in kinds:
        check_choice("kinds", k, ("absent", "color", "count", "omission"))
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rows = []
    for i in range(n):
        rng = record_rng(seed, split, i)
        scene = _scene(rng, image_size, max_objects, prior, prior_p)
        kind = kinds[int(rng.integers(len(kinds)))]
        if prior is not None and rng.random() < prior_pair_prob:
            shapes = scene.shapes()
            if prior.cases(scene):
                kind = "prior"
            elif any(t in shapes and q in shapes for t, q in prior.pairs) and len(scene.counts()) > 1:
                kind = "omission"
        pair = make_pair(scene, rng, kind=kind, prior=prior, style=style)
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
            **_scene_fields(scene, clutter, prior, prior_p),
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
    prior: Optional[CooccurrencePrior] = None,
    prior_p: Optional[float] = None,
) -> str:
    """Write supervised examples for ``n`` images to ``root/{split}.jsonl`` (images in ``root/images/{split}/``):
    per image, one caption example (``prompt`` = a describe prompt, ``response`` = :func:`describe`) then
    ``questions_per_image`` yes and as many no existence questions (``response`` = ``"yes"`` / ``"no"``; random
    negatives). One line: ``{"id", "image", "prompt", "response", "objects", "scene"}``. With a ``prior``, every
    scene goes through ``prior.apply(scene, rng, prior_p)`` (``prior_p`` default ``prior.strength``: the split the
    prior is learned from). Returns the JSONL path."""
    check_choice("style", style, CAPTION_STYLES)
    prior_p = _prior_p(prior, prior_p, "strength")
    rows = []
    for i in range(n):
        rng = record_rng(seed, split, i)
        scene = _scene(rng, image_size, max_objects, prior, prior_p)
        img_rel = f"images/{split}/{i:06d}.png"
        _save_png(render(scene, clutter=clutter), os.path.join(root, img_rel))
        meta = _scene_fields(scene, clutter, prior, prior_p)
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
    prior: Optional[CooccurrencePrior] = None,
    prior_p: Optional[float] = None,
) -> Dict[str, str]:
    """Held-out evaluation data: ``n`` images in ``root/images/{split}/``; ``root/{split}_captions.jsonl`` with one
    line per image ``{"id", "image", "prompt": DESCRIBE_PROMPTS[0], "objects", "scene"}``; and
    ``root/{split}_pope.jsonl`` with the POPE questions of every mode in ``pope_modes``
    ``{"id", "image", "prompt", "answer", "mode", "color", "shape", "scene_index"}`` (``mode`` = the setting the
    question belongs to; positives are repeated in every setting, as in POPE). Use a ``split`` name other than the
    training split's: the record generators are keyed by split, so the images differ. Returns
    ``{"captions": path, "pope": path}``.

    With a ``prior``, every scene goes through ``prior.apply(scene, rng, prior_p)`` (``prior_p`` default
    ``prior.held_out_p``: the pattern is broken, so the prior's hallucinations can be counted) and the records carry
    ``scene.prior`` (the pairs the metrics' prior-triggered CHAIR reads)."""
    for m in pope_modes:
        check_choice("pope_modes", m, POPE_MODES)
    prior_p = _prior_p(prior, prior_p, "held_out_p")
    scenes, cap_rows = [], []
    for i in range(n):
        rng = record_rng(seed, split, i)
        scene = _scene(rng, image_size, max_objects, prior, prior_p)
        scenes.append(scene)
        img_rel = f"images/{split}/{i:06d}.png"
        _save_png(render(scene, clutter=clutter), os.path.join(root, img_rel))
        cap_rows.append({"id": f"shapes-{split}-{i:06d}", "image": img_rel, "prompt": DESCRIBE_PROMPTS[0],
                         **_scene_fields(scene, clutter, prior, prior_p)})
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
