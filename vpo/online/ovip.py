"""OViP's online loop (docs/methods.md, OViP; paper 002, Sec. 2.2, Algorithm 1, App. F): sample, judge, pair, negate,
buffer.

One online step over ``B`` (image ``I⁺``, prompt ``Q``, ground truth ``A*``) examples:

1. **Sample** ``k`` responses per prompt from the current policy (:func:`vpo.online.sample_responses`; seeded, keyed
   per example). Empty responses are dropped (the collator could not train on them).
2. **Judge** each distinct response of a prompt once with ``G_r(A, A*) ∈ [0, 10]`` (:mod:`vpo.online.judges`); a
   duplicate gets its first copy's score, so ``σ_r`` still counts every sample. Responses scored ``nan`` (a judge
   with ``errors="nan"``) are left out.
3. **Pair** with :func:`select_pairs` (below).
4. **Negate**: one negative image per pair from ``(Q, A⁺, A⁻, I⁺)`` (:mod:`vpo.online.negatives`).
5. **Buffer**: the new records go into the :class:`ExperienceBuffer`; once it holds ``N`` the step returns ``N`` of
   them (oldest first) for training and keeps the rest.

Pair filtering (:func:`select_pairs`), exactly. Given scores ``r_1..r_k``:

- ``σ_r`` = the standard deviation of all ``k`` scores: population (``ddof = 0``, numpy's default and the paper's
  plain "standard deviation") by default, or sample (``ddof = 1``; 0 for ``k = 1``) with ``std="sample"``. It and the
  margin ``m = max(δ, 2 σ_r)`` are computed ONCE, before any pair is taken (Algorithm 1, lines 983-986).
- Greedy: while the pool holds a pair with ``r⁺ − r⁻ > m``, ``r⁺ > τ_pos`` and ``r⁻ < τ_neg``, take the HIGHEST
  remaining score as ``A⁺`` and the LOWEST remaining as ``A⁻`` and remove both from the pool. (The max/min pair
  satisfies the conditions whenever any pair does, so this is Algorithm 1's "while ∃ a pair" with a definite order:
  the most contrasted pairs first.) Ties go to the earlier sample. The paper's ``|r⁺ − r⁻|`` is taken signed
  (``A⁺`` must score higher), which only matters if ``τ_pos < τ_neg``.
- Fallback: if no pair was taken and ``min r < τ_neg``, pair the ground truth ``A*`` (as ``A⁺``) with the
  lowest-scored response (the earliest on ties). No margin applies to it.
- Defaults: δ = 3, τ_pos = τ_neg = 5 (so ``A⁺`` scores >= 6 and ``A⁻`` <= 4 on integer scores), as the paper.

A consequence of the ``2 σ_r`` term worth knowing: strongly bimodal scores block pairing (half 10s and half 0s give
``σ_r = 5``, ``m = 10``, and no difference exceeds 10), so such prompts fall back to ``A*``.

The records (:class:`vpo.data.PreferenceRecord`) hold in-memory PIL images (``image`` = ``I⁺``, ``neg_image`` =
``I⁻``), which :class:`vpo.data.PreferenceCollator` (``method="ovip"``) takes as they are;
:func:`~vpo.online.ovip_data.ovip_build_dataset` writes them as a dataset folder (PNG images + JSONL in the ``"vpo"``
layout). Each record's ``extra["ovip"]`` keeps the provenance: ``{"source_id", "chosen_score", "rejected_score",
"from_ground_truth", "sigma", "margin", "k", "seed"}``.

Example:
    >>> import numpy as np
    >>> from vpo.models import tiny_llava
    >>> from vpo.data import build_tiny_processor
    >>> from vpo.online import ExperienceBuffer, ShapesNegativeGenerator, ShapesWorldJudge, ovip_online_step
    >>> from vpo.worlds import shapes
    >>> tiny = tiny_llava()
    >>> processor = build_tiny_processor("llava", tiny=tiny, words=shapes.vocabulary())
    >>> scenes = [shapes.random_scene(np.random.default_rng(i)) for i in range(2)]
    >>> buffer = ExperienceBuffer(2)
    >>> records, stats = ovip_online_step(
    ...     tiny.model, processor, ["describe the image."] * 2, [shapes.render(s) for s in scenes],
    ...     [shapes.describe(s) for s in scenes], judge=ShapesWorldJudge(), negatives=ShapesNegativeGenerator(),
    ...     seed=0, buffer=buffer, contexts=scenes, k=4, max_new_tokens=8)
    >>> len(records), sorted(k for k in stats if k.endswith("_s"))
    (2, ['negatives_s', 'sampling_s', 'scoring_s'])
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from vpo._lazy import lazy_exports
from vpo._validate import check_choice, check_positive
from vpo.online.judges import Judge, JudgeRequest
from vpo.online.negatives import NegativeImageGenerator, NegativeRequest
from vpo.online.sampling import sample_responses, stream_seed

STD_KINDS = ("population", "sample")

# Moved to vpo.online.ovip_data (they use the step below), still importable from here.
__getattr__, __dir__ = lazy_exports(__name__, {name: "vpo.online.ovip_data" for name in (
    "NO_PAIR_PREFIX", "OViPOnlineDataset", "load_prompt_rows", "ovip_build_dataset")})


# ---------------------------------------------------------------------------------------------------- pair filtering
@dataclass(frozen=True)
class SelectedPair:
    """One pair chosen by :func:`select_pairs`.

    Attributes:
        chosen: index of ``A⁺`` among the scores, or ``None`` for the ground truth ``A*`` (the fallback).
        rejected: index of ``A⁻``.
        chosen_score: ``r⁺`` (``None`` for the ground truth).
        rejected_score: ``r⁻``.
    """

    chosen: Optional[int]
    rejected: int
    chosen_score: Optional[float]
    rejected_score: float

    @property
    def from_ground_truth(self) -> bool:
        return self.chosen is None


def score_std(scores: Sequence[float], std: str = "population") -> float:
    """``σ_r``: the population (``ddof=0``) or sample (``ddof=1``; 0 for one score) standard deviation."""
    check_choice("std", std, STD_KINDS)
    n = len(scores)
    if n == 0:
        return 0.0
    mean = math.fsum(scores) / n
    ss = math.fsum((r - mean) ** 2 for r in scores)
    dof = n if std == "population" else n - 1
    return math.sqrt(ss / dof) if dof > 0 else 0.0


def pair_margin(scores: Sequence[float], delta: float = 3.0, std: str = "population") -> float:
    """``m = max(δ, 2 σ_r)``: a pair needs ``r⁺ − r⁻ > m``."""
    return max(float(delta), 2.0 * score_std(scores, std))


def select_pairs(
    scores: Sequence[float],
    *,
    delta: float = 3.0,
    tau_pos: float = 5.0,
    tau_neg: float = 5.0,
    std: str = "population",
    ground_truth_fallback: bool = True,
) -> List[SelectedPair]:
    """OViP's pair filtering on the scores of one prompt's ``k`` responses (exact rules in the module docstring).

    Args:
        scores: ``k`` finite scores (the judge's ``[0, 10]``; any finite numbers work).
        delta: ``δ``, the margin's lower bound (>= 0).
        tau_pos / tau_neg: ``A⁺`` needs ``r⁺ > tau_pos``, ``A⁻`` needs ``r⁻ < tau_neg``.
        std: ``"population"`` or ``"sample"`` standard deviation for ``σ_r``.
        ground_truth_fallback: when no pair is found and ``min r < tau_neg``, pair ``A*`` with the lowest.

    Returns:
        The pairs in the order taken (most contrasted first); a fallback pair has ``chosen=None``.

    Example:
        >>> [(p.chosen, p.rejected) for p in select_pairs([9, 1, 8, 2, 7, 3, 6, 4])]  # σ = 2.74, m = 5.48
        [(0, 1), (2, 3)]
        >>> [(p.chosen, p.rejected) for p in select_pairs([7, 5, 5, 5, 3])]  # σ = 1.26, m = δ = 3: 7 − 3 > 3
        [(0, 4)]
        >>> [(p.chosen, p.rejected) for p in select_pairs([5, 1, 1])]  # no r⁺ > 5: fallback
        [(None, 1)]
    """
    if isinstance(scores, (str, bytes)) or not isinstance(scores, Sequence):
        raise ValueError(f"scores must be a sequence of numbers, got {type(scores).__name__}")
    vals = []
    for i, r in enumerate(scores):
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r):
            raise ValueError(f"scores[{i}] must be a finite number, got {r!r}")
        vals.append(float(r))
    check_positive("delta", delta, allow_zero=True)
    for name, value in (("tau_pos", tau_pos), ("tau_neg", tau_neg)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    check_choice("std", std, STD_KINDS)
    if not vals:
        return []
    m = pair_margin(vals, delta, std)
    # Pool sorted by score, ties by index: pop the best from the front, the worst from the back.
    by_score = sorted(range(len(vals)), key=lambda i: (-vals[i], i))
    pool = deque(by_score)
    pairs: List[SelectedPair] = []
    while len(pool) >= 2:
        hi = pool[0]
        lo = _lowest(pool, vals)
        if not (vals[hi] > tau_pos and vals[lo] < tau_neg and vals[hi] - vals[lo] > m):
            break
        pool.popleft()
        pool.remove(lo)
        pairs.append(SelectedPair(hi, lo, vals[hi], vals[lo]))
    if not pairs and ground_truth_fallback and min(vals) < tau_neg:
        lo = min(range(len(vals)), key=lambda i: (vals[i], i))
        pairs.append(SelectedPair(None, lo, None, vals[lo]))
    return pairs


def _lowest(pool: deque, vals: List[float]) -> int:
    # The pool is sorted by (-score, index): the lowest score is at the back, and among equal lowest scores the
    # earliest index is the first of the trailing run.
    j = len(pool) - 1
    while j > 0 and vals[pool[j - 1]] == vals[pool[-1]]:
        j -= 1
    return pool[j]


# --------------------------------------------------------------------------------------------------- the buffer
class ExperienceBuffer:
    """OViP's experience buffer (App. F): collect records; once it holds ``batch_size`` of them, hand out exactly
    ``batch_size`` for a training step and keep the rest for later steps.

    Order: FIFO — :meth:`take` returns the oldest ``batch_size`` records (the paper "samples N"; taking the oldest
    keeps every record's wait bounded and the run reproducible). Unbounded unless ``max_size`` is given, in which
    case the oldest records beyond it are dropped (counted in :attr:`dropped`).

    Example:
        >>> buf = ExperienceBuffer(3)
        >>> buf.add(["a", "b"]); buf.take() is None
        True
        >>> buf.add(["c", "d"]); buf.take(), len(buf)
        (['a', 'b', 'c'], 1)
    """

    def __init__(self, batch_size: int, *, max_size: Optional[int] = None):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if max_size is not None and (isinstance(max_size, bool) or not isinstance(max_size, int)
                                     or max_size < batch_size):
            raise ValueError(f"max_size must be None or an int >= batch_size ({batch_size}), got {max_size!r}")
        self.batch_size = batch_size
        self.max_size = max_size
        self.dropped = 0
        self._items: deque = deque()

    def __len__(self) -> int:
        return len(self._items)

    @property
    def ready(self) -> bool:
        """Whether :meth:`take` would return a batch."""
        return len(self._items) >= self.batch_size

    def add(self, items: Sequence[Any]) -> None:
        """Append ``items`` (oldest first)."""
        self._items.extend(items)
        if self.max_size is not None:
            while len(self._items) > self.max_size:
                self._items.popleft()
                self.dropped += 1

    def take(self) -> Optional[List[Any]]:
        """The oldest ``batch_size`` items, removed from the buffer; ``None`` while it holds fewer."""
        if not self.ready:
            return None
        return [self._items.popleft() for _ in range(self.batch_size)]

    def clear(self) -> None:
        self._items.clear()


# --------------------------------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class OnlineConfig:
    """The online loop's options (defaults: the paper's).

    Sampling: ``k`` responses per prompt at ``temperature`` (with ``top_k`` / ``top_p``), at most
    ``max_new_tokens`` each, ``sample_batch_size`` prompts per ``generate`` call.
    Filtering: ``delta``, ``tau_pos``, ``tau_neg``, ``std``, ``ground_truth_fallback`` (:func:`select_pairs`).
    """

    k: int = 16
    temperature: float = 1.2
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int = 128
    sample_batch_size: Optional[int] = 8
    delta: float = 3.0
    tau_pos: float = 5.0
    tau_neg: float = 5.0
    std: str = "population"
    ground_truth_fallback: bool = True

    def __post_init__(self):
        for name, lo in (("k", 1), ("max_new_tokens", 1), ("top_k", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
        sbs = self.sample_batch_size
        if sbs is not None and (isinstance(sbs, bool) or not isinstance(sbs, int) or sbs < 1):
            raise ValueError(f"sample_batch_size must be an int >= 1 or None, got {sbs!r}")
        check_positive("temperature", self.temperature, allow_zero=True)
        check_positive("delta", self.delta, allow_zero=True)
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        check_choice("std", self.std, STD_KINDS)

    @classmethod
    def make(cls, config: Optional["OnlineConfig"] = None, **overrides) -> "OnlineConfig":
        """``config`` (default: the defaults) with ``overrides`` applied; an unknown name is a ``ValueError``."""
        if config is not None and not isinstance(config, cls):
            raise ValueError(f"config must be an OnlineConfig, got {type(config).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(overrides) - set(names))
        if unknown:
            raise ValueError(f"unknown online option(s) {unknown}: expected some of {names}")
        return dataclasses.replace(config or cls(), **overrides)


SampleFn = Callable[..., List[List[str]]]


# ------------------------------------------------------------------------------------------------------ one step
def ovip_online_step(
    policy,
    processor,
    prompts: Sequence[str],
    images: Sequence[Any],
    ground_truths: Sequence[Optional[str]],
    *,
    judge: Judge,
    negatives: NegativeImageGenerator,
    seed: int,
    buffer: Optional[ExperienceBuffer] = None,
    contexts: Optional[Sequence[Any]] = None,
    ids: Optional[Sequence[str]] = None,
    keys: Optional[Sequence[Any]] = None,
    sample_fn: Optional[SampleFn] = None,
    config: Optional[OnlineConfig] = None,
    **overrides,
) -> Tuple[List[Any], Dict[str, float]]:
    """One OViP online step (module docstring): sample, judge, pair, make negatives, buffer.

    Args:
        policy: the current policy (a ``transformers`` VLM or a peft model of one).
        processor: its processor (chat template included).
        prompts / images / ground_truths: ``B`` prompts, positive images (PIL) and reference answers ``A*``
            (``None``: no fallback pair for that example).
        judge: a :class:`~vpo.online.judges.Judge` (``ShapesWorldJudge``, ``OpenAIChatJudge``, ...).
        negatives: a :class:`~vpo.online.negatives.NegativeImageGenerator`.
        seed: this step's seed (use a different one every step, e.g. ``stream_seed(run_seed, step)``).
        buffer: an :class:`ExperienceBuffer`; ``None`` returns every new record at once.
        contexts: per example, passed to the judge and the negative generator (e.g. the source row or the
            shapes :class:`~vpo.worlds.shapes.Scene`).
        ids: per example, the source id (default ``"ex{index}"``); record ids are ``"{id}/ovip-{seed}-{n}"``
            (``n`` = the pair's number within its example).
        keys: per example, the key of its sampling stream (default: its index in this call).
        sample_fn: replaces the sampler: ``sample_fn(prompts, images, *, k, seed, keys) -> [[str] * k] * B``
            (e.g. a vLLM client); default :func:`~vpo.online.sample_responses` on ``policy`` with the config.
        config / overrides: an :class:`OnlineConfig` and/or its fields by name (``k=4, temperature=1.0``).

    Returns:
        ``(records, stats)``: the :class:`vpo.data.PreferenceRecord` s to train on now (with a buffer: ``N`` of them
        once it holds ``N``, else ``[]``) and this step's numbers: ``sampling_s``, ``scoring_s``, ``negatives_s``
        (wall seconds), ``prompts``, ``responses``, ``empty_responses``, ``judged`` (distinct responses sent to the
        judge), ``unscored`` (``nan`` scores), ``scored`` / ``score_sum`` / ``mean_score`` (over the scored
        samples, duplicates counted), ``pairs`` (new records), ``fallback_pairs``,
        ``prompts_without_pair``, ``buffer_size`` (after the step), ``returned``.
    """
    from vpo.data.records import PreferenceRecord

    cfg = OnlineConfig.make(config, **overrides)
    prompts, images, ground_truths = list(prompts), list(images), list(ground_truths)
    B = len(prompts)
    for name, seq in (("images", images), ("ground_truths", ground_truths)):
        if len(seq) != B:
            raise ValueError(f"{name} has {len(seq)} items but prompts has {B}: expected one per prompt")
    contexts = [None] * B if contexts is None else list(contexts)
    ids = [f"ex{i}" for i in range(B)] if ids is None else [str(x) for x in ids]
    keys = list(range(B)) if keys is None else list(keys)
    for name, seq in (("contexts", contexts), ("ids", ids), ("keys", keys)):
        if len(seq) != B:
            raise ValueError(f"{name} has {len(seq)} items but prompts has {B}: expected one per prompt")
    if not isinstance(judge, Judge):
        raise ValueError(f"judge must have a score(requests) method, got {type(judge).__name__}")
    if not isinstance(negatives, NegativeImageGenerator):
        raise ValueError(f"negatives must have a generate(requests) method, got {type(negatives).__name__}")

    # 1. sample
    t0 = time.perf_counter()
    if sample_fn is None:
        samples = sample_responses(policy, processor, prompts, images, k=cfg.k, temperature=cfg.temperature,
                                   top_k=cfg.top_k, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens, seed=seed,
                                   keys=keys, batch_size=cfg.sample_batch_size)
    else:
        samples = sample_fn(prompts, images, k=cfg.k, seed=seed, keys=keys)
    if len(samples) != B:
        raise ValueError(f"the sampler returned {len(samples)} response lists for {B} prompts")
    sampling_s = time.perf_counter() - t0

    # 2. judge every distinct non-empty response once
    t0 = time.perf_counter()
    responses: List[List[str]] = []
    requests: List[JudgeRequest] = []
    slot: List[List[int]] = []  # slot[b][i] = index into requests of response i of prompt b
    empty = 0
    for b in range(B):
        texts = [t.strip() for t in samples[b] if isinstance(t, str)]
        empty += len(samples[b]) - sum(bool(t) for t in texts)
        texts = [t for t in texts if t]
        first: Dict[str, int] = {}
        idx = []
        for t in texts:
            if t not in first:
                first[t] = len(requests)
                requests.append(JudgeRequest(prompts[b], t, ground_truths[b] or "", contexts[b]))
            idx.append(first[t])
        responses.append(texts)
        slot.append(idx)
    scores_flat = list(judge.score(requests)) if requests else []
    if len(scores_flat) != len(requests):
        raise ValueError(f"the judge returned {len(scores_flat)} scores for {len(requests)} requests")
    scoring_s = time.perf_counter() - t0

    # 3. pair
    chosen_pairs = []  # (b, chosen text, rejected text, SelectedPair, sigma, margin)
    unscored = fallback = no_pair = 0
    all_scores: List[float] = []
    for b in range(B):
        valid = [i for i, j in enumerate(slot[b]) if _finite(scores_flat[j])]
        unscored += len(slot[b]) - len(valid)
        scores = [float(scores_flat[slot[b][i]]) for i in valid]
        all_scores += scores
        pairs = select_pairs(scores, delta=cfg.delta, tau_pos=cfg.tau_pos, tau_neg=cfg.tau_neg, std=cfg.std,
                             ground_truth_fallback=cfg.ground_truth_fallback and bool(ground_truths[b]))
        sigma, margin = score_std(scores, cfg.std), pair_margin(scores, cfg.delta, cfg.std)
        if not pairs:
            no_pair += 1
        for n, p in enumerate(pairs):
            fallback += p.from_ground_truth
            a_pos = ground_truths[b] if p.chosen is None else responses[b][valid[p.chosen]]
            a_neg = responses[b][valid[p.rejected]]
            chosen_pairs.append((b, n, a_pos, a_neg, p, sigma, margin))

    # 4. negative images (seeded per (step seed, example key, pair number): independent of the batching)
    t0 = time.perf_counter()
    neg_requests = [NegativeRequest(prompts[b], a_pos, a_neg, images[b], contexts[b],
                                    stream_seed("vpo.online.negative", seed, keys[b], n))
                    for b, n, a_pos, a_neg, _, _, _ in chosen_pairs]
    neg_images = list(negatives.generate(neg_requests)) if neg_requests else []
    if len(neg_images) != len(neg_requests):
        raise ValueError(f"the negative generator returned {len(neg_images)} images for {len(neg_requests)} pairs")
    negatives_s = time.perf_counter() - t0

    records = []
    for (b, n, a_pos, a_neg, p, sigma, margin), neg in zip(chosen_pairs, neg_images):
        records.append(PreferenceRecord(
            id=f"{ids[b]}/ovip-{seed}-{n}", image=images[b], prompt=prompts[b], chosen=a_pos, rejected=a_neg,
            neg_image=neg,
            extra={"ovip": {"source_id": ids[b], "chosen_score": p.chosen_score, "rejected_score": p.rejected_score,
                            "from_ground_truth": p.from_ground_truth, "sigma": sigma, "margin": margin,
                            "k": cfg.k, "seed": seed}},
        ))

    # 5. buffer
    if buffer is not None:
        buffer.add(records)
        out = buffer.take() or []
    else:
        out = records
    stats = {
        "sampling_s": sampling_s, "scoring_s": scoring_s, "negatives_s": negatives_s,
        "prompts": float(B), "responses": float(sum(len(s) for s in samples)), "empty_responses": float(empty),
        "judged": float(len(requests)), "unscored": float(unscored),
        "scored": float(len(all_scores)), "score_sum": math.fsum(all_scores),
        "mean_score": math.fsum(all_scores) / len(all_scores) if all_scores else float("nan"),
        "pairs": float(len(records)), "fallback_pairs": float(fallback), "prompts_without_pair": float(no_pair),
        "buffer_size": float(len(buffer)) if buffer is not None else 0.0, "returned": float(len(out)),
    }
    return out, stats


def _finite(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)
