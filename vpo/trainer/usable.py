"""Nothing trains on nothing: a batch without one scored token is skipped and counted, and a dataset whose first
records yield none stops the run before training.

A batch is USABLE when it has rows and at least one label ``!= -100`` in its main pass (the tokens every method
scores). A batch with rows but no scored token — every response cut or overwritten (e.g. a processor's own all
``-100`` labels) — is counted as ``data/skipped_no_scored_token`` (its examples; :func:`mark_unscored`) and never
trained on: in one process :class:`vpo.trainer.resume.ResumeMixin` drops it and draws the next batch, as it does
for a batch whose records the collator all skipped. Under DDP the ranks agree first (one ``all_reduce`` of a flag,
MIN): if any rank's batch is unusable, every rank returns a zero loss without a forward for this micro-batch, so no
rank waits for gradients the others never compute. Evaluation does the same
(:meth:`vpo.trainer.VPOTrainer.prediction_step`): such a batch gives no loss, is left out of the eval loss and metric
means and counted as ``eval_skipped_batches``; an evaluation where no batch is usable raises ValueError.
"""
from __future__ import annotations

from typing import Mapping

import torch

IGNORE_INDEX = -100
NO_SCORED_TOKEN = "no_scored_token"


def batch_usable(inputs: Mapping) -> bool:
    """Whether the batch has rows and a scored token (one host read)."""
    ids = inputs.get("input_ids")
    labels = inputs.get("labels")
    if not isinstance(ids, torch.Tensor) or ids.shape[0] == 0 or not isinstance(labels, torch.Tensor):
        return False
    return bool((labels != IGNORE_INDEX).any())


def ranks_agree(usable: bool, device) -> bool:
    """``usable`` on every rank (all_reduce MIN over the default process group); ``usable`` itself without one."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return usable
    flag = torch.tensor([1 if usable else 0], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def mark_unscored(batch) -> bool:
    """When ``batch`` has rows but no scored token, add its examples (rows // 2) to ``batch["skipped"]`` as
    :data:`NO_SCORED_TOKEN` (once: a second call changes nothing) and return True; else False."""
    if not isinstance(batch, dict):
        return False
    ids = batch.get("input_ids")
    if not isinstance(ids, torch.Tensor) or ids.shape[0] == 0 or batch_usable(batch):
        return False
    skipped = batch.get("skipped")
    items = dict(skipped) if isinstance(skipped, dict) else ({"total": int(skipped)} if skipped else {})
    if NO_SCORED_TOKEN not in items:  # not marked yet
        items[NO_SCORED_TOKEN] = max(1, int(ids.shape[0]) // 2)
        batch["skipped"] = items
    return True


def check_scored_tokens(trainer, probe: int = 8) -> None:
    """Raise :class:`vpo.trainer.preflight.PreflightError` when the first ``probe`` records of the training data that
    the trainer's collator keeps give no scored token (a copy of the collator: its call counter and counts are not
    advanced). Datasets without ``__len__``/``__getitem__`` (streams, OViP online) and non-vpo collators are not
    probed."""
    import copy
    import warnings

    from vpo.data import PreferenceCollator
    from vpo.trainer.modeling import model_type_of
    from vpo.trainer.preflight import PreflightError

    dataset, collator = trainer.train_dataset, trainer.data_collator
    if not isinstance(collator, PreferenceCollator) or not hasattr(dataset, "__getitem__"):
        return
    try:
        n = min(probe, len(dataset))
    except TypeError:
        return
    if n == 0:
        return
    from vpo.data import DataStats

    probe_collator = copy.copy(collator)
    probe_collator.stats = DataStats()  # the run's own counts stay untouched
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batches = [probe_collator([dataset[i]]) for i in range(n)]
    kept = [b for b in batches if isinstance(b.get("input_ids"), torch.Tensor) and b["input_ids"].shape[0]]
    # Records the collator skips are counted and reported by the run itself; a kept record always has at least one
    # response token (the collator leaves room for one), so kept rows without any mean the labels were overwritten.
    if kept and not any(batch_usable(b) for b in kept):
        raise PreflightError(f"{model_type_of(trainer.model)}: none of the first {n} training records gives a scored "
                             f"token: their labels hold no response token (overwritten after the collator built "
                             f"them, e.g. by the processor's own labels); nothing to train on")
