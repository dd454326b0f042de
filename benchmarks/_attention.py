"""Image-attention statistics steps (Cat-PO): the eager route (every layer's ``[B, H, T, T]`` probabilities kept, as
``output_attentions=True`` returns them) against the q,k route (``image_attention_from_qk`` per layer), on random
per-layer q, k (:func:`_attention_step`) or through a tiny LLaVA's transformers forward (:func:`_e2e_step`)."""
from __future__ import annotations

import gc
from typing import Callable, Tuple

import torch

from _cases import ATTN_IMPLS, E2E_IMPLS, Case, Unavailable
from _lmhead import _require_kernels, _sync, clear_inputs
from _shapes import AttnShape


def _layer_qk(shape: "AttnShape", layer: int, device: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Layer ``layer``'s post-RoPE ``q [B, Hq, T, d]`` and ``k [B, Hkv, T, d]``: seeded N(0, 1) in the shape's dtype,
    generated on the device (what the model's q/k projections and RoPE would hand the attention)."""
    g = torch.Generator(device=device).manual_seed(1000 + layer)
    B, T, d = shape.batch, shape.seq, shape.head_dim
    q = torch.randn((B, shape.heads, T, d), generator=g, device=device, dtype=shape.torch_dtype)
    k = torch.randn((B, shape.kv_heads, T, d), generator=g, device=device, dtype=shape.torch_dtype)
    return q, k


def image_positions(shape: "AttnShape", device: str) -> torch.Tensor:
    """``[B, N_p]`` key positions of the image block, LLaVA's layout: a short prompt prefix, the image, then text."""
    start = min(8, shape.seq - shape.n_image)
    return (start + torch.arange(shape.n_image, device=device)).expand(shape.batch, -1).contiguous()


def _attention_step(impl: str, shape: "AttnShape", device: str) -> Callable[[], None]:
    """One model-like sweep over ``shape.layers`` layers producing the head- and layer-averaged image attention
    ``[B, T, N_p]`` (every query row) by ``impl``; q and k are generated per layer inside the step (both routes),
    so the step's peak holds one layer's q, k plus what the route itself keeps.

    - ``eager``: HF's ``eager_attention_forward`` up to the probabilities: ``repeat_kv``, ``q·kᵀ·scale`` in the
      compute dtype, the additive causal mask (built once per forward, ``[T, T]``), ``softmax`` in fp32, cast back;
      every layer's ``[B, H, T, T]`` map is kept, as ``output_attentions=True`` returns them all; then
      ``image_attention_from_probs`` per layer into an ``ImageAttentionAccumulator``. (``probs @ v`` is left out: both
      routes would compute the layer's output.)
    - ``qk/<impl>``: ``image_attention_from_qk(q, k, ...)`` per layer into the accumulator; nothing ``[T, T]``.
    """
    from vpo.ops.attention_stats import ImageAttentionAccumulator, image_attention_from_probs, image_attention_from_qk

    if impl not in ATTN_IMPLS:
        raise ValueError(f"unknown attention_stats impl {impl!r}: expected one of {sorted(ATTN_IMPLS)}")
    sync = _sync(device)
    ipos = image_positions(shape, device)  # [B, N_p]
    L, G, dtype = shape.layers, shape.heads // shape.kv_heads, shape.torch_dtype
    scale = shape.head_dim ** -0.5

    if impl == "eager":

        def step():
            with torch.no_grad():
                T = shape.seq
                mask = torch.full((T, T), float("-inf"), device=device, dtype=dtype).triu_(1)  # [T, T] additive
                maps = []  # output_attentions=True: L x [B, H, T, T]
                for layer in range(L):
                    q, k = _layer_qk(shape, layer, device)
                    k = k.repeat_interleave(G, dim=1) if G > 1 else k  # repeat_kv: [B, Hkv, T, d] -> [B, Hq, T, d]
                    s = torch.matmul(q, k.transpose(2, 3)) * scale  # [B, Hq, T, d] @ [B, Hq, d, T] -> [B, Hq, T, T]
                    s = s + mask
                    maps.append(torch.softmax(s, dim=-1, dtype=torch.float32).to(dtype))
                    del q, k, s
                acc = ImageAttentionAccumulator(num_layers=L)
                for layer, p in enumerate(maps):
                    acc.add(layer, image_attention_from_probs(p, ipos))  # [B, T, N_p]
                a = acc.mean()
                del maps, a
            sync()

    else:
        backend = impl.split("/")[1]
        if backend == "triton":
            _require_kernels("vpo_kernels.attention_stats")

        def step():
            acc = ImageAttentionAccumulator(num_layers=L)
            for layer in range(L):
                q, k = _layer_qk(shape, layer, device)
                acc.add(layer, image_attention_from_qk(q, k, ipos, scale=scale, impl=backend))  # [B, T, N_p]
                del q, k
            a = acc.mean()
            del a
            sync()

    return step


def _e2e_step(impl: str, shape: "AttnShape", device: str) -> Callable[[], None]:
    """A tiny LLaVA's forward (no grad, as ``catpo_weights_for_batch`` runs it) and the image attention of its
    language model averaged over every layer: ``eager-output-attentions`` = the eager model with
    ``output_attentions=True`` then ``image_attention_from_probs`` per returned map; ``capture`` = the sdpa model
    inside ``capture_image_attention`` (``image_attention_from_qk``, ``impl="auto"``)."""
    if impl not in E2E_IMPLS:
        raise ValueError(f"unknown attention_e2e impl {impl!r}: expected one of {sorted(E2E_IMPLS)}")
    try:
        from vpo.integrations import capture_image_attention, image_token_positions
        from vpo.models import make_inputs, tiny_llava
    except ImportError as e:
        raise Unavailable(f"the end-to-end variant needs transformers: {e}") from e
    from vpo.ops.attention_stats import ImageAttentionAccumulator, image_attention_from_probs

    side = int(round(shape.n_image ** 0.5))
    if side * side != shape.n_image:
        raise ValueError(f"{shape.label}: the tiny LLaVA needs a square N_p (image_size / patch_size squared)")
    tiny = tiny_llava(vocab_size=128, hidden_size=shape.heads * shape.head_dim, num_layers=shape.layers,
                      num_heads=shape.heads, num_kv_heads=shape.kv_heads, image_size=8 * side, patch_size=8)
    model = tiny.model.to(device=device, dtype=shape.torch_dtype)
    batch = {k: v.to(device) for k, v in make_inputs(tiny, batch_size=shape.batch, seq_len=shape.seq).items()}
    batch["pixel_values"] = batch["pixel_values"].to(shape.torch_dtype)
    ipos = image_token_positions(batch["input_ids"], tiny.image_token_id)  # [B, N_p]
    sync = _sync(device)
    kw = dict(use_cache=False, logits_to_keep=1)

    if impl == "eager-output-attentions":
        model.set_attn_implementation("eager")

        def run():
            with torch.no_grad():
                maps = model(**batch, output_attentions=True, **kw).attentions  # L x [B, H, T, T]
                acc = ImageAttentionAccumulator(num_layers=len(maps))
                for layer, p in enumerate(maps):
                    acc.add(layer, image_attention_from_probs(p, ipos))
                a = acc.mean()
                del maps, a
            sync()

    else:

        def run():
            with torch.no_grad(), capture_image_attention(model, ipos) as cap:
                model(**batch, **kw)
            a = cap.result()
            del a
            sync()

    if device == "cuda":
        return run

    def step():  # one thread on CPU, as vpo.models.tiny advises: its ops are too small to share (measured 20x slower
        threads = torch.get_num_threads()  # with 2 threads on 2 busy cores)
        torch.set_num_threads(1)
        try:
            run()
        finally:
            torch.set_num_threads(threads)

    return step


def attention_prepare(case: Case, device: str) -> Callable[[], None]:
    clear_inputs()  # the linear-head inputs of the last shape are not needed any more
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    if case.bench == "attention_e2e":
        return _e2e_step(case.impl, case.shape, device)
    return _attention_step(case.impl, case.shape, device)
