"""Hallucination at matched coverage (`vpo.eval.tradeoff`): the logit bias in generation, the reference's trade-off
curve, the interpolation, and the demo's matched-coverage numbers."""
import math
import os

import pytest

pytest.importorskip("transformers")

from vpo.eval.tradeoff import chair_at_coverage, coverage_curve  # noqa: E402
from vpo.worlds import shapes  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import torch

    from vpo.models.cache import load_or_build

    torch.set_num_threads(1)
    root = str(tmp_path_factory.mktemp("tradeoff"))
    shapes.make_eval_dataset(os.path.join(root, "data"), 5, seed=4, split="test", pope_per_scene=1)
    model, processor, _ = load_or_build(cache_dir=os.path.join(root, "cache"))
    return model, processor, os.path.join(root, "data")


def test_chair_at_coverage_interpolates_inside_and_refuses_outside():
    curve = [{"coverage": 0.8, "CHAIR_i": 0.30}, {"coverage": 0.4, "CHAIR_i": 0.10},
             {"coverage": 0.6, "CHAIR_i": 0.20}]  # any order
    assert chair_at_coverage(curve, 0.7) == pytest.approx(0.25)
    assert chair_at_coverage(curve, 0.45) == pytest.approx(0.125)
    assert chair_at_coverage(curve, 0.8) == pytest.approx(0.30)
    assert chair_at_coverage(curve, 0.4) == pytest.approx(0.10)
    assert math.isnan(chair_at_coverage(curve, 0.81)) and math.isnan(chair_at_coverage(curve, 0.3))
    from vpo.eval.tradeoff import format_curve

    assert format_curve([{"bias": 0.0, "coverage": 0.8, "CHAIR_i": 0.3}, {"bias": 2.5, "coverage": 0.6,
                                                                          "CHAIR_i": 0.2}]) == "0: 0.800 / 0.300, 2.5: 0.600 / 0.200"
    with pytest.raises(ValueError, match="curve is empty"):
        chair_at_coverage([], 0.5)


def test_logit_bias_steers_greedy_decoding_and_is_validated(tiny):
    from PIL import Image

    from vpo.eval.cli import make_generate_fn

    model, processor, data = tiny
    rows = shapes.read_jsonl(os.path.join(data, "test_captions.jsonl"))[:3]
    images = [Image.open(os.path.join(data, r["image"])).convert("RGB") for r in rows]
    prompts = [r["prompt"] for r in rows]
    red = processor.tokenizer.convert_tokens_to_ids("red")
    plain = make_generate_fn(model, processor, max_new_tokens=3)(prompts, images)
    forced = make_generate_fn(model, processor, max_new_tokens=3, logit_bias={red: 1e4})(prompts, images)
    assert all(t.split() == ["red"] * 3 for t in forced), forced
    assert forced != plain
    with pytest.raises(ValueError, match="logit_bias keys"):
        make_generate_fn(model, processor, logit_bias={10**6: 1.0})
    with pytest.raises(ValueError, match="finite"):
        make_generate_fn(model, processor, logit_bias={red: float("nan")})


def test_coverage_curve_points_are_plain_evaluations(tiny):
    from vpo.eval.cli import evaluate

    model, processor, data = tiny
    curve = coverage_curve(model, processor, data, "test", biases=(1e4, 0))
    assert [p["bias"] for p in curve] == [0.0, 1e4]
    plain = evaluate(model, processor, data, "test", progress=False, pope=False)["chair"]
    assert curve[0]["CHAIR_i"] == plain["chair_i"] and curve[0]["coverage"] == plain["coverage"]
    assert curve[0]["mentions"] == plain["num_mentions"]
    # a huge bias on "." ends every caption at once: nothing mentioned, nothing covered
    assert curve[1]["mentions"] == 0 and curve[1]["coverage"] == 0
    with pytest.raises(ValueError, match="stop_token"):
        coverage_curve(model, processor, data, "test", stop_token="zebra")
    with pytest.raises(ValueError, match="biases"):
        coverage_curve(model, processor, data, "test", biases=())


def test_demo_matched_coverage_numbers():
    from vpo.demo import matched_coverage

    curve = [{"coverage": 0.76, "CHAIR_i": 0.25}, {"coverage": 0.70, "CHAIR_i": 0.22}]
    before = {"CHAIR_i": 0.25, "CHAIR_i_se": 0.01}
    m = matched_coverage(curve, {"CHAIR_i": 0.20, "coverage": 0.72}, before)
    assert m["sft_CHAIR_i"] == pytest.approx(0.23) and m["gain"] == pytest.approx(0.03)
    assert m["gain_se"] == pytest.approx(3.0)
    # saying less without seeing better: on the curve, no gain
    assert matched_coverage(curve, {"CHAIR_i": 0.22, "coverage": 0.70}, before)["gain"] == pytest.approx(0.0)
    # covering more than the SFT model: compared with the SFT model as decoded
    m = matched_coverage(curve, {"CHAIR_i": 0.21, "coverage": 0.80}, before)
    assert m["coverage"] == 0.76 and m["gain"] == pytest.approx(0.04)
