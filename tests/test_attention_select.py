"""Head selection for Cat-PO's image attention (vpo.ops.attention_select) on every implementation.

The reference is the materializing oracle of tests/test_attention_stats.py fed only the selected heads' float64
probabilities (a direct softmax, with each query head reading its own kv head), so a head mapped to the wrong kv head
under grouped-query attention, a wrong head, or a mean over the wrong count fails. The capture is checked against the
model's own eager attention maps, head by head.
"""
import pytest
import torch

import vpo
from vpo.integrations import capture_image_attention, catpo_weights_for_batch, image_token_positions
from vpo.models import make_inputs, tiny_qwen2_vl
from vpo.ops.attention_select import HeadSelection, check_heads, heads_of_probs, parse_heads
from vpo.ops.attention_stats import image_attention_from_probs, image_attention_from_qk
from test_attention_stats import DEV, _inputs, _oracle, _probs

needs_cpp = pytest.mark.skipif(not vpo.AVAILABLE["cpp"], reason="vpo._C not built")
HEAD_SETS = [[4], [0, 1, 2], [5, 0, 3], [-1, 1]]  # one head, a contiguous range (a view), unordered, negative


def _selected_oracle(q, k, ipos, qpos, mask, heads, causal=True):
    probs = _probs(q.double(), k.double(), mask, q.shape[-1] ** -0.5, causal)  # [B, Hq, T, T], per query head
    idx = [h % q.shape[1] for h in heads]
    return _oracle(probs[:, idx], ipos, qpos)


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("hkv", [2, 3, 6])
@pytest.mark.parametrize("heads", HEAD_SETS, ids=str)
def test_qk_heads_match_oracle(impl, hkv, heads):
    if impl == "triton" and (hkv != 2 or heads not in ([5, 0, 3], [4])):  # the interpreter is slow: two cases
        pytest.skip("triton: the GQA cases only")
    q, k, ipos, qpos, mask = _inputs(hkv)
    dev = DEV if impl == "triton" else "cpu"
    out = image_attention_from_qk(q.to(dev), k.to(dev), ipos.to(dev), query_positions=qpos.to(dev),
                                  key_padding_mask=mask.to(dev), heads=heads, impl=impl).cpu()
    ref = _selected_oracle(q, k, ipos, qpos, mask, heads)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=2e-6)
    every = image_attention_from_qk(q, k, ipos, query_positions=qpos, key_padding_mask=mask, impl="torch")
    assert (out - every).abs().max() > 1e-3  # the selection changes the answer on these peaky maps


@pytest.mark.parametrize("impl", ["torch", pytest.param("cpp", marks=needs_cpp)])
@pytest.mark.parametrize("heads", HEAD_SETS, ids=str)
def test_probs_heads_match_oracle(impl, heads):
    q, k, ipos, qpos, mask = _inputs(2)
    probs = _probs(q, k, mask, q.shape[-1] ** -0.5, True, dtype=torch.float32)
    strided = probs.transpose(2, 3).contiguous().transpose(2, 3)  # a strided view: the cpp path reads it in place
    out = image_attention_from_probs(strided, ipos, query_positions=qpos, heads=heads, impl=impl)
    ref = _selected_oracle(q, k, ipos, qpos, mask, heads)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=2e-6)


def test_probs_heads_view_or_copy():
    p = torch.rand(2, 6, 5, 5)
    assert heads_of_probs(p, None) is p and heads_of_probs(p, range(6)) is p
    view = heads_of_probs(p, [1, 2, 3])
    assert view.data_ptr() == p[:, 1].data_ptr() and torch.equal(view, p[:, 1:4])  # no copy for a range
    assert torch.equal(heads_of_probs(p, [3, 1]), p[:, [3, 1]])


def test_all_heads_listed_equals_default():
    q, k, ipos, qpos, mask = _inputs(3)
    a = image_attention_from_qk(q, k, ipos, query_positions=qpos, key_padding_mask=mask, heads=[5, 4, 3, 2, 1, 0])
    b = image_attention_from_qk(q, k, ipos, query_positions=qpos, key_padding_mask=mask)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("heads, match", [
    ([], "must not be empty"), ([0, -6], "twice"), ([6], r"\[-6, 6\)"), ([1.0], "must hold ints"),
    ("0,1", "sequence of head indices"), ([True], "must hold ints"),
])
def test_check_heads_errors(heads, match):
    with pytest.raises(ValueError, match=match):
        check_heads(heads, 6)
    q, k, ipos, _, _ = _inputs(2)
    with pytest.raises(ValueError, match=match):
        image_attention_from_qk(q, k, ipos, heads=heads)


def test_head_selection_forms():
    common = HeadSelection([2, 0], layers=[2, -3], num_layers=3)
    assert common.layers == (0, 2) and common.for_layer(0) == (2, 0) and common.for_layer(1) is None
    assert not common.all_heads and HeadSelection(None, num_layers=3).all_heads
    pairs = HeadSelection({-1: [1], 0: [3, 2]}, num_layers=3)
    assert pairs.layers == (0, 2) and pairs.for_layer(2) == (1,) and pairs.for_layer(0) == (3, 2)
    wider = HeadSelection({1: [0]}, layers=[0, 1], num_layers=2)  # a listed layer without heads keeps them all
    assert wider.layers == (0, 1) and wider.for_layer(0) is None and wider.for_layer(1) == (0,)
    with pytest.raises(ValueError, match=r"not in layers \[0\]"):
        HeadSelection({1: [0]}, layers=[0], num_layers=2)
    with pytest.raises(ValueError, match="names layer 1 twice"):
        HeadSelection({1: [0], -1: [1]}, num_layers=2)
    with pytest.raises(ValueError, match=r"heads\[0\] must be a non-empty sequence of distinct"):
        HeadSelection({0: []}, num_layers=2)
    with pytest.raises(ValueError, match="empty mapping"):
        HeadSelection({}, num_layers=2)


def test_parse_heads():
    assert parse_heads(None) is None and parse_heads(" all ") is None and parse_heads("") is None
    assert parse_heads("3, 1") == [3, 1]
    assert parse_heads("2:1,0:3,2:0") == {2: [1, 0], 0: [3]}
    for bad in ("1,2:3", "a", "1:2:3", "1:x"):
        with pytest.raises(ValueError, match="catpo_heads"):
            parse_heads(bad)


# ----------------------------------------------------------------------------------------------------------------------
# In a model: the capture against eager attention maps, head by head
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tiny_qwen2_vl(num_layers=3)  # 4 query heads sharing 2 kv heads: the GQA mapping is exercised
    torch.set_num_threads(n)


def _eager_maps(model, batch):
    config = model.get_decoder().config
    original = config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            return model(**batch, output_attentions=True).attentions  # L x [B, H, T, T]
    finally:
        model.set_attn_implementation(original)


def test_capture_heads_match_eager_maps(qwen):
    cfg = qwen.model.get_decoder().config
    assert cfg.num_attention_heads == 4 and cfg.num_key_value_heads == 2
    batch = make_inputs(qwen, batch_size=2, seq_len=26, padding="left", seed=3)
    pos = image_token_positions(batch["input_ids"], qwen.image_token_id)
    real = batch["attention_mask"].bool()
    maps = _eager_maps(qwen.model, batch)
    cases = [({0: [3], 2: [1, 2]}, None, {0: [3], 2: [1, 2]}),   # layer:head pairs, each layer weighs the same
             ([1, 2], [1], {1: [1, 2]}),                         # the same heads in the selected layers
             ({1: [0]}, [0, 1], {0: [0, 1, 2, 3], 1: [0]})]      # a listed layer without heads keeps them all
    for heads, layers, expect in cases:
        with torch.no_grad(), capture_image_attention(qwen.model, pos, layers=layers, heads=heads) as cap:
            qwen.model(**batch)
        per_layer = [maps[l][:, h].double().mean(1) for l, h in expect.items()]  # [B, T, T] per layer
        ref = torch.stack(per_layer).mean(0).gather(2, pos[:, None, :].expand(-1, 26, -1))
        torch.testing.assert_close(cap.result().double()[real], ref[real], atol=1e-5, rtol=0)
        assert tuple(sorted(cap.layers_seen)) == tuple(expect)


def test_capture_heads_checked_before_the_forward(qwen):
    batch = make_inputs(qwen, batch_size=1, seq_len=26)
    pos = image_token_positions(batch["input_ids"], qwen.image_token_id)
    with pytest.raises(ValueError, match=r"heads \(layer 0\) contains 4: expected head indices in \[-4, 4\)"):
        capture_image_attention(qwen.model, pos, heads=[4])
    with pytest.raises(ValueError, match="not in layers"):
        capture_image_attention(qwen.model, pos, layers=[0], heads={2: [0]})


def test_catpo_weights_follow_the_heads(qwen):
    batch = make_inputs(qwen, batch_size=2, seq_len=26, seed=5)
    labels = torch.full_like(batch["input_ids"], -100)
    labels[:, 18:25] = batch["input_ids"][:, 19:26]
    w_all = catpo_weights_for_batch(qwen.model, batch, labels, alpha=1.0)
    w_one = catpo_weights_for_batch(qwen.model, batch, labels, alpha=1.0, heads={1: [2]})
    w_same = catpo_weights_for_batch(qwen.model, batch, labels, alpha=1.0, layers=[1], heads=[2])
    assert torch.equal(w_one, w_same)
    assert (w_one - w_all)[:, 18:25].abs().max() > 1e-4
    assert torch.equal(w_one[:, :18], torch.zeros_like(w_one[:, :18]))
