"""CSR's sentence-level beam search under the calibrated reward (the search of :mod:`vpo.construct.csr`; its
module docstring describes the algorithm): the config, the model protocols, the rewards; the token-level proposals
(plain or diverse group beam search) are in :mod:`vpo.construct.csr_beams` and re-exported here."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Protocol, Sequence, Tuple, runtime_checkable

import torch

from vpo._validate import check_choice, check_range
from vpo.construct._io import check_int
from vpo.construct.csr_beams import Sentence, diverse_token_beams, group_beams, propose_sentences  # noqa: F401

__all__ = ["CSRConfig", "TokenLM", "ImageTextScorer", "calibrated_reward", "language_score", "sibling_ranks",
           "rank_cost", "Sentence", "propose_sentences", "diverse_token_beams", "group_beams", "SentenceScore",
           "Response", "CSRSearchResult", "sentence_beam_search"]

MODES = ("score", "rank")
LANGUAGE_SCORES = ("prob", "logprob", "mean_logprob")


# ------------------------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class CSRConfig:
    """Options of the sentence-level beam search (module docstring). Defaults: the paper's and the CSR code's, except
    ``min_sentence_tokens`` (this package's guard against fragments; 0 restores the paper's search).

    Attributes:
        mode: ``"score"`` (sum of calibrated rewards) or ``"rank"`` (mean sibling rank).
        lam: ``λ``, the weight of ``R_I`` (``1 - λ`` weighs ``R_T``), in [0, 1].
        keep_top / keep_bottom: unfinished paths kept per round, best and worst by ``R(y)``.
        num_candidates: sentences proposed per active path (the paper's ``num_token_beams`` returned sequences).
        token_beams: the token-level beam width inside one sentence (all groups together).
        num_beam_groups: diverse (group) beam search: ``token_beams`` split into this many groups
            (:func:`propose_sentences`); 5 in CSR (App. A.1, its code's ``num_beam_groups``). 1 = plain beam search.
        diversity_penalty: the Hamming diversity penalty λ of the groups (3.0 in CSR); 0 = independent groups.
        max_new_tokens: tokens per sentence (74 in the paper; a longer sentence is cut and continues next round).
        max_sentences: rounds; paths still open after the last one are finished as they are.
        max_response_tokens: tokens per response.
        sentence_end: the strings that end a sentence (each must be one token of the tokenizer).
        language_score: ``R_T`` as ``"prob"`` (``Π P``, the paper), ``"logprob"`` or ``"mean_logprob"``.
        min_sentence_tokens: the fewest tokens a proposed sentence has before its stop token (``"."`` or the end of
            the response). A stop token is not a candidate before that: it is masked and the token beams go on
            (transformers' ``min_new_tokens``, applied per sentence). Exempt: a bare end-of-response after a complete
            sentence (how a response ends) and the continuation of a sentence cut by ``max_new_tokens``. Capped at
            ``max_new_tokens - 1``; when no proposal of a path reaches it, the longest proposals are kept, so a path
            never runs dry. Default 3: fewer tokens are at most a word and a modifier (``"."``, ``"two ."``,
            ``"two red ."``); without the minimum, the diverse groups end on such fragments (module docstring) and
            the calibrated reward then picks one as the rejected response. 0 = every stop is a candidate (the
            paper's search, and this one's before the option).
    """

    mode: str = "score"
    lam: float = 0.9
    keep_top: int = 1
    keep_bottom: int = 2
    num_candidates: int = 5
    token_beams: int = 5
    num_beam_groups: int = 5
    diversity_penalty: float = 3.0
    max_new_tokens: int = 74
    max_sentences: int = 8
    max_response_tokens: int = 512
    sentence_end: Tuple[str, ...] = (".",)
    language_score: str = "prob"
    min_sentence_tokens: int = 3

    def __post_init__(self):
        check_choice("mode", self.mode, MODES)
        check_range("lam", self.lam, 0.0, 1.0)
        check_int("keep_top", self.keep_top, 0)
        check_int("keep_bottom", self.keep_bottom, 0)
        if self.keep_top + self.keep_bottom < 1:
            raise ValueError(f"keep_top + keep_bottom must be >= 1, got {self.keep_top} + {self.keep_bottom}")
        check_int("num_candidates", self.num_candidates, 1)
        check_int("token_beams", self.token_beams, 1)
        check_int("num_beam_groups", self.num_beam_groups, 1)
        if self.token_beams % self.num_beam_groups:
            raise ValueError(f"token_beams must be a multiple of num_beam_groups, got {self.token_beams} and "
                             f"{self.num_beam_groups}")
        check_range("diversity_penalty", self.diversity_penalty, 0.0, math.inf)
        check_int("max_new_tokens", self.max_new_tokens, 1)
        check_int("max_sentences", self.max_sentences, 1)
        check_int("max_response_tokens", self.max_response_tokens, 1)
        ends = self.sentence_end
        if isinstance(ends, str) or not isinstance(ends, (tuple, list)) or not all(
                isinstance(s, str) and s for s in ends):
            raise ValueError(f"sentence_end must be a tuple of non-empty strings, got {ends!r}")
        object.__setattr__(self, "sentence_end", tuple(ends))
        check_choice("language_score", self.language_score, LANGUAGE_SCORES)
        check_int("min_sentence_tokens", self.min_sentence_tokens, 0)


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
                                      num_beam_groups=config.num_beam_groups,
                                      diversity_penalty=config.diversity_penalty,
                                      max_new_tokens=min(config.max_new_tokens, budget),
                                      # a sentence cut by max_new_tokens may end at once; a bare eos ends a response
                                      min_tokens=0 if parent.end == "length" else config.min_sentence_tokens,
                                      bare_eos=bool(prefix))
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
