"""loss_type through the trainer: one step's loss equals the hand-computed TRL formula of the logged rewards,
log-probs and token counts, for DPO (fused) and for a visual method (mDPO's DPO term, TPO's fused loss)."""
import math

import pytest
import torch

pytest.importorskip("transformers")
from PIL import Image  # noqa: E402

from vpo.data import PreferenceCollator, PreferenceRecord, build_tiny_processor  # noqa: E402
from vpo.models import tiny_llava  # noqa: E402
from vpo.trainer import VPOConfig, VPOTrainer  # noqa: E402

BETA = 0.5


def _logsig(x):
    return -math.log1p(math.exp(-x))


def _sig(x):
    return 1.0 / (1.0 + math.exp(-x))


def expected(loss_type, dw, dl, lc, nw, nl, eps=0.0):
    d = dw - dl
    return {
        "sigmoid": -(1 - eps) * _logsig(BETA * d) - eps * _logsig(-BETA * d),
        "robust": (-(1 - eps) * _logsig(BETA * d) + eps * _logsig(-BETA * d)) / (1 - 2 * eps),
        "hinge": max(0.0, 1 - BETA * d),
        "ipo": (dw / nw - dl / nl - 1 / (2 * BETA)) ** 2,
        "apo_zero": (1 - _sig(BETA * dw)) + _sig(BETA * dl),
        "sigmoid_norm": -_logsig(BETA * (dw / nw - dl / nl)),
        "sft": -lc / nw,
    }[loss_type]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tiny = tiny_llava()
    proc = build_tiny_processor("llava", tiny=tiny)
    rec = PreferenceRecord("p0", Image.new("RGB", (24, 24), "red"), "what color is the cat ?",
                           "the cat is red .", "a dog is blue and big .")
    return tiny, proc, rec, tmp_path_factory.mktemp("lt")


def _trainer(setup, method="dpo", **kw):
    tiny, proc, rec, out = setup
    args = VPOConfig(output_dir=str(out), method=method, beta=BETA, per_device_train_batch_size=1, report_to="none",
                     use_cpu=True, lora_dropout=0.0, max_steps=1, loss_impl="torch", **kw)
    trainer = VPOTrainer(tiny_llava().model, args, train_dataset=[rec], processing_class=proc)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # move the policy away from the reference (LoRA B starts at 0)
        for n, p in trainer.model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    collator = trainer.data_collator
    batch = collator([rec])
    return trainer, batch


def _terms(metrics, batch):
    mask = batch["labels"][:, 1:] != -100
    nw, nl = int(mask[0].sum()), int(mask[1].sum())
    f = {k: float(v) for k, v in metrics.items()}
    return f["rewards/chosen"] / BETA, f["rewards/rejected"] / BETA, f["logps/chosen"], nw, nl


@pytest.mark.parametrize("loss_type", ["sigmoid", "robust", "hinge", "ipo", "apo_zero", "sigmoid_norm", "sft"])
def test_dpo_loss_type_matches_the_formula(setup, loss_type):
    eps = 0.1 if loss_type in ("sigmoid", "robust") else 0.0
    trainer, batch = _trainer(setup, loss_type=loss_type, label_smoothing=eps)
    loss, metrics = trainer.compute_loss(trainer.model, batch, return_outputs=True)
    dw, dl, lc, nw, nl = _terms(metrics, batch)
    assert abs(dw - dl) > 1e-3  # the policy really differs from the reference
    assert metrics["num_tokens/chosen"].item() == nw
    assert loss.item() == pytest.approx(expected(loss_type, dw, dl, lc, nw, nl, eps), rel=1e-4, abs=1e-5)
    loss.backward()
    grads = [p.grad for n, p in trainer.model.named_parameters() if p.requires_grad and p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_combined_loss_types_with_weights(setup):
    trainer, batch = _trainer(setup, loss_type="sigmoid,sft", loss_weights="1.0,0.25")
    loss, metrics = trainer.compute_loss(trainer.model, batch, return_outputs=True)
    dw, dl, lc, nw, nl = _terms(metrics, batch)
    want = expected("sigmoid", dw, dl, lc, nw, nl) + 0.25 * expected("sft", dw, dl, lc, nw, nl)
    assert loss.item() == pytest.approx(want, rel=1e-4)
    # a list, as TRL users write it
    cfg = VPOConfig(output_dir="/tmp/x", loss_type=["ipo", "sft"], loss_weights=[1.0, 2.0], use_cpu=True)
    assert cfg.loss_type_list() == (["ipo", "sft"], [1.0, 2.0])


def test_loss_type_in_a_visual_method(setup):
    trainer, batch = _trainer(setup, method="mdpo", loss_type="hinge")
    loss, metrics = trainer.compute_loss(trainer.model, batch, return_outputs=True)
    dw, dl, lc, nw, nl = _terms(metrics, batch)
    assert metrics["dpo/loss"].item() == pytest.approx(expected("hinge", dw, dl, lc, nw, nl), rel=1e-4, abs=1e-5)
    sig, _ = _trainer(setup, method="mdpo")[0].compute_loss(trainer.model, batch, return_outputs=True)
    assert loss.item() != pytest.approx(sig.item())  # the variant changes the method's loss
    tpo, tpo_batch = _trainer(setup, method="tpo", loss_type="ipo", fixed_noise=True)
    value = tpo.compute_loss(tpo.model, tpo_batch)
    assert torch.isfinite(value)


def test_bad_loss_type_names_the_field(tmp_path):
    with pytest.raises(ValueError, match="loss_type must be one of"):
        VPOConfig(output_dir=str(tmp_path), loss_type="kto", use_cpu=True)
    with pytest.raises(ValueError, match="loss_weights has 1 weights"):
        VPOConfig(output_dir=str(tmp_path), loss_type="sigmoid,sft", loss_weights="1.0", use_cpu=True)
    with pytest.raises(ValueError, match="loss_weights must be comma-separated numbers"):
        VPOConfig(output_dir=str(tmp_path), loss_type="sigmoid", loss_weights="x", use_cpu=True)
