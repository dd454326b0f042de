"""vpo.eval.paired: the paired standard error against a hand computation, and its edge cases."""
import math

import pytest

from vpo.eval.paired import influence, paired_change, paired_markdown, paired_runs, paired_table, ratio_se

A = {"mentions": [2, 3, 1], "hallucinated": [1, 0, 0], "any_hallucinated": [1, 0, 0], "covered": [1, 2, 1],
     "kinds": [2, 2, 1]}
B = {"mentions": [2, 3, 2], "hallucinated": [1, 1, 1], "any_hallucinated": [1, 1, 1], "covered": [1, 1, 1],
     "kinds": [2, 2, 1]}


def test_chair_i_change_matches_hand_computation():
    # R_a = 1/6, M̄_a = 2: u_a = ((1 - 2/6)/2, (0 - 3/6)/2, (0 - 1/6)/2) = (1/3, -1/4, -1/12)
    # R_b = 3/7, M̄_b = 7/3: u_b = ((1 - 6/7)·3/7, (1 - 9/7)·3/7, (1 - 6/7)·3/7) = (3/49, -6/49, 3/49)
    d = [1 / 3 - 3 / 49, -1 / 4 + 6 / 49, -1 / 12 - 3 / 49]
    se = math.sqrt(sum(x * x for x in d) / (3 * 2))
    out = paired_change(A, B, "CHAIR_i")
    assert out["n"] == 3
    assert out["diff"] == pytest.approx(1 / 6 - 3 / 7, abs=1e-12)
    assert out["se"] == pytest.approx(se, rel=1e-12)
    r, u = influence(A)
    assert r == pytest.approx(1 / 6) and u == pytest.approx([1 / 3, -1 / 4, -1 / 12])


def test_chair_s_is_a_plain_paired_mean():
    # S_a - S_b per image: (0, -1, -1); mean -2/3; SE = sd / sqrt(n) with sd over the differences
    d = [0, -1, -1]
    m = sum(d) / 3
    se = math.sqrt(sum((x - m) ** 2 for x in d) / 2 / 3)
    out = paired_change(A, B, "CHAIR_s")
    assert out["diff"] == pytest.approx(-2 / 3) and out["se"] == pytest.approx(se)


def test_identical_models_have_zero_paired_error_but_nonzero_own_error():
    out = paired_change(A, dict(A), "CHAIR_i")
    assert out["diff"] == 0 and out["se"] == 0
    assert ratio_se(A) > 0


def test_pairing_beats_the_unpaired_error_when_images_share_the_errors():
    # 200 images; model b hallucinates on the same hard images as a, plus a few more.
    n = 200
    ma = [3] * n
    ha = [2 if i % 5 == 0 else 0 for i in range(n)]
    hb = [h + (1 if i % 17 == 0 else 0) for i, h in enumerate(ha)]
    a, b = {"mentions": ma, "hallucinated": ha}, {"mentions": ma, "hallucinated": hb}
    paired = paired_change(b, a)["se"]
    unpaired = math.hypot(ratio_se(a), ratio_se(b))
    assert 0 < paired < unpaired / 3


def test_seed_lists_average_the_influences():
    out = paired_change([A, A], B)
    one = paired_change(A, B)
    assert out["diff"] == pytest.approx(one["diff"]) and out["se"] == pytest.approx(one["se"])
    mixed = paired_change([A, B], [B, B])
    assert mixed["diff"] == pytest.approx(one["diff"] / 2) and mixed["se"] == pytest.approx(one["se"] / 2)


def test_tables_and_markdown():
    t = paired_table({"sft": B, "dpo": B, "tpo": A}, ["tpo", "dpo"])
    assert set(t["tpo"]) == {"vs_sft", "vs_dpo"} and set(t["dpo"]) == {"vs_sft"}
    runs = paired_runs({"tpo": {"0": A, "1": A}, "dpo": {"0": B}}, B)
    assert runs["tpo"]["vs_dpo"]["CHAIR_i"]["diff"] == pytest.approx(1 / 6 - 3 / 7)
    assert runs["tpo"]["seeds"] == ["0", "1"]
    md = paired_markdown(runs)
    assert "| tpo |" in md and "−0.2619" not in md and "-0.2619 ±" in md


@pytest.mark.parametrize("bad, match", [
    (({"mentions": [1, 2]}, B), "must map 'hallucinated'"),
    (({"mentions": [1, 2], "hallucinated": [0]}, B), r"a\['hallucinated'\] has 1 images but a\['mentions'\] has 2"),
    (({"mentions": [1, 2], "hallucinated": [0, 0]}, B), "a has 2 images but b has 3"),
    (([], B), "a is empty"),
    (([A, A], [B, B, B]), "a has 2 runs but b has 3"),
])
def test_bad_input_names_the_argument(bad, match):
    with pytest.raises(ValueError, match=match):
        paired_change(*bad)
    with pytest.raises(ValueError, match="metric must be one of"):
        paired_change(A, B, "CHAIR_x")


def test_merged_comparison_holds_paired_changes_from_the_parts(tmp_path):
    """merge_compare reads each part's per_image.json and puts the paired changes in compare.json and compare.md."""
    import json

    from vpo.compare import merge_compare

    def row(chair):
        return {"CHAIR_i": chair, "CHAIR_s": chair, "CHAIR_prior": chair, "prior_rate": chair, "coverage": 0.6,
                "POPE F1": 0.8, "mentions": 7.0}

    parts = []
    for seed in (0, 1):
        part = tmp_path / f"seed{seed}"
        part.mkdir()
        result = {"mode": "quick", "settings": {"pref_steps": 3, "pref_batch": 4, "pref_lr": 1e-4, "beta": 0.1},
                  "eval_split": "test", "eval_images": 3, "data_seed": 0, "before": row(3 / 7),
                  "sft": {"key": "k", "model": "m", "cached": True}, "methods": ["tpo", "dpo"], "seeds": [seed],
                  "runs": {"tpo": {str(seed): row(1 / 6)}, "dpo": {str(seed): row(3 / 7)}},
                  "seconds": {"tpo": {str(seed): 1.0}, "dpo": {str(seed): 1.0}}, "total_seconds": 2.0}
        (part / "compare.json").write_text(json.dumps(result))
        (part / "per_image.json").write_text(json.dumps({"sft": B, "runs": {"tpo": {str(seed): A},
                                                                            "dpo": {str(seed): B}}}))
        parts.append(str(part))
    merged = merge_compare(str(tmp_path / "all"), parts)
    one = paired_change(A, B)
    p = merged["paired"]["tpo"]
    assert p["seeds"] == ["0", "1"]
    assert p["vs_sft"]["CHAIR_i"] == pytest.approx(one) and p["vs_dpo"]["CHAIR_i"] == pytest.approx(one)
    assert json.loads((tmp_path / "all" / "compare.json").read_text())["paired"]["tpo"]["vs_dpo"]["CHAIR_i"]["n"] == 3
    md = (tmp_path / "all" / "compare.md").read_text()
    assert f"| tpo | {one['diff']:+.4f} ± {one['se']:.4f} | {one['diff']:+.4f} ± {one['se']:.4f}" in md
