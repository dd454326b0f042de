"""TPO's corrupted image: the DDPM forward-noise schedule (docs/methods.md, TPO step 1).

The schedule is the one TPO's appendix gives (written as in visual contrastive decoding; the paper's ξ is β here and its
ξ̄ is ᾱ)::

    β_t = sigmoid(linspace(-6, 6, 1000))_t · (5e-3 - 1e-5) + 1e-5        t = 0, …, 999
    ᾱ_k = Π_{t=0}^{k} (1 - β_t)                                           k = 0, …, 999
    v_c = sqrt(ᾱ_k) · v + sqrt(1 - ᾱ_k) · ε,   ε ~ N(0, I)

Indexing convention: ``t`` and ``k`` are 0-based and the product includes ``t = k`` (``ᾱ = cumprod(1 - β)[k]``, as the
VCD/POVID code indexes ``alphas_cumprod[noise_step]``). It is the one that reproduces the documented ``ᾱ_500 ≈ 0.7448``:

=====================================  ==========
convention                             ᾱ_500
=====================================  ==========
0-based, t ≤ k (this module)           0.744799
0-based, t < k  (= 1-based, t ≤ k)     0.746675
1-based, t < k                         0.748544
=====================================  ==========

so ``step`` ranges over ``[0, 999]``; ``step = 0`` already applies one step of noise (ᾱ_0 = 1 - β_0 ≈ 0.99998).

Where to apply it: TPO and POVID noise the image in PIXEL space (a ``[0, 1]`` tensor, then the processor resizes and
normalizes it) — the default here. docs/methods.md's other options (the normalized ``pixel_values``, or the projected
image features) are the same call with ``clip="none"``, which also skips the ``[0, 1]`` value check.

Back to ``[0, 1]`` (``clip``): the noised values leave the range (at step 500, ``0.505 ε`` spreads a white pixel
from about 0.35 to 1.4).

- ``"clamp"`` (the default): ``min(max(v, 0), 1)``. This is the formula read as an image: a pixel cannot be brighter
  than white, so the corruption is the DDPM forward process seen through a valid image. It is the milder of the two
  (a white background stays mostly white), and it is what every earlier result of this package used.
- ``"wrap"``: TPO's official code turns the noised tensor back into an image with ``mul(255).byte()``: the value is
  scaled to 0-255, truncated toward zero and cast to uint8, which keeps it modulo 256 — ``1.1 -> 280 -> 24`` (a
  bright pixel turns nearly black) and ``-0.1 -> -25 -> 231``. Here: ``(trunc(255 v) mod 256) / 255``. The corruption
  is much stronger (salt-and-pepper flips over the whole white background), so TPO's noised branch sees less of the
  image and its ``s`` (the log-ratio of clean vs noised) grows. Use it to reproduce the official code.
- ``"none"``: no clipping (features, normalized pixels).

The default stays ``"clamp"`` because the wrap is an artefact of a dtype cast, not part of the method the paper
describes, and because it keeps results comparable with earlier runs; ``"wrap"`` is one argument away.
"""
from __future__ import annotations

import math
import operator
from typing import Optional

import torch

from vpo._validate import check_float, check_like

NUM_DIFFUSION_STEPS = 1000
BETA_START = 1e-5
BETA_END = 5e-3
DEFAULT_NOISE_STEP = 500  # TPO's choice (paper §4.3, "medium corruption")
CLIP_MODES = ("clamp", "wrap", "none")


def diffusion_betas(num_steps: int = NUM_DIFFUSION_STEPS) -> torch.Tensor:
    """The schedule ``β_t = sigmoid(linspace(-6, 6, num_steps))_t · (5e-3 - 1e-5) + 1e-5``, float64 ``[num_steps]``.

    Example:
        >>> from vpo.noise import diffusion_betas
        >>> b = diffusion_betas()
        >>> b.shape, round(b[0].item(), 7), round(b[-1].item(), 6)
        (torch.Size([1000]), 2.23e-05, 0.004988)
    """
    num_steps = _check_int("num_steps", num_steps, 1, None)
    lt = torch.linspace(-6.0, 6.0, num_steps, dtype=torch.float64)
    return torch.sigmoid(lt) * (BETA_END - BETA_START) + BETA_START


def diffusion_alpha_bar(step: int = DEFAULT_NOISE_STEP, *, num_steps: int = NUM_DIFFUSION_STEPS) -> float:
    """``ᾱ_k = Π_{t=0}^{k} (1 - β_t)`` for a 0-based ``step = k`` in ``[0, num_steps - 1]`` (inclusive product).

    Computed in float64 and returned as a Python float. See the module docstring for why this convention.

    Example:
        >>> from vpo.noise import diffusion_alpha_bar
        >>> round(diffusion_alpha_bar(500), 4)
        0.7448
    """
    num_steps = _check_int("num_steps", num_steps, 1, None)
    step = _check_int("step", step, 0, num_steps - 1)
    return torch.cumprod(1.0 - diffusion_betas(num_steps), dim=0)[step].item()


def add_diffusion_noise(
    images: torch.Tensor,
    step: int = DEFAULT_NOISE_STEP,
    *,
    generator: Optional[torch.Generator] = None,
    clamp: Optional[bool] = None,
    noise: Optional[torch.Tensor] = None,
    clip: Optional[str] = None,
) -> torch.Tensor:
    """DDPM forward noise: ``sqrt(ᾱ_step) · images + sqrt(1 - ᾱ_step) · ε``, brought back to ``[0, 1]`` by ``clip``.

    Args:
        images: float tensor ``[..., C, H, W]`` with values in ``[0, 1]`` (pixel space, before the processor's resize
            and normalization). With ``clip="none"`` any float tensor of rank ≥ 1 is accepted and its values are not
            checked (the other documented options: normalized ``pixel_values`` or projected image features
            ``[..., N_p, D]``).
        step: 0-based noise step ``k`` in ``[0, 999]``; TPO uses 500 (``ᾱ ≈ 0.7448``, ``v_c ≈ 0.863 v + 0.505 ε``).
        generator: a ``torch.Generator`` on ``images.device`` to draw ``ε ~ N(0, I)`` from (the global RNG if ``None``).
            Draw ε per training step from a seeded generator for reproducible runs.
        clip: ``"clamp"`` (default), ``"wrap"`` (TPO's official ``mul(255).byte()``: 8-bit values modulo 256, then
            / 255) or ``"none"`` (module docstring).
        clamp: the older spelling: ``True`` = ``clip="clamp"``, ``False`` = ``clip="none"`` (not with ``clip``).
        noise: an explicit ``ε`` with the shape, dtype and device of ``images`` — e.g. one fixed ε per example, so the
            reference's calibrated rewards ``c_ref`` can be cached. Exclusive with ``generator``.

    Returns:
        The noised tensor, same shape, dtype and device as ``images`` (16-bit inputs are computed in float32).

    Example:
        >>> import torch
        >>> from vpo.noise import add_diffusion_noise
        >>> g = torch.Generator().manual_seed(0)
        >>> v_c = add_diffusion_noise(torch.rand(2, 3, 8, 8), 500, generator=g)
        >>> v_c.shape, bool(v_c.min() >= 0), bool(v_c.max() <= 1)
        (torch.Size([2, 3, 8, 8]), True, True)
    """
    check_float("images", images, ndim=None)
    if clamp is not None:
        if not isinstance(clamp, bool):
            raise ValueError(f"clamp must be a bool, got {type(clamp).__name__}")
        if clip is not None:
            raise ValueError("pass clip (the mode) or clamp (the older bool), not both")
        clip = "clamp" if clamp else "none"
    clip = "clamp" if clip is None else clip
    if clip not in CLIP_MODES:
        raise ValueError(f"clip must be one of {list(CLIP_MODES)}, got {clip!r}")
    pixels = clip != "none"
    if pixels and images.dim() < 3:
        raise ValueError(
            f"images must have shape [..., C, H, W] (at least 3 dimensions) when clip={clip!r}, got shape "
            f"{tuple(images.shape)}; pass clip='none' to noise features or normalized pixel values"
        )
    if images.dim() < 1:
        raise ValueError(f"images must have at least 1 dimension, got shape {tuple(images.shape)}")
    step = _check_int("step", step, 0, NUM_DIFFUSION_STEPS - 1)
    if noise is not None and generator is not None:
        raise ValueError("pass either noise (an explicit ε) or generator (to draw ε), not both")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        if generator.device.type != images.device.type:
            raise ValueError(
                f"generator is on {generator.device} but images is on {images.device}: expected the same device"
            )
    if pixels:
        # [0, 1] check: one min/max reduction and one host sync. NaN fails it too.
        lo, hi = torch.aminmax(images.detach())
        lo, hi = torch.stack([lo, hi]).tolist()
        if not (0.0 <= lo and hi <= 1.0):
            raise ValueError(
                f"images must have values in [0, 1] (pixel space) when clip={clip!r}, got min {lo} and max {hi}; "
                f"pass clip='none' for normalized pixel values or features"
            )

    compute_dtype = images.dtype if images.dtype in (torch.float32, torch.float64) else torch.float32
    if noise is not None:
        check_float("noise", noise)
        check_like("noise", noise, "images", images)
        eps = noise.to(compute_dtype)
    else:
        eps = torch.randn(images.shape, generator=generator, device=images.device, dtype=compute_dtype)

    alpha_bar = diffusion_alpha_bar(step)
    out = math.sqrt(alpha_bar) * images.to(compute_dtype) + math.sqrt(1.0 - alpha_bar) * eps
    if clip == "clamp":
        out = out.clamp(0.0, 1.0)
    elif clip == "wrap":
        out = wrap_uint8(out)
    return out.to(images.dtype)


def wrap_uint8(values: torch.Tensor) -> torch.Tensor:
    """TPO's official ``values.mul(255).byte()`` back in ``[0, 1]``: ``(trunc(255 v) mod 256) / 255`` (any shape;
    the cast truncates toward zero and keeps the low 8 bits, so out-of-range values wrap around).

    Example:
        >>> import torch
        >>> from vpo.noise import wrap_uint8
        >>> (wrap_uint8(torch.tensor([0.5, 1.0, 1.1, -0.1], dtype=torch.float64)) * 255).round().tolist()
        [127.0, 255.0, 24.0, 231.0]
    """
    return torch.remainder(torch.trunc(values * 255.0), 256.0) / 255.0


def _check_int(name: str, value, lo: int, hi: Optional[int]) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an int, got bool")
    try:
        value = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an int, got {type(value).__name__}") from None
    if value < lo or (hi is not None and value > hi):
        rng = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} must be in {rng}, got {value}")
    return value
