"""The reference model of the preference losses, in three modes (``VPOConfig.ref_mode``), and precomputing it.

- ``"adapter"`` (default): the policy is a peft LoRA model; the reference is the same model with the adapter disabled
  (``peft_model.disable_adapter()``), run under ``torch.no_grad()`` in eval mode. No second copy of the weights.
- ``"model"``: a separate frozen model (``VPOTrainer(ref_model=...)``, e.g. CSR's previous iterate), with its own LM
  head.
- ``"precomputed"``: the reference's per-sequence terms were computed once (:func:`precompute_reference`) and are read
  from the batch (``batch["ref_logps"]``, ``batch["sub"][name]["ref_logps"]``) or from the table written next to the
  dataset, looked up by ``batch["ids"]``. TRL refuses precomputed reference log-probs for vision-language models; here
  they are the same numbers the adapter mode computes on the fly (tested), as long as the inputs are deterministic
  (TPO: ``fixed_noise``; Cat-PO: ``kl_coef == 0``, the KL needs the reference's full distribution).

The table is JSON lines, one record per example id::

    {"id": "ex-17", "main": [chosen, rejected], "crop": [x], "list": [x_2, ..., x_L], "token_weights": [[...], [...]]}

``main`` (and any pass with 2B rows) holds ``[chosen row, rejected row]``; passes with B or B·k rows hold the example's
rows in order (LPOI's list without x_1, which the main pass scores). What a value is depends on the method:
``Σ logp_ref`` (DPO, CSR, OViP, LPOI, mDPO), ``Σ (logp_ref + log c_ref)`` (TPO), ``Σ w logp_ref`` (Cat-PO, with the
response tokens' weights under ``token_weights``).
"""
from __future__ import annotations

import contextlib
import json
import os
from typing import Dict, Iterable, List, Optional

import torch

from vpo.distributed import unshard_head
from vpo.trainer.modeling import backbone, lm_head, unwrap_peft
from vpo.trainer.passes import IGNORE_INDEX, MAIN, Passes, forward_hidden

REF_MODES = ("adapter", "model", "precomputed")


@contextlib.contextmanager
def _eval_mode(module: torch.nn.Module):
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


class Reference:
    """The reference side of the losses (module docstring).

    Args:
        mode: ``"adapter"``, ``"model"`` or ``"precomputed"``.
        model: the frozen reference model (``mode="model"``).
        table: ``{id: {pass name: [values]}}`` precomputed terms (``mode="precomputed"``; optional when the batches
            carry ``ref_logps``).
    """

    def __init__(self, mode: str = "adapter", *, model: Optional[torch.nn.Module] = None,
                 table: Optional[Dict[str, Dict]] = None):
        if mode not in REF_MODES:
            raise ValueError(f"ref_mode must be one of {list(REF_MODES)}, got {mode!r}")
        if mode == "model" and model is None:
            raise ValueError("ref_mode='model' needs a reference model (VPOTrainer(ref_model=...) or ref_model_path)")
        self.mode = mode
        self.model = model
        self.table = table

    # -- models ---------------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _as_reference(self, policy):
        """Yields the module to run as the reference: the adapter-disabled policy, or the reference model."""
        if self.mode == "model":
            with _eval_mode(self.model):
                yield self.model
            return
        peft = unwrap_peft(policy)
        if peft is None:
            raise ValueError(
                f"ref_mode={self.mode!r} needs the reference model here but the policy has no LoRA adapter to disable: "
                "use ref_mode='model' with a reference model, or give the batch what it needs precomputed"
            )
        with peft.disable_adapter(), _eval_mode(peft):
            yield peft

    def head(self):
        """``(ref_weight, ref_bias)`` of a separate reference model (detached), or ``(None, None)``: the policy's."""
        if self.mode != "model":
            return None, None
        with torch.no_grad():  # FSDP2: the sharded reference head gathered once per batch (vpo.distributed)
            weight, bias = unshard_head(*lm_head(self.model))
        return weight.detach(), None if bias is None else bias.detach()

    @torch.no_grad()
    def hidden(self, policy, inputs: Dict[str, torch.Tensor]) -> torch.Tensor:
        """``[R, L, D]`` the reference's last hidden states on ``inputs``."""
        if self.mode == "precomputed":
            raise ValueError("ref_mode='precomputed' has no reference forward pass")
        with self._as_reference(policy) as ref:
            return forward_hidden(ref, inputs)

    def catpo_weights(self, policy, inputs, full_labels, *, alpha: float, lambda_ref: float, layers=None, heads=None):
        """Cat-PO token weights ``[R, L]`` (aligned with ``full_labels``, the shifted labels padded to ``L``) from the
        reference's attention, and the reference's hidden states ``[R, L, D]`` of the same forward."""
        from vpo.integrations import catpo_weights_for_batch

        captured = {}

        def grab(_module, _args, output):
            captured["h"] = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]

        with self._as_reference(policy) as ref:
            handle = backbone(ref).register_forward_hook(grab)
            try:
                w = catpo_weights_for_batch(ref, inputs, full_labels, layers=layers, heads=heads, alpha=alpha,
                                            lambda_ref=lambda_ref)
            finally:
                handle.remove()
        return w, captured.get("h")

    # -- the precomputed table ------------------------------------------------------------------------------------

    def _entries(self, ids, name: str) -> List:
        if ids is None:
            raise ValueError("ref_mode='precomputed' needs batch['ids'] (one id per pair) to look up the reference "
                             "table, or the reference terms in the batch (batch['ref_logps'])")
        if self.table is None:
            raise ValueError("ref_mode='precomputed': the batch has no ref_logps and no reference table is loaded "
                             "(run `vpo precompute-ref` first, or set ref_logps_path)")
        out = []
        for i in ids:
            record = self.table.get(str(i))
            if record is None:
                raise ValueError(f"example id {i!r} is not in the precomputed reference table: it was computed for "
                                 "another dataset; run `vpo precompute-ref` again")
            if name not in record:
                raise ValueError(f"the precomputed reference table has no {name!r} terms for id {i!r} (it holds "
                                 f"{sorted(k for k in record if k != 'id')}): it was computed for another method")
            out.append(record[name])
        return out

    def lookup(self, ids, name: str, *, rows: int, pairs: int) -> torch.Tensor:
        """``[rows]`` float64 reference terms of pass ``name`` for the examples ``ids`` (layout: module docstring)."""
        entries = self._entries(ids, name)
        if _pair_layout(name, rows, pairs):
            values = [e[0] for e in entries] + [e[1] for e in entries]
        else:
            values = [v for e in entries for v in e]
        if len(values) != rows:
            raise ValueError(f"the precomputed reference table gives {len(values)} values for pass {name!r} but the "
                             f"batch has {rows} rows: precomputed with another list size or data")
        return torch.tensor(values, dtype=torch.float64)

    def has_table_weights(self) -> bool:
        return bool(self.table) and "token_weights" in next(iter(self.table.values()))

    def lookup_weights(self, ids, labels: torch.Tensor) -> torch.Tensor:
        """``[2B, T]`` Cat-PO token weights scattered back onto the response positions of ``labels`` (shifted)."""
        entries = self._entries(ids, "token_weights")
        B = len(entries)
        rows = [e[0] for e in entries] + [e[1] for e in entries]
        mask = labels != IGNORE_INDEX
        out = torch.zeros(labels.shape, dtype=torch.float32)
        for r, values in enumerate(rows):
            positions = mask[r].nonzero().flatten().cpu()
            if positions.numel() != len(values):
                raise ValueError(f"precomputed token weights of row {r} hold {len(values)} values but the row has "
                                 f"{positions.numel()} response tokens: precomputed with another tokenization")
            out[r, positions] = torch.tensor(values, dtype=torch.float32)
        if out.shape[0] != 2 * B:
            raise ValueError(f"labels has {out.shape[0]} rows but the batch has {B} ids")
        return out


def _pair_layout(name: str, rows: int, pairs: int) -> bool:
    return name == MAIN or (name != "list" and rows == 2 * pairs)


def _split_rows(name: str, values: torch.Tensor, pairs: int) -> List[List[float]]:
    """Inverse of :meth:`Reference.lookup`: per-example lists of a pass's ``[rows]`` values."""
    values = values.detach().double().cpu().tolist()
    rows = len(values)
    if _pair_layout(name, rows, pairs):
        return [[values[i], values[pairs + i]] for i in range(pairs)]
    if rows % pairs:
        raise ValueError(f"pass {name!r} has {rows} rows for {pairs} examples: expected a multiple")
    k = rows // pairs
    return [values[i * k:(i + 1) * k] for i in range(pairs)]


def reference_logps_path(data_path: Optional[str], method: str, output_dir: Optional[str] = None) -> str:
    """Where the precomputed table of ``method`` lives: next to the data (``<data>.ref_<method>.jsonl``, or
    ``<data dir>/ref_<method>.jsonl``), or in ``output_dir`` for synthetic data."""
    if data_path and not data_path.startswith("synthetic"):
        if os.path.isdir(data_path):
            return os.path.join(data_path, f"ref_{method}.jsonl")
        return f"{data_path}.ref_{method}.jsonl"
    if output_dir is None:
        raise ValueError("a reference table path needs data_path (a file or folder) or output_dir")
    return os.path.join(output_dir, f"ref_{method}.jsonl")


def save_reference_table(table: Dict[str, Dict], path: str) -> None:
    """Write ``table`` as JSON lines (atomically); on several processes only rank 0 writes."""
    from vpo.trainer.distributed import world

    if world()[0] != 0:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        for key, record in table.items():
            f.write(json.dumps({"id": key, **record}) + "\n")
    os.replace(tmp, path)


def load_reference_table(path: str) -> Dict[str, Dict]:
    """``{id: record}`` from a table written by :func:`precompute_reference`."""
    table = {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            if "id" not in record:
                raise ValueError(f"{path}:{n}: a reference-table line has no 'id'")
            table[str(record.pop("id"))] = record
    return table


def _to_device(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    return obj


@torch.no_grad()
def precompute_reference(model, dataset: Iterable, collator, config, *, batch_size: Optional[int] = None,
                         path: Optional[str] = None, progress: bool = True) -> Dict[str, Dict]:
    """Run the reference over ``dataset`` once and return (and, with ``path``, write) its per-example terms.

    Args:
        model: the reference: a peft model (its adapter is disabled: the base model is the reference) or a plain model
            (used as is). Nothing in it changes.
        dataset: the training records (a map-style dataset or a list), each collated by ``collator``.
        collator: the same collator (same method) as training, producing ``batch["ids"]``.
        config: a :class:`vpo.trainer.VPOConfig` (the method and its hyper-parameters).
        batch_size: pairs per forward (default ``config.per_device_eval_batch_size``).
        path: where to write the JSON-lines table (:func:`reference_logps_path`); None: do not write.

    Returns:
        ``{id: {pass name: [values], ...}}`` (module docstring).

    Several processes (an initialised process group): each runs its rows ``rank::world_size`` and every process
    returns the whole table in dataset order (:mod:`vpo.trainer.distributed`); rank 0 writes it.
    """
    from torch.utils.data import DataLoader

    from vpo.trainer.distributed import gather_tables, precompute_shard
    from vpo.trainer.methods import reference_terms

    dataset, index_of = precompute_shard(dataset)

    reference = Reference("adapter") if unwrap_peft(model) is not None else Reference("model", model=model)
    device = next(model.parameters()).device
    loader = DataLoader(dataset, batch_size=batch_size or config.per_device_eval_batch_size, shuffle=False,
                        collate_fn=collator)
    table: Dict[str, Dict] = {}
    iterator = loader
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(loader, desc=f"precompute reference ({config.method})")
    for batch in iterator:
        if "input_ids" not in batch or batch["input_ids"].shape[0] == 0:  # every record skipped
            continue
        ids = batch.get("ids")
        if ids is None:
            raise ValueError("the collator's batches have no 'ids': precomputed reference terms are looked up by id")
        batch = _to_device(batch, device)
        passes = Passes(batch, model, reference, list_size=config.list_size, need_grad=False, impl=config.loss_impl)
        terms = reference_terms(passes, config)
        for i, key in enumerate(ids):
            table[str(key)] = {}
        for name, values in terms.items():
            for key, row_values in zip(ids, _split_rows(name, values, passes.B)):
                table[str(key)][name] = row_values
        if config.method == "catpo":
            w = passes.token_weights(**config.catpo_weight_kwargs())
            mask = passes.labels() != IGNORE_INDEX
            for i, key in enumerate(ids):
                j = passes.B + i  # the rejected row of pair i
                table[str(key)]["token_weights"] = [w[i][mask[i]].tolist(), w[j][mask[j]].tolist()]
    table = gather_tables(table, index_of)  # several processes: every rank's rows, in dataset order
    if path is not None:
        save_reference_table(table, path)
    return table
