"""``vpo demo``: the package end to end on a CPU, in minutes.

    vpo demo [--quick] [--out DIR] [--seed S] [--methods tpo,dpo | all] [--seeds 0,1,2] [--jobs J] [--sft-steps N]
             [--steps N] [--lr LR] [--eval-split test|val] [--threads T]

1. **World data** (:mod:`vpo.worlds.shapes`) with a **language prior** (:mod:`vpo.worlds.shapes.prior`): circle ->
   square and triangle -> cross. Four disjoint splits: SFT captions and yes/no answers where the partner is there
   95% of the time its trigger is (the prior is learned: "a red circle" is followed by "a red square"); preference
   pairs, a validation set and a test set where it is there 50% of the time (the prior is broken). The pairs'
   rejected captions carry the prior's hallucination (the absent partner, in its trigger's color) or leave a
   present partner out (:data:`PAIR_KINDS`: additions and omissions kept about even), or change a color or count.
2. **Tiny VLM** (:mod:`vpo.models.cache`): a ``LlavaForConditionalGeneration`` (CLIP vision tower + MLP projector +
   Llama) with a word-level ``tokenizers`` tokenizer over the world's vocabulary and a real ``CLIPImageProcessor``,
   built from configs once and loaded from the local cache (``$VPO_CACHE`` or ``~/.cache/vpo``) afterwards.
3. **SFT** (:mod:`vpo.trainer.sft`): every parameter, on the captions and yes/no answers, until the model describes
   images (it starts from random weights). The SFT model is cached under its spec hash (:func:`sft_key`: the tiny
   model's spec, the SFT split, the prior, the SFT hyper-parameters, the seed), so a second ``vpo demo`` skips it.
4. **Measure**: CHAIR_i (and its binomial standard error) / CHAIR_s, the prior-triggered CHAIR (partner mentions
   where the trigger is present; :func:`vpo.eval.metrics.prior_chair`), POPE accuracy / F1 and coverage on the
   held-out test images (:mod:`vpo.eval`), greedy decoding. Then the SFT model's coverage / CHAIR_i trade-off: the
   same captions decoded with a bias towards the final "." (:data:`TRADEOFF_BIASES`, :mod:`vpo.eval.tradeoff`).
5. **Preference optimization** (:mod:`vpo.demo_methods`): each method (TPO, and DPO as the baseline) with
   :class:`vpo.trainer.VPOTrainer` on the fused losses, from the SFT model, the frozen SFT model as the reference
   (full fine-tuning of the language model; the vision tower stays frozen). TPO runs with ``c_θ`` detached
   (:attr:`DemoSettings.tpo_reward_grad`; why: the comment there).
6. **Measure again**, and draw: the training curves (loss, reward margin, accuracy) as PNG, and TPO's per-token
   calibrated rewards ``c`` of one preference pair before and after TPO (HTML + PNG, like TPO's Figure 1).
7. **Report**: a table of the metrics before and after for each method, CHAIR_i's change in standard errors, each
   method's gain at matched coverage (its CHAIR_i against the SFT model's trade-off at the same coverage: a gain
   there is not just saying less), the curves' end points, and where every file is; ``summary.json`` holds the same
   numbers.

``--methods all`` runs every method over ``--seeds`` instead (:mod:`vpo.compare`). ``--eval-split val`` measures on the
validation split: hyper-parameters are tuned there, never on the test split (the tuning record is in
``benchmarks/results/demo-cpu.md``).

``--quick`` (CI) runs the same stages with fewer images and steps; the full run takes about 8 minutes on 2 cores.
Every random draw is seeded (``--seed``): the numbers are reproducible on the same machine and thread count.
Progress bars go to stderr, the report to stdout.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence

from vpo.demo_report import (  # noqa: F401  (re-exported: the demo's public names)
    METRICS, TABLE, _curve_ends, _fmt, format_table, matched_coverage, row_metrics, summary_markdown)

METHODS = ("tpo", "dpo")
# The preference pairs: additions (the prior's "prior" hallucination) and omissions ("omission") are kept about
# even: the caption grammar ("a, b and c.") tells at every joint how many objects are left, so pairs whose rejected
# caption is more often the longer one teach the model to stop early. Tuned on the validation split (module
# docstring): with every prior case a "prior" pair and "absent" among the other kinds, DPO's coverage fell by 15
# points; PAIR_KINDS is drawn (uniformly) for the scenes not given a prior pair, PRIOR_PAIR_PROB is the chance that a
# scene where the prior fails (or holds) gets its "prior" (or "omission") pair.
PAIR_KINDS = ("color", "count", "omission", "omission")
PRIOR_PAIR_PROB = 0.6
# The captions' grammar (SFT and pairs): "a and b and c." (vpo.worlds.shapes.describe, style "chain"). With "a, b and
# c." the first token where an added or dropped object changes the caption is a joint ("," / "and" / "."), which
# tells how many objects are left: DPO then learned to close the list early (coverage -11 points, CHAIR_i -0.01 on
# the validation split) instead of checking the image.
CAPTION_STYLE = "chain"
# Biases on the caption's final "." that trace the SFT model's coverage / CHAIR_i trade-off (vpo.eval.tradeoff).
TRADEOFF_BIASES = (0.0, 1.0, 2.0, 3.0, 4.0, 6.0)
@dataclass(frozen=True)
class DemoSettings:
    """Sizes and hyper-parameters of one demo run (:data:`PRESETS`)."""

    sft_images: int  # images of the SFT split (each gives a caption, a yes and a no example)
    sft_steps: int
    pair_images: int  # preference pairs (one per image)
    pref_steps: int  # steps per preference method
    eval_images: int  # held-out test images (one caption each, plus the POPE questions)
    val_images: int = 0  # held-out validation images (tuning only: the test split is never tuned on)
    sft_batch: int = 32
    sft_lr: float = 1e-3
    sft_warmup: int = 30
    pref_batch: int = 16
    pref_lr: float = 6e-5
    beta: float = 0.1
    pope_per_scene: int = 1  # yes + no questions per scene and POPE setting
    logging_steps: int = 10
    # The world's language prior (vpo.worlds.shapes.prior): P(partner | trigger) in the SFT split and in the others.
    prior_strength: float = 0.95
    prior_held_out_p: float = 0.5
    # TPO's reward_grad (vpo.trainer.VPOConfig): False = c_θ detached. Measured on the validation split (full preset,
    # benchmarks/results/demo-cpu.md): with the paper's default (True) the policy earns its reward through the
    # calibration term instead of the captions: the raw-logit score s between the clean and the noised image rises
    # from 1.8 to 5.8, c runs to its bounds (chosen 1.46 of 1.5, rejected 0.60 of 0.5), the rejected captions'
    # log-prob falls less than DPO's (-9.0 -> -11.8 vs -12.3), and CHAIR_i moves by -0.5 SE. Detached: -2.6 SE.
    tpo_reward_grad: bool = False
    # What each paper leaves free, chosen with `vpo diagnose` on 200 validation pairs of the SFT model
    # (benchmarks/results/diagnose-cpu.md; AUROC 0.5 = no information):
    # - TPO's noise step k (VPOConfig.noise_step): the AUROC of s grows with k (0.51 at 100, 0.65 at the paper's 500,
    #   0.69 at 999). The offset a never changes an AUROC: kept at the paper's 0.5. With c_θ detached (above) neither
    #   changes which way a pair's gradient points (docs/methods.md); with reward_grad=True at k=999, a=0 the shortcut
    #   came back (validation CHAIR_i 0.252 vs DPO 0.213).
    # - Cat-PO (catpo_layers as in VPOConfig, None = all; catpo_alpha): the semantic branch is anti-informative here
    #   (AUROC of T 0.45 at α=0), attention alone separates best (0.69 at α=1, all layers; 0.56 at the paper's 0.5).
    #   Heads (catpo_heads, `vpo diagnose --catpo-per-head`): single heads range from 0.49 to 0.64; the five best on
    #   pairs 0-199 (layer:head 2:1, 1:3, 1:2, 0:1, 0:3) reach 0.74 on the held-out pairs 200-299, where all heads
    #   reach 0.66 (on pairs 0-199: 0.69 for both). Validation CHAIR_i did not move (0.240 vs 0.237 with all heads).
    # - CSR's λ: every λ in (0, 1) ranks the grounded caption first on 100% of the hallucination pairs; the
    #   shapes-world scorer's "f1" (not "precision") also ranks a complete caption above one that leaves an object out
    #   (100% vs 97%), so the search stops rewarding shorter captions.
    tpo_noise_step: int = 999
    tpo_a: float = 0.5
    catpo_layers: Optional[str] = None
    catpo_heads: Optional[str] = "2:1,1:3,1:2,0:1,0:3"
    catpo_alpha: float = 1.0
    csr_lam: float = 0.9
    csr_metric: str = "f1"
    # CSR's search (CSRConfig.min_sentence_tokens): a proposed sentence needs 3 tokens before its stop token. With 0
    # (the paper's search) the rejected response of 99% of round 1's pairs named no object ("." / "two ."): the
    # diverse groups' fragments; with 3, none (160 prompts of the pair split, diagnose-cpu.md, "CSR").
    csr_min_sentence_tokens: int = 3

    def prior(self):
        from vpo.worlds.shapes import DEFAULT_PRIOR_PAIRS, CooccurrencePrior

        return CooccurrencePrior(DEFAULT_PRIOR_PAIRS, self.prior_strength, self.prior_held_out_p)


PRESETS: Dict[str, DemoSettings] = {
    "full": DemoSettings(sft_images=3000, sft_steps=1000, pair_images=1000, pref_steps=100, eval_images=2000,
                         val_images=300),
    "quick": DemoSettings(sft_images=400, sft_steps=250, pair_images=300, pref_steps=30, eval_images=200,
                          val_images=100, logging_steps=5),
}


# ------------------------------------------------------------------------------------------------------ progress
def _stage_bar_callback(desc: str, enabled: bool):
    """A Trainer progress callback: one bar per stage, the latest loss / margin in its postfix (no log lines)."""
    from transformers.trainer_callback import ProgressCallback
    from tqdm.auto import tqdm

    class _StageBar(ProgressCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.training_bar = tqdm(total=state.max_steps, desc=desc, dynamic_ncols=True, disable=not enabled,
                                     unit="step")
            self.current_step = 0

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.training_bar is None or not logs:
                return
            post = {}
            for key, short in (("loss", "loss"), ("rewards/margins", "margin"), ("rewards/accuracies", "acc")):
                if isinstance(logs.get(key), (int, float)):
                    post[short] = f"{logs[key]:.3f}"
            if post:
                self.training_bar.set_postfix(post, refresh=False)

    return _StageBar()


def _quiet_trainer(trainer, desc: str, progress: bool):
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(_stage_bar_callback(desc, progress))
    return trainer


class _Log:
    """Stage headers and lines on stdout, with the elapsed time."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stdout
        self.start = time.perf_counter()

    def __call__(self, text: str = "") -> None:
        print(text, file=self.stream, flush=True)

    def stage(self, i: int, n: int, text: str) -> None:
        self(f"[{i}/{n}] {text}  (t = {time.perf_counter() - self.start:.0f}s)")


# ---------------------------------------------------------------------------------------------------------- data
def make_world_data(root: str, settings: DemoSettings, seed: int) -> Dict[str, str]:
    """Write the four splits (module docstring, stage 1) under ``root``; returns their paths."""
    from vpo.worlds import shapes

    prior = settings.prior()
    sft = shapes.make_sft_dataset(root, settings.sft_images, seed=seed, split="sft", questions_per_image=1,
                                  prior=prior, style=CAPTION_STYLE)
    pairs = shapes.make_dataset(root, settings.pair_images, seed=seed, split="train", prior=prior, kinds=PAIR_KINDS,
                                prior_pair_prob=PRIOR_PAIR_PROB, style=CAPTION_STYLE)
    out = {"sft": sft, "pairs": pairs, "root": root}
    for split, n in (("val", settings.val_images), ("test", settings.eval_images)):
        if n:
            ev = shapes.make_eval_dataset(root, n, seed=seed, split=split, pope_per_scene=settings.pope_per_scene,
                                          prior=prior)
            out[f"{split}_captions"], out[f"{split}_pope"] = ev["captions"], ev["pope"]
    return out


def sft_key(settings: DemoSettings, seed: int, impl: str = "auto") -> str:
    """The SFT model's spec hash: SHA-256 over the tiny model's spec hash and everything SFT depends on (the SFT
    split's size, the prior, the SFT hyper-parameters, the seed). Equal keys -> the cached SFT model is reused."""
    import hashlib

    from vpo.models.cache import DEFAULT_SPEC, spec_hash

    s = settings
    payload = {"model": spec_hash(DEFAULT_SPEC), "sft_images": s.sft_images, "sft_steps": s.sft_steps,
               "sft_batch": s.sft_batch, "sft_lr": s.sft_lr, "sft_warmup": s.sft_warmup,
               "prior": s.prior().to_dict(), "seed": seed, "impl": impl, "style": CAPTION_STYLE, "format": 1}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def sft_cache_dir(settings: DemoSettings, seed: int, cache_dir: Optional[str] = None, impl: str = "auto") -> str:
    """Where the SFT model of :func:`sft_key` is cached: ``<cache root>/sft-<key[:16]>``."""
    from vpo.models.cache import cache_root

    return os.path.join(cache_root(cache_dir), f"sft-{sft_key(settings, seed, impl)[:16]}")


def pick_picture_pair(pairs_path: str) -> int:
    """The preference pair drawn in the reward pictures: the first whose rejected caption has a hallucinated color
    (one word differs, and it is a visual one), else the first pair."""
    from vpo.worlds.shapes import read_jsonl

    rows = read_jsonl(pairs_path)
    for i, r in enumerate(rows):
        if (r.get("hallucination") or {}).get("kind") == "color":
            return i
    return 0


# ---------------------------------------------------------------------------------------------------------- core
def run_demo(
    out: str = "vpo-demo",
    *,
    quick: bool = False,
    seed: int = 0,
    methods: Sequence[str] = METHODS,
    settings: Optional[DemoSettings] = None,
    threads: Optional[int] = 1,
    cache_dir: Optional[str] = None,
    progress: bool = True,
    impl: str = "auto",
    log=None,
    eval_split: str = "test",
) -> Dict[str, Any]:
    """Run the demo (module docstring) writing everything under ``out``; returns the summary (also
    ``out/summary.json``). ``settings`` overrides the preset (``PRESETS["quick" if quick else "full"]``);
    ``impl``: the kernel choice of the fused losses; ``threads``: torch CPU threads during the run; ``eval_split``:
    ``"test"`` (the report) or ``"val"`` (tuning: hyper-parameters are chosen on it, never on the test split)."""
    if eval_split not in ("test", "val"):
        raise ValueError(f"eval_split must be 'test' or 'val', got {eval_split!r}")
    import torch

    from vpo.demo_methods import ALL_METHODS

    methods = list(methods)
    for m in methods:
        if m not in ALL_METHODS:
            raise ValueError(f"methods must be drawn from {list(ALL_METHODS)}, got {m!r}")
    if not methods:
        raise ValueError("methods is empty: pass at least one of " + ", ".join(ALL_METHODS))
    settings = settings or PRESETS["quick" if quick else "full"]
    log = log or _Log()
    from vpo.eval.cli import quiet_transformers

    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        with quiet_transformers():  # no weight loading / saving bars: the stages have their own
            return _run(out, quick, seed, methods, settings, cache_dir, progress, impl, log, eval_split)
    finally:
        torch.set_num_threads(old_threads)


def prepare_sft(data: Dict[str, str], settings: DemoSettings, seed: int, *, cache_dir: Optional[str] = None,
                impl: str = "auto", progress: bool = True, log=None, work_dir: Optional[str] = None
                ) -> Dict[str, Any]:
    """The SFT model of ``settings``/``seed``: loaded from its cache folder (:func:`sft_cache_dir`) when a run with
    the same :func:`sft_key` saved it, else trained (stage 3) and saved there. Returns ``{"model": folder, "steps",
    "seconds" (of the training, also when cached), "curve", "cached": bool, "key", "log_history"}``."""
    from vpo.models.cache import DEFAULT_SPEC, load_or_build, save_pretrained
    from vpo.trainer.sft import make_sft_trainer, read_sft_jsonl

    log = log or _Log()
    folder = sft_cache_dir(settings, seed, cache_dir, impl)
    info_path = os.path.join(folder, "sft_info.json")
    if os.path.isfile(info_path) and os.path.isfile(os.path.join(folder, "model", "model.safetensors")):
        with open(info_path, encoding="utf-8") as f:
            info = json.load(f)
        if info.get("key") == sft_key(settings, seed, impl):
            return {**info, "cached": True}
    model, processor, _ = load_or_build(DEFAULT_SPEC, cache_dir)
    t = time.perf_counter()
    trainer = make_sft_trainer(model, processor, read_sft_jsonl(data["sft"]),
                               output_dir=work_dir or os.path.join(folder, "run"), max_steps=settings.sft_steps,
                               batch_size=settings.sft_batch, learning_rate=settings.sft_lr,
                               warmup_steps=settings.sft_warmup, seed=seed, logging_steps=settings.logging_steps,
                               loss_impl=impl)
    _quiet_trainer(trainer, "sft", progress).train()
    model.eval()
    secs = time.perf_counter() - t
    history = trainer.state.log_history
    model_dir = save_pretrained(model, processor, os.path.join(folder, "model"))
    info = {"key": sft_key(settings, seed, impl), "model": model_dir, "steps": settings.sft_steps, "seconds": secs,
            "curve": _curve_ends(history), "log_history": history}
    _write_json(info_path, info)
    return {**info, "cached": False}


def _run(out, quick, seed, methods, settings, cache_dir, progress, impl, log, eval_split="test") -> Dict[str, Any]:
    import torch

    from vpo.demo_methods import train_method
    from vpo.eval.cli import display_text, evaluate
    from vpo.eval.metrics import format_report
    from vpo.eval.tradeoff import coverage_curve, format_curve
    from vpo.models.cache import DEFAULT_SPEC, cache_path, is_fresh, load_or_build, load_pretrained
    from vpo.visualize import training_curves_png
    from vpo.visualize_cli import reward_pictures

    os.makedirs(out, exist_ok=True)
    out = os.path.abspath(out)
    n_stages = 7
    summary: Dict[str, Any] = {"mode": "quick" if quick else "full", "seed": seed, "methods": {},
                               "settings": dataclasses.asdict(settings), "threads": torch.get_num_threads(),
                               "out": out, "eval_split": eval_split}

    # 1. data --------------------------------------------------------------------------------------------------
    log.stage(1, n_stages, "world data: SFT captions + yes/no (with the language prior), preference pairs, "
                           "held-out validation and test sets (prior broken)")
    t = time.perf_counter()
    data = make_world_data(os.path.join(out, "data"), settings, seed)
    prior = settings.prior()
    summary["prior"] = prior.to_dict()
    log(f"      {settings.sft_images} SFT images (x3 examples), {settings.pair_images} preference pairs, "
        f"{settings.val_images} validation and {settings.eval_images} test images; {data['root']} "
        f"({time.perf_counter() - t:.1f}s)")
    log(f"      language prior: " + ", ".join(f"{a} -> {b}" for a, b in prior.pairs) +
        f"; P(partner | trigger) = {prior.strength:g} in the SFT captions, {prior.held_out_p:g} in the pairs and "
        f"the held-out sets")

    # 2. model -------------------------------------------------------------------------------------------------
    log.stage(2, n_stages, "tiny VLM (transformers LlavaForConditionalGeneration + LlavaProcessor)")
    fresh = is_fresh(cache_path(cache_dir), DEFAULT_SPEC)
    model, processor, path = load_or_build(DEFAULT_SPEC, cache_dir)
    s = DEFAULT_SPEC
    n_params = sum(p.numel() for p in model.parameters())
    vocab = model.config.text_config.vocab_size
    log(f"      CLIP {s.vision_layers}x{s.vision_hidden} on {s.image_size}px / {s.patch_size}px patches "
        f"({s.num_image_tokens} image tokens) + Llama {s.num_layers}x{s.hidden_size}, word-level vocab {vocab}; "
        f"{n_params / 1e6:.2f}M parameters")
    log(f"      cache: {path} ({'loaded' if fresh else 'built and saved'})")
    summary["model"] = {"cache": path, "params": n_params, "vocab_size": vocab, "spec": dataclasses.asdict(s)}
    del model

    # 3. SFT ---------------------------------------------------------------------------------------------------
    log.stage(3, n_stages, f"SFT: {settings.sft_steps} steps x {settings.sft_batch} examples, lr {settings.sft_lr:g}")
    sft = prepare_sft(data, settings, seed, cache_dir=cache_dir, impl=impl, progress=progress, log=log)
    sft_dir = os.path.join(out, "sft")
    sft_model_dir = sft["model"]
    curves = {"sft": training_curves_png(sft["log_history"], os.path.join(sft_dir, "curves.png"), ("loss",),
                                         title="SFT")}
    summary["sft"] = {"steps": sft["steps"], "seconds": sft["seconds"], "model": sft_model_dir,
                      "curve": sft["curve"], "cached": sft["cached"], "key": sft["key"]}
    how = (f"cached (spec hash {sft['key'][:16]}; trained in {sft['seconds']:.0f}s by an earlier run)"
           if sft["cached"] else f"{sft['seconds']:.0f}s; cached as {sft['key'][:16]}")
    log(f"      loss {sft['curve']['loss']['start']:.3f} -> {sft['curve']['loss']['end']:.3f} ({how}); "
        f"model: {sft_model_dir}")

    # 4. measure -----------------------------------------------------------------------------------------------
    model, processor = load_pretrained(sft_model_dir)
    n_eval = settings.eval_images if eval_split == "test" else settings.val_images
    log.stage(4, n_stages, f"measure the SFT model on {n_eval} held-out {eval_split} images")
    before = evaluate(model, processor, data["root"], eval_split, desc="eval sft", progress=progress)
    _write_json(os.path.join(sft_dir, "eval.json"), before)
    log("      " + format_report(before).replace("\n", "\n      "))
    for sample in before["samples"][:2]:
        log(f"      e.g. {display_text(sample['response'])!r}  (truth: {_truth(sample)!r})")
    summary["before"] = row_metrics(before)
    per_image = {"sft": before["per_image"]}  # paired statistics on the same images (vpo.eval.paired)
    # The SFT model's own trade-off: decoded to stop earlier, it says less and hallucinates less. Every method is
    # also compared with this curve at its own coverage (vpo.eval.tradeoff): a gain there is not "saying less".
    curve = coverage_curve(model, processor, data["root"], eval_split, biases=TRADEOFF_BIASES, progress=progress)
    summary["sft_curve"] = curve
    log("      stopping earlier (bias on '.': coverage / CHAIR_i): " + format_curve(curve))
    del model

    # 5 + 6. preference optimization and measure again ----------------------------------------------------------
    for k, method in enumerate(methods):
        log.stage(5, n_stages, f"{method.upper()} ({k + 1}/{len(methods)}): {settings.pref_steps} steps x "
                               f"{settings.pref_batch} pairs, lr {settings.pref_lr:g}, beta {settings.beta:g}; "
                               f"reference = the SFT model")
        mdir = os.path.join(out, method)
        policy, res, history = train_method(method, sft_model_dir, data, settings, seed, mdir, impl=impl,
                                            progress=progress, bar=_quiet_trainer)
        res["curve"] = _curve_ends(history)
        curves[method] = training_curves_png(history, os.path.join(mdir, "curves.png"),
                                             ("loss", "rewards/margins", "rewards/accuracies"),
                                             title=f"{method.upper()} on the shapes world")
        log.stage(6, n_stages, f"measure the {method.upper()} model")
        after = evaluate(policy, processor, data["root"], eval_split, desc=f"eval {method}", progress=progress)
        _write_json(os.path.join(mdir, "eval.json"), after)
        log("      " + format_report(after).split("\npope/")[0].replace("\n", "\n      "))
        res["after"] = row_metrics(after)
        per_image[method] = after["per_image"]
        res["matched"] = matched_coverage(curve, res["after"], summary["before"])
        summary["methods"][method] = res
        if method == "tpo":
            # TPO's Figure 1: per-token c of one pair, by the SFT model and by the TPO model.
            sft_model, _ = load_pretrained(sft_model_dir)
            index = pick_picture_pair(data["pairs"])
            from vpo.visualize_cli import read_record

            rec = read_record(data["root"], index, "train")
            pics = reward_pictures([("sft", sft_model), ("tpo", policy)], processor, rec,
                                   os.path.join(out, "pictures"), kind="tpo", index=index, seed=seed)
            summary["pictures"] = {"record": index, **pics, **_picture_stats(pics["json"], rec)}
            del sft_model
        del policy

    # 7. report ------------------------------------------------------------------------------------------------
    from vpo.eval.paired import paired_table

    summary["paired"] = paired_table(per_image, methods)
    summary["per_image"] = per_image
    summary["curves"] = curves
    summary["seconds"] = time.perf_counter() - log.start
    log.stage(7, n_stages, "report")
    table = format_table(summary)
    log()
    log(table)
    from vpo.eval.paired import format_paired

    log("CHAIR_i change, paired on the same images (delta-method SE):\n      "
        + format_paired(summary["paired"]).replace("\n", "\n      "))
    log()
    log("training curves (PNG): " + ", ".join(curves[k] for k in curves))
    if "pictures" in summary:
        pics = summary["pictures"]
        log(f"TPO token rewards c, pair {pics['record']} (SFT vs TPO model): {pics['html']} , {pics['png']}")
        stats = pics.get("rejected_c", {})
        if stats:
            words = ", ".join(next(iter(stats.values()))["hallucinated_words"])
            log(f"      rejected {pics['rejected']!r}: mean c of the hallucinated word(s) [{words}] / of the other "
                f"tokens = " + ", ".join(f"{st['hallucinated']:.2f} / {st['others']:.2f} ({label})"
                                          for label, st in stats.items())
                + "  (c > 1 weighs up a rejected token's penalty)")
    log(f"models: {summary['sft']['model']} " + " ".join(r["model"] for r in summary["methods"].values()))
    log(f"summary: {os.path.join(out, 'summary.json')}   total {summary['seconds']:.0f}s")
    log(f"next: vpo eval --model {os.path.join(out, methods[0], 'model')} --data {data['root']} ; "
        f"vpo visualize rewards --model {summary['sft']['model']} --data {data['root']} --index 3 --out "
        f"{os.path.join(out, 'pictures')}")
    _write_json(os.path.join(out, "summary.json"), summary)
    with open(os.path.join(out, "summary.txt"), "w", encoding="utf-8") as f:
        f.write(table + "\n")
    with open(os.path.join(out, "summary.md"), "w", encoding="utf-8") as f:
        f.write(summary_markdown(summary))
    return summary


def _picture_stats(json_path: str, rec: Dict[str, Any]) -> Dict[str, Any]:
    """Mean TPO ``c`` of the rejected caption's hallucinated words and of its other tokens, per model."""
    from vpo.visualize_cli import hallucinated_words

    marks = hallucinated_words(rec)
    with open(json_path, encoding="utf-8") as f:
        rows = json.load(f)["rows"]
    out: Dict[str, Any] = {"rejected": rec.get("rejected"), "rejected_c": {}}
    if marks is None:
        return out
    for row in rows:
        if row["response"] != "rejected":
            continue
        vals, toks = row["values"], row["tokens"]
        bad = [v for i, v in enumerate(vals) if i < len(marks) and marks[i]]
        rest = [v for i, v in enumerate(vals) if not (i < len(marks) and marks[i])]
        if bad and rest:
            out["rejected_c"][row["model"]] = {
                "hallucinated": sum(bad) / len(bad), "others": sum(rest) / len(rest),
                "hallucinated_words": [t for i, t in enumerate(toks) if i < len(marks) and marks[i]]}
    return out


def _truth(sample: Dict[str, Any]) -> str:
    from vpo.worlds.shapes import Scene, describe

    return describe(Scene.from_dict({"objects": sample["objects"]}))


def _write_json(path: str, obj: Any) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
