"""OViP's online loop: pair filtering on hand-made scores, the experience buffer, seeded sampling, negative images, the
online step and the dataset builder (vpo.online)."""
import json
import math
import os
import sys

import numpy as np
import pytest
import torch

from vpo.online import (
    DiffusersNegativeGenerator,
    ExperienceBuffer,
    KeyedSampler,
    NegativeRequest,
    OnlineConfig,
    SelectedPair,
    ShapesNegativeGenerator,
    ShapesWorldJudge,
    expand_inputs,
    ovip_build_dataset,
    ovip_online_step,
    pair_margin,
    sample_responses,
    score_std,
    select_pairs,
    stream_seed,
)
from vpo.worlds import shapes


def _pairs(scores, **kw):
    return [(p.chosen, p.rejected) for p in select_pairs(scores, **kw)]


# ----------------------------------------------------------------------------------------------- pair filtering
def test_std_and_margin_by_hand():
    # [8, 5, 2]: mean 5, squared deviations 9 + 0 + 9 = 18.
    assert score_std([8, 5, 2]) == pytest.approx(math.sqrt(18 / 3))
    assert score_std([8, 5, 2], "sample") == pytest.approx(3.0)
    assert score_std([4]) == 0.0 and score_std([4], "sample") == 0.0 and score_std([]) == 0.0
    assert pair_margin([7, 5, 5, 5, 3]) == 3.0  # σ = sqrt(8/5) = 1.26: δ dominates
    assert pair_margin([10, 0, 10, 0]) == 10.0  # σ = 5: 2σ dominates


def test_greedy_highest_with_lowest_removing_used():
    # mean 5, squared deviations 16,16,9,9,4,4,1,1 -> σ = sqrt(60/8) = 2.739, m = 5.477.
    # (9, 1): 8 > m; (8, 2): 6 > m; (7, 3): 4 <= m -> stop. Each response is used at most once.
    pairs = select_pairs([9, 1, 8, 2, 7, 3, 6, 4])
    assert pairs == [SelectedPair(0, 1, 9.0, 1.0), SelectedPair(2, 3, 8.0, 2.0)]
    # Ties go to the earlier sample, and a used response leaves the pool: σ = sqrt(49.2/5) = 3.137, m = 6.27;
    # (8@0, 1@2): 7 > m; then (8@1, 1@3): 7 > m; 5 is left alone.
    assert _pairs([8, 8, 1, 1, 5]) == [(0, 2), (1, 3)]


def test_margin_two_sigma_and_delta():
    # δ bound: σ = 1.26 so m = δ. 7 − 3 = 4 > 3 pairs; with δ = 4, 4 is not > 4: no pair -> fallback to A*.
    assert _pairs([7, 5, 5, 5, 3]) == [(0, 4)]
    assert _pairs([7, 5, 5, 5, 3], delta=4) == [(None, 4)]
    # 2σ bound: half 10s, half 0s: σ = 5, m = 10, 10 − 0 is not > 10 -> fallback on the first 0.
    assert _pairs([10, 0, 10, 0]) == [(None, 1)]
    # Two responses can never pair: |r1 − r2| = 2σ exactly.
    assert _pairs([9, 1]) == [(None, 1)]
    # Population vs sample σ on [8, 5, 2]: m = 4.90 (pair) vs m = 6 (6 is not > 6: fallback).
    assert _pairs([8, 5, 2]) == [(0, 2)]
    assert _pairs([8, 5, 2], std="sample") == [(None, 2)]


def test_tau_thresholds_and_fallback():
    # r⁺ must be > τ_pos: 5 is not (σ = 2.17, m = 4.33, the gap 5 would do) -> fallback on the first 0.
    assert _pairs([5, 0, 0, 0]) == [(None, 1)]
    assert select_pairs([5, 0, 0, 0])[0] == SelectedPair(None, 1, None, 0.0)
    assert select_pairs([5, 0, 0, 0])[0].from_ground_truth
    # r⁻ must be < τ_neg: the 5s are not -> no pair, and min r = 5 is not < τ_neg -> no fallback either.
    assert _pairs([10, 5, 5, 5]) == []
    # Fallback disabled.
    assert _pairs([5, 0, 0, 0], ground_truth_fallback=False) == []
    # Thresholds moved: τ_pos = 4 lets 5 be chosen (5 − 0 = 5 > 4.33).
    assert _pairs([5, 0, 0, 0], tau_pos=4) == [(0, 1)]
    # One response, or all good ones.
    assert _pairs([2]) == [(None, 0)]
    assert _pairs([8]) == [] and _pairs([]) == []
    assert _pairs([9, 9, 9, 9]) == []


def test_select_pairs_rejects_bad_input():
    with pytest.raises(ValueError, match=r"scores\[1\] must be a finite number"):
        select_pairs([1.0, float("nan")])
    with pytest.raises(ValueError, match="std must be one of"):
        select_pairs([1.0], std="unbiased")
    with pytest.raises(ValueError, match="delta must be >= 0"):
        select_pairs([1.0], delta=-1)


# ------------------------------------------------------------------------------------------------------ buffer
def test_experience_buffer_fifo_keeps_the_rest():
    buf = ExperienceBuffer(3)
    buf.add(["a", "b"])
    assert not buf.ready and buf.take() is None and len(buf) == 2
    buf.add(["c", "d"])
    assert buf.take() == ["a", "b", "c"] and len(buf) == 1
    buf.add(["e", "f", "g", "h", "i"])
    assert buf.take() == ["d", "e", "f"] and buf.take() == ["g", "h", "i"] and buf.take() is None
    capped = ExperienceBuffer(2, max_size=3)
    capped.add([1, 2, 3, 4, 5])
    assert len(capped) == 3 and capped.dropped == 2 and capped.take() == [3, 4]
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        ExperienceBuffer(0)


def test_online_config_overrides():
    cfg = OnlineConfig.make(k=4, temperature=0.7)
    assert (cfg.k, cfg.temperature, cfg.delta) == (4, 0.7, 3.0)
    with pytest.raises(ValueError, match=r"unknown online option\(s\) \['kk'\]"):
        OnlineConfig.make(kk=4)
    with pytest.raises(ValueError, match="k must be an int >= 1"):
        OnlineConfig(k=0)


# ----------------------------------------------------------------------------------------------------- sampling
@pytest.fixture(scope="module")
def llava():
    from vpo.data import build_tiny_processor
    from vpo.models import tiny_llava

    n = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny models are fastest on one thread
    tiny = tiny_llava()
    yield tiny, build_tiny_processor("llava", tiny=tiny, words=shapes.vocabulary())
    torch.set_num_threads(n)


def _scene_images(n, seed=0):
    scenes = [shapes.random_scene(np.random.default_rng([seed, i])) for i in range(n)]
    return scenes, [shapes.render(s) for s in scenes]


def test_sampling_is_seeded_keyed_and_leaves_global_rng(llava):
    tiny, proc = llava
    _, images = _scene_images(3)
    prompts = ["describe the image.", "what is in the image?", "is there a red circle in the image?"]
    kw = dict(k=4, max_new_tokens=6, temperature=1.0)
    state = torch.get_rng_state()
    tiny.model.train()
    a = sample_responses(tiny.model, proc, prompts, images, seed=0, **kw)
    assert tiny.model.training  # mode restored
    tiny.model.eval()
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is untouched
    assert len(a) == 3 and all(len(x) == 4 for x in a)
    assert a == sample_responses(tiny.model, proc, prompts, images, seed=0, **kw)
    # Per-prompt streams: the batch size (and so the padding and the batch's other rows) changes nothing.
    assert a == sample_responses(tiny.model, proc, prompts, images, seed=0, batch_size=1, **kw)
    # Keys decide the stream: prompt 2 alone with key 2 reproduces its samples.
    assert sample_responses(tiny.model, proc, prompts[2:], images[2:], seed=0, keys=[2], **kw) == a[2:]
    assert a != sample_responses(tiny.model, proc, prompts, images, seed=1, **kw)
    assert len(set(a[0])) > 1  # sampling, not greedy
    greedy = sample_responses(tiny.model, proc, prompts[:1], images[:1], k=3, max_new_tokens=6, temperature=0)
    assert len(set(greedy[0])) == 1


def test_keyed_sampler_inverse_cdf():
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    scores = probs.log().expand(4, 4).clone()
    u = torch.tensor([[0.05], [0.15], [0.45], [0.95]], dtype=torch.float64)
    ids = torch.zeros(4, 3, dtype=torch.long)  # prompt_len 3: step 0

    def draw(**kw):
        out = KeyedSampler(u, 3, 1.0, **kw)(ids, scores)
        assert torch.isinf(out).sum() == 4 * 3 and (out == 0).sum() == 4
        return out.argmax(-1).tolist()

    assert draw() == [0, 1, 2, 3]  # cdf 0.1, 0.3, 0.6, 1.0
    assert draw(top_k=1) == [3, 3, 3, 3]
    assert draw(top_p=0.5) == [2, 2, 3, 3]  # keeps {3, 2} (mass above 2 is 0.4 < 0.5); cdf 3/7, 1


def test_expand_inputs_qwen_matches_repeated_rows():
    from vpo.data import build_tiny_processor
    from vpo.models import tiny_qwen2_vl

    proc = build_tiny_processor("qwen2_vl", tiny=tiny_qwen2_vl(), words=shapes.vocabulary())
    _, images = _scene_images(2)
    texts = ["<|vision_start|><|image_pad|><|vision_end|>describe", "<|vision_start|><|image_pad|><|vision_end|>what"]
    one = proc(text=texts, images=images, return_tensors="pt", padding=True)
    rep = proc(text=[t for t in texts for _ in range(3)], images=[i for i in images for _ in range(3)],
               return_tensors="pt", padding=True)
    got = expand_inputs({k: v for k, v in one.items()}, 3)
    assert set(got) == set(rep)
    for key in rep:
        assert torch.equal(got[key], rep[key]), key


# ---------------------------------------------------------------------------------------------------- negatives
def _has(img, color):
    return bool((np.asarray(img) == np.array(shapes.PALETTE[color], dtype=np.uint8)).all(-1).any())


RED_CIRCLE_TWO_BLUE_SQUARES = shapes.Scene((
    shapes.Obj("circle", "red", "large", "top left", (2, 2, 18, 18)),
    shapes.Obj("square", "blue", "large", "center", (23, 23, 39, 39)),
    shapes.Obj("square", "blue", "small", "bottom right", (46, 46, 55, 55)),
))


def test_shapes_negative_renders_the_rejected_caption():
    scene = RED_CIRCLE_TWO_BLUE_SQUARES
    gen = ShapesNegativeGenerator()
    req = NegativeRequest("describe the image.", shapes.describe(scene), "a green circle and two blue squares.",
                          shapes.render(scene), scene, seed=7)
    (img,) = gen.generate([req])
    want = shapes.render_description(req.rejected, np.random.default_rng(7), base=scene)
    assert np.array_equal(np.asarray(img), np.asarray(want))
    assert _has(img, "green") and _has(img, "blue") and not _has(img, "red")  # the circle recolored in place
    assert shapes.describe(shapes.scene_from_description(req.rejected, np.random.default_rng(7), base=scene)) == \
        "a green circle and two blue squares."
    # A row with "objects"/"scene" works as the context too; without a scene, a fresh layout of the caption.
    row = {"objects": [o.to_dict() for o in scene.objects], "scene": {"image_size": 64, "seed": 0, "clutter": False}}
    assert np.array_equal(np.asarray(gen.generate([NegativeRequest(**{**req.__dict__, "context": row})])[0]),
                          np.asarray(img))
    fresh = ShapesNegativeGenerator(mode="random").generate([req])[0]
    assert _has(fresh, "green") and _has(fresh, "blue") and not _has(fresh, "red")
    with pytest.raises(ValueError, match="mode='edit' needs the source scene"):
        ShapesNegativeGenerator(mode="edit").generate([NegativeRequest("q", "a", "b")])


def test_shapes_negative_for_a_wrong_yes_no_answer():
    scene = RED_CIRCLE_TWO_BLUE_SQUARES
    gen = ShapesNegativeGenerator()
    img = gen.generate([NegativeRequest("is there a green cross in the image?", "no", "yes", None, scene)])[0]
    assert _has(img, "green") and _has(img, "red") and _has(img, "blue")  # the claimed cross is added
    img = gen.generate([NegativeRequest("is there a red circle in the image?", "yes", "no", None, scene)])[0]
    assert not _has(img, "red") and _has(img, "blue")  # the denied circle is removed


def test_diffusers_generator_errors_clearly(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers -> ImportError, installed or not
    with pytest.raises(ImportError, match="pip install diffusers"):
        DiffusersNegativeGenerator(str(tmp_path))
    with pytest.raises(ValueError, match="model_path must be an existing local folder"):
        DiffusersNegativeGenerator(str(tmp_path / "missing"))


# ------------------------------------------------------------------------------------------------ the online step
def _scripted(samples):
    def sample_fn(prompts, images, *, k, seed, keys):
        assert len(prompts) == len(samples)
        return [list(s) for s in samples]

    return sample_fn


def test_online_step_pairs_negatives_and_buffer():
    scene = RED_CIRCLE_TWO_BLUE_SQUARES
    gt = shapes.describe(scene)
    assert gt == "a red circle and two blue squares."
    image = shapes.render(scene)
    samples = [
        # scores 10, 7.5, 0, (empty: dropped), 10 (a duplicate, judged once), 3.33 -> σ = 3.93, m = 7.86:
        # (10 @0, 0 @2) pairs; then 10 @4 vs 3.33 is 6.67 <= m.
        [gt, "a red circle, a green cross and two blue squares.", "a green circle.", "  ", gt, "a blue square."],
        ["on on", "the", "the"],  # all 0 -> fallback (A*, the first 0)
        ["on on", "the", "the"],  # no A* -> nothing
    ]
    buf = ExperienceBuffer(3)
    kw = dict(judge=ShapesWorldJudge(), negatives=ShapesNegativeGenerator(), buffer=buf,
              contexts=[scene, scene, scene], ids=["s0", "s1", "s2"], sample_fn=_scripted(samples), k=6)
    out, stats = ovip_online_step(None, None, ["describe the image."] * 3, [image] * 3, [gt, gt, None], seed=5, **kw)
    assert out == [] and len(buf) == 2
    assert stats["pairs"] == 2 and stats["fallback_pairs"] == 1 and stats["prompts_without_pair"] == 1
    assert stats["empty_responses"] == 1 and stats["responses"] == 12 and stats["judged"] == 8
    assert all(stats[k] >= 0 for k in ("sampling_s", "scoring_s", "negatives_s"))
    first, second = list(buf._items)
    assert (first.id, first.chosen, first.rejected) == ("s0/ovip-5-0", gt, "a green circle.")
    assert first.extra["ovip"]["chosen_score"] == 10.0 and first.extra["ovip"]["rejected_score"] == 0.0
    assert first.extra["ovip"]["margin"] == pytest.approx(2 * score_std([10, 7.5, 0, 10, 10 / 3]))
    assert (second.id, second.chosen, second.rejected) == ("s1/ovip-5-0", gt, "on on")
    assert second.extra["ovip"]["from_ground_truth"] and second.extra["ovip"]["chosen_score"] is None
    assert first.image is image and first.prompt == "describe the image."
    want = shapes.render_description("a green circle.", np.random.default_rng(stream_seed(
        "vpo.online.negative", 5, 0, 0)), base=scene)
    assert np.array_equal(np.asarray(first.neg_image), np.asarray(want))
    # The second step fills the buffer past N = 3: the three oldest come out, one stays.
    out, stats = ovip_online_step(None, None, ["describe the image."] * 3, [image] * 3, [gt, gt, None], seed=6, **kw)
    assert [r.id for r in out] == ["s0/ovip-5-0", "s1/ovip-5-0", "s0/ovip-6-0"] and len(buf) == 1
    assert stats["returned"] == 3 and stats["buffer_size"] == 1


def test_online_step_with_the_tiny_policy_collates(llava):
    from vpo.data import PreferenceCollator

    tiny, proc = llava
    scenes, images = _scene_images(2, seed=3)
    gts = [shapes.describe(s) for s in scenes]
    out, stats = ovip_online_step(tiny.model, proc, ["describe the image."] * 2, images, gts,
                                  judge=ShapesWorldJudge(), negatives=ShapesNegativeGenerator(), seed=0,
                                  contexts=scenes, k=3, max_new_tokens=5, temperature=1.0)
    # Random weights: every sample scores (near) 0, so each prompt falls back to A*.
    assert [r.chosen for r in out] == gts and stats["fallback_pairs"] == 2
    assert stats["sampling_s"] > 0 and stats["responses"] == 6
    batch = PreferenceCollator(proc, "llava", method="ovip")(out)
    assert batch["ids"] == [r.id for r in out] and set(batch["sub"]) == {"noimg", "negimg"}
    assert batch["input_ids"].shape[0] == 4 and batch["sub"]["negimg"]["input_ids"].shape[0] == 2


def test_build_dataset_is_readable_and_independent_of_batching(llava, tmp_path):
    from vpo.data import read_preference_jsonl

    tiny, proc = llava
    src = shapes.make_sft_dataset(str(tmp_path / "src"), 3, seed=0)  # 3 captions + 6 yes/no questions
    kw = dict(judge=ShapesWorldJudge(), negatives=ShapesNegativeGenerator(), seed=1, k=3, max_new_tokens=5,
              temperature=1.0, limit=5)
    a = ovip_build_dataset(str(tmp_path / "a"), tiny.model, proc, src, prompts_per_step=2, **kw)
    b = ovip_build_dataset(str(tmp_path / "b"), tiny.model, proc, src, prompts_per_step=5, **kw)
    assert a["records"] == b["records"] > 0 and a["examples"] == 5
    la, lb = (open(x["path"]).read() for x in (a, b))
    assert la == lb
    for line in la.splitlines():
        row = json.loads(line)
        for key in ("image", "neg_image"):
            assert open(tmp_path / "a" / row[key], "rb").read() == open(tmp_path / "b" / row[key], "rb").read()
    records, stats = read_preference_jsonl(a["path"], validate_images=True)
    assert stats.kept == a["records"] and all(r.neg_image and os.path.isfile(r.neg_image) for r in records)
    assert json.load(open(tmp_path / "a" / "train_ovip_stats.json"))["records"] == a["records"]


def test_online_dataset_yields_buffer_batches_and_reports_timings():
    from vpo.online import OViPOnlineDataset

    scenes, images = _scene_images(4, seed=1)
    rows = [{"id": f"r{i}", "image": im, "prompt": "describe the image.", "response": shapes.describe(s),
             "objects": [o.to_dict() for o in s.objects]} for i, (s, im) in enumerate(zip(scenes, images))]

    def sample_fn(prompts, images, *, k, seed, keys):
        # [A*, junk, junk]: scores [10, 0, 0], σ = 4.71, m = 9.43 -> one pair per prompt.
        return [[rows[i]["response"], "the", "the"] for i in keys]

    kw = dict(judge=ShapesWorldJudge(), negatives=ShapesNegativeGenerator(), buffer_size=3, prompts_per_step=2,
              sample_fn=sample_fn, k=3)
    ds = OViPOnlineDataset(rows, None, max_passes=1, **kw)
    assert isinstance(ds, torch.utils.data.IterableDataset)
    out = list(ds)
    assert len(out) == 3 and all(r.rejected == "the" and not r.extra["ovip"]["from_ground_truth"] for r in out)
    m = ds.pop_metrics()
    assert m["online/pairs"] == 4 and m["online/buffer_size"] == 1 and m["online/prompts"] == 4
    assert m["online/mean_score"] == pytest.approx(10 / 3) and m["online/sampling_s"] >= 0
    assert ds.pop_metrics() == {"online/buffer_size": 1.0}  # reset
    never = OViPOnlineDataset(rows, None, **{**kw, "sample_fn": lambda p, i, **_: [["the"]] * len(p),
                                             "ground_truth_fallback": False})
    with pytest.raises(RuntimeError, match="produced no OViP pair"):
        next(iter(never))
    with pytest.raises(RuntimeError, match="policy is not set"):
        next(iter(OViPOnlineDataset(rows, None, **{**kw, "sample_fn": None})))
