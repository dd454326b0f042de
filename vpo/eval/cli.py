"""``vpo eval``: hallucination metrics of a model on held-out images of the shapes world.

    vpo eval --model PATH|tiny-cache|tiny:<family> --data DIR [--split test] [--out report.json]
             [--create N] [--limit N] [--batch-size 64] [--max-new-tokens 24]

``--model``: a model folder (``save_pretrained`` output, e.g. the demo's ``sft/`` or ``tpo/model/``; a LoRA adapter
folder is loaded onto its base model and merged), ``tiny-cache`` (the cached tiny shapes model,
:mod:`vpo.models.cache`), or anything :func:`vpo.trainer.load_model` loads (``tiny:llava``, ...). ``--data``: a folder
written by :func:`vpo.worlds.shapes.make_eval_dataset` (``{split}_captions.jsonl`` and ``{split}_pope.jsonl``);
``--create N`` writes one of N images there first if it has none. Every image is described with greedy decoding
(CHAIR_i / CHAIR_s, attribute and count errors, coverage) and every POPE question answered (accuracy, precision,
recall, F1, yes-ratio; overall and per setting). The report (:func:`vpo.eval.evaluate_model`'s dict plus ``model``,
``data``, ``split``) is printed and, with ``--out``, written as JSON.

The Python side: :func:`make_generate_fn` (a ``generate_fn(prompts, images) -> texts`` over any VLM and its
processor), :func:`load_for_eval`, :func:`evaluate` (``evaluate_dir`` with a progress bar).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
from typing import Any, Callable, Dict, List, Optional

TINY_CACHE = "tiny-cache"


@contextlib.contextmanager
def quiet_transformers():
    """Inside: transformers logs errors only and shows no weight loading / saving bars (restored on exit)."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def display_text(text: str) -> str:
    """A word-level tokenizer decodes with a space before punctuation (``"a red circle ."``): drop it, for display."""
    return re.sub(r" ([.,?!:;])", r"\1", text)


def _progress_bar(total: int, desc: str, enabled: Optional[bool] = None):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="ex", leave=True, disable=enabled is False, dynamic_ncols=True)


def make_generate_fn(model, processor, *, max_new_tokens: int = 24, on_batch: Optional[Callable[[int], Any]] = None,
                     logit_bias: Optional[Dict[int, float]] = None) -> Callable[[List[str], List[Any]], List[str]]:
    """``generate_fn(prompts, images) -> texts``: greedy decoding of one response per (prompt, image).

    Each prompt becomes the user turn ``[image, text]`` of the processor's chat template with the generation prompt;
    the batch is left-padded; decoding stops at the tokenizer's eos (or after ``max_new_tokens``); the new tokens are
    decoded without special tokens. ``on_batch(n)`` is called after each batch with its size (progress bars).
    ``logit_bias``: ``{token id: bias}`` added to those logits at every decoding step (e.g. a positive bias on the
    caption's final "." makes the model stop earlier: :mod:`vpo.eval.tradeoff`).
    """
    import torch

    processors = None
    if logit_bias:
        from transformers import LogitsProcessor, LogitsProcessorList

        vocab = model.get_output_embeddings().weight.shape[0]
        for tid, b in logit_bias.items():
            if isinstance(tid, bool) or not isinstance(tid, int) or not 0 <= tid < vocab:
                raise ValueError(f"logit_bias keys must be token ids in [0, {vocab}), got {tid!r}")
            if not isinstance(b, (int, float)) or b != b or abs(b) == float("inf"):
                raise ValueError(f"logit_bias values must be finite numbers, got {b!r} for token {tid}")
        ids = torch.tensor(list(logit_bias), dtype=torch.long)
        vals = torch.tensor([float(v) for v in logit_bias.values()])

        class _Bias(LogitsProcessor):
            def __call__(self, input_ids, scores):
                scores = scores.clone()
                scores[:, ids.to(scores.device)] += vals.to(scores.device, scores.dtype)
                return scores

        processors = LogitsProcessorList([_Bias()])

    tok = processor.tokenizer
    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos

    @torch.no_grad()
    def generate_fn(prompts: List[str], images: List[Any]) -> List[str]:
        if len(prompts) != len(images):
            raise ValueError(f"got {len(prompts)} prompts but {len(images)} images: expected one image per prompt")
        texts = [processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p}]}],
            add_generation_prompt=True, tokenize=False) for p in prompts]
        bos = tok.bos_token
        kwargs = {"add_special_tokens": not (bos is not None and texts and texts[0].startswith(bos))}
        old = tok.padding_side
        tok.padding_side = "left"
        try:
            inputs = processor(images=list(images), text=texts, return_tensors="pt", padding=True, **kwargs)
        finally:
            tok.padding_side = old
        device = next(model.parameters()).device
        inputs = {k: v.to(device) if hasattr(v, "to") else v for k, v in inputs.items()}
        was_training = model.training
        model.eval()
        try:
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                                 pad_token_id=pad, logits_processor=processors)
        finally:
            model.train(was_training)
        new = out[:, inputs["input_ids"].shape[1]:]
        result = [tok.decode(row, skip_special_tokens=True).strip() for row in new]
        if on_batch is not None:
            on_batch(len(prompts))
        return result

    return generate_fn


def load_for_eval(spec: str, *, cache_dir: Optional[str] = None):
    """``(model, processor)`` for ``--model``: ``tiny-cache``, a LoRA adapter folder (merged onto its base), a model
    folder, or ``tiny:<family>``."""
    if spec == TINY_CACHE:
        from vpo.models.cache import load_or_build

        model, processor, _ = load_or_build(cache_dir=cache_dir)
        return model, processor
    if os.path.isfile(os.path.join(spec, "adapter_config.json")):
        from peft import PeftModel

        with open(os.path.join(spec, "adapter_config.json"), encoding="utf-8") as f:
            base_path = json.load(f).get("base_model_name_or_path")
        if not base_path:
            raise ValueError(f"{spec}/adapter_config.json names no base_model_name_or_path: cannot load its base")
        base, processor = load_for_eval(base_path, cache_dir=cache_dir)
        if os.path.isfile(os.path.join(spec, "processor_config.json")) or os.path.isfile(
                os.path.join(spec, "tokenizer.json")):
            from transformers import AutoProcessor

            processor = AutoProcessor.from_pretrained(spec)
        import warnings

        with warnings.catch_warnings():  # peft reads transformers' deprecated `is_gradient_checkpointing`
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            model = PeftModel.from_pretrained(base, spec).merge_and_unload()
        return model.eval(), processor
    if not spec.startswith("tiny:") and not os.path.isdir(spec):
        raise FileNotFoundError(f"--model {spec!r}: no such folder (expected a model folder, a LoRA adapter folder, "
                                f"{TINY_CACHE!r} or tiny:<family>)")
    from vpo.trainer.modeling import load_model

    model, processor, _ = load_model(spec, dtype="float32")
    if processor is None:
        raise ValueError(f"--model {spec!r}: no processor could be loaded with it")
    return model.eval(), processor


def count_examples(data_dir: str, split: str = "test", limit: Optional[int] = None, pope: bool = True) -> int:
    """How many prompts :func:`vpo.eval.evaluate_dir` will ask: the captions plus (``pope``) the POPE questions."""
    from vpo.worlds.shapes import read_jsonl

    caps = read_jsonl(os.path.join(data_dir, f"{split}_captions.jsonl"))[:limit]
    n = len(caps)
    pope_path = os.path.join(data_dir, f"{split}_pope.jsonl")
    if pope and os.path.exists(pope_path):
        n += sum(q["scene_index"] < len(caps) for q in read_jsonl(pope_path))
    return n


def evaluate(model, processor, data_dir: str, split: str = "test", *, batch_size: int = 64,
             limit: Optional[int] = None, max_new_tokens: int = 24, desc: str = "eval",
             progress: Optional[bool] = None, pope: bool = True,
             logit_bias: Optional[Dict[int, float]] = None) -> Dict[str, Any]:
    """:func:`vpo.eval.evaluate_dir` of ``model`` with greedy decoding and a progress bar (``progress=False``: none).
    ``pope=False``: the captions only; ``logit_bias``: as in :func:`make_generate_fn`."""
    from vpo.eval.metrics import evaluate_dir

    bar = _progress_bar(count_examples(data_dir, split, limit, pope=pope), desc, progress)
    try:
        fn = make_generate_fn(model, processor, max_new_tokens=max_new_tokens, on_batch=bar.update,
                              logit_bias=logit_bias)
        return evaluate_dir(fn, data_dir, split, batch_size=batch_size, limit=limit, pope=pope)
    finally:
        bar.close()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help=f"a model folder, a LoRA adapter folder, {TINY_CACHE!r} (the cached tiny shapes model) or "
                        "tiny:<family>")
    p.add_argument("--data", required=True, help="folder of vpo.worlds.shapes.make_eval_dataset files")
    p.add_argument("--split", default="test")
    p.add_argument("--out", default=None, help="write the report as JSON here")
    p.add_argument("--create", type=int, default=None, metavar="N",
                   help="write a held-out set of N images to --data first if it has none")
    p.add_argument("--seed", type=int, default=0, help="seed of the set --create writes")
    p.add_argument("--limit", type=int, default=None, help="the first N images only (and their questions)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--cache-dir", default=None, help="cache root for tiny-cache (default $VPO_CACHE or ~/.cache/vpo)")


def main(args) -> int:
    """Run ``vpo eval`` on parsed arguments; returns the exit status."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    for name in ("batch_size", "max_new_tokens"):
        if getattr(args, name) < 1:
            print(f"vpo eval: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    cap = os.path.join(args.data, f"{args.split}_captions.jsonl")
    if not os.path.exists(cap):
        if args.create is None:
            print(f"vpo eval: {args.data} has no {args.split}_captions.jsonl; write one with --create N (or "
                  f"vpo.worlds.shapes.make_eval_dataset)", file=sys.stderr)
            return 2
        from vpo.worlds.shapes import make_eval_dataset

        make_eval_dataset(args.data, args.create, seed=args.seed, split=args.split)
    with quiet_transformers():
        model, processor = load_for_eval(args.model, cache_dir=args.cache_dir)
    report = evaluate(model, processor, args.data, args.split, batch_size=args.batch_size, limit=args.limit,
                      max_new_tokens=args.max_new_tokens, desc=f"eval {args.split}")
    report = {"model": args.model, "data": os.path.abspath(args.data), "split": args.split, **report}
    from vpo.eval.metrics import format_report
    from vpo.worlds.shapes import Scene, describe

    print(format_report(report))
    for s in report.get("samples", [])[:3]:
        truth = describe(Scene.from_dict({"objects": s["objects"]}))
        print(f"  {display_text(s['response'])!r}   (truth: {truth!r})")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
        print(f"report: {args.out}")
    return 0
