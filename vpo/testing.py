"""Input builders shared by the tests and the benchmarks (so both exercise the same shapes).

Also: ``assert_close_to_oracle``, the tolerance rule from STYLE.md — the fast path's error against a high-precision
oracle must be at most ``k`` times PyTorch's own error in the same dtype, plus a small absolute slack.

Checking a new architecture (README, "Architectures"): collate a few records with its processor
(:class:`vpo.data.PreferenceCollator`, ``family="generic"``), then

- :func:`check_logprobs_match_model`: the trainer's per-token log-probs (the backbone's hidden states through the LM
  head, soft-capping / logit scale included) equal ``log_softmax`` of the model's own logits on every scored token;
- :func:`check_causal`: changing the last response token of a row leaves the model's log-probs at every earlier
  position of that row unchanged (no response token sees a later one: PaliGemma's prefix types, a bad mask).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class LinearHeadInputs:
    hidden: torch.Tensor  # [R, T, D] (or [N, D] when rows is None)
    weight: torch.Tensor  # [V, D]
    labels: torch.Tensor  # [R, T] int64, ignore_index where masked
    bias: Optional[torch.Tensor]  # [V] or None


def make_linear_head_inputs(
    rows: int,
    seq: int,
    dim: int,
    vocab: int,
    *,
    dtype: torch.dtype = torch.float32,
    device="cpu",
    bias: bool = False,
    ignore_frac: float = 0.25,
    prompt_len: int = 0,
    scale: float = 1.0,
    ignore_index: int = -100,
    seed: int = 0,
    requires_grad: bool = True,
) -> LinearHeadInputs:
    """Random LM-head inputs: hidden ``[rows, seq, dim]``, weight ``[vocab, dim]``, labels ``[rows, seq]``.

    The first ``prompt_len`` positions of every row are ignored (a prompt), and a further ``ignore_frac`` of positions
    at random. ``scale`` multiplies the logits' typical size (use ~1e3 to test huge logits).
    """
    g = torch.Generator(device="cpu").manual_seed(seed)
    h = torch.randn(rows, seq, dim, generator=g, dtype=torch.float64) * (scale / dim**0.25)
    w = torch.randn(vocab, dim, generator=g, dtype=torch.float64) / dim**0.25
    b = torch.randn(vocab, generator=g, dtype=torch.float64) * 0.1 * scale if bias else None
    labels = torch.randint(0, vocab, (rows, seq), generator=g)
    drop = torch.rand(rows, seq, generator=g) < ignore_frac
    drop[:, :prompt_len] = True
    labels[drop] = ignore_index

    def mk(x):
        if x is None:
            return None
        return x.to(device=device, dtype=dtype).requires_grad_(requires_grad)

    return LinearHeadInputs(mk(h), mk(w), labels.to(device), mk(b))


def assert_close_to_oracle(out: torch.Tensor, oracle: torch.Tensor, torch_same_dtype: torch.Tensor, *,
                           k: float = 2.0, atol: float = 1e-5, name: str = "value") -> None:
    """``|out - oracle| <= k * |torch_same_dtype - oracle| + atol`` in max norm.

    ``oracle`` is computed in float64 (or float32); ``torch_same_dtype`` is PyTorch's own plain computation in the test
    dtype, whose error sets the scale of what is acceptable.
    """
    ref = oracle.double()
    err = (out.double() - ref).abs().max().item()
    base = (torch_same_dtype.double() - ref).abs().max().item()
    if not err <= k * base + atol:
        raise AssertionError(f"{name}: max error {err:.3e} > {k} x torch's own error {base:.3e} + {atol:.1e}")


# ----------------------------------------------------------------------------------------------------------------------
# Peaked LM-head inputs: softmaxes shaped like a trained LM's (for the benchmarks; N(0, 1) inputs give near-flat ones)
# ----------------------------------------------------------------------------------------------------------------------


def make_peaked_head_inputs(
    rows: int,
    seq: int,
    dim: int,
    vocab: int,
    *,
    entropy: float = 2.0,
    zipf: float = 1.0,
    candidates: int = 8,
    noise: float = 1.0,
    dtype: torch.dtype = torch.float32,
    device="cpu",
    ignore_frac: float = 0.0,
    prompt_len: int = 0,
    ignore_index: int = -100,
    seed: int = 0,
    requires_grad: bool = True,
    calib_rows: int = 128,
) -> LinearHeadInputs:
    """LM-head inputs whose softmax looks like a trained LM's: peaked (mean entropy ``entropy`` nats), a Zipfian
    tail, and labels drawn from the model itself, so the mean target log-prob is about ``-entropy``.

    Construction (all in float32 on ``device``, then cast to ``dtype``):

    - token vectors ``u [V, D]`` ~ N(0, 1/D) (rows of norm ~1), made orthogonal to a random unit direction ``e``;
      a Zipfian log-prior ``prior_v = -zipf · ln(1 + rank_v)`` (a random rank per token, centred);
      ``weight = u + (prior / gamma) ⊗ e`` with ``gamma = sqrt(D) / 2``.
    - every position gets ``candidates`` plausible next tokens drawn from the Zipf unigram distribution, with boosts
      ``1 / (1 + j)``; ``hidden = a · Σ_j u[k_j] / (1 + j) + gamma · e + noise · ξ``, ``ξ ~ N(0, I_D)`` (so
      ``|hidden| ≈ noise · sqrt(D)``, like a final-norm output). Its logits are then about
      ``a / (1 + j)`` on the candidates, plus the Zipf prior, plus N(0, noise²) per token.
    - ``a`` is found by bisection so that the mean softmax entropy over ``calib_rows`` calibration rows is
      ``entropy``; labels are sampled from each row's own softmax (the logits in ``dtype``, inverse CDF), so
      ``E[log p(label)] = -entropy`` — a calibrated model on its own data.
    - the first ``prompt_len`` positions of every row and a further ``ignore_frac`` at random get ``ignore_index``.

    Returns hidden ``[rows, seq, dim]``, weight ``[vocab, dim]``, labels ``[rows, seq]`` int64, no bias. Extra
    memory while building: ~3 float32 ``[V, D]`` and chunks of at most 2**24 logits. Check the result with
    :func:`head_input_stats`.
    """
    if rows < 1 or seq < 1 or dim < 2 or vocab < 2:
        raise ValueError(f"rows, seq >= 1 and dim, vocab >= 2 expected, got {rows}, {seq}, {dim}, {vocab}")
    if not entropy > 0 or entropy >= math.log(vocab):
        raise ValueError(f"entropy must be in (0, ln(vocab) = {math.log(vocab):.2f}), got {entropy}")
    if candidates < 1:
        raise ValueError(f"candidates must be >= 1, got {candidates}")
    dev = torch.device(device)
    g = torch.Generator(device=dev).manual_seed(seed)
    f32 = dict(device=dev, dtype=torch.float32)
    n = rows * seq

    e = torch.randn(dim, generator=g, **f32)
    e /= e.norm()
    u = torch.randn(vocab, dim, generator=g, **f32).mul_(dim**-0.5)  # [V, D]
    u -= (u @ e)[:, None] * e  # orthogonal to e
    rank = torch.randperm(vocab, generator=g, device=dev).to(torch.float32)
    prior = -zipf * torch.log1p(rank)  # [V]
    prior -= prior.mean()
    gamma = dim**0.5 / 2
    weight = u + (prior / gamma)[:, None] * e  # [V, D]
    unigram = torch.softmax(prior, 0)
    boosts = 1.0 / torch.arange(1, candidates + 1, **f32)  # [K]

    def parts(count: int):
        """(A, B) with hidden = a · A + B for ``count`` positions: the candidate sum and the rest, [count, D] each."""
        ks = torch.multinomial(unigram, count * candidates, replacement=True, generator=g).view(count, candidates)
        A = torch.zeros(count, dim, **f32)
        for j in range(candidates):
            A += boosts[j] * u[ks[:, j]]
        B = gamma * e + noise * torch.randn(count, dim, generator=g, **f32)
        return A, B

    # calibrate a on separate rows: z(a) = a · (A @ Wᵀ) + B @ Wᵀ
    cA, cB = parts(min(calib_rows, n))
    zA, zB = cA @ weight.T, cB @ weight.T  # [R, V] each

    def mean_entropy(a: float) -> float:
        lp = torch.log_softmax(a * zA + zB, dim=-1)
        return float(-(lp.exp() * lp).sum(-1).mean())

    lo, hi = 0.0, 1.0
    while mean_entropy(hi) > entropy and hi < 1e4:
        lo, hi = hi, hi * 2
    for _ in range(16):  # the bracket [lo, hi] to 2**-16 of its width
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mean_entropy(mid) > entropy else (lo, mid)
    a = (lo + hi) / 2
    del cA, cB, zA, zB

    A, B = parts(n)
    hidden = (a * A + B).to(dtype)  # [N, D]
    del A, B, u
    weight = weight.to(dtype)
    labels = torch.empty(n, dtype=torch.int64, device=dev)
    step = max(1, (1 << 24) // vocab)
    for s in range(0, n, step):  # inverse-CDF sampling of softmax(z), one uniform per row
        p = torch.softmax((hidden[s:s + step] @ weight.T).float(), dim=-1).cumsum_(-1)  # [c, V]
        r = torch.rand(p.shape[0], 1, generator=g, **f32) * p[:, -1:]
        labels[s:s + step] = torch.searchsorted(p, r).squeeze(1).clamp_(max=vocab - 1)
        del p, r
    labels = labels.view(rows, seq)
    drop = torch.rand(rows, seq, generator=g, **f32) < ignore_frac
    drop[:, :prompt_len] = True
    labels[drop] = ignore_index
    return LinearHeadInputs(hidden.view(rows, seq, dim).requires_grad_(requires_grad),
                            weight.requires_grad_(requires_grad), labels, None)


@torch.no_grad()
def head_input_stats(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100,
                     max_rows: int = 512) -> dict:
    """Softmax statistics of LM-head inputs over (up to ``max_rows`` evenly spaced) scored positions, float32:
    ``mean_entropy`` (nats), ``mean_target_logp``, ``mean_top1_prob``, ``target_is_top1`` (fraction),
    ``rows`` (how many positions were used). ``hidden [..., D]``, ``weight [V, D]``, ``labels hidden.shape[:-1]``."""
    h = hidden.detach().reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1)
    idx = (y != ignore_index).nonzero().squeeze(1)
    if idx.numel() == 0:
        raise ValueError("labels: every position is ignore_index; no statistics to compute")
    idx = idx[torch.linspace(0, idx.numel() - 1, min(max_rows, idx.numel()), device=idx.device).long()]
    lp = torch.log_softmax((h[idx] @ weight.detach().T).float(), dim=-1)  # [R, V]
    p = lp.exp()
    tgt = lp.gather(1, y[idx][:, None]).squeeze(1)
    return {
        "mean_entropy": float(-(p * lp).sum(-1).mean()),
        "mean_target_logp": float(tgt.mean()),
        "mean_top1_prob": float(p.max(-1).values.mean()),
        "target_is_top1": float((lp.argmax(-1) == y[idx]).float().mean()),
        "rows": int(idx.numel()),
    }


# ----------------------------------------------------------------------------------------------------------------------
# Architecture checks: the trainer's log-probs are the model's, and the collated rows are causal where they are scored
# ----------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def trainer_and_model_logprobs(model, batch) -> tuple:
    """``(ours [N], model's [N])`` float64 log-probs of the ``N`` scored tokens of ``batch``'s main pass: ours as the
    trainer computes them (:class:`vpo.trainer.passes.Passes`: backbone hook + :func:`vpo.linear_logprobs` with the
    model's head transform), the model's from ``log_softmax`` of its own forward's logits."""
    from vpo.ops.linear_logprobs import linear_logprobs
    from vpo.trainer.passes import Passes, model_inputs
    from vpo.trainer.reference import Reference

    p = Passes(batch, model, Reference("model", model=model), need_grad=False, impl="torch")
    labels = p.labels()  # [R, T] in the label window
    ours, _ = linear_logprobs(p.hidden(), p.weight, labels, p.bias, impl="torch", **p.head_kw(linear_logprobs))
    logits = model(**model_inputs(batch), use_cache=False).logits[:, :-1][:, p.window()].double()  # [R, T, V]
    mask = labels != -100
    theirs = torch.log_softmax(logits, -1).gather(-1, labels.clamp_min(0)[..., None])[..., 0]
    return ours[mask].double(), theirs[mask]


def check_logprobs_match_model(model, batch, *, atol: float = 1e-4) -> float:
    """Raise AssertionError unless the trainer's log-prob of every scored token of ``batch`` is within ``atol`` of the
    model's own (:func:`trainer_and_model_logprobs`); returns the largest difference. ``batch``: a
    :class:`vpo.data.PreferenceCollator` batch with at least one scored token."""
    ours, theirs = trainer_and_model_logprobs(model, batch)
    if ours.numel() == 0:
        raise AssertionError("the batch has no scored token: nothing to compare")
    err = (ours - theirs).abs().max().item()
    if not err <= atol:
        raise AssertionError(f"{type(model).__name__}: the trainer's log-probs differ from the model's by {err:.3e} "
                             f"(> {atol:.1e}) on the scored tokens")
    return err


@torch.no_grad()
def check_causal(model, batch, *, row: int = 0, atol: float = 1e-5) -> float:
    """Change the last response token of ``row`` (the last scored label) to another response token and raise
    AssertionError if the model's log-softmax moves by more than ``atol`` at any earlier position of the row (prompt
    and response alike); returns the largest change."""
    from vpo.trainer.passes import model_inputs

    labels = batch["labels"][row]
    scored = (labels != -100).nonzero().flatten()
    if scored.numel() < 2:
        raise AssertionError(f"row {row} has {scored.numel()} scored tokens: need 2 to check causality")
    k = int(scored[-1])  # the last response token's position
    old = int(batch["input_ids"][row, k])
    candidates = [int(t) for t in labels[scored].tolist() if int(t) != old]
    if not candidates:
        raise AssertionError(f"row {row}: no other response token to substitute")
    inputs = model_inputs(batch)
    changed = dict(inputs)
    changed["input_ids"] = inputs["input_ids"].clone()
    changed["input_ids"][row, k] = candidates[0]
    a = torch.log_softmax(model(**inputs, use_cache=False).logits[row, :k].double(), -1)
    b = torch.log_softmax(model(**changed, use_cache=False).logits[row, :k].double(), -1)
    err = (a - b).abs().max().item()
    if not err <= atol:
        where = int((a - b).abs().amax(-1).argmax())
        raise AssertionError(f"{type(model).__name__}: changing the token at position {k} moved the log-probs at "
                             f"earlier position {where} by {err:.3e} (> {atol:.1e}): a response token sees a later one")
    return err


def end_process_group() -> None:
    """Leave a multi-process test worker cleanly: a barrier (every rank done) then ``destroy_process_group``, so no
    rank's gloo threads are torn down at interpreter exit while another rank still talks to it (which can abort a
    rank with "terminate called without an active exception"). A no-op outside an initialized process group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def torchrun(script: str, *args: str, nproc: int = 2, timeout: float = 300):
    """Run ``script`` (a test file that is also its own worker) under ``torch.distributed.run`` with ``nproc`` local
    ranks on a free loopback port, one thread each, no CUDA devices; returns the ``subprocess.CompletedProcess``
    (stdout and stderr captured as text). The workers should end with :func:`end_process_group`."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(port), os.path.abspath(script), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
