"""vpo.data: the JSONL format and readers, the tiny processors, the per-family preference collator.

Everything is built locally: PNG files written with PIL into tmp_path, tiny processors over a word-level tokenizer,
tiny random models from vpo.models.tiny. Every family runs every method through its model's backbone.
"""
import base64
import io
import json
import math
import re
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from vpo.data import (
    FAMILIES,
    METHODS,
    TINY_WORDS,
    DataWarning,
    PreferenceCollator,
    PreferenceDataset,
    PreferenceRecord,
    build_tiny_processor,
    model_inputs,
    read_preference_jsonl,
    records_from_rows,
)
from vpo.data.collator import _to_pil, _to_unit_tensor
from vpo.models import tiny_idefics2, tiny_llava, tiny_qwen2_5_vl, tiny_qwen2_vl
from vpo.noise import add_diffusion_noise, diffusion_alpha_bar

BUILDERS = {"llava": tiny_llava, "qwen2_vl": tiny_qwen2_vl, "qwen2_5_vl": tiny_qwen2_5_vl, "idefics2": tiny_idefics2}
# An image shape (h, w) each tiny model takes without distortion: LLaVA's 24x24 crop, Qwen-VL's 2:3 grid (1, 4, 6),
# Idefics2's 16x16.
IMAGE_HW = {"llava": (24, 24), "qwen2_vl": (32, 48), "qwen2_5_vl": (32, 48), "idefics2": (16, 16)}
END_TOKEN = {"llava": "</s>", "qwen2_vl": "<|im_end|>", "qwen2_5_vl": "<|im_end|>", "idefics2": "<end_of_utterance>"}
CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)

PROMPT = "What is the cat holding ?"
CHOSEN = "The cat is holding a red ball ."
REJECTED = "A dog is sitting on the sofa next to a green cup ."


# ------------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tiny_models():
    return {f: b() for f, b in BUILDERS.items()}


@pytest.fixture(scope="module")
def processors(tiny_models):
    return {f: build_tiny_processor(f, tiny=tiny_models[f]) for f in FAMILIES}


def _rand_image(h, w, seed, lo=0, hi=256):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(lo, hi, size=(h, w, 3), dtype=np.uint8))


def _png(path, h, w, seed):
    _rand_image(h, w, seed).save(path)
    return str(path)


def _records(tmp_path, family, n=2, list_len=5, **extra):
    h, w = IMAGE_HW[family]
    recs = []
    for i in range(n):
        recs.append(
            PreferenceRecord(
                id=f"{family}-{i}",
                image=_png(tmp_path / f"{family}_{i}.png", h, w, seed=i),
                prompt=PROMPT if i % 2 == 0 else "Describe the image .",
                chosen=CHOSEN if i % 2 == 0 else "Two people are walking on the street .",
                rejected=REJECTED if i % 2 == 0 else "A man .",
                neg_image=_png(tmp_path / f"{family}_{i}_neg.png", h, w, seed=100 + i),
                image_list=[_png(tmp_path / f"{family}_{i}_l{k}.png", h, w, seed=200 + 10 * i + k)
                            for k in range(list_len)],
                extra=dict(extra),
            )
        )
    return recs


def _words(text):
    return re.findall(r"\w+|[^\w\s]", text.lower())


def _forward(tiny, inputs):
    with torch.no_grad():
        out = tiny.model.model(**model_inputs(inputs))
    hidden = out.last_hidden_state
    assert hidden.shape[:2] == inputs["input_ids"].shape
    assert torch.isfinite(hidden).all()
    return hidden


def _check_rows(d, tok, image_token_id):
    """Right padding, labels = input_ids on a contiguous response suffix of the real tokens, never on image tokens."""
    ids, am, lab = d["input_ids"], d["attention_mask"], d["labels"]
    assert ids.dtype == am.dtype == lab.dtype == torch.long and ids.shape == am.shape == lab.shape
    for r in range(ids.shape[0]):
        n = int(am[r].sum())
        assert am[r, :n].eq(1).all() and am[r, n:].eq(0).all()  # right padding
        assert ids[r, n:].eq(tok.pad_token_id).all() and lab[r, n:].eq(-100).all()
        on = (lab[r] != -100).nonzero().flatten()
        assert len(on) > 0 and on.tolist() == list(range(int(on[0]), n))  # the response ends the row
        assert torch.equal(lab[r, on], ids[r, on])
        assert not (ids[r, on] == image_token_id).any()


# --------------------------------------------------------------------------------------------------- processors
@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_processor_agrees_with_tiny_model(family, tiny_models, processors):
    import transformers

    tiny, proc = tiny_models[family], processors[family]
    cls = {"llava": transformers.LlavaProcessor, "qwen2_vl": transformers.Qwen2VLProcessor,
           "qwen2_5_vl": transformers.Qwen2_5_VLProcessor, "idefics2": transformers.Idefics2Processor}[family]
    assert isinstance(proc, cls)
    assert proc.image_token_id == tiny.image_token_id
    tok = proc.tokenizer
    assert tok.pad_token_id == tiny.pad_token_id
    assert max(tok.get_vocab().values()) < tiny.vocab_size
    if family.startswith("qwen"):
        assert tok.convert_tokens_to_ids("<|vision_start|>") == tiny.extra["vision_start_token_id"]
        assert tok.convert_tokens_to_ids("<|vision_end|>") == tiny.extra["vision_end_token_id"]
    # The defaults (no tiny model given) are the tiny models' defaults.
    default = build_tiny_processor(family)
    assert default.image_token_id == proc.image_token_id
    # One image of the tiny shape -> exactly N_p image tokens.
    h, w = IMAGE_HW[family]
    text = proc.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is it ?"}]}],
        add_generation_prompt=True,
    )
    for p in (proc, default):
        out = p(text=[text], images=[_rand_image(h, w, 0)], return_tensors="pt")
        assert int((out["input_ids"] == tiny.image_token_id).sum()) == tiny.num_image_tokens
    if family.startswith("qwen"):
        assert out["image_grid_thw"].tolist() == [list(tiny.extra["grid_thw"])]
        assert out["pixel_values"].shape[-1] == tiny.extra["patch_dim"]
    elif family == "llava":
        assert tuple(out["pixel_values"].shape[1:]) == tiny.extra["pixel_shape"]
    else:
        assert tuple(out["pixel_values"].shape[1:]) == tiny.extra["pixel_shape"]
    # Every default word is in the vocabulary.
    assert tok.unk_token_id not in tok(" ".join(TINY_WORDS), add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------------------------------- batches x the model
@pytest.mark.parametrize("family", FAMILIES)
def test_every_method_runs_through_the_tiny_model(family, tiny_models, processors, tmp_path):
    tiny, proc = tiny_models[family], processors[family]
    recs = _records(tmp_path, family, n=2, ref_logps={m: [-1.5, -2.5] for m in METHODS})
    B, L = len(recs), 5
    vision_keys = {"llava": {"pixel_values"}, "idefics2": {"pixel_values", "pixel_attention_mask"}}.get(
        family, {"pixel_values", "image_grid_thw", "mm_token_type_ids"})
    expected_sub = {"tpo": {"noised"}, "mdpo": {"crop"}, "ovip": {"noimg", "negimg"}, "lpoi": {"list"}}
    for method in METHODS:
        batch = PreferenceCollator(proc, family, method=method, list_size=L)(recs)
        main = {"input_ids", "attention_mask", "labels"} | vision_keys
        extra = {"sub", "ids", "skipped", "ref_logps"} | ({"token_weights"} if method == "catpo" else set())
        assert set(batch) == main | extra, method
        assert batch["ids"] == [r.id for r in recs] and batch["skipped"] == {}
        assert batch["input_ids"].shape[0] == 2 * B
        assert torch.equal(batch["ref_logps"], torch.tensor([-1.5, -1.5, -2.5, -2.5]))
        _check_rows(batch, proc.tokenizer, tiny.image_token_id)
        assert (batch["input_ids"] == tiny.image_token_id).sum(-1).eq(tiny.num_image_tokens).all()
        if family == "llava":
            assert batch["pixel_values"].shape == (2 * B, 3, 24, 24)
        elif family == "idefics2":
            assert batch["pixel_values"].shape == (2 * B, 1, 3, 16, 16)
            assert batch["pixel_attention_mask"].shape == (2 * B, 1, 16, 16)
        else:
            assert batch["image_grid_thw"].tolist() == [[1, 4, 6]] * (2 * B)
            assert batch["pixel_values"].shape == (2 * B * 24, tiny.extra["patch_dim"])
            assert torch.equal(batch["mm_token_type_ids"], (batch["input_ids"] == tiny.image_token_id).long())
        # each example's image serves its chosen and its rejected row
        pv = batch["pixel_values"].reshape(2 * B, -1)
        assert torch.equal(pv[:B], pv[B:])
        _forward(tiny, batch)

        assert set(batch["sub"]) == expected_sub.get(method, set()), method
        for name, sub in batch["sub"].items():
            rows = {"noised": 2 * B, "crop": B, "noimg": B, "negimg": B, "list": B * L}[name]
            assert sub["input_ids"].shape[0] == rows, (method, name)
            keys = {"input_ids", "attention_mask", "labels"} | (set() if name == "noimg" else vision_keys)
            assert set(sub) == keys, (method, name)
            _check_rows(sub, proc.tokenizer, tiny.image_token_id)
            _forward(tiny, sub)


# ---------------------------------------------------------------------------------------------------------- labels
@pytest.mark.parametrize("family", FAMILIES)
def test_labels_cover_exactly_the_response(family, processors, tmp_path):
    proc = processors[family]
    tok = proc.tokenizer
    recs = _records(tmp_path, family, n=3)
    # A LLaVA-style "<image>\n" prefix in the prompt must not add a second image.
    recs[2].prompt = "<image>\n" + recs[2].prompt
    batch = PreferenceCollator(proc, family, method="ovip")(recs)
    B = len(recs)
    for b, r in enumerate(recs):
        for row, text in ((b, r.chosen), (B + b, r.rejected)):
            lab = batch["labels"][row]
            got = tok.convert_ids_to_tokens(lab[lab != -100].tolist())
            assert got == _words(text) + [END_TOKEN[family]]
            # the prompt's words sit before the response, unlabeled
            ids = batch["input_ids"][row][batch["attention_mask"][row].bool() & (lab == -100)]
            assert " ".join(_words(r.prompt.replace("<image>", ""))) in " ".join(tok.convert_ids_to_tokens(ids))
        assert int((batch["input_ids"][b] == proc.image_token_id).sum()) == {"llava": 9, "idefics2": 5}.get(family, 6)
        # the image-free and the negative-image passes label the chosen response too
        for name in ("noimg", "negimg"):
            lab = batch["sub"][name]["labels"][b]
            assert tok.convert_ids_to_tokens(lab[lab != -100].tolist()) == _words(r.chosen) + [END_TOKEN[family]]


def test_max_length_truncates_the_response_and_skips_prompts_that_do_not_fit(processors, tmp_path):
    proc = processors["llava"]
    recs = _records(tmp_path, "llava", n=2)
    full = PreferenceCollator(proc, "llava")(recs)
    n_prompt = ((full["labels"] == -100) & full["attention_mask"].bool()).sum(-1).tolist()  # [2B]
    cut = PreferenceCollator(proc, "llava", max_length=max(n_prompt) + 3)(recs)
    assert cut["input_ids"].shape[1] <= max(n_prompt) + 3
    lab = cut["labels"][0]
    assert lab[lab != -100].tolist() == full["labels"][0][full["labels"][0] != -100].tolist()[:3]
    with pytest.warns(DataWarning, match="too_long"):
        out = PreferenceCollator(proc, "llava", max_length=min(n_prompt))(recs)
    assert out == {"ids": [], "skipped": {"too_long": 2}}


# ---------------------------------------------------------------------------------------------------- TPO noise
def _llava_pixels(pv):
    """Invert CLIP normalization: processor pixel_values [3, 24, 24] -> [0, 1] pixels (identity resize at 24x24)."""
    return pv * CLIP_STD + CLIP_MEAN


def test_tpo_noise_is_pixel_space_ddpm_with_the_expected_statistics(processors, tmp_path):
    proc = processors["llava"]
    step = 150  # sqrt(1 - ᾱ) ≈ 0.082: on pixels in [0.4, 0.6] clamping to [0, 1] never happens (> 4.8 σ)
    a = diffusion_alpha_bar(step)
    recs = []
    for i in range(4):
        path = tmp_path / f"gray{i}.png"
        _rand_image(24, 24, seed=i, lo=102, hi=154).save(path)
        recs.append(PreferenceRecord(f"g{i}", str(path), PROMPT, CHOSEN, REJECTED))
    batch = PreferenceCollator(proc, "llava", method="tpo", noise_step=step, seed=3)(recs)
    B = len(recs)
    clean = _llava_pixels(batch["pixel_values"][:B])
    noised = _llava_pixels(batch["sub"]["noised"]["pixel_values"][:B])
    # the clean path is exact (24x24 needs no resize): the PNG's pixels / 255
    ref = torch.stack([_to_unit_tensor(Image.open(r.image)) for r in recs])
    assert torch.allclose(clean, ref, atol=1e-5)
    eps = (noised - math.sqrt(a) * clean) / math.sqrt(1 - a)
    assert abs(eps.mean().item()) < 0.06
    assert abs(eps.std().item() - 1.0) < 0.06
    # independent across examples, same ε for an example's chosen and rejected rows
    e = eps.reshape(B, -1)
    assert abs(torch.corrcoef(e)[0, 1].item()) < 0.1
    assert torch.equal(batch["sub"]["noised"]["pixel_values"][:B], batch["sub"]["noised"]["pixel_values"][B:])
    # input_ids / labels identical to the main rows
    for k in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(batch["sub"]["noised"][k], batch[k])


def test_tpo_noise_reproduces_add_diffusion_noise_and_is_seeded(processors, tmp_path):
    proc = processors["llava"]
    recs = _records(tmp_path, "llava", n=2)
    c = PreferenceCollator(proc, "llava", method="tpo", seed=7)  # default step 500
    first = c(recs)
    # exactly vpo.add_diffusion_noise on the [0, 1] image with the documented seed, rounded to 8 bits, normalized
    for b, r in enumerate(recs):
        x = _to_unit_tensor(Image.open(r.image))
        g = torch.Generator().manual_seed(c.noise_seed(r.id, draw=0))
        expected = _to_unit_tensor(_to_pil(add_diffusion_noise(x, 500, generator=g)))
        got = _llava_pixels(first["sub"]["noised"]["pixel_values"][b])
        assert torch.allclose(got, expected, atol=1e-5)
        assert torch.allclose(got, c.noised_pixels(Image.open(r.image), r.id, draw=0), atol=0.5 / 255 + 1e-5)
    noised = lambda batch: batch["sub"]["noised"]["pixel_values"]  # noqa: E731
    # same seed -> same noise; another seed -> another noise
    assert torch.equal(noised(PreferenceCollator(proc, "llava", method="tpo", seed=7)(recs)), noised(first))
    assert not torch.equal(noised(PreferenceCollator(proc, "llava", method="tpo", seed=8)(recs)), noised(first))
    # a fresh ε per call unless fixed_noise
    assert not torch.equal(noised(c(recs)), noised(first))
    fixed = PreferenceCollator(proc, "llava", method="tpo", seed=7, fixed_noise=True)
    assert torch.equal(noised(fixed(recs)), noised(fixed(recs)))
    # resuming: setting draw replays the stream
    c.draw = 0
    assert torch.equal(noised(c(recs)), noised(first))
    # the clean images are untouched
    assert torch.equal(first["pixel_values"], PreferenceCollator(proc, "llava")(recs)["pixel_values"])


# --------------------------------------------------------------------------------------------------------- mDPO
def test_mdpo_crop_removes_up_to_crop_max_frac_and_is_one_crop_per_example(processors, tmp_path):
    proc = processors["qwen2_vl"]
    c = PreferenceCollator(proc, "qwen2_vl", method="mdpo", seed=1, crop_max_frac=0.2)  # the older crop
    removed = []
    for i in range(300):
        x0, y0, x1, y1 = c.crop_box(f"id{i}", 48, 32, draw=i % 7)
        assert 0 <= x0 < x1 <= 48 and 0 <= y0 < y1 <= 32
        removed.append(1 - (x1 - x0) * (y1 - y0) / (48 * 32))
    assert 0.0 <= min(removed) < 0.03 and 0.15 < max(removed) <= 0.2
    assert c.crop_box("a", 48, 32, draw=0) == PreferenceCollator(proc, "qwen2_vl", seed=1,
                                                                 crop_max_frac=0.2).crop_box("a", 48, 32, 0)
    no_crop = PreferenceCollator(proc, "qwen2_vl", method="mdpo", crop_max_frac=0.0)
    assert no_crop.crop_box("a", 48, 32) == (0, 0, 48, 32)

    recs = _records(tmp_path, "qwen2_vl", n=2)
    # a seed whose draw-0 crops are real crops for both examples (tiny images round small crops to no crop)
    seed = next(s for s in range(100) if all(
        PreferenceCollator(proc, "qwen2_vl", seed=s).crop_box(r.id, 48, 32, 0) != (0, 0, 48, 32) for r in recs))
    c = PreferenceCollator(proc, "qwen2_vl", method="mdpo", seed=seed)
    batch = c(recs)  # draw 0
    crop = batch["sub"]["crop"]
    B = len(recs)
    # the B chosen rows (same tokens: the crop is resized back, so the image-token count is unchanged), padded to
    # their own length
    T = crop["input_ids"].shape[1]
    assert not batch["attention_mask"][:B, T:].any()
    for k in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(crop[k], batch[k][:B, :T])
    # the sub-batch holds exactly the crop of crop_box(...) of each example's image
    boxes = []
    for b, r in enumerate(recs):
        img = Image.open(r.image).convert("RGB")
        box = c.crop_box(r.id, img.width, img.height, draw=0)
        ref = proc(text=["<|vision_start|><|image_pad|><|vision_end|>"],
                   images=[img.crop(box).resize(img.size, Image.Resampling.BICUBIC)], return_tensors="pt")
        assert torch.equal(crop["pixel_values"][24 * b: 24 * (b + 1)], ref["pixel_values"])
        boxes.append(box)
    assert all(box != (0, 0, 48, 32) for box in boxes)
    assert not torch.equal(crop["pixel_values"], batch["pixel_values"][: 24 * B])


# --------------------------------------------------------------------------------------------------------- OViP
@pytest.mark.parametrize("family", FAMILIES)
def test_ovip_image_free_pass_has_no_image_tokens(family, processors, tmp_path):
    proc = processors[family]
    tok = proc.tokenizer
    recs = _records(tmp_path, family, n=3)
    recs[1].neg_image = None
    with pytest.warns(DataWarning, match="no_neg_image"):
        batch = PreferenceCollator(proc, family, method="ovip")(recs)
    assert batch["ids"] == [recs[0].id, recs[2].id] and batch["skipped"] == {"no_neg_image": 1}
    noimg = batch["sub"]["noimg"]
    assert set(noimg) == {"input_ids", "attention_mask", "labels"}
    vision_ids = {proc.image_token_id} | {
        tok.convert_tokens_to_ids(t) for t in ("<|vision_start|>", "<|vision_end|>", "<fake_token_around_image>")
        if t in tok.get_vocab()
    }
    assert not torch.isin(noimg["input_ids"], torch.tensor(sorted(vision_ids))).any()
    assert noimg["input_ids"].shape[1] < batch["input_ids"].shape[1]
    neg = batch["sub"]["negimg"]
    n = neg["pixel_values"].shape[0] // 2
    assert not torch.equal(neg["pixel_values"], batch["pixel_values"][: 2 * n])
    # ovip_rejected: 2B rows, chosen then rejected (the symmetric / bi-anchor variants)
    both = PreferenceCollator(proc, family, method="ovip", ovip_rejected=True)([recs[0], recs[2]])
    for name in ("noimg", "negimg"):
        sub = both["sub"][name]
        assert sub["input_ids"].shape[0] == 4
        for row, text in ((0, recs[0].chosen), (1, recs[2].chosen), (2, recs[0].rejected), (3, recs[2].rejected)):
            lab = sub["labels"][row]
            assert tok.convert_ids_to_tokens(lab[lab != -100].tolist()) == _words(text) + [END_TOKEN[family]]
    assert torch.equal(both["sub"]["negimg"]["pixel_values"][:2 * n], both["sub"]["negimg"]["pixel_values"][2 * n:])


# --------------------------------------------------------------------------------------------------------- LPOI
def test_lpoi_list_is_example_major_and_starts_with_the_original(processors, tmp_path):
    proc = processors["llava"]
    L = 4
    recs = _records(tmp_path, "llava", n=3, list_len=L)
    recs[1].image_list = recs[1].image_list[1:]  # L - 1 images: the record's image becomes x_1
    recs[2].image_list = None
    with pytest.warns(DataWarning, match="no_image_list"):
        batch = PreferenceCollator(proc, "llava", method="lpoi", list_size=L)(recs)
    assert batch["ids"] == [recs[0].id, recs[1].id] and batch["skipped"] == {"no_image_list": 1}
    lst = batch["sub"]["list"]
    assert lst["pixel_values"].shape[0] == 2 * L
    plain = PreferenceCollator(proc, "llava")
    for b, r in enumerate(recs[:2]):
        images = r.image_list if b == 0 else [r.image] + r.image_list
        ref = plain([PreferenceRecord(f"x{k}", img, r.prompt, r.chosen, r.rejected) for k, img in enumerate(images)])
        assert torch.equal(lst["pixel_values"][b * L: (b + 1) * L], ref["pixel_values"][:L])
        T = lst["input_ids"].shape[1]
        for k in range(L):  # every list row is the chosen row's tokens
            assert torch.equal(lst["input_ids"][b * L + k], batch["input_ids"][b, :T])
            assert torch.equal(lst["labels"][b * L + k], batch["labels"][b, :T])
    assert torch.equal(lst["pixel_values"][L], batch["pixel_values"][1])  # x_1 of example 1 = its own image
    recs[0].image_list = recs[0].image_list[:2]
    with pytest.warns(DataWarning, match="bad_image_list"):
        out = PreferenceCollator(proc, "llava", method="lpoi", list_size=L)(recs[:1])
    assert out == {"ids": [], "skipped": {"bad_image_list": 1}}


# -------------------------------------------------------------------------------------- Cat-PO weights, ref logps
def test_catpo_token_weights_align_with_labels(processors, tmp_path):
    proc = processors["qwen2_vl"]
    recs = _records(tmp_path, "qwen2_vl", n=3)
    n_c, n_r = len(_words(CHOSEN)) + 1, len(_words(REJECTED)) + 1  # + the end-of-turn token
    recs[0].extra["token_weights"] = {"chosen": [0.5 + k / 100 for k in range(n_c)],
                                      "rejected": [1.5 - k / 100 for k in range(n_r)]}
    recs[2].extra["token_weights"] = {"chosen": [1.0] * (n_c + 1), "rejected": [1.0] * n_r}  # wrong length
    with pytest.warns(DataWarning, match="bad_token_weights"):
        batch = PreferenceCollator(proc, "qwen2_vl", method="catpo")(recs)
    assert batch["ids"] == [recs[0].id, recs[1].id] and batch["skipped"] == {"bad_token_weights": 1}
    tw, lab = batch["token_weights"], batch["labels"]
    assert tw.shape == lab.shape and tw.dtype == torch.float32
    B = 2
    assert torch.allclose(tw[0][lab[0] != -100], torch.tensor(recs[0].extra["token_weights"]["chosen"]))
    assert torch.allclose(tw[B][lab[B] != -100], torch.tensor(recs[0].extra["token_weights"]["rejected"]))
    assert tw[0][lab[0] == -100].eq(1).all()
    assert tw[1].eq(1).all() and tw[B + 1].eq(1).all()  # record 1 has no weights: 1.0 everywhere
    # truncation cuts the weights with the response
    n_prompt = int(((lab[0] == -100) & batch["attention_mask"][0].bool()).sum())
    cut = PreferenceCollator(proc, "qwen2_vl", method="catpo", max_length=n_prompt + 2)(recs[:1])
    assert cut["token_weights"][0][cut["labels"][0] != -100].tolist() == pytest.approx([0.5, 0.51])


def test_ref_logps_only_when_every_record_has_them(processors, tmp_path):
    proc = processors["llava"]
    recs = _records(tmp_path, "llava", n=2)
    recs[0].extra["ref_logps"] = {"dpo": [-1.0, -2.0]}
    recs[1].extra["ref_logps"] = {"dpo": [-3.0, -4.0], "tpo": [-5.0, -6.0]}
    c = PreferenceCollator(proc, "llava")
    assert torch.equal(c(recs)["ref_logps"], torch.tensor([-1.0, -3.0, -2.0, -4.0]))
    assert "ref_logps" not in PreferenceCollator(proc, "llava", method="tpo")(recs)
    recs[0].extra["ref_logps"] = {"dpo": [-1.0]}
    with pytest.warns(DataWarning, match="bad_field"):
        out = c(recs)
    assert out["ids"] == [recs[1].id] and torch.equal(out["ref_logps"], torch.tensor([-3.0, -4.0]))


# ------------------------------------------------------------------------------------------------------- readers
def _write_jsonl(path, rows, raw_lines=()):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
        for line in raw_lines:
            f.write(line + "\n")
    return path


def test_read_vpo_jsonl(tmp_path):
    (tmp_path / "img").mkdir()
    _png(tmp_path / "img" / "a.png", 8, 8, 0)
    rows = [
        {"id": "a", "image": "img/a.png", "prompt": "p", "chosen": "c", "rejected": "r", "neg_image": "img/n.png",
         "image_list": ["img/a.png", "img/b.png"], "bbox": [1, 2, 5, 6],
         "token_weights": {"chosen": [1.0], "rejected": [1.0]}, "ref_logps": {"dpo": [-1, -2]}, "source": "x"},
        {"image": str(tmp_path / "img" / "a.png"), "prompt": "p2", "chosen": "c2", "rejected": "r2"},
    ]
    path = _write_jsonl(tmp_path / "train.jsonl", rows)
    recs, stats = read_preference_jsonl(path, layout="vpo")
    assert stats.as_dict() == {"seen": 2, "kept": 2, "skipped": {}}
    a, b = recs
    assert a.id == "a" and a.image == str(tmp_path / "img" / "a.png")
    assert a.neg_image == str(tmp_path / "img" / "n.png") and a.image_list[1] == str(tmp_path / "img" / "b.png")
    assert a.bbox == (1.0, 2.0, 5.0, 6.0)
    assert a.extra == {"token_weights": {"chosen": [1.0], "rejected": [1.0]}, "ref_logps": {"dpo": [-1, -2]},
                       "source": "x"}
    assert b.id == "train.jsonl:2" and b.neg_image is None and b.image_list is None and b.bbox is None
    # image_root overrides the JSONL's directory
    recs, _ = read_preference_jsonl(path, image_root="/data")
    assert recs[0].image == "/data/img/a.png" and recs[1].image == str(tmp_path / "img" / "a.png")
    ds = PreferenceDataset.from_jsonl(path)
    assert len(ds) == 2 and ds[0].id == "a" and ds.stats.kept == 2


def test_read_rlhf_v_and_rlaif_v_layouts(tmp_path, processors):
    buf = io.BytesIO()
    _rand_image(24, 24, 5).save(buf, format="PNG")
    png64 = base64.b64encode(buf.getvalue()).decode()
    _png(tmp_path / "coco_1.png", 24, 24, 6)
    rlhf_v = {
        "ds_name": "RLHF-V", "image": {"bytes": png64, "path": "x.png"},
        "text": json.dumps({"question": "What is the cat holding ?", "chosen": CHOSEN, "rejected": REJECTED}),
        "origin_dataset": "LCS", "origin_split": "{...}", "idx": 17, "image_path": "x.png",
    }
    rlaif_v = {
        "ds_name": "RLAIF-V", "image": None, "question": "Describe the image .", "chosen": "A cat .",
        "rejected": "A dog .", "origin_dataset": "COCO", "origin_split": "{...}", "idx": "OmniLMM-12B_0",
        "image_path": "coco_1.png",
    }
    for layout, row in (("rlhf-v", rlhf_v), ("rlaif-v", rlaif_v)):
        path = _write_jsonl(tmp_path / f"{layout}.jsonl", [row])
        for lay in (layout, "auto"):
            recs, stats = read_preference_jsonl(path, layout=lay)
            assert stats.kept == 1 and not stats.skipped
            (r,) = recs
            if layout == "rlhf-v":
                assert (r.id, r.prompt, r.chosen, r.rejected) == ("17", "What is the cat holding ?", CHOSEN, REJECTED)
                assert r.image == {"bytes": png64, "path": "x.png"}
            else:
                assert (r.id, r.prompt, r.chosen, r.rejected) == ("OmniLMM-12B_0", "Describe the image .", "A cat .",
                                                                  "A dog .")
                assert r.image == str(tmp_path / "coco_1.png")  # image_path when image is empty
            assert r.extra["ds_name"] == row["ds_name"] and r.extra["origin_dataset"] == row["origin_dataset"]
            assert r.extra["image_path"] == row["image_path"]
    # rows as a `datasets` table yields them: PIL images, `text` already a JSON string
    rows = [dict(rlhf_v, image=_rand_image(24, 24, 1)), dict(rlaif_v, image=_rand_image(24, 24, 2))]
    recs, stats = records_from_rows(rows, layout="auto")
    assert [r.id for r in recs] == ["17", "OmniLMM-12B_0"] and stats.kept == 2
    # both load and collate (base64 bytes, a path, PIL images)
    recs2, _ = read_preference_jsonl(tmp_path / "rlhf-v.jsonl")
    batch = PreferenceCollator(processors["llava"], "llava")(recs + recs2)
    assert batch["ids"] == ["17", "OmniLMM-12B_0", "17"] and batch["skipped"] == {}


# ------------------------------------------------------------------------------------------------------ bad data
def test_bad_records_are_skipped_with_a_warning_and_counted(tmp_path, processors):
    good = [_png(tmp_path / f"ok{i}.png", 24, 24, i) for i in range(3)]
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    rows = [
        {"id": "ok0", "image": good[0], "prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED},
        {"id": "no_rejected", "image": good[1], "prompt": PROMPT, "chosen": CHOSEN},
        {"id": "corrupt", "image": "corrupt.png", "prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED},
        {"id": "missing_file", "image": "nope.png", "prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED},
        {"id": "ok2", "image": good[2], "prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED},
        {"id": "bad_type", "image": good[2], "prompt": PROMPT, "chosen": ["x"], "rejected": REJECTED},
        {"id": "no_image", "prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED},
    ]
    path = _write_jsonl(tmp_path / "mixed.jsonl", rows, raw_lines=["{not json", "", "[1, 2]"])
    with pytest.warns(DataWarning) as rec:
        records, stats = read_preference_jsonl(path)
    assert stats.as_dict() == {"seen": 9, "kept": 4,
                               "skipped": {"missing_field": 2, "bad_field": 1, "bad_json": 2}}
    messages = " ".join(str(w.message) for w in rec)
    assert "'no_rejected' (missing_field)" in messages and "'rejected'" in messages and "bad_json" in messages
    assert [r.id for r in records] == ["ok0", "corrupt", "missing_file", "ok2"]

    # Images are lazy: the collator skips the unreadable ones, counts them, and the rest of the batch survives.
    collator = PreferenceCollator(processors["llava"], "llava", method="tpo")
    with pytest.warns(DataWarning, match="unreadable_image") as rec:
        batch = collator(records)
    assert len(rec) == 2 and {"'corrupt'", "'missing_file'"} <= set(re.findall(r"'\w+'", " ".join(
        str(w.message) for w in rec)))
    assert batch["ids"] == ["ok0", "ok2"] and batch["skipped"] == {"unreadable_image": 2}
    assert batch["input_ids"].shape[0] == 4 and batch["sub"]["noised"]["input_ids"].shape[0] == 4
    assert collator.stats.as_dict() == {"seen": 4, "kept": 2, "skipped": {"unreadable_image": 2}}
    # A call where everything is skipped returns no tensors, and training goes on.
    with pytest.warns(DataWarning):
        assert collator(records[1:3]) == {"ids": [], "skipped": {"unreadable_image": 2}}
    # validate_images=True moves the check to read time.
    with pytest.warns(DataWarning):
        records, stats = read_preference_jsonl(path, validate_images=True)
    assert [r.id for r in records] == ["ok0", "ok2"] and stats.skipped["unreadable_image"] == 2
    # With a DataLoader (the trainer's path).
    loader = torch.utils.data.DataLoader(PreferenceDataset(records), batch_size=2, collate_fn=collator)
    (only,) = list(loader)
    assert only["ids"] == ["ok0", "ok2"]


def test_bad_arguments_raise_value_errors_naming_the_argument(processors, tmp_path):
    proc = processors["llava"]
    bad = [
        (dict(family="gpt4"), "family"),
        (dict(method="ppo"), "method"),
        (dict(max_length=1), "max_length"),
        (dict(max_length=2.5), "max_length"),
        (dict(noise_step=1000), "noise_step"),
        (dict(noise_step=-1), "noise_step"),
        (dict(seed="0"), "seed"),
        (dict(fixed_noise=1), "fixed_noise"),
        (dict(crop_max_frac=1.0), "crop_max_frac"),
        (dict(crop_max_frac=-0.1), "crop_max_frac"),
        (dict(list_size=1), "list_size"),
        (dict(ovip_rejected="yes"), "ovip_rejected"),
    ]
    for kwargs, name in bad:
        args = dict(family="llava")
        args.update(kwargs)
        with pytest.raises(ValueError, match=name):
            PreferenceCollator(proc, args.pop("family"), **args)
    with pytest.raises(ValueError, match="processor"):
        PreferenceCollator(None, "llava")
    c = PreferenceCollator(proc, "llava")
    with pytest.raises(ValueError, match="records"):
        c("not a list")
    with pytest.raises(ValueError, match="records"):
        c([1, 2])
    path = _write_jsonl(tmp_path / "x.jsonl", [])
    with pytest.raises(ValueError, match="layout"):
        read_preference_jsonl(path, layout="sharegpt")
    with pytest.raises(ValueError, match="path"):
        read_preference_jsonl(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="image_root"):
        read_preference_jsonl(path, image_root=3)
    with pytest.raises(ValueError, match="validate_images"):
        read_preference_jsonl(path, validate_images="yes")
    with pytest.raises(ValueError, match="layout"):
        records_from_rows([], layout="x")
    with pytest.raises(ValueError, match="family"):
        build_tiny_processor("blip2")
    with pytest.raises(ValueError, match="vocab_size"):
        build_tiny_processor("llava", vocab_size=8)
    with pytest.raises(ValueError, match="words"):
        build_tiny_processor("llava", vocab_size=32)
    with pytest.raises(ValueError, match="words"):
        build_tiny_processor("llava", words=["two words"])
    with pytest.raises(ValueError, match="tiny"):
        build_tiny_processor("llava", tiny=tiny_qwen2_vl())
    with pytest.raises(ValueError, match="min_pixels"):
        build_tiny_processor("qwen2_vl", min_pixels=0)
    with pytest.raises(ValueError, match="records"):
        PreferenceDataset([{"id": "a"}])


def test_no_warnings_on_clean_data(processors, tmp_path):
    recs = _records(tmp_path, "idefics2", n=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        batch = PreferenceCollator(processors["idefics2"], "idefics2", method="lpoi")(recs)
    assert batch["skipped"] == {}


def test_degenerate_image_is_skipped_and_the_collator_pickles(processors, tmp_path):
    import pickle

    proc = processors["qwen2_vl"]
    recs = _records(tmp_path, "qwen2_vl", n=2)
    recs[0].image = Image.new("RGB", (300, 1))  # aspect ratio > 200: Qwen-VL's smart resize refuses it
    collator = PreferenceCollator(proc, "qwen2_vl", method="tpo", seed=5)
    clone = pickle.loads(pickle.dumps(collator))  # DataLoader workers started with spawn pickle the collate_fn
    with pytest.warns(DataWarning, match="bad_image"):
        batch = collator(recs)
    assert batch["ids"] == [recs[1].id] and batch["skipped"] == {"bad_image": 1}
    with pytest.warns(DataWarning, match="bad_image"):
        again = clone(recs)
    for k in ("input_ids", "labels", "pixel_values", "image_grid_thw"):
        assert torch.equal(again[k], batch[k]) and torch.equal(again["sub"]["noised"][k], batch["sub"]["noised"][k])


def test_a_bpe_tokenizer_labels_decode_to_the_exact_response(tmp_path):
    """The path real checkpoints take: a byte-level BPE tokenizer, responses tokenized in context."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import CLIPImageProcessorPil, LlavaProcessor, PreTrainedTokenizerFast

    from vpo.data.processors import LLAVA_CHAT_TEMPLATE

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    corpus = [PROMPT, CHOSEN, REJECTED, "USER: ASSISTANT: Describe the image. Two people are walking."] * 20
    tk.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>",
                                                                                        "<image>"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    proc = LlavaProcessor(image_processor=CLIPImageProcessorPil(size={"shortest_edge": 24},
                                                                crop_size={"height": 24, "width": 24}),
                          tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, chat_template=LLAVA_CHAT_TEMPLATE)
    recs = _records(tmp_path, "llava", n=2)
    batch = PreferenceCollator(proc, "llava")(recs)
    for row, text in ((0, recs[0].chosen), (2, recs[0].rejected), (1, recs[1].chosen)):
        lab = batch["labels"][row]
        assert tok.decode(lab[lab != -100]) == " " + text + "</s>"
    assert int((batch["input_ids"][0] == proc.image_token_id).sum()) == 9
