"""``VPOTrainer`` on several processes: FSDP2 and DeepSpeed ZeRO-2/3 through accelerate, what is refused, the ZeRO-3
head gather, the sharded reference model, ``vpo precompute-ref`` across ranks and OViP's idle ranks.

Supported (:func:`check_distributed_setup`, called by the trainer): DDP, FSDP2 (accelerate ``fsdp_version: 2``;
``fully_shard``), DeepSpeed ZeRO-1/2/3. Refused with a ``ValueError`` naming these: FSDP1
(``FullyShardedDataParallel``, accelerate ``fsdp_version: 1``) and accelerate's tensor / context parallelism.

The LM head, which the fused losses read directly (``lm_head.weight``, outside its module's forward):

- FSDP2: :func:`vpo.distributed.unshard_head` (called once per batch by :class:`vpo.trainer.passes.Passes`) gathers
  the sharded DTensor and returns its gradient sharded and averaged over the ranks, as FSDP's reduce-scatter would.
- DeepSpeed ZeRO-3: outside its module's forward the head is partitioned to ``numel 0``. :func:`zero3_head_gathered`
  gathers it (``deepspeed.zero.GatheredParameters(..., modifier_rank=None)``, TRL's ``maybe_gather_lm_head_ctx``)
  around the WHOLE training step — the forwards, the fused losses AND ``accelerator.backward`` — because the ops
  save the head for their backward: a gather around the loss alone is released before the backward reads it (tried
  with DeepSpeed 0.19.8 on CPU: "The size of tensor a (0) must match the size of tensor b"). With the head gathered
  during the backward, its gradient accumulates into the full parameter and DeepSpeed's own gradient hook (on every
  parameter's ``AccumulateGrad``, not on the module) reduce-scatters it into the partitioned gradient like any other.
  One more care: the model's own ``lm_head`` forward (``logits_to_keep=1``) ends in DeepSpeed's release hook, which
  would re-partition the gathered head in the middle of the step; for the step the head is flagged as an external
  parameter (``is_external_param``, DeepSpeed's flag for parameters used outside their module, which its release
  hooks skip), and the flag is restored before the context re-partitions it. Peak memory: the full head
  (``V·D`` elements) from the step's start to its end, plus its full gradient during the backward.
- ZeRO-1/2 and DDP: parameters are whole on every rank; nothing to do.

The reference model (``ref_mode: model``) is sharded like the policy: :func:`prepare_reference` (accelerate's FSDP2
``prepare_model``, or a DeepSpeed ZeRO-3 inference engine: the config's stage 3 without optimizer). The
adapter-disabled policy needs nothing.

``vpo precompute-ref`` on several processes (``torchrun --nproc_per_node N -m vpo.cli precompute-ref ...``): each
process holds the whole reference model (data parallel; the model is not sharded for this no-grad pass) and runs the
dataset rows ``rank::world_size`` (:func:`precompute_shard`); :func:`gather_tables` gathers the per-rank tables and
merges them in dataset order on every rank; rank 0 writes the file.

OViP online (:mod:`vpo.online.ovip_data`): under several processes a rank whose whole pass over its rows yields no pair
no longer raises; its dataset yields placeholder records (ids starting with
:data:`vpo.online.ovip_data.NO_PAIR_PREFIX`) and :func:`placeholder_batch` tells the trainer to scale that step's loss
by zero: the forward and backward run as on every rank (so DDP's all-reduce and FSDP's all-gathers / reduce-scatters
match), and the rank's gradient is zero.

Tested on CPU with 2 gloo processes against one process on the same global batch: ``tests/test_distributed_*.py``
(FSDP2 and, where ``deepspeed`` is installed, ZeRO-2/3 trainer runs; the gather logic against a stub of DeepSpeed's API
everywhere).
"""
from __future__ import annotations

import contextlib
from typing import Dict, List, Optional, Sequence, Tuple

import torch

SUPPORTED = "DDP, FSDP2 (accelerate fsdp_version: 2, torch fully_shard) and DeepSpeed ZeRO-1/2/3"


def check_distributed_setup(trainer) -> None:
    """Refuse what the fused losses cannot train correctly (module docstring)."""
    accelerator = trainer.accelerator
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if getattr(trainer, "is_fsdp_enabled", False) and plugin is not None:
        version = int(getattr(plugin, "fsdp_version", 1) or 1)
        if version != 2:
            raise ValueError(f"FSDP version {version} (FullyShardedDataParallel) is not supported: set "
                             f"fsdp_config={{'version': 2}} (accelerate: fsdp_version: 2). Supported: {SUPPORTED}")
    from torch.distributed.fsdp import FullyShardedDataParallel

    if any(isinstance(m, FullyShardedDataParallel) for m in trainer.model.modules()):
        raise ValueError(f"the model is wrapped in FSDP1 (FullyShardedDataParallel), which is not supported. "
                         f"Supported: {SUPPORTED}")
    config = getattr(accelerator, "parallelism_config", None)
    for name in ("tp", "cp", "sp"):
        if config is not None and int(getattr(config, f"{name}_size", 1) or 1) > 1:
            raise ValueError(f"accelerate's {name}_size={getattr(config, f'{name}_size')} ({name.upper()} "
                             f"parallelism) is not supported. Supported: {SUPPORTED}")


def zero3_enabled(trainer) -> bool:
    """Whether the trainer runs DeepSpeed ZeRO stage 3."""
    if not getattr(trainer, "is_deepspeed_enabled", False):
        return False
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    return plugin is not None and int(getattr(plugin, "zero_stage", 0) or 0) == 3


def _head_parameters(model) -> List[torch.nn.Parameter]:
    from vpo.trainer.modeling import lm_head

    weight, bias = lm_head(model)
    return [p for p in (weight, bias) if p is not None and hasattr(p, "ds_id")]


@contextlib.contextmanager
def zero3_head_gathered(*models):
    """Keep the ZeRO-3 LM heads of ``models`` (policy, reference; None skipped) gathered for the ``with`` block, which
    must span the step's forwards, fused losses and backward (module docstring). No ZeRO-3 parameter: a no-op."""
    params: List[torch.nn.Parameter] = []
    for model in models:
        if model is not None:
            params.extend(p for p in _head_parameters(model) if all(p is not q for q in params))
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        flags = [getattr(p, "is_external_param", False) for p in params]
        for p in params:
            p.is_external_param = True  # the model's lm_head forward must not re-partition it mid-step
        try:
            yield
        finally:
            for p, flag in zip(params, flags):
                p.is_external_param = flag


def step_context(trainer, model):
    """The context of one training / evaluation step: the ZeRO-3 head gather, else nothing."""
    if not zero3_enabled(trainer):
        return contextlib.nullcontext()
    return zero3_head_gathered(model, getattr(trainer, "ref_model", None))


def prepare_reference(trainer, ref_model: torch.nn.Module) -> torch.nn.Module:
    """The frozen reference model sharded like the policy: a DeepSpeed ZeRO-3 inference engine (stage 3, no
    optimizer) under ZeRO-3, else accelerate's ``prepare_model(..., evaluation_mode=True)`` (FSDP2: ``fully_shard``;
    DDP / ZeRO-1/2: moved to the device, whole)."""
    ref_model.eval().requires_grad_(False)
    if zero3_enabled(trainer):
        import copy

        policy_ids = {getattr(p, "ds_id", None) for p in trainer.model.parameters()} - {None}
        if any(getattr(p, "ds_id", None) in policy_ids for p in ref_model.parameters()):
            raise ValueError("the reference model is a copy of the ZeRO-3-partitioned policy (its parameters carry the "
                             "policy's ds_id): a copy of partitions is not a model. Set ref_model_path (loaded and "
                             "partitioned on its own), or pass ref_model=")
        import deepspeed

        config = copy.deepcopy(trainer.accelerator.state.deepspeed_plugin.deepspeed_config)
        for key in ("optimizer", "scheduler"):
            config.pop(key, None)
        config.setdefault("zero_optimization", {})["stage"] = 3
        engine, *_ = deepspeed.initialize(model=ref_model, config=config)
        engine.eval()
        return engine
    if getattr(trainer, "is_deepspeed_enabled", False):
        return ref_model.to(trainer.accelerator.device)
    return trainer.accelerator.prepare_model(ref_model, evaluation_mode=True)


# -- precompute-ref across ranks ------------------------------------------------------------------------------------


def world() -> Tuple[int, int]:
    """``(rank, world_size)`` of the initialised default process group, else ``(0, 1)``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env(use_cpu: bool = False) -> Tuple[int, int]:
    """Under ``torchrun`` / ``accelerate launch`` (``WORLD_SIZE`` > 1) without a process group yet: initialise one
    (nccl on CUDA, gloo on CPU) and select this process's GPU (``LOCAL_RANK``). Returns :func:`world`."""
    import os

    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available() and not dist.is_initialized():
        cuda = torch.cuda.is_available() and not use_cpu
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
    return world()


def shard_indices(n: int, rank: int, world_size: int) -> List[int]:
    """The dataset rows of process ``rank``: ``rank, rank + world_size, ...`` (every row exactly once)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} of world_size {world_size}: expected 0 <= rank < world_size")
    return list(range(rank, n, world_size))


def _record_id(record) -> Optional[str]:
    rid = record.get("id") if isinstance(record, dict) else getattr(record, "id", None)
    return None if rid is None else str(rid)


def precompute_shard(dataset) -> Tuple[object, Dict[str, int]]:
    """This process's rows of ``dataset`` (a ``Subset``; the dataset itself on one process) and the dataset position
    of each of their ids (for :func:`gather_tables`)."""
    rank, size = world()
    indices = shard_indices(len(dataset), rank, size)
    index_of = {}
    for i in indices:
        rid = _record_id(dataset[i])
        if rid is not None:
            index_of.setdefault(rid, i)
    if size == 1:
        return dataset, index_of
    from torch.utils.data import Subset

    return Subset(dataset, indices), index_of


def merge_tables(parts: Sequence[Tuple[Dict[str, Dict], Dict[str, int]]]) -> Dict[str, Dict]:
    """One table from the ranks' ``(table, {id: dataset position})``, in dataset order (ids without a position, e.g.
    records whose id the collator rewrote, last, in rank order). The same id from two ranks is a sharding bug."""
    merged: Dict[str, Dict] = {}
    position: Dict[str, float] = {}
    for table, index_of in parts:
        for key, record in table.items():
            if key in merged:
                raise ValueError(f"example id {key!r} was computed by two processes: the dataset's ids must be unique "
                                 "and each process must get its own rows")
            merged[key] = record
            position[key] = index_of.get(key, float("inf"))
    return {key: merged[key] for key in sorted(merged, key=lambda k: position[k])}  # stable: ties keep rank order


def gather_tables(table: Dict[str, Dict], index_of: Dict[str, int]) -> Dict[str, Dict]:
    """This rank's table merged with every other rank's, in dataset order, on every rank (one process: reordered)."""
    import torch.distributed as dist

    rank, size = world()
    parts: List = [None] * size
    if size > 1:
        dist.all_gather_object(parts, (table, index_of))
    else:
        parts = [(table, index_of)]
    return merge_tables(parts)


# -- OViP: a rank without pairs ------------------------------------------------------------------------------------


def placeholder_batch(batch: Dict) -> bool:
    """Whether every pair of ``batch`` is an OViP placeholder (a rank whose pass found no pair): train on it with
    the loss scaled by zero."""
    from vpo.online.ovip_data import NO_PAIR_PREFIX

    ids = batch.get("ids")
    return bool(ids) and all(str(i).startswith(NO_PAIR_PREFIX) for i in ids)


def zero_loss(loss: torch.Tensor) -> torch.Tensor:
    """``0 · loss``: a zero that keeps the graph of the step's forwards (every parameter the loss touched gets a zero
    gradient, so the collectives of the backward are the same on every rank)."""
    return loss * 0.0
