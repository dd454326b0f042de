"""Synthetic preference data for the tiny models: random records and a collator that builds the batch contract.

The tiny models (:mod:`vpo.models.tiny`) have no tokenizer or image processor, so this module stands in for the data
pipeline when the trainer runs on them (``data_path: synthetic[:N]``, the tests, the CPU demo). It produces exactly
the batch contract the real collator produces (``docs/data_format.md``):

- ``input_ids``, ``attention_mask``, ``labels`` ``[2B, L]`` (rows ``0..B-1`` chosen, ``B..2B-1`` rejected; labels
  unshifted, -100 except on response tokens), right-padded, plus the family's vision keys;
- ``sub``: ``noised`` (TPO), ``crop`` (mDPO), ``noimg`` and ``negimg`` (OViP), ``list`` (LPOI, B·L rows,
  example-major, x_1 the original), each a complete model-input dict with its own labels;
- ``ids`` (one per pair), ``skipped`` (``{reason: count}`` of the records left out), and for Cat-PO optionally
  ``token_weights`` ``[2B, L]``.

Row layout: ``[2 text tokens] [image block] [prompt] [response]``; the image block is the ``N_p`` image placeholders
(between vision start/end for Qwen-VL). Images are random ``[0, 1]`` tensors in the family's ``pixel_values`` layout,
drawn from the record's ``image_seed``; "crops", "negatives" and "list" images are deterministic transforms of it.
"""
from __future__ import annotations

from collections import Counter
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from vpo.noise import add_diffusion_noise

_PREFIX = (1, 2)


def synthetic_records(n: int, tiny, *, seed: int = 0, prompt_len=(3, 5), response_len=(2, 5),
                      bad: Sequence[int] = (), prefix: str = "syn") -> List[Dict]:
    """``n`` random preference records for ``tiny`` (a :class:`vpo.models.TinyVLM`), ids ``<prefix>-<i>``; the
    indices in ``bad`` get an empty rejected response (a malformed record the collator skips)."""
    g = torch.Generator().manual_seed(seed)
    hi = tiny.vocab_size - 8

    def tokens(lo_hi):
        length = int(torch.randint(lo_hi[0], lo_hi[1] + 1, (1,), generator=g))
        return torch.randint(3, hi, (length,), generator=g).tolist()

    records = []
    for i in range(n):
        record = {"id": f"{prefix}-{i}", "prompt": tokens(prompt_len), "chosen": tokens(response_len),
                  "rejected": tokens(response_len), "image_seed": seed * 100003 + i}
        if i in bad:
            record["rejected"] = []
        records.append(record)
    return records


class TinyPreferenceCollator:
    """Collate synthetic records (:func:`synthetic_records`) into the preference batch contract for a tiny model.

    Args:
        tiny: the :class:`vpo.models.TinyVLM`.
        method: which sub-batches to build (``dpo``/``csr``/``catpo``: none; ``tpo``: noised; ``mdpo``: crop; ``ovip``:
            noimg + negimg; ``lpoi``: list).
        list_size: LPOI's L. noise_step: TPO's k. crop_frac: mDPO's largest removed fraction.
        fixed_noise: one fixed noise ε (and crop) per example, from its ``image_seed``; otherwise a fresh one per
            call, from ``(image_seed, draw)`` where ``draw`` counts the collator's calls (like
            :class:`vpo.data.PreferenceCollator`: the trainer restarts the counter where a resumed run left it, so
            the global RNG plays no part and resuming is exact).
        token_weights: add random Cat-PO ``token_weights`` (otherwise the trainer computes them from the reference).
        ovip_rejected: give the OViP sub-batches 2B rows (chosen, then rejected: the symmetric variant) instead of B.
    """

    def __init__(self, tiny, method: str = "dpo", *, list_size: int = 5, noise_step: int = 500,
                 crop_frac: float = 0.2, fixed_noise: bool = True, token_weights: bool = False,
                 ovip_rejected: bool = False):
        self.tiny = tiny
        self.method = method
        self.list_size = list_size
        self.noise_step = noise_step
        self.crop_frac = crop_frac
        self.fixed_noise = fixed_noise
        self.token_weights = token_weights
        self.ovip_rejected = ovip_rejected
        self.is_qwen = tiny.arch in ("qwen2_vl", "qwen2_5_vl")
        self.draw = 0
        self._draw = 0

    # -- images ---------------------------------------------------------------------------------------------------

    def image(self, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        if self.is_qwen:
            t, h, w = self.tiny.extra["grid_thw"]
            return torch.rand(t * h * w, self.tiny.extra["patch_dim"], generator=g)
        return torch.rand(*self.tiny.extra["pixel_shape"], generator=g)

    def _generator(self, seed: int, salt: int) -> torch.Generator:
        if self.fixed_noise:
            return torch.Generator().manual_seed(seed * 7 + salt)
        return torch.Generator().manual_seed(((seed * 7 + salt) * 1_000_003 + self._draw) % 2 ** 63)

    def noised(self, image: torch.Tensor, seed: int) -> torch.Tensor:
        eps = torch.randn(image.shape, generator=self._generator(seed, 1))
        return add_diffusion_noise(image, self.noise_step, noise=eps, clamp=False)

    def cropped(self, image: torch.Tensor, seed: int) -> torch.Tensor:
        frac = float(torch.rand((), generator=self._generator(seed, 2))) * self.crop_frac
        if self.is_qwen:  # flattened patches: drop (zero) a leading fraction of them
            out = image.clone()
            out[: int(frac * image.shape[0])] = 0
            return out
        size = image.shape[-1]
        keep = max(1, int(round(size * (1 - frac) ** 0.5)))
        lead = image.reshape(-1, *image.shape[-3:])[:, :, :keep, :keep]  # [n, 3, keep, keep]
        resized = F.interpolate(lead, size=(size, size), mode="bilinear", align_corners=False)
        return resized.reshape(image.shape)

    def masked(self, image: torch.Tensor, frac: float) -> torch.Tensor:
        out = image.clone()
        if self.is_qwen:
            out[: int(round(frac * image.shape[0]))] = 0
        else:
            out[..., : int(round(frac * image.shape[-1]))] = 0
        return out

    # -- rows -----------------------------------------------------------------------------------------------------

    def _image_block(self) -> List[int]:
        n_p, tid = self.tiny.num_image_tokens, self.tiny.image_token_id
        if self.is_qwen:
            return [self.tiny.extra["vision_start_token_id"]] + [tid] * n_p + [self.tiny.extra["vision_end_token_id"]]
        return [tid] * n_p

    def encode(self, rows: List[tuple]) -> Dict[str, torch.Tensor]:
        """``rows``: ``(prompt, response, image or None)``; one image per row or none at all."""
        ids_list, labels_list = [], []
        with_image = rows[0][2] is not None
        for prompt, response, image in rows:
            if (image is not None) != with_image:
                raise ValueError("every row of a pass has an image, or none has")
            head = list(_PREFIX) + (self._image_block() if with_image else []) + list(prompt)
            ids_list.append(head + list(response))
            labels_list.append([-100] * len(head) + list(response))
        length = max(len(x) for x in ids_list)
        R = len(rows)
        input_ids = torch.full((R, length), self.tiny.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros(R, length, dtype=torch.long)
        labels = torch.full((R, length), -100, dtype=torch.long)
        for r, (ids, lab) in enumerate(zip(ids_list, labels_list)):
            input_ids[r, : len(ids)] = torch.tensor(ids)
            attention_mask[r, : len(ids)] = 1
            labels[r, : len(lab)] = torch.tensor(lab)
        out = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if self.is_qwen:
            out["mm_token_type_ids"] = (input_ids == self.tiny.image_token_id).long()
        if with_image:
            images = [image for _, _, image in rows]
            if self.is_qwen:
                out["pixel_values"] = torch.cat(images)
                out["image_grid_thw"] = torch.tensor([list(self.tiny.extra["grid_thw"])] * R, dtype=torch.long)
            else:
                out["pixel_values"] = torch.stack(images)
                if self.tiny.arch == "idefics2":
                    n, _, s, _ = images[0].shape
                    out["pixel_attention_mask"] = torch.ones(R, n, s, s, dtype=torch.bool)
        return out

    @staticmethod
    def problem(record: Dict) -> Optional[str]:
        """Why a record cannot be used, or None."""
        if record.get("bad"):
            return str(record["bad"])
        for key in ("prompt", "chosen", "rejected"):
            if not isinstance(record.get(key), (list, tuple)):
                return f"missing_{key}"
        if not record["chosen"] or not record["rejected"]:
            return "empty_response"
        return None

    def __call__(self, records: List[Dict]) -> Dict:
        self._draw = self.draw
        self.draw += 1
        good, skipped = [], Counter()
        for record in records:
            reason = self.problem(record)
            if reason is None:
                good.append(record)
            else:
                skipped[reason] += 1
        if not good:
            empty = torch.zeros(0, 1, dtype=torch.long)
            return {"input_ids": empty, "attention_mask": empty, "labels": empty, "ids": [], "sub": {},
                    "skipped": dict(skipped)}
        images = [self.image(r["image_seed"]) for r in good]
        pairs = list(zip(good, images))
        chosen_rows = [(r["prompt"], r["chosen"], img) for r, img in pairs]
        rejected_rows = [(r["prompt"], r["rejected"], img) for r, img in pairs]
        batch = self.encode(chosen_rows + rejected_rows)
        batch["ids"] = [r["id"] for r in good]
        batch["skipped"] = dict(skipped)
        sub = {}
        m = self.method
        if m == "tpo":
            noised = [self.noised(img, r["image_seed"]) for r, img in pairs]
            sub["noised"] = self.encode([(r["prompt"], r["chosen"], v) for (r, _), v in zip(pairs, noised)]
                                        + [(r["prompt"], r["rejected"], v) for (r, _), v in zip(pairs, noised)])
        elif m == "mdpo":
            sub["crop"] = self.encode([(r["prompt"], r["chosen"], self.cropped(img, r["image_seed"]))
                                       for r, img in pairs])
        elif m == "ovip":
            roles = ("chosen", "rejected") if self.ovip_rejected else ("chosen",)
            sub["noimg"] = self.encode([(r["prompt"], r[k], None) for k in roles for r, _ in pairs])
            sub["negimg"] = self.encode([(r["prompt"], r[k], self.image(r["image_seed"] + 7919))
                                         for k in roles for r, _ in pairs])
        elif m == "lpoi":
            L = self.list_size
            # x_k masks (k-1)/(L-1) of an "object box" covering 3/4 of the image (a fully black image would be
            # dropped as padding by Idefics2).
            sub["list"] = self.encode([(r["prompt"], r["chosen"], self.masked(img, 0.75 * k / (L - 1)))
                                       for r, img in pairs for k in range(L)])
        batch["sub"] = sub
        if m == "catpo" and self.token_weights:
            g = torch.Generator().manual_seed(sum(r["image_seed"] for r in good))
            w = 0.5 + torch.rand(batch["labels"].shape, generator=g)
            batch["token_weights"] = torch.where(batch["labels"] != -100, w, torch.zeros_like(w))
        return batch
