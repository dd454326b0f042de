"""CSR's minimum sentence length (CSRConfig.min_sentence_tokens, vpo.construct.csr "Fragments"): on a small bigram
model with the paper's diverse search (5 groups, penalty 3), the groups after the first propose "." and the calibrated
reward rejects it; with the minimum the rejected response is a real (wrong) sentence. Also: a path whose proposals
are all too short keeps the longest, a response still ends on a bare eos after a sentence, and the errors."""
import math
import os

import pytest
import torch

from vpo.construct.csr import CSRConfig, propose_sentences, sentence_beam_search

EOS, DOT = 0, 1
WORDS = {DOT: ".", 2: "a", 3: "two", 4: "red", 5: "blue", 6: "circle", 7: "square", 8: "and", 9: "circles",
         10: "squares"}
SHAPES = {"circle", "square"}
COLOR, SHAPE, NOUN_END = (4, 5), (6, 7, 9, 10), {DOT: .8, 8: .15, EOS: .05}
# P(next | last token): captions "a|two <color> <shape> [and ...] .", then the end of the response. A stop right at
# the start (".", eos) is unlikely but never penalized by the diverse search.
NEXT = {None: {2: .90, 3: .05, DOT: .03, EOS: .02},
        2: {4: .6, 5: .35, DOT: .03, EOS: .02}, 3: {4: .6, 5: .35, DOT: .03, EOS: .02},
        **{c: {6: .6, 7: .35, 9: .02, 10: .01, DOT: .01, EOS: .01} for c in COLOR},
        **{s: NOUN_END for s in SHAPE},
        8: {2: .9, 3: .08, DOT: .01, EOS: .01}, DOT: {EOS: .97, 2: .03}}


class BigramLM:
    """A TokenLM whose next-token distribution depends on the last response token only (:data:`NEXT`)."""

    eos_token_ids = (EOS,)

    def __init__(self, table=None):
        self.table = NEXT if table is None else table

    def next_logprobs(self, prefixes):
        out = torch.full((len(prefixes), len(WORDS) + 1), -math.inf, dtype=torch.float64)
        for i, p in enumerate(prefixes):
            for t, q in self.table[p[-1] if p else None].items():
                out[i, t] = math.log(q)
        return out

    def decode(self, ids):
        return " ".join(WORDS[i] for i in ids if i != EOS)

    def token_id(self, text):
        return {v: k for k, v in WORDS.items()}[text]


def mentions(text):
    """(word before, shape) for each shape word of ``text``."""
    w = text.split()
    return [(w[i - 1], w[i].rstrip("s")) for i in range(1, len(w)) if w[i].rstrip("s") in SHAPES]


def scorer(image, texts, *, record=None):
    """R_I: 100 x the share of the text's mentions that are a red circle (the truth); 0 without a mention."""
    return [100.0 * sum(m == ("red", "circle") for m in mentions(t)) / len(mentions(t)) if mentions(t) else 0.0
            for t in texts]


def content(response):
    """Tokens of a response other than stop tokens."""
    return [t for t in response.token_ids if t not in (EOS, DOT)]


@pytest.mark.parametrize("max_sentences", [1, 2])
def test_rejected_is_a_fragment_without_the_minimum_and_a_sentence_with_it(max_sentences):
    base = dict(max_new_tokens=10, max_sentences=max_sentences)  # the paper's 5 groups, penalty 3.0
    assert CSRConfig().min_sentence_tokens == 3  # on by default
    old = sentence_beam_search(BigramLM(), scorer, config=CSRConfig(min_sentence_tokens=0, **base))
    new = sentence_beam_search(BigramLM(), scorer, config=CSRConfig(**base))
    assert old.has_pair and new.has_pair
    assert old.chosen.text == new.chosen.text and mentions(new.chosen.text) == [("red", "circle")]
    # the paper's search: the groups after the first stop at once; that fragment is the rejected response
    assert len(content(old.rejected)) <= 1 and not mentions(old.rejected.text)
    # with the minimum: every proposal is a sentence of >= 3 tokens; the rejected one names a wrong object
    assert len(new.responses) > len(old.responses)
    for r in new.responses:
        assert all(len([t for t in s.token_ids if t not in (EOS, DOT)]) >= 3 for s in r.sentences if s.text)
    assert len(content(new.rejected)) >= 3 and mentions(new.rejected.text)
    assert all(m != ("red", "circle") for m in mentions(new.rejected.text))
    assert new.rejected.reward < new.chosen.reward


def test_a_response_still_ends_on_a_bare_eos_after_a_sentence():
    # two rounds: after "a red circle ." the model ends the response (eos, no token before it): allowed
    res = sentence_beam_search(BigramLM(), scorer, config=CSRConfig(max_new_tokens=10, max_sentences=2))
    ended = [r for r in res.responses if r.end == "eos" and r.sentences[-1].text == ""]
    assert ended and all(r.sentences[-1].token_ids == (EOS,) for r in ended)
    assert any(r.text == "a red circle ." for r in ended)


def test_the_minimum_inside_the_token_search():
    kw = dict(sentence_end_ids=[DOT], eos_ids=[EOS], num_candidates=5, token_beams=5, num_beam_groups=5,
              diversity_penalty=3.0, max_new_tokens=10)
    old = propose_sentences(BigramLM(), (), **kw)
    assert any(s.token_ids == (DOT,) for s in old)  # the bare "." of a group after the first
    for m in (1, 2, 3):
        got = propose_sentences(BigramLM(), (), min_tokens=m, **kw)
        assert got and all(len(s.token_ids) - (s.end != "length") >= m for s in got), m
    # bare_eos: a bare eos (the end after a finished sentence) stays a candidate; a bare "." does not
    after = propose_sentences(BigramLM(), (2, 4, 6, DOT), min_tokens=3, bare_eos=True, **kw)
    assert (EOS,) in [s.token_ids for s in after] and (DOT,) not in [s.token_ids for s in after]
    # capped at max_new_tokens - 1: with 2 tokens per sentence, a stop may follow 1 token
    short = propose_sentences(BigramLM(), (), min_tokens=5, **{**kw, "max_new_tokens": 2})
    assert {len(s.token_ids) for s in short} == {2}
    assert any(s.end in ("sentence", "eos") for s in short)


def test_a_path_whose_proposals_are_all_too_short_keeps_the_longest():
    # After "a" only a stop is possible: no sentence reaches 3 tokens. The path keeps the longest proposals of the
    # search without the minimum ("a ." and "a" + eos; not "." or a bare eos) instead of dying with nothing.
    table = {None: {2: .5, DOT: .3, EOS: .2}, 2: {DOT: .7, EOS: .3}}
    kw = dict(sentence_end_ids=[DOT], eos_ids=[EOS], num_candidates=5, token_beams=5, max_new_tokens=10)
    got = propose_sentences(BigramLM(table), (), min_tokens=3, num_beam_groups=1, **kw)
    assert sorted(s.token_ids for s in got) == [(2, EOS), (2, DOT)]
    cfg = CSRConfig(max_new_tokens=10, max_sentences=1, num_beam_groups=1)
    res = sentence_beam_search(BigramLM(table), lambda im, t, record=None: [50.0 if "." in x else 10.0 for x in t],
                               config=cfg)
    assert sorted(r.text for r in res.responses) == ["a", "a ."]
    assert (res.chosen.text, res.rejected.text) == ("a .", "a")
    # the diverse search: its groups after the first stop at once, the longest proposal is group 0's "a ."
    div = propose_sentences(BigramLM(table), (), min_tokens=3, num_beam_groups=5, diversity_penalty=3.0, **kw)
    assert [s.token_ids for s in div] == [(2, DOT)]


@pytest.mark.parametrize("value", [-1, 1.5, True, "3"])
def test_min_sentence_tokens_errors_name_the_argument(value):
    with pytest.raises(ValueError, match="min_sentence_tokens"):
        CSRConfig(min_sentence_tokens=value)
    with pytest.raises(ValueError, match="min_tokens"):
        propose_sentences(BigramLM(), (), sentence_end_ids=[DOT], eos_ids=[EOS], min_tokens=value)


def test_cli_passes_min_sentence_tokens(tmp_path, capsys):
    import json

    pytest.importorskip("transformers")
    from vpo.construct.cli import main
    from vpo.worlds import shapes

    data = shapes.make_dataset(str(tmp_path / "w"), 1, seed=0)
    out = str(tmp_path / "o")
    argv = ["csr", "--data", data, "--out", out, "--max-new-tokens", "4", "--num-candidates", "2", "--token-beams",
            "2", "--beam-groups", "1", "--max-sentences", "1"]
    assert main(argv + ["--min-sentence-tokens", "2"]) == 0
    capsys.readouterr()
    assert json.load(open(os.path.join(out, "construct.json")))["config"]["min_sentence_tokens"] == 2
    assert main(argv + ["--min-sentence-tokens", "-1"]) == 2
    assert "min_sentence_tokens" in capsys.readouterr().err


def test_the_demo_passes_its_setting():
    from vpo.demo import PRESETS

    assert all(s.csr_min_sentence_tokens == CSRConfig().min_sentence_tokens for s in PRESETS.values())
