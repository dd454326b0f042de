"""`vpo eval`: the metrics a generate_fn's answers get equal a hand count, and the command runs a real tiny model."""
import json
import math
import os

import pytest

pytest.importorskip("transformers")

from vpo.eval import chair, evaluate_dir  # noqa: E402
from vpo.worlds import shapes  # noqa: E402


@pytest.fixture(scope="module")
def eval_dir(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("shapes-eval"))
    shapes.make_eval_dataset(root, 6, seed=3, split="test", pope_per_scene=1)
    return root


def _scenes_by_pixels(root):
    from PIL import Image

    out = {}
    for r in shapes.read_jsonl(os.path.join(root, "test_captions.jsonl")):
        with Image.open(os.path.join(root, r["image"])) as im:
            out[im.convert("RGB").tobytes()] = shapes.Scene.from_dict(r)
    return out


def _oracle_generate(root):
    """A generate_fn that knows the truth: the canonical caption, and the right yes/no answer."""
    scenes = _scenes_by_pixels(root)

    def generate_fn(prompts, images):
        out = []
        for p, im in zip(prompts, images):
            scene = scenes[im.tobytes()]
            if p in shapes.DESCRIBE_PROMPTS:
                out.append(shapes.describe(scene))
            else:
                words = shapes.split_words(p)  # "is there a red circle in the image ?"
                color, shape = words[3], words[4]
                out.append("yes" if scene.counts()[(color, shape)] else "no")
        return out

    return generate_fn


def test_ground_truth_answers_score_perfectly(eval_dir):
    report = evaluate_dir(_oracle_generate(eval_dir), eval_dir, "test", batch_size=4)
    c, p = report["chair"], report["pope"]
    assert c["num_responses"] == 6
    assert c["chair_i"] == 0 and c["chair_s"] == 0 and c["attr_i"] == 0 and c["count_error"] == 0
    assert c["coverage"] == 1 and c["instance_coverage"] == 1
    n_questions = len(shapes.read_jsonl(os.path.join(eval_dir, "test_pope.jsonl")))
    assert p["num_questions"] == n_questions and p["accuracy"] == 1 and p["f1"] == 1 and p["unparsed"] == 0
    for mode in shapes.POPE_MODES:
        assert report[f"pope/{mode}"]["accuracy"] == 1


def test_a_fixed_answer_scores_what_a_hand_count_gives(eval_dir):
    """Always "a red circle and two blue squares." and always "yes": CHAIR and POPE by hand."""
    caption = "a red circle and two blue squares."
    report = evaluate_dir(lambda ps, ims: [caption if p in shapes.DESCRIBE_PROMPTS else "yes" for p in ps],
                          eval_dir, "test", batch_size=5)
    rows = shapes.read_jsonl(os.path.join(eval_dir, "test_captions.jsonl"))
    mentions = halluc = sentences = covered = kinds = 0
    for r in rows:
        present_shapes = {o["shape"] for o in r["objects"]}
        present_kinds = {(o["color"], o["shape"]) for o in r["objects"]}
        bad = [s for s in ("circle", "square") if s not in present_shapes]
        mentions += 2
        halluc += len(bad)
        sentences += bool(bad)
        covered += len(present_kinds & {("red", "circle"), ("blue", "square")})
        kinds += len(present_kinds)
    c = report["chair"]
    assert c["chair_i"] == pytest.approx(halluc / mentions)
    assert c["chair_s"] == pytest.approx(sentences / len(rows))
    assert c["coverage"] == pytest.approx(covered / kinds)
    questions = shapes.read_jsonl(os.path.join(eval_dir, "test_pope.jsonl"))
    positives = sum(q["answer"] == "yes" for q in questions)
    p = report["pope"]
    assert p["accuracy"] == pytest.approx(positives / len(questions))
    precision, recall = positives / len(questions), 1.0
    assert p["f1"] == pytest.approx(2 * precision * recall / (precision + recall))
    assert p["yes_ratio"] == 1


@pytest.fixture(scope="module")
def cached_model(tmp_path_factory):
    import torch

    from vpo.models.cache import load_or_build

    torch.set_num_threads(1)
    cache = str(tmp_path_factory.mktemp("vpo-cache"))
    model, processor, path = load_or_build(cache_dir=cache)
    return model, processor, cache


def test_batched_left_padded_generation_equals_one_at_a_time(cached_model, eval_dir):
    from PIL import Image

    from vpo.eval.cli import make_generate_fn

    model, processor, _ = cached_model
    rows = shapes.read_jsonl(os.path.join(eval_dir, "test_pope.jsonl"))[:2]
    caps = shapes.read_jsonl(os.path.join(eval_dir, "test_captions.jsonl"))[:1]
    prompts = [caps[0]["prompt"]] + [q["prompt"] for q in rows]  # different lengths -> left padding
    images = [Image.open(os.path.join(eval_dir, r["image"])).convert("RGB") for r in caps + rows]
    fn = make_generate_fn(model, processor, max_new_tokens=6)
    batched = fn(prompts, images)
    single = [fn([p], [im])[0] for p, im in zip(prompts, images)]
    assert batched == single
    assert all(isinstance(t, str) for t in batched)


def test_vpo_eval_command_writes_a_report_consistent_with_its_samples(cached_model, tmp_path):
    from vpo.cli import main

    _, _, cache = cached_model
    data, out = str(tmp_path / "data"), str(tmp_path / "report.json")
    rc = main(["eval", "--model", "tiny-cache", "--cache-dir", cache, "--data", data, "--create", "4",
               "--out", out, "--max-new-tokens", "8", "--threads", "1"])
    assert rc == 0
    with open(out) as f:
        report = json.load(f)
    assert report["model"] == "tiny-cache" and report["split"] == "test"
    c = report["chair"]
    assert c["num_responses"] == 4 and len(report["samples"]) == 4
    # the aggregate equals CHAIR recomputed by hand from the responses it reports
    again = chair([s["response"] for s in report["samples"]], [{"objects": s["objects"]} for s in report["samples"]])
    assert again.to_dict() == pytest.approx(c)
    n_q = len(shapes.read_jsonl(os.path.join(data, "test_pope.jsonl")))
    assert report["pope"]["num_questions"] == n_q
    for mode in shapes.POPE_MODES:
        assert f"pope/{mode}" in report
    for v in list(c.values()) + list(report["pope"].values()):
        assert math.isfinite(v)


def test_vpo_eval_without_data_says_how_to_make_it(tmp_path, capsys):
    from vpo.cli import main

    rc = main(["eval", "--model", "tiny-cache", "--data", str(tmp_path / "none")])
    assert rc == 2 and "--create" in capsys.readouterr().err


def test_a_lora_adapter_folder_is_evaluated_merged_onto_its_base(cached_model, tmp_path):
    import torch

    from vpo.eval.cli import load_for_eval
    from vpo.models.cache import cache_path, load_pretrained
    from vpo.trainer.modeling import apply_lora

    _, _, cache = cached_model
    base, _ = load_pretrained(cache_path(cache))
    peft_model = apply_lora(base, r=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)  # a non-zero adapter, so merging changes the outputs
    adapter = str(tmp_path / "adapter")
    peft_model.save_pretrained(adapter)
    merged, processor = load_for_eval(adapter, cache_dir=cache)
    x = {"input_ids": torch.tensor([[1, 2, 3]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
    with torch.no_grad():
        want = peft_model(**x).logits
        got = merged(**x).logits
    assert torch.allclose(got, want, atol=1e-5)
    assert type(processor).__name__ == "LlavaProcessor"
