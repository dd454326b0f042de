"""Token-reward pictures (HTML, PNG) and training curves from a hand-written trainer_state.json."""
import html
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from vpo.visualize import (
    read_log_history,
    token_rewards_html,
    token_rewards_png,
    training_curves_png,
    value_color,
    value_range,
)

TOKENS = ["a", "<red>", " circle", "&", 'two "blue"', "squares", "."]
VALUES = [1.3, 0.6, 1.0, 1.1, float("nan"), 1.45, 0.9]


def test_color_scale():
    assert value_range([0.6, 1.3], center=1.0) == pytest.approx((0.6, 1.4))  # symmetric: half-width 0.4
    assert value_range([1.0], center=1.0) == pytest.approx((1 - 1e-6, 1 + 1e-6))
    assert value_range([1.0], vmin=0.5, vmax=1.5) == (0.5, 1.5)
    with pytest.raises(ValueError, match="vmin must be < vmax"):
        value_range([1.0], vmin=2.0, vmax=1.0)
    lo, hi = 0.5, 1.5
    assert value_color(1.0, lo, 1.0, hi) == (247, 247, 247)  # white at the center
    assert value_color(0.5, lo, 1.0, hi) == (178, 24, 43) == value_color(-9, lo, 1.0, hi)  # red end, clipped
    assert value_color(1.5, lo, 1.0, hi) == (33, 102, 172) == value_color(9, lo, 1.0, hi)  # blue end, clipped
    assert value_color(float("nan"), lo, 1.0, hi) == (190, 190, 190)
    # Two slopes: center at the middle of the scale even when the ends are not symmetric.
    assert value_color(1.0, 0.0, 1.0, 1.2) == (247, 247, 247)


def test_html_escapes_every_token():
    page = token_rewards_html(TOKENS, VALUES, title="TPO <c>", labels=None)
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    spans = re.findall(r'<span class="tok"[^>]*>(.*?)</span>', page)
    assert spans == [html.escape(t) for t in TOKENS]
    assert "&lt;red&gt;" in page and "<red>" not in page and "&amp;" in page and "&quot;blue&quot;" in page
    assert "TPO &lt;c&gt;" in page and "TPO <c>" not in page
    assert page.count('class="tok"') == len(TOKENS)
    assert "c = 1.3000" in page and "c = nan" in page  # tooltips
    assert "background:#f7f7f7" in page  # the token at c = 1


def test_html_several_rows_and_errors():
    page = token_rewards_html([["a", "b"], ["c"]], [[1.2, 0.8], [1.0]], labels=["chosen", "rejected <x>"],
                              value_name="w")
    assert page.count('class="tok"') == 3 and "rejected &lt;x&gt;" in page and "w = 0.8000" in page
    # tensors and arrays are accepted as values
    as_tensor = token_rewards_html(["a", "b"], torch.tensor([1.2, 0.8], dtype=torch.float64))
    assert as_tensor == token_rewards_html(["a", "b"], np.array([1.2, 0.8]))
    with pytest.raises(ValueError, match="one value per token"):
        token_rewards_html(["a", "b"], [1.0])
    with pytest.raises(ValueError, match="labels has 1 items"):
        token_rewards_html([["a"], ["b"]], [[1.0], [1.0]], labels=["x"])


def test_png_valid(tmp_path):
    path = token_rewards_png(TOKENS * 6, VALUES * 6, str(tmp_path / "sub" / "tok.png"), title="c", width_chars=40)
    img = Image.open(path)
    img.load()
    assert img.format == "PNG"
    w, h = img.size
    one = Image.open(token_rewards_png(TOKENS, VALUES, str(tmp_path / "one.png"), width_chars=40))
    assert one.size[0] == w and h > one.size[1]  # same width, more lines -> taller
    # The blue and red ends of the scale appear (token boxes), so the colors are drawn.
    px = np.asarray(one.convert("RGB")).reshape(-1, 3)
    assert (np.abs(px.astype(int) - [33, 102, 172]).sum(1) < 30).any()
    assert (np.abs(px.astype(int) - [178, 24, 43]).sum(1) < 30).any()
    two = token_rewards_png([TOKENS, TOKENS[:3]], [VALUES, VALUES[:3]], str(tmp_path / "two.png"),
                            labels=["chosen", "rejected"], vmin=0.5, vmax=1.5)
    assert Image.open(two).size[1] > one.size[1]
    with pytest.raises(ValueError, match="width_chars"):
        token_rewards_png(TOKENS, VALUES, str(tmp_path / "x.png"), width_chars=2)


def test_picture_shows_the_image_and_the_htmls_legend(tmp_path):
    from vpo.visualize import legend_text
    from vpo.worlds import shapes

    scene = shapes.Scene((shapes.Obj("circle", "red", "large", "center", (24, 24, 40, 40)),))
    image = shapes.render(scene)  # a red circle on white
    img_path = str(tmp_path / "scene.png")
    image.save(img_path)
    notes = ["record r1 · prompt: 'describe the image.'", "* = hallucinated word"]
    page = token_rewards_html(TOKENS, VALUES, title="c", image=img_path, notes=notes)
    assert '<img class="img"' in page and "data:image/png;base64," in page
    lo, hi = value_range(VALUES, 1.0)
    for part in legend_text("c", lo, hi, 1.0):
        assert part in page
    for n in notes:
        assert html.escape(n) in page
    plain = Image.open(token_rewards_png(TOKENS, VALUES, str(tmp_path / "plain.png"), width_chars=40))
    pic = Image.open(token_rewards_png(TOKENS, VALUES, str(tmp_path / "pic.png"), width_chars=40, image=image,
                                       notes=notes))
    assert pic.size[0] > plain.size[0] and pic.size[1] > plain.size[1]  # an image panel and two note lines
    px = np.asarray(pic.convert("RGB")).reshape(-1, 3).astype(int)
    red = np.asarray(shapes.PALETTE["red"])
    # the circle's exact palette red is drawn (nearest-neighbour scaling keeps it), and not in the picture without
    assert (np.abs(px - red).sum(1) == 0).sum() > 50
    assert not (np.abs(np.asarray(plain.convert("RGB")).reshape(-1, 3).astype(int) - red).sum(1) == 0).any()
    with pytest.raises(ValueError, match="notes"):
        token_rewards_html(TOKENS, VALUES, notes="a single string")
    with pytest.raises(ValueError, match="image"):
        token_rewards_png(TOKENS, VALUES, str(tmp_path / "bad.png"), image=42)


STATE = {
    "global_step": 4,
    "log_history": [
        {"epoch": 0.25, "step": 1, "loss": 0.6931, "rewards/margins": 0.0, "learning_rate": 1e-3},
        {"epoch": 0.5, "step": 2, "loss": 0.61, "rewards/margins": 0.12, "learning_rate": 1e-3},
        {"epoch": 0.5, "step": 2, "eval_loss": 0.65, "eval_rewards/margins": 0.08},
        {"epoch": 0.75, "step": 3, "loss": 0.52, "rewards/margins": 0.3, "learning_rate": 1e-3},
        {"epoch": 1.0, "step": 4, "loss": 0.44, "rewards/margins": 0.51, "learning_rate": 1e-3},
        {"epoch": 1.0, "step": 4, "train_runtime": 1.5, "train_loss": 0.56},
    ],
}


def test_training_curves(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "trainer_state.json").write_text(json.dumps(STATE))
    out = training_curves_png(str(tmp_path / "run" / "trainer_state.json"), str(tmp_path / "c.png"), title="dpo")
    img = Image.open(out)
    img.load()
    assert img.format == "PNG" and img.size[0] > 1.8 * img.size[1]  # two panels side by side
    one = Image.open(training_curves_png(STATE["log_history"], str(tmp_path / "c1.png"), keys=("loss",)))
    assert one.size[0] < img.size[0]
    # A run folder: its own trainer_state.json, else the newest checkpoint's.
    assert read_log_history(str(tmp_path / "run")) == STATE["log_history"]
    for step in (2, 10):
        d = tmp_path / "ck" / f"checkpoint-{step}"
        d.mkdir(parents=True)
        (d / "trainer_state.json").write_text(json.dumps({"log_history": STATE["log_history"][: step // 2]}))
    assert read_log_history(str(tmp_path / "ck")) == STATE["log_history"][:5]  # checkpoint-10, not -2
    # Missing keys are skipped; none present is an error naming what there is.
    training_curves_png(STATE["log_history"], str(tmp_path / "c2.png"), keys=("loss", "nope"))
    with pytest.raises(ValueError, match="learning_rate"):
        training_curves_png(STATE["log_history"], str(tmp_path / "c3.png"), keys=("nope",))
    with pytest.raises(ValueError, match="log_history"):
        (tmp_path / "bad.json").write_text("{}")
        read_log_history(str(tmp_path / "bad.json"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no trainer_state.json"):
        read_log_history(str(tmp_path / "empty"))
