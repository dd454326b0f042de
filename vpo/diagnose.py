"""Does each method's signal see the hallucination? Token- and sentence-level diagnostics with ground truth.

Every method of vpo turns a signal of the model into a training weight or a ranking. Whether that signal carries
information about hallucination is a property of the MODEL (and of the method's free settings), and can be measured
before training, on preference pairs whose rejected response marks its hallucinated words (the shapes world's
``hallucination.spans``; RLHF-V's corrected segments give the same for real data, :func:`vpo.diagnose_cli`).

Token classes (:func:`token_classes`): on both responses of a pair, a *visual word* (a color, a shape, a count word;
what CHAIR scores) is **hallucinated** when the record's spans cover it and **grounded** otherwise. Function words
and the end-of-turn token are left out.

Per method (each number oriented so that 1 = the signal always ranks as the method intends, 0.5 = no information,
below 0.5 = the wrong way round):

- **TPO** (:func:`tpo_signals`): ``s = z[y](v) − z[y](v_c)`` per token and ``c`` from :func:`vpo.oracle.tpo`.
  ``auroc_s`` = P(s of a grounded token > s of a hallucinated one); ``auroc_c`` = on rejected responses, P(c of a
  hallucinated token > c of a grounded one) (c > 1 weighs up a rejected token's penalty). ``a`` shifts c and never
  changes an AUROC; it sets how far ``log c`` moves (``log_c_gap``, the mean log c of hallucinated minus grounded
  rejected tokens).
- **Cat-PO** (:func:`catpo_signals`): ``T = tanh(s_t)`` per token from the reference's attention on the image and
  the token-image similarity; ``auroc_T`` = P(T grounded > T hallucinated); ``auroc_w`` = on rejected responses,
  P(w hallucinated > w grounded) (``w = λ_ref + 1 − T``).
- **CSR** (:func:`csr_ranking`): for each pair with a hallucination, ``R = λ R_I + (1 − λ) R_T`` of the chosen and
  the rejected response (``R_T`` the model's probability of the response, ``R_I`` the scorer's image relevance);
  ``rate`` = how often R(chosen) > R(rejected) (ties count half).
- **LPOI** (:func:`lpoi_order`): on LPOI's lists (the critical object masked in ``L − 1`` growing steps), how often
  the model's log-probability of the chosen response falls as the object disappears (``pair_rate``: over all
  ordered pairs of a list; ``list_rate``: whole lists in order), and whether the images' visible share of the object
  falls (``visibility_rate``, a check of the construction).
- **OViP** (:func:`ovip_negatives`): the negative image rendered from the rejected response (the generator the demo
  uses): ``claimed_rate`` = its scene holds the hallucinated object as claimed; ``only_rate`` = nothing else changed;
  ``pixels_rate`` = the rendered image differs from the positive one.

Example::

    model, processor = load_for_eval("vpo-demo/sft")
    recs = read_pairs("diag/val_pairs.jsonl", limit=200)
    t = tpo_signals(model, processor, recs, noise_step=500)
    summarize_tokens(t, "s")["auroc"]
"""
from __future__ import annotations

import math
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

IGNORE = -100


# --------------------------------------------------------------------------------------------------- statistics
def auroc(scores: Sequence[float], positive: Sequence[bool]) -> float:
    """P(score of a positive > score of a negative), ties counting half (the Mann-Whitney U over ``n⁺ n⁻``).

    ``scores``, ``positive``: one per item, the same length. NaN when either class is empty.
    Example: ``auroc([0.9, 0.1, 0.5], [True, False, True]) == 1.0``."""
    scores = [float(s) for s in scores]
    positive = [bool(p) for p in positive]
    if len(scores) != len(positive):
        raise ValueError(f"scores has {len(scores)} items but positive has {len(positive)}: expected one label each")
    n_pos = sum(positive)
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    ranks = [0.0] * len(scores)
    i = 0
    while i < len(order):  # average ranks over ties (1-based)
        j = i
        while j + 1 < len(order) and scores[order[j + 1]] == scores[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    r_pos = sum(r for r, p in zip(ranks, positive) if p)
    return (r_pos - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def _quantiles(v: Sequence[float]) -> Dict[str, float]:
    v = sorted(v)
    if not v:
        return {"n": 0}
    q = lambda p: v[min(len(v) - 1, int(p * (len(v) - 1) + 0.5))]  # noqa: E731
    return {"n": len(v), "mean": sum(v) / len(v), "q10": q(0.1), "median": q(0.5), "q90": q(0.9)}


def summarize_tokens(tokens: Mapping[str, Sequence], key: str, *, rows: str = "both",
                     higher: str = "grounded") -> Dict[str, Any]:
    """Distribution of ``tokens[key]`` per class and its AUROC. ``tokens``: columns ``key``, ``cls``
    (``"grounded"``/``"hallucinated"``), ``row`` (``"chosen"``/``"rejected"``), one entry per token (as
    :func:`tpo_signals` returns). ``rows``: ``"both"`` or one response side. ``higher``: the class the method wants
    ranked higher (the AUROC's positive class)."""
    if rows not in ("both", "chosen", "rejected"):
        raise ValueError(f"rows must be 'both', 'chosen' or 'rejected', got {rows!r}")
    if higher not in ("grounded", "hallucinated"):
        raise ValueError(f"higher must be 'grounded' or 'hallucinated', got {higher!r}")
    if key not in tokens:
        raise ValueError(f"tokens has no column {key!r}: has {sorted(tokens)}")
    keep = [i for i, r in enumerate(tokens["row"]) if rows == "both" or r == rows]
    vals = [float(tokens[key][i]) for i in keep]
    cls = [tokens["cls"][i] for i in keep]
    return {"grounded": _quantiles([v for v, c in zip(vals, cls) if c == "grounded"]),
            "hallucinated": _quantiles([v for v, c in zip(vals, cls) if c == "hallucinated"]),
            "auroc": auroc(vals, [c == higher for c in cls]), "rows": rows, "higher": higher}


# ------------------------------------------------------------------------------------------------------- data
def read_pairs(path: str, limit: Optional[int] = None) -> List[Dict[str, Any]]:
    """Preference records of a JSONL file (image paths made absolute), the first ``limit``."""
    from vpo.worlds.shapes import read_jsonl

    if not os.path.isfile(path):
        raise ValueError(f"path {path!r}: no such file (expected a JSONL of preference records)")
    root = os.path.dirname(os.path.abspath(path))
    out = []
    for i, r in enumerate(read_jsonl(path)[:limit]):
        r = dict(r)
        absolute = lambda v: os.path.join(root, v) if isinstance(v, str) and v and not os.path.isabs(v) \
            and not v.startswith("data:") else v  # noqa: E731
        for k in ("image", "neg_image"):
            r[k] = absolute(r.get(k))
        if isinstance(r.get("image_list"), list):
            r["image_list"] = [absolute(v) for v in r["image_list"]]
        r.setdefault("id", f"{os.path.basename(path)}:{i + 1}")
        out.append(r)
    return out


def visual_word(word: str) -> bool:
    """A color, a shape (singular or plural) or a count word other than the article "a"."""
    from vpo.worlds.shapes import COLORS, SHAPES
    from vpo.worlds.shapes.vocab import COUNT_WORDS, plural

    words = set(COLORS) | set(SHAPES) | {plural(s, 2) for s in SHAPES} | set(COUNT_WORDS.values())
    return word in words and word != "a"


def token_classes(text: str, spans: Sequence[Sequence[int]] = ()) -> List[Optional[str]]:
    """Per word of ``text`` (:func:`vpo.worlds.shapes.vocab.split_words`): ``"hallucinated"`` (a visual word inside
    ``spans``, character ``(start, end)`` pairs), ``"grounded"`` (a visual word outside) or None."""
    from vpo.worlds.shapes import word_span_mask
    from vpo.worlds.shapes.vocab import split_words

    words = split_words(text)
    marks = word_span_mask(text, [tuple(s) for s in spans]) if spans else [False] * len(words)
    return [None if not visual_word(w) else ("hallucinated" if m else "grounded") for w, m in zip(words, marks)]


def diff_spans(rejected: str, chosen: str) -> List[List[int]]:
    """Character spans of ``rejected`` that a correction ``chosen`` replaced or deleted (a word-level diff): the
    hallucinated segments of an RLHF-V pair, whose chosen response is the annotator's correction of the rejected one.
    Example: ``diff_spans("a red dog sits", "a red cat sits") == [[6, 9]]``."""
    import difflib
    import re

    words = [(m.start(), m.end()) for m in re.finditer(r"\S+", rejected)]
    a = [rejected[i:j] for i, j in words]
    b = chosen.split()
    out = []
    for tag, i1, i2, _j1, _j2 in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
        if tag in ("replace", "delete") and i2 > i1:
            out.append([words[i1][0], words[i2 - 1][1]])
    return out


def _spans(rec: Mapping[str, Any]) -> List:
    """The record's hallucination spans; without ``hallucination.spans`` (real data), RLHF-V's corrected segments
    (:func:`diff_spans` of the rejected response against the chosen correction)."""
    h = rec.get("hallucination")
    if isinstance(h, Mapping) and "spans" in h:
        return list(h.get("spans") or [])
    return diff_spans(str(rec.get("rejected", "")), str(rec.get("chosen", "")))


def _collated(collator, records: Sequence[Mapping], size: int, counts: Dict[str, Any]):
    """``(batch, labels [2B, L])`` for each ``size`` records the collator keeps (labels shifted as the trainer's);
    the records it skips are added to ``counts["skipped_records"]``, so none drops out unseen."""
    from vpo.trainer.passes import shift_labels_full

    if size < 1:
        raise ValueError(f"batch_size must be >= 1, got {size}")
    counts.setdefault("skipped_records", 0)
    for i in range(0, len(records), size):
        recs = list(records[i:i + size])
        batch = collator(recs)
        counts["skipped_records"] += len(recs) - len(batch["ids"])
        if batch["ids"]:
            yield batch, shift_labels_full(batch["labels"])


def _aligned(processor, lab_row, text: str, spans) -> Optional[List[Optional[str]]]:
    """The class of each label token of one response (None for the rest); None when tokens and words disagree."""
    from vpo.worlds.shapes.vocab import split_words

    tok = processor.tokenizer
    ids = [int(t) for t in lab_row.tolist() if t != IGNORE]
    toks = tok.convert_ids_to_tokens(ids)
    words = split_words(text)
    if [t.lower() for t in toks[:len(words)]] == [w.lower() for w in words]:  # a word-level tokenizer (shapes)
        return token_classes(text, spans) + [None] * (len(toks) - len(words))
    # Any other tokenizer: character offsets; every token is classed (real data has no visual-word list).
    try:
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, TypeError, ValueError):
        return None
    if list(enc["input_ids"]) != ids[:len(enc["input_ids"])]:
        return None
    cls = ["hallucinated" if any(i < e and j > s for s, e in spans) else "grounded"
           for i, j in enc["offset_mapping"]]
    return cls + [None] * (len(ids) - len(cls))


def _collect(out: Dict[str, list], processor, batch, recs_by_id, lab, columns: Mapping[str, Any]) -> int:
    """Append the classed tokens of one batch to ``out`` (columns: name -> ``[R, T]`` tensor); returns rows skipped."""
    skipped = 0
    b = len(batch["ids"])
    for r in range(2 * b):
        rec = recs_by_id[batch["ids"][r % b]]
        side = "chosen" if r < b else "rejected"
        cls = _aligned(processor, lab[r], rec[side], _spans(rec) if side == "rejected" else ())
        if cls is None:
            skipped += 1
            continue
        pos = (lab[r] != IGNORE).nonzero().flatten().tolist()
        for k, c in zip(pos, cls):
            if c is None:
                continue
            out["cls"].append(c)
            out["row"].append(side)
            out["kind"].append((rec.get("hallucination") or {}).get("kind"))
            for name, t in columns.items():
                out[name].append(float(t[r, k]))
    return skipped


# ---------------------------------------------------------------------------------------------------- signals
def tpo_signals(model, processor, records: Sequence[Mapping], *, noise_step: int = 500, a: float = 0.5,
                seed: int = 0, batch_size: int = 16, noise_clip: str = "clamp") -> Dict[str, list]:
    """TPO's ``s`` and ``c`` on every classed token of ``records`` (module docstring), the noised image as the
    trainer's collator makes it (``noise_step``, one fixed draw per record from ``seed``). Returns columns ``s``,
    ``c``, ``cls``, ``row``, ``kind`` (one entry per token), ``skipped_rows`` (responses whose tokens and words
    disagree) and ``skipped_records`` (records the collator skips)."""
    import torch

    from vpo.data.batching import model_inputs
    from vpo.data.collator import PreferenceCollator
    from vpo.oracle.logprobs import transform_logits
    from vpo.oracle.tpo import tpo_calibrated_reward, tpo_scores
    from vpo.trainer.modeling import head_transform, lm_head, model_family
    from vpo.trainer.passes import forward_hidden

    softcap, scale = head_transform(model)  # the logits TPO's s compares are the model's own (soft-capped, scaled)
    collator = PreferenceCollator(processor, model_family(model), method="tpo", seed=seed, fixed_noise=True,
                                  noise_step=noise_step, noise_clip=noise_clip)
    by_id = {r["id"]: r for r in records}
    out: Dict[str, list] = {"s": [], "c": [], "cls": [], "row": [], "kind": []}
    skipped = 0
    weight, bias = lm_head(model)
    model.eval()
    with torch.no_grad():
        for batch, lab in _collated(collator, records, batch_size, out):              # lab: [2B, L]
            z = []
            for inputs in (batch, batch["sub"]["noised"]):
                h = forward_hidden(model, model_inputs(inputs)).to(weight.dtype)      # [2B, L, D]
                w_y = weight[lab.clamp_min(0)]                                        # [2B, L, D]
                raw = (h * w_y).sum(-1) + (bias[lab.clamp_min(0)] if bias is not None else 0)  # [2B, L]
                z.append(transform_logits(raw, logit_softcap=softcap, logit_scale=scale))
            s = tpo_scores(z[0], z[1])
            b = len(batch["ids"])
            chosen = torch.arange(2 * b) < b
            c = tpo_calibrated_reward(s, chosen, a=a)
            skipped += _collect(out, processor, batch, by_id, lab, {"s": s, "c": c})
    out["skipped_rows"] = skipped
    return out


def catpo_signals(model, processor, records: Sequence[Mapping], *, layers: Optional[Sequence[int]] = None,
                  heads=None, alpha: float = 0.5, lambda_ref: float = 0.5, batch_size: int = 16) -> Dict[str, list]:
    """Cat-PO's ``T`` and ``w`` on every classed token (module docstring), from the model's attention averaged over
    ``layers`` (None: all) and ``heads`` (None: all; a list for every layer or ``{layer: [heads]}``, as
    ``VPOConfig.catpo_heads``). Returns columns ``T``, ``w``, ``cls``, ``row``, ``kind``, ``skipped_rows`` and
    ``skipped_records`` (as :func:`tpo_signals`)."""
    import torch

    from vpo.data.batching import model_inputs
    from vpo.data.collator import PreferenceCollator
    from vpo.integrations import catpo_weights_for_batch
    from vpo.trainer.modeling import model_family

    collator = PreferenceCollator(processor, model_family(model), method="dpo")
    by_id = {r["id"]: r for r in records}
    out: Dict[str, list] = {"T": [], "w": [], "cls": [], "row": [], "kind": []}
    skipped = 0
    model.eval()
    for batch, lab in _collated(collator, records, batch_size, out):
        with torch.no_grad():
            t = catpo_weights_for_batch(model, model_inputs(batch), lab, is_chosen=True, layers=layers, heads=heads,
                                        alpha=alpha, lambda_ref=lambda_ref) - lambda_ref  # [2B, L]: T
        b = len(batch["ids"])
        chosen = (torch.arange(2 * b) < b)[:, None]
        w = torch.where(chosen, lambda_ref + t, lambda_ref + 1 - t)
        skipped += _collect(out, processor, batch, by_id, lab, {"T": t, "w": w})
    out["skipped_rows"] = skipped
    return out


def catpo_head_grid(model, processor, records: Sequence[Mapping], *, alpha: float = 1.0, lambda_ref: float = 0.5,
                    batch_size: int = 16, log=None) -> Dict[str, Any]:
    """Cat-PO's signal from every single attention head: the AUROC of ``T`` (grounded above hallucinated) when the
    image attention is read from layer ``l``'s head ``h`` alone, for every ``(l, h)`` of the language model (one pass
    over ``records`` each). Returns ``num_layers``, ``num_heads``, ``cells`` (``{(l, h): summarize_tokens(...)}``) and
    ``ranked`` (``"l:h"`` strings, best AUROC first: candidates for ``VPOConfig.catpo_heads``)."""
    from vpo.integrations.attention_capture import _language_model

    config = _language_model(model).config
    n_layers, n_heads = int(config.num_hidden_layers), int(config.num_attention_heads)
    cells: Dict[Tuple[int, int], Dict[str, Any]] = {}
    for layer in range(n_layers):
        for head in range(n_heads):
            tok = catpo_signals(model, processor, records, layers=[layer], heads=[head], alpha=alpha,
                                lambda_ref=lambda_ref, batch_size=batch_size)
            cells[(layer, head)] = summarize_tokens(tok, "T")
            if log is not None:
                log(f"  cat-po layer {layer} head {head}: AUROC of T {cells[(layer, head)]['auroc']:.3f}")
    ranked = sorted(cells, key=lambda c: (math.isnan(cells[c]["auroc"]), -cells[c]["auroc"]))  # NaN (no class) last
    return {"num_layers": n_layers, "num_heads": n_heads, "alpha": alpha, "cells": cells,
            "ranked": [f"{l}:{h}" for l, h in ranked]}


def response_logps(model, processor, records: Sequence[Mapping], *, batch_size: int = 16) -> List[List[float]]:
    """``[[logp(chosen), logp(rejected)], ...]``: each record's summed response log-probabilities (end-of-turn
    token excluded), in the order of ``records`` (NaN for a record the collator skips)."""
    import torch

    from vpo.data.batching import model_inputs
    from vpo.data.collator import PreferenceCollator
    from vpo.oracle.logprobs import head_logits
    from vpo.trainer.modeling import head_transform, lm_head, model_family
    from vpo.trainer.passes import forward_hidden

    collator = PreferenceCollator(processor, model_family(model), method="dpo")
    weight, bias = lm_head(model)
    softcap, scale = head_transform(model)
    got: Dict[str, List[float]] = {}
    model.eval()
    with torch.no_grad():
        for batch, lab in _collated(collator, records, batch_size, {}):               # lab: [2B, L]
            h = forward_hidden(model, model_inputs(batch)).to(weight.dtype)           # [2B, L, D]
            logits = head_logits(h, weight, bias, logit_softcap=softcap, logit_scale=scale)  # [2B, L, V] (small V)
            lp = torch.log_softmax(logits.float(), -1).gather(-1, lab.clamp_min(0)[..., None])[..., 0]
            mask = lab != IGNORE
            last = mask.long().cumsum(1) == mask.long().sum(1, keepdim=True)          # the end-of-turn token
            seq = (lp * (mask & ~last)).sum(1)                                        # [2B]
            b = len(batch["ids"])
            for i, rid in enumerate(batch["ids"]):
                got[rid] = [float(seq[i]), float(seq[b + i])]
    return [got.get(r["id"], [float("nan"), float("nan")]) for r in records]


def csr_ranking(model, processor, records: Sequence[Mapping], *, lams: Sequence[float] = (0.9,), scorer=None,
                batch_size: int = 16) -> Dict[str, Any]:
    """CSR's calibrated reward on each pair with a hallucination (module docstring): per ``λ`` in ``lams`` the rate
    of R(chosen) > R(rejected); also ``R_T`` alone (λ = 0) and ``R_I`` alone (λ = 1), and per ``λ`` the rate on the
    omission pairs (``omission_rates``, over ``n_omission``). ``scorer``: an image-text
    scorer ``(image, texts, record=) -> [R_I]`` (default: the shapes world's exact one)."""
    from PIL import Image

    from vpo.construct.csr_scorers import make_scorer
    from vpo.construct.csr_search import calibrated_reward

    import math

    recs = [r for r in records if _spans(r)]
    if not recs:
        raise ValueError("records has no pair with hallucination spans: CSR's ranking needs grounded vs hallucinated")
    # Pairs whose rejected response only leaves something out (the shapes world's "omission"): complete vs shorter.
    omit = [r for r in records if not _spans(r) and (r.get("hallucination") or {}).get("kind") == "omission"]
    scorer = scorer or make_scorer("shapes")
    lps = response_logps(model, processor, recs + omit, batch_size=batch_size)
    r_t, r_i = [], []
    for rec, lp in zip(recs + omit, lps):
        with Image.open(rec["image"]) as im:
            r_i.append(scorer(im.convert("RGB"), [rec["chosen"], rec["rejected"]], record=rec))
        r_t.append([math.exp(v) for v in lp])

    def rate(lam, lo, hi):
        if hi <= lo:
            return float("nan")
        wins = 0.0
        for (ti_c, ti_r), (tt_c, tt_r) in zip(r_i[lo:hi], r_t[lo:hi]):
            c, r = calibrated_reward(ti_c, tt_c, lam), calibrated_reward(ti_r, tt_r, lam)
            wins += 1.0 if c > r else 0.5 if c == r else 0.0
        return wins / (hi - lo)

    n, m = len(recs), len(recs) + len(omit)
    return {"n": n, "rates": {f"{lam:g}": rate(lam, 0, n) for lam in lams}, "R_T_only": rate(0.0, 0, n),
            "R_I_only": rate(1.0, 0, n), "n_omission": len(omit),
            "omission_rates": {f"{lam:g}": rate(lam, n, m) for lam in lams}}


def lpoi_order(model, processor, lists: Sequence[Mapping], *, batch_size: int = 16) -> Dict[str, Any]:
    """LPOI's ranking on lists written by :func:`vpo.construct.lpoi.write_lpoi_dataset` (records with ``image``,
    ``image_list`` = ``x_2 .. x_L``, ``bbox``): ``pair_rate`` = the share of ordered pairs ``j < k`` of a list with
    logp(chosen | x_j) > logp(chosen | x_k); ``list_rate`` = lists whose log-probabilities fall all the way;
    ``visibility_rate`` = lists whose visible share of the box (pixels equal to ``x_1``'s) falls strictly."""
    import numpy as np
    from PIL import Image

    lists = [r for r in lists if r.get("image_list")]
    if not lists:
        raise ValueError("lists has no record with an image_list: write them with vpo lpoi-lists")
    flat, shape = [], []
    vis_ok = 0
    for r in lists:
        images = [r["image"]] + list(r["image_list"])
        shape.append(len(images))
        x0, y0, x1, y1 = (int(v) for v in r["bbox"])
        with Image.open(images[0]) as im:
            ref = np.asarray(im.convert("RGB"))[y0:y1, x0:x1]
        vis = []
        for k, path in enumerate(images):
            with Image.open(path) as im:
                vis.append(float((np.asarray(im.convert("RGB"))[y0:y1, x0:x1] == ref).all(-1).mean()))
            flat.append({"id": f"{r['id']}#x{k + 1}", "image": path, "prompt": r["prompt"], "chosen": r["chosen"],
                         "rejected": r["chosen"]})
        vis_ok += all(a > b for a, b in zip(vis, vis[1:]))
    lps = [lp[0] for lp in response_logps(model, processor, flat, batch_size=batch_size)]
    pairs = good = whole = 0
    i = 0
    for n in shape:
        v = lps[i:i + n]
        i += n
        pj = [(a, b) for j, a in enumerate(v) for b in v[j + 1:]]
        pairs += len(pj)
        good += sum(a > b for a, b in pj)
        whole += all(a > b for a, b in zip(v, v[1:]))
    return {"n": len(lists), "L": max(shape), "pair_rate": good / pairs if pairs else float("nan"),
            "list_rate": whole / len(lists), "visibility_rate": vis_ok / len(lists)}


def ovip_negatives(records: Sequence[Mapping], *, generator=None) -> Dict[str, Any]:
    """OViP's negative images (module docstring) for each pair whose rejected response claims something (kinds other
    than ``omission``): the generator's image from the rejected response (default
    :class:`vpo.online.negatives.ShapesNegativeGenerator`, the demo's), and the scene it renders (same seed)."""
    import numpy as np
    from PIL import Image

    from vpo.online.negatives import NegativeRequest, ShapesNegativeGenerator
    from vpo.worlds.shapes import Scene, parse_description
    from vpo.worlds.shapes.pairs import scene_from_description

    gen = generator or ShapesNegativeGenerator()
    recs = [r for r in records if (r.get("hallucination") or {}).get("claimed") and r.get("objects")]
    if not recs:
        raise ValueError("records has no pair whose hallucination claims an object (with the scene's 'objects')")
    claimed = only = pixels = 0
    for i, r in enumerate(recs):
        base = Scene.from_dict(r)
        req = NegativeRequest(prompt=r["prompt"], chosen=r["chosen"], rejected=r["rejected"], context=r, seed=i)
        neg_img = gen.generate([req])[0]
        with Image.open(r["image"]) as im:
            pixels += bool((np.asarray(im.convert("RGB")) != np.asarray(neg_img.convert("RGB"))).any())
        neg = scene_from_description(r["rejected"], np.random.default_rng(i), base=base)
        count, color, shape = r["hallucination"]["claimed"]
        have = sum(o.kind == (color, shape) for o in neg.objects)
        claimed += have == int(count)
        said = {(m.color, m.shape) for m in parse_description(r["rejected"])}
        keep = lambda s: sorted(o.kind for o in s.objects if o.kind != (color, shape) and o.kind in said)  # noqa
        only += keep(neg) == keep(base)
    n = len(recs)
    return {"n": n, "claimed_rate": claimed / n, "only_rate": only / n, "pixels_rate": pixels / n}


def csr_pairs(records: Sequence[Mapping]) -> Dict[str, Any]:
    """What CSR's search chose (a ``vpo csr`` dataset of the shapes world, rows with ``objects``), against the truth:
    the share of pairs whose chosen response has fewer / as many / more hallucinated mentions than the rejected one
    (``fewer``, ``equal``, ``more``), and covers more / fewer of the scene's kinds (``covers_more``,
    ``covers_fewer``), and whose rejected response names no object at all (``rejected_empty``). Pairs that teach
    saying less show up as equal hallucination and lower coverage; pairs against an empty caption teach nothing about
    hallucination."""
    from vpo.eval.metrics import score_response

    rows = [r for r in records if r.get("objects")]
    if not rows:
        raise ValueError("records has no row with 'objects': expected a vpo csr dataset built on the shapes world")
    out = {"n": len(rows), "fewer": 0, "equal": 0, "more": 0, "covers_more": 0, "covers_fewer": 0,
           "rejected_empty": 0}
    for r in rows:
        c, j = score_response(r["chosen"], r), score_response(r["rejected"], r)
        out["rejected_empty"] += not j.mentions  # a rejected response that names no object at all
        hc, hj = len(c.hallucinated), len(j.hallucinated)
        out["fewer" if hc < hj else "equal" if hc == hj else "more"] += 1
        out["covers_more"] += c.covered_kinds > j.covered_kinds
        out["covers_fewer"] += c.covered_kinds < j.covered_kinds
    for k in ("fewer", "equal", "more", "covers_more", "covers_fewer", "rejected_empty"):
        out[k] /= len(rows)
    return out
