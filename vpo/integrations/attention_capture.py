"""Cat-PO image-attention statistics captured inside an ordinary ``transformers`` forward (no ``output_attentions``).

Cat-PO (docs/methods.md, Cat-PO) needs ``a[b, t, j]``: the attention of each query (response) token ``t`` on the ``N_p``
image tokens ``j`` of the LANGUAGE model, averaged over heads (all, or a chosen set: ``heads=``) and a set of layers.
``output_attentions=True`` would force eager attention and return ``L`` tensors of ``[B, H, T, T]``; instead this module
registers wrapped attention functions in transformers' attention registry and points only the language model at them
while a capture is active:

- ``transformers.AttentionInterface.register(name, fn)`` (the global registry ``ALL_ATTENTION_FUNCTIONS``): every
  attention module of a transformers-5 model calls
  ``ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)(self, query,
  key, value, attention_mask, dropout=..., scaling=..., **kwargs)`` with post-RoPE ``query [B, Hq, T, d]`` and
  ``key [B, Hkv, T, d]``.
- ``transformers.masking_utils.AttentionMaskInterface.register(name, mask_fn)``: the mask builders look up the mask
  format by the same name; each wrapper reuses its base implementation's mask function, so the model builds exactly
  the mask it builds without a capture.

The wrapper ``vpo_capture_<base>`` (``<base>`` = ``sdpa``, ``eager`` or ``flash_attention_{2,3,4}``, whatever the
language model was using) first computes the layer's output with the base function (so outputs are bit-identical
to a plain forward), then, for an attention module registered by an active capture, calls
``vpo.ops.attention_stats.image_attention_from_qk`` on the layer's (detached) ``query``/``key`` and adds the
``[B, Tq, N_p]`` result to an ``ImageAttentionAccumulator`` under ``module.layer_idx``.

Only language-model layers count, by two independent guards: (1) only the language model's config (the one
``model.get_decoder()`` owns; ``text_config`` of the VLM) is switched to the wrapper, so vision towers (CLIP, the
Qwen-VL ViT, the Idefics2 perceiver) keep calling their own implementation; (2) the wrapper records statistics only
for the attention modules the capture found inside the language model (``config is lm.config`` and an ``int``
``layer_idx``), keyed by ``id(module)``, so any other caller of the wrapper is a pass-through.

How the kernel's arguments are derived, per layer:

- ``scale``: the ``scaling`` keyword the module passes (``head_dim ** -0.5`` when absent, as SDPA does).
- ``causal`` and ``key_padding_mask``: from the ``attention_mask`` the module received.
  ``None`` (SDPA's ``is_causal`` fast path: no padding) -> no padding mask, ``causal`` = the module's ``is_causal``
  (or the ``is_causal`` keyword). A 4D mask (SDPA: bool, True = attend; eager: additive 0 / -inf) ->
  ``key_padding_mask = mask.any(over queries)``, and the mask is checked to be exactly ``causal & padding`` (or
  ``padding`` only, then ``causal=False``); anything else (sliding window shorter than the sequence, packed sequences,
  bidirectional image blocks, additive biases) raises, as the kernel's contract cannot express it. The check costs one
  ``[B, T, T]`` bool comparison per distinct mask object per forward (the mask is shared by all layers).
  A 2D mask (flash-attention's format) -> ``key_padding_mask = mask.bool()``, ``causal`` from the module.
- ``query_positions``: given by the caller (``None`` = every position).
- Dropout, if the module is training, is ignored: the statistics are the expected (dropout-free) attention.

Cost: one extra ``Q K^T``-shaped sweep per selected layer inside the kernel, restricted to the ``N_p`` image columns
plus the softmax normalizer; nothing ``[T, T]`` is kept per layer.
"""
from __future__ import annotations

import sys
from typing import Dict, List, Optional, Sequence

import torch

from vpo._validate import check_choice, check_tensor

CAPTURE_PREFIX = "vpo_capture_"
# Base implementations the wrapper knows how to call and whose masks it knows how to read.
SUPPORTED_BASES = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flash_attention_4")

# id(attention module) -> (capture, layer index). Filled by ImageAttentionCapture.__enter__, emptied by __exit__.
_ACTIVE: Dict[int, tuple] = {}
_REGISTERED = False


# --- registration -----------------------------------------------------------------------------------------------------


def _capture_name(base: str) -> str:
    return CAPTURE_PREFIX + base


def _register() -> None:
    """Register ``vpo_capture_<base>`` in transformers' attention and mask registries (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    for base in SUPPORTED_BASES:
        AttentionInterface.register(_capture_name(base), _make_capture_forward(base))
        if base in ALL_MASK_ATTENTION_FUNCTIONS:
            AttentionMaskInterface.register(_capture_name(base), ALL_MASK_ATTENTION_FUNCTIONS[base])
    _REGISTERED = True


def _base_forward(base: str, module: torch.nn.Module):
    if base == "eager":
        # transformers has no global eager function: each modeling file defines its own `eager_attention_forward`
        # (the default every attention module passes to `get_interface`), so use the module's own.
        fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if fn is None:
            raise ValueError(
                f"{type(module).__name__} is defined in {type(module).__module__}, which has no "
                "`eager_attention_forward`: cannot capture an eager model of this architecture; load it with "
                'attn_implementation="sdpa"'
            )
        return fn
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS[base]


def _make_capture_forward(base: str):
    def capture_forward(module, query, key, value, attention_mask, **kwargs):
        out = _base_forward(base, module)(module, query, key, value, attention_mask, **kwargs)
        entry = _ACTIVE.get(id(module))
        if entry is not None:
            capture, layer_idx = entry
            capture._observe(layer_idx, module, query, key, attention_mask, kwargs)
        return out

    capture_forward.__name__ = f"vpo_capture_{base}_forward"
    capture_forward.__doc__ = (
        f"`{base}` attention that also feeds an active vpo image-attention capture (vpo.integrations)."
    )
    return capture_forward


# --- public API -------------------------------------------------------------------------------------------------------


def image_token_positions(input_ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """Positions of the image placeholder tokens in each row: ``[B, T] -> [B, N_p]`` int64, ascending.

    Every row must hold the same non-zero number ``N_p`` of image tokens (one image per row, or the same number of
    images); synchronises with the device once to check it.

    Example:
        >>> import torch
        >>> from vpo.integrations import image_token_positions
        >>> image_token_positions(torch.tensor([[5, 9, 9, 1], [9, 9, 2, 0]]), 9)
        tensor([[1, 2],
                [0, 1]])
    """
    check_tensor("input_ids", input_ids, ndim=2, dtypes=(torch.int32, torch.int64))
    if isinstance(image_token_id, bool) or not isinstance(image_token_id, int):
        raise ValueError(f"image_token_id must be an int, got {type(image_token_id).__name__}")
    is_image = input_ids == image_token_id
    counts = is_image.sum(-1)  # [B]
    n_p = int(counts[0].item())
    if n_p == 0 or bool((counts != n_p).any()):
        raise ValueError(
            f"input_ids must hold the same, non-zero number of image tokens (id {image_token_id}) in every row, got "
            f"counts {counts.tolist()}"
        )
    return is_image.nonzero()[:, 1].reshape(input_ids.shape[0], n_p)  # row-major nonzero: ascending per row


class ImageAttentionCapture:
    """Context manager capturing Cat-PO image-attention statistics of a model's language model during a forward.

    Build it with :func:`capture_image_attention`. Inside the ``with`` block run exactly one ordinary forward of the
    model on the batch the positions refer to; then :meth:`result` gives ``[B, Tq, N_p]`` float32, averaged over the
    selected heads of each layer, then over ``layers``. On exit (also on an exception) the language model's original attention implementation is
    restored.

    Attributes:
        layers: the normalized (non-negative, sorted) layer indices averaged over.
        selection: the :class:`vpo.ops.attention_select.HeadSelection` (which heads of each layer are averaged).
        num_layers: the language model's decoder-layer count.
        base_implementation: the attention implementation the language model used (and uses again after exit).
    """

    def __init__(self, model, image_positions, query_positions=None, layers=None, impl="auto", heads=None):
        from vpo.ops.attention_select import HeadSelection, check_heads

        self._lm = _language_model(model)
        config = self._lm.config
        self.num_layers = int(config.num_hidden_layers)
        self.selection = HeadSelection(heads, layers=layers, num_layers=self.num_layers)
        self.layers = self.selection.layers
        n_heads = getattr(config, "num_attention_heads", None)
        if isinstance(n_heads, int):  # range-check the heads now, not at the first layer of the forward
            for layer in self.layers:
                check_heads(self.selection.for_layer(layer), n_heads, name=f"heads (layer {layer})")
        self.image_positions = check_tensor("image_positions", image_positions, ndim=2, dtypes=(torch.int64,))
        if query_positions is not None:
            check_tensor("query_positions", query_positions, ndim=2, dtypes=(torch.int64,))
            if query_positions.shape[0] != image_positions.shape[0]:
                raise ValueError(
                    f"query_positions has shape {tuple(query_positions.shape)} but image_positions has shape "
                    f"{tuple(image_positions.shape)}: expected the same batch size B"
                )
        self.query_positions = query_positions
        from vpo.ops.attention_stats import QK_IMPLS

        check_choice("impl", impl, QK_IMPLS)  # up front, not at the first layer of the forward
        self.impl = impl
        self.base_implementation = None
        self._modules: Dict[int, int] = {}
        self._saved: List[tuple] = []
        self._acc = None
        self._seen: List[int] = []
        self._mask_cache: List[tuple] = []  # [(mask, key_padding_mask, causal)] for the masks of this forward
        self._device_positions = None

    # -- context protocol --

    def __enter__(self) -> "ImageAttentionCapture":
        from vpo.ops.attention_stats import ImageAttentionAccumulator

        _register()
        config = self._lm.config
        current = config._attn_implementation
        if current is not None and current.startswith(CAPTURE_PREFIX):
            raise ValueError(
                "a vpo image-attention capture is already active on this model: captures do not nest; exit the "
                "first one before opening another"
            )
        base = "sdpa" if current is None else current
        if base not in SUPPORTED_BASES:
            raise ValueError(
                f"the language model uses attn_implementation={current!r}: image-attention capture supports "
                f"{list(SUPPORTED_BASES)}; load or set the model with one of these"
            )
        modules = {
            id(m): m.layer_idx
            for m in self._lm.modules()
            if getattr(m, "config", None) is config
            and isinstance(getattr(m, "layer_idx", None), int)
            and not isinstance(m, torch.nn.ModuleList)
        }
        if not modules:
            raise ValueError(
                f"found no attention module with an int `layer_idx` in {type(self._lm).__name__}: cannot tell which "
                "layer each attention call belongs to"
            )
        self._modules = modules
        self._acc = ImageAttentionAccumulator(layers=list(self.layers), num_layers=self.num_layers)
        self._seen = []
        self._mask_cache = []
        self.base_implementation = current
        # The `_attn_implementation` setter also recurses into sub-configs: snapshot the whole tree, root first, so
        # that restoring in the same order gives every config back its own value.
        self._saved = [(c, c._attn_implementation) for c in _config_tree(config)]
        for key, idx in modules.items():
            _ACTIVE[key] = (self, idx)
        config._attn_implementation = _capture_name(base)
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        for key in self._modules:
            _ACTIVE.pop(key, None)
        for cfg, value in self._saved:
            cfg._attn_implementation = value
        self._mask_cache = []
        return False

    # -- results --

    @property
    def layers_seen(self) -> tuple:
        """Layer indices whose statistics were accumulated, in call order."""
        return tuple(self._seen)

    def result(self) -> torch.Tensor:
        """``[B, Tq, N_p]`` float32 image attention, averaged over the selected heads and the capture's ``layers``.

        Raises ``ValueError`` unless exactly one forward ran inside the capture (every selected layer seen once).
        """
        if sorted(self._seen) != list(self.layers):
            raise ValueError(
                f"the capture expected one forward through layers {list(self.layers)} but saw layers {self._seen}: "
                "run exactly one full forward of the model inside the `with` block"
            )
        return self._acc.mean()

    # -- called by the registered attention function --

    def _observe(self, layer_idx, module, query, key, attention_mask, kwargs) -> None:
        if layer_idx not in self.layers:
            return
        if layer_idx in self._seen:
            raise ValueError(
                f"layer {layer_idx} ran twice inside one capture (a second forward, or gradient-checkpointing "
                "recomputation): open one capture per forward, under torch.no_grad()"
            )
        from vpo.ops.attention_stats import image_attention_from_qk

        batch, _, q_len, head_dim = query.shape
        k_len = key.shape[2]
        if self.image_positions.shape[0] != batch:
            raise ValueError(
                f"image_positions has shape {tuple(self.image_positions.shape)} but the language model ran on a batch "
                f"of {batch}: expected image_positions.shape[0] == {batch}"
            )
        if q_len != k_len:
            raise ValueError(
                f"layer {layer_idx} attends {q_len} queries to {k_len} keys: the capture needs one full forward "
                "without a KV-cache prefix (query length == key length)"
            )
        for name in ("softcap", "s_aux", "position_bias"):
            if kwargs.get(name) is not None:
                raise ValueError(f"layer {layer_idx} uses `{name}`: not supported by the image-attention capture")
        if kwargs.get("cu_seq_lens_q") is not None:
            raise ValueError("packed sequences (cu_seq_lens_q) are not supported by the image-attention capture")
        window = kwargs.get("sliding_window")  # a 4D mask encodes it (then checked below); a flash 2D/None mask not
        if window is not None and k_len > window and (attention_mask is None or attention_mask.dim() != 4):
            raise ValueError(
                f"layer {layer_idx} uses a sliding window of {window} < {k_len} tokens: not supported by the "
                "image-attention capture"
            )
        causal_default = kwargs.get("is_causal")
        if causal_default is None:
            causal_default = getattr(module, "is_causal", True)
        key_padding_mask, causal = self._padding_and_causality(attention_mask, batch, q_len, k_len, causal_default)
        scale = kwargs.get("scaling")
        if scale is None:
            scale = head_dim**-0.5

        positions = self._positions_on(query.device)
        with torch.no_grad():
            a = image_attention_from_qk(
                query.detach(),
                key.detach(),
                positions[0],
                query_positions=positions[1],
                key_padding_mask=key_padding_mask,
                scale=float(scale),
                causal=bool(causal),
                heads=self.selection.for_layer(layer_idx),
                impl=self.impl,
            )
        self._acc.add(layer_idx, a)
        self._seen.append(layer_idx)

    def _positions_on(self, device):
        if self._device_positions is None or self._device_positions[0].device != device:
            q = None if self.query_positions is None else self.query_positions.to(device)
            self._device_positions = (self.image_positions.to(device), q)
        return self._device_positions

    def _padding_and_causality(self, mask, batch, q_len, k_len, causal_default):
        if mask is None:
            return None, causal_default
        for cached_mask, padding, causal in self._mask_cache:
            if cached_mask is mask:
                return padding, causal
        if mask.dim() == 2:  # flash-attention format: [B, T] padding mask, 1 = real
            if tuple(mask.shape) != (batch, k_len):
                raise ValueError(
                    f"the 2D attention mask has shape {tuple(mask.shape)}: expected ({batch}, {k_len}) ([B, T])"
                )
            padding, causal = mask.bool(), causal_default
        elif mask.dim() == 4:
            padding, causal = _read_4d_mask(mask, batch, q_len, k_len)
        else:
            raise ValueError(f"attention mask of shape {tuple(mask.shape)}: expected None, [B, T] or [B, 1, Tq, T]")
        self._mask_cache.append((mask, padding, causal))
        return padding, causal


def capture_image_attention(
    model,
    image_positions: torch.Tensor,
    query_positions: Optional[torch.Tensor] = None,
    layers: Optional[Sequence[int]] = None,
    impl: str = "auto",
    heads=None,
) -> ImageAttentionCapture:
    """Capture the language model's head/layer-averaged attention on the image tokens during one forward.

    Args:
        model: a transformers-5 model (a VLM ``*ForConditionalGeneration``, a causal LM, or a PEFT wrapper of one)
            whose language model uses ``sdpa``, ``eager`` or ``flash_attention_{2,3,4}``.
        image_positions: ``[B, N_p]`` int64 positions of the image tokens in each row (:func:`image_token_positions`);
            ``a[b, :, j]`` is the attention on ``image_positions[b, j]``.
        query_positions: optional ``[B, Tq]`` int64 query positions to keep; ``None`` = all ``T`` positions.
        layers: language-model layer indices to average over (negative allowed); ``None`` = all (docs/methods.md).
        impl: passed to ``vpo.ops.attention_stats.image_attention_from_qk`` (``"auto"`` picks by device).
        heads: which query heads to average: ``None`` (all, the paper), a list (those heads in every selected layer)
            or ``{layer: [heads]}`` (``vpo.ops.attention_select.HeadSelection``; a mapping also selects the layers).

    Returns:
        An :class:`ImageAttentionCapture`; after one forward inside it, ``.result()`` is ``[B, Tq, N_p]`` float32.
        Positions are not checked against the sequence length here; the kernel checks them.

    Example:
        >>> import torch
        >>> from vpo.models import tiny_llava, make_inputs
        >>> from vpo.integrations import capture_image_attention, image_token_positions
        >>> tiny = tiny_llava()
        >>> batch = make_inputs(tiny, batch_size=2, seq_len=24)
        >>> pos = image_token_positions(batch["input_ids"], tiny.image_token_id)
        >>> with torch.no_grad(), capture_image_attention(tiny.model, pos) as cap:
        ...     _ = tiny.model(**batch)
        >>> tuple(cap.result().shape), cap.layers_seen, tiny.model.config.text_config._attn_implementation
        ((2, 24, 9), (0, 1), 'sdpa')
    """
    return ImageAttentionCapture(model, image_positions, query_positions=query_positions, layers=layers, impl=impl,
                                 heads=heads)


# --- internals --------------------------------------------------------------------------------------------------------


def _language_model(model):
    """The decoder (language model) whose attention layers count: ``get_decoder()`` of the (PEFT-unwrapped) model."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not hasattr(base, "get_decoder"):
        raise ValueError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    lm = base.get_decoder()
    config = getattr(lm, "config", None)
    if config is None or not hasattr(config, "num_hidden_layers") or not hasattr(config, "_attn_implementation"):
        raise ValueError(
            f"{type(base).__name__}.get_decoder() returned {type(lm).__name__}, which has no transformers config with "
            "num_hidden_layers: cannot locate the language model"
        )
    return lm


def _config_tree(config) -> list:
    """``config`` and its sub-configs (any depth), root first."""
    out, todo = [], [config]
    while todo:
        cfg = todo.pop(0)
        if any(cfg is c for c in out):
            continue
        out.append(cfg)
        for key in getattr(cfg, "sub_configs", {}) or {}:
            sub = getattr(cfg, key, None)
            if sub is not None:
                todo.append(sub)
    return out


def _read_4d_mask(mask, batch, q_len, k_len):
    """``[B|1, 1, Tq, T]`` SDPA (bool) or eager (additive) mask -> (key_padding_mask [B, T], causal), or raise."""
    if mask.shape[1] != 1 or mask.shape[-2:] != (q_len, k_len) or mask.shape[0] not in (1, batch):
        raise ValueError(
            f"the 4D attention mask has shape {tuple(mask.shape)}: expected ({batch}, 1, {q_len}, {k_len})"
        )
    if mask.dtype == torch.bool:
        allowed = mask[:, 0]
    else:
        allowed = mask[:, 0] > torch.finfo(mask.dtype).min / 2
        if bool((mask[:, 0] * allowed).any()):
            raise ValueError("the additive attention mask carries a bias: not supported by the image-attention capture")
    allowed = allowed.expand(batch, q_len, k_len)  # [B, Tq, T]
    padding = allowed.any(dim=1)  # [B, T]: a key is real iff some query may attend it
    causal_pattern = torch.ones(q_len, k_len, dtype=torch.bool, device=mask.device).tril()
    if torch.equal(allowed, causal_pattern & padding[:, None, :]):
        return padding, True
    if torch.equal(allowed, padding[:, None, :].expand(batch, q_len, k_len)):
        return padding, False
    raise ValueError(
        "the attention mask is neither causal & padding nor padding only (e.g. a sliding window shorter than the "
        "sequence, packed sequences, bidirectional image blocks): not supported by the image-attention capture"
    )
