"""The data-side method options of VPOConfig reach the collator the trainer builds: mDPO's crop keeps 1-20% of the
area by default (the older "remove up to f" crop only when ``crop_frac`` is set), TPO's noise ``clamp`` or ``wrap``."""
import pytest
import torch

pytest.importorskip("transformers")
from PIL import Image  # noqa: E402

from vpo.data import build_tiny_processor  # noqa: E402
from vpo.models import tiny_llava  # noqa: E402
from vpo.trainer import VPOConfig  # noqa: E402
from vpo.trainer.trl_compat import default_collator  # noqa: E402


def _config(tmp_path, **kw):
    return VPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, **kw)


def test_defaults_are_mdpo_keep_crop_and_clamped_noise(tmp_path):
    tiny = tiny_llava()
    collator = default_collator(build_tiny_processor("llava", tiny=tiny), tiny.model, _config(tmp_path, method="mdpo"))
    assert collator.crop_max_frac is None and collator.crop_keep == (0.01, 0.2) and collator.noise_clip == "clamp"
    for i in range(20):  # every drawn box keeps 1-20% of the area
        x0, y0, x1, y1 = collator.crop_box(f"r{i}", 64, 48)
        assert 0.01 * 0.8 <= (x1 - x0) * (y1 - y0) / (64 * 48) <= 0.2 * 1.25


def test_options_reach_the_collator(tmp_path):
    tiny = tiny_llava()
    proc = build_tiny_processor("llava", tiny=tiny)
    cfg = _config(tmp_path, method="tpo", crop_keep_min=0.3, crop_keep_max=0.5, noise_clip="wrap")
    collator = default_collator(proc, tiny.model, cfg)
    assert collator.crop_keep == (0.3, 0.5) and collator.noise_clip == "wrap"
    old = default_collator(proc, tiny.model, _config(tmp_path, method="mdpo", crop_frac=0.2))
    assert old.crop_max_frac == 0.2
    image = Image.new("RGB", (32, 32), (250, 250, 250))  # near 1: the noise pushes values past 1
    clamp = default_collator(proc, tiny.model, _config(tmp_path, method="tpo"))
    a, b = clamp.noised_pixels(image, "r0"), collator.noised_pixels(image, "r0")
    assert a.min() >= 0 and a.max() <= 1 and b.min() >= 0 and b.max() <= 1
    assert (a == 1).any() and not torch.equal(a, b)  # clamp saturates where wrap wraps around


@pytest.mark.parametrize("kw,match", [
    (dict(noise_clip="mod"), "noise_clip must be 'clamp' or 'wrap'"),
    (dict(crop_keep_min=0.5, crop_keep_max=0.2), "crop_keep_min/crop_keep_max must satisfy"),
    (dict(crop_keep_min=0.0), "crop_keep_min/crop_keep_max must satisfy"),
    (dict(crop_frac=1.5), "crop_frac must lie in"),
])
def test_bad_options_name_the_field(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        _config(tmp_path, **kw)
