"""vpo.testing.make_peaked_head_inputs / head_input_stats: the benchmarks' peaked LM-head inputs are what they claim."""
import math

import pytest
import torch

from vpo.testing import head_input_stats, make_peaked_head_inputs


@pytest.mark.parametrize("entropy", [1.0, 2.0])
def test_peaked_inputs_have_the_requested_entropy(entropy):
    x = make_peaked_head_inputs(4, 64, 64, 2048, entropy=entropy, seed=3)
    assert x.hidden.shape == (4, 64, 64) and x.weight.shape == (2048, 64) and x.labels.shape == (4, 64)
    assert x.bias is None and x.hidden.requires_grad and x.weight.requires_grad
    assert x.labels.dtype == torch.int64 and 0 <= int(x.labels.min()) and int(x.labels.max()) < 2048
    s = head_input_stats(x.hidden, x.weight, x.labels)
    assert s["rows"] == 256
    assert abs(s["mean_entropy"] - entropy) < 0.35 * entropy  # calibrated on separate rows: sampling noise
    # labels are sampled from the model, so E[log p(label)] = -entropy; far from a flat softmax's -ln V
    assert abs(s["mean_target_logp"] + s["mean_entropy"]) < 0.5
    assert s["mean_target_logp"] > -0.5 * math.log(2048)
    assert s["mean_top1_prob"] > 0.3


def test_peaked_inputs_dtype_masks_and_determinism():
    a = make_peaked_head_inputs(2, 16, 32, 512, dtype=torch.bfloat16, prompt_len=3, ignore_frac=0.25, seed=1)
    b = make_peaked_head_inputs(2, 16, 32, 512, dtype=torch.bfloat16, prompt_len=3, ignore_frac=0.25, seed=1)
    assert a.hidden.dtype == torch.bfloat16 and a.weight.dtype == torch.bfloat16
    assert torch.equal(a.hidden, b.hidden) and torch.equal(a.labels, b.labels)
    assert (a.labels[:, :3] == -100).all() and (a.labels[:, 3:] != -100).any()
    flat = make_peaked_head_inputs(2, 16, 32, 512, entropy=5.0, seed=1)
    assert head_input_stats(flat.hidden, flat.weight, flat.labels)["mean_entropy"] > 3.5


def test_bad_arguments():
    with pytest.raises(ValueError, match="entropy"):
        make_peaked_head_inputs(1, 4, 8, 16, entropy=math.log(16))
    with pytest.raises(ValueError, match="candidates"):
        make_peaked_head_inputs(1, 4, 8, 16, candidates=0)
    with pytest.raises(ValueError, match="rows"):
        make_peaked_head_inputs(0, 4, 8, 16)
    x = make_peaked_head_inputs(1, 4, 8, 16, entropy=1.0)
    with pytest.raises(ValueError, match="labels"):
        head_input_stats(x.hidden, x.weight, torch.full((1, 4), -100))
