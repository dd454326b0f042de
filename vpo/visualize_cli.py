"""``vpo visualize``: per-token rewards of a response (HTML + PNG, like TPO's Figure 1) and training curves (PNG).

    vpo visualize rewards --model PATH [--model PATH2 ...] --data DIR|FILE.jsonl [--index N] [--kind tpo|catpo]
                          [--out DIR]
    vpo visualize curves --run DIR [--out FILE.png] [--keys loss,rewards/margins,rewards/accuracies]

``rewards``: for preference record ``N`` (a folder written by :func:`vpo.worlds.shapes.make_dataset` — its
``{split}.jsonl``, ``--split train`` — or any JSONL of ``docs/data_format.md``), each model's per-token values on the
chosen and the rejected response:

- ``--kind tpo``: TPO's self-calibrated visual-anchored reward ``c = a + σ(±s)`` with
  ``s = z(y_i | clean image) − z(y_i | noised image)`` (raw target logits; ``+`` on the chosen row, ``−`` on the
  rejected one), from the model's two forward passes through :func:`vpo.fused_tpo_loss` (``out.token_rewards``). The
  noised image is the collator's TPO noise (``--noise-step``, one fixed draw per record, ``--seed``). ``c > 1``
  (blue): the token's logit leans on the image in the direction TPO rewards; ``c < 1`` (red): against it.
- ``--kind catpo``: Cat-PO's token weights ``w = λ_ref + T`` from the model's attention on the image tokens and the
  semantic similarity of each token to the image features (:func:`vpo.integrations.catpo_weights_for_batch`).

Words the record marks as hallucinated (the shapes world's ``hallucination.spans``) are drawn with a trailing ``*``.
Writes ``rewards_<kind>_<N>.html``, ``.png`` and ``.json`` (the values) to ``--out``.

``curves``: the Trainer's ``log_history`` of a run folder (``trainer_state.json``) plotted against the step
(:func:`vpo.visualize.training_curves_png`).
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

KINDS = ("tpo", "catpo")
DEFAULT_CURVE_KEYS = ("loss", "rewards/margins", "rewards/accuracies")


def read_record(data: str, index: int, split: str = "train") -> Dict[str, Any]:
    """Preference record ``index`` of ``data`` (a JSONL file, or a folder holding ``{split}.jsonl``), image paths
    made absolute."""
    from vpo.worlds.shapes import read_jsonl

    path = os.path.join(data, f"{split}.jsonl") if os.path.isdir(data) else data
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--data {data!r}: no {path}")
    rows = read_jsonl(path)
    if not 0 <= index < len(rows):
        raise ValueError(f"--index must lie in [0, {len(rows)}) for {path}, got {index}")
    rec = dict(rows[index])
    root = os.path.dirname(os.path.abspath(path))
    for key in ("image", "neg_image"):
        v = rec.get(key)
        if isinstance(v, str) and v and not os.path.isabs(v) and not v.startswith("data:"):
            rec[key] = os.path.join(root, v)
    rec.setdefault("id", f"{os.path.basename(path)}:{index + 1}")
    return rec


def hallucinated_words(rec: Mapping[str, Any]) -> Optional[List[bool]]:
    """Per word of the rejected response, whether the record's ``hallucination.spans`` cover it (None without)."""
    h = rec.get("hallucination")
    if not isinstance(h, Mapping) or not h.get("spans"):
        return None
    from vpo.worlds.shapes import word_span_mask

    return word_span_mask(rec["rejected"], [tuple(s) for s in h["spans"]])


def token_values(model, processor, rec: Mapping[str, Any], *, kind: str = "tpo", family: Optional[str] = None,
                 a: float = 0.5, noise_step: int = 500, seed: int = 0, alpha: float = 0.5, lambda_ref: float = 0.5,
                 impl: str = "auto") -> Dict[str, Tuple[List[str], List[float]]]:
    """``{"chosen": (tokens, values), "rejected": (tokens, values)}``: one value per label token of each response
    (its end-of-turn token included), TPO's ``c`` or Cat-PO's ``w`` of ``model`` (module docstring)."""
    import torch

    from vpo.data.collator import PreferenceCollator, model_inputs
    from vpo.trainer.modeling import lm_head, model_family
    from vpo.trainer.passes import forward_hidden, shift_labels_full

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {list(KINDS)}, got {kind!r}")
    family = family or model_family(model)
    collator = PreferenceCollator(processor, family, method="tpo" if kind == "tpo" else "dpo", seed=seed,
                                  fixed_noise=True, noise_step=noise_step)
    batch = collator([dict(rec)])
    if not batch["ids"]:
        raise ValueError(f"record {rec.get('id')!r} was skipped by the collator: {batch['skipped']}")
    device = next(model.parameters()).device
    to = lambda d: {k: v.to(device) for k, v in model_inputs(d).items()}  # noqa: E731
    labels = shift_labels_full(batch["labels"]).to(device)  # [2, L]: labels[:, t] = input_ids[:, t + 1]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if kind == "tpo":
                from vpo.fused import fused_tpo_loss

                h = forward_hidden(model, to(batch))[:, :-1]
                hn = forward_hidden(model, to(batch["sub"]["noised"]))[:, :-1]
                weight, bias = lm_head(model)
                # The reference is the model itself (the loss is then log 2); only the policy's c is wanted.
                _, out = fused_tpo_loss(weight, h.to(weight.dtype), hn.to(weight.dtype), labels[:, :-1], bias,
                                        ref_hidden=h.to(weight.dtype), ref_hidden_noised=hn.to(weight.dtype), a=a,
                                        impl=impl)
                values = out.token_rewards
                lab = labels[:, :-1]
            else:
                from vpo.integrations import catpo_weights_for_batch

                values = catpo_weights_for_batch(model, to(batch), labels, alpha=alpha, lambda_ref=lambda_ref)
                lab = labels
    finally:
        model.train(was_training)
    tok = processor.tokenizer
    out_rows = {}
    for name, r in (("chosen", 0), ("rejected", 1)):
        mask = lab[r] != -100
        ids = lab[r][mask].tolist()
        out_rows[name] = (tok.convert_ids_to_tokens(ids), values[r][mask].float().cpu().tolist())
    return out_rows


def reward_pictures(models: Sequence[Tuple[str, Any]], processor, rec: Mapping[str, Any], out_dir: str, *,
                    kind: str = "tpo", index: Optional[int] = None, title: Optional[str] = None,
                    **kwargs) -> Dict[str, str]:
    """Per-token values of each ``(label, model)`` on ``rec``'s chosen and rejected responses, as one HTML page, one
    PNG and one JSON in ``out_dir``; returns ``{"html", "png", "json"}`` paths."""
    from vpo.visualize import token_rewards_html, token_rewards_png

    marks = hallucinated_words(rec)
    rows_t, rows_v, labels, dump = [], [], [], []
    for label, model in models:
        vals = token_values(model, processor, rec, kind=kind, **kwargs)
        for which in ("chosen", "rejected"):
            toks, v = vals[which]
            shown = list(toks)
            if which == "rejected" and marks is not None and len(marks) <= len(shown):
                shown = [t + "*" if i < len(marks) and marks[i] else t for i, t in enumerate(shown)]
            rows_t.append(shown)
            rows_v.append(v)
            labels.append(f"{label} · {which}")
            dump.append({"model": label, "response": which, "tokens": toks, "values": v})
    name = "c" if kind == "tpo" else "w"
    what = "TPO calibrated reward c = a + σ(±s)" if kind == "tpo" else "Cat-PO token weight w = λ_ref + T"
    notes = [f"record {rec.get('id')} · prompt: {rec.get('prompt')!r}"]
    if marks is not None:
        notes.append("* = hallucinated word")
    title = title or what
    image = rec.get("image") if isinstance(rec.get("image"), str) and os.path.isfile(rec["image"]) else None
    stem = f"rewards_{kind}" + (f"_{index}" if index is not None else "")
    os.makedirs(out_dir, exist_ok=True)
    paths = {"html": os.path.join(out_dir, stem + ".html"), "png": os.path.join(out_dir, stem + ".png"),
             "json": os.path.join(out_dir, stem + ".json")}
    with open(paths["html"], "w", encoding="utf-8") as f:
        f.write(token_rewards_html(rows_t, rows_v, title=title, labels=labels, value_name=name, image=image,
                                   notes=notes))
    token_rewards_png(rows_t, rows_v, paths["png"], title=title, labels=labels, value_name=name, image=image,
                      notes=notes)
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump({"kind": kind, "record": {k: rec.get(k) for k in ("id", "prompt", "chosen", "rejected")},
                   "rows": dump}, f, indent=1)
    return paths


def model_label(spec: str) -> str:
    """A short name for a ``--model``: the folder's name, or its parent's when the folder is called ``model``
    (``out/tpo/model`` -> ``tpo``)."""
    parts = os.path.normpath(spec).split(os.sep)
    if len(parts) > 1 and parts[-1] == "model":
        return parts[-2]
    return parts[-1] or spec


def _rewards_main(args) -> int:
    import torch

    from vpo.eval.cli import load_for_eval, quiet_transformers

    if args.threads:
        torch.set_num_threads(args.threads)
    rec = read_record(args.data, args.index, args.split)
    models, processor = [], None
    for spec in args.model:
        with quiet_transformers():
            model, proc = load_for_eval(spec, cache_dir=args.cache_dir)
        processor = processor or proc
        models.append((model_label(spec), model))
    paths = reward_pictures(models, processor, rec, args.out, kind=args.kind, index=args.index, a=args.tpo_a,
                            noise_step=args.noise_step, seed=args.seed)
    for k in ("html", "png", "json"):
        print(f"{k}: {paths[k]}")
    return 0


def _curves_main(args) -> int:
    from vpo.visualize import training_curves_png

    keys = [k.strip() for k in args.keys.split(",") if k.strip()]
    run = args.run_dir
    if not os.path.exists(run):
        print(f"vpo visualize curves: --run {run!r}: no such file or folder", file=sys.stderr)
        return 2
    out = args.out or os.path.join(run if os.path.isdir(run) else os.path.dirname(run), "curves.png")
    try:
        training_curves_png(run, out, keys, title=args.title or os.path.basename(os.path.normpath(run)))
    except ValueError as err:
        print(f"vpo visualize curves: {err}", file=sys.stderr)
        return 2
    print(f"png: {out}")
    return 0


def add_subcommands(parser) -> None:
    """Add ``rewards`` and ``curves`` under the ``visualize`` parser; each sets ``args.run``."""
    sub = parser.add_subparsers(dest="what", required=True)
    r = sub.add_parser("rewards", help="per-token TPO c (or Cat-PO w) of a preference record's responses")
    r.add_argument("--model", action="append", required=True,
                   help="a model folder, a LoRA adapter folder, tiny-cache or tiny:<family>; repeat to compare")
    r.add_argument("--data", required=True, help="a make_dataset folder (its {split}.jsonl) or a preference JSONL")
    r.add_argument("--split", default="train")
    r.add_argument("--index", type=int, default=0, help="which record (0-based line)")
    r.add_argument("--kind", choices=KINDS, default="tpo")
    r.add_argument("--out", default="vpo-rewards", help="output folder")
    r.add_argument("--tpo-a", type=float, default=0.5, help="TPO's a (c = a + σ(±s))")
    r.add_argument("--noise-step", type=int, default=500, help="TPO's diffusion-noise step k")
    r.add_argument("--seed", type=int, default=0, help="seed of the noise draw")
    r.add_argument("--threads", type=int, default=None)
    r.add_argument("--cache-dir", default=None)
    r.set_defaults(run=_rewards_main)
    c = sub.add_parser("curves", help="training curves of a run folder (trainer_state.json) to PNG")
    c.add_argument("--run", dest="run_dir", required=True,
                   help="a run folder (trainer_state.json, or checkpoint-*/), or a trainer_state.json")
    c.add_argument("--out", default=None, help="PNG path (default RUN/curves.png)")
    c.add_argument("--keys", default=",".join(DEFAULT_CURVE_KEYS), help="comma-separated log keys")
    c.add_argument("--title", default=None)
    c.set_defaults(run=_curves_main)
