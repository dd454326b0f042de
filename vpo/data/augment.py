"""Pixel-side randomness of the collator: mDPO's seeded crop box and the PIL <-> tensor conversions TPO's noise uses.

Every draw comes from a ``torch.Generator`` seeded by :func:`derive_seed` from ``(seed, record id, draw)``, so a run,
a resumed run and ``vpo mdpo-crops`` agree on each example's crop and noise.
"""
from __future__ import annotations

import hashlib
import math
from typing import Any, Optional, Tuple

import torch


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any parts, stable across processes and Python versions (``hash()`` is not)."""
    h = hashlib.sha256("\x1f".join(repr(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


MDPO_CROP_KEEP = (0.01, 0.2)  # mDPO's code: RandomResizedCrop(scale=(0.01, 0.2)), the fraction of the area kept


def crop_box(record_id: str, width: int, height: int, *, seed: int = 0, max_frac: Optional[float] = None,
             draw: int = 0, keep: Tuple[float, float] = MDPO_CROP_KEEP) -> Tuple[int, int, int, int]:
    """mDPO's random crop: ``(left, top, right, bottom)`` pixels (end-exclusive) of a ``width x height`` image.

    The kept fraction of the area ``a ~ U(keep)`` (default 1-20%, mDPO's ``RandomResizedCrop(scale=(0.01, 0.2))``)
    and two uniforms for the position come from a generator seeded with ``(seed, record id, draw)``; the box keeps
    the aspect ratio with sides ``ceil(W·√a)``, ``ceil(H·√a)`` (so it keeps at least ``a``) at a uniform position.
    With ``max_frac`` set, the older crop: ``a = 1 - f``, ``f ~ U(0, max_frac)`` (removes at most ``f``).
    :meth:`PreferenceCollator.crop_box` and :func:`vpo.construct.mdpo_crop_box` are this function.
    """
    g = torch.Generator().manual_seed(derive_seed("vpo-mdpo-crop", seed, str(record_id), draw))
    u = torch.rand(3, generator=g, dtype=torch.float64).tolist()
    if max_frac is None:  # the kept fraction a ~ U(keep); side scale sqrt(a), area kept >= a after rounding up
        keep = math.sqrt(keep[0] + u[0] * (keep[1] - keep[0]))
    else:  # the older crop: removes f ~ U(0, max_frac)
        keep = math.sqrt(1.0 - u[0] * max_frac)  # side scale; area kept >= 1 - f after rounding up
    cw = min(width, max(1, math.ceil(width * keep - 1e-9)))
    ch = min(height, max(1, math.ceil(height * keep - 1e-9)))
    left = min(int(u[1] * (width - cw + 1)), width - cw)
    top = min(int(u[2] * (height - ch + 1)), height - ch)
    return left, top, left + cw, top + ch


def _to_unit_tensor(image) -> torch.Tensor:
    """A PIL image -> ``[3, H, W]`` float32 in ``[0, 1]``."""
    import numpy as np

    arr = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).to(torch.float32).div_(255.0)


def _to_pil(x: torch.Tensor):
    """``[3, H, W]`` in ``[0, 1]`` -> an 8-bit RGB PIL image (round to nearest)."""
    from PIL import Image

    arr = x.clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    return Image.fromarray(arr)


def _bicubic():
    from PIL import Image

    return Image.Resampling.BICUBIC
