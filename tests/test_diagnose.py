"""vpo.diagnose / `vpo diagnose`: the statistics on constructed cases with known answers, the token classes, and the
command on the tiny model (CI: a quick run)."""
import json
import os
import random
import subprocess
import sys

import pytest

from vpo.diagnose import auroc, diff_spans, ovip_negatives, read_pairs, summarize_tokens, token_classes


def _brute_auroc(scores, pos):
    p = [s for s, y in zip(scores, pos) if y]
    n = [s for s, y in zip(scores, pos) if not y]
    return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in p for b in n) / (len(p) * len(n))


def test_auroc_known_answers():
    assert auroc([0.9, 0.8, 0.1, 0.2], [True, True, False, False]) == 1.0
    assert auroc([0.1, 0.2, 0.9, 0.8], [True, True, False, False]) == 0.0
    assert auroc([1.0, 1.0, 1.0], [True, False, True]) == 0.5      # all tied
    assert auroc([1.0, 2.0], [True, True]) != auroc([1.0, 2.0], [True, True])  # NaN: one class only
    rng = random.Random(0)
    for _ in range(20):  # ties and odd sizes against the O(n²) definition
        n = rng.randint(2, 37)
        s = [rng.randint(0, 5) for _ in range(n)]
        y = [rng.random() < 0.3 for _ in range(n)]
        if 0 < sum(y) < n:
            assert auroc(s, y) == pytest.approx(_brute_auroc(s, y))
    with pytest.raises(ValueError, match="scores has 2 items but positive has 3"):
        auroc([1, 2], [True, False, True])


def _tokens(values, classes, rows):
    return {"v": values, "cls": classes, "row": rows}


def test_perfect_token_reward_gives_auroc_one_and_random_gives_one_half():
    rng = random.Random(1)
    cls = ["grounded" if rng.random() < 0.7 else "hallucinated" for _ in range(4000)]
    rows = ["chosen" if rng.random() < 0.5 else "rejected" for _ in cls]
    perfect = [1.0 + rng.random() if c == "grounded" else -rng.random() for c in cls]
    noise = [rng.gauss(0, 1) for _ in cls]
    st = summarize_tokens(_tokens(perfect, cls, rows), "v")
    assert st["auroc"] == 1.0 and st["grounded"]["mean"] > 1 > 0 > st["hallucinated"]["mean"]
    assert summarize_tokens(_tokens(perfect, cls, rows), "v", higher="hallucinated")["auroc"] == 0.0
    assert summarize_tokens(_tokens(noise, cls, rows), "v")["auroc"] == pytest.approx(0.5, abs=0.03)
    rej = summarize_tokens(_tokens(perfect, cls, rows), "v", rows="rejected")
    assert rej["grounded"]["n"] + rej["hallucinated"]["n"] == rows.count("rejected")
    with pytest.raises(ValueError, match="rows must be"):
        summarize_tokens(_tokens(perfect, cls, rows), "v", rows="left")
    with pytest.raises(ValueError, match="no column 'c'"):
        summarize_tokens(_tokens(perfect, cls, rows), "c")


def test_token_classes_and_rlhf_v_segments():
    text = "a red circle and two blue squares."
    # "two blue squares" is hallucinated: characters 17..33
    assert token_classes(text, [[17, 33]]) == [None, "grounded", "grounded", None, "hallucinated", "hallucinated",
                                              "hallucinated", None]
    assert token_classes(text) == [None, "grounded", "grounded", None, "grounded", "grounded", "grounded", None]
    assert diff_spans("a red dog sits here", "a red cat sits here") == [[6, 9]]
    assert diff_spans("there is a cat and a dog.", "there is a cat.") == [[11, 25]]
    assert diff_spans("same words", "same words") == []


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    from vpo.diagnose_cli import create_pairs

    root = tmp_path_factory.mktemp("pairs")
    return read_pairs(create_pairs(str(root), 16, seed=3))


def test_ovip_negatives_differ_in_the_hallucinated_object(pairs):
    out = ovip_negatives(pairs)
    assert out["n"] == len(pairs) and out["claimed_rate"] == 1.0 and out["only_rate"] == 1.0
    assert out["pixels_rate"] == 1.0

    class Copy:  # a broken generator: returns the positive image
        def generate(self, requests):
            from PIL import Image

            return [Image.open(r.context["image"]).convert("RGB") for r in requests]

    assert ovip_negatives(pairs, generator=Copy())["pixels_rate"] == 0.0


def test_csr_ranking_with_constructed_scorers(pairs):
    from vpo.diagnose import csr_ranking

    class FakeModel:  # only response_logps is replaced below
        pass

    import vpo.diagnose as dg

    orig = dg.response_logps
    try:
        dg.response_logps = lambda m, p, recs, batch_size=16: [[-1.0, -9.0] for _ in recs]  # chosen more likely
        truth = lambda image, texts, record=None: [100.0, 0.0]  # noqa: E731  perfect image relevance
        wrong = lambda image, texts, record=None: [0.0, 100.0]  # noqa: E731  backwards
        out = csr_ranking(FakeModel(), None, pairs, lams=(0.0, 0.5, 1.0), scorer=truth)
        assert out["rates"] == {"0": 1.0, "0.5": 1.0, "1": 1.0}
        back = csr_ranking(FakeModel(), None, pairs, lams=(0.0, 0.999, 1.0), scorer=wrong)
        assert back["rates"]["0"] == 1.0 and back["rates"]["0.999"] == 0.0 and back["R_I_only"] == 0.0
        assert out["n"] == sum(bool(r["hallucination"]["spans"]) for r in pairs)
    finally:
        dg.response_logps = orig


def test_diagnose_command_quick_run(tmp_path):
    """`vpo diagnose --help`, a usage error, and a quick run on the tiny model: the table, the JSON and the PNG."""
    env = {**os.environ, "VPO_CACHE": str(tmp_path / "cache")}
    h = subprocess.run([sys.executable, "-m", "vpo.cli", "diagnose", "--help"], capture_output=True, text=True)
    flags = ("--noise-steps", "--catpo-layers", "--catpo-heads", "--catpo-per-head")
    assert h.returncode == 0 and all(f in h.stdout for f in flags)
    bad = subprocess.run([sys.executable, "-m", "vpo.cli", "diagnose", "--model", "tiny-cache", "--data", "x",
                          "--csr-lams", "2"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "--csr-lams" in bad.stderr
    bad = subprocess.run([sys.executable, "-m", "vpo.cli", "diagnose", "--model", "tiny-cache", "--data", "x",
                          "--catpo-heads", "all;1,2:3"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "--catpo-heads mixes heads and layer:head pairs" in bad.stderr
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, "-m", "vpo.cli", "diagnose", "--model", "tiny-cache", "--data",
                          str(tmp_path / "pairs"), "--create", "8", "--out", str(out), "--threads", "1",
                          "--noise-steps", "250,500", "--csr-lams", "0.1,0.9", "--catpo-heads", "all;1:0,0:1",
                          "--catpo-per-head"], capture_output=True, text=True,
                         env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    for m in ("tpo", "catpo", "csr", "lpoi", "ovip"):
        assert f"\n{m} " in res.stdout
    data = json.loads((out / "diagnose.json").read_text())
    tpo = [r for r in data["rows"] if r["method"] == "tpo" and r["signal"] == "s"]
    assert [r["setting"] for r in tpo] == ["k=250", "k=500"] and all(0 <= r["value"] <= 1 for r in tpo)
    cat = [r["setting"] for r in data["rows"] if r["method"] == "catpo" and r["signal"] == "T"]
    grid = data["catpo_per_head"]
    cells = grid["num_layers"] * grid["num_heads"]
    assert cells >= 4 and len(grid["cells"]) == cells and sorted(grid["ranked"]) == sorted(grid["cells"])
    assert cat[:2] == ["layers=all, alpha=0.5", "layers=all, alpha=0.5, heads=1:0,0:1"] and len(cat) == 2 + cells
    assert all(0 <= c["auroc"] <= 1 for c in grid["cells"].values())
    lp = {r["signal"]: r["value"] for r in data["rows"] if r["method"] == "lpoi"}
    assert lp["visibility_rate"] == 1.0  # LPOI's construction hides more of the object at every step
    assert (out / "diagnose.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_settings_of_the_free_parameters_reach_the_method_configs(tmp_path):
    """What `vpo diagnose` tunes (DemoSettings: TPO's k and a, Cat-PO's layers and α) reaches VPOConfig."""
    import dataclasses

    from vpo.demo import PRESETS
    from vpo.demo_methods import _config

    s = dataclasses.replace(PRESETS["full"], tpo_noise_step=321, tpo_a=0.25, catpo_layers="1,2", catpo_alpha=0.75,
                            catpo_heads="2:0,1:3")
    tpo = _config("tpo", str(tmp_path), s, 0, "torch")
    assert (tpo.noise_step, tpo.tpo_a) == (321, 0.25)
    cat = _config("catpo", str(tmp_path), s, 0, "torch")
    assert (cat.catpo_layer_list(), cat.catpo_alpha) == ([1, 2], 0.75)
    assert cat.catpo_weight_kwargs()["heads"] == {2: [0], 1: [3]}
    dpo = _config("dpo", str(tmp_path), s, 0, "torch")
    assert (dpo.noise_step, dpo.tpo_a, dpo.catpo_layers, dpo.catpo_alpha, dpo.catpo_heads) == (500, 0.5, None, 0.5,
                                                                                                None)  # untouched


def test_png_with_any_subset_of_methods(tmp_path):
    from vpo.diagnose_cli import diagnose_png, format_table

    rows = [{"method": "csr", "setting": "lambda=0.9", "signal": "R(chosen) > R(rej.)", "kind": "rate",
             "value": 0.75, "n": 4}]
    for dists in ({}, {"catpo": {"setting": "layers=all", "T": {"grounded": [0.1, 0.2], "hallucinated": [0.0]}}}):
        path = diagnose_png(rows, dists, str(tmp_path / f"d{len(dists)}.png"))
        assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert "0.750" in format_table(rows)


def test_csr_search_pairs_against_the_truth():
    from vpo.diagnose import csr_pairs

    objs = [{"shape": "circle", "color": "red", "size": "large", "position": "center", "bbox": [0, 0, 4, 4]},
            {"shape": "square", "color": "blue", "size": "large", "position": "top left", "bbox": [5, 5, 9, 9]}]
    rows = [{"objects": objs, "chosen": "a red circle and a blue square.", "rejected": "a red circle and a cross."},
            {"objects": objs, "chosen": "a red circle.", "rejected": "a red circle and a blue square."},  # says less
            {"objects": objs, "chosen": "a red circle and a cross.", "rejected": "a blue square."}]
    out = csr_pairs(rows)
    assert out["n"] == 3
    assert (out["fewer"], out["equal"], out["more"]) == pytest.approx((1 / 3, 1 / 3, 1 / 3))
    assert (out["covers_more"], out["covers_fewer"]) == pytest.approx((1 / 3, 1 / 3))
    assert out["rejected_empty"] == 0
    assert csr_pairs([{**rows[0], "rejected": "two ."}])["rejected_empty"] == 1.0  # a caption with no object
    with pytest.raises(ValueError, match="no row with 'objects'"):
        csr_pairs([{"chosen": "a", "rejected": "b"}])


def test_subword_tokenizer_tokens_are_classed_by_the_span_they_overlap():
    """Real data: a tokenizer whose tokens are not words; each token is classed by character offsets."""
    import torch

    from vpo.diagnose import _aligned

    text = "a dog runs"  # "dog" (2..5) is the hallucinated segment
    pieces = [("a", 0, 1), (" d", 1, 3), ("og", 3, 5), (" runs", 5, 10)]

    class Tok:
        def convert_ids_to_tokens(self, ids):
            return [pieces[i][0] if i < len(pieces) else "<eot>" for i in ids]

        def __call__(self, t, add_special_tokens=False, return_offsets_mapping=False):
            assert t == text
            return {"input_ids": [0, 1, 2, 3], "offset_mapping": [(s, e) for _, s, e in pieces]}

    class Proc:
        tokenizer = Tok()

    lab = torch.tensor([-100, -100, 0, 1, 2, 3, 9])  # prompt, the four pieces, end of turn
    assert _aligned(Proc(), lab, text, [[2, 5]]) == ["grounded", "hallucinated", "hallucinated", "grounded", None]


def test_catpo_head_grid_ranks_the_informative_head(monkeypatch):
    """A constructed Cat-PO signal that only layer 1's head 2 carries: its cell has AUROC 1, the others ~0.5, and it
    is ranked first; every cell is read with exactly one (layer, head)."""
    import random

    import vpo.diagnose as dg
    from vpo.models import tiny_llava

    tiny = tiny_llava(num_layers=2)  # 4 heads
    calls = []

    def fake_signals(model, processor, records, *, layers, heads, alpha, lambda_ref, batch_size):
        calls.append((tuple(layers), tuple(heads), alpha))
        rng = random.Random(len(calls))
        cls = ["grounded", "hallucinated"] * 200
        if (layers, heads) == ([1], [2]):
            t = [1.0 if c == "grounded" else 0.0 for c in cls]
        else:
            t = [rng.random() for _ in cls]
        return {"T": t, "w": t, "cls": cls, "row": ["rejected"] * len(cls), "kind": [None] * len(cls)}

    monkeypatch.setattr(dg, "catpo_signals", fake_signals)
    grid = dg.catpo_head_grid(tiny.model, None, [], alpha=0.75)
    assert (grid["num_layers"], grid["num_heads"]) == (2, 4)
    assert sorted(c[:2] for c in calls) == [((l,), (h,)) for l in range(2) for h in range(4)]
    assert all(c[2] == 0.75 for c in calls)
    assert grid["ranked"][0] == "1:2" and grid["cells"][(1, 2)]["auroc"] == 1.0
    assert all(abs(v["auroc"] - 0.5) < 0.1 for k, v in grid["cells"].items() if k != (1, 2))


def test_diagnose_logits_are_the_models_own(monkeypatch, pairs):
    """On a model whose head soft-caps and scales its logits, TPO's s and the responses' log-probs follow the
    transform (vpo.trainer.modeling.head_transform), as training computes them."""
    import vpo.trainer.modeling as modeling
    from vpo.diagnose import response_logps, tpo_signals
    from vpo.models.cache import build_tiny_shapes_llava

    model, processor = build_tiny_shapes_llava()
    recs = pairs[:4]
    plain_lp = response_logps(model, processor, recs)
    plain_s = tpo_signals(model, processor, recs, noise_step=999)["s"]
    monkeypatch.setattr(modeling, "head_transform", lambda m: (0.5, 3.0))
    capped_lp = response_logps(model, processor, recs)
    capped_s = tpo_signals(model, processor, recs, noise_step=999)["s"]
    assert max(abs(a - b) for a, b in zip(sum(plain_lp, []), sum(capped_lp, []))) > 0.1
    # cap 0.5 bounds every logit to (-0.5, 0.5), so s (a difference of two logits) stays below 1 in magnitude
    assert max(abs(v) for v in capped_s) < 1.0 < max(abs(v) for v in plain_s)


def test_records_the_collator_skips_are_counted_and_shown(pairs, tmp_path):
    """A record whose image cannot be read drops out of the AUROC; the signal says so, and so does the table."""
    from vpo.diagnose import catpo_signals, tpo_signals
    from vpo.diagnose_cli import _skips, format_table
    from vpo.models.cache import build_tiny_shapes_llava

    model, processor = build_tiny_shapes_llava()
    recs = [dict(r) for r in pairs[:4]]
    recs[1]["image"] = str(tmp_path / "missing.png")
    with pytest.warns(Warning):
        tok = tpo_signals(model, processor, recs, noise_step=500, batch_size=2)
    assert tok["skipped_records"] == 1
    with pytest.warns(Warning):
        assert catpo_signals(model, processor, recs, batch_size=2)["skipped_records"] == 1
    assert tpo_signals(model, processor, pairs[:2])["skipped_records"] == 0
    row = {"method": "tpo", "setting": "k=500", "signal": "s", "kind": "auroc", "value": 0.6, "grounded_mean": 0.1,
           "hallucinated_mean": 0.0, "n": "3/1", **_skips(tok)}
    assert "skipped: 1 records" in format_table([row])
