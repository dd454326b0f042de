"""TRL's ``DPOConfig`` fields on :class:`vpo.trainer.VPOConfig`: the ones vpo has the meaning of are fields with TRL's
defaults (docs/trl.md has the table); the others are refused with one line naming vpo's equivalent, instead of a bare
``TypeError``; and the options' checks, before anything loads.

Kept here (not in ``config.py``) so the table of TRL names, the refusals and the cross-field checks sit in one place.
"""
from __future__ import annotations

import functools
import warnings
from typing import Callable, Dict

# DPOConfig fields vpo does not take, with what to use instead (one line each).
REFUSED_TRL_FIELDS: Dict[str, str] = {
    "precompute_ref_log_probs": "use ref_mode: precomputed with ref_logps_path (written by `vpo precompute-ref`)",
    "precompute_ref_batch_size": "`vpo precompute-ref` batches with per_device_eval_batch_size",
    "padding_free": "vpo pads each batch to its longest row; there is no padding-free mode",
    "truncation_mode": "vpo keeps the prompt (with its image tokens) and truncates the responses to fit max_length",
    "pad_to_multiple_of": "vpo pads to the batch's longest row",
    "dataset_num_proc": "vpo reads and tokenizes records lazily in the collator (dataloader_num_workers)",
    "router_aux_loss_coef": "vpo does not add MoE router losses",
    "activation_offloading": "use gradient_checkpointing (activation offloading is not supported)",
    "pad_token": "set processor.tokenizer.pad_token before passing processing_class",
    "reference_free": "use ref_mode: precomputed with zero reference terms, or loss_type: sft",
    "rpo_alpha": "use loss_type: sigmoid,sft with loss_weights: 1,<alpha>",
    "use_logits_to_keep": "the fused losses never build the logits",
    "generate_during_eval": "use `vpo eval` on the saved model",
    "tools": "vpo's collators take images, prompt and responses only",
}


def refuse_trl_fields(init: Callable) -> Callable:
    """Wrap a dataclass ``__init__`` so a refused DPOConfig field (:data:`REFUSED_TRL_FIELDS`) raises one ValueError
    line naming vpo's equivalent."""

    @functools.wraps(init)
    def wrapped(self, *args, **kwargs):
        for name in kwargs:
            if name in REFUSED_TRL_FIELDS:
                raise ValueError(refusal(name))
        return init(self, *args, **kwargs)

    return wrapped


def refusal(name: str) -> str:
    return f"{name} is a TRL DPOConfig field vpo does not take: {REFUSED_TRL_FIELDS[name]}"


def check_trl_options(cfg) -> None:
    """The checks of TRL's options on a :class:`VPOConfig` (ValueError naming the option); warns where a loss type
    ignores ``label_smoothing``."""
    from vpo.losses.loss_types import SMOOTHED_LOSS_TYPES, check_loss_options

    types, _ = cfg.loss_type_list()
    check_loss_options(types, beta=cfg.beta, label_smoothing=cfg.label_smoothing,
                       f_divergence_type=cfg.f_divergence_type, discopop_tau=cfg.discopop_tau)
    if cfg.ld_alpha is not None and not 0.0 <= cfg.ld_alpha <= 1.0:
        raise ValueError(f"ld_alpha must be in [0, 1] or unset, got {cfg.ld_alpha}")
    coupled = [t for t in types if t in ("aot", "aot_unpaired")]
    if cfg.use_weighting and coupled:
        raise ValueError(f"use_weighting (WPO) cannot weight loss_type {coupled}: they sort the batch, so their "
                         "terms are not pairs")
    if cfg.label_smoothing > 0:
        ignoring = [t for t in types if t not in SMOOTHED_LOSS_TYPES]
        if ignoring:
            warnings.warn(f"label_smoothing={cfg.label_smoothing} is ignored by loss_type {ignoring} (only "
                          f"{list(SMOOTHED_LOSS_TYPES)} read it)", UserWarning, stacklevel=3)
    if getattr(cfg, "bco_running_mean", False) and "bco_pair" not in types:
        raise ValueError(f"bco_running_mean shifts loss_type bco_pair's rewards, but loss_type is {types}")
    if cfg.sync_ref_model:
        if not 0.0 <= cfg.ref_model_mixup_alpha <= 1.0:
            raise ValueError(f"ref_model_mixup_alpha must be in [0, 1], got {cfg.ref_model_mixup_alpha}")
        if isinstance(cfg.ref_model_sync_steps, bool) or not isinstance(cfg.ref_model_sync_steps, int) \
                or cfg.ref_model_sync_steps < 1:
            raise ValueError(f"ref_model_sync_steps must be an int >= 1, got {cfg.ref_model_sync_steps!r}")
        if cfg.ref_mode != "model":
            raise ValueError(f"sync_ref_model needs a separate reference model (ref_mode: model, full fine-tuning: "
                             f"use_lora: false), got ref_mode={cfg.ref_mode!r}: with LoRA the reference is the "
                             "policy with its adapter off, there is no reference copy to mix")


# ---------------------------------------------------------------------------------------------------------------------
# TRL's constructor semantics: DPOTrainer(model, ref_model, args, train_dataset, processing_class, peft_config).
# ---------------------------------------------------------------------------------------------------------------------

def resolve_model(model, args, processing_class):
    """``(model, processing_class)``: a model path (a string) loaded as TRL does (``AutoModelForImageTextToText``
    with ``args.model_init_kwargs``, ``args.torch_dtype`` and ``args.attn_implementation``; ``tiny:<family>`` builds
    vpo's tiny model), its processor when none is passed; a model object passes through."""
    if not isinstance(model, str):
        if getattr(args, "model_init_kwargs", None):
            warnings.warn("model_init_kwargs is ignored: the model is already loaded", UserWarning, stacklevel=3)
        return model, processing_class
    if model.startswith("tiny:"):
        from vpo.trainer.modeling import load_model

        loaded, processor, _ = load_model(model, dtype=args.torch_dtype, seed=args.seed)
        return loaded, processing_class if processing_class is not None else processor
    from transformers import AutoModelForImageTextToText, AutoProcessor

    kwargs = {"attn_implementation": args.attn_implementation,
              "dtype": "auto" if args.torch_dtype == "auto" else args.torch_dtype}
    kwargs.update(args.model_init_kwargs or {})
    loaded = AutoModelForImageTextToText.from_pretrained(model, **kwargs)
    if processing_class is None:
        processing_class = AutoProcessor.from_pretrained(model)
    return loaded, processing_class


def check_constructor(model, args, ref_model, peft_config, train_dataset) -> None:
    """TRL's refusals at construction (ValueError naming the argument): no training data; a ``ref_model`` that is
    the policy itself; a ``PeftModel`` together with ``peft_config``; a ``ref_model`` with ``ref_mode`` adapter or
    precomputed set explicitly."""
    from vpo.trainer.modeling import unwrap_peft

    if train_dataset is None and not getattr(args, "data_path", None):
        raise ValueError("train_dataset is required: pass train_dataset= (a datasets.Dataset in TRL's layout, rows, "
                         "a path) or set data_path in the VPOConfig")
    if ref_model is not None and ref_model is model:
        raise ValueError("ref_model is model (the same object): leave ref_model out to get a frozen copy (full "
                         "fine-tuning) or the adapter-disabled policy (LoRA)")
    if peft_config is not None and unwrap_peft(model) is not None:
        raise ValueError("peft_config was passed with a model that is already a PeftModel: pass the PeftModel alone "
                         "(its adapter is trained) or the base model with peft_config")
    explicit = getattr(args, "ref_mode_given", args.ref_mode)
    if ref_model is not None and explicit in ("adapter", "precomputed"):
        raise ValueError(f"ref_model was passed but ref_mode={explicit!r}: leave ref_mode at auto (or set model) to "
                         "use the ref_model")


def disable_dropout(model) -> int:
    """Set every ``torch.nn.Dropout``'s ``p`` in ``model`` to 0 (TRL's ``disable_dropout``); returns how many."""
    import torch

    n = 0
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
            n += 1
    return n


def mix_reference(policy, reference, alpha: float) -> None:
    """TR-DPO's soft update, parameter by parameter: ``ref ← α·policy + (1−α)·ref`` (names matched; with LoRA the
    policy's merged weights are not formed, so this needs full fine-tuning, which the config checks)."""
    import torch

    from vpo.trainer.modeling import unwrap_model

    pol = dict(unwrap_model(policy).named_parameters())
    with torch.no_grad():
        for name, p in unwrap_model(reference).named_parameters():
            src = pol.get(name)
            if src is None or src.shape != p.shape:
                raise ValueError(f"sync_ref_model: the reference's parameter {name} has no match of shape "
                                 f"{tuple(p.shape)} in the policy: the reference must be a copy of the policy's "
                                 "architecture")
            p.mul_(1.0 - alpha).add_(src.detach().to(p.dtype), alpha=alpha)


def sync_reference_callback(trainer):
    """A ``TrainerCallback`` that mixes the policy into ``trainer.ref_model`` every ``ref_model_sync_steps``
    optimizer steps (TR-DPO, ``sync_ref_model``)."""
    from transformers import TrainerCallback

    class _SyncReference(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % args.ref_model_sync_steps == 0 and trainer.ref_model is not None:
                mix_reference(trainer.model, trainer.ref_model, args.ref_model_mixup_alpha)

    return _SyncReference()


def loss_option_kwargs(fn, cfg, takes: Callable[[object, str], bool]) -> dict:
    """The non-default TRL options of ``cfg`` as keywords of the loss function ``fn``; ValueError naming the option
    when ``fn`` does not take it (``ld_alpha`` and ``use_weighting`` need the fused losses' per-token terms)."""
    out = {}
    defaults = {"f_divergence_type": "reverse_kl", "f_alpha_divergence_coef": 0.5, "discopop_tau": 0.05,
                "use_weighting": False, "ld_alpha": None}
    for name, default in defaults.items():
        value = getattr(cfg, name, default)
        if value == default:
            continue
        if name == "f_alpha_divergence_coef" and getattr(cfg, "f_divergence_type", "") != "alpha_divergence":
            continue
        if not takes(fn, name):
            raise ValueError(f"{name}={value!r} is not available for method {cfg.method!r} in this build "
                             f"({getattr(fn, '__name__', fn)} takes no {name})")
        out[name] = value
    types, _ = cfg.loss_type_list()
    state = getattr(cfg, "_vpo_bco_state", None)  # set by VPOTrainer when bco_running_mean is on
    if state is not None and "bco_pair" in types:
        if not takes(fn, "bco_delta"):
            raise ValueError(f"bco_running_mean is not available for method {cfg.method!r} in this build "
                             f"({getattr(fn, '__name__', fn)} takes no bco_delta)")
        out["bco_delta"] = state.mean()
    if any(t in ("aot", "aot_unpaired") for t in types) and takes(fn, "chunking"):
        from vpo.fused import Chunking

        out["chunking"] = Chunking(pairs=1 << 30, store=False)  # aot sorts the batch: all pairs in one chunk
    return out


class RunningMean:
    """BCO's reward shift δ (``bco_running_mean``): the running mean, over training steps, of each batch's mean reward
    ``β·Δ`` over its chosen and rejected responses (the BCO paper's δ; TRL before 1.x subtracted it in ``bco_pair``,
    TRL 1.16 does not). Kept on the device (no host sync per step), averaged over processes, saved in checkpoints.
    A step uses the mean of the steps before it (0 at the first)."""

    def __init__(self):
        self.total = 0.0  # float until the first update puts it on the reward's device
        self.count = 0

    def mean(self):
        import torch

        if self.count == 0:
            return torch.zeros(())
        return self.total / self.count

    def update(self, batch_reward) -> None:
        import torch

        x = batch_reward.detach().float().reshape(())
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            x = x.clone()
            torch.distributed.all_reduce(x)
            x = x / torch.distributed.get_world_size()
        self.total = self.total + x
        self.count += 1

    def state_dict(self) -> dict:
        return {"total": float(self.total), "count": int(self.count)}

    def load_state_dict(self, state: dict) -> None:
        import torch

        self.total = torch.tensor(float(state.get("total", 0.0)))
        self.count = int(state.get("count", 0))
