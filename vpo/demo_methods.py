"""One preference stage of the demo per method, on the shapes world, from the SFT model (:func:`train_method`).

Every method starts from the same SFT model, with the frozen SFT model as the reference, the same optimizer settings
(:class:`vpo.demo.DemoSettings`: steps, batch, learning rate, β) and the same preference pairs; what differs is
what each method's paper adds:

=========  =====================================================================================================
``dpo``     the pairs as they are (the baseline)
``tpo``     the pairs, plus the diffusion-noised image for the token-level calibrated rewards (collator ``tpo``)
``catpo``   the pairs, with the token weights from the reference's image attention (collator ``catpo``)
``mdpo``    the pairs, plus a crop keeping 1-20% of the image for the conditional term (collator ``mdpo``)
``lpoi``    LPOI's lists (:func:`vpo.construct.lpoi.write_lpoi_dataset`: the hallucinated object's box masked
            in ``L - 1`` steps), built once per data folder
``ovip``    ONLINE: each step samples ``k`` responses per prompt from the live policy, the shapes-world judge
            scores them and pairs are drawn; negative images rendered from the rejected caption
``csr``     ITERATIVE: ``iterations`` rounds of (diverse beam search with the current model scored by the
            shapes-world scorer -> pairs -> DPO with the previous iterate as the reference); the steps are split
            over the rounds
=========  =====================================================================================================
"""
from __future__ import annotations

import os
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

ALL_METHODS = ("tpo", "catpo", "ovip", "csr", "lpoi", "mdpo", "dpo")
# OViP online: responses per prompt, prompts per step, tokens per sampled response.
OVIP_K, OVIP_PROMPTS, OVIP_TOKENS = 4, 8, 24
# CSR: rounds, and prompts searched per round.
CSR_ITERATIONS, CSR_PROMPTS = 2, 160


def _config(method: str, out_dir: str, settings, seed: int, impl: str, steps: Optional[int] = None, **extra):
    from vpo.trainer import VPOConfig

    steps = settings.pref_steps if steps is None else steps
    if method == "tpo":
        extra.setdefault("reward_grad", settings.tpo_reward_grad)
        extra.setdefault("noise_step", settings.tpo_noise_step)
        extra.setdefault("tpo_a", settings.tpo_a)
    if method == "catpo":
        extra.setdefault("catpo_layers", settings.catpo_layers)
        extra.setdefault("catpo_heads", settings.catpo_heads)
        extra.setdefault("catpo_alpha", settings.catpo_alpha)
    return VPOConfig(
        output_dir=out_dir, method=method, max_steps=steps, per_device_train_batch_size=settings.pref_batch,
        learning_rate=settings.pref_lr, beta=settings.beta, warmup_steps=min(10, steps // 5),
        lr_scheduler_type="linear", logging_steps=settings.logging_steps, save_strategy="no", report_to="none",
        use_cpu=True, seed=seed, data_seed=seed, use_lora=False, ref_mode="model", freeze_vision=True,
        loss_impl=impl, **extra)


def _fit(policy, reference, config, dataset, collator, desc: str, progress: bool, bar: Optional[Callable]
         ) -> List[Dict[str, Any]]:
    from vpo.trainer import VPOTrainer

    trainer = VPOTrainer(policy, config, ref_model=reference, train_dataset=dataset, data_collator=collator)
    if bar is not None:
        bar(trainer, desc, progress)
    trainer.train()
    trainer.save_state()
    history = list(trainer.state.log_history)
    del trainer
    return history


def lpoi_data(pairs_path: str, out_dir: str) -> str:
    """LPOI's lists for the pairs at ``pairs_path``, written once to ``out_dir`` (reused when present)."""
    from vpo.construct.lpoi import write_lpoi_dataset

    path = os.path.join(out_dir, "train.jsonl")
    if not os.path.isfile(os.path.join(out_dir, "construct.json")):
        write_lpoi_dataset(pairs_path, out_dir)
    return path


def train_method(method: str, sft_model_dir: str, data: Dict[str, str], settings, seed: int, out_dir: str, *,
                 impl: str = "auto", progress: bool = True, bar: Optional[Callable] = None
                 ) -> Tuple[Any, Dict[str, Any], List[Dict[str, Any]]]:
    """Train ``method`` from the SFT model in ``sft_model_dir`` on the world ``data`` (:func:`vpo.demo.
    make_world_data`), writing to ``out_dir``. Returns ``(policy in eval mode, {"steps", "seconds", "model"},
    log_history)``; the trained model is saved to ``out_dir/model``. ``bar(trainer, desc, progress)`` installs a
    progress display."""
    from vpo.data import PreferenceCollator, PreferenceDataset
    from vpo.models.cache import load_pretrained, save_pretrained

    if method not in ALL_METHODS:
        raise ValueError(f"method must be one of {list(ALL_METHODS)}, got {method!r}")
    t = time.perf_counter()
    processor = load_pretrained(sft_model_dir)[1]
    extra: Dict[str, Any] = {}
    if method == "csr":
        policy, history = _train_csr(sft_model_dir, data, settings, seed, out_dir, impl, progress, bar)
    else:
        policy, _ = load_pretrained(sft_model_dir)
        reference, _ = load_pretrained(sft_model_dir)
        if method == "ovip":
            from vpo.trainer.online import build_online_dataset

            config = _config("ovip", out_dir, settings, seed, impl, online=True, data_path=data["pairs"],
                             online_k=OVIP_K, online_prompts_per_step=OVIP_PROMPTS,
                             online_max_new_tokens=OVIP_TOKENS, online_buffer_size=settings.pref_batch)
            dataset = build_online_dataset(config, processor)
            extra = {"online_k": OVIP_K, "online_prompts_per_step": OVIP_PROMPTS}
        elif method == "lpoi":
            config = _config("lpoi", out_dir, settings, seed, impl)
            dataset = PreferenceDataset.from_jsonl(lpoi_data(data["pairs"], os.path.join(data["root"], "lpoi")))
        else:
            config = _config(method, out_dir, settings, seed, impl)
            dataset = PreferenceDataset.from_jsonl(data["pairs"])
        collator = PreferenceCollator(processor, "llava", method=method, seed=seed, list_size=config.list_size,
                                      noise_step=config.noise_step)
        history = _fit(policy, reference, config, dataset, collator, method, progress, bar)
        del reference
    policy.eval()
    model_dir = save_pretrained(policy, processor, os.path.join(out_dir, "model"))
    res = {"steps": settings.pref_steps, "seconds": time.perf_counter() - t, "model": model_dir, **extra}
    return policy, res, history


def _train_csr(sft_model_dir, data, settings, seed, out_dir, impl, progress, bar):
    """CSR's loop (:func:`vpo.construct.csr.csr_iterate`) with :data:`CSR_ITERATIONS` rounds of
    ``pref_steps / CSR_ITERATIONS`` steps; the search uses the world's scorer on the pairs' prompts and images."""
    from vpo.construct.csr import CSRConfig, csr_iterate
    from vpo.data import PreferenceCollator, PreferenceDataset
    from vpo.models.cache import load_pretrained, save_pretrained

    steps = max(1, settings.pref_steps // CSR_ITERATIONS)
    history: List[Dict[str, Any]] = []

    def train_fn(dataset_dir: str, ref_model_path: str) -> str:
        policy, processor = load_pretrained(ref_model_path)
        reference, _ = load_pretrained(ref_model_path)
        it = len([h for h in history if h.get("csr_round_end")]) + 1
        run_dir = os.path.join(out_dir, f"iter{it}_run")
        config = _config("csr", run_dir, settings, seed, impl, steps=steps)
        dataset = PreferenceDataset.from_jsonl(os.path.join(dataset_dir, "train.jsonl"))
        collator = PreferenceCollator(processor, "llava", method="csr", seed=seed)
        logs = _fit(policy, reference, config, dataset, collator, f"csr {it}", progress, bar)
        offset = (it - 1) * steps
        history.extend({**h, "step": h.get("step", 0) + offset} for h in logs if "train_runtime" not in h)
        history.append({"csr_round_end": it, "pairs": len(dataset)})
        return save_pretrained(policy.eval(), processor, os.path.join(out_dir, f"iter{it}_model"))

    from vpo.construct.csr_scorers import ShapesWorldScorer

    config = CSRConfig(max_new_tokens=24, max_sentences=1, max_response_tokens=24, lam=settings.csr_lam,
                       min_sentence_tokens=settings.csr_min_sentence_tokens)
    rounds = csr_iterate(data["pairs"], out_dir, model_path=sft_model_dir, train_fn=train_fn,
                         scorer=ShapesWorldScorer(settings.csr_metric), iterations=CSR_ITERATIONS, config=config,
                         limit=CSR_PROMPTS,
                         load_fn=load_pretrained)
    policy, _ = load_pretrained(rounds[-1].model_path)
    return policy, [h for h in history if "csr_round_end" not in h]
