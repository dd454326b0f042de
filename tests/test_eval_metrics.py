"""CHAIR, coverage and POPE on hand-built responses with hand-computed values; the model-agnostic driver."""
import math

import numpy as np
import pytest

from vpo.eval import chair, coverage, evaluate_dir, evaluate_model, format_report, parse_yes_no, pope, score_response
from vpo.worlds import shapes as S


def obj(shape, color):
    return S.Obj(shape, color, "small", "center", (0, 0, 3, 3))


# A: a red circle and two blue squares.   B: a green triangle and a yellow cross.   C: a red square.
SCENE_A = S.Scene((obj("circle", "red"), obj("square", "blue"), obj("square", "blue")))
SCENE_B = S.Scene((obj("triangle", "green"), obj("cross", "yellow")))
SCENE_C = S.Scene((obj("square", "red"),))

RESPONSES = [
    # mentions (1 red circle) (1 green circle) (3 blue squares); "star" is no shape of the world -> not a mention.
    # object hallucinations 0 (circle, square present); attribute 1 (green circle: circle present, green absent).
    # counted kinds: red circle 1 == 1, blue square 3 != 2 -> 1 count error of 2; covered kinds 2 of 2;
    # covered objects min(1,1) + min(3,2) = 3 of 3.
    "a red circle, a green circle and three blue squares and a yellow star.",
    # mentions (1 green triangle) (1 red square): square absent from B -> 1 object hallucination, 0 attribute.
    # counted: green triangle 1 == 1 -> 0 errors of 1; covered kinds 1 of 2; covered objects 1 of 2.
    "a green triangle and a red square.",
    # no mention: covered kinds 0 of 1, covered objects 0 of 1.
    "nothing here.",
]


def test_chair_hand_computed():
    m = chair(RESPONSES, [SCENE_A, SCENE_B, SCENE_C])
    assert m.num_responses == 3 and m.num_mentions == 5  # 3 + 2 + 0
    assert m.chair_i == pytest.approx(1 / 5)  # 1 hallucinated mention (red square in B) of 5
    assert m.chair_s == pytest.approx(1 / 3)  # only response B has one
    assert m.attr_i == pytest.approx(1 / 5)  # green circle in A
    assert m.attr_s == pytest.approx(1 / 3)
    assert m.pair_i == pytest.approx(2 / 5)  # object or attribute
    assert m.pair_s == pytest.approx(2 / 3)
    assert m.count_error == pytest.approx(1 / 3)  # (1 + 0 + 0) / (2 + 1 + 0)
    assert m.coverage == pytest.approx(3 / 5)  # (2 + 1 + 0) / (2 + 2 + 1)
    assert m.instance_coverage == pytest.approx(4 / 6)  # (3 + 1 + 0) / (3 + 2 + 1)
    assert coverage(RESPONSES, [SCENE_A, SCENE_B, SCENE_C]) == pytest.approx(3 / 5)
    per = m.per_response
    assert [len(p.hallucinated) for p in per] == [0, 1, 0]
    assert per[0].attribute == (S.Mention(1, "green", "circle"),)
    assert per[1].hallucinated == (S.Mention(1, "red", "square"),)
    d = m.to_dict()
    assert "per_response" not in d and d["chair_i"] == pytest.approx(0.2)


def test_chair_scene_forms_and_details():
    # Scenes as Scene, as object dicts, as a dataset record: the same numbers.
    dicts = [o.to_dict() for o in SCENE_A.objects]
    for scene in (SCENE_A, dicts, {"objects": dicts}, list(SCENE_A.objects)):
        assert chair(RESPONSES[:1], [scene]).to_dict() == chair(RESPONSES[:1], [SCENE_A]).to_dict()
    # The detailed style: per-object mentions add up to the right count.
    detailed = ("a large blue square at the top, a small blue square on the left and a small red circle in the "
                "center.")
    m = chair([detailed], [SCENE_A])
    assert (m.num_mentions, m.chair_i, m.count_error, m.coverage, m.instance_coverage) == (3, 0.0, 0.0, 1.0, 1.0)
    # A mention without a color: judged by its shape only (circle absent from B -> hallucinated, never attribute).
    s = score_response("there are circles and a triangle", SCENE_B)
    assert s.hallucinated == (S.Mention(None, None, "circle"),) and s.attribute == ()
    assert (s.covered_kinds, s.count_errors) == (0, 0)  # a colorless mention covers no (color, shape) kind
    # Perfect captions of random scenes.
    scenes = [S.random_scene(np.random.default_rng(i)) for i in range(10)]
    perfect = chair([S.describe(sc) for sc in scenes], scenes)
    assert (perfect.chair_i, perfect.chair_s, perfect.attr_i, perfect.count_error, perfect.coverage,
            perfect.instance_coverage) == (0, 0, 0, 0, 1, 1)
    # Empty input: all zeros, no division error.
    assert chair([], []).chair_i == 0.0


def test_chair_errors():
    with pytest.raises(ValueError, match="one scene per response"):
        chair(["a red circle."], [])
    with pytest.raises(ValueError, match="single str"):
        chair("a red circle.", [SCENE_A])
    with pytest.raises(ValueError, match="'objects'"):
        chair(["x"], [{"shapes": []}])


def test_pope_hand_computed():
    gold = ["yes", "yes", "yes", "no", "no", "no", "no", "yes"]
    answers = ["Yes.", "no", "I think so", "No, there isn't.", "yes", "NO", "Nope", "yes, no"]
    # predictions:  yes, no, (none), no, yes, no, (none: "nope" is not "no"), yes (the first word wins)
    # gold yes (0, 1, 2, 7): TP = 2 (0, 7), FN = 2 (1; 2 unparsed)
    # gold no (3, 4, 5, 6): TN = 2 (3, 5), FP = 1 (4); 6 unparsed is neither
    r = pope(answers, gold)
    assert (r.tp, r.fp, r.tn, r.fn, r.unparsed, r.num_questions) == (2, 1, 2, 2, 2, 8)
    assert r.accuracy == pytest.approx(4 / 8)
    assert r.precision == pytest.approx(2 / 3)
    assert r.recall == pytest.approx(2 / 4)
    assert r.f1 == pytest.approx(2 * (2 / 3) * (1 / 2) / (2 / 3 + 1 / 2))  # = 4/7
    assert r.f1 == pytest.approx(4 / 7)
    assert r.yes_ratio == pytest.approx(3 / 8)  # answers 0, 4, 7
    # Gold answers as Question objects and as dicts give the same result.
    qs = [S.Question("q", g, "red", "circle", "random") for g in gold]
    assert pope(answers, qs) == r == pope(answers, [{"answer": g.upper()} for g in gold])


def test_pope_edge_cases():
    assert [parse_yes_no(a) for a in ["Yes!", "  no.", "YES", "yesterday", "know", "nobody", "", None, "y",
                                      "well, no-yes", "The answer is yes"]] == \
        ["yes", "no", "yes", None, None, None, None, None, None, "no", "yes"]
    r = pope(["maybe"], ["yes"])  # unparsed counts as wrong: a false negative here
    assert (r.accuracy, r.precision, r.recall, r.f1, r.unparsed, r.fn) == (0.0, 0.0, 0.0, 0.0, 1, 1)
    r = pope(["maybe"], ["no"])  # ... and neither TN nor FP here
    assert (r.accuracy, r.tn, r.fp, r.unparsed) == (0.0, 0, 0, 1)
    r = pope([], [])
    assert (r.accuracy, r.f1, r.yes_ratio) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="one answer per question"):
        pope(["yes"], ["yes", "no"])
    with pytest.raises(ValueError, match="'yes'/'no'"):
        pope(["yes"], ["maybe"])


def _oracle(scenes):
    """A perfect model: looks the image up and answers from the ground truth."""
    by_pixels = {S.render(s).tobytes(): s for s in scenes}

    def generate(prompts, images):
        out = []
        for p, im in zip(prompts, images):
            scene = by_pixels[im.tobytes()]
            if p.startswith("is there"):
                m = S.parse_description(p)[0]
                out.append("yes" if (m.color, m.shape) in scene.counts() else "no")
            else:
                out.append(S.describe(scene))
        return out

    return generate


def test_evaluate_model_driver():
    scenes = [S.random_scene(np.random.default_rng(100 + i)) for i in range(6)]
    qs = [q for mode in S.POPE_MODES for q in S.pope_questions(scenes, mode=mode, per_scene=2)]
    calls = []

    def counted(prompts, images):
        calls.append(len(prompts))
        return _oracle(scenes)(prompts, images)

    rep = evaluate_model(counted, scenes, questions=qs, batch_size=4)
    assert max(calls) <= 4 and sum(calls) == len(scenes) + len(qs)
    assert rep["chair"]["chair_i"] == 0.0 and rep["chair"]["coverage"] == 1.0
    assert rep["pope"]["accuracy"] == 1.0 and rep["pope"]["num_questions"] == len(qs)
    assert {k for k in rep if k.startswith("pope/")} == {f"pope/{m}" for m in S.POPE_MODES}
    assert all(rep[f"pope/{m}"]["f1"] == 1.0 for m in S.POPE_MODES)
    text = format_report(rep)
    assert "CHAIR_i 0.000" in text and "pope/adversarial" in text and len(text.splitlines()) == 5
    # A model that always says yes and hallucinates a red cross everywhere.
    rep = evaluate_model(lambda p, im: ["yes, a red cross." for _ in p], scenes, questions=qs)
    assert rep["pope"]["yes_ratio"] == 1.0 and rep["pope"]["accuracy"] == pytest.approx(0.5)
    assert rep["pope"]["recall"] == 1.0 and rep["pope"]["precision"] == pytest.approx(0.5)
    expected = sum("cross" not in {o.shape for o in s.objects} for s in scenes) / len(scenes)
    assert rep["chair"]["chair_s"] == pytest.approx(expected) and rep["chair"]["chair_i"] == pytest.approx(expected)
    with pytest.raises(ValueError, match="returned 0 texts"):
        evaluate_model(lambda p, im: [], scenes)


def test_evaluate_dir(tmp_path):
    paths = S.make_eval_dataset(str(tmp_path), 5, seed=3, split="test", pope_per_scene=2)
    scenes = [S.Scene.from_dict(r) for r in S.read_jsonl(paths["captions"])]
    rep = evaluate_dir(_oracle(scenes), str(tmp_path), "test", batch_size=3)
    assert rep["chair"]["num_responses"] == 5 and rep["chair"]["chair_i"] == 0.0
    assert rep["pope"]["accuracy"] == 1.0
    rep = evaluate_dir(_oracle(scenes), str(tmp_path), "test", limit=2)
    assert rep["chair"]["num_responses"] == 2
    assert all(math.isfinite(v) for v in rep["chair"].values())
    with pytest.raises(ValueError, match="make_eval_dataset"):
        evaluate_dir(_oracle(scenes), str(tmp_path), "nope")


def test_prior_chair_by_hand():
    """Prior-triggered mentions: partner mentions where the trigger is in the scene; cases: trigger without partner."""
    from vpo.eval.metrics import binomial_se, prior_chair
    from vpo.worlds.shapes import Obj, Scene

    def obj(shape, color="red", cell="center"):
        return Obj(shape, color, "small", cell, (25, 25, 33, 33))

    pairs = [("circle", "square"), ("triangle", "cross")]
    scenes = [
        Scene((obj("circle"),)),                                   # case (circle, no square)
        Scene((obj("circle"), obj("square", cell="top"))),         # no case: the square is there
        Scene((obj("triangle"), obj("circle", cell="top"))),       # two cases
        Scene((obj("square"),)),                                   # no trigger at all
    ]
    responses = [
        "a red circle and a red square.",           # hallucinated partner (1 of 1 case mentioned)
        "a red circle and a red square.",           # a true partner mention
        "a red triangle and a red circle.",         # both partners correctly left out
        "a red square and a red cross.",            # no trigger in the scene: not prior-triggered
    ]
    r = prior_chair(responses, scenes, pairs)
    assert (r.num_prior_mentions, r.num_prior_hallucinated, r.num_cases, r.num_cases_mentioned) == (2, 1, 3, 1)
    assert r.chair_prior == 0.5 and r.prior_rate == pytest.approx(1 / 3)
    assert r.chair_prior_se == pytest.approx(binomial_se(0.5, 2)) == pytest.approx(0.5 ** 0.5 / 2)
    assert prior_chair([], [], pairs).chair_prior == 0.0  # 0/0 is 0
    with pytest.raises(ValueError, match="one scene per response"):
        prior_chair(["x"], [], pairs)
    with pytest.raises(ValueError, match="pairs"):
        prior_chair(responses, scenes, [])
