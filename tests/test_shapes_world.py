"""The shapes world: ground truth read back from the pixels, the caption grammar, hallucinated pairs, negative images,
questions and the dataset writers (determinism included)."""
import json
import os
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from vpo.worlds import shapes as S

SEEDS = range(24)


# ------------------------------------------------------------------------------------------------ a pixel detector
def components(img, rgb):
    """8-connected components of the pixels exactly equal to ``rgb``: ``[(bbox x0,y0,x1,y1 exclusive, mask)]``."""
    a = np.asarray(img)
    mask = np.all(a == np.array(rgb, dtype=a.dtype), axis=-1)
    seen = np.zeros_like(mask)
    out = []
    H, W = mask.shape
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        stack, pts = [(y, x)], []
        seen[y, x] = True
        while stack:
            cy, cx = stack.pop()
            pts.append((cy, cx))
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ny, nx = cy + dy, cx + dx
                    if 0 <= ny < H and 0 <= nx < W and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        stack.append((ny, nx))
        ys, xs = zip(*pts)
        x0, y0, x1, y1 = min(xs), min(ys), max(xs) + 1, max(ys) + 1
        comp = np.zeros((y1 - y0, x1 - x0), bool)
        comp[np.array(ys) - y0, np.array(xs) - x0] = True
        out.append(((x0, y0, x1, y1), comp))
    return out


def classify(comp):
    """The shape of a filled component from its fill ratio and which rows are full width."""
    h, w = comp.shape
    fill = comp.mean()
    full_rows = comp.sum(1) == w
    if fill > 0.97:
        return "square"
    if full_rows[-1] and comp[0].sum() <= max(2, w // 4):
        return "triangle"
    if fill > 0.68:
        return "circle"
    if full_rows[h // 2] and comp[0].sum() <= w / 2 + 1:
        return "cross"
    return "unknown"


def detect(img):
    """``[(color, shape, bbox)]`` of every palette-colored component."""
    return [(c, classify(m), b) for c in S.COLORS for b, m in components(img, S.PALETTE[c])]


def same_box(a, b, tol=0):
    """Boxes equal within ``tol`` px; drawn without anti-aliasing, the objects fill their boxes exactly (tol 0)."""
    return all(abs(u - v) <= tol for u, v in zip(a, b))


# ------------------------------------------------------------------------------------------ ground truth vs pixels
@pytest.mark.parametrize("image_size", [64, 96])
@pytest.mark.parametrize("clutter", [False, True])
def test_render_matches_ground_truth(image_size, clutter):
    for seed in SEEDS:
        scene = S.random_scene(np.random.default_rng(seed), image_size=image_size)
        img = S.render(scene, clutter=clutter)
        assert img.size == (image_size, image_size) and img.mode == "RGB"
        found = detect(img)
        assert len(found) == len(scene.objects), (seed, found, scene)
        for o in scene.objects:
            match = [f for f in found if f[0] == o.color and same_box(f[2], o.bbox)]
            assert len(match) == 1, (seed, o, found)
            assert match[0][1] == o.shape, (seed, o, match)
        # counts per color match
        assert Counter(f[0] for f in found) == Counter(o.color for o in scene.objects)


def test_positions_and_layout():
    for seed in SEEDS:
        scene = S.random_scene(np.random.default_rng(seed), min_objects=4, max_objects=4)
        assert len({o.position for o in scene.objects}) == 4  # one object per cell
        for o in scene.objects:
            x0, y0, x1, y1 = o.bbox
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            row, col = int(cy // (64 / 3)), int(cx // (64 / 3))
            assert S.POSITIONS[3 * row + col] == o.position
            assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
            assert (x1 - x0) == (y1 - y0) == {"small": 10, "large": 17}[o.size]


def test_clutter_is_gray_and_only_with_flag():
    scene = S.random_scene(np.random.default_rng(3))
    plain, noisy = np.asarray(S.render(scene)), np.asarray(S.render(scene, clutter=True))
    diff = np.any(plain != noisy, axis=-1)
    assert diff.any()
    px = noisy[diff]
    assert np.all(px[:, 0] == px[:, 1]) and np.all(px[:, 1] == px[:, 2])  # gray only
    background = np.all(plain == S.BACKGROUND, axis=-1)
    assert background[diff].all()  # clutter never covers an object


def test_scene_roundtrip_dict():
    scene = S.random_scene(np.random.default_rng(5))
    assert S.Scene.from_dict(json.loads(json.dumps(scene.to_dict()))) == scene


def test_random_scene_errors():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="max_objects"):
        S.random_scene(rng, max_objects=5)
    with pytest.raises(ValueError, match="image_size"):
        S.random_scene(rng, image_size=16)
    with pytest.raises(ValueError, match="colors"):
        S.random_scene(rng, colors=("purple",))


# ------------------------------------------------------------------------------------------------------- captions
def test_describe_grammar_by_hand():
    objs = (S.Obj("square", "blue", "small", "top left", (1, 1, 11, 11)),
            S.Obj("circle", "red", "large", "center", (23, 23, 40, 40)),
            S.Obj("square", "blue", "large", "bottom right", (45, 45, 62, 62)))
    scene = S.Scene(objs)
    assert S.describe(scene) == "a red circle and two blue squares."
    assert S.describe(scene, "detailed") == ("a small blue square at the top left, a large red circle in the center "
                                             "and a large blue square at the bottom right.")
    one = S.Scene(objs[1:2])
    assert S.describe(one) == "a red circle."
    crosses = S.Scene((S.Obj("cross", "green", "small", "left", (1, 23, 11, 33)),
                       S.Obj("cross", "green", "small", "right", (45, 23, 55, 33)),
                       S.Obj("triangle", "yellow", "small", "top", (23, 1, 33, 11))))
    assert S.describe(crosses) == "two green crosses and a yellow triangle."
    assert S.describe(S.Scene(())) == "nothing."
    with pytest.raises(ValueError, match="style"):
        S.describe(scene, "poem")


@pytest.mark.parametrize("style", S.CAPTION_STYLES)
def test_describe_parse_roundtrip(style):
    for seed in SEEDS:
        scene = S.random_scene(np.random.default_rng(seed))
        mentions = S.parse_description(S.describe(scene, style))
        assert S.mention_counts(mentions) == scene.counts()
        if style == "count":
            assert len(mentions) == len(scene.counts())  # one mention per (color, shape) group


def test_parse_tolerates_extra_words():
    M = S.Mention
    assert S.parse_description("The image shows TWO big shiny Blue Squares, and one red circle!") == [
        M(2, "blue", "square"), M(1, "red", "circle")]
    assert S.parse_description("there are circles") == [M(None, None, "circle")]
    assert S.parse_description("a circle that is red") == [M(1, None, "circle")]  # color after the noun: not read
    assert S.parse_description("there is no red circle, but a blue cross") == [M(1, "blue", "cross")]
    assert S.parse_description("red and a square") == [M(1, None, "square")]  # "and" stops the look-back
    assert S.parse_description("") == []


def test_vocabulary_covers_every_text():
    vocab = set(S.vocabulary())
    assert {"circle", "crosses", "yes", "no", ".", ",", "?", "describe"} <= vocab
    assert "crosss" not in vocab
    texts = list(S.DESCRIBE_PROMPTS)
    for seed in SEEDS:
        rng = np.random.default_rng(seed)
        scene = S.random_scene(rng)
        texts += [S.describe(scene), S.describe(scene, "detailed")]
        for kind in S.HALLUCINATION_KINDS:
            texts.append(S.make_pair(scene, rng, kind).rejected)
        texts += [q.prompt + " " + q.answer for q in S.yes_no_questions(scene, rng, 3)]
    for t in texts:
        assert set(S.split_words(t)) <= vocab, t


# ---------------------------------------------------------------------------------------------- preference pairs
def _substitute(text, spans, words):
    for (a, b), w in sorted(zip(spans, words), reverse=True):
        text = text[:a] + w + text[b:]
    return text


@pytest.mark.parametrize("kind", S.HALLUCINATION_KINDS)
def test_pairs_differ_exactly_as_declared(kind):
    for seed in SEEDS:
        rng = np.random.default_rng(seed)
        scene = S.random_scene(rng)
        pair = S.make_pair(scene, rng, kind)
        h = pair.hallucination
        assert pair.chosen == S.describe(scene) and pair.prompt in S.DESCRIBE_PROMPTS
        assert h.kind == kind  # every scene here admits every kind
        assert tuple(pair.rejected[a:b] for a, b in h.spans) == h.words
        flagged = [w for w, f in zip(S.split_words(pair.rejected), S.word_span_mask(pair.rejected, h.spans)) if f]
        assert flagged == " ".join(h.words).split()
        chosen, rejected = S.parse_description(pair.chosen), S.parse_description(pair.rejected)
        truth = scene.counts()
        assert (h.claimed.color, h.claimed.shape) not in truth or kind == "count"
        if kind == "absent":
            assert h.truth is None and h.claimed.count == 1
            assert Counter(rejected) == Counter(chosen) + Counter([h.claimed])
            assert h.words == (f"a {h.claimed.color} {h.claimed.shape}",)
            if len(scene.shapes()) < len(S.SHAPES):  # an absent shape when there is one (object-level error)
                assert h.claimed.shape not in scene.shapes()
        else:
            assert Counter(chosen) - Counter(rejected) == Counter([h.truth])
            assert Counter(rejected) - Counter(chosen) == Counter([h.claimed])
            if kind == "color":
                assert h.claimed._replace(color=h.truth.color) == h.truth and h.words == (h.claimed.color,)
            else:
                assert h.claimed._replace(count=h.truth.count) == h.truth and h.claimed.count != h.truth.count
            # Putting the true words back into the declared spans undoes the error: nothing else differs. (A color
            # change can move the group in the canonical color order, so then only the mentions are compared.)
            true_words = [h.truth.color] if kind == "color" else [S.COUNT_WORDS[h.truth.count],
                                                                  S.plural(h.truth.shape, h.truth.count)]
            restored = _substitute(pair.rejected, h.spans, true_words[: len(h.spans)])
            if kind == "count":
                assert restored == pair.chosen
            else:
                assert Counter(S.parse_description(restored)) == Counter(chosen)
                assert len(S.split_words(restored)) == len(S.split_words(pair.chosen))
            assert scene.objects[h.object_index].kind == (h.truth.color, h.truth.shape)


def test_pair_group_order_is_canonical():
    # The rejected caption keeps the canonical order: it cannot be told from the chosen one by word order.
    for seed in SEEDS:
        rng = np.random.default_rng(seed)
        scene = S.random_scene(rng)
        rej = S.make_pair(scene, rng).rejected
        keys = [(S.COLORS.index(m.color), S.SHAPES.index(m.shape)) for m in S.parse_description(rej)]
        assert keys == sorted(keys)


def test_color_falls_back_when_impossible():
    # Every color of the only shape is present: no color error exists, another kind is used.
    objs = tuple(S.Obj("circle", c, "small", S.POSITIONS[i], (0, 0, 3, 3)) for i, c in enumerate(S.COLORS))
    pair = S.make_pair(S.Scene(objs), np.random.default_rng(0), "color")
    assert pair.hallucination.kind in ("absent", "count")


# ------------------------------------------------------------------------------------------ negative images (OViP)
@pytest.mark.parametrize("kind", S.HALLUCINATION_KINDS)
def test_negative_image_is_minimal_edit(kind):
    for seed in SEEDS:
        rng = np.random.default_rng(seed)
        scene = S.random_scene(rng)
        pair = S.make_pair(scene, rng, kind)
        neg = S.scene_from_description(pair.rejected, rng, base=scene)
        assert neg.counts() == S.mention_counts(S.parse_description(pair.rejected))
        assert neg.seed == scene.seed and len({o.position for o in neg.objects}) == len(neg.objects)
        boxes, neg_boxes = {o.bbox for o in scene.objects}, {o.bbox for o in neg.objects}
        if kind == "color":  # recolored in place
            assert boxes == neg_boxes
            changed = sum(o.kind != n.kind for o, n in zip(scene.objects, neg.objects))  # both in cell order
            assert changed == pair.hallucination.truth.count
        elif kind == "absent":  # everything kept, one object added
            assert set(scene.objects) < set(neg.objects) and len(neg.objects) == len(scene.objects) + 1
        else:
            small, big = sorted([set(scene.objects), set(neg.objects)], key=len)
            assert small <= big
        # The rendered negative shows what the rejected caption says.
        found = detect(S.render(neg, clutter=True))
        assert Counter((c, s) for c, s, _ in found) == neg.counts()


def test_render_description_fresh_layout():
    for seed in SEEDS:
        rng = np.random.default_rng(seed)
        text = S.describe(S.random_scene(rng))
        img = S.render_description(text, rng, image_size=96)
        assert img.size == (96, 96)
        found = detect(img)
        assert Counter((c, s) for c, s, _ in found) == S.mention_counts(S.parse_description(text))
    # Uncolored mentions get a color; at most 9 objects.
    scene = S.scene_from_description("four circles, four squares and four crosses", np.random.default_rng(0))
    assert len(scene.objects) == 9 and all(o.color in S.COLORS for o in scene.objects)


# ------------------------------------------------------------------------------------------------------ questions
def test_yes_no_questions_balanced_and_true():
    for seed in SEEDS:
        rng = np.random.default_rng(seed)
        scene = S.random_scene(rng)
        qs = S.yes_no_questions(scene, rng, 2)
        yes = [q for q in qs if q.answer == "yes"]
        assert len(yes) == len(qs) - len(yes) == min(2, len(scene.counts()))
        for q in qs:
            assert q.prompt == f"is there a {q.color} {q.shape} in the image?"
            assert (q.answer == "yes") == ((q.color, q.shape) in scene.counts())


def test_pope_modes():
    scenes = [S.random_scene(np.random.default_rng(s)) for s in SEEDS]
    for mode in S.POPE_MODES:
        qs = S.pope_questions(scenes, seed=1, mode=mode, per_scene=3)
        assert sum(q.answer == "yes" for q in qs) * 2 == len(qs)
        assert all(q.mode == mode for q in qs)
        assert qs == S.pope_questions(scenes, seed=1, mode=mode, per_scene=3)  # seeded
    popularity = Counter(k for s in scenes for k in s.counts())
    for q in S.pope_questions(scenes, mode="popular"):
        if q.answer == "no":  # no absent kind of this scene is strictly more popular than a chosen negative
            absent = [k for k in popularity if k not in scenes[q.scene_index].counts()]
            chosen = popularity[(q.color, q.shape)]
            assert sum(popularity[k] > chosen for k in absent) < 3
    for q in S.pope_questions(scenes, mode="adversarial", per_scene=1):
        if q.answer == "no":  # a near miss: the scene has this shape (a wrong color)
            assert q.shape in scenes[q.scene_index].shapes()


# ------------------------------------------------------------------------------------------------------ datasets
def _files(root):
    out = {}
    for d, _, fs in os.walk(root):
        for f in fs:
            p = os.path.join(d, f)
            out[os.path.relpath(p, root)] = open(p, "rb").read()
    return out


def test_make_dataset_layout_and_determinism(tmp_path):
    a = S.make_dataset(str(tmp_path / "a"), 6, seed=7, clutter=True)
    S.make_dataset(str(tmp_path / "b"), 6, seed=7, clutter=True)
    S.make_dataset(str(tmp_path / "c"), 6, seed=8, clutter=True)
    S.make_dataset(str(tmp_path / "d"), 3, seed=7, clutter=True)
    fa, fb = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert fa == fb and len(fa) == 1 + 2 * 6  # byte-for-byte
    assert fa["train.jsonl"] != _files(tmp_path / "c")["train.jsonl"]
    # record i does not depend on n
    assert fa["train.jsonl"].splitlines()[:3] == _files(tmp_path / "d")["train.jsonl"].splitlines()
    rows = S.read_jsonl(a)
    assert len({r["id"] for r in rows}) == 6
    for r in rows:
        assert {"id", "image", "prompt", "chosen", "rejected", "neg_image", "bbox", "objects"} <= set(r)
        scene = S.Scene.from_dict(r)
        img = Image.open(tmp_path / "a" / r["image"])
        assert np.array_equal(np.asarray(img.convert("RGB")), np.asarray(S.render(scene, clutter=True)))
        assert r["chosen"] == S.describe(scene)
        h = r["hallucination"]
        assert r["bbox"] == list(scene.objects[h["object_index"]].bbox)
        assert [r["rejected"][s:e] for s, e in h["spans"]] == h["words"]
        neg = detect(Image.open(tmp_path / "a" / r["neg_image"]).convert("RGB"))
        assert Counter((c, s) for c, s, _ in neg) == S.mention_counts(S.parse_description(r["rejected"]))


def test_make_sft_and_eval_datasets(tmp_path):
    sft = S.make_sft_dataset(str(tmp_path), 4, seed=0, questions_per_image=1)
    rows = S.read_jsonl(sft)
    assert len(rows) == 4 * 3  # caption + one yes + one no per image
    for r in rows:
        scene = S.Scene.from_dict(r)
        if r["id"].endswith("caption"):
            assert r["response"] == S.describe(scene)
        else:
            c, s = S.parse_description(r["prompt"])[0][1:]
            assert r["response"] == ("yes" if (c, s) in scene.counts() else "no")
    paths = S.make_eval_dataset(str(tmp_path), 5, seed=0, split="test", pope_per_scene=2)
    caps, pope = S.read_jsonl(paths["captions"]), S.read_jsonl(paths["pope"])
    assert len(caps) == 5 and {q["mode"] for q in pope} == set(S.POPE_MODES)
    assert all(os.path.exists(tmp_path / c["image"]) for c in caps)
    # held out: the test split's scenes are not the sft split's
    assert [c["objects"] for c in caps[:4]] != [r["objects"] for r in rows if r["id"].endswith("caption")]


# ------------------------------------------------------------------------------------------- the language prior
def _scenes(path):
    seen, out = set(), []
    for r in S.read_jsonl(path):
        if r["image"] not in seen:  # the SFT file has three rows per image
            seen.add(r["image"])
            out.append(S.Scene.from_dict(r))
    return out


def test_prior_holds_in_the_sft_split_and_is_broken_in_the_held_out_splits(tmp_path):
    """The world's statistics: P(partner | trigger) = 0.95 where the prior is learned (SFT), 0.5 in the preference
    pairs and the held-out validation and test splits; the partner alone keeps its base rate everywhere."""
    prior = S.DEFAULT_PRIOR
    root = str(tmp_path)
    sft = S.make_sft_dataset(root, 600, seed=0, prior=prior)
    pairs = S.make_dataset(root, 400, seed=0, prior=prior)
    test = S.make_eval_dataset(root, 600, seed=0, split="test", prior=prior, pope_per_scene=1)["captions"]
    plain = [S.random_scene(S.record_rng(0, "sft", i)) for i in range(600)]
    for name, path, want in (("sft", sft, 0.95), ("train", pairs, 0.5), ("test", test, 0.5)):
        stats = S.cooccurrence(_scenes(path))
        for pair, st in stats.items():
            n = st["n_trigger"]
            se = (want * (1 - want) / n) ** 0.5
            assert n > 150, (name, pair, n)
            assert abs(st["p_partner_given_trigger"] - want) < 4 * se + 0.01, (name, pair, st)
            assert 0.3 < st["p_partner_given_no_trigger"] < 0.7, (name, pair, st)  # the base rate, ~0.5
    # the prior is a real edit: without it P(partner | trigger) is the base rate
    for st in S.cooccurrence(plain).values():
        assert 0.3 < st["p_partner_given_trigger"] < 0.7
    # the held-out records carry the pairs the metrics read
    row = S.read_jsonl(test)[0]
    assert row["scene"]["prior"]["pairs"] == [list(p) for p in prior.pairs] and row["scene"]["prior"]["p"] == 0.5


def test_prior_apply_adds_in_the_triggers_color_or_removes_every_partner():
    prior = S.CooccurrencePrior((("circle", "square"),), strength=1.0, held_out_p=0.0)
    base = S.Scene((S.Obj("circle", "red", "small", "center", (25, 25, 33, 33)),
                    S.Obj("triangle", "blue", "small", "top", (25, 2, 33, 10))))
    rng = np.random.default_rng(0)
    added = prior.apply(base, rng, 1.0)
    new = [o for o in added.objects if o not in base.objects]
    assert len(new) == 1 and new[0].kind == ("red", "square") and new[0].position not in ("center", "top")
    assert prior.cases(base) == [("circle", "square")] and prior.cases(added) == []
    removed = prior.apply(added, rng, 0.0)
    assert set(removed.objects) == set(base.objects) and len(removed.objects) == 2
    lonely = S.Scene((S.Obj("square", "red", "small", "center", (25, 25, 33, 33)),))
    assert prior.apply(lonely, rng, 0.0) is lonely  # no trigger: unchanged, whatever p
    for bad, match in ((dict(pairs=(("circle", "circle"),)), "share"), (dict(pairs=(("circle", "star"),)), "pairs"),
                       (dict(strength=1.5), "strength"), (dict(held_out_p=-0.1), "held_out_p"),
                       (dict(pairs=()), "pairs")):
        with pytest.raises(ValueError, match=match):
            S.CooccurrencePrior(**bad)
    with pytest.raises(ValueError, match="p must be a probability"):
        prior.apply(base, rng, 2.0)
    with pytest.raises(ValueError, match="prior_p needs prior"):
        S.make_sft_dataset("/tmp/unused", 1, prior_p=0.5)


def test_prior_pairs_carry_the_priors_hallucination(tmp_path):
    prior = S.DEFAULT_PRIOR
    path = S.make_dataset(str(tmp_path), 200, seed=1, prior=prior, kinds=("color", "count", "omission"))
    rows = S.read_jsonl(path)
    kinds = Counter(r["hallucination"]["kind"] for r in rows)
    assert kinds["prior"] > 40 and kinds["omission"] > 40, kinds
    for r in rows:
        scene = S.Scene.from_dict(r)
        h = r["hallucination"]
        if h["kind"] == "prior":
            count, color, shape = h["claimed"]
            trigger = next(t for t, q in prior.pairs if q == shape)
            assert shape not in scene.shapes() and trigger in scene.shapes()
            assert (color, trigger) in scene.counts()  # in the trigger's color
            said = S.mention_counts(S.parse_description(r["rejected"]))
            assert said[(color, shape)] == 1 and said - Counter({(color, shape): 1}) == scene.counts()
            assert h["words"] == [f"a {color} {shape}"]
            assert scene.objects[h["object_index"]].kind == (color, trigger)
        elif h["kind"] == "omission":
            _, color, shape = h["truth"]
            said = S.mention_counts(S.parse_description(r["rejected"]))
            assert (color, shape) not in said and said == Counter(
                {k: v for k, v in scene.counts().items() if k != (color, shape)})
            assert h["spans"] == [] and scene.objects[h["object_index"]].kind == (color, shape)
        if prior.cases(scene):
            assert h["kind"] == "prior"  # prior_pair_prob = 1: every such scene gets the prior's error
    with pytest.raises(ValueError, match="kind='prior' needs prior"):
        S.make_pair(S.Scene.from_dict(rows[0]), np.random.default_rng(0), kind="prior")
    with pytest.raises(ValueError, match="kinds"):
        S.make_dataset(str(tmp_path / "x"), 1, kinds=("prior",))


def test_chain_grammar_and_where_pairs_first_differ():
    """Style "chain" joins every group with "and": an added or dropped group changes the caption first at the group
    itself (a count or color word) unless it is the last one; with "count" the joints ("," / "and") differ first."""
    scene = S.Scene((S.Obj("circle", "red", "small", "top left", (1, 1, 9, 9)),
                     S.Obj("cross", "green", "small", "top", (25, 1, 33, 9)),
                     S.Obj("square", "blue", "small", "left", (1, 25, 9, 33)),
                     S.Obj("square", "blue", "small", "center", (25, 25, 33, 33))))
    assert S.describe(scene, "chain") == "a red circle and a green cross and two blue squares."
    assert S.parse_description(S.describe(scene, "chain")) == S.parse_description(S.describe(scene))
    joints = {",", "and", "."}
    firsts = Counter()
    for style in ("count", "chain"):
        for i in range(300):
            rng = S.record_rng(0, "pairs", i)
            sc = S.DEFAULT_PRIOR.apply(S.random_scene(rng, min_objects=2), rng, 0.5)
            kind = "prior" if S.DEFAULT_PRIOR.cases(sc) else "omission"
            pair = S.make_pair(sc, rng, kind=kind, prior=S.DEFAULT_PRIOR, style=style)
            a, b = S.split_words(pair.chosen), S.split_words(pair.rejected)
            j = next(k for k in range(min(len(a), len(b)) + 1) if k == min(len(a), len(b)) or a[k] != b[k])
            firsts[(style, "joint" if {a[j], b[j]} & joints else "object")] += 1
    # chain: only a last-group change starts at a joint (the prior's partners come late in the canonical order, so
    # about half); count: three in four
    assert firsts[("count", "joint")] > 0.7 * 300 and firsts[("chain", "joint")] < 0.55 * 300, firsts
    with pytest.raises(ValueError, match="style"):
        S.make_pair(scene, np.random.default_rng(0), style="detailed")
