"""CSR's preference data (docs/methods.md, CSR; paper 003): sentence-level beam search under a calibrated reward, and
the iterative loop.

The search (the paper's Algorithm 1). A response grows one sentence per round. In each round every active path (beam)
proposes ``num_candidates`` next sentences — a token-level DIVERSE beam search (CSR App. A.1 and its code: the
``token_beams`` beams in ``num_beam_groups = 5`` groups with Hamming ``diversity_penalty = 3.0``, Vijayakumar et al.;
:func:`~vpo.construct.csr_beams.diverse_token_beams`; one group is plain beam search) that ends a sentence at a
sentence-end token (``"."``), at the end of the response (the tokenizer's eos / the chat template's end-of-turn), or
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

Fragments (``min_sentence_tokens``, default 3; not in the paper). A stop token ends a proposed sentence only after that
many tokens; before, it is masked and the beams go on (a bare end-of-response after a complete sentence, and the rest
of a sentence cut by ``max_new_tokens``, are exempt; if nothing of a path reaches the minimum, its longest proposals
are kept). Why: the diverse search taxes every content token that an earlier group chose at the same step
(``diversity_penalty`` each) but never a stop token, so each group after the first finds that stopping at once (``"."``)
or after one word (``"two ."``) scores above any full sentence it could still write, and proposes that fragment. A
fragment has the lowest ``R_I`` there is (it shows nothing) and a low ``R_T``, so it became the rejected response of
nearly every pair: on the shapes world (the demo's SFT model, 160 prompts), the rejected response named no object in
99% of pairs without the minimum and in none with it (``benchmarks/results/diagnose-cpu.md``).

Exactness. The search is exact — the chosen and rejected are the arg-max and arg-min of ``R(y)`` over every response
the model can produce within the limits and ``min_sentence_tokens`` — whenever nothing is pruned: one beam group,
``token_beams`` and ``num_candidates`` covering every sentence, and ``keep_top + keep_bottom`` covering every
unfinished path (the test checks this against brute-force enumeration on a tiny vocabulary, with and without the
minimum; the diverse search's penalized scores are checked the same way).

Models. The search talks to a :class:`TokenLM` (next-token log-probabilities of the response given its prefix, the
image and prompt being bound), so a tiny table can stand in for a model. :class:`VLMTokenLM` wraps a transformers VLM
and its processor, building the prompt with :class:`vpo.data.PreferenceCollator` (the trainer's exact prompt tokens and
vision inputs). Image relevance comes from an :class:`ImageTextScorer`: :class:`ShapesWorldScorer` (exact, from the
shapes world's ground truth) or :class:`CLIPScorer` (a transformers CLIP model from a local folder).

Files: :mod:`vpo.construct.csr_search` (the config, the rewards, the sentence-level search),
:mod:`vpo.construct.csr_beams` (the token-level proposals, plain and diverse), :mod:`vpo.construct.csr_scorers`
(``R_I``), :mod:`vpo.construct.csr_lm` (the transformers model as a :class:`TokenLM`) and this module (the dataset
writer and the iterative loop); everything is importable from here.

The iterative loop (:func:`csr_iterate`): iteration ``t`` builds data with ``π_{t-1}`` and trains ``π_t`` from it with
``π_{t-1}`` as the reference, through a ``train_fn(dataset_dir, ref_model_path) -> new_model_path`` callable.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from vpo.construct._io import (
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
from vpo.construct.csr_lm import VLMTokenLM, load_policy, vlm_factory  # noqa: F401
from vpo.construct.csr_scorers import SCORERS, CLIPScorer, ShapesWorldScorer, make_scorer  # noqa: F401
from vpo.construct.csr_search import (  # noqa: F401
    LANGUAGE_SCORES, MODES, CSRConfig, CSRSearchResult, ImageTextScorer, Response, Sentence, SentenceScore, TokenLM,
    calibrated_reward, diverse_token_beams, language_score, propose_sentences, rank_cost, sentence_beam_search,
    sibling_ranks)


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
