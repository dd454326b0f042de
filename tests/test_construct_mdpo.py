"""mDPO crops (vpo.construct.mdpo): by default a crop keeps 1-20% of the area (mDPO's RandomResizedCrop(scale=(0.01,
0.2))), the older crop removes [0, max_frac]; the crop is the collator's, seeded per example and reproducible, and the
dataset writer records it."""
import json
import os

import numpy as np
import pytest

from vpo.construct.mdpo import crop_image, mdpo_crop_box, removed_fraction, write_mdpo_dataset


@pytest.mark.parametrize("size", [(64, 64), (37, 53), (640, 480)])
@pytest.mark.parametrize("keep", [(0.01, 0.2), (0.3, 0.5)])
def test_crops_keep_a_fraction_of_the_area_in_the_range(size, keep):
    W, H = size
    kept = []
    for i in range(300):
        box = mdpo_crop_box(f"rec-{i}", W, H, seed=3, keep=keep)
        l, t, r, b = box
        assert 0 <= l < r <= W and 0 <= t < b <= H
        a = 1.0 - removed_fraction(box, W, H)
        # at least lo (the sides round up); at most hi plus one row and one column of rounding
        assert keep[0] - 1e-12 <= a <= keep[1] + (W + H + 1) / (W * H)
        kept.append(a)
    if W * H >= 640 * 480:
        # uniform in the range: the crops spread over it
        span = keep[1] - keep[0]
        assert min(kept) < keep[0] + 0.1 * span and max(kept) > keep[1] - 0.1 * span
        assert abs(np.mean(kept) - (keep[0] + keep[1]) / 2) < 0.1 * span


def test_default_crop_is_mdpos_one_to_twenty_percent():
    kept = [1 - removed_fraction(mdpo_crop_box(f"r{i}", 640, 480, seed=0), 640, 480) for i in range(400)]
    assert 0.01 <= min(kept) < 0.03 and 0.18 < max(kept) <= 0.2 + 0.005


@pytest.mark.parametrize("size", [(64, 64), (37, 53), (640, 480), (5, 3), (1, 1)])
@pytest.mark.parametrize("max_frac", [0.2, 0.05, 0.0])
def test_older_crops_remove_between_zero_and_max_frac(size, max_frac):
    W, H = size
    fracs = []
    for i in range(200):
        box = mdpo_crop_box(f"rec-{i}", W, H, seed=3, max_frac=max_frac)
        l, t, r, b = box
        assert 0 <= l < r <= W and 0 <= t < b <= H
        f = removed_fraction(box, W, H)
        assert 0.0 <= f <= max_frac + 1e-12
        fracs.append(f)
    if max_frac > 0 and W * H >= 640 * 480:
        # uniform f in [0, max_frac]: the crops spread over the range (sides round up: whole pixels, a bit under)
        assert max(fracs) > 0.8 * max_frac and min(fracs) < 0.2 * max_frac
    if max_frac == 0:
        assert all(f == 0 for f in fracs)


def test_crop_is_the_collators():
    from vpo.data import PreferenceCollator, build_tiny_processor

    proc = build_tiny_processor("llava")
    old = PreferenceCollator(proc, "llava", method="mdpo", seed=11, crop_max_frac=0.2)
    new = PreferenceCollator(proc, "llava", method="mdpo", seed=11)
    wide = PreferenceCollator(proc, "llava", method="mdpo", seed=11, crop_keep=(0.3, 0.6))
    for i in range(20):
        for draw in (0, 1, 5):
            assert mdpo_crop_box(f"id{i}", 64, 48, seed=11, draw=draw, max_frac=0.2) == old.crop_box(f"id{i}", 64, 48,
                                                                                                   draw)
            assert mdpo_crop_box(f"id{i}", 64, 48, seed=11, draw=draw) == new.crop_box(f"id{i}", 64, 48, draw)
            assert mdpo_crop_box(f"id{i}", 64, 48, seed=11, draw=draw, keep=(0.3, 0.6)) == wide.crop_box(
                f"id{i}", 64, 48, draw)
    with pytest.raises(ValueError, match="crop_keep"):
        PreferenceCollator(proc, "llava", method="mdpo", crop_keep=(0.0, 0.2))


def test_seeded_per_example_and_deterministic():
    a = [mdpo_crop_box(f"r{i}", 64, 64, seed=0) for i in range(50)]
    assert a == [mdpo_crop_box(f"r{i}", 64, 64, seed=0) for i in range(50)]
    assert a != [mdpo_crop_box(f"r{i}", 64, 64, seed=1) for i in range(50)]
    assert len(set(a)) > 25  # different examples, different crops
    assert mdpo_crop_box("r0", 64, 64, seed=0, draw=0) != mdpo_crop_box("r0", 64, 64, seed=0, draw=1) or \
        mdpo_crop_box("r1", 64, 64, seed=0, draw=0) != mdpo_crop_box("r1", 64, 64, seed=0, draw=1)


def test_crop_image():
    from PIL import Image

    img = Image.fromarray(np.arange(64 * 48 * 3, dtype=np.uint8).reshape(48, 64, 3))
    box = (3, 4, 60, 46)
    assert crop_image(img, box).size == (64, 48)
    raw = crop_image(img, box, resize=False)
    assert raw.size == (57, 42) and np.array_equal(np.asarray(raw), np.asarray(img)[4:46, 3:60])


@pytest.mark.parametrize("kwargs, name", [
    (dict(max_frac=1.0), "max_frac"), (dict(max_frac=-0.1), "max_frac"), (dict(seed="1"), "seed"),
    (dict(record_id=""), "record_id"), (dict(record_id=7), "record_id"), (dict(width=0), "width"),
    (dict(height=2.5), "height"), (dict(draw=-1), "draw"), (dict(keep=(0.2, 0.1)), "keep"),
    (dict(keep=(0.0, 0.2)), "keep"), (dict(keep=0.2), "keep"), (dict(keep=(0.1, 1.5)), "keep"),
])
def test_bad_arguments_name_the_argument(kwargs, name):
    args = dict(record_id="r", width=64, height=64)
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        mdpo_crop_box(args.pop("record_id"), args.pop("width"), args.pop("height"), **args)


def test_write_mdpo_dataset_on_shapes_world(tmp_path):
    from PIL import Image

    from vpo.data import PreferenceCollator, build_tiny_processor, read_preference_jsonl
    from vpo.worlds import shapes

    src = shapes.make_dataset(str(tmp_path / "src"), 3, seed=0)
    out = str(tmp_path / "mdpo")
    s = write_mdpo_dataset(src, out, seed=5, save_images=True)
    assert (s.seen, s.written) == (3, 3)
    rows = [json.loads(x) for x in open(s.path)]
    for r, srow in zip(rows, (json.loads(x) for x in open(src))):
        assert (r["chosen"], r["rejected"], r["prompt"]) == (srow["chosen"], srow["rejected"], srow["prompt"])
        box = tuple(r["mdpo"]["crop_box"])
        assert box == mdpo_crop_box(r["id"], 64, 64, seed=5)
        assert 0.01 <= r["mdpo"]["kept"] <= 0.25 and r["mdpo"]["seed"] == 5 and r["mdpo"]["keep"] == [0.01, 0.2]
        assert r["mdpo"]["removed"] == pytest.approx(1 - r["mdpo"]["kept"])
        img = Image.open(os.path.join(out, r["image"])).convert("RGB")
        crop = Image.open(os.path.join(out, r["mdpo"]["crop_image"]))
        assert np.array_equal(np.asarray(crop), np.asarray(crop_image(img, box)))
    records, stats = read_preference_jsonl(s.path)
    assert stats.kept == 3 and records[0].extra["mdpo"]["crop_box"] == rows[0]["mdpo"]["crop_box"]
    batch = PreferenceCollator(build_tiny_processor("llava"), "llava", method="mdpo", seed=5)(records)
    assert batch["sub"]["crop"]["input_ids"].shape[0] == 3 and not batch["skipped"]
    again = write_mdpo_dataset(src, str(tmp_path / "again"), seed=5, save_images=True)
    assert open(again.path).read() == open(s.path).read()
    with pytest.raises(ValueError, match="max_frac"):
        write_mdpo_dataset(src, out, max_frac=0.5 + 0.5)
    with pytest.raises(ValueError, match="data_path"):
        write_mdpo_dataset(str(tmp_path / "nope"), out)


def test_cli(tmp_path, capsys):
    from vpo.construct.cli import main
    from vpo.worlds import shapes

    src = shapes.make_dataset(str(tmp_path / "src"), 2, seed=0)
    assert main(["mdpo-crops", "--data", src, "--out", str(tmp_path / "o"), "--seed", "3"]) == 0
    assert json.loads(capsys.readouterr().out)["written"] == 2
    assert main(["mdpo-crops", "--data", src, "--out", str(tmp_path / "k"), "--keep", "0.3", "0.5"]) == 0
    capsys.readouterr()
    row = json.loads(open(os.path.join(str(tmp_path / "k"), "train.jsonl")).readline())
    assert row["mdpo"]["keep"] == [0.3, 0.5] and 0.3 <= row["mdpo"]["kept"] <= 0.55
    assert main(["mdpo-crops", "--data", src, "--out", str(tmp_path / "o"), "--max-frac", "1.5"]) == 2
    assert "max_frac" in capsys.readouterr().err
