"""``vpo practice --out DIR``: a model folder and a small dataset to practise ``vpo train`` on, on a CPU, without a
download — the demo's tiny LLaVA (:mod:`vpo.models.cache`, a real ``LlavaForConditionalGeneration`` with a real
processor and a word-level tokenizer; random weights) and preference pairs of the shapes world
(:func:`vpo.worlds.shapes.make_dataset`, vpo's JSONL layout with PNG images)::

    DIR/model/             config.json, weights, processor files (AutoModelForImageTextToText / AutoProcessor)
    DIR/data/train.jsonl   N training pairs (images under DIR/data/images/train/)
    DIR/data/test.jsonl    the evaluation pairs

Then ``vpo train --config examples/configs/cpu_dpo.yaml`` (which reads ``practice/``) trains on them as it would on
a downloaded model and a real dataset (README "Train your own model").
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, Optional


def export_practice(out: str, *, records: int = 64, eval_records: int = 16, seed: int = 0,
                    cache_dir: Optional[str] = None) -> Dict[str, str]:
    """Write the model folder and the dataset (module docstring); returns their paths."""
    for name, value in (("records", records), ("eval_records", eval_records)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if os.path.isfile(out):
        raise ValueError(f"--out {out!r} must be a folder, not a file")
    from vpo.models.cache import DEFAULT_SPEC, load_or_build, save_pretrained
    from vpo.worlds.shapes import make_dataset

    model, processor, _ = load_or_build(DEFAULT_SPEC, cache_dir)
    model_dir = save_pretrained(model, processor, os.path.join(out, "model"))
    data_dir = os.path.join(out, "data")
    train = make_dataset(data_dir, records, seed, split="train")
    test = make_dataset(data_dir, eval_records, seed + 1, split="test")
    return {"model": model_dir, "train": train, "eval": test}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="practice", help="the folder to write model/ and data/ to (default: practice)")
    p.add_argument("--records", type=int, default=64, help="training pairs")
    p.add_argument("--eval-records", type=int, default=16, help="evaluation pairs")
    p.add_argument("--seed", type=int, default=0)


def main(args: argparse.Namespace) -> int:
    try:
        paths = export_practice(args.out, records=args.records, eval_records=args.eval_records, seed=args.seed)
    except ValueError as e:
        print(f"vpo practice: error: {e}", file=sys.stderr)
        return 2
    print(f"vpo practice: model {paths['model']}\nvpo practice: data {paths['train']} ({args.records} pairs), "
          f"{paths['eval']} ({args.eval_records} pairs)\nnext: vpo train --config examples/configs/cpu_dpo.yaml")
    return 0
