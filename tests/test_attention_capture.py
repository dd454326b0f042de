"""Cat-PO image-attention capture in real transformers models (tiny random weights, CPU).

The reference for every captured statistic is the model's own eager attention with ``output_attentions=True``, reduced
here in float64 (layer subset -> head mean -> image columns), i.e. exactly what ``vpo.oracle.image_attention_stats``
computes from materialized maps.
"""
import doctest

import pytest
import torch

import vpo.integrations.attention_capture as capture_mod
from vpo.catpo import catpo_token_weights
from vpo.integrations import capture_image_attention, catpo_weights_for_batch, image_token_positions
from vpo.models import make_inputs, tiny_idefics2, tiny_llava, tiny_qwen2_5_vl, tiny_qwen2_vl
from vpo.models import tiny as tiny_mod

BUILDERS = {
    "llava": tiny_llava,
    "qwen2_vl": tiny_qwen2_vl,
    "qwen2_5_vl": tiny_qwen2_5_vl,
    "idefics2": tiny_idefics2,
}
N_LAYERS = 3  # so that a layer subset is a proper, non-contiguous subset
SEQ = 26  # no block size divides it


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny matmuls: one thread is fastest and immune to oversubscription when other jobs share the cores.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tinies():
    cache = {}

    def get(arch):
        if arch not in cache:
            cache[arch] = BUILDERS[arch](num_layers=N_LAYERS)
        return cache[arch]

    return get


def _lm_config(model):
    return model.get_decoder().config


def _eager_maps(model, batch):
    """The LM's attention maps from an eager forward with output_attentions=True: L x [B, H, T, T]."""
    config = _lm_config(model)
    original = config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            maps = model(**batch, output_attentions=True).attentions
    finally:
        model.set_attn_implementation(original)
    assert len(maps) == N_LAYERS  # LM layers only
    return maps


def _reduce(maps, image_pos, layers=None, query_positions=None):
    """Layer subset -> head mean -> (query rows) -> image columns, in float64: [B, Tq, N_p]."""
    idx = range(N_LAYERS) if layers is None else [i % N_LAYERS for i in layers]
    avg = torch.stack([maps[i] for i in idx]).double().mean(dim=(0, 2))  # [B, T(query), T(key)]
    if query_positions is not None:
        avg = avg.gather(1, query_positions[:, :, None].expand(-1, -1, avg.shape[-1]))
    return avg.gather(2, image_pos[:, None, :].expand(-1, avg.shape[1], -1))


@pytest.mark.parametrize("arch", list(BUILDERS))
@pytest.mark.parametrize("padding", ["right", "left"])
def test_capture_matches_eager_attentions(tinies, arch, padding):
    tiny = tinies(arch)
    model = tiny.model
    batch = make_inputs(tiny, batch_size=3, seq_len=SEQ, padding=padding, seed=1)
    pos = image_token_positions(batch["input_ids"], tiny.image_token_id)
    assert pos.shape == (3, tiny.num_image_tokens)
    real = batch["attention_mask"].bool()  # padded query rows are unspecified in eager (uniform over masked keys)

    with torch.no_grad():
        plain = model(**batch, output_hidden_states=True)
        with capture_image_attention(model, pos) as cap_all:
            assert _lm_config(model)._attn_implementation == "vpo_capture_sdpa"
            got = model(**batch, output_hidden_states=True)
        with capture_image_attention(model, pos, layers=[0, -1]) as cap_sub:
            model(**batch)
    maps = _eager_maps(model, batch)
    for cap, layers, expected in [(cap_all, None, (0, 1, 2)), (cap_sub, [0, -1], (0, 2))]:
        a, ref = cap.result(), _reduce(maps, pos, layers)
        assert a.dtype == torch.float32 and a.shape == (3, SEQ, tiny.num_image_tokens)
        torch.testing.assert_close(a.double()[real], ref[real], atol=1e-5, rtol=0)
        assert float(ref[real].std(-1).max()) > 1e-2  # non-uniform maps: a misplaced mask or column would show
        assert tuple(sorted(cap.layers_seen)) == expected
    # The capture leaves the forward untouched: the same sdpa calls, bit for bit.
    assert torch.equal(got.logits, plain.logits)
    for h_got, h_plain in zip(got.hidden_states, plain.hidden_states):
        assert torch.equal(h_got, h_plain)
    assert _lm_config(model)._attn_implementation == "sdpa"


def test_capture_query_positions_subset(tinies):
    tiny = tinies("qwen2_vl")
    batch = make_inputs(tiny, batch_size=2, seq_len=SEQ, padding="left")
    pos = image_token_positions(batch["input_ids"], tiny.image_token_id)
    qpos = torch.tensor([[25, 20, 13], [24, 25, 19]])
    with torch.no_grad(), capture_image_attention(tiny.model, pos, query_positions=qpos, layers=[1]) as cap:
        tiny.model(**batch)
    ref = _reduce(_eager_maps(tiny.model, batch), pos, layers=[1], query_positions=qpos)
    assert cap.result().shape == (2, 3, tiny.num_image_tokens)
    torch.testing.assert_close(cap.result().double(), ref, atol=1e-5, rtol=0)


def test_capture_on_eager_model_same_forward(tinies):
    """Base implementation eager: the wrapper calls the module's own eager function and reads its additive mask."""
    tiny = tinies("llava")
    model = tiny.model
    batch = make_inputs(tiny, batch_size=2, seq_len=SEQ, padding="left", seed=3)
    pos = image_token_positions(batch["input_ids"], tiny.image_token_id)
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad(), capture_image_attention(model, pos) as cap:
            assert _lm_config(model)._attn_implementation == "vpo_capture_eager"
            out = model(**batch, output_attentions=True)
        assert _lm_config(model)._attn_implementation == "eager"
    finally:
        model.set_attn_implementation("sdpa")
    ref = torch.stack(out.attentions).double().mean(dim=(0, 2))
    ref = ref.gather(2, pos[:, None, :].expand(-1, SEQ, -1))
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(cap.result().double()[real], ref[real], atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl"])
def test_vision_tower_not_counted(tinies, arch):
    tiny = tinies(arch)
    model = tiny.model
    vision_config = model.config.vision_config
    batch = make_inputs(tiny, batch_size=2, seq_len=SEQ)
    pos = image_token_positions(batch["input_ids"], tiny.image_token_id)
    with torch.no_grad(), capture_image_attention(model, pos) as cap:
        # Guard 1: only the language model's config is switched.
        assert vision_config._attn_implementation == "sdpa"
        # Guard 2: even a vision tower forced onto the wrapper is a pass-through (not a registered LM module).
        vision_config._attn_implementation = "vpo_capture_sdpa"
        try:
            model(**batch)
        finally:
            vision_config._attn_implementation = "sdpa"
    assert tuple(sorted(cap.layers_seen)) == tuple(range(N_LAYERS)) == tuple(range(tiny.num_lm_layers))
    assert len(cap.layers_seen) == N_LAYERS


def test_restored_after_exception(tinies):
    tiny = tinies("llava")
    batch = make_inputs(tiny, batch_size=2, seq_len=SEQ)
    pos = image_token_positions(batch["input_ids"], tiny.image_token_id)
    with pytest.raises(RuntimeError, match="boom"):
        with torch.no_grad(), capture_image_attention(tiny.model, pos):
            tiny.model(**batch)
            raise RuntimeError("boom")
    assert _lm_config(tiny.model)._attn_implementation == "sdpa"
    assert tiny.model.config.vision_config._attn_implementation == "sdpa"
    assert capture_mod._ACTIVE == {}
    # An error raised by the capture itself (second forward in one capture) restores too.
    with pytest.raises(ValueError, match="ran twice"):
        with torch.no_grad(), capture_image_attention(tiny.model, pos):
            tiny.model(**batch)
            tiny.model(**batch)
    assert _lm_config(tiny.model)._attn_implementation == "sdpa"
    assert capture_mod._ACTIVE == {}


def test_capture_errors(tinies):
    tiny = tinies("llava")
    model = tiny.model
    batch = make_inputs(tiny, batch_size=2, seq_len=SEQ)
    pos = image_token_positions(batch["input_ids"], tiny.image_token_id)
    with pytest.raises(ValueError, match="layers must hold ints"):
        capture_image_attention(model, pos, layers=[N_LAYERS])
    with pytest.raises(ValueError, match="layers must not be empty"):
        capture_image_attention(model, pos, layers=[])
    with pytest.raises(ValueError, match="image_positions must have dtype"):
        capture_image_attention(model, pos.int())
    with pytest.raises(ValueError, match="impl must be one of"):
        capture_image_attention(model, pos, impl="cuda")
    with pytest.raises(ValueError, match="query_positions has shape"):
        capture_image_attention(model, pos, query_positions=torch.zeros(3, 2, dtype=torch.long))
    with capture_image_attention(model, pos):  # captures do not nest
        with pytest.raises(ValueError, match="already active"):
            with capture_image_attention(model, pos):
                pass
    cap = capture_image_attention(model, pos)
    with cap:
        pass
    with pytest.raises(ValueError, match="run exactly one full forward"):
        cap.result()
    with pytest.raises(ValueError, match="image_positions has shape"):  # batch mismatch, found at the first layer
        with torch.no_grad(), capture_image_attention(model, pos[:1]):
            model(**batch)
    config = _lm_config(model)
    config._attn_implementation = "flex_attention"
    try:
        with pytest.raises(ValueError, match="supports"):
            with capture_image_attention(model, pos):
                pass
        assert config._attn_implementation == "flex_attention"
    finally:
        config._attn_implementation = "sdpa"
    assert capture_mod._ACTIVE == {}


def test_read_4d_mask():
    t = 6
    pad = torch.tensor([[True] * 6, [False, False, True, True, True, True]])
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    mask = (causal & pad[:, None, :])[:, None]  # [B, 1, T, T]
    got_pad, got_causal = capture_mod._read_4d_mask(mask, 2, t, t)
    assert got_causal is True and torch.equal(got_pad, pad)
    additive = torch.where(mask, 0.0, torch.finfo(torch.float32).min)
    got_pad, got_causal = capture_mod._read_4d_mask(additive, 2, t, t)
    assert got_causal is True and torch.equal(got_pad, pad)
    got_pad, got_causal = capture_mod._read_4d_mask(pad[:, None, None, :].expand(2, 1, t, t), 2, t, t)
    assert got_causal is False and torch.equal(got_pad, pad)
    window = causal & ~torch.ones(t, t, dtype=torch.bool).tril(-3)  # sliding window of 3
    with pytest.raises(ValueError, match="neither causal"):
        capture_mod._read_4d_mask(window[None, None].expand(2, 1, t, t), 2, t, t)
    with pytest.raises(ValueError, match="carries a bias"):
        capture_mod._read_4d_mask(additive + 0.5 * mask, 2, t, t)


def test_image_token_positions():
    ids = torch.tensor([[3, 7, 7, 7, 1], [7, 2, 7, 0, 7]])
    assert image_token_positions(ids, 7).tolist() == [[1, 2, 3], [0, 2, 4]]
    assert image_token_positions(ids.int(), 7).dtype == torch.int64
    with pytest.raises(ValueError, match=r"same, non-zero number of image tokens.*\[3, 2\]"):
        image_token_positions(torch.tensor([[3, 7, 7, 7, 1], [7, 2, 7, 0, 0]]), 7)
    with pytest.raises(ValueError, match=r"counts \[0, 0\]"):
        image_token_positions(ids, 9)
    with pytest.raises(ValueError, match="input_ids must have 2 dimensions"):
        image_token_positions(ids[0], 7)
    with pytest.raises(ValueError, match="input_ids must have dtype"):
        image_token_positions(ids.float(), 7)
    with pytest.raises(ValueError, match="image_token_id must be an int"):
        image_token_positions(ids, 7.0)


def _preference_labels(batch, start, stop):
    """Shifted response targets on [start, stop): labels[:, t] = input_ids[:, t + 1]; the rest ignored."""
    labels = torch.full_like(batch["input_ids"], -100)
    labels[:, start:stop] = batch["input_ids"][:, start + 1 : stop + 1]
    labels[batch["attention_mask"][:, 1:].eq(0).nonzero(as_tuple=True)] = -100  # padding targets
    return labels


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl"])
def test_catpo_weights_for_batch(tinies, arch):
    tiny = tinies(arch)
    model = tiny.model
    batch = make_inputs(tiny, batch_size=4, seq_len=SEQ, padding="right", seed=5)  # rows: 2 chosen, 2 rejected
    start = 3 + tiny.num_image_tokens
    labels = _preference_labels(batch, start, SEQ - 1)
    w = catpo_weights_for_batch(model, batch, labels)
    assert _lm_config(model)._attn_implementation == "sdpa"

    valid = labels != -100
    assert w.shape == labels.shape and w.dtype == torch.float32
    assert torch.isfinite(w).all() and bool((w[~valid] == 0).all())
    alpha, lam = 0.5, 0.5
    lo, hi = lam - torch.tanh(torch.tensor(1 - alpha)), lam + 1 + torch.tanh(torch.tensor(1 - alpha))
    assert bool(((w[valid] >= lo) & (w[valid] <= hi)).all())

    # Independent reference: eager attention maps at the query t + 1 (where y_t is the input token), e(y_t) from the
    # embedding table, u_j from the model's own image-feature path (vision tower + projector, before merging).
    pos = image_token_positions(batch["input_ids"], tiny.image_token_id)
    qpos = (torch.arange(SEQ) + 1).clamp_max(SEQ - 1).expand(4, SEQ)
    a_ref = _reduce(_eager_maps(model, batch), pos, query_positions=qpos)
    with torch.no_grad():
        if arch == "llava":
            feats = model.model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output
        else:
            feats = model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"]).pooler_output
        u = torch.stack(list(feats)).double()  # [R, N_p, D]
        e = model.get_input_embeddings()(labels.clamp_min(0)).double()
    chosen = (torch.arange(4) < 2)[:, None].expand(4, SEQ)
    w_ref = catpo_token_weights(a_ref, e, u, chosen, alpha=alpha, lambda_ref=lam)
    torch.testing.assert_close(w.double()[valid], w_ref[valid], atol=2e-5, rtol=0)
    assert float(w[:2][valid[:2]].mean()) != float(w[2:][valid[2:]].mean())  # chosen vs rejected branches differ

    # query_at="prediction" and an explicit is_chosen / layer subset go through the same path.
    w2 = catpo_weights_for_batch(model, batch, labels, query_at="prediction", is_chosen=True, layers=[-1])
    assert w2.shape == w.shape and torch.isfinite(w2).all() and not torch.equal(w2, w)


def test_catpo_weights_for_batch_errors(tinies):
    tiny = tinies("llava")
    batch = make_inputs(tiny, batch_size=2, seq_len=SEQ)
    labels = _preference_labels(batch, 14, SEQ - 1)
    with pytest.raises(ValueError, match="labels has shape"):
        catpo_weights_for_batch(tiny.model, batch, labels[:, :-1])
    bad = labels.clone()
    bad[:, -1] = 5
    with pytest.raises(ValueError, match=r"labels\[:, -1\] holds targets"):
        catpo_weights_for_batch(tiny.model, batch, bad)
    with pytest.raises(ValueError, match="even 2B rows"):
        catpo_weights_for_batch(tiny.model, {k: v[:1] for k, v in batch.items()}, labels[:1])
    with pytest.raises(ValueError, match="query_at must be one of"):
        catpo_weights_for_batch(tiny.model, batch, labels, query_at="key")
    with pytest.raises(ValueError, match="is_chosen has shape"):
        catpo_weights_for_batch(tiny.model, batch, labels, is_chosen=torch.tensor([True, False, True]))
    assert _lm_config(tiny.model)._attn_implementation == "sdpa"


def test_capture_through_peft_lora(tinies):
    peft = pytest.importorskip("peft")
    tiny = tiny_llava(num_layers=2)
    batch = make_inputs(tiny, batch_size=2, seq_len=SEQ, padding="left")
    pos = image_token_positions(batch["input_ids"], tiny.image_token_id)
    with torch.no_grad(), capture_image_attention(tiny.model, pos) as cap_plain:
        tiny.model(**batch)
    lora = peft.get_peft_model(tiny.model, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad(), capture_image_attention(lora, pos) as cap:
        lora(**batch)
    assert cap.layers_seen == (0, 1)
    torch.testing.assert_close(cap.result(), cap_plain.result())  # LoRA B = 0 at init: the same model


def test_make_inputs_layouts(tinies):
    for arch in ["llava", "qwen2_vl", "idefics2"]:
        tiny = tinies(arch)
        for padding in ["left", "right"]:
            b = make_inputs(tiny, batch_size=3, seq_len=SEQ, padding=padding, lengths=[SEQ, 20, 17])
            assert b["attention_mask"].sum(-1).tolist() == [SEQ, 20, 17]
            pad_side = b["attention_mask"][:, 0] if padding == "left" else b["attention_mask"][:, -1]
            assert pad_side.tolist() == [1, 0, 0]
            assert bool((b["input_ids"][b["attention_mask"] == 0] == tiny.pad_token_id).all())
            assert ((b["input_ids"] == tiny.image_token_id).sum(-1) == tiny.num_image_tokens).all()
            if arch == "qwen2_vl":
                assert torch.equal(b["mm_token_type_ids"], (b["input_ids"] == tiny.image_token_id).long())
                assert b["image_grid_thw"].tolist() == [[1, 4, 6]] * 3
    with pytest.raises(ValueError, match="lengths must lie in"):
        make_inputs(tinies("llava"), batch_size=1, seq_len=10, lengths=[11])
    with pytest.raises(ValueError, match="padding must be one of"):
        make_inputs(tinies("llava"), padding="middle")


def test_docstring_examples():
    assert doctest.testmod(tiny_mod).failed == 0
    assert doctest.testmod(capture_mod).failed == 0


def test_capture_triton_impl_interpreter(tinies):
    """The Triton kernel through the integration (CPU interpreter lane; conftest sets TRITON_INTERPRET=1)."""
    import os

    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    pytest.importorskip("triton")
    tiny = tinies("qwen2_vl")
    batch = make_inputs(tiny, batch_size=2, seq_len=SEQ, padding="left", seed=7)
    pos = image_token_positions(batch["input_ids"], tiny.image_token_id)
    with torch.no_grad():
        with capture_image_attention(tiny.model, pos, layers=[1], impl="triton") as cap_triton:
            tiny.model(**batch)
        with capture_image_attention(tiny.model, pos, layers=[1], impl="torch") as cap_torch:
            tiny.model(**batch)
    torch.testing.assert_close(cap_triton.result(), cap_torch.result(), atol=1e-5, rtol=0)
