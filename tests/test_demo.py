"""`vpo demo --quick` end to end (the README's main job, in CI), the tiny model's cache, the SFT collator, and the
`vpo visualize` commands on the demo's outputs."""
import json
import math
import os
import subprocess
import sys
import time

import pytest

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

import torch  # noqa: E402

from vpo.worlds import shapes  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One `vpo demo --quick` run (fixed seed, 1 thread, a fresh model cache), shared by the tests below."""
    root = tmp_path_factory.mktemp("demo")
    out, cache = str(root / "out"), str(root / "cache")
    start = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "vpo.cli", "demo", "--quick", "--out", out, "--cache-dir", cache,
                          "--seed", "0", "--threads", "1", "--no-progress"],
                         capture_output=True, text=True, timeout=900)
    wall = time.perf_counter() - start
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    print(f"\nvpo demo --quick: {wall:.0f}s wall\n{res.stdout}")
    return {"out": out, "cache": cache, "stdout": res.stdout, "summary": summary, "wall": wall}


def test_quick_demo_writes_every_artifact(quick):
    out = quick["out"]
    for rel in ("data/sft.jsonl", "data/train.jsonl", "data/test_captions.jsonl", "data/test_pope.jsonl",
                "data/val_captions.jsonl", "data/val_pope.jsonl", "sft/curves.png", "sft/eval.json", "summary.json",
                "summary.txt"):
        assert os.path.isfile(os.path.join(out, rel)), rel
    sft_model = quick["summary"]["sft"]["model"]  # in the cache, under the SFT spec hash
    assert sft_model.startswith(quick["cache"])
    for rel in ("config.json", "model.safetensors", "processor_config.json"):
        assert os.path.isfile(os.path.join(sft_model, rel)), rel
    for method in ("tpo", "dpo"):
        for rel in ("model/config.json", "model/model.safetensors", "trainer_state.json", "curves.png", "eval.json"):
            assert os.path.isfile(os.path.join(out, method, rel)), (method, rel)
    pics = quick["summary"]["pictures"]
    for key in ("html", "png", "json"):
        assert os.path.isfile(pics[key]), key
    for png in [pics["png"]] + [os.path.join(out, m, "curves.png") for m in ("sft", "tpo", "dpo")]:
        with open(png, "rb") as f:
            assert f.read(8) == PNG_MAGIC, png
    # the cache holds the tiny model as an ordinary checkpoint folder
    from vpo.models.cache import cache_path, is_fresh

    assert is_fresh(cache_path(quick["cache"]))


def test_quick_demo_prints_the_before_after_table_and_curve_end_points(quick):
    text = quick["stdout"]
    for stage in range(1, 8):
        assert f"[{stage}/7]" in text
    for row in ("sft (before)", "tpo (after)", "dpo (after)"):
        assert row in text
    for col in ("CHAIR_i", "CHAIR_s", "CHAIR_prior", "POPE F1", "coverage", "loss start -> end",
                "margin start -> end", "CHAIR_i standard error", "language prior: circle -> square"):
        assert col in text
    assert quick["summary"]["pictures"]["html"] in text


def test_summary_holds_every_number_before_and_after(quick):
    s = quick["summary"]
    keys = {"CHAIR_i", "CHAIR_i_se", "CHAIR_s", "coverage", "mentions", "CHAIR_prior", "prior_rate", "POPE acc",
            "POPE F1"}
    rows = [s["before"]] + [r["after"] for r in s["methods"].values()]
    for row in rows:
        assert keys <= set(row) and all(math.isfinite(row[k]) for k in keys), row
        p, n = row["CHAIR_i"], row["mentions"]
        assert row["CHAIR_i_se"] == pytest.approx(math.sqrt(p * (1 - p) / n))
    assert s["before"]["mentions"] > 0 and s["prior"]["pairs"] == [["circle", "square"], ["triangle", "cross"]]
    assert s["eval_split"] == "test" and not s["sft"]["cached"]  # a fresh cache: SFT ran
    # the SFT model's trade-off curve, and every method measured against it at its own coverage
    from vpo.demo import TRADEOFF_BIASES
    from vpo.eval.tradeoff import chair_at_coverage

    curve = s["sft_curve"]
    assert [p["bias"] for p in curve] == sorted(TRADEOFF_BIASES)
    assert curve[0]["CHAIR_i"] == s["before"]["CHAIR_i"] and curve[0]["coverage"] == s["before"]["coverage"]
    assert curve[-1]["mentions"] <= curve[0]["mentions"]  # a bias towards "." never makes captions longer here
    for res in s["methods"].values():
        m = res["matched"]
        assert m["sft_CHAIR_i"] == pytest.approx(chair_at_coverage(curve, m["coverage"]))
        assert m["gain"] == pytest.approx(m["sft_CHAIR_i"] - res["after"]["CHAIR_i"])


def test_trained_models_hallucinate_no_more_than_the_sft_model(quick):
    """The issue's check: each method's CHAIR_i after training is no worse than before.

    Tolerance: one binomial standard error of the SFT model's CHAIR_i, sqrt(p (1 - p) / mentions), the smallest
    difference the held-out set resolves (the run is deterministic; this is not slack for run-to-run noise)."""
    s = quick["summary"]
    with open(os.path.join(quick["out"], "sft", "eval.json")) as f:
        mentions = json.load(f)["chair"]["num_mentions"]
    p = s["before"]["CHAIR_i"]
    tol = math.sqrt(max(p * (1 - p), 1e-12) / max(mentions, 1))
    assert tol == pytest.approx(s["before"]["CHAIR_i_se"])
    lines = ["SFT: " + ", ".join(f"{k} {v:.3f}" for k, v in s["before"].items()) + f" ({mentions} mentions)"]
    for method, res in s["methods"].items():
        lines.append(f"{method}: " + ", ".join(f"{k} {v:.3f}" for k, v in res["after"].items()))
    print("\n" + "\n".join(lines) + f"\nCHAIR_i tolerance {tol:.3f}")
    assert mentions > 0, "the SFT model mentions no object at all: it did not learn to caption"
    for method, res in s["methods"].items():
        assert res["after"]["CHAIR_i"] <= p + tol, (method, "\n".join(lines))


def test_preference_training_moved_the_curves(quick):
    for method, res in quick["summary"]["methods"].items():
        c = res["curve"]
        assert c["loss"]["end"] < c["loss"]["start"], (method, c)
        assert c["margin"]["end"] > c["margin"]["start"], (method, c)
    sft = quick["summary"]["sft"]["curve"]["loss"]
    assert sft["end"] < sft["start"]


def test_eval_command_reproduces_the_demo_measurement(quick, tmp_path):
    from vpo.cli import main

    out = quick["out"]
    report_path = str(tmp_path / "tpo.json")
    torch.set_num_threads(1)
    assert main(["eval", "--model", os.path.join(out, "tpo", "model"), "--data", os.path.join(out, "data"),
                 "--out", report_path]) == 0
    with open(report_path) as f:
        got = json.load(f)
    with open(os.path.join(out, "tpo", "eval.json")) as f:
        want = json.load(f)
    assert got["chair"] == pytest.approx(want["chair"])
    assert got["pope"] == pytest.approx(want["pope"])


def test_visualize_commands_on_the_demo_outputs(quick, tmp_path):
    from vpo.cli import main

    out = quick["out"]
    torch.set_num_threads(1)
    pics = str(tmp_path / "pics")
    rc = main(["visualize", "rewards", "--model", quick["summary"]["sft"]["model"], "--model",
               os.path.join(out, "tpo", "model"), "--data", os.path.join(out, "data"), "--index", "1", "--kind",
               "catpo", "--out", pics])
    assert rc == 0
    with open(os.path.join(pics, "rewards_catpo_1.png"), "rb") as f:
        assert f.read(8) == PNG_MAGIC
    with open(os.path.join(pics, "rewards_catpo_1.json")) as f:
        dump = json.load(f)
    rec = shapes.read_jsonl(os.path.join(out, "data", "train.jsonl"))[1]
    sft_label = os.path.basename(os.path.dirname(quick["summary"]["sft"]["model"]))  # the cache's sft-<hash>
    assert sft_label.startswith("sft-")
    assert [r["model"] for r in dump["rows"]] == [sft_label, sft_label, "tpo", "tpo"]
    rows = {r["response"]: r for r in dump["rows"][:2]}
    # one value per word of the response, plus the end-of-turn token
    assert rows["rejected"]["tokens"] == shapes.split_words(rec["rejected"]) + ["</s>"]
    assert len(rows["chosen"]["values"]) == len(shapes.split_words(rec["chosen"])) + 1
    assert all(math.isfinite(v) for r in dump["rows"] for v in r["values"])
    with open(os.path.join(pics, "rewards_catpo_1.html")) as f:
        page = f.read()
    assert page.startswith("<!DOCTYPE html>") and "rejected" in page
    curves = str(tmp_path / "curves.png")
    assert main(["visualize", "curves", "--run", os.path.join(out, "dpo"), "--out", curves]) == 0
    with open(curves, "rb") as f:
        assert f.read(8) == PNG_MAGIC
    assert main(["visualize", "curves", "--run", str(tmp_path / "missing")]) == 2


def test_tpo_rewards_of_the_demo_pair_are_calibrated(quick):
    """c = a + σ(±s) lies in (a, a + 1) = (0.5, 1.5) on every token of the demo's picture."""
    with open(quick["summary"]["pictures"]["json"]) as f:
        dump = json.load(f)
    assert [(r["model"], r["response"]) for r in dump["rows"]] == [
        ("sft", "chosen"), ("sft", "rejected"), ("tpo", "chosen"), ("tpo", "rejected")]
    for r in dump["rows"]:
        assert r["values"] and all(0.5 < v < 1.5 for v in r["values"]), r


def test_a_second_run_skips_sft(tmp_path, monkeypatch):
    """The SFT model is cached under its spec hash: the same settings load it, other settings train anew."""
    import dataclasses

    import vpo.trainer.sft as sft_module
    from vpo.demo import DemoSettings, make_world_data, prepare_sft, sft_cache_dir, sft_key

    torch.set_num_threads(1)
    settings = DemoSettings(sft_images=6, sft_steps=2, pair_images=4, pref_steps=1, eval_images=2, val_images=2,
                            sft_batch=4, sft_warmup=0)
    cache = str(tmp_path / "cache")
    data = make_world_data(str(tmp_path / "data"), settings, 0)
    first = prepare_sft(data, settings, 0, cache_dir=cache, progress=False)
    assert not first["cached"] and first["model"] == os.path.join(sft_cache_dir(settings, 0, cache), "model")

    def no_training(*args, **kwargs):
        raise AssertionError("SFT ran again although its spec hash is cached")

    monkeypatch.setattr(sft_module, "make_sft_trainer", no_training)
    again = prepare_sft(data, settings, 0, cache_dir=cache, progress=False)
    assert again["cached"] and again["model"] == first["model"] and again["curve"] == first["curve"]
    # anything SFT depends on changes the hash: the prior, the steps, the seed
    other = dataclasses.replace(settings, prior_strength=0.9)
    assert len({sft_key(settings, 0), sft_key(other, 0), sft_key(settings, 1),
                sft_key(dataclasses.replace(settings, sft_steps=3), 0)}) == 4
    assert sft_key(dataclasses.replace(settings, pref_steps=7, pref_lr=1.0), 0) == sft_key(settings, 0)
    with pytest.raises(AssertionError, match="SFT ran again"):
        prepare_sft(data, other, 0, cache_dir=cache, progress=False)


# --------------------------------------------------------------------------------------------------- the cache
def test_cache_round_trip_rebuilds_stale_and_keeps_outputs(tmp_path):
    from vpo.models.cache import (CACHE_FILE, DEFAULT_SPEC, TinyShapesSpec, build_tiny_shapes_llava, cache_path,
                                  is_fresh, load_or_build, spec_hash)

    torch.set_num_threads(1)
    cache = str(tmp_path / "cache")
    model, processor, path = load_or_build(cache_dir=cache)
    assert path == cache_path(cache) and is_fresh(path)
    built, built_proc = build_tiny_shapes_llava(DEFAULT_SPEC)
    again, again_proc, _ = load_or_build(cache_dir=cache)
    image = shapes.render(shapes.random_scene(shapes.record_rng(0, "t", 0)))
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe the image."}]}],
        add_generation_prompt=True, tokenize=False)
    inputs = processor(images=[image], text=[text], return_tensors="pt", add_special_tokens=False)
    assert torch.equal(inputs["input_ids"], again_proc(images=[image], text=[text], return_tensors="pt",
                                                       add_special_tokens=False)["input_ids"])
    assert (inputs["input_ids"] == processor.image_token_id).sum() == DEFAULT_SPEC.num_image_tokens
    assert processor.tokenizer.convert_ids_to_tokens(processor.tokenizer("a red circle.")["input_ids"]) == [
        "<s>", "a", "red", "circle", "."]
    with torch.no_grad():
        a = model(**inputs).logits
        b = again(**inputs).logits
        c = built(**inputs).logits
    assert torch.equal(a, b) and torch.equal(a, c)
    # a stale cache (another spec's hash) is rebuilt
    info_path = os.path.join(path, CACHE_FILE)
    with open(info_path) as f:
        info = json.load(f)
    info["hash"] = "0" * 64
    with open(info_path, "w") as f:
        json.dump(info, f)
    assert not is_fresh(path)
    rebuilt, _, _ = load_or_build(cache_dir=cache)
    assert is_fresh(path)
    with torch.no_grad():
        assert torch.equal(rebuilt(**inputs).logits, a)
    assert spec_hash(TinyShapesSpec(hidden_size=64)) != spec_hash(DEFAULT_SPEC)
    with pytest.raises(ValueError, match="image_size must be a multiple of patch_size"):
        TinyShapesSpec(image_size=50)


def test_a_damaged_cache_is_rebuilt(tmp_path):
    from vpo.models.cache import cache_path, is_fresh, load_or_build

    cache = str(tmp_path / "cache")
    load_or_build(cache_dir=cache)
    os.remove(os.path.join(cache_path(cache), "model.safetensors"))
    model, _, path = load_or_build(cache_dir=cache)
    assert is_fresh(path) and os.path.isfile(os.path.join(path, "model.safetensors"))


# --------------------------------------------------------------------------------------------------------- SFT
def test_sft_collator_rows_are_the_preference_collators_chosen_rows(tmp_path):
    from vpo.data import PreferenceCollator
    from vpo.models.cache import load_or_build
    from vpo.trainer.sft import SFTCollator, read_sft_jsonl, sft_loss

    torch.set_num_threads(1)
    model, processor, _ = load_or_build(cache_dir=str(tmp_path / "cache"))
    path = shapes.make_sft_dataset(str(tmp_path / "data"), 3, seed=0)
    records = read_sft_jsonl(path)
    assert len(records) == 9 and os.path.isabs(records[0]["image"])
    sft = SFTCollator(processor, "llava")
    batch = sft(records[:4])
    pref = PreferenceCollator(processor, "llava", method="dpo")(
        [{"id": r["id"], "image": r["image"], "prompt": r["prompt"], "chosen": r["response"],
          "rejected": "no ." if r["response"] != "no" else "yes ."} for r in records[:4]])
    n = batch["input_ids"].shape[1]
    for key in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(batch[key], pref[key][:4, :n]), key
    assert torch.equal(batch["pixel_values"], pref["pixel_values"][:4])
    assert len(sft.cache) == 4 and sft(records[:4])["input_ids"].equal(batch["input_ids"])  # memoized
    # the loss is the mean NLL of the label tokens (what the model's own loss computes from its logits)
    with torch.no_grad():
        ours = sft_loss(model, batch, impl="torch")
        theirs = model(**batch).loss
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)


# ------------------------------------------------------------------------------------------------ the comparison
def test_comparison_statistics_merge_table_and_chart(tmp_path):
    """Means ± standard errors over seeds, the paired difference from DPO and its verdict, merging per-seed parts."""
    from vpo.compare import aggregate, mean_se, merge_compare

    assert mean_se([1.0, 2.0, 3.0]) == pytest.approx({"mean": 2.0, "se": 1 / math.sqrt(3), "n": 3})
    assert mean_se([0.5]) == {"mean": 0.5, "se": 0.0, "n": 1}

    def row(chair, cov):
        return {"CHAIR_i": chair, "CHAIR_s": chair, "CHAIR_prior": chair, "prior_rate": chair, "coverage": cov,
                "POPE F1": 0.8, "mentions": 100.0}

    runs = {"dpo": {0: row(0.30, 0.60), 1: row(0.32, 0.61), 2: row(0.31, 0.59)},
            "tpo": {0: row(0.25, 0.60), 1: row(0.26, 0.60), 2: row(0.27, 0.60)},   # lower by 0.05 every seed
            "lpoi": {0: row(0.20, 0.40), 1: row(0.21, 0.41), 2: row(0.22, 0.42)},  # lower, but says much less
            "mdpo": {0: row(0.33, 0.60), 1: row(0.30, 0.60), 2: row(0.31, 0.60)}}  # within noise
    agg = aggregate(runs)
    assert agg["tpo"]["vs_dpo"]["CHAIR_i"]["mean"] == pytest.approx(-0.05)
    assert agg["tpo"]["beats_dpo"] and not agg["lpoi"]["beats_dpo"] and not agg["mdpo"]["beats_dpo"]
    assert "vs_dpo" not in agg["dpo"] and agg["dpo"]["coverage"]["mean"] == pytest.approx(0.60)
    parts = []
    for seed in (0, 1, 2):
        part = tmp_path / f"seed{seed}"
        part.mkdir()
        result = {"mode": "quick", "settings": {"pref_steps": 3, "pref_batch": 4, "pref_lr": 1e-4, "beta": 0.1},
                  "eval_split": "test", "eval_images": 10, "data_seed": 0, "before": row(0.4, 0.6),
                  "sft": {"key": "k", "model": "m", "cached": True}, "methods": list(runs), "seeds": [seed],
                  "runs": {m: {str(seed): runs[m][seed]} for m in runs}, "seconds": {m: {str(seed): 1.0} for m in runs},
                  "total_seconds": 5.0}
        (part / "compare.json").write_text(json.dumps(result))
        parts.append(str(part))
    merged = merge_compare(str(tmp_path / "all"), parts)
    assert merged["seeds"] == [0, 1, 2] and merged["aggregate"]["tpo"]["beats_dpo"]
    table = open(tmp_path / "all" / "compare.md").read()
    assert "| tpo | 0.260 ± 0.006" in table and "| lpoi |" in table and "| yes |" in table
    with open(merged["png"], "rb") as f:
        assert f.read(8) == PNG_MAGIC
    bad = json.loads((tmp_path / "seed2" / "compare.json").read_text())
    bad["sft"]["key"] = "other"
    (tmp_path / "seed2" / "compare.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="different SFT models"):
        merge_compare(str(tmp_path / "x"), parts)


def test_comparison_in_worker_processes_equals_one_process(tmp_path):
    """`--jobs 2` runs the seeds in worker processes and merges them: the same numbers as one process."""
    from vpo.compare import run_compare
    from vpo.demo import DemoSettings

    settings = DemoSettings(sft_images=6, sft_steps=2, pair_images=4, pref_steps=2, eval_images=3, val_images=2,
                            sft_batch=4, sft_warmup=0, pref_batch=2)
    common = dict(seeds=[0, 1], methods=["dpo", "tpo"], settings=settings, cache_dir=str(tmp_path / "cache"),
                  progress=False)
    one = run_compare(str(tmp_path / "one"), jobs=1, **common)
    two = run_compare(str(tmp_path / "two"), jobs=2, **common)
    assert two["jobs"] == 2 and {"seed-0", "seed-1"} <= set(os.listdir(tmp_path / "two"))
    assert "TPO seed 1" in (tmp_path / "two" / "seed-1" / "log.txt").read_text()  # each worker's stage lines
    assert set(two["runs"]) == {"dpo", "tpo"} and set(two["runs"]["tpo"]) == {"0", "1"}
    for m in ("dpo", "tpo"):
        for s in ("0", "1"):
            for k in ("CHAIR_i", "coverage", "mentions", "POPE F1"):
                assert two["runs"][m][s][k] == pytest.approx(one["runs"][m][s][k], nan_ok=True), (m, s, k)
    assert two["before"] == pytest.approx(one["before"], nan_ok=True)
    # the trained weights themselves: equal across the two ways, different across seeds (so the check can fail)
    from safetensors.torch import load_file

    def weights(*parts):
        return load_file(os.path.join(tmp_path, *parts, "model", "model.safetensors"))

    for m in ("dpo", "tpo"):
        for s in (0, 1):
            a, b = weights("one", f"{m}-seed{s}"), weights("two", f"seed-{s}", f"{m}-seed{s}")
            assert all(torch.equal(a[k], b[k]) for k in a), (m, s)
    a, b = weights("one", "tpo-seed0"), weights("one", "tpo-seed1")
    assert any(not torch.equal(a[k], b[k]) for k in a)
    assert os.path.isfile(tmp_path / "two" / "compare.md") and os.path.isfile(two["png"])
    # every run against the SFT model's trade-off curve at its own coverage
    from vpo.demo import matched_coverage

    assert two["sft_curve"] == one["sft_curve"] and len(one["sft_curve"]) > 1
    for m, by_seed in one["runs"].items():
        for s, row in by_seed.items():
            assert row["matched_gain"] == pytest.approx(matched_coverage(one["sft_curve"], row, one["before"])["gain"],
                                                        nan_ok=True)
    assert "gain at matched coverage" in (tmp_path / "two" / "compare.md").read_text()
    with pytest.raises(ValueError, match="jobs"):
        run_compare(str(tmp_path / "bad"), jobs=0, **common)


def test_demo_runs_tpo_with_the_settings_reward_grad(tmp_path):
    """The demo's TPO detaches c_θ by default (DemoSettings.tpo_reward_grad, measured in demo-cpu.md); the paper's
    default is one setting away; no other method gets the option."""
    import dataclasses

    from vpo.demo import PRESETS
    from vpo.demo_methods import _config

    full = PRESETS["full"]
    assert full.tpo_reward_grad is False
    assert _config("tpo", str(tmp_path), full, 0, "torch").reward_grad is False
    paper = dataclasses.replace(full, tpo_reward_grad=True)
    assert _config("tpo", str(tmp_path), paper, 0, "torch").reward_grad is True
    assert _config("dpo", str(tmp_path), full, 0, "torch").reward_grad is True  # the VPOConfig default, untouched


def test_summary_holds_per_image_counts_and_paired_changes(quick):
    """summary.json: each model's per-image counts, and each method's change against SFT (and TPO's against DPO)
    with the paired standard error recomputed from those counts (vpo.eval.paired)."""
    from vpo.eval.paired import paired_change

    s = quick["summary"]
    per = s["per_image"]
    n = s["settings"]["eval_images"]
    for name in ["sft"] + list(s["methods"]):
        assert len(per[name]["mentions"]) == n
        row = s["before"] if name == "sft" else s["methods"][name]["after"]
        assert sum(per[name]["mentions"]) == row["mentions"]
        assert sum(per[name]["hallucinated"]) / sum(per[name]["mentions"]) == pytest.approx(row["CHAIR_i"])
    tpo = s["paired"]["tpo"]
    assert tpo["vs_sft"]["CHAIR_i"]["diff"] == pytest.approx(s["methods"]["tpo"]["after"]["CHAIR_i"]
                                                             - s["before"]["CHAIR_i"])
    assert tpo["vs_dpo"]["CHAIR_i"] == pytest.approx(paired_change(per["tpo"], per["dpo"], "CHAIR_i"))
    assert tpo["vs_sft"]["CHAIR_i"]["se"] > 0 and "vs_dpo" not in s["paired"]["dpo"]
    assert "paired on the same images" in quick["stdout"]
