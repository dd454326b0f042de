"""``vpo diagnose``: each method's signal on pairs with ground truth, as a table and a PNG (:mod:`vpo.diagnose`).

    vpo diagnose --model DIR --data PAIRS.jsonl|DIR [--create N] [--methods tpo,catpo,csr,lpoi,ovip] [--limit N]
                 [--noise-steps 250,500] [--tpo-a 0,0.5] [--catpo-layers "all;0;2"] [--catpo-alpha 0.5]
                 [--catpo-heads "all;0,3;1:2"] [--catpo-per-head]
                 [--csr-lams 0.1,0.9] [--csr-metrics precision,f1] [--csr-pairs F]
                 [--lpoi-lists FILE] [--out DIR] [--seed S] [--threads T]

``--data``: preference records whose rejected response marks its hallucinated words (the shapes world's
``hallucination.spans``; a record without them, such as an RLHF-V pair, is diffed against its chosen correction:
:func:`vpo.diagnose.diff_spans`). A folder means ``DIR/val_pairs.jsonl``; ``--create N`` writes N shapes-world pairs
there first (the demo's prior and caption grammar, validation scenes: never the test split's).

Settings that a paper leaves free are swept by giving several values: one table row per value. Writes
``diagnose.json`` (every number) and ``diagnose.png`` (the distributions of TPO's ``s`` and ``c`` and of Cat-PO's
``T`` on grounded vs hallucinated tokens, at the first value of each sweep, and the rates of CSR, LPOI and OViP).
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Dict, List

METHODS = ("tpo", "catpo", "csr", "lpoi", "ovip")


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, help="a model folder (e.g. the demo's SFT model) or tiny-cache")
    p.add_argument("--data", required=True, help="a JSONL of preference records, or a folder with val_pairs.jsonl")
    p.add_argument("--create", type=int, default=None, metavar="N",
                   help="write N shapes-world validation pairs to --data (a folder) first if it has none")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated, from: " + ", ".join(METHODS))
    p.add_argument("--limit", type=int, default=None, help="the first N records only")
    p.add_argument("--noise-steps", default="500", help="TPO: diffusion-noise steps k to try (comma-separated)")
    p.add_argument("--tpo-a", default="0.5", help="TPO: offsets a to try (comma-separated; never changes an AUROC)")
    p.add_argument("--catpo-layers", default="all",
                   help="Cat-PO: layer sets to try, ';'-separated, each 'all' or comma-separated ints")
    p.add_argument("--catpo-alpha", default="0.5", help="Cat-PO: α values to try (comma-separated)")
    p.add_argument("--catpo-heads", default="all",
                   help="Cat-PO: head sets to try, ';'-separated, each 'all', heads for every layer ('0,3') or "
                        "layer:head pairs ('1:0,2:3'), as VPOConfig.catpo_heads")
    p.add_argument("--catpo-per-head", action="store_true",
                   help="Cat-PO: also the AUROC of T from every single (layer, head) at the first α: which heads see "
                        "the hallucination (one forward pass over the data per head)")
    p.add_argument("--csr-lams", default="0.9", help="CSR: λ values to try (comma-separated, in [0, 1])")
    p.add_argument("--csr-metrics", default="precision",
                   help="CSR on the shapes world: the scorer's metrics to try (precision, f1; comma-separated)")
    p.add_argument("--csr-pairs", default=None,
                   help="CSR: datasets its search built (vpo csr train.jsonl, comma-separated): chosen vs rejected "
                        "against the shapes world's truth")
    p.add_argument("--lpoi-lists", default=None,
                   help="LPOI lists (vpo lpoi-lists output JSONL); default: built from --data into --out/lpoi")
    p.add_argument("--out", default="vpo-diagnose", help="output folder (diagnose.json, diagnose.png)")
    p.add_argument("--seed", type=int, default=0, help="TPO's noise draw, the created pairs")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--cache-dir", default=None, help="cache root for tiny-cache")


def _floats(flag: str, text: str, lo: float = float("-inf"), hi: float = float("inf")) -> List[float]:
    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        vals = []
    if not vals or any(not lo <= v <= hi for v in vals):
        raise ValueError(f"--{flag} must be comma-separated numbers in [{lo:g}, {hi:g}], got {text!r}")
    return vals


def _layer_sets(text: str):
    out = []
    for part in text.split(";"):
        part = part.strip()
        if part in ("", "all"):
            out.append(None)
            continue
        try:
            out.append([int(v) for v in part.split(",") if v.strip()])
        except ValueError:
            raise ValueError(f"--catpo-layers must be ';'-separated sets of 'all' or comma-separated ints, got "
                             f"{text!r}") from None
    return out


def _head_sets(text: str) -> List[str]:
    """``--catpo-heads`` as a list of ``VPOConfig.catpo_heads`` strings (each checked; ``"all"`` for every head)."""
    from vpo.ops.attention_select import parse_heads

    out = []
    for part in text.split(";"):
        part = part.strip() or "all"
        parse_heads(part, name="--catpo-heads")
        out.append(part)
    return out


def parse_settings(args) -> Dict[str, Any]:
    """The sweeps of ``args``, checked (a ``ValueError`` names the flag)."""
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise ValueError(f"--methods must be drawn from {', '.join(METHODS)}, got {args.methods!r}")
    steps = _floats("noise-steps", args.noise_steps, 0, 999)
    if any(v != int(v) for v in steps):
        raise ValueError(f"--noise-steps must be integers in [0, 999], got {args.noise_steps!r}")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    return {"methods": methods, "noise_steps": [int(v) for v in steps], "tpo_a": _floats("tpo-a", args.tpo_a, 0),
            "catpo_layers": _layer_sets(args.catpo_layers), "catpo_alpha": _floats("catpo-alpha", args.catpo_alpha,
                                                                                    0, 1),
            "catpo_heads": _head_sets(args.catpo_heads), "catpo_per_head": bool(args.catpo_per_head),
            "csr_lams": _floats("csr-lams", args.csr_lams, 0, 1), "csr_metrics": _metrics(args.csr_metrics),
            "csr_pairs": [p for p in (args.csr_pairs or "").split(",") if p.strip()]}


def _metrics(text: str) -> List[str]:
    vals = [v.strip() for v in text.split(",") if v.strip()]
    if not vals or any(v not in ("precision", "f1") for v in vals):
        raise ValueError(f"--csr-metrics must be comma-separated, from precision, f1, got {text!r}")
    return vals


def create_pairs(folder: str, n: int, seed: int = 0) -> str:
    """``folder/val_pairs.jsonl``: ``n`` shapes-world pairs drawn like the demo's (its prior, grammar and pair
    kinds, plus absent-object pairs), on scenes of their own split (``val_pairs``)."""
    from vpo.demo import CAPTION_STYLE, PAIR_KINDS, PRESETS, PRIOR_PAIR_PROB
    from vpo.worlds import shapes

    kinds = tuple(dict.fromkeys(PAIR_KINDS + ("absent",)))
    return shapes.make_dataset(folder, n, seed=seed, split="val_pairs", prior=PRESETS["full"].prior(), kinds=kinds,
                               prior_pair_prob=PRIOR_PAIR_PROB, style=CAPTION_STYLE)


def run(model, processor, records, settings: Dict[str, Any], *, out: str, seed: int = 0, batch_size: int = 16,
        lpoi_lists: str = None, log=print) -> Dict[str, Any]:
    """Every requested diagnostic of :mod:`vpo.diagnose` over the sweeps; returns the result (also written)."""
    import torch

    from vpo import diagnose as dg
    from vpo.oracle.tpo import tpo_calibrated_reward

    res: Dict[str, Any] = {"n_records": len(records), "settings": settings, "rows": [], "seconds": {}}
    rows = res["rows"]
    dists: Dict[str, Any] = {}
    m = settings["methods"]
    if "tpo" in m:
        t = time.perf_counter()
        for k in settings["noise_steps"]:
            tok = dg.tpo_signals(model, processor, records, noise_step=k, seed=seed, batch_size=batch_size)
            s_stat = dg.summarize_tokens(tok, "s")
            rows.append({"method": "tpo", "setting": f"k={k}", "signal": "s", "kind": "auroc", **_row(s_stat),
                         **_skips(tok)})
            chosen = torch.tensor([r == "chosen" for r in tok["row"]])
            for a in settings["tpo_a"]:
                c = tpo_calibrated_reward(torch.tensor(tok["s"]), chosen, a=a)
                tok_a = {**tok, "c": c.tolist(), "log_c": c.log().tolist()}
                c_stat = dg.summarize_tokens(tok_a, "c", rows="rejected", higher="hallucinated")
                g = dg.summarize_tokens(tok_a, "log_c", rows="rejected", higher="hallucinated")
                gap = g["hallucinated"].get("mean", float("nan")) - g["grounded"].get("mean", float("nan"))
                rows.append({"method": "tpo", "setting": f"k={k}, a={a:g}", "signal": "c (rejected)",
                             "kind": "auroc", **_row(c_stat), "log_c_gap": gap})
                if "tpo" not in dists:
                    dists["tpo"] = {"k": k, "a": a, "s": _split(tok, "s"), "c": _split(tok_a, "c", "rejected")}
        res["seconds"]["tpo"] = time.perf_counter() - t
    if "catpo" in m:
        t = time.perf_counter()
        from vpo.ops.attention_select import parse_heads

        for layers in settings["catpo_layers"]:
            for heads in settings.get("catpo_heads", ["all"]):
                for alpha in settings["catpo_alpha"]:
                    if isinstance(parse_heads(heads), dict) and layers is not None:
                        continue  # layer:head pairs choose their layers: one row, under layers=all
                    tok = dg.catpo_signals(model, processor, records, layers=layers, heads=parse_heads(heads),
                                           alpha=alpha, batch_size=batch_size)
                    name = f"layers={'all' if layers is None else ','.join(map(str, layers))}, alpha={alpha:g}"
                    name += "" if heads == "all" else f", heads={heads}"
                    rows.append({"method": "catpo", "setting": name, "signal": "T", "kind": "auroc",
                                 **_row(dg.summarize_tokens(tok, "T")), **_skips(tok)})
                    rows.append({"method": "catpo", "setting": name, "signal": "w (rejected)", "kind": "auroc",
                                 **_row(dg.summarize_tokens(tok, "w", rows="rejected", higher="hallucinated"))})
                    dists.setdefault("catpo", {"setting": name, "T": _split(tok, "T")})
        if settings.get("catpo_per_head"):
            res["catpo_per_head"] = dg.catpo_head_grid(model, processor, records, alpha=settings["catpo_alpha"][0],
                                                       batch_size=batch_size, log=log)
            for (layer, head), stat in res["catpo_per_head"]["cells"].items():
                rows.append({"method": "catpo", "setting": f"layer {layer}, head {head} only, "
                             f"alpha={settings['catpo_alpha'][0]:g}", "signal": "T", "kind": "auroc", **_row(stat)})
            res["catpo_per_head"]["cells"] = {f"{l}:{h}": v for (l, h), v in res["catpo_per_head"]["cells"].items()}
        res["seconds"]["catpo"] = time.perf_counter() - t
    if "csr" in m:
        t = time.perf_counter()
        from vpo.construct.csr_scorers import ShapesWorldScorer

        for metric in settings["csr_metrics"]:
            csr = dg.csr_ranking(model, processor, records, lams=settings["csr_lams"], batch_size=batch_size,
                                 scorer=ShapesWorldScorer(metric))
            for lam, rate in csr["rates"].items():
                rows.append({"method": "csr", "setting": f"{metric}, lambda={lam}", "signal": "R(chosen) > R(rej.)",
                             "kind": "rate", "value": rate, "n": csr["n"]})
                if csr["n_omission"]:
                    rows.append({"method": "csr", "setting": f"{metric}, lambda={lam}",
                                 "signal": "omission: R(full) > R(rej.)", "kind": "rate",
                                 "value": csr["omission_rates"][lam], "n": csr["n_omission"]})
            for key, label in (("R_T_only", "R_T only"), ("R_I_only", f"{metric}, R_I only")):
                rows.append({"method": "csr", "setting": label, "signal": "R(chosen) > R(rej.)", "kind": "rate",
                             "value": csr[key], "n": csr["n"]})
        for path in settings.get("csr_pairs") or []:
            cp = dg.csr_pairs(dg.read_pairs(path))
            for key in ("fewer", "equal", "more", "covers_more", "covers_fewer", "rejected_empty"):
                rows.append({"method": "csr", "setting": f"search pairs {os.path.basename(os.path.dirname(path))}",
                             "signal": f"chosen: {key}", "kind": "rate", "value": cp[key], "n": cp["n"]})
        res["seconds"]["csr"] = time.perf_counter() - t
    if "lpoi" in m:
        t = time.perf_counter()
        path = lpoi_lists or _build_lpoi(records, os.path.join(out, "lpoi"))
        lp = dg.lpoi_order(model, processor, dg.read_pairs(path), batch_size=batch_size)
        for key in ("pair_rate", "list_rate", "visibility_rate"):
            rows.append({"method": "lpoi", "setting": f"L={lp['L']}", "signal": key, "kind": "rate",
                         "value": lp[key], "n": lp["n"]})
        res["seconds"]["lpoi"] = time.perf_counter() - t
    if "ovip" in m:
        ov = dg.ovip_negatives(records)
        for key in ("claimed_rate", "only_rate", "pixels_rate"):
            rows.append({"method": "ovip", "setting": "shapes generator", "signal": key, "kind": "rate",
                         "value": ov[key], "n": ov["n"]})
    os.makedirs(out, exist_ok=True)
    res["table"] = format_table(rows)
    res["png"] = diagnose_png(rows, dists, os.path.join(out, "diagnose.png"), head_grid=res.get("catpo_per_head"))
    res["distributions"] = dists
    with open(os.path.join(out, "diagnose.json"), "w", encoding="utf-8") as f:
        json.dump(res, f, indent=1)
    return res


def _row(stat: Dict[str, Any]) -> Dict[str, Any]:
    g, h = stat["grounded"], stat["hallucinated"]
    return {"value": stat["auroc"], "grounded_mean": g.get("mean", float("nan")),
            "hallucinated_mean": h.get("mean", float("nan")), "n": f"{g['n']}/{h['n']}"}


def _skips(tok) -> Dict[str, int]:
    """The responses and records a signal could not use (shown in the table when any)."""
    return {"skipped_rows": tok.get("skipped_rows", 0), "skipped_records": tok.get("skipped_records", 0)}


def _split(tok, key, rows="both"):
    keep = [i for i, r in enumerate(tok["row"]) if rows == "both" or r == rows]
    return {c: [tok[key][i] for i in keep if tok["cls"][i] == c] for c in ("grounded", "hallucinated")}


def _build_lpoi(records, folder: str) -> str:
    from vpo.construct.lpoi import write_lpoi_dataset

    os.makedirs(folder, exist_ok=True)
    src = os.path.join(folder, "source.jsonl")
    with open(src, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    write_lpoi_dataset(src, folder)
    return os.path.join(folder, "train.jsonl")


def format_table(rows) -> str:
    """The diagnostics as aligned text: method, setting, signal, grounded / hallucinated means, AUROC or rate."""
    w = max([26] + [len(r["setting"]) + 1 for r in rows])
    head = f"{'method':<7}{'setting':<{w}}{'signal':<28}{'grounded':>10}{'halluc.':>10}{'AUROC/rate':>12}{'n':>12}"
    lines = [head, "-" * len(head)]
    for r in rows:
        g = f"{r['grounded_mean']:.3f}" if "grounded_mean" in r else ""
        h = f"{r['hallucinated_mean']:.3f}" if "hallucinated_mean" in r else ""
        extra = f"  log c gap {r['log_c_gap']:+.3f}" if "log_c_gap" in r else ""
        if r.get("skipped_rows") or r.get("skipped_records"):
            extra += f"  skipped: {r['skipped_records']} records, {r['skipped_rows']} responses"
        lines.append(f"{r['method']:<7}{r['setting']:<{w}}{r['signal']:<28}{g:>10}{h:>10}{r['value']:>12.3f}"
                     f"{str(r['n']):>12}{extra}")
    return "\n".join(lines)


def diagnose_png(rows, dists, path: str, head_grid=None) -> str:
    """Histograms of the token signals (grounded vs hallucinated), Cat-PO's per-head AUROC map when ``head_grid``
    (``res["catpo_per_head"]``) is given, and bars of the AUROCs and rates."""
    from vpo.visualize import _makedirs_for, _pyplot

    plt = _pyplot()
    panels = []
    if "tpo" in dists:
        t = dists["tpo"]
        panels += [(f"TPO s (k={t['k']})", t["s"]), (f"TPO c, rejected (k={t['k']}, a={t['a']:g})", t["c"])]
    if "catpo" in dists:
        panels.append((f"Cat-PO T ({dists['catpo']['setting']})", dists["catpo"]["T"]))
    if head_grid:
        panels.append(("Cat-PO: AUROC of T, one head at a time", head_grid))
    ncol = max(1, len(panels))
    bar_h = 0.2 * len(rows) + 0.8
    fig = plt.figure(figsize=(4.4 * ncol + 2.5, 3.4 + bar_h), dpi=110)
    grid = fig.add_gridspec(2, ncol, height_ratios=[3.0, bar_h])
    for i, (title, d) in enumerate(panels):
        ax = fig.add_subplot(grid[0, i])
        if d is head_grid:
            cells = d["cells"]
            m = [[cells[f"{l}:{h}"]["auroc"] for h in range(d["num_heads"])] for l in range(d["num_layers"])]
            im = ax.imshow(m, cmap="RdBu", vmin=0.0, vmax=1.0, aspect="auto")
            for l, row in enumerate(m):
                for h, v in enumerate(row):
                    ax.text(h, l, f"{v:.2f}", ha="center", va="center", fontsize=7)
            ax.set_xticks(range(d["num_heads"]))
            ax.set_yticks(range(d["num_layers"]))
            ax.set_xlabel("head", fontsize=8)
            ax.set_ylabel("layer", fontsize=8)
            ax.set_title(f"{title} (α={d['alpha']:g})", fontsize=9)
            fig.colorbar(im, ax=ax, fraction=0.05)
            continue
        for cls, col in (("grounded", "#2166ac"), ("hallucinated", "#b2182b")):
            if d[cls]:
                ax.hist(d[cls], bins=30, alpha=0.55, density=True, color=col, label=f"{cls} ({len(d[cls])})")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    ax = fig.add_subplot(grid[1, :])
    ax.barh(range(len(rows)), [r["value"] for r in rows],
            color=["#4d9221" if r["value"] > 0.6 else "#999999" for r in rows])
    ax.axvline(0.5, color="k", linestyle="--", linewidth=0.8)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([f"{r['method']}  {r['signal']}  [{r['setting']}]" for r in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_title("AUROC / rate (1 = always as the method intends, 0.5 = no information)", fontsize=9)
    fig.tight_layout()
    _makedirs_for(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def main(args) -> int:
    import torch

    from vpo.diagnose import read_pairs
    from vpo.eval.cli import load_for_eval, quiet_transformers

    try:
        settings = parse_settings(args)
    except ValueError as err:
        print(f"vpo diagnose: {err}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    path = os.path.join(args.data, "val_pairs.jsonl") if os.path.isdir(args.data) or args.create else args.data
    if not os.path.isfile(path):
        if args.create is None:
            print(f"vpo diagnose: --data {args.data!r}: no {path}; write pairs with --create N", file=sys.stderr)
            return 2
        create_pairs(args.data, args.create, seed=args.seed)
    records = read_pairs(path, args.limit)
    with quiet_transformers():
        model, processor = load_for_eval(args.model, cache_dir=args.cache_dir)
    t = time.perf_counter()
    res = run(model, processor, records, settings, out=args.out, seed=args.seed, batch_size=args.batch_size,
              lpoi_lists=args.lpoi_lists)
    print(f"vpo diagnose: {len(records)} pairs from {path}; model {args.model}")
    print(res["table"])
    print("AUROC: P(the signal ranks a grounded / hallucinated token as the method intends); 0.5 = no information. "
          "Rates: the share of pairs / lists ranked as the method intends.")
    print(f"json: {os.path.join(args.out, 'diagnose.json')}  png: {res['png']}  ({time.perf_counter() - t:.0f}s)")
    return 0
