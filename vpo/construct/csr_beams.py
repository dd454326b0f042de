"""CSR's token-level proposals: the next sentences of a path by beam search, plain or diverse (group beam search
with Hamming diversity, Vijayakumar et al.), for :func:`vpo.construct.csr_search.sentence_beam_search`."""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, List, Sequence, Tuple

import torch

from vpo._validate import check_range
from vpo.construct._io import check_int

if TYPE_CHECKING:
    from vpo.construct.csr_search import TokenLM


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
    num_beam_groups: int = 1,
    diversity_penalty: float = 0.0,
    min_tokens: int = 0,
    bare_eos: bool = False,
) -> List[Sentence]:
    """The ``num_candidates`` most likely next sentences after ``prefix`` by token-level beam search; with
    ``num_beam_groups > 1``, by diverse (group) beam search (:func:`diverse_token_beams`). ``min_tokens`` /
    ``bare_eos``: the shortest sentence a stop token may end (:func:`diverse_token_beams`).

    Every step extends the ``token_beams`` best unfinished prefixes by every token; a candidate ending in a stop
    token (sentence end or eos) is finished, the ``token_beams`` best others stay alive; after ``max_new_tokens``
    steps the alive ones are finished as ``"length"``. The search stops early once ``num_candidates`` finished
    sentences all score above every alive one (log-probabilities only decrease). Ties: lower (beam, token) first.

    Returns:
        Up to ``num_candidates`` :class:`Sentence` s, by log-probability descending (groups: by penalized score).
    """
    # Plain beam search is the one-group case of the diverse search (no earlier group, so no penalty): one search.
    return diverse_token_beams(lm, prefix, sentence_end_ids=sentence_end_ids, eos_ids=eos_ids,
                               num_candidates=num_candidates, token_beams=token_beams, max_new_tokens=max_new_tokens,
                               num_beam_groups=num_beam_groups, diversity_penalty=diversity_penalty,
                               min_tokens=min_tokens, bare_eos=bare_eos)


def diverse_token_beams(
    lm: TokenLM,
    prefix: Sequence[int],
    *,
    sentence_end_ids: Sequence[int],
    eos_ids: Sequence[int],
    num_candidates: int = 5,
    token_beams: int = 5,
    max_new_tokens: int = 74,
    num_beam_groups: int = 5,
    diversity_penalty: float = 3.0,
    min_tokens: int = 0,
    bare_eos: bool = False,
) -> List[Sentence]:
    """Diverse beam search (Vijayakumar et al. 2018, Hamming diversity) for the next sentence after ``prefix``: the
    proposals CSR samples (5 groups, penalty 3.0).

    The ``token_beams`` beams form ``G = num_beam_groups`` groups of ``W = token_beams / G``. At every step the groups
    are processed in order; group ``g`` scores each token ``v`` after each of its beams as::

        score(beam + v) = score(beam) + log P(v | beam) - diversity_penalty * count_g(v)

    where ``count_g(v)`` is how many beams of the groups before ``g`` chose ``v`` at this step (the tokens their
    surviving beams were extended with); the penalized score accumulates, as in the group beam search of
    transformers 4. A stop token (sentence end or eos) finishes a candidate of the group (stop continuations are
    never chosen as beams, so they are never penalized); the ``W`` best other continuations stay alive. A group is
    done when it has ``k = ceil(num_candidates / G)`` finished candidates that all score above its best alive beam
    (scores only decrease), or when nothing is alive; a done group chooses no more tokens. After ``max_new_tokens``
    steps the alive beams finish as ``"length"``. Each group, in order, contributes its ``k`` best finished
    candidates that no earlier group contributed (stop tokens are never penalized, so groups often share the same
    early stop; transformers returns such duplicates, here the next-best takes its place); the result is the
    ``num_candidates`` best of their union by penalized score (ties: group, then finishing order). Every
    :class:`Sentence` carries its TRUE log-probability (the unpenalized sum), which is what ``R_T`` scores.

    With ``G = 1`` (or a zero penalty, where the groups are independent copies of a width-``W`` search) it reduces
    to plain beam search (:func:`propose_sentences`).

    Minimum length. A stop token ends a candidate only after at least ``min_tokens`` tokens (the stop token not
    counted; capped at ``max_new_tokens - 1`` so that a sentence can always end); before that it is masked, as
    transformers' ``min_new_tokens`` masks eos, and the beams go on. With ``bare_eos``, an end-of-response token as
    the very first token is allowed whatever ``min_tokens`` says: it ends a response whose last sentence is complete.
    Without the minimum, the groups after the first tend to end on a bare ``"."`` or a one-word fragment: stop tokens
    are never penalized, while every content token that an earlier group chose at the same step costs
    ``diversity_penalty``, so a stop at step 0 or 1 outscores the group's real sentences. If no candidate reaches
    the minimum (every beam died before it: all continuations impossible), the search is rerun without it and the
    longest of its candidates are returned, so a path never runs out of proposals silently.
    """
    check_int("num_candidates", num_candidates, 1)
    check_int("num_beam_groups", num_beam_groups, 1)
    check_int("min_tokens", min_tokens, 0)
    k = -(-num_candidates // num_beam_groups)
    kw = dict(sentence_end_ids=sentence_end_ids, eos_ids=eos_ids, keep=k, token_beams=token_beams,
              max_new_tokens=max_new_tokens, num_beam_groups=num_beam_groups, diversity_penalty=diversity_penalty)
    pool = _pool(group_beams(lm, prefix, min_tokens=min_tokens, bare_eos=bare_eos, **kw), k)
    if not pool and min_tokens > 0:
        # Fallback: nothing reached the minimum; the longest of the unconstrained candidates (ties: by score).
        pool = _pool(group_beams(lm, prefix, **kw), k)
        n = max(len(f[3]) for f in pool) if pool else 0
        pool = [f for f in pool if len(f[3]) == n]
    return [Sentence(toks, true_lp, end) for _, _, _, toks, end, true_lp in pool[:num_candidates]]


def _pool(groups, k: int):
    """Each group's ``k`` best finished candidates not contributed by an earlier group, as
    ``(penalized score, group, order, tokens, end, true log-prob)``, best first."""
    pool, seen = [], set()
    for g, fin in enumerate(groups):
        best = [f for f in sorted(fin, key=lambda f: (-f[0], f[1])) if f[2] not in seen][:k]
        seen.update(f[2] for f in best)
        pool.extend((f[0], g, f[1], f[2], f[3], f[4]) for f in best)
    pool.sort(key=lambda f: (-f[0], f[1], f[2]))
    return pool


def group_beams(
    lm: TokenLM,
    prefix: Sequence[int],
    *,
    sentence_end_ids: Sequence[int],
    eos_ids: Sequence[int],
    keep: int,
    token_beams: int = 5,
    max_new_tokens: int = 74,
    num_beam_groups: int = 5,
    diversity_penalty: float = 3.0,
    min_tokens: int = 0,
    bare_eos: bool = False,
) -> List[List[Tuple[float, int, Tuple[int, ...], str, float]]]:
    """The search of :func:`diverse_token_beams` (``keep`` = its ``k``), per group: every finished candidate of each
    group as ``(penalized score, finishing order, tokens, end, true log-prob)``, in finishing order. A stop token
    finishes a candidate only after ``min(min_tokens, max_new_tokens - 1)`` tokens, or, with ``bare_eos``, when it
    is an end-of-response token at the first step."""
    check_int("num_beam_groups", num_beam_groups, 1)
    check_int("token_beams", token_beams, 1)
    check_int("keep", keep, 1)
    check_int("max_new_tokens", max_new_tokens, 1)
    if token_beams % num_beam_groups:
        raise ValueError(f"token_beams must be a multiple of num_beam_groups, got {token_beams} and "
                         f"{num_beam_groups}")
    check_range("diversity_penalty", diversity_penalty, 0.0, math.inf)
    min_tokens = min(check_int("min_tokens", min_tokens, 0), max_new_tokens - 1)
    G, W = num_beam_groups, token_beams // num_beam_groups
    k = keep
    stops = sorted(set(int(t) for t in sentence_end_ids) | set(int(t) for t in eos_ids))
    eos = set(int(t) for t in eos_ids)
    prefix = tuple(int(t) for t in prefix)
    # per group: alive beams (tokens, penalized score, true log-prob); finished (penalized, order, tokens, end, lp)
    alive: List[List[Tuple[Tuple[int, ...], float, float]]] = [[((), 0.0, 0.0)] for _ in range(G)]
    finished: List[List[Tuple[float, int, Tuple[int, ...], str, float]]] = [[] for _ in range(G)]
    order = 0
    for step in range(max_new_tokens):
        rows = [(g, b) for g in range(G) for b in range(len(alive[g]))]
        if not rows:
            break
        lp = lm.next_logprobs([prefix + alive[g][b][0] for g, b in rows])
        if not isinstance(lp, torch.Tensor) or lp.dim() != 2 or lp.shape[0] != len(rows):
            raise ValueError(f"lm.next_logprobs must return a [{len(rows)}, V] tensor, got "
                             f"{getattr(lp, 'shape', type(lp).__name__)}")
        lp = lp.detach().to("cpu", torch.float64)
        V = lp.shape[1]
        in_vocab = [s for s in stops if s < V]
        chosen: Counter = Counter()  # token -> beams of earlier groups extended with it at this step
        start = 0
        for g in range(G):
            n = len(alive[g])
            if not n:
                continue
            block = lp[start:start + n]                                                    # [n, V]
            start += n
            penalty = torch.zeros(V, dtype=torch.float64)
            for tok, c in chosen.items():
                penalty[tok] = diversity_penalty * c
            pen = torch.tensor([a[1] for a in alive[g]], dtype=torch.float64)[:, None] + block - penalty[None, :]
            true = torch.tensor([a[2] for a in alive[g]], dtype=torch.float64)[:, None] + block
            # stop tokens allowed at this step: all once the minimum is reached, else only a bare eos (if allowed)
            stops_now = in_vocab if step >= min_tokens else [s for s in in_vocab if bare_eos and step == 0 and s in eos]
            for i, (toks, _, _) in enumerate(alive[g]):
                for s in stops_now:
                    if pen[i, s] > -math.inf:
                        finished[g].append((float(pen[i, s]), order, toks + (s,), "eos" if s in eos else "sentence",
                                            float(true[i, s])))
                        order += 1
            cont = pen.clone()
            if in_vocab:
                cont[:, in_vocab] = -math.inf
            vals, idx = torch.sort(cont.flatten(), descending=True, stable=True)
            take = int(min(W, int(torch.isfinite(vals).sum())))
            new = []
            for v, j in zip(vals[:take].tolist(), idx[:take].tolist()):
                i, tok = divmod(int(j), V)
                new.append((alive[g][i][0] + (tok,), float(v), float(true[i, tok])))
                chosen[tok] += 1
            if step == max_new_tokens - 1:
                for toks, ps, tl in new:
                    finished[g].append((ps, order, toks, "length", tl))
                    order += 1
                new = []
            elif len(finished[g]) >= k and new:
                kth = sorted((f[0] for f in finished[g]), reverse=True)[k - 1]
                if new[0][1] < kth:
                    new = []  # done: nothing alive can beat the k-th finished candidate
            alive[g] = new
    return finished
