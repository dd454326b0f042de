"""Sharded LM heads for the fused losses and ops: FSDP2 DTensor heads gathered for the call, with FSDP's gradient.

:func:`unshard_head` is called at the top of every public entry that takes an LM-head weight (``vpo.fused_*_loss``,
``vpo.linear_logprobs``, ``vpo.target_logits``, ``vpo.linear_token_kl``). It returns plain ``[V, D]`` / ``[V]``
tensors the kernels can use:

- a plain tensor (no sharding, DDP, an FSDP2 head while its group is unsharded, a ZeRO-3 head inside
  ``deepspeed.zero.GatheredParameters``) passes through unchanged: its gradient goes where autograd sends it, and the
  framework reduces it as it reduces every parameter;
- an FSDP2 (``torch.distributed.fsdp.fully_shard``) DTensor sharded along the vocabulary (``Shard(0)``; with HSDP
  ``(Replicate(), Shard(0))``) is all-gathered by :class:`_GatherHead`, whose backward turns the full ``[V, D]``
  gradient of this rank's loss back into a gradient sharded like the parameter and **averaged over every rank of its
  device mesh** — what FSDP2's own reduce-scatter produces for a parameter used inside its module's forward (its
  default divide factor: the data-parallel world size; a custom ``set_gradient_divide_factor`` is not seen here);
- a DTensor replicated on every mesh dimension passes its local tensor through (``to_local()``: the gradient comes
  back as a replicated DTensor, the caller's framework reduces it).

Why not ``weight.full_tensor()``: its backward only slices this rank's rows out of this rank's gradient, never averaged
over ranks — each rank would step on its own data's gradient, silently. And FSDP2 (torch 2.13) does not reduce it
either: its post-backward reduce-scatters the *unsharded* parameter's ``.grad``; a gradient written to the sharded
DTensor's ``.grad`` from outside the module's forward is accumulated into, never reduced. The gradient this backward
returns is therefore final: FSDP adds nothing to it (``reduce_scatter_unused_params`` would add a reduced zero) and
does not reduce it a second time (tested against the single-process gradient in ``tests/test_distributed_fsdp.py``).

Memory of the gathered head, per rank and per call: the full weight, ``V·D`` elements in the parameter's dtype, lives
from the call until the op's backward has run (the ops save it for ``grad_hidden``); the backward adds the full
gradient, ``V·D`` elements, until it is reduce-scattered. Peak: ``2·V·D`` elements (+ ``2·V`` with a bias) on top of
the shard. LLaVA-1.5-7B (V = 32064, D = 4096, bf16): 263 MB + 263 MB; Qwen2.5-VL-7B (V = 152064, D = 3584): 1.09 GB
+ 1.09 GB. Gather once per step and pass the plain result to every call (``VPOTrainer`` does): each call on the
DTensor gathers its own copy. Under mixed precision the sharded parameter is fp32: gather in fp32, or cast.

Not supported (``ValueError`` naming what is): a head sharded along ``D`` (``Shard(1)``), ``_StridedShard`` or
``Partial`` placements, a mesh with a tensor-parallel dimension (named ``tp``), weight and bias on different meshes or
placements, FSDP1 (``FullyShardedDataParallel``: its ``FlatParameter`` and the 1-D views ``use_orig_params`` leaves
outside the forward), and a ZeRO-3 parameter outside ``GatheredParameters`` (``numel 0``; the trainer gathers it:
:mod:`vpo.trainer.distributed`).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

SUPPORTED = ("plain tensors (single process, DDP, DeepSpeed ZeRO-1/2, a ZeRO-3 head inside "
             "deepspeed.zero.GatheredParameters), FSDP2 (torch.distributed.fsdp.fully_shard) DTensor heads sharded "
             "along the vocabulary (Shard(0), HSDP (Replicate(), Shard(0))) or replicated")


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return None
    return DTensor


def _reject_partitioned(name: str, t: torch.Tensor) -> None:
    """FSDP1 flat parameters / views and ZeRO-3 partitioned parameters: a clear error, not a shape error later."""
    if getattr(t, "_is_flat_param", False):
        raise ValueError(f"{name} is an FSDP1 FlatParameter (torch.distributed.fsdp.FullyShardedDataParallel), which "
                         f"vpo does not support: use FSDP2 (fully_shard; accelerate fsdp_version: 2). Supported: "
                         f"{SUPPORTED}")
    if hasattr(t, "ds_id") and getattr(t, "ds_status", None) is not None and t.ds_status.name != "AVAILABLE":
        raise ValueError(f"{name} is a DeepSpeed ZeRO-3 parameter partitioned away (shape {tuple(t.shape)}, full shape "
                         f"{tuple(getattr(t, 'ds_shape', ()))}): gather it for the call and its backward "
                         "(vpo.trainer.distributed.zero3_head_gathered, which VPOTrainer uses)")


def _layout(name: str, t, what: str):
    """``(mesh, placements, sharded)`` of a DTensor head part, or ValueError for what is not supported."""
    from torch.distributed.tensor import Replicate, Shard

    mesh, placements = t.device_mesh, tuple(t.placements)
    names = tuple(mesh.mesh_dim_names or ())
    tp = [n for n in names if n and ("tp" in n.lower() or "tensor" in n.lower())]
    if tp:
        raise ValueError(f"{name} lives on a device mesh with a tensor-parallel dimension {tp} (mesh dims {names}): "
                         f"tensor parallelism is not supported. Supported: {SUPPORTED}")
    sharded = False
    for dim, p in enumerate(placements):
        if type(p) is Shard and p.dim == 0:
            sharded = True
        elif type(p) is Shard:
            raise ValueError(f"{name} is a DTensor sharded along dim {p.dim} (placements {placements}): expected the "
                             f"{what} sharded along the vocabulary V (Shard(0)) or replicated; a head sharded along "
                             f"D would need a different reduction. Supported: {SUPPORTED}")
        elif not isinstance(p, Replicate):
            raise ValueError(f"{name} has placement {p!r} on mesh dim {dim} (placements {placements}): expected "
                             f"Shard(0) or Replicate(). Supported: {SUPPORTED}")
    return mesh, placements, sharded


class _GatherHead(torch.autograd.Function):
    """Local shard ``[V_r, ...]`` -> full ``[V, ...]``; backward: full gradient -> this rank's rows of its mean over
    every rank of the mesh. Applied to ``dtensor.to_local()``, whose own backward wraps the returned local gradient
    into a DTensor with the parameter's placements."""

    @staticmethod
    def forward(ctx, local, mesh, placements, shape, stride):
        from torch.distributed.tensor import DTensor

        ctx.mesh, ctx.placements = mesh, placements
        return DTensor.from_local(local, mesh, placements, run_check=False, shape=shape, stride=stride).full_tensor()

    @staticmethod
    def backward(ctx, grad_full):
        import torch.distributed as dist
        from torch.distributed.tensor import DTensor, Replicate

        mesh = ctx.mesh
        # Sum over every mesh dim, then divide by the mesh size: FSDP2's mean over the data-parallel ranks. (A
        # reduce-scatter would move less data; gloo has none, and the full gradient exists here anyway.)
        grad = grad_full.contiguous().clone()
        reduce_dtype = torch.float32 if grad.dtype in (torch.float16, torch.bfloat16) else grad.dtype
        acc = grad.to(reduce_dtype)
        for dim in range(mesh.ndim):
            if mesh.size(dim) > 1:
                dist.all_reduce(acc, op=dist.ReduceOp.SUM, group=mesh.get_group(dim))
        acc.div_(mesh.size())
        full = DTensor.from_local(acc.to(grad_full.dtype), mesh, [Replicate()] * mesh.ndim, run_check=False)
        local = full.redistribute(mesh, ctx.placements).to_local()  # Replicate -> Shard(0): a local slice
        return local, None, None, None, None


def _gather(t, mesh, placements) -> torch.Tensor:
    return _GatherHead.apply(t.to_local(), mesh, placements, t.shape, t.stride())


def unshard_head(weight: torch.Tensor, bias: Optional[torch.Tensor] = None
                 ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The full head for one call (module docstring: what is gathered, how its gradient comes back, memory).

    Args:
        weight: ``[V, D]`` the LM-head weight: a plain tensor, or an FSDP2 DTensor sharded along V / replicated.
        bias: ``[V]`` or None; a DTensor exactly when ``weight`` is one, on the same mesh with the same placements.

    Returns:
        ``(weight [V, D], bias [V] | None)`` plain tensors; differentiable back to the arguments.

    Example (one process: plain tensors pass through):
        >>> import torch, vpo.distributed
        >>> W = torch.randn(50, 16)
        >>> vpo.distributed.unshard_head(W)[0] is W
        True
    """
    DTensor = _dtensor_type()
    is_dt = DTensor is not None and isinstance(weight, DTensor)
    bias_dt = DTensor is not None and bias is not None and isinstance(bias, DTensor)
    if not is_dt:
        if bias_dt:
            raise ValueError(f"bias is a DTensor (placements {tuple(bias.placements)}) but weight is a plain "
                             f"{type(weight).__name__}: expected both sharded the same way (fully_shard on the "
                             f"module owning both) or neither. Supported: {SUPPORTED}")
        if isinstance(weight, torch.Tensor):
            _reject_partitioned("weight", weight)
        if isinstance(bias, torch.Tensor):
            _reject_partitioned("bias", bias)
        return weight, bias
    if weight.dim() != 2:
        raise ValueError(f"weight has shape {tuple(weight.shape)}: expected [V, D]")
    mesh, placements, sharded = _layout("weight", weight, "LM-head weight [V, D]")
    if bias is not None:
        if not bias_dt:
            raise ValueError(f"weight is a DTensor (placements {placements}) but bias is a plain "
                             f"{type(bias).__name__}: expected both on the same device mesh with the same "
                             "placements")
        if bias.device_mesh != mesh:
            raise ValueError(f"bias lives on device mesh {bias.device_mesh} but weight on {mesh}: expected one mesh "
                             "(mismatched meshes would reduce their gradients over different ranks)")
        if tuple(bias.placements) != placements:
            raise ValueError(f"bias has placements {tuple(bias.placements)} but weight has {placements}: expected "
                             "the same placements (both sharded along V, or both replicated)")
        _layout("bias", bias, "LM-head bias [V]")
    if not sharded:
        return weight.to_local(), None if bias is None else bias.to_local()
    full_w = _gather(weight, mesh, placements)
    full_b = None if bias is None else _gather(bias, mesh, placements)
    return full_w, full_b
