"""Count what a piece of torch code would cost on a GPU: kernel launches, GEMM FLOPs, bytes moved, peak extra memory.

:class:`CostCounter` is a ``TorchDispatchMode``: every op that reaches the dispatcher — aten ops and custom ops such as
``torch.ops.vpo.tile_stats_`` / ``torch.ops.vpo.tile_grad`` (a custom op with a fake implementation is seen as one op)
— runs normally and is accounted for. It works on any device, the meta device included, so the CUDA code path can be
traced at real shapes without a GPU (``vpo._caps.assume_cuda()``)::

    with vpo._caps.assume_cuda(), CostCounter() as c:
        loss, _ = vpo.fused_dpo_loss(W, h, y, ref_hidden=hr)      # W, h, hr on device="meta"
        loss.backward()
    print(c.summary()); c.gemm_flops, c.other_bytes, c.launches, c.peak_bytes

What is counted, per op (and per op name in :attr:`CostCounter.ops`):

* **launches** — 1 per op that does device work. Not counted (:data:`NO_KERNEL`): ops that only make a new tensor
  header over existing memory — ``view``, ``_unsafe_view``, ``reshape``, ``_reshape_alias``, ``as_strided``, ``t``,
  ``transpose``, ``permute``, ``expand``, ``slice``, ``select``, ``narrow``, ``unsqueeze``, ``squeeze``, ``split``,
  ``unbind``, ``diagonal``, ``detach``, ``alias``, ``lift_fresh`` (and any other op whose schema says it returns a
  view, ``OpOverload.is_view``) — and the pure allocations ``empty``, ``empty_strided``, ``empty_like``,
  ``new_empty``, ``new_empty_strided`` (the caching allocator hands out memory without a kernel). An op that does
  work and happens to be a no-op for its arguments (``_to_copy`` to the same dtype, ``clone``) is a launch.
  One op = one launch is a model: a cuBLAS GEMM may launch a split-K reduction too, and some aten ops
  (``index_put_`` with accumulate, sorting) run several kernels; none of them is in the engine's inner loop.
* **GEMM FLOPs** — ``2·M·K·N`` (× batch) for :data:`GEMM_OPS` (``mm``, ``addmm``, ``bmm``, ``baddbmm``, ``addbmm``,
  ``_addmm_activation`` in every overload: in place, ``out=``, ``out_dtype`` (``mm.dtype``, ``addmm.dtype_out``)).
  The bias add of ``addmm`` (``M·N``) is not counted as FLOPs. **GEMM bytes**: its operands read once and its output
  written once, kept apart from the other bytes (a GEMM is compute-bound at LM-head shapes).
* **non-GEMM bytes** — for every other launch: each tensor argument read once, each output written once; an argument
  the schema marks as mutated (``add_``'s ``self``, ``tile_stats_``'s ``stats``) is read and written, an ``out=``
  argument only written; an output that aliases an argument is not counted again. Views and allocations: 0.
  Gathers (:data:`SPARSE_READ`: ``gather``, ``index_select``, ``embedding``, ``index``, ``take``) read as many source
  elements as they write, not the whole source; in-place scatters (:data:`SPARSE_WRITE`: ``scatter_add_``,
  ``index_add_``, ``index_copy_``, ``index_put_``, ...) read and write ``self`` only where the source (or index) lands.
  Ops that overwrite ``self`` without reading it (:data:`WRITE_ONLY`: ``copy_``, ``fill_``, ``zero_``, the random
  fills, ``index_copy_``, ``scatter_``, ``index_put_`` without accumulation) count one write, not a read and a write.
  A tensor's size is its number of *distinct* elements × element size: a stride-0 (expanded, broadcast) dimension is
  counted once, so ``x - m[:, None].expand(R, C)`` reads ``R·C + R`` elements. This is a DRAM-traffic model: reads
  that a real kernel serves from cache (a small row vector re-read per tile) are counted, reads of a larger-than-cache
  operand twice are not.
* **peak extra memory** — the most bytes held at once by storages *allocated inside the counted region*: every op
  output whose storage is not one of the op's arguments' is a new allocation (its storage's ``nbytes``), tracked by the
  storage object (torch keeps one Python object per live storage) and released by a ``weakref.finalize`` on it when
  the storage dies — when the last tensor, autograd-saved tensor or grad referring to it goes. So the figure includes
  autograd's saved tensors and the ``.grad`` tensors a backward leaves behind, and excludes the inputs. Limits: it is
  the live-tensor total, not the caching allocator's reserve (no fragmentation, no rounding to 512 B blocks), and it
  misses memory allocated outside the dispatcher (cuBLAS workspaces, Triton kernels' scratch, a custom op's internal
  temporaries — only its outputs are seen); a storage kept alive only by a reference cycle is freed when the garbage
  collector runs.

The mode never synchronizes and never reads values, so it is as fast as the traced code's Python (meta tensors: no
data). Counters nest: an op run inside two active :class:`CostCounter` blocks counts in both (a step's total around
per-phase counters).
"""
from __future__ import annotations

import math
import weakref
from collections import defaultdict
from dataclasses import dataclass
from typing import Dict, Iterable, List

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["CostCounter", "OpCost", "NO_KERNEL", "GEMM_OPS", "tensor_bytes"]

NO_KERNEL = frozenset({
    # views and other new headers over existing memory
    "view", "_unsafe_view", "reshape", "_reshape_alias", "as_strided", "t", "transpose", "permute", "expand",
    "slice", "select", "narrow", "unsqueeze", "squeeze", "split", "split_with_sizes", "unbind", "diagonal", "detach",
    "alias", "lift_fresh", "view_as", "expand_as",
    # allocations: memory from the caching allocator, no kernel
    "empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided",
})
GEMM_OPS = frozenset({"mm", "addmm", "bmm", "baddbmm", "addbmm", "_addmm_activation"})
# the two operands of each GEMM, by argument position
# gathers: the source is read only where the output reads it (output-many elements, not the whole source)
SPARSE_READ = {"gather": "self", "index_select": "self", "embedding": "weight", "index": "self", "take": "self"}
# in-place scatters: ``self`` is read and written only where the source (or index) lands
SPARSE_WRITE = {"scatter_": "src", "scatter_add_": "src", "scatter_reduce_": "src", "index_add_": "source",
                "index_copy_": "source", "index_put_": "values", "index_fill_": "index", "masked_scatter_": "source"}
# in-place ops that overwrite ``self`` without reading it (counted as one write), and the sparse ones among them
WRITE_ONLY = frozenset({"copy_", "fill_", "zero_", "random_", "uniform_", "normal_", "bernoulli_", "exponential_",
                        "index_copy_", "scatter_", "index_fill_", "masked_scatter_"})
_GEMM_OPERANDS = {"mm": (0, 1), "bmm": (0, 1), "addmm": (1, 2), "baddbmm": (1, 2), "addbmm": (1, 2),
                  "_addmm_activation": (1, 2)}


def tensor_bytes(t: torch.Tensor) -> int:
    """Distinct elements of ``t`` × element size: a dimension with stride 0 (broadcast) counts once."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    if t.numel() == 0:
        n = 0
    return n * t.element_size()


@dataclass
class OpCost:
    """What one op name (``aten.mm``, ``vpo.tile_stats_``, ...) cost over the counted region."""

    calls: int = 0
    launches: int = 0
    gemm_flops: int = 0
    gemm_bytes: int = 0
    bytes: int = 0  # non-GEMM bytes


def _tensors(x) -> Iterable[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for v in x:
            if isinstance(v, torch.Tensor):
                yield v


def _op_name(func) -> str:
    """``aten.mm`` for ``aten::mm.dtype``; ``vpo.tile_stats_`` for a custom op."""
    ns, _, rest = func.name().partition("::")
    return f"{ns}.{rest.split('.')[0]}"


class CostCounter(TorchDispatchMode):
    """The counting mode (module docstring). Totals: :attr:`launches`, :attr:`gemm_flops`, :attr:`gemm_bytes`,
    :attr:`other_bytes`, :attr:`peak_bytes`, :attr:`live_bytes`; per op name: :attr:`ops` (:class:`OpCost`)."""

    def __init__(self):
        super().__init__()
        self.ops: Dict[str, OpCost] = defaultdict(OpCost)
        self.live_bytes = 0
        self.peak_bytes = 0
        self._live: Dict[int, int] = {}  # storage key -> bytes, for storages allocated inside the region

    # -- totals ---------------------------------------------------------------------------------------------------
    @property
    def launches(self) -> int:
        return sum(o.launches for o in self.ops.values())

    @property
    def gemm_flops(self) -> int:
        return sum(o.gemm_flops for o in self.ops.values())

    @property
    def gemm_bytes(self) -> int:
        return sum(o.gemm_bytes for o in self.ops.values())

    @property
    def other_bytes(self) -> int:
        return sum(o.bytes for o in self.ops.values())

    # -- the mode -------------------------------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self._account(func, args, kwargs, out)
        return out

    def _account(self, func, args, kwargs, out) -> None:
        name = _op_name(func)
        short = name.split(".", 1)[1]
        cost = self.ops[name]
        cost.calls += 1
        schema = func._schema
        inputs: List[torch.Tensor] = []  # read
        written: List[torch.Tensor] = []  # mutated in place (read and written) or out= (written only)
        read_also: List[bool] = []
        named, vals = {}, {}
        for i, arg in enumerate(schema.arguments):
            val = args[i] if i < len(args) else kwargs.get(arg.name)
            vals[arg.name] = val
            ts = list(_tensors(val))
            if ts:
                named[arg.name] = ts[0]
            if arg.alias_info is not None and arg.alias_info.is_write:
                written.extend(ts)
                read_also.extend([not arg.is_out] * len(ts))
            else:
                inputs.extend(ts)
        arg_storages = {self._key(t) for t in inputs + written}
        outs = list(_tensors(out))
        self._track_new(outs, arg_storages)

        if short in NO_KERNEL or func.is_view:
            return
        cost.launches += 1
        if short in SPARSE_READ and named.get(SPARSE_READ[short]) is not None and outs:
            src = named[SPARSE_READ[short]]  # read as many source elements as the output has
            cost.bytes += sum(tensor_bytes(t) for t in inputs if t is not src) + tensor_bytes(outs[0]) \
                + min(tensor_bytes(src), outs[0].numel() * src.element_size())
            return
        if short in SPARSE_WRITE and written:
            self_t = written[0]
            touched = named.get(SPARSE_WRITE[short], named.get("index"))
            n = self_t.numel() if touched is None else min(self_t.numel(), max(touched.numel(), 1))
            if short == "index_put_":  # the indexed elements: the broadcast indices × the dims left unindexed
                index = vals.get("indices") or []
                idx = [t for t in index if t is not None]
                n = math.prod(torch.broadcast_shapes(*[t.shape for t in idx])) if idx else 1
                n = min(self_t.numel(), n * math.prod(self_t.shape[len(index):]))  # a bool mask: an upper bound
            overwrite = short in WRITE_ONLY or (short == "index_put_" and not vals.get("accumulate"))
            rw = 1 if overwrite else 2
            cost.bytes += sum(tensor_bytes(t) for t in inputs) + rw * n * self_t.element_size()
            return
        if short in WRITE_ONLY:
            read_also = [False] * len(written)
        fresh_outs = [t for t in outs if self._key(t) not in arg_storages]  # an alias of an argument is not new
        moved = sum(tensor_bytes(t) for t in inputs)
        moved += sum(tensor_bytes(t) * (1 + r) for t, r in zip(written, read_also))
        moved += sum(tensor_bytes(t) for t in fresh_outs)
        if short in GEMM_OPS:
            ia, ib = _GEMM_OPERANDS[short]
            a, b = args[ia], args[ib]
            batch = a.shape[0] if a.dim() == 3 else 1
            cost.gemm_flops += 2 * batch * a.shape[-2] * a.shape[-1] * b.shape[-1]
            cost.gemm_bytes += moved
        else:
            cost.bytes += moved

    # -- memory ---------------------------------------------------------------------------------------------------
    @staticmethod
    def _key(t: torch.Tensor) -> int:
        return t.untyped_storage()._cdata

    def _track_new(self, outs: List[torch.Tensor], arg_storages) -> None:
        for t in outs:
            st = t.untyped_storage()
            key = st._cdata
            if key in arg_storages or key in self._live:
                continue
            nbytes = st.nbytes()
            self._live[key] = nbytes
            self.live_bytes += nbytes
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
            weakref.finalize(st, self._free, key)

    def _free(self, key: int) -> None:
        self.live_bytes -= self._live.pop(key, 0)

    # -- report ---------------------------------------------------------------------------------------------------
    def summary(self, top: int = 25) -> str:
        """A table of the op names, most non-GEMM bytes first (GEMMs first of all), and the totals."""
        rows = sorted(self.ops.items(), key=lambda kv: (-kv[1].gemm_flops, -kv[1].bytes, -kv[1].launches))
        lines = [f"{'op':<28}{'calls':>8}{'launches':>10}{'GEMM TFLOP':>12}{'GEMM GB':>10}{'other GB':>10}"]
        for name, c in rows[:top]:
            lines.append(f"{name:<28}{c.calls:>8}{c.launches:>10}{c.gemm_flops / 1e12:>12.3f}"
                         f"{c.gemm_bytes / 1e9:>10.3f}{c.bytes / 1e9:>10.3f}")
        if len(rows) > top:
            lines.append(f"... {len(rows) - top} more op names")
        lines.append(f"{'total':<28}{sum(c.calls for c in self.ops.values()):>8}{self.launches:>10}"
                     f"{self.gemm_flops / 1e12:>12.3f}{self.gemm_bytes / 1e9:>10.3f}{self.other_bytes / 1e9:>10.3f}")
        lines.append(f"peak extra memory {self.peak_bytes / 2**30:.3f} GiB (live at exit {self.live_bytes / 2**30:.3f})")
        return "\n".join(lines)
