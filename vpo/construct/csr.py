"""CSR's preference data (SPEC.md, CSR; paper 003): sentence-level beam search under a calibrated reward, and the
iterative loop.

The search (the paper's Algorithm 1). A response grows one sentence per round. In each round every active path (beam)
proposes ``num_candidates`` next sentences — a token-level beam search of width ``token_beams`` that ends a sentence at
a sentence-end token (``"."``), at the end of the response (the tokenizer's eos / the chat template's end-of-turn), or
after ``max_new_tokens`` tokens — and each sentence ``s`` is scored:

- ``R_T(s) = Π_o P(r_o | ...)``, the product of its tokens' probabilities (the stop token included);
  ``language_score="logprob"`` uses ``Σ log P`` and ``"mean_logprob"`` ``Σ log P / |s|`` (the length-normalized beam
  score the CSR code ranks by) instead;
- ``R_I(s)`` from an :class:`ImageTextScorer` (CLIP: ``max(100 cos(F_I(v), F_T(s)), 0)``, in ``[0, 100]``);
- ``R(s) = λ R_I(s) + (1 - λ) R_T(s)``, ``λ = 0.9``.

A path's reward depends on ``mode``:

- ``"score"`` (the paper): ``R(y) = Σ_s R(s)``.
- ``"rank"`` (the CSR code): among the sentences proposed from the same parent (siblings), ``rank_T`` and ``rank_I``
  are ``(i + 1) / n`` for the sentence at position ``i`` when the ``n`` siblings are sorted by ``R_T`` (resp. ``R_I``)
  descending (ties: proposal order, i.e. by log-probability); ``c(s) = (1 - λ) rank_T + λ rank_I`` (lower is better)
  and ``R(y) = -mean_s c(s)`` (negated so that higher is better in both modes). The code divides the sum by the path
  length counting its root (``n + 1``); here by the number of sentences.

After each round the unfinished paths are sorted by ``R(y)`` and the best ``keep_top`` and the worst ``keep_bottom``
are kept (all of them when there are no more than ``keep_top + keep_bottom``): the paper's "top-k and bottom-k"; the
defaults 1 and 2 are the CSR code's (``num_beams = 5`` -> best ``5//2 - 1``, worst ``5//2``). The code prunes by the
language score alone and adds the CLIP score afterwards; here the mode's calibrated reward prunes, as Algorithm 1 says.
A path is finished when its last sentence ended the response, when it reached ``max_response_tokens`` tokens, or after
``max_sentences`` rounds. Chosen = the finished response with the highest ``R(y)``, rejected = the one with the lowest
(ties: the first proposed); no pair when fewer than two distinct texts or equal rewards.

Sentences whose text is empty (a bare end-of-response token after ``"."``: the common way a response ends) only mark
the end: they add nothing to ``R(y)`` and take no rank. Empty responses are never chosen or rejected.

Exactness. The search is exact — the chosen and rejected are the arg-max and arg-min of ``R(y)`` over every response
the model can produce within the limits — whenever nothing is pruned: ``token_beams`` and ``num_candidates`` cover
every sentence and ``keep_top + keep_bottom`` covers every unfinished path (the test checks this against brute-force
enumeration on a tiny vocabulary).

Models. The search talks to a :class:`TokenLM` (next-token log-probabilities of the response given its prefix, the
image and prompt being bound), so a tiny table can stand in for a model. :class:`VLMTokenLM` wraps a transformers VLM
and its processor, building the prompt with :class:`vpo.data.PreferenceCollator` (the trainer's exact prompt tokens and
vision inputs). Image relevance comes from an :class:`ImageTextScorer`: :class:`ShapesWorldScorer` (exact, from the
shapes world's ground truth) or :class:`CLIPScorer` (a transformers CLIP model from a local folder).

The iterative loop (:func:`csr_iterate`): iteration ``t`` builds data with ``π_{t-1}`` and trains ``π_t`` from it with
``π_{t-1}`` as the reference, through a ``train_fn(dataset_dir, ref_model_path) -> new_model_path`` callable.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Protocol, Sequence, Tuple, runtime_checkable

import torch

from vpo._validate import check_choice, check_range
from vpo.construct._io import (
    load_local_pretrained,
    RECORD_FIELDS,
    ConstructionSummary,
    JsonlWriter,
    check_int,
    check_path,
    data_file,
    image_ref,
    iter_json_rows,
    safe_name,
    skip,
    write_meta,
)

MODES = ("score", "rank")
LANGUAGE_SCORES = ("prob", "logprob", "mean_logprob")
SCORERS = ("shapes", "clip")


# ------------------------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class CSRConfig:
    """Options of the sentence-level beam search (module docstring). Defaults: the paper's and the CSR code's.

    Attributes:
        mode: ``"score"`` (sum of calibrated rewards) or ``"rank"`` (mean sibling rank).
        lam: ``λ``, the weight of ``R_I`` (``1 - λ`` weighs ``R_T``), in [0, 1].
        keep_top / keep_bottom: unfinished paths kept per round, best and worst by ``R(y)``.
        num_candidates: sentences proposed per active path (the paper's ``num_token_beams`` returned sequences).
        token_beams: the token-level beam width inside one sentence.
        max_new_tokens: tokens per sentence (74 in the paper; a longer sentence is cut and continues next round).
        max_sentences: rounds; paths still open after the last one are finished as they are.
        max_response_tokens: tokens per response.
        sentence_end: the strings that end a sentence (each must be one token of the tokenizer).
        language_score: ``R_T`` as ``"prob"`` (``Π P``, the paper), ``"logprob"`` or ``"mean_logprob"``.
    """

    mode: str = "score"
    lam: float = 0.9
    keep_top: int = 1
    keep_bottom: int = 2
    num_candidates: int = 5
    token_beams: int = 5
    max_new_tokens: int = 74
    max_sentences: int = 8
    max_response_tokens: int = 512
    sentence_end: Tuple[str, ...] = (".",)
    language_score: str = "prob"

    def __post_init__(self):
        check_choice("mode", self.mode, MODES)
        check_range("lam", self.lam, 0.0, 1.0)
        check_int("keep_top", self.keep_top, 0)
        check_int("keep_bottom", self.keep_bottom, 0)
        if self.keep_top + self.keep_bottom < 1:
            raise ValueError(f"keep_top + keep_bottom must be >= 1, got {self.keep_top} + {self.keep_bottom}")
        check_int("num_candidates", self.num_candidates, 1)
        check_int("token_beams", self.token_beams, 1)
        check_int("max_new_tokens", self.max_new_tokens, 1)
        check_int("max_sentences", self.max_sentences, 1)
        check_int("max_response_tokens", self.max_response_tokens, 1)
        ends = self.sentence_end
        if isinstance(ends, str) or not isinstance(ends, (tuple, list)) or not all(
                isinstance(s, str) and s for s in ends):
            raise ValueError(f"sentence_end must be a tuple of non-empty strings, got {ends!r}")
        object.__setattr__(self, "sentence_end", tuple(ends))
        check_choice("language_score", self.language_score, LANGUAGE_SCORES)


# ---------------------------------------------------------------------------------------------------- protocols
@runtime_checkable
class TokenLM(Protocol):
    """A language model with its image and prompt bound: what the search needs.

    Attributes:
        eos_token_ids: the tokens that end the response.
    """

    eos_token_ids: Tuple[int, ...]

    def next_logprobs(self, prefixes: Sequence[Sequence[int]]) -> torch.Tensor:
        """``[len(prefixes), V]`` log-probabilities of the next response token after each response prefix."""
        ...

    def decode(self, token_ids: Sequence[int]) -> str:
        """The text of response tokens (end-of-response tokens are never passed)."""
        ...

    def token_id(self, text: str) -> int:
        """The id of a string that is exactly one token (``"."``); ``ValueError`` otherwise."""
        ...


@runtime_checkable
class ImageTextScorer(Protocol):
    """``R_I``: ``scorer(image, texts, record=row) -> [R_I(text) for text in texts]``, each in ``[0, 100]``.

    ``record`` is the source row (scorers that read ground truth use it; CLIP ignores it)."""

    def __call__(self, image, texts: Sequence[str], *, record: Optional[Mapping] = None) -> Sequence[float]: ...


# ------------------------------------------------------------------------------------------------------ rewards
def calibrated_reward(r_i: float, r_t: float, lam: float = 0.9) -> float:
    """``R(s) = λ R_I(s) + (1 - λ) R_T(s)``."""
    return lam * r_i + (1.0 - lam) * r_t


def language_score(logprob: float, num_tokens: int, kind: str = "prob") -> float:
    """``R_T`` of a sentence from its summed token log-probability: ``exp(logprob)`` (``"prob"``), ``logprob`` or
    ``logprob / num_tokens`` (``"mean_logprob"``)."""
    check_choice("language_score", kind, LANGUAGE_SCORES)
    if kind == "prob":
        return math.exp(logprob)
    if kind == "logprob":
        return float(logprob)
    return float(logprob) / max(num_tokens, 1)


def sibling_ranks(values: Sequence[float]) -> List[float]:
    """``(i + 1) / n`` for each value, ``i`` its position when sorted descending (stable: ties keep input order).

    >>> sibling_ranks([0.2, 0.9, 0.5])
    [1.0, 0.3333333333333333, 0.6666666666666666]
    """
    n = len(values)
    order = sorted(range(n), key=lambda j: -values[j])  # sorted() is stable
    out = [0.0] * n
    for pos, j in enumerate(order):
        out[j] = (pos + 1) / n
    return out


def rank_cost(rank_t: float, rank_i: float, lam: float = 0.9) -> float:
    """``c(s) = (1 - λ) rank_T + λ rank_I`` (rank mode; lower is better)."""
    return (1.0 - lam) * rank_t + lam * rank_i


# ------------------------------------------------------------------------------------------------------- search
@dataclass(frozen=True)
class Sentence:
    """A proposed sentence: its tokens (stop token included), summed log-probability and how it ended
    (``"sentence"``: a sentence-end token; ``"eos"``: the end of the response; ``"length"``: ``max_new_tokens``)."""

    token_ids: Tuple[int, ...]
    logprob: float
    end: str


def propose_sentences(
    lm: TokenLM,
    prefix: Sequence[int],
    *,
    sentence_end_ids: Sequence[int],
    eos_ids: Sequence[int],
    num_candidates: int = 5,
    token_beams: int = 5,
    max_new_tokens: int = 74,
) -> List[Sentence]:
    """The ``num_candidates`` most likely next sentences after ``prefix`` by token-level beam search.

    Every step extends the ``token_beams`` best unfinished prefixes by every token; a candidate ending in a stop
    token (sentence end or eos) is finished, the ``token_beams`` best others stay alive; after ``max_new_tokens``
    steps the alive ones are finished as ``"length"``. The search stops early once ``num_candidates`` finished
    sentences all score above every alive one (log-probabilities only decrease). Ties: lower (beam, token) first.

    Returns:
        Up to ``num_candidates`` :class:`Sentence` s, by log-probability descending.
    """
    stops = sorted(set(int(t) for t in sentence_end_ids) | set(int(t) for t in eos_ids))
    eos = set(int(t) for t in eos_ids)
    prefix = tuple(int(t) for t in prefix)
    alive: List[Tuple[Tuple[int, ...], float]] = [((), 0.0)]
    finished: List[Tuple[float, int, Tuple[int, ...], str]] = []  # (logprob, order, tokens, end)
    for step in range(max_new_tokens):
        lp = lm.next_logprobs([prefix + toks for toks, _ in alive])
        if not isinstance(lp, torch.Tensor) or lp.dim() != 2 or lp.shape[0] != len(alive):
            raise ValueError(f"lm.next_logprobs must return a [{len(alive)}, V] tensor, got "
                             f"{getattr(lp, 'shape', type(lp).__name__)}")
        V = lp.shape[1]
        cum = torch.tensor([s for _, s in alive], dtype=torch.float64)         # [n]
        scores = lp.detach().to("cpu", torch.float64) + cum[:, None]          # [n, V]: log P(prefix + token)
        for i, (toks, _) in enumerate(alive):
            for s in stops:
                if s < V and scores[i, s] > -math.inf:
                    end = "eos" if s in eos else "sentence"
                    finished.append((float(scores[i, s]), len(finished), toks + (s,), end))
        cont = scores.clone()
        in_vocab = [s for s in stops if s < V]
        if in_vocab:
            cont[:, in_vocab] = -math.inf
        flat = cont.flatten()
        vals, idx = torch.sort(flat, descending=True, stable=True)
        take = int(min(token_beams, int(torch.isfinite(vals).sum())))
        new_alive = [(alive[int(j) // V][0] + (int(j) % V,), float(v)) for v, j in zip(vals[:take], idx[:take])]
        if step == max_new_tokens - 1:
            finished.extend((s, len(finished) + n, toks, "length") for n, (toks, s) in enumerate(new_alive))
            break
        alive = new_alive
        if not alive:
            break
        if len(finished) >= num_candidates:
            kth = sorted((f[0] for f in finished), reverse=True)[num_candidates - 1]
            if alive[0][1] < kth:
                break
    finished.sort(key=lambda f: (-f[0], f[1]))
    return [Sentence(toks, lp_, end) for lp_, _, toks, end in finished[:num_candidates]]


@dataclass(frozen=True)
class SentenceScore:
    """One sentence of a response: ``text`` (empty for a bare end-of-response), tokens, summed ``logprob``, ``r_t``,
    ``r_i``, ``reward`` = ``R(s)``, and its sibling ranks ``rank_t`` / ``rank_i`` (None for an empty sentence)."""

    text: str
    token_ids: Tuple[int, ...]
    logprob: float
    r_t: Optional[float]
    r_i: Optional[float]
    reward: Optional[float]
    rank_t: Optional[float]
    rank_i: Optional[float]


@dataclass(frozen=True)
class Response:
    """A finished response: ``text``, ``token_ids`` (end-of-response token included when generated), ``reward`` =
    ``R(y)`` of the search's mode, its ``sentences`` and how it ended (``"eos"``, ``"max_response_tokens"``,
    ``"max_sentences"``)."""

    text: str
    token_ids: Tuple[int, ...]
    reward: float
    sentences: Tuple[SentenceScore, ...]
    end: str


@dataclass(frozen=True)
class CSRSearchResult:
    """The outcome of :func:`sentence_beam_search`: ``chosen`` / ``rejected`` (None when there is no pair), every
    finished non-empty response in proposal order, and the number of sentences scored."""

    chosen: Optional[Response]
    rejected: Optional[Response]
    responses: Tuple[Response, ...]
    num_sentences: int

    @property
    def has_pair(self) -> bool:
        return self.chosen is not None and self.rejected is not None


@dataclass(eq=False)
class _Node:
    parent: Optional["_Node"]
    sentence: Optional[SentenceScore]
    end: str
    order: int
    path_len: int = 0
    score_sum: float = 0.0
    cost_sum: float = 0.0
    n_ranked: int = 0
    final: bool = False
    final_end: str = ""

    def reward(self, mode: str) -> float:
        if mode == "score":
            return self.score_sum
        return -self.cost_sum / self.n_ranked if self.n_ranked else -1.0

    def path(self) -> List["_Node"]:
        out, node = [], self
        while node.parent is not None:
            out.append(node)
            node = node.parent
        return out[::-1]

    def tokens(self) -> Tuple[int, ...]:
        return tuple(t for n in self.path() for t in n.sentence.token_ids)


def _resolve_ids(lm: TokenLM, config: CSRConfig, sentence_end_ids, eos_ids) -> Tuple[List[int], List[int]]:
    if sentence_end_ids is None:
        sentence_end_ids = [lm.token_id(s) for s in config.sentence_end]
    if eos_ids is None:
        eos_ids = list(getattr(lm, "eos_token_ids", ()) or ())
    if not eos_ids:
        raise ValueError("eos_ids is empty: the lm must expose eos_token_ids (the tokens that end a response)")
    return [int(t) for t in sentence_end_ids], [int(t) for t in eos_ids]


def sentence_beam_search(
    lm: TokenLM,
    scorer: ImageTextScorer,
    *,
    image=None,
    record: Optional[Mapping] = None,
    config: CSRConfig = CSRConfig(),
    sentence_end_ids: Optional[Sequence[int]] = None,
    eos_ids: Optional[Sequence[int]] = None,
) -> CSRSearchResult:
    """CSR's sentence-level beam search for one (image, prompt) bound in ``lm`` (module docstring).

    Args:
        lm: a :class:`TokenLM` (e.g. :class:`VLMTokenLM`).
        scorer: an :class:`ImageTextScorer` giving ``R_I`` of each sentence.
        image: passed to the scorer.
        record: the source row, passed to the scorer (ground-truth scorers read it).
        config: :class:`CSRConfig`.
        sentence_end_ids: token ids ending a sentence (default: ``lm.token_id`` of ``config.sentence_end``).
        eos_ids: token ids ending the response (default: ``lm.eos_token_ids``).

    Returns:
        A :class:`CSRSearchResult`.
    """
    if not isinstance(config, CSRConfig):
        raise ValueError(f"config must be a CSRConfig, got {type(config).__name__}")
    if not callable(scorer):
        raise ValueError(f"scorer must be an ImageTextScorer (callable), got {type(scorer).__name__}")
    ends, eos = _resolve_ids(lm, config, sentence_end_ids, eos_ids)
    eos_set = set(eos)
    lam, mode = config.lam, config.mode
    root = _Node(parent=None, sentence=None, end="", order=0)
    counter = 1
    active = [root]
    finished: List[_Node] = []
    num_sentences = 0
    for depth in range(config.max_sentences):
        opened: List[_Node] = []
        for parent in active:
            prefix = parent.tokens()
            budget = config.max_response_tokens - len(prefix)
            cands = propose_sentences(lm, prefix, sentence_end_ids=ends, eos_ids=eos,
                                      num_candidates=config.num_candidates, token_beams=config.token_beams,
                                      max_new_tokens=min(config.max_new_tokens, budget))
            texts = [lm.decode([t for t in c.token_ids if t not in eos_set]).strip() for c in cands]
            live = [j for j, t in enumerate(texts) if t]
            r_i: Dict[int, float] = {}
            if live:
                vals = list(scorer(image, [texts[j] for j in live], record=record))
                if len(vals) != len(live) or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in vals):
                    raise ValueError(f"scorer returned {vals!r} for {len(live)} texts: expected one finite R_I each")
                r_i = {j: float(v) for j, v in zip(live, vals)}
            r_t = {j: language_score(cands[j].logprob, len(cands[j].token_ids), config.language_score) for j in live}
            rank_t = dict(zip(live, sibling_ranks([r_t[j] for j in live])))
            rank_i = dict(zip(live, sibling_ranks([r_i[j] for j in live])))
            for j, c in enumerate(cands):
                num_sentences += 1
                ok = j in r_i
                reward = calibrated_reward(r_i[j], r_t[j], lam) if ok else None
                s = SentenceScore(texts[j], c.token_ids, c.logprob, r_t.get(j), r_i.get(j), reward, rank_t.get(j),
                                  rank_i.get(j))
                node = _Node(parent=parent, sentence=s, end=c.end, order=counter,
                             path_len=parent.path_len + len(c.token_ids),
                             score_sum=parent.score_sum + (reward if ok else 0.0),
                             cost_sum=parent.cost_sum + (rank_cost(rank_t[j], rank_i[j], lam) if ok else 0.0),
                             n_ranked=parent.n_ranked + int(ok))
                counter += 1
                if c.end == "eos":
                    node.final, node.final_end = True, "eos"
                elif node.path_len >= config.max_response_tokens:
                    node.final, node.final_end = True, "max_response_tokens"
                (finished if node.final else opened).append(node)
        if depth == config.max_sentences - 1:
            for node in opened:
                node.final, node.final_end = True, "max_sentences"
            finished.extend(opened)
            break
        active = _keep(opened, config)
        if not active:
            break
    return _select(finished, lm, eos_set, mode, num_sentences)


def _keep(nodes: List[_Node], config: CSRConfig) -> List[_Node]:
    """The best ``keep_top`` and worst ``keep_bottom`` by path reward (all when there are no more)."""
    if len(nodes) <= config.keep_top + config.keep_bottom:
        return nodes
    ranked = sorted(nodes, key=lambda n: (-n.reward(config.mode), n.order))
    keep = ranked[: config.keep_top] + (ranked[len(ranked) - config.keep_bottom:] if config.keep_bottom else [])
    return sorted(set(keep), key=lambda n: n.order)


def _select(finished: List[_Node], lm: TokenLM, eos_set, mode: str, num_sentences: int) -> CSRSearchResult:
    responses: List[Response] = []
    for node in sorted(finished, key=lambda n: n.order):
        toks = node.tokens()
        text = lm.decode([t for t in toks if t not in eos_set]).strip()
        if not text:
            continue
        responses.append(Response(text, toks, node.reward(mode), tuple(n.sentence for n in node.path()),
                                  node.final_end))
    if not responses:
        return CSRSearchResult(None, None, (), num_sentences)
    chosen = max(responses, key=lambda r: r.reward)  # max()/min() return the first of equal keys
    others = [r for r in responses if r.text != chosen.text]
    rejected = min(others, key=lambda r: r.reward) if others else None
    if rejected is None or not rejected.reward < chosen.reward:
        return CSRSearchResult(None, None, tuple(responses), num_sentences)
    return CSRSearchResult(chosen, rejected, tuple(responses), num_sentences)


# -------------------------------------------------------------------------------------------------------- scorers
class ShapesWorldScorer:
    """``R_I`` from the shapes world's ground truth (``record["objects"]``), exact and in ``[0, 100]``.

    The text's object mentions (:func:`vpo.worlds.shapes.parse_description`) are checked against the scene: a mention
    is correct when the scene has its shape, its color if it names one, and its count if it gives one (a count is
    compared with the number of objects of that (color, shape), or of that shape when no color is named).

    - ``metric="precision"`` (default): ``R_I = 100 · correct mentions / mentions`` — the share of the text's claims
      that are true;
    - ``metric="f1"``: the F1 of that precision and the recall of the scene's (color, shape) kinds that correct
      mentions cover.

    A text without any mention scores 0 (it carries no visual evidence). The image is not read.
    """

    METRICS = ("precision", "f1")

    def __init__(self, metric: str = "precision"):
        check_choice("metric", metric, self.METRICS)
        self.metric = metric

    def __call__(self, image, texts: Sequence[str], *, record: Optional[Mapping] = None) -> List[float]:
        from collections import Counter

        from vpo.worlds import shapes

        if not isinstance(record, Mapping) or not isinstance(record.get("objects"), list):
            raise ValueError("ShapesWorldScorer needs record= a shapes-world row with an 'objects' list, as the "
                             "vpo.worlds.shapes dataset writers produce")
        kinds = Counter((o["color"], o["shape"]) for o in record["objects"])
        by_shape = Counter(o["shape"] for o in record["objects"])
        out = []
        for text in texts:
            mentions = shapes.parse_description(str(text))
            if not mentions:
                out.append(0.0)
                continue
            covered = set()
            correct = 0
            for m in mentions:
                truth = kinds[(m.color, m.shape)] if m.color is not None else by_shape[m.shape]
                if truth > 0 and (m.count is None or m.count == truth):
                    correct += 1
                    covered.update([(m.color, m.shape)] if m.color is not None else
                                   [k for k in kinds if k[1] == m.shape])
            precision = correct / len(mentions)
            if self.metric == "precision":
                out.append(100.0 * precision)
            else:
                recall = len(covered) / len(kinds) if kinds else 0.0
                f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
                out.append(100.0 * f1)
        return out


class CLIPScorer:
    """``R_I(s) = max(100 · cos(F_I(v), F_T(s)), 0)`` with a transformers ``CLIPModel`` from a LOCAL folder.

    ``transformers`` is imported on construction; the folder must hold the model and its processor
    (``local_files_only=True``: nothing is downloaded). Texts longer than the text encoder's limit are truncated.

    Args:
        model_path: the local folder (e.g. a saved ``openai/clip-vit-large-patch14-336``).
        device: where to run it.
        model, processor: already-loaded objects instead of ``model_path``.
    """

    def __init__(self, model_path: Optional[str] = None, *, device: str = "cpu", model=None, processor=None):
        if model is None or processor is None:
            model, processor = load_local_pretrained(
                model_path, "CLIPModel", "a CLIP model and its processor (or use ShapesWorldScorer on the shapes world)",
                device)
        self.model = model.to(device).eval()
        self.processor = processor
        self.device = device

    def __call__(self, image, texts: Sequence[str], *, record: Optional[Mapping] = None) -> List[float]:
        texts = [str(t) for t in texts]
        if not texts:
            return []
        inputs = self.processor(text=texts, images=image.convert("RGB"), return_tensors="pt", padding=True,
                                truncation=True).to(self.device)
        with torch.no_grad():
            out = self.model(**inputs)
        img = torch.nn.functional.normalize(out.image_embeds.float(), dim=-1)  # [1, d]
        txt = torch.nn.functional.normalize(out.text_embeds.float(), dim=-1)  # [n, d]
        cos = (txt @ img[0]).tolist()                                          # [n]
        return [max(100.0 * c, 0.0) for c in cos]


def make_scorer(name: str = "shapes", *, clip_path: Optional[str] = None, device: str = "cpu") -> ImageTextScorer:
    """A built-in scorer by name: ``"shapes"`` (:class:`ShapesWorldScorer`) or ``"clip"`` (:class:`CLIPScorer` from
    ``clip_path``)."""
    check_choice("scorer", name, SCORERS)
    if name == "shapes":
        return ShapesWorldScorer()
    return CLIPScorer(clip_path, device=device)


# ------------------------------------------------------------------------------------------------ transformers LM
_FAMILY_OF_MODEL_TYPE = {"llava": "llava", "qwen2_vl": "qwen2_vl", "qwen2_5_vl": "qwen2_5_vl", "idefics2": "idefics2"}


class VLMTokenLM:
    """A transformers VLM as a :class:`TokenLM` for one (image, prompt).

    The prompt row is the trainer's: :class:`vpo.data.PreferenceCollator` renders the chat template with the image and
    tokenizes it exactly as it will at training time; the response tokens follow it. End-of-response tokens are the
    tokenizer's eos plus the special tokens the chat template closes an assistant turn with. Special tokens other
    than those, and ids outside the tokenizer's vocabulary, are never proposed (their logits are masked and the
    distribution renormalized), so an image placeholder can never be generated.

    Each call runs the model on ``[prompt + prefix]`` rows (right-padded, no KV cache: fine for the tiny models and
    CPU demos; a long response on a 7B model recomputes the prompt every step).

    Args:
        model: a ``*ForConditionalGeneration`` (LLaVA, Qwen2-VL, Qwen2.5-VL, Idefics2), eval mode.
        processor: its processor, with a chat template.
        image: a PIL image. prompt: the user's question (plain text).
        family: the model family (default: from ``model.config.model_type``).
        max_batch: rows per forward.
    """

    def __init__(self, model, processor, image, prompt: str, *, family: Optional[str] = None, max_batch: int = 16):
        from vpo.data import VISION_KEYS, PreferenceCollator, PreferenceRecord

        if family is None:
            mt = getattr(getattr(model, "config", None), "model_type", None)
            if mt not in _FAMILY_OF_MODEL_TYPE:
                raise ValueError(f"model has model_type={mt!r}: expected one of {sorted(_FAMILY_OF_MODEL_TYPE)}, "
                                 f"or pass family=")
            family = _FAMILY_OF_MODEL_TYPE[mt]
        self.model, self.processor, self.family = model, processor, family
        self.tokenizer = processor.tokenizer
        self.max_batch = check_int("max_batch", max_batch, 1)
        collator = PreferenceCollator(processor, family, method="dpo")
        batch = collator([PreferenceRecord("csr-prompt", image, prompt, ".", ".")])
        if not batch.get("ids"):
            raise ValueError(f"the prompt could not be encoded with this image: {batch.get('skipped')}")
        labels = batch["labels"][0]
        resp = (labels != -100).nonzero().flatten()
        start = int(resp[0])
        self.prompt_ids = batch["input_ids"][0, :start].tolist()
        special = set(self.tokenizer.all_special_ids)
        special |= {int(i) for i, tok in getattr(self.tokenizer, "added_tokens_decoder", {}).items()
                    if getattr(tok, "special", False)}
        special |= {int(t) for t in (collator.image_token_id, collator.video_token_id) if t is not None}
        tail = [int(t) for t in labels[resp].tolist() if int(t) in special]  # the template's end-of-turn tokens
        eos = [] if self.tokenizer.eos_token_id is None else [int(self.tokenizer.eos_token_id)]
        self.eos_token_ids = tuple(dict.fromkeys(tail[:1] + eos))
        self.pad_id = collator.pad_token_id
        self.image_token_id = collator.image_token_id
        self.video_token_id = collator.video_token_id
        # One row's vision tensors: the batch holds two identical rows (chosen, rejected) -> the first half of each.
        self.vision = {}
        for key in VISION_KEYS[family]:
            if key == "mm_token_type_ids":
                continue
            t = batch[key]
            self.vision[key] = t[: t.shape[0] // 2]
        self.uses_mm_types = "mm_token_type_ids" in VISION_KEYS[family]
        V = int(model.get_output_embeddings().weight.shape[0])
        valid = set(self.tokenizer.get_vocab().values())
        allowed = torch.zeros(V, dtype=torch.bool)
        allowed[[t for t in valid if 0 <= t < V and (t not in special or t in self.eos_token_ids)]] = True
        self._banned = ~allowed
        self.device = next(model.parameters()).device

    def token_id(self, text: str) -> int:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(f"sentence_end {text!r} must be exactly one token, got {len(ids)} tokens {ids}")
        return int(ids[0])

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)

    def next_logprobs(self, prefixes: Sequence[Sequence[int]]) -> torch.Tensor:
        outs = [self._forward(prefixes[i:i + self.max_batch]) for i in range(0, len(prefixes), self.max_batch)]
        return torch.cat(outs, dim=0)

    def _forward(self, prefixes: Sequence[Sequence[int]]) -> torch.Tensor:
        rows = [self.prompt_ids + [int(t) for t in p] for p in prefixes]
        n, T = len(rows), max(len(r) for r in rows)
        ids = torch.full((n, T), self.pad_id, dtype=torch.long)
        mask = torch.zeros((n, T), dtype=torch.long)
        for i, r in enumerate(rows):  # right padding, as in training
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, : len(r)] = 1
        inputs = {"input_ids": ids, "attention_mask": mask}
        for key, t in self.vision.items():
            inputs[key] = torch.cat([t] * n, dim=0)
        if self.uses_mm_types:
            mm = (ids == self.image_token_id).long()
            if self.video_token_id is not None:
                mm = mm + 2 * (ids == self.video_token_id).long()
            inputs["mm_token_type_ids"] = mm * mask
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        with torch.no_grad():
            logits = self.model(**inputs).logits                       # [n, T, V]
        last = torch.tensor([len(r) - 1 for r in rows], device=logits.device)
        z = logits[torch.arange(n, device=logits.device), last].float()  # [n, V]
        z = z.masked_fill(self._banned.to(z.device), -math.inf)
        return torch.log_softmax(z, dim=-1).cpu()


def vlm_factory(model, processor, *, family: Optional[str] = None) -> Callable[[Any, str], VLMTokenLM]:
    """``lm_factory(image, prompt) -> VLMTokenLM`` for :func:`write_csr_dataset`."""
    model.eval()

    def factory(image, prompt: str) -> VLMTokenLM:
        return VLMTokenLM(model, processor, image, prompt, family=family)

    return factory


def load_policy(model_path: str, *, device: str = "cpu", seed: int = 0):
    """``(model, processor)`` for CSR generation: ``tiny:<family>`` builds a tiny random model
    (:mod:`vpo.models.tiny`, weights from ``seed``) with a tiny word-level processor over the shapes world's
    vocabulary (``build_tiny_processor(family, tiny=tiny, words=shapes.vocabulary())``, as :mod:`vpo.online` does);
    anything else is a local folder (``AutoModelForImageTextToText`` + ``AutoProcessor``, ``local_files_only=True``).
    """
    if not isinstance(model_path, str) or not model_path:
        raise ValueError(f"model_path must be tiny:<family> or a local folder, got {model_path!r}")
    if model_path.startswith("tiny:"):
        from vpo import models
        from vpo.data import build_tiny_processor
        from vpo.worlds import shapes

        family = model_path.split(":", 1)[1]
        builder = getattr(models, f"tiny_{family}", None)
        if builder is None:
            raise ValueError(f"model_path {model_path!r}: expected tiny:llava, tiny:qwen2_vl, tiny:qwen2_5_vl or "
                             f"tiny:idefics2")
        tiny = builder(seed)
        processor = build_tiny_processor(family, tiny=tiny, words=shapes.vocabulary())
        return tiny.model.to(device).eval(), processor
    check_path("model_path", model_path, must_exist=True, is_dir=True)
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(model_path, local_files_only=True)
    processor = AutoProcessor.from_pretrained(model_path, local_files_only=True)
    return model.to(device).eval(), processor


# ------------------------------------------------------------------------------------------------------- dataset
# Source-row keys that describe an old response (not carried into a CSR row).
_RESPONSE_KEYS = ("question", "text", "response", "answer", "hallucination", "image_path", "ref_logps",
                  "token_weights", "csr")


def _prompt_of(row: Mapping) -> Optional[str]:
    for key in ("prompt", "question"):
        if isinstance(row.get(key), str) and row[key].strip():
            return row[key]
    text = row.get("text")
    if isinstance(text, str):  # RLHF-V: a JSON string with "question"
        try:
            q = json.loads(text).get("question")
        except (json.JSONDecodeError, AttributeError):
            return None
        return q if isinstance(q, str) and q.strip() else None
    return None


def write_csr_dataset(
    data_path: str,
    out_dir: str,
    *,
    lm_factory: Callable[[Any, str], TokenLM],
    scorer: ImageTextScorer,
    config: CSRConfig = CSRConfig(),
    limit: Optional[int] = None,
    iteration: Optional[int] = None,
) -> ConstructionSummary:
    """Build CSR preference pairs for every (image, prompt) row of ``data_path`` with :func:`sentence_beam_search`.

    Source rows (a ``.jsonl`` file or a folder with ``train.jsonl``) need an ``image`` (or ``image_path``; relative
    paths are read from the file's folder) and a ``prompt`` (or ``question``, or RLHF-V's ``text``); other fields are
    kept (the shapes world's ``objects`` and ``scene`` let :class:`ShapesWorldScorer` score), old responses are not.
    Each kept row becomes a ``"vpo"``-layout row ``{"id", "image", "prompt", "chosen", "rejected", "csr": {"mode",
    "lam", "iteration", "chosen_reward", "rejected_reward", "num_responses"}, ...}``. Skips: ``missing_field``,
    ``unreadable_image``, ``no_pair`` (fewer than two distinct responses, or equal rewards).

    Args:
        data_path: the prompts.
        out_dir: the output folder (``train.jsonl``, ``construct.json``).
        lm_factory: ``lm_factory(image, prompt) -> TokenLM`` (:func:`vlm_factory`).
        scorer: the :class:`ImageTextScorer`.
        config: :class:`CSRConfig`.
        limit: use only the first ``limit`` rows.
        iteration: recorded in each row's ``csr`` (the iterative loop's ``t``).

    Returns:
        A :class:`~vpo.construct.ConstructionSummary`.
    """
    from vpo.data import load_image
    from vpo.data.records import UnreadableImageError, resolve_image

    if not isinstance(config, CSRConfig):
        raise ValueError(f"config must be a CSRConfig, got {type(config).__name__}")
    if not callable(lm_factory):
        raise ValueError(f"lm_factory must be callable (image, prompt) -> TokenLM, got {type(lm_factory).__name__}")
    if not callable(scorer):
        raise ValueError(f"scorer must be an ImageTextScorer (callable), got {type(scorer).__name__}")
    if limit is not None:
        check_int("limit", limit, 0)
    src = data_file(check_path("data_path", data_path))
    out_dir = check_path("out_dir", out_dir)
    base = os.path.dirname(os.path.abspath(src))
    summary = ConstructionSummary(path=os.path.join(out_dir, "train.jsonl"))
    writer = JsonlWriter(out_dir)
    used = 0
    try:
        for n, row in iter_json_rows(src, summary):
            if limit is not None and used >= limit:
                summary.seen -= 1
                break
            used += 1
            rid = str(row["id"]) if row.get("id") not in (None, "") else f"{os.path.basename(src)}:{n}"
            prompt = _prompt_of(row)
            spec = row.get("image") if row.get("image") not in (None, "") else row.get("image_path")
            if prompt is None or spec in (None, ""):
                skip(summary, rid, "missing_field", "a row needs an image and a prompt")
                continue
            spec = resolve_image(spec, base)
            try:
                image = load_image(spec)
            except UnreadableImageError as e:
                skip(summary, rid, "unreadable_image", str(e))
                continue
            result = sentence_beam_search(lm_factory(image, prompt), scorer, image=image, record=row, config=config)
            if not result.has_pair:
                skip(summary, rid, "no_pair", f"{len(result.responses)} finished response(s), no two distinct texts "
                                              f"with different rewards")
                continue
            out = {"id": rid, "image": image_ref(spec, out_dir, safe_name(rid)), "prompt": prompt,
                   "chosen": result.chosen.text, "rejected": result.rejected.text}
            out.update({k: v for k, v in row.items() if k not in RECORD_FIELDS and k not in _RESPONSE_KEYS})
            out["csr"] = {"mode": config.mode, "lam": config.lam, "iteration": iteration,
                          "chosen_reward": result.chosen.reward, "rejected_reward": result.rejected.reward,
                          "num_responses": len(result.responses)}
            writer.write(out)
            summary.written += 1
    except BaseException:
        writer.abort()
        raise
    writer.close()
    cfg = asdict(config)
    cfg.update(scorer=type(scorer).__name__, iteration=iteration, source=os.path.abspath(src))
    write_meta(out_dir, "csr", cfg, summary)
    return summary


# ------------------------------------------------------------------------------------------------ iterative loop
@dataclass(frozen=True)
class CSRIteration:
    """One iteration of :func:`csr_iterate`: the data built with ``ref_model_path`` (= ``π_{t-1}``) in
    ``dataset_dir``, and ``model_path`` = ``π_t`` trained on it with ``π_{t-1}`` as the reference."""

    iteration: int
    dataset_dir: str
    ref_model_path: str
    model_path: str
    summary: Dict[str, Any] = field(default_factory=dict)


def csr_iterate(
    data_path: str,
    out_dir: str,
    *,
    model_path: str,
    train_fn: Callable[[str, str], str],
    scorer: ImageTextScorer,
    iterations: int = 3,
    config: CSRConfig = CSRConfig(),
    load_fn: Callable[[str], Tuple[Any, Any]] = load_policy,
    limit: Optional[int] = None,
    materialize_tiny: bool = True,
) -> List[CSRIteration]:
    """CSR's iterative DPO: for ``t = 1 .. iterations``, build ``out_dir/iter{t}`` with the current model, then
    ``model_path = train_fn(out_dir/iter{t}, model_path)``.

    ``train_fn(dataset_dir, ref_model_path) -> new_model_path`` must train a policy initialised from
    ``ref_model_path`` on ``dataset_dir/train.jsonl`` with method ``csr`` (DPO) and ``ref_model_path`` as the frozen
    reference (the previous iterate), and return a folder ``load_fn`` can load (a merged model + its processor).
    ``out_dir/csr_iterations.json`` lists the iterations as they finish.

    Args:
        data_path: the prompts (see :func:`write_csr_dataset`), the same every iteration.
        out_dir: the run folder.
        model_path: ``π_0`` (``tiny:<family>`` or a local folder).
        train_fn: the training step (above).
        scorer: the :class:`ImageTextScorer`.
        iterations: ``T`` (3 in the paper).
        config: the search's :class:`CSRConfig`.
        load_fn: ``load_fn(path) -> (model, processor)`` (default :func:`load_policy`).
        limit: prompts per iteration.
        materialize_tiny: when ``model_path`` is ``tiny:<family>``, save ``load_fn(model_path)`` to
            ``out_dir/iter0_model`` first and use that folder as ``π_0`` (the trainer then starts from, and refers
            to, exactly the model that built iteration 1's data).

    Returns:
        The :class:`CSRIteration` s, in order.
    """
    check_int("iterations", iterations, 1)
    if not callable(train_fn):
        raise ValueError(f"train_fn must be callable (dataset_dir, ref_model_path) -> new_model_path, got "
                         f"{type(train_fn).__name__}")
    if not callable(load_fn):
        raise ValueError(f"load_fn must be callable (model_path) -> (model, processor), got {type(load_fn).__name__}")
    out_dir = check_path("out_dir", out_dir)
    os.makedirs(out_dir, exist_ok=True)
    done: List[CSRIteration] = []
    current = model_path
    if materialize_tiny and isinstance(model_path, str) and model_path.startswith("tiny:"):
        # π_0 saved once, so the data generator and the trainer (policy init and reference) load the very same
        # weights and tokenizer, whatever seed or vocabulary each would pick for "tiny:<family>".
        model, processor = load_fn(model_path)
        current = os.path.join(out_dir, "iter0_model")
        model.save_pretrained(current)
        processor.save_pretrained(current)
        del model, processor
    for t in range(1, iterations + 1):
        ds = os.path.join(out_dir, f"iter{t}")
        model, processor = load_fn(current)
        summary = write_csr_dataset(data_path, ds, lm_factory=vlm_factory(model, processor), scorer=scorer,
                                    config=config, limit=limit, iteration=t)
        del model, processor
        if summary.written == 0:
            raise RuntimeError(f"CSR iteration {t} produced no preference pair from {data_path!r} "
                               f"(skipped: {dict(summary.skipped)}); nothing to train on")
        new = train_fn(ds, current)
        if not isinstance(new, (str, os.PathLike)):
            raise ValueError(f"train_fn must return the new model's path, got {type(new).__name__}")
        done.append(CSRIteration(t, ds, current, os.fspath(new), summary.as_dict()))
        current = os.fspath(new)
        with open(os.path.join(out_dir, "csr_iterations.json"), "w", encoding="utf-8") as f:
            json.dump([asdict(it) for it in done], f, indent=2)
            f.write("\n")
    return done
