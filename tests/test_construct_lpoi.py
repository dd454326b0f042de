"""LPOI image lists (vpo.construct.lpoi): exact masked fractions, growth from the side nearest the edge, the visual
prompt on the negatives only, detectors and verification on the shapes world, the dataset writer, argument errors."""
import json
import os
from fractions import Fraction

import numpy as np
import pytest
import torch

from vpo.construct import ConstructWarning
from vpo.construct.lpoi import (
    SIDES,
    Detection,
    DetectorVerifier,
    GroundTruthDetector,
    LPOIConfig,
    ZeroShotDetector,
    box_iou,
    build_lpoi_list,
    lpoi_mask_side,
    lpoi_masks,
    masked_count,
    snap_box,
    write_lpoi_dataset,
)

RED = (255, 0, 0)


def _image(W, H, seed=0):
    """Random pixels in [1, 254]: never the black mask fill nor the pure-red prompt."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(1, 255, size=(H, W, 3), dtype=np.uint8))


def _count(arr, color, box=None):
    if box is not None:
        x0, y0, x1, y1 = box
        arr = arr[y0:y1, x0:x1]
    return int((arr == np.array(color, dtype=np.uint8)).all(-1).sum())


def _round_half_up(x: Fraction) -> int:
    return int((x + Fraction(1, 2)) // 1)


@pytest.mark.parametrize("L", [2, 3, 5, 7])
@pytest.mark.parametrize("box", [(40, 10, 60, 30), (3, 4, 10, 9), (50, 33, 63, 44), (20, 1, 33, 12)])
def test_masks_cover_exactly_the_stated_fraction(L, box):
    W, H = 64, 48
    side, masks = lpoi_masks((W, H), box, L)
    x0, y0, x1, y1 = box
    area = (x1 - x0) * (y1 - y0)
    inside = np.zeros((H, W), dtype=bool)
    inside[y0:y1, x0:x1] = True
    assert len(masks) == L
    for k, m in enumerate(masks, start=1):
        # n_k = (k-1)/(L-1) of the box area, rounded half up to whole pixels
        assert int(m.sum()) == _round_half_up(Fraction((k - 1) * area, L - 1)) == masked_count(k, L, area)
        assert not (m & ~inside).any()
        if k > 1:
            assert (masks[k - 2] <= m).all()  # nested: the mask only grows
    assert masks[0].sum() == 0 and (masks[-1] == inside).all()

    # the images: exactly n_k pixels of the fill color inside the box, x_1 the original
    img = _image(W, H)
    xs = build_lpoi_list(img, box, L=L)
    base = np.asarray(img)
    assert np.array_equal(np.asarray(xs[0]), base)
    for k, x in enumerate(xs, start=1):
        arr = np.asarray(x)
        assert x.size == img.size and x.mode == "RGB"
        assert _count(arr, (0, 0, 0), box) == masked_count(k, L, area)
        assert np.array_equal(arr[y0:y1, x0:x1][~masks[k - 1][y0:y1, x0:x1]],
                              base[y0:y1, x0:x1][~masks[k - 1][y0:y1, x0:x1]])


@pytest.mark.parametrize("box, side", [
    ((40, 10, 60, 30), "right"),   # gaps: left 40, right 4, top 10, bottom 18
    ((3, 10, 20, 30), "left"),     # left 3
    ((20, 2, 40, 20), "top"),      # top 2
    ((20, 30, 40, 47), "bottom"),  # bottom 1
    ((22, 14, 42, 34), "top"),     # 22 / 22 / 14 / 14: top and bottom tie at the smallest gap -> top
])
def test_nearest_side(box, side):
    assert lpoi_mask_side((64, 48), box) == side


def test_side_ties_follow_the_documented_order():
    assert SIDES == ("left", "right", "top", "bottom")
    assert lpoi_mask_side((64, 64), (22, 22, 42, 42)) == "left"   # all four gaps are 22
    assert lpoi_mask_side((64, 64), (24, 10, 40, 54)) == "top"    # top 10 == bottom 10 < left/right 24
    assert lpoi_mask_side((64, 64), (50, 22, 60, 42)) == "right"  # right 4


@pytest.mark.parametrize("box, side", [((40, 10, 60, 30), "right"), ((3, 10, 20, 30), "left"),
                                       ((20, 2, 40, 20), "top"), ((20, 30, 40, 47), "bottom")])
def test_mask_grows_from_the_nearest_side(box, side):
    # With L = 5 each step adds a quarter of the box: whole columns (rows) adjacent to the nearest side.
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    _, masks = lpoi_masks((64, 48), box, 5)
    for k in range(2, 5):
        m = masks[k - 1][y0:y1, x0:x1]
        frac = Fraction(k - 1, 4)
        if side in ("left", "right"):
            cols = m.all(axis=0)
            full = int(frac * w) if (frac * w).denominator == 1 else None
            n_full = int(cols.sum())
            want = np.zeros(w, dtype=bool)
            if side == "left":
                want[:n_full] = True
            else:
                want[w - n_full:] = True
            assert np.array_equal(cols, want) and n_full >= 1
            if full is not None:
                assert n_full == full
            # the partial column (if any) is next to the full ones, filled from the top
            partial = m.any(axis=0) & ~cols
            assert partial.sum() <= 1
        else:
            rows = m.all(axis=1)
            n_full = int(rows.sum())
            want = np.zeros(h, dtype=bool)
            if side == "top":
                want[:n_full] = True
            else:
                want[h - n_full:] = True
            assert np.array_equal(rows, want) and n_full >= 1


def test_partial_column_fills_from_the_top():
    # 3 x 4 box at the left edge, L = 5: n_2 = round(12/4) = 3 -> 3 pixels of the first column, from the top
    _, masks = lpoi_masks((20, 20), (0, 5, 3, 9), 5)
    m = masks[1][5:9, 0:3]
    assert m[:, 0].tolist() == [True, True, True, False] and not m[:, 1:].any()


def test_ellipse_only_on_negatives_and_red():
    box = (40, 10, 60, 30)
    img = _image(64, 48, seed=1)
    xs = build_lpoi_list(img, box, L=5)
    assert _count(np.asarray(xs[0]), RED) == 0
    for x in xs[1:]:
        arr = np.asarray(x)
        assert _count(arr, RED) > 20               # the outline is there, in pure red
        assert _count(arr, RED, box) == 0          # and never on the box
        ring = np.asarray(x).astype(int) - np.asarray(img).astype(int)
        changed = np.abs(ring).sum(-1) > 0
        outside = changed.copy()
        outside[10:30, 40:60] = False
        assert (arr[outside] == np.array(RED)).all()  # outside the box only the prompt changed pixels
    # another color and width; width 0 = no prompt
    xs = build_lpoi_list(img, box, L=3, ellipse_color=(0, 255, 0), ellipse_width=3)
    assert _count(np.asarray(xs[1]), (0, 255, 0)) > _count(np.asarray(build_lpoi_list(
        img, box, L=3, ellipse_color=(0, 255, 0), ellipse_width=1)[1]), (0, 255, 0))
    xs = build_lpoi_list(img, box, L=3, ellipse_width=0)
    assert all(_count(np.asarray(x), RED) == 0 for x in xs)
    # the box sits inside the ellipse: the prompt surrounds it on the box's row and column through its center
    arr = np.asarray(build_lpoi_list(img, (20, 14, 30, 24), L=2)[1])
    row, col = arr[19], arr[:, 25]
    assert _count(row[None, :20], RED) > 0 and _count(row[None, 30:], RED) > 0
    assert _count(col[None, :14], RED) > 0 and _count(col[None, 24:], RED) > 0


def test_mask_fill_and_determinism():
    img = _image(33, 21, seed=2)
    a = build_lpoi_list(img, (2, 3, 15, 17), L=4, mask_fill=(9, 9, 9))
    b = build_lpoi_list(img, (2, 3, 15, 17), L=4, mask_fill=(9, 9, 9))
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))
    assert _count(np.asarray(a[-1]), (9, 9, 9), (2, 3, 15, 17)) == 13 * 14


def test_fractional_boxes_snap_outward_and_clip():
    assert snap_box((3.5, 2.2, 10.1, 8.9), (64, 48)) == (3, 2, 11, 9)
    assert snap_box((-5, -1, 70, 10), (64, 48)) == (0, 0, 64, 10)
    side, masks = lpoi_masks((64, 48), (3.5, 2.2, 10.1, 8.9), 3)
    assert masks[-1].sum() == 8 * 7


@pytest.mark.parametrize("kwargs, name", [
    (dict(L=1), "L"), (dict(L=5.0), "L"), (dict(L=True), "L"),
    (dict(box=(10, 10, 5, 20)), "box"), (dict(box=(70, 70, 80, 80)), "box"), (dict(box=(1, 2, 3)), "box"),
    (dict(box=(0, 0, float("nan"), 3)), "box"),
    (dict(ellipse_color=(300, 0, 0)), "ellipse_color"), (dict(ellipse_color="red"), "ellipse_color"),
    (dict(mask_fill=(0, 0)), "mask_fill"), (dict(ellipse_width=-1), "ellipse_width"),
    (dict(image=np.zeros((4, 4, 3))), "image"),
])
def test_bad_arguments_name_the_argument(kwargs, name):
    args = dict(image=_image(64, 48), box=(10, 10, 20, 20))
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        build_lpoi_list(args.pop("image"), args.pop("box"), **args)


def test_config_errors():
    with pytest.raises(ValueError, match="L"):
        LPOIConfig(L=1)
    with pytest.raises(ValueError, match="max_candidates"):
        LPOIConfig(max_candidates=0)


# --------------------------------------------------------------------------------------------- shapes world
@pytest.fixture(scope="module")
def shapes_data(tmp_path_factory):
    from vpo.worlds import shapes

    root = tmp_path_factory.mktemp("shapes")
    return shapes.make_dataset(str(root), 4, seed=0)


def _first_row(path):
    return json.loads(open(path).readline())


def test_ground_truth_detector_sees_masks(shapes_data):
    from vpo.data import load_image

    row = _first_row(shapes_data)
    img = load_image(os.path.join(os.path.dirname(shapes_data), row["image"]))
    det = GroundTruthDetector()
    names = [f"{o['color']} {o['shape']}" for o in row["objects"]]
    found = det(img, names, record=row)
    assert sorted(d.box for d in found) == sorted(tuple(float(v) for v in o["bbox"]) for o in row["objects"])
    assert all(d.score == 1.0 for d in found)
    o = row["objects"][0]
    name = f"{o['color']} {o['shape']}"
    xs = build_lpoi_list(img, o["bbox"], L=5)
    seen = [bool(det(x, [name], record=row)) for x in xs]
    assert seen[0] and not seen[-1]                       # gone once fully masked
    verify = DetectorVerifier(det)
    assert verify(xs[-1], tuple(o["bbox"]), name, record=row)
    assert not verify(xs[0], tuple(o["bbox"]), name, record=row)
    assert det(img, ["purple hexagon"], record=row) == []
    with pytest.raises(ValueError, match="record"):
        det(img, [name])
    with pytest.raises(ValueError, match="min_visible"):
        GroundTruthDetector(min_visible=0)


def test_write_lpoi_dataset_on_shapes_world(shapes_data, tmp_path):
    from vpo.data import PreferenceCollator, build_tiny_processor, read_preference_jsonl

    out = str(tmp_path / "lpoi")
    s = write_lpoi_dataset(shapes_data, out, verify=DetectorVerifier(GroundTruthDetector()))
    assert (s.seen, s.written) == (4, 4)
    rows = [json.loads(x) for x in open(s.path)]
    src = [json.loads(x) for x in open(shapes_data)]
    from PIL import Image

    for r, srow in zip(rows, src):
        assert r["bbox"] == srow["bbox"] and len(r["image_list"]) == 4
        assert r["lpoi"]["side"] == lpoi_mask_side((64, 64), r["bbox"])
        assert r["lpoi"]["object"] == next(f"{o['color']} {o['shape']}" for o in srow["objects"]
                                           if o["bbox"] == srow["bbox"])
        x0, y0, x1, y1 = r["bbox"]
        for k, p in enumerate(r["image_list"], start=2):
            arr = np.asarray(Image.open(os.path.join(out, p)).convert("RGB"))
            assert _count(arr, (0, 0, 0), r["bbox"]) == r["lpoi"]["masked_pixels"][k - 1]
            assert _count(arr, RED) > 0
    records, stats = read_preference_jsonl(s.path)
    assert stats.kept == 4
    batch = PreferenceCollator(build_tiny_processor("llava"), "llava", method="lpoi", list_size=5)(records)
    assert batch["sub"]["list"]["input_ids"].shape[0] == 4 * 5 and not batch["skipped"]
    # deterministic
    again = write_lpoi_dataset(shapes_data, str(tmp_path / "again"), verify=DetectorVerifier(GroundTruthDetector()))
    assert open(again.path).read() == open(s.path).read()
    for p in rows[0]["image_list"]:
        assert open(os.path.join(out, p), "rb").read() == open(os.path.join(str(tmp_path / "again"), p), "rb").read()


def test_writer_falls_back_to_the_detector_and_skips(shapes_data, tmp_path):
    src = [json.loads(x) for x in open(shapes_data)]
    base = os.path.dirname(shapes_data)
    for r in src:
        r["image"] = os.path.join(base, r["image"])
        r.pop("neg_image")
    src[0].pop("bbox")
    src[1].pop("bbox")
    src[1]["chosen"] = "nothing."  # no object name to detect
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in src))
    with pytest.warns(ConstructWarning, match="no_box"):
        s = write_lpoi_dataset(str(path), str(tmp_path / "o"), detector=GroundTruthDetector(),
                               verify=DetectorVerifier(GroundTruthDetector()), config=LPOIConfig(L=3))
    assert s.written == 3 and dict(s.skipped) == {"no_box": 1}
    row0 = json.loads(open(s.path).readline())
    first = src[0]["chosen"]
    from vpo.worlds import shapes

    m = shapes.parse_description(first)[0]
    obj = next(o for o in src[0]["objects"] if (o["color"], o["shape"]) == (m.color, m.shape))
    assert row0["bbox"] == obj["bbox"] and row0["lpoi"]["object"] == f"{m.color} {m.shape}"
    assert len(row0["image_list"]) == 2

    with pytest.warns(ConstructWarning):  # unverified (and the no_box record again)
        s = write_lpoi_dataset(str(path), str(tmp_path / "o2"), detector=GroundTruthDetector(),
                               verify=lambda img, box, name, record=None: False)
    assert s.written == 0 and s.skipped["unverified"] == 3
    with pytest.raises(ValueError, match="verify"):
        write_lpoi_dataset(str(path), str(tmp_path / "o3"), verify="yes")
    with pytest.raises(ValueError, match="data_path"):
        write_lpoi_dataset(str(tmp_path / "missing.jsonl"), str(tmp_path / "o3"))


def test_box_iou():
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert box_iou((0, 0, 1, 1), (2, 2, 3, 3)) == 0.0


def _tiny_owlvit(path):
    """A tiny random OWL-ViT and a byte-level BPE tokenizer, saved to ``path`` (no download)."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import (CLIPTokenizer, OwlViTConfig, OwlViTForObjectDetection, OwlViTImageProcessorPil,
                              OwlViTProcessor)

    chars = sorted(ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    bos, eos = len(vocab), len(vocab) + 1
    vocab.update({"<|startoftext|>": bos, "<|endoftext|>": eos})
    tok = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16)
    ip = OwlViTImageProcessorPil(size={"height": 32, "width": 32}, crop_size={"height": 32, "width": 32})
    layer = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    cfg = OwlViTConfig(text_config=dict(vocab_size=len(vocab), max_position_embeddings=16, bos_token_id=bos,
                                        eos_token_id=eos, pad_token_id=eos, **layer),
                       vision_config=dict(image_size=32, patch_size=8, **layer), projection_dim=32)
    torch.manual_seed(0)
    OwlViTForObjectDetection(cfg).save_pretrained(path)
    OwlViTProcessor(image_processor=ip, tokenizer=tok).save_pretrained(path)
    return path


def test_zero_shot_detector_from_local_folder(tmp_path):
    det = ZeroShotDetector(_tiny_owlvit(str(tmp_path / "owl")), threshold=0.0)
    img = _image(40, 30)
    found = det(img, ["red circle", "blue square"])
    assert found and all(isinstance(d, Detection) for d in found)
    assert {d.label for d in found} <= {"red circle", "blue square"}
    assert all(len(d.box) == 4 and 0.0 <= d.score <= 1.0 for d in found)
    assert det(img, []) == []
    with pytest.raises(ValueError, match="model_path"):
        ZeroShotDetector()
    with pytest.raises(ValueError, match="model_path"):
        ZeroShotDetector("/nonexistent/owlvit")


def test_cli(shapes_data, tmp_path, capsys):
    from vpo.construct.cli import main

    out = str(tmp_path / "o")
    assert main(["lpoi-lists", "--data", shapes_data, "--out", out, "--list-size", "3", "--detector",
                 "ground-truth", "--verify", "detector"]) == 0
    assert json.loads(capsys.readouterr().out)["written"] == 4
    assert len(json.loads(open(os.path.join(out, "train.jsonl")).readline())["image_list"]) == 2
    assert main(["lpoi-lists", "--data", shapes_data, "--out", out, "--verify", "detector"]) == 2
    assert main(["lpoi-lists", "--data", shapes_data, "--out", out, "--list-size", "1"]) == 2
    assert "L must be" in capsys.readouterr().err
