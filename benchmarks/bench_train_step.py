"""End-to-end preference training step: tokens/s and peak memory of a DPO and a TPO step, vpo's trainer path against
the same model computing full ``[2B, T, V]`` logits.

One step (both implementations, same model, same batch, same order of passes):

- the policy's passes with grad — DPO: the main pass ``[2B, T]``; TPO: the main pass and ``sub["noised"]`` (the same
  rows with diffusion-noised pixels; ``reward_grad=True``, the paper's default, so both carry gradients);
- the reference's passes under ``no_grad`` (``ref_mode="adapter"``: the same peft model with its LoRA adapter disabled,
  in eval mode, as :class:`vpo.trainer.reference.Reference` runs it);
- the loss, ``loss.backward()``, then ``AdamW.step()`` and ``zero_grad(set_to_none=True)`` over the LoRA parameters
  (what one ``Trainer`` step does besides data loading, logging and the LR schedule; the optimizer is ~1% of the step).

Implementations (``impl`` = ``<method>/<path>``):

- ``vpo``: the trainer's own code, :class:`vpo.trainer.passes.Passes` + :func:`vpo.trainer.methods.compute` — each pass
  runs the model's ``forward`` with ``logits_to_keep=1`` while a hook takes the backbone's last hidden states
  (:func:`vpo.trainer.passes.forward_hidden`), and the fused loss reads them with ``lm_head.weight`` (``loss_impl``:
  ``triton`` on CUDA, ``torch`` on CPU). No ``[tokens × vocab]`` tensor is ever built.
- ``materialized``: what TRL's ``DPOTrainer`` and TPO's reference code do: ``model(**inputs).logits`` ``[2B, T, V]``
  (every position), upcast to fp32, ``log_softmax``, gather the labels (and, for TPO, the raw target logits of both
  passes), per-sequence sums, then the same preference heads (:func:`vpo.losses.dpo_loss`,
  :func:`vpo.oracle.tpo.tpo_log_calibrated_reward`) — the math lives once; only the head differs.

Shapes (:class:`TrainShape`):

- GPU (``llava-1.5-7b``): ``LlavaForConditionalGeneration`` with LLaVA-1.5-7B's shapes and random weights: Vicuna-7B
  (32 layers, hidden 4096, 32 heads, MLP 11008, vocabulary 32064) + a CLIP-L/14-336 tower (24 layers, hidden 1024,
  576 patches) + the 2-layer GELU projector; bf16 weights under bf16 autocast (``Trainer(bf16=True)``); LoRA r=8,
  α=16, dropout 0.05 on every linear layer of the language model (VPOConfig's defaults, :func:`vpo.trainer.modeling
  .apply_lora`; the adapter's weights stay fp32, peft's default); non-reentrant activation checkpointing (VPOConfig's
  setting). B=4 pairs (8 rows) of T=876 tokens: 5 text tokens, 576 image tokens, 95 prompt tokens, then a response of
  at most 200 tokens (200, 192, ..., 144: right padding). The weights are random: built directly on the GPU in bf16
  (``torch.device("cuda")`` around ``_from_config``: transformers' own init, normal(0, 0.02) per matrix, runs on the
  device, where a CPU init of 7B parameters would take minutes; ``to_empty`` from the meta device would leave the RoPE
  frequencies and CLIP's position ids, non-persistent buffers, uninitialized). 7.06 B parameters (13.2 GiB), 20.0 M
  LoRA parameters.
- CPU (``cpu-llava``): the same architecture shrunk — 4 layers, hidden 128, LLaVA's vocabulary 32064 (so the head is
  a real share of the work, as in a 7B model with a big vocabulary), a 2-layer CLIP over 64 patches; fp32, no
  autocast; B=2 pairs of T=128 tokens (responses of at most 32); one torch thread (:func:`cpu_threads`).

``python benchmarks/bench_train_step.py --check`` runs the GPU code path without a GPU: it builds the 7B shape on the
meta device (parameter counts, the LoRA targets, the memory model), then runs one step of every case on a scaled-down
copy of the GPU shape in bf16 + autocast on CPU and checks that vpo's and the materialized losses and LoRA gradients
agree.

Reported (``benchmark.extra_info``; the results files' "End-to-end training step" table):

- time: pytest-benchmark's median and IQR over ``rounds`` steps (3 on CUDA, 5 on CPU: ``VPO_TRAIN_STEP_ROUNDS``),
  after one untimed warm-up step (Triton JIT, cuBLAS workspaces, AdamW's state) and the peak-memory step;
  ``tokens_per_s``: the batch's real (non-pad) tokens over the median step (each token runs through 2 passes for DPO, 4
  for TPO); ``response_tokens_per_s``: the scored response tokens over the median. ``throughput_ratio``: vpo's tokens/s
  over the materialized one's (target on the GPU shape: ≥ 1.5).
- memory: ``peak_mib``, the step's peak above what is live before it (weights, LoRA, AdamW's state, the batch; CUDA:
  ``max_memory_allocated`` after ``reset_peak_memory_stats`` minus ``memory_allocated``; CPU: the ``VmHWM`` rise in a
  fresh process, as ``_harness`` measures it, after a warm-up step on one short pair), and ``total_peak_mib``, the
  absolute peak (CUDA: ``max_memory_allocated``; CPU: ``VmHWM``, the whole process). ``memory_ratio``:
  ``peak_mib`` over the materialized one's (target on the GPU shape: ≤ 0.6); ``total_memory_ratio``: the same for the
  absolute peaks, weights included.
- ``tflops``: model FLOPs per step over the median: 2·P·N per forward pass and 2·P·N more per policy pass's backward
  (input gradients only: the base weights are frozen), with P the language model's matrix parameters (LM head
  included) and N = 2B·T positions; the recomputation of activation checkpointing, attention's T² terms, LoRA and the
  vision tower are not counted.
- ``loss``: the warm-up step's loss (ln 2 = 0.693 while the LoRA B matrices are ~0: policy = reference).

Run time (GPU, estimated, not yet measured): ~1 s per DPO step and ~2 s per TPO step (0.28 PFLOP counted per DPO
step, 0.37 with the recomputation), 5 steps per case, plus ~20 s to build the model once: ~1-1.5 minutes in all.
``run_gpu.sh`` leaves it out (its stages use the whole 6-minute budget); on a GPU with ~2 minutes to spare:
``pytest benchmarks/bench_train_step.py --benchmark-only --vpo-results DIR``.
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import gc
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from typing import Callable, Dict, Optional, Tuple

import pytest
import torch

import _harness as H

MiB = H.MiB
DEVICE = H.DEVICE
IGNORE_INDEX = -100


# ----------------------------------------------------------------------------------------------------------------------
# Shapes
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainShape:
    """A LLaVA-architecture model (Llama LM + CLIP tower + projector) and a preference batch of ``pairs`` pairs.

    Rows hold ``prefix`` text tokens, the ``n_image = (image_size / patch_size)²`` image tokens, ``prompt`` text tokens
    and a response of ``response - step · row`` tokens (row 0 the longest), right-padded to
    ``seq = prefix + n_image + prompt + response``.
    """

    model: str
    pairs: int
    prefix: int
    prompt: int
    response: int
    response_step: int  # how much shorter each next row's response is
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    vision_layers: int
    vision_hidden: int
    vision_heads: int
    vision_intermediate: int
    image_size: int
    patch_size: int
    dtype: str  # "bfloat16": bf16 weights under bf16 autocast; "float32": no autocast
    lora_r: int = 8
    checkpointing: bool = True

    @property
    def n_image(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def seq(self) -> int:
        return self.prefix + self.n_image + self.prompt + self.response

    @property
    def rows(self) -> int:
        return 2 * self.pairs

    @property
    def response_lengths(self) -> Tuple[int, ...]:
        return tuple(self.response - self.response_step * r for r in range(self.rows))

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def id(self) -> str:
        return f"{self.model}-B{self.pairs}-T{self.seq}"

    @property
    def label(self) -> str:
        return (f"{self.model} B={self.pairs} T={self.seq} ({self.prefix}+{self.n_image} image+{self.prompt} prompt+"
                f"≤{self.response} response) L={self.layers} D={self.hidden} V={self.vocab} {H._short(self.dtype)} "
                f"LoRA r={self.lora_r}{' ckpt' if self.checkpointing else ''}")

    def warmup(self) -> "TrainShape":
        """The CPU memory worker's warm-up batch: one short pair (loads kernels, threads and AdamW's state without
        leaving batch-sized blocks in the allocator)."""
        return replace(self, pairs=1, prompt=2, response=4, response_step=1)


# LLaVA-1.5-7B: Vicuna-7B + CLIP ViT-L/14 at 336 px (576 patches); ~100 prompt tokens (5 before the image, as in
# "<s> USER: <image>\n", 95 after it) and responses of up to 200 tokens.
GPU_SHAPE = TrainShape("llava-1.5-7b", pairs=4, prefix=5, prompt=95, response=200, response_step=8,
                       layers=32, hidden=4096, heads=32, kv_heads=32, intermediate=11008, vocab=32064,
                       vision_layers=24, vision_hidden=1024, vision_heads=16, vision_intermediate=4096,
                       image_size=336, patch_size=14, dtype="bfloat16")
CPU_SHAPE = TrainShape("cpu-llava", pairs=2, prefix=5, prompt=27, response=32, response_step=4,
                       layers=4, hidden=128, heads=4, kv_heads=4, intermediate=344, vocab=32064,
                       vision_layers=2, vision_hidden=64, vision_heads=4, vision_intermediate=128,
                       image_size=64, patch_size=8, dtype="float32")
# --check: the GPU shape's code path (bf16 + autocast, checkpointing, LoRA) at a CPU-sized scale.
GPU_PATH_MINI = replace(GPU_SHAPE, model="gpu-path-mini", pairs=2, prompt=11, response=16, response_step=2, layers=2,
                        hidden=128, heads=4, kv_heads=4, intermediate=344, vision_layers=2, vision_hidden=64,
                        vision_heads=4, vision_intermediate=128, image_size=56, patch_size=14)
SHAPES = (GPU_SHAPE,) if DEVICE == "cuda" else (CPU_SHAPE,)

# Materialized first, so that vpo's ratios are known when it finishes.
IMPLS = ("dpo/materialized", "dpo/vpo", "tpo/materialized", "tpo/vpo")
assert set(IMPLS) == set(H.BASELINES["train_step"])  # _harness.TRAIN_STEP_IMPLS names the same cases
# The project's targets (issue 5), on the GPU shape: vpo's tokens/s >= 1.5x and step memory <= 0.6x the materialized.
TARGETS = (H.Target("throughput_ratio", ">=", 1.5, "cuda", (GPU_SHAPE.id,)),
           H.Target("memory_ratio", "<=", 0.6, "cuda", (GPU_SHAPE.id,)))
ROUNDS = int(os.environ.get("VPO_TRAIN_STEP_ROUNDS", "3" if DEVICE == "cuda" else "5"))
LR = 1e-6  # AdamW's learning rate: small, so the LoRA B matrices stay ~0 over a session (loss ~ ln 2)


@dataclass(frozen=True)
class TrainCase:
    impl: str
    shape: TrainShape

    @property
    def id(self) -> str:
        return f"{self.shape.id}-{self.impl}"

    def to_json(self) -> str:
        return json.dumps({"impl": self.impl, "shape": asdict(self.shape)})

    @staticmethod
    def from_json(text: str) -> "TrainCase":
        d = json.loads(text)
        return TrainCase(d["impl"], TrainShape(**d["shape"]))


# ----------------------------------------------------------------------------------------------------------------------
# Model and batch
# ----------------------------------------------------------------------------------------------------------------------


def llava_config(shape: TrainShape):
    """A ``LlavaConfig`` with ``shape``'s sizes; the image placeholder is the last id (``vpo.models.tiny``'s layout)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    text = LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                       num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                       num_key_value_heads=shape.kv_heads, max_position_embeddings=4096, rms_norm_eps=1e-5,
                       initializer_range=0.02, pad_token_id=0, bos_token_id=None, eos_token_id=None,
                       tie_word_embeddings=False)
    vision = CLIPVisionConfig(hidden_size=shape.vision_hidden, intermediate_size=shape.vision_intermediate,
                              num_hidden_layers=shape.vision_layers, num_attention_heads=shape.vision_heads,
                              image_size=shape.image_size, patch_size=shape.patch_size, projection_dim=768)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=shape.vocab - 1,
                       image_seq_length=shape.n_image, vision_feature_layer=-2,
                       vision_feature_select_strategy="default", projector_hidden_act="gelu")


def _from_config(config, dtype: torch.dtype):
    from transformers import LlavaForConditionalGeneration

    try:
        return LlavaForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation="sdpa")
    except TypeError:  # transformers < 4.56 names it torch_dtype
        return LlavaForConditionalGeneration._from_config(config, torch_dtype=dtype, attn_implementation="sdpa")


def _enable_checkpointing(model) -> None:
    """Non-reentrant activation checkpointing, as VPOConfig sets it (transformers 5: activation_checkpointing_*)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def build_model(shape: TrainShape, device: str, seed: int = 0):
    """The peft policy: random weights built on ``device`` in ``shape.dtype``, LoRA on the language model, training
    mode, activation checkpointing on (module docstring)."""
    import warnings

    from vpo.trainer.config import VPOConfig
    from vpo.trainer.modeling import apply_lora

    d = _config_defaults(VPOConfig)
    torch.manual_seed(seed)
    with torch.device(device), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        base = _from_config(llava_config(shape), shape.torch_dtype)
    torch.manual_seed(seed + 1)  # the LoRA initialisation
    model = apply_lora(base, r=shape.lora_r, alpha=d["lora_alpha"], dropout=d["lora_dropout"], targets="all-linear")
    if shape.checkpointing:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            _enable_checkpointing(base)
    return model.train()


def _config_defaults(cls) -> Dict[str, object]:
    return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}


def method_config(method: str, loss_impl: str):
    """The fields :func:`vpo.trainer.methods.compute` reads, at VPOConfig's defaults (the papers')."""
    from types import SimpleNamespace

    from vpo.trainer.config import VPOConfig

    d = _config_defaults(VPOConfig)
    keys = ("beta", "label_smoothing", "tpo_a", "reward_grad", "tpo_rewards")
    return SimpleNamespace(method=method, loss_impl=loss_impl, **{k: d[k] for k in keys})


def make_batch(shape: TrainShape, device: str, method: str, seed: int = 0) -> Dict:
    """The collator's batch contract (``docs/data_format.md``): ``input_ids``/``attention_mask``/``labels``
    ``[2B, T]`` (chosen rows first) and ``pixel_values``, built by :func:`vpo.models.make_inputs`; labels on the
    response tokens only. TPO adds ``sub["noised"]``: the same rows with ``vpo.noise.add_diffusion_noise`` (step 500)
    on the pixels."""
    from vpo.models import TinyVLM, make_inputs
    from vpo.noise import add_diffusion_noise

    layout = TinyVLM(model=None, arch="llava", image_token_id=shape.vocab - 1, num_image_tokens=shape.n_image,
                     vocab_size=shape.vocab, pad_token_id=0, num_lm_layers=shape.layers,
                     extra={"pixel_shape": (3, shape.image_size, shape.image_size)})
    stem = shape.prefix + shape.n_image + shape.prompt
    lengths = [stem + r for r in shape.response_lengths]
    batch = make_inputs(layout, batch_size=shape.rows, seq_len=shape.seq, lengths=lengths, prefix_len=shape.prefix,
                        seed=seed)
    labels = torch.full_like(batch["input_ids"], IGNORE_INDEX)
    for row, n in enumerate(lengths):
        labels[row, stem:n] = batch["input_ids"][row, stem:n]  # the response
    batch["labels"] = labels
    batch = {k: v.to(device) for k, v in batch.items()}
    batch["pixel_values"] = batch["pixel_values"].to(shape.torch_dtype)
    if method == "tpo":
        g = torch.Generator(device=device).manual_seed(seed + 1)
        noised = add_diffusion_noise(batch["pixel_values"].float(), 500, generator=g, clamp=False)
        batch["sub"] = {"noised": {**{k: batch[k] for k in ("input_ids", "attention_mask", "labels")},
                                   "pixel_values": noised.to(shape.torch_dtype)}}
    return batch


def matrix_params(model) -> int:
    """P: the matrix parameters of the language model and the LM head (LoRA's excluded)."""
    from vpo.trainer.modeling import unwrap_model

    base = unwrap_model(model)
    decoder = base.get_decoder()
    n = 0
    for name, p in decoder.named_parameters():
        if p.dim() == 2 and "lora_" not in name and "embed_tokens" not in name:
            n += p.numel()
    return n + base.get_output_embeddings().weight.numel()


def step_flops(shape: TrainShape, method: str, params: int) -> float:
    """2·P·N per forward, 2·P·N more per policy backward; DPO: 1 policy + 1 reference pass, TPO: 2 + 2."""
    n = shape.rows * shape.seq
    passes = 1 if method == "dpo" else 2
    return passes * (4.0 + 2.0) * params * n


# ----------------------------------------------------------------------------------------------------------------------
# The two implementations of one step
# ----------------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _as_reference(model):
    """The reference of ``ref_mode="adapter"``: the adapter disabled, eval mode (``vpo.trainer.reference``)."""
    was_training = model.training
    with model.disable_adapter():
        model.eval()
        try:
            yield model
        finally:
            model.train(was_training)


def materialized_terms(model, pass_batch: Dict, *, logp: bool = True, target: bool = False):
    """One pass as TRL's ``concatenated_forward`` + ``get_batch_logps`` run it: the model's logits ``[R, T, V]`` at
    every position, upcast to fp32, ``log_softmax``, gather. Returns ``(logp, z, mask)``, each ``[R, T-1]`` (0 where
    the label is ignored): the labels' log-probs (if ``logp``) and raw logits (if ``target``: TPO's scores), else None.
    """
    from vpo.trainer.passes import model_inputs

    logits = model(**model_inputs(pass_batch), use_cache=False).logits  # [R, T, V]
    z_all = logits[:, :-1].float()  # [R, T-1, V] fp32 (TRL's upcast; position t predicts token t + 1)
    del logits
    labels = pass_batch["labels"][:, 1:]  # HF labels are unshifted
    mask = labels != IGNORE_INDEX
    safe = torch.where(mask, labels, torch.zeros_like(labels))[..., None]  # [R, T-1, 1]
    zero = torch.zeros((), device=z_all.device)
    out_logp = out_z = None
    if logp:
        logp_all = z_all.log_softmax(-1)  # [R, T-1, V] fp32
        out_logp = torch.where(mask, logp_all.gather(-1, safe).squeeze(-1), zero)  # [R, T-1]
    if target:
        out_z = torch.where(mask, z_all.gather(-1, safe).squeeze(-1), zero)
    return out_logp, out_z, mask


def materialized_loss(method: str, model, batch: Dict, cfg) -> torch.Tensor:
    """The preference loss from full logits, the passes in the order vpo's methods run them (TPO: the policy's noised
    pass, its main pass, then the reference's main and noised passes)."""
    from vpo.losses import dpo_loss
    from vpo.oracle.tpo import tpo_log_calibrated_reward

    B = batch["input_ids"].shape[0] // 2
    if method == "dpo":
        logp, _, _ = materialized_terms(model, batch)
        with torch.no_grad(), _as_reference(model):
            ref, _, _ = materialized_terms(model, batch)
        pol_seq, ref_seq = logp.sum(-1), ref.sum(-1)  # [2B]
    else:
        noised = batch["sub"]["noised"]
        is_chosen = torch.arange(2 * B, device=batch["input_ids"].device) < B  # [2B]

        def sums(logp, z, z_noised, mask):  # [2B]: Σ_i (logp(y_i) + log c_i), c from s = z(v) - z(v_c)
            log_c = tpo_log_calibrated_reward(z - z_noised, is_chosen, a=cfg.tpo_a, rewards=cfg.tpo_rewards)
            return (logp + torch.where(mask, log_c, torch.zeros_like(log_c))).sum(-1)

        with torch.set_grad_enabled(cfg.reward_grad):
            _, z_noised, _ = materialized_terms(model, noised, logp=False, target=True)
        logp, z, mask = materialized_terms(model, batch, target=True)
        pol_seq = sums(logp, z, z_noised, mask)
        with torch.no_grad(), _as_reference(model):
            ref_logp, ref_z, _ = materialized_terms(model, batch, target=True)
            _, ref_zn, _ = materialized_terms(model, noised, logp=False, target=True)
            ref_seq = sums(ref_logp, ref_z, ref_zn, mask)
    loss, _ = dpo_loss(pol_seq[:B], pol_seq[B:], ref_seq[:B], ref_seq[B:], beta=cfg.beta,
                       label_smoothing=cfg.label_smoothing)
    return loss


def vpo_loss(model, batch: Dict, cfg) -> torch.Tensor:
    """The trainer's ``compute_loss``: :class:`Passes` over the batch + the method's fused loss."""
    from vpo.trainer.methods import compute
    from vpo.trainer.passes import Passes
    from vpo.trainer.reference import Reference

    passes = Passes(batch, model, Reference("adapter"), impl=cfg.loss_impl)
    return compute(passes, cfg)[0]


def _loss_impl(device: str) -> str:
    return "triton" if device == "cuda" else "torch"


def make_optimizer(model, device: str) -> torch.optim.Optimizer:
    """AdamW over the trainable (LoRA) parameters; fused on CUDA."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=LR, **({"fused": True} if device == "cuda" else {}))


def make_step(case: TrainCase, model, batch: Dict, device: str,
              optimizer: Optional[torch.optim.Optimizer] = None) -> Callable[[], torch.Tensor]:
    """``step()``: one training step of ``case`` (loss, backward, AdamW step, ``zero_grad``), synchronized on CUDA;
    returns the detached loss."""
    method, path = case.impl.split("/")
    if path not in ("vpo", "materialized"):
        raise ValueError(f"unknown train_step impl {case.impl!r}: expected one of {list(IMPLS)}")
    cfg = method_config(method, _loss_impl(device))
    if path == "vpo" and device == "cuda":
        H._require_kernels("vpo_kernels.linear_logprobs", "vpo_kernels.target_logits")
    optimizer = make_optimizer(model, device) if optimizer is None else optimizer
    bf16 = case.shape.dtype == "bfloat16"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step() -> torch.Tensor:
        autocast = torch.autocast(device, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with autocast:  # Trainer(bf16=True) runs compute_loss under autocast; backward and optimizer outside it
            loss = vpo_loss(model, batch, cfg) if path == "vpo" else materialized_loss(method, model, batch, cfg)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        return loss.detach()

    return step


# ----------------------------------------------------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------------------------------------------------

_MODEL: Dict[Tuple[str, str], object] = {}  # the one model of this session (7B on the GPU: build it once)


def cached_model(shape: TrainShape, device: str):
    key = (shape.model, device)  # one architecture per shape name; the batch does not change the model
    if key not in _MODEL:
        free_model()
        _MODEL[key] = build_model(shape, device)
    return _MODEL[key]


def free_model() -> None:
    _MODEL.clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def cuda_peaks(step: Callable[[], torch.Tensor]) -> Tuple[float, float]:
    """``(peak above what is live before the step, absolute peak)`` of one step, MiB."""
    gc.collect()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    peak = torch.cuda.max_memory_allocated()
    return (peak - base) / MiB, peak / MiB


def _malloc_trim() -> None:
    try:  # hand freed heap blocks back to the OS, so the RSS at the reset is what is live (glibc only)
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@contextlib.contextmanager
def cpu_threads():
    """On CPU, ``VPO_TRAIN_STEP_THREADS`` torch threads (default 1) while measuring: the CPU model's ops are small, and
    on 2 shared, busy cores 2 threads made steps 2-20x slower and far noisier (measured: 0.55 s vs 1.2-10 s for the
    vpo DPO step)."""
    if DEVICE == "cuda":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("VPO_TRAIN_STEP_THREADS", "1")))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _peak_rss_worker(case: TrainCase) -> dict:
    """Runs in a fresh process (``python bench_train_step.py --worker '<case json>'``): build the model, the batch and
    the optimizer, warm up on one short pair, reset ``VmHWM``, run one step: the rise over the RSS at the reset."""
    torch.set_num_threads(int(os.environ.get("VPO_TRAIN_STEP_THREADS", "1")))
    method = case.impl.split("/")[0]
    model = build_model(case.shape, "cpu")
    optimizer = make_optimizer(model, "cpu")  # shared: the warm-up step allocates AdamW's state, as on CUDA
    make_step(case, model, make_batch(case.shape.warmup(), "cpu", method), "cpu", optimizer)()
    step = make_step(case, model, make_batch(case.shape, "cpu", method), "cpu", optimizer)
    gc.collect()
    _malloc_trim()
    reset = H._reset_peak_rss()
    base = H._proc_status_kib("VmRSS") if reset else H._proc_status_kib("VmHWM")
    t0 = time.perf_counter()
    loss = step()
    seconds = time.perf_counter() - t0
    peak = H._proc_status_kib("VmHWM")
    return {"peak_mib": (peak - base) / 1024.0, "total_peak_mib": peak / 1024.0, "baseline_rss_mib": base / 1024.0,
            "seconds": seconds, "loss": float(loss),
            "method": "VmHWM rise in a fresh process (clear_refs reset)" if reset
            else "VmHWM rise in a fresh process (no reset possible: under-reports)"}


def cpu_peak_rss(case: TrainCase, timeout: float = 600.0) -> dict:
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", case.to_json()],
                          capture_output=True, text=True, timeout=timeout)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"peak-RSS worker for {case.id} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


# (shape) -> impl -> the live extra_info of every train_step benchmark measured in this session
_MEASURED: Dict[TrainShape, Dict[str, dict]] = {}


def _link(case: TrainCase, info: dict) -> None:
    """``throughput_ratio`` / ``total_memory_ratio`` and the targets' verdicts, over the materialized step of the same
    method and shape (``time_ratio`` / ``memory_ratio`` come from ``_harness._link_ratios``)."""
    peers = _MEASURED.setdefault(case.shape, {})
    peers[case.impl] = info
    for impl, e in peers.items():
        method, path = impl.split("/")
        base = peers.get(f"{method}/materialized")
        if path != "vpo" or base is None:
            continue
        if e.get("median_s") and base.get("median_s"):
            e["throughput_ratio"] = base["median_s"] / e["median_s"]
        if e.get("total_peak_mib") and base.get("total_peak_mib"):
            e["total_memory_ratio"] = e["total_peak_mib"] / base["total_peak_mib"]
        verdicts = []
        for t in TARGETS:
            if t.applies(case.shape):
                value = e.get(t.metric)
                verdicts.append({"target": str(t), "value": value, "met": None if value is None else t.met(value)})
        if verdicts:
            e["targets"] = verdicts


def run_train_step(benchmark, case: TrainCase) -> None:
    """Warm up, measure peak memory, time ``ROUNDS`` steps with pytest-benchmark, fill ``benchmark.extra_info``."""
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    method = case.impl.split("/")[0]
    shape = case.shape
    benchmark.group = f"train_step {shape.label}"
    time_base, mem_base = H.BASELINES["train_step"][case.impl]
    info = benchmark.extra_info
    info.update(bench="train_step", impl=case.impl, shape=shape.label, shape_params=asdict(shape),
                time_baseline=time_base, memory_baseline=mem_base, loss_impl=_loss_impl(DEVICE)
                if case.impl.endswith("/vpo") else "materialized", rounds_requested=ROUNDS, optimizer=f"AdamW lr={LR}")
    try:
        with cpu_threads():
            model = cached_model(shape, DEVICE)
            batch = make_batch(shape, DEVICE, method)
            step = make_step(case, model, batch, DEVICE)
            loss = step()  # warm-up: Triton JIT, cuBLAS workspaces, AdamW's state
            info["loss"] = float(loss)
            if not math.isfinite(info["loss"]):
                raise RuntimeError(f"{case.id}: the warm-up step's loss is {info['loss']}")
            if DEVICE == "cuda":
                peak, total = cuda_peaks(step)
                note = "CUDA max_memory_allocated: rise over memory_allocated before the step / absolute"
            else:
                r = cpu_peak_rss(case)
                peak, total, note = r["peak_mib"], r["total_peak_mib"], r["method"]
            info.update(peak_mib=peak, total_peak_mib=total, memory_method=note)
            tokens = int(batch["attention_mask"].sum())
            response = int((batch["labels"] != IGNORE_INDEX).sum())
            flops = step_flops(shape, method, matrix_params(model))
            info.update(tokens=tokens, response_tokens=response, positions=shape.rows * shape.seq, flops=flops)
            benchmark.pedantic(step, rounds=ROUNDS, iterations=1, warmup_rounds=0)
    except H.Unavailable as e:
        pytest.skip(str(e))
    except torch.cuda.OutOfMemoryError as e:
        step = batch = None
        free_model()
        pytest.skip(f"CUDA out of memory: {str(e).splitlines()[0]}")
    if benchmark.stats:  # None under --benchmark-disable
        median = benchmark.stats.stats.median
        info.update(median_s=median, tflops=flops / median / 1e12, tokens_per_s=tokens / median,
                    response_tokens_per_s=response / median)
    H._link_ratios(H.Case("train_step", case.impl, shape), info)
    _link(case, info)


# ----------------------------------------------------------------------------------------------------------------------
# The benchmark
# ----------------------------------------------------------------------------------------------------------------------

# Named `tcase`, not `case`: conftest.py orders the `case` benchmarks shape-major and puts everything else after them,
# so this family (a 7B model on the GPU) runs last in a `pytest benchmarks` session.
CASES = [TrainCase(impl, shape) for shape in SHAPES for impl in IMPLS]


@pytest.fixture(scope="module", autouse=True)
def _release_model():
    yield
    free_model()  # 13 GiB of weights on the GPU shape


@pytest.mark.parametrize("tcase", CASES, ids=lambda c: c.id)
def test_train_step(benchmark, tcase):
    run_train_step(benchmark, tcase)


# ----------------------------------------------------------------------------------------------------------------------
# --check: the GPU code path without a GPU
# ----------------------------------------------------------------------------------------------------------------------


def check() -> int:
    """Build the GPU shape on the meta device (sizes, LoRA, a memory model), then run every case once on
    ``GPU_PATH_MINI`` (bf16 + autocast, checkpointing, LoRA) on CPU: vpo and the materialized loss must agree, in value
    and in the LoRA gradients."""
    from vpo.trainer.modeling import unwrap_model

    shape = GPU_SHAPE
    model = build_model(shape, "meta")
    base = unwrap_model(model)
    total = sum(p.numel() for n_, p in base.named_parameters() if "lora_" not in n_)
    lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    dtypes = sorted({str(p.dtype) for p in model.parameters() if p.requires_grad})
    P = matrix_params(model)
    lm = base.get_decoder()
    print(f"{shape.label}")
    print(f"  parameters {total / 1e9:.3f} B ({total * 2 / 2**30:.1f} GiB bf16), "
          f"LoRA {lora / 1e6:.1f} M {dtypes}, P (LM matrices + head) {P / 1e9:.3f} B")
    print(f"  LoRA targets inside {type(lm).__name__} only: "
          f"{all('language_model' in n for n, p in model.named_parameters() if p.requires_grad)}")
    n = shape.rows * shape.seq
    tokens = sum(shape.prefix + shape.n_image + shape.prompt + r for r in shape.response_lengths)
    for method in ("dpo", "tpo"):
        f = step_flops(shape, method, P)
        print(f"  {method}: {f / 1e12:.0f} TFLOP per step; at 400 TFLOP/s {f / 400e12:.2f} s, "
              f"{tokens / (f / 400e12):.0f} tokens/s")
    logits = shape.rows * shape.seq * shape.vocab
    ckpt = shape.layers * n * shape.hidden * 2
    batch = make_batch(shape, "cpu", "tpo")
    ids, labels = batch["input_ids"], batch["labels"]
    print(f"  batch: input_ids {tuple(ids.shape)}, {int(batch['attention_mask'].sum())} real tokens (= {tokens}), "
          f"{int((labels != IGNORE_INDEX).sum())} response tokens, {int((ids == shape.vocab - 1).sum(1)[0])} image "
          f"tokens a row, pixel_values {tuple(batch['pixel_values'].shape)} {batch['pixel_values'].dtype}, "
          f"sub['noised'] {sorted(batch['sub']['noised'])}")
    del batch
    print(f"  one pass's logits [{shape.rows}, {shape.seq}, {shape.vocab}]: {logits * 2 / 2**30:.2f} GiB bf16, "
          f"{logits * 4 / 2**30:.2f} GiB fp32; checkpointed layer inputs {ckpt / 2**30:.2f} GiB")
    del model, base

    ok = True
    # (shape, loss tolerance, LoRA-gradient tolerance): bf16 autocast = the GPU path; fp32 = a tight check of the math
    for mini, loss_tol, grad_tol in ((GPU_PATH_MINI, 2e-2, 0.1), (replace(GPU_PATH_MINI, dtype="float32"), 1e-5, 1e-3)):
        print(f"\n{mini.label} on CPU:")
        for method in ("dpo", "tpo"):
            ok &= _check_agreement(mini, method, loss_tol, grad_tol)
    return 0 if ok else 1


def _check_agreement(shape: TrainShape, method: str, loss_tol: float, grad_tol: float) -> bool:
    """vpo's and the materialized loss and LoRA gradients on one batch (LoRA B off 0, dropout off, training mode, so
    checkpointing runs), then one full training step of each through :func:`make_step`."""
    results = {}
    for path in ("materialized", "vpo"):
        model = build_model(shape, "cpu")
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():  # move the LoRA B matrices off 0, so policy != reference and gradients are not 0
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02, generator=g)
        for m in model.modules():  # no dropout: both paths compute the same function
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        batch = make_batch(shape, "cpu", method)
        cfg = method_config(method, "torch")
        bf16 = shape.dtype == "bfloat16"
        with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            loss = vpo_loss(model, batch, cfg) if path == "vpo" else materialized_loss(method, model, batch, cfg)
        loss.backward()
        grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
        results[path] = (loss.item(), grads)
        t0 = time.perf_counter()
        step_loss = make_step(TrainCase(f"{method}/{path}", shape), build_model(shape, "cpu"), batch, "cpu")().item()
        print(f"  {method}/{path}: loss {results[path][0]:.6f}, {len(grads)} LoRA gradients; a training step on a "
              f"fresh model: loss {step_loss:.6f}, {time.perf_counter() - t0:.2f} s")
    (lm, gm), (lv, gv) = results["materialized"], results["vpo"]
    worst = max(float((gm[k] - gv[k]).norm() / gm[k].norm().clamp_min(1e-30)) for k in gm) if gm else math.inf
    good = set(gm) == set(gv) and abs(lm - lv) <= loss_tol * max(1.0, abs(lm)) and worst <= grad_tol
    print(f"  {method}: |loss difference| {abs(lm - lv):.2e} (tolerance {loss_tol:g}), worst relative LoRA-gradient "
          f"difference {worst:.2e} (tolerance {grad_tol:g}) -> {'OK' if good else 'MISMATCH'}")
    return good

if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        print(json.dumps(_peak_rss_worker(TrainCase.from_json(sys.argv[2]))))
    elif sys.argv[1:] == ["--check"]:
        sys.exit(check())
    else:
        sys.exit("usage: python benchmarks/bench_train_step.py --check | --worker '<TrainCase json>'")
