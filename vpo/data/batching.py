"""The preference batch's tensors (the contract of ``docs/data_format.md``): the keys a model's forward takes, and
the padding of prepared rows into a batch dict for :class:`vpo.data.PreferenceCollator`.

:class:`BatchAssembly` is the collator's base (as :class:`~vpo.data.encoding.ChatEncoding` is): it reads
``self.method``, ``self.family``, ``self.processor``, ``self.ovip_rejected``, ``self.pad_token_id``,
``self.image_token_id``, ``self.video_token_id`` and ``self._type_keys``, which the collator sets up.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

from vpo.data.encoding import (GENERIC, PER_TOKEN_VISION_KEYS, RESPONSE_TOKEN_TYPE, _cat_vision, architecture_of,
                               extend_per_token)

IGNORE_INDEX = -100

# The keys a model's forward takes, per family (labels excluded: the trainer computes log-probs itself).
VISION_KEYS = {
    "llava": ("pixel_values",),
    "qwen2_vl": ("pixel_values", "image_grid_thw", "mm_token_type_ids"),
    "qwen2_5_vl": ("pixel_values", "image_grid_thw", "mm_token_type_ids"),
    "idefics2": ("pixel_values", "pixel_attention_mask"),
}
MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids",
                    "pixel_attention_mask", "token_type_ids", "image_sizes")


def model_inputs(inputs: Mapping[str, Any]) -> Dict[str, Any]:
    """The keyword arguments of the model's ``forward`` in a batch or sub-batch (drops ``labels``, ``sub``, ...)."""
    return {k: v for k, v in inputs.items() if k in MODEL_INPUT_KEYS}


@dataclass
class _Row:
    ids: List[int]
    labels: List[int]
    vision: Optional[Dict[str, torch.Tensor]]  # the processor's vision tensors for this row's one image


@dataclass
class _Example:
    id: str
    chosen: _Row
    rejected: _Row
    n_chosen: int  # response tokens kept (after truncation) in each row
    n_rejected: int
    sub: Dict[str, List[_Row]] = field(default_factory=dict)
    token_weights: Optional[Tuple[List[float], List[float]]] = None
    ref_logps: Optional[Tuple[float, float]] = None


class BatchAssembly:
    """How prepared examples become the batch dict: right-padded rows, the vision keys, the sub-batches (module
    docstring)."""

    def _assemble(self, examples: List[_Example], skipped: Dict[str, int]) -> Dict[str, Any]:
        rows = [ex.chosen for ex in examples] + [ex.rejected for ex in examples]
        batch = self._model_dict(rows)
        if self.method == "catpo":
            tw = torch.ones(batch["labels"].shape, dtype=torch.float32)
            for b, ex in enumerate(examples):
                if ex.token_weights is None:
                    continue
                for r, w in ((b, ex.token_weights[0]), (b + len(examples), ex.token_weights[1])):
                    pos = (batch["labels"][r] != IGNORE_INDEX).nonzero().flatten()
                    tw[r, pos] = torch.tensor(w, dtype=torch.float32)
            batch["token_weights"] = tw
        sub_names = {"tpo": ("noised",), "mdpo": ("crop",), "ovip": ("noimg", "negimg"), "lpoi": ("list",)}
        batch["sub"] = {}
        for name in sub_names.get(self.method, ()):
            if name == "noised" or (name in ("noimg", "negimg") and self.ovip_rejected):
                # 2B rows like the main ones: all chosen rows, then all rejected rows
                sub_rows = [ex.sub[name][0] for ex in examples] + [ex.sub[name][1] for ex in examples]
            else:  # example-major: B rows (crop, noimg, negimg) or B * list_size rows (list)
                sub_rows = [row for ex in examples for row in ex.sub[name]]
            batch["sub"][name] = self._model_dict(sub_rows)
        if all(ex.ref_logps is not None for ex in examples):
            batch["ref_logps"] = torch.tensor(
                [ex.ref_logps[0] for ex in examples] + [ex.ref_logps[1] for ex in examples], dtype=torch.float32
            )
        batch["ids"] = [ex.id for ex in examples]
        batch["skipped"] = skipped
        return batch

    def _model_dict(self, rows: List[_Row]) -> Dict[str, torch.Tensor]:
        n, length = len(rows), max(len(r.ids) for r in rows)
        input_ids = torch.full((n, length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((n, length), dtype=torch.long)
        labels = torch.full((n, length), IGNORE_INDEX, dtype=torch.long)
        for i, r in enumerate(rows):  # right padding
            input_ids[i, : len(r.ids)] = torch.tensor(r.ids, dtype=torch.long)
            attention_mask[i, : len(r.ids)] = 1
            labels[i, : len(r.labels)] = torch.tensor(r.labels, dtype=torch.long)
        out = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        visions = [r.vision for r in rows]
        if all(v is None for v in visions):
            return out  # the image-free pass: no vision keys at all
        if any(v is None for v in visions):
            raise RuntimeError("a sub-batch mixes rows with and without an image")
        arch = architecture_of(self.processor)
        if self.family == GENERIC:
            response_types = RESPONSE_TOKEN_TYPE.get(arch, {})
            for key in self._type_keys:
                # the prompt's types from the processor; the response's (and the padding's) from RESPONSE_TOKEN_TYPE
                types = torch.full((n, length), response_types.get(key, 0), dtype=torch.long)
                for i, v in enumerate(visions):
                    t = v.get(key)
                    if t is not None:
                        types[i, : t.shape[-1]] = t[0]
                out[key] = types
            visions = [{k: t for k, t in v.items() if k not in self._type_keys} for v in visions]
            visions = [{k: extend_per_token(t, len(r.ids), length) if k in PER_TOKEN_VISION_KEYS else t
                        for k, t in v.items()} for v, r in zip(visions, rows)]
        out.update(_cat_vision(visions, arch))
        for key in (*PER_TOKEN_VISION_KEYS, *self._type_keys):
            t = out.get(key)
            if t is not None and tuple(t.shape[:2]) != (n, length):
                raise ValueError(f"{arch}: {key} has shape {tuple(t.shape)} but input_ids has shape {(n, length)}: "
                                 f"expected {key}.shape[:2] == input_ids.shape")
        if "mm_token_type_ids" in VISION_KEYS.get(self.family, ()):
            mm = (input_ids == self.image_token_id).long()
            if self.video_token_id is not None:
                mm = mm + 2 * (input_ids == self.video_token_id).long()
            out["mm_token_type_ids"] = mm * attention_mask
        return out
