"""LM-head benchmark steps: peaked inputs, the materialized baselines, the GEMM floors, and one fwd+bwd step per
implementation (log-probs, fused DPO / TPO / Cat-PO losses, per-token KL).

Inputs come from :func:`vpo.testing.make_peaked_head_inputs` (the tests' builder for realistic softmaxes: mean
entropy :data:`ENTROPY` nats, a Zipfian tail, labels sampled from the model, so the mean target log-prob is about
``-ENTROPY``), every position scored, so all N tokens do the full vocabulary sweep. :func:`input_stats` records
what the softmaxes really look like (printed in the summary table and written to the results files).

Every step runs ``torch.autograd.grad`` of the loss (or of ``logp.sum()`` / ``kl.sum()``) with respect to the
hidden states and the head weight, and synchronizes on CUDA, so a wall-clock timer around it measures the GPU work.
"""
from __future__ import annotations

import gc
from typing import Callable, Dict, Tuple

import torch

from _cases import CATPO_IMPLS, FUSED_IMPLS, LINEAR_IMPLS, TOKEN_KL_IMPLS, Unavailable
from _shapes import DEVICE, Shape
from vpo.testing import LinearHeadInputs, head_input_stats, make_peaked_head_inputs

ENTROPY = 1.5  # nats: the mean softmax entropy the inputs are calibrated to (a 7B LM on its own responses: ~1-2)
_INPUTS: Dict[Tuple[Shape, str], LinearHeadInputs] = {}
INPUT_STATS: Dict[str, dict] = {}  # shape label -> head_input_stats (+ the reference's KL), for the summary


def inputs(shape: Shape, device: str = DEVICE, *, cache: bool = True) -> LinearHeadInputs:
    """Peaked inputs for ``shape`` with every position scored; the last shape's are cached (the benchmarks are
    ordered shape-major). Their softmax statistics go to :data:`INPUT_STATS`."""
    key = (shape, device)
    if cache and key in _INPUTS:
        return _INPUTS[key]
    if cache:  # one shape at a time: free the previous one before building the next
        clear_inputs()
    x = make_peaked_head_inputs(shape.rows, shape.seq, shape.dim, shape.vocab, entropy=ENTROPY,
                                dtype=shape.torch_dtype, device=device, seed=0)
    if cache:
        _INPUTS[key] = x
        if shape.label not in INPUT_STATS:
            INPUT_STATS[shape.label] = input_stats(x)
    return x


def input_stats(x: LinearHeadInputs) -> dict:
    """:func:`vpo.testing.head_input_stats` of ``x`` plus ``ref_kl``: the mean per-token KL(policy ‖ reference)
    with the reference's hidden states as the loss benchmarks make them (:func:`reference_hidden`)."""
    stats = head_input_stats(x.hidden, x.weight, x.labels, max_rows=256)
    with torch.no_grad():
        D = x.hidden.shape[-1]
        h = x.hidden.detach().reshape(-1, D)
        rows = torch.linspace(0, h.shape[0] - 1, min(256, h.shape[0]), device=h.device).long()
        href = reference_hidden(x.hidden).reshape(-1, D)[rows]
        lp = torch.log_softmax((h[rows] @ x.weight.detach().T).float(), -1)
        lq = torch.log_softmax((href @ x.weight.detach().T).float(), -1)
        stats["ref_kl"] = float((lp.exp() * (lp - lq)).sum(-1).mean())
    return stats


def clear_inputs() -> None:
    _INPUTS.clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _sync(device: str) -> Callable[[], None]:
    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def _randn(shape, like: torch.Tensor, seed: int, scale: float) -> torch.Tensor:
    """Seeded ``scale · N(0, 1)`` of ``shape`` in ``like``'s dtype and device, generated there directly."""
    g = torch.Generator(device=like.device).manual_seed(seed)
    return torch.randn(shape, generator=g, device=like.device, dtype=like.dtype).mul_(scale)


def reference_hidden(h: torch.Tensor) -> torch.Tensor:
    """The reference model's hidden states: the policy's plus 0.05·N(0, 1) per coordinate (hidden states have
    coordinates of size ~1, so the reference's logits move by ~0.05: a policy a few steps into training)."""
    return h.detach() + _randn(h.shape, h, 1, 0.05)


def _require_kernels(*modules: str) -> None:
    """Raise :class:`Unavailable` unless every ``vpo_kernels`` module imports (Triton present, sources built)."""
    import importlib

    for mod in modules:
        try:
            importlib.import_module(mod)
        except ImportError as e:
            raise Unavailable(f"{mod} does not import: {e}") from e


def _require_impl(fn: Callable, impl: str, *args, **kwargs) -> None:
    """Raise :class:`Unavailable` when ``fn(*args, impl=impl)`` on tiny inputs rejects ``impl`` (e.g. ``"gemm"`` in a
    vpo that does not have it yet); other errors propagate."""
    try:
        fn(*args, impl=impl, **kwargs)
    except ValueError as e:
        if "impl" in str(e):
            raise Unavailable(f"impl={impl!r} is rejected by {fn.__name__}: {e}") from e
        raise


def _tiny(device: str, dtype: torch.dtype):
    h = torch.randn(4, 16, device=device, dtype=dtype)
    return h, torch.randn(32, 16, device=device, dtype=dtype), torch.randint(0, 32, (4,), device=device)


def naive_logprobs(h: torch.Tensor, W: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """The materializing baseline as preference-training code writes it (TRL's ``get_batch_logps``):
    logits ``[N, V]`` in the compute dtype, upcast to fp32, ``log_softmax``, gather the target."""
    logits = h @ W.T  # [N, D] @ [D, V] -> [N, V]
    logp_all = torch.log_softmax(logits.float(), dim=-1)  # [N, V] fp32
    mask = labels != ignore_index
    safe = torch.where(mask, labels, torch.zeros_like(labels))
    logp = logp_all.gather(-1, safe[:, None]).squeeze(-1)  # [N]
    return logp * mask


def naive_token_kl(h: torch.Tensor, W: torch.Tensor, h_ref: torch.Tensor, W_ref: torch.Tensor) -> torch.Tensor:
    """The materializing KL as distillation / KL-regularized code writes it: both models' logits ``[N, V]`` in the
    compute dtype, fp32 ``log_softmax`` each, ``Σ_v p (log p − log q)``; the reference side is a constant."""
    log_p = torch.log_softmax((h @ W.T).float(), dim=-1)  # [N, D] @ [D, V] -> [N, V], fp32
    with torch.no_grad():
        log_q = torch.log_softmax((h_ref @ W_ref.T).float(), dim=-1)  # [N, V] fp32
    return (log_p.exp() * (log_p - log_q)).sum(-1)  # [N]


def floor_step(h: torch.Tensor, W: torch.Tensor, device: str, *, reference: bool) -> Callable[[], None]:
    """The GEMM floor: the plain GEMMs of the materialized fwd+bwd with no elementwise work, in the inputs' dtype.
    ``z = h·Wᵀ``, ``dh = dz·W``, ``dW = dzᵀ·h`` (6·N·D·V FLOPs), and with ``reference`` also ``h_ref·Wᵀ`` (8·N·D·V).
    ``dz`` is a stand-in ``[N, V]`` built outside the timing; the peak holds ``z`` (and ``z_ref``), ``dh``, ``dW``."""
    sync = _sync(device)
    hd, Wd = h.detach(), W.detach()
    g = _randn((hd.shape[0], Wd.shape[0]), hd, 7, 1e-3)  # [N, V]
    href = reference_hidden(hd) if reference else None

    def step():
        z = hd @ Wd.T  # [N, D] @ [D, V] -> [N, V]   forward logits
        zr = href @ Wd.T if reference else None  # the reference's forward logits
        dh = g @ Wd  # [N, V] @ [V, D] -> [N, D]
        dW = g.T @ hd  # [V, N] @ [N, D] -> [V, D]
        del z, zr, dh, dW
        sync()

    return step


def linear_step(impl: str, x: LinearHeadInputs, device: str) -> Callable[[], None]:
    sync = _sync(device)
    D = x.hidden.shape[-1]
    h, W, y = x.hidden.reshape(-1, D), x.weight, x.labels.reshape(-1)  # [N, D], [V, D], [N]
    leaves = (x.hidden, x.weight)

    if impl in ("gemm", "triton", "torch"):
        from vpo.ops.linear_logprobs import linear_logprobs

        if impl == "triton":
            _require_kernels("vpo_kernels.linear_logprobs")
        if impl != "torch":
            _require_impl(linear_logprobs, impl, *_tiny(device, h.dtype))

        def step():
            logp, _ = linear_logprobs(h, W, y, impl=impl)
            torch.autograd.grad(logp.sum(), leaves)
            sync()

    elif impl == "naive":

        def step():
            torch.autograd.grad(naive_logprobs(h, W, y).sum(), leaves)
            sync()

    elif impl == "liger-flce":
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

        ce = LigerFusedLinearCrossEntropyLoss(reduction="sum")  # -Σ logp: the same gradient as logp.sum()

        def step():
            torch.autograd.grad(ce(W, h, y), leaves)
            sync()

    elif impl == "cce":
        from cut_cross_entropy import linear_cross_entropy

        def step():  # its defaults (impl="cce", gradient filtering on)
            torch.autograd.grad(linear_cross_entropy(h, W, y, reduction="sum"), leaves)
            sync()

    elif impl == "floor":
        return floor_step(h, W, device, reference=False)

    else:
        raise ValueError(f"unknown linear_logprobs impl {impl!r}: expected one of {sorted(LINEAR_IMPLS)}")
    return step


def fused_step(impl: str, x: LinearHeadInputs, device: str) -> Callable[[], None]:
    """Fused preference losses (``dpo``, ``tpo``, ``catpo``) by backend (``gemm``, ``triton``, ``torch``), their
    materializing oracles (``naive``), Liger's DPO, and the 4-GEMM floor. B pairs: ``hidden [2B, T, D]``."""
    import vpo.fused
    import vpo.oracle

    sync = _sync(device)
    h, W, y = x.hidden, x.weight, x.labels  # [2B, T, D], [V, D], [2B, T]
    ref_h = reference_hidden(h)
    loss_name, backend = impl.split("/")
    if backend == "floor":
        return floor_step(h.reshape(-1, h.shape[-1]), W, device, reference=True)
    if loss_name == "tpo":
        h_n = (h.detach() + _randn(h.shape, h, 2, 0.1)).requires_grad_()  # policy, noised image
        ref_hn = ref_h + _randn(h.shape, h, 3, 0.1)  # reference, noised image
        leaves = (h, h_n, W)
    else:
        leaves = (h, W)
    if loss_name == "catpo":  # Cat-PO's token weights: constants in [0.5, 1.5] (the reference model's, in training)
        g = torch.Generator(device=y.device).manual_seed(4)
        token_w = torch.rand(y.shape, generator=g, device=y.device, dtype=torch.float32).add_(0.5)  # [2B, T]
    if backend == "triton":
        _require_kernels("vpo_kernels.linear_logprobs", *(["vpo_kernels.token_kl"] if loss_name == "catpo" else []))

    if backend in ("gemm", "triton", "torch", "auto"):
        if loss_name == "dpo":
            def loss(impl=backend):
                return vpo.fused.fused_dpo_loss(W, h, y, ref_hidden=ref_h, impl=impl)[0]
        elif loss_name == "tpo":
            def loss(impl=backend):
                return vpo.fused.fused_tpo_loss(W, h, h_n, y, ref_hidden=ref_h, ref_hidden_noised=ref_hn, impl=impl)[0]
        else:
            def loss(impl=backend):
                return vpo.fused.fused_catpo_loss(W, h, y, token_w, ref_hidden=ref_h, impl=impl)[0]
        if backend == "gemm":
            try:
                with torch.no_grad():
                    loss(impl="gemm")
            except ValueError as e:
                if "impl" in str(e):
                    raise Unavailable(f"impl='gemm' is rejected by the fused {loss_name} loss: {e}") from e
                raise

    elif impl == "dpo/naive":

        def loss():
            return vpo.oracle.dpo_loss(W, h, y, ref_hidden=ref_h)[0]

    elif impl == "tpo/naive":

        def loss():
            return vpo.oracle.tpo_loss(W, h, h_n, y, ref_hidden=ref_h, ref_hidden_noised=ref_hn)[0]

    elif impl == "catpo/naive":

        def loss():
            return vpo.oracle.catpo_loss(W, h, y, token_w, ref_hidden=ref_h)[0]

    elif impl == "dpo/liger":
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

        dpo = LigerFusedLinearDPOLoss(beta=0.1, use_ref_model=True)
        W_ref = W.detach()

        def loss():
            out = dpo(W, h, y, ref_input=ref_h, ref_weight=W_ref)
            return out[0] if isinstance(out, tuple) else out

    else:
        raise ValueError(f"unknown fused_losses/catpo impl {impl!r}: expected one of "
                         f"{sorted({*FUSED_IMPLS, *CATPO_IMPLS})}")

    def step():
        torch.autograd.grad(loss(), leaves)
        sync()

    return step


def token_kl_step(impl: str, x: LinearHeadInputs, device: str) -> Callable[[], None]:
    """``logprobs/*``: :func:`linear_step`; ``kl/*``: fwd+bwd of ``kl.sum()`` against the reference's hidden states
    (:func:`reference_hidden`), sharing the policy's head as Cat-PO does; ``kl/floor``: four GEMMs."""
    family, backend = impl.split("/")
    if family == "logprobs":
        return linear_step(backend, x, device)
    if impl not in TOKEN_KL_IMPLS:
        raise ValueError(f"unknown token_kl impl {impl!r}: expected one of {sorted(TOKEN_KL_IMPLS)}")
    D = x.hidden.shape[-1]
    h, W, y = x.hidden.reshape(-1, D), x.weight, x.labels.reshape(-1)  # [N, D], [V, D], [N]
    if backend == "floor":
        return floor_step(h, W, device, reference=True)
    from vpo.ops.token_kl import linear_token_kl

    sync = _sync(device)
    h_ref = reference_hidden(h)  # [N, D]
    leaves = (x.hidden, x.weight)
    if backend == "triton":
        _require_kernels("vpo_kernels.token_kl")
    if backend in ("gemm", "triton"):
        th, tW, ty = _tiny(device, h.dtype)
        _require_impl(linear_token_kl, backend, th, tW, th, labels=ty)

    if backend == "naive":

        def kl():
            return naive_token_kl(h, W, h_ref, W.detach())

    else:

        def kl():
            return linear_token_kl(h, W, h_ref, labels=y, impl=backend)  # labels: the mask, all valid here

    def step():
        torch.autograd.grad(kl().sum(), leaves)
        sync()

    return step
