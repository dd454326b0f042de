"""Which attention heads and layers Cat-PO's image attention averages over.

docs/methods.md, Cat-PO: ``a_{t,j}`` averages the attention on the image over heads and over a set of layers. The
paper averages over every head; which heads look at the image is a property of the model, so vpo lets the user pick
them (``VPOConfig.catpo_heads``; ``vpo diagnose --catpo-per-head`` shows which heads separate grounded from
hallucinated tokens). Three pieces live here:

- :func:`check_heads` validates a head set against a layer's head count; :func:`heads_of_probs` and
  :func:`heads_of_qk` narrow a layer's inputs to those heads, so every implementation of
  ``vpo.ops.attention_stats`` (C++, CUDA, Triton, torch) averages over exactly the chosen heads without a kernel
  of its own: for ``attn_probs [B, H, T, T]`` a contiguous ascending set is a view and any other set a copy of
  ``[B, |S|, T, T]``; for ``q [B, Hq, T, d]`` / ``k [B, Hkv, T, d]`` the selected query heads are gathered with the
  kv head each of them reads (``h // (Hq // Hkv)``), giving ``q' [B, |S|, T, d]`` and ``k' [B, |S|, T, d]``.
- :class:`HeadSelection` maps each language-model layer to its head set: the same heads in every layer, or
  ``(layer, head)`` pairs. :func:`parse_heads` reads the text form used by configs and the CLI.
- :class:`ImageAttentionAccumulator` averages the per-layer results over the selected layers.

The result for layer ``l`` with head set ``S_l`` is ``(1 / |S_l|) Σ_{h ∈ S_l} P_h``; layers are then averaged with
equal weight (each selected layer counts once, whatever its number of heads).
"""
from __future__ import annotations

import functools
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from vpo._validate import check_float, check_same_device

__all__ = ["check_heads", "heads_of_probs", "heads_of_qk", "HeadSelection", "parse_heads",
           "ImageAttentionAccumulator"]

HeadsArg = Union[None, Sequence[int], Mapping[int, Sequence[int]]]


def check_heads(heads: Optional[Iterable[int]], num_heads: int, *, name: str = "heads") -> Optional[Tuple[int, ...]]:
    """``heads`` as a tuple of distinct ints in ``[0, num_heads)`` (negative ones count from the end), or ``None``
    (all heads). ``ValueError`` naming ``name`` for an empty set, a repeat, a non-int or an index out of range."""
    if heads is None:
        return None
    if isinstance(heads, (str, bytes)) or not hasattr(heads, "__iter__"):
        raise ValueError(f"{name} must be a sequence of head indices or None (all heads), got {heads!r}")
    out: List[int] = []
    for h in heads:
        if isinstance(h, bool) or not isinstance(h, int):
            raise ValueError(f"{name} must hold ints, got {h!r}")
        if not -num_heads <= h < num_heads:
            raise ValueError(f"{name} contains {h}: expected head indices in [-{num_heads}, {num_heads}) "
                             f"({num_heads} heads)")
        h %= num_heads
        if h in out:
            raise ValueError(f"{name} contains head {h} twice")
        out.append(h)
    if not out:
        raise ValueError(f"{name} must not be empty: expected head indices, or None for all heads")
    return tuple(out)


@functools.lru_cache(maxsize=64)
def _index(heads: Tuple[int, ...], device: torch.device) -> torch.Tensor:
    """The head indices as an int64 tensor on ``device``, made once per (heads, device): a capture narrows every
    layer of every forward to the same heads, and a fresh host-to-device copy each time is wasted."""
    return torch.tensor(heads, dtype=torch.int64, device=device)


def heads_of_probs(attn_probs: torch.Tensor, heads: Optional[Iterable[int]]) -> torch.Tensor:
    """``attn_probs [B, H, T, T]`` narrowed to ``heads`` along dim 1 (a view for a contiguous ascending set)."""
    sel = check_heads(heads, attn_probs.shape[1])
    if sel is None or sel == tuple(range(attn_probs.shape[1])):
        return attn_probs
    if sel == tuple(range(sel[0], sel[0] + len(sel))):
        return attn_probs[:, sel[0]:sel[0] + len(sel)]
    return attn_probs.index_select(1, _index(sel, attn_probs.device))


def heads_of_qk(q: torch.Tensor, k: torch.Tensor, heads: Optional[Iterable[int]]) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(q [B, |S|, T, d], k [B, |S|, T, d])``: the selected query heads and, for each, the kv head it reads.

    ``q [B, Hq, T, d]``, ``k [B, Hkv, T, d]`` with ``Hq % Hkv == 0`` (checked by the caller); unchanged for ``None``.
    """
    sel = check_heads(heads, q.shape[1])
    if sel is None or sel == tuple(range(q.shape[1])):
        return q, k
    group = q.shape[1] // k.shape[1]
    idx = _index(sel, q.device)
    return q.index_select(1, idx), k.index_select(1, idx // group)


class HeadSelection:
    """Per-layer head sets: :meth:`for_layer` gives the heads to average in a layer (``None`` = all).

    Args:
        heads: ``None`` (every head of every layer), a sequence of head indices (the same heads in every selected
            layer), or a mapping ``{layer: [heads]}`` (those heads of those layers; the layers become the selection).
        layers: the layer indices selected otherwise (``None`` = all); with a mapping, ``layers`` must be ``None`` or
            hold every layer of the mapping (then a layer of ``layers`` missing from the mapping keeps all its heads).
        num_layers: the language model's layer count (negative layer indices count from the end).

    Attributes:
        layers: the selected layers, sorted, non-negative.

    Example:
        >>> sel = HeadSelection({1: [0, 3], -1: [2]}, num_layers=3)
        >>> sel.layers, sel.for_layer(1), sel.for_layer(2)
        ((1, 2), (0, 3), (2,))
    """

    def __init__(self, heads: HeadsArg = None, *, layers: Optional[Sequence[int]] = None, num_layers: int):
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers <= 0:
            raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
        self.num_layers = num_layers
        chosen = None if layers is None else self._layers(layers, "layers")
        self._per_layer: Dict[int, Optional[Tuple[int, ...]]] = {}
        if isinstance(heads, Mapping):
            if not heads:
                raise ValueError("heads must not be an empty mapping: expected {layer: [heads]}, or None for all")
            keyed = dict(zip(self._layers(list(heads), "heads (its layer keys)"), heads.values()))
            if chosen is not None and not set(keyed) <= set(chosen):
                raise ValueError(f"heads names layers {sorted(set(keyed) - set(chosen))} that are not in layers "
                                 f"{list(chosen)}: expected the layers of heads among the selected layers")
            self._per_layer = {l: self._check_list(keyed[l], f"heads[{l}]") for l in keyed}
            self.layers = tuple(sorted(chosen if chosen is not None else keyed))
        else:
            self.layers = tuple(sorted(chosen if chosen is not None else range(num_layers)))
            common = self._check_list(heads, "heads")
            self._per_layer = {l: common for l in self.layers}

    def for_layer(self, layer: int) -> Optional[Tuple[int, ...]]:
        """The head indices to average in ``layer`` (``None`` = all heads). Range-checked by :func:`check_heads`
        against the layer's actual head count when the heads are used."""
        return self._per_layer.get(layer)

    @property
    def all_heads(self) -> bool:
        """True when no layer narrows its heads (the paper's average over every head)."""
        return all(v is None for v in self._per_layer.values())

    def _layers(self, layers, name) -> Tuple[int, ...]:
        idx = list(layers)
        if not idx:
            raise ValueError(f"{name} must not be empty: expected layer indices, or None for all layers")
        out: List[int] = []
        for i in idx:
            if isinstance(i, bool) or not isinstance(i, int) or not -self.num_layers <= i < self.num_layers:
                raise ValueError(f"{name} must hold ints in [{-self.num_layers}, {self.num_layers}), got {i!r}")
            if i % self.num_layers in out:
                if name != "layers":  # a repeated layer in `layers` is harmless; two head lists for one layer not
                    raise ValueError(f"{name} names layer {i % self.num_layers} twice")
                continue
            out.append(i % self.num_layers)
        return tuple(out)

    @staticmethod
    def _check_list(heads, name) -> Optional[Tuple[int, ...]]:
        if heads is None:
            return None
        if isinstance(heads, (str, bytes)) or not hasattr(heads, "__iter__"):
            raise ValueError(f"{name} must be a sequence of head indices or None (all heads), got {heads!r}")
        out = tuple(heads)
        if not out or any(isinstance(h, bool) or not isinstance(h, int) for h in out) or len(set(out)) != len(out):
            raise ValueError(f"{name} must be a non-empty sequence of distinct int head indices, got {heads!r}")
        return out  # ranges (and negative indices) are resolved by check_heads against the layer's head count


def parse_heads(text: Optional[str], *, name: str = "catpo_heads") -> HeadsArg:
    """The text form of a head selection: ``None``/``""``/``"all"`` -> ``None``; ``"0,3"`` -> ``[0, 3]`` (those heads
    in every selected layer); ``"1:0,1:3,2:1"`` -> ``{1: [0, 3], 2: [1]}`` (``layer:head`` pairs). ``ValueError``
    naming ``name`` otherwise (mixing the two forms included).

    Example:
        >>> parse_heads("all"), parse_heads("0,3"), parse_heads("1:0, 1:3, 2:1")
        (None, [0, 3], {1: [0, 3], 2: [1]})
    """
    if text is None or str(text).strip() in ("", "all"):
        return None
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    pairs = [":" in t for t in items]
    expected = "comma-separated head indices ('0,3'), layer:head pairs ('1:0,2:3') or 'all'"
    if any(pairs) and not all(pairs):
        raise ValueError(f"{name} mixes heads and layer:head pairs in {text!r}: expected {expected}")
    try:
        if not any(pairs):
            return [int(t) for t in items]
        out: Dict[int, List[int]] = {}
        for t in items:
            layer, head = t.split(":")
            out.setdefault(int(layer), []).append(int(head))
        return out
    except ValueError:
        raise ValueError(f"{name} must be {expected}, got {text!r}") from None


class ImageAttentionAccumulator:
    """Averages per-layer ``[B, Tq, N_p]`` image-attention results over a chosen set of layers (docs/methods.md: all by
    default).

    Args:
        layers: indices of the layers to keep; ``None`` (default) keeps every layer added. Negative indices count from
            the end and need ``num_layers``.
        num_layers: the model's number of layers (optional; enables negative ``layers`` and range checks in ``add``).

    ``add(layer_idx, a)`` sums ``a`` if the layer is selected (returns whether it was kept; call :meth:`wants` first
    to skip computing unselected layers); ``mean()`` returns the sum divided by the number of layers kept, as
    float32 (float64 if the inputs were). Adding a layer twice, or calling ``mean()`` before every selected layer
    was added, raises ``ValueError``. Nothing here carries gradient.

    Example:
        >>> import torch
        >>> from vpo.ops.attention_stats import ImageAttentionAccumulator
        >>> acc = ImageAttentionAccumulator(layers=[0, -1], num_layers=3)
        >>> for i in range(3):
        ...     _ = acc.add(i, torch.full((1, 2, 4), float(i)))
        >>> acc.layers_seen, acc.mean()[0, 0].tolist()
        ((0, 2), [1.0, 1.0, 1.0, 1.0])
    """

    def __init__(self, layers: Optional[Iterable[int]] = None, *, num_layers: Optional[int] = None):
        if num_layers is not None and (isinstance(num_layers, bool) or not isinstance(num_layers, int)
                                       or num_layers <= 0):
            raise ValueError(f"num_layers must be a positive int or None, got {num_layers!r}")
        self.num_layers = num_layers
        self.layers: Optional[Tuple[int, ...]] = None
        if layers is not None:
            resolved: List[int] = []
            for i in layers:
                if isinstance(i, bool) or not isinstance(i, int):
                    raise ValueError(f"layers must hold ints, got {i!r}")
                if i < 0:
                    if num_layers is None:
                        raise ValueError(f"layers contains {i}: negative layer indices need num_layers")
                    i += num_layers
                if i < 0 or (num_layers is not None and i >= num_layers):
                    raise ValueError(f"layers contains an index outside [-{num_layers}, {num_layers}): {i}")
                if i in resolved:
                    raise ValueError(f"layers contains {i} twice")
                resolved.append(i)
            if not resolved:
                raise ValueError("layers must not be empty: expected layer indices, or None for all layers")
            self.layers = tuple(resolved)
        self.reset()

    def reset(self) -> None:
        """Forget everything added (the layer selection stays)."""
        self._sum: Optional[torch.Tensor] = None
        self._seen: List[int] = []

    @property
    def layers_seen(self) -> Tuple[int, ...]:
        """The layer indices kept so far, in the order they were added."""
        return tuple(self._seen)

    def wants(self, layer_idx: int) -> bool:
        """Whether ``layer_idx`` is selected (compute its attention only if so)."""
        self._check_layer(layer_idx)
        return self.layers is None or layer_idx in self.layers

    def add(self, layer_idx: int, a: torch.Tensor) -> bool:
        """Add one layer's ``a [B, Tq, N_p]``; returns False (and ignores ``a``) for an unselected layer."""
        if not self.wants(layer_idx):
            return False
        if layer_idx in self._seen:
            raise ValueError(f"layer_idx {layer_idx} was already added")
        check_float("a", a, ndim=3, allow_empty=True)
        a = a.detach()
        if self._sum is None:
            self._sum = a.to(torch.promote_types(a.dtype, torch.float32), copy=True)
        else:
            if a.shape != self._sum.shape:
                raise ValueError(
                    f"a has shape {tuple(a.shape)} but the layers added before had shape {tuple(self._sum.shape)}: "
                    "expected the same [B, Tq, N_p] for every layer"
                )
            check_same_device("a", a, "the layers added before", self._sum)
            self._sum += a
        self._seen.append(layer_idx)
        return True

    def mean(self) -> torch.Tensor:
        """``[B, Tq, N_p]``: the mean over the layers kept."""
        if self._sum is None:
            raise ValueError("no layer was added: call add(layer_idx, a) for the selected layers before mean()")
        if self.layers is not None:
            missing = [i for i in self.layers if i not in self._seen]
            if missing:
                raise ValueError(f"layers {missing} were selected but never added (added: {self._seen})")
        return self._sum / len(self._seen)

    def _check_layer(self, layer_idx) -> None:
        if isinstance(layer_idx, bool) or not isinstance(layer_idx, int) or layer_idx < 0:
            raise ValueError(f"layer_idx must be a non-negative int, got {layer_idx!r}")
        if self.num_layers is not None and layer_idx >= self.num_layers:
            raise ValueError(f"layer_idx must be in [0, {self.num_layers}), got {layer_idx}")
