"""CSR's own search pairs on the shapes world, as the demo's first round builds them, for several
``CSRConfig.min_sentence_tokens`` (benchmarks/results/diagnose-cpu.md, "CSR").

    python benchmarks/csr_pairs_cpu.py --model ~/.cache/vpo/sft-f8af595325a8ecfd/model --out /tmp/csr-pairs \\
        --limit 160 --min-sentence-tokens 0,2,3 --threads 1

The prompts are the first ``--limit`` rows of the demo's preference split (``train``: the full preset's 1000 pair
images, seed 0, written to ``--out/world``; never the test split). Each setting writes ``--out/min{m}/train.jsonl``
with the demo's search (:func:`vpo.demo_methods._train_csr`'s round 1: ``max_new_tokens = max_sentences`` limits of
24 tokens, one sentence, λ and the scorer's metric from the preset) and is scored against the truth by
:func:`vpo.diagnose.csr_pairs` (what ``vpo diagnose --csr-pairs`` reports): the share of pairs whose rejected response
names no object, and whose chosen response hallucinates less / as much / more than the rejected one.
"""
from __future__ import annotations

import argparse
import json
import os
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="the demo's SFT model folder")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--limit", type=int, default=160, help="prompts (the demo's CSR_PROMPTS)")
    p.add_argument("--min-sentence-tokens", default="0,2", help="comma-separated CSRConfig.min_sentence_tokens")
    p.add_argument("--preset", default="full")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)

    import torch

    from vpo import diagnose as dg
    from vpo.construct.csr import CSRConfig, vlm_factory, write_csr_dataset
    from vpo.construct.csr_scorers import ShapesWorldScorer
    from vpo.demo import CAPTION_STYLE, PAIR_KINDS, PRESETS, PRIOR_PAIR_PROB
    from vpo.models.cache import load_pretrained
    from vpo.worlds import shapes

    if args.threads:
        torch.set_num_threads(args.threads)
    settings = PRESETS[args.preset]
    world = os.path.join(args.out, "world")
    pairs = os.path.join(world, "train.jsonl")
    if not os.path.isfile(pairs):  # the demo's preference split (vpo.demo.make_world_data)
        pairs = shapes.make_dataset(world, settings.pair_images, seed=args.seed, split="train",
                                    prior=settings.prior(), kinds=PAIR_KINDS, prior_pair_prob=PRIOR_PAIR_PROB,
                                    style=CAPTION_STYLE)
    model, processor = load_pretrained(args.model)
    scorer = ShapesWorldScorer(settings.csr_metric)
    results = []
    for m in [int(v) for v in args.min_sentence_tokens.split(",")]:
        config = CSRConfig(max_new_tokens=24, max_sentences=1, max_response_tokens=24, lam=settings.csr_lam,
                           min_sentence_tokens=m)
        out = os.path.join(args.out, f"min{m}")
        t = time.perf_counter()
        summary = write_csr_dataset(pairs, out, lm_factory=vlm_factory(model, processor), scorer=scorer,
                                    config=config, limit=args.limit, iteration=1)
        seconds = time.perf_counter() - t
        stats = dg.csr_pairs(dg.read_pairs(os.path.join(out, "train.jsonl")))
        results.append({"min_sentence_tokens": m, "seconds": round(seconds, 1), "written": summary.written,
                        "skipped": dict(summary.skipped), **stats})
        print(json.dumps(results[-1]), flush=True)
    print("| min_sentence_tokens | pairs | rejected names no object | chosen hallucinates less / as much / more "
          "| chosen covers more / fewer kinds | seconds |")
    print("|---:|---:|---:|---|---|---:|")
    for r in results:
        print(f"| {r['min_sentence_tokens']} | {r['n']} | {r['rejected_empty']:.3f} | {r['fewer']:.3f} / "
              f"{r['equal']:.3f} / {r['more']:.3f} | {r['covers_more']:.3f} / {r['covers_fewer']:.3f} | "
              f"{r['seconds']:.0f} |")
    with open(os.path.join(args.out, "csr_pairs.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
        f.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
