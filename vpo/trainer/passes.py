"""The forward passes of one preference batch: last hidden states of the policy and of the reference, shifted.

A batch (the collator's contract, ``docs/data_format.md``) holds the main pass (``input_ids``/``attention_mask``/
``labels`` ``[2B, L]`` + the family's vision keys; chosen rows first) and, under ``batch["sub"]``, each extra pass a
method needs as a complete model-input dict. :class:`Passes` runs each pass at most once per model, on demand, and
hands out what the fused losses take:

- ``hidden(name)``: ``[R, T, D]`` the policy's last hidden states (post final norm), ``hidden[:, :-1]`` cut to the
  pass's label window (``window(name)``: the columns where some row has a target; T ≤ L-1);
- ``labels(name)``: ``[R, T]`` the labels shifted to match, ``labels[:, 1:]`` (HF labels are unshifted), same window;
- ``ref_hidden(name)``: the same for the reference (no grad), or None when the reference terms are precomputed;
- ``logps(name)`` / ``ref_logps(name)``: ``[R]`` per-sequence ``Σ logp`` through :func:`vpo.linear_logprobs` (never
  ``[tokens × vocab]`` logits), or the precomputed reference values.

How a pass is run (:func:`forward_hidden`): the model's own ``forward`` is called — through DDP, accelerate's
autocast and peft, so gradient synchronisation and mixed precision work as for any Trainer model — with
``logits_to_keep=1`` (the LM head is applied to ONE position, ``[R, 1, V]``, negligible) while a forward hook on the
backbone
(``model.model``) captures its post-norm ``last_hidden_state``. Calling ``model.model(...)`` directly would skip
``DistributedDataParallel.forward``, which is what arms the gradient all-reduce: ranks would silently diverge.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

from vpo.distributed import unshard_head
from vpo.ops.linear_logprobs import linear_logprobs
from vpo.ops.segment_sum import sequence_sum
from vpo.trainer.modeling import backbone, head_kwargs, head_transform, lm_head, model_type_of, unwrap_model

IGNORE_INDEX = -100
# Batch keys that are not model inputs.
NON_MODEL_KEYS = frozenset({"labels", "ref_logps", "token_weights", "ids", "skipped", "sub"})
MAIN = "main"
# Model inputs indexed by token like input_ids: ``[R, L, ...]``.
PER_TOKEN_INPUTS = ("attention_mask", "token_type_ids", "mm_token_type_ids", "cross_attention_mask")


def check_model_inputs(model, inputs: Dict[str, torch.Tensor]) -> None:
    """Every per-token input (:data:`PER_TOKEN_INPUTS`) has ``input_ids``'s ``[R, L]`` as its leading dims; else a
    ValueError naming the input and the architecture (instead of a tensor-size error deep in the model)."""
    ids = inputs.get("input_ids")
    if not isinstance(ids, torch.Tensor):
        return
    for key in PER_TOKEN_INPUTS:
        t = inputs.get(key)
        if isinstance(t, torch.Tensor) and tuple(t.shape[:2]) != tuple(ids.shape):
            raise ValueError(f"{model_type_of(model)}: model input {key} has shape {tuple(t.shape)} but input_ids has "
                             f"shape {tuple(ids.shape)}: expected {key}.shape[:2] == input_ids.shape")


def forward_hidden(model, inputs: Dict[str, torch.Tensor]) -> torch.Tensor:
    """``[R, L, D]`` post-norm last hidden states of ``model`` on ``inputs`` (module docstring: how)."""
    check_model_inputs(model, inputs)
    captured = {}

    def grab(_module, _args, output):
        captured["h"] = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]

    handle = backbone(model).register_forward_hook(grab)
    try:
        model(**inputs, use_cache=False, logits_to_keep=1)
    finally:
        handle.remove()
    if "h" not in captured:
        raise RuntimeError(f"the backbone of {type(unwrap_model(model)).__name__} did not run during the forward")
    return captured["h"]


def model_inputs(pass_batch: Dict) -> Dict[str, torch.Tensor]:
    """The model's forward kwargs of one pass (everything but labels and bookkeeping keys)."""
    return {k: v for k, v in pass_batch.items() if k not in NON_MODEL_KEYS}


def shift_labels_full(labels: torch.Tensor) -> torch.Tensor:
    """``[R, L]`` HF labels -> ``[R, L]`` with ``out[:, t] = labels[:, t + 1]`` and ``IGNORE_INDEX`` last (the
    convention of :func:`vpo.integrations.catpo_weights_for_batch`)."""
    return torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE_INDEX)], dim=1)


def select_rows(inputs: Dict, keep: torch.Tensor, *, merge_size: int = 2, image_token_id: Optional[int] = None):
    """The rows ``keep`` (int64 ``[K]``, ascending) of a model-input dict, vision keys included.

    Row-indexed tensors (first dim = rows) are indexed; Qwen-VL's flattened ``pixel_values`` ``[Σ patches, dim]`` and
    ``image_grid_thw`` ``[images, 3]`` are regrouped by image, each row owning the images whose placeholder tokens it
    holds (``mm_token_type_ids == 1``, or ``input_ids == image_token_id``), ``t h w / merge_size²`` tokens per image.
    """
    rows = inputs["input_ids"].shape[0]
    out = {}
    grid = inputs.get("image_grid_thw")
    keep_list = keep.tolist()
    if grid is not None:
        if "mm_token_type_ids" in inputs:
            per_row_tokens = (inputs["mm_token_type_ids"] == 1).sum(1).tolist()
        elif image_token_id is not None:
            per_row_tokens = (inputs["input_ids"] == image_token_id).sum(1).tolist()
        else:
            raise ValueError("selecting rows of a Qwen-VL pass needs mm_token_type_ids or image_token_id")
        patches = grid.prod(-1).tolist()  # [images]
        tokens = [p // (merge_size * merge_size) for p in patches]
        image_rows, img = [], 0
        for r, need in enumerate(per_row_tokens):
            while need > 0:
                if img >= len(tokens):
                    raise ValueError("image_grid_thw holds fewer images than the rows' image tokens need")
                image_rows.append(r)
                need -= tokens[img]
                img += 1
        starts = [0]
        for p in patches:
            starts.append(starts[-1] + p)
        kept = set(keep_list)
        images = [i for i, r in enumerate(image_rows) if r in kept]
        out["image_grid_thw"] = grid[images]
        if "pixel_values" in inputs:
            pv = inputs["pixel_values"]
            parts = [pv[starts[i]:starts[i + 1]] for i in images]
            out["pixel_values"] = torch.cat(parts) if parts else pv[:0]
    for k, v in inputs.items():
        if k in out or k in ("pixel_values", "image_grid_thw") and grid is not None:
            continue
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == rows:
            out[k] = v[keep.to(v.device)]
        elif isinstance(v, (list, tuple)) and len(v) == rows:
            out[k] = type(v)(v[i] for i in keep_list)
        else:
            out[k] = v
    return out


class Passes:
    """The passes of one batch, run lazily and cached (module docstring).

    Args:
        batch: the collated batch (on the device).
        policy: the model to train, as the Trainer hands it to ``compute_loss`` (possibly DDP-wrapped).
        reference: a :class:`vpo.trainer.reference.Reference`.
        list_size: LPOI's L (to drop the list's x_1 rows, which the main pass already scores).
        need_grad: False for evaluation.
    """

    def __init__(self, batch: Dict, policy, reference, *, list_size: int = 5, need_grad: bool = True,
                 impl: str = "auto"):
        self.batch = batch
        self.policy = policy
        self.reference = reference
        self.list_size = list_size
        self.need_grad = need_grad
        self.impl = impl
        self.rows = int(batch["input_ids"].shape[0])
        if self.rows % 2:
            raise ValueError(f"input_ids has {self.rows} rows: expected 2B (B chosen rows, then B rejected)")
        self.B = self.rows // 2
        # FSDP2: the sharded head gathered once for the batch, its gradient reduced as FSDP's (vpo.distributed)
        self.weight, self.bias = unshard_head(*lm_head(policy))
        self.ref_weight, self.ref_bias = reference.head()
        self._ref_dtype = (self.weight if self.ref_weight is None else self.ref_weight).dtype
        self._inputs: Dict[str, Dict] = {}
        self._hidden: Dict[str, torch.Tensor] = {}
        self._ref_hidden: Dict[str, torch.Tensor] = {}
        self._token_weights: Optional[torch.Tensor] = None
        self._windows: Dict[str, slice] = {}
        config = unwrap_model(policy).config
        vision = getattr(config, "vision_config", None)
        self._merge = int(getattr(vision, "spatial_merge_size", 2) or 2)
        self._image_token_id = getattr(config, "image_token_id", None)
        # soft-capping / logit scale of the model's head (vpo.trainer.modeling.head_transform)
        self.transform = head_transform(policy)
        self.model_type = model_type_of(policy)

    def head_kw(self, fn) -> dict:
        """``logit_softcap`` / ``logit_scale`` keywords of ``fn`` for this model's head (empty for a plain head)."""
        return head_kwargs(fn, self.transform, self.model_type)

    # -- inputs ---------------------------------------------------------------------------------------------------

    def has(self, name: str) -> bool:
        return name == MAIN or name in (self.batch.get("sub") or {})

    def pass_batch(self, name: str = MAIN) -> Dict:
        """The full dict of one pass (labels and all); LPOI's list without its x_1 rows."""
        if name in self._inputs:
            return self._inputs[name]
        if name == MAIN:
            out = self.batch
        else:
            subs = self.batch.get("sub") or {}
            if name not in subs:
                raise ValueError(f"the batch has no sub-batch {name!r} (batch['sub'] holds {sorted(subs)}): the "
                                 f"collator must be built for this method")
            out = subs[name]
            if name == "list":
                out = self._list_without_originals(out)
        self._inputs[name] = out
        return out

    def _list_without_originals(self, sub: Dict) -> Dict:
        rows, B, L = int(sub["input_ids"].shape[0]), self.B, self.list_size
        if rows == B * (L - 1):
            return sub
        if rows != B * L:
            raise ValueError(f"sub['list'] has {rows} rows: expected B·L = {B}·{L} (example-major, x_1 = original "
                             f"first) or B·(L-1) = {B * (L - 1)} (without x_1)")
        keep = torch.arange(rows, device=sub["input_ids"].device).reshape(B, L)[:, 1:].reshape(-1)
        return select_rows(sub, keep, merge_size=self._merge, image_token_id=self._image_token_id)

    def window(self, name: str = MAIN) -> slice:
        """The columns ``[t0, t1)`` of the shifted pass that hold any target (in any row); everything outside (image
        tokens, the prompt, trailing padding) is cut off before the LM head, so the fused losses' GEMMs sweep only
        ``R·(t1 − t0)`` positions instead of ``R·(L−1)``. One small host read per pass (the losses themselves never
        sync); a pass without any target keeps all its columns."""
        if name not in self._windows:
            labels = self.pass_batch(name).get("labels")
            if labels is None:
                raise ValueError(f"pass {name!r} has no labels")
            cols = (labels[:, 1:] != IGNORE_INDEX).any(0)  # [L-1]
            n = cols.numel()
            idx = torch.arange(n, device=cols.device)
            first = torch.where(cols, idx, n).min()
            last = torch.where(cols, idx, -1).max()
            t0, t1 = torch.stack([first, last]).tolist()  # the one host read
            self._windows[name] = slice(t0, t1 + 1) if t1 >= t0 else slice(0, n)
        return self._windows[name]

    def labels(self, name: str = MAIN) -> torch.Tensor:
        """``[R, T]`` labels aligned with :meth:`hidden`: ``labels[:, 1:]`` cut to :meth:`window`."""
        labels = self.pass_batch(name).get("labels")
        if labels is None:
            raise ValueError(f"pass {name!r} has no labels")
        return labels[:, 1:][:, self.window(name)]

    # -- policy ---------------------------------------------------------------------------------------------------

    def hidden(self, name: str = MAIN, *, grad: bool = True) -> torch.Tensor:
        """``[R, T, D]`` the policy's last hidden states on pass ``name`` (under no_grad when ``grad`` is False)."""
        if name not in self._hidden:
            with torch.set_grad_enabled(self.need_grad and grad and torch.is_grad_enabled()):
                h = forward_hidden(self.policy, model_inputs(self.pass_batch(name)))
            # autocast may hand back another dtype
            self._hidden[name] = h[:, :-1][:, self.window(name)].to(self.weight.dtype)
        return self._hidden[name]

    def logps(self, name: str = MAIN) -> torch.Tensor:
        """``[R]`` the policy's per-sequence ``Σ_t logp(y_t)`` on pass ``name``."""
        logp, _ = linear_logprobs(self.hidden(name), self.weight, self.labels(name), self.bias, impl=self.impl,
                                  **self.head_kw(linear_logprobs))
        return sequence_sum(logp)

    # -- reference ------------------------------------------------------------------------------------------------

    @property
    def precomputed(self) -> bool:
        return self.reference.mode == "precomputed"

    def ref_hidden(self, name: str = MAIN) -> Optional[torch.Tensor]:
        """``[R, T, D]`` the reference's last hidden states (no grad), or None when precomputed."""
        if self.precomputed:
            return None
        if name not in self._ref_hidden:
            h = self.reference.hidden(self.policy, model_inputs(self.pass_batch(name)))
            self._ref_hidden[name] = h[:, :-1][:, self.window(name)].to(self._ref_dtype)
        return self._ref_hidden[name]

    def ref_logps(self, name: str = MAIN) -> torch.Tensor:
        """``[R]`` the reference's per-sequence ``Σ_t logp_ref(y_t)`` (the method's stored term when precomputed)."""
        if self.precomputed:
            return self.ref_terms(name)
        with torch.no_grad():
            w = self.weight.detach() if self.ref_weight is None else self.ref_weight
            b = (None if self.bias is None else self.bias.detach()) if self.ref_weight is None else self.ref_bias
            logp, _ = linear_logprobs(self.ref_hidden(name), w, self.labels(name), b, impl=self.impl,
                                      **self.head_kw(linear_logprobs))
            return sequence_sum(logp)

    def ref_terms(self, name: str = MAIN) -> torch.Tensor:
        """The precomputed reference terms of pass ``name``: ``batch["ref_logps"]`` (main) or
        ``batch["sub"][name]["ref_logps"]``, else the reference table looked up by ``batch["ids"]``."""
        given = self.pass_batch(name).get("ref_logps")
        if given is None:
            given = self.reference.lookup(self.batch.get("ids"), name, rows=self.pass_rows(name), pairs=self.B)
        return given.to(self.weight.device, torch.float32).detach()

    def pass_rows(self, name: str) -> int:
        return int(self.pass_batch(name)["input_ids"].shape[0])

    # -- Cat-PO ---------------------------------------------------------------------------------------------------

    def token_weights(self, *, alpha: float, lambda_ref: float, layers=None, heads=None,
                      source: str = "reference") -> torch.Tensor:
        """``[2B, T]`` Cat-PO token weights aligned with :meth:`labels`.

        ``source="batch"``: ``batch["token_weights"]`` (aligned with the unshifted labels; the data's precomputed
        weights). ``source="reference"`` (docs/methods.md): the precomputed reference table's, when it holds weights,
        else computed from the reference model with :func:`vpo.integrations.catpo_weights_for_batch` (whose forward also
        yields the reference's hidden states, so the reference runs once).
        """
        if self._token_weights is not None:
            return self._token_weights
        labels = self.labels(MAIN)
        if source == "batch":
            if self.batch.get("token_weights") is None:
                raise ValueError("catpo_token_weights='batch' but the batch has no token_weights")
            w = self.batch["token_weights"][:, 1:][:, self.window(MAIN)]
        elif source != "reference":
            raise ValueError(f"source must be 'reference' or 'batch', got {source!r}")
        elif self.reference.has_table_weights():
            w = self.reference.lookup_weights(self.batch.get("ids"), labels)
        else:
            full = shift_labels_full(self.batch["labels"])
            w, h = self.reference.catpo_weights(self.policy, model_inputs(self.batch), full, alpha=alpha,
                                                lambda_ref=lambda_ref, layers=layers, heads=heads)
            w = w[:, :-1][:, self.window(MAIN)]
            if h is not None and MAIN not in self._ref_hidden and not self.precomputed:
                self._ref_hidden[MAIN] = h[:, :-1][:, self.window(MAIN)].to(self._ref_dtype)
        self._token_weights = w.to(self.weight.device, torch.float32).detach()
        return self._token_weights
