"""CSR data construction (vpo.construct.csr): the sentence-level beam search against brute-force enumeration on a tiny
vocabulary, score vs rank mode on hand-made numbers, the scorers, the transformers adapter and the dataset writer on the
shapes world with a tiny VLM, the iterative loop with a fake trainer, and argument errors."""
import json
import math
import os
import zlib

import numpy as np
import pytest
import torch

from vpo.construct import ConstructWarning
from vpo.construct.csr import (
    CLIPScorer,
    CSRConfig,
    ShapesWorldScorer,
    VLMTokenLM,
    calibrated_reward,
    csr_iterate,
    language_score,
    load_policy,
    make_scorer,
    propose_sentences,
    sentence_beam_search,
    sibling_ranks,
    vlm_factory,
    write_csr_dataset,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The tiny models run fastest on one thread (vpo.models.tiny); more only add overhead on shared cores.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --------------------------------------------------------------------------------------------- a tiny toy model
EOS, DOT, A, B = 0, 1, 2, 3
WORDS = {DOT: ".", A: "a", B: "b"}


class ToyLM:
    """A deterministic 'model' over the vocabulary {eos, '.', 'a', 'b'}: the next-token distribution of a prefix is a
    fixed pseudo-random function of the prefix (so every sibling differs)."""

    eos_token_ids = (EOS,)

    def __init__(self, salt: int = 0):
        self.salt = salt
        self.calls = 0

    def _logprobs(self, prefix):
        g = torch.Generator().manual_seed(zlib.crc32(repr((self.salt, tuple(prefix))).encode()))
        return torch.log_softmax(1.5 * torch.randn(4, generator=g, dtype=torch.float64), dim=-1)

    def next_logprobs(self, prefixes):
        self.calls += 1
        return torch.stack([self._logprobs(p) for p in prefixes])

    def decode(self, ids):
        return " ".join(WORDS[i] for i in ids if i != EOS)

    def token_id(self, text):
        inv = {v: k for k, v in WORDS.items()}
        if text not in inv:
            raise ValueError(f"not one token: {text!r}")
        return inv[text]


def toy_r_i(text: str) -> float:
    """A tie-free pseudo-random R_I in [0, 100] per text."""
    return (zlib.crc32(text.encode()) % 100003) / 1000.03


class ToyScorer:
    def __call__(self, image, texts, *, record=None):
        return [toy_r_i(t) for t in texts]


def all_sentences(lm, prefix, max_new_tokens, min_tokens=0, bare_eos=False):
    """Every sentence after ``prefix`` with its summed log-prob, by plain recursion (no beam search). A stop token
    ends one only after ``min(min_tokens, max_new_tokens - 1)`` tokens, or as a bare eos when ``bare_eos``."""
    out = []
    least = min(min_tokens, max_new_tokens - 1)

    def rec(toks, lp):
        dist = lm._logprobs(tuple(prefix) + toks)
        for t in (EOS, DOT, A, B):
            nt, nlp = toks + (t,), lp + float(dist[t])
            if t in (EOS, DOT):
                if len(toks) >= least or (bare_eos and not toks and t == EOS):
                    out.append((nt, nlp))
            elif len(nt) == max_new_tokens:
                out.append((nt, nlp))
            else:
                rec(nt, nlp)

    rec((), 0.0)
    return out


def brute_force(lm, cfg):
    """All responses ``(text, R(y))`` by exhaustive enumeration, computed from the definitions (docs/methods.md, CSR)."""
    lam = cfg.lam
    out = []

    def expand(prefix, depth, score_sum, cost_sum, n_ranked, cut):
        # the minimum sentence length: not after a sentence cut by max_new_tokens; a bare eos ends a response
        sents = all_sentences(lm, prefix, cfg.max_new_tokens, 0 if cut else cfg.min_sentence_tokens, bool(prefix))
        texts = [lm.decode([t for t in s if t != EOS]).strip() for s, _ in sents]
        live = [j for j, t in enumerate(texts) if t]
        # R_T = prod P (language_score "prob"); ranks among non-empty siblings, ties by log-prob order
        r_t = {j: math.exp(sents[j][1]) for j in live}
        r_i = {j: toy_r_i(texts[j]) for j in live}
        order = sorted(live, key=lambda j: -sents[j][1])  # the proposal order
        rank = {}
        for key, vals in (("t", r_t), ("i", r_i)):
            srt = sorted(order, key=lambda j: -vals[j])
            for pos, j in enumerate(srt):
                rank[(key, j)] = (pos + 1) / len(live)
        for j, (toks, _) in enumerate(sents):
            ok = j in r_t
            s2 = score_sum + (lam * r_i[j] + (1 - lam) * r_t[j] if ok else 0.0)
            c2 = cost_sum + ((1 - lam) * rank[("t", j)] + lam * rank[("i", j)] if ok else 0.0)
            n2 = n_ranked + int(ok)
            path = prefix + toks
            if toks[-1] == EOS or depth + 1 == cfg.max_sentences:
                text = lm.decode([t for t in path if t != EOS]).strip()
                if text:
                    reward = s2 if cfg.mode == "score" else -c2 / n2
                    out.append((text, reward))
            else:
                expand(path, depth + 1, s2, c2, n2, toks[-1] not in (EOS, DOT))

    expand((), 0, 0.0, 0.0, 0, False)
    return out


EXHAUSTIVE = dict(max_new_tokens=2, num_candidates=10, token_beams=4, max_sentences=3, keep_top=25, keep_bottom=25,
                  num_beam_groups=1)


@pytest.mark.parametrize("mode", ["score", "rank"])
@pytest.mark.parametrize("salt, least", [(0, 0), (1, 0), (2, 0), (0, 2), (1, 5)])
def test_exhaustive_search_returns_bruteforce_argmax_and_argmin(mode, salt, least):
    # 10 sentences per prefix (eos, ".", x eos, x ".", x y; x, y in {a, b}), 7 of them open: 10 + 70 + 490 nodes.
    # token_beams=4 >= the 4 open 2-token prefixes, num_candidates=10 >= all sentences, keep 50 >= 49 open paths:
    # nothing is pruned, so the search must see every response and pick the exact arg-max / arg-min. With a
    # minimum sentence length (capped at max_new_tokens - 1 = 1 here) the bare "." and the bare eos of a first
    # sentence are gone: the search is exact over the responses that remain.
    lm = ToyLM(salt)
    cfg = CSRConfig(mode=mode, min_sentence_tokens=least, **EXHAUSTIVE)
    res = sentence_beam_search(lm, ToyScorer(), config=cfg)
    bf = brute_force(lm, cfg)
    assert len(res.responses) == len(bf)
    got = sorted((r.text, round(r.reward, 9)) for r in res.responses)
    assert got == sorted((t, round(v, 9)) for t, v in bf)
    best = max(v for _, v in bf)
    assert res.chosen.reward == pytest.approx(best, abs=1e-12)
    assert res.chosen.text in {t for t, v in bf if abs(v - best) < 1e-12}
    worst = min(v for t, v in bf if t != res.chosen.text)
    assert res.rejected.reward == pytest.approx(worst, abs=1e-12)
    assert res.rejected.text in {t for t, v in bf if abs(v - worst) < 1e-12 and t != res.chosen.text}
    assert res.rejected.reward < res.chosen.reward


def test_propose_sentences_is_exhaustive_and_sorted():
    lm = ToyLM(3)
    got = propose_sentences(lm, (A,), sentence_end_ids=[DOT], eos_ids=[EOS], num_candidates=10, token_beams=4,
                            max_new_tokens=2)
    want = sorted(all_sentences(lm, (A,), 2), key=lambda s: -s[1])
    assert [s.token_ids for s in got] == [t for t, _ in want]
    assert [s.logprob for s in got] == pytest.approx([lp for _, lp in want], abs=1e-12)
    ends = {s.token_ids: s.end for s in got}
    assert ends[(EOS,)] == "eos" and ends[(DOT,)] == "sentence" and ends[(A, B)] == "length"
    # top-3 only: the 3 most likely sentences, early stop allowed
    top = propose_sentences(lm, (A,), sentence_end_ids=[DOT], eos_ids=[EOS], num_candidates=3, token_beams=4,
                            max_new_tokens=2)
    assert [s.token_ids for s in top] == [t for t, _ in want[:3]]


def test_pruning_keeps_top_and_bottom_paths():
    # keep_top=1, keep_bottom=2 (the CSR code's): after round 1 exactly 3 of the 7 open paths are expanded (every
    # sentence a candidate: no minimum length).
    lm = ToyLM(5)
    cfg = CSRConfig(**{**EXHAUSTIVE, "keep_top": 1, "keep_bottom": 2, "max_sentences": 2, "min_sentence_tokens": 0})
    res = sentence_beam_search(lm, ToyScorer(), config=cfg)
    assert res.num_sentences == 10 + 3 * 10
    first = all_sentences(lm, (), 2)
    open_ = [(toks, lam_r) for toks, lam_r in
             ((t, 0.9 * toy_r_i(lm.decode(t).strip()) + 0.1 * math.exp(lp)) for t, lp in first if t[-1] != EOS)]
    ranked = sorted(open_, key=lambda x: -x[1])
    kept = {t for t, _ in ranked[:1] + ranked[-2:]}
    deep = [r for r in res.responses if len(r.sentences) == 2]
    assert deep and {r.sentences[0].token_ids for r in deep} == kept


class ScriptedLM:
    """Next-token tables given by hand (missing prefix -> eos with probability 1)."""

    eos_token_ids = (EOS,)
    words = {DOT: ".", 2: "x", 3: "y"}

    def __init__(self, table):
        self.table = table

    def next_logprobs(self, prefixes):
        rows = []
        for p in prefixes:
            probs = torch.zeros(4, dtype=torch.float64)
            for t, q in self.table.get(tuple(p), {EOS: 1.0}).items():
                probs[t] = q
            rows.append(probs.log())
        return torch.stack(rows)

    def decode(self, ids):
        return " ".join(self.words[i] for i in ids if i != EOS)

    def token_id(self, text):
        return {".": DOT}[text]


def test_score_and_rank_modes_on_hand_made_numbers():
    # Responses: A = "x ." (P = 0.6, R_I = 50) then eos; B = "y ." (P = 0.4, R_I = 30) then "y ." (P = 1) then eos.
    X, Y = 2, 3
    table = {(): {X: 0.6, Y: 0.4}, (X,): {DOT: 1.0}, (Y,): {DOT: 1.0}, (Y, DOT): {Y: 1.0}, (Y, DOT, Y): {DOT: 1.0}}
    lm = ScriptedLM(table)
    r_i = {"x .": 50.0, "y .": 30.0}

    def scorer(image, texts, *, record=None):
        return [r_i[t] for t in texts]

    base = dict(max_new_tokens=3, num_candidates=5, token_beams=5, max_sentences=4, num_beam_groups=1)
    # score: R(A) = 0.9*50 + 0.1*0.6 = 45.06;  R(B) = (0.9*30 + 0.1*0.4) + (0.9*30 + 0.1*1.0) = 54.14
    res = sentence_beam_search(lm, scorer, config=CSRConfig(mode="score", **base))
    rewards = {r.text: r.reward for r in res.responses}
    assert rewards == pytest.approx({"x .": 45.06, "y . y .": 54.14})
    assert (res.chosen.text, res.rejected.text) == ("y . y .", "x .")
    # rank: round 1 siblings x (R_T .6, R_I 50) and y (.4, 30): ranks 1/2 and 1 in both -> c_x = .5, c_y = 1;
    # "y ." of round 2 is an only child: ranks 1 -> c = 1.  R(A) = -0.5, R(B) = -(1 + 1)/2 = -1 (the eos after
    # "x ." is empty: no rank).  The modes disagree: rank prefers A.
    res = sentence_beam_search(lm, scorer, config=CSRConfig(mode="rank", **base))
    rewards = {r.text: r.reward for r in res.responses}
    assert rewards == pytest.approx({"x .": -0.5, "y . y .": -1.0})
    assert (res.chosen.text, res.rejected.text) == ("x .", "y . y .")
    s = res.rejected.sentences  # the bare eos that ends the response is kept as an empty, unranked sentence
    assert [(x.text, x.rank_t, x.rank_i, x.reward) for x in s][2] == ("", None, None, None)
    assert [(x.rank_t, x.rank_i) for x in s[:2]] == [(1.0, 1.0), (1.0, 1.0)]
    assert s[0].r_t == pytest.approx(0.4) and s[1].r_t == pytest.approx(1.0)


def test_reward_helpers():
    assert calibrated_reward(30.0, 0.5) == pytest.approx(0.9 * 30 + 0.1 * 0.5)
    assert calibrated_reward(30.0, 0.5, lam=0.0) == 0.5
    assert sibling_ranks([0.2, 0.9, 0.5]) == pytest.approx([1.0, 1 / 3, 2 / 3])
    assert sibling_ranks([1.0, 1.0, 0.0]) == pytest.approx([1 / 3, 2 / 3, 1.0])  # ties keep input order
    assert language_score(math.log(0.25), 2, "prob") == pytest.approx(0.25)
    assert language_score(-3.0, 2, "logprob") == -3.0
    assert language_score(-3.0, 2, "mean_logprob") == -1.5


def test_no_pair_when_only_one_response():
    lm = ScriptedLM({(): {2: 1.0}, (2,): {DOT: 1.0}})
    res = sentence_beam_search(lm, lambda im, t, record=None: [10.0] * len(t), config=CSRConfig(max_new_tokens=3))
    assert [r.text for r in res.responses] == ["x ."] and not res.has_pair


def test_search_is_deterministic():
    cfg = CSRConfig(mode="rank", max_new_tokens=3, num_candidates=4, token_beams=3, max_sentences=3,
                    num_beam_groups=3)
    a = sentence_beam_search(ToyLM(7), ToyScorer(), config=cfg)
    b = sentence_beam_search(ToyLM(7), ToyScorer(), config=cfg)
    assert a == b


# ------------------------------------------------------------------------------------------------------ scorers
def _shapes_row():
    return {"objects": [
        {"shape": "circle", "color": "red", "size": "small", "position": "left", "bbox": [1, 22, 11, 32]},
        {"shape": "square", "color": "blue", "size": "small", "position": "top", "bbox": [22, 1, 32, 11]},
        {"shape": "square", "color": "blue", "size": "small", "position": "right", "bbox": [44, 22, 54, 32]},
    ]}


def test_shapes_world_scorer():
    row = _shapes_row()
    sc = ShapesWorldScorer()
    got = sc(None, ["a red circle and two blue squares.", "a red circle and a blue square.",
                    "a green circle and two blue squares.", "nothing.", "two squares and a circle."], record=row)
    # 2/2 correct; the count of blue squares is wrong (1 of 2); green circle absent (1 of 2); no mention; shapes only
    assert got == pytest.approx([100.0, 50.0, 50.0, 0.0, 100.0])
    f1 = ShapesWorldScorer("f1")(None, ["a red circle.", "a red circle and two blue squares."], record=row)
    assert f1 == pytest.approx([100 * 2 * 0.5 / 1.5, 100.0])  # precision 1, recall 1/2 -> F1 2/3
    with pytest.raises(ValueError, match="record"):
        sc(None, ["a red circle."])
    with pytest.raises(ValueError, match="metric"):
        ShapesWorldScorer("recall")


def _tiny_clip(path):
    """A tiny random CLIP and a byte-level BPE tokenizer, saved to ``path`` (no download)."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor, CLIPTokenizer

    chars = sorted(ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    bos, eos = len(vocab), len(vocab) + 1
    vocab.update({"<|startoftext|>": bos, "<|endoftext|>": eos})
    tok = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16)
    proc = CLIPProcessor(image_processor=CLIPImageProcessorPil(size={"shortest_edge": 32},
                                                                crop_size={"height": 32, "width": 32}),
                         tokenizer=tok)
    layer = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    cfg = CLIPConfig(text_config=dict(vocab_size=len(vocab), max_position_embeddings=16, bos_token_id=bos,
                                      eos_token_id=eos, pad_token_id=eos, **layer),
                     vision_config=dict(image_size=32, patch_size=8, **layer), projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(path)
    proc.save_pretrained(path)
    return path


def test_clip_scorer_from_local_folder(tmp_path):
    from PIL import Image

    path = _tiny_clip(str(tmp_path / "clip"))
    sc = CLIPScorer(path)
    img = Image.new("RGB", (40, 30), (200, 30, 30))
    texts = ["a red circle", "two blue squares and a cross", "x"]
    got = sc(img, texts)
    inputs = sc.processor(text=texts, images=img, return_tensors="pt", padding=True, truncation=True)
    with torch.no_grad():
        out = sc.model(**inputs)
    cos = torch.nn.functional.cosine_similarity(out.text_embeds, out.image_embeds, dim=-1)
    assert got == pytest.approx([max(100 * float(c), 0.0) for c in cos], abs=1e-4)
    assert all(0.0 <= g <= 100.0 for g in got)
    assert isinstance(make_scorer("clip", clip_path=path), CLIPScorer)


def test_scorer_arguments():
    with pytest.raises(ValueError, match="model_path"):
        CLIPScorer()
    with pytest.raises(ValueError, match="model_path"):
        CLIPScorer("/nonexistent/clip")
    with pytest.raises(ValueError, match="scorer"):
        make_scorer("blip")
    assert isinstance(make_scorer("shapes"), ShapesWorldScorer)


@pytest.mark.parametrize("kwargs, name", [
    (dict(mode="sum"), "mode"), (dict(lam=1.5), "lam"), (dict(keep_top=-1), "keep_top"),
    (dict(keep_top=0, keep_bottom=0), "keep_top"), (dict(num_candidates=0), "num_candidates"),
    (dict(token_beams=1.0), "token_beams"), (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(sentence_end="."), "sentence_end"), (dict(language_score="logit"), "language_score"),
    (dict(max_sentences=True), "max_sentences"),
])
def test_config_errors_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        CSRConfig(**kwargs)


def test_search_argument_errors():
    with pytest.raises(ValueError, match="config"):
        sentence_beam_search(ToyLM(), ToyScorer(), config={"mode": "score"})
    with pytest.raises(ValueError, match="scorer"):
        sentence_beam_search(ToyLM(), None)
    with pytest.raises(ValueError, match="scorer returned"):
        sentence_beam_search(ToyLM(), lambda im, t, record=None: [],
                             config=CSRConfig(max_new_tokens=2, num_beam_groups=1))


# ------------------------------------------------------------------------------------- a tiny VLM, shapes world
@pytest.fixture(scope="module")
def tiny_policy():
    return load_policy("tiny:llava")


@pytest.fixture(scope="module")
def shapes_data(tmp_path_factory):
    from vpo.worlds import shapes

    root = tmp_path_factory.mktemp("shapes")
    return shapes.make_dataset(str(root), 3, seed=0)


SMALL = CSRConfig(max_new_tokens=4, num_candidates=3, token_beams=2, max_sentences=2, num_beam_groups=2)
TINY = CSRConfig(max_new_tokens=3, num_candidates=3, token_beams=2, max_sentences=1, num_beam_groups=1)


def test_vlm_token_lm_matches_the_trainers_rows(tiny_policy):
    # The next-token log-probs the search uses are those of the collator's training row (same prompt tokens,
    # same image), renormalized over the allowed tokens.
    from PIL import Image

    from vpo.data import PreferenceCollator, PreferenceRecord

    model, proc = tiny_policy
    img = Image.new("RGB", (64, 64), (255, 255, 255))
    lm = VLMTokenLM(model, proc, img, "describe the image.")
    batch = PreferenceCollator(proc, "llava", method="dpo")([PreferenceRecord("r", img, "describe the image.",
                                                                              "a red circle.", "nothing.")])
    labels, ids = batch["labels"][0], batch["input_ids"][0]
    pos = (labels != -100).nonzero().flatten().tolist()
    resp = ids[pos].tolist()
    assert ids[: pos[0]].tolist() == lm.prompt_ids and resp[-1] in lm.eos_token_ids
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "pixel_values")}
                       ).logits[0]
    ref = torch.log_softmax(logits.float().masked_fill(lm._banned, -math.inf), -1)
    got = lm.next_logprobs([resp[:j] for j in range(len(resp))])
    assert torch.allclose(got, ref[pos[0] - 1: pos[-1]], atol=1e-5)
    assert bool(torch.isinf(got[:, lm.image_token_id]).all())  # the image placeholder is never proposed
    assert lm.token_id(".") == proc.tokenizer.convert_tokens_to_ids(".")
    with pytest.raises(ValueError, match="sentence_end"):
        lm.token_id("red circle")


def test_write_csr_dataset_on_shapes_world(tiny_policy, shapes_data, tmp_path):
    from vpo.data import PreferenceCollator, read_preference_jsonl

    model, proc = tiny_policy
    out = str(tmp_path / "csr")
    s = write_csr_dataset(shapes_data, out, lm_factory=vlm_factory(model, proc), scorer=ShapesWorldScorer(),
                          config=SMALL, iteration=1)
    assert s.seen == 3 and s.written + sum(s.skipped.values()) == 3 and s.written >= 1
    rows = [json.loads(line) for line in open(s.path)]
    for r in rows:
        assert r["chosen"] != r["rejected"] and r["csr"]["chosen_reward"] > r["csr"]["rejected_reward"]
        assert r["csr"]["iteration"] == 1 and "objects" in r and "hallucination" not in r
        assert os.path.isfile(os.path.join(out, r["image"]))
    records, stats = read_preference_jsonl(s.path)
    assert stats.kept == len(rows)
    batch = PreferenceCollator(proc, "llava", method="csr")(records)
    assert batch["input_ids"].shape[0] == 2 * len(rows) and not batch["skipped"]
    meta = json.load(open(os.path.join(out, "construct.json")))
    assert meta["method"] == "csr" and meta["config"]["lam"] == 0.9
    # deterministic: the same bytes again
    again = write_csr_dataset(shapes_data, str(tmp_path / "again"), lm_factory=vlm_factory(model, proc),
                              scorer=ShapesWorldScorer(), config=SMALL, iteration=1)
    assert open(again.path).read() == open(s.path).read()


def test_write_csr_dataset_skips_bad_rows(tiny_policy, tmp_path):
    model, proc = tiny_policy
    src = tmp_path / "p.jsonl"
    src.write_text('{"id": "a", "prompt": "describe the image."}\nnot json\n'
                   '{"id": "b", "image": "missing.png", "prompt": "describe the image."}\n')
    with pytest.warns(ConstructWarning, match="skipped record"):
        s = write_csr_dataset(str(src), str(tmp_path / "o"), lm_factory=vlm_factory(model, proc),
                              scorer=ShapesWorldScorer(), config=TINY)
    assert s.written == 0 and dict(s.skipped) == {"missing_field": 1, "bad_json": 1, "unreadable_image": 1}
    with pytest.raises(ValueError, match="data_path"):
        write_csr_dataset(str(tmp_path / "nope.jsonl"), str(tmp_path / "o"), lm_factory=vlm_factory(model, proc),
                          scorer=ShapesWorldScorer())
    with pytest.raises(ValueError, match="lm_factory"):
        write_csr_dataset(str(src), str(tmp_path / "o"), lm_factory=None, scorer=ShapesWorldScorer())


def test_csr_iterate_uses_previous_iterate_as_reference(tiny_policy, shapes_data, tmp_path):
    model, proc = tiny_policy
    calls, loads = [], []

    def load_fn(path):
        loads.append(path)
        return model, proc

    def train_fn(dataset_dir, ref_model_path):
        assert os.path.isfile(os.path.join(dataset_dir, "train.jsonl"))
        calls.append((os.path.basename(dataset_dir), ref_model_path))
        return f"model-{len(calls)}"

    its = csr_iterate(shapes_data, str(tmp_path / "run"), model_path="tiny:llava", train_fn=train_fn,
                      scorer=ShapesWorldScorer(), iterations=3, config=TINY, load_fn=load_fn, limit=1)
    pi0 = str(tmp_path / "run" / "iter0_model")  # tiny:llava saved once: the trainer loads the generator's weights
    assert calls == [("iter1", pi0), ("iter2", "model-1"), ("iter3", "model-2")]
    assert loads == ["tiny:llava", pi0, "model-1", "model-2"]
    assert [(i.iteration, i.ref_model_path, i.model_path) for i in its] == [
        (1, pi0, "model-1"), (2, "model-1", "model-2"), (3, "model-2", "model-3")]
    m0, p0 = load_policy(pi0)
    assert all(torch.equal(a, b) for a, b in zip(m0.state_dict().values(), model.state_dict().values()))
    assert p0.tokenizer.get_vocab() == proc.tokenizer.get_vocab()
    rows = [json.loads(x) for x in open(tmp_path / "run" / "iter2" / "train.jsonl")]
    assert all(r["csr"]["iteration"] == 2 for r in rows)
    assert len(json.load(open(tmp_path / "run" / "csr_iterations.json"))) == 3
    with pytest.raises(ValueError, match="iterations"):
        csr_iterate(shapes_data, str(tmp_path / "x"), model_path="tiny:llava", train_fn=train_fn,
                    scorer=ShapesWorldScorer(), iterations=0)
    with pytest.raises(ValueError, match="train_fn"):
        csr_iterate(shapes_data, str(tmp_path / "x"), model_path="tiny:llava", train_fn="train",
                    scorer=ShapesWorldScorer())


@pytest.mark.parametrize("family", ["qwen2_vl", "idefics2"])
def test_other_families_generate(family):
    from vpo.worlds import shapes

    model, proc = load_policy(f"tiny:{family}")
    scene = shapes.random_scene(np.random.default_rng(1))
    lm = VLMTokenLM(model, proc, shapes.render(scene), "describe the image.")
    res = sentence_beam_search(lm, ShapesWorldScorer(), record=scene.to_dict(),
                               config=CSRConfig(max_new_tokens=4, num_candidates=3, token_beams=2, max_sentences=1,
                                                num_beam_groups=2))
    assert res.responses and all(r.text for r in res.responses)


def test_load_policy_errors():
    with pytest.raises(ValueError, match="model_path"):
        load_policy("tiny:gpt2")
    with pytest.raises(ValueError, match="model_path"):
        load_policy("/nonexistent/model")


def test_cli(shapes_data, tmp_path, capsys):
    from vpo.construct.cli import main

    out = str(tmp_path / "o")
    argv = ["csr", "--data", shapes_data, "--out", out, "--limit", "1", "--max-new-tokens", "3", "--num-candidates",
            "3", "--token-beams", "2", "--beam-groups", "1", "--diversity-penalty", "2.5", "--max-sentences", "1"]
    assert main(argv + ["--mode", "rank"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["written"] == 1
    meta = json.load(open(os.path.join(out, "construct.json")))
    assert meta["config"]["num_beam_groups"] == 1 and meta["config"]["diversity_penalty"] == 2.5
    assert json.loads(open(os.path.join(out, "train.jsonl")).readline())["csr"]["mode"] == "rank"
    assert main(argv + ["--lam", "2"]) == 2
    assert "lam" in capsys.readouterr().err


# --------------------------------------------------------------------------------- diverse (group) beam search
def _all_scored(lm, max_new_tokens, group, penalty):
    """Brute force: every sentence with its true log-prob and its penalized score for ``group`` when every earlier
    group searches without pruning. Then, at step t, each of the earlier groups has 2**t alive prefixes (two
    continuing tokens, a and b), each extended once with every continuing token, so count(v) = group * 2**t for
    v in {a, b}: a sentence pays penalty * group * 2**t for each continuing token at position t (stops never)."""
    out = {}
    for toks, lp in all_sentences(lm, (), max_new_tokens):
        pen = sum(penalty * group * 2 ** t for t, v in enumerate(toks) if v in (A, B))
        out[toks] = (lp - pen, lp)
    return out


@pytest.mark.parametrize("groups, penalty, salt", [(2, 3.0, 0), (3, 0.7, 1), (2, 0.0, 2)])
def test_group_beams_without_pruning_match_the_bruteforce_penalized_scores(groups, penalty, salt):
    from vpo.construct.csr_search import group_beams

    lm = ToyLM(salt)
    # 22 sentences of <= 3 tokens; 8 beams per group keep every prefix alive, keep=22 never stops a group early
    got = group_beams(lm, (), sentence_end_ids=[DOT], eos_ids=[EOS], keep=22, token_beams=8 * groups,
                      max_new_tokens=3, num_beam_groups=groups, diversity_penalty=penalty)
    assert len(got) == groups
    for g, fin in enumerate(got):
        want = _all_scored(lm, 3, g, penalty)
        assert sorted(f[2] for f in fin) == sorted(want), g
        for pen, _, toks, end, lp in fin:
            assert pen == pytest.approx(want[toks][0]) and lp == pytest.approx(want[toks][1]), (g, toks)
            assert end == ("eos" if toks[-1] == EOS else "sentence" if toks[-1] == DOT else "length")


def _greedy_groups_reference(lm, groups, penalty, max_new_tokens):
    """One beam per group, by hand: at each step, groups in order, the best continuing token over the WHOLE vocabulary
    of log P - penalty * (earlier groups that chose it at this step); every stop token finishes a candidate."""
    beams = [((), 0.0, 0.0)] * groups
    finished = [[] for _ in range(groups)]
    for step in range(max_new_tokens):
        chosen = {}
        for g in range(groups):
            if beams[g] is None:
                continue
            toks, ps, tl = beams[g]
            dist = lm._logprobs(toks)
            for s in (EOS, DOT):
                finished[g].append((ps + float(dist[s]), toks + (s,), tl + float(dist[s])))
            best = max((A, B), key=lambda v: (ps + float(dist[v]) - penalty * chosen.get(v, 0), -v))
            chosen[best] = chosen.get(best, 0) + 1
            nxt = (toks + (best,), ps + float(dist[best]) - penalty * (chosen[best] - 1), tl + float(dist[best]))
            if step == max_new_tokens - 1:
                finished[g].append((nxt[1], nxt[0], nxt[2]))
                nxt = None
            beams[g] = nxt
    return finished


@pytest.mark.parametrize("salt", range(4))
def test_one_beam_per_group_matches_a_per_step_bruteforce_over_the_vocabulary(salt):
    from vpo.construct.csr_search import group_beams

    lm = ToyLM(salt)
    got = group_beams(lm, (), sentence_end_ids=[DOT], eos_ids=[EOS], keep=99, token_beams=2, max_new_tokens=4,
                      num_beam_groups=2, diversity_penalty=3.0)
    want = _greedy_groups_reference(lm, 2, 3.0, 4)
    for g in range(2):
        assert [f[2] for f in got[g]] == [w[1] for w in want[g]]
        assert [f[0] for f in got[g]] == pytest.approx([w[0] for w in want[g]])
        assert [f[4] for f in got[g]] == pytest.approx([w[2] for w in want[g]])
    # the root's first tokens: group 1 avoids group 0's token exactly when the log-prob gap is below the penalty
    first = [next(f[2][0] for f in got[g] if f[2][0] in (A, B)) for g in range(2)]
    root = lm._logprobs(())
    best, other = sorted((A, B), key=lambda v: -float(root[v]))
    gap = float(root[best] - root[other])
    assert first == ([best, other] if gap < 3.0 else [best, best]), gap


def test_diverse_proposals_reduce_to_plain_beam_search():
    lm = ToyLM(5)
    kw = dict(sentence_end_ids=[DOT], eos_ids=[EOS], max_new_tokens=3)
    plain = propose_sentences(lm, (A,), num_candidates=4, token_beams=2, num_beam_groups=1, **kw)
    # zero penalty: every group is the same width-2 search; group 0 contributes the plain search's 4 best, the
    # later groups only what it left (lower scores), so the 4 best of the union are the plain search's
    same = propose_sentences(lm, (A,), num_candidates=12, token_beams=6, num_beam_groups=3, diversity_penalty=0.0,
                             **kw)[:4]
    assert [(s.token_ids, s.end) for s in same] == [(s.token_ids, s.end) for s in plain]
    assert [s.logprob for s in same] == pytest.approx([s.logprob for s in plain])
    # with a penalty: distinct sentences, each with its TRUE log-prob (the penalty only steers the search)
    div = propose_sentences(lm, (A,), num_candidates=5, token_beams=5, num_beam_groups=5, diversity_penalty=3.0,
                            **kw)
    assert len({s.token_ids for s in div}) == len(div) >= 2
    truth = dict(all_sentences(lm, (A,), 3))
    for s in div:
        assert s.logprob == pytest.approx(truth[s.token_ids])


def test_csr_config_diversity_defaults_and_errors():
    cfg = CSRConfig()
    assert (cfg.num_beam_groups, cfg.diversity_penalty, cfg.token_beams) == (5, 3.0, 5)  # CSR App. A.1
    with pytest.raises(ValueError, match="multiple of num_beam_groups"):
        CSRConfig(token_beams=4, num_beam_groups=3)
    with pytest.raises(ValueError, match="diversity_penalty"):
        CSRConfig(diversity_penalty=-1.0)
    with pytest.raises(ValueError, match="num_beam_groups"):
        CSRConfig(num_beam_groups=0)
