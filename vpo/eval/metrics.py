"""Hallucination metrics on the shapes world (:mod:`vpo.worlds.shapes`): CHAIR, POPE and coverage.

Responses are read with :func:`vpo.worlds.shapes.parse_description`: every shape word is one object *mention*, with the
color and count words just before it (``"two blue squares"`` is ONE mention: count 2, blue, square). Ground truth is a
scene's objects. Definitions (sums run over all responses; "micro" averages):

CHAIR (Rohrbach et al. 2018), object level — the object category is the SHAPE:

- a mention is *hallucinated* if the scene has no object of its shape;
- ``chair_i`` = hallucinated mentions / all mentions; ``chair_s`` = fraction of responses with >= 1 hallucinated
  mention. A response with no mention adds nothing to ``chair_i`` and counts as not hallucinated in ``chair_s``.

Attribute level (the errors CHAIR cannot see: right shape, wrong color):

- a mention is an *attribute hallucination* if it names a color, the scene has its shape, but no object of that
  (color, shape); ``attr_i`` = attribute hallucinations / all mentions; ``attr_s`` = fraction of responses with one.
- ``pair_i`` / ``pair_s``: the same with "the scene has no object of the mentioned (color, shape)", i.e. object OR
  attribute hallucination (a mention without a color counts by its shape alone).

Count: per response, the mentioned total of each (color, shape) the scene has (the counts of its mentions added up;
a bare plural counts 1); ``count_error`` = mentioned-and-present kinds whose total differs from the truth / all
mentioned-and-present kinds.

Coverage (recall of the ground truth): ``coverage`` = present (color, shape) kinds the response mentions / all present
kinds; ``instance_coverage`` = Σ min(mentioned total, true count) / number of objects.

POPE (Li et al. 2023) on yes/no answers: an answer's first word ``yes`` or ``no`` (whole words, case-insensitive) is
its prediction; an answer with neither is *unparsed*: it is wrong (never a true positive nor a true negative) and is
counted. With "yes" the positive class: ``accuracy`` = (TP + TN) / N, ``precision`` = TP / (TP + FP),
``recall`` = TP / (TP + FN) where FN = positives not answered yes (unparsed included), ``f1`` = 2PR / (P + R),
``yes_ratio`` = answers parsed as yes / N, ``unparsed`` = the count. A 0/0 ratio is 0.

Example:
    >>> from vpo.worlds.shapes import Scene, Obj
    >>> scene = Scene((Obj("circle", "red", "small", "left", (1, 22, 11, 32)),))
    >>> m = chair(["a red circle and a blue square."], [scene])
    >>> m.chair_i, m.chair_s, m.coverage
    (0.5, 1.0, 1.0)
"""
from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from vpo.worlds.shapes import Mention, Obj, Scene, mention_counts, parse_description

SceneLike = Union[Scene, Sequence[Obj], Sequence[Mapping], Mapping]

_YES_NO = re.compile(r"\b(yes|no)\b", re.IGNORECASE)


def _ratio(a: float, b: float) -> float:
    return a / b if b else 0.0


def _kinds(scene: SceneLike) -> Counter:
    """``Counter`` of ``(color, shape) -> count`` of a Scene, a list of Obj / object dicts, or a record with
    ``"objects"``."""
    if isinstance(scene, Scene):
        return scene.counts()
    if isinstance(scene, Mapping):
        if "objects" not in scene:
            raise ValueError(f"a scene given as a mapping must have an 'objects' list, got keys {sorted(scene)}")
        scene = scene["objects"]
    out: Counter = Counter()
    for o in scene:
        if isinstance(o, Obj):
            out[o.kind] += 1
        elif isinstance(o, Mapping):
            out[(o["color"], o["shape"])] += 1
        else:
            raise ValueError(f"scene objects must be shapes.Obj or dicts with 'color' and 'shape', got "
                             f"{type(o).__name__}")
    return out


@dataclass(frozen=True)
class ResponseScore:
    """The metric counts of one response (see the module docstring)."""

    mentions: Tuple[Mention, ...]
    hallucinated: Tuple[Mention, ...]  # object level: shape absent
    attribute: Tuple[Mention, ...]  # shape present, (color, shape) absent
    count_errors: int  # of the covered kinds, those whose mentioned total is wrong
    covered_kinds: int  # present kinds the response mentions (also the count_error denominator)
    true_kinds: int
    covered_objects: int
    true_objects: int


@dataclass(frozen=True)
class ChairResult:
    """CHAIR, attribute, count and coverage metrics over a set of responses (module docstring), and per response."""

    chair_i: float
    chair_s: float
    attr_i: float
    attr_s: float
    pair_i: float
    pair_s: float
    count_error: float
    coverage: float
    instance_coverage: float
    num_responses: int
    num_mentions: int
    chair_i_se: float = 0.0  # binomial standard error of chair_i: sqrt(chair_i (1 - chair_i) / num_mentions)
    per_response: Tuple[ResponseScore, ...] = field(repr=False, default=())

    def to_dict(self) -> Dict[str, float]:
        """The aggregate numbers (no per-response detail), e.g. for JSON."""
        d = asdict(self)
        d.pop("per_response")
        return d


def score_response(response: str, scene: SceneLike) -> ResponseScore:
    """The counts behind :func:`chair` for one response."""
    truth = _kinds(scene)
    shapes = {s for _, s in truth}
    mentions = tuple(parse_description(response))
    halluc = tuple(m for m in mentions if m.shape not in shapes)
    attr = tuple(m for m in mentions if m.shape in shapes and m.color is not None and (m.color, m.shape) not in truth)
    said = mention_counts(mentions)
    present_said = [k for k in said if truth[k]]
    return ResponseScore(
        mentions=mentions,
        hallucinated=halluc,
        attribute=attr,
        count_errors=sum(said[k] != truth[k] for k in present_said),
        covered_kinds=len(present_said),
        true_kinds=len(truth),
        covered_objects=sum(min(said[k], truth[k]) for k in present_said),
        true_objects=sum(truth.values()),
    )


def chair(responses: Sequence[str], scenes: Sequence[SceneLike]) -> ChairResult:
    """CHAIR_i / CHAIR_s, attribute and (color, shape) hallucination, count error and coverage of ``responses``
    (one per scene). Definitions in the module docstring.

    Args:
        responses: generated texts.
        scenes: the ground truth of each, as :class:`~vpo.worlds.shapes.Scene`, a list of objects, or a dataset
            record with ``"objects"``.
    """
    if isinstance(responses, str):
        raise ValueError("responses must be a sequence of strings, got a single str")
    if len(responses) != len(scenes):
        raise ValueError(f"responses has {len(responses)} items but scenes has {len(scenes)}: expected one scene "
                         f"per response")
    per = tuple(score_response(r, s) for r, s in zip(responses, scenes))
    n = len(per)
    mentions = sum(len(p.mentions) for p in per)
    n_h = sum(len(p.hallucinated) for p in per)
    n_a = sum(len(p.attribute) for p in per)
    return ChairResult(
        chair_i=_ratio(n_h, mentions),
        chair_s=_ratio(sum(bool(p.hallucinated) for p in per), n),
        attr_i=_ratio(n_a, mentions),
        attr_s=_ratio(sum(bool(p.attribute) for p in per), n),
        pair_i=_ratio(n_h + n_a, mentions),
        pair_s=_ratio(sum(bool(p.hallucinated or p.attribute) for p in per), n),
        count_error=_ratio(sum(p.count_errors for p in per), sum(p.covered_kinds for p in per)),
        coverage=_ratio(sum(p.covered_kinds for p in per), sum(p.true_kinds for p in per)),
        instance_coverage=_ratio(sum(p.covered_objects for p in per), sum(p.true_objects for p in per)),
        num_responses=n,
        num_mentions=mentions,
        chair_i_se=binomial_se(_ratio(n_h, mentions), mentions),
        per_response=per,
    )


def binomial_se(p: float, n: int) -> float:
    """``sqrt(p (1 - p) / n)``, the standard error of a proportion ``p`` over ``n`` trials (0 when ``n`` is 0)."""
    return math.sqrt(max(p * (1.0 - p), 0.0) / n) if n else 0.0


@dataclass(frozen=True)
class PriorResult:
    """The language prior's hallucinations (:mod:`vpo.worlds.shapes.prior`) over a set of responses.

    A *prior-triggered mention* is a mention of a partner shape in a response whose scene has that partner's trigger
    shape (where the prior pushes the model to mention it). ``chair_prior`` = the prior-triggered mentions whose
    shape is absent / all prior-triggered mentions (CHAIR_i restricted to them; a model that says the partner
    whenever it sees the trigger scores the split's P(partner absent | trigger)); ``chair_prior_se`` its binomial
    standard error. A *case* is a (scene, pair) with the trigger present and the partner absent; ``prior_rate`` =
    cases whose response mentions the partner / cases (0/0 is 0).
    """

    chair_prior: float
    chair_prior_se: float
    prior_rate: float
    prior_rate_se: float
    num_prior_mentions: int
    num_prior_hallucinated: int
    num_cases: int
    num_cases_mentioned: int

    def to_dict(self) -> Dict[str, float]:
        return asdict(self)


def prior_chair(responses: Sequence[str], scenes: Sequence[SceneLike],
                pairs: Sequence[Tuple[str, str]]) -> PriorResult:
    """:class:`PriorResult` of ``responses`` (one per scene) for the ``(trigger, partner)`` shape ``pairs``."""
    if isinstance(responses, str):
        raise ValueError("responses must be a sequence of strings, got a single str")
    if len(responses) != len(scenes):
        raise ValueError(f"responses has {len(responses)} items but scenes has {len(scenes)}: expected one scene "
                         f"per response")
    pairs = [tuple(p) for p in pairs]
    if not pairs or any(len(p) != 2 for p in pairs):
        raise ValueError(f"pairs must be a non-empty list of (trigger, partner) shapes, got {pairs!r}")
    mentions = halluc = cases = mentioned = 0
    for response, scene in zip(responses, scenes):
        shapes = {s for _, s in _kinds(scene)}
        said = [m.shape for m in parse_description(response)]
        for trigger, partner in pairs:
            if trigger not in shapes:
                continue
            k = said.count(partner)
            mentions += k
            if partner not in shapes:
                halluc += k
                cases += 1
                mentioned += k > 0
    cp, rate = _ratio(halluc, mentions), _ratio(mentioned, cases)
    return PriorResult(chair_prior=cp, chair_prior_se=binomial_se(cp, mentions), prior_rate=rate,
                       prior_rate_se=binomial_se(rate, cases), num_prior_mentions=mentions,
                       num_prior_hallucinated=halluc, num_cases=cases, num_cases_mentioned=mentioned)


def coverage(responses: Sequence[str], scenes: Sequence[SceneLike]) -> float:
    """Present (color, shape) kinds mentioned / all present kinds, over all responses (see :func:`chair`)."""
    return chair(responses, scenes).coverage


def parse_yes_no(answer: str) -> Optional[str]:
    """``"yes"`` or ``"no"``: the first whole word ``yes`` or ``no`` of ``answer`` (case-insensitive); else None.

    >>> parse_yes_no("Yes, there is."), parse_yes_no("No."), parse_yes_no("nope, yesterday"), parse_yes_no("no yes")
    ('yes', 'no', None, 'no')
    """
    m = _YES_NO.search(answer or "")
    return m.group(1).lower() if m else None


@dataclass(frozen=True)
class PopeResult:
    accuracy: float
    precision: float
    recall: float
    f1: float
    yes_ratio: float
    unparsed: int
    num_questions: int
    tp: int
    fp: int
    tn: int
    fn: int

    def to_dict(self) -> Dict[str, float]:
        return asdict(self)


def _gold(q: Any) -> str:
    a = q if isinstance(q, str) else (q["answer"] if isinstance(q, Mapping) else getattr(q, "answer", None))
    if not isinstance(a, str) or a.lower() not in ("yes", "no"):
        raise ValueError(f"each question must be 'yes'/'no', a Question or a dict with answer 'yes'/'no', got {q!r}")
    return a.lower()


def pope(answers: Sequence[str], questions: Sequence[Any]) -> PopeResult:
    """POPE accuracy, precision, recall, F1 and yes-ratio of yes/no ``answers`` (module docstring).

    Args:
        answers: the model's texts, one per question.
        questions: the gold answers: :class:`~vpo.worlds.shapes.Question`, dicts with ``"answer"``, or the strings
            ``"yes"`` / ``"no"``.
    """
    if isinstance(answers, str):
        raise ValueError("answers must be a sequence of strings, got a single str")
    if len(answers) != len(questions):
        raise ValueError(f"answers has {len(answers)} items but questions has {len(questions)}: expected one answer "
                         f"per question")
    tp = fp = tn = fn = unparsed = yes = 0
    for a, q in zip(answers, questions):
        gold, pred = _gold(q), parse_yes_no(a)
        unparsed += pred is None
        yes += pred == "yes"
        if gold == "yes":
            tp += pred == "yes"
            fn += pred != "yes"
        else:
            tn += pred == "no"
            fp += pred == "yes"
    n = len(answers)
    p, r = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    return PopeResult(accuracy=_ratio(tp + tn, n), precision=p, recall=r, f1=_ratio(2 * p * r, p + r),
                      yes_ratio=_ratio(yes, n), unparsed=unparsed, num_questions=n, tp=tp, fp=fp, tn=tn, fn=fn)


# ---------------------------------------------------------------------------------------------------------- driver
GenerateFn = Callable[[List[str], List[Any]], List[str]]


def _batched(generate_fn: GenerateFn, prompts: List[str], images: List[Any], batch_size: int) -> List[str]:
    out: List[str] = []
    for i in range(0, len(prompts), batch_size):
        texts = list(generate_fn(prompts[i:i + batch_size], images[i:i + batch_size]))
        if len(texts) != len(prompts[i:i + batch_size]):
            raise ValueError(f"generate_fn returned {len(texts)} texts for {len(prompts[i:i + batch_size])} prompts")
        out.extend(texts)
    return out


def evaluate_model(
    generate_fn: GenerateFn,
    scenes: Sequence[Scene],
    *,
    questions: Optional[Sequence[Any]] = None,
    images: Optional[Sequence[Any]] = None,
    prompt: Optional[str] = None,
    batch_size: int = 16,
    clutter: bool = False,
    prior_pairs: Optional[Sequence[Tuple[str, str]]] = None,
) -> Dict[str, Any]:
    """Evaluate a model given as ``generate_fn(prompts, images) -> texts`` (a list of prompt strings and a list of
    PIL images of the same length; returns one text per prompt, greedy decoding recommended).

    Describes every scene (``prompt``, default ``DESCRIBE_PROMPTS[0]``) and scores :func:`chair`; if ``questions``
    is given (:class:`~vpo.worlds.shapes.Question` with ``scene_index``, or dicts with ``"prompt"``, ``"answer"``,
    ``"scene_index"`` and optionally ``"mode"``), asks them and scores :func:`pope` overall and per ``mode`` (the
    question's ``mode``).

    ``images``: the images of ``scenes`` (default: rendered with ``clutter``). ``prior_pairs``: the language prior's
    ``(trigger, partner)`` shape pairs; when given the report has ``"prior"`` (:func:`prior_chair`).

    Returns ``{"chair": {...}, "prior": {...}?, "pope": {...}, "pope/<mode>": {...}, "samples": [...],
    "per_image": {...}}`` (JSON-serializable; the first 8 responses under ``"samples"``; ``"per_image"``: each image's
    mention, hallucination and coverage counts, :func:`vpo.eval.paired.per_image`, for paired statistics).
    """
    from vpo.worlds.shapes import DESCRIBE_PROMPTS, render

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    scenes = list(scenes)
    if images is None:
        images = [render(s, clutter=clutter) for s in scenes]
    elif len(images) != len(scenes):
        raise ValueError(f"images has {len(images)} items but scenes has {len(scenes)}: expected one per scene")
    images = list(images)
    prompt = DESCRIBE_PROMPTS[0] if prompt is None else prompt
    captions = _batched(generate_fn, [prompt] * len(scenes), images, batch_size)
    scored = chair(captions, scenes)
    report: Dict[str, Any] = {"chair": scored.to_dict()}
    from vpo.eval.paired import per_image

    report["per_image"] = per_image(scored.per_response)  # the counts behind the paired statistics
    if prior_pairs:
        report["prior"] = prior_chair(captions, scenes, prior_pairs).to_dict()
    report["samples"] = [{"response": c, "objects": [o.to_dict() for o in s.objects]}
                         for c, s in list(zip(captions, scenes))[:8]]
    if questions:
        qs = list(questions)
        idx = [q["scene_index"] if isinstance(q, Mapping) else q.scene_index for q in qs]
        if any(i is None or not 0 <= i < len(scenes) for i in idx):
            raise ValueError(f"every question needs a scene_index in [0, {len(scenes)}), got {sorted(set(idx))[:5]}")
        qp = [q["prompt"] if isinstance(q, Mapping) else q.prompt for q in qs]
        answers = _batched(generate_fn, qp, [images[i] for i in idx], batch_size)
        report["pope"] = pope(answers, qs).to_dict()
        modes = [q.get("mode") if isinstance(q, Mapping) else q.mode for q in qs]
        for m in sorted({m for m in modes if m is not None}):
            keep = [j for j, q in enumerate(qs) if modes[j] == m]
            report[f"pope/{m}"] = pope([answers[j] for j in keep], [qs[j] for j in keep]).to_dict()
    return report


def evaluate_dir(
    generate_fn: GenerateFn,
    data_dir: str,
    split: str = "test",
    *,
    batch_size: int = 16,
    limit: Optional[int] = None,
    pope: bool = True,
) -> Dict[str, Any]:
    """:func:`evaluate_model` on the files :func:`vpo.worlds.shapes.make_eval_dataset` wrote to ``data_dir``
    (``{split}_captions.jsonl`` and, if present and ``pope``, ``{split}_pope.jsonl``; images read from disk).
    ``limit``: the first N images only (and their questions). Records written with a language prior
    (``scene.prior.pairs``) get the prior-triggered metrics too (:func:`prior_chair`)."""
    import os

    from vpo.worlds.shapes import read_jsonl

    from PIL import Image

    cap_path = os.path.join(data_dir, f"{split}_captions.jsonl")
    if not os.path.exists(cap_path):
        raise ValueError(f"data_dir {data_dir!r} has no {split}_captions.jsonl: write it with "
                         f"vpo.worlds.shapes.make_eval_dataset(data_dir, n, seed, split={split!r})")
    rows = read_jsonl(cap_path)[:limit]
    scenes = [Scene.from_dict(r) for r in rows]
    images = []
    for r in rows:
        with Image.open(os.path.join(data_dir, r["image"])) as im:
            images.append(im.convert("RGB"))
    prompt = rows[0]["prompt"] if rows else None
    pope_path = os.path.join(data_dir, f"{split}_pope.jsonl")
    questions = None
    if pope and os.path.exists(pope_path):
        questions = [q for q in read_jsonl(pope_path) if q["scene_index"] < len(scenes)]
    prior = (rows[0].get("scene") or {}).get("prior") if rows else None
    return evaluate_model(generate_fn, scenes, questions=questions, images=images, prompt=prompt,
                          batch_size=batch_size, prior_pairs=prior["pairs"] if prior else None)


def format_report(report: Mapping[str, Any]) -> str:
    """A few aligned lines of an :func:`evaluate_model` report, for a terminal."""
    lines = []
    c = report.get("chair")
    if c:
        lines.append(f"captions ({c['num_responses']}, {c['num_mentions']} mentions): "
                     f"CHAIR_i {c['chair_i']:.3f}  CHAIR_s {c['chair_s']:.3f}  attr_i {c['attr_i']:.3f}  "
                     f"count_err {c['count_error']:.3f}  coverage {c['coverage']:.3f}")
    pr = report.get("prior")
    if pr:
        lines.append(f"prior ({pr['num_prior_mentions']} prior-triggered mentions, {pr['num_cases']} cases): "
                     f"CHAIR_prior {pr['chair_prior']:.3f}  prior_rate {pr['prior_rate']:.3f}")
    for key in sorted(k for k in report if k == "pope" or k.startswith("pope/")):
        p = report[key]
        lines.append(f"{key:<17} ({p['num_questions']}): acc {p['accuracy']:.3f}  P {p['precision']:.3f}  "
                     f"R {p['recall']:.3f}  F1 {p['f1']:.3f}  yes {p['yes_ratio']:.3f}  unparsed {p['unparsed']}")
    return "\n".join(lines)
