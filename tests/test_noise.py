"""TPO's DDPM noise schedule and corrupted images (vpo.noise) against the numbers of docs/methods.md and plain-Python arithmetic."""
import math

import pytest
import torch

from vpo.noise import add_diffusion_noise, diffusion_alpha_bar, diffusion_betas, wrap_uint8


def _beta_py(t: int, n: int = 1000) -> float:
    """SPEC: β_t = sigmoid(linspace(-6, 6, n))_t · (5e-3 - 1e-5) + 1e-5, in plain Python."""
    lt = -6.0 + 12.0 * t / (n - 1)
    return 1.0 / (1.0 + math.exp(-lt)) * (5e-3 - 1e-5) + 1e-5


def _alpha_bar_py(k: int) -> float:
    """ᾱ_k = Π_{t=0}^{k} (1 - β_t), 0-based, inclusive."""
    out = 1.0
    for t in range(k + 1):
        out *= 1.0 - _beta_py(t)
    return out


def test_alpha_bar_500_matches_spec():
    # SPEC: ᾱ_500 ≈ 0.7448, so v_c ≈ 0.863 v + 0.505 ε
    ab = diffusion_alpha_bar(500)
    assert ab == pytest.approx(0.7448, abs=5e-5)
    assert math.sqrt(ab) == pytest.approx(0.863, abs=5e-4)
    assert math.sqrt(1 - ab) == pytest.approx(0.505, abs=5e-4)
    assert diffusion_alpha_bar() == ab  # 500 is the default step


@pytest.mark.parametrize("k", [0, 1, 250, 499, 500, 999])
def test_alpha_bar_matches_plain_python_product(k):
    assert diffusion_alpha_bar(k) == pytest.approx(_alpha_bar_py(k), rel=1e-12)


def test_alpha_bar_indexing_is_inclusive_and_zero_based():
    # ᾱ_0 applies exactly one step; ᾱ_k / ᾱ_{k-1} = 1 - β_k
    assert diffusion_alpha_bar(0) == pytest.approx(1 - _beta_py(0), rel=1e-14)
    assert diffusion_alpha_bar(500) / diffusion_alpha_bar(499) == pytest.approx(1 - _beta_py(500), rel=1e-12)


def test_betas_values_and_shape():
    b = diffusion_betas()
    assert b.shape == (1000,) and b.dtype == torch.float64
    for t in (0, 1, 500, 998, 999):
        assert b[t].item() == pytest.approx(_beta_py(t), rel=1e-12)
    assert bool((b[1:] > b[:-1]).all())  # increasing
    assert diffusion_betas(10).shape == (10,)


def test_constant_image_statistics():
    # v = 0.5 everywhere, no clamp: v_c ~ N(sqrt(ᾱ) · 0.5, 1 - ᾱ)
    v = torch.full((4, 3, 64, 64), 0.5, dtype=torch.float64)  # 49152 samples
    g = torch.Generator().manual_seed(1234)
    out = add_diffusion_noise(v, 500, generator=g, clamp=False)
    ab = _alpha_bar_py(500)
    assert out.mean().item() == pytest.approx(math.sqrt(ab) * 0.5, abs=0.012)  # ~5 std of the mean
    assert out.var().item() == pytest.approx(1 - ab, rel=0.03)
    # a weaker step gives a smaller variance
    out_100 = add_diffusion_noise(v, 100, generator=torch.Generator().manual_seed(1234), clamp=False)
    assert out_100.var().item() == pytest.approx(1 - _alpha_bar_py(100), rel=0.03)


def test_explicit_noise_is_the_formula():
    v = torch.tensor([[[0.0, 0.25], [0.5, 1.0]]], dtype=torch.float64)  # [1, 2, 2]
    eps = torch.tensor([[[1.0, -1.0], [0.0, 2.0]]], dtype=torch.float64)
    ab = _alpha_bar_py(500)
    out = add_diffusion_noise(v, noise=eps, clamp=False)
    expected = [[[math.sqrt(1 - ab), 0.25 * math.sqrt(ab) - math.sqrt(1 - ab)],
                 [0.5 * math.sqrt(ab), math.sqrt(ab) + 2 * math.sqrt(1 - ab)]]]
    torch.testing.assert_close(out, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    # clamped: 1.873 -> 1, -0.29 -> 0
    out_c = add_diffusion_noise(v, noise=eps)
    torch.testing.assert_close(out_c, torch.tensor(expected, dtype=torch.float64).clamp(0, 1))


def test_generator_determinism_and_source():
    v = torch.rand(2, 3, 5, 7)
    a = add_diffusion_noise(v, generator=torch.Generator().manual_seed(7))
    b = add_diffusion_noise(v, generator=torch.Generator().manual_seed(7))
    c = add_diffusion_noise(v, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # ε is drawn from the given generator: same stream as randn on it
    eps = torch.randn(v.shape, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(a, add_diffusion_noise(v, noise=eps))


def test_clamp():
    v = torch.full((2, 3, 16, 16), 0.5)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    raw = add_diffusion_noise(v, generator=g(), clamp=False)
    out = add_diffusion_noise(v, generator=g())
    assert bool((raw < 0).any()) and bool((raw > 1).any())  # the unclamped noise leaves [0, 1]
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    torch.testing.assert_close(out, raw.clamp(0, 1))


def test_clip_modes_clamp_wrap_none():
    """clip="clamp" is min/max; "wrap" is TPO's official mul(255).byte() (trunc, mod 256) / 255; "none" is raw."""
    v = torch.full((2, 3, 16, 16), 0.9, dtype=torch.float64)
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    raw = add_diffusion_noise(v, generator=g(), clip="none")
    assert bool((raw > 1).any()) and bool((raw < 1).any())
    torch.testing.assert_close(add_diffusion_noise(v, generator=g(), clip="clamp"), raw.clamp(0, 1))
    torch.testing.assert_close(add_diffusion_noise(v, generator=g()), raw.clamp(0, 1))  # the default
    torch.testing.assert_close(add_diffusion_noise(v, generator=g(), clamp=False), raw)  # the older bool
    wrapped = add_diffusion_noise(v, generator=g(), clip="wrap")
    # the uint8 cast by hand, value by value: truncate toward zero, keep the low 8 bits
    want = torch.tensor([(int(x * 255) % 256) / 255 for x in raw.flatten().tolist()], dtype=torch.float64)
    torch.testing.assert_close(wrapped.flatten(), want)
    assert float(wrapped.min()) >= 0 and float(wrapped.max()) <= 1
    over = (raw > 256 / 255) & (raw < 1.4)  # a bit brighter than white wraps to dark, unlike the clamp
    assert bool(over.any()) and float(wrapped[over].max()) < 0.5


def test_wrap_uint8_matches_the_byte_cast_and_hand_values():
    x = torch.tensor([0.0, 0.5, 1.0, 1.1, 1.5, -0.1, -0.004, 2.0], dtype=torch.float64)
    assert (wrap_uint8(x) * 255).round().tolist() == [0, 127, 255, 24, 126, 231, 255, 254]
    inside = torch.rand(100, dtype=torch.float64)  # in range the cast is plain truncation to 8 bits
    torch.testing.assert_close(wrap_uint8(inside), inside.mul(255).byte().double() / 255)


def test_dtype_and_shape_preserved():
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        v = torch.rand(1, 2, 3, 4, 4).to(dtype)  # [..., C, H, W] with two leading dims
        out = add_diffusion_noise(v, generator=torch.Generator().manual_seed(0))
        assert out.dtype == dtype and out.shape == v.shape


def test_features_without_clamp():
    # the documented option: noise on projected features [N_p, D] (any values, rank 2) with clamp=False
    feats = torch.randn(5, 8) * 10
    out = add_diffusion_noise(feats, noise=torch.zeros_like(feats), clamp=False)
    torch.testing.assert_close(out, feats * math.sqrt(_alpha_bar_py(500)))


def test_gradcheck_linear_in_images():
    v = torch.rand(1, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    eps = torch.randn(1, 2, 3, 3, dtype=torch.float64)
    torch.autograd.gradcheck(lambda x: add_diffusion_noise(x, 300, noise=eps, clamp=False), (v,))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(images=torch.zeros(1, 3, 4, 4, dtype=torch.int64)), "images must have dtype"),
        (dict(images=torch.full((1, 3, 4, 4), 1.5)), r"images must have values in \[0, 1\]"),
        (dict(images=torch.full((1, 3, 4, 4), -0.1)), r"images must have values in \[0, 1\]"),
        (dict(images=torch.full((1, 3, 4, 4), float("nan"))), r"images must have values in \[0, 1\]"),
        (dict(images=torch.zeros(4, 4)), r"images must have shape \[..., C, H, W\]"),
        (dict(images=torch.zeros(0, 3, 4, 4)), "images must not be empty"),
        (dict(images=[0.5]), "images must be a torch.Tensor"),
        (dict(step=1000), r"step must be in \[0, 999\], got 1000"),
        (dict(step=-1), r"step must be in \[0, 999\], got -1"),
        (dict(step=2.5), "step must be an int"),
        (dict(step=True), "step must be an int"),
        (dict(noise=torch.zeros(1, 3, 4, 5)), "noise has shape"),
        (dict(noise=torch.zeros(1, 3, 4, 4, dtype=torch.float64)), "noise has dtype"),
        (dict(noise=torch.zeros(1, 3, 4, 4), generator=torch.Generator()), "either noise .* or generator"),
        (dict(images=torch.zeros(1, 3, 4, 4, device="meta"), generator=torch.Generator()),
         "generator is on cpu but images is on meta"),
        (dict(generator=1234), "generator must be a torch.Generator"),
        (dict(clamp=1), "clamp must be a bool"),
        (dict(clip="modulo"), "clip must be one of"),
        (dict(clip="wrap", clamp=True), "clip .* or clamp"),
        (dict(images=torch.zeros(4, 4), clip="wrap"), r"images must have shape \[..., C, H, W\]"),
    ],
)
def test_bad_input(kwargs, match):
    args = dict(images=torch.full((1, 3, 4, 4), 0.5))
    args.update(kwargs)
    images = args.pop("images")
    with pytest.raises(ValueError, match=match):
        add_diffusion_noise(images, **args)


def test_bad_step_for_alpha_bar():
    with pytest.raises(ValueError, match="step must be in"):
        diffusion_alpha_bar(1000)
    with pytest.raises(ValueError, match="num_steps must be"):
        diffusion_betas(0)
