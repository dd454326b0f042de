"""Cat-PO token weights for a batch from one no-grad forward of a transformers model: the image attention captured by
:mod:`vpo.integrations.attention_capture`, the label embeddings and the image features fed to the language model,
combined by ``vpo.catpo.catpo_token_weights`` (docs/methods.md, Cat-PO)."""
from __future__ import annotations

import inspect
from typing import Mapping, Optional, Sequence, Union

import torch

from vpo._validate import check_choice, check_tensor
from vpo.integrations.attention_capture import capture_image_attention, image_token_positions, _language_model

__all__ = ["catpo_weights_for_batch"]


def catpo_weights_for_batch(
    model,
    inputs: Mapping[str, torch.Tensor],
    labels: torch.Tensor,
    *,
    is_chosen: Union[None, bool, torch.Tensor] = None,
    image_token_id: Optional[int] = None,
    layers: Optional[Sequence[int]] = None,
    heads=None,
    alpha: float = 0.5,
    lambda_ref: float = 0.5,
    ignore_index: int = -100,
    query_at: str = "input",
    impl: str = "auto",
) -> torch.Tensor:
    """Cat-PO token weights ``w [R, T]`` for a batch, from one no-grad forward of the (reference) model.

    Runs ``model(**inputs)`` inside :func:`capture_image_attention` and feeds ``vpo.catpo.catpo_token_weights`` with:

    - ``a``: the captured attention of each label's query on the image tokens (head- and ``layers``-averaged);
    - ``e(y_t)``: ``model.get_input_embeddings()(labels)``;
    - ``u_j``: the language model's input embeddings at the image positions, i.e. the projected image features after
      the VLM merged them into ``inputs_embeds`` (read by a forward pre-hook on ``model.get_decoder()``, the language
      model, which every transformers-5 VLM calls with ``inputs_embeds=``). This is the "projected image features fed
      to the LM" of docs/methods.md (same space as ``e``), whatever projector/resampler the architecture uses.

    Args:
        model: the reference model (its weights are not changed; it is run under ``torch.no_grad()``).
        inputs: the model's forward kwargs (``input_ids`` required; ``pixel_values``, ``attention_mask``, Qwen-VL's
            ``image_grid_thw``/``mm_token_type_ids``, ...), rows ``[R, T]``.
        labels: ``[R, T]`` targets aligned with the logits (``labels[:, t] = input_ids[:, t + 1]``, the caller
            shifts; the repo-wide convention), ``ignore_index`` on prompt/padding.
        is_chosen: ``None`` = the preference-batch convention (``R = 2B``, chosen rows first, then rejected); a bool for
            all rows; a ``[R]`` or ``[R, T]`` bool tensor.
        image_token_id: the image placeholder id; defaults to ``model.config.image_token_id``.
        layers: LM layers to average over (``None`` = all, docs/methods.md).
        heads: query heads to average over: ``None`` (all), a list for every layer, or ``{layer: [heads]}``
            (:func:`capture_image_attention`). alpha, lambda_ref: Cat-PO's α and λ_ref.
        query_at: which query represents ``y_t = labels[:, t]``: ``"input"`` (default, as in
            ``vpo.oracle.image_attention_stats``: the position ``t + 1`` where ``y_t`` is the input token) or
            ``"prediction"`` (the position ``t`` whose hidden state predicts ``y_t``).
        impl: kernel choice for ``image_attention_from_qk``.

    Returns:
        ``[R, T]`` float32 weights, constants for ``catpo_loss``. At target positions they lie in
        ``[λ_ref - tanh(1 - α), λ_ref + 1 + tanh(1 - α)]`` (chosen: ``λ_ref + tanh(s)``, rejected:
        ``λ_ref + 1 - tanh(s)``, with ``s ∈ [-(1 - α), 1]``); at ``ignore_index`` positions they are 0.

    Example:
        >>> import torch
        >>> from vpo.models import tiny_llava, make_inputs
        >>> from vpo.integrations import catpo_weights_for_batch
        >>> tiny = tiny_llava()
        >>> batch = make_inputs(tiny, batch_size=2, seq_len=20)
        >>> labels = torch.full_like(batch["input_ids"], -100)
        >>> labels[:, 14:18] = batch["input_ids"][:, 15:19]                  # shifted response targets
        >>> w = catpo_weights_for_batch(tiny.model, batch, labels)          # row 0 chosen, row 1 rejected
        >>> tuple(w.shape), bool(((w[:, 14:18] > 0) & (w[:, 14:18] < 2)).all()), float(w[:, :14].abs().sum())
        ((2, 20), True, 0.0)
    """
    from vpo.catpo import catpo_token_weights

    check_choice("query_at", query_at, ("input", "prediction"))
    input_ids = inputs.get("input_ids") if isinstance(inputs, Mapping) else None
    if input_ids is None:
        raise ValueError("inputs must be a mapping of forward kwargs holding input_ids ([R, T] int64)")
    check_tensor("input_ids", input_ids, ndim=2, dtypes=(torch.int32, torch.int64))
    check_tensor("labels", labels, ndim=2, dtypes=(torch.int32, torch.int64))
    if labels.shape != input_ids.shape:
        raise ValueError(
            f"labels has shape {tuple(labels.shape)} but input_ids has shape {tuple(input_ids.shape)}: expected "
            "labels.shape == input_ids.shape ([R, T], already shifted)"
        )
    rows, seq = labels.shape
    valid = labels != ignore_index  # [R, T]
    offset = 1 if query_at == "input" else 0
    if offset and bool(valid[:, -1].any()):
        raise ValueError(
            "labels[:, -1] holds targets, but with query_at='input' the query of labels[:, t] is position t + 1: "
            "expected labels shifted from input_ids (labels[:, t] = input_ids[:, t + 1], last column ignore_index)"
        )
    chosen = _is_chosen_mask(is_chosen, rows, seq, labels.device)

    if image_token_id is None:
        image_token_id = _config_image_token_id(model)
    image_pos = image_token_positions(input_ids, image_token_id)  # [R, N_p]
    query_pos = (torch.arange(seq, device=labels.device) + offset).clamp_max(seq - 1).expand(rows, seq).contiguous()

    lm = _language_model(model)
    grabbed = {}

    def grab_inputs_embeds(_module, args, kwargs):
        grabbed["inputs_embeds"] = kwargs.get("inputs_embeds")

    kwargs = dict(inputs)
    kwargs.setdefault("use_cache", False)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if "logits_to_keep" in inspect.signature(base.forward).parameters:
        kwargs.setdefault("logits_to_keep", 1)  # the head's [R, T, V] logits are not needed
    handle = lm.register_forward_pre_hook(grab_inputs_embeds, with_kwargs=True)
    try:
        with torch.no_grad(), capture_image_attention(
            model, image_pos, query_positions=query_pos, layers=layers, impl=impl, heads=heads
        ) as cap:
            model(**kwargs)
    finally:
        handle.remove()
    embeds = grabbed.get("inputs_embeds")
    if embeds is None:
        raise ValueError(
            f"{type(lm).__name__} was not called with inputs_embeds=...: cannot read the image features fed to it"
        )
    a = cap.result()  # [R, T, N_p]
    with torch.no_grad():
        dim = embeds.shape[-1]
        u = embeds.gather(1, image_pos.to(embeds.device).unsqueeze(-1).expand(-1, -1, dim))  # [R, N_p, D]
        e = model.get_input_embeddings()(torch.where(valid, labels, torch.zeros_like(labels)))  # [R, T, D]
        w = catpo_token_weights(
            a.float(), e.float(), u.float().to(e.device), chosen, alpha=alpha, lambda_ref=lambda_ref
        )
    return torch.where(valid, w, torch.zeros_like(w))


# --- internals ---


def _config_image_token_id(model) -> int:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    token = getattr(base.config, "image_token_id", None)
    if not isinstance(token, int):
        raise ValueError(
            f"{type(base).__name__}.config has no int image_token_id: pass image_token_id= explicitly"
        )
    return token


def _is_chosen_mask(is_chosen, rows: int, seq: int, device) -> torch.Tensor:
    if is_chosen is None:
        if rows == 0 or rows % 2:
            raise ValueError(
                f"labels has {rows} rows: with is_chosen=None expected an even 2B rows, chosen rows first then "
                "rejected; pass is_chosen= otherwise"
            )
        chosen = torch.arange(rows, device=device) < rows // 2
        return chosen[:, None].expand(rows, seq)
    if isinstance(is_chosen, bool):
        return torch.full((rows, seq), is_chosen, dtype=torch.bool, device=device)
    check_tensor("is_chosen", is_chosen, ndim=(1, 2), dtypes=(torch.bool,))
    if is_chosen.dim() == 1:
        if is_chosen.shape[0] != rows:
            raise ValueError(f"is_chosen has shape {tuple(is_chosen.shape)}: expected ({rows},) or ({rows}, {seq})")
        return is_chosen.to(device)[:, None].expand(rows, seq)
    if tuple(is_chosen.shape) != (rows, seq):
        raise ValueError(f"is_chosen has shape {tuple(is_chosen.shape)}: expected ({rows},) or ({rows}, {seq})")
    return is_chosen.to(device)
